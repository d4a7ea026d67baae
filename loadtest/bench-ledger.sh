#!/usr/bin/env bash
# The usage ledger at scale. EVENTS (10,000,000) generated usage events are written into a
# fresh PostgreSQL database through the ledger's own insert (usage-fill --postgres: one
# writer, batches of 512, as one replica's usage writer), then exported through the admin API
# by a gateway whose usage lives in that ledger: grouped by key, model and day over whole days
# (from the rollups), grouped up to now (rollups and the events of today), and every event as
# JSON Lines. For each export: its time, lines, and the gateway's RSS before and at its peak
# (sampled every 50 ms). Then Redis memory for usage: BUFFER_EVENTS (1,000,000) events kept
# the way a store without a ledger keeps them (events and ids, for ever) against the same
# events in the ledger's buffer during an outage, and after the buffer is drained into the
# ledger (trimmed). Writes the "ledger" section of docs/benchmarks.md.
#
#   loadtest/bench-ledger.sh
#   EVENTS=1000000 loadtest/bench-ledger.sh      # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

EVENTS="${EVENTS:-10000000}"
BUFFER_EVENTS="${BUFFER_EVENTS:-1000000}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19340}"
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --bin usage-fill
bench_setup
scripts/ensure-postgres.sh
server="${SLUICE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
db="sluice_bench_$(date +%s)_$$"
psql -X -q -d "$server/postgres" -c "CREATE DATABASE $db"
ledger="$server/$db"
redis_port=$PORT_BASE; port=$((PORT_BASE + 1)); admin=$((PORT_BASE + 2)); backend_port=$((PORT_BASE + 3))
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
  >"$work/redis.log" 2>&1 &
redis_pid=$!
bench_extra_cleanup() {
  kill "$redis_pid" 2>/dev/null || true
  psql -X -q -d "$server/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
  psql -X -q -d "$server/postgres" -c "DROP DATABASE IF EXISTS ${db}_buffer WITH (FORCE)" 2>/dev/null || true
}
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "bench-ledger.sh: writing $EVENTS usage events into the ledger" >&2
"$bin/usage-fill" --postgres "$ledger" --events "$EVENTS" --batch 512 \
  --keys 10000 --tenants 100 --span-hours 72 >"$work/fill.json"
ledger_mib=$(psql -X -At -d "$ledger" -c "SELECT (sum(pg_total_relation_size(c.oid)) / 1048576)::bigint FROM pg_class c WHERE c.relname LIKE 'usage_%' AND c.relkind IN ('r', 'p')")

"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"
cp loadtest/bench-prices.toml "$work/sluice.toml"
token=$(random_token ledger-)
SLUICE_POSTGRES_URL="$ledger" \
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
  SLUICE_DATA_DIR="$work/data" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
  SLUICE_BACKENDS="http://127.0.0.1:$backend_port" "$bin/sluice" serve --config "$work/sluice.toml" \
  >"$work/sluice.log" 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
wait_for "http://127.0.0.1:$admin/health"
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$gateway_pid/status"; }

# export NAME QUERY: streams it through a checker (lines, requests, tokens, distinct ids),
# sampling the gateway's RSS; writes NAME.{check,stats}.
export_one() {
  local name=$1 query=$2 before peak now started
  before=$(rss); peak=$before
  started=$(date +%s.%N)
  curl -fsS -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$admin/admin/v1/billing/export?$query" \
    | python3 -c '
import json, sys
lines = requests = prompt = completion = 0
ids = set()
for line in sys.stdin:
    row = json.loads(line)
    lines += 1
    requests += row.get("requests", 1)
    prompt += row["prompt_tokens"]; completion += row["completion_tokens"]
    if "id" in row:
        ids.add(row["id"])
print(json.dumps({"lines": lines, "requests": requests, "prompt_tokens": prompt,
                  "completion_tokens": completion, "distinct_ids": len(ids)}))
' >"$work/$name.check" &
  local check_pid=$!
  while kill -0 "$check_pid" 2>/dev/null; do
    now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.05
  done
  wait "$check_pid"
  echo "$before $peak $(python3 -c "import time; print(time.time() - $started)")" >"$work/$name.stats"
}
tomorrow=$(date -u -d tomorrow +%F)
echo "bench-ledger.sh: exporting" >&2
export_one days "from=2000-01-01&to=$tomorrow&group_by=key,model,day&format=jsonl"
export_one to_now "from=2000-01-01&group_by=tenant,model&format=jsonl"
export_one events "from=2000-01-01&to=$tomorrow&group_by=event&format=jsonl"

echo "bench-ledger.sh: Redis memory for $BUFFER_EVENTS events" >&2
used() { redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ {printf "%.0f", $2 / 1048576}'; }
empty_mib=$(used)
"$bin/usage-fill" --redis "redis://127.0.0.1:$redis_port" --prefix store --events "$BUFFER_EVENTS" \
  --keys 10000 --tenants 100 >/dev/null
store_mib=$(used)
redis-cli -p "$redis_port" flushall >/dev/null
"$bin/usage-fill" --redis "redis://127.0.0.1:$redis_port" --prefix buffered --buffer \
  --events "$BUFFER_EVENTS" --keys 10000 --tenants 100 >/dev/null
buffered_mib=$(used)
psql -X -q -d "$server/postgres" -c "CREATE DATABASE ${db}_buffer"
"$bin/usage-fill" --redis "redis://127.0.0.1:$redis_port" --prefix buffered \
  --drain-into "$server/${db}_buffer" >"$work/drain.json"
drained_mib=$(used)

command_line="EVENTS=$EVENTS loadtest/bench-ledger.sh"
python3 - "$work" "$command_line" "$ledger_mib" "$empty_mib" "$store_mib" "$buffered_mib" "$drained_mib" "$BUFFER_EVENTS" <<'PY' | python3 loadtest/write-section.py ledger "$OUT" loadtest/bench-ledger.sh
import datetime, json, os, sys
work, command_line, ledger_mib, empty, store, buffered, drained, buffer_events = sys.argv[1:]
fill = json.load(open(f"{work}/fill.json"))
drain = json.load(open(f"{work}/drain.json"))
mib = lambda b: f"{b / 2**20:.0f} MiB"
rows, whole = [], True
for name, label in [("days", "by key, model and day, whole days (rollups)"),
                    ("to_now", "by tenant and model, up to now (rollups and today's events)"),
                    ("events", "every event, JSON Lines (raw events)")]:
    check = json.load(open(f"{work}/{name}.check"))
    before, peak, seconds = open(f"{work}/{name}.stats").read().split()
    before, peak = int(before), int(peak)
    ok = (check["requests"] == fill["events"] and check["prompt_tokens"] == fill["prompt_tokens"]
          and check["completion_tokens"] == fill["completion_tokens"]
          and (name != "events" or check["distinct_ids"] == fill["events"]))
    whole = whole and ok
    rows.append(f"| {label} | {check['lines']} | {float(seconds):.1f} s | {mib(before)} / {mib(peak)} (+{mib(peak - before)}) | {'yes' if ok else '**no**'} |")
print("\n".join([
    "## Usage ledger: ingest, exports and Redis memory",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs "
    "(PostgreSQL, Redis, the gateway and the load all on this machine).",
    "",
    f"Command: `{command_line}`",
    "",
    f"**Ingest:** {fill['events']:,} usage events (10,000 keys of 100 tenants, two models, three days) "
    f"written through `Ledger::insert` by one writer in batches of 512, as one replica's usage "
    f"writer does: **{fill['events_per_second']:,.0f} events/s** ({fill['seconds']:.0f} s), each batch one "
    f"statement that inserts the new events and adds them to the day rollups. The ledger's tables "
    f"then took {ledger_mib} MiB.",
    "",
    "**Exports** through one gateway's admin API, read from the ledger (each checked against what "
    "was written: requests, prompt and completion tokens, and for the event export every id once):",
    "",
    "| export | lines | time | gateway RSS before / peak | whole |",
    "| --- | ---: | ---: | ---: | :---: |",
    *rows,
    "",
    f"**Redis memory for usage**, {int(buffer_events):,} events (Redis empty: {empty} MiB):",
    "",
    "| how Redis holds them | used_memory |",
    "| --- | ---: |",
    f"| no ledger: the store's events and ids, kept for ever (today's small deployments) | {store} MiB |",
    f"| ledger down: in the usage buffer (16 shards) | {buffered} MiB |",
    f"| ledger back: the buffer drained into it ({drain['events_per_second']:,.0f} events/s) and trimmed | {drained} MiB |",
    "",
    "With the ledger up, events go straight to PostgreSQL and Redis holds none.",
]))
PY
