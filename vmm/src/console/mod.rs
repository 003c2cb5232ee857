//! COM1 as the VM's console: where its output goes and the thread that feeds it input
//! (stdin, or the clients of its socket: [`socket`]).

mod output;
pub mod socket;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::config::ConsoleConfig;

/// Failures to set up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open serial output file '{path}': {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the serial device: {0}")]
    Device(#[source] std::io::Error),
    #[error("cannot listen on the serial socket '{path}': {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The UART and its interrupt line; it outlives guest reboots.
pub struct Console {
    pub serial: Arc<Mutex<Serial>>,
    pub irq: EventFd,
    /// Whether input should be read from stdin.
    pub wants_stdin: bool,
    /// The socket clients attach to (serial mode Socket); removed with the console.
    socket: Option<socket::ConsoleSocket>,
    /// The output's writer thread, waited for at the end (modes Tty and File).
    drain: Option<output::Drain>,
}

impl Console {
    /// Builds COM1 with the output the configuration names.
    pub fn new(config: &ConsoleConfig) -> Result<Self, ConsoleError> {
        let mut socket = None;
        let mut drain = None;
        let mut buffered =
            |sink: Box<dyn Write + Send>| -> Result<Box<dyn Write + Send>, ConsoleError> {
                let out = output::Buffered::new(sink).map_err(ConsoleError::Device)?;
                drain = Some(out.drain_handle());
                Ok(Box::new(out))
            };
        let (out, wants_stdin): (Box<dyn Write + Send>, bool) = match config {
            ConsoleConfig::Tty => (buffered(Box::new(Stdout))?, true),
            ConsoleConfig::Socket(path) => {
                let s =
                    socket::ConsoleSocket::bind(path).map_err(|source| ConsoleError::Socket {
                        path: path.clone(),
                        source,
                    })?;
                let out = Box::new(s.output());
                socket = Some(s);
                (out, false)
            }
            ConsoleConfig::File(path) => {
                let f = output::RotatingFile::open(path, output::FILE_LIMIT).map_err(|source| {
                    ConsoleError::File {
                        path: path.clone(),
                        source,
                    }
                })?;
                (buffered(Box::new(f))?, false)
            }
            ConsoleConfig::Off => (Box::new(std::io::sink()), false),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::Device)?;
        let serial = Serial::new(irq.try_clone().map_err(ConsoleError::Device)?, out)
            .map_err(ConsoleError::Device)?;
        let console = Console {
            serial: Arc::new(Mutex::new(serial)),
            irq,
            wants_stdin,
            socket,
            drain,
        };
        if let Some(s) = &console.socket {
            let (serial, space) = console.input_side().map_err(ConsoleError::Device)?;
            s.serve(move |client| feed(&serial, &space, client))
                .map_err(ConsoleError::Device)?;
        }
        Ok(console)
    }

    /// The UART to feed and the event that says its FIFO has room again.
    fn input_side(&self) -> std::io::Result<(Arc<Mutex<Serial>>, EventFd)> {
        let space = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_space_evt()
            .try_clone()?;
        Ok((self.serial.clone(), space))
    }

    /// Starts a thread that copies `input` into the UART, waiting for the guest to drain the
    /// FIFO when it is full. The thread ends at end of input.
    pub fn spawn_input<R: Read + Send + 'static>(&self, input: R) -> std::io::Result<()> {
        let (serial, space) = self.input_side()?;
        std::thread::Builder::new()
            .name("console-in".into())
            .stack_size(devices::THREAD_STACK_SIZE)
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Kind::Console);
                feed(&serial, &space, input)
            })?;
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // The UART may outlive the console (a thread feeding it input); its output must not.
        if let Some(drain) = &self.drain {
            drain.wait();
        }
    }
}

/// Copies `input` into the UART until its end, waiting for the guest to drain the FIFO when it
/// is full.
fn feed(serial: &Mutex<Serial>, space: &EventFd, mut input: impl Read) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut off = 0;
        while off < n {
            off += serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&buf[off..n]);
            if off < n {
                wait_readable(space);
            }
        }
    }
}

/// Blocks until `evt` is signalled (or 100 ms pass, to recover from a missed wake-up), then
/// clears it.
fn wait_readable(evt: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(evt),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 that lives across the call.
    unsafe { libc::poll(&mut pfd, 1, 100) };
    let _ = evt.read();
}

/// Unbuffered stdout: the guest's bytes leave as soon as it writes them.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
