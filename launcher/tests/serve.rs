//! `podvisor serve` as a hostile API client and an operator meet it (issue 15): which host
//! files a client's configuration may name (`--allow-path`), checked over the socket, and
//! what the process gives up before it starts, read from /proc. No VM is booted: every
//! refusal comes before one would be.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::Client;

struct Serve {
    child: Child,
    dir: PathBuf,
}

impl Serve {
    fn start(name: &str, allow: &[&Path]) -> Serve {
        Self::start_with(name, allow, &[])
    }

    fn start_with(name: &str, allow: &[&Path], args: &[&str]) -> Serve {
        let dir =
            std::env::temp_dir().join(format!("podvisor-paths-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
        cmd.arg("serve").arg("--api-socket").arg(&sock);
        for a in allow {
            cmd.arg("--allow-path").arg(a);
        }
        cmd.args(args).env_remove("PODVISOR_SECCOMP");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !sock.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve { child, dir }
    }

    fn put(&self, endpoint: &str, body: serde_json::Value) -> (u16, String) {
        let mut c = Client::connect(&self.dir.join("api.sock")).unwrap();
        let reply = c
            .request("PUT", endpoint, Some(body.to_string().as_bytes()))
            .unwrap();
        (
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vm(dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "payload": {"kernel": dir.join("bzImage")},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64u64 << 20},
        "serial": {"mode": "Off"},
        "disks": [{"path": dir.join("disk.raw")}],
    })
}

#[test]
fn an_api_client_names_only_allowed_files() {
    let allowed = std::env::temp_dir().join(format!("podvisor-paths-root-{}", std::process::id()));
    std::fs::create_dir_all(&allowed).unwrap();
    let serve = Serve::start("roots", &[&allowed]);
    let mut refused = Vec::new();
    for (field, value) in [
        ("kernel", serde_json::json!({"kernel": "/boot/vmlinuz"})),
        ("disk", serde_json::json!([{"path": "/dev/sda"}])),
        (
            "serial file",
            serde_json::json!({"mode": "File", "file": "/etc/cron.d/x"}),
        ),
        ("rng src", serde_json::json!({"src": "/etc/shadow"})),
    ] {
        let mut body = vm(&allowed);
        match field {
            "kernel" => body["payload"] = value,
            "disk" => body["disks"] = value,
            "serial file" => body["serial"] = value,
            _ => body["rng"] = value,
        }
        let (status, text) = serve.put("vm.create", body);
        assert_eq!(status, 400, "{field}: {text}");
        assert!(text.contains(field), "{field}: {text}");
        refused.push(text);
    }
    let (status, text) = serve.put(
        "vm.snapshot",
        serde_json::json!({"destination_url": "file:///var/tmp/elsewhere"}),
    );
    assert_eq!(
        (
            status,
            text.contains("snapshot /var/tmp/elsewhere: not under")
        ),
        (400, true),
        "{text}"
    );
    // Everything under the allowed directory: created.
    let (status, text) = serve.put("vm.create", vm(&allowed));
    assert_eq!(status, 204, "{text}");
    drop(serve);
    let _ = std::fs::remove_dir_all(&allowed);
}

#[test]
fn without_allowed_paths_the_entropy_source_is_still_a_random_device() {
    let serve = Serve::start("open", &[]);
    let mut body = vm(&serve.dir);
    body["rng"] = serde_json::json!({"src": "/etc/shadow"});
    let (status, text) = serve.put("vm.create", body);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("rng src /etc/shadow: only /dev/urandom"),
        "{text}"
    );
}

#[test]
fn an_allowed_path_must_be_a_directory() {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args([
            "serve",
            "--api-socket",
            "/tmp/podvisor-never.sock",
            "--allow-path",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("podvisor: error: --allow-path /nonexistent: "),
        "{err}"
    );
    assert!(!Path::new("/tmp/podvisor-never.sock").exists());
}

/// Issue 15, item 5: no new privileges, no core dumps, a bounded number of descriptors.
#[test]
fn a_vmm_process_is_limited_from_its_start() {
    let serve = Serve::start("limits", &[]);
    let pid = serve.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    drop(serve);
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

/// Each thread's seccomp mode (`/proc/PID/task/TID/status`), by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:\t"))
            .unwrap_or("?")
            .to_owned();
        modes.push((comm.trim().to_owned(), mode));
    }
    modes
}

/// Issue 15, item 5: every thread of a VMM (main, VM thread, API) runs under a seccomp
/// filter (mode 2) by default, and under none with `--seccomp=off`.
#[test]
fn every_thread_of_a_vmm_is_under_a_seccomp_filter() {
    let serve = Serve::start("seccomp", &[]);
    let pid = serve.child.id();
    let started = Instant::now();
    let mut modes = seccomp_modes(pid);
    // The main thread filters itself just after it binds the socket the test waited for.
    while !modes.iter().all(|(_, m)| m == "2") && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        modes = seccomp_modes(pid);
    }
    // It still answers through its filters (a configuration without a payload: 400).
    let (code, _) = serve.put("vm.create", serde_json::json!({}));
    drop(serve);
    assert!(modes.iter().all(|(_, m)| m == "2"), "{modes:?}");
    for kind in ["podvisor", "vmm", "api-server", "api"] {
        assert!(
            modes.iter().any(|(t, _)| t == kind),
            "no {kind} thread: {modes:?}"
        );
    }
    assert_eq!(code, 400);

    let serve = Serve::start_with("seccomp-off", &[], &["--seccomp=off"]);
    let modes = seccomp_modes(serve.child.id());
    drop(serve);
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
}

#[test]
fn a_seccomp_mode_that_does_not_exist_is_one_line_of_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args([
            "serve",
            "--seccomp=maybe",
            "--api-socket",
            "/tmp/podvisor-never.sock",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("'maybe' is not a seccomp mode (on, log or off)"),
        "{err}"
    );
}
