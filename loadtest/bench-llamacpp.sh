#!/usr/bin/env bash
# The native engine side by side with llama.cpp on the same GGUF file and box, written into
# docs/benchmarks.md: SmolLM2-135M-Instruct Q4_1, prompts of 128 tokens prefilled together,
# then 32 tokens decoded, for 1 and for 16 sequences. Sluice through
# `examples/llama_speed.rs`, llama.cpp through its own `llama-batched-bench` (-npp 128
# -ntg 32 -npl 1,16, the same work), in alternating rounds so both share the box's noise.
#
# llama.cpp is built from the tree vendored in PyPI's llama-cpp-python sdist (pinned below,
# native CPU flags) into $LLAMACPP_DIR once; cmake and a C++ compiler are installed if missing.
#
#   loadtest/bench-llamacpp.sh
#   ROUNDS=3 loadtest/bench-llamacpp.sh
#   BASELINE=/path/to/older/llama_speed loadtest/bench-llamacpp.sh   # an earlier build too
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS="${ROUNDS:-2}"
OUT="${OUT:-docs/benchmarks.md}"
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.16}"
LLAMACPP_DIR="${LLAMACPP_DIR:-/var/tmp/sluice-llamacpp}"
THREADS="${THREADS:-$(nproc)}"

[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p sluice-backend --example llama_speed
speed="${CARGO_TARGET_DIR:-target}/release/examples/llama_speed"
smollm2=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)

bench="$LLAMACPP_DIR/build/bin/llama-batched-bench"
if [ ! -x "$bench" ]; then
  ensure_build_tools
  src="$LLAMACPP_DIR/src"
  mkdir -p "$src"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    --dest "$src" "llama-cpp-python==$LLAMACPP_VERSION" >&2
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  tree=$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)
  cmake -S "$tree" -B "$LLAMACPP_DIR/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release >&2
  cmake --build "$LLAMACPP_DIR/build" -j "$(nproc)" --target llama-batched-bench >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for round in $(seq "$ROUNDS"); do
  for n in 1 16; do
    RAYON_NUM_THREADS="$THREADS" "$speed" "$smollm2" "$n" | tee -a "$work/sluice.txt"
    if [ -n "${BASELINE:-}" ]; then
      RAYON_NUM_THREADS="$THREADS" "$BASELINE" "$smollm2" "$n" | tee -a "$work/baseline.txt"
    fi
  done
  "$bench" -m "$smollm2" -c 4096 -b 2048 -ub 512 -npp 128 -ntg 32 -npl 1,16 -t "$THREADS" \
    2>/dev/null | grep -E '^\|\s+128' | tee -a "$work/llamacpp.txt"
done

command_line="ROUNDS=$ROUNDS${BASELINE:+ BASELINE=$BASELINE} loadtest/bench-llamacpp.sh"
python3 - "$work" "$command_line" "$LLAMACPP_VERSION" "$THREADS" <<'PY' | python3 loadtest/write-section.py engine-vs-llamacpp "$OUT" loadtest/bench-llamacpp.sh
import datetime, os, re, statistics, sys

work, command_line, version, threads = sys.argv[1:5]
cpu = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read()).group(1)
flags = open("/proc/cpuinfo").read()
isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "SSE"
def speeds(path):
    found = {1: {"prefill": [], "decode": []}, 16: {"prefill": [], "decode": []}}
    if not os.path.exists(path):
        return None
    for line in open(path):
        m = re.search(r"(\d+) sequence\(s\): prefill ([\d.]+) tokens/s.*decode ([\d.]+) tokens/s", line)
        if m:
            n = int(m.group(1))
            found[n]["prefill"].append(float(m.group(2)))
            found[n]["decode"].append(float(m.group(3)))
    return found

sluice = speeds(f"{work}/sluice.txt")
baseline = speeds(f"{work}/baseline.txt")
llama = {1: {"prefill": [], "decode": []}, 16: {"prefill": [], "decode": []}}
for line in open(f"{work}/llamacpp.txt"):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
    n = int(cells[2])
    llama[n]["prefill"].append(float(cells[5]))
    llama[n]["decode"].append(float(cells[7]))

def fmt(values):
    return " / ".join(f"{v:.0f}" for v in values)

out = [
    "## Native engine against llama.cpp, same file, same box",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on "
    f"{os.cpu_count()} CPUs ({cpu}, {isa}), {threads} threads each. SmolLM2-135M-Instruct Q4_1 "
    "GGUF; 128-token prompts prefilled together, then 32 tokens decoded, one batched step per "
    "token. Sluice: `examples/llama_speed.rs` (f32 activations). llama.cpp: "
    f"`llama-batched-bench -npp 128 -ntg 32 -npl 1,16` from llama-cpp-python {version}'s "
    "vendored tree, built with `GGML_NATIVE` (its Q4_1 products quantise activations to 8 bits). "
    "Alternating rounds; each cell lists the rounds, tokens per second; the ratio is of the medians.",
    "",
    f"Command: `{command_line}`",
    "",
]
if baseline:
    out += [
        "The baseline column is an earlier build's `llama_speed`, run in the same rounds.",
        "",
        "| | Sluice | baseline | llama.cpp | Sluice / baseline | Sluice / llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
else:
    out += ["| | Sluice | llama.cpp | Sluice / llama.cpp |", "| --- | ---: | ---: | ---: |"]

def ratio(a, b):
    return f"{statistics.median(a) / statistics.median(b):.2f}×" if a and b else "n/a"

for n in (1, 16):
    for phase in ("prefill", "decode"):
        s, l = sluice[n][phase], llama[n][phase]
        label = f"{phase}, {n} sequence{'s' if n > 1 else ''}"
        if baseline:
            b = baseline[n][phase]
            out.append(f"| {label} | {fmt(s)} | {fmt(b)} | {fmt(l)} | {ratio(s, b)} | {ratio(s, l)} |")
        else:
            out.append(f"| {label} | {fmt(s)} | {fmt(l)} | {ratio(s, l)} |")
print("\n".join(out))
PY
