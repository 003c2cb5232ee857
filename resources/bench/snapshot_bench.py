#!/usr/bin/env python3
"""Snapshot and restore benchmark: podvisor vs QEMU on one host, same kernel, initramfs,
command line, memory and vCPUs, interleaved.

Run it where there is hardware KVM (resources/bench/snapshot.sh puts it in the test host).
Each run boots a VM, waits for the guest's ready line, starts a ticker in the guest (a line on
the serial console every 20 ms; with --workload dirty also a loop rewriting 64 MiB), pauses the
VM and writes its snapshot into a directory on /dev/shm, ends that VMM, then brings the
snapshot back in a new process and waits for the guest's ticker to print again. Reported per
VMM, medians over the runs:

  snapshot_ms   from the pause request to the snapshot being written (podvisor: `ctl pause`
                and `ctl snapshot`; QEMU: QMP `stop`, then `migrate` to `file:` until
                query-migrate says completed)
  restore_ms    from starting the new process to the guest's first tick on its console
                (podvisor: `podvisor run --restore DIR`, which resumes the guest; QEMU:
                `-incoming file:...`, then QMP `cont` once the state is in)
  size_mib      what the snapshot takes on /dev/shm (allocated blocks: holes do not count)

With --state FILE every finished run is appended to FILE, and a later call with the same FILE
and arguments skips the runs it already holds (resources/bench/resume.sh).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

from migrate_bench import (GUEST, READY, Qmp, Vmm, bench_args, interleaved, report,
                           start_workload, wait_for, write_vm_config)


def allocated_mib(path):
    """MiB of blocks allocated under `path` (a file or a directory)."""
    paths = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    return sum(os.stat(p).st_blocks * 512 for p in paths) / (1 << 20)


def first_tick(vm, timeout=300):
    """Waits for the guest's ticker to print a line after the VMM started; monotonic s."""
    deadline = time.monotonic() + timeout
    while not vm.ticks:
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the restored guest does not tick (rc={vm.proc.poll()}):\n"
                               f"{vm.out[-2000:].decode(errors='replace')}")
        time.sleep(0.002)
    return vm.ticks[0]


def run_podvisor(args, tmp, snap):
    pv = args.podvisor
    sock = f"{tmp}/src.sock"
    write_vm_config(args, f"{tmp}/vm.json")
    ctl = lambda *a: subprocess.run([pv, "ctl", "--api-socket", sock, *a], check=True,
                                    capture_output=True, timeout=900)
    src = Vmm([pv, "serve", "--api-socket", sock])
    try:
        wait_for(sock)
        ctl("create", f"{tmp}/vm.json")
        ctl("boot")
        src.expect(READY, 300)
        start_workload(src, args.workload)
        start = time.monotonic()
        ctl("pause")
        ctl("snapshot", snap)
        snapshot_ms = (time.monotonic() - start) * 1000
        ctl("shutdown-vmm")
        src.proc.wait(timeout=60)
    finally:
        src.stop()
    start = time.monotonic()
    dst = Vmm([pv, "run", "--restore", snap])
    try:
        restore_ms = (first_tick(dst) - start) * 1000
        dst.answers()
    finally:
        dst.stop()
    return {"snapshot_ms": snapshot_ms, "restore_ms": restore_ms,
            "size_mib": allocated_mib(snap)}


def run_qemu(args, tmp, snap):
    os.makedirs(snap)
    state = f"{snap}/state"

    def cmd(qmp, extra=()):
        return [args.qemu, "-M", "pc", "-accel", "kvm", "-cpu", "host", "-m", f"{args.memory}M",
                "-smp", str(args.cpus), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-kernel", os.path.join(GUEST, "bzImage"),
                "-initrd", os.path.join(GUEST, "initramfs.cpio.gz"), "-append", args.cmdline,
                "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    src = Vmm(cmd(f"{tmp}/q1"))
    try:
        src.expect(READY, 300)
        start_workload(src, args.workload)
        q = Qmp(f"{tmp}/q1")
        start = time.monotonic()
        q.call("stop")
        q.call("migrate", uri=f"file:{state}")
        while True:
            info = q.call("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.005)
        snapshot_ms = (time.monotonic() - start) * 1000
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration to a file: {info}")
    finally:
        src.stop()
    start = time.monotonic()
    dst = Vmm(cmd(f"{tmp}/q2", ("-incoming", f"file:{state}")))
    try:
        try:
            q = Qmp(f"{tmp}/q2")
            while True:
                status = q.call("query-status")["status"]
                if status != "inmigrate":
                    break
                time.sleep(0.002)
            if status != "running":
                q.call("cont")
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"QEMU -incoming file: {e} (rc={dst.proc.poll()}):\n"
                               f"{dst.out[-2000:].decode(errors='replace')}") from e
        restore_ms = (first_tick(dst) - start) * 1000
        dst.answers()
    finally:
        dst.stop()
    return {"snapshot_ms": snapshot_ms, "restore_ms": restore_ms,
            "size_mib": allocated_mib(snap)}


def in_scratch(run):
    """`run(args, tmp, snap)` with a scratch folder and a snapshot path on the test host's own
    tmpfs (the shared / is virtiofs), both removed afterwards."""
    def runner(args):
        tmp = tempfile.mkdtemp(prefix="podvisor-snapbench-")
        snap = tempfile.mkdtemp(prefix="podvisor-snapbench-", dir="/dev/shm")
        os.rmdir(snap)
        try:
            return run(args, tmp, snap)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(snap, ignore_errors=True)
    return runner


def main():
    args = bench_args(__doc__.split("\n")[0])
    runners = {"podvisor": in_scratch(run_podvisor), "qemu pc": in_scratch(run_qemu)}
    results = interleaved(args, "snapshot", runners)

    keys = ("snapshot_ms", "restore_ms", "size_mib")
    report(args, results, list(zip(keys, ("snapshot ms", "restore ms", "size MiB"))), keys)


if __name__ == "__main__":
    sys.exit(main())
