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

pv_rust
pv_need qemu-system-x86_64:qemu-system-x86 python3:python3
cargo build --release --quiet
resources/guest/build.sh
mkdir -p target/bench
state="${PODVISOR_BENCH_STATE:-target/bench/boot-$(date +%Y%m%d-%H%M%S).jsonl}"
pv_say "run record: $state"
bench=(python3 resources/bench/boot_bench.py --state "$state" "$@")
if pv_hw_kvm; then
    exec "${bench[@]}"
fi

stall="${PODVISOR_BENCH_STALL_S:-180}"
[[ "$stall" =~ ^[1-9][0-9]*$ ]] || pv_die "PODVISOR_BENCH_STALL_S must be a number of seconds, not '$stall'"
tries=8
for attempt in $(seq "$tries"); do
    started=$(date +%s)
    resources/testhost/run.sh "${bench[@]}" &
    pid=$!
    stalled=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        last=$(stat -c %Y "$state" 2>/dev/null || echo 0)
        ((last > started)) || last=$started
        if (($(date +%s) - last > stall)); then
            stalled=1
            kill "$pid" 2>/dev/null || true
            break
        fi
    done
    rc=0
    wait "$pid" || rc=$?
    if ((stalled)); then
        why="did nothing for ${stall} s (frozen)"
    elif ((rc == 125)); then
        why="failed"
    else
        exit "$rc"
    fi
    if ((attempt < tries)); then
        pv_say "the test host $why: a new one resumes the run (try $((attempt + 1)) of $tries)"
    fi
done
pv_die "the test host froze or failed $tries times; the runs so far are in $state;" \
    "resume with: PODVISOR_BENCH_STATE=$state $0$(printf ' %q' "$@")"
