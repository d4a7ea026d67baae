#!/usr/bin/env bash
# Makes sure a PostgreSQL answers on 127.0.0.1:5432 with trust auth for the user postgres
# (what the ledger tests and benchmarks connect to): starts one of Sluice's own in
# /var/tmp/sluice-postgres (installing Debian's postgresql package when no server binaries
# are found) if nothing answers. Run by test.sh and the ledger benchmark.
set -euo pipefail

pg_answers() {
  (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
}

# The server refuses to run as root: as root, run it as the postgres user.
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if pg_answers; then
  exit 0
fi
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bindir" ]; then
  echo "ensure-postgres: installing postgresql" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
data=/var/tmp/sluice-postgres
if [ ! -f "$data/PG_VERSION" ]; then
  mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres "$data"
  as_postgres "$bindir/initdb" -D "$data" -U postgres --auth=trust >/dev/null
fi
echo "ensure-postgres: starting PostgreSQL on 127.0.0.1:5432 ($data)" >&2
as_postgres "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-h 127.0.0.1 -p 5432 -k /tmp" start >/dev/null
pg_answers || { echo "ensure-postgres: PostgreSQL did not start" >&2; exit 1; }
