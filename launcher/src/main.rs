//! `podvisor`: boots a VM from the command line (and, as a pod's entrypoint, serves its API).

mod attach;
mod cli;
mod cloudinit;
mod ctl;
mod kubevirt;
mod podnet;
mod terminal;
mod vmm_service;

use std::process::ExitCode;

use clap::Parser;
use vmm::controller::{Controller, Request};

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors are one line on stderr.
            let code = if e.use_stderr() { 2 } else { 0 };
            if e.use_stderr() {
                let text = e.to_string();
                let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
                let mut first = lines.next().unwrap_or("invalid arguments").to_owned();
                // "the following required arguments were not provided:" names them below.
                if first.ends_with(':') {
                    if let Some(next) = lines.next() {
                        first = format!("{first} {next}");
                    }
                }
                eprintln!(
                    "podvisor: error: {} (see 'podvisor --help')",
                    first.trim_start_matches("error: ")
                );
            } else {
                let _ = e.print();
            }
            return ExitCode::from(code);
        }
    };
    let logger = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if std::env::var_os("PODVISOR_LOG").is_some() {
        logger
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("PODVISOR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init();
    } else {
        // No filter to parse: a plain level keeps the filter's regex engine out of every
        // start (faster start, less memory).
        logger.with_max_level(tracing::Level::WARN).init();
    }
    // A VMM (not `ctl`) limits itself before it starts any thread.
    let vmm = !matches!(cli.command, cli::Command::Ctl(_));
    let core_dumps = std::env::var_os("PODVISOR_CORE_DUMPS").is_some_and(|v| v == "1");
    if let Err(e) = vmm
        .then(|| {
            vmm::privileges::limit_process(core_dumps)?;
            vmm::seccomp::init(cli.seccomp).map_err(|e| e.to_string())
        })
        .transpose()
    {
        eprintln!("podvisor: error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        cli::Command::Run(args) => run(*args),
        cli::Command::Serve(args) => serve(args),
        // Stdout unlocked: `ctl console` writes the guest's output from a thread of its own.
        cli::Command::Ctl(args) => ctl::run(&args, &mut std::io::stdout()),
        cli::Command::Launcher(args) => match launcher(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("podvisor: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: cli::RunArgs) -> Result<(), String> {
    if let Some(dir) = &args.restore {
        // The snapshot's VM, restored and resumed at once.
        let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Its console on this terminal: raw, as for a boot (an unreadable snapshot is
        // refused by the restore itself).
        let tty = vmm::snapshot::read(&dir)
            .is_ok_and(|s| s.config.serial == vmm::config::ConsoleConfig::Tty);
        let _raw = tty.then(terminal::RawMode::enable_on_stdin).flatten();
        let net = args.net_tap.clone();
        return run_vm(
            &args.vmm()?,
            vec![Request::Restore(dir, net), Request::Resume],
        );
    }
    if let Some(url) = &args.receive_migration {
        let endpoint = vmm::migration::Endpoint::parse(url).map_err(|e| e.to_string())?;
        let net = args.net_tap.clone();
        return run_vm(&args.vmm()?, vec![Request::ReceiveMigration(endpoint, net)]);
    }
    let mut config = args.to_config()?;
    if args.list_boot_entries {
        if config.disks.is_empty() {
            return Err("--list-boot-entries: no --disk given".into());
        }
        print!(
            "{}",
            vmm::boot::disk::list(&config).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    // Kept open (and nowhere on the file system) while the VM runs.
    let _seed = args
        .cloud_init
        .as_deref()
        .map(|spec| attach_cloud_init(&mut config, spec))
        .transpose()?;
    config.validate().map_err(|e| e.to_string())?;
    // The console's stdin pump starts with the VM; the terminal goes raw first.
    let _raw = (config.serial == vmm::config::ConsoleConfig::Tty)
        .then(terminal::RawMode::enable_on_stdin)
        .flatten();
    run_vm(
        &args.vmm()?,
        vec![Request::Create(Box::new(config)), Request::Boot],
    )
}

/// `--cloud-init user-data=FILE[,meta-data=FILE][,network-config=FILE]`: builds the NoCloud
/// seed disk and attaches it read-only as the last disk. The image is an unlinked file the
/// VM reads through `/proc/self/fd`: it goes with the process, however that ends.
fn attach_cloud_init(
    config: &mut vmm::config::VmConfig,
    spec: &str,
) -> Result<std::fs::File, String> {
    let bad = |why: String| format!("--cloud-init {spec}: {why}");
    let mut files: [Option<Vec<u8>>; 3] = Default::default();
    for part in spec.split(',') {
        let (key, path) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("'{part}' is not KEY=FILE")))?;
        let slot = match key {
            "user-data" => 0,
            "meta-data" => 1,
            "network-config" => 2,
            other => {
                return Err(bad(format!(
                    "unknown key '{other}' (user-data, meta-data, network-config)"
                )))
            }
        };
        let data = std::fs::read(path).map_err(|e| bad(format!("cannot read {path}: {e}")))?;
        files[slot] = Some(data);
    }
    let user_data = files[0]
        .as_deref()
        .ok_or_else(|| bad("user-data=FILE is missing".into()))?;
    let image = cloudinit::nocloud_files(user_data, files[1].as_deref(), files[2].as_deref());
    let path = std::env::temp_dir().join(format!("podvisor-cidata-{}.iso", std::process::id()));
    let failed = |e: std::io::Error| bad(format!("cannot write the seed disk: {e}"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(failed)?;
    let written = std::io::Write::write_all(&mut file, &image);
    let _ = std::fs::remove_file(&path);
    written.map_err(failed)?;
    let disk = format!(
        "path=/proc/self/fd/{},format=raw,readonly=on,serial=cidata",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    );
    config
        .disks
        .push(vmm::config::DiskConfig::parse(&disk).map_err(|e| bad(e.to_string()))?);
    Ok(file)
}

/// The launcher's exit status when the guest did not power off within the grace period and
/// its VM was stopped (1 is any other failure, 0 a guest that powered off).
pub const EXIT_STOPPED_HARD: u8 = 3;

/// `podvisor launcher`: a VMI checked, shown, or run.
fn launcher(args: cli::LauncherArgs) -> Result<ExitCode, String> {
    let text = match &args.vmi {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("cannot read the VMI from stdin: {e}"))?;
            text
        }
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the VMI {}: {e}", path.display()))?,
        None => std::env::var("PODVISOR_VMI")
            .map_err(|_| "no VMI: give --vmi FILE (or -), or set PODVISOR_VMI".to_owned())?,
    };
    let vmi = kubevirt::parse(&text).map_err(|e| format!("the VMI: {e}"))?;
    let options = kubevirt::Options {
        layout: kubevirt::PodLayout::new(&args.pod_root),
        no_network: args.no_network,
    };
    let launch = kubevirt::translate(&vmi, &options).map_err(|errors| {
        let n = errors.0.len();
        format!(
            "the VMI has {n} problem{}:\n  {}",
            if n == 1 { "" } else { "s" },
            errors.0.join("\n  ")
        )
    })?;
    for warning in &launch.warnings {
        eprintln!("podvisor: warning: {warning}");
    }
    if args.validate {
        println!("VMI {}/{} is valid", launch.namespace, launch.name);
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = launch.config;
    if args.dry_run {
        let json = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(ExitCode::SUCCESS);
    }
    reap_orphans_as_pid_1();
    let mut files = kubevirt::volumes::prepare(&launch.prepare, &mut config)?;
    // The guest's taps on the pod's networks, before the VM opens them; unwired when this
    // ends (declared after `files`: dropped before it, while its folders still exist).
    let specs = kubevirt::network::bridge_specs(&launch.nics, &options.layout, &launch.name);
    for spec in &specs {
        files.folders_for(&spec.saved)?;
    }
    let _network = podnet::PodNetwork::wire(specs).map_err(|e| e.to_string())?;
    // In a pod the console is a socket and stdout is the pod's log, of events.
    let mut event_monitor = args.event_monitor.clone();
    if !args.console_stdio {
        let socket = options
            .layout
            .console_socket(&launch.namespace, &launch.name);
        files.folders_for(&socket)?;
        config.serial = vmm::config::ConsoleConfig::Socket(socket);
        event_monitor.get_or_insert_with(|| "fd=1".to_owned());
    }
    config.validate().map_err(|e| e.to_string())?;
    let api_socket = args
        .api_socket
        .clone()
        .unwrap_or_else(|| options.layout.api_socket(&launch.namespace, &launch.name));
    files.folders_for(&api_socket)?;
    let allow_paths = if args.allow_paths.is_empty() {
        vec![args.pod_root.clone()]
    } else {
        args.allow_paths.clone()
    };
    let vmm = VmmArgs {
        api_socket: Some(api_socket),
        http_listen: args.http_listen,
        event_monitor,
        pvm_guest: args.pvm_guest,
        grace_period: Some(std::time::Duration::from_secs(launch.grace_period_s)),
        drop_privileges: true,
        host_paths: cli::api_host_paths(true, &allow_paths)?,
    };
    let ready = args
        .ready_file
        .clone()
        .unwrap_or_else(|| options.layout.ready_file());
    files.folders_for(&ready)?;
    match run_vm_then(
        &vmm,
        vec![Request::Create(Box::new(config)), Request::Boot],
        || {
            // The guest runs: the pod is ready (an exec probe tests the file).
            if let Err(e) = std::fs::write(&ready, b"ready\n") {
                tracing::warn!("cannot write the readiness file {}: {e}", ready.display());
            }
        },
    ) {
        Ok(Outcome::Ended) => {
            let _ = std::fs::remove_file(&ready);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Outcome::StoppedHard) => {
            let _ = std::fs::remove_file(&ready);
            eprintln!(
                "podvisor: error: the guest did not power off within {} s of SIGTERM: its VM \
                 was stopped",
                launch.grace_period_s
            );
            Ok(ExitCode::from(EXIT_STOPPED_HARD))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&ready);
            Err(e)
        }
    }
}

/// As PID 1 of its container, the launcher inherits orphaned processes: it reaps them, so
/// that none stays a zombie (it starts none itself).
fn reap_orphans_as_pid_1() {
    if std::process::id() != 1 {
        return;
    }
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(|| {
        vmm::seccomp::apply_or_exit(vmm::seccomp::Kind::Vmm);
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the child's status into `status`, which lives
            // across the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid <= 0 {
                // No child to wait for now.
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    });
}

/// How a VM served by [`run_vm`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off, or the VMM was told to end.
    Ended,
    /// The grace period after SIGTERM ran out and the VM was stopped.
    StoppedHard,
}

/// How a VM thread is started and served, whichever command asks.
pub struct VmmArgs {
    pub api_socket: Option<std::path::PathBuf>,
    /// Where to serve `/readyz` and `/metrics` over TCP, if anywhere.
    pub http_listen: Option<std::net::SocketAddr>,
    pub event_monitor: Option<String>,
    pub pvm_guest: bool,
    /// After SIGTERM (which presses the power button), how long the guest has to power off
    /// before its VM is stopped hard (a pod's terminationGracePeriodSeconds); None: no limit.
    pub grace_period: Option<std::time::Duration>,
    /// Once the VM runs, give up every capability but file access (the launcher).
    pub drop_privileges: bool,
    /// Which host files the API's configurations may name.
    pub host_paths: vmm::host_paths::HostPaths,
}

/// Starts the VM thread, sends it `start` (ending it at the first failure) and serves until
/// the VM ends.
fn run_vm(args: &VmmArgs, start: Vec<Request>) -> Result<(), String> {
    match run_vm_then(args, start, || {})? {
        Outcome::Ended => Ok(()),
        Outcome::StoppedHard => Err("the VM was stopped at the end of its grace period".into()),
    }
}

/// [`run_vm`], calling `started` once the start requests succeeded.
fn run_vm_then(
    args: &VmmArgs,
    start: Vec<Request>,
    started: impl FnOnce(),
) -> Result<Outcome, String> {
    let events = event_monitor(args.event_monitor.as_deref())?;
    let options = run_options(args.pvm_guest, args.drop_privileges, &args.host_paths)?;
    let listeners = vmm_service::Listeners::bind(args.api_socket.as_deref(), args.http_listen)?;
    let (controller, thread) =
        Controller::start(options, events, true).map_err(|e| e.to_string())?;
    for request in start {
        if let Err(e) = controller.handle(request) {
            let _ = controller.handle(Request::ShutdownVmm);
            let _ = thread.join();
            return Err(e.to_string());
        }
    }
    started();
    if args.drop_privileges {
        // The VM's thread dropped its own at the boot; this one serves the API.
        vmm::privileges::drop_after_setup()?;
    }
    vmm::seccomp::apply(vmm::seccomp::Kind::Vmm).map_err(|e| e.to_string())?;
    let stopped_hard = args
        .grace_period
        .map(|grace| stop_after_grace(grace, controller.clone()))
        .transpose()?;
    vmm_service::serve_until_end(listeners, controller, thread, args.host_paths.clone())?;
    if stopped_hard.is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire)) {
        return Ok(Outcome::StoppedHard);
    }
    Ok(Outcome::Ended)
}

/// Once SIGTERM has come, waits `grace` and then stops the VM (the returned flag tells).
fn stop_after_grace(
    grace: std::time::Duration,
    controller: Controller,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let term = std::sync::Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let stopped = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    std::thread::Builder::new()
        .name("grace".into())
        .spawn(move || {
            while !term.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            std::thread::sleep(grace);
            flag.store(true, Ordering::Release);
            // The VM thread may have ended already (a clean power-off): nothing to stop.
            if controller.handle(Request::ShutdownVmm).is_err() {
                flag.store(false, Ordering::Release);
            }
        })
        .map_err(|e| format!("cannot start the grace-period thread: {e}"))?;
    Ok(stopped)
}

fn serve(args: cli::ServeArgs) -> Result<(), String> {
    let events = event_monitor(args.event_monitor.as_deref())?;
    let host_paths = cli::api_host_paths(true, &args.allow_paths)?;
    let options = run_options(args.pvm_guest, false, &host_paths)?;
    let listeners = vmm_service::Listeners::bind(Some(&args.api_socket), args.http_listen)?;
    let (controller, thread) =
        Controller::start(options, events, false).map_err(|e| e.to_string())?;
    vmm::seccomp::apply(vmm::seccomp::Kind::Vmm).map_err(|e| e.to_string())?;
    vmm_service::serve_until_end(listeners, controller, thread, host_paths)
}

fn event_monitor(spec: Option<&str>) -> Result<vmm::events::EventMonitor, String> {
    spec.map(vmm_service::parse_event_monitor)
        .transpose()
        .map(Option::unwrap_or_default)
}

fn run_options(
    pvm_guest: bool,
    drop_privileges: bool,
    host_paths: &vmm::host_paths::HostPaths,
) -> Result<vmm::RunOptions, String> {
    let options = vmm::RunOptions {
        pvm_guest,
        drop_privileges,
        host_paths: host_paths.clone(),
        ..Default::default()
    };
    // A pod being deleted gets SIGTERM: shut the guest down cleanly, as a power button would.
    signal_hook::flag::register(signal_hook::consts::SIGTERM, options.power_button.clone())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    Ok(options)
}
