#!/usr/bin/env bash
# soak.sh [--sessions N] [--workload io|storm] [--stall S] [--record FILE] CANDIDATE...
# Runs N long test-host sessions per candidate, interleaved, and prints a table of how many
# finished, failed, locked up, died or froze (docs/testhost-stability.md).
#
# A CANDIDATE is NAME:VAR=VALUE,... with run.sh's knobs (PODVISOR_TESTHOST_ may be left off):
#   resources/testhost/soak.sh --sessions 10 \
#       qemu10:CPUS=2 qemu10-1cpu:CPUS=1 qemu72:QEMU=/opt/qemu72/usr/bin/qemu-system-x86_64
# (an older QEMU can be unpacked from its .deb beside the system's: dpkg-deb -x; run.sh finds
# its firmware in ../share/qemu). The run record (default target/soak/soak-DATE.jsonl) keeps
# every finished session; run again with --record FILE to carry on. Workload "io": the I/O
# benchmark's six boots, shortened (~6 min per session on an idle machine). Workload "storm":
# its four disk boots while ipistorm.py floods the test host's CPUs with inter-processor
# interrupts, which brings the test host's known death sooner.
# Run it on an idle machine: a busy one changes the odds.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

pv_hw_kvm && pv_die "this machine has hardware KVM: there is no test host to soak"
pv_rust
pv_qemu
pv_need python3:python3 mkfs.ext4:e2fsprogs ip:iproute2 iperf3:iperf3 insmod:kmod
cargo build --release --quiet
resources/guest/build.sh
mkdir -p target/soak
args=("$@")
have_record=0
for a in "$@"; do [[ "$a" == --record || "$a" == --record=* ]] && have_record=1; done
((have_record)) || args=(--record "target/soak/soak-$(date +%Y%m%d-%H%M%S).jsonl" "${args[@]}")
# The I/O workload keeps its disks on a 2.5 GiB RAM disk inside the test host (as io.sh).
export PODVISOR_TESTHOST_MEM="${PODVISOR_TESTHOST_MEM:-6G}"
exec python3 resources/testhost/soak.py "${args[@]}"
