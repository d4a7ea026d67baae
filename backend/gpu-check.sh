#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: checks the CUDA device against the CPU, times it, and
# serves a chat and an embedding from it over HTTP, writing a Markdown report to $REPORT
# (default gpu-check-report.md). Exits 1 if any check failed.
#
#   backend/gpu-check.sh                                  # builds here (needs cargo)
#   SLUICE_GPU_PARTS=/tmp/sluice-gpu backend/gpu-check.sh # a bundle from gpu-bundle.sh
#
# The checks (examples/gpu_check.rs): every kernel against the CPU on random inputs within
# stated tolerances, and batch invariance on the GPU; SmolLM2's greedy replies to a set of
# chats equal to the CPU's, alone and batched; MiniLM's embeddings within cosine 0.9999 of
# the CPU's; memory bandwidth, and prefill and decode at 1, 16 and 64 sequences. Then
# `sluice-backend --device cuda:0` serves SmolLM2 and MiniLM, and one chat completion and
# one embedding are asked of it over HTTP.
#
# CUDA's libraries are found wherever the machine has them (the driver's folder, a CUDA
# toolkit, the nvidia-* Python packages); cudarc opens them by their unversioned names, so
# a machine that has only libnvrtc.so.13 gets a link named libnvrtc.so. Bounded: every step
# has a timeout, and the whole stays within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT="${REPORT:-gpu-check-report.md}"
PORT="${PORT:-19600}"
work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

if [ -n "${SLUICE_GPU_PARTS:-}" ]; then
  cat "$SLUICE_GPU_PARTS"/part-* | python3 -c '
import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")
' "$work" || { echo "gpu-check.sh: cannot unpack $SLUICE_GPU_PARTS/part-*" >&2; exit 1; }
  bin="$work/bundle/bin"
  gpu_check="$bin/gpu_check"
  smollm2="$work/bundle/SmolLM2-135M-Instruct.gguf"
  minilm="$work/bundle/all-MiniLM-L6-v2"
else
  target="${CARGO_TARGET_DIR:-target}"
  timeout 300 cargo build --release -p sluice-backend --bin sluice-backend --example gpu_check >&2 || exit 1
  bin="$target/release"
  gpu_check="$target/release/examples/gpu_check"
  smollm2=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)
  minilm=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)
fi

# The first file matching NAME (a glob) under the usual places for CUDA's libraries.
find_library() {
  local dirs=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64
    /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
  local site
  for site in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path[1:]))' 2>/dev/null); do
    [ -d "$site/nvidia" ] && dirs+=("$site/nvidia")
  done
  find "${dirs[@]}" -maxdepth 4 -name "$1" 2>/dev/null | sort -V | tail -1
}
mkdir -p "$work/lib"
for lib in cuda nvrtc cublas; do
  found=$(find_library "lib$lib.so") || true
  [ -n "$found" ] || found=$(find_library "lib$lib.so.*[0-9]")
  if [ -n "$found" ]; then
    ln -sf "$found" "$work/lib/lib$lib.so"
    # NVRTC loads its builtins and cuBLAS its Lt library from their own folders.
    LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
export LD_LIBRARY_PATH="$work/lib:${LD_LIBRARY_PATH:-}"

{
  echo "# gpu-check $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -n)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  ls -l "$work/lib" | sed -n '2,$p'
  echo '```'
  echo
} >"$REPORT"

timeout 360 "$gpu_check" "$smollm2" "$minilm" 0 2>&1 | tee -a "$REPORT"
status=${PIPESTATUS[0]}

{
  echo
  echo "## Serving from the GPU over HTTP"
  echo
} | tee -a "$REPORT"
"$bin/sluice-backend" --engine native --device "${SLUICE_GPU_CHECK_DEVICE:-cuda:0}" \
  --listen "127.0.0.1:$PORT" --model "SmolLM2-135M-Instruct=$smollm2" \
  --model "all-MiniLM-L6-v2=$minilm" >"$work/backend.log" 2>&1 &
server=$!
# Python's standard library, not curl: the GPU machine may have no curl.
python3 - "$PORT" "$server" "${SLUICE_GPU_CHECK_DEVICE:-cuda:0}" "$work/chat.json" <<'PY' | tee -a "$REPORT"
import json, os, sys, time, urllib.request

port, server, device, chat_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
base = f"http://127.0.0.1:{port}"
failures = 0

def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response) if path != "/health" else response.status

def check(name, test):
    global failures
    try:
        passed = bool(test())
    except Exception as err:  # a refused connection or an HTTP error is a failure
        print(f"  ({name}: {err})")
        passed = False
    failures += not passed
    print(f"- {'PASS' if passed else 'FAIL'} {name}", flush=True)

def ready():
    for _ in range(120):
        try:
            return call("/health") == 200
        except OSError:
            try:
                os.kill(server, 0)
            except OSError:
                return False
            time.sleep(1)
    return False

def chat():
    reply = call("/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    open(chat_file, "w").write(json.dumps(reply))
    return "Paris" in reply["choices"][0]["message"]["content"]

def embed():
    reply = call("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "The cat sat on the mat."})
    return len(reply["data"][0]["embedding"]) == 384

def models():
    listed = call("/v1/models")["data"]
    return len(listed) == 2 and all(m.get("device") == device for m in listed)

check(f"sluice-backend --device {device} starts and answers /health", ready)
check("a greedy chat completion answers Paris", chat)
check("an embedding of 384 dimensions", embed)
check("/v1/models says every model runs on " + device, models)
sys.exit(1 if failures else 0)
PY
[ "${PIPESTATUS[0]}" = 0 ] || status=1
{
  echo
  echo "Reply: $(cat "$work/chat.json" 2>/dev/null | head -c 600)"
  echo
  echo "Server log (last lines):"
  echo '```'
  tail -n 15 "$work/backend.log"
  echo '```'
} | tee -a "$REPORT"
exit "$status"
