//! The launcher's pod network: a fake pod (a network namespace whose `eth0` is a veth) on a
//! fake node (another namespace at the veth's other end, the pod's gateway), as a CNI leaves
//! them. All traffic stays inside the two namespaces this test makes in the test host.

use libtest_mimic::{Failed, Trial};

use crate::harness::*;
use crate::launcher::{pod_with_kernel_boot, walk};

const POD_IP: &str = "10.244.1.7";
const NODE_IP: &str = "10.244.1.1";
/// A Multus network's: the pod's second interface (`net1`) and its peer on the node.
const STORAGE_IP: &str = "192.168.50.7";
const STORAGE_PEER: &str = "192.168.50.1";

/// What of the pod's network the launcher may change: its links (with their bridge), the
/// pod interface's addresses and the routes.
fn pod_network(pod: &NetNs) -> Result<String, Failed> {
    let links = pod.ip("-o link show")?;
    let mut names: Vec<String> = links
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?.to_owned();
            let master = l
                .split_whitespace()
                .skip_while(|w| *w != "master")
                .nth(1)
                .map(|m| format!(" master {m}"))
                .unwrap_or_default();
            Some(format!("{name}{master}"))
        })
        .collect();
    names.sort();
    let mut addresses = Vec::new();
    for link in ["eth0", "net1"] {
        let shown = pod.ip(&format!("-o -4 addr show dev {link}"))?;
        let words: Vec<&str> = shown.split_whitespace().collect();
        let on: Vec<&str> = words
            .windows(2)
            .filter(|w| w[0] == "inet")
            .map(|w| w[1])
            .collect();
        addresses.push(format!("{link} {on:?}"));
    }
    Ok(format!(
        "links {names:?}; {}; routes {}",
        addresses.join("; "),
        pod.ip("-4 route show")?.trim()
    ))
}

/// A VMI whose interfaces have the bridge binding, on the pod network and on a Multus network
/// (the pod's `net1`): the guest (DHCP client in its init) gets the pod's address, prefix,
/// gateway, MTU and name server from the launcher's DHCP server on `eth0` and the second
/// network's address on `eth1`, reaches the node on both, and the node reaches a port in the
/// guest at the pod's address. The launcher is then killed (`kill -9`): the pod keeps the bridge. A second
/// launcher in the same pod (the container restarted) puts the pod interface back, wires it
/// again, and its guest gets the same lease; after SIGTERM the pod's network is as the CNI
/// left it and the launcher's record of it is gone. Then the masquerade binding with one port:
/// the guest gets 10.0.2.2 behind the pod's address, the node reaches that port (not another)
/// at the pod's address, the guest reaches the node; afterwards the pod is as found.
fn the_guest_takes_the_pods_address_by_dhcp() -> Result<(), Failed> {
    let id = std::process::id() % 100_000;
    let pod = NetNs::new(format!("pvpod{id}"))?;
    let node = NetNs::new(format!("pvnode{id}"))?;
    pod.ip(&format!(
        "link add eth0 type veth peer name node0 netns {}",
        node.0
    ))?;
    pod.ip("link set lo up")?;
    pod.ip("link set eth0 mtu 1400 up")?;
    pod.ip(&format!("addr add {POD_IP}/24 dev eth0"))?;
    pod.ip(&format!("route add default via {NODE_IP}"))?;
    node.ip(&format!("addr add {NODE_IP}/24 dev node0"))?;
    node.ip("link set node0 mtu 1400 up")?;
    pod.ip(&format!(
        "link add net1 type veth peer name store0 netns {}",
        node.0
    ))?;
    pod.ip("link set net1 up")?;
    pod.ip(&format!("addr add {STORAGE_IP}/24 dev net1"))?;
    node.ip(&format!("addr add {STORAGE_PEER}/24 dev store0"))?;
    node.ip("link set store0 up")?;
    let cni_left = pod_network(&pod)?;

    let dir = Scratch::new("podnet");
    let root = pod_with_kernel_boot(&dir)?;
    std::fs::create_dir_all(root.join("etc"))?;
    // The pod's own folders (emptyDir volumes in a virt-launcher pod): a killed launcher
    // cannot remove what it makes, so these are there from the start, as in a pod.
    for dir in ["var/run/kubevirt-private", "var/run/kubevirt-infra"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::write(
        root.join("etc/resolv.conf"),
        "search pods.svc.cluster.local\nnameserver 10.96.0.10\n",
    )?;
    let files_before = walk(&root);
    let vmi_file = dir.path("vmi.yaml");
    std::fs::write(
        &vmi_file,
        r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: e2e-net, namespace: pods}
spec:
  terminationGracePeriodSeconds: 60
  domain:
    memory: {guest: 192Mi}
    firmware:
      kernelBoot:
        kernelArgs: quiet podvisor.dhcp
        container: {image: kernels:1, kernelPath: /boot/vmlinuz, initrdPath: /boot/initrd.img}
    devices:
      interfaces: [{name: default, bridge: {}}, {name: storage, bridge: {}}]
  networks:
  - {name: default, pod: {}}
  - {name: storage, multus: {networkName: storage-net}}
"#,
    )?;
    let socket = dir.arg("api.sock");
    let launcher_of = |vmi: &std::path::Path| {
        Vm::spawn_in_netns(
            &pod.0,
            "launcher",
            &[
                "--vmi",
                vmi.to_str().unwrap(),
                "--pod-root",
                root.to_str().unwrap(),
                "--api-socket",
                &socket,
                "--console-stdio",
            ],
        )
    };
    let launcher = || launcher_of(&vmi_file);
    let lease = format!(
        "podvisor-guest dhcp: eth0 ip={POD_IP}/24 router={NODE_IP} mtu=1400 dns=10.96.0.10 \
         hostname=e2e-net"
    );
    let storage_lease = format!("podvisor-guest dhcp: eth1 ip={STORAGE_IP}/24 router= mtu=1500");

    let mut vm = launcher();
    vm.expect("podvisor-guest ready:")?;
    vm.expect(&lease)?;
    vm.expect(&storage_lease)?;
    vm.wait_for_shell()?;
    let wired = pod_network(&pod)?;
    vm.check_holds(
        "the pod while wired",
        &wired,
        &[
            "k6t-eth0",
            "tap0 master k6t-eth0",
            "eth0 master k6t-eth0",
            "eth0 []",
            "tap1 master k6t-net1",
            "net1 master k6t-net1",
            "net1 []",
        ],
    )?;
    // The thread that holds the wiring keeps CAP_NET_ADMIN alone, the DHCP servers (which
    // read the guest's datagrams) nothing.
    for (thread, wanted) in [("podnet", "0000000000001000"), ("dhcp", "0000000000000000")] {
        let caps = thread_caps(vm.pid(), thread)?;
        if caps.is_empty() || caps.iter().any(|c| c != wanted) {
            return Err(vm.failure(&format!("{thread} threads' CapEff: {caps:?}")));
        }
    }
    // The guest reaches its gateway (the node), and the storage network's peer ...
    vm.shell_ok(&format!(
        "ping -c 1 -W 5 {NODE_IP} && ping -c 1 -W 5 {STORAGE_PEER}"
    ))?;
    // ... and the node reaches the guest at the pod's address.
    vm.shell_ok("(echo from-the-guest | nc -l -p 8080 >/dev/null 2>&1 &)")?;
    let reply = node_reads(&node, "8080", "from-the-guest")?;
    if !reply.contains("from-the-guest") {
        return Err(vm.failure(&format!("the node could not reach {POD_IP}:8080: {reply}")));
    }
    // A launcher killed: nothing is undone.
    vm.kill()?;
    let _ = vm.wait();
    if pod_network(&pod)? == cni_left {
        return Err("the killed launcher's bridge is gone: nothing to recover from".into());
    }

    // The container restarted: the next launcher puts the pod back, then wires it again.
    let mut vm = launcher();
    vm.expect(&lease)?;
    vm.wait_for_shell()?;
    vm.shell_ok(&format!("ping -c 1 -W 5 {NODE_IP}"))?;
    stop_leaving_the_pod_as(vm, &pod, &cni_left)?;
    let files_after = walk(&root);
    if files_after != files_before {
        return Err(format!("the pod's files were {files_before:?}, are {files_after:?}").into());
    }

    // Masquerade, port 8080 only: the guest is 10.0.2.2 behind the pod's address; the node
    // reaches its port 8080 at the pod's address and not its port 9090; the guest reaches the
    // node as the pod. Afterwards the pod is as the CNI left it, forwarding off again.
    let masquerade_vmi = dir.path("vmi-masquerade.yaml");
    std::fs::write(
        &masquerade_vmi,
        std::fs::read_to_string(&vmi_file)?
            .replace(
                "interfaces: [{name: default, bridge: {}}, {name: storage, bridge: {}}]",
                "interfaces: [{name: default, masquerade: {}, ports: [{port: 8080}]}]",
            )
            .replace(
                "  - {name: storage, multus: {networkName: storage-net}}\n",
                "",
            ),
    )?;
    let mut vm = launcher_of(&masquerade_vmi);
    vm.expect(
        "podvisor-guest dhcp: eth0 ip=10.0.2.2/24 router=10.0.2.1 mtu=1400 dns=10.96.0.10 \
         hostname=e2e-net",
    )?;
    vm.wait_for_shell()?;
    vm.shell_ok(&format!("ping -c 1 -W 5 {NODE_IP}"))?;
    vm.shell_ok(
        "(echo from-port-8080 | nc -l -p 8080 >/dev/null 2>&1 &); \
         (echo from-port-9090 | nc -l -p 9090 >/dev/null 2>&1 &)",
    )?;
    let reply = node_reads(&node, "8080", "from-port-8080")?;
    if !reply.contains("from-port-8080") {
        return Err(vm.failure(&format!(
            "the node could not reach the guest's 8080: {reply}"
        )));
    }
    // The listener on 9090 is there (8080's, started with it, answered), but not for the node.
    if node_nc(&node, "9090")?.contains("from-port-9090") {
        return Err(vm.failure("a port not in the spec's ports reached the guest"));
    }
    stop_leaving_the_pod_as(vm, &pod, &cni_left)?;
    let forwarding = host_ok(
        "ip",
        &[
            "netns",
            "exec",
            &pod.0,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ],
    )?;
    if forwarding.trim() != "0" {
        return Err(format!("the pod's ip_forward is {forwarding} after the launcher").into());
    }
    Ok(())
}

/// What the node reads from `port` at the pod's address (busybox `nc`, 3 s per try), tried
/// until it holds `wanted` or 10 s have passed: the guest's listener may start a moment after
/// the shell said so.
fn node_reads(node: &NetNs, port: &str, wanted: &str) -> Result<String, Failed> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reply = node_nc(node, port)?;
        if reply.contains(wanted) || std::time::Instant::now() > deadline {
            return Ok(reply);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// One try of [`node_reads`].
fn node_nc(node: &NetNs, port: &str) -> Result<String, Failed> {
    let busybox = guest("cache/busybox-static/bin/busybox");
    let args = [
        "netns",
        "exec",
        &node.0,
        busybox.to_str().unwrap(),
        "nc",
        "-w",
        "3",
        POD_IP,
        port,
    ];
    Ok(host("ip", &args)?.1)
}

/// Stops the launcher with SIGTERM, as the kubelet does: it must exit 0 and leave the pod's
/// network as the CNI did (`cni_left`).
fn stop_leaving_the_pod_as(mut vm: Vm, pod: &NetNs, cni_left: &str) -> Result<(), Failed> {
    vm.terminate()?;
    let status = vm.wait()?;
    if !status.success() {
        return Err(vm.failure(&format!("the launcher exited with {status} after SIGTERM")));
    }
    let after = pod_network(pod)?;
    if after != cni_left {
        return Err(vm.failure(&format!("the pod's network was {cni_left}, is now {after}")));
    }
    Ok(())
}

/// The effective capabilities (CapEff, hex) of each thread of `pid` named `name`.
fn thread_caps(pid: u32, name: &str) -> Result<Vec<String>, Failed> {
    let mut caps = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        if std::fs::read_to_string(task.join("comm"))?.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status"))?;
        if let Some(c) = status.lines().find_map(|l| l.strip_prefix("CapEff:")) {
            caps.push(c.trim().to_owned());
        }
    }
    Ok(caps)
}

pub fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "launcher_wires_the_guest_to_the_pod_network",
        || hang_tolerant(the_guest_takes_the_pods_address_by_dhcp),
    )]
}
