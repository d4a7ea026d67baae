#!/usr/bin/env bash
# What does the response cache cost and save, end to end? One gateway (embedded store) in
# front of a simulated backend; `sluice-load` sends fixed-rate chat traffic of four kinds in
# turn and the latencies are written to docs/benchmarks.md:
#
#   hit       the same temperature-0 request again and again (exact hits after the first)
#   miss      temperature-0 requests with distinct prompts (looked up, forwarded, kept)
#   bypass    the same request at temperature 0.7 (not eligible: no lookup at all)
#   semantic  (with MiniLM weights) a paraphrase of a kept question, and a semantic miss,
#             through a second gateway that embeds questions with the native backend
#
#   loadtest/bench-cache.sh
#   RATE=200 DURATION=10s SIM_TTFT_MS=0 loadtest/bench-cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

RATE="${RATE:-200}"
SEMANTIC_RATE="${SEMANTIC_RATE:-20}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
SIM_TTFT_MS="${SIM_TTFT_MS:-0}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19500}"
MINILM_DIR="${SLUICE_MINILM_DIR:-}"

bench_setup

backend=$PORT_BASE
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend" --model sluice-sim \
  --sim-ttft-ms "$SIM_TTFT_MS" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend/health"

embedder=$((PORT_BASE + 1))
if [ -n "$MINILM_DIR" ] && [ -f "$MINILM_DIR/config.json" ]; then
  "$bin/sluice-backend" --engine native --device cpu --listen "127.0.0.1:$embedder" \
    --model "all-MiniLM-L6-v2=$MINILM_DIR" >"$work/embedder.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$embedder/health"
else
  echo "no MiniLM weights (SLUICE_MINILM_DIR): semantic rows skipped" >&2
  embedder=""
fi

token=$(random_token bench-)
start_gateway() { # name port semantic?
  local name=$1 port=$2 admin=$(($2 + 1)) config="$work/$1.toml"
  printf '[cache]\n' >"$config"
  if [ "$3" = yes ]; then
    printf 'embedding_url = "http://127.0.0.1:%s/v1/embeddings"\n' "$embedder" >>"$config"
  fi
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
    SLUICE_DATA_DIR="$work/data-$name" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
    SLUICE_BACKENDS="http://127.0.0.1:$backend" "$bin/sluice" serve --config "$config" \
    >"$work/sluice-$name.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  bench_key "$admin" "$token" unlimited
}

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def line(q, t=0):
    return json.dumps({"body": {"model": "sluice-sim", "temperature": t, "max_tokens": 16,
                                "messages": [{"role": "user", "content": q}]}})
q = "How do I reset my password?"
open(f"{work}/hit.jsonl", "w").write(line(q) + "\n")
open(f"{work}/bypass.jsonl", "w").write(line(q, 0.7) + "\n")
open(f"{work}/paraphrase.jsonl", "w").write(line("What is the way to reset my password?") + "\n")
# Distinct questions; the numbers differ, so even their nearest neighbours fail the guard.
with open(f"{work}/miss.jsonl", "w") as f:
    for i in range(200_000):
        f.write(line(f"Question {i}: what is {i} times {i + 7}?") + "\n")
PY

load() { # url key mix rate
  "$bin/sluice-load" run "$1" --key "$2" --mix "$3" --rate "$4" --duration "$DURATION" \
    --warmup "$WARMUP" --json
}

exact_key=$(start_gateway exact $((PORT_BASE + 2)) no)
exact="http://127.0.0.1:$((PORT_BASE + 2))"
for kind in bypass hit miss; do
  load "$exact" "$exact_key" "$work/$kind.jsonl" "$RATE" >"$work/exact-$kind.json"
done
if [ -n "$embedder" ]; then
  semantic_key=$(start_gateway semantic $((PORT_BASE + 4)) yes)
  semantic="http://127.0.0.1:$((PORT_BASE + 4))"
  # Keep the question the paraphrase is near.
  "$bin/sluice-load" run "$semantic" --key "$semantic_key" --mix "$work/hit.jsonl" --requests 3 \
    --concurrency 1 --json >/dev/null
  sleep 0.5
  for kind in paraphrase miss; do
    load "$semantic" "$semantic_key" "$work/$kind.jsonl" "$SEMANTIC_RATE" >"$work/semantic-$kind.json"
  done
fi
stats=$(curl -fsS "http://127.0.0.1:$((PORT_BASE + 3))/admin/v1/cache/stats" -H "Authorization: Bearer $token")
echo "$stats" >"$work/exact-stats.json"

command_line="RATE=$RATE SEMANTIC_RATE=$SEMANTIC_RATE DURATION=$DURATION WARMUP=$WARMUP SIM_TTFT_MS=$SIM_TTFT_MS loadtest/bench-cache.sh"
python3 - "$work" "$command_line" "$RATE" "$SEMANTIC_RATE" <<'PY' | python3 loadtest/write-section.py cache-e2e "$OUT" loadtest/bench-cache.sh
import datetime, json, os, sys
work, command_line, rate, semantic_rate = sys.argv[1:5]
rows = []
def row(label, path, what, r):
    if not os.path.exists(path):
        return
    d = json.load(open(path))
    l = d["latency_ms"]
    errors = sum(d["errors"].values())
    rows.append(f"| {label} | {what} | {r} | {l['p50']:.3f} | {l['p99']:.3f} | {errors} |")
row("bypass", f"{work}/exact-bypass.json", "temperature 0.7: not eligible, no lookup", rate)
row("exact hit", f"{work}/exact-hit.json", "the same request: answered by the gateway", rate)
row("exact miss", f"{work}/exact-miss.json", "distinct prompts: looked up, forwarded, kept", rate)
row("semantic hit", f"{work}/semantic-paraphrase.json", "a paraphrase: embedded, found, guarded", semantic_rate)
row("semantic miss", f"{work}/semantic-miss.json", "distinct prompts: embedded, searched, forwarded, kept", semantic_rate)
stats = json.load(open(f"{work}/exact-stats.json"))
section = "\n".join([
    "## Response cache: a hit against a miss, end to end",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    "One gateway per row group (embedded store) in front of a simulated backend that answers "
    "at once, so the figures are the gateway's own cost; `sluice-load run` at a fixed rate, "
    "latency from request sent to response read. The semantic rows go through a second gateway "
    "whose cache embeds each question with the native backend's all-MiniLM-L6-v2 on the same "
    "2 CPUs, at a lower rate because each embedding costs CPU milliseconds.",
    "",
    "| kind | what | rate (req/s) | p50 (ms) | p99 (ms) | errors |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    f"The exact gateway's cache afterwards: {stats['entries']} entries, {stats['hits']} hits, "
    f"{stats['misses']} misses.",
])
print(section)
PY
