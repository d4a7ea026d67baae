#!/usr/bin/env bash
# Where does the gateway's CPU go? Records `perf` profiles of Sluice's full policy path (on the
# embedded store or on Redis) and of the bare pingora proxy under the same closed-loop load
# as bench-overhead.sh's max scenarios, and prints each one's top symbols with their cost in
# microseconds per request (share of samples × CPU per request), so that the two can be
# compared symbol by symbol. The recordings stay in OUT_DIR for `perf report`.
#
#   loadtest/profile-overhead.sh                      # embedded store, json
#   STORE=redis STREAM=1 loadtest/profile-overhead.sh
#   TARGETS=sluice SLUICE_BIN=/tmp/other/sluice loadtest/profile-overhead.sh
#   ALLOCS=1 loadtest/profile-overhead.sh             # also count heap allocations per request
#
# ALLOCS=1 puts a uprobe on mimalloc's allocation entry points (`mi_malloc_aligned`,
# `mi_realloc_aligned`, what Rust's global allocator calls) in each binary and counts their
# calls per request and thread beside the other counters; a uprobe costs microseconds per
# call, so the CPU figures of such a run are not the target's. Record where allocations
# come from with PERF_EVENT="-e alloc:sluice_malloc" CALL_GRAPH="--call-graph dwarf,8192".
#
# STAT_EVENTS replaces the events counted per thread (system calls, context switches, page
# faults, migrations), e.g. STAT_EVENTS="syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom"
# for the calls one by one.
#
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

STORE="${STORE:-embedded}"          # embedded | redis
STREAM="${STREAM:-}"                # 1: streamed requests
CONCURRENCY="${CONCURRENCY:-32}"
DURATION="${DURATION:-8s}"
THREADS="${THREADS:-2}"
FREQ="${FREQ:-999}"
CALL_GRAPH="${CALL_GRAPH:-}"         # e.g. "--call-graph dwarf" (default: frame pointers, -g)
PERF_EVENT="${PERF_EVENT:-}"         # e.g. "-e page-faults -c 1" (default: CPU time sampled at FREQ)
TOP="${TOP:-40}"
ALLOCS="${ALLOCS:-}"                 # 1: count heap allocations per request (uprobes)
TARGETS="${TARGETS:-sluice pingora}"
OUT_DIR="${OUT_DIR:-/tmp/sluice-profile}"
PORT_BASE="${PORT_BASE:-19300}"

command -v perf >/dev/null || { echo "profile: perf is not installed" >&2; exit 1; }
[ "$STORE" = redis ] && scripts/ensure-redis.sh
bench_setup
SLUICE_BIN="${SLUICE_BIN:-$bin/sluice}"
stat_events=${STAT_EVENTS:-raw_syscalls:sys_enter,context-switches,page-faults,cpu-migrations}
if [ -n "$ALLOCS" ]; then
  bench_extra_cleanup() { perf probe -q -d 'alloc:*' 2>/dev/null || true; }
  bench_extra_cleanup
  # Event names are unique across binaries: alloc:sluice_malloc, alloc:pingora_malloc, ...
  for probe in "sluice $SLUICE_BIN" "pingora $bin/bare-pingora"; do
    set -- $probe
    perf probe -q -x "$2" --add "alloc:$1_malloc=mi_malloc_aligned" \
      --add "alloc:$1_realloc=mi_realloc_aligned"
  done
fi
mkdir -p "$OUT_DIR"

backend_port=$PORT_BASE; sluice_port=$((PORT_BASE + 1)); admin_port=$((PORT_BASE + 2))
pingora_port=$((PORT_BASE + 3))
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend_port" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend_port/health"

"$bin/bare-pingora" --listen "127.0.0.1:$pingora_port" --upstream "127.0.0.1:$backend_port" \
  --threads "$THREADS" >"$work/pingora.log" 2>&1 &
pids+=($!)
pingora_pid=$!
wait_for "http://127.0.0.1:$pingora_port/health"

admin_token=$(random_token bench-)
if [ "$STORE" = redis ]; then
  store_toml="redis_url = \"redis://127.0.0.1:6379\"
redis_prefix = \"sluice-profile-$$\""
else
  store_toml="data_dir = \"$work/data\""
fi
cat >"$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:$sluice_port"
admin_listen = "127.0.0.1:$admin_port"
threads = $THREADS
$store_toml
grace_period_secs = 0

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
TOML
SLUICE_ADMIN_TOKEN="$admin_token" SLUICE_LOG=info "$SLUICE_BIN" serve --config "$work/sluice.toml" \
  >"$work/sluice.log" 2>&1 &
pids+=($!)
sluice_pid=$!
wait_for "http://127.0.0.1:$sluice_port/health"
key=$(bench_key "$admin_port" "$admin_token" unlimited)

# No warm-up of its own: the target was warmed before recording, and everything counted while
# recording is divided by the requests this load completes.
load=(--concurrency "$CONCURRENCY" --duration "$DURATION" --warmup 0s --max-tokens 16 --json)
[ -n "$STREAM" ] && load+=(--stream)
for target in $TARGETS; do
  case "$target" in
    sluice) pid=$sluice_pid; url="http://127.0.0.1:$sluice_port"; keyarg=(--key "$key") ;;
    pingora) pid=$pingora_pid; url="http://127.0.0.1:$pingora_port"; keyarg=() ;;
    *) echo "profile: unknown target $target" >&2; exit 1 ;;
  esac
  data="$OUT_DIR/$target.perf.data"
  # Warm the target (connection pools, leases) before recording.
  "$bin/sluice-load" run "$url" "${keyarg[@]}" --concurrency "$CONCURRENCY" --duration 2s --warmup 0s \
    --max-tokens 16 --json >/dev/null
  before=$(cpu_ticks "$pid")
  perf record -q ${PERF_EVENT:--F $FREQ} ${CALL_GRAPH:--g} -p "$pid" -o "$data" -- sleep 60 >/dev/null 2>&1 &
  perf_pid=$!
  events=$stat_events
  if [ -n "$ALLOCS" ]; then
    events="$events,alloc:${target}_malloc,alloc:${target}_realloc"
  fi
  perf stat -e "$events" --per-thread -x, \
    -p "$pid" -o "$OUT_DIR/$target.stat" -- sleep 60 >/dev/null 2>&1 &
  stat_pid=$!
  sleep 0.5
  report=$("$bin/sluice-load" run "$url" "${keyarg[@]}" "${load[@]}")
  kill -INT "$perf_pid" "$stat_pid"; wait "$perf_pid" "$stat_pid" 2>/dev/null || true
  ticks=$(( $(cpu_ticks "$pid") - before ))
  requests=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["completed"])' "$report")
  us_per_request=$(python3 -c "print(round($ticks / $(getconf CLK_TCK) * 1e6 / max($requests, 1), 1))")
  echo "== $target: $requests requests, $us_per_request µs of CPU per request (recording: $data)"
  # Per thread name: system calls, context switches, page faults, migrations per request.
  python3 - "$OUT_DIR/$target.stat" "$requests" <<'PY'
import collections, sys
counts = collections.defaultdict(lambda: collections.Counter())
for line in open(sys.argv[1]):
    fields = line.strip().split(",")
    if len(fields) < 4 or not fields[1].replace(".", "").isdigit():
        continue
    thread = fields[0].rsplit("-", 1)[0]
    counts[thread][fields[3]] += float(fields[1])
requests = max(int(sys.argv[2]), 1)
for thread, c in sorted(counts.items(), key=lambda kv: -kv[1]["raw_syscalls:sys_enter"]):
    print("   %-16s " % thread + "  ".join("%s %.2f" % (k.split(":")[-1], v / requests) for k, v in sorted(c.items())) + "  per request")
PY
  perf report -i "$data" --no-children --sort symbol --stdio -q -g none --percent-limit 0.3 2>/dev/null \
    | head -n "$TOP" \
    | awk -v us="$us_per_request" '/%/ { share = $1; sub(/%/, "", share); sym = $3; for (i = 4; i <= NF && $i != "-"; i++) sym = sym " " $i; printf "%6.2f µs %6.2f%%  %s %s\n", share * us / 100, share, $2, sym }' || true
done
