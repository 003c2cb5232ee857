//! `podvisor`: boots a VM from the command line (and, as a pod's entrypoint, serves its API).

mod cli;
mod ctl;
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
    let result = match cli.command {
        cli::Command::Run(args) => run(*args),
        cli::Command::Serve(args) => serve(args),
        cli::Command::Ctl(args) => ctl::run(&args, &mut std::io::stdout().lock()),
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
        return run_vm(&args, vec![Request::Restore(dir, net), Request::Resume]);
    }
    if let Some(url) = &args.receive_migration {
        let endpoint = vmm::migration::Endpoint::parse(url).map_err(|e| e.to_string())?;
        let net = args.net_tap.clone();
        return run_vm(&args, vec![Request::ReceiveMigration(endpoint, net)]);
    }
    let config = args.to_config()?;
    config.validate().map_err(|e| e.to_string())?;
    // The console's stdin pump starts with the VM; the terminal goes raw first.
    let _raw = (config.serial == vmm::config::ConsoleConfig::Tty)
        .then(terminal::RawMode::enable_on_stdin)
        .flatten();
    run_vm(
        &args,
        vec![Request::Create(Box::new(config)), Request::Boot],
    )
}

/// Starts the VM thread for `podvisor run`, sends it `start` (ending it at the first
/// failure) and serves until the VM ends.
fn run_vm(args: &cli::RunArgs, start: Vec<Request>) -> Result<(), String> {
    let events = event_monitor(args.event_monitor.as_deref())?;
    let options = run_options(args.pvm_guest)?;
    let (controller, thread) =
        Controller::start(options, events, true).map_err(|e| e.to_string())?;
    for request in start {
        if let Err(e) = controller.handle(request) {
            let _ = controller.handle(Request::ShutdownVmm);
            let _ = thread.join();
            return Err(e.to_string());
        }
    }
    vmm_service::serve_until_end(args.api_socket.as_deref(), controller, thread)
}

fn serve(args: cli::ServeArgs) -> Result<(), String> {
    let events = event_monitor(args.event_monitor.as_deref())?;
    let options = run_options(args.pvm_guest)?;
    let (controller, thread) =
        Controller::start(options, events, false).map_err(|e| e.to_string())?;
    vmm_service::serve_until_end(Some(&args.api_socket), controller, thread)
}

fn event_monitor(spec: Option<&str>) -> Result<vmm::events::EventMonitor, String> {
    spec.map(vmm_service::parse_event_monitor)
        .transpose()
        .map(Option::unwrap_or_default)
}

fn run_options(pvm_guest: bool) -> Result<vmm::RunOptions, String> {
    let options = vmm::RunOptions {
        pvm_guest,
        ..Default::default()
    };
    // A pod being deleted gets SIGTERM: shut the guest down cleanly, as a power button would.
    signal_hook::flag::register(signal_hook::consts::SIGTERM, options.power_button.clone())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    Ok(options)
}
