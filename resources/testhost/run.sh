#!/usr/bin/env bash
# run.sh CMD [ARGS...] - run CMD inside a "test host": a QEMU (TCG) Linux VM
# with real (nested, emulated) KVM that sees this machine's / via virtiofs.
# Same cwd, same environment (+ PODVISOR_TESTHOST=1), output streamed, exit
# code returned (125: the test host itself failed). See DEVELOPERS.md.
#
# Knobs: PODVISOR_TESTHOST_MEM (default 4G), PODVISOR_TESTHOST_CPUS (default 2),
#        PODVISOR_TESTHOST_DEBUG=1 (show the L2 kernel log and virtiofsd log),
#        PODVISOR_TESTHOST_CACHE=always|auto|none (virtiofs cache mode),
#        PODVISOR_TESTHOST_APPEND="..." (extra L2 kernel command line; kvm_amd.X=Y words
#        reach the KVM module),
#        PODVISOR_TESTHOST_QEMU=PATH, PODVISOR_TESTHOST_VIRTIOFSD=PATH (another emulator/virtiofsd),
#        PODVISOR_TESTHOST_ACCEL (default tcg,thread=multi), PODVISOR_TESTHOST_CPU (default max),
#        PODVISOR_TESTHOST_KERNEL_PKG (another Debian kernel package for the test host only,
#        e.g. linux-image-6.12.57+deb12-cloud-amd64; the guests keep theirs).
set -euo pipefail
PV_DIE_RC=125

HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=resources/guest/lib.sh
source "$HERE/../guest/lib.sh"

if (($# == 0)); then
    printf 'usage: %s CMD [ARGS...]\n' "$0" >&2
    exit 2
fi

# Already somewhere with usable KVM: run directly.
has_hw_kvm() {
    grep -Eqw 'vmx|svm' /proc/cpuinfo 2>/dev/null && [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]
}
if [[ "${PODVISOR_TESTHOST:-}" == 1 ]] || has_hw_kvm; then
    exec "$@"
fi

MEM="${PODVISOR_TESTHOST_MEM:-4G}"
CPUS="${PODVISOR_TESTHOST_CPUS:-2}"
DEBUG="${PODVISOR_TESTHOST_DEBUG:-0}"
CACHE="${PODVISOR_TESTHOST_CACHE:-always}"
ACCEL="${PODVISOR_TESTHOST_ACCEL:-tcg,thread=multi}"
CPU_MODEL="${PODVISOR_TESTHOST_CPU:-max}"
[[ "$MEM" =~ ^[0-9]+[MG]?$ ]] || pv_die "PODVISOR_TESTHOST_MEM must look like 4G or 2048M, not '$MEM'"
[[ "$MEM" =~ [MG]$ ]] || MEM+=M # QEMU's -m default unit; the memory backend's is bytes
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || pv_die "PODVISOR_TESTHOST_CPUS must be a positive number, not '$CPUS'"
[[ "$(id -u)" == 0 ]] || pv_die "must run as root (virtiofsd shares / and runs the command as root)"

# ---- the test host's kernel + initramfs (cached) ----------------------------
MODULES=(
    irqbypass kvm kvm_amd kvm_intel
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    fuse virtiofs virtio_console tun
    veth bridge nf_tables nft_chain_nat nft_nat nft_masq
)
kpkg="${PODVISOR_TESTHOST_KERNEL_PKG:-}"
if [[ -n "$kpkg" ]]; then
    [[ "$kpkg" =~ ^linux-image-[A-Za-z0-9.+~-]+$ ]] || pv_die "PODVISOR_TESTHOST_KERNEL_PKG must name a linux-image-... package, not '$kpkg'"
    OUT="$PV_ROOT/target/testhost/kernel-$kpkg" # beside the default one: candidates alternate
else
    kpkg="$(pv_kernel_pkg)"
    OUT="$PV_ROOT/target/testhost"
fi
mkdir -p "$OUT"
PV_STAMP_EXTRA="$kpkg ${MODULES[*]}"
stamp="$(pv_stamp "$PV_LIB_DIR/lib.sh" "$HERE/init" "$HERE/run.sh")"
up_to_date() { [[ -s "$OUT/vmlinux" && -s "$OUT/initramfs.cpio" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$stamp" ]]; }
if ! up_to_date; then
    pv_lock
    if ! up_to_date; then
        rm -f "$OUT/.stamp"
        pv_kernel_fetch "$kpkg"
        pv_busybox_fetch
        pv_say "building test host from $kpkg"
        # Booted as a PVH ELF: no firmware real mode setup, no decompression under TCG.
        pv_extract_vmlinux "$PV_VMLINUZ" "$OUT/vmlinux"
        # Uncompressed: gunzip under TCG costs ~0.2 s of boot time.
        PV_INITRAMFS_GZIP=0 pv_initramfs "$OUT/initramfs.cpio" "$HERE/init" "${MODULES[@]}"
        printf '%s\n' "$stamp" >"$OUT/.stamp"
    fi
    flock -u "$PV_LOCK_FD"
fi

pv_need setpriv:util-linux
# PODVISOR_TESTHOST_QEMU / _VIRTIOFSD: another emulator or virtiofsd (resources/testhost/soak.sh
# compares them); by default the system's QEMU, installed at the version pv_qemu chooses.
QEMU="${PODVISOR_TESTHOST_QEMU:-}"
if [[ -z "$QEMU" ]]; then
    pv_qemu
    QEMU=qemu-system-x86_64
fi
QEMU="$(command -v -- "$QEMU")" || pv_die "PODVISOR_TESTHOST_QEMU: no such program"
VIRTIOFSD="${PODVISOR_TESTHOST_VIRTIOFSD:-}"
if [[ -z "$VIRTIOFSD" ]]; then VIRTIOFSD="$(pv_virtiofsd)"; fi
[[ -x "$VIRTIOFSD" ]] || pv_die "virtiofsd $VIRTIOFSD is not an executable"

# ---- per-run directory (shared with the test host through /) ----------------
base="${TMPDIR:-/tmp}"
[[ "$base" =~ ^/[A-Za-z0-9._/-]*$ && -d "$base" ]] || base=/tmp
# Remove run dirs left behind by runs that were SIGKILLed (their pid is gone).
for d in "$base"/podvisor-testhost.*; do
    [[ -f "$d/pid" ]] || continue
    p="$(cat "$d/pid" 2>/dev/null)" || continue
    if [[ "$p" =~ ^[0-9]+$ ]] && ! kill -0 "$p" 2>/dev/null; then rm -rf "$d"; fi
done
RUN="$(mktemp -d "$base/podvisor-testhost.XXXXXX")"
RUN="$(cd "$RUN" && pwd -P)" # no symlinks: the guest resolves paths itself
vfsd_pid="" qemu_pid="" tail_pid="" watchdog_pid=""
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    set +e
    local p
    for p in "$qemu_pid" "$vfsd_pid" "$tail_pid" "$watchdog_pid"; do
        if [[ -n "$p" ]]; then
            kill "$p" 2>/dev/null
            wait "$p" 2>/dev/null
        fi
    done
    rm -rf "$RUN"
}
trap cleanup EXIT
echo "$$" >"$RUN/pid"
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The inner script is run by the test host's static busybox sh (POSIX quoting):
# environment = every exported variable except bash's own per-process ones.
q() { # print $1 single-quoted for sh
    local squote="'"
    printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
}
tty=0
if [[ -t 0 && -t 1 ]]; then tty=1; fi
{
    printf '# generated by resources/testhost/run.sh\n'
    printf 'set --'
    for a in "$@"; do printf ' ' && q "$a"; done
    printf '\n'
    while IFS= read -r name; do
        case "$name" in
            PWD | OLDPWD | SHLVL | _ | BASHOPTS | SHELLOPTS | BASH_* | PODVISOR_TESTHOST) continue ;;
        esac
        if [[ -v "$name" ]]; then printf 'export %s=' "$name" && q "${!name}" && printf '\n'; fi
    done < <(compgen -e)
    printf 'export PODVISOR_TESTHOST=1\n'
    if ((tty)); then
        read -r rows cols < <(stty size 2>/dev/null || echo "0 0")
        if ((rows > 0 && cols > 0)); then printf 'stty rows %d cols %d 2>/dev/null\n' "$rows" "$cols"; fi
    fi
    printf 'cd ' && q "$PWD" && printf ' || exit 125\n'
    # Look the command up in $PATH here: busybox sh would prefer its own applets
    # (sh, ls, uname, ...) over the host's programs.
    cat <<'EOF'
cmd=$1
shift
case "$cmd" in
    */*) path=$cmd ;;
    *)
        path="" oldifs=$IFS
        set -f
        IFS=:
        for d in $PATH; do
            if [ -f "${d:-.}/$cmd" ] && [ -x "${d:-.}/$cmd" ]; then path=${d:-.}/$cmd && break; fi
        done
        IFS=$oldifs
        set +f
        ;;
esac
[ -n "$path" ] || { echo "run.sh: $cmd: command not found" >&2 && exit 127; }
exec -a "$cmd" "$path" "$@"
EOF
} >"$RUN/inner"
: >"$RUN/busybox" # mount point for the test host's busybox

# ---- virtiofsd + QEMU --------------------------------------------------------
sock="$RUN/vfs.sock"
if [[ "$VIRTIOFSD" == */lib/qemu/virtiofsd ]]; then # QEMU's C virtiofsd (QEMU 7 and older)
    vfsd_args=(--socket-path="$sock" -o source=/ -o sandbox=chroot -o cache="$CACHE" -o announce_submounts -o log_level=err)
else # the Rust virtiofsd
    vfsd_args=(--socket-path="$sock" --shared-dir / --sandbox chroot --cache "$CACHE" --announce-submounts --log-level error)
fi
# --pdeathsig: virtiofsd and QEMU go away with this script even if it is SIGKILLed.
setpriv --pdeathsig TERM "$VIRTIOFSD" "${vfsd_args[@]}" </dev/null >"$RUN/virtiofsd.log" 2>&1 &
vfsd_pid=$!
for _ in $(seq 500); do
    [[ -S "$sock" ]] && break
    kill -0 "$vfsd_pid" 2>/dev/null || break
    sleep 0.01
done
if [[ ! -S "$sock" ]]; then
    cat "$RUN/virtiofsd.log" >&2
    pv_say "error: virtiofsd ($VIRTIOFSD) did not start"
    exit 125
fi

# cryptomgr.notests, initcall_blacklist=crypto_kdf108_init: skip crypto self-tests (~0.3 s under TCG)
append="console=ttyS0 podvisor.run=$RUN panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init"
# loglevel=2: the console (a file) gets only emergencies and alerts, so a test host that
# panics or oopses says why, at no cost to a healthy boot.
if [[ "$DEBUG" == 1 ]]; then append+=" loglevel=7 podvisor.debug"; else append+=" quiet loglevel=2"; fi
((tty)) && append+=" podvisor.tty=1"
append+=" ${PODVISOR_TESTHOST_APPEND:-}"
qemu_args=()
# Firmware beside the emulator (an unpacked .deb keeps it in ../share/qemu).
fw="$(cd -- "$(dirname -- "$QEMU")/../share/qemu" 2>/dev/null && pwd -P)" || fw=/usr/share/qemu
[[ "$fw" == /usr/share/qemu ]] || qemu_args+=(-L "$fw")
# qboot instead of SeaBIOS: the firmware part of the boot drops from ~0.4 s to ~0.
if [[ -f "$fw/qboot.rom" ]]; then qemu_args+=(-bios "$fw/qboot.rom"); fi
# shellcheck disable=SC2054 # commas are QEMU option syntax
qemu_args+=(
    -M q35,memory-backend=mem
    -accel "$ACCEL" -cpu "$CPU_MODEL" -smp "$CPUS" -m "$MEM"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
    -nodefaults -no-user-config -display none -no-reboot
    -chardev "socket,id=vfs,path=$sock"
    -device vhost-user-fs-pci,chardev=vfs,tag=hostroot
    -device virtio-serial-pci -device virtconsole,chardev=con
    -serial "file:$RUN/kernel.log"
    -kernel "$OUT/vmlinux" -initrd "$OUT/initramfs.cpio" -append "$append"
)
if ((tty)); then
    # Ctrl-C etc. go to the command; Ctrl-A x kills the test host.
    # shellcheck disable=SC2054
    qemu_args+=(-chardev stdio,id=con,mux=on,signal=off -mon chardev=con)
    setpriv --pdeathsig TERM "$QEMU" "${qemu_args[@]}" <&0 &
else
    # shellcheck disable=SC2054
    qemu_args+=(-chardev stdio,id=con -monitor none)
    setpriv --pdeathsig TERM "$QEMU" "${qemu_args[@]}" </dev/null &
fi
qemu_pid=$!
qemu_rc=0
# The emulated test host's own KVM occasionally locks up (its kernel reports a soft lockup in
# a vCPU thread and never recovers): stop it at once rather than wait for the caller's
# timeout, so the caller sees a failed test host (125) and may try again.
(
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if grep -qE 'soft lockup|hard LOCKUP' "$RUN/kernel.log" 2>/dev/null; then
            pv_say "error: the test host's kernel locked up:"
            grep -m3 -E 'soft lockup|hard LOCKUP' "$RUN/kernel.log" >&2
            kill "$qemu_pid" 2>/dev/null
            break
        fi
        sleep 2
    done
) &
watchdog_pid=$!
if [[ "$DEBUG" == 1 ]]; then
    : >>"$RUN/kernel.log"
    tail -s 0.1 -n +1 -f "$RUN/kernel.log" >&2 &
    tail_pid=$!
fi
# virtiofsd exits when the test host powers off (the vhost-user connection
# closes). If it dies while the command still runs, the test host would hang on
# its file system: stop it after a grace period.
wait -n "$qemu_pid" "$vfsd_pid" || true
if kill -0 "$qemu_pid" 2>/dev/null; then
    for _ in $(seq 300); do
        kill -0 "$qemu_pid" 2>/dev/null || break
        sleep 0.01
    done
    if kill -0 "$qemu_pid" 2>/dev/null; then
        [[ -f "$RUN/rc" ]] || pv_say "error: virtiofsd exited while the test host was running"
        kill "$qemu_pid" 2>/dev/null || true
    fi
fi
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
if [[ -n "$tail_pid" ]]; then
    sleep 0.2
    kill "$tail_pid" 2>/dev/null || true
    wait "$tail_pid" 2>/dev/null || true
    tail_pid=""
fi

if [[ -f "$RUN/rc" ]]; then
    rc="$(cat "$RUN/rc")"
    [[ "$rc" =~ ^[0-9]+$ ]] || rc=125
    if [[ "$DEBUG" == 1 ]]; then cat "$RUN/virtiofsd.log" >&2; fi
    exit "$rc"
fi
# (virtiofsd always logs "Unexpected poll revents" when the VM goes away.)
grep -v 'Unexpected poll revents' "$RUN/virtiofsd.log" >&2 || true
if [[ "$DEBUG" != 1 && -s "$RUN/kernel.log" ]]; then
    pv_say "test host kernel log:"
    cat "$RUN/kernel.log" >&2
fi
pv_say "error: the test host exited (qemu status $qemu_rc) without running the command to completion; rerun with PODVISOR_TESTHOST_DEBUG=1 to see its kernel log"
exit 125
