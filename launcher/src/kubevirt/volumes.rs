//! Makes the files a VMI's volumes need before its VM boots ([`Prepare`]), and removes the
//! ephemeral ones when the launcher ends ([`Prepared`]'s drop).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmm::config::VmConfig;

use super::translate::Prepare;

/// Files made for the VM, removed when dropped (those of ephemeral volumes only: a claim's or
/// a host disk's image is the user's data).
#[derive(Debug, Default)]
pub struct Prepared {
    ephemeral: Vec<PathBuf>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        for path in self.ephemeral.iter().rev() {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// Makes what `steps` ask for, in order; the disk of step `i` is `config.disks[i]`, whose path
/// a claim in block mode changes to its device. On failure what was made is removed again.
pub fn prepare(steps: &[Prepare], config: &mut VmConfig) -> Result<Prepared, String> {
    let made = Prepared::default();
    for (step, disk) in steps.iter().zip(config.disks.iter_mut()) {
        let volume = disk.id.clone().unwrap_or_default();
        let fail = |e: String| format!("volume '{volume}': {e}");
        match step {
            Prepare::Claim { image, device } => {
                disk.path = claim(image, device).map_err(fail)?;
            }
            Prepare::HostDisk { path, create, size } => {
                host_disk(path, *create, *size).map_err(fail)?;
            }
            Prepare::Overlay { .. } => {
                return Err(fail(
                    "containerDisk and ephemeral volumes are not supported yet".into(),
                ))
            }
            Prepare::EmptyDisk { .. } => {
                return Err(fail("emptyDisk volumes are not supported yet".into()))
            }
            Prepare::CloudInit { .. } => {
                return Err(fail("cloud-init volumes are not supported yet".into()))
            }
        }
    }
    Ok(made)
}

/// A claim's image in filesystem mode (made sparse, as large as the volume's free space, when
/// missing), or else its block device.
fn claim(image: &Path, device: &Path) -> Result<PathBuf, String> {
    if image.is_file() {
        return Ok(image.to_owned());
    }
    let dir = image.parent().expect("an image path has a directory");
    if dir.is_dir() {
        let size = free_space(dir)?;
        create_sparse(image, size)?;
        tracing::info!("made {} ({} MiB, sparse)", image.display(), size >> 20);
        return Ok(image.to_owned());
    }
    match std::fs::metadata(device) {
        Ok(m) if m.file_type().is_block_device() => Ok(device.to_owned()),
        _ => Err(format!(
            "neither {} (filesystem mode) nor the block device {} is there",
            dir.display(),
            device.display()
        )),
    }
}

fn host_disk(path: &Path, create: bool, size: Option<u64>) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a file or a block device",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let size = size.ok_or("type DiskOrCreate needs a capacity")?;
            create_sparse(path, size)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Creates `path` (which must not exist), `size` bytes, all a hole.
fn create_sparse(path: &Path, size: u64) -> Result<(), String> {
    let file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.set_len(size).map_err(|e| {
        let _ = std::fs::remove_file(path);
        format!("cannot size {} to {size} bytes: {e}", path.display())
    })
}

/// The bytes an unprivileged writer may still use in the file system holding `dir`, rounded
/// down to MiB.
fn free_space(dir: &Path) -> Result<u64, String> {
    let bytes = available_bytes(dir)?;
    Ok(bytes / (1 << 20) * (1 << 20))
}

fn available_bytes(dir: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", dir.display()))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs reads a NUL-terminated path and fills the struct it is given, which
    // lives for the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!(
            "{}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("podvisor-vol-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_claim_is_its_image_made_sparse_when_missing_or_else_its_device() {
        let dir = scratch("claim");
        let vol = dir.join("vmi-disks/data");
        std::fs::create_dir_all(&vol).unwrap();
        let image = vol.join("disk.img");
        let device = dir.join("dev/data");
        assert_eq!(claim(&image, &device).unwrap(), image);
        let meta = std::fs::metadata(&image).unwrap();
        assert!(meta.len() >= 1 << 20 && meta.len().is_multiple_of(1 << 20));
        assert_eq!(std::os::unix::fs::MetadataExt::blocks(&meta), 0, "sparse");
        // Made once, then used as it is.
        std::fs::write(&image, b"data").unwrap();
        assert_eq!(claim(&image, &device).unwrap(), image);
        assert_eq!(std::fs::read(&image).unwrap(), b"data");
        // No volume directory and no block device: refused, naming both.
        let err = claim(&dir.join("none/disk.img"), &device).unwrap_err();
        assert!(err.contains("none") && err.contains("dev/data"), "{err}");
        // A block device in block mode.
        let loop0 = Path::new("/dev/loop0");
        if loop0.exists() {
            assert_eq!(claim(&dir.join("none/disk.img"), loop0).unwrap(), loop0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_disks_exist_or_are_made_when_asked() {
        let dir = scratch("host");
        let file = dir.join("h.img");
        let err = host_disk(&file, false, None).unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        let err = host_disk(&file, true, None).unwrap_err();
        assert!(err.contains("capacity"), "{err}");
        host_disk(&file, true, Some(3 << 20)).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 << 20);
        host_disk(&file, false, None).unwrap();
        let err = host_disk(&dir, false, None).unwrap_err();
        assert!(err.contains("not a file or a block device"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
