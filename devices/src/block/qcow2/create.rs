//! New, empty qcow2 images, as `qemu-img create -f qcow2 [-b BACKING -F FORMAT]` makes them:
//! version 3, 64 KiB clusters, 16-bit refcounts; optionally over a backing image, which reads
//! of clusters never written fall through to.
//!
//! ```text
//! cluster 0   header, backing-format extension, end of extensions, backing file name
//! cluster 1   refcount table (one entry: cluster 2)
//! cluster 2   refcount block (clusters 0 .. 3 + L1 clusters have refcount 1)
//! cluster 3.. L1 table, all zeros (no L2 table yet)
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::super::{BlockError, Format};
use super::header::MAGIC;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Version 3 header with the compression-type byte, padded to 8 bytes.
const HEADER_LEN: usize = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Refcount width: 2^4 = 16 bits.
const REFCOUNT_ORDER: u32 = 4;
/// QEMU's limit for backing file names.
const MAX_BACKING_NAME: usize = 1023;

/// Writes a new qcow2 image of `size` bytes (a multiple of 512) at `path`, which must not
/// exist, created with `mode`. With `backing`, the image reads through to that file, named by
/// the path given (QEMU and podvisor resolve a relative one against the new image's folder),
/// in the format given (never probed). On failure nothing is left at `path`.
pub fn create(
    path: &Path,
    size: u64,
    backing: Option<(&Path, Format)>,
    mode: u32,
) -> Result<(), BlockError> {
    let bytes = image_bytes(path, size, backing)?;
    let io = |op: &'static str| {
        move |source| BlockError::Io {
            path: path.to_path_buf(),
            op,
            offset: 0,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let written = file
        .write_all(&bytes)
        .map_err(io("write"))
        .and_then(|()| file.sync_all().map_err(io("sync")));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// The whole new image.
fn image_bytes(
    path: &Path,
    size: u64,
    backing: Option<(&Path, Format)>,
) -> Result<Vec<u8>, BlockError> {
    let unsupported = |feature: String| BlockError::Unsupported {
        path: path.to_path_buf(),
        feature,
    };
    if size == 0 || !size.is_multiple_of(512) {
        return Err(unsupported(format!(
            "a size of {size} bytes (a positive multiple of 512)"
        )));
    }
    // One L2 table (a cluster of 8-byte entries) maps this much of the disk.
    let per_l2 = CLUSTER * (CLUSTER / 8);
    let l1_size = size.div_ceil(per_l2);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
    let l1_size = u32::try_from(l1_size)
        .map_err(|_| unsupported(format!("a size of {size} bytes (too large)")))?;
    let clusters = 3 + l1_clusters;

    let mut image = vec![0u8; (clusters * CLUSTER) as usize];
    let put32 = |image: &mut Vec<u8>, at: usize, v: u32| {
        image[at..at + 4].copy_from_slice(&v.to_be_bytes());
    };
    let put64 = |image: &mut Vec<u8>, at: usize, v: u64| {
        image[at..at + 8].copy_from_slice(&v.to_be_bytes());
    };
    image[..4].copy_from_slice(&MAGIC);
    put32(&mut image, 4, 3);
    put32(&mut image, 20, CLUSTER_BITS);
    put64(&mut image, 24, size);
    put32(&mut image, 36, l1_size);
    put64(&mut image, 40, 3 * CLUSTER);
    put64(&mut image, 48, CLUSTER);
    put32(&mut image, 56, 1);
    put32(&mut image, 96, REFCOUNT_ORDER);
    put32(&mut image, 100, HEADER_LEN as u32);

    // Header extensions, then the backing file's name.
    let mut at = HEADER_LEN;
    if let Some((file, format)) = backing {
        let name = file.as_os_str().as_encoded_bytes();
        if name.is_empty() || name.len() > MAX_BACKING_NAME {
            return Err(unsupported(format!(
                "a backing file name of {} bytes (1 to {MAX_BACKING_NAME})",
                name.len()
            )));
        }
        let format = format.to_string();
        put32(&mut image, at, EXT_BACKING_FORMAT);
        put32(&mut image, at + 4, format.len() as u32);
        image[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
        at += 8; // the end-of-extensions marker: type 0, length 0
        put64(&mut image, 8, at as u64);
        put32(&mut image, 16, name.len() as u32);
        image[at..at + name.len()].copy_from_slice(name);
    }

    // The refcount table points at the one refcount block, which counts every cluster above.
    put64(&mut image, CLUSTER as usize, 2 * CLUSTER);
    for cluster in 0..clusters as usize {
        let entry = 2 * CLUSTER as usize + cluster * 2;
        image[entry..entry + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{open_disk, DiskOptions};

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("podvisor-qcreate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn qemu_img(args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn an_empty_image_is_what_qemu_img_makes() {
        let dir = scratch("empty");
        let image = dir.join("e.qcow2");
        create(&image, 3 << 30, None, 0o600).unwrap();
        let disk = open_disk(&image, DiskOptions::default()).unwrap();
        assert_eq!(disk.size(), 3 << 30);
        drop(disk);
        if let Some(info) = qemu_img(&["info", "--output=json", image.to_str().unwrap()]) {
            let info: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(info["virtual-size"], 3u64 << 30);
            assert_eq!(info["cluster-size"], 65536);
            assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
            qemu_img(&["check", image.to_str().unwrap()]);
        }
        // It is never overwritten.
        let err = create(&image, 1 << 20, None, 0o600).unwrap_err();
        assert!(err.to_string().contains("File exists"), "{err}");
        assert!(create(&dir.join("odd"), 1000, None, 0o600).is_err());
        assert!(!dir.join("odd").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_overlay_reads_its_backing_file_and_keeps_its_own_writes() {
        let dir = scratch("overlay");
        let base = dir.join("base.raw");
        let mut data = vec![0u8; 4 << 20];
        data[..11].copy_from_slice(b"from-base-1");
        data[(3 << 20)..(3 << 20) + 4].copy_from_slice(b"tail");
        std::fs::write(&base, &data).unwrap();
        let overlay = dir.join("overlay.qcow2");
        create(&overlay, 4 << 20, Some((&base, Format::Raw)), 0o600).unwrap();
        {
            let options = DiskOptions {
                backing_files: crate::block::BackingFiles::Any,
                ..DiskOptions::default()
            };
            let mut disk = open_disk(&overlay, options).unwrap();
            let mut buf = [0u8; 11];
            disk.read_at(&mut buf, 0).unwrap();
            assert_eq!(&buf, b"from-base-1");
            disk.write_at(b"mine", 3 << 20).unwrap();
            disk.flush().unwrap();
        }
        assert_eq!(
            std::fs::read(&base).unwrap(),
            data,
            "the base is never written"
        );
        if let Some(info) = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]) {
            let info: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(info["backing-filename-format"], "raw");
            assert_eq!(info["full-backing-filename"], base.to_str().unwrap());
            qemu_img(&["check", overlay.to_str().unwrap()]);
            let raw = dir.join("now.raw");
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                overlay.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            let now = std::fs::read(&raw).unwrap();
            assert_eq!(&now[..11], b"from-base-1");
            assert_eq!(&now[(3 << 20)..(3 << 20) + 4], b"mine");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
