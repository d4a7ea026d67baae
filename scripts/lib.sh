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
