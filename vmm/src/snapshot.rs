//! Snapshots on disk: a directory with the VM's configuration, its machine state (vCPUs, the
//! KVM VM's devices and clock, every device) and its memory, each a section with a size and a
//! CRC-32 recorded in a versioned manifest.
//!
//! ```text
//! DIR/snapshot.json   the manifest: format, version, and each section's file, size, checksum
//! DIR/config.json     the VmConfig
//! DIR/machine.json    the MachineState
//! DIR/memory.bin      guest RAM, regions one after another; pages of zeros are holes
//! ```
//!
//! The manifest is written last, so an interrupted snapshot has none and is refused. Reading
//! checks every section before anything runs; memory is checked chunk by chunk (64 MiB) as it
//! is copied into the new VM's memory by several threads, holes skipped. A restore never
//! writes to the snapshot.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use devices::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::persist::MachineState;

/// The manifest's name in a snapshot directory.
pub const MANIFEST: &str = "snapshot.json";
const FORMAT: &str = "podvisor-snapshot";
/// The version of the layout this podvisor writes and reads.
pub const VERSION: u32 = 1;
const CONFIG_FILE: &str = "config.json";
const MACHINE_FILE: &str = "machine.json";
const MEMORY_FILE: &str = "memory.bin";
/// Memory is checksummed (and restored in parallel) in chunks of this size.
const CHUNK: u64 = 64 << 20;
const PAGE: usize = 4096;
/// Bytes read or written at a time.
const PIECE: usize = 1 << 20;

/// Why a snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The destination is not usable (the request's fault: HTTP 400).
    #[error("snapshot destination {path}: {reason}")]
    Destination { path: PathBuf, reason: String },
    /// Writing failed on the host (HTTP 500); what was written is removed.
    #[error("writing the snapshot to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A section of the snapshot is missing, truncated, corrupt or of another version.
    #[error("snapshot {dir}: {section}: {reason}")]
    Section {
        dir: PathBuf,
        section: &'static str,
        reason: String,
    },
}

/// One file of the snapshot, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileSection {
    file: String,
    bytes: u64,
    crc32: u32,
}

/// A range of guest memory and where it is in `memory.bin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MemoryChunk {
    gpa: u64,
    len: u64,
    offset: u64,
    crc32: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MemorySection {
    file: String,
    bytes: u64,
    chunks: Vec<MemoryChunk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    config: FileSection,
    machine: FileSection,
    memory: MemorySection,
}

/// A snapshot read from disk, its configuration and machine state checked; its memory is
/// checked as [`Snapshot::load_memory`] copies it.
pub struct Snapshot {
    pub config: VmConfig,
    pub machine: MachineState,
    dir: PathBuf,
    memory: MemorySection,
}

/// The directory a `file://` URL names (Cloud Hypervisor's `destination_url`/`source_url`).
pub fn dir_from_url(url: &str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("'{url}' is not a file:// URL (file:///DIR)"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "'{url}': the directory must be absolute (file:///DIR)"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Writes a snapshot of a paused VM into `dir`, which must not exist or be empty. On failure
/// nothing of it is left behind.
pub fn write(
    dir: &Path,
    config: &VmConfig,
    machine: &MachineState,
    memory: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    let dest = |reason: String| SnapshotError::Destination {
        path: dir.to_owned(),
        reason,
    };
    let created = match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(dest("the directory is not empty".into()));
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(|e| dest(format!("cannot create it: {e}")))?;
            true
        }
        Err(e) => return Err(dest(e.to_string())),
    };
    let result = write_files(dir, config, machine, memory);
    if result.is_err() {
        for name in [MANIFEST, CONFIG_FILE, MACHINE_FILE, MEMORY_FILE] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        if created {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

fn write_files(
    dir: &Path,
    config: &VmConfig,
    machine: &MachineState,
    memory: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    let failed = |name: &str| {
        let path = dir.join(name);
        move |source| SnapshotError::Write { path, source }
    };
    let json = |value: serde_json::Result<Vec<u8>>, name: &str| {
        value.map_err(|e| failed(name)(std::io::Error::other(e)))
    };
    let config = write_section(
        dir,
        CONFIG_FILE,
        &json(serde_json::to_vec(config), CONFIG_FILE)?,
    )?;
    let machine = write_section(
        dir,
        MACHINE_FILE,
        &json(serde_json::to_vec(machine), MACHINE_FILE)?,
    )?;
    let memory = write_memory(dir, memory).map_err(failed(MEMORY_FILE))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        config,
        machine,
        memory,
    };
    let bytes = json(serde_json::to_vec_pretty(&manifest), MANIFEST)?;
    let mut file = create(&dir.join(MANIFEST)).map_err(failed(MANIFEST))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(failed(MANIFEST))
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn write_section(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileSection, SnapshotError> {
    let path = dir.join(name);
    let mut file = create(&path).map_err(|source| SnapshotError::Write {
        path: path.clone(),
        source,
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| SnapshotError::Write { path, source })?;
    Ok(FileSection {
        file: name.into(),
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    })
}

/// Writes every region of `memory` one after another, leaving pages of zeros as holes. The
/// parts of guest RAM the guest never touched (holes in its memfd) are neither read nor
/// written: reading them would fault in (and allocate) every page of an idle guest.
fn write_memory(dir: &Path, memory: &GuestMemoryMmap) -> std::io::Result<MemorySection> {
    let file = create(&dir.join(MEMORY_FILE))?;
    let zeros = ZeroCrc::new();
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; PIECE];
    for region in memory.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let data = crate::vstate::memory::data_ranges(region);
        let mut at = 0u64;
        while at < len {
            let chunk_len = CHUNK.min(len - at);
            let mut crc = crc32fast::Hasher::new();
            for (from, n, is_data) in parts(&data, at, chunk_len) {
                if !is_data {
                    zeros.add(&mut crc, n);
                    continue;
                }
                let mut done = 0u64;
                while done < n {
                    let piece = &mut buf[..(PIECE as u64).min(n - done) as usize];
                    memory
                        .read_slice(piece, GuestAddress(start + from + done))
                        .map_err(std::io::Error::other)?;
                    crc.update(piece);
                    write_nonzero_pages(&file, piece, offset + from + done)?;
                    done += piece.len() as u64;
                }
            }
            chunks.push(MemoryChunk {
                gpa: start + at,
                len: chunk_len,
                offset: offset + at,
                crc32: crc.finalize(),
            });
            at += chunk_len;
        }
        offset += len;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(MemorySection {
        file: MEMORY_FILE.into(),
        bytes: offset,
        chunks,
    })
}

/// `[at, at + len)` cut into its parts, in order, as (start, length, holds data), by the
/// sorted, disjoint `(start, length)` ranges of data in `data`.
fn parts(data: &[(u64, u64)], at: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = at + len;
    let mut parts = Vec::new();
    let mut pos = at;
    let first = data.partition_point(|&(start, n)| start + n <= at);
    for &(start, n) in data[first..].iter().take_while(|&&(start, _)| start < end) {
        let (from, to) = (start.max(pos), (start + n).min(end));
        if from > pos {
            parts.push((pos, from - pos, false));
        }
        parts.push((from, to - from, true));
        pos = to;
    }
    if pos < end {
        parts.push((pos, end - pos, false));
    }
    parts
}

/// Adds runs of zeros to a CRC-32 without hashing them byte by byte: a hole of guest memory
/// costs a few table steps per piece, not a pass over a buffer of zeros.
struct ZeroCrc {
    piece: crc32fast::Hasher,
    zeros: Vec<u8>,
}

impl ZeroCrc {
    fn new() -> Self {
        let zeros = vec![0u8; PIECE];
        let mut piece = crc32fast::Hasher::new();
        piece.update(&zeros);
        Self { piece, zeros }
    }

    /// `crc` continues as if `n` zero bytes followed.
    fn add(&self, crc: &mut crc32fast::Hasher, mut n: u64) {
        while n >= PIECE as u64 {
            crc.combine(&self.piece);
            n -= PIECE as u64;
        }
        crc.update(&self.zeros[..n as usize]);
    }
}

/// Writes the pages of `data` that are not all zeros at `offset`, runs of them at once.
fn write_nonzero_pages(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run: Option<usize> = None;
    for (i, page) in data.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        match (run, zero) {
            (None, false) => run = Some(i * PAGE),
            (Some(start), true) => {
                file.write_all_at(&data[start..i * PAGE], offset + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Reads the snapshot in `dir`: its manifest, configuration and machine state, each checked.
pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let bad = |section: &'static str, reason: String| SnapshotError::Section {
        dir: dir.to_owned(),
        section,
        reason,
    };
    let manifest = std::fs::read(dir.join(MANIFEST))
        .map_err(|e| bad(MANIFEST, format!("cannot read it: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&manifest)
        .map_err(|e| bad(MANIFEST, format!("not a podvisor snapshot manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(
            MANIFEST,
            format!("format '{}', not '{FORMAT}'", manifest.format),
        ));
    }
    if manifest.version != VERSION {
        return Err(bad(
            MANIFEST,
            format!(
                "format version {}, this podvisor reads version {VERSION}",
                manifest.version
            ),
        ));
    }
    let config = read_section(dir, CONFIG_FILE, &manifest.config)?;
    let config: VmConfig = serde_json::from_slice(&config)
        .map_err(|e| bad(CONFIG_FILE, format!("not a VM configuration: {e}")))?;
    let machine = read_section(dir, MACHINE_FILE, &manifest.machine)?;
    let machine: MachineState = serde_json::from_slice(&machine)
        .map_err(|e| bad(MACHINE_FILE, format!("not a machine state: {e}")))?;
    let memory = manifest.memory;
    let file = memory_file(dir, &memory.file)?;
    let len = file
        .metadata()
        .map_err(|e| bad(MEMORY_FILE, e.to_string()))?
        .len();
    if len != memory.bytes {
        return Err(bad(
            MEMORY_FILE,
            format!("{len} bytes, the manifest says {}", memory.bytes),
        ));
    }
    if let Some(c) = memory
        .chunks
        .iter()
        .find(|c| c.offset.checked_add(c.len).is_none_or(|end| end > len))
    {
        return Err(bad(
            MEMORY_FILE,
            format!("chunk at {:#x} lies outside the file", c.gpa),
        ));
    }
    Ok(Snapshot {
        config,
        machine,
        dir: dir.to_owned(),
        memory,
    })
}

fn memory_file(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    if name != MEMORY_FILE {
        return Err(SnapshotError::Section {
            dir: dir.to_owned(),
            section: MANIFEST,
            reason: format!("memory file '{name}' is not {MEMORY_FILE}"),
        });
    }
    File::open(dir.join(MEMORY_FILE)).map_err(|e| SnapshotError::Section {
        dir: dir.to_owned(),
        section: MEMORY_FILE,
        reason: format!("cannot open it: {e}"),
    })
}

fn read_section(
    dir: &Path,
    name: &'static str,
    section: &FileSection,
) -> Result<Vec<u8>, SnapshotError> {
    let bad = |reason: String| SnapshotError::Section {
        dir: dir.to_owned(),
        section: name,
        reason,
    };
    if section.file != name {
        return Err(bad(format!("the manifest names '{}'", section.file)));
    }
    let bytes = std::fs::read(dir.join(name)).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 != section.bytes {
        return Err(bad(format!(
            "{} bytes, the manifest says {} (truncated?)",
            bytes.len(),
            section.bytes
        )));
    }
    if crc32fast::hash(&bytes) != section.crc32 {
        return Err(bad("checksum mismatch (corrupt)".into()));
    }
    Ok(bytes)
}

impl Snapshot {
    /// Copies the snapshot's memory into `memory` (a new VM's, all zeros), with several
    /// threads, skipping the file's holes, checking each chunk's checksum. Every chunk must
    /// fall inside `memory`.
    pub fn load_memory(&self, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        load_memory(&self.dir, &self.memory, memory)
    }
}

fn load_memory(
    dir: &Path,
    section: &MemorySection,
    memory: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let zeros = ZeroCrc::new();
    let results: Vec<Result<(), SnapshotError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), SnapshotError> {
                    let file = memory_file(dir, &section.file)?;
                    let mut buf = vec![0u8; PIECE];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = section.chunks.get(i) else {
                            return Ok(());
                        };
                        load_chunk(dir, &file, chunk, memory, &mut buf, &zeros)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(bad_memory(dir, "a loader thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect()
}

fn bad_memory(dir: &Path, reason: String) -> SnapshotError {
    SnapshotError::Section {
        dir: dir.to_owned(),
        section: MEMORY_FILE,
        reason,
    }
}

fn load_chunk(
    dir: &Path,
    file: &File,
    chunk: &MemoryChunk,
    memory: &GuestMemoryMmap,
    buf: &mut [u8],
    zeros: &ZeroCrc,
) -> Result<(), SnapshotError> {
    let at = |reason: String| bad_memory(dir, format!("chunk at {:#x}: {reason}", chunk.gpa));
    // The whole chunk must fall inside this VM's memory (one region: chunks never span two).
    let last = chunk
        .len
        .checked_sub(1)
        .and_then(|n| chunk.gpa.checked_add(n));
    if !last.is_some_and(|last| {
        memory.address_in_range(GuestAddress(chunk.gpa))
            && memory.address_in_range(GuestAddress(last))
    }) {
        return Err(at("does not fit this VM's memory".into()));
    }
    // Only what the file holds is read and written: the new VM's memory is zero already,
    // and writing zeros would allocate it.
    let data = crate::vstate::memory::file_data_ranges(file, chunk.offset, chunk.len);
    let mut crc = crc32fast::Hasher::new();
    for (from, n, is_data) in parts(&data, 0, chunk.len) {
        if !is_data {
            zeros.add(&mut crc, n);
            continue;
        }
        let mut done = 0u64;
        while done < n {
            let piece = &mut buf[..(PIECE as u64).min(n - done) as usize];
            file.read_exact_at(piece, chunk.offset + from + done)
                .map_err(|e| at(format!("read: {e}")))?;
            memory
                .write_slice(piece, GuestAddress(chunk.gpa + from + done))
                .map_err(|e| at(format!("does not fit this VM's memory: {e}")))?;
            crc.update(piece);
            done += piece.len() as u64;
        }
    }
    if crc.finalize() != chunk.crc32 {
        return Err(at("checksum mismatch (corrupt)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            dir_from_url("file:///tmp/s").unwrap(),
            PathBuf::from("/tmp/s")
        );
        assert!(dir_from_url("tcp:1.2.3.4:5")
            .unwrap_err()
            .contains("not a file://"));
        assert!(dir_from_url("file://tmp/s")
            .unwrap_err()
            .contains("absolute"));
    }

    #[test]
    fn zero_pages_become_holes() {
        let dir = std::env::temp_dir().join(format!("podvisor-snap-holes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("f"))
            .unwrap();
        let mut data = vec![0u8; 16 * PAGE];
        data[3 * PAGE] = 1;
        data[10 * PAGE + 7] = 2;
        write_nonzero_pages(&file, &data, 0).unwrap();
        file.set_len(data.len() as u64).unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        let page = PAGE as u64;
        assert_eq!(
            crate::vstate::memory::file_data_ranges(&file, 0, 16 * page),
            [(3 * page, page), (10 * page, page)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_span_is_cut_into_data_and_holes() {
        let data = [(0x1000, 0x1000), (0x10000, 0x3000)];
        assert_eq!(parts(&data, 0, 0x1000), [(0, 0x1000, false)]);
        assert_eq!(
            parts(&data, 0, 0x20000),
            [
                (0, 0x1000, false),
                (0x1000, 0x1000, true),
                (0x2000, 0xe000, false),
                (0x10000, 0x3000, true),
                (0x13000, 0xd000, false),
            ]
        );
        assert_eq!(
            parts(&data, 0x1800, 0xf000),
            [
                (0x1800, 0x800, true),
                (0x2000, 0xe000, false),
                (0x10000, 0x800, true)
            ]
        );
        assert_eq!(parts(&data, 0x11000, 0x1000), [(0x11000, 0x1000, true)]);
        assert_eq!(parts(&[], 5, 7), [(5, 7, false)]);
        assert!(parts(&data, 0x1000, 0).is_empty());
    }

    #[test]
    fn zero_runs_hash_as_zeros() {
        let zeros = ZeroCrc::new();
        for n in [
            PIECE as u64,
            3 * PIECE as u64 + 5,
            PIECE as u64 / 2 + 3,
            1,
            0,
        ] {
            let mut fast = crc32fast::Hasher::new();
            fast.update(b"before");
            zeros.add(&mut fast, n);
            let mut slow = crc32fast::Hasher::new();
            slow.update(b"before");
            slow.update(&vec![0u8; n as usize]);
            assert_eq!(fast.finalize(), slow.finalize(), "{n} zeros");
        }
    }

    /// What the guest never touched is neither read (which would allocate it in the memfd) nor
    /// written, and the copy still comes back whole, its checksums right.
    #[test]
    fn memory_round_trips_without_touching_the_holes() {
        use crate::vstate::memory::{create_guest_memory, data_ranges};
        let dir = std::env::temp_dir().join(format!("podvisor-snap-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = 3 * CHUNK;
        let memory = create_guest_memory(&crate::config::MemoryConfig::new(size)).unwrap();
        let marks = [
            (0x1234u64, 0xa5u8),
            (CHUNK + 7 * PIECE as u64, 0x5a),
            (size - 1, 1),
        ];
        for &(gpa, byte) in &marks {
            memory.write_obj(byte, GuestAddress(gpa)).unwrap();
        }
        let touched =
            |m: &GuestMemoryMmap| -> Vec<Vec<(u64, u64)>> { m.iter().map(data_ranges).collect() };
        let before = touched(&memory);
        let section = write_memory(&dir, &memory).unwrap();
        assert_eq!(
            touched(&memory),
            before,
            "writing the snapshot faulted in guest memory"
        );
        assert_eq!(section.bytes, size);
        let stored = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&stored) * 512 < 16 << 20,
            "memory.bin is not sparse"
        );

        let copy = create_guest_memory(&crate::config::MemoryConfig::new(size)).unwrap();
        load_memory(&dir, &section, &copy).unwrap();
        for &(gpa, byte) in &marks {
            assert_eq!(copy.read_obj::<u8>(GuestAddress(gpa)).unwrap(), byte);
        }
        assert_eq!(copy.read_obj::<u8>(GuestAddress(0x1233)).unwrap(), 0);
        assert_eq!(
            touched(&copy),
            before,
            "restoring wrote more than the snapshot holds"
        );

        // One flipped byte is found, and named by its chunk.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        file.write_all_at(&[0x77], CHUNK + 7 * PIECE as u64)
            .unwrap();
        let err = load_memory(
            &dir,
            &section,
            &create_guest_memory(&crate::config::MemoryConfig::new(size)).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
