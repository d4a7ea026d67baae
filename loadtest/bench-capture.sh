#!/usr/bin/env bash
# What capture for distillation costs a request: on one gateway, a key opted in to capture
# (every answer kept in the dataset) against a key that is not, alternating rounds at a fixed
# rate, on the embedded store and on Redis. Also counts what was kept and what was dropped.
# Writes docs/benchmarks.md.
#
#   loadtest/bench-capture.sh
#   RATE=300 DURATION=8s ROUNDS=5 loadtest/bench-capture.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

RATE="${RATE:-300}"
DURATION="${DURATION:-8s}"
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-5}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19400}"

redis_port=$((PORT_BASE + 9))
bench_setup
bench_redis "$redis_port"

backend_port=$PORT_BASE
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"

token=$(random_token bench-)
results="$work/results.txt"
offset=1
for store in embedded redis; do
  port=$((PORT_BASE + offset)); admin=$((PORT_BASE + offset + 1)); offset=$((offset + 2))
  store_line=""
  [ $store = redis ] && store_line="redis_url = \"redis://127.0.0.1:$redis_port\""
  cat >"$work/sluice-$store.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
data_dir = "$work/data-$store"
$store_line
threads = 2
grace_period_secs = 0

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
TOML
  SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn "$bin/sluice" serve --config "$work/sluice-$store.toml" \
    >"$work/sluice-$store.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  plain=$(bench_key "$admin" "$token" unlimited)
  captured=$(curl -fsS "http://127.0.0.1:$admin/admin/v1/keys" -H "Authorization: Bearer $token" \
    -d '{"name":"captured","tenant":"bench","tier":"enterprise","distillation":{"models":["*"]},"limits":{"requests_per_minute":100000000,"requests_per_day":10000000000,"tokens_per_minute":100000000000,"tokens_per_day":100000000000,"max_concurrent":100000}}' |
    sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
  "$bin/sluice-load" compare \
    --a "http://127.0.0.1:$port" --a-name plain --a-key "$plain" \
    --b "http://127.0.0.1:$port" --b-name captured --b-key "$captured" \
    --rounds "$ROUNDS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
    --stream --max-tokens 16 --json >"$work/compare-$store.json"
  sleep 2  # the last captures are written
  metrics=$(curl -fsS "http://127.0.0.1:$admin/metrics" -H "Authorization: Bearer $token")
  kept=$(printf '%s\n' "$metrics" | awk '/^sluice_dataset_captures_total\{outcome="kept"\}/ {print $2}')
  dropped=$(printf '%s\n' "$metrics" | awk '/^sluice_dataset_captures_total\{outcome="(dropped_queue|dropped_store|too_large|unreadable)"\}/ {n += $2} END {print n + 0}')
  lines=$(curl -fsS "http://127.0.0.1:$admin/admin/v1/datasets/export" -H "Authorization: Bearer $token" | wc -l)
  echo "$store $kept $dropped $lines" >>"$results"
done

command_line="RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS loadtest/bench-capture.sh"
python3 - "$results" "$work" "$command_line" <<'PY' | python3 loadtest/write-section.py capture "$OUT" loadtest/bench-capture.sh
import datetime, json, os, statistics, sys
results, work, command_line = sys.argv[1:4]
rows = []
for line in open(results):
    store, kept, dropped, lines = line.split()
    data = json.load(open(os.path.join(work, f"compare-{store}.json")))
    d50 = [r["b"]["latency_ms"]["p50"] - r["a"]["latency_ms"]["p50"] for r in data["rounds"]]
    d99 = [r["b"]["latency_ms"]["p99"] - r["a"]["latency_ms"]["p99"] for r in data["rounds"]]
    sent = sum(r["b"]["ok"] for r in data["rounds"])
    per = lambda xs: ", ".join(f"{x:+.3f}" for x in xs)
    rows.append(f"| {store} | {statistics.median(d50):+.3f} ({per(d50)}) | "
                f"{statistics.median(d99):+.3f} ({per(d99)}) | {kept} | {dropped} | {lines} |")
print("\n".join([
    "## Capture for distillation: added latency",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    "One gateway per store, two keys of one tenant: one opted in to capture (`distillation` "
    "on the key, every model), one not. Streamed chat completions of 16 tokens from the "
    "simulated backend, at a fixed rate, in alternating rounds (not captured, then captured). "
    "Added latency is the captured key's percentile less the other key's in the same pair of "
    "rounds, in ms (median of the rounds, then each round). Kept and dropped count every "
    "captured request, warm-ups included (`sluice_dataset_captures_total`); exported is the "
    "number of lines the dataset export returned after the run.",
    "",
    "| store | added p50 ms | added p99 ms | conversations kept | dropped | exported lines |",
    "| --- | --- | --- | ---: | ---: | ---: |",
    *rows,
]))
PY
