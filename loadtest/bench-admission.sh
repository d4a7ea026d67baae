#!/usr/bin/env bash
# What admission costs: Redis round trips per admitted request with quota leases off and on,
# and the latency the gateway adds (full path: API-key auth, Redis-backed quotas, metering)
# over a direct connection to the same simulated backend. Writes docs/benchmarks.md.
#
#   loadtest/bench-admission.sh
#   RATE=300 DURATION=8s ROUNDS=3 loadtest/bench-admission.sh
#
# BASELINE=/path/to/an/older/sluice adds an A/B of the admission path itself (leases off, so
# every request runs the admission script): that build against this one, with a tenant limit
# set on this one, so each of its admissions checks and counts two ledgers (key and tenant).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

RATE="${RATE:-300}"
DURATION="${DURATION:-8s}"
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-3}"
REQUESTS="${REQUESTS:-2000}"
CONCURRENCY="${CONCURRENCY:-16}"
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19300}"

BASELINE="${BASELINE:-}"
redis_port=$((PORT_BASE + 9))
bench_setup
bench_redis "$redis_port"

backend_port=$PORT_BASE
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"

token=$(random_token bench-)
declare -A key port admin_port
for leases in off on; do
  # Leases on: the default lease size.
  [ $leases = off ] && { offset=1; lease_setting="lease_max_requests = 0"; } || { offset=3; lease_setting=""; }
  port[$leases]=$((PORT_BASE + offset)); admin=$((PORT_BASE + offset + 1))
  cat >"$work/sluice-$leases.toml" <<TOML
[server]
listen = "127.0.0.1:${port[$leases]}"
admin_listen = "127.0.0.1:$admin"
redis_url = "redis://127.0.0.1:$redis_port"
redis_prefix = "bench-$leases"
data_dir = "$work/data-$leases"
threads = 2
grace_period_secs = 0

[quotas]
$lease_setting

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
TOML
  SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=info "$bin/sluice" serve --config "$work/sluice-$leases.toml" \
    >"$work/sluice-$leases.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:${port[$leases]}/health"
  key[$leases]=$(bench_key "$admin" "$token")
  admin_port[$leases]=$admin
done

if [ -n "$BASELINE" ]; then
  # The older build on the same Redis (its own prefix), leases off like `off` above; the
  # tenant of this build's `off` key gets limits, high enough never to refuse.
  cp "$work/sluice-off.toml" "$work/sluice-base.toml"
  sed -i -e "s/:$((PORT_BASE + 1))\"/:$((PORT_BASE + 5))\"/" -e "s/:$((PORT_BASE + 2))\"/:$((PORT_BASE + 6))\"/" \
    -e 's/bench-off/bench-base/' -e 's/data-off/data-base/' "$work/sluice-base.toml"
  SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=info "$BASELINE" serve --config "$work/sluice-base.toml" \
    >"$work/sluice-base.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$((PORT_BASE + 5))/health"
  base_key=$(bench_key $((PORT_BASE + 6)) "$token")
  curl -fsS -X PUT "http://127.0.0.1:${admin_port[off]}/admin/v1/tenants/bench" \
    -H "Authorization: Bearer $token" \
    -d '{"limits":{"requests_per_minute":100000000,"tokens_per_minute":100000000000,"monthly_budget":"1000000"}}' >/dev/null
fi

# round_trips ADMIN_PORT: the gateway's Redis round trips so far (its own count: one per
# command or pipeline sent), less the two that do not follow traffic: the key-epoch poll
# (GET, five a second) and the cache-log follower's blocking read (XREAD).
round_trips() {
  curl -fsS "http://127.0.0.1:$1/metrics" -H "Authorization: Bearer $token" |
    awk '/^sluice_redis_call_duration_seconds_count/ && !/command="(GET|XREAD)"/ {n += $2} END {print n + 0}'
}

trips="$work/trips.txt"
for leases in off on; do
  # MONITOR sees every command a client sends (commands a script runs are marked "lua"; a
  # pipeline's commands are listed one by one).
  redis-cli -p "$redis_port" monitor >"$work/monitor-$leases.txt" &
  monitor=$!
  sleep 0.5
  trips_before=$(round_trips "${admin_port[$leases]}")
  report=$("$bin/sluice-load" run "http://127.0.0.1:${port[$leases]}" --key "${key[$leases]}" \
    --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-tokens 8 --json)
  sleep 2  # the last settlements, lease give-backs and usage events land
  kill "$monitor"; wait "$monitor" 2>/dev/null || true
  sent_trips=$(( $(round_trips "${admin_port[$leases]}") - trips_before ))
  ok=$(printf '%s' "$report" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
  # Commands from this gateway (each of a pipeline counted), less the key-epoch poll.
  sent=$(grep -v ' lua\]' "$work/monitor-$leases.txt" | grep "bench-$leases" | grep -vc ':keys:epoch"' || true)
  scripts=$(grep -v ' lua\]' "$work/monitor-$leases.txt" | grep "bench-$leases" | grep -cE '"(EVALSHA|EVAL|evalsha|eval)"' || true)
  echo "$leases $ok $sent_trips $sent $scripts" >>"$trips"
done

"$bin/sluice-load" compare \
  --a "http://127.0.0.1:$backend_port" --a-name direct \
  --b "http://127.0.0.1:${port[on]}" --b-name sluice --b-key "${key[on]}" \
  --rounds "$ROUNDS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
  --max-tokens 8 --json >"$work/compare.json"

if [ -n "$BASELINE" ]; then
  "$bin/sluice-load" compare \
    --a "http://127.0.0.1:$((PORT_BASE + 5))" --a-name baseline --a-key "$base_key" \
    --b "http://127.0.0.1:${port[off]}" --b-name tenant-wide --b-key "${key[off]}" \
    --rounds "$ROUNDS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
    --max-tokens 8 --json >"$work/tenant.json"
else
  echo '{}' >"$work/tenant.json"
fi

command_line="${BASELINE:+BASELINE=$BASELINE }RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS REQUESTS=$REQUESTS CONCURRENCY=$CONCURRENCY loadtest/bench-admission.sh"
python3 - "$trips" "$work/compare.json" "$command_line" "$work/tenant.json" <<'PY' | python3 loadtest/write-section.py admission "$OUT" loadtest/bench-admission.sh
import datetime, json, os, statistics, sys
trips_path, compare_path, command_line, tenant_path = sys.argv[1:5]
rows = []
for line in open(trips_path):
    leases, ok, trips, sent, scripts = line.split()
    ok, trips, sent, scripts = int(ok), int(trips), int(sent), int(scripts)
    per = lambda n: f"{n / ok:.3f}" if ok else "-"
    rows.append(f"| {leases} | {ok} | {per(trips)} | {per(sent)} | {per(scripts)} |")
data = json.load(open(compare_path))
d50 = [r["b"]["latency_ms"]["p50"] - r["a"]["latency_ms"]["p50"] for r in data["rounds"]]
d99 = [r["b"]["latency_ms"]["p99"] - r["a"]["latency_ms"]["p99"] for r in data["rounds"]]
section = "\n".join([
    "## Admission: Redis round trips and added latency",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    "Round trips: one key, closed loop, through one gateway (leases at their default size) on "
    "a Redis of the benchmark's own. Round trips are the gateway's own count "
    "(`sluice_redis_call_duration_seconds_count`: one per command or pipeline sent); commands "
    "are what Redis's MONITOR saw (each command of a pipeline counted, those a script runs "
    "inside Redis not). Script calls are admissions, settlements (per request; with leases, "
    "idle leases are given back together, one pipeline per 10 ms gathered) and usage-event batches "
    "(metering is on). The key-epoch poll (five GETs a second per replica) and the cache-log "
    "follower's blocking XREAD, which do not follow traffic, are left out.",
    "",
    "| leases | admitted requests | Redis round trips per request | Redis commands per request | of which script calls |",
    "| --- | ---: | ---: | ---: | ---: |",
    *rows,
    "",
    "Added latency of the full admission path (API-key auth, Redis-backed quotas with leases on, "
    "metering on), Sluice against a direct connection to the same backend, "
    f"{len(d50)} alternating rounds at a fixed rate: median added p50 {statistics.median(d50):.3f} ms, "
    f"p99 {statistics.median(d99):.3f} ms (per round p50: {', '.join(f'{x:.3f}' for x in d50)}; "
    f"p99: {', '.join(f'{x:.3f}' for x in d99)}).",
])
tenant = json.load(open(tenant_path))
if tenant.get("rounds"):
    t50 = [r["b"]["latency_ms"]["p50"] - r["a"]["latency_ms"]["p50"] for r in tenant["rounds"]]
    t99 = [r["b"]["latency_ms"]["p99"] - r["a"]["latency_ms"]["p99"] for r in tenant["rounds"]]
    section += "\n\n" + (
        "Tenant-wide admission: this build, whose every admission checks and counts the key's "
        "and the tenant's ledgers in one script call (a tenant limit set), against BASELINE "
        "(one ledger per call), both with leases off so every request runs the script, on the "
        f"same Redis, {len(t50)} alternating rounds at a fixed rate: median added p50 "
        f"{statistics.median(t50):.3f} ms, p99 {statistics.median(t99):.3f} ms (per round p50: "
        f"{', '.join(f'{x:.3f}' for x in t50)}; p99: {', '.join(f'{x:.3f}' for x in t99)})."
    )
print(section)
PY
