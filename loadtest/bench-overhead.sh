#!/usr/bin/env bash
# The gateway overhead benchmark: the same load, in one run, sent directly to a simulated
# backend (zero delays), through nginx as a plain reverse proxy, through a bare pingora proxy
# (loadtest/src/bin/bare_pingora.rs: forwarding only, on the gateway's own pingora), and
# through Sluice's full policy path (API-key auth, quotas with leases, metering, cache on,
# balancer) on Redis and on the embedded store, and on the embedded store with a price for the
# model (sluice-priced: every answer says its cost, a non-streamed one held until its end for
# the x-sluice-cost header). Each round starts one target further on, so that a
# noisy machine shifts them alike. Besides throughput and latency it reads each proxy's CPU
# time (and Redis's, for Sluice on Redis) from /proc around every run, as CPU per request.
# Writes the table to docs/benchmarks.md.
#
#   loadtest/bench-overhead.sh                    # defaults below
#   RATE=300 DURATION=5s ROUNDS=3 loadtest/bench-overhead.sh
#   BASELINE=/tmp/old/sluice loadtest/bench-overhead.sh  # A/B: also an earlier build of Sluice
#   TARGETS="pingora sluice-embedded baseline" SCENARIOS="max json,max stream" loadtest/bench-overhead.sh
#
# BASELINE names another build's `sluice` binary: it runs as the targets `baseline` and
# `baseline-redis`, that build's gateway on the embedded store and on Redis, in the same
# rounds, so that a change is measured against what it changed with the machine's noise
# shared. TARGETS (space-separated) and SCENARIOS
# (comma-separated) pick a subset.
#
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

RATE="${RATE:-500}"                 # fixed-rate scenarios: requests per second
LOW_RATE="${LOW_RATE:-100}"         # the low fixed-rate scenario
CONCURRENCY="${CONCURRENCY:-32}"    # max-throughput scenarios: closed-loop clients
DURATION="${DURATION:-10s}"         # measured time per target per round
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-3}"
MAX_TOKENS="${MAX_TOKENS:-16}"
THREADS="${THREADS:-2}"             # worker threads for Sluice, worker processes for nginx
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19100}"
BASELINE="${BASELINE:-}"            # another build's sluice binary: targets baseline, baseline-redis

if ! command -v nginx >/dev/null 2>&1; then
  echo "bench: installing nginx" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
scripts/ensure-redis.sh

bench_extra_cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}
bench_setup


backend_port=$PORT_BASE; nginx_port=$((PORT_BASE + 1)); sluice_port=$((PORT_BASE + 2)); admin_port=$((PORT_BASE + 3))
pingora_port=$((PORT_BASE + 4)); embedded_port=$((PORT_BASE + 5)); embedded_admin_port=$((PORT_BASE + 6))
priced_port=$((PORT_BASE + 7)); priced_admin_port=$((PORT_BASE + 8))
baseline_port=$((PORT_BASE + 9)); baseline_admin_port=$((PORT_BASE + 10))
baseline_redis_port=$((PORT_BASE + 11)); baseline_redis_admin_port=$((PORT_BASE + 12))


"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"

cat >"$work/nginx.conf" <<NGINX
worker_processes $THREADS;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream sim { server 127.0.0.1:$backend_port; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work"
wait_for "http://127.0.0.1:$nginx_port/health"

"$bin/bare-pingora" --listen "127.0.0.1:$pingora_port" --upstream "127.0.0.1:$backend_port" \
  --threads "$THREADS" >"$work/pingora.log" 2>&1 &
pids+=($!)
pingora_pid=$!
wait_for "http://127.0.0.1:$pingora_port/health"

admin_token=$(random_token bench-)
cat >"$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:$sluice_port"
admin_listen = "127.0.0.1:$admin_port"
threads = $THREADS
redis_url = "redis://127.0.0.1:6379"
redis_prefix = "sluice-bench-$$"
grace_period_secs = 0

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
TOML
SLUICE_ADMIN_TOKEN="$admin_token" SLUICE_LOG=info "$bin/sluice" serve --config "$work/sluice.toml" \
  >"$work/sluice.log" 2>&1 &
pids+=($!)
sluice_pid=$!
wait_for "http://127.0.0.1:$sluice_port/health"
if [ -n "$BASELINE" ]; then
  # The baseline build on Redis too (its own key prefix), as the target baseline-redis.
  sed -e "s/:$sluice_port\"/:$baseline_redis_port\"/; s/:$admin_port\"/:$baseline_redis_admin_port\"/" \
    -e "s/sluice-bench-$$/sluice-bench-baseline-$$/" "$work/sluice.toml" >"$work/baseline-redis.toml"
  SLUICE_ADMIN_TOKEN="$admin_token" SLUICE_LOG=info "$BASELINE" serve --config "$work/baseline-redis.toml" \
    >"$work/baseline-redis.log" 2>&1 &
  pids+=($!)
  baseline_redis_pid=$!
  wait_for "http://127.0.0.1:$baseline_redis_port/health"
fi
# start_embedded NAME PORT ADMIN_PORT [EXTRA_TOML]: the same gateway on the embedded store
# (its data in $work/NAME-data, its log in $work/NAME.log); prints its pid.
start_embedded() {
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
threads = $THREADS
data_dir = "$work/$1-data"
grace_period_secs = 0

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
${4:-}
TOML
  SLUICE_ADMIN_TOKEN="$admin_token" SLUICE_LOG=info "${SLUICE_BIN:-$bin/sluice}" serve --config "$work/$1.toml" \
    >"$work/$1.log" 2>&1 &
  echo $!
}
embedded_pid=$(start_embedded embedded "$embedded_port" "$embedded_admin_port")
pids+=("$embedded_pid")
# Again, with a price for the model.
priced_pid=$(start_embedded priced "$priced_port" "$priced_admin_port" '
[[prices]]
model = "sluice-sim"
tier = "*"
currency = "USD"
input = "0.15"
output = "0.60"')
pids+=("$priced_pid")
wait_for "http://127.0.0.1:$embedded_port/health"
wait_for "http://127.0.0.1:$priced_port/health"
if [ -n "$BASELINE" ]; then
  baseline_pid=$(SLUICE_BIN="$BASELINE" start_embedded baseline "$baseline_port" "$baseline_admin_port")
  pids+=("$baseline_pid")
  wait_for "http://127.0.0.1:$baseline_port/health"
fi
new_key() {
  curl -fsS "http://127.0.0.1:$1/admin/v1/keys" -H "Authorization: Bearer $admin_token" \
    -d '{"name":"bench","tenant":"bench","tier":"enterprise","limits":{"requests_per_minute":100000000,"tokens_per_minute":100000000000,"max_concurrent":100000}}' \
    | sed -n 's/.*"key":"\([^"]*\)".*/\1/p'
}
key=$(new_key "$admin_port")
embedded_key=$(new_key "$embedded_admin_port")
priced_key=$(new_key "$priced_admin_port")
if [ -n "$BASELINE" ]; then
  baseline_key=$(new_key "$baseline_admin_port")
  baseline_redis_key=$(new_key "$baseline_redis_admin_port")
fi
redis_pid=$(pgrep -x redis-server | head -1 || true)

targets=(direct nginx pingora sluice sluice-embedded sluice-priced)
[ -n "$BASELINE" ] && targets+=(baseline baseline-redis)
[ -n "${TARGETS:-}" ] && read -r -a targets <<<"$TARGETS"
declare -A url=([direct]="http://127.0.0.1:$backend_port" [nginx]="http://127.0.0.1:$nginx_port" \
  [pingora]="http://127.0.0.1:$pingora_port" [sluice]="http://127.0.0.1:$sluice_port" \
  [sluice-embedded]="http://127.0.0.1:$embedded_port" [sluice-priced]="http://127.0.0.1:$priced_port" \
  [baseline]="http://127.0.0.1:$baseline_port" [baseline-redis]="http://127.0.0.1:$baseline_redis_port")
# The processes whose CPU each target costs (the direct target costs the proxy nothing).
proxy_pids() {
  case "$1" in
    nginx) local master; master=$(cat "$work/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')" ;;
    pingora) echo "$pingora_pid" ;;
    sluice) echo "$sluice_pid" ;;
    sluice-embedded) echo "$embedded_pid" ;;
    sluice-priced) echo "$priced_pid" ;;
    baseline) echo "$baseline_pid" ;;
    baseline-redis) echo "$baseline_redis_pid" ;;
  esac
}
# Exact cache hits: one deterministic request, asked again and again (the warm-up's first
# ask is the miss that fills the cache). Only Sluice has a cache.
printf '{"body":{"model":"sluice-sim","messages":[{"role":"user","content":"Write one sentence about rivers."}],"max_tokens":%s,"temperature":0}}\n' \
  "$MAX_TOKENS" >"$work/hit.jsonl"
results="$work/results.jsonl"
scenarios=("fixed json" "low json" "fixed stream" "max json" "max stream" "max hit")
if [ -n "${SCENARIOS:-}" ]; then
  IFS=, read -r -a scenarios <<<"$SCENARIOS"
fi
for scenario in "${scenarios[@]}"; do
  set -- $scenario
  load=(--duration "$DURATION" --warmup "$WARMUP" --max-tokens "$MAX_TOKENS" --json)
  case "$1" in
    fixed) load+=(--rate "$RATE") ;;
    low) load+=(--rate "$LOW_RATE") ;;
    max) load+=(--concurrency "$CONCURRENCY") ;;
  esac
  [ "$2" = stream ] && load+=(--stream)
  [ "$2" = hit ] && load+=(--mix "$work/hit.jsonl")
  for round in $(seq "$ROUNDS"); do
    # Each round starts one target further on: with a fixed order, the same build measured
    # twice came out up to 11% apart by its place in the round (docs/benchmarks.md, "Eighth
    # profile").
    shift_by=$(( (round - 1) % ${#targets[@]} ))
    ordered=("${targets[@]:shift_by}" "${targets[@]:0:shift_by}")
    for target in "${ordered[@]}"; do
      [ "$2" = hit ] && [[ "$target" != sluice* && "$target" != baseline* ]] && continue
      keyarg=()
      [ "$target" = sluice ] && keyarg=(--key "$key")
      [ "$target" = sluice-embedded ] && keyarg=(--key "$embedded_key")
      [ "$target" = sluice-priced ] && keyarg=(--key "$priced_key")
      [ "$target" = baseline ] && keyarg=(--key "$baseline_key")
      [ "$target" = baseline-redis ] && keyarg=(--key "$baseline_redis_key")
      echo "bench: $scenario, round $round, $target" >&2
      procs=$(proxy_pids "$target")
      proxy_before=$(cpu_ticks $procs); redis_before=$(cpu_ticks $redis_pid)
      report=$("$bin/sluice-load" run "${url[$target]}" "${keyarg[@]}" "${load[@]}")
      proxy_ticks=$(( $(cpu_ticks $procs) - proxy_before )); redis_ticks=$(( $(cpu_ticks $redis_pid) - redis_before ))
      printf '{"scenario":"%s %s","round":%s,"target":"%s","proxy_ticks":%s,"redis_ticks":%s,"clk_tck":%s,"report":%s}\n' \
        "$1" "$2" "$round" "$target" "$proxy_ticks" "$redis_ticks" "$(getconf CLK_TCK)" "$report" >>"$results"
    done
  done
done

command_line="${BASELINE:+BASELINE=$BASELINE }${TARGETS:+TARGETS=\"$TARGETS\" }${SCENARIOS:+SCENARIOS=\"$SCENARIOS\" }RATE=$RATE LOW_RATE=$LOW_RATE CONCURRENCY=$CONCURRENCY DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS MAX_TOKENS=$MAX_TOKENS THREADS=$THREADS loadtest/bench-overhead.sh"
python3 loadtest/overhead_table.py "$results" "$OUT" "$command_line" "$RATE" "$CONCURRENCY" "$LOW_RATE"
echo "bench: wrote $OUT" >&2
