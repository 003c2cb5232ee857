#!/usr/bin/env bash
# Checks the manifests in resources/k8s against Kubernetes' own schemas, offline
# (kubernetes-validate from the Python package registry, installed once into target/), and
# the example VMIs with `podvisor launcher --validate` (the launcher's tests do that too).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

KV_VERSION=1.37.0
venv="$PV_ROOT/target/k8s-validate-$KV_VERSION"
if [[ ! -x "$venv/bin/kubernetes-validate" ]]; then
    pv_need python3:python3
    # venv with pip inside needs ensurepip (Debian's python3-venv).
    python3 -c 'import venv, ensurepip' 2>/dev/null || pv_need /usr/share/doc/python3-venv:python3-venv
    pv_say "installing kubernetes-validate $KV_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==$KV_VERSION"
fi
"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "$PV_ROOT"/resources/k8s/*.yaml
