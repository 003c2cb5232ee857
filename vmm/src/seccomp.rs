//! The seccomp filters of the threads this crate starts and of the threads above it (the
//! API's, the launcher's); the machinery and the device workers' filter are in
//! [`devices::seccomp`]. Each thread installs its own as it starts ([`apply`]).
//!
//! Who starts whom decides what a kind must allow, since a thread keeps its parent's filter
//! under its own: the VM thread starts the vCPUs and the console's threads; a vCPU starts the
//! device workers when the guest's driver readies a device (so [`Kind::Vcpu`] allows what a
//! worker needs); the main thread starts the VM thread and the API's.

pub use devices::seccomp::{apply as apply_custom, init, mode, Mode, SeccompError, BASE};
use devices::seccomp::{Allowance, CONNECTIONS, SPAWN, WORKER};

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread and the VM thread: they set VMs up, boot, reboot, snapshot, restore
    /// and migrate them (files, /dev/kvm, sockets, guest memory), and the launcher's helpers.
    Vmm,
    /// A vCPU: `KVM_RUN` and the device emulation it runs, and starting device workers.
    Vcpu,
    /// The API server's threads: connections on the sockets bound before they start.
    Api,
    /// The console's threads: the UART's input and output, a console file (which rotates)
    /// or socket.
    Console,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Vcpu => "vcpu",
            Kind::Api => "api",
            Kind::Console => "console",
        }
    }

    fn allowed(self) -> &'static [&'static [i64]] {
        match self {
            Kind::Vmm => &[
                BASE,
                SPAWN,
                WORKER,
                VCPU,
                FILES,
                CONNECTIONS,
                SOCKETS,
                SETUP,
            ],
            Kind::Vcpu => &[BASE, SPAWN, WORKER, VCPU],
            Kind::Api => &[BASE, SPAWN, CONNECTIONS, API],
            Kind::Console => &[BASE, WORKER, CONNECTIONS, CONSOLE],
        }
    }
}

/// Installs `kind`'s filter on the calling thread (nothing in [`Mode::Off`]).
pub fn apply(kind: Kind) -> Result<(), SeccompError> {
    let extra: &[Allowance] = match kind {
        // `/metrics` reads this process's threads' CPU time and its memory from /proc.
        Kind::Api => &[Allowance::OpenReadOnly],
        _ => &[],
    };
    devices::seccomp::apply_with(kind.name(), kind.allowed(), extra)
}

/// [`apply`], for a thread that has nobody to hand an error to: one line on stderr and the
/// process ends (it never runs on unfiltered). Installing a filter fails only when the
/// kernel refuses seccomp altogether, which [`init`]'s first filter already met.
pub fn apply_or_exit(kind: Kind) {
    if let Err(e) = apply(kind) {
        eprintln!("podvisor: error: {e}");
        std::process::exit(1);
    }
}

/// A vCPU beyond a worker's needs: readying a device (io_uring, eventfds for its queues),
/// resetting the machine, being kicked out of `KVM_RUN`, and handing the guest's console
/// output to an attached console-socket client (a non-blocking `send` from the UART).
const VCPU: &[i64] = &[
    libc::SYS_sendto,
    libc::SYS_io_uring_setup,
    libc::SYS_dup,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_getparam,
];

/// The console's file: reopened under its name when it rotates.
const CONSOLE: &[i64] = &[libc::SYS_openat, libc::SYS_rename];

/// The API's threads beyond serving connections (the `net_fds` of a restore come in as
/// descriptors over the Unix socket): socket options, checking the host paths a request names.
const API: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // Listing /proc/self/task for `/metrics` (files it opens read-only: `apply`).
    libc::SYS_getdents64,
];

/// Opening, making and removing files: disk images, snapshots, console files, memory files.
const FILES: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_creat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_chmod,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_flock,
    libc::SYS_memfd_create,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_sync_file_range,
    libc::SYS_msync,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_umask,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
];

/// Sockets: migration (Unix and TCP), the API's listeners, the launcher's pod network
/// (netlink) and DHCP server.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Setting a VM (or a process) up: giving up privileges and limits, the pod's network
/// namespace, timers, reaping orphans as a container's PID 1, the host's facts.
const SETUP: &[i64] = &[
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prlimit64,
    libc::SYS_setrlimit,
    libc::SYS_getrlimit,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_getparam,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_kill,
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// Which kind a child test process filters itself as, its mode, and the call it then
    /// makes.
    const CHILD: &str = "PODVISOR_SECCOMP_TEST_CHILD";

    /// When this test process is a child one of the tests below started (a filter stays on
    /// its thread, and `on` ends the process): filters itself as the environment says, makes
    /// the call and returns true.
    fn as_child() -> bool {
        let Ok(spec) = std::env::var(CHILD) else {
            return false;
        };
        let (kind, rest) = spec.split_once(':').unwrap();
        let (mode, call) = rest.split_once(':').unwrap();
        init(mode.parse().unwrap()).unwrap();
        match kind {
            "vmm" => apply(Kind::Vmm).unwrap(),
            "vcpu" => apply(Kind::Vcpu).unwrap(),
            "api" => apply(Kind::Api).unwrap(),
            "console" => apply(Kind::Console).unwrap(),
            "worker" => devices::seccomp::apply_worker("worker").unwrap(),
            other => panic!("no kind {other}"),
        }
        make(call);
        true
    }

    /// Makes a call that some kind forbids, harmlessly when it is let through.
    fn make(call: &str) {
        let dev_null = c"/dev/null";
        let r = match call {
            // SAFETY: opens /dev/null read-only; the descriptor is closed below.
            "openat" => unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, dev_null.as_ptr(), 0)
            },
            // SAFETY: opens /dev/null for writing; the descriptor is closed below.
            "openat-write" => unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    dev_null.as_ptr(),
                    libc::O_WRONLY,
                )
            },
            // SAFETY: a socket, closed below.
            "socket" => unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_DGRAM, 0)
            },
            // SAFETY: execve of a path that does not exist: it fails, touching no memory of ours.
            "execve" => unsafe {
                let none = c"/nonexistent/podvisor-seccomp-test";
                libc::syscall(
                    libc::SYS_execve,
                    none.as_ptr(),
                    std::ptr::null::<u8>(),
                    std::ptr::null::<u8>(),
                )
            },
            other => panic!("no call {other}"),
        };
        if r >= 0 {
            // SAFETY: closes the descriptor just made.
            unsafe { libc::close(r as i32) };
        }
        println!("made {call}: {r}");
    }

    /// Runs `test` again in a child process that filters itself as `kind` (see `as_child`).
    fn child(test: &str, kind: &str, mode: &str, call: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("seccomp::tests::{test}"), "--nocapture"])
            .env(CHILD, format!("{kind}:{mode}:{call}"))
            .output()
            .unwrap()
    }

    /// For each kind, a call it does not make.
    const FORBIDDEN: &[(&str, &str, i64)] = &[
        ("vmm", "execve", libc::SYS_execve),
        ("vcpu", "openat", libc::SYS_openat),
        ("api", "openat-write", libc::SYS_openat),
        ("api", "socket", libc::SYS_socket),
        ("console", "socket", libc::SYS_socket),
        ("worker", "openat", libc::SYS_openat),
    ];

    #[test]
    fn a_forbidden_call_of_each_kind_stops_the_process_with_sigsys_and_names_it() {
        if as_child() {
            return;
        }
        for (kind, call, nr) in FORBIDDEN {
            let out = child(
                "a_forbidden_call_of_each_kind_stops_the_process_with_sigsys_and_names_it",
                kind,
                "on",
                call,
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {out:?}");
            assert!(
                stderr.contains(&format!(
                    "podvisor: error: seccomp: a {kind} thread made system call {nr}, which its filter forbids"
                )),
                "{kind}: {stderr}"
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("made "),
                "{kind}"
            );
        }
    }

    #[test]
    fn in_log_mode_a_forbidden_call_goes_through() {
        if as_child() {
            return;
        }
        for (kind, call, _) in FORBIDDEN {
            let out = child(
                "in_log_mode_a_forbidden_call_goes_through",
                kind,
                "log",
                call,
            );
            assert!(out.status.success(), "{kind}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&format!("made {call}")),
                "{kind}: {out:?}"
            );
        }
    }

    #[test]
    fn what_a_kind_allows_goes_through() {
        if as_child() {
            return;
        }
        // The console reopens its file; the VM thread opens disks and sockets; the API
        // reads files.
        for (kind, call) in [
            ("console", "openat"),
            ("vmm", "openat"),
            ("vmm", "openat-write"),
            ("vmm", "socket"),
            // `/metrics` reads /proc.
            ("api", "openat"),
        ] {
            let out = child("what_a_kind_allows_goes_through", kind, "on", call);
            assert!(out.status.success(), "{kind} {call}: {out:?}");
        }
    }
}
