//! What a VMM process gives up before it starts (issue 15, item 5), read from /proc as an
//! operator would: no new privileges, no core dumps, a bounded number of descriptors.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_vmm_process_is_limited_from_its_start() {
    let dir = std::env::temp_dir().join(format!("podvisor-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(["serve", "--api-socket"])
        .arg(&sock)
        .env_remove("PODVISOR_CORE_DUMPS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !sock.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");
    let files = limit("Max open files");
    assert!(
        files
            .iter()
            .all(|n| n.parse::<u64>().is_ok_and(|n| n <= 4096)),
        "{limits}"
    );
}
