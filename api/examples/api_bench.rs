//! API latency and throughput: `vmm.ping` and `vm.info` with 1 and 8 concurrent clients, each
//! on its own kept-alive connection, over the Unix socket. Serves a [`api::fake::FakeVmm`]
//! in-process unless `--socket PATH` names a running server.
//!
//! ```sh
//! cargo run --release -p api --example api_bench -- [--seconds 5] [--socket PATH]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::fake::FakeVmm;
use api::{Client, VmState};

const CONFIG: &str = r#"{"payload":{"kernel":"/boot/bzImage","initramfs":"/boot/initramfs.cpio.gz",
    "cmdline":"console=ttyS0 reboot=k panic=1"},"cpus":{"boot_vcpus":2},
    "memory":{"size":536870912},"disks":[{"path":"/var/lib/pod/root.qcow2","id":"disk0"}],
    "net":[{"tap":"tap0","ip":"10.0.0.1","mask":"255.255.255.0","mac":"52:54:00:00:00:01"}],
    "rng":{"src":"/dev/urandom"},"serial":{"mode":"Off"}}"#;

struct Outcome {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

fn run(socket: &Path, endpoint: &str, clients: usize, seconds: f64) -> Outcome {
    let warmup = Duration::from_millis(300);
    let measure = Duration::from_secs_f64(seconds);
    let start = Instant::now() + Duration::from_millis(50);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_owned();
            let endpoint = endpoint.to_owned();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).expect("connect");
                let mut latencies = Vec::with_capacity(200_000);
                while Instant::now() < start {
                    std::hint::spin_loop();
                }
                let measure_from = start + warmup;
                let end = measure_from + measure;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let reply = client.request("GET", &endpoint, None).expect("request");
                    assert_eq!(reply.status, 200, "{}", reply.error_message());
                    if t0 >= measure_from {
                        latencies.push(t0.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    latencies.sort_unstable();
    Outcome {
        latencies,
        elapsed: measure,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() {
    let mut seconds = 5.0;
    let mut socket = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--seconds", Some(v)) => seconds = v.parse().expect("--seconds: a number"),
            ("--socket", Some(v)) => socket = Some(PathBuf::from(v)),
            _ => {
                eprintln!("usage: api_bench [--seconds N] [--socket PATH]");
                std::process::exit(2);
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("podvisor-api-bench-{}", std::process::id()));
    let (socket, server) = match socket {
        Some(s) => (s, None),
        None => {
            std::fs::create_dir_all(&dir).expect("temp dir");
            let path = dir.join("api.sock");
            let config = serde_json::from_str(CONFIG).expect("bench config");
            let backend = Arc::new(FakeVmm::with_vm(config, VmState::Running));
            let server = api::serve(&path, backend).expect("serve");
            (path, Some(server))
        }
    };
    println!("| endpoint | clients | requests | req/s | p50 µs | p99 µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for endpoint in ["vmm.ping", "vm.info"] {
        for clients in [1, 8] {
            let o = run(&socket, endpoint, clients, seconds);
            let n = o.latencies.len();
            println!(
                "| {endpoint} | {clients} | {n} | {:.0} | {:.0} | {:.0} | {:.0} |",
                n as f64 / o.elapsed.as_secs_f64(),
                percentile(&o.latencies, 0.50).as_secs_f64() * 1e6,
                percentile(&o.latencies, 0.99).as_secs_f64() * 1e6,
                o.latencies
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e6,
            );
        }
    }
    if let Some(server) = server {
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
