#!/usr/bin/env bash
# Live-migration benchmark (docs/benchmarks.md): podvisor -> podvisor vs QEMU -> QEMU in one
# test-host session. Arguments are passed to migrate_bench.py (--runs, --memory, --cpus,
# --workload idle|dirty, --cmdline, --seed). Runs are kept in a run record
# (target/bench/migrate-*.jsonl) and resumed by a new test host when one freezes (resume.sh).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"
source "$(dirname -- "${BASH_SOURCE[0]}")/resume.sh"

pv_bench_prepare
pv_bench_run migrate 300 resources/bench/migrate_bench.py "$@"
