#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, cargo-fuzz with libFuzzer and AddressSanitizer,
# on the nightly toolchain) for SECONDS each (default 30), seeded from fuzz/corpus/<target>
# (committed seeds) and fuzz/corpus-run/<target> (what earlier runs found; not committed).
# A crash stops the run with the input under fuzz/artifacts/<target>/: add it to
# fuzz/corpus/<target>/ once fixed, so it is replayed by every later run.
#
#   scripts/fuzz.sh                 # every target, 30 s each
#   SECONDS_EACH=600 scripts/fuzz.sh sse_usage   # one target, longer
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SECONDS_EACH:-30}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is missing; fuzzing needs it (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install --quiet --locked cargo-fuzz --version '^0.13'
fi
export CARGO_TARGET_DIR="${SLUICE_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}-fuzz}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus-run/$target" "fuzz/corpus/$target"
  echo "fuzz.sh: $target for ${seconds}s" >&2
  log="fuzz/run-$target.log"
  if ! (cd fuzz && cargo +nightly fuzz run "$target" "corpus-run/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1) >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $target crashed; the input is under fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units)' "$log" | tail -n 1 >&2 || true
done
echo "fuzz.sh: no target crashed"
