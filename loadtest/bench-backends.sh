#!/usr/bin/env bash
# Does a second and third backend add capacity? Three simulated backends, each with a fixed
# capacity (--sim-max-running replies at once, each taking SIM_TTFT_MS, like a GPU's batch),
# and two gateways: one in front of one backend, one in front of all three (p2c). Closed-loop
# load through each, alternately (`sluice-load compare`), written to docs/benchmarks.md.
#
#   loadtest/bench-backends.sh
#   CONCURRENCY=48 DURATION=8s ROUNDS=3 MAX_RUNNING=8 SIM_TTFT_MS=20 loadtest/bench-backends.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

CONCURRENCY="${CONCURRENCY:-48}"
DURATION="${DURATION:-8s}"
WARMUP="${WARMUP:-1s}"
ROUNDS="${ROUNDS:-3}"
MAX_RUNNING="${MAX_RUNNING:-8}"
SIM_TTFT_MS="${SIM_TTFT_MS:-20}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19400}"

bench_setup

urls=()
for i in 0 1 2; do
  port=$((PORT_BASE + i))
  "$bin/sluice-backend" --engine sim --listen "127.0.0.1:$port" --model sluice-sim \
    --sim-ttft-ms "$SIM_TTFT_MS" --sim-max-running "$MAX_RUNNING" >"$work/backend-$i.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  urls+=("http://127.0.0.1:$port")
done

token=$(random_token bench-)
declare -A key
for pool in one three; do
  [ $pool = one ] && offset=10 || offset=12
  [ $pool = one ] && backends="${urls[0]}" || backends="$(IFS=,; echo "${urls[*]}")"
  port=$((PORT_BASE + offset)); admin=$((port + 1))
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" SLUICE_CACHE=off \
    SLUICE_DATA_DIR="$work/data-$pool" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
    SLUICE_BACKENDS="$backends" "$bin/sluice" serve >"$work/sluice-$pool.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  key[$pool]=$(bench_key "$admin" "$token" unlimited)
done

"$bin/sluice-load" compare \
  --a "http://127.0.0.1:$((PORT_BASE + 10))" --a-name one-backend --a-key "${key[one]}" \
  --b "http://127.0.0.1:$((PORT_BASE + 12))" --b-name three-backends --b-key "${key[three]}" \
  --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
  --max-tokens 16 --json >"$work/compare.json"

command_line="CONCURRENCY=$CONCURRENCY DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS MAX_RUNNING=$MAX_RUNNING SIM_TTFT_MS=$SIM_TTFT_MS loadtest/bench-backends.sh"
python3 - "$work/compare.json" "$command_line" "$MAX_RUNNING" "$SIM_TTFT_MS" <<'PY' | python3 loadtest/write-section.py backends "$OUT" loadtest/bench-backends.sh
import datetime, json, os, statistics, sys
data = json.load(open(sys.argv[1]))
command_line, max_running, ttft = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
capacity = max_running * 1000 / ttft
rows, ratios = [], []
for i, r in enumerate(data["rounds"], 1):
    a, b = r["a"], r["b"]
    ratios.append(b["throughput_rps"] / max(a["throughput_rps"], 1e-9))
    errors = sum(a["errors"].values()) + sum(b["errors"].values())
    rows.append(f"| {i} | {a['throughput_rps']:.1f} | {b['throughput_rps']:.1f} | "
                f"{a['latency_ms']['p50']:.2f} | {b['latency_ms']['p50']:.2f} | "
                f"{a['latency_ms']['p99']:.2f} | {b['latency_ms']['p99']:.2f} | {errors} |")
section = "\n".join([
    "## Throughput with one backend and with three",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    f"Each simulated backend generates at most {max_running} replies at once, {ttft} ms each "
    f"(a capacity of about {capacity:.0f} replies/s, like a GPU's batch); past that, requests "
    "queue in the backend. Two gateways (cache off, p2c), one in front of one backend and one "
    "in front of three, loaded alternately with the same closed-loop traffic. The load "
    "generator and the gateway share the machine's 2 CPUs, which caps what three backends can "
    "show.",
    "",
    "| round | req/s, 1 backend | req/s, 3 backends | p50 ms, 1 | p50 ms, 3 | p99 ms, 1 | p99 ms, 3 | errors |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    f"Median throughput ratio, three backends against one: {statistics.median(ratios):.2f}×.",
])
print(section)
PY
