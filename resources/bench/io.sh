#!/usr/bin/env bash
# I/O benchmark (docs/benchmarks.md): fio and iperf3 in the default guest, podvisor vs QEMU,
# in one test-host session. Arguments are passed to io_bench.py (--runs, --runtime,
# --net-secs, --only disk|net, --json, ...). The test host gets 6 GiB (PODVISOR_TESTHOST_MEM)
# because the benchmark disks live on a 2.5 GiB RAM disk inside it.
#
# Every finished boot is kept in a run record (target/bench/io-*.jsonl). When the record has
# not grown for PODVISOR_BENCH_STALL_S seconds (default 480; one boot is given at most 300 s,
# and a new test host first spends ~1-2 min writing the benchmark disks), or the test host
# dies, a new one carries on from the record, up to 7 times.
# PODVISOR_BENCH_STATE=FILE resumes an earlier record (same arguments).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"
source "$(dirname -- "${BASH_SOURCE[0]}")/resume.sh"

pv_bench_prepare mkfs.ext4:e2fsprogs ip:iproute2 iperf3:iperf3 insmod:kmod
export PODVISOR_TESTHOST_MEM="${PODVISOR_TESTHOST_MEM:-6G}"
pv_bench_run io 480 resources/bench/io_bench.py "$@"
