//! `podvisor ctl`: one request to a running podvisor's API socket, its JSON answer on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API socket of the podvisor to talk to.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub action: CtlAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CtlAction {
    /// Check that the VMM answers (vmm.ping).
    Ping,
    /// The VM's configuration and state (vm.info).
    Info,
    /// Per-device counters (vm.counters).
    Counters,
    /// Create the VM from a VmConfig JSON file, `-` for stdin (vm.create).
    Create {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Boot the created VM (vm.boot).
    Boot,
    /// Pause the running VM (vm.pause).
    Pause,
    /// Resume the paused VM (vm.resume).
    Resume,
    /// Shut the VM down (vm.shutdown).
    Shutdown,
    /// Reboot the VM (vm.reboot).
    Reboot,
    /// Press the VM's power button (vm.power-button).
    PowerButton,
    /// Delete the VM (vm.delete).
    Delete,
    /// Write a snapshot of the paused VM into DIR, absent or empty (vm.snapshot).
    Snapshot {
        #[arg(value_name = "DIR|file:///DIR")]
        destination: String,
    },
    /// Bring back, paused, the VM snapshotted in DIR (vm.restore); `resume` continues it.
    Restore {
        #[arg(value_name = "DIR|file:///DIR")]
        source: String,
        /// Put the VM's network interface ID on tap TAP instead of the snapshot's (repeatable).
        #[arg(long, value_name = "ID=TAP", value_parser = vmm::config::NetRetap::parse)]
        net_tap: Vec<vmm::config::NetRetap>,
    },
    /// Live-migrate the running VM to a podvisor waiting in receive-migration
    /// (vm.send-migration); returns once the guest runs there.
    SendMigration {
        #[arg(value_name = "unix:/PATH|tcp:HOST:PORT")]
        destination: String,
        /// The longest pause of the guest for the last pass, in ms (default 300).
        #[arg(long, value_name = "MS")]
        downtime_limit_ms: Option<u64>,
        /// At most this many bytes per second (default: no limit).
        #[arg(long, value_name = "BYTES")]
        bandwidth_limit: Option<u64>,
        /// Give up, the VM running on here, when memory has not converged after this long
        /// (default 600).
        #[arg(long, value_name = "SECONDS")]
        completion_timeout_s: Option<u64>,
        /// Slow the guest down while it writes memory faster than it can be sent.
        #[arg(long)]
        auto_converge: bool,
        /// Both podvisors on this host (unix:/PATH): hand the guest memory over instead of
        /// copying it.
        #[arg(long)]
        local: bool,
    },
    /// Wait for a source's send-migration and run its VM here (vm.receive-migration);
    /// returns once the guest runs here.
    ReceiveMigration {
        #[arg(value_name = "unix:/PATH|tcp:HOST:PORT")]
        receiver: String,
        /// Put the VM's network interface ID on tap TAP instead of the source's (repeatable).
        #[arg(long, value_name = "ID=TAP", value_parser = vmm::config::NetRetap::parse)]
        net_tap: Vec<vmm::config::NetRetap>,
    },
    /// Stop the outgoing migration under way (vm.cancel-migration); the guest runs on at the
    /// source.
    CancelMigration,
    /// End the podvisor process (vmm.shutdown).
    ShutdownVmm,
    /// Attach this terminal to the VM's serial console (serial mode Socket); Ctrl-] detaches.
    Console,
    /// Print the VM's metrics in Prometheus' text format (vmm.metrics).
    Metrics,
}

impl CtlAction {
    /// HTTP method and endpoint.
    fn route(&self) -> (&'static str, &'static str) {
        match self {
            CtlAction::Ping => ("GET", "vmm.ping"),
            CtlAction::Info => ("GET", "vm.info"),
            CtlAction::Counters => ("GET", "vm.counters"),
            CtlAction::Create { .. } => ("PUT", "vm.create"),
            CtlAction::Boot => ("PUT", "vm.boot"),
            CtlAction::Pause => ("PUT", "vm.pause"),
            CtlAction::Resume => ("PUT", "vm.resume"),
            CtlAction::Shutdown => ("PUT", "vm.shutdown"),
            CtlAction::Reboot => ("PUT", "vm.reboot"),
            CtlAction::PowerButton => ("PUT", "vm.power-button"),
            CtlAction::Delete => ("PUT", "vm.delete"),
            CtlAction::Snapshot { .. } => ("PUT", "vm.snapshot"),
            CtlAction::Restore { .. } => ("PUT", "vm.restore"),
            CtlAction::SendMigration { .. } => ("PUT", "vm.send-migration"),
            CtlAction::ReceiveMigration { .. } => ("PUT", "vm.receive-migration"),
            CtlAction::CancelMigration => ("PUT", "vm.cancel-migration"),
            CtlAction::ShutdownVmm => ("PUT", "vmm.shutdown"),
            CtlAction::Console => ("GET", "vm.info"),
            CtlAction::Metrics => ("GET", "vmm.metrics"),
        }
    }
}

/// Sends the request and writes the answer's JSON (pretty-printed) to `out`. An error answer
/// or an unreachable socket is an `Err` with one line for the user.
pub fn run(args: &CtlArgs, out: &mut dyn Write) -> Result<(), String> {
    if args.action == CtlAction::Console {
        return crate::attach::console(&args.api_socket);
    }
    let (method, endpoint) = args.action.route();
    let body = request_body(&args.action)?;
    let mut client = api::Client::connect(&args.api_socket).map_err(|e| e.to_string())?;
    if matches!(
        args.action,
        CtlAction::SendMigration { .. } | CtlAction::ReceiveMigration { .. }
    ) {
        // A migration answers when it is over: waiting for the source (up to 600 s), then
        // as long as the copy takes (up to its completion timeout).
        client.set_timeout(std::time::Duration::from_secs(3600));
    }
    let progress = matches!(args.action, CtlAction::SendMigration { .. })
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shown = progress.then(|| show_progress(args.api_socket.clone()));
    let reply = client.request(method, endpoint, body.as_deref());
    if let Some((done, thread)) = shown {
        done.store(true, std::sync::atomic::Ordering::Release);
        let _ = thread.join();
    }
    let reply = reply.map_err(|e| e.to_string())?;
    if !reply.is_success() {
        return Err(format!(
            "{endpoint}: {} {}",
            reply.status,
            reply.error_message()
        ));
    }
    if !reply.body.is_empty() {
        let text = match serde_json::from_slice::<serde_json::Value>(&reply.body) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&reply.body).into_owned(),
        };
        writeln!(out, "{text}").map_err(|e| format!("cannot write the answer: {e}"))?;
    }
    Ok(())
}

/// Shows a migration's progress (`vm.info`'s `migration`, polled on a connection of its own)
/// on one line of stderr until `done` is set.
fn show_progress(
    socket: PathBuf,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let thread = std::thread::spawn(move || {
        let Ok(mut client) = api::Client::connect(&socket) else {
            return;
        };
        let mut shown = false;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok(reply) = client.request("GET", "vm.info", None) {
                let info: serde_json::Value =
                    serde_json::from_slice(&reply.body).unwrap_or_default();
                if let Some(line) = progress_line(&info["migration"]) {
                    eprint!("\r\x1b[K{line}");
                    shown = true;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        if shown {
            eprintln!();
        }
    });
    (done, thread)
}

/// One line of a migration's progress, from `vm.info`'s `migration`.
fn progress_line(m: &serde_json::Value) -> Option<String> {
    let n = |key: &str| m[key].as_u64().unwrap_or(0);
    let sent = n("bytes_sent") >> 20;
    let left = n("bytes_left") >> 20;
    let bar_len = 30u64;
    let filled = (bar_len * sent).checked_div(sent + left).unwrap_or(0);
    m.get("round")?;
    Some(format!(
        "[{}{}] round {}: {sent} MiB sent, {left} MiB left, {} pages/s written, {} ms expected downtime, throttle {}%",
        "#".repeat(filled as usize),
        " ".repeat((bar_len - filled) as usize),
        n("round"),
        n("dirty_pages_per_s"),
        n("expected_downtime_ms"),
        n("throttle_percent"),
    ))
}

/// The JSON body `action` sends (None: no body).
fn request_body(action: &CtlAction) -> Result<Option<Vec<u8>>, String> {
    Ok(match action {
        CtlAction::Create { file } => Some(read_config(file)?),
        CtlAction::Snapshot { destination } => Some(
            url_body("destination_url", destination)?
                .to_string()
                .into_bytes(),
        ),
        CtlAction::Restore { source, net_tap } => {
            let mut body = url_body("source_url", source)?;
            if !net_tap.is_empty() {
                body["net"] = serde_json::json!(net_tap);
            }
            Some(body.to_string().into_bytes())
        }
        CtlAction::SendMigration {
            destination,
            downtime_limit_ms,
            bandwidth_limit,
            completion_timeout_s,
            auto_converge,
            local,
        } => {
            let mut body = serde_json::json!({ "destination_url": destination });
            if *auto_converge {
                body["auto_converge"] = true.into();
            }
            if *local {
                body["local"] = true.into();
            }
            for (key, value) in [
                ("downtime_limit_ms", downtime_limit_ms),
                ("bandwidth_limit", bandwidth_limit),
                ("completion_timeout_s", completion_timeout_s),
            ] {
                if let Some(v) = value {
                    body[key] = (*v).into();
                }
            }
            Some(body.to_string().into_bytes())
        }
        CtlAction::ReceiveMigration { receiver, net_tap } => {
            let mut body = serde_json::json!({ "receiver_url": receiver });
            if !net_tap.is_empty() {
                body["net"] = serde_json::json!(net_tap);
            }
            Some(body.to_string().into_bytes())
        }
        _ => None,
    })
}

/// `{"KEY": "file:///DIR"}` for a directory given as a path (made absolute) or already as a
/// URL: the body of `vm.snapshot` and `vm.restore`.
fn url_body(key: &str, dir: &str) -> Result<serde_json::Value, String> {
    let url = if dir.contains("://") {
        dir.to_owned()
    } else {
        let path = std::path::absolute(dir).map_err(|e| format!("{dir}: {e}"))?;
        format!("file://{}", path.display())
    };
    Ok(serde_json::json!({ key: url }))
}

fn read_config(file: &Path) -> Result<Vec<u8>, String> {
    let result = if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf)
    } else {
        std::fs::read(file)
    };
    result.map_err(|e| format!("cannot read VM config {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(progress_line(&serde_json::Value::Null), None);
        let m = serde_json::json!({"state": "Sending", "round": 4, "bytes_sent": 300u64 << 20,
            "bytes_left": 100u64 << 20, "dirty_pages_per_s": 2500, "expected_downtime_ms": 800,
            "throttle_percent": 45});
        assert_eq!(
            progress_line(&m).unwrap(),
            format!(
                "[{}{}] round 4: 300 MiB sent, 100 MiB left, 2500 pages/s written, 800 ms \
                 expected downtime, throttle 45%",
                "#".repeat(22),
                " ".repeat(8)
            )
        );
    }

    struct Fixture {
        dir: PathBuf,
        server: Option<api::ApiServer>,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("podvisor-ctl-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let server =
                api::serve(&dir.join("api.sock"), Arc::new(api::fake::FakeVmm::new())).unwrap();
            Fixture {
                dir,
                server: Some(server),
            }
        }

        fn ctl(&self, action: CtlAction) -> Result<String, String> {
            let args = CtlArgs {
                api_socket: self.dir.join("api.sock"),
                action,
            };
            let mut out = Vec::new();
            run(&args, &mut out).map(|()| String::from_utf8(out).unwrap())
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if let Some(server) = self.server.take() {
                server.shutdown();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_session() {
        let f = Fixture::new("session");
        let ping = f.ctl(CtlAction::Ping).unwrap();
        assert!(ping.contains("\"version\""), "{ping}");
        let err = f.ctl(CtlAction::Info).unwrap_err();
        assert!(err.starts_with("vm.info: 404 "), "{err}");
        let config = f.dir.join("vm.json");
        std::fs::write(
            &config,
            r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":268435456}}"#,
        )
        .unwrap();
        let create = CtlAction::Create {
            file: config.clone(),
        };
        assert_eq!(f.ctl(create.clone()).unwrap(), "");
        let err = f.ctl(create).unwrap_err();
        assert!(err.starts_with("vm.create: 409 "), "{err}");
        let err = f.ctl(CtlAction::Pause).unwrap_err();
        assert_eq!(
            err,
            "vm.pause: 409 vm.pause: the VM is Created; it must be Running"
        );
        for action in [
            CtlAction::Boot,
            CtlAction::Pause,
            CtlAction::Resume,
            CtlAction::Reboot,
            CtlAction::PowerButton,
            CtlAction::Shutdown,
        ] {
            assert_eq!(f.ctl(action.clone()), Ok(String::new()), "{action:?}");
        }
        let info = f.ctl(CtlAction::Info).unwrap();
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["state"], "Shutdown");
        assert!(info.contains("\n  \"config\""), "pretty-printed: {info}");
        assert_eq!(f.ctl(CtlAction::Counters).unwrap().trim(), "{}");
        let metrics = f.ctl(CtlAction::Metrics).unwrap();
        assert!(
            metrics.contains("kubevirt_vmi_state{state=\"Shutdown\"} 1"),
            "{metrics}"
        );
        assert_eq!(f.ctl(CtlAction::Delete), Ok(String::new()));
        assert_eq!(f.ctl(CtlAction::ShutdownVmm), Ok(String::new()));
    }

    #[test]
    fn bad_input_and_no_server() {
        let f = Fixture::new("bad");
        let bad = f.dir.join("bad.json");
        std::fs::write(&bad, "{\"payload\": 3}").unwrap();
        let err = f.ctl(CtlAction::Create { file: bad }).unwrap_err();
        assert!(err.starts_with("vm.create: 400 invalid VmConfig"), "{err}");
        let err = f
            .ctl(CtlAction::Create {
                file: f.dir.join("missing.json"),
            })
            .unwrap_err();
        assert!(err.starts_with("cannot read VM config"), "{err}");
        let args = CtlArgs {
            api_socket: f.dir.join("nobody.sock"),
            action: CtlAction::Ping,
        };
        let err = run(&args, &mut Vec::new()).unwrap_err();
        assert!(err.starts_with("cannot reach podvisor at "), "{err}");
        assert!(err.contains("nobody.sock"), "{err}");
    }

    #[test]
    fn restore_and_receive_name_other_taps() {
        use clap::Parser;
        let body = |args: &[&str]| -> serde_json::Value {
            let cli = crate::cli::Cli::try_parse_from(
                ["podvisor", "ctl", "--api-socket", "/a.sock"]
                    .iter()
                    .chain(args),
            )
            .unwrap();
            let crate::cli::Command::Ctl(ctl) = cli.command else {
                panic!("not ctl")
            };
            serde_json::from_slice(&request_body(&ctl.action).unwrap().unwrap()).unwrap()
        };
        assert_eq!(
            body(&[
                "restore",
                "/s",
                "--net-tap",
                "_net0=tap7",
                "--net-tap",
                "data=t2"
            ]),
            serde_json::json!({"source_url": "file:///s",
                "net": [{"id": "_net0", "tap": "tap7"}, {"id": "data", "tap": "t2"}]})
        );
        assert_eq!(
            body(&["restore", "file:///s"]),
            serde_json::json!({"source_url": "file:///s"})
        );
        assert_eq!(
            body(&["receive-migration", "unix:/m", "--net-tap", "a=b"]),
            serde_json::json!({"receiver_url": "unix:/m", "net": [{"id": "a", "tap": "b"}]})
        );
        let err = crate::cli::Cli::try_parse_from([
            "podvisor",
            "ctl",
            "--api-socket",
            "/a",
            "restore",
            "/s",
            "--net-tap",
            "tap7",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("'tap7' is not ID=TAP"), "{err}");
    }
}
