#!/usr/bin/env python3
"""Pod-network benchmark: iperf3 between a fake node and the default guest, through a plain
tap and through the launcher's bridge and masquerade bindings, podvisor and QEMU on the same
paths, interleaved.

Run it as root where there is hardware KVM (resources/bench/podnet.sh puts it in the test
host). Every boot gets two fresh network namespaces, as a CNI leaves a pod on a node:
  * pvb-node: `node0` at 10.244.1.1/24 and `iperf3 -s` (the far end of every path);
  * pvb-pod: `eth0` (a veth to node0) at 10.244.1.7/24, default route via the node;
both MTU 1500. The namespaces go at the end of each boot, with whatever a VMM left in them.

Paths (the guest runs `iperf3 -c 10.244.1.1 -t N` then the same with -R; figure: receiver):
  * tap: a tap `pvtap0` in the node namespace at 10.77.0.1/24, the guest at 10.77.0.2
    (the io benchmark's path: no bridge, no veth, no NAT). podvisor: `podvisor run --net
    tap=pvtap0,...`; QEMU: `-netdev tap,ifname=pvtap0`. iperf3 then targets 10.77.0.1.
  * bridge: podvisor: `podvisor launcher` in the pod namespace with a VMI whose interface has
    the bridge binding: it builds bridge k6t-eth0 with eth0 and its tap on it, moves the
    pod's address to the guest and serves it by DHCP (the guest's init: podvisor.dhcp).
    QEMU: the same topology built here with `ip` (k6t-eth0, eth0 and tap0 on it, eth0's
    address removed), QEMU on tap0, the guest given 10.244.1.7/24 and the route by its
    command line.
  * masquerade: podvisor: the launcher with the masquerade binding (its tap at 10.0.2.1/24,
    no bridge, guest 10.0.2.2 by DHCP, nftables DNAT/masquerade written by the launcher, ip_forward on).
    QEMU: the same built here (`ip`, `nft -f`, sysctl), the guest at 10.0.2.2 by its
    command line.

Each boot: the default guest (bzImage + initramfs, `root=/dev/vda`: a fresh qcow2 overlay over
target/guest/root.qcow2; the launcher makes that overlay itself from a containerDisk), --cpus
vCPUs, --memory MiB, the same MAC everywhere. Rounds: --runs rounds of every configuration in
turn, after --warmup uncounted ones (default 1: the test host's first boots run slower).
Reported: medians, each binding relative to the same VMM's plain tap, and podvisor
relative to QEMU on each path.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from io_bench import keep_console, parse_net, run_vm
from runrecord import RunRecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST = os.path.join(ROOT, "target", "guest")
NODE, POD = "pvb-node", "pvb-pod"
NODE_IP, POD_IP = "10.244.1.1", "10.244.1.7"
TAP_HOST, TAP_GUEST = "10.77.0.1", "10.77.0.2"
MAC = "52:54:00:77:00:02"
PATHS = ("tap", "bridge", "masquerade")
VMMS = ("podvisor", "qemu")
NFT_MASQUERADE = """
table ip pvbench_nat {
    chain prerouting {
        type nat hook prerouting priority -100;
        iifname "eth0" dnat to 10.0.2.2
    }
    chain postrouting {
        type nat hook postrouting priority 100;
        ip saddr 10.0.2.2 masquerade
    }
}
"""


def sh(*cmd, check=True, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stdout.strip()}")
    return r


def in_ns(ns, *cmd, check=True):
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def pod_on_a_node():
    """The two namespaces of a fresh boot and the node's iperf3 server (returned)."""
    remove_namespaces()
    sh("ip", "netns", "add", NODE)
    sh("ip", "netns", "add", POD)
    in_ns(POD, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "node0",
          "netns", NODE)
    for ns in (POD, NODE):
        in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(POD, "ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0")
    in_ns(POD, "ip", "link", "set", "eth0", "up")
    in_ns(POD, "ip", "route", "add", "default", "via", NODE_IP)
    in_ns(NODE, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0")
    in_ns(NODE, "ip", "link", "set", "node0", "up")
    server = subprocess.Popen(["ip", "netns", "exec", NODE, "iperf3", "-s"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(1)
    if server.poll() is not None:
        raise RuntimeError("iperf3 -s did not start in the node namespace")
    return server


def remove_namespaces():
    for ns in (POD, NODE):
        sh("ip", "netns", "del", ns, check=False)


def node_tap():
    """The plain tap path: a tap in the node namespace; returns its namespace and name."""
    in_ns(NODE, "ip", "tuntap", "add", "dev", "pvtap0", "mode", "tap")
    in_ns(NODE, "ip", "addr", "add", f"{TAP_HOST}/24", "dev", "pvtap0")
    in_ns(NODE, "ip", "link", "set", "pvtap0", "up")
    return NODE, "pvtap0"


def qemu_path(path):
    """Builds, for QEMU, what the launcher builds for podvisor on `path`; returns the tap's
    namespace and name."""
    if path == "tap":
        return node_tap()
    in_ns(POD, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
    if path == "bridge":
        in_ns(POD, "ip", "link", "add", "k6t-eth0", "type", "bridge")
        in_ns(POD, "ip", "link", "set", "tap0", "master", "k6t-eth0")
        in_ns(POD, "ip", "addr", "flush", "dev", "eth0")
        in_ns(POD, "ip", "link", "set", "eth0", "master", "k6t-eth0")
        in_ns(POD, "ip", "link", "set", "k6t-eth0", "up")
    else:
        in_ns(POD, "ip", "addr", "add", "10.0.2.1/24", "dev", "tap0")
        in_ns(POD, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", POD, "nft", "-f", "-", input=NFT_MASQUERADE)
    in_ns(POD, "ip", "link", "set", "tap0", "up")
    return POD, "tap0"


def guest_commands(path, vmm, net_secs):
    """podvisor.exec words: the address (unless DHCP gives it), then both iperf3 runs."""
    target = TAP_HOST if path == "tap" else NODE_IP
    words = []
    if path == "tap" or vmm == "qemu":
        address, gateway = {"tap": (TAP_GUEST, None), "bridge": (POD_IP, NODE_IP),
                            "masquerade": ("10.0.2.2", "10.0.2.1")}[path]
        words += [f"podvisor.exec=ip,addr,add,{address}/24,dev,eth0",
                  "podvisor.exec=ip,link,set,eth0,up"]
        if gateway:
            words.append(f"podvisor.exec=ip,route,add,default,via,{gateway}")
        words.append("podvisor.exec=sleep,1")
    words += [f"podvisor.exec=iperf3,-c,{target},-t,{net_secs},-f,m",
              f"podvisor.exec=iperf3,-c,{target},-t,{net_secs},-f,m,-R"]
    return words


def launcher_pod(work, path, args, words):
    """A pod root with kernelBoot files and a containerDisk, and its VMI; returns the VMI path."""
    pod = os.path.join(work, "pod")
    shutil.rmtree(pod, ignore_errors=True)
    boot = os.path.join(pod, "var/run/kubevirt/container-disks/kernel-boot/boot")
    os.makedirs(boot)
    shutil.copy(os.path.join(GUEST, "bzImage"), os.path.join(boot, "vmlinuz"))
    shutil.copy(os.path.join(GUEST, "initramfs.cpio.gz"), os.path.join(boot, "initrd.img"))
    shutil.copy(os.path.join(GUEST, "root.qcow2"),
                os.path.join(pod, "var/run/kubevirt/container-disks/disk_0.img"))
    for d in ("var/run/kubevirt-ephemeral-disks", "var/run/kubevirt-private",
              "var/run/kubevirt-infra", "etc"):
        os.makedirs(os.path.join(pod, d), exist_ok=True)
    with open(os.path.join(pod, "etc/resolv.conf"), "w") as f:
        f.write("nameserver 10.96.0.10\n")
    binding = "bridge: {}" if path == "bridge" else "masquerade: {}"
    args_line = " ".join(["quiet", "root=/dev/vda", "podvisor.dhcp", *words, "podvisor.halt"])
    vmi = f"""apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {{name: netbench, namespace: bench}}
spec:
  domain:
    cpu: {{cores: {args.cpus}}}
    memory: {{guest: {args.memory}Mi}}
    firmware:
      kernelBoot:
        kernelArgs: "{args_line}"
        container: {{image: kernels:1, kernelPath: /boot/vmlinuz, initrdPath: /boot/initrd.img}}
    devices:
      disks: [{{name: root, disk: {{bus: virtio}}}}]
      interfaces: [{{name: default, {binding}, macAddress: "{MAC}"}}]
  networks: [{{name: default, pod: {{}}}}]
  volumes: [{{name: root, containerDisk: {{image: images:1}}}}]
"""
    path = os.path.join(work, "vmi.yaml")
    with open(path, "w") as f:
        f.write(vmi)
    return pod, path


def command(vmm, path, args, work):
    """The command line of one boot (made ready: overlay, pod root, QEMU's network)."""
    bz = os.path.join(GUEST, "bzImage")
    initrd = os.path.join(GUEST, "initramfs.cpio.gz")
    words = guest_commands(path, vmm, args.net_secs)
    if vmm == "podvisor" and path != "tap":
        pod, vmi = launcher_pod(work, path, args, words)
        return ["ip", "netns", "exec", POD, args.podvisor, "launcher", "--vmi", vmi,
                "--pod-root", pod, "--api-socket", os.path.join(work, "api.sock"),
                "--console-stdio"]
    overlay = os.path.join(work, "overlay.qcow2")
    if os.path.exists(overlay):
        os.unlink(overlay)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
       os.path.join(GUEST, "root.qcow2"), overlay)
    cmdline = " ".join(["console=ttyS0 quiet root=/dev/vda", *words, "podvisor.halt"])
    if vmm == "podvisor":
        ns, tap = node_tap()
        return ["ip", "netns", "exec", ns, args.podvisor, "run", "--kernel", bz,
                "--initramfs", initrd, "--cmdline", cmdline, "--cpus", str(args.cpus),
                "--memory", f"{args.memory}M", "--disk",
                f"path={overlay},format=qcow2,backing_files=on",
                "--net", f"tap={tap},ip={TAP_HOST},mask=255.255.255.0,mac={MAC}"]
    ns, tap = qemu_path(path)
    return ["ip", "netns", "exec", ns, args.qemu, "-M", "q35", "-accel", "kvm", "-cpu", "host",
            "-m", f"{args.memory}M", "-smp", str(args.cpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", bz, "-initrd",
            initrd, "-append", cmdline, "-drive", f"file={overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", f"tap,id=n,ifname={tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n,mac={MAC}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--podvisor", default=os.path.join(ROOT, "target", "release", "podvisor"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--net-secs", type=int, default=10, help="iperf3 -t")
    ap.add_argument("--only", choices=PATHS, action="append", help="only these paths")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds before a boot counts as failed")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--state", help="append each finished boot here and skip the boots it "
                    "already holds (resume after a frozen test host; same arguments only)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("podnet_bench: must run as root")
    paths = [p for p in PATHS if not args.only or p in args.only]
    configs = [(vmm, path) for path in paths for vmm in VMMS]
    qver = sh(args.qemu, "--version").stdout.splitlines()[0]
    state = RunRecord("podnet_bench", args.state, {
        "configs": [f"{v} {p}" for v, p in configs], "runs": args.runs, "warmup": args.warmup,
        "memory": args.memory,
        "cpus": args.cpus, "net_secs": args.net_secs, "timeout": args.timeout, "qemu": qver})
    print(f"podnet_bench: {qver}; {args.cpus} vCPUs, {args.memory} MiB; iperf3 "
          f"{args.net_secs} s each way", file=sys.stderr, flush=True)
    results = {}  # (vmm, path) -> figure -> [values]
    failures = {c: 0 for c in configs}
    raw_runs = []
    work = tempfile.mkdtemp(prefix="podvisor-netbench-", dir="/run")
    try:
        for rnd in range(args.warmup + args.runs):
            label = "warm-up" if rnd < args.warmup else f"run {rnd - args.warmup + 1}"
            for vmm, path in configs:
                name = f"{vmm} {path}"
                entry = state.done.get((rnd, name))
                resumed = entry is not None
                if not resumed:
                    server = None
                    try:
                        server = pod_on_a_node()
                        text, secs = run_vm(command(vmm, path, args, work), args.timeout)
                        try:
                            result = parse_net(text)
                        except RuntimeError as e:
                            raise RuntimeError(f"{e}\n(console: {keep_console(text)})") from e
                        entry = {"result": result, "secs": round(secs, 1)}
                    except RuntimeError as e:
                        entry = {"failed": str(e)}
                    finally:
                        if server is not None:
                            server.kill()
                            server.wait()
                        remove_namespaces()
                    state.record(rnd, name, entry)
                shown = f"[{label}{' (resumed)' if resumed else ''}] {name}"
                if "failed" in entry:
                    failures[(vmm, path)] += 1
                    print(f"{shown}: FAILED: {entry['failed']}", file=sys.stderr, flush=True)
                    continue
                res = entry["result"]
                print(f"{shown} ({entry['secs']:.0f} s): tx {res['net tx']:.0f}, "
                      f"rx {res['net rx']:.0f} Mbit/s", file=sys.stderr, flush=True)
                raw_runs.append({"round": label, "config": name, "results": res})
                if rnd < args.warmup:
                    continue
                for k, v in res.items():
                    results.setdefault((vmm, path), {}).setdefault(k, []).append(v)
    finally:
        remove_namespaces()
        shutil.rmtree(work, ignore_errors=True)

    def med(vmm, path, fig):
        vals = results.get((vmm, path), {}).get(fig, [])
        return statistics.median(vals) if vals else float("nan")

    print(f"\nPod-network benchmark: iperf3 medians, Mbit/s ({args.runs} rounds planned after "
          f"{args.warmup} warm-up round(s); "
          f"'lost' = failed boots); {args.cpus} vCPUs, {args.memory} MiB; {qver}")
    print(f"{'path':11} {'direction':24} {'podvisor':>9} {'vs tap':>7} {'QEMU':>9} {'vs tap':>7} "
          f"{'pv/QEMU':>8}  rounds/lost (podvisor | QEMU)")
    for path in paths:
        for fig, label in (("net tx", "guest->node"), ("net rx", "node->guest (-R)")):
            p, q = med("podvisor", path, fig), med("qemu", path, fig)
            pt, qt = med("podvisor", "tap", fig), med("qemu", "tap", fig)
            counts = " | ".join(f"{len(results.get((v, path), {}).get(fig, []))}/"
                                f"{failures[(v, path)]}" for v in VMMS)
            print(f"{path:11} {label:24} {p:9.0f} {p / pt:6.2f}x {q:9.0f} {q / qt:6.2f}x "
                  f"{p / q:7.2f}x  {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": raw_runs, "failures": {f"{v} {p}": n for (v, p), n in
                                                      failures.items()}, "qemu": qver}, f,
                      indent=1)
    sys.exit(1 if any(v == "podvisor" and n for (v, _), n in failures.items()) else 0)


if __name__ == "__main__":
    main()
