//! Disk images for virtio-blk: the formats (raw, qcow2) behind one trait, [`DiskImage`].
//!
//! This layer has no virtio code and no threads: the virtio-blk device calls it from its I/O
//! worker thread, one request at a time, with byte offsets and lengths. Reads and writes that
//! [`DiskImage::passthrough`] maps to one range of one file the worker may instead submit
//! itself, several at once; it calls nothing else on the image while they are in flight.
//!
//! [`open_disk`] opens an image and, for qcow2, its chain of backing files (opened read-only,
//! relative names resolved against the directory of the image naming them, a loop in the chain
//! is an error).
//!
//! # Backing files are opt-in
//!
//! A qcow2 header may name any host path as its backing file, and the guest then reads that
//! file through every cluster the image does not hold: an image from elsewhere (a registry, a
//! tenant) could hand the guest `/etc/shadow` or a block device. So an image that names a
//! backing file is refused unless [`DiskOptions::backing_files`] allows it: regular files
//! anywhere ([`BackingFiles::Any`]), or only under one path ([`BackingFiles::Under`]: a
//! directory, or exactly one file), never a device, at most [`MAX_BACKING_FILES`] deep.
//!
//! # Format probing
//!
//! When no format is given, the format is probed the way QEMU does: a file starting with the
//! qcow2 magic `QFI\xfb` and a version ≥ 2 is qcow2 (then versions other than 2 and 3 are
//! refused), version 1 is the old qcow format (refused), anything else is raw. Probing is a
//! known hazard: a guest can write a qcow2 header into a raw disk and, on the next probed
//! open, name any host file as its backing file. Two guards, as in QEMU:
//! - give the format explicitly (`format=raw`): a raw image is then read as raw whatever its
//!   first bytes are (a warning is logged when they look like qcow2);
//! - a raw image whose format was *probed* refuses guest writes that would put the qcow2 magic
//!   into its first bytes ([`BlockError::ProbedRawSignature`]).
//!
//! Backing files follow the same rules, with the format from the qcow2 backing-format header
//! extension when present (`qemu-img create -F`), probed otherwise.

mod error;
mod file;
mod guest_io;
pub mod lock;
pub mod qcow2;
pub mod raw;

#[cfg(test)]
mod tests;

use std::fmt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

pub use error::BlockError;
pub use guest_io::BOUNCE_CHUNK;
pub use lock::{ImageLock, LockMode};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;

use file::HostFile;

/// A virtual disk: a byte-addressed image of fixed size.
///
/// Offsets and lengths are in bytes; a request that reaches past [`DiskImage::size`] fails with
/// [`BlockError::OutOfRange`] and changes nothing. No method panics, whatever the image holds.
pub trait DiskImage: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// The image file (or block device) this disk reads and writes.
    fn path(&self) -> &Path;

    /// The image format.
    fn format(&self) -> Format;

    /// Fills `buf` with the guest bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;

    /// Writes `buf` at `offset`. Durable only after [`DiskImage::flush`].
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError>;

    /// Makes every write that returned before it durable (ends with `fdatasync`).
    fn flush(&mut self) -> Result<(), BlockError>;

    /// Tells the image that `[offset, offset + len)` is no longer needed. Whole clusters are
    /// deallocated where the format can (they then read as zeros); the rest is left as is.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Makes `[offset, offset + len)` read as zeros, deallocating space if `may_unmap`.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;

    /// Whether writes are refused ([`BlockError::ReadOnly`]).
    fn is_read_only(&self) -> bool;

    /// Forgets what was read of the image's metadata (its size; qcow2 tables and refcounts)
    /// and reads it again: another process wrote the image since it was opened here, and has
    /// stopped and flushed (the source of a live migration, whose destination opens the disks
    /// early). Refused while this image holds metadata it has not written.
    fn reload(&mut self) -> Result<(), BlockError>;

    /// A handle on the lock of the image's file (its backing files keep their shared
    /// locks), to change it while the image is busy elsewhere; None for images without one.
    fn image_lock(&self) -> Option<ImageLock> {
        None
    }

    /// Reads consecutive guest bytes at `offset` into several buffers.
    fn read_vectored_at(&mut self, bufs: &mut [&mut [u8]], offset: u64) -> Result<(), BlockError> {
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Writes several buffers as consecutive guest bytes at `offset`. The whole range is
    /// checked before anything is written.
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), BlockError> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        check_range(self.path(), offset, total, self.size())?;
        let mut pos = offset;
        for buf in bufs {
            self.write_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Where a read (`write == false`) or write of `bufs` at guest `offset` may go directly,
    /// possibly asynchronously: a file descriptor and the offset in it, when the whole range
    /// lies as it is in one contiguous range of one file (raw images; allocated data clusters
    /// of qcow2, owned by the active layer for writes). Checks the request first (range,
    /// read-only, `O_DIRECT` alignment, the probed-raw guard) and notes a write for the next
    /// [`DiskImage::flush`]. The mapping stays valid until the next call of any other method.
    /// `None` when the request must go through [`DiskImage::read_volatile_at`] /
    /// [`DiskImage::write_volatile_at`], which also report why it fails, if it does.
    fn passthrough(
        &mut self,
        _bufs: &[VolatileSlice<'_>],
        _offset: u64,
        _write: bool,
    ) -> Option<(RawFd, u64)> {
        None
    }

    /// Reads consecutive guest bytes at `offset` straight into guest memory (the data buffers
    /// of a virtio request). Formats that can, read with no intermediate copy (raw: `preadv`);
    /// the default goes through a host buffer of at most [`BOUNCE_CHUNK`] bytes.
    fn read_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        guest_io::read_by_copy(self, bufs, offset)
    }

    /// Writes guest memory buffers as consecutive guest bytes at `offset`, straight from guest
    /// memory where the format can (raw: `pwritev`). The whole range is checked before
    /// anything is written.
    fn write_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        guest_io::write_by_copy(self, bufs, offset)
    }
}

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// The guest's bytes as they are.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The format called `name` (`raw`, `qcow2`), as in QEMU's `format=`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// How to open a disk image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// The image format; probed when `None` (see the module docs).
    pub format: Option<Format>,
    /// Refuse writes; the file is opened read-only.
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Which backing files the image's chain may name (see the module docs).
    pub backing_files: BackingFiles,
    /// Open with a shared lock only ([`LockMode::Standby`]): another process still runs
    /// this VM (a live migration's destination, until it takes over).
    pub standby: bool,
}

/// Which backing files a qcow2 image (and the images below it) may name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingFiles {
    /// None: an image that names a backing file is refused.
    #[default]
    Refused,
    /// Regular files anywhere.
    Any,
    /// Regular files under this path, symbolic links resolved: the files in a directory and
    /// below it, or exactly this one file.
    Under(PathBuf),
}

/// The most backing files below one image.
pub const MAX_BACKING_FILES: usize = 16;

/// Opens the disk image at `path` and its backing chain.
pub fn open_disk(path: &Path, options: DiskOptions) -> Result<Box<dyn DiskImage>, BlockError> {
    let policy = options.backing_files.clone();
    open_in_chain(path, &options, &mut Vec::new(), &policy)
}

/// Opens a qcow2 image that must not have a backing file: fuzzing and tools that must not
/// touch other files.
pub fn open_qcow2_standalone(path: &Path, read_only: bool) -> Result<Qcow2Image, BlockError> {
    let file = HostFile::open(path, read_only, false)?;
    Qcow2Image::open(file, read_only, |backing, _| {
        Err(BlockError::Unsupported {
            path: path.to_path_buf(),
            feature: format!("backing file '{}' (standalone open)", backing.display()),
        })
    })
}

/// What the first bytes of an image say it is.
enum Probed {
    Qcow2,
    QcowV1,
    Raw,
}

fn probe(file: &HostFile) -> Result<Probed, BlockError> {
    let mut head = [0u8; 8];
    let n = file.read_at(&mut head, 0)?;
    if n < 8 || head[..4] != qcow2::header::MAGIC {
        return Ok(Probed::Raw);
    }
    Ok(
        match u32::from_be_bytes([head[4], head[5], head[6], head[7]]) {
            0 => Probed::Raw,
            1 => Probed::QcowV1,
            _ => Probed::Qcow2,
        },
    )
}

/// Detects the format of the image at `path` as [`open_disk`] would without a format.
pub fn probe_format(path: &Path) -> Result<Format, BlockError> {
    let file = HostFile::open(path, true, false)?;
    match probe(&file)? {
        Probed::Qcow2 => Ok(Format::Qcow2),
        Probed::Raw => Ok(Format::Raw),
        Probed::QcowV1 => Err(qcow_v1(path)),
    }
}

fn qcow_v1(path: &Path) -> BlockError {
    BlockError::Unsupported {
        path: path.to_path_buf(),
        feature: "qcow version 1 image (convert it with qemu-img)".into(),
    }
}

/// `chain` holds the (canonical, as named) paths of the images opened so far above this one;
/// `policy` is the top image's [`BackingFiles`], which every image below it must satisfy.
fn open_in_chain(
    path: &Path,
    options: &DiskOptions,
    chain: &mut Vec<(PathBuf, PathBuf)>,
    policy: &BackingFiles,
) -> Result<Box<dyn DiskImage>, BlockError> {
    let canonical = std::fs::canonicalize(path)
        .or_else(|e| {
            // An unlinked file reached through /proc/self/fd/N (a seed disk built in memory)
            // exists but has no name to resolve to: it is its own identity in the chain.
            if e.kind() == std::io::ErrorKind::NotFound && path.exists() {
                Ok(path.to_path_buf())
            } else {
                Err(e)
            }
        })
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(first) = chain.iter().position(|(c, _)| *c == canonical) {
        let mut names: Vec<String> = chain[first..]
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect();
        names.push(path.display().to_string());
        return Err(BlockError::BackingLoop {
            chain: names.join(" -> "),
        });
    }
    let backing = !chain.is_empty();
    let file = HostFile::open(path, options.read_only, options.direct)?;
    if backing {
        // Checked again on the open file: the path could have been swapped in between.
        check_opened_backing(&file, &canonical)?;
    }
    let mode = if options.standby || backing {
        LockMode::Standby
    } else {
        LockMode::Active
    };
    file.lock_handle(!options.read_only)?.set(mode)?;
    let probed = probe(&file)?;
    let format = match (options.format, probed) {
        (Some(Format::Raw), Probed::Qcow2) => {
            tracing::warn!(
                "'{}' looks like a qcow2 image but format=raw was given: opening it as raw",
                path.display()
            );
            Format::Raw
        }
        (_, Probed::QcowV1) if options.format != Some(Format::Raw) => return Err(qcow_v1(path)),
        (Some(Format::Qcow2), Probed::Raw) => {
            return Err(BlockError::FormatMismatch {
                path: path.to_path_buf(),
                actual: Format::Raw,
                given: Format::Qcow2,
            })
        }
        (Some(f), _) => f,
        (None, Probed::Qcow2) => Format::Qcow2,
        (None, _) => Format::Raw,
    };
    match format {
        Format::Raw => Ok(Box::new(RawImage::open(
            file,
            options.read_only,
            options.format.is_none(),
        )?)),
        Format::Qcow2 => {
            chain.push((canonical, path.to_path_buf()));
            let image = Qcow2Image::open(file, options.read_only, |backing, backing_format| {
                let refused = |reason: String| BlockError::BackingRefused {
                    path: path.to_path_buf(),
                    backing: backing.to_path_buf(),
                    reason,
                };
                check_backing(policy, chain.len(), backing).map_err(refused)?;
                let format =
                    match backing_format {
                        None => None,
                        Some(name) => Some(Format::from_name(name).ok_or_else(|| {
                            BlockError::UnknownFormat {
                                path: path.to_path_buf(),
                                name: name.to_string(),
                            }
                        })?),
                    };
                let backing_options = DiskOptions {
                    format,
                    read_only: true,
                    direct: options.direct,
                    backing_files: BackingFiles::Refused,
                    standby: true,
                };
                open_in_chain(backing, &backing_options, chain, policy).map_err(|e| match e {
                    // A loop or a refusal reads best as itself, not wrapped at every level.
                    e @ (BlockError::BackingLoop { .. } | BlockError::BackingRefused { .. }) => e,
                    BlockError::NotADisk { .. } => refused("not a regular file".into()),
                    e => BlockError::Backing {
                        path: path.to_path_buf(),
                        backing: backing.to_path_buf(),
                        source: Box::new(e),
                    },
                })
            })?;
            Ok(Box::new(image))
        }
    }
}

/// Whether `policy` lets an image with `above` images above it name `backing` (before it is
/// opened); the reason when not.
fn check_backing(policy: &BackingFiles, above: usize, backing: &Path) -> Result<(), String> {
    let under = match policy {
        BackingFiles::Refused => {
            return Err(
                "backing files are off for this disk (backing_files=on allows regular \
                        files, backing_files=PATH only those under PATH)"
                    .into(),
            )
        }
        BackingFiles::Any => None,
        BackingFiles::Under(under) => Some(under),
    };
    if above > MAX_BACKING_FILES {
        return Err(format!(
            "the backing chain is deeper than {MAX_BACKING_FILES} files"
        ));
    }
    // A missing file is the open's error to report.
    let Ok(canonical) = std::fs::canonicalize(backing) else {
        return Ok(());
    };
    if !std::fs::metadata(&canonical).is_ok_and(|m| m.is_file()) {
        return Err("not a regular file (a backing file is never a device)".into());
    }
    if let Some(under) = under {
        let allowed = std::fs::canonicalize(under)
            .map_err(|e| format!("backing_files={}: {e}", under.display()))?;
        if !canonical.starts_with(&allowed) {
            return Err(format!(
                "{} is not under backing_files={}",
                canonical.display(),
                under.display()
            ));
        }
    }
    Ok(())
}

/// Checks that the backing file opened as `file` is the regular file `canonical` it was
/// checked as.
fn check_opened_backing(file: &HostFile, canonical: &Path) -> Result<(), BlockError> {
    if file.is_block_device() {
        return Err(BlockError::NotADisk {
            path: file.path().to_path_buf(),
        });
    }
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.raw_fd()));
    if opened.as_deref().ok() != Some(canonical) {
        return Err(BlockError::Open {
            path: file.path().to_path_buf(),
            source: std::io::Error::other("the file was replaced while it was opened"),
        });
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}
