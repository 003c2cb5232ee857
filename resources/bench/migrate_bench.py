#!/usr/bin/env python3
"""Live-migration benchmark: podvisor -> podvisor vs QEMU -> QEMU on one host, same kernel,
initramfs, command line, memory and vCPUs, over a Unix socket, interleaved.

Run it where there is hardware KVM (resources/bench/migrate.sh puts it in the test host).
Each run boots a source VM, waits for the guest's ready line, starts a destination waiting
for it, migrates (downtime limit 300 ms, no bandwidth limit) and checks that the guest
answers at the destination. Reported per VMM, medians over the runs:

  total_ms      wall time of the migration command (podvisor: `ctl send-migration` until it
                answers; QEMU: `migrate` until query-migrate says completed)
  vmm_total_ms  the source VMM's own figure (podvisor: the migration-completed event's
                total_ms; QEMU: query-migrate's total-time)
  downtime_ms   how long the guest was stopped, as the source VMM reports it (podvisor: from
                the pause to the destination saying the guest runs; QEMU: query-migrate's
                downtime)
  guest_gap_ms  what the guest's user sees: a loop in the guest prints a line every 20 ms on
                the serial console, this script notes when each arrives (from the source VMM,
                then from the destination), and reports the longest silence from the start of
                the migration to the guest's first answer at the destination. The guest's
                own clock cannot tell (it stops while the guest is paused).

The workload is "idle" (the guest sits at its shell) or "dirty" (a shell loop rewrites 64 MiB
of its memory with /dev/urandom data all the while).

With --state FILE every finished run is appended to FILE, and a later call with the same FILE
and arguments skips the runs it already holds (resources/bench/resume.sh).
"""
import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from runrecord import RunRecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST = os.path.join(ROOT, "target", "guest")
READY = b"podvisor-guest ready:"
DIRTY = ("(while :; do dd if=/dev/urandom of=/tmp/blob bs=1M count=64 conv=notrunc; done)"
         " >/dev/null 2>&1 &")
TICKER = "(i=0; while :; do i=$((i+1)); echo tick$i; usleep 20000; done) &"


class Vmm:
    """A VMM process whose console (stdin/stdout) the benchmark reads and types into."""

    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env)
        self.out = b""
        # When each of the guest's TICKER lines arrived (time.monotonic()).
        self.ticks = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Reads the console as it comes, noting the arrival of each tick line."""
        line = b""
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            now = time.monotonic()
            self.out += chunk
            line += chunk
            *done, line = line.split(b"\n")
            self.ticks += [now for d in done if d.strip().startswith(b"tick")]

    def expect(self, pattern, timeout, after=0):
        deadline = time.monotonic() + timeout
        while pattern not in self.out[after:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} (rc={self.proc.poll()}):\n"
                                   f"{self.out[-2000:].decode(errors='replace')}")
            time.sleep(0.01)

    def type(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def answers(self, timeout=60, tries=3):
        """Types a probe and waits for its answer: the guest runs. A probe typed as the
        guest's shell (re)starts may lose its first characters (seen with QEMU's destination):
        it is typed again, up to `tries` times."""
        for attempt in range(tries):
            mark = len(self.out)
            self.type("echo alive-$((20+22))")
            try:
                self.expect(b"alive-42", timeout / tries, after=mark)
                return
            except RuntimeError:
                if attempt == tries - 1 or self.proc.poll() is not None:
                    raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_workload(vm, workload):
    """Starts the guest's ticker (and, for "dirty", its memory writer) and lets it settle."""
    vm.answers()
    vm.type(TICKER)
    if workload == "dirty":
        vm.type(DIRTY)
    time.sleep(5)
    if not vm.ticks:
        raise RuntimeError("the guest's ticker prints nothing (usleep missing?)")


def guest_gap_ms(src, dst, start, end):
    """The longest silence of the guest's ticker between `start` and `end` (monotonic s)."""
    ticks = sorted([start] + [t for t in src.ticks + dst.ticks if start <= t <= end] + [end])
    return max(b - a for a, b in zip(ticks, ticks[1:])) * 1000


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.02)


def write_vm_config(args, path):
    """The default guest as `vm.create` takes it, with the benchmark's vCPUs and memory."""
    config = {
        "payload": {"kernel": os.path.join(GUEST, "bzImage"),
                    "initramfs": os.path.join(GUEST, "initramfs.cpio.gz"),
                    "cmdline": args.cmdline},
        "cpus": {"boot_vcpus": args.cpus, "max_vcpus": args.cpus},
        "memory": {"size": args.memory << 20},
        "serial": {"mode": "Tty"}, "console": {"mode": "Off"},
    }
    with open(path, "w") as f:
        json.dump(config, f)


def run_podvisor(args, tmp, workload):
    pv = args.podvisor
    src_sock, dst_sock = f"{tmp}/src.sock", f"{tmp}/dst.sock"
    mig, events = f"{tmp}/mig.sock", f"{tmp}/events"
    write_vm_config(args, f"{tmp}/vm.json")
    ctl = lambda sock, *a: subprocess.run([pv, "ctl", "--api-socket", sock, *a], check=True,
                                          capture_output=True, timeout=900)
    # --logs: both sides say where the time goes (PODVISOR_LOG=info), kept in that folder.
    env = dict(os.environ, PODVISOR_LOG="info") if args.logs else None
    src = Vmm([pv, "serve", "--api-socket", src_sock, "--event-monitor", f"path={events}"], env)
    dst = Vmm([pv, "serve", "--api-socket", dst_sock], env)
    try:
        wait_for(src_sock)
        ctl(src_sock, "create", f"{tmp}/vm.json")
        ctl(src_sock, "boot")
        src.expect(READY, 300)
        start_workload(src, workload)
        wait_for(dst_sock)
        recv = subprocess.Popen([pv, "ctl", "--api-socket", dst_sock, "receive-migration",
                                 f"unix:{mig}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(mig)
        start = time.monotonic()
        ctl(src_sock, "send-migration", f"unix:{mig}", "--downtime-limit-ms", "300")
        total_ms = (time.monotonic() - start) * 1000
        if recv.wait(timeout=120) != 0:
            raise RuntimeError(f"receive-migration: {recv.stderr.read().decode()}")
        dst.answers()
        gap = guest_gap_ms(src, dst, start, time.monotonic())
        with open(events) as f:
            done = [json.loads(line) for line in f if "migration-completed" in line][-1]
        p = done["properties"]
        return {"total_ms": total_ms, "vmm_total_ms": p["total_ms"],
                "downtime_ms": p["downtime_ms"], "guest_gap_ms": gap, "rounds": p["round"]}
    finally:
        src.stop()
        dst.stop()
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for side, vmm in (("source", src), ("destination", dst)):
                with open(os.path.join(args.logs, f"{stamp}-{workload}-{side}.log"), "wb") as f:
                    f.write(vmm.out)


class Qmp:
    def __init__(self, path):
        wait_for(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.read()  # the greeting
        self.call("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, cmd, **arguments):
        self.sock.sendall(json.dumps({"execute": cmd, "arguments": arguments}).encode() + b"\n")
        while True:
            reply = self.read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error']}")


def run_qemu(args, tmp, workload):
    def cmd(qmp, extra=()):
        return [args.qemu, "-M", "pc", "-accel", "kvm", "-cpu", "host", "-m", f"{args.memory}M",
                "-smp", str(args.cpus), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-kernel", os.path.join(GUEST, "bzImage"),
                "-initrd", os.path.join(GUEST, "initramfs.cpio.gz"), "-append", args.cmdline,
                "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    mig = f"{tmp}/qmig.sock"
    src = Vmm(cmd(f"{tmp}/q1"))
    dst = Vmm(cmd(f"{tmp}/q2", ("-incoming", f"unix:{mig}")))
    try:
        src.expect(READY, 300)
        start_workload(src, workload)
        q = Qmp(f"{tmp}/q1")
        q.call("migrate-set-parameters", **{"downtime-limit": 300})
        wait_for(mig)
        start = time.monotonic()
        q.call("migrate", uri=f"unix:{mig}")
        while True:
            info = q.call("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        total_ms = (time.monotonic() - start) * 1000
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info}")
        dst.answers()
        gap = guest_gap_ms(src, dst, start, time.monotonic())
        return {"total_ms": total_ms, "vmm_total_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "guest_gap_ms": gap,
                "rounds": info.get("ram", {}).get("dirty-sync-count")}
    finally:
        src.stop()
        dst.stop()


def bench_args(description):
    """The arguments every VMM-against-VMM benchmark here takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--podvisor", default=os.path.join(ROOT, "target", "release", "podvisor"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--workload", choices=["idle", "dirty"], default="idle")
    ap.add_argument("--cmdline", default="console=ttyS0 quiet")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state", help="run record (JSON lines) to resume from and append to")
    ap.add_argument("--logs", help="run podvisor at PODVISOR_LOG=info and keep each run's "
                    "source and destination output in this folder")
    return ap.parse_args()


def interleaved(args, bench, runners):
    """Runs each of `runners` (name -> function of args, giving a run's entry) args.runs
    times, in an order shuffled per round, skipping the runs the record already holds;
    returns {name: [entries]}."""
    params = {k: v for k, v in vars(args).items() if k != "state"}
    record = RunRecord(bench, args.state, params)
    results = {name: [] for name in runners}
    rng = random.Random(args.seed)
    for rnd in range(args.runs):
        order = list(runners)
        rng.shuffle(order)
        for name in order:
            entry = record.done.get((rnd, name))
            if entry is None:
                entry = runners[name](args)
                record.record(rnd, name, entry)
            print(f"round {rnd + 1} {name}: {json.dumps(entry)}", flush=True)
            results[name].append(entry)
    return results


def in_scratch(run):
    """`run(args, tmp, workload)` with a scratch folder made and removed around it."""
    def runner(args):
        tmp = tempfile.mkdtemp(prefix="podvisor-migbench-")
        try:
            return run(args, tmp, args.workload)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return runner


def main():
    args = bench_args(__doc__.split("\n")[0])
    runners = {"podvisor": in_scratch(run_podvisor), "qemu pc": in_scratch(run_qemu)}
    results = interleaved(args, "migrate", runners)

    report(args, results, [("total_ms", "total ms"), ("vmm_total_ms", "vmm total ms"),
                           ("downtime_ms", "downtime ms"), ("guest_gap_ms", "guest gap ms"),
                           ("rounds", "rounds")],
           ratios=("total_ms", "downtime_ms", "guest_gap_ms"))


def report(args, results, columns, ratios):
    """Prints each VMM's medians of `columns` ((key, heading)...) and podvisor / QEMU for
    the keys in `ratios`."""
    def med(name, key):
        values = [e[key] for e in results[name] if e.get(key) is not None]
        return statistics.median(values) if values else None

    print(f"\n{args.workload} guest, {args.memory} MiB, {args.cpus} vCPU(s), "
          f"{args.runs} runs each (medians):")
    widths = [max(len(h), 7) + 1 for _, h in columns]
    print(f"{'':10} " + " ".join(f"{h:>{w}}" for (_, h), w in zip(columns, widths)))
    for name in results:
        row = [med(name, k) for k, _ in columns]
        print(f"{name:10} " + " ".join(f"{v:>{w}.0f}" if v is not None else f"{'-':>{w}}"
                                       for v, w in zip(row, widths)))
    for key in ratios:
        a, b = med("podvisor", key), med("qemu pc", key)
        if a is not None and b:
            print(f"{key}: podvisor / QEMU = {a / b:.2f}")


if __name__ == "__main__":
    sys.exit(main())
