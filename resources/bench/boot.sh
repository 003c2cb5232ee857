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

pv_rust
pv_qemu
pv_need python3:python3
cargo build --release --quiet
resources/guest/build.sh
mkdir -p target/bench
state="${PODVISOR_BENCH_STATE:-target/bench/boot-$(date +%Y%m%d-%H%M%S).jsonl}"
pv_say "run record: $state"
bench=(python3 resources/bench/boot_bench.py --state "$state" "$@")
if pv_hw_kvm; then
    exec "${bench[@]}"
fi
pv_bench_resumable boot "$state" "${PODVISOR_BENCH_STALL_S:-180}" "${bench[@]}"
