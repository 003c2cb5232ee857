#!/bin/sh
# rustc wrapper (.cargo/config.toml): links the `podvisor` binary statically (glibc's
# static libc; `-C target-feature=+crt-static`), every other crate as usual.
#
# Why: a static binary maps no libc.so, libm, libgcc_s or ld.so, whose code pages the
# kernel maps in 64 KiB fault-around blocks: about 1.4 MiB less resident memory per VMM
# (docs/benchmarks.md, "overhead"). Cargo has no per-crate rustflags on stable, and the
# flag cannot go to every crate: proc-macro crates cannot be built with it. Only the final
# link needs it: the libc and unwind crates pick static or dynamic libraries by
# `cfg(target_feature = "crt-static")`, which rustc evaluates when it links the binary.
is_podvisor=0 is_bin=0 prev=""
for arg in "$@"; do
    case "$prev $arg" in
        "--crate-name podvisor") is_podvisor=1 ;;
        "--crate-type bin") is_bin=1 ;;
    esac
    prev=$arg
done
if [ "$is_podvisor" = 1 ] && [ "$is_bin" = 1 ] && [ "${PODVISOR_DYNAMIC_LINK:-0}" != 1 ]; then
    exec "$@" -C target-feature=+crt-static
fi
# The getrandom crate finds glibc's getrandom() with dlsym, which a static binary cannot
# answer: it would fall back to opening /dev/random and /dev/urandom at its first use, on
# whichever thread, past that thread's seccomp filter. The system call, always (Linux 3.17+).
case " $* " in
    *" --crate-name getrandom "*) exec "$@" --cfg 'getrandom_backend="linux_getrandom"' ;;
esac
exec "$@"
