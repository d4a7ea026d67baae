#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the backend in release and checks what the CUDA
# side of this build can do there, writing a report to $OUT (default gpu-check-report.txt).
#
#   backend/gpu-check.sh
#
# This build has the kernels (backend/kernels/, compiled by NVRTC) but runs models on the
# CPU, so the check is: the GPU is found, every kernel compiles for its architecture, the
# driver loads them and every entry point is there; the kernel-against-CPU, SmolLM2 and
# MiniLM comparisons and the GPU benchmarks come with the CUDA device. NVRTC comes from the
# nvidia-cuda-nvrtc-cu12 wheel when the machine has no CUDA toolkit. Bounded: each step has
# a timeout, and the whole stays well within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-report.txt}"

if ! python3 -c 'import nvidia.cuda_nvrtc' 2>/dev/null; then
  # Best effort: a machine with no way out must have the CUDA libraries installed already.
  python3 -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12 >&2 || true
fi
for package in cuda_nvrtc cublas; do
  lib=$(python3 -c "import nvidia.$package as n, os; print(os.path.join(list(n.__path__)[0], 'lib'))" 2>/dev/null) &&
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

{
  echo "# gpu-check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  timeout 300 cargo build --release -p sluice-backend --example cuda_check --tests 2>&1 | tail -1
  timeout 60 "${CARGO_TARGET_DIR:-target}/release/examples/cuda_check" 0 2>&1
  CI=true timeout 120 cargo test --release -p sluice-backend --test cuda_kernels 2>&1 | grep -E '^test |test result'
} | tee "$OUT"
