#!/usr/bin/env python3
"""Test-host soak: run long sessions of a workload in the test host, for each candidate
configuration in turn, and count how the test host fared.

resources/testhost/soak.sh builds what the workload needs and runs this; see it for usage.

Each session is one `resources/testhost/run.sh WORKLOAD` call with the candidate's
PODVISOR_TESTHOST_* variables. Its outcome is one of:
  ok         the workload finished and passed
  failed     the workload finished and failed (a guest boot failed: a VMM or guest problem,
             not the test host's; the failed boots are counted)
  lockup     the test host's kernel reported a soft or hard lockup (run.sh stops it: exit 125)
  died       the test host stopped otherwise (panic, oops, QEMU exit: exit 125)
  frozen     nothing was printed for --stall seconds (the session is stopped)
Sessions are interleaved (candidate A, B, C, A, B, C, ...) so that a slow or busy hour of the
machine hits every candidate alike. Every finished session is appended to the run record (one
JSON object per line); a second call with the same record carries on where it stopped.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_SH = os.path.join(ROOT, "resources", "testhost", "run.sh")
OUTCOMES = ["ok", "failed", "lockup", "died", "frozen"]
CANDIDATE_VAR = re.compile(r"^PODVISOR_TESTHOST_[A-Z_]+$")

# The workloads: what one session runs inside the test host.
WORKLOADS = {
    # The I/O benchmark's six boots (raw and qcow2 disks with fio, a tap with iperf3), podvisor
    # and QEMU side by side, shortened: where the 7.2 test host locked up.
    "io": ["python3", "resources/bench/io_bench.py", "--runs", "1", "--ramp", "1", "--runtime", "6",
           "--net-secs", "6", "--timeout", "300"],
    # The disk half of "io" inside a storm of inter-processor interrupts (ipistorm.py): the
    # test host's deaths start with an interrupt taken as a nested guest exits; more of those
    # interrupts, sooner deaths, fewer sessions to tell candidates apart.
    "storm": ["python3", "resources/testhost/ipistorm.py", "--",
              "python3", "resources/bench/io_bench.py", "--only", "disk", "--runs", "1", "--ramp", "1",
              "--runtime", "6", "--timeout", "400"],
}


def parse_candidate(text):
    """NAME:VAR=VALUE[,VAR=VALUE...] -> (name, {var: value}).

    A value may hold commas (ACCEL=tcg,thread=single): a new item starts only at ",VAR=" with
    VAR in capitals."""
    name, _, rest = text.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"candidate name '{name}' must be letters, digits, '.', '_' or '-'")
    env = {}
    for item in filter(None, re.split(r",(?=[A-Z][A-Z0-9_]*=)", rest)):
        var, eq, value = item.partition("=")
        var = var if var.startswith("PODVISOR_TESTHOST_") else "PODVISOR_TESTHOST_" + var
        if not eq or not CANDIDATE_VAR.match(var):
            raise ValueError(f"candidate {name}: '{item}' is not VAR=VALUE (QEMU=, VIRTIOFSD=, CPUS=, ...)")
        env[var] = value
    return name, env


def load_record(path):
    done = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    done.append(json.loads(line))
    return done


def qemu_version(env):
    qemu = env.get("PODVISOR_TESTHOST_QEMU", "qemu-system-x86_64")
    try:
        out = subprocess.run([qemu, "--version"], stdout=subprocess.PIPE, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"QEMU emulator version (\S+)", out)
    return m.group(1) if m else "?"


def run_session(cmd, env, stall, log_path):
    """Run one session; return (outcome, seconds, rc, tail of its output)."""
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        frozen = False
        while proc.poll() is None:
            time.sleep(2)
            if time.time() - os.stat(log_path).st_mtime > stall:
                frozen = True
                # run.sh's trap stops QEMU and virtiofsd on TERM.
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
    secs = time.monotonic() - start
    with open(log_path, "rb") as f:
        text = f.read().decode(errors="replace")
    rc = proc.returncode
    if frozen:
        outcome = "frozen"
    elif rc == 0:
        outcome = "ok"
    elif rc == 125 and re.search(r"soft lockup|hard LOCKUP|locked up", text):
        outcome = "lockup"
    elif rc == 125:
        outcome = "died"
    else:
        outcome = "failed"
    return outcome, secs, rc, text


def failed_boots(text):
    """io_bench's 'failed boots: podvisor raw 0, qemu raw 1, ...' -> total failed boots."""
    m = re.search(r"^failed boots: (.*)$", text, re.M)
    if not m:
        return None
    return sum(int(n) for n in re.findall(r" (\d+)(?:,|$)", m.group(1)))


BOOT_LINE = re.compile(r"^\[run \d+\] (podvisor|qemu) (\w+) \(\d+ s\): (.*)$", re.M)


def io_figures(logs, record):
    """The io workload's figures from the logs of the sessions that passed, paired by session:
    per figure the median podvisor/QEMU ratio (both ran in the same test host) and the count."""
    ratios = {}
    for r in record:
        if r["workload"] != "io" or r["outcome"] not in ("ok", "failed"):
            continue
        try:
            with open(os.path.join(logs, f"{r['candidate']}-{r['session']}.log"), errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        vals = {}
        for vmm, _, figs in BOOT_LINE.findall(text):
            for item in figs.split(", "):
                key, _, v = item.rpartition(" ")
                vals[(vmm, key)] = float(v)
        for (vmm, key), v in vals.items():
            q = vals.get(("qemu", key))
            if vmm == "podvisor" and q:
                ratios.setdefault(key, []).append(v / q)
    lines = []
    for key, rs in ratios.items():
        rs.sort()
        lines.append(f"  {key:16} {rs[len(rs) // 2]:.2f}x (range {rs[0]:.2f}-{rs[-1]:.2f}, {len(rs)} sessions)")
    return "\n".join(lines)


def summary(record, names):
    rows = []
    for name in names:
        runs = [r for r in record if r["candidate"] == name]
        if not runs:
            continue
        counts = {o: sum(r["outcome"] == o for r in runs) for o in OUTCOMES}
        boots = sum(r.get("failed_boots") or 0 for r in runs)
        secs = sorted(r["secs"] for r in runs if r["outcome"] in ("ok", "failed"))
        med = f"{secs[len(secs) // 2]:.0f}" if secs else "-"
        env = " ".join(f"{k.removeprefix('PODVISOR_TESTHOST_')}={v}" for k, v in runs[0]["env"].items())
        rows.append(f"| {name} | QEMU {runs[0]['qemu']} | {env or '(defaults)'} | {len(runs)} | "
                    + " | ".join(str(counts[o]) for o in OUTCOMES) + f" | {boots} | {med} |")
    head = ("| candidate | emulator | settings | sessions | " + " | ".join(OUTCOMES)
            + " | failed boots | median s |\n|" + "---|" * (6 + len(OUTCOMES)))
    return head + "\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", nargs="+", metavar="NAME:VAR=VALUE,...",
                    help="e.g. qemu10:QEMU=/usr/bin/qemu-system-x86_64,CPUS=2")
    ap.add_argument("--sessions", type=int, default=10, help="sessions per candidate")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="io")
    ap.add_argument("--stall", type=int, default=420, help="seconds without output = frozen")
    ap.add_argument("--record", required=True, help="run record (JSON lines), resumed if it exists")
    ap.add_argument("--report", action="store_true", help="only print the tables of the record")
    args = ap.parse_args()
    try:
        cands = [parse_candidate(c) for c in args.candidates]
    except ValueError as e:
        sys.exit(f"soak: {e}")
    if len({n for n, _ in cands}) != len(cands):
        sys.exit("soak: two candidates have the same name")
    if args.sessions < 1 or args.stall < 30:
        sys.exit("soak: --sessions must be >= 1 and --stall >= 30")

    record = load_record(args.record)
    logs = os.path.splitext(args.record)[0] + ".logs"
    if not args.report:
        os.makedirs(logs, exist_ok=True)
    done = {(r["candidate"], r["session"]) for r in record}
    versions = {name: qemu_version(cenv) for name, cenv in cands} if not args.report else {}
    for i in range(1, 0 if args.report else args.sessions + 1):
        for name, cenv in cands:
            if (name, i) in done:
                continue
            env = dict(os.environ)
            env.update(cenv)
            log_path = os.path.join(logs, f"{name}-{i}.log")
            cmd = [RUN_SH, *WORKLOADS[args.workload]]
            print(f"soak: {name} session {i}/{args.sessions} ...", file=sys.stderr, flush=True)
            outcome, secs, rc, text = run_session(cmd, env, args.stall, log_path)
            entry = {"candidate": name, "session": i, "env": cenv, "qemu": versions[name],
                     "workload": args.workload, "outcome": outcome, "rc": rc, "secs": round(secs, 1),
                     "failed_boots": failed_boots(text), "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "load": os.getloadavg()[0]}
            if outcome not in ("ok",):
                entry["tail"] = text[-1500:]
            record.append(entry)
            with open(args.record, "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"soak: {name} session {i}: {outcome} in {secs:.0f} s (rc {rc}, log {log_path})",
                  file=sys.stderr, flush=True)
    print(summary(record, [n for n, _ in cands]))
    figures = io_figures(logs, [r for r in record if r["candidate"] in dict(cands)])
    if figures:
        print("\nI/O figures, podvisor / QEMU in the same session (median of per-session ratios; "
              "higher is better):\n" + figures)


if __name__ == "__main__":
    main()
