#!/usr/bin/env bash
# Does metering cost time to first token? Two gateways in front of one simulated backend,
# identical but for metering (SLUICE_METERING=off vs on), loaded alternately (A B A B ...)
# with the same streamed traffic by `sluice-load compare`. Writes the result to
# docs/benchmarks.md.
#
#   loadtest/bench-metering.sh
#   RATE=300 DURATION=10s ROUNDS=5 loadtest/bench-metering.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

RATE="${RATE:-300}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-5}"
MAX_TOKENS="${MAX_TOKENS:-32}"
TOKEN_DELAY_MS="${TOKEN_DELAY_MS:-1}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19200}"

bench_setup

backend_port=$PORT_BASE
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  --sim-token-delay-ms "$TOKEN_DELAY_MS" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"

token=$(random_token bench-)
declare -A key
for metering in off on; do
  [ $metering = off ] && offset=1 || offset=3
  port=$((PORT_BASE + offset)); admin=$((PORT_BASE + offset + 1))
  SLUICE_METERING=$metering SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
    SLUICE_DATA_DIR="$work/data-$metering" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=info \
    SLUICE_BACKENDS="http://127.0.0.1:$backend_port" "$bin/sluice" serve >"$work/sluice-$metering.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  key[$metering]=$(bench_key "$admin" "$token")
done

"$bin/sluice-load" compare \
  --a "http://127.0.0.1:$((PORT_BASE + 1))" --a-name metering-off --a-key "${key[off]}" \
  --b "http://127.0.0.1:$((PORT_BASE + 3))" --b-name metering-on --b-key "${key[on]}" \
  --rounds "$ROUNDS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
  --stream --max-tokens "$MAX_TOKENS" --json >"$work/compare.json"

command_line="RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS MAX_TOKENS=$MAX_TOKENS TOKEN_DELAY_MS=$TOKEN_DELAY_MS loadtest/bench-metering.sh"
python3 - "$work/compare.json" "$command_line" <<'PY' | python3 loadtest/write-section.py metering "$OUT" loadtest/bench-metering.sh
import datetime, json, os, statistics, sys
data = json.load(open(sys.argv[1]))
command_line = sys.argv[2]
rows, d50, d99 = [], [], []
for i, r in enumerate(data["rounds"], 1):
    a, b = r["a"]["ttft_ms"], r["b"]["ttft_ms"]
    d50.append(b["p50"] - a["p50"]); d99.append(b["p99"] - a["p99"])
    rows.append(f"| {i} | {a['p50']:.3f} | {b['p50']:.3f} | {a['p99']:.3f} | {b['p99']:.3f} | "
                f"{r['a']['throughput_rps']:.1f} | {r['b']['throughput_rps']:.1f} |")
section = "\n".join([
    "## Metering and time to first token",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    "Two gateways, identical but for metering (`SLUICE_METERING=off` / `on`), in front of one "
    "simulated backend; `sluice-load compare` loads them alternately with the same streamed "
    "chat traffic. Metering on means: the usage chunk requested from the backend and stripped "
    "for the client, every SSE chunk scanned, a usage event written per request.",
    "",
    "| round | TTFT p50 off (ms) | TTFT p50 on (ms) | TTFT p99 off (ms) | TTFT p99 on (ms) | req/s off | req/s on |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    f"Median difference (on − off): TTFT p50 {statistics.median(d50):+.3f} ms, p99 {statistics.median(d99):+.3f} ms "
    f"(per-round differences p50: {', '.join(f'{x:+.3f}' for x in d50)}).",
])
print(section)
PY
