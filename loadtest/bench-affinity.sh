#!/usr/bin/env bash
# Does the gateway's prefix_affinity balancer pay off over native backends that cache prompt
# prefixes? Two SmolLM2 backends (one CPU thread each), a gateway in front of them with
# `round_robin` and then with `prefix_affinity`, and chat requests whose system prompts
# (SYSTEMS of them, each about PROMPT_WORDS words, ~1,000 tokens) repeat in a random order.
# Each backend's key/value cache holds its minimum (one full context, ~377 MiB for SmolLM2):
# room for about half the system prompts, so a backend that sees them all keeps evicting
# them, while one that sees its half keeps them. Each round starts both backends afresh, runs
# one pass over every system prompt to warm them, then REQUESTS timed requests (two at a
# time); the strategies alternate in the same order of requests. Reports time to first
# token and the prefix-cache hits the backends counted, into docs/benchmarks.md.
#
#   loadtest/bench-affinity.sh
#   ROUNDS=2 REQUESTS=36 SYSTEMS=12 loadtest/bench-affinity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS="${ROUNDS:-2}"
REQUESTS="${REQUESTS:-36}"
SYSTEMS="${SYSTEMS:-12}"
PROMPT_WORDS="${PROMPT_WORDS:-700}"
THREADS="${THREADS:-1}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19500}"
weights=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)

bench_setup
token=$(random_token bench-)
results="$work/results.jsonl"
: >"$results"

start_backends() {
  backend_pids=()
  for i in 0 1; do
    port=$((PORT_BASE + i))
    RAYON_NUM_THREADS="$THREADS" "$bin/sluice-backend" --listen "127.0.0.1:$port" \
      --model "smollm2=$weights" --device cpu --kv-cache-mb 1 >"$work/backend-$i.log" 2>&1 &
    backend_pids+=($!)
    pids+=($!)
  done
  for i in 0 1; do wait_for "http://127.0.0.1:$((PORT_BASE + i))/health" 120; done
}

stop() {
  kill "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}

for round in $(seq "$ROUNDS"); do
  for strategy in round_robin prefix_affinity; do
    start_backends
    port=$((PORT_BASE + 10)); admin=$((port + 1))
    printf '[balancer]\nstrategy = "%s"\n' "$strategy" >"$work/gateway.toml"
    rm -rf "$work/data"
    SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" SLUICE_CACHE=off \
      SLUICE_DATA_DIR="$work/data" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
      SLUICE_BACKENDS="http://127.0.0.1:$PORT_BASE,http://127.0.0.1:$((PORT_BASE + 1))" \
      "$bin/sluice" serve --config "$work/gateway.toml" >"$work/sluice.log" 2>&1 &
    gateway_pid=$!
    pids+=($gateway_pid)
    wait_for "http://127.0.0.1:$port/health"
    key=$(bench_key "$admin" "$token" unlimited)
    python3 loadtest/affinity_client.py "http://127.0.0.1:$port" "$key" \
      "http://127.0.0.1:$PORT_BASE,http://127.0.0.1:$((PORT_BASE + 1))" \
      --strategy "$strategy" --round "$round" --systems "$SYSTEMS" --words "$PROMPT_WORDS" \
      --requests "$REQUESTS" >>"$results"
    stop "$gateway_pid" "${backend_pids[@]}"
  done
done

command_line="ROUNDS=$ROUNDS REQUESTS=$REQUESTS SYSTEMS=$SYSTEMS PROMPT_WORDS=$PROMPT_WORDS THREADS=$THREADS loadtest/bench-affinity.sh"
python3 - "$results" "$command_line" <<'PY' | python3 loadtest/write-section.py affinity "$OUT" loadtest/bench-affinity.sh
import datetime, json, os, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
command_line = sys.argv[2]
rows = []
for r in runs:
    rows.append(f"| {r['round']} | {r['strategy']} | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p90']:.0f} | "
                f"{r['ttft_ms']['mean']:.0f} | {r['hit_share']:.0%} | {r['requests']} | {r['errors']} |")
def median(strategy, field):
    return statistics.median(r["ttft_ms"][field] for r in runs if r["strategy"] == strategy)
first = runs[0]
print("\n".join([
    "## Prefix affinity against round robin over two native backends",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    f"Two SmolLM2-135M backends (Q4_1, one CPU thread each, the smallest key/value cache: one "
    f"full context), a gateway in front of them (cache off), and chat requests with "
    f"{first['systems']} system prompts of about {first['system_tokens']} tokens each, in a "
    "random order, two at a time. Each backend can keep about half of the system prompts "
    "cached. Every round starts the backends afresh and warms them with one pass over the "
    "system prompts; the timed requests follow, the same sequence for both strategies. "
    "Time to first token is to the first token of text in the stream; the hit share is the "
    "prompt tokens the backends found cached over the system prompts' tokens sent.",
    "",
    "| round | strategy | TTFT p50 (ms) | p90 (ms) | mean (ms) | prefix hits | requests | errors |",
    "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    "Medians over rounds, round robin against prefix affinity (the ratio is round robin's "
    "time over affinity's): "
    + "; ".join(
        f"TTFT {field} {median('round_robin', field):.0f} ms against "
        f"{median('prefix_affinity', field):.0f} ms "
        f"({median('round_robin', field) / max(median('prefix_affinity', field), 1e-9):.2f}×)"
        for field in ("p50", "p90", "mean")
    )
    + ".",
]))
PY
