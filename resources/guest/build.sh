#!/usr/bin/env bash
# Build the default podvisor guest into target/guest/:
#   bzImage             Debian cloud kernel (as shipped)
#   vmlinux             uncompressed ELF from that bzImage (has the PVH entry note)
#   initramfs.cpio.gz   busybox + virtio/ext4 modules + /init (see README.md)
# Cached: does nothing when the outputs are up to date. Usage: build.sh [-f] [--check]
#   -f        rebuild the outputs even if they look up to date (downloads stay cached)
#   --check   then boot bzImage and vmlinux under QEMU TCG and check the ready line
set -euo pipefail

# shellcheck source=resources/guest/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

force=0 check=0
for arg in "$@"; do
    case "$arg" in
        -f | --force) force=1 ;;
        --check) check=1 ;;
        *) pv_die "usage: $0 [-f] [--check]" ;;
    esac
done

# Boot the guest under QEMU TCG (q35: microvm has no HPET/PM timer and its TSC
# calibration against the PIT fails, hanging the boot, when the host is busy).
check_guest() {
    pv_need qemu-system-x86_64:qemu-system-x86 timeout:coreutils
    local k out start
    for k in bzImage vmlinux; do
        start=${EPOCHREALTIME/./}
        out="$(timeout 300 qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 256 -smp 2 \
            -nodefaults -no-user-config -display none -serial stdio -no-reboot \
            -kernel "$OUT/$k" -initrd "$OUT/initramfs.cpio.gz" \
            -append "console=ttyS0 quiet podvisor.halt" </dev/null 2>&1)" || true
        if ! grep -Eq '^podvisor-guest ready: cpus=2 memtotal_kb=[0-9]+'$'\r''?$' <<<"$out"; then
            printf '%s\n' "$out" >&2
            pv_die "check: no ready line booting $k"
        fi
        pv_say "check: $k ok ($(grep -a 'podvisor-guest ready' <<<"$out" | tr -d '\r'), $(((${EPOCHREALTIME/./} - start) / 1000)) ms)"
    done
}

OUT="$PV_ROOT/target/guest"
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
    virtio_blk virtio_net virtio_rng virtio_console
    ext4 crc16 mbcache jbd2 crc32c_generic
)

up_to_date() {
    local f
    for f in bzImage vmlinux initramfs.cpio.gz .stamp; do [[ -s "$OUT/$f" ]] || return 1; done
    [[ "$(cat "$OUT/.stamp")" == "$stamp" ]]
}

mkdir -p "$OUT"
kpkg="$(pv_kernel_pkg)"
PV_STAMP_EXTRA="$kpkg ${MODULES[*]}"
stamp="$(pv_stamp "$PV_LIB_DIR/lib.sh" "$PV_LIB_DIR/build.sh" "$PV_LIB_DIR/init")"
if ((!force)) && up_to_date; then
    pv_log "up to date ($kpkg)"
    if ((check)); then check_guest; fi
    exit 0
fi

pv_lock
if ((!force)) && up_to_date; then # built by someone else meanwhile
    if ((check)); then check_guest; fi
    exit 0
fi
rm -f "$OUT/.stamp"

pv_need readelf:binutils od:coreutils
pv_kernel_fetch "$kpkg"
pv_busybox_fetch

pv_say "building guest from $kpkg ($PV_KVER)"
cp "$PV_VMLINUZ" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"

pv_extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux"
# PVH entry point: "Xen 0x00000004 Unknown note type: (0x00000012)" (XEN_ELFNOTE_PHYS32_ENTRY)
notes="$(readelf -n "$OUT/vmlinux")" || pv_die "readelf -n $OUT/vmlinux failed"
if ! grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*(\(0x0*12\)|PHYS32_ENTRY)' <<<"$notes"; then
    printf '%s\n' "$notes" >&2
    pv_die "$OUT/vmlinux has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12)"
fi
pv_log "vmlinux: $PV_KERNEL_COMPRESSION-compressed payload, PVH note present"

pv_initramfs "$OUT/initramfs.cpio.gz" "$PV_LIB_DIR/init" "${MODULES[@]}"
printf '%s\n' "$PV_KVER" >"$OUT/kernel-release"
printf '%s\n' "$stamp" >"$OUT/.stamp"
pv_say "done: $OUT/{bzImage,vmlinux,initramfs.cpio.gz} (kernel $PV_KVER, $PV_KERNEL_COMPRESSION)"
if ((check)); then check_guest; fi
