//! Raw images: the guest's bytes at the same offsets in a regular file or a block device.

use std::os::unix::io::RawFd;
use std::path::Path;

use vm_memory::VolatileSlice;

use super::file::HostFile;
use super::guest_io::{self, total_len};
use super::qcow2::header::MAGIC;
use super::{check_range, BlockError, DiskImage, Format, ImageLock};

/// Largest buffer of zeros written at once when the host cannot zero a range by itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open raw image.
pub struct RawImage {
    file: HostFile,
    size: u64,
    read_only: bool,
    /// The format was probed, not given: refuse writes that would make the next probe see a
    /// qcow2 image (whose header could name any host file as its backing file).
    probed: bool,
}

impl RawImage {
    pub(crate) fn open(file: HostFile, read_only: bool, probed: bool) -> Result<Self, BlockError> {
        let size = file.len()?;
        Ok(Self {
            file,
            size,
            read_only,
            probed,
        })
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path().to_path_buf(),
            });
        }
        check_range(self.path(), offset, len, self.size)
    }

    /// Whether writing `buf` at `offset` would put the qcow2 magic at the start of a probed
    /// image (QEMU restricts probed raw images the same way).
    fn plants_signature(&self, buf: &[u8], offset: u64) -> Result<bool, BlockError> {
        if !self.probed || offset >= MAGIC.len() as u64 || buf.is_empty() {
            return Ok(false);
        }
        let mut head = [0u8; 4];
        self.file.read_at(&mut head, 0)?;
        let start = offset as usize;
        let n = (MAGIC.len() - start).min(buf.len());
        head[start..start + n].copy_from_slice(&buf[..n]);
        Ok(head == MAGIC)
    }
}

impl RawImage {
    /// Tests: the host file.
    #[cfg(test)]
    pub(crate) fn host_file(&self) -> &HostFile {
        &self.file
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(self.path(), offset, buf.len() as u64, self.size)?;
        self.file.read_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        if self.plants_signature(buf, offset)? {
            return Err(BlockError::ProbedRawSignature {
                path: self.path().to_path_buf(),
            });
        }
        self.file.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.barrier()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        // Advisory: punch a hole where the host can; nothing to do where it cannot.
        if len > 0 {
            self.file.zero_range(offset, len, true)?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if len == 0 || self.file.zero_range(offset, len, may_unmap)? {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            self.file.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn image_lock(&self) -> Option<ImageLock> {
        self.file.lock_handle(!self.read_only).ok()
    }

    fn reload(&mut self) -> Result<(), BlockError> {
        self.size = self.file.len()?;
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn passthrough(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        write: bool,
    ) -> Option<(RawFd, u64)> {
        let total = total_len(bufs);
        if write {
            self.check_write(offset, total).ok()?;
            if self.probed && offset < MAGIC.len() as u64 {
                return None;
            }
        } else {
            check_range(self.path(), offset, total, self.size).ok()?;
        }
        if !self.file.can_use_vectored(bufs, offset) {
            return None;
        }
        if write {
            self.file.note_write();
        }
        Some((self.file.raw_fd(), offset))
    }

    fn read_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        check_range(self.path(), offset, total_len(bufs), self.size)?;
        if !self.file.can_use_vectored(bufs, offset) {
            return guest_io::read_by_copy(self, bufs, offset);
        }
        self.file.read_volatile_at(bufs, offset)
    }

    fn write_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.check_write(offset, total_len(bufs))?;
        // The signature guard looks at the bytes written to the first sector: take the copying
        // path (through `write_at`) for the rare write that touches them.
        if (self.probed && offset < MAGIC.len() as u64) || !self.file.can_use_vectored(bufs, offset)
        {
            return guest_io::write_by_copy(self, bufs, offset);
        }
        self.file.write_volatile_at(bufs, offset)
    }
}
