//! Arbitrary bytes as a qcow2 file: open it (read-only, then writable), read a few clusters,
//! write, zero and discard a few, flush. Any panic, abort, hang or huge allocation is a bug.
//!
//! The image is opened twice: without following backing files, and with its backing chain
//! allowed inside the target's scratch folder only, where the same bytes also lie as
//! `base.raw` and `base.qcow2` (the names the seeds' backing files have): an image that names
//! one of them reads through a chain of copies of itself, up to the depth limit. Nothing
//! outside that folder can be opened.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use devices::block::{
    open_disk, open_qcow2_standalone, BackingFiles, DiskImage, DiskOptions, Format,
};
use libfuzzer_sys::fuzz_target;

/// One scratch folder per fuzzing process, on tmpfs when there is one.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("podvisor-fuzz-qcow2-{}", std::process::id()))
    })
}

/// Offsets worth touching in a disk of `size` bytes with clusters of `cs` bytes: the start, a
/// cluster boundary, the middle and the end.
fn offsets(size: u64, cs: u64) -> [u64; 4] {
    [0, cs - 1, size / 2, size.saturating_sub(cs / 2 + 1)]
}

fn exercise(img: &mut dyn DiskImage, cs: u64, writable: bool, seed: u8) {
    let size = img.size();
    let max = (2 * cs).min(1 << 20);
    for off in offsets(size, cs) {
        let len = max.min(size.saturating_sub(off)) as usize;
        let mut buf = vec![0u8; len];
        let _ = img.read_at(&mut buf, off);
    }
    let mut tiny = [0u8; 1];
    let _ = img.read_at(&mut tiny, size);
    if !writable {
        return;
    }
    for (i, off) in offsets(size, cs).into_iter().enumerate() {
        let len = (cs + 3).min(size.saturating_sub(off)) as usize;
        let data = vec![seed.wrapping_add(i as u8); len];
        let _ = img.write_at(&data, off);
    }
    let _ = img.write_zeroes(0, (3 * cs).min(size), seed & 1 == 0);
    let _ = img.discard(size / 2, (2 * cs).min(size - size / 2));
    let _ = img.flush();
    // Read back what was written, through metadata that is now on disk.
    let mut buf = vec![0u8; max.min(size) as usize];
    let _ = img.read_at(&mut buf, 0);
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let path = dir.join("top.qcow2");
    for name in ["top.qcow2", "base.raw", "base.qcow2"] {
        if std::fs::write(dir.join(name), data).is_err() {
            return;
        }
    }
    let seed = data.get(200).copied().unwrap_or(0);
    let mut cluster = 512;
    for writable in [false, true] {
        if let Ok(mut img) = open_qcow2_standalone(&path, !writable) {
            cluster = img.cluster_size();
            exercise(&mut img, cluster, writable, seed);
        }
    }
    // Again with its backing chain, confined to the scratch folder (the writes above may
    // have changed the top image; the copies below it are the input's bytes).
    for writable in [false, true] {
        let options = DiskOptions {
            format: Some(Format::Qcow2),
            read_only: !writable,
            backing_files: BackingFiles::Under(dir.clone()),
            ..Default::default()
        };
        if let Ok(mut img) = open_disk(&path, options) {
            exercise(img.as_mut(), cluster, writable, seed);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
});
