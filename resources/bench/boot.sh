#!/usr/bin/env bash
# Boot benchmark (docs/benchmarks.md): podvisor vs QEMU in one test-host session.
# Arguments are passed to boot_bench.py (--runs, --memory, --cpus, --cmdline, --json).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

pv_rust
pv_need qemu-system-x86_64:qemu-system-x86 python3:python3
cargo build --release --quiet
resources/guest/build.sh
if pv_hw_kvm; then
    exec python3 resources/bench/boot_bench.py "$@"
fi
exec resources/testhost/run.sh python3 resources/bench/boot_bench.py "$@"
