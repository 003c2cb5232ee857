//! Network namespaces for tests: each is a thread that unshared its network namespace and
//! runs what it is given there; and a fake pod on a fake node made of three of them. Nothing
//! reaches the host's network.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::netlink::{Netlink, Route};

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace of its own, alive while this lives.
pub struct Netns {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// The namespace, for moving links into it.
    pub file: File,
}

impl Netns {
    /// A new, empty network namespace (needs CAP_SYS_ADMIN), or `None` without the privilege.
    pub fn new() -> Option<Netns> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (file_tx, file_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare takes a flag word; it changes only this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = file_tx.send(None);
                return;
            }
            let _ = file_tx.send(File::open("/proc/thread-self/ns/net").ok());
            for job in rx {
                job();
            }
        });
        let file = file_rx.recv().ok().flatten()?;
        Some(Netns {
            jobs: Some(jobs),
            thread: Some(thread),
            file,
        })
    }

    /// Runs `f` in the namespace and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .expect("alive")
            .send(job)
            .expect("namespace thread");
        rx.recv().expect("the job panicked")
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The pod's address (on its `eth0`) in [`pod_on_a_node`].
pub const POD_IP: &str = "10.244.1.7/24";
/// [`POD_IP`]'s address alone.
pub fn pod_ip() -> Ipv4Addr {
    POD_IP
        .parse::<Ipv4Net>()
        .expect("an address with its prefix")
        .addr()
}
/// The node's end of the pod's `eth0`, the pod's gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// A fake pod on a fake node, as a CNI leaves them, and a guest: three namespaces.
pub struct PodOnANode {
    /// Holds `node0`, the far end of the pod's `eth0`, at [`NODE_IP`].
    pub node: Netns,
    /// Holds `eth0` at [`POD_IP`] (MTU 1450; a default route and one to 10.96.0.0/12 via the
    /// node) and `tap0`, standing in for the guest's tap.
    pub pod: Netns,
    /// Holds `guest0`, the far end of `tap0`, up, unaddressed.
    pub guest: Netns,
}

/// Makes a [`PodOnANode`], or `None` (saying so) when this process may not make namespaces.
pub fn pod_on_a_node() -> Option<PodOnANode> {
    let (Some(node), Some(pod), Some(guest)) = (Netns::new(), Netns::new(), Netns::new()) else {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_ne!(euid, 0, "root, and no network namespace");
        eprintln!("skipped: network namespaces need root");
        return None;
    };
    let (node_fd, guest_fd) = (node.fd(), guest.fd());
    pod.run(move || {
        let nl = Netlink::open().unwrap();
        nl.add_veth("eth0", "node0").unwrap();
        nl.add_veth("tap0", "guest0").unwrap();
        nl.move_to_netns(nl.existing("node0").unwrap().index, node_fd)
            .unwrap();
        nl.move_to_netns(nl.existing("guest0").unwrap().index, guest_fd)
            .unwrap();
        let eth0 = nl.existing("eth0").unwrap().index;
        nl.up(eth0, Some(1450)).unwrap();
        nl.add_address(eth0, POD_IP.parse().unwrap()).unwrap();
        for dest in ["0.0.0.0/0", "10.96.0.0/12"] {
            let route = Route {
                destination: dest.parse().unwrap(),
                gateway: Some(NODE_IP),
                interface: Some(eth0),
                protocol: 3,
                connected: false,
            };
            nl.add_route(&route).unwrap();
        }
    });
    node.run(|| {
        let nl = Netlink::open().unwrap();
        let node0 = nl.existing("node0").unwrap().index;
        nl.add_address(node0, Ipv4Net::new(NODE_IP, 24).unwrap())
            .unwrap();
        nl.up(node0, Some(1450)).unwrap();
    });
    guest.run(|| {
        let nl = Netlink::open().unwrap();
        let guest0 = nl.existing("guest0").unwrap().index;
        nl.up(guest0, Some(1450)).unwrap();
    });
    Some(PodOnANode { node, pod, guest })
}

/// Gives `guest0` in `guest` the address `address` and a default route via `gateway`, as the
/// guest's DHCP client would.
pub fn configure_guest(guest: &Netns, address: Ipv4Net, gateway: Ipv4Addr) {
    guest.run(move || {
        let nl = Netlink::open().unwrap();
        let guest0 = nl.existing("guest0").unwrap().index;
        nl.add_address(guest0, address).unwrap();
        let default = Route {
            destination: Ipv4Net::default(),
            gateway: Some(gateway),
            interface: Some(guest0),
            protocol: 0,
            connected: false,
        };
        nl.add_route(&default).unwrap();
    });
}

/// A TCP connection from `dialer` to `address` while `listener` listens on `bind`: a few
/// bytes go each way; returns the address the listener saw it come from.
pub fn connect(
    listener: &Netns,
    bind: SocketAddrV4,
    dialer: &Netns,
    address: SocketAddrV4,
) -> Ipv4Addr {
    let socket = listener.run(move || TcpListener::bind(bind).unwrap());
    let served = std::thread::spawn(move || {
        let (mut s, peer) = socket.accept().unwrap();
        let mut asked = [0u8; 4];
        s.read_exact(&mut asked).unwrap();
        assert_eq!(&asked, b"ping");
        s.write_all(b"pong").unwrap();
        peer
    });
    let answer = dialer.run(move || {
        let mut s = TcpStream::connect_timeout(&address.into(), Duration::from_secs(5)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut answer = [0u8; 4];
        s.read_exact(&mut answer).unwrap();
        answer
    });
    assert_eq!(&answer, b"pong");
    match served.join().unwrap().ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("an IPv6 peer {other}"),
    }
}

/// Checks masquerade's two directions over a wired [`PodOnANode`] whose guest is configured:
/// the node's connection to the pod's address reaches the guest (seen from the node's
/// address), and the guest's to the node leaves as the pod's address.
pub fn assert_masqueraded(node: &Netns, guest: &Netns) {
    let pod_ip = pod_ip();
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080);
    let inbound = connect(guest, any, node, SocketAddrV4::new(pod_ip, 8080));
    assert_eq!(inbound, NODE_IP, "inbound");
    let node_port = SocketAddrV4::new(NODE_IP, 9090);
    assert_eq!(
        connect(node, node_port, guest, node_port),
        pod_ip,
        "outbound"
    );
}
