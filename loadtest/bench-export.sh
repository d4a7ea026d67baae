#!/usr/bin/env bash
# Billing exports of many events: EVENTS (1,000,000) generated usage events are written into a
# Redis of the benchmark's own through the gateway's store code (usage-fill), then exported
# through the admin API by a gateway with graduated prices, as raw events (JSON Lines and
# CSV) and grouped by key, model and day. For each export: its time, its size, whether it
# holds every event with the tokens written, and the gateway's RSS before and at its peak
# (sampled every 50 ms), to show that an export streams in memory that does not grow with
# the events. Also the store's write rate through usage-fill. Writes docs/benchmarks.md.
#
#   loadtest/bench-export.sh
#   EVENTS=10000000 loadtest/bench-export.sh     # needs ~6 GB of Redis memory
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

EVENTS="${EVENTS:-1000000}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19320}"
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --bin usage-fill
bench_setup
redis_port=$PORT_BASE; port=$((PORT_BASE + 1)); admin=$((PORT_BASE + 2)); backend_port=$((PORT_BASE + 3))
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
  >"$work/redis.log" 2>&1 &
redis_pid=$!
bench_extra_cleanup() { kill "$redis_pid" 2>/dev/null || true; }
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "bench-export.sh: writing $EVENTS usage events" >&2
"$bin/usage-fill" --redis "redis://127.0.0.1:$redis_port" --prefix export --events "$EVENTS" \
  --keys 10000 --tenants 100 --span-hours 24 >"$work/fill.json"
redis_mib=$(redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ {printf "%.0f", $2 / 1048576}')

cp loadtest/bench-prices.toml "$work/sluice.toml"
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"
token=$(random_token export-)
SLUICE_REDIS_URL="redis://127.0.0.1:$redis_port" SLUICE_REDIS_PREFIX=export \
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
  SLUICE_DATA_DIR="$work/data" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
  SLUICE_BACKENDS="http://127.0.0.1:$backend_port" "$bin/sluice" serve --config "$work/sluice.toml" \
  >"$work/sluice.log" 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
wait_for "http://127.0.0.1:$admin/health"
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$gateway_pid/status"; }

# export NAME QUERY: downloads it, sampling the gateway's RSS; writes NAME.{out,stats}.
export_one() {
  local name=$1 query=$2 before peak now started
  before=$(rss); peak=$before
  started=$(date +%s.%N)
  curl -fsS -H "Authorization: Bearer $token" -o "$work/$name.out" \
    "http://127.0.0.1:$admin/admin/v1/billing/export?from=2000-01-01&$query" &
  local curl_pid=$!
  while kill -0 "$curl_pid" 2>/dev/null; do
    now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.05
  done
  wait "$curl_pid"
  echo "$before $peak $(python3 -c "import time; print(time.time() - $started)")" >"$work/$name.stats"
}
export_one events_jsonl "group_by=event&format=jsonl"
export_one events_csv "group_by=event&format=csv"
export_one grouped_csv "group_by=key,model,day&format=csv"

command_line="EVENTS=$EVENTS loadtest/bench-export.sh"
python3 - "$work" "$command_line" "$redis_mib" <<'PY' | python3 loadtest/write-section.py export "$OUT" loadtest/bench-export.sh
import csv, datetime, json, os, sys
work, command_line, redis_mib = sys.argv[1], sys.argv[2], sys.argv[3]
fill = json.load(open(f"{work}/fill.json"))
mib = lambda b: f"{b / 2**20:.0f} MiB"
def stats(name):
    before, peak, seconds = open(f"{work}/{name}.stats").read().split()
    return int(before), int(peak), float(seconds), os.path.getsize(f"{work}/{name}.out")
# Every event once, with the tokens written.
ids, prompt, completion = set(), 0, 0
with open(f"{work}/events_jsonl.out") as f:
    for line in f:
        e = json.loads(line)
        ids.add(e["id"]); prompt += e["prompt_tokens"]; completion += e["completion_tokens"]
with open(f"{work}/events_csv.out") as f:
    csv_rows = sum(1 for _ in csv.reader(f)) - 1
with open(f"{work}/grouped_csv.out") as f:
    grouped = list(csv.DictReader(f))
grouped_requests = sum(int(r["requests"]) for r in grouped)
whole = (len(ids) == fill["events"] and prompt == fill["prompt_tokens"]
         and completion == fill["completion_tokens"] and csv_rows == fill["events"]
         and grouped_requests == fill["events"])
rows = []
for name, label, lines in [("events_jsonl", "events, JSON Lines", len(ids)),
                           ("events_csv", "events, CSV", csv_rows),
                           ("grouped_csv", "by key, model and day, CSV", len(grouped))]:
    before, peak, seconds, size = stats(name)
    rows.append(f"| {label} | {lines} | {mib(size)} | {seconds:.1f} s | {mib(before)} / {mib(peak)} (+{mib(peak - before)}) |")
print("\n".join([
    "## Billing exports: memory and time",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    f"{fill['events']} usage events (10,000 keys of 100 tenants, two models, one day) written into "
    f"Redis by `usage-fill` through the gateway's own `append_usage` "
    f"({fill['events_per_second']:.0f} events/s; Redis then used {redis_mib} MiB), then exported "
    "through the admin API by one gateway with graduated prices. Exports stream: events are read "
    "a page at a time, priced and written out as they pass.",
    "",
    "| export | lines | size | time | gateway RSS before / peak |",
    "| --- | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    ("Every export is whole: each event once, with the tokens written, in both formats, and the "
     "grouped rows count every event." if whole else
     "**An export is not whole** (events, tokens or rows differ from what was written)."),
]))
PY
