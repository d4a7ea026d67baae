#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:6379: starts one (installing redis-server from
# Debian's packages when missing) if it does not. Sourced or run by test.sh and benchmarks.
set -euo pipefail

redis_answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
  else
    (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null
  fi
}

if ! redis_answers; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure-redis: installing redis-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  echo "ensure-redis: starting redis-server on 127.0.0.1:6379" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/sluice-redis.log
  for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
  redis_answers || { echo "ensure-redis: Redis did not start" >&2; exit 1; }
fi
