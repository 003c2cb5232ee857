//! End-to-end scenarios: the `podvisor` binary boots the default guest
//! (`resources/guest/build.sh`) and the tests read its console like a person would.
//!
//! They need hardware KVM. On a machine without it (PVM, or no /dev/kvm) this binary runs
//! each scenario in its own session of the test host (`resources/testhost/run.sh`), which
//! has real KVM: one scenario that brings the emulated test host down does not take the
//! others with it, and such a scenario gets another session (only then; see `TESTHOST_TRIES`).

mod api;
mod boot;
mod devices;
mod diskboot;
mod disks;
mod harness;
mod launcher;
mod net;
mod podnet;

use std::process::{Command, Stdio};
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use harness::{hardware_kvm, repo_root, under_timeout};

/// run.sh's exit code when the test host itself failed (not the command it ran).
const TESTHOST_FAILED: i32 = 125;
/// `timeout`'s exit code when a scenario's whole test-host session took too long.
const SESSION_TIMED_OUT: i32 = 124;
/// The longest one scenario's test-host session may take (every wait inside a scenario has
/// its own, shorter limit; this one catches a wedged test host).
const SESSION_LIMIT_S: u32 = 600;

fn scenarios() -> Vec<Trial> {
    let mut trials = boot::trials();
    trials.extend(devices::trials());
    trials.extend(disks::trials());
    trials.extend(net::trials());
    trials.extend(api::trials());
    trials.extend(launcher::trials());
    trials.extend(podnet::trials());
    trials.extend(diskboot::trials());
    trials
}

/// Test-host sessions a scenario gets when the test host itself fails (its kernel panics or
/// locks up, exit 125), its session times out, or it froze the scenario's guest with every vCPU
/// inside `KVM_RUN` or made its kernel panic (`harness::SESSION_SUSPECT`): the emulated host
/// does all of these now and then; podvisor's own failures are never tried again, nor is a
/// guest that panicked in two sessions.
const TESTHOST_TRIES: usize = 3;

/// Runs scenario `name` of this binary in a fresh test-host session.
fn in_testhost(name: &str) -> Result<(), Failed> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut earlier: Vec<String> = Vec::new();
    for attempt in 1..=TESTHOST_TRIES {
        let start = Instant::now();
        let out = under_timeout(
            SESSION_LIMIT_S,
            10,
            repo_root().join("resources/testhost/run.sh"),
        )
        .arg(&exe)
        .args(["--exact", name, "--test-threads", "1", "--color", "never"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run resources/testhost/run.sh: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            if !text.contains("1 passed") {
                return Err(format!("the scenario did not run in the test host:\n{text}").into());
            }
            // Beside "ok": what the scenario costs the suite (CI's time budget).
            eprint!("({:.0?}) ", start.elapsed());
            if !earlier.is_empty() {
                eprintln!(
                    "{name}: the test host failed {} time(s) before the scenario passed:\n{}",
                    earlier.len(),
                    earlier.join("\n")
                );
            }
            return Ok(());
        }
        // A guest that panicked in an earlier session too panics because of podvisor.
        let panicked_again = text.contains(harness::GUEST_PANICKED)
            && earlier.iter().any(|t| t.contains(harness::GUEST_PANICKED));
        // So does a guest that reset itself (a triple fault) in an earlier session too.
        let reset = text.contains(harness::GUEST_TRIPLE_FAULT);
        let reset_again = reset
            && earlier
                .iter()
                .any(|t| t.contains(harness::GUEST_TRIPLE_FAULT));
        let retry = matches!(out.status.code(), Some(TESTHOST_FAILED | SESSION_TIMED_OUT))
            || (text.contains(harness::SESSION_SUSPECT) && !panicked_again)
            || (reset && !reset_again);
        if !retry || attempt == TESTHOST_TRIES {
            let prior: String = earlier
                .iter()
                .enumerate()
                .map(|(i, t)| format!("--- try {} ---\n{t}\n", i + 1))
                .collect();
            return Err(format!("{prior}--- try {attempt} ---\n{text}").into());
        }
        earlier.push(format!("({:.0?}) {text}", start.elapsed()));
    }
    unreachable!("the loop returns on its last try")
}

fn main() {
    let mut args = Arguments::from_args();
    // One guest at a time: the test host emulates its CPUs in software, and two nested guests
    // competing for them only make every boot slower.
    args.test_threads.get_or_insert(1);
    let trials = scenarios();
    if std::env::var_os("PODVISOR_TESTHOST").is_some() {
        // Inside the test host, started by the branch below (which built the guest).
        libtest_mimic::run(&args, trials).exit();
    }
    let status = Command::new(repo_root().join("resources/guest/build.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("run resources/guest/build.sh");
    assert!(status.success(), "resources/guest/build.sh failed");
    if hardware_kvm() {
        libtest_mimic::run(&args, trials).exit();
    }
    eprintln!(
        "no hardware KVM here: each scenario runs in its own resources/testhost/run.sh session"
    );
    let trials = trials
        .iter()
        .map(|t| {
            let name = t.name().to_owned();
            Trial::test(name.clone(), move || in_testhost(&name))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
