#!/usr/bin/env bash
# Builds podvisor and the default guest, then boots it with its console on this terminal.
# On a machine without hardware KVM it boots inside the test host (resources/testhost/run.sh).
# Extra arguments are passed to `podvisor run` (e.g. --cpus 4 --memory 1G).
# In the guest: `poweroff` ends podvisor (exit 0), `reboot` restarts the guest.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

pv_rust
pv_say "building podvisor (cargo build --release)"
cargo build --release --quiet
pv_say "preparing the default guest (resources/guest/build.sh)"
resources/guest/build.sh

cmd=(target/release/podvisor run
    --kernel target/guest/bzImage
    --initramfs target/guest/initramfs.cpio.gz
    --cmdline "console=ttyS0 reboot=k panic=1"
    --cpus 2 --memory 512M "$@")
if pv_hw_kvm; then
    exec "${cmd[@]}"
fi
pv_say "no hardware KVM on this machine: booting inside the test host"
exec resources/testhost/run.sh "${cmd[@]}"
