//! Scatter-gather lists over guest memory, for `readv`/`writev` straight between the tap and
//! the guest's buffers (no bounce copy).

use std::io;
use std::os::fd::RawFd;

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// At most this many segments per `readv`/`writev` (the kernel's UIO_MAXIOV).
pub const MAX_IOVS: usize = 1024;

/// Why a range could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The range is not (all) guest memory.
    Memory,
    /// The list has [`MAX_IOVS`] segments.
    Full,
}

/// A list of guest memory segments, each kept both as a guest address (for bounds-checked
/// writes) and as a host iovec (for the system calls). Holding a clone of the guest memory
/// keeps every iovec's mapping alive as long as the list.
pub struct GuestIoVecs {
    mem: GuestMemoryMmap,
    iovs: Vec<libc::iovec>,
    addrs: Vec<GuestAddress>,
}

// SAFETY: the raw pointers in `iovs` only address mappings of `self.mem` (a `Send` value the
// list owns, which keeps them mapped wherever the list goes); they carry no thread affinity and
// are only dereferenced by the kernel in `readv`/`writev` calls made by the list's owner. A
// device's worker moves its lists to a new thread when it resumes after a pause.
unsafe impl Send for GuestIoVecs {}

impl GuestIoVecs {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        GuestIoVecs {
            mem,
            iovs: Vec::with_capacity(MAX_IOVS),
            addrs: Vec::with_capacity(MAX_IOVS),
        }
    }

    pub fn len(&self) -> usize {
        self.iovs.len()
    }

    pub fn clear(&mut self) {
        self.iovs.clear();
        self.addrs.clear();
    }

    /// Drops segments from index `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.iovs.truncate(len);
        self.addrs.truncate(len);
    }

    /// Marks the first `n` segments dirty in guest memory's bitmap (after a `readv` into them;
    /// see [`crate::mark_dirty`]).
    pub fn mark_front_dirty(&self, n: usize) {
        for (iov, addr) in self.iovs.iter().zip(&self.addrs).take(n) {
            crate::mark_dirty(&self.mem, *addr, iov.iov_len);
        }
    }

    /// Drops the first `n` segments.
    pub fn drain_front(&mut self, n: usize) {
        self.iovs.drain(..n);
        self.addrs.drain(..n);
    }

    /// Appends the guest range `[addr, addr + len)` (split at memory region boundaries).
    /// Fails, leaving the list as it was, if the range is not all guest memory or the list
    /// would exceed [`MAX_IOVS`].
    pub fn push(&mut self, addr: GuestAddress, len: u32) -> Result<(), PushError> {
        let start = self.iovs.len();
        let mut at = addr;
        for slice in GuestMemoryBackend::get_slices(&self.mem, addr, len as usize) {
            let Ok(slice) = slice else {
                self.truncate(start);
                return Err(PushError::Memory);
            };
            if self.iovs.len() >= MAX_IOVS {
                self.truncate(start);
                return Err(PushError::Full);
            }
            self.iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            self.addrs.push(at);
            at = GuestAddress(at.0.wrapping_add(slice.len() as u64));
        }
        Ok(())
    }

    /// `readv` from `fd` into segments `range`.
    pub fn readv(&self, fd: RawFd, range: std::ops::Range<usize>) -> io::Result<usize> {
        let iovs = &self.iovs[range];
        // SAFETY: every iovec was built from a `VolatileSlice` of `self.mem`, whose mappings
        // this list keeps alive; the kernel writes at most `iov_len` bytes to each. Guest
        // memory is shared with the guest anyway, so no Rust reference aliases it.
        let n = unsafe { libc::readv(fd, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// `writev` segments `range` to `fd`.
    pub fn writev(&self, fd: RawFd, range: std::ops::Range<usize>) -> io::Result<usize> {
        let iovs = &self.iovs[range];
        // SAFETY: as in `readv`; the kernel only reads the segments.
        let n = unsafe { libc::writev(fd, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Copies `data` into segments `range`, starting `offset` bytes into them; returns how
    /// many bytes were copied.
    pub fn write_at(&self, range: std::ops::Range<usize>, mut offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for i in range {
            if done == data.len() {
                break;
            }
            let seg = self.iovs[i].iov_len;
            if offset >= seg {
                offset -= seg;
                continue;
            }
            let n = (seg - offset).min(data.len() - done);
            let at = GuestAddress(self.addrs[i].0.wrapping_add(offset as u64));
            if self.mem.write_slice(&data[done..done + n], at).is_err() {
                break;
            }
            done += n;
            offset = 0;
        }
        done
    }
}
