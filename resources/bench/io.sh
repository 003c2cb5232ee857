#!/usr/bin/env bash
# I/O benchmark (docs/benchmarks.md): fio and iperf3 in the default guest, podvisor vs QEMU,
# in one test-host session. Arguments are passed to io_bench.py (--runs, --runtime,
# --net-secs, --only disk|net, --json, ...). The test host gets 6 GiB (PODVISOR_TESTHOST_MEM)
# because the benchmark disks live on a 2.5 GiB RAM disk inside it.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

pv_rust
pv_need qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils python3:python3 \
    mkfs.ext4:e2fsprogs ip:iproute2 iperf3:iperf3 insmod:kmod
cargo build --release --quiet
resources/guest/build.sh
if pv_hw_kvm; then
    exec python3 resources/bench/io_bench.py "$@"
fi
export PODVISOR_TESTHOST_MEM="${PODVISOR_TESTHOST_MEM:-6G}"
exec resources/testhost/run.sh python3 resources/bench/io_bench.py "$@"
