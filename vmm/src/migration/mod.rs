//! Live migration: the running VM's memory, then its machine state, sent over a Unix or TCP
//! socket to another podvisor that builds the same VM and continues it.
//!
//! The source ([`send`]) copies memory while the guest runs (pre-copy): a first pass of every
//! page that is not zero (but those the guest writes while the pass goes on: the next round
//! sends them anyway), then rounds of the pages written meanwhile (KVM's dirty log for the
//! vCPUs, the memory's bitmaps for the devices), until what is left would cross within the
//! downtime limit at the rate measured so far. It then pauses the guest, flushes its disks,
//! sends the last pages and the machine state, and ends its VM only once the destination says
//! the guest runs there. Until then the source owns the VM: any failure (the destination's
//! error, a broken, stalled or corrupt stream, no convergence in time, a [`Cancel`]) resumes
//! the guest on the source as it was. The one exception is the last answer: once the
//! destination has been told to run the guest (COMPLETE), a connection that breaks before its
//! answer leaves the guest paused at the source ([`MigrationError::Unresolved`]): it may run
//! at the destination, and two running copies would write the same disks.
//!
//! The destination ([`receive`]) listens, checks the stream's version, and builds the machine
//! (memory, devices, vCPUs; disks and taps opened) as soon as the configuration arrives, so
//! that the guest's pause covers only the last pages and the state; while the first pass
//! arrives, a thread faults in the memory the source announced it will send (its PLAN), so
//! the pages are there when their data comes; it fills the memory, has
//! the devices read their backends again once the source has flushed them (a qcow2 image's
//! tables), runs nothing until the whole state has arrived and has been restored, and
//! discards everything on any failure.
//!
//! In `local` mode ([`SendOptions::local`]) the destination maps the source's own memory
//! file instead of a copy, so whatever it writes into guest memory before the guest runs
//! there is seen by the source if the migration then fails and the source resumes. It writes
//! one thing: restoring a vCPU's `MSR_KVM_WALL_CLOCK_NEW` makes KVM rewrite the guest's
//! wall-clock record (the host time at which the guest clock read zero), computed from the VM
//! clock restored just before: the source's boot time moved later by as long as the guest's
//! clock stood still while paused. A Linux guest reads that record only when it boots or
//! resumes from suspend, so a source that resumes after a failed local migration runs on
//! unaffected. Devices and the other vCPU state write nothing into guest memory until the
//! guest runs.
//!
//! The stream's format is in [`protocol`].

pub mod protocol;
pub mod receive;
pub mod send;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a migration failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URL or options are not usable (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The connection broke, stalled or could not be made.
    #[error("migration connection: {0}")]
    Connection(#[source] std::io::Error),
    /// The stream is not what the protocol says (corrupt, truncated, another version).
    #[error("migration stream: {0}")]
    Protocol(String),
    /// The other side refused or failed, with its reason.
    #[error("the other side: {0}")]
    Peer(String),
    /// This side failed to save, build or restore the VM.
    #[error("{0}")]
    Vm(String),
    /// The guest wrote memory faster than it could be sent, for longer than allowed.
    #[error("{0}")]
    NoConvergence(String),
    /// The destination was told to run the guest but its answer never came: it may run the
    /// guest now, so this side keeps it paused rather than risk two running copies writing
    /// the same disks. `vm.resume` takes it back here, once the destination is known not to
    /// run it.
    #[error(
        "the destination was told to run the guest and did not confirm ({0}): it may run it \
         now, so the VM stays paused here (vm.resume it only if the destination does not run it)"
    )]
    Unresolved(String),
    /// `vm.cancel-migration` stopped it; the guest runs on here.
    #[error("the migration was cancelled (vm.cancel-migration); the guest runs on here")]
    Cancelled,
}

/// How long one read or write on the migration connection may block: longer means the peer
/// or the network stalled.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a migration goes or comes from: Cloud Hypervisor's `unix:/PATH` and `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, MigrationError> {
        if let Some(path) = url.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(MigrationError::Invalid(format!(
                    "'{url}': the socket path must be absolute (unix:/PATH)"
                )));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = url.strip_prefix("tcp:") {
            let addr = addr.strip_prefix("//").unwrap_or(addr);
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(MigrationError::Invalid(format!(
                    "'{url}': expected tcp:HOST:PORT"
                )));
            }
            return Ok(Endpoint::Tcp(addr.to_owned()));
        }
        Err(MigrationError::Invalid(format!(
            "'{url}' is neither unix:/PATH nor tcp:HOST:PORT"
        )))
    }

    /// Connects to a listening destination.
    pub fn connect(&self) -> Result<Stream, MigrationError> {
        let stream = match self {
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| {
                MigrationError::Invalid(format!("cannot connect to {}: {e}", path.display()))
            })?),
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr).map_err(|e| {
                    MigrationError::Invalid(format!("cannot connect to {addr}: {e}"))
                })?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        stream.set_timeouts(IO_TIMEOUT)?;
        Ok(stream)
    }

    /// Listens for the source (a Unix socket path must not exist yet).
    pub fn listen(&self) -> Result<Listener, MigrationError> {
        match self {
            Endpoint::Unix(path) => UnixListener::bind(path)
                .map(|l| Listener::Unix(l, path.clone()))
                .map_err(|e| {
                    MigrationError::Invalid(format!("cannot listen on {}: {e}", path.display()))
                }),
            Endpoint::Tcp(addr) => TcpListener::bind(addr)
                .map(Listener::Tcp)
                .map_err(|e| MigrationError::Invalid(format!("cannot listen on {addr}: {e}"))),
        }
    }
}

/// A listening destination; a Unix socket's file goes away with it.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Waits up to `wait` for the source to connect.
    pub fn accept(&self, wait: Duration) -> Result<Stream, MigrationError> {
        let deadline = std::time::Instant::now() + wait;
        let nonblocking = match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(MigrationError::Connection)?;
        loop {
            let accepted = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            match accepted {
                Ok(stream) => {
                    stream.set_blocking()?;
                    stream.set_timeouts(IO_TIMEOUT)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(MigrationError::Connection(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no source connected within {} s", wait.as_secs()),
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(MigrationError::Connection(e)),
            }
        }
    }
}

/// How long a destination waits for its source to connect.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The migration connection.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_blocking(&self) -> Result<(), MigrationError> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tcp(s) => s.set_nonblocking(false),
        }
        .map_err(MigrationError::Connection)
    }

    fn set_timeouts(&self, timeout: Duration) -> Result<(), MigrationError> {
        let t = Some(timeout);
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
        .map_err(MigrationError::Connection)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl vm_memory::ReadVolatile for Stream {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Stream::Unix(s) => s.read_volatile(buf),
            Stream::Tcp(s) => s.read_volatile(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Stream {
    /// Another handle on the connection, to shut it down from another thread.
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Hands `file` to the peer (a Unix socket's SCM_RIGHTS), with one byte of data.
    fn send_file(&self, file: &std::fs::File) -> Result<(), MigrationError> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let Stream::Unix(s) = self else {
            return Err(MigrationError::Invalid(
                "local: the memory can only be handed over on a Unix socket".into(),
            ));
        };
        s.send_with_fd(&b"M"[..], file.as_raw_fd()).map_err(|e| {
            MigrationError::Connection(std::io::Error::from_raw_os_error(e.errno()))
        })?;
        Ok(())
    }

    /// Takes the file [`Stream::send_file`] handed over.
    fn recv_file(&self) -> Result<std::fs::File, MigrationError> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let Stream::Unix(s) = self else {
            return Err(MigrationError::Protocol(
                "local: the memory can only be handed over on a Unix socket".into(),
            ));
        };
        let mut byte = [0u8; 1];
        let (n, file) = s.recv_with_fd(&mut byte).map_err(|e| {
            MigrationError::Connection(std::io::Error::from_raw_os_error(e.errno()))
        })?;
        match file {
            Some(file) if n == 1 && byte[0] == b'M' => Ok(file),
            _ => Err(MigrationError::Protocol(
                "local: expected the guest memory's file, got none".into(),
            )),
        }
    }

    /// Ends the connection both ways: a read or write waiting on it returns at once.
    fn shut_down(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// Cancels the outgoing migration from another thread (`vm.cancel-migration`, answered while
/// the VM's thread sends): the connection is shut down, which ends whatever read or write the
/// migration waits in, and the guest runs on here. Too late once the destination has been
/// told to run the guest.
#[derive(Clone, Default)]
pub struct Cancel(Arc<Mutex<Outgoing>>);

#[derive(Default)]
enum Outgoing {
    #[default]
    None,
    /// Sending on this connection (a handle of it).
    Sending(Stream),
    Cancelled,
    /// The destination has been told to run the guest.
    Committed,
}

/// Why `vm.cancel-migration` did nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelRefused {
    #[error("vm.cancel-migration: no migration is under way")]
    NoMigration,
    #[error("vm.cancel-migration: too late, the destination has been told to run the guest")]
    TooLate,
}

impl Cancel {
    fn state(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cancels the migration under way.
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        let mut state = self.state();
        match std::mem::take(&mut *state) {
            Outgoing::Sending(stream) => {
                stream.shut_down();
                *state = Outgoing::Cancelled;
                Ok(())
            }
            Outgoing::Committed => {
                *state = Outgoing::Committed;
                Err(CancelRefused::TooLate)
            }
            other => {
                *state = other;
                Err(CancelRefused::NoMigration)
            }
        }
    }

    /// A migration starts on `stream`.
    fn begin(&self, stream: &Stream) -> Result<(), MigrationError> {
        *self.state() = Outgoing::Sending(stream.try_clone().map_err(MigrationError::Connection)?);
        Ok(())
    }

    fn cancelled(&self) -> bool {
        matches!(*self.state(), Outgoing::Cancelled)
    }

    /// The destination is about to be told to run the guest: from now on it cannot be
    /// cancelled. Fails if it was just cancelled.
    fn commit(&self) -> Result<(), MigrationError> {
        let mut state = self.state();
        if matches!(*state, Outgoing::Cancelled) {
            return Err(MigrationError::Cancelled);
        }
        *state = Outgoing::Committed;
        Ok(())
    }

    /// The migration ended, however.
    fn end(&self) {
        *self.state() = Outgoing::None;
    }
}

/// What the source's operator can set per migration (KubeVirt's migration policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendOptions {
    /// The longest the guest may be paused for the last pass (default 300 ms, QEMU's).
    pub downtime_limit_ms: u64,
    /// At most this many bytes per second on the wire (None: as fast as it goes).
    pub bandwidth_limit: Option<u64>,
    /// Give up (and keep running here) when the memory has not converged after this long.
    pub completion_timeout_s: u64,
    /// Slow the guest's vCPUs down, more every round, while it writes memory faster than
    /// it can be sent (QEMU's and KubeVirt's auto-converge).
    pub auto_converge: bool,
    /// Both VMMs on this host (a Unix socket): hand the guest memory's memfd over instead of
    /// copying it (Cloud Hypervisor's `local`). The guest is paused only for the state.
    pub local: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            downtime_limit_ms: 300,
            bandwidth_limit: None,
            completion_timeout_s: 600,
            auto_converge: false,
            local: false,
        }
    }
}

/// The VM's last outgoing migration, as `vm.info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationInfo {
    pub state: MigrationState,
    #[serde(flatten)]
    pub progress: Progress,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MigrationState {
    Sending,
    /// Given up; the VM runs on here.
    Failed,
}

/// How the last migration went on the source, for `vm.info` and the events.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Rounds done (the first pass is round 1).
    pub round: u32,
    /// Guest-memory bytes sent so far (zero pages not counted).
    pub bytes_sent: u64,
    /// Bytes the last dirty-page count left to send.
    pub bytes_left: u64,
    /// Pages the guest wrote per second in the last round.
    pub dirty_pages_per_s: u64,
    /// What the pause for the last pass is expected to take, at the measured rate.
    pub expected_downtime_ms: u64,
    /// How long the guest was paused (once done).
    pub downtime_ms: Option<u64>,
    /// How long the whole migration took (once done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// How much auto-converge slows the vCPUs (percent of their time asleep).
    pub throttle_percent: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:6000").unwrap(),
            Endpoint::Tcp("127.0.0.1:6000".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:[::1]:6000").unwrap(),
            Endpoint::Tcp("[::1]:6000".into())
        );
        for bad in [
            "unix:rel.sock",
            "tcp:host",
            "tcp::80",
            "file:///x",
            "tcp:h:99999",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(MigrationError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
