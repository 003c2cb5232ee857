#!/usr/bin/env bash
# Runs every test: formatting, clippy, a smoke of the fuzz targets, unit tests, tiny-guest KVM
# tests, and the end-to-end boot tests (inside the test host when this machine has no hardware KVM).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

# Each step's message starts with the time since the start: CI's budget, read off its log.
step() { pv_say "[$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

pv_rust
# qemu-img and qemu-io check the disk-image code against QEMU's own tools; the test host
# (no hardware KVM) runs on QEMU and virtiofsd, set up here once rather than in the first
# end-to-end scenario's time.
pv_qemu
pv_need qemu-img:qemu-utils qemu-io:qemu-utils
# The cloud-init seed disks are read back with libarchive (their Joliet names) and blkid;
# the direct disk boot's tests make ext4 file systems with mkfs.ext4.
pv_need bsdtar:libarchive-tools blkid:util-linux mkfs.ext4:e2fsprogs
# The launcher's container image is built and run with Debian's podman (crun runs it).
pv_need podman:podman crun:crun
if ! pv_hw_kvm; then
    vfsd="$(pv_virtiofsd)"
    step "test host: $(qemu-system-x86_64 --version | head -n1), virtiofsd $vfsd"
fi
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "fuzz targets: built, and 10 s of each (scripts/fuzz.sh; builds cached per machine)"
scripts/fuzz.sh --time 10
step "preparing the default guest"
resources/guest/build.sh
step "preparing the Debian disk images the disk-boot scenarios boot (cached; ~5 min once)"
resources/guest/debian-image.sh >/dev/null
step "Kubernetes manifests (resources/k8s)"
if ! k8s_out="$(resources/k8s/check.sh 2>&1)"; then
    printf '%s\n' "$k8s_out" >&2
    pv_die "resources/k8s: a manifest does not validate"
fi
step "cargo test"
cargo test --workspace
