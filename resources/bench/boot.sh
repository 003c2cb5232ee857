#!/usr/bin/env bash
# Boot benchmark (docs/benchmarks.md): podvisor vs QEMU in one test-host session.
# Arguments are passed to boot_bench.py (--runs, --memory, --cpus, --cmdline, --only, --seed,
# --json).
#
# Every finished run is kept in a run record (target/bench/boot-*.jsonl). The emulated test
# host sometimes freezes without a word; when the record has not grown for
# PODVISOR_BENCH_STALL_S seconds (default 180; one boot is given at most 120 s), that test
# host is stopped and a new one carries on from the record, up to 7 times.
# PODVISOR_BENCH_STATE=FILE resumes an earlier record (same arguments).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"
source "$(dirname -- "${BASH_SOURCE[0]}")/resume.sh"

pv_bench_prepare
pv_bench_run boot 180 resources/bench/boot_bench.py "$@"
