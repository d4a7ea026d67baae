#!/bin/sh
# Puts the admin token where prometheus.yml's credentials_file expects it, then runs Prometheus.
set -eu
printf '%s' "$SLUICE_ADMIN_TOKEN" > /tmp/admin-token
exec /bin/prometheus "$@"
