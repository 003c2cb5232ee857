//! COM1 on a Unix socket: one client at a time reads the guest's output and types its input,
//! as `virtctl console` (and `podvisor ctl console`) do. A client that attaches first gets the
//! last [`RING`] bytes of output, so it sees the screen it missed. The vCPU that writes to the
//! UART never waits for a client: what a slow client cannot take at once is dropped for it.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Output kept for the next client to attach.
pub const RING: usize = 64 << 10;

/// What the guest printed lately, and the client attached now.
#[derive(Default)]
struct Hub {
    ring: VecDeque<u8>,
    client: Option<UnixStream>,
    /// The console is gone: its thread ends.
    closed: bool,
}

/// The listening socket; its file is removed when this is dropped.
pub struct ConsoleSocket {
    path: PathBuf,
    hub: Arc<Mutex<Hub>>,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens on `path` (a stale socket file there is replaced; anything else is refused).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} exists (and is not a stale socket)", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ConsoleSocket {
            path: path.to_owned(),
            hub: Arc::default(),
            listener,
        })
    }

    /// The writer the UART prints into.
    pub fn output(&self) -> SocketOutput {
        SocketOutput {
            hub: self.hub.clone(),
        }
    }

    /// Serves clients one after another, on a thread of its own: each gets the kept output,
    /// then what follows; what it sends goes to `input` until it hangs up.
    pub fn serve(&self, input: impl Fn(UnixStream) + Send + 'static) -> std::io::Result<()> {
        let listener = self.listener.try_clone()?;
        let hub = self.hub.clone();
        std::thread::Builder::new()
            .name("console-socket".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Kind::Console);
                for stream in listener.incoming() {
                    if hub.lock().unwrap_or_else(|e| e.into_inner()).closed {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    {
                        let mut hub = hub.lock().unwrap_or_else(|e| e.into_inner());
                        let (a, b) = hub.ring.as_slices();
                        let kept = [a, b].concat();
                        if send_now(&stream, &kept).is_err() {
                            continue;
                        }
                        hub.client = Some(stream);
                    }
                    // Until the client hangs up; then the next one.
                    input(reader);
                    hub.lock().unwrap_or_else(|e| e.into_inner()).client = None;
                }
            })?;
        Ok(())
    }
}

impl Drop for ConsoleSocket {
    /// Removes the socket file and ends the thread that serves it: the listener is shut down
    /// (which wakes its `accept`) and so is an attached client's connection.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let mut hub = self.hub.lock().unwrap_or_else(|e| e.into_inner());
        hub.closed = true;
        if let Some(client) = hub.client.take() {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        // SAFETY: shutdown on a socket this listener owns; it touches no memory.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// The UART's output: kept in the ring and passed to the client, never blocking.
pub struct SocketOutput {
    hub: Arc<Mutex<Hub>>,
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut hub = self.hub.lock().unwrap_or_else(|e| e.into_inner());
        let keep = buf.len().min(RING);
        let overflow = (hub.ring.len() + keep).saturating_sub(RING);
        hub.ring.drain(..overflow);
        hub.ring.extend(&buf[buf.len() - keep..]);
        if let Some(client) = &hub.client {
            if send_now(client, buf).is_err() {
                hub.client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends what the socket takes without waiting; a full socket drops the rest. Errors only
/// when the client is gone.
fn send_now(client: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: send reads `buf.len()` bytes from a live slice on a socket this stream owns;
        // MSG_DONTWAIT keeps it from blocking and MSG_NOSIGNAL from raising SIGPIPE.
        let n = unsafe {
            libc::send(
                client.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(()),
                std::io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn read_exactly(client: &mut UnixStream, n: usize) -> Vec<u8> {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; n];
        client.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn clients_in_turn_see_the_last_screen_then_the_rest_and_type() {
        let dir = std::env::temp_dir().join(format!("podvisor-consock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(
            ConsoleSocket::bind(&path).is_err(),
            "a file in the way is kept"
        );
        std::fs::remove_file(&path).unwrap();

        let socket = ConsoleSocket::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut out = socket.output();
        out.write_all(b"booted\n").unwrap();
        let (typed, typed_rx) = mpsc::channel();
        socket
            .serve(move |mut client| {
                let mut buf = [0u8; 64];
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    typed.send(buf[..n].to_vec()).unwrap();
                }
            })
            .unwrap();

        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(read_exactly(&mut first, 7), b"booted\n");
        // Attached (the kept output and the attachment happen under one lock): output as it
        // comes, input to the UART.
        out.write_all(b"$ ").unwrap();
        assert_eq!(read_exactly(&mut first, 2), b"$ ");
        first.write_all(b"ls\n").unwrap();
        assert_eq!(
            typed_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            b"ls\n"
        );
        drop(first);

        // The next client, in turn, sees what was printed so far.
        let mut second = UnixStream::connect(&path).unwrap();
        assert_eq!(read_exactly(&mut second, 9), b"booted\n$ ");

        // A client that does not read never holds the writer up; the ring keeps the tail.
        let big: Vec<u8> = (0..4 * RING).map(|i| (i % 251) as u8).collect();
        let start = std::time::Instant::now();
        for _ in 0..64 {
            out.write_all(&big).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the writer waited"
        );
        drop(second);
        let mut third = UnixStream::connect(&path).unwrap();
        let kept = read_exactly(&mut third, RING);
        assert_eq!(kept, big[big.len() - RING..]);

        drop(socket);
        assert!(!path.exists(), "the socket file goes with the console");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_serving_thread_ends_with_the_console() {
        let dir = std::env::temp_dir().join(format!("podvisor-consock-end-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for attached in [false, true] {
            let path = dir.join(format!("serial-{attached}.sock"));
            let socket = ConsoleSocket::bind(&path).unwrap();
            // The input closure owns `alive`: the receiver hears it drop when the thread ends.
            let (alive, ended) = mpsc::channel::<()>();
            socket
                .serve(move |mut client| {
                    let _keep = &alive;
                    let mut buf = [0u8; 64];
                    while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
                })
                .unwrap();
            socket.output().write_all(b"hi").unwrap();
            // Attached once the kept output arrives (both happen under one lock).
            let client = attached.then(|| {
                let mut c = UnixStream::connect(&path).unwrap();
                assert_eq!(read_exactly(&mut c, 2), b"hi");
                c
            });
            drop(socket);
            assert_eq!(
                ended.recv_timeout(Duration::from_secs(10)),
                Err(mpsc::RecvTimeoutError::Disconnected),
                "the thread lives on (a client attached: {attached})"
            );
            drop(client);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
