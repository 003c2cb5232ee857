#!/usr/bin/env bash
# Snapshot and restore benchmark (docs/benchmarks.md): podvisor vs QEMU (migrate to a file,
# -incoming from it) in one test-host session. Arguments are passed to snapshot_bench.py
# (--runs, --memory, --cpus, --workload idle|dirty, --cmdline, --seed). Runs are kept in a run
# record (target/bench/snapshot-*.jsonl) and resumed by a new test host when one freezes.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"
source "$(dirname -- "${BASH_SOURCE[0]}")/resume.sh"

pv_bench_prepare
pv_bench_run snapshot 300 resources/bench/snapshot_bench.py "$@"
