#!/usr/bin/env bash
# fuzz.sh - runs podvisor's fuzz targets (cargo-fuzz / libFuzzer) for a while each.
#
# The targets feed hostile input to the code that reads it:
#   request_parser (api/fuzz)   an API request: route, method, body, VmConfig validation;
#   disk_boot      (vmm/fuzz)   a disk image through the direct disk boot: partition tables,
#                               ext2/3/4, boot menus, kernel and initrd;
#   boot_menus     (vmm/fuzz)   grub.cfg, BLS entries with grubenv, extlinux.conf text;
#   qcow2_image    (devices/fuzz) a qcow2 file opened, then read, written and discarded through;
#   virtio_pci     (devices/fuzz) a hostile driver of a virtio-blk (in-memory disk), -rng or -net
#                               (frames from a hostile network too) PCI function: guest memory,
#                               BAR and configuration accesses;
#   platform_io    (devices/fuzz) port I/O to the legacy devices and PCI configuration
#                               (0xcf8/0xcfc), MMIO to ECAM and to BARs the guest may move.
# Each starts from its seeds (api/fuzz's and devices/fuzz's in git; disk images made here with
# mkfs.ext4 and sfdisk) in target/fuzz/corpus/TARGET, which keeps what the fuzzer finds for
# the next run.
# A crash, hang or leak stops the run with its input in target/fuzz/artifacts/TARGET/: make
# it a regression test.
#
# Usage: scripts/fuzz.sh [--time SECONDS] [TARGET...]   (default: 600 s each, every target)
#
# cargo-fuzz is installed once per machine into /var/cache/podvisor/tools (PODVISOR_CACHE
# moves it), beside the instrumented builds (fuzz-build). libFuzzer's instrumentation needs flags
# the stable compiler keeps for its own build (RUSTC_BOOTSTRAP=1 lets it take them); no
# other toolchain is needed.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

SECONDS_EACH=600
TARGETS=()
while (($#)); do
    case "$1" in
        --time) SECONDS_EACH="${2:?--time needs seconds}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) pv_die "unknown option $1 (see --help)" ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done
((${#TARGETS[@]})) || TARGETS=(request_parser disk_boot boot_menus qcow2_image virtio_pci platform_io)
# fuzz_dir TARGET: the cargo-fuzz project that has TARGET.
fuzz_dir() {
    case "$1" in
        request_parser) echo api/fuzz ;;
        disk_boot|boot_menus) echo vmm/fuzz ;;
        qcow2_image | virtio_pci | platform_io) echo devices/fuzz ;;
        *) pv_die "no fuzz target '$1' (request_parser, disk_boot, boot_menus, qcow2_image, virtio_pci, platform_io)" ;;
    esac
}
for target in "${TARGETS[@]}"; do fuzz_dir "$target" >/dev/null; done
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || pv_die "--time takes whole seconds, not '$SECONDS_EACH'"

pv_rust
pv_need c++:g++ mkfs.ext4:e2fsprogs sfdisk:fdisk
FUZZ_VERSION=0.13.2
# Installed once per machine, in its cache (a fresh clone does not build it again).
tools="${PODVISOR_CACHE:-/var/cache/podvisor}/tools"
if [[ "$("$tools/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $FUZZ_VERSION" ]]; then
    pv_say "installing cargo-fuzz $FUZZ_VERSION into $tools (once per machine, ~2 min)"
    cargo install --quiet --locked --root "$tools" cargo-fuzz --version "$FUZZ_VERSION" \
        || pv_die "cargo install cargo-fuzz failed"
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1
work="$PV_ROOT/target/fuzz"
mkdir -p "$work"
# The instrumented builds (~10 min from nothing) go to the machine's cache, which every clone
# shares (as the Debian image does): a fresh clone rebuilds only podvisor's own crates. Past
# 8 GiB (each clone's path adds its own copies of them) it starts over.
build="${PODVISOR_CACHE:-/var/cache/podvisor}/fuzz-build"
mkdir -p "$build"
if (($(du -sk "$build" | cut -f1) > 8 * 1024 * 1024)); then
    pv_say "the fuzz build cache $build is over 8 GiB: starting it over"
    rm -rf "$build" && mkdir -p "$build"
fi

# seed_disks DIR: small GPT and MBR disks with an ext4 partition holding each kind of menu.
seed_disks() {
    local dir="$1" tmp kind files
    tmp="$(mktemp -d)"
    for kind in grub bls extlinux links; do
        files="$tmp/$kind"
        mkdir -p "$files"
        printf 'MZ-fake-kernel' > "$files/vmlinuz-6.1.0"
        printf 'initrd' > "$files/initrd.img-6.1.0"
        case "$kind" in
            grub)
                mkdir -p "$files/boot/grub"
                cat > "$files/boot/grub/grub.cfg" <<'CFG'
set default="0"
search --no-floppy --fs-uuid --set=root 1234
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
	linux	/vmlinuz-6.1.0 root=UUID=1234 ro quiet
	initrd	/initrd.img-6.1.0
}
submenu 'Advanced options' {
	menuentry 'Debian, recovery' { linux /vmlinuz-6.1.0 single
	}
}
CFG
                ;;
            bls)
                mkdir -p "$files/loader/entries" "$files/grub2"
                printf 'title Fedora\nversion 6.1.0\nlinux /vmlinuz-6.1.0\ninitrd /initrd.img-6.1.0\noptions $kernelopts quiet\n' \
                    > "$files/loader/entries/a.conf"
                printf '# GRUB Environment Block\nkernelopts=root=UUID=1 ro\nsaved_entry=a\n' > "$files/grub2/grubenv"
                ;;
            extlinux)
                mkdir -p "$files/extlinux"
                printf 'DEFAULT l\nLABEL l\n MENU LABEL Linux\n LINUX /vmlinuz-6.1.0\n INITRD /initrd.img-6.1.0\n APPEND root=/dev/vda1\n' \
                    > "$files/extlinux/extlinux.conf"
                ;;
            links)
                ln -s vmlinuz-6.1.0 "$files/vmlinuz"
                ln -s initrd.img-6.1.0 "$files/initrd.img"
                ;;
        esac
        truncate -s 200K "$tmp/fs"
        mkfs.ext4 -q -F -b 1024 -N 32 -O ^has_journal -E nodiscard -d "$files" "$tmp/fs" >/dev/null
        for label in gpt dos; do
            truncate -s 0 "$dir/$kind-$label.img"
            truncate -s 250K "$dir/$kind-$label.img"
            printf 'label: %s\nstart=40, size=400, type=L\n' "$label" | sfdisk -q "$dir/$kind-$label.img"
            dd if="$tmp/fs" of="$dir/$kind-$label.img" bs=512 seek=40 conv=notrunc status=none
        done
        rm -f "$tmp/fs"
    done
    rm -rf "$tmp"
}

# seed_virtio DIR: operation lists (virtio_pci's input format) that bring each device up as
# Linux's driver does and send it one request: a read of sector 0 (virtio-blk, read-only disk
# and writable), 64 random bytes (virtio-rng), a frame received (virtio-net).
seed_virtio() {
    local dir="$1"
    pv_need python3:python3
    python3 - "$dir" <<'EOF'
import struct, sys
out = sys.argv[1]
WIDTH = {1: 0, 2: 1, 4: 2, 8: 3}
def bar(off, val, width):          # op 1: a BAR write
    return bytes([1 | WIDTH[width] << 4]) + struct.pack('<HQ', off, val)
def mem(addr, data):               # op 0: guest memory
    return bytes([0]) + struct.pack('<HB', addr, len(data)) + data
def desc(addr, length, flags, nxt):
    return struct.pack('<QIHH', addr, length, flags, nxt)
def bring_up():
    ops = bar(0x14, 1, 1) + bar(0x14, 3, 1)
    ops += bar(0x08, 1, 4) + bar(0x0c, 1, 4)          # VIRTIO_F_VERSION_1
    ops += bar(0x14, 0xb, 1)                           # FEATURES_OK
    ops += bar(0x16, 0, 2) + bar(0x18, 16, 2)          # queue 0, 16 entries
    ops += bar(0x20, 0x1000, 8) + bar(0x28, 0x2000, 8) + bar(0x30, 0x3000, 8)
    ops += bar(0x1c, 1, 2) + bar(0x14, 0xf, 1)         # enable, DRIVER_OK
    return ops
avail = mem(0x2000, struct.pack('<HHH', 0, 1, 0))
notify = bytes([7, 0]) + bytes([15]) * 8               # notify queue 0, then let it work
blk = bring_up() + mem(0x1000, desc(0x4000, 16, 1, 1) + desc(0x5000, 512, 3, 2) + desc(0x6000, 1, 2, 0))
blk += mem(0x4000, struct.pack('<IIQ', 0, 0, 0)) + avail + notify
rng = bring_up() + mem(0x1000, desc(0x5000, 64, 2, 0)) + avail + notify
# virtio-net: a receive buffer on queue 0, then a 48-byte frame from the network (op 14).
frame = bytes(12) + b'\xff' * 6 + bytes.fromhex('525400123456') + b'\x08\x00' + bytes(22)
net = bring_up() + mem(0x1000, desc(0x5000, 1526, 2, 0)) + avail + notify
net += bytes([14, len(frame) // 8]) + frame + bytes([15]) * 8
for name, data in (('blk', bytes([0]) + blk), ('blk-ro', bytes([2]) + blk), ('rng', bytes([1]) + rng),
                   ('net', bytes([3]) + net)):
    open(f'{out}/seed-{name}', 'wb').write(data)
EOF
}

# seed CORPUS TARGET: the seeds of TARGET, unless its corpus has some already.
seed() {
    local corpus="$1" target="$2"
    mkdir -p "$corpus"
    [[ -z "$(ls -A "$corpus")" ]] || return 0
    case "$target" in
        request_parser) cp api/fuzz/corpus/request_parser/seed-* "$corpus/" ;;
        disk_boot) seed_disks "$corpus" ;;
        boot_menus)
            printf 'kernelopts=root=/dev/vda1\nset default=1\nmenuentry "a" { linux /v x=1\n initrd /i }\nmenuentry "b" --id b { linux /w\n}\n' > "$corpus/grub"
            printf '\ntitle T\nversion 1\nlinux /vmlinuz\ninitrd /initrd\noptions $kernelopts\n' > "$corpus/bls"
            printf '\nDEFAULT x\nLABEL x\n KERNEL vmlinuz\n APPEND initrd=i1,i2 root=/dev/sda\n' > "$corpus/extlinux"
            ;;
        qcow2_image) cp devices/fuzz/corpus/qcow2_image/seed-* "$corpus/" ;;
        virtio_pci) seed_virtio "$corpus" ;;
        # COM1 "hi", the CMOS seconds, the host bridge's vendor ID over 0xcf8/0xcfc and ECAM.
        platform_io) printf '\x01\x00\x00\x00h\x01\x00\x00\x00i\x01\x02\x00\x00\x00\x00\x02\x00\x00\x00\x09\x05\x00\x00\x00\x00\x00\x80\x04\x05\x04\x00\x0a\x00\x00\x00' > "$corpus/seed" ;;
    esac
}

for target in "${TARGETS[@]}"; do
    dir="$(fuzz_dir "$target")"
    pv_say "$target: building ($dir)"
    cargo fuzz build --fuzz-dir "$dir" --target-dir "$build" -O --debug-assertions "$target" \
        || pv_die "$target: cargo fuzz build failed"
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    mkdir -p "$artifacts"
    seed "$corpus" "$target"
    pv_say "$target: fuzzing for ${SECONDS_EACH}s (corpus $corpus)"
    case "$target" in
        request_parser) extra=(-dict=api/fuzz/request_parser.dict -max_len=8192 -malloc_limit_mb=256) ;;
        qcow2_image) extra=(-max_len=65536 -malloc_limit_mb=256) ;;
        virtio_pci | platform_io) extra=(-max_len=8192 -malloc_limit_mb=256) ;;
        *) extra=(-max_len=1048576 -malloc_limit_mb=512) ;;
    esac
    cargo fuzz run --fuzz-dir "$dir" --target-dir "$build" -O --debug-assertions "$target" \
        "$corpus" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=3072 "${extra[@]}" \
        -timeout=20 -artifact_prefix="$artifacts/" -print_final_stats=1 >"$work/$target.log" 2>&1 || {
        tail -n 40 "$work/$target.log" >&2
        pv_die "$target: libFuzzer found a crash, hang or leak (input in $artifacts/; log $work/$target.log)"
    }
    pv_say "$target: $(grep -E '^stat::number_of_executed_units' "$work/$target.log" | awk '{print $2}') inputs, no failure"
done
