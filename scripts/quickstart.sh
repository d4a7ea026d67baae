#!/usr/bin/env bash
# Runs Sluice on this machine with nothing else installed: a simulated-engine backend on
# 127.0.0.1:9000 and the gateway on 127.0.0.1:8080 (admin API on 127.0.0.1:8081), with the
# embedded store in ./sluice-data. Creates a demo API key and prints how to use it.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

BACKEND_LISTEN="${SLUICE_BACKEND_LISTEN:-127.0.0.1:9000}"
export SLUICE_LISTEN="${SLUICE_LISTEN:-127.0.0.1:8080}"
export SLUICE_ADMIN_LISTEN="${SLUICE_ADMIN_LISTEN:-127.0.0.1:8081}"
export SLUICE_BACKENDS="${SLUICE_BACKENDS:-http://$BACKEND_LISTEN}"
if [ -z "${SLUICE_ADMIN_TOKEN:-}" ]; then
  SLUICE_ADMIN_TOKEN=$(random_token admin-)
  export SLUICE_ADMIN_TOKEN
fi

ensure_build_tools
cargo build --release --bin sluice --bin sluice-backend
bin="${CARGO_TARGET_DIR:-target}/release"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM


"$bin/sluice-backend" --engine sim --listen "$BACKEND_LISTEN" --model sluice-sim \
  --sim-ttft-ms 50 --sim-token-delay-ms 20 &
pids+=($!)
wait_for "http://$BACKEND_LISTEN/health"

"$bin/sluice" serve ${SLUICE_CONFIG:+--config "$SLUICE_CONFIG"} &
pids+=($!)
wait_for "http://$SLUICE_LISTEN/health"

created=$(curl -fsS "http://$SLUICE_ADMIN_LISTEN/admin/v1/keys" \
  -H "Authorization: Bearer $SLUICE_ADMIN_TOKEN" -H 'content-type: application/json' \
  -d '{"name":"quickstart","tenant":"demo","tier":"free"}')
key=$(printf '%s' "$created" | sed -n 's/.*"key":"\(sk-[^"]*\)".*/\1/p')

cat <<MSG

Sluice is running.
  proxy:   http://$SLUICE_LISTEN/v1      (OpenAI-compatible)
  admin:   http://$SLUICE_ADMIN_LISTEN/admin/v1   (admin token: $SLUICE_ADMIN_TOKEN)
  backend: http://$BACKEND_LISTEN        (simulated engine, model "sluice-sim")

A demo API key (shown once): $key

  curl http://$SLUICE_LISTEN/v1/chat/completions -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"model":"sluice-sim","messages":[{"role":"user","content":"Hello"}],"stream":true}'

Ctrl-C stops everything.
MSG
wait
