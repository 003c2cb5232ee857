//! Reading and writing guest memory slices: raw images with `preadv`/`pwritev`, qcow2 through
//! the bounded host buffer.

/// The disk layer takes plain slices (no dirty bitmap; the virtio-blk worker marks pages).
type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::*;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap()
}

/// `count` slices of `len` bytes each, every other 64 KiB-aligned slot (not contiguous).
fn slices(mem: &GuestMemoryMmap, count: usize, len: usize) -> Vec<VolatileSlice<'_>> {
    (0..count)
        .map(|i| {
            mem.get_slice(GuestAddress((i * 2 * len) as u64), len)
                .unwrap()
        })
        .collect()
}

fn gathered(mem: &GuestMemoryMmap, count: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; count * len];
    for (i, chunk) in out.chunks_mut(len).enumerate() {
        mem.read_slice(chunk, GuestAddress((i * 2 * len) as u64))
            .unwrap();
    }
    out
}

fn raw(dir: &Path, bytes: &[u8], format: Option<Format>) -> (PathBuf, Box<dyn DiskImage>) {
    let path = dir.join("disk.raw");
    fs::write(&path, bytes).unwrap();
    let disk = open_disk(&path, DiskOptions { format, ..rw() }).unwrap();
    (path, disk)
}

#[test]
fn raw_vectored_io_over_more_buffers_than_iov_max() {
    let dir = tempfile::tempdir().unwrap();
    let content = Rng(7).bytes(MIB as usize);
    let (path, mut disk) = raw(dir.path(), &content, Some(Format::Raw));
    let mem = memory();
    // 1500 buffers of 512 bytes: two preadv calls.
    let bufs = slices(&mem, 1500, 512);
    disk.read_volatile_at(&bufs, 4096).unwrap();
    assert_eq!(gathered(&mem, 1500, 512), content[4096..4096 + 1500 * 512]);

    let new = Rng(9).bytes(1500 * 512);
    for (i, chunk) in new.chunks(512).enumerate() {
        mem.write_slice(chunk, GuestAddress((i * 1024) as u64))
            .unwrap();
    }
    disk.write_volatile_at(&bufs, 8192).unwrap();
    disk.flush().unwrap();
    let on_disk = fs::read(&path).unwrap();
    assert_eq!(on_disk[8192..8192 + new.len()], new[..]);
    assert_eq!(on_disk[..8192], content[..8192]);
    assert_eq!(on_disk.len(), content.len());
}

#[test]
fn raw_vectored_io_checks_range_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut disk) = raw(dir.path(), &[1u8; 8192], Some(Format::Raw));
    let mem = memory();
    let bufs = slices(&mem, 2, 4096);
    assert!(matches!(
        disk.read_volatile_at(&bufs, 4096),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_volatile_at(&bufs, 1),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_volatile_at(&bufs, u64::MAX - 10),
        Err(BlockError::OutOfRange { .. })
    ));
    assert_eq!(fs::read(&path).unwrap(), vec![1u8; 8192]);
    drop(disk);
    let mut ro_disk = open_disk(&path, ro()).unwrap();
    assert!(matches!(
        ro_disk.write_volatile_at(&bufs[..1], 0),
        Err(BlockError::ReadOnly { .. })
    ));
    ro_disk.read_volatile_at(&bufs, 0).unwrap();
    assert_eq!(gathered(&mem, 2, 4096), vec![1u8; 8192]);
}

#[test]
fn raw_read_past_a_shrunken_file_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut disk) = raw(dir.path(), &[3u8; 8192], Some(Format::Raw));
    // Someone else truncates the file under the open image.
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5000)
        .unwrap();
    let mem = memory();
    mem.write_slice(&[0xee; 8192], GuestAddress(0)).unwrap();
    let bufs = [mem.get_slice(GuestAddress(0), 8192).unwrap()];
    disk.read_volatile_at(&bufs, 0).unwrap();
    let mut got = vec![0u8; 8192];
    mem.read_slice(&mut got, GuestAddress(0)).unwrap();
    assert_eq!(got[..5000], [3u8; 5000]);
    assert_eq!(got[5000..], [0u8; 3192]);
}

#[test]
fn probed_raw_refuses_a_qcow2_signature_from_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut disk) = raw(dir.path(), &[0u8; 4096], None);
    let mem = memory();
    mem.write_slice(b"QFI\xfb\0\0\0\x03", GuestAddress(0))
        .unwrap();
    let bufs = [mem.get_slice(GuestAddress(0), 512).unwrap()];
    assert!(matches!(
        disk.write_volatile_at(&bufs, 0),
        Err(BlockError::ProbedRawSignature { .. })
    ));
    assert_eq!(fs::read(&path).unwrap(), vec![0u8; 4096]);
    // Elsewhere the same bytes are fine.
    disk.write_volatile_at(&bufs, 512).unwrap();
    assert_eq!(fs::read(&path).unwrap()[512..516], *b"QFI\xfb");
}

#[test]
fn qcow2_copies_through_a_bounded_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    create(&path, "cluster_size=65536", 8 * MIB);
    let mut disk = open_disk(&path, rw()).unwrap();
    let mem = memory();
    // 3 MiB in 24 buffers: more than one bounce chunk.
    let data = Rng(3).bytes(3 * MIB as usize);
    let len = 128 * KIB as usize;
    for (i, chunk) in data.chunks(len).enumerate() {
        mem.write_slice(chunk, GuestAddress((i * 2 * len) as u64))
            .unwrap();
    }
    let count = data.len() / len;
    let bufs = slices(&mem, count, len);
    assert!(data.len() > BOUNCE_CHUNK);
    disk.write_volatile_at(&bufs, 4096).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let mut model = vec![0u8; 8 * MIB as usize];
    model[4096..4096 + data.len()].copy_from_slice(&data);
    assert_same(&path, &model);
    assert_clean(&path);

    let mut disk = open_disk(&path, ro()).unwrap();
    mem.write_slice(&vec![0u8; 8 * MIB as usize], GuestAddress(0))
        .unwrap();
    disk.read_volatile_at(&bufs, 4096).unwrap();
    assert_eq!(gathered(&mem, count, len), data);
}

#[test]
fn raw_passthrough_checks_requests_and_marks_writes_for_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.raw");
    fs::write(&path, vec![0u8; 16384]).unwrap();
    let mem = memory();
    let bufs = slices(&mem, 2, 4096);
    let open_raw = |read_only: bool, probed: bool| {
        RawImage::open(
            HostFile::open(&path, read_only, false).unwrap(),
            read_only,
            probed,
        )
        .unwrap()
    };
    let mut disk = open_raw(false, false);
    assert!(disk.passthrough(&bufs, 4096, false).is_some());
    assert!(!disk.host_file().is_unsynced(), "a read needs no sync");
    assert!(disk.passthrough(&bufs, 8192 + 512, false).is_none());
    assert!(disk.passthrough(&bufs, u64::MAX - 100, true).is_none());
    assert!(!disk.host_file().is_unsynced());
    assert!(disk.passthrough(&bufs, 0, true).is_some());
    assert!(disk.host_file().is_unsynced(), "the next flush must sync");
    disk.flush().unwrap();
    assert!(!disk.host_file().is_unsynced());
    // Read-only: no writes; probed: not over the first bytes (the signature guard).
    let mut ro_disk = open_raw(true, false);
    assert!(ro_disk.passthrough(&bufs, 0, true).is_none());
    assert!(ro_disk.passthrough(&bufs, 0, false).is_some());
    let mut probed = open_raw(false, true);
    assert!(probed.passthrough(&bufs, 0, true).is_none());
    assert!(probed.passthrough(&bufs, 4096, true).is_some());
    // O_DIRECT: misaligned guest buffers go the synchronous way.
    if let Ok(file) = HostFile::open(&path, false, true) {
        let mut direct = RawImage::open(file, false, false).unwrap();
        let odd = [mem.get_slice(GuestAddress(512), 4096).unwrap()];
        assert!(direct.passthrough(&odd, 0, false).is_none());
        assert!(direct.passthrough(&bufs, 0, false).is_some());
    }
}
