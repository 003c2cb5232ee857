//! The server over a real Unix socket, with a backend that runs no VM.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::fake::FakeVmm;
use api::{ApiError, ApiRequest, ApiResponse, Client, ServerOptions, VmState, VmmBackend};

const CONFIG: &str = r#"{"payload":{"kernel":"/k","cmdline":"console=ttyS0"},
    "cpus":{"boot_vcpus":2},"memory":{"size":268435456},
    "disks":[{"path":"/d.raw","id":"disk0"}],"serial":{"mode":"Off"}}"#;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("podvisor-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options() -> ServerOptions {
    ServerOptions {
        header_read_timeout: Duration::from_millis(500),
        body_read_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

fn start(dir: &TempDir, backend: Arc<dyn VmmBackend>) -> api::ApiServer {
    api::serve_with(&dir.sock(), backend, options()).unwrap()
}

/// Sends raw bytes, returns everything the server writes until it closes or goes quiet.
fn raw(path: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A server that refuses the connection may close it before the request is written.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if complete(&out) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `out` holds a whole response (headers and Content-Length bytes of body).
fn complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    out.len() >= end + 4 + len
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[test]
fn lifecycle_over_the_socket() {
    let dir = TempDir::new("lifecycle");
    let server = start(&dir, Arc::new(FakeVmm::new()));
    let mut c = Client::connect(&dir.sock()).unwrap();
    let ping = c.request("GET", "vmm.ping", None).unwrap();
    assert_eq!(ping.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&ping.body).unwrap();
    assert_eq!(v["pid"], std::process::id());

    assert_eq!(c.request("GET", "vm.info", None).unwrap().status, 404);
    let created = c
        .request("PUT", "vm.create", Some(CONFIG.as_bytes()))
        .unwrap();
    assert_eq!((created.status, created.body.len()), (204, 0));
    // The backend's 409 reaches the client with its reason.
    let again = c
        .request("PUT", "vm.create", Some(CONFIG.as_bytes()))
        .unwrap();
    assert_eq!(again.status, 409);
    assert!(
        again.error_message().contains("already exists"),
        "{again:?}"
    );
    let pause = c.request("PUT", "vm.pause", None).unwrap();
    assert_eq!(pause.status, 409);
    assert_eq!(
        pause.error_message(),
        "vm.pause: the VM is Created; it must be Running"
    );
    for (method, endpoint, state) in [
        ("PUT", "vm.boot", "Running"),
        ("PUT", "vm.pause", "Paused"),
        ("PUT", "vm.resume", "Running"),
        ("PUT", "vm.reboot", "Running"),
        ("PUT", "vm.power-button", "Running"),
        ("PUT", "vm.shutdown", "Shutdown"),
        ("PUT", "vm.boot", "Running"),
    ] {
        let r = c.request(method, endpoint, None).unwrap();
        assert_eq!(r.status, 204, "{endpoint}: {}", r.error_message());
        let info = c.request("GET", "vm.info", None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
        assert_eq!(v["state"], state, "after {endpoint}");
        assert_eq!(v["config"]["memory"]["size"], 268435456);
        assert_eq!(v["memory_actual_size"], 268435456);
    }
    let counters = c.request("GET", "vm.counters", None).unwrap();
    assert_eq!(counters.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&counters.body).unwrap();
    assert!(v["disk0"]["read_ops"].as_u64().unwrap() > 0);
    assert_eq!(c.request("PUT", "vm.delete", None).unwrap().status, 204);
    assert_eq!(c.request("GET", "vm.info", None).unwrap().status, 404);
    assert_eq!(c.request("PUT", "vmm.shutdown", None).unwrap().status, 204);
    server.shutdown();
    assert!(!dir.sock().exists(), "shutdown removes the socket");
    // The path is free again.
    let again = start(&dir, Arc::new(FakeVmm::new()));
    assert_eq!(
        Client::connect(&dir.sock())
            .unwrap()
            .request("GET", "vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    drop(again);
    assert!(
        !dir.sock().exists(),
        "dropping the server removes the socket too"
    );
}

/// Sends `request` over TCP to `addr`; the whole answer.
fn raw_tcp(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn readiness_on_the_socket_and_probes_on_tcp() {
    let dir = TempDir::new("readyz");
    let vmm = Arc::new(FakeVmm::new());
    let _server = start(&dir, vmm.clone());
    let get = "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let no_vm = raw(&dir.sock(), get.as_bytes());
    assert_eq!(status_of(&no_vm), 503, "{no_vm}");
    assert!(no_vm.ends_with("not ready: no VM yet\n"), "{no_vm}");

    // The probe listener on a free port of the loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let probes = api::serve_probes(port, vmm.clone()).unwrap();
    assert_eq!(probes.socket_path(), None);
    let mut c = Client::connect(&dir.sock()).unwrap();
    let created = c
        .request("PUT", "vm.create", Some(CONFIG.as_bytes()))
        .unwrap();
    assert_eq!(created.status, 204);
    let created = raw_tcp(port, get);
    assert_eq!(status_of(&created), 503);
    assert!(
        created.ends_with("not ready: the VM is Created\n"),
        "{created}"
    );
    assert_eq!(c.request("PUT", "vm.boot", None).unwrap().status, 204);
    for ready in [raw_tcp(port, get), raw(&dir.sock(), get.as_bytes())] {
        assert_eq!(status_of(&ready), 200, "{ready}");
        assert!(ready.ends_with("\r\n\r\nok\n"), "{ready}");
    }
    let metrics = raw_tcp(
        port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&metrics), 200);
    assert!(
        metrics.contains("kubevirt_vmi_state{state=\"Running\"} 1"),
        "{metrics}"
    );
    // Nothing that controls the VM is served on TCP.
    for request in [
        "PUT /api/v1/vm.shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "PUT /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ] {
        let refused = raw_tcp(port, request);
        assert_eq!(status_of(&refused), 404, "{request}: {refused}");
    }
    assert_eq!(c.request("GET", "vm.info", None).unwrap().status, 200);
    let info: serde_json::Value =
        serde_json::from_slice(&c.request("GET", "vm.info", None).unwrap().body).unwrap();
    assert_eq!(info["state"], "Running", "the refused shutdown did nothing");
    probes.shutdown();
    assert!(
        std::net::TcpStream::connect(port).is_err(),
        "the port is closed"
    );
}

#[test]
fn bad_requests_get_4xx() {
    let dir = TempDir::new("bad");
    let _server = start(&dir, Arc::new(FakeVmm::new()));
    let sock = dir.sock();
    let r = raw(&sock, b"GET /api/v1/nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.contains("{\"error\":\"no such endpoint 'nope'\"}"), "{r}");
    let r = raw(&sock, b"DELETE /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 405);
    assert!(r.to_ascii_lowercase().contains("allow: get"), "{r}");
    let r = raw(
        &sock,
        b"GET /api/v1/vm.info?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status_of(&r), 404, "no VM yet: {r}");
    for body in [
        "{",
        "[1,2]",
        "{\"payload\":5}",
        "{\"payload\":{\"kernel\":\"/k\"},\"cpus\":{\"boot_vcpus\":true},\"memory\":{\"size\":1}}",
    ] {
        let req = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = raw(&sock, req.as_bytes());
        assert_eq!(status_of(&r), 400, "{body}: {r}");
        assert!(r.contains("invalid VmConfig"), "{r}");
    }
    // A declared body over 1 MiB is refused before it is sent.
    let r = raw(
        &sock,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n",
    );
    assert_eq!(status_of(&r), 413, "{r}");
    // A chunked one is cut off at the limit.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b' '; 64 << 10];
    let mut sent = 0;
    while sent <= api::MAX_BODY_BYTES {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(status_of(&out), 413, "{out}");
    // Not HTTP at all: a 400 or a closed connection.
    let r = raw(&sock, b"\x00\x01\x02garbage\r\n\r\n");
    assert!(r.is_empty() || status_of(&r) == 400, "{r}");
    let r = raw(&sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 200, "still serving: {r}");
}

#[test]
fn many_clients_at_once() {
    let dir = TempDir::new("many");
    let vm: VmConfigSource = serde_json::from_str(CONFIG).unwrap();
    let _server = start(&dir, Arc::new(FakeVmm::with_vm(vm, VmState::Running)));
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let sock = dir.sock();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).unwrap();
                for _ in 0..50 {
                    let endpoint = if i % 2 == 0 { "vm.info" } else { "vmm.ping" };
                    assert_eq!(c.request("GET", endpoint, None).unwrap().status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

type VmConfigSource = vmm::config::VmConfig;

#[test]
fn half_closed_clients() {
    let dir = TempDir::new("half");
    let _server = start(&dir, Arc::new(FakeVmm::new()));
    // A whole request, then the write side closed: still answered.
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(status_of(&out), 200, "{out}");
    // Half a request, then closed: the server closes too (maybe after a 400).
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pay")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let started = Instant::now();
    let _ = s.read_to_string(&mut out);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "server kept the connection"
    );
    assert!(out.is_empty() || status_of(&out) == 400, "{out}");
    let r = raw(
        &dir.sock(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status_of(&r), 200);
}

#[test]
fn slow_clients_do_not_block_others() {
    let dir = TempDir::new("slow");
    let _server = start(&dir, Arc::new(FakeVmm::new()));
    // Stalls in the middle of its request head.
    let mut head = UnixStream::connect(dir.sock()).unwrap();
    head.write_all(b"GET /api/v1/vmm.pi").unwrap();
    // Stalls in the middle of its body.
    let mut body = UnixStream::connect(dir.sock()).unwrap();
    body.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    // Idle after connecting.
    let idle = UnixStream::connect(dir.sock()).unwrap();
    let started = Instant::now();
    let r = raw(
        &dir.sock(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status_of(&r), 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The stalled ones are cut off by the read timeouts.
    for (name, mut s) in [("head", head), ("idle", idle)] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || status_of(&text) == 408, "{name}: {text}");
    }
    body.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = body.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A backend whose boot takes a while.
struct SlowBoot(FakeVmm);

impl VmmBackend for SlowBoot {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        if request == ApiRequest::VmBoot {
            std::thread::sleep(Duration::from_millis(800));
        }
        self.0.handle(request)
    }
}

#[test]
fn a_slow_action_does_not_block_others() {
    let dir = TempDir::new("slowboot");
    let vm: VmConfigSource = serde_json::from_str(CONFIG).unwrap();
    let _server = start(
        &dir,
        Arc::new(SlowBoot(FakeVmm::with_vm(vm, VmState::Created))),
    );
    let sock = dir.sock();
    let boot = std::thread::spawn(move || {
        Client::connect(&sock)
            .unwrap()
            .request("PUT", "vm.boot", None)
            .unwrap()
            .status
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let mut c = Client::connect(&dir.sock()).unwrap();
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(boot.join().unwrap(), 204);
}

#[test]
fn shutdown_waits_for_answers_in_flight() {
    let dir = TempDir::new("drain");
    let vm: VmConfigSource = serde_json::from_str(CONFIG).unwrap();
    let server = start(
        &dir,
        Arc::new(SlowBoot(FakeVmm::with_vm(vm, VmState::Created))),
    );
    let mut c = Client::connect(&dir.sock()).unwrap();
    let boot = std::thread::spawn(move || c.request("PUT", "vm.boot", None).unwrap().status);
    std::thread::sleep(Duration::from_millis(200));
    server.shutdown();
    assert_eq!(boot.join().unwrap(), 204);
    assert!(!dir.sock().exists());
    assert!(Client::connect(&dir.sock()).is_err());
}

#[test]
fn client_reconnects_after_idle_close() {
    let dir = TempDir::new("idle");
    let opts = ServerOptions {
        header_read_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let _server = api::serve_with(&dir.sock(), Arc::new(FakeVmm::new()), opts).unwrap();
    let mut c = Client::connect(&dir.sock()).unwrap();
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
}

#[test]
fn oversized_head_is_refused() {
    let dir = TempDir::new("head");
    let _server = start(&dir, Arc::new(FakeVmm::new()));
    let mut req = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 200 << 10));
    req.extend_from_slice(b"\r\n\r\n");
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || status_of(&text) == 431, "{text}");
    let r = raw(
        &dir.sock(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status_of(&r), 200);
}

#[test]
fn connection_cap() {
    let dir = TempDir::new("cap");
    let opts = ServerOptions {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let _server = api::serve_with(&dir.sock(), Arc::new(FakeVmm::new()), opts).unwrap();
    let held: Vec<_> = (0..4)
        .map(|_| Client::connect(&dir.sock()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // A fifth is closed at once, without an answer.
    let r = raw(
        &dir.sock(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.is_empty(), "{r}");
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    let r = raw(
        &dir.sock(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status_of(&r), 200);
}

#[test]
fn socket_file_rules() {
    let dir = TempDir::new("sock");
    let sock = dir.sock();
    // Stale: a socket file nobody listens on any more.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = start(&dir, Arc::new(FakeVmm::new()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Live: not stolen, and the first server goes on.
    let err = api::serve(&sock, Arc::new(FakeVmm::new())).err().unwrap();
    assert!(matches!(err, api::Error::SocketInUse(_)), "{err}");
    assert!(
        err.to_string().contains("in use by a running process"),
        "{err}"
    );
    let r = raw(&sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 200);
    server.shutdown();
    assert!(!sock.exists());
    // Not a socket: left alone.
    std::fs::write(&sock, b"precious").unwrap();
    let err = api::serve(&sock, Arc::new(FakeVmm::new())).err().unwrap();
    assert!(matches!(err, api::Error::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    let long = dir.0.join("x".repeat(120));
    let err = api::serve(&long, Arc::new(FakeVmm::new())).err().unwrap();
    assert!(matches!(err, api::Error::SocketPathTooLong(_)), "{err}");
}

/// Bound before a VM's boot and served after it: a client that connects in between waits for
/// its answer; a socket never served is removed.
#[test]
fn a_bound_socket_answers_once_served() {
    let dir = TempDir::new("bound");
    let sock = dir.sock();
    let listening = api::bind(&sock).unwrap();
    assert!(sock.exists());
    let early = {
        let sock = sock.clone();
        std::thread::spawn(move || raw(&sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n"))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !early.is_finished(),
        "answered before anything served the socket"
    );
    let server = listening
        .serve_with(Arc::new(FakeVmm::new()), options())
        .unwrap();
    assert_eq!(status_of(&early.join().unwrap()), 200);
    server.shutdown();
    assert!(!sock.exists());

    drop(api::bind(&sock).unwrap());
    assert!(
        !sock.exists(),
        "a socket bound and never served was left behind"
    );
}

#[test]
fn client_cannot_reach() {
    let dir = TempDir::new("noserver");
    let err = Client::connect(&dir.sock()).err().unwrap();
    let text = err.to_string();
    assert!(text.starts_with("cannot reach podvisor at "), "{text}");
    assert!(text.contains("api.sock"), "{text}");
}

/// One request as Cloud Hypervisor's client (ch-remote, its `api_client` crate) sends it, and
/// the answer read by its rules: the status code is everything after `HTTP/1.1 ` up to the end
/// of the line, trimmed, and must parse as a number; a body exists only if an exact-case
/// `Content-Length: ` header says so. Returns the code and the body.
fn ch_style_call(
    s: &mut UnixStream,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    let mut request =
        format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = String::new();
    let mut buf = [0u8; 256];
    let (head_end, length) = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("connection closed after {got:?}"));
        }
        got.push_str(std::str::from_utf8(&buf[..n]).map_err(|e| e.to_string())?);
        if let Some(end) = got.find("\r\n\r\n") {
            let length = match got.find("Content-Length: ") {
                Some(at) => {
                    let value = &got[at + 16..at + got[at..].find('\r').unwrap()];
                    Some(value.trim().parse::<usize>().map_err(|e| e.to_string())?)
                }
                None => None,
            };
            break (end + 4, length);
        }
    };
    if let Some(length) = length {
        while got.len() < head_end + length {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("body cut short".into());
            }
            got.push_str(std::str::from_utf8(&buf[..n]).map_err(|e| e.to_string())?);
        }
    }
    let at = got.find("HTTP/1.1").ok_or("no HTTP/1.1 status line")?;
    let code = &got[at + "HTTP/1.1 ".len()..at + got[at..].find('\r').unwrap()];
    let code: u16 = code
        .trim()
        .parse()
        .map_err(|e| format!("status code {code:?}: {e}"))?;
    Ok((code, length.map(|_| got[head_end..].to_owned())))
}

#[test]
fn cloud_hypervisors_client_reads_every_endpoint() {
    let dir = TempDir::new("ch-client");
    let server = start(&dir, Arc::new(FakeVmm::new()));
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut call = |method: &str, endpoint: &str, body: Option<&str>| {
        ch_style_call(&mut s, method, endpoint, body)
            .unwrap_or_else(|e| panic!("{method} {endpoint}: {e}"))
    };
    let (code, body) = call("GET", "vmm.ping", None);
    assert_eq!(code, 200);
    let ping: serde_json::Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert!(ping["version"].is_string());
    // A refusal carries its reason in the body.
    let (code, body) = call("PUT", "vm.boot", None);
    assert_eq!(code, 404);
    assert!(body.unwrap().contains("no VM has been created"));
    let steps: &[(&str, &str, Option<&str>, u16)] = &[
        ("PUT", "vm.create", Some(CONFIG), 204),
        ("PUT", "vm.boot", None, 204),
        ("GET", "vm.info", None, 200),
        ("GET", "vm.counters", None, 200),
        ("GET", "vmm.metrics", None, 200),
        ("PUT", "vm.pause", None, 204),
        ("PUT", "vm.pause", None, 409),
        (
            "PUT",
            "vm.snapshot",
            Some(r#"{"destination_url":"file:///nonexistent/s"}"#),
            204,
        ),
        ("PUT", "vm.resume", None, 204),
        (
            "PUT",
            "vm.snapshot",
            Some(r#"{"destination_url":"file:///nonexistent/s"}"#),
            409,
        ),
        (
            "PUT",
            "vm.send-migration",
            Some(r#"{"destination_url":"tcp:nohost"}"#),
            400,
        ),
        // No migration under way: refused with the reason.
        ("PUT", "vm.cancel-migration", None, 409),
        ("PUT", "vm.reboot", None, 204),
        ("PUT", "vm.power-button", None, 204),
        ("PUT", "vm.shutdown", None, 204),
        ("PUT", "vm.delete", None, 204),
        // Not a snapshot: refused, with the reason.
        (
            "PUT",
            "vm.restore",
            Some(r#"{"source_url":"file:///nonexistent/s"}"#),
            400,
        ),
        (
            "PUT",
            "vm.receive-migration",
            Some(r#"{"receiver_url":"unix:/nonexistent/m.sock"}"#),
            400,
        ),
        ("PUT", "vmm.shutdown", None, 204),
    ];
    let mut reached = std::collections::BTreeSet::from(["vmm.ping"]);
    for &(method, endpoint, body, expected) in steps {
        let (code, answer) = call(method, endpoint, body);
        assert_eq!(code, expected, "{method} {endpoint}: {answer:?}");
        if endpoint == "vmm.metrics" {
            let page = answer.clone().unwrap_or_default();
            assert!(
                page.contains("kubevirt_vmi_state{state=\"Running\"} 1"),
                "{page}"
            );
        }
        if endpoint == "vm.info" {
            let info: serde_json::Value = serde_json::from_str(&answer.unwrap()).unwrap();
            assert_eq!(info["state"], "Running");
        }
        reached.insert(endpoint);
    }
    let served: std::collections::BTreeSet<&str> = api::ROUTES.iter().map(|r| r.endpoint).collect();
    assert_eq!(reached, served, "every endpoint is driven");
    server.shutdown();
}

/// A backend whose `vm.info` takes a while (a VM stuck behind a device, say).
/// Counts the `vm.info` calls that reached it.
struct SlowInfo(FakeVmm, Duration, Arc<std::sync::atomic::AtomicUsize>);

impl VmmBackend for SlowInfo {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        if request == ApiRequest::VmInfo {
            self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(self.1);
        }
        self.0.handle(request)
    }
}

/// Waits (up to 10 s) until `done` holds.
fn wait_until(done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Issue 15, item 9: every VMM call stuck; `vmm.ping` still answers at once, and one call
/// more is answered 503 after a short wait instead of waiting behind them.
#[test]
fn ping_answers_while_every_vmm_call_is_stuck() {
    let dir = TempDir::new("stuck");
    let vm: VmConfigSource = serde_json::from_str(CONFIG).unwrap();
    let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = SlowInfo(
        FakeVmm::with_vm(vm, VmState::Created),
        Duration::from_secs(3),
        entered.clone(),
    );
    let opts = ServerOptions {
        vmm_call_wait: Duration::from_millis(300),
        ..options()
    };
    let _server = api::serve_with(&dir.sock(), Arc::new(backend), opts).unwrap();
    let stuck: Vec<_> = (0..8)
        .map(|_| {
            let sock = dir.sock();
            std::thread::spawn(move || {
                Client::connect(&sock)
                    .unwrap()
                    .request("GET", "vm.info", None)
                    .unwrap()
                    .status
            })
        })
        .collect();
    // Every slot taken.
    wait_until(|| entered.load(std::sync::atomic::Ordering::SeqCst) == 8);
    let started = Instant::now();
    let mut c = Client::connect(&dir.sock()).unwrap();
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    let busy = c.request("GET", "vm.info", None).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(busy.status, 503, "{:?}", busy.body);
    for call in stuck {
        assert_eq!(call.join().unwrap(), 200);
    }
    // Once they are done, calls go through again.
    assert_eq!(c.request("GET", "vm.info", None).unwrap().status, 200);
}

/// Issue 15, item 9: a client that sends requests and never reads the answers loses its
/// connection once the socket is full and nothing moves for the write timeout, so that the
/// slot it held serves others.
#[test]
fn a_client_that_never_reads_is_dropped() {
    let dir = TempDir::new("noread");
    let opts = ServerOptions {
        max_connections: 1,
        write_timeout: Duration::from_millis(500),
        header_read_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let _server = api::serve_with(&dir.sock(), Arc::new(FakeVmm::new()), opts).unwrap();
    let mut hog = UnixStream::connect(dir.sock()).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let writer = std::thread::spawn(move || {
        let request = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n";
        // Far more answers than the socket holds; stops when the server stops reading or
        // closes.
        for _ in 0..50_000 {
            if hog.write_all(request).is_err() {
                break;
            }
        }
        hog
    });
    // Refused while the hog holds the only slot; answered once the write timeout freed it.
    wait_until(|| {
        let r = raw(
            &dir.sock(),
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        !r.is_empty() && status_of(&r) == 200
    });
    drop(writer.join().unwrap());
}
