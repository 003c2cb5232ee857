//! The one error type of the disk-image layer.

use std::io;
use std::path::PathBuf;

use super::Format;

/// Everything that can go wrong opening or accessing a disk image.
///
/// Every variant names the image (or the value) at fault, so the binary can print the error as
/// one line.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file (or its metadata) could not be opened.
    #[error("cannot open '{}': {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The path is neither a regular file nor a block device.
    #[error("'{}' is neither a regular file nor a block device", path.display())]
    NotADisk { path: PathBuf },
    /// `direct` was asked for but the filesystem holding the image refuses `O_DIRECT`.
    #[error("'{}': the filesystem does not support O_DIRECT (direct=on); use direct=off", path.display())]
    DirectUnsupported { path: PathBuf },
    /// A read, write, sync or size query on the image failed.
    #[error("I/O error ({op}) on '{}' at offset {offset:#x}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
    /// The given format does not match the file's contents.
    #[error("'{}' is a {actual} image but format={given} was given", path.display())]
    FormatMismatch {
        path: PathBuf,
        actual: Format,
        given: Format,
    },
    /// The format name (from a backing-format header extension) is not one we know.
    #[error("'{}': unsupported image format '{name}'", path.display())]
    UnknownFormat { path: PathBuf, name: String },
    /// A request reaches outside the virtual disk.
    #[error("request of {len} bytes at offset {offset:#x} is outside the {size}-byte disk '{}'", path.display())]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A write, discard or write-zeroes on an image opened read-only.
    #[error("'{}' is opened read-only", path.display())]
    ReadOnly { path: PathBuf },
    /// A guest write would plant a format signature in a raw image whose format was probed.
    #[error(
        "refusing to write a qcow2 signature to the first sector of '{}', whose raw format was \
         probed: give format=raw explicitly", path.display()
    )]
    ProbedRawSignature { path: PathBuf },
    /// The qcow2 header is malformed.
    #[error("'{}': invalid qcow2 header: {reason}", path.display())]
    InvalidHeader { path: PathBuf, reason: String },
    /// The image uses a qcow2 feature this implementation does not support.
    #[error("'{}': unsupported qcow2 feature: {feature}", path.display())]
    Unsupported { path: PathBuf, feature: String },
    /// The image's metadata is inconsistent.
    #[error("'{}': corrupt qcow2 image: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A compressed cluster does not decompress to exactly one cluster.
    #[error("'{}': bad compressed cluster at host offset {offset:#x}: {reason}", path.display())]
    Decompress {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Growing the image would exceed a qcow2 limit.
    #[error("'{}': image full: {reason}", path.display())]
    ImageFull { path: PathBuf, reason: String },
    /// A backing file refers back to an image already in the chain.
    #[error("backing chain loop: {chain}")]
    BackingLoop { chain: String },
    /// The image's lock conflicts with another process's (see [`super::lock`]).
    #[error("'{}': {reason}", path.display())]
    Lock { path: PathBuf, reason: String },
    /// The image names a backing file its [`super::BackingFiles`] policy does not allow.
    #[error("'{}': backing file '{}' refused: {reason}", path.display(), backing.display())]
    BackingRefused {
        path: PathBuf,
        backing: PathBuf,
        reason: String,
    },
    /// A backing file could not be opened.
    #[error("'{}': cannot open backing file '{}': {source}", path.display(), backing.display())]
    Backing {
        path: PathBuf,
        backing: PathBuf,
        source: Box<BlockError>,
    },
}

impl BlockError {
    /// An [`BlockError::Io`] for `op` at `offset` of `path`.
    pub(crate) fn io(
        path: &std::path::Path,
        op: &'static str,
        offset: u64,
        source: io::Error,
    ) -> Self {
        BlockError::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }
}
