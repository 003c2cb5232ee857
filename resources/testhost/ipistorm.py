#!/usr/bin/env python3
"""ipistorm.py [--pairs N] -- COMMAND...: runs COMMAND inside the test host while pairs of
processes, one pinned to each of two CPUs, hand a byte back and forth over pipes as fast as
they can.

Every hand-over wakes a task on the other CPU, which the test host's kernel does with an
inter-processor interrupt; while a nested guest runs on that CPU, each one makes the emulated
CPU leave the guest (#VMEXIT) and take the interrupt. The test host's deaths (see
docs/testhost-stability.md) begin with an interrupt taken at the wrong moment of such an exit,
so this storm makes them come sooner: a soak workload to compare candidate configurations in
fewer sessions. Exits with COMMAND's status.
"""
import argparse
import os
import signal
import subprocess
import sys


def ping_pong(cpu_a, cpu_b):
    """Forks the two ends of one pair; returns their pids."""
    a_to_b_r, a_to_b_w = os.pipe()
    b_to_a_r, b_to_a_w = os.pipe()
    pids = []
    for cpu, rx, tx, first in ((cpu_a, b_to_a_r, a_to_b_w, True), (cpu_b, a_to_b_r, b_to_a_w, False)):
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {cpu})
                if first:
                    os.write(tx, b"x")
                while True:
                    if not os.read(rx, 1):
                        break
                    os.write(tx, b"x")
            finally:
                os._exit(0)
        pids.append(pid)
    for fd in (a_to_b_r, a_to_b_w, b_to_a_r, b_to_a_w):
        os.close(fd)
    return pids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1, help="ping-pong pairs (default 1)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("ipistorm: no command to run")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("ipistorm: needs two CPUs")
    workers = []
    for i in range(args.pairs):
        a, b = cpus[i % len(cpus)], cpus[(i + 1) % len(cpus)]
        workers += ping_pong(a, b)
    print(f"ipistorm: {args.pairs} ping-pong pairs across CPUs {cpus[:2]}", file=sys.stderr, flush=True)
    try:
        rc = subprocess.call(command)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in workers:
            os.waitpid(pid, 0)
    sys.exit(rc)


if __name__ == "__main__":
    main()
