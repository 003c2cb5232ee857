#!/usr/bin/env python3
"""I/O benchmark: fio and iperf3 inside the default guest, podvisor vs QEMU, interleaved.

Run it as root where there is hardware KVM (resources/bench/io.sh puts it in the test host).

Setup (once per session):
  * benchmark disks on a RAM block device: brd (one /dev/ram0 of --ramdisk-mib) with ext4,
    mounted on a private directory; it supports O_DIRECT (virtiofs and tmpfs on 6.1 do not,
    or go through the emulated virtiofsd), so both VMMs bypass the host page cache.
    The brd module is loaded from the guest kernel's package (the test host runs the same
    kernel) with rd_nr=1 rd_size=...; an already loaded brd is unloaded first.
  * bench.raw: 1 GiB raw, every byte written (a repeated random 1 MiB block);
    bench.qcow2: qemu-img convert of it (qcow2 v3, 64 KiB clusters, every cluster allocated).
    So random writes overwrite allocated data and never measure cluster allocation.
  * a persistent tap (pvbench0, 10.77.0.1/24, created with `ip tuntap`) and `iperf3 -s -B
    10.77.0.1` for the whole session; both VMMs use the same tap and guest MAC.

Each measured boot: the default guest (bzImage + initramfs, `root=/dev/vda`, a fresh qcow2
overlay over target/guest/root.qcow2 on the RAM disk), --cpus vCPUs, --memory MiB.
  * disk boots (raw, qcow2): the benchmark disk is the second disk (/dev/vdb); the guest runs
    fio four times (podvisor.exec): 4k randread and randwrite (iodepth 32), 1 MiB read and
    write (sequential, iodepth 8), all libaio, direct=1, one job, --ramp s + --runtime s.
    podvisor: --disk path=...,format=...,direct=on.
    QEMU: -drive ...,cache=none,aio=io_uring (aio=threads when io_uring is unusable).
  * net boots: the guest configures eth0 (busybox ip), runs `iperf3 -c 10.77.0.1 -t N`
    (guest -> host) then the same with -R (host -> guest); the figure is the receiver's rate.
Rounds: --warmup uncounted rounds (default 0: fio ramps up first, boots are not measured), then --runs rounds, each running every
configuration in turn (podvisor, QEMU, podvisor, QEMU, ...). Reported: medians per figure and
ratio podvisor/QEMU (higher is better for every figure here).
"""
import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from runrecord import RunRecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST = os.path.join(ROOT, "target", "guest")
MNT = "/run/podvisor-iobench"
TAP = "pvbench0"
HOST_IP, GUEST_IP, MASK, PREFIX = "10.77.0.1", "10.77.0.2", "255.255.255.0", 24
MAC = "52:54:00:77:00:02"
DISK_MIB = 1024

# name -> (fio --rw, block size, iodepth, reported metric)
FIO_JOBS = [
    ("randread", "randread", "4k", 32, "read_iops"),
    ("randwrite", "randwrite", "4k", 32, "write_iops"),
    ("seqread", "read", "1M", 8, "read_mibs"),
    ("seqwrite", "write", "1M", 8, "write_mibs"),
]
FIGURES = []  # (key, label, unit)
for fmt in ("raw", "qcow2"):
    for name, _, bs, depth, metric in FIO_JOBS:
        unit = "IOPS" if metric.endswith("iops") else "MiB/s"
        FIGURES.append((f"{fmt} {name}", f"{fmt} {name} {bs} qd{depth}", unit))
FIGURES.append(("net tx", "iperf3 guest->host", "Mbit/s"))
FIGURES.append(("net rx", "iperf3 host->guest (-R)", "Mbit/s"))


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def setup_ramdisk(mib):
    if os.path.ismount(MNT):
        sh("umount", MNT)
    if os.path.isdir("/sys/module/brd"):
        sh("rmmod", "brd")
    rel = os.uname().release
    kos = glob.glob(os.path.join(GUEST, "cache", "*", "lib", "modules", rel,
                                 "kernel", "drivers", "block", "brd.ko*"))
    if not kos:
        sys.exit(f"io_bench: no brd.ko for kernel {rel} under {GUEST}/cache (run resources/guest/build.sh)")
    sh("insmod", kos[0], "rd_nr=1", f"rd_size={mib * 1024}")
    for _ in range(100):
        if os.path.exists("/dev/ram0"):
            break
        time.sleep(0.05)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "/dev/ram0")
    os.makedirs(MNT, exist_ok=True)
    sh("mount", "-t", "ext4", "/dev/ram0", MNT)
    # O_DIRECT check (what both VMMs will do).
    probe = os.path.join(MNT, ".odirect")
    fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    os.close(fd)
    os.unlink(probe)


def teardown_ramdisk():
    subprocess.run(["umount", MNT], stderr=subprocess.DEVNULL)
    subprocess.run(["rmmod", "brd"], stderr=subprocess.DEVNULL)


def make_disks():
    raw = os.path.join(MNT, "bench.raw")
    qcow = os.path.join(MNT, "bench.qcow2")
    t = time.monotonic()
    block = os.urandom(1 << 20)
    with open(raw, "wb") as f:
        for _ in range(DISK_MIB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1,cluster_size=65536",
       raw, qcow)
    info = json.loads(sh("qemu-img", "info", "--output=json", qcow).stdout)
    alloc = info.get("actual-size", 0)
    print(f"io_bench: disks ready in {time.monotonic() - t:.0f} s: {raw} ({DISK_MIB} MiB written), "
          f"{qcow} ({alloc >> 20} MiB allocated)", file=sys.stderr, flush=True)
    if alloc < DISK_MIB << 20:
        sys.exit("io_bench: qcow2 image not fully allocated")
    return {"raw": raw, "qcow2": qcow}


def qemu_aio(qemu, path):
    """io_uring if this QEMU + kernel can open a drive with it, else threads."""
    cmd = [qemu, "-M", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S",
           "-monitor", "stdio", "-drive",
           f"file={path},if=none,id=d,format=raw,cache=none,aio=io_uring,readonly=on"]
    r = subprocess.run(cmd, input="quit\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    if r.returncode == 0:
        return "io_uring"
    print(f"io_bench: aio=io_uring unusable ({r.stdout.strip().splitlines()[-1:]}), using aio=threads",
          file=sys.stderr, flush=True)
    return "threads"


def setup_net():
    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP)
    sh("ip", "link", "set", TAP, "up")
    srv = subprocess.Popen(["iperf3", "-s", "-B", HOST_IP], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    if srv.poll() is not None:
        sys.exit("io_bench: iperf3 -s did not start")
    return srv


def fio_exec(name, rw, bs, depth, ramp, runtime):
    return ("podvisor.exec=fio,--name=" + name + ",--filename=/dev/vdb,--rw=" + rw +
            f",--bs={bs},--iodepth={depth},--direct=1,--ioengine=libaio,--numjobs=1"
            f",--time_based,--ramp_time={ramp},--runtime={runtime}"
            ",--output-format=terse,--terse-version=3")


def cmdlines(ramp, runtime, net_secs):
    base = "console=ttyS0 quiet root=/dev/vda podvisor.halt"
    disk = " ".join([base] + [fio_exec(n, rw, bs, d, ramp, runtime) for n, rw, bs, d, _ in FIO_JOBS])
    net = " ".join([
        base,
        f"podvisor.exec=ip,addr,add,{GUEST_IP}/{PREFIX},dev,eth0",
        "podvisor.exec=ip,link,set,eth0,up",
        "podvisor.exec=sleep,1",
        f"podvisor.exec=iperf3,-c,{HOST_IP},-t,{net_secs},-f,m",
        f"podvisor.exec=iperf3,-c,{HOST_IP},-t,{net_secs},-f,m,-R",
    ])
    return disk, net


def configs(args, disks, aio, disk_cmdline, net_cmdline):
    bz = os.path.join(GUEST, "bzImage")
    initrd = os.path.join(GUEST, "initramfs.cpio.gz")

    def pv(cmdline, extra):
        return lambda overlay: [
            args.podvisor, "run", "--kernel", bz, "--initramfs", initrd, "--cmdline", cmdline,
            "--cpus", str(args.cpus), "--memory", f"{args.memory}M",
            "--disk", f"path={overlay},format=qcow2,backing_files=on", *extra]

    def qm(cmdline, extra):
        return lambda overlay: [
            args.qemu, "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", f"{args.memory}M",
            "-smp", str(args.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", bz, "-initrd", initrd, "-append", cmdline,
            "-drive", f"file={overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root", *extra]

    cfgs = []
    for fmt in ("raw", "qcow2"):
        path = disks[fmt]
        cfgs.append((f"podvisor {fmt}", "disk", fmt,
                     pv(disk_cmdline, ["--disk", f"path={path},format={fmt},direct=on"])))
        cfgs.append((f"qemu {fmt}", "disk", fmt, qm(disk_cmdline, [
            "-drive", f"file={path},if=none,id=d,format={fmt},cache=none,aio={aio}",
            "-device", "virtio-blk-pci,drive=d"])))
    cfgs.append(("podvisor net", "net", None, pv(net_cmdline, [
        "--net", f"tap={TAP},ip={HOST_IP},mask={MASK},mac={MAC}"])))
    cfgs.append(("qemu net", "net", None, qm(net_cmdline, [
        "-netdev", f"tap,id=n,ifname={TAP},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=n,mac={MAC}"])))
    return cfgs


def keep_console(text):
    """Writes a failed boot's whole console under target/bench/failed/; returns the path."""
    folder = os.path.join(ROOT, "target", "bench", "failed")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}.log")
    with open(path, "w") as f:
        f.write(text)
    return path


def run_vm(cmd, timeout):
    """Runs one boot; returns its console and seconds. A failed boot's error holds the last
    3,000 characters and the path of the whole console (keep_console)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        text = out.decode(errors="replace").replace("\r", "")
        raise RuntimeError(f"timeout after {timeout} s (console: {keep_console(text)})\n"
                           f"{text[-3000:]}")
    text = out.decode(errors="replace").replace("\r", "")
    if proc.returncode != 0:
        raise RuntimeError(f"rc={proc.returncode} (console: {keep_console(text)})\n{text[-3000:]}")
    return text, time.monotonic() - start


def parse_disk(text, fmt):
    res = {}
    for name, _, _, _, metric in FIO_JOBS:
        if f"podvisor-guest exec rc=0: fio --name={name} " not in text:
            raise RuntimeError(f"fio {name} failed\n{text[-3000:]}")
        m = re.search(rf"^3;fio-[^;]*;{name};(.*)$", text, re.M)
        if not m:
            raise RuntimeError(f"no terse fio line for {name}\n{text[-3000:]}")
        f = m.group(0).split(";")
        vals = {"read_iops": float(f[7]), "read_mibs": float(f[6]) / 1024,
                "write_iops": float(f[48]), "write_mibs": float(f[47]) / 1024}
        res[f"{fmt} {name}"] = vals[metric]
    return res


IPERF = re.compile(r"^\[\s*\d+\]\s+\S+\s+sec\s+\S+\s+\S+\s+([0-9.]+)\s+Mbits/sec.*receiver$", re.M)


def parse_net(text):
    res = {}
    parts = text.split("podvisor-guest exec rc=")
    found = []
    for i, p in enumerate(parts[1:], 1):
        rc, _, cmd = p.split("\n")[0].partition(": ")
        if rc != "0":
            raise RuntimeError(f"guest command failed (rc={rc}): {cmd}\n{text[-3000:]}")
        if cmd.startswith("iperf3 "):
            m = IPERF.findall(parts[i - 1])
            if not m:
                raise RuntimeError(f"no iperf3 receiver line\n{parts[i - 1][-2000:]}")
            found.append(float(m[-1]))
    if len(found) != 2:
        raise RuntimeError(f"expected 2 iperf3 results, got {found}\n{text[-3000:]}")
    res["net tx"], res["net rx"] = found
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--podvisor", default=os.path.join(ROOT, "target", "release", "podvisor"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="uncounted rounds first")
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--ramp", type=int, default=2, help="fio ramp seconds")
    ap.add_argument("--runtime", type=int, default=10, help="fio measured seconds")
    ap.add_argument("--net-secs", type=int, default=10, help="iperf3 -t")
    ap.add_argument("--ramdisk-mib", type=int, default=2560)
    ap.add_argument("--only", choices=["disk", "net"], help="run only these boots")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a boot counts as failed")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--state", help="append each finished boot here and skip the boots it already "
                    "holds (resume after a frozen test host; same arguments only)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("io_bench: must run as root")
    setup_ramdisk(args.ramdisk_mib)
    srv = None
    try:
        disks = make_disks()
        aio = qemu_aio(args.qemu, disks["raw"])
        srv = setup_net()
        qver = sh(args.qemu, "--version").stdout.splitlines()[0]
        print(f"io_bench: {qver}; QEMU aio={aio}; {args.cpus} vCPUs, {args.memory} MiB; "
              f"fio {args.ramp}+{args.runtime} s, iperf3 {args.net_secs} s", file=sys.stderr, flush=True)
        disk_cl, net_cl = cmdlines(args.ramp, args.runtime, args.net_secs)
        cfgs = [c for c in configs(args, disks, aio, disk_cl, net_cl)
                if args.only is None or c[1] == args.only]
        results = {}  # figure -> vmm -> [values]
        failures = {name: 0 for name, *_ in cfgs}
        raw_runs = []
        overlay = os.path.join(MNT, "overlay.qcow2")
        backing = os.path.join(GUEST, "root.qcow2")
        state = RunRecord("io_bench", args.state, {
            "configs": [name for name, *_ in cfgs], "runs": args.runs, "warmup": args.warmup,
            "memory": args.memory, "cpus": args.cpus, "ramp": args.ramp, "runtime": args.runtime,
            "net_secs": args.net_secs, "timeout": args.timeout, "qemu": qver})
        for rnd in range(args.warmup + args.runs):
            label = "warm-up" if rnd < args.warmup else f"run {rnd - args.warmup + 1}"
            for name, kind, fmt, mk in cfgs:
                vmm = name.split()[0]
                entry = state.done.get((rnd, name))
                resumed = entry is not None
                if not resumed:
                    if os.path.exists(overlay):
                        os.unlink(overlay)
                    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay)
                    try:
                        text, secs = run_vm(mk(overlay), args.timeout)
                        try:
                            result = parse_disk(text, fmt) if kind == "disk" else parse_net(text)
                        except RuntimeError as e:
                            raise RuntimeError(f"{e}\n(console: {keep_console(text)})") from e
                        entry = {"result": result, "secs": round(secs, 1)}
                    except RuntimeError as e:
                        entry = {"failed": str(e)}
                    state.record(rnd, name, entry)
                shown_label = label + (" (resumed)" if resumed else "")
                if "failed" in entry:
                    failures[name] += 1
                    print(f"[{shown_label}] {name}: FAILED: {entry['failed']}", file=sys.stderr, flush=True)
                    continue
                res = entry["result"]
                shown = ", ".join(f"{k} {v:.0f}" for k, v in res.items())
                print(f"[{shown_label}] {name} ({entry['secs']:.0f} s): {shown}", file=sys.stderr, flush=True)
                raw_runs.append({"round": label, "config": name, "results": res})
                if rnd >= args.warmup:
                    for k, v in res.items():
                        results.setdefault(k, {}).setdefault(vmm, []).append(v)
        if os.path.exists(overlay):
            os.unlink(overlay)
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        teardown_ramdisk()

    def med(fig, vmm):
        vals = results.get(fig, {}).get(vmm, [])
        return statistics.median(vals) if vals else float("nan")

    print(f"\nI/O benchmark: medians of the rounds each figure has ({args.runs} planned, after "
          f"{args.warmup} warm-up round(s); 'lost' = failed boots); {args.cpus} vCPUs, "
          f"{args.memory} MiB; {qver}, aio={aio}")
    print(f"{'figure':34} {'unit':>7} {'podvisor':>10} {'QEMU':>10} {'ratio':>7}  "
          "rounds/lost (podvisor | QEMU): values")
    for key, label, unit in FIGURES:
        if key not in results:
            continue
        p, q = med(key, "podvisor"), med(key, "qemu")
        kind = "net" if key.startswith("net") else key.split()[0]
        counts = " | ".join(f"{len(results[key].get(vmm, []))}/{failures.get(f'{vmm} {kind}', 0)}"
                            for vmm in ("podvisor", "qemu"))
        runs = " ".join(f"{v:.0f}" for v in results[key].get("podvisor", [])) + " | " + \
            " ".join(f"{v:.0f}" for v in results[key].get("qemu", []))
        print(f"{label:34} {unit:>7} {p:10.0f} {q:10.0f} {p / q:6.2f}x  {counts}: {runs}")
    print("failed boots: " + ", ".join(f"{n} {c}" for n, c in failures.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": failures, "runs": raw_runs, "qemu": qver,
                       "aio": aio}, f, indent=1)
    sys.exit(1 if any(n.startswith("podvisor") and c for n, c in failures.items()) else 0)


if __name__ == "__main__":
    main()
