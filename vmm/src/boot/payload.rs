//! Payload files (kernel, initramfs) on their way into fresh guest RAM.
//!
//! How a payload is best copied depends on the pages behind guest RAM:
//! - With 4 KiB pages, sendfile(2) into the memfd: the kernel copies from the file's page cache
//!   in the memfd's write path and the VMM never takes a page fault per 4 KiB. Measured in the
//!   emulated test host, the default guest's vmlinux (45 MB to load) takes ~190 ms this way
//!   and 400-700 ms with read(2) into the mapping. Pages written this way are never huge.
//! - With transparent huge pages (see [`crate::vstate::memory::shmem_huge_pages`]), copies through the
//!   mapping, so that each fault brings in a whole 2 MiB page that the guest later maps with
//!   one nested page-table entry. Segments of 8 MiB or more are split between a few threads,
//!   and pages that are all zeroes in the file are skipped, since fresh guest RAM already is
//!   zero (a vmlinux's last segment is mostly .bss).
//!
//! Anything the sendfile path cannot serve (a region without a file, a file sendfile refuses)
//! falls back to the second path.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use devices::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

/// A payload file that linux-loader (or our own loaders) read into guest memory that was
/// created for this boot and not written yet (all zeroes).
pub struct PayloadFile<'m> {
    file: File,
    mem: &'m GuestMemoryMmap,
    /// Whether to copy with sendfile(2); cleared once it refuses this file.
    sendfile_ok: bool,
}

impl<'m> PayloadFile<'m> {
    pub fn new(file: File, mem: &'m GuestMemoryMmap) -> Self {
        Self::with_sendfile(file, mem, !crate::vstate::memory::shmem_huge_pages())
    }

    fn with_sendfile(file: File, mem: &'m GuestMemoryMmap, sendfile: bool) -> Self {
        Self {
            file,
            mem,
            sendfile_ok: sendfile,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// The guest RAM region holding `len` bytes of host memory at `ptr`, and their offset in it.
    fn region_of(&self, ptr: *const u8, len: usize) -> Option<(&GuestRegionMmap, u64)> {
        let addr = ptr as usize;
        self.mem.iter().find_map(|region| {
            let base = region.as_ptr() as usize;
            let inside = addr >= base && addr.checked_add(len)? <= base + region.size();
            inside.then(|| (region, (addr - base) as u64))
        })
    }

    /// The memory file and offset in it behind `len` bytes of host memory at `ptr`, when they
    /// lie inside one file-backed guest RAM region.
    fn backing(&self, ptr: *const u8, len: usize) -> Option<(&File, u64)> {
        let (region, offset) = self.region_of(ptr, len)?;
        let fo = region.file_offset()?;
        Some((fo.file(), fo.start() + offset))
    }

    /// The guest-physical address of `len` bytes of host memory at `ptr`, when it is guest RAM.
    fn guest_addr(&self, ptr: *const u8, len: usize) -> Option<GuestAddress> {
        let (region, offset) = self.region_of(ptr, len)?;
        Some(region.start_addr().unchecked_add(offset))
    }

    /// Copies up to `len` bytes from the file's position into `memfd` at `offset` and advances
    /// the file's position. `Ok(None)` when sendfile(2) cannot serve this pair of files.
    fn send(&self, memfd: &File, offset: u64, len: usize) -> std::io::Result<Option<usize>> {
        // Nothing else in the VMM uses the memory file's position (guest RAM is only touched
        // through its mappings), so it is free to carry sendfile's destination offset.
        let mut out = memfd;
        out.seek(SeekFrom::Start(offset))?;
        let mut done = 0;
        while done < len {
            // SAFETY: both descriptors are open files owned by `self` and the guest memory,
            // a null offset pointer means "use and advance the input file's position", and
            // the kernel writes nothing into our address space.
            let n = unsafe {
                libc::sendfile(
                    memfd.as_raw_fd(),
                    self.file.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) if done == 0 => {
                        return Ok(None)
                    }
                    _ if done > 0 => break,
                    _ => return Err(err),
                }
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(Some(done))
    }
}

/// Below this, one read(2) is as fast as several.
const PARALLEL_MIN: usize = 8 << 20;
/// Readers for one large segment; each takes a 2 MiB-aligned share.
const MAX_READERS: usize = 4;
const SHARE_ALIGN: usize = 2 << 20;
/// Each reader's bounce buffer, on its own stack: the thread's exit gives the memory back,
/// where a heap buffer would stay resident in the allocator for the VM's whole life.
const BOUNCE: usize = 256 << 10;
const PAGE: usize = 4096;

impl PayloadFile<'_> {
    /// Reads `len` bytes from the file's position into guest RAM at `dest` with several
    /// threads, each taking its own share through a bounce buffer, and advances the position
    /// by what was read. Guest RAM is fresh (all zeroes) when a payload loads, so pages that
    /// are all zeroes in the file are not written at all: a vmlinux carries megabytes of them
    /// (.bss sits inside its last segment). Returns the bytes read from the start without a
    /// gap.
    fn read_parallel(&mut self, dest: GuestAddress, len: usize) -> std::io::Result<usize> {
        let start = self.file.stream_position()?;
        let readers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_READERS);
        let share = len.div_ceil(readers).next_multiple_of(SHARE_ALIGN);
        let (file, mem) = (&self.file, self.mem);
        let results: Vec<std::io::Result<usize>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..len.div_ceil(share))
                .map(|i| {
                    let off = i * share;
                    let count = share.min(len - off);
                    let at = dest.unchecked_add(off as u64);
                    std::thread::Builder::new()
                        .name("payload".into())
                        .stack_size(devices::THREAD_STACK_SIZE)
                        .spawn_scoped(s, move || {
                            copy_nonzero(file, start + off as u64, mem, at, count)
                        })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.and_then(|w| {
                        w.join().unwrap_or_else(|_| {
                            Err(std::io::Error::other("payload reader panicked"))
                        })
                    })
                })
                .collect()
        });
        let mut total = 0;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(n) => {
                    total += n;
                    if n < share.min(len - i * share) {
                        break;
                    }
                }
                Err(e) if total == 0 => return Err(e),
                Err(_) => break,
            }
        }
        self.file.seek(SeekFrom::Start(start + total as u64))?;
        Ok(total)
    }
}

/// Copies `len` bytes at `offset` of `file` to guest RAM at `dest`, skipping pages that are
/// all zeroes, until done or EOF. Returns the bytes read.
fn copy_nonzero(
    file: &File,
    offset: u64,
    mem: &GuestMemoryMmap,
    dest: GuestAddress,
    len: usize,
) -> std::io::Result<usize> {
    let mut bounce = [0u8; BOUNCE];
    let mut done = 0;
    while done < len {
        let want = BOUNCE.min(len - done);
        let n = match file.read_at(&mut bounce[..want], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        for (i, page) in bounce[..n].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let at = dest.unchecked_add((done + i * PAGE) as u64);
                mem.write_slice(page, at)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        done += n;
    }
    Ok(done)
}

impl Read for PayloadFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for PayloadFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for PayloadFile<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        if self.sendfile_ok && len > 0 {
            let ptr = buf.ptr_guard().as_ptr();
            if let Some((memfd, offset)) = self.backing(ptr, len) {
                match self.send(memfd, offset, len) {
                    Ok(Some(n)) => {
                        buf.bitmap().mark_dirty(0, n);
                        return Ok(n);
                    }
                    Ok(None) => self.sendfile_ok = false,
                    Err(e) => return Err(VolatileMemoryError::IOError(e)),
                }
            }
        }
        if len >= PARALLEL_MIN {
            if let Some(dest) = self.guest_addr(buf.ptr_guard().as_ptr(), len) {
                let n = self
                    .read_parallel(dest, len)
                    .map_err(VolatileMemoryError::IOError)?;
                buf.bitmap().mark_dirty(0, n);
                return Ok(n);
            }
        }
        self.file.read_volatile(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    fn payload(bytes: &[u8]) -> File {
        let mut f = tempfile_in_tmp();
        f.write_all(bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "podvisor-payload-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn sendfile_lands_in_guest_memory_at_the_right_place() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(16 << 20)).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 + 3) as u8).collect();
        let mut src = PayloadFile::with_sendfile(payload(&data), &mem, true);
        // Skip a header the way a loader seeks to a segment.
        src.seek(SeekFrom::Start(100)).unwrap();
        let at = GuestAddress(0x20_0000 + 17);
        mem.read_exact_volatile_from(at, &mut src, data.len() - 100)
            .unwrap();
        let mut back = vec![0u8; data.len() - 100];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(back, data[100..]);
        // Bytes around the copy are untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000 + 16)).unwrap(), 0);
        let after = at.0 + (data.len() - 100) as u64;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(after)).unwrap(), 0);
        // The file position moved past what was read, as read(2) would leave it.
        assert_eq!(src.stream_position().unwrap(), data.len() as u64);
    }

    /// A payload past the parallel threshold: patterned pages with all-zero pages between.
    fn large_payload() -> Vec<u8> {
        let len = PARALLEL_MIN + 3 * SHARE_ALIGN + 4 * PAGE + 77;
        (0..len)
            .map(|i| {
                if (i / PAGE) % 3 == 1 {
                    0
                } else {
                    (i % 251) as u8 | 1
                }
            })
            .collect()
    }

    #[test]
    fn large_segments_load_in_parallel_and_land_exactly() {
        let data = large_payload();
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        let mut src = PayloadFile::with_sendfile(payload(&data), &mem, false);
        src.seek(SeekFrom::Start(PAGE as u64 + 5)).unwrap();
        let want = data.len() - PAGE - 5;
        let at = GuestAddress(0x10_0000 + 3);
        mem.read_exact_volatile_from(at, &mut src, want).unwrap();
        let mut back = vec![0u8; want];
        mem.read_slice(&mut back, at).unwrap();
        assert!(
            back == data[PAGE + 5..],
            "guest memory differs from the file"
        );
        assert_eq!(src.stream_position().unwrap(), data.len() as u64);
        let after = at.0 + want as u64;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(after)).unwrap(), 0);
    }

    #[test]
    fn large_read_past_the_end_stops_at_the_end() {
        let data = large_payload();
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        let mut src = PayloadFile::with_sendfile(payload(&data), &mem, false);
        let mut slice = mem
            .get_slice(GuestAddress(0), data.len() + 4 * SHARE_ALIGN)
            .unwrap();
        assert_eq!(src.read_volatile(&mut slice).unwrap(), data.len());
        assert_eq!(src.read_volatile(&mut slice).unwrap(), 0);
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back == data);
    }

    #[test]
    fn short_file_reads_what_is_there() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(4 << 20)).unwrap();
        let mut src = PayloadFile::with_sendfile(payload(b"abc"), &mem, true);
        let mut slice = mem.get_slice(GuestAddress(0x1000), 4096).unwrap();
        assert_eq!(src.read_volatile(&mut slice).unwrap(), 3);
        assert_eq!(src.read_volatile(&mut slice).unwrap(), 0);
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(&back, b"abc\0");
    }

    #[test]
    fn memory_without_a_file_falls_back_to_read() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut src = PayloadFile::with_sendfile(payload(b"hello"), &mem, true);
        mem.read_exact_volatile_from(GuestAddress(0x100), &mut src, 5)
            .unwrap();
        let mut back = [0u8; 5];
        mem.read_slice(&mut back, GuestAddress(0x100)).unwrap();
        assert_eq!(&back, b"hello");
    }
}
