#!/usr/bin/env python3
"""Boot benchmark: podvisor vs QEMU, same kernel + initramfs + command line, interleaved.

Run it where there is hardware KVM (resources/bench/boot.sh puts it in the test host).
For each VMM configuration: one warm-up, then N measured runs, interleaved in rounds (each
round runs every configuration once, in a fresh seeded random order) so that drift in the
(emulated) machine, and the run that came just before, hit every configuration alike. Reported per config:

  ready_ms   median wall time from process start to the guest's ready line
  exit_ms    median wall time from process start to process exit after the guest powers off
  uptime_ms  median guest uptime (/proc/uptime) when it printed the ready line
  peak_rss   median peak RSS of the VMM process (VmHWM, KiB -> MiB)
  overhead   median VMM memory overhead: RSS of every mapping except guest RAM, sampled at
             the ready line from /proc/PID/smaps (guest RAM = podvisor's memfd mapping /
             QEMU's RAM block mapping, found by size)

With --state FILE every finished run is appended to FILE as it ends, and a later call with the
same FILE and arguments skips the runs it already holds: the emulated test host sometimes
freezes, and boot.sh then starts a new one that carries on where the old one stopped. Each
run also records how the host's memory behaved (/proc/vmstat deltas: huge page faults,
fallbacks to small pages, compaction stalls).
"""
import argparse
import json
import random
import os
import re
import statistics
import subprocess
import sys
import time

from runrecord import RunRecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST = os.path.join(ROOT, "target", "guest")
READY = b"podvisor-guest ready:"
UPTIME = re.compile(rb"podvisor-guest uptime: ([0-9.]+)")


THP = "/sys/kernel/mm/transparent_hugepage"
SHMEM = f"{THP}/shmem_enabled"
# podvisor PVH again with the host's shmem huge pages switched off for the run: what
# transparent huge pages for memfd guest RAM are worth (run only where that knob is on and
# writable).
FOUR_K = "podvisor PVH 4K pages"


def thp_knob(name):
    """The selected value of a transparent huge page knob ("[advise]" -> "advise"), or None
    when the host has no such knob or it cannot be read."""
    try:
        with open(f"{THP}/{name}") as f:
            m = re.search(r"\[(\w+)\]", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def shmem_setting():
    return thp_knob("shmem_enabled")


def set_shmem(value):
    with open(SHMEM, "w") as f:
        f.write(value)


# /proc/vmstat counters recorded per run: huge pages the VMM's RAM got (anonymous for QEMU,
# shmem for podvisor's memfd), faults that fell back to 4 KiB pages, and direct compaction.
VMSTAT = ("thp_fault_alloc", "thp_fault_fallback", "thp_file_alloc", "thp_file_fallback",
          "compact_stall")


def vmstat():
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v in pairs if k in VMSTAT}
    except OSError:
        return {}


def configs(podvisor, qemu, mem_mib, cpus, cmdline):
    bz = os.path.join(GUEST, "bzImage")
    vmlinux = os.path.join(GUEST, "vmlinux")
    initrd = os.path.join(GUEST, "initramfs.cpio.gz")

    def pv(kernel):
        return [podvisor, "run", "--kernel", kernel, "--initramfs", initrd,
                "--cmdline", cmdline, "--cpus", str(cpus), "--memory", f"{mem_mib}M"]

    def qm(machine, kernel, extra=()):
        return [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-m", f"{mem_mib}M",
                "-smp", str(cpus), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
                "-append", cmdline, *extra]

    return {
        "podvisor bzImage": pv(bz),
        "podvisor PVH": pv(vmlinux),
        FOUR_K: pv(vmlinux),
        "qemu microvm bzImage": qm("microvm,rtc=on", bz),
        "qemu microvm PVH": qm("microvm,rtc=on", vmlinux),
        "qemu pc bzImage": qm("pc", bz),
    }


def guest_ram_kib(smaps_text, mem_mib):
    """Rss of mappings that back guest RAM (their size is the guest RAM size, or the pc
    machine's split below/above the PCI hole, which QEMU maps as one block)."""
    ram = 0
    total = 0
    size = None
    for line in smaps_text.splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            size = (hi - lo) // 1024
        elif parts and parts[0] == "Rss:":
            kib = int(parts[1])
            total += kib
            if size is not None and size >= mem_mib * 1024:
                ram += kib
    return total, ram


def run_once(cmd, mem_mib, timeout):
    before = vmstat()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = b""
    ready_ms = None
    overhead_kib = None
    os.set_blocking(proc.stdout.fileno(), False)
    peak = 0
    while True:
        chunk = None
        try:
            chunk = proc.stdout.read()
        except BlockingIOError:
            pass
        if chunk:
            out += chunk
            if ready_ms is None and READY in out:
                ready_ms = (time.monotonic() - start) * 1000
                try:
                    with open(f"/proc/{proc.pid}/smaps") as f:
                        total, ram = guest_ram_kib(f.read(), mem_mib)
                    overhead_kib = total - ram
                except OSError:
                    pass
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        if proc.poll() is not None:
            rest = proc.stdout.read() or b""
            out += rest
            break
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"timeout: {' '.join(cmd)}\n{out[-2000:].decode(errors='replace')}")
        time.sleep(0.002)
    exit_ms = (time.monotonic() - start) * 1000
    if ready_ms is None or proc.returncode != 0:
        raise RuntimeError(f"rc={proc.returncode} ready={ready_ms}: {' '.join(cmd)}\n"
                           f"{out[-3000:].decode(errors='replace')}")
    m = UPTIME.search(out)
    uptime_ms = float(m.group(1)) * 1000 if m else None
    after = vmstat()
    return {"ready_ms": ready_ms, "exit_ms": exit_ms, "uptime_ms": uptime_ms,
            "peak_rss_kib": peak, "overhead_kib": overhead_kib,
            "vmstat": {k: after[k] - before[k] for k in after if k in before}}


def thp_settings():
    """The host's transparent huge page knobs: QEMU's anonymous RAM follows `enabled`,
    podvisor's memfd RAM `shmem_enabled`."""
    return " ".join(f"{knob}={thp_knob(knob) or 'unavailable'}"
                    for knob in ("enabled", "shmem_enabled"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--podvisor", default=os.path.join(ROOT, "target", "release", "podvisor"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory", type=int, default=256, help="guest MiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--cmdline", default="console=ttyS0 podvisor.halt podvisor.uptime")
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds before a run counts as failed (hung guest)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--state", help="append each finished run here and skip the runs it "
                    "already holds (resume after a frozen test host; same arguments only)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the per-round run order")
    ap.add_argument("--only", help="comma-separated configurations to run (for quick checks; "
                    "the ratios need both sides), e.g. 'podvisor PVH,qemu microvm PVH'")
    args = ap.parse_args()

    cfgs = configs(args.podvisor, args.qemu, args.memory, args.cpus, args.cmdline)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        unknown = [w for w in wanted if w not in cfgs]
        if unknown:
            ap.error(f"unknown configuration(s) {unknown}; known: {list(cfgs)}")
        cfgs = {n: c for n, c in cfgs.items() if n in wanted}
    shmem = shmem_setting()
    if FOUR_K in cfgs and (shmem in (None, "never", "deny") or not os.access(SHMEM, os.W_OK)):
        print(f"skipping '{FOUR_K}': {SHMEM} is {shmem} or not writable", file=sys.stderr)
        del cfgs[FOUR_K]
    results = {name: [] for name in cfgs}
    failures = {name: 0 for name in cfgs}
    ready_by_round = {name: {} for name in cfgs}
    state = RunRecord("boot_bench", args.state, {"configs": cfgs, "runs": args.runs,
                                                 "memory": args.memory, "seed": args.seed,
                                                 "timeout": args.timeout})

    def account(rnd, name, entry, resumed):
        label = ("warm-up" if rnd == 0 else f"run {rnd}") + (" (resumed)" if resumed else "")
        if "failed" in entry:
            # A hung or failed boot is reported and counted, not averaged in.
            failures[name] += 1
            print(f"[{label}] {name}: FAILED: {entry['failed']}", file=sys.stderr, flush=True)
            return
        r = entry["result"]
        vm = r.get("vmstat") or {}
        print(f"[{label}] {name}: ready {r['ready_ms']:.0f} ms, exit {r['exit_ms']:.0f} ms, "
              f"uptime {r['uptime_ms'] or 0:.0f} ms, peak {r['peak_rss_kib'] / 1024:.1f} MiB, "
              f"overhead {(r['overhead_kib'] or 0) / 1024:.1f} MiB, "
              f"vmstat {' '.join(f'{k}+{v}' for k, v in vm.items() if v)}",
              file=sys.stderr, flush=True)
        if rnd > 0:
            results[name].append(r)
            ready_by_round[name][rnd] = r["ready_ms"]

    rng = random.Random(args.seed)
    for rnd in range(args.runs + 1):
        # A fresh order each round: in the emulated test host a boot's speed depends on what
        # ran just before it, so no configuration may always follow the same one.
        order = list(cfgs.items())
        rng.shuffle(order)
        for name, cmd in order:
            entry = state.done.get((rnd, name))
            if entry is not None:
                account(rnd, name, entry, True)
                continue
            try:
                if name == FOUR_K:
                    set_shmem("never")
                try:
                    entry = {"result": run_once(cmd, args.memory, args.timeout)}
                finally:
                    if name == FOUR_K:
                        set_shmem(shmem)
            except RuntimeError as e:
                entry = {"failed": str(e).splitlines()[0]}
            state.record(rnd, name, entry)
            account(rnd, name, entry, False)

    def med(name, key):
        vals = [r[key] for r in results.get(name, []) if r[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"\nBoot benchmark: {args.runs} runs each after one warm-up, {args.cpus} vCPU, "
          f"{args.memory} MiB, cmdline '{args.cmdline}'")
    print(f"Host huge pages: {thp_settings()}")
    print(f"{'configuration':24} {'ready ms':>9} {'exit ms':>9} {'uptime ms':>10} "
          f"{'peak RSS MiB':>13} {'overhead MiB':>13} {'failed':>7}")
    for name in cfgs:
        print(f"{name:24} {med(name, 'ready_ms'):9.0f} {med(name, 'exit_ms'):9.0f} "
              f"{med(name, 'uptime_ms'):10.0f} {med(name, 'peak_rss_kib') / 1024:13.1f} "
              f"{med(name, 'overhead_kib') / 1024:13.1f} {failures[name]:7d}")
    print("\nRatios podvisor / QEMU microvm (same kernel format), lower is better:")
    for fmt in ("bzImage", "PVH"):
        p, q = f"podvisor {fmt}", f"qemu microvm {fmt}"
        print(f"  {fmt:8} ready {med(p, 'ready_ms') / med(q, 'ready_ms'):.2f}x  "
              f"exit {med(p, 'exit_ms') / med(q, 'exit_ms'):.2f}x  "
              f"uptime {med(p, 'uptime_ms') / med(q, 'uptime_ms'):.2f}x  "
              f"overhead {med(p, 'overhead_kib') / med(q, 'overhead_kib'):.2f}x")
    if FOUR_K in cfgs:
        p, q = "podvisor PVH", FOUR_K
        print(f"  podvisor PVH on huge pages / on 4 KiB pages: ready "
              f"{med(p, 'ready_ms') / med(q, 'ready_ms'):.2f}x")
    p, q = "podvisor bzImage", "qemu pc bzImage"
    print(f"  vs pc    ready {med(p, 'ready_ms') / med(q, 'ready_ms'):.2f}x  "
          f"exit {med(p, 'exit_ms') / med(q, 'exit_ms'):.2f}x")
    # The same comparison round by round (both boots of a pair ran in the same round, so
    # they saw the same state of the test host): the spread says how far to trust the above.
    print("\nReady time, paired by round (median of the per-round ratios, their range, rounds "
          "where podvisor was faster):")
    for p, q in (("podvisor PVH", "qemu microvm PVH"), ("podvisor bzImage", "qemu microvm bzImage"),
                 ("podvisor bzImage", "qemu pc bzImage"), ("podvisor PVH", FOUR_K)):
        a, b = ready_by_round.get(p, {}), ready_by_round.get(q, {})
        ratios = [a[k] / b[k] for k in a if k in b]
        if ratios:
            print(f"  {p} / {q}: {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}), faster in "
                  f"{sum(x < 1 for x in ratios)}/{len(ratios)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": failures}, f, indent=1)
    # A podvisor boot that fails is a bug; a peer's is only reported.
    sys.exit(1 if any(n.startswith("podvisor") and failures[n] for n in cfgs) else 0)


if __name__ == "__main__":
    main()
