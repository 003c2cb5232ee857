# shellcheck shell=bash
# Shared by scripts/*.sh: repository root, a Rust toolchain check, build dependencies.
# shellcheck source=../resources/guest/lib.sh
source "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)/resources/guest/lib.sh"
cd "$PV_ROOT"

pv_rust() {
    command -v cargo >/dev/null 2>&1 || pv_die "cargo is not installed: install the Rust toolchain (rustup, stable >= 1.85) and retry"
    # A C compiler links the binary; Debian's build-essential provides it.
    pv_need cc:build-essential
}

# True on a machine with hardware KVM (vmx/svm and kvm_intel/kvm_amd loaded).
pv_hw_kvm() {
    grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]] \
        && { [[ -d /sys/module/kvm_intel ]] || [[ -d /sys/module/kvm_amd ]]; }
}
