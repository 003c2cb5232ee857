#!/usr/bin/env bash
# Checks what podvisor shows Kubernetes: the manifests in resources/k8s against Kubernetes' own
# schemas, offline (kubernetes-validate from the Python package registry), and the metrics page
# (GET /metrics) with Prometheus' `promtool check metrics` (taken from Debian's prometheus
# package, unpacked, not installed as a service); both once per machine, into its cache
# (/var/cache/podvisor, which every clone shares; PODVISOR_CACHE moves it).
# The example VMIs are checked by the launcher's tests (`podvisor launcher --validate`).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

KV_VERSION=1.37.0
machine="${PODVISOR_CACHE:-/var/cache/podvisor}"
mkdir -p "$machine"
exec {lock}>"$machine/.k8s-check.lock"
flock "$lock"
venv="$machine/k8s-validate-$KV_VERSION"
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

promtool="$machine/promtool/usr/bin/promtool"
if [[ ! -x "$promtool" ]]; then
    pv_need dpkg-deb:dpkg
    deb="$(pv_download prometheus)"
    rm -rf "$machine/promtool"
    dpkg-deb -x "$deb" "$machine/promtool"
fi
exec {lock}>&-
cargo run --quiet -p api --example metrics_page | "$promtool" check metrics
