#!/usr/bin/env bash
# What TLS costs: the same chat-completion load through nginx and through Sluice (full policy
# path, embedded store), each over plain HTTP and over HTTPS with the same ECDSA P-256
# certificate, in one run, targets alternating round by round. Three scenarios:
#   keep-alive  HTTP/1.1, 16 connections kept open: the per-request cost of TLS records;
#   http2       HTTP/2 over TLS (ALPN), 16 connections, 4 streams each;
#   handshake   one request per connection (a full handshake each, no session resumption):
#               what a connection costs, handshake included, against a plain TCP connection.
# Load comes from h2load (nghttp2-client), which speaks TLS and HTTP/2; CPU per request is
# each proxy's user+system time from /proc around the run. Writes docs/benchmarks.md.
#
#   loadtest/bench-tls.sh
#   REQUESTS=20000 ROUNDS=3 THREADS=2 loadtest/bench-tls.sh
#
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

REQUESTS="${REQUESTS:-20000}"       # per target, per round, keep-alive and http2
CONNECTIONS="${CONNECTIONS:-16}"
HANDSHAKES="${HANDSHAKES:-2000}"    # per target, per round: one request per connection
ROUNDS="${ROUNDS:-3}"
MAX_TOKENS="${MAX_TOKENS:-16}"
THREADS="${THREADS:-2}"             # worker threads for Sluice, worker processes for nginx
OUT="${OUT:-docs/benchmarks.md}"
PORT_BASE="${PORT_BASE:-19300}"

command -v nginx >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
command -v h2load >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }

bench_extra_cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}
bench_setup

backend_port=$PORT_BASE
nginx_port=$((PORT_BASE + 1)); nginx_tls_port=$((PORT_BASE + 2))
sluice_port=$((PORT_BASE + 3)); sluice_admin=$((PORT_BASE + 4))
sluice_tls_port=$((PORT_BASE + 5)); sluice_tls_admin=$((PORT_BASE + 6))

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

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
  # Connections stay open for the whole run, as Sluice keeps them (nginx's default closes
  # each after 1,000 requests, which would add handshakes to the keep-alive figures).
  keepalive_requests 10000000;
  http2_max_requests 10000000;
  upstream sim { server 127.0.0.1:$backend_port; keepalive 256; }
  ssl_certificate $work/cert.pem;
  ssl_certificate_key $work/key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;
  server {
    listen 127.0.0.1:$nginx_port;
    listen 127.0.0.1:$nginx_tls_port ssl http2;
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

admin_token=$(random_token bench-)
# start_sluice NAME PORT ADMIN_PORT [EXTRA_SERVER_TOML]: a gateway on the embedded store;
# prints its pid.
start_sluice() {
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
threads = $THREADS
data_dir = "$work/$1-data"
grace_period_secs = 0
${4:-}

[[backends]]
name = "sim"
url = "http://127.0.0.1:$backend_port"
TOML
  SLUICE_ADMIN_TOKEN="$admin_token" SLUICE_LOG=info "$bin/sluice" serve --config "$work/$1.toml" \
    >"$work/$1.log" 2>&1 &
  echo $!
}
sluice_pid=$(start_sluice plain "$sluice_port" "$sluice_admin")
pids+=("$sluice_pid")
sluice_tls_pid=$(start_sluice tls "$sluice_tls_port" "$sluice_tls_admin" "[server.tls]
cert_file = \"$work/cert.pem\"
key_file = \"$work/key.pem\"
admin = false")
pids+=("$sluice_tls_pid")
wait_for "http://127.0.0.1:$sluice_port/health"
wait_for "http://127.0.0.1:$sluice_tls_admin/health"
for _ in $(seq 100); do curl -fsk "https://127.0.0.1:$sluice_tls_port/health" >/dev/null 2>&1 && break; sleep 0.1; done
plain_key=$(bench_key "$sluice_admin" "$admin_token" unlimited)
tls_key=$(bench_key "$sluice_tls_admin" "$admin_token" unlimited)

printf '{"model":"sluice-sim","messages":[{"role":"user","content":"Write one sentence about rivers."}],"max_tokens":%s}' \
  "$MAX_TOKENS" >"$work/body.json"

nginx_pids() { local master; master=$(cat "$work/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')"; }

declare -A url=([nginx-http]="http://127.0.0.1:$nginx_port" [nginx-https]="https://127.0.0.1:$nginx_tls_port"
  [sluice-http]="http://127.0.0.1:$sluice_port" [sluice-https]="https://127.0.0.1:$sluice_tls_port")
declare -A key=([nginx-http]="" [nginx-https]="" [sluice-http]="$plain_key" [sluice-https]="$tls_key")
results="$work/results.jsonl"
for scenario in keep-alive http2 handshake; do
  case "$scenario" in
    keep-alive) targets=(nginx-http nginx-https sluice-http sluice-https) ;;
    http2) targets=(nginx-https sluice-https) ;;
    handshake) targets=(nginx-http nginx-https sluice-http sluice-https) ;;
  esac
  for round in $(seq "$ROUNDS"); do
    for target in "${targets[@]}"; do
      case "$scenario" in
        keep-alive) load=(--h1 -c "$CONNECTIONS" -n "$REQUESTS") ;;
        http2) load=(-c "$CONNECTIONS" -m 4 -n "$REQUESTS") ;;
        # h2load spreads -n over -c clients; one each means a connection per request, and
        # waves of 50 keep the listen backlog from overflowing.
        handshake) load=(--h1 -c 50 -n 50) ;;
      esac
      procs=$(case "$target" in nginx*) nginx_pids ;; sluice-http) echo "$sluice_pid" ;; sluice-https) echo "$sluice_tls_pid" ;; esac)
      echo "bench: $scenario, round $round, $target" >&2
      before=$(cpu_ticks $procs); start=$(date +%s.%N)
      waves=1; [ "$scenario" = handshake ] && waves=$((HANDSHAKES / 50))
      : >"$work/h2load.out"
      for _ in $(seq "$waves"); do
        h2load "${load[@]}" -d "$work/body.json" -H 'content-type: application/json' \
          -H "authorization: Bearer ${key[$target]:-none}" \
          "${url[$target]}/v1/chat/completions" >>"$work/h2load.out" 2>&1
      done
      elapsed=$(echo "$(date +%s.%N) - $start" | bc)
      ticks=$(( $(cpu_ticks $procs) - before ))
      python3 - "$work/h2load.out" "$scenario" "$round" "$target" "$ticks" "$(getconf CLK_TCK)" "$elapsed" >>"$results" <<'PY'
import json, re, sys
text, scenario, round_, target, ticks, clk, elapsed = open(sys.argv[1]).read(), *sys.argv[2:]
succeeded = sum(int(m) for m in re.findall(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text))
failed = sum(int(m) for m in re.findall(r"(\d+) failed", text))
means = [float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u] for v, u in re.findall(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", text)]
print(json.dumps({"scenario": scenario, "round": int(round_), "target": target, "succeeded": succeeded,
                  "failed": failed, "cpu_s": int(ticks) / int(clk), "elapsed_s": float(elapsed),
                  "mean_ms": sum(means) / len(means) if means else None}))
PY
    done
  done
done

command_line="REQUESTS=$REQUESTS CONNECTIONS=$CONNECTIONS HANDSHAKES=$HANDSHAKES ROUNDS=$ROUNDS MAX_TOKENS=$MAX_TOKENS THREADS=$THREADS loadtest/bench-tls.sh"
python3 - "$results" "$command_line" <<'PY' | python3 loadtest/write-section.py tls "$OUT" loadtest/bench-tls.sh
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
command = sys.argv[2]
print("## TLS: HTTPS and HTTP/2 against plain HTTP, Sluice beside nginx")
print()
print(f"`{command}` (one run; targets alternate round by round; medians over rounds). The same")
print("ECDSA P-256 certificate for both, TLS 1.3 negotiated, no session resumption; Sluice runs")
print("its full policy path (key auth, quota, metering, cache) on the embedded store, nginx only")
print("forwards. CPU is the proxy's own (user + system) per successful request, from /proc")
print("in 10 ms ticks; on this shared 2-core machine a row moves by up to a third between")
print("runs, so compare rows of one run. Load and proxies share the same two cores.")
print()
print("| scenario | target | requests ok | failed | req/s | mean latency | CPU per request |")
print("|---|---|---:|---:|---:|---:|---:|")
keys = []
for r in rows:
    if (r["scenario"], r["target"]) not in keys:
        keys.append((r["scenario"], r["target"]))
med = {}
for scenario, target in keys:
    runs = [r for r in rows if r["scenario"] == scenario and r["target"] == target]
    ok = sum(r["succeeded"] for r in runs)
    failed = sum(r["failed"] for r in runs)
    rps = statistics.median(r["succeeded"] / r["elapsed_s"] for r in runs)
    lat = statistics.median(r["mean_ms"] for r in runs if r["mean_ms"] is not None)
    cpu_us = statistics.median(r["cpu_s"] / max(r["succeeded"], 1) * 1e6 for r in runs)
    med[(scenario, target)] = cpu_us
    print(f"| {scenario} | {target} | {ok} | {failed} | {rps:,.0f} | {lat:.2f} ms | {cpu_us:.0f} µs |")
print()
for scenario in ("keep-alive", "handshake"):
    for proxy in ("nginx", "sluice"):
        plain, tls = med.get((scenario, f"{proxy}-http")), med.get((scenario, f"{proxy}-https"))
        if plain and tls is not None:
            print(f"- {scenario}, {proxy}: TLS adds {tls - plain:.0f} µs of CPU per request ({tls / plain:.2f}× plain).")
PY
echo "bench: wrote $OUT" >&2
