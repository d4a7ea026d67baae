#!/usr/bin/env bash
# Soak: DURATION (30m) of mixed traffic (chat JSON and streams, completions; every request
# different) over KEYS (100,000) distinct API keys of 100 tenants, through one gateway on a
# Redis of its own that is restarted RESTARTS (2) times during the run (down DOWN_SECS each).
# It checks what a long run must not do:
#   - memory: the gateway's RSS at the end within 10% of its RSS after the warm-up (one
#     request per key, then WARMUP_SECS of the run: by default the time the run takes to use
#     every key once at its rate, KEYS / RATE, at least 120 s, so that what the replica keeps
#     for the run's traffic has been built up once before memory is first read);
#   - usage: no event lost or doubled. Every request the backend served is one usage event
#     (the events exported for the run, by distinct id, against the backend's own request
#     counter), with the backend's tokens (its prompt and generation token counters).
# Writes the result to docs/benchmarks.md.
#
#   loadtest/bench-soak.sh
#   DURATION=5m KEYS=10000 loadtest/bench-soak.sh     # shorter
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DURATION="${DURATION:-30m}"
KEYS="${KEYS:-100000}"
RATE="${RATE:-200}"
RESTARTS="${RESTARTS:-2}"
DOWN_SECS="${DOWN_SECS:-5}"
WARMUP_SECS="${WARMUP_SECS:-$(( KEYS / RATE > 120 ? KEYS / RATE : 120 ))}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19300}"
duration_secs=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)([smh]?)', sys.argv[1]); print(int(m[1])*{'':1,'s':1,'m':60,'h':3600}[m[2]])" "$DURATION")

bench_setup
redis_port=$PORT_BASE; backend_port=$((PORT_BASE + 1)); port=$((PORT_BASE + 2)); admin=$((PORT_BASE + 3))
mkdir -p "$work/redis"
start_redis() {
  redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$work/redis" --appendonly yes \
    --appendfsync everysec --save "" >>"$work/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "bench-soak.sh: redis did not start" >&2; exit 1
}
bench_extra_cleanup() { kill "$redis_pid" 2>/dev/null || true; }
start_redis

"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"
token=$(random_token soak-)
SLUICE_REDIS_URL="redis://127.0.0.1:$redis_port" SLUICE_REDIS_PREFIX=soak \
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
  SLUICE_DATA_DIR="$work/data" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
  SLUICE_BACKENDS="http://127.0.0.1:$backend_port" "$bin/sluice" serve >"$work/sluice.log" 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
wait_for "http://127.0.0.1:$port/health"
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$gateway_pid/status"; }

echo "bench-soak.sh: creating $KEYS keys" >&2
python3 - "$admin" "$token" "$KEYS" "$work/keys.txt" <<'PY'
import concurrent.futures, http.client, json, sys, threading
admin, token, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
local = threading.local()
def create(i):
    if not hasattr(local, "c"):
        local.c = http.client.HTTPConnection("127.0.0.1", int(admin))
    body = json.dumps({"name": f"soak-{i}", "tenant": f"tenant-{i % 100}", "tier": ["free", "pro", "enterprise"][i % 3]})
    local.c.request("POST", "/admin/v1/keys", body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = local.c.getresponse(); data = r.read()
    assert r.status == 201, data
    return json.loads(data)["key"]
with concurrent.futures.ThreadPoolExecutor(8) as pool, open(out, "w") as f:
    for key in pool.map(create, range(count), chunksize=256):
        f.write(key + "\n")
PY

# No request sets temperature 0, so none is cacheable: every admitted one reaches the backend.
cat >"$work/mix.jsonl" <<'MIX'
{"body": {"model": "sluice-sim", "max_tokens": 16, "messages": [{"role": "user", "content": "Write one sentence about rivers."}]}, "weight": 3}
{"body": {"model": "sluice-sim", "max_tokens": 16, "stream": true, "messages": [{"role": "user", "content": "Tell me about lakes."}]}, "weight": 3}
{"body": {"model": "sluice-sim", "max_tokens": 8, "prompt": "Once upon a time"}, "weight": 1}
MIX

# Warm-up: one request per key (the load generator takes keys in turn), so that what a replica
# keeps per key (its cached identity, lease) is all there before memory is first read.
echo "bench-soak.sh: warm-up, one request per key" >&2
"$bin/sluice-load" run "http://127.0.0.1:$port" --keys-file "$work/keys.txt" \
  --mix "$work/mix.jsonl" --concurrency 64 --requests "$KEYS" --timeout 30s --json \
  >"$work/warmup.json" 2>"$work/warmup.log"
echo "bench-soak.sh: $DURATION at $RATE req/s; Redis restarted $RESTARTS times" >&2
"$bin/sluice-load" run "http://127.0.0.1:$port" --keys-file "$work/keys.txt" \
  --mix "$work/mix.jsonl" --rate "$RATE" --duration "$DURATION" --timeout 30s --json \
  >"$work/load.json" 2>"$work/load.log" &
load_pid=$!
started=$(date +%s)
# RSS and open client connections every minute, to tell a leak from a plateau.
( while kill -0 "$load_pid" 2>/dev/null; do
    echo "$(( $(date +%s) - started )) $(rss) $(ss -tn state established "( sport = :$port )" | tail -n +2 | wc -l)"
    sleep 60
  done ) >"$work/samples.txt" 2>/dev/null &
pids+=($!)
sleep 5
kill -0 "$load_pid" 2>/dev/null || { cat "$work/load.log" >&2; exit 1; }
sleep $((WARMUP_SECS - 5))
rss_warm=$(rss)
for n in $(seq "$RESTARTS"); do
  at=$((duration_secs * n / (RESTARTS + 1)))
  now=$(( $(date +%s) - started ))
  [ "$at" -gt "$now" ] && sleep $((at - now))
  echo "bench-soak.sh: restarting Redis ($n of $RESTARTS)" >&2
  redis-cli -p "$redis_port" shutdown >/dev/null 2>&1 || true
  wait "$redis_pid" 2>/dev/null || true
  sleep "$DOWN_SECS"
  start_redis
done
wait "$load_pid"
# Let the journal drain into the store and the last events land.
for _ in $(seq 120); do
  journal=$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics" |
    awk '/^sluice_usage_journal_bytes/ {print $2}')
  [ "${journal:-0}" = 0 ] && break
  sleep 1
done
sleep 3
rss_end=$(rss)
curl -fsS -H "Authorization: Bearer $token" \
  "http://127.0.0.1:$admin/admin/v1/billing/export?group_by=event&format=jsonl" >"$work/events.jsonl"
curl -fsS "http://127.0.0.1:$backend_port/metrics" >"$work/backend-metrics.txt"

command_line="DURATION=$DURATION KEYS=$KEYS RATE=$RATE RESTARTS=$RESTARTS DOWN_SECS=$DOWN_SECS WARMUP_SECS=$WARMUP_SECS loadtest/bench-soak.sh"
python3 - "$work" "$rss_warm" "$rss_end" "$command_line" <<'PY' | python3 loadtest/write-section.py soak "$OUT" loadtest/bench-soak.sh
import collections, datetime, json, os, re, sys
work, rss_warm, rss_end, command_line = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
load = json.load(open(f"{work}/load.json"))
samples = [tuple(map(int, l.split())) for l in open(f"{work}/samples.txt") if len(l.split()) == 3]
events = [json.loads(l) for l in open(f"{work}/events.jsonl")]
ids = collections.Counter(e["id"] for e in events)
served = [e for e in events if e["backend"]]
metrics = open(f"{work}/backend-metrics.txt").read()
def counter(name, route=None):
    total = 0
    for line in metrics.splitlines():
        m = re.match(rf'{name}(\{{[^}}]*\}})? ([0-9.e+]+)$', line)
        if m and (route is None or f'route="{route}"' in (m[1] or "")):
            total += float(m[2])
    return int(total)
backend_requests = (counter("sluice_backend_requests_total", "/v1/chat/completions")
                    + counter("sluice_backend_requests_total", "/v1/completions"))
backend_prompt = counter("sluice_backend_prompt_tokens_total")
backend_generated = counter("sluice_backend_generation_tokens_total")
prompt = sum(e["prompt_tokens"] for e in served)
completion = sum(e["completion_tokens"] for e in served)
doubled = sum(n - 1 for n in ids.values() if n > 1)
sources = collections.Counter(e["usage_source"] for e in served)
growth = (rss_end - rss_warm) / rss_warm * 100
ok = (doubled == 0 and len(served) == backend_requests and prompt == backend_prompt
      and completion == backend_generated and abs(growth) <= 10)
mib = lambda b: f"{b / 2**20:.0f} MiB"
print("\n".join([
    "## Soak: memory and usage over a long run with Redis restarts",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    "One gateway on a Redis of its own, restarted during the run (the gateway fails open for "
    "the builtin tiers and journals usage while Redis is down), one simulated backend; "
    "`sluice-load` sends chat JSON, chat streams and completions over the keys (100 tenants, "
    "free/pro/enterprise). Usage is checked against the backend's own counters.",
    "",
    "| | value |",
    "| --- | ---: |",
    f"| requests sent / answered 200 | {load['sent']} / {load['ok']} |",
    f"| errors | {', '.join(f'{k}: {v}' for k, v in load['errors'].items()) or 'none'} |",
    f"| gateway RSS after warm-up / at the end | {mib(rss_warm)} / {mib(rss_end)} ({growth:+.1f}%) |",
    f"| RSS, every 5 minutes (minute: MiB) | {', '.join(f'{t // 60}: {r / 2**20:.0f}' for t, r, _ in samples[::5])} |",
    f"| open client connections, fewest / most | {min((c for *_, c in samples), default=0)} / {max((c for *_, c in samples), default=0)} |",
    f"| usage events / distinct ids / doubled | {len(events)} / {len(ids)} / {doubled} |",
    f"| requests the backend served / events naming a backend | {backend_requests} / {len(served)} |",
    f"| prompt tokens: backend / events | {backend_prompt} / {prompt} |",
    f"| completion tokens: backend / events | {backend_generated} / {completion} |",
    f"| usage sources | {', '.join(f'{k}: {v}' for k, v in sorted(sources.items()))} |",
    "",
    ("Verdict: **pass** (RSS within 10%, no usage event lost or doubled)." if ok else
     "Verdict: **FAIL** (see the rows above)."),
]))
PY
