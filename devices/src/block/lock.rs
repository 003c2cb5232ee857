//! Image locking, as QEMU does it: an open file description lock (`F_OFD_SETLK`) on every
//! image, shared while it is only read, exclusive while it may be written. Two VMs (or two
//! `--disk` of one) that would both write an image, or one writing what another reads,
//! are refused at open instead of corrupting it.
//!
//! A live migration runs one VM in two processes: both open its disks. The source holds its
//! images in [`LockMode::Standby`] (shared) from the start of the migration, the destination
//! opens them in that mode, the source lets go ([`LockMode::Released`]) once its last write
//! is flushed, and the destination takes the lock the VM needs ([`LockMode::Active`]) when
//! it takes the VM over.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::BlockError;

/// Which lock an image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// What the VM's use needs: exclusive for a writable image, shared for a read-only one.
    Active,
    /// Shared only: another process runs the VM too (the two ends of a live migration).
    Standby,
    /// None: another process runs the VM from here on.
    Released,
}

/// The lock of one open image, changed through its own handle on the open file description
/// (so while the image itself is busy in an I/O thread).
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl ImageLock {
    pub(crate) fn new(file: File, path: &Path, writable: bool) -> Self {
        ImageLock {
            file,
            path: path.to_path_buf(),
            writable,
        }
    }

    /// Takes the lock `mode` asks for, or says who holds a conflicting one.
    pub fn set(&self, mode: LockMode) -> Result<(), BlockError> {
        let kind = match mode {
            LockMode::Active if self.writable => libc::F_WRLCK,
            LockMode::Active | LockMode::Standby => libc::F_RDLCK,
            LockMode::Released => libc::F_UNLCK,
        };
        ofd_lock(&self.file, kind).map_err(|source| self.conflict(kind, source))
    }

    fn conflict(&self, wanted: i32, source: io::Error) -> BlockError {
        if !matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            return BlockError::Lock {
                path: self.path.clone(),
                reason: format!("cannot lock it: {source}"),
            };
        }
        let held = match ofd_holder(&self.file, wanted) {
            Some(libc::F_WRLCK) => "another process writes it",
            Some(_) => "another process reads it",
            None => "another process holds a lock on it",
        };
        let wants = if wanted == libc::F_WRLCK {
            "to write it"
        } else {
            "to read it"
        };
        BlockError::Lock {
            path: self.path.clone(),
            reason: format!(
                "in use: {held} (another VM, or the same image given twice?), so it cannot \
                 be opened {wants}"
            ),
        }
    }
}

fn flock(kind: i32) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0, l_len = 0: the whole file, however it grows.
    fl
}

/// Sets (or, with `F_UNLCK`, drops) `file`'s open file description lock on the whole file,
/// without waiting.
fn ofd_lock(file: &File, kind: i32) -> io::Result<()> {
    let fl = flock(kind);
    // SAFETY: F_OFD_SETLK reads one valid `flock` for a descriptor this process owns.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The type of a lock another open file description holds that conflicts with `kind`.
fn ofd_holder(file: &File, kind: i32) -> Option<i32> {
    let mut fl = flock(kind);
    // SAFETY: F_OFD_GETLK reads and writes one valid `flock`, owned by this frame.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    (rc == 0 && i32::from(fl.l_type) != libc::F_UNLCK).then_some(i32::from(fl.l_type))
}
