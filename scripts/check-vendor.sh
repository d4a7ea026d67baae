#!/usr/bin/env bash
# Checks that each vendored crate (CRATES below: vendor/pingora-proxy, vendor/pingora-core,
# vendor/pingora-http) is exactly that crate's release from crates.io plus its patches (applied
# in name order), minus the files listed in OMITTED, and that vendor/README.md quotes each patch
# file exactly, in the order of CRATES. See vendor/README.md.
#
#   scripts/check-vendor.sh                       compare; exit 0 when equal, 1 with the differences
#   scripts/check-vendor.sh --extract DIR [CRATE] write pristine upstream CRATE (default
#                                                 pingora-proxy; OMITTED removed, no patches)
#                                                 into the new folder DIR, for regenerating its
#                                                 patches; DIR must not exist
#
# Upstream comes from the crate registry through cargo: the .crate file in cargo's cache,
# downloaded first (`cargo fetch` in a throwaway project) when it is not there, and checked
# against the SHA-256 that crates.io publishes for it. Nothing is written inside the
# repository; the scratch folder is removed on exit.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
repo=$PWD
me=$(basename "$0")

# Each vendored crate: name, version, crates.io's checksum of its .crate file (the `cksum` of
# its index entry, also what Cargo.lock recorded for it), where it is vendored, its patches.
CRATES=(
  "pingora-proxy 0.9.1 8e3d5670490740405ecc8c6f75c3fcbce4d24f7adaffb355ca44550e7918e358 vendor/pingora-proxy vendor/patches"
  "pingora-core 0.9.1 a535f47f65fdcb003f9e1df04cd18e614c128dfe9388acce3f211ae38ac14d68 vendor/pingora-core vendor/core-patches"
  "pingora-http 0.9.1 3f38e9e519d53fab09eb320f7be2cd27ef9e66f755eba3bd84cc68852108d841 vendor/pingora-http vendor/http-patches"
)
README=vendor/README.md
# Published with a crate but not vendored: packaging metadata, upstream's own lock file and
# manifest (which only builds inside upstream's workspace), and examples and benchmarks, which
# cargo never builds for a dependency (a crate that publishes none, as pingora-http, has none
# to leave out). The normalised Cargo.toml still names the examples and the benchmarks; that
# is harmless, and keeping it byte for byte upstream's is the point.
OMITTED=(.cargo_vcs_info.json Cargo.lock Cargo.toml.orig benches examples)

extract_to=
extract_crate=
case "${1:-}" in
  "") ;;
  --extract)
    [ -n "${2:-}" ] || { echo "$me: --extract needs a folder" >&2; exit 2; }
    case "$2" in /*) extract_to=$2 ;; *) extract_to=$caller_dir/$2 ;; esac
    [ ! -e "$extract_to" ] || { echo "$me: $extract_to already exists" >&2; exit 2; }
    case "$extract_to/" in
      "$repo"/*) echo "$me: $extract_to is inside the repository; extract outside it" >&2; exit 2 ;;
    esac
    extract_crate=${3:-pingora-proxy}
    ;;
  *) echo "usage: $me [--extract DIR [CRATE]]" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/check-vendor.XXXXXX")
trap 'rm -rf "$work"' EXIT
case "$work/" in "$repo"/*) echo "$me: scratch folder $work is inside the repository" >&2; exit 2 ;; esac

cargo_home=${CARGO_HOME:-$HOME/.cargo}

# find_crate: prints the cached .crate of $CRATE $VERSION with checksum $SHA256, if there is one.
find_crate() {
  local f
  for f in "$cargo_home"/registry/cache/*/"$CRATE-$VERSION.crate"; do
    [ -f "$f" ] || continue
    if [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$SHA256" ]; then
      printf '%s\n' "$f"
      return 0
    fi
  done
  return 1
}

# unpack_pristine: unpacks upstream $CRATE $VERSION (fetched first when it is not cached) into
# $work/upstream-$CRATE, without OMITTED, and sets $pristine to its folder.
unpack_pristine() {
  local crate p host target=()
  if ! crate=$(find_crate); then
    echo "$me: fetching $CRATE $VERSION from crates.io" >&2
    rm -rf "$work/fetch"
    mkdir -p "$work/fetch/src"
    printf '%s\n' '[package]' 'name = "check-vendor-fetch"' 'version = "0.0.0"' \
      'edition = "2021"' 'publish = false' '' '[dependencies]' "$CRATE = \"=$VERSION\"" '' \
      '[workspace]' >"$work/fetch/Cargo.toml"
    : >"$work/fetch/src/lib.rs"
    host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p') || true
    [ -n "$host" ] && target=(--target "$host")
    (cd "$work/fetch" && cargo fetch --quiet "${target[@]}")
    crate=$(find_crate) || {
      echo "$me: no $CRATE-$VERSION.crate with SHA-256 $SHA256 under $cargo_home/registry/cache" >&2
      exit 1
    }
  fi
  mkdir "$work/upstream-$CRATE"
  tar -xzf "$crate" -C "$work/upstream-$CRATE"
  pristine=$work/upstream-$CRATE/$CRATE-$VERSION
  for p in "${OMITTED[@]}"; do
    rm -rf "${pristine:?}/$p"
  done
}

shopt -s nullglob
all_patches=()
failed=0
for entry in "${CRATES[@]}"; do
  read -r CRATE VERSION SHA256 VENDORED PATCHES <<<"$entry"
  if [ -n "$extract_to" ]; then
    [ "$CRATE" = "$extract_crate" ] || continue
    unpack_pristine
    cp -R "$pristine" "$extract_to"
    echo "$me: pristine $CRATE $VERSION (without ${OMITTED[*]}) in $extract_to"
    exit 0
  fi
  unpack_pristine

  # Apply the patches strictly (no fuzz), as outside any git repository, so that paths are
  # relative to the crate root.
  patches=("$repo/$PATCHES"/*.patch)
  [ "${#patches[@]}" -gt 0 ] || { echo "$me: no patches in $PATCHES" >&2; exit 1; }
  all_patches+=("${patches[@]}")
  for p in "${patches[@]}"; do
    if command -v git >/dev/null 2>&1; then
      apply=(env GIT_CEILING_DIRECTORIES="$work" git apply --whitespace=nowarn)
    else
      apply=(patch -p1 --quiet --fuzz=0 --no-backup-if-mismatch --reject-file=-)
    fi
    if ! (cd "$pristine" && "${apply[@]}" <"$p"); then
      echo "$me: FAIL: ${p#"$repo"/} does not apply to upstream $CRATE $VERSION (after the ones before it)" >&2
      exit 1
    fi
  done

  if diff -r -q "$pristine" "$repo/$VENDORED" >"$work/differences"; then
    echo "$me: $VENDORED is $CRATE $VERSION from crates.io + ${#patches[@]} patches in $PATCHES"
    continue
  fi
  failed=1
  {
    echo "$me: FAIL: $VENDORED is not upstream $CRATE $VERSION + $PATCHES/*.patch."
    echo "Differing files (expected = upstream + patches, actual = $VENDORED):"
    sed -e "s#$pristine#<expected>#g" -e "s#$repo/##g" "$work/differences" | sed 's/^/  /'
    echo "Diff (expected -> actual):"
    (cd "$work/upstream-$CRATE" && diff -r -u "$CRATE-$VERSION" "$repo/$VENDORED") |
      sed -e "s#$repo/##g" | head -n 200 || true
    echo "Either undo the change in $VENDORED, or make it a patch: see vendor/README.md."
  } >&2
done
if [ -n "$extract_to" ]; then
  echo "$me: $extract_crate is not one of the vendored crates in CRATES" >&2
  exit 2
fi

# vendor/README.md quotes each patch, in the order above, in a ```diff block; the quotes must
# be exact.
awk -v dir="$work" '
  /^```diff$/ { n++; f = dir "/readme-" n ".patch"; printf "" > f; inside = 1; next }
  inside && /^```$/ { inside = 0; close(f); next }
  inside { print > f }
' "$repo/$README"
for i in "${!all_patches[@]}"; do
  q=$work/readme-$((i + 1)).patch
  if [ ! -f "$q" ] || ! cmp -s "$q" "${all_patches[$i]}"; then
    echo "$me: FAIL: diff block $((i + 1)) of $README is not ${all_patches[$i]#"$repo"/}" >&2
    failed=1
  fi
done
if [ -f "$work/readme-$((${#all_patches[@]} + 1)).patch" ]; then
  echo "$me: FAIL: $README has more diff blocks than there are patch files" >&2
  failed=1
fi
[ "$failed" = 0 ] || exit 1
echo "$me: OK: the vendored crates are upstream + their patches, and $README quotes the patches"
