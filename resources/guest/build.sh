#!/usr/bin/env bash
# Build the default podvisor guest into target/guest/:
#   bzImage             Debian cloud kernel (as shipped)
#   vmlinux             uncompressed ELF from that bzImage (has the PVH entry note)
#   initramfs.cpio.gz   busybox + virtio/ext4 modules + /init (see README.md)
#   root.raw            ext4 root disk (512 MiB, sparse): the initramfs tree + fio, iperf3
#   root.qcow2          the same as qcow2 v3; boot with "root=/dev/vda" (README.md)
# Cached: does nothing when the outputs are up to date. Usage: build.sh [-f] [--check]
#   -f        rebuild the outputs even if they look up to date (downloads stay cached)
#   --check   then boot bzImage and vmlinux, and the root disk, under QEMU TCG and
#             check the ready line
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
    pv_qemu
    pv_need timeout:coreutils
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
    # The root disk (through a throw-away overlay: snapshot=on), running fio and iperf3 there.
    start=${EPOCHREALTIME/./}
    out="$(timeout 300 qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 512 -smp 2 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$OUT/bzImage" -initrd "$OUT/initramfs.cpio.gz" \
        -drive "file=$OUT/root.qcow2,if=virtio,format=qcow2,snapshot=on" \
        -append "console=ttyS0 quiet root=/dev/vda podvisor.halt podvisor.exec=fio,--version podvisor.exec=iperf3,--version" \
        </dev/null 2>&1)" || true
    out="${out//$'\r'/}"
    local want
    for want in '^podvisor-guest root: /dev/vda$' '^podvisor-guest ready: cpus=2 memtotal_kb=[0-9]+$' \
        '^podvisor-guest exec rc=0: fio --version$' '^podvisor-guest exec rc=0: iperf3 --version$'; do
        if ! grep -Eq "$want" <<<"$out"; then
            printf '%s\n' "$out" >&2
            pv_die "check: no line matching $want booting root.qcow2"
        fi
    done
    pv_say "check: root.qcow2 ok ($(grep -a 'podvisor-guest ready' <<<"$out"), $(grep -a '^fio-' <<<"$out"), $(grep -a '^iperf ' <<<"$out"), $(((${EPOCHREALTIME/./} - start) / 1000)) ms)"
}

OUT="$PV_ROOT/target/guest"
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
    virtio_blk virtio_net virtio_rng virtio_console
    ext4 crc16 mbcache jbd2 crc32c_generic
    isofs
    button evdev
)

# Root disk: programs copied in with their shared libraries (from these Debian packages).
ROOT_SIZE=512M
ROOT_PROGRAMS=(/usr/bin/fio:fio /usr/bin/iperf3:iperf3)

boot_up_to_date() {
    local f
    for f in bzImage vmlinux initramfs.cpio.gz .stamp; do [[ -s "$OUT/$f" ]] || return 1; done
    [[ "$(cat "$OUT/.stamp")" == "$stamp" ]]
}

# root_stamp -> the inputs' stamp + size/mtime of the host files copied into the
# root disk (listed in root.files) and of the images themselves (so an image a
# test wrote to by mistake is rebuilt).
root_stamp() {
    local files=()
    mapfile -t files <"$OUT/root.files"
    printf '%s\n' "$stamp"
    { stat -L -c '%n %s %Y' -- "${files[@]}" || echo missing; } 2>/dev/null | sha256sum | cut -d' ' -f1
    stat -c '%n %s %y' -- "$OUT/root.raw" "$OUT/root.qcow2" 2>/dev/null || echo missing
}
root_up_to_date() {
    local f
    for f in root.raw root.qcow2 root.files .root-stamp; do [[ -s "$OUT/$f" ]] || return 1; done
    [[ "$(cat "$OUT/.root-stamp")" == "$(root_stamp)" ]]
}
up_to_date() { boot_up_to_date && root_up_to_date; }

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

# build_boot - bzImage, vmlinux, initramfs.cpio.gz, kernel-release
build_boot() {
    rm -f "$OUT/.stamp"
    pv_need readelf:binutils od:coreutils
    pv_say "building guest from $kpkg ($PV_KVER)"
    cp "$PV_VMLINUZ" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"

    pv_extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux"
    # PVH entry point: "Xen 0x00000004 Unknown note type: (0x00000012)" (XEN_ELFNOTE_PHYS32_ENTRY)
    local notes
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
}

# build_root - root.raw, root.qcow2: ext4 (made without mounting: mkfs.ext4 -d) holding
# the initramfs tree (/sbin/init -> /init) and ROOT_PROGRAMS with their libraries.
ROOT_TREE=""
build_root() {
    rm -f "$OUT/.root-stamp"
    pv_need mkfs.ext4:e2fsprogs e2fsck:e2fsprogs qemu-img:qemu-utils chroot:coreutils "${ROOT_PROGRAMS[@]}"
    pv_say "building root disk images ($ROOT_SIZE, ${ROOT_PROGRAMS[*]%%:*})"
    ROOT_TREE="$(mktemp -d "$OUT/.root.XXXXXX")"
    trap 'rm -rf "$ROOT_TREE"' EXIT
    local tree="$ROOT_TREE" p out
    pv_stage "$tree" "$PV_LIB_DIR/init" "${MODULES[@]}"
    ln -sfn ../init "$tree/sbin/init"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$tree/etc/passwd"
    printf 'root:x:0:\n' >"$tree/etc/group"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >"$tree/etc/hosts"
    printf 'hosts: files dns\n' >"$tree/etc/nsswitch.conf"
    pv_copy_elf "$tree" "${ROOT_PROGRAMS[@]%%:*}" >"$OUT/root.files.tmp"
    if [[ "$(id -u)" == 0 ]]; then
        for p in "${ROOT_PROGRAMS[@]%%:*}"; do
            out="$(chroot "$tree" "$p" --version 2>&1)" || pv_die "$p does not run in the root tree: $out"
            pv_log "root: $(head -n1 <<<"$out")"
        done
    else
        pv_say "warning: not root, cannot check the programs with chroot"
    fi
    rm -f "$OUT/root.raw.tmp" "$OUT/root.qcow2.tmp"
    truncate -s "$ROOT_SIZE" "$OUT/root.raw.tmp"
    out="$(mkfs.ext4 -q -F -L podvisor-root -m 0 -d "$tree" "$OUT/root.raw.tmp" 2>&1)" \
        || pv_die "mkfs.ext4 -d failed: $out"
    out="$(e2fsck -fn "$OUT/root.raw.tmp" 2>&1)" || pv_die "e2fsck of the new root.raw failed: $out"
    out="$(qemu-img convert -q -f raw -O qcow2 -o compat=1.1 "$OUT/root.raw.tmp" "$OUT/root.qcow2.tmp" 2>&1)" \
        || pv_die "qemu-img convert to qcow2 failed: $out"
    rm -rf "$tree"
    mv "$OUT/root.raw.tmp" "$OUT/root.raw"
    mv "$OUT/root.qcow2.tmp" "$OUT/root.qcow2"
    mv "$OUT/root.files.tmp" "$OUT/root.files"
    root_stamp >"$OUT/.root-stamp"
    pv_say "done: $OUT/root.{raw,qcow2} ($(du -h "$OUT/root.raw" | cut -f1) used of $ROOT_SIZE raw, qcow2 $(du -h "$OUT/root.qcow2" | cut -f1))"
}

pv_kernel_fetch "$kpkg"
pv_busybox_fetch
if ((force)) || ! boot_up_to_date; then build_boot; fi
if ((force)) || ! root_up_to_date; then build_root; fi
if ((check)); then check_guest; fi
