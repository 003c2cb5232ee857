//! Network namespaces for tests: each is a thread that unshared its network namespace and
//! runs what it is given there. Nothing reaches the host's network.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace of its own, alive while this lives.
pub struct Netns {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// The namespace, for moving links into it.
    pub file: File,
}

impl Netns {
    /// A new, empty network namespace (needs CAP_SYS_ADMIN), or `None` without the privilege.
    pub fn new() -> Option<Netns> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (file_tx, file_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare takes a flag word; it changes only this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = file_tx.send(None);
                return;
            }
            let _ = file_tx.send(File::open("/proc/thread-self/ns/net").ok());
            for job in rx {
                job();
            }
        });
        let file = file_rx.recv().ok().flatten()?;
        Some(Netns {
            jobs: Some(jobs),
            thread: Some(thread),
            file,
        })
    }

    /// Runs `f` in the namespace and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .expect("alive")
            .send(job)
            .expect("namespace thread");
        rx.recv().expect("the job panicked")
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
