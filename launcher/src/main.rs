//! `podvisor`: boots a VM from the command line (and, as a pod's entrypoint, serves its API).

mod cli;
mod ctl;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors are one line on stderr.
            let code = if e.use_stderr() { 2 } else { 0 };
            if e.use_stderr() {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        cli::Command::Run(args) => run(args),
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
    let config = args.to_config()?;
    config.validate().map_err(|e| e.to_string())?;
    let console = vmm::Console::new(&config.serial).map_err(|e| e.to_string())?;
    let _raw = if console.wants_stdin {
        let raw = terminal::RawMode::enable_on_stdin();
        console
            .spawn_input(std::io::stdin())
            .map_err(|e| format!("cannot start console input: {e}"))?;
        raw
    } else {
        None
    };
    let options = vmm::RunOptions {
        pvm_guest: args.pvm_guest,
        ..Default::default()
    };
    // A pod being deleted gets SIGTERM: shut the guest down cleanly, as a power button would.
    signal_hook::flag::register(signal_hook::consts::SIGTERM, options.power_button.clone())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    vmm::run(&config, &console, &options).map_err(|e| e.to_string())
}
