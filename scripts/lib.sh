# Shell helpers shared by the quickstart and benchmark scripts (sourced, not run).

# wait_for URL: waits up to 10 s for URL to answer 2xx, or exits the script.
wait_for() {
  for _ in $(seq 100); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$(basename "$0"): $1 did not answer" >&2
  exit 1
}

# random_token PREFIX: PREFIX followed by 24 random hex digits.
random_token() {
  printf '%s%s' "$1" "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
}

# ensure_build_tools: what a cold build needs besides Rust (pingora builds zlib-ng with cmake).
ensure_build_tools() {
  if ! command -v cmake >/dev/null 2>&1; then
    echo "$(basename "$0"): installing cmake" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
  fi
}
