//! The host side of an image: a regular file or a block device, read and written at offsets,
//! optionally with `O_DIRECT`.
//!
//! With `O_DIRECT` the kernel wants the buffer address, the file offset and the length aligned
//! to the device's logical block size. Callers (the qcow2 metadata code above all) issue small,
//! unaligned requests, so every request that is not aligned to [`DIRECT_ALIGN`] goes through an
//! aligned bounce buffer: reads widen the range, writes read-modify-write the first and last
//! blocks. 4096 bytes covers both 512-byte and 4K-sector devices.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use super::guest_io::{total_len, SliceCursor, BOUNCE_CHUNK};
use super::lock::ImageLock;
use super::BlockError;

/// Alignment of buffers, offsets and lengths for `O_DIRECT` I/O.
pub const DIRECT_ALIGN: usize = 4096;

/// Most buffers passed to one `preadv`/`pwritev` call (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes zeros to `bufs`, skipping the first `skip` bytes of the first one.
fn zero_fill(bufs: &[VolatileSlice<'_>], skip: usize) {
    const ZEROS: [u8; 4096] = [0; 4096];
    for (i, buf) in bufs.iter().enumerate() {
        let mut at = if i == 0 { skip } else { 0 };
        while at < buf.len() {
            let Ok(rest) = buf.offset(at) else { break };
            let n = (rest.len()).min(ZEROS.len());
            rest.copy_from(&ZEROS[..n]);
            at += n;
        }
    }
}

/// A byte buffer whose start is aligned to [`DIRECT_ALIGN`], made safely by over-allocating.
pub(crate) struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Self { buf, start, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

fn align_down(v: u64) -> u64 {
    v & !(DIRECT_ALIGN as u64 - 1)
}

fn align_up(v: u64) -> Option<u64> {
    Some(v.checked_add(DIRECT_ALIGN as u64 - 1)? & !(DIRECT_ALIGN as u64 - 1))
}

fn is_aligned(buf: &[u8], offset: u64) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
        && offset & (DIRECT_ALIGN as u64 - 1) == 0
        && buf.len() & (DIRECT_ALIGN - 1) == 0
}

/// An open image file.
pub(crate) struct HostFile {
    file: File,
    path: PathBuf,
    direct: bool,
    block_device: bool,
    /// Something was written since the last `fdatasync`.
    unsynced: bool,
    /// Tests: called after every write, to capture what a crash at that moment would leave.
    #[cfg(test)]
    write_hook: Option<Box<dyn FnMut() + Send>>,
}

impl HostFile {
    /// Opens `path`, which must be a regular file or a block device.
    pub(crate) fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        // Look before opening: opening a FIFO would block, and a character device is no disk.
        let meta = std::fs::metadata(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let file_type = meta.file_type();
        let block_device = file_type.is_block_device();
        if !file_type.is_file() && !block_device {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| {
            if direct && source.raw_os_error() == Some(libc::EINVAL) {
                BlockError::DirectUnsupported {
                    path: path.to_path_buf(),
                }
            } else {
                BlockError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        // What was opened, which is what counts if the path changed since it was looked at.
        let opened_type = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .file_type();
        if opened_type.is_block_device() != block_device || !(opened_type.is_file() || block_device)
        {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct,
            block_device,
            unsynced: false,
            #[cfg(test)]
            write_hook: None,
        })
    }

    /// Another descriptor of the same open file description.
    fn dup(&self) -> Result<File, BlockError> {
        self.file.try_clone().map_err(|source| BlockError::Io {
            path: self.path.clone(),
            op: "dup",
            offset: 0,
            source,
        })
    }

    /// Another handle on the same open file (`dup`), with nothing written through it yet.
    pub(crate) fn try_clone(&self) -> Result<Self, BlockError> {
        Ok(Self {
            file: self.dup()?,
            path: self.path.clone(),
            direct: self.direct,
            block_device: self.block_device,
            unsynced: false,
            #[cfg(test)]
            write_hook: None,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, offset: u64, source: io::Error) -> BlockError {
        BlockError::io(&self.path, op, offset, source)
    }

    /// The size of the file or block device in bytes.
    pub(crate) fn len(&self) -> Result<u64, BlockError> {
        if self.block_device {
            // Seeking to the end reports a block device's size (as BLKGETSIZE64 would) without
            // an ioctl; reads and writes use explicit offsets, so the position is irrelevant.
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| self.err("seek to end", 0, e))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| self.err("stat", 0, e))
        }
    }

    /// Reads into `buf` from `offset` until `buf` is full or the end of the file; returns the
    /// number of bytes read.
    fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    /// Returns how many bytes came from the file.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, BlockError> {
        let n = if !self.direct || is_aligned(buf, offset) {
            self.read_raw(buf, offset)
                .map_err(|e| self.err("read", offset, e))?
        } else {
            let end = offset
                .checked_add(buf.len() as u64)
                .and_then(align_up)
                .ok_or_else(|| {
                    self.err(
                        "read",
                        offset,
                        io::Error::from_raw_os_error(libc::EOVERFLOW),
                    )
                })?;
            let start = align_down(offset);
            let mut bounce = AlignedBuf::new((end - start) as usize);
            let got = self
                .read_raw(bounce.as_mut_slice(), start)
                .map_err(|e| self.err("read", offset, e))?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
            got.saturating_sub(skip).min(buf.len())
        };
        buf[n..].fill(0);
        Ok(n)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short read is an error.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(self.err(
                "read",
                offset,
                io::Error::new(io::ErrorKind::UnexpectedEof, "unexpected end of file"),
            ));
        }
        Ok(())
    }

    fn write_raw(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    #[cfg(test)]
    pub(crate) fn set_write_hook(&mut self, hook: Box<dyn FnMut() + Send>) {
        self.write_hook = Some(hook);
    }

    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let result = self.write_at_inner(buf, offset);
        #[cfg(test)]
        if let Some(hook) = self.write_hook.as_mut() {
            hook();
        }
        result
    }

    fn write_at_inner(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.unsynced = true;
        if !self.direct || is_aligned(buf, offset) {
            return self
                .write_raw(buf, offset)
                .map_err(|e| self.err("write", offset, e));
        }
        let overflow = || io::Error::from_raw_os_error(libc::EOVERFLOW);
        let data_end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| self.err("write", offset, overflow()))?;
        let end = align_up(data_end).ok_or_else(|| self.err("write", offset, overflow()))?;
        let start = align_down(offset);
        let old_len = if self.block_device {
            u64::MAX
        } else {
            self.len()?
        };
        let mut bounce = AlignedBuf::new((end - start) as usize);
        let block = DIRECT_ALIGN;
        let total = bounce.len;
        // Read-modify-write the partial first and last blocks.
        if offset != start {
            self.read_raw(&mut bounce.as_mut_slice()[..block], start)
                .map_err(|e| self.err("read", start, e))?;
        }
        if data_end != end && (total > block || offset == start) {
            let last = end - block as u64;
            self.read_raw(&mut bounce.as_mut_slice()[total - block..], last)
                .map_err(|e| self.err("read", last, e))?;
        }
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_raw(bounce.as_slice(), start)
            .map_err(|e| self.err("write", offset, e))?;
        // The widened write must not grow a regular file past what was asked for.
        if end > old_len && end > data_end {
            self.file
                .set_len(old_len.max(data_end))
                .map_err(|e| self.err("truncate", data_end, e))?;
        }
        Ok(())
    }

    /// Whether `preadv`/`pwritev` may use `bufs` at `offset` as they are: always without
    /// `O_DIRECT`; with it, only when every buffer and the offset are aligned.
    pub(crate) fn can_use_vectored(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> bool {
        let mask = DIRECT_ALIGN - 1;
        !self.direct
            || (offset & mask as u64 == 0
                && bufs
                    .iter()
                    .all(|b| (b.ptr_guard().as_ptr() as usize) & mask == 0 && b.len() & mask == 0))
    }

    /// Reads `bufs` (guest memory) from `offset` with `preadv`, no intermediate copy; bytes past
    /// the end of the file read as zeros. The caller checked [`HostFile::can_use_vectored`].
    pub(crate) fn read_volatile_at(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.vectored(bufs, offset, false)
            .map_err(|e| self.err("preadv", offset, e))
    }

    /// Writes `bufs` (guest memory) at `offset` with `pwritev`, no intermediate copy. The caller
    /// checked [`HostFile::can_use_vectored`].
    pub(crate) fn write_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.unsynced = true;
        let result = self
            .vectored(bufs, offset, true)
            .map_err(|e| self.err("pwritev", offset, e));
        #[cfg(test)]
        if let Some(hook) = self.write_hook.as_mut() {
            hook();
        }
        result
    }

    /// Reads `bufs` (guest memory) from `offset`: straight into them with `preadv` when
    /// [`HostFile::can_use_vectored`] allows, else through a bounded host buffer (misaligned
    /// `O_DIRECT` buffers). Bytes past the end of the file read as zeros.
    pub(crate) fn read_guest(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        if self.can_use_vectored(bufs, offset) {
            return self.read_volatile_at(bufs, offset);
        }
        let total = total_len(bufs);
        let mut bounce = vec![0u8; total.min(BOUNCE_CHUNK as u64) as usize];
        let mut cursor = SliceCursor::new(bufs);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(BOUNCE_CHUNK as u64) as usize;
            self.read_at(&mut bounce[..n], offset + done)?;
            cursor.scatter(&bounce[..n]);
            done += n as u64;
        }
        Ok(())
    }

    /// Writes `bufs` (guest memory) at `offset`: straight from them with `pwritev` when
    /// [`HostFile::can_use_vectored`] allows, else through a bounded host buffer.
    pub(crate) fn write_guest(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        if self.can_use_vectored(bufs, offset) {
            return self.write_volatile_at(bufs, offset);
        }
        let total = total_len(bufs);
        let mut bounce = vec![0u8; total.min(BOUNCE_CHUNK as u64) as usize];
        let mut cursor = SliceCursor::new(bufs);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(BOUNCE_CHUNK as u64) as usize;
            cursor.gather(&mut bounce[..n]);
            self.write_at(&bounce[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// `preadv`/`pwritev` over all of `bufs`, at most [`MAX_IOVECS`] buffers per call, resuming
    /// after short transfers.
    fn vectored(&self, bufs: &[VolatileSlice<'_>], offset: u64, write: bool) -> io::Result<()> {
        let mut index = 0;
        let mut skip = 0usize;
        let mut pos = offset;
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(MAX_IOVECS));
        while index < bufs.len() {
            iovecs.clear();
            for (i, buf) in bufs[index..].iter().take(MAX_IOVECS).enumerate() {
                let from = if i == 0 { skip } else { 0 };
                // Only the address is taken; for plain mmap'd guest memory the guard does
                // nothing on drop, and `bufs` borrows the mapping for this whole call.
                let base = buf.ptr_guard_mut().as_ptr();
                iovecs.push(libc::iovec {
                    iov_base: base.wrapping_add(from).cast(),
                    iov_len: buf.len() - from,
                });
            }
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let count = iovecs.len() as libc::c_int;
            let fd = self.file.as_raw_fd();
            let n = if write {
                // SAFETY: every iovec describes `len` bytes inside a `VolatileSlice` of guest
                // memory, which stays mapped while `bufs` is borrowed (the whole call);
                // pwritev only reads them. `iovecs` outlives the call and holds `count` entries.
                unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, off) }
            } else {
                // SAFETY: as above; preadv writes only within the described guest memory,
                // which the guest shares with us and accesses as plain memory (no Rust
                // references to it exist).
                unsafe { libc::preadv(fd, iovecs.as_ptr(), count, off) }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                if write {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                // End of file: the rest reads as zeros.
                zero_fill(&bufs[index..], skip);
                return Ok(());
            }
            let mut n = n as usize;
            pos += n as u64;
            while index < bufs.len() && n >= bufs[index].len() - skip {
                n -= bufs[index].len() - skip;
                skip = 0;
                index += 1;
            }
            skip += n;
        }
        Ok(())
    }

    /// A handle on the lock of this open file (see [`super::lock`]).
    pub(crate) fn lock_handle(&self, writable: bool) -> Result<ImageLock, BlockError> {
        Ok(ImageLock::new(self.dup()?, &self.path, writable))
    }

    /// Whether the image is a block device (a regular file otherwise).
    pub(crate) fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The descriptor, for I/O submitted elsewhere (`io_uring`).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Tests: whether a barrier would sync.
    #[cfg(test)]
    pub(crate) fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Notes a write made through [`HostFile::raw_fd`], so the next barrier syncs.
    pub(crate) fn note_write(&mut self) {
        self.unsynced = true;
    }

    /// Makes everything written so far durable (`fdatasync`).
    pub(crate) fn sync(&mut self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| self.err("fdatasync", 0, e))?;
        self.unsynced = false;
        Ok(())
    }

    /// An ordering point: whatever was written before reaches the disk before anything written
    /// after. Costs nothing when nothing was written since the last one.
    pub(crate) fn barrier(&mut self) -> Result<(), BlockError> {
        if self.unsynced {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros without writing buffers, deallocating it when
    /// `unmap`. Returns `false` when the filesystem or device cannot (the caller writes zeros).
    pub(crate) fn zero_range(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<bool, BlockError> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(false);
        };
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate(2) takes a file descriptor that `self.file` keeps open for the whole
        // call and plain integers; it reads or writes none of our memory.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if ret == 0 {
            self.unsynced = true;
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL)
            | Some(libc::ENODEV) => Ok(false),
            _ => Err(self.err("fallocate", offset, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_past_eof_as_zeros() {
        let (_d, path) = file_with(&[7u8; 100]);
        let f = HostFile::open(&path, true, false).unwrap();
        let mut buf = [1u8; 50];
        assert_eq!(f.read_at(&mut buf, 80).unwrap(), 20);
        assert_eq!(&buf[..20], &[7u8; 20]);
        assert_eq!(&buf[20..], &[0u8; 30]);
        assert!(f.read_exact_at(&mut buf, 80).is_err());
    }

    #[test]
    fn direct_unaligned_io_round_trips_and_keeps_size() {
        let (_d, path) = file_with(&vec![0xaau8; 10_000]);
        let mut f = match HostFile::open(&path, false, true) {
            Ok(f) => f,
            // Some filesystems (old tmpfs) refuse O_DIRECT; that path is what we check then.
            Err(BlockError::DirectUnsupported { .. }) => return,
            Err(e) => panic!("{e}"),
        };
        f.write_at(&[1, 2, 3], 4095).unwrap();
        f.write_at(&[9u8; 20], 9990).unwrap();
        assert_eq!(f.len().unwrap(), 10_010);
        let mut buf = [0u8; 5];
        f.read_at(&mut buf, 4094).unwrap();
        assert_eq!(buf, [0xaa, 1, 2, 3, 0xaa]);
        let mut tail = [0u8; 30];
        assert_eq!(f.read_at(&mut tail, 9985).unwrap(), 25);
        assert_eq!(&tail[..5], &[0xaa; 5]);
        assert_eq!(&tail[5..25], &[9u8; 20]);
        f.sync().unwrap();
    }

    #[test]
    fn rejects_fifos_and_char_devices() {
        assert!(matches!(
            HostFile::open(Path::new("/dev/null"), true, false),
            Err(BlockError::NotADisk { .. })
        ));
        assert!(matches!(
            HostFile::open(Path::new("/nonexistent/x.img"), true, false),
            Err(BlockError::Open { .. })
        ));
    }
}
