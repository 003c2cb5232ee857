# shellcheck shell=bash
# Shared helpers for resources/guest/build.sh and resources/testhost/run.sh.
# Source it from bash; it defines functions and a few PV_* variables only.
#
#   PV_ROOT       repository root (resolved from this file's location)
#   PV_CACHE      download/extract cache shared by the guest and the test host
#
# Environment knobs:
#   PODVISOR_KERNEL_PKG   force a kernel package, e.g. linux-image-6.1.0-56-cloud-amd64
#   PODVISOR_VERBOSE=1    print progress messages

PV_LIB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
PV_ROOT="$(cd -- "$PV_LIB_DIR/../.." && pwd -P)"
PV_CACHE="$PV_ROOT/target/guest/cache"
# Used when the apt metadata cannot tell us the current cloud kernel.
PV_KERNEL_PKG_FALLBACK="linux-image-6.1.0-56-cloud-amd64"
PV_KERNEL_META="linux-image-cloud-amd64"

pv_log() { if [[ "${PODVISOR_VERBOSE:-0}" == 1 ]]; then printf '%s: %s\n' "${0##*/}" "$*" >&2; fi; }
pv_say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
pv_die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit "${PV_DIE_RC:-1}"; }

PV_APT_UPDATED=0
pv_apt_update() {
    if [[ "$PV_APT_UPDATED" == 0 ]]; then
        pv_say "running apt-get update"
        apt-get update -qq >/dev/null || pv_die "apt-get update failed"
        PV_APT_UPDATED=1
    fi
}

# pv_need CMD:PKG ... - install PKG (Debian) unless CMD is on PATH or is an
# existing absolute path.
pv_need() {
    local spec cmd pkg missing=()
    for spec in "$@"; do
        cmd="${spec%%:*}" pkg="${spec#*:}"
        if [[ "$cmd" == /* ]]; then
            [[ -e "$cmd" ]] && continue
        elif command -v "$cmd" >/dev/null 2>&1; then
            continue
        fi
        missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [[ "$(id -u)" == 0 ]] || pv_die "missing packages (${missing[*]}); install them or run as root"
    pv_apt_update
    pv_say "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || pv_die "apt-get install ${missing[*]} failed"
}

# The QEMU the test host runs on and every benchmark measures against: the newest Debian
# offers (docs/testhost-stability.md says why). On Debian 12 it comes from bookworm-backports,
# which pv_qemu adds to apt's sources when the installed QEMU is older or missing.
PV_QEMU_MAJOR=10
PV_BACKPORTS_LIST=/etc/apt/sources.list.d/podvisor-bookworm-backports.sources

# pv_qemu_major -> prints the major version of qemu-system-x86_64, or nothing (and succeeds:
# a machine without QEMU is what pv_qemu is for).
pv_qemu_major() {
    { qemu-system-x86_64 --version 2>/dev/null || true; } \
        | sed -n '1s/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

# pv_qemu - make qemu-system-x86_64 (and qemu-img) QEMU >= PV_QEMU_MAJOR where Debian has it.
pv_qemu() {
    local have codename=""
    have="$(pv_qemu_major)"
    if [[ -n "$have" ]] && ((have >= PV_QEMU_MAJOR)); then return 0; fi
    codename="$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")"
    if [[ "$codename" == bookworm ]]; then
        [[ "$(id -u)" == 0 ]] || pv_die "QEMU $PV_QEMU_MAJOR from bookworm-backports is needed; run as root"
        if ! apt-cache policy 2>/dev/null | grep -q ' bookworm-backports/main '; then
            pv_say "adding Debian's bookworm-backports suite to apt's sources ($PV_BACKPORTS_LIST)"
            printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
                'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$PV_BACKPORTS_LIST"
            PV_APT_UPDATED=0
        fi
        pv_apt_update
        pv_say "installing QEMU $PV_QEMU_MAJOR from bookworm-backports (qemu-system-x86, qemu-utils)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null \
            || pv_die "apt-get install -t bookworm-backports qemu-system-x86 qemu-utils failed"
    else
        pv_need qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils
    fi
    have="$(pv_qemu_major)"
    [[ -n "$have" ]] || pv_die "qemu-system-x86_64 does not run"
    if ((have < PV_QEMU_MAJOR)); then
        pv_say "warning: QEMU $have here; the test host and the benchmarks are measured with QEMU $PV_QEMU_MAJOR"
    fi
}

# The Rust virtiofsd, built from crates.io when the system has no virtiofsd (QEMU 8 and newer
# no longer ship the C one; Debian 12 has no package for the Rust one).
PV_VIRTIOFSD_VERSION=1.14.0

# pv_virtiofsd -> prints the path of a virtiofsd: the system's Rust one, QEMU's C one, or ours.
pv_virtiofsd() {
    # Built once per machine, into its cache (which every clone shares, as the Debian image).
    local f machine="${PODVISOR_CACHE:-/var/cache/podvisor}" lock
    local ours="$machine/virtiofsd-$PV_VIRTIOFSD_VERSION/bin/virtiofsd"
    for f in /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd "$ours"; do
        if [[ -x "$f" ]]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    command -v cargo >/dev/null 2>&1 || pv_die "no virtiofsd on this machine and no cargo to build one"
    pv_need cc:build-essential pkg-config:pkg-config /usr/include/seccomp.h:libseccomp-dev \
        /usr/include/cap-ng.h:libcap-ng-dev
    mkdir -p "$machine"
    exec {lock}>"$machine/.virtiofsd.lock"
    flock "$lock"
    if [[ ! -x "$ours" ]]; then
        pv_say "building virtiofsd $PV_VIRTIOFSD_VERSION from crates.io into $machine (once per machine, ~2 min)"
        # From /, so this repository's cargo configuration (its rustc wrapper) does not apply.
        (cd / && CARGO_TARGET_DIR="$machine/virtiofsd-build" cargo install --quiet \
            --locked "virtiofsd@$PV_VIRTIOFSD_VERSION" --root "${ours%/bin/virtiofsd}" >&2) \
            || pv_die "cargo install virtiofsd@$PV_VIRTIOFSD_VERSION failed"
        rm -rf "$machine/virtiofsd-build"
    fi
    exec {lock}>&-
    printf '%s\n' "$ours"
}

# Keep a lock on the shared cache while building (several test hosts may start at once).
pv_lock() {
    mkdir -p "$PV_CACHE"
    exec {PV_LOCK_FD}>"$PV_CACHE/.lock"
    flock "$PV_LOCK_FD"
}

# pv_download PKG -> prints path of the cached .deb (downloads it once).
pv_download() {
    local pkg="$1" deb
    deb="$(compgen -G "$PV_CACHE/debs/${pkg}_*.deb" | head -n1 || true)"
    if [[ -z "$deb" ]]; then
        mkdir -p "$PV_CACHE/debs"
        pv_say "downloading $pkg"
        local tmp
        tmp="$(mktemp -d "$PV_CACHE/debs/.dl.XXXXXX")"
        # APT::Sandbox::User=root: the cache dir is not readable by user _apt.
        if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >/dev/null 2>&1); then
            pv_apt_update
            (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >/dev/null) \
                || { rm -rf "$tmp"; pv_die "apt-get download $pkg failed"; }
        fi
        mv "$tmp"/*.deb "$PV_CACHE/debs/"
        rmdir "$tmp"
        deb="$(compgen -G "$PV_CACHE/debs/${pkg}_*.deb" | head -n1)"
    fi
    printf '%s\n' "$deb"
}

# pv_kernel_pkg -> prints the kernel package to use. The answer is cached in
# $PV_CACHE/kernel-pkg and only recomputed when the apt lists changed, so the
# fast path does not pay for apt-cache (~0.6 s).
pv_kernel_pkg() {
    if [[ -n "${PODVISOR_KERNEL_PKG:-}" ]]; then
        printf '%s\n' "$PODVISOR_KERNEL_PKG"
        return
    fi
    local f="$PV_CACHE/kernel-pkg" pkg=""
    if [[ -s "$f" ]] && [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -newer "$f" -print -quit 2>/dev/null)" ]]; then
        cat "$f"
        return
    fi
    pv_need apt-cache:apt
    pkg="$(apt-cache depends "$PV_KERNEL_META" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1)"
    if [[ -z "$pkg" && "$PV_APT_UPDATED" == 0 && "$(id -u)" == 0 ]]; then
        pv_apt_update
        pkg="$(apt-cache depends "$PV_KERNEL_META" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1)"
    fi
    if [[ -z "$pkg" ]]; then
        pv_say "warning: cannot resolve $PV_KERNEL_META via apt-cache; using $PV_KERNEL_PKG_FALLBACK"
        pkg="$PV_KERNEL_PKG_FALLBACK"
    fi
    mkdir -p "$PV_CACHE"
    printf '%s\n' "$pkg" >"$f.tmp" && mv "$f.tmp" "$f"
    printf '%s\n' "$pkg"
}

# pv_kernel_fetch PKG - download + extract the kernel package, run depmod.
# Sets PV_KROOT (extracted tree), PV_KVER (uname -r), PV_VMLINUZ.
pv_kernel_fetch() {
    local pkg="$1" deb
    PV_KROOT="$PV_CACHE/$pkg"
    if [[ ! -e "$PV_KROOT/.done" ]]; then
        pv_need dpkg-deb:dpkg depmod:kmod modprobe:kmod
        deb="$(pv_download "$pkg")"
        rm -rf "$PV_KROOT"
        dpkg-deb -x "$deb" "$PV_KROOT" || pv_die "cannot extract $deb"
        local v
        v="$(basename "$(compgen -G "$PV_KROOT/lib/modules/*" | head -n1)")"
        [[ -n "$v" ]] || pv_die "no /lib/modules in $deb"
        depmod -b "$PV_KROOT" "$v" || pv_die "depmod failed for $v"
        touch "$PV_KROOT/.done"
    fi
    PV_KVER="$(basename "$(compgen -G "$PV_KROOT/lib/modules/*" | head -n1)")"
    PV_VMLINUZ="$PV_KROOT/boot/vmlinuz-$PV_KVER"
    [[ -f "$PV_VMLINUZ" ]] || pv_die "no $PV_VMLINUZ in $pkg"
}

# pv_busybox_fetch - sets PV_BUSYBOX to a static busybox binary (from the
# busybox-static .deb, cached; the host's packages are not touched).
pv_busybox_fetch() {
    local dir="$PV_CACHE/busybox-static" deb
    if [[ ! -e "$dir/.done" ]]; then
        pv_need dpkg-deb:dpkg
        deb="$(pv_download busybox-static)"
        rm -rf "$dir"
        dpkg-deb -x "$deb" "$dir" || pv_die "cannot extract $deb"
        [[ -x "$dir/bin/busybox" ]] || pv_die "no bin/busybox in $deb"
        touch "$dir/.done"
    fi
    PV_BUSYBOX="$dir/bin/busybox"
}

# pv_u32 FILE OFFSET -> little-endian u32 at OFFSET
pv_u32() { od -An -t u4 -j "$2" -N 4 --endian=little "$1" | tr -d ' '; }

# pv_extract_vmlinux BZIMAGE OUT - uncompressed ELF kernel out of a bzImage,
# using the boot protocol header (payload_offset/payload_length, >= 2.08).
pv_extract_vmlinux() {
    local img="$1" out="$2" setup_sects off len start magic dec
    [[ "$(od -An -c -j 0x202 -N 4 "$img" | tr -d ' ')" == HdrS ]] || pv_die "$img is not a bzImage"
    setup_sects="$(od -An -t u1 -j 0x1f1 -N 1 "$img" | tr -d ' ')"
    ((setup_sects == 0)) && setup_sects=4
    off="$(pv_u32 "$img" 0x248)"
    len="$(pv_u32 "$img" 0x24c)"
    start=$(((setup_sects + 1) * 512 + off))
    magic="$(od -An -t x1 -j "$start" -N 6 "$img" | tr -d ' \n')"
    case "$magic" in
        1f8b*) dec="gzip -dc" ;;
        fd377a585a00) dec="xz -dc" ;;
        28b52ffd*) dec="zstd -dcq" ;;
        02214c18*) dec="lz4 -dcq" ;;
        5d0000*) dec="xz -dc --format=lzma" ;;
        425a68*) dec="bzip2 -dc" ;;
        894c5a*) dec="lzop -dc" ;;
        *) pv_die "unknown compression magic $magic in $img" ;;
    esac
    pv_need "${dec%% *}:$(case "${dec%% *}" in xz) echo xz-utils ;; *) echo "${dec%% *}" ;; esac)"
    # The last 4 bytes of the payload are the uncompressed size (gzip: ISIZE,
    # others: appended by the kernel's size_append). Feed the rest to the
    # decompressor (gzip needs its trailer).
    local clen=$((len - 4)) want
    [[ "$magic" == 1f8b* ]] && clen=$len
    want="$(pv_u32 "$img" $((start + len - 4)))"
    # (tail stops with "Broken pipe" once head has what it needs: expected, not shown.)
    # shellcheck disable=SC2086 # $dec is a command line
    tail -c +$((start + 1)) "$img" 2>/dev/null | head -c "$clen" | $dec >"$out.tmp" 2>/dev/null || true
    [[ "$(head -c 4 "$out.tmp" | od -An -t x1 | tr -d ' \n')" == 7f454c46 ]] \
        || { rm -f "$out.tmp"; pv_die "decompressing $img (${dec%% *}) did not give an ELF file"; }
    local got
    got="$(stat -c %s "$out.tmp")"
    [[ "$got" == "$want" ]] || { rm -f "$out.tmp"; pv_die "vmlinux size $got != expected $want"; }
    mv "$out.tmp" "$out"
    # shellcheck disable=SC2034 # used by the callers
    PV_KERNEL_COMPRESSION="${dec%% *}"
}

# pv_stage DIR INIT MODULE... - fill DIR with a static busybox (+ applet symlinks),
# /init, the listed modules and their dependencies (in load order; built-in ones
# skipped) and /etc/modules ("name path" lines, in load order). Needs
# PV_KROOT/PV_KVER (pv_kernel_fetch) and PV_BUSYBOX.
pv_stage() {
    local stage="$1" init="$2"
    shift 2
    pv_need modprobe:kmod
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,tmp,root,mnt,newroot}
    cp "$PV_BUSYBOX" "$stage/bin/busybox"
    local a
    while read -r a; do
        [[ "$a" == bin/busybox ]] || ln -sf /bin/busybox "$stage/$a"
    done < <("$PV_BUSYBOX" --list-full)
    install -m 0755 "$init" "$stage/init"
    if [[ "$(id -u)" == 0 ]]; then
        mknod -m 600 "$stage/dev/console" c 5 1
        mknod -m 666 "$stage/dev/null" c 1 3
    fi
    # Resolve dependencies with modprobe against the extracted tree.
    local m line path rel name seen=" "
    : >"$stage/etc/modules"
    for m in "$@"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    path="${line#insmod }" path="${path%% *}"
                    rel="${path#"$PV_KROOT"/}"
                    name="$(basename "$rel" .ko)" name="${name//-/_}"
                    [[ "$seen" == *" $name "* ]] && continue
                    seen+="$name "
                    mkdir -p "$stage/${rel%/*}"
                    cp "$path" "$stage/$rel"
                    printf '%s /%s\n' "$name" "$rel" >>"$stage/etc/modules"
                    ;;
                builtin\ *) ;;
                *) pv_die "modprobe: unexpected output for $m: $line" ;;
            esac
        done < <(modprobe -d "$PV_KROOT" -S "$PV_KVER" --show-depends "$m" 2>&1 || echo "error $m")
    done
}

# pv_initramfs OUT INIT MODULE... - gzip'd (PV_INITRAMFS_GZIP=0: plain) newc cpio
# of a pv_stage tree.
pv_initramfs() {
    local out="$1" init="$2"
    shift 2
    pv_need cpio:cpio gzip:gzip
    local stage
    stage="$(mktemp -d "${out%/*}/.stage.XXXXXX")"
    pv_stage "$stage" "$init" "$@"
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet -R 0:0) \
        | if [[ "${PV_INITRAMFS_GZIP:-1}" == 1 ]]; then gzip -9n; else cat; fi >"$out.tmp" || pv_die "cpio failed"
    rm -rf "$stage"
    mv "$out.tmp" "$out"
}

# pv_copy_elf DIR BIN... - copy the dynamically linked host programs BIN (absolute
# paths) into DIR at the same paths, with every shared library ldd lists and the
# dynamic loader (files copied dereferenced, to the paths ldd prints). Prints the
# host files it copied, one a line.
pv_copy_elf() {
    local dir="$1" bin f out files=""
    shift
    pv_need ldd:libc-bin
    for bin in "$@"; do
        out="$(ldd "$bin" 2>&1)" || pv_die "ldd $bin failed: $out"
        [[ "$out" != *"not found"* ]] || pv_die "ldd $bin: missing libraries: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
        files+="$bin"$'\n'"$(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out")"$'\n'
    done
    while read -r f; do
        [[ -n "$f" ]] || continue
        mkdir -p "$dir/${f%/*}"
        cp -L --preserve=mode,timestamps "$f" "$dir$f" || pv_die "cannot copy $f"
        printf '%s\n' "$f"
    done < <(LC_ALL=C sort -u <<<"$files")
}

# pv_stamp FILE... -> prints a hash of the given files' contents + extra
# strings passed in PV_STAMP_EXTRA.
pv_stamp() { { cat -- "$@"; printf '%s\n' "${PV_STAMP_EXTRA:-}"; } | sha256sum | cut -d' ' -f1; }
