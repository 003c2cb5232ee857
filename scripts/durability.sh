#!/usr/bin/env bash
# durability.sh [TRIALS] - kills `podvisor run` with SIGKILL at random moments while a tiny
# guest writes, flushes and discards on its disk, TRIALS times (default 100) for a raw and a
# qcow2 disk, and checks after each that every flushed block is there, nothing else changed
# and `qemu-img check` is clean (launcher/tests/durability.rs; the test suite runs 4 trials).
# Prints, per format, the steps (of 160) the guest had seen flushed when it was killed.
# Runs on any /dev/kvm, PVM included. Results: docs/durability.md.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"
trials="${1:-100}"
[[ "$trials" =~ ^[1-9][0-9]*$ ]] || pv_die "TRIALS must be a positive number, not '$trials'"
pv_rust
pv_need qemu-img:qemu-utils
PODVISOR_DURABILITY_TRIALS="$trials" cargo test --quiet -p launcher --test durability -- --nocapture 2>&1 |
    grep -E '^(raw|qcow2):|test result|panicked|trial'
