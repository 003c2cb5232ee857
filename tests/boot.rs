//! End-to-end boot scenarios: the `podvisor` binary boots the default guest
//! (`resources/guest/build.sh`) and the tests read its console like a person would.
//!
//! They need hardware KVM. On a machine without it (PVM, or no /dev/kvm) this test binary
//! re-runs itself inside the test host (`resources/testhost/run.sh`), which has real KVM.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

/// Generous: inside the software-emulated test host a boot takes 5-15 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

/// The default guest's shell prompt.
const PROMPT: &str = "podvisor-guest# ";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn podvisor() -> &'static str {
    env!("CARGO_BIN_EXE_podvisor")
}

fn guest(file: &str) -> PathBuf {
    repo_root().join("target/guest").join(file)
}

fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    flags
        && Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

/// A running `podvisor run` whose console output (stdout and stderr) arrives on a channel.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    /// Everything printed so far, and how far `expect` has consumed it.
    text: String,
    consumed: usize,
}

impl Vm {
    fn start(args: &[&str]) -> Vm {
        let mut child = Command::new(podvisor())
            .arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn podvisor");
        let (tx, output) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Vm {
            child,
            stdin,
            output,
            text: String::new(),
            consumed: 0,
        }
    }

    fn boot(kernel: &str, cpus: u8, memory: &str, cmdline: &str) -> Vm {
        let kernel = guest(kernel);
        let initramfs = guest("initramfs.cpio.gz");
        let cpus = cpus.to_string();
        Vm::start(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--cpus",
            &cpus,
            "--memory",
            memory,
        ])
    }

    /// Waits until the console prints `pattern`; returns the rest of the line it starts.
    fn expect(&mut self, pattern: &str) -> Result<String, Failed> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(pos) = self.text[self.consumed..].find(pattern) {
                let start = self.consumed + pos;
                let line_end = self.text[start..].find('\n').map(|e| start + e);
                if let Some(end) = line_end.or((!pattern.ends_with(':')).then_some(self.text.len()))
                {
                    self.consumed = end.max(start + pattern.len());
                    return Ok(self.text[start..end].trim_end_matches('\r').to_owned());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    return Err(
                        self.failure(&format!("{HUNG} no '{pattern}' within {BOOT_TIMEOUT:?}"))
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(
                        self.failure(&format!("podvisor ended before printing '{pattern}'"))
                    );
                }
            }
        }
    }

    /// Waits for the guest shell to take commands: types a probe until its answer shows up
    /// (the first keystrokes can race the shell's line editor setting up the terminal).
    fn wait_for_shell(&mut self) -> Result<(), Failed> {
        self.expect(PROMPT)?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            self.type_line("echo shell-$((40+2))")?;
            if self
                .expect_within("shell-42", Duration::from_secs(5))
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(self.failure("the guest shell never answered"))
    }

    /// Like [`Vm::expect`] with a shorter deadline; a miss is not fatal to the VM.
    fn expect_within(&mut self, pattern: &str, wait: Duration) -> Result<(), ()> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(pos) = self.text[self.consumed..].find(pattern) {
                self.consumed += pos + pattern.len();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => return Err(()),
            }
        }
    }

    fn type_line(&mut self, line: &str) -> Result<(), Failed> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| self.failure(&format!("cannot type '{line}': {e}")))
    }

    /// Waits for podvisor to exit.
    fn wait(&mut self) -> Result<ExitStatus, Failed> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                // Collect what is left of the output for failure messages.
                while let Ok(chunk) = self.output.recv_timeout(Duration::from_millis(200)) {
                    self.text.push_str(&String::from_utf8_lossy(&chunk));
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(self.failure(&format!("{HUNG} podvisor did not exit")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn failure(&mut self, what: &str) -> Failed {
        let lines: Vec<&str> = self.text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("{what}\n--- last console lines ---\n{tail}").into()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `podvisor-guest ready: cpus=N memtotal_kb=M`.
fn parse_ready(line: &str) -> Result<(u32, u64), Failed> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Failed::from(format!("no {name} in '{line}'")))
    };
    Ok((field("cpus=")? as u32, field("memtotal_kb=")?))
}

/// Boots, checks the ready line against the requested shape, and expects exit 0 on poweroff.
/// Marks the failure of a guest that stopped making progress (no expected output in time).
const HUNG: &str = "no progress:";

/// Runs a boot scenario; when it fails because the guest hung *inside the emulated test host*,
/// runs it once more. Nested guests on software-emulated SVM occasionally freeze at random
/// points (QEMU's own guests do too, see docs/benchmarks.md); a scenario that fails twice, or
/// fails any other way (wrong CPU count, exit status, error text), fails the test.
fn hang_tolerant(scenario: impl Fn() -> Result<(), Failed>) -> Result<(), Failed> {
    match scenario() {
        Err(e) if in_emulated_testhost() && e.message().is_some_and(|m| m.contains(HUNG)) => {
            eprintln!(
                "guest hung in the emulated test host; running the scenario once more. First try:\n{}",
                e.message().unwrap_or_default()
            );
            scenario()
        }
        other => other,
    }
}

fn in_emulated_testhost() -> bool {
    std::env::var_os("PODVISOR_TESTHOST").is_some()
}

fn boot_and_halt(kernel: &str, cpus: u8, memory_mib: u64, cmdline: &str) -> Result<(), Failed> {
    let mut vm = Vm::boot(kernel, cpus, &format!("{memory_mib}M"), cmdline);
    let line = vm.expect("podvisor-guest ready:")?;
    let (got_cpus, memtotal_kb) = parse_ready(&line)?;
    if got_cpus != u32::from(cpus) {
        return Err(vm.failure(&format!("guest sees {got_cpus} CPUs, expected {cpus}")));
    }
    // MemTotal excludes what the kernel reserves for itself; it must still be most of RAM.
    let ram_kb = memory_mib * 1024;
    if memtotal_kb > ram_kb || memtotal_kb < ram_kb * 3 / 4 {
        return Err(vm.failure(&format!(
            "guest MemTotal {memtotal_kb} kB is implausible for {memory_mib} MiB"
        )));
    }
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status} after poweroff")));
    }
    Ok(())
}

fn reboot_comes_back() -> Result<(), Failed> {
    let mut vm = Vm::boot("bzImage", 2, "256M", "console=ttyS0 reboot=k");
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    vm.type_line("reboot -f")?;
    let line = vm.expect("podvisor-guest ready:")?;
    if parse_ready(&line)?.0 != 2 {
        return Err(vm.failure("wrong CPU count after reboot"));
    }
    vm.wait_for_shell()?;
    vm.type_line("poweroff -f")?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status} after poweroff")));
    }
    Ok(())
}

/// Runs podvisor expecting a failure; returns its stderr.
fn expect_error(args: &[&str]) -> Result<String, Failed> {
    let out = Command::new(podvisor())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        return Err(format!("podvisor {args:?} succeeded").into());
    }
    if out.status.code().is_none() {
        return Err(format!("podvisor {args:?} died by a signal: {stderr}").into());
    }
    if stderr.contains("panicked") || stderr.trim().lines().count() != 1 {
        return Err(format!("expected one error line, got: {stderr}").into());
    }
    Ok(stderr)
}

fn bad_kernel_files_give_clear_errors() -> Result<(), Failed> {
    let dir = std::env::temp_dir().join(format!("podvisor-badkernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, b"this is not a kernel").map_err(|e| e.to_string())?;
    let truncated = dir.join("truncated-bzImage");
    let bz = std::fs::read(guest("bzImage")).map_err(|e| e.to_string())?;
    std::fs::write(&truncated, &bz[..4096]).map_err(|e| e.to_string())?;
    let cases: [(&Path, &str); 3] = [
        (&garbage, "neither a bzImage nor an ELF vmlinux"),
        (&truncated, "cannot load kernel"),
        (Path::new("/nonexistent/kernel"), "cannot open kernel"),
    ];
    for (kernel, wanted) in cases {
        let stderr = expect_error(&["--kernel", kernel.to_str().unwrap(), "--memory", "128M"])?;
        if !stderr.contains(wanted) {
            return Err(format!("kernel {kernel:?}: expected '{wanted}', got: {stderr}").into());
        }
    }
    let stderr = expect_error(&[
        "--kernel",
        guest("bzImage").to_str().unwrap(),
        "--initramfs",
        "/nonexistent/initramfs",
    ])?;
    if !stderr.contains("cannot open initramfs") {
        return Err(format!("missing initramfs: got {stderr}").into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn too_much_memory_is_refused() -> Result<(), Failed> {
    let stderr = expect_error(&[
        "--kernel",
        guest("bzImage").to_str().unwrap(),
        "--memory",
        "64T",
    ])?;
    if !stderr.contains("more than this host can give") {
        return Err(format!("got: {stderr}").into());
    }
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One guest at a time: the test host emulates its CPUs in software, and two nested guests
    // competing for them only make every boot slower.
    args.test_threads.get_or_insert(1);
    let status = Command::new(repo_root().join("resources/guest/build.sh"))
        .stdout(Stdio::null())
        .status()
        .expect("run resources/guest/build.sh");
    assert!(status.success(), "resources/guest/build.sh failed");

    if !hardware_kvm() && std::env::var_os("PODVISOR_TESTHOST").is_none() {
        // Re-run this very binary, with the same arguments, where there is real KVM.
        eprintln!("no hardware KVM here: running the boot tests inside resources/testhost/run.sh");
        let status = Command::new(repo_root().join("resources/testhost/run.sh"))
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .status()
            .expect("run resources/testhost/run.sh");
        std::process::exit(status.code().unwrap_or(1));
    }

    let mut trials = Vec::new();
    for (kernel, label) in [("bzImage", "bzimage"), ("vmlinux", "pvh")] {
        for (cpus, mib) in [(1u8, 256u64), (2, 1024)] {
            // The whole kernel log, so that a failure shows how far the guest got.
            let cmdline = "console=ttyS0 podvisor.halt";
            trials.push(Trial::test(
                format!("boot_{label}_{cpus}cpu_{mib}mib"),
                move || hang_tolerant(|| boot_and_halt(kernel, cpus, mib, cmdline)),
            ));
        }
    }
    trials.push(Trial::test("reboot_comes_back_to_ready", || {
        hang_tolerant(reboot_comes_back)
    }));
    trials.push(Trial::test(
        "bad_kernel_files_give_clear_errors",
        bad_kernel_files_give_clear_errors,
    ));
    trials.push(Trial::test(
        "too_much_memory_is_refused",
        too_much_memory_is_refused,
    ));
    libtest_mimic::run(&args, trials).exit();
}
