//! Where the guest's serial output goes without ever making the guest wait.
//!
//! The UART hands each byte to its writer on the vCPU thread that wrote it. A writer that
//! blocks (a terminal nobody reads, a full pipe, a slow disk) would hold that vCPU, and with
//! it the VM's stop. [`Buffered`] takes the bytes into a bounded buffer at once and a thread
//! of its own writes them out; when the buffer is full, new output is left out and counted,
//! as a real serial line drops what its far end does not take. [`RotatingFile`] keeps a
//! `file=` console from filling the disk: past its size limit the file becomes `FILE.1`
//! (replacing the one before) and a new file begins.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output held for the writer thread, at most.
pub const BUFFER_BYTES: usize = 1 << 20;
/// How long the end of the console waits for its output to be written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// Bytes left out since the writer last said so.
    dropped: u64,
    /// Bytes the writer thread has taken but not written yet.
    writing: usize,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when output arrives, when the writer has written some, and at the end.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UART's writer: takes the bytes at once, a thread writes them to `sink`.
pub struct Buffered {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    capacity: usize,
}

impl Buffered {
    /// Starts the thread that writes to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> std::io::Result<Buffered> {
        Self::with_capacity(sink, BUFFER_BYTES)
    }

    fn with_capacity(sink: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<Buffered> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            changed: Condvar::new(),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("console-out".into())
            .stack_size(devices::THREAD_STACK_SIZE)
            .spawn(move || write_out(&writer, sink))?;
        Ok(Buffered {
            shared,
            thread: Some(thread),
            capacity,
        })
    }

    /// A handle to wait for the output to be written, which the console keeps (the UART
    /// owns this writer).
    pub fn drain_handle(&self) -> Drain {
        Drain(self.shared.clone())
    }

    fn drain(&self, timeout: Duration) -> bool {
        self.shared.drain(timeout)
    }
}

/// Waits for a [`Buffered`] writer's output to be written.
#[derive(Clone)]
pub struct Drain(Arc<Shared>);

impl Drain {
    /// Waits (up to a bound) until everything taken so far is written.
    pub fn wait(&self) -> bool {
        self.0.drain(DRAIN_TIMEOUT)
    }
}

impl Shared {
    /// Waits (up to `timeout`) until everything taken so far is written.
    fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pending = self.lock();
        while !pending.bytes.is_empty() || pending.writing > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pending = self
                .changed
                .wait_timeout(pending, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        let room = self.capacity.saturating_sub(pending.bytes.len());
        let taken = buf.len().min(room);
        pending.bytes.extend(&buf[..taken]);
        pending.dropped += (buf.len() - taken) as u64;
        drop(pending);
        self.shared.changed.notify_all();
        // The rest is dropped, not refused: the UART must not retry it.
        Ok(buf.len())
    }

    /// Waits a bounded time for the output to be written; never an error.
    fn flush(&mut self) -> std::io::Result<()> {
        self.drain(DRAIN_TIMEOUT);
        Ok(())
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        if !self.drain(DRAIN_TIMEOUT) {
            tracing::warn!("serial console: output still unwritten at the end was dropped");
        }
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // A writer stuck in its sink is left behind rather than waited for.
            if thread.is_finished() || self.drain(Duration::ZERO) {
                let _ = thread.join();
            }
        }
    }
}

/// The writer thread: takes what is pending and writes it, until closed.
fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    crate::seccomp::apply_or_exit(crate::seccomp::Kind::Console);
    loop {
        let (chunk, dropped) = {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.closed {
                pending = shared
                    .changed
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if pending.bytes.is_empty() {
                return;
            }
            let chunk: Vec<u8> = pending.bytes.drain(..).collect();
            pending.writing = chunk.len();
            (chunk, std::mem::take(&mut pending.dropped))
        };
        if dropped > 0 {
            devices::warn_limited!(
                "serial console: {dropped} bytes of guest output dropped (its reader is not \
                 keeping up)"
            );
        }
        if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
            devices::warn_limited!("serial console: writing the guest's output: {e}");
        }
        shared.lock().writing = 0;
        shared.changed.notify_all();
    }
}

/// A console file that starts anew past `limit` bytes, the previous one kept as `FILE.1`.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

/// The default size limit of a console file.
pub const FILE_LIMIT: u64 = 32 << 20;

impl RotatingFile {
    /// Opens `path` for appending (created if absent).
    pub fn open(path: &Path, limit: u64) -> std::io::Result<RotatingFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            written,
            limit,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.limit {
            self.rotate()?;
        }
        let room = (self.limit.saturating_sub(self.written) as usize).max(1);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that writes nothing until told to.
    struct Stalled(Mutex<mpsc::Receiver<()>>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 15, item 7: a reader that stalls does not hold the writer (the vCPU).
    #[test]
    fn a_stalled_reader_never_blocks_the_guest() {
        let (go, wait) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut out =
            Buffered::with_capacity(Box::new(Stalled(Mutex::new(wait), seen.clone())), 4096)
                .unwrap();
        let started = Instant::now();
        for i in 0..100_000u32 {
            out.write_all(&[(i % 251) as u8]).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Released: what fitted is written, in order, and the rest was dropped: the writer's
        // first take (a prefix of the output) and the buffer it found full when it came back,
        // with the bytes dropped meanwhile missing between them.
        for _ in 0..4 {
            go.send(()).unwrap();
        }
        drop(go);
        out.flush().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty() && seen.len() <= 2 * 4096, "{}", seen.len());
        assert_eq!(seen[0], 0);
        let gaps = seen
            .windows(2)
            .filter(|w| w[1] != ((u32::from(w[0]) + 1) % 251) as u8)
            .count();
        assert!(gaps <= 1, "{gaps} gaps in what was written");
        drop(out);
    }

    #[test]
    fn everything_is_written_when_the_reader_keeps_up() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        struct Collect(Arc<Mutex<Vec<u8>>>);
        impl Write for Collect {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = Buffered::new(Box::new(Collect(seen.clone()))).unwrap();
        let text = b"console line\r\n".repeat(1000);
        for chunk in text.chunks(7) {
            out.write_all(chunk).unwrap();
        }
        // The end of the console writes what is left.
        drop(out);
        assert!(*seen.lock().unwrap() == text);
    }

    /// Issue 15, item 7: a console file never grows past its limit; the one before is kept.
    #[test]
    fn a_console_file_rotates_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut file = RotatingFile::open(&path, 1000).unwrap();
        for i in 0..5000u32 {
            file.write_all(format!("{i:05}\n").as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(now.len() <= 1000 && before.len() <= 1000);
        assert!(now.ends_with("04999\n"), "{now}");
        // The two files hold the last lines, whole and in order.
        let tail: Vec<u32> = before
            .lines()
            .chain(now.lines())
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(tail.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
