//! Network scenario: podvisor creates a tap with a host address, the guest configures its
//! virtio-net interface, pings the host and moves a file each way over TCP.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};
use sha2::{Digest, Sha256};

use crate::harness::{find_sha256, hang_tolerant, Vm};

const HOST_IP: &str = "192.168.249.1";
const GUEST_IP: &str = "192.168.249.2";
/// Each way: some thousand full-sized segments, through the rings many times over (it was
/// 64 MiB, for nothing more than the emulated test host's time: both ends hash it there).
const TRANSFER_BYTES: usize = 16 << 20;

/// Connects to the guest, retrying until its listener is up.
fn connect(port: u16) -> Result<TcpStream, String> {
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Pseudo-random bytes (xorshift): incompressible enough, and no dependency.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `data` to the guest's listener on `port`, then closes the connection.
fn send_to_guest(port: u16, data: Vec<u8>) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut s = connect(port)?;
        s.write_all(&data).map_err(|e| format!("send: {e}"))?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        // Wait for the guest to close its side: it has everything then.
        let _ = s.read(&mut [0u8; 1]);
        Ok(())
    })
}

/// Reads everything the guest's listener on `port` sends; returns its SHA-256 and length.
fn receive_from_guest(port: u16) -> JoinHandle<Result<(String, usize), String>> {
    std::thread::spawn(move || {
        let mut s = connect(port)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
        }
        Ok((format!("{:x}", hasher.finalize()), total))
    })
}

fn join<T>(h: JoinHandle<Result<T, String>>) -> Result<T, Failed> {
    h.join()
        .map_err(|_| Failed::from("host transfer thread panicked"))?
        .map_err(Failed::from)
}

fn ping_and_tcp_both_ways() -> Result<(), Failed> {
    let tap = format!("pvt{}", std::process::id() % 100_000);
    let net = format!("tap={tap},ip={HOST_IP},mask=255.255.255.0");
    let mut vm = Vm::boot_with(
        "bzImage",
        2,
        "512M",
        "console=ttyS0 quiet",
        &["--net", &net],
    );
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    vm.shell_ok(&format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0"
    ))?;
    vm.shell_ok(&format!("ping -c 3 -W 10 {HOST_IP}"))?;

    // Host to guest.
    let data = payload(TRANSFER_BYTES);
    let sent_sha = format!("{:x}", Sha256::digest(&data));
    let sender = send_to_guest(5003, data);
    let out = vm.shell_ok("mkdir -p /tmp && nc -l -p 5003 > /tmp/in && sha256sum /tmp/in")?;
    join(sender)?;
    if find_sha256(&out).as_deref() != Some(sent_sha.as_str()) {
        return Err(vm.failure(&format!("guest received '{out}', host sent {sent_sha}")));
    }

    // Guest to host: a file of the guest's own.
    let out = vm.shell_ok(&format!(
        "head -c {TRANSFER_BYTES} /dev/urandom > /tmp/out && sha256sum /tmp/out"
    ))?;
    let guest_sha =
        find_sha256(&out).ok_or_else(|| vm.failure(&format!("no checksum in '{out}'")))?;
    let receiver = receive_from_guest(5004);
    vm.shell_ok("nc -l -p 5004 < /tmp/out")?;
    let (got_sha, got_len) = join(receiver)?;
    if got_sha != guest_sha || got_len != TRANSFER_BYTES {
        return Err(vm.failure(&format!(
            "host received {got_len} bytes ({got_sha}), guest sent {TRANSFER_BYTES} ({guest_sha})"
        )));
    }
    vm.poweroff()
}

/// The network scenarios.
pub fn trials() -> Vec<Trial> {
    vec![Trial::test("net_ping_and_tcp_both_ways", || {
        hang_tolerant(ping_and_tcp_both_ways)
    })]
}
