#!/usr/bin/env bash
# Runs Sluice's whole test suite: unit, store-contract and end-to-end tests (real processes,
# real Redis, the async-openai crate and the Python openai package).
#
# Installs what the tests need when it is missing: Redis (started on 127.0.0.1:6379 if that
# port does not answer), PostgreSQL (likewise on 127.0.0.1:5432, for the usage ledger),
# nats-server (the usage feed's tests start their own), openssl (the TLS tests make their
# certificates with it), curl (the HTTPS and HTTP/2 edge tests), a .venv with the `openai` package (h2 for its HTTP/2 client; numpy, safetensors and
# tokenizers for scripts/minilm_reference.py; gguf and jinja2 for
# scripts/smollm2_reference.py; selenium for the console's browser test; jsonschema for
# the OpenMeter CloudEvents check and, with openapi-spec-validator, the admin API's OpenAPI
# document and answers; NVRTC for the CUDA
# kernels' compile test), Chromium and its driver, and the all-MiniLM-L6-v2 and
# SmolLM2-135M-Instruct weights.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_build_tools
ensure_browser

if [ -z "${SLUICE_TEST_REDIS_URL:-}" ]; then
  scripts/ensure-redis.sh
fi
if [ -z "${SLUICE_TEST_POSTGRES_URL:-}" ]; then
  scripts/ensure-postgres.sh
fi
# The TLS tests (Redis over TLS) make their certificates with the openssl command.
if ! command -v openssl >/dev/null 2>&1; then
  echo "test.sh: installing openssl" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
# The HTTPS/HTTP2 edge tests drive the gateway with curl (built with HTTP/2, as Debian's is).
if ! command -v curl >/dev/null 2>&1; then
  echo "test.sh: installing curl" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi
# The usage feed's tests run NATS servers of their own.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "test.sh: installing nats-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi

if [ -z "${SLUICE_TEST_PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, h2, numpy, safetensors, tokenizers, gguf, jinja2, selenium, jsonschema, openapi_spec_validator, nvidia.cuda_nvrtc' 2>/dev/null; then
    echo "test.sh: installing the Python openai, h2, numpy, safetensors, tokenizers, gguf, jinja2, selenium, jsonschema, openapi-spec-validator and nvidia-cuda-nvrtc-cu12 packages into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40,<4' h2 numpy safetensors tokenizers gguf jinja2 selenium jsonschema openapi-spec-validator nvidia-cuda-nvrtc-cu12
  fi
  export SLUICE_TEST_PYTHON="$PWD/.venv/bin/python"
fi
# NVRTC (from the nvidia-cuda-nvrtc-cu12 wheel) compiles the CUDA kernels in the tests; no
# GPU is needed for that. libnvrtc.so.12 finds its builtins library beside itself.
if nvrtc_lib=$("$SLUICE_TEST_PYTHON" -c 'import nvidia.cuda_nvrtc as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null); then
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
scripts/check-deploy.sh
export SLUICE_MINILM_DIR="${SLUICE_MINILM_DIR:-$(scripts/fetch-weights.sh all-MiniLM-L6-v2)}"
export SLUICE_SMOLLM2_GGUF="${SLUICE_SMOLLM2_GGUF:-$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)}"

# The end-to-end tests run the binaries, so build them (with the tests, so that both share
# one feature resolution and nothing is compiled twice) first.
cargo build --workspace --all-targets
# The quick start's own test runs scripts/quickstart.sh as the README says; it builds these
# release binaries itself, which is done here first so that the build does not compete with
# the tests for the CPU.
cargo build --release --bin sluice --bin sluice-backend
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo test --workspace --doc
  cargo nextest run --workspace --no-fail-fast || status=$?
else
  cargo test --workspace --no-fail-fast || status=$?
fi
# async-openai over HTTPS: a workspace of its own (tests/https-clients/Cargo.toml says why),
# run against the binaries built above, so in the same target directory.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
  cargo test --locked --manifest-path tests/https-clients/Cargo.toml || status=$?
exit "$status"
