#!/usr/bin/env bash
# Packs what backend/gpu-check.sh needs on a GPU machine that cannot build or download:
# the release `sluice-backend` and `gpu_check` binaries (stripped), SmolLM2-135M-Instruct's
# GGUF and all-MiniLM-L6-v2 with its weights in f16 (half the bytes; the GPU check compares
# the GPU with the CPU on the same weights, whatever their precision). The pack is an xz tar
# split into parts small enough to travel one per call to a device machine:
#
#   backend/gpu-bundle.sh                 # writes .gpu-bundle/part-aa, part-ab, ...
#
# Then, on the GPU machine, each part is copied to one folder (say /tmp/sluice-gpu) and
#
#   SLUICE_GPU_PARTS=/tmp/sluice-gpu backend/gpu-check.sh
#
# joins, unpacks and runs them (docs/benchmarks.md, "GPU", says how a session does this).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DEST="${DEST:-.gpu-bundle}"
PART_SIZE="${PART_SIZE:-56M}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release -p sluice-backend --bin sluice-backend --example gpu_check >&2
smollm2=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)
minilm=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bundle/bin" "$stage/bundle/all-MiniLM-L6-v2"
strip -o "$stage/bundle/bin/sluice-backend" "$target/release/sluice-backend"
strip -o "$stage/bundle/bin/gpu_check" "$target/release/examples/gpu_check"
cp "$smollm2" "$stage/bundle/SmolLM2-135M-Instruct.gguf"
cp "$minilm"/{config.json,tokenizer.json} "$stage/bundle/all-MiniLM-L6-v2/"
ensure_pip
python="${SLUICE_TEST_PYTHON:-python3}"
"$python" -c 'import numpy, safetensors' 2>/dev/null ||
  "$python" -m pip install --quiet --disable-pip-version-check numpy safetensors >&2
"$python" - "$minilm/model.safetensors" "$stage/bundle/all-MiniLM-L6-v2/model.safetensors" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file

tensors = load_file(sys.argv[1])
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}, sys.argv[2])
PY

rm -rf "$DEST"
mkdir -p "$DEST"
tar -C "$stage" -cf - bundle | xz -T0 -6 | split -b "$PART_SIZE" - "$DEST/part-"
ls -l "$DEST" >&2
echo "gpu-bundle.sh: $(ls "$DEST" | wc -l) parts in $DEST; carry one per device call" >&2
