//! Seccomp: each kind of thread of the VMM may make only the system calls its work needs, so
//! that a guest, disk image or API client that took over a thread still cannot open a host
//! file, start a program or reach the network from it.
//!
//! The process chooses a [`Mode`] once, at its start ([`init`]); each thread then installs the
//! filter of its kind as it starts ([`apply`]), and the threads it starts inherit that filter
//! under their own (the kernel applies every filter a thread holds, the strictest answer
//! winning) — so a kind that starts threads of another kind must allow what those need too.
//! This crate owns the filter of the threads it starts (device workers, [`WORKER`]); the
//! crates above it own theirs.
//!
//! In [`Mode::On`] a forbidden call stops the whole VMM with `SIGSYS` after one line on stderr
//! naming the thread and the call; [`Mode::Log`] lets it through and the kernel logs it
//! (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`), which is how a missing entry
//! is found; [`Mode::Off`] installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread's filter does with a system call its kind does not make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Stop the VMM (`SIGSYS`), after naming the thread and the call on stderr.
    #[default]
    On,
    /// Allow the call, and have the kernel log it.
    Log,
    /// No filter at all.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("'{s}' is not a seccomp mode (on, log or off)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the seccomp mode is already set to {0}")]
    AlreadySet(Mode),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {kind} threads: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Sets the process's mode, once, before it starts the threads that [`apply`] filters. A
/// process that never calls it (the unit tests, a library user) filters nothing.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::On {
        install_sigsys_handler()?;
    }
    MODE.set(mode)
        .map_err(|_| SeccompError::AlreadySet(self::mode()))
}

/// The process's mode ([`Mode::Off`] until [`init`]).
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS handler's message.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Installs, on the calling thread, the filter that allows the system calls in `allowed` (a
/// union of lists) and no other, as the process's mode says. `kind` names the thread kind
/// in errors and in the message of a forbidden call.
pub fn apply(kind: &'static str, allowed: &[&[i64]]) -> Result<(), SeccompError> {
    apply_with(kind, allowed, &[])
}

/// An extra allowance of a filter: a system call allowed only with some arguments.
#[derive(Clone, Copy, Debug)]
pub enum Allowance {
    /// `openat` for reading only: no write access, no creating, truncating or appending.
    OpenReadOnly,
}

impl Allowance {
    fn rule(self) -> Result<(i64, SeccompRule), seccompiler::BackendError> {
        match self {
            Allowance::OpenReadOnly => {
                let writes = libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;
                let flags = SeccompCondition::new(
                    2,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(writes as u64),
                    0,
                )?;
                Ok((libc::SYS_openat, SeccompRule::new(vec![flags])?))
            }
        }
    }
}

/// [`apply`], with `extra` allowances beyond the calls in `allowed`.
pub fn apply_with(
    kind: &'static str,
    allowed: &[&[i64]],
    extra: &[Allowance],
) -> Result<(), SeccompError> {
    let mismatch = match mode() {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for list in allowed {
        for &nr in *list {
            rules.insert(nr, Vec::new());
        }
    }
    debug_assert!(!rules.contains_key(&NEVER_ALLOWED), "{kind} allows execve");
    for allowance in extra {
        let (nr, rule) = allowance.rule().map_err(build)?;
        // A call allowed outright stays so (an empty list matches any arguments).
        if rules.get(&nr).is_none_or(|r| !r.is_empty()) {
            rules.entry(nr).or_default().push(rule);
        }
    }
    let allow: BpfProgram =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .and_then(TryInto::try_into)
            .map_err(build)?;
    let deny = denied_ioctls().map_err(build)?;
    KIND.with(|k| k.set(kind));
    for program in [&allow, &deny] {
        seccompiler::apply_filter(program)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    Ok(())
}

/// A second filter under every thread's own: `ioctl` requests no thread of the VMM makes and
/// that reach past the process (pushing input into the terminal it was started from), refused
/// with `EPERM` even where a kind allows `ioctl`.
fn denied_ioctls() -> Result<BpfProgram, seccompiler::BackendError> {
    let request = |value: u64| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    let rules = vec![
        request(libc::TIOCSTI)?,
        request(libc::TIOCLINUX)?,
        request(libc::TIOCSETD)?,
    ];
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_ioctl, rules)]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

/// What every thread does: memory, locks, time, its own signals, reading and writing the
/// descriptors it holds, waiting on them, and ending (incl. a panic's abort).
pub const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    // Adding a filter (only ever narrows what a thread may do): the threads a thread starts
    // install their own.
    libc::SYS_seccomp,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

/// Starting threads (a fork is harmless: the child keeps the filter, and nothing here may
/// `execve`).
pub const SPAWN: &[i64] = &[libc::SYS_clone, libc::SYS_clone3];

/// A device's worker (virtio-blk, -net, -rng): its queues, disk images and taps through
/// descriptors opened for it, io_uring.
pub const WORKER: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Serving connections on a socket bound before the thread started: accepting them, reading
/// and writing (with descriptors passed along), hanging up. The API's threads and the
/// console's socket.
pub const CONNECTIONS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// Filters the calling thread as a device worker ([`BASE`] and [`WORKER`]).
pub fn apply_worker(kind: &'static str) -> Result<(), SeccompError> {
    apply(kind, &[BASE, WORKER])
}

/// The call no filter allows (nothing in the VMM starts programs): the SIGSYS handler makes
/// it to end the process.
const NEVER_ALLOWED: i64 = libc::SYS_execve;

/// Writes one line naming the thread's kind and the forbidden call, then makes a call no
/// filter allows ([`NEVER_ALLOWED`]; the forbidden one again might pass with other
/// arguments): inside this handler `SIGSYS` is blocked, so the kernel delivers the second one
/// with its default action and the process ends with `SIGSYS` (and a core dump if it may).
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel's `siginfo` for SIGSYS: after the three common fields, `si_call_addr`,
    // `si_syscall` and `si_arch` (the `libc` crate exposes no accessor for them).
    #[repr(C)]
    struct SigsysInfo {
        signo: libc::c_int,
        errno: libc::c_int,
        code: libc::c_int,
        call_addr: *mut libc::c_void,
        syscall: libc::c_int,
        arch: libc::c_uint,
    }
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler, laid out for SIGSYS
    // as above.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(Cell::get);
    let mut line = [0u8; 256];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"podvisor: error: seccomp: a ");
    put(kind.as_bytes());
    put(b" thread made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b", which its filter forbids: the VMM stops (--seccomp=log lets it through and logs it)\n");
    // SAFETY: writes `len` initialised bytes of `line` to stderr; async-signal-safe.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: a call every filter traps, with null arguments (never run): the kernel kills
    // the process (see above) before it returns.
    unsafe {
        libc::syscall(
            NEVER_ALLOWED,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
        )
    };
    // Not reached; if it were, end anyway.
    // SAFETY: ends the process at once; async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting value; every field used is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only makes async-signal-safe calls; `action` lives
    // across the call and the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}
