# Shell helpers shared by the quickstart and benchmark scripts (sourced, not run).

# wait_for URL [SECONDS]: waits up to SECONDS (default 10) for URL to answer 2xx, or exits
# the script.
wait_for() {
  for _ in $(seq $((${2:-10} * 10))); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$(basename "$0"): $1 did not answer" >&2
  exit 1
}

# ensure_pip: python3 with pip, which scripts/fetch-weights.sh downloads the weights with.
ensure_pip() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "$(basename "$0"): installing python3-pip" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
}

# random_token PREFIX: PREFIX followed by 24 random hex digits.
random_token() {
  printf '%s%s' "$1" "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
}

# ensure_build_tools: what a cold build needs besides Rust (pingora builds zlib-ng with cmake),
# and g++, which builds the emulated GPU of backend/tests/cuda_emulated.rs.
ensure_build_tools() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "$(basename "$0"): installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# ensure_browser: headless Chromium and its WebDriver, for the admin console's browser test.
ensure_browser() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "$(basename "$0"): installing chromium and chromium-driver" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
}

# bench_setup: for the benchmark scripts. Builds the release binaries (unless
# BENCH_NO_BUILD=1: use those already built) and sets $bin (where they are), $work (a scratch
# folder) and $pids (processes to stop); at exit, stops them, runs bench_extra_cleanup if the
# script defines it, and removes $work.
bench_setup() {
  [ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --bin sluice --bin sluice-backend --bin sluice-load --bin bare-pingora
  bin="${CARGO_TARGET_DIR:-target}/release"
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT INT TERM
}

bench_cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup; fi
  if [ -n "${bench_redis_port:-}" ]; then
    redis-cli -p "$bench_redis_port" shutdown nosave >/dev/null 2>&1 || true
  fi
  wait 2>/dev/null || true
  rm -rf "$work"
}

# bench_redis PORT: starts a Redis of the benchmark's own on PORT (no persistence, files in
# $work), so that what it counts is this run's alone; bench_cleanup shuts it down.
bench_redis() {
  command -v redis-server >/dev/null || scripts/ensure-redis.sh
  bench_redis_port=$1
  redis-server --bind 127.0.0.1 --port "$1" --save "" --appendonly no --daemonize yes \
    --logfile "$work/redis.log" --dir "$work"
  for _ in $(seq 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "bench_redis: Redis did not start on port $1" >&2
  return 1
}

# bench_key ADMIN_PORT ADMIN_TOKEN [unlimited]: creates an enterprise-tier key and prints
# its secret; with "unlimited", its rate limits are far above anything a benchmark sends.
bench_key() {
  local limits=""
  [ "${3:-}" = unlimited ] && limits=',"limits":{"requests_per_minute":100000000,"requests_per_day":10000000000,"tokens_per_minute":100000000000,"tokens_per_day":100000000000,"max_concurrent":100000}'
  curl -fsS "http://127.0.0.1:$1/admin/v1/keys" -H "Authorization: Bearer $2" \
    -d "{\"name\":\"bench\",\"tenant\":\"bench\",\"tier\":\"enterprise\"$limits}" |
    sed -n 's/.*"key":"\([^"]*\)".*/\1/p'
}

# cpu_ticks PID...: user + system CPU time of these processes so far, in clock ticks.
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
