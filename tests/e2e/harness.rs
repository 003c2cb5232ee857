//! What every scenario uses: the paths of the binary and the default guest, a running
//! `podvisor run` whose console the test reads like a person would, and the retry rule for
//! guests that hang in the emulated test host.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;

/// Generous: inside the software-emulated test host a boot takes 5-15 s.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// Silence before the ready line that counts as a frozen guest.
pub const BOOT_SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// The default guest's shell prompt.
pub const PROMPT: &str = "podvisor-guest# ";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn podvisor() -> &'static str {
    env!("CARGO_BIN_EXE_podvisor")
}

pub fn guest(file: &str) -> PathBuf {
    repo_root().join("target/guest").join(file)
}

pub fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    flags
        && Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

/// A running `podvisor run` whose console output (stdout and stderr) arrives on a channel.
pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    /// Everything printed so far, and how far `expect` has consumed it.
    text: String,
    consumed: usize,
    /// Whether [`Vm::shell`] has turned the terminal's echo off.
    quiet_shell: bool,
}

/// Commands typed through [`Vm::shell`] so far, in this process: each one's status marker
/// carries its number, so that a marker an earlier client left on a console's screen (which
/// a new `ctl console` replays) cannot end a later command's wait.
static COMMANDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Vm {
    pub fn start(args: &[&str]) -> Vm {
        Vm::spawn("run", args)
    }

    /// Starts `podvisor SUBCOMMAND ARGS...` (`run` or `serve`) with its console captured.
    pub fn spawn(subcommand: &str, args: &[&str]) -> Vm {
        let mut cmd = Command::new(podvisor());
        cmd.arg(subcommand).args(args);
        Vm::spawn_command(cmd)
    }

    /// Like [`Vm::spawn`], inside network namespace `netns` (as another pod would be).
    pub fn spawn_in_netns(netns: &str, subcommand: &str, args: &[&str]) -> Vm {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, podvisor(), subcommand])
            .args(args);
        Vm::spawn_command(cmd)
    }

    /// Starts `cmd` (a program that runs podvisor, e.g. a container engine) with its output
    /// captured as [`Vm::spawn`] does.
    pub fn spawn_command(mut cmd: Command) -> Vm {
        let mut child = cmd
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
            quiet_shell: false,
        }
    }

    pub fn boot(kernel: &str, cpus: u8, memory: &str, cmdline: &str) -> Vm {
        Vm::boot_with(kernel, cpus, memory, cmdline, &[])
    }

    /// Boots the default guest with extra `podvisor run` arguments (devices).
    pub fn boot_with(kernel: &str, cpus: u8, memory: &str, cmdline: &str, extra: &[&str]) -> Vm {
        let kernel = guest(kernel);
        let initramfs = guest("initramfs.cpio.gz");
        let cpus = cpus.to_string();
        let mut args = vec![
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
        ];
        args.extend_from_slice(extra);
        Vm::start(&args)
    }

    /// Runs `command` at the guest shell (which must be ready, see [`Vm::wait_for_shell`]);
    /// returns what it printed (stdout and stderr) and its exit status.
    ///
    /// The first call turns the terminal's echo and the prompt off, so that what comes back
    /// is the command's output only (and whatever the kernel prints meanwhile).
    pub fn shell(&mut self, command: &str) -> Result<(String, i32), Failed> {
        if !self.quiet_shell {
            self.marked("stty -echo; PS1=''")?;
            self.quiet_shell = true;
        }
        self.marked(command)
    }

    /// Types `command` followed by a marker line carrying its exit status; returns the output
    /// between the two.
    fn marked(&mut self, command: &str) -> Result<(String, i32), Failed> {
        let n = COMMANDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // Ends with a colon: `expect` then waits for the whole line.
        let mark = format!("@@podvisor-rc-{n}:");
        let start = self.consumed;
        // The quotes keep an echo of the typed line from matching the marker.
        self.type_line(&format!(
            "{command} 2>&1; echo \"@@podvisor-\"\"rc-{n}:$?@@\""
        ))?;
        let rest = self.expect(&mark)?;
        let rc = rest
            .trim_start_matches(mark.as_str())
            .trim_end_matches("@@")
            .parse::<i32>()
            .map_err(|_| self.failure(&format!("bad status line '{rest}'")))?;
        let end = self.text[..self.consumed]
            .rfind(&mark)
            .unwrap_or(self.consumed);
        let output = self.text[start..end].replace('\r', "");
        Ok((output, rc))
    }

    /// Like [`Vm::shell`], failing unless the command exits 0.
    pub fn shell_ok(&mut self, command: &str) -> Result<String, Failed> {
        let (out, rc) = self.shell(command)?;
        if rc != 0 {
            return Err(self.failure(&format!("'{command}' exited {rc}: {out}")));
        }
        Ok(out)
    }

    /// Waits until the console prints `pattern`; returns the rest of the line it starts.
    pub fn expect(&mut self, pattern: &str) -> Result<String, Failed> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        // A booting guest prints all the time (even a quiet one reaches its ready line in
        // seconds): this long a silence before the ready line means it froze.
        let silence_limit = pattern
            .starts_with("podvisor-guest ready")
            .then_some(BOOT_SILENCE_LIMIT);
        let mut last_output = Instant::now();
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
            let mut left = deadline.saturating_duration_since(Instant::now());
            if let Some(limit) = silence_limit {
                left = left.min((last_output + limit).saturating_duration_since(Instant::now()));
            }
            match self.output.recv_timeout(left) {
                Ok(chunk) => {
                    self.text.push_str(&String::from_utf8_lossy(&chunk));
                    last_output = Instant::now();
                }
                Err(RecvTimeoutError::Timeout) => {
                    let threads = stall_report(self.child.id());
                    let _ = self.child.kill();
                    return Err(self.failure(&format!(
                        "{HUNG} no '{pattern}' within {BOOT_TIMEOUT:?} (or {BOOT_SILENCE_LIMIT:?} without output)\n{threads}"
                    )));
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
    pub fn wait_for_shell(&mut self) -> Result<(), Failed> {
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
        // The prompt came and the shell did not answer: the guest stopped (a frozen test
        // host shows as every vCPU inside KVM_RUN, see `hang_tolerant`) or its console did.
        let threads = stall_report(self.child.id());
        let _ = self.child.kill();
        Err(self.failure(&format!(
            "{HUNG} the guest shell never answered within {BOOT_TIMEOUT:?}\n{threads}"
        )))
    }

    /// Like [`Vm::expect`] with a shorter deadline; a miss is not fatal to the VM.
    pub fn expect_within(&mut self, pattern: &str, wait: Duration) -> Result<(), ()> {
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

    pub fn type_line(&mut self, line: &str) -> Result<(), Failed> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| self.failure(&format!("cannot type '{line}': {e}")))
    }

    /// Waits for podvisor to exit.
    pub fn wait(&mut self) -> Result<ExitStatus, Failed> {
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

    /// Fails (with the VM's output) unless `text` (`what` it is) holds each of `expected`.
    pub fn check_holds(&mut self, what: &str, text: &str, expected: &[&str]) -> Result<(), Failed> {
        match expected.iter().find(|e| !text.contains(**e)) {
            Some(missing) => Err(self.failure(&format!("{what}: no '{missing}' in {text}"))),
            None => Ok(()),
        }
    }

    pub fn failure(&mut self, what: &str) -> Failed {
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
pub fn parse_ready(line: &str) -> Result<(u32, u64), Failed> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Failed::from(format!("no {name} in '{line}'")))
    };
    Ok((field("cpus=")? as u32, field("memtotal_kb=")?))
}

/// Marks the failure of a guest that stopped making progress (no expected output in time).
pub const HUNG: &str = "no progress:";

/// Marks a hang during which every vCPU thread of podvisor was inside `KVM_RUN`: the guest
/// (or, in the test host, the emulated virtualization under it) was not getting anywhere
/// while podvisor's userspace blocked nothing. `main.rs` gives such a scenario a fresh
/// test-host session; a hang with a vCPU stuck elsewhere (a lock, a device) never gets one.
pub const IN_GUEST: &str = "every vCPU was inside KVM_RUN";

/// `KVM_RUN`'s ioctl request number.
const KVM_RUN: u64 = 0xae80;
/// `ioctl`'s system-call number on x86-64.
const SYS_IOCTL: u64 = 16;

/// What podvisor's threads were doing when its guest stopped making progress: for each
/// thread, where it was in 10 samples over 2 s (inside `KVM_RUN`, running, or in another
/// system call) and its CPU time. Ends with the [`IN_GUEST`] verdict when it holds.
pub fn stall_report(pid: u32) -> String {
    use std::collections::BTreeMap;
    let pid = vmm_process(pid);
    let tasks = || -> Vec<(String, String)> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        dir.flatten()
            .map(|e| e.path())
            .filter_map(|p| {
                let comm = std::fs::read_to_string(p.join("comm")).ok()?;
                Some((comm.trim().to_owned(), p.to_string_lossy().into_owned()))
            })
            .collect()
    };
    // (CPU time, of it in a guest), in clock ticks.
    let cpu_ticks = |task: &str| -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): state is the 1st, utime
        // and stime the 12th and 13th, guest_time the 41st (proc(5)).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        (at(11) + at(12), at(40))
    };
    let where_now = |task: &str| -> String {
        let sys = std::fs::read_to_string(format!("{task}/syscall")).unwrap_or_default();
        let f: Vec<&str> = sys.split_whitespace().collect();
        let hex = |i: usize| {
            f.get(i)
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        };
        match f.first() {
            Some(&"running") => "running".into(),
            Some(n) if n.parse::<u64>().ok() == Some(SYS_IOCTL) && hex(2) == Some(KVM_RUN) => {
                "KVM_RUN".into()
            }
            Some(n) => {
                let wchan = std::fs::read_to_string(format!("{task}/wchan")).unwrap_or_default();
                format!("syscall {n} ({})", wchan.trim())
            }
            None => "unknown".into(),
        }
    };
    let threads = tasks();
    if threads.is_empty() {
        return "podvisor's threads: gone".into();
    }
    let before: Vec<(u64, u64)> = threads.iter().map(|(_, t)| cpu_ticks(t)).collect();
    let mut seen: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); threads.len()];
    for _ in 0..10 {
        for (i, (_, t)) in threads.iter().enumerate() {
            *seen[i].entry(where_now(t)).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut report = String::from("podvisor's threads (10 samples in 2 s):");
    let mut vcpus = 0;
    let mut vcpus_in_guest = 0;
    for (i, (comm, t)) in threads.iter().enumerate() {
        let now = cpu_ticks(t);
        let cpu = now.0.saturating_sub(before[i].0);
        let guest = now.1.saturating_sub(before[i].1);
        let places: Vec<String> = seen[i].iter().map(|(k, n)| format!("{k} x{n}")).collect();
        report.push_str(&format!(
            "\n  {comm}: {}; CPU {cpu} ticks, {guest} of them in the guest",
            places.join(", ")
        ));
        // Inside KVM_RUN: asleep in it (a halted vCPU) or on a CPU running the guest (the
        // kernel counts that time as guest time), never in podvisor's own code.
        let only_kvm_run = seen[i].keys().all(|k| k == "KVM_RUN" || k == "running");
        let running_in_guest = !seen[i].contains_key("running") || guest * 2 >= cpu;
        if comm.starts_with("vcpu") {
            vcpus += 1;
            if only_kvm_run && running_in_guest {
                vcpus_in_guest += 1;
            }
        }
    }
    if vcpus > 0 && vcpus == vcpus_in_guest {
        report.push_str(&format!("\n{IN_GUEST}"));
    }
    report
}

/// The process that runs the vCPUs for a scenario that started `pid`: `pid` itself when it
/// has vCPU threads, else (a container engine started it: podman's VMM is no child of the
/// `podman` command) the one process in this (test-host) machine that has them.
fn vmm_process(pid: u32) -> u32 {
    let has_vcpus = |p: &str| {
        std::fs::read_dir(format!("/proc/{p}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vcpu"))
            })
        })
    };
    if has_vcpus(&pid.to_string()) || !in_emulated_testhost() {
        return pid;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pid;
    };
    let found: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| has_vcpus(&p.to_string()))
        .collect();
    match found[..] {
        [only] => only,
        _ => pid,
    }
}

/// Runs a boot scenario; when it fails because the guest hung *inside the emulated test host*,
/// runs it again, up to [`HANG_TRIES`] times in all. A scenario that hangs every time, or fails
/// any other way (wrong CPU count, exit status, error text), fails the test.
///
/// Two kinds of hang point at the test-host session rather than at podvisor, and end the
/// scenario's run in this session at once with [`SESSION_SUSPECT`] (`main.rs` then runs it in a
/// fresh session): every vCPU inside `KVM_RUN` ([`IN_GUEST`]: the guest runs, or halts, and
/// podvisor waits on nothing), and a guest kernel panic. Nested guests on software-emulated SVM
/// freeze, or fault in their own exception entry code, now and then, and CI saw sessions in
/// which every boot of one scenario did so while the same boot passed 30 times in a row in
/// another session. A panic also carries [`GUEST_PANICKED`]: a guest that panics in two
/// sessions fails the test (`main.rs`), since a panic podvisor causes does so every time.
pub fn hang_tolerant(scenario: impl Fn() -> Result<(), Failed>) -> Result<(), Failed> {
    let mut tries = 1;
    loop {
        let result = scenario();
        let hung = in_emulated_testhost()
            && result
                .as_ref()
                .err()
                .and_then(|e| e.message())
                .is_some_and(|m| m.contains(HUNG));
        if !hung {
            return result;
        }
        let message = result
            .err()
            .and_then(|e| e.message().map(str::to_owned))
            .unwrap_or_default();
        if message.contains("Kernel panic") {
            return Err(format!("{message}\n{GUEST_PANICKED}\n{SESSION_SUSPECT}").into());
        }
        if message.contains(IN_GUEST) {
            return Err(format!("{message}\n{SESSION_SUSPECT}").into());
        }
        if tries >= HANG_TRIES {
            return Err(message.into());
        }
        eprintln!(
            "guest hung in the emulated test host; running the scenario again. Try {tries}:\n{message}"
        );
        tries += 1;
    }
}

/// How many times a scenario whose guest hung in the emulated test host is run.
const HANG_TRIES: u32 = 3;

/// Ends the failure of a scenario whose guest froze with every vCPU in `KVM_RUN`, or panicked:
/// the test-host session, not podvisor, is the suspect.
pub const SESSION_SUSPECT: &str = "@@podvisor: this test-host session froze its guests@@";

/// What podvisor logs when the guest triple-faults (`vmm/src/vstate/vcpu.rs`). A scenario
/// that failed with it in its output ran again in a fresh session, as for a panic: nested
/// guests on emulated SVM fault in their own exception entry now and then (QEMU's guests in
/// the benchmarks too), while a reset podvisor causes happens in every session.
pub const GUEST_TRIPLE_FAULT: &str = "triple fault: the machine resets";

/// Marks a failure in which the guest kernel panicked (with [`SESSION_SUSPECT`]).
pub const GUEST_PANICKED: &str = "@@podvisor: the guest kernel panicked@@";

pub fn in_emulated_testhost() -> bool {
    std::env::var_os("PODVISOR_TESTHOST").is_some()
}

/// A command that runs `program` under coreutils `timeout`: TERM after `limit_s` seconds, KILL
/// `kill_after_s` seconds later (exit status 124 or 137).
pub fn under_timeout(limit_s: u32, kill_after_s: u32, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(format!("--kill-after={kill_after_s}"))
        .arg(limit_s.to_string())
        .arg(program);
    cmd
}

/// Runs podvisor expecting a failure; returns its stderr.
pub fn expect_error(args: &[&str]) -> Result<String, Failed> {
    // Under `timeout`: a podvisor that does not exit fails the test instead of hanging it.
    let out = under_timeout(60, 5, podvisor())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if matches!(out.status.code(), Some(124) | Some(137)) {
        return Err(format!("{HUNG} podvisor {args:?} did not exit within 60 s: {stderr}").into());
    }
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

impl Vm {
    /// Sends podvisor SIGTERM (what Kubernetes does to a pod being deleted).
    pub fn terminate(&mut self) -> Result<(), Failed> {
        host_ok("kill", &["-TERM", &self.child.id().to_string()]).map(|_| ())
    }

    /// Kills podvisor with SIGKILL (no chance to flush anything) and reaps it.
    pub fn kill(&mut self) -> Result<(), Failed> {
        self.child.kill().map_err(|e| e.to_string())?;
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// podvisor's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether podvisor has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Everything printed so far (after draining what is pending).
    pub fn printed(&mut self) -> &str {
        self.output_len();
        &self.text
    }

    /// Marks everything printed so far as read: the next `expect` waits for new output.
    pub fn skip_output(&mut self) {
        self.output_len();
        self.consumed = self.text.len();
    }

    /// How much console output has arrived so far (after draining what is pending).
    pub fn output_len(&mut self) -> usize {
        while let Ok(chunk) = self.output.try_recv() {
            self.text.push_str(&String::from_utf8_lossy(&chunk));
        }
        self.text.len()
    }

    /// Powers the guest off from its shell and expects podvisor to exit 0.
    pub fn poweroff(&mut self) -> Result<(), Failed> {
        self.type_line("poweroff")?;
        let status = self.wait()?;
        if status.code() != Some(0) {
            return Err(self.failure(&format!("podvisor exited with {status} after poweroff")));
        }
        Ok(())
    }
}

/// A directory of its own for one scenario, removed when it ends.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        // Not the pid alone: every test host numbers its processes alike, and test hosts
        // running at the same time share this machine's /tmp.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // In the test host, this machine's /tmp is reached over virtiofs (every write a FUSE
        // round trip through the emulated host), its /dev/shm is the test host's own memory.
        let base = if in_emulated_testhost() && Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "podvisor-e2e-{name}-{}-{nanos}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// `path(file)` as a string, for command lines.
    pub fn arg(&self, file: &str) -> String {
        self.path(file).to_str().expect("UTF-8 temp dir").to_owned()
    }

    /// The directory itself, for command lines.
    pub fn root(&self) -> String {
        self.0.to_str().expect("UTF-8 temp dir").to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `overlay`, a qcow2 image over `base` (whose format is `base_format`), with qemu-img.
pub fn qcow2_overlay(base: &str, base_format: &str, overlay: &str) -> Result<(), Failed> {
    host_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base,
            "-F",
            base_format,
            overlay,
        ],
    )
    .map(|_| ())
}

/// Runs a host program; returns its exit code and output (stdout and stderr).
pub fn host(program: &str, args: &[&str]) -> Result<(i32, String), Failed> {
    // Under `timeout`, so that a stuck tool fails the test instead of hanging it.
    let out = under_timeout(300, 5, program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

/// Like [`host`], failing unless the program exits 0.
pub fn host_ok(program: &str, args: &[&str]) -> Result<String, Failed> {
    let (rc, text) = host(program, args)?;
    if rc != 0 {
        return Err(format!("{program} {args:?} exited {rc}: {text}").into());
    }
    Ok(text)
}

/// SHA-256 (hex) of `len` bytes of `file` from `offset`.
pub fn sha256_of(file: &Path, offset: u64, len: u64) -> Result<String, Failed> {
    use sha2::{Digest, Sha256};
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let copied = std::io::copy(&mut f.take(len), &mut hasher).map_err(|e| e.to_string())?;
    if copied != len {
        return Err(format!("{} has only {copied} bytes from {offset}", file.display()).into());
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The first 64-digit hex word in `text` (a `sha256sum` line amid console noise).
pub fn find_sha256(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(str::to_owned)
}

/// A network namespace of its own (another pod, a node), deleted when dropped.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(name: String) -> Result<NetNs, Failed> {
        let _ = host("ip", &["netns", "del", &name]);
        host_ok("ip", &["netns", "add", &name])?;
        Ok(NetNs(name))
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &str) -> Result<String, Failed> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend(args.split_whitespace());
        host_ok("ip", &all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = host("ip", &["netns", "del", &self.0]);
    }
}
