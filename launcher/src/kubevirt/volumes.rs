//! Makes the files a VMI's volumes need before its VM boots ([`Prepare`]), and removes the
//! ephemeral ones when the launcher ends ([`Prepared`]'s drop).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use devices::block::Format;
use vmm::config::VmConfig;

use super::translate::{Prepare, Source};

/// Files and folders made for the VM, removed when dropped (those of ephemeral volumes only:
/// a claim's or a host disk's image is the user's data), so that the pod's folders are left as
/// they were found.
#[derive(Debug, Default)]
pub struct Prepared {
    ephemeral: Vec<PathBuf>,
    folders: Vec<PathBuf>,
}

impl Prepared {
    /// Makes the folders above `file` that are missing, noting them for removal.
    pub fn folders_for(&mut self, file: &Path) -> Result<(), String> {
        let mut missing = Vec::new();
        let mut dir = file.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            missing.push(d.to_owned());
            dir = d.parent();
        }
        for d in missing.into_iter().rev() {
            std::fs::create_dir(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            self.folders.push(d);
        }
        Ok(())
    }
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
        for dir in self.folders.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Makes what `steps` ask for, in order; the disk of step `i` is `config.disks[i]`, whose path
/// a claim in block mode changes to its device. On failure what was made is removed again.
pub fn prepare(steps: &[Prepare], config: &mut VmConfig) -> Result<Prepared, String> {
    let mut made = Prepared::default();
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
            Prepare::Overlay { path, base } => {
                let format = base_format(base).map_err(fail)?;
                let size = image_size(base, format).map_err(fail)?;
                made.folders_for(path).map_err(fail)?;
                qcow2_create(path, size, Some((base, format))).map_err(fail)?;
                made.ephemeral.push(path.clone());
            }
            Prepare::EmptyDisk { path, size } => {
                made.folders_for(path).map_err(fail)?;
                qcow2_create(path, *size, None).map_err(fail)?;
                made.ephemeral.push(path.clone());
            }
            Prepare::CloudInit {
                path,
                config_drive,
                instance_id,
                hostname,
                user_data,
                network_data,
            } => {
                let seed = crate::cloudinit::Seed {
                    instance_id: instance_id.clone(),
                    hostname: hostname.clone(),
                    user_data: read_source(user_data).map_err(fail)?,
                    network_data: network_data
                        .as_ref()
                        .map(read_source)
                        .transpose()
                        .map_err(fail)?,
                };
                let image = if *config_drive {
                    crate::cloudinit::config_drive(&seed)
                } else {
                    crate::cloudinit::nocloud(&seed)
                };
                made.folders_for(path).map_err(fail)?;
                write_new(path, &image).map_err(fail)?;
                made.ephemeral.push(path.clone());
            }
        }
    }
    Ok(made)
}

/// A cloud-init document: given in the spec, or a file of a mounted secret (its key in lower
/// case, `userdata`, or as KubeVirt spells it, `userData`).
fn read_source(source: &Source) -> Result<String, String> {
    match source {
        Source::Text(text) => Ok(text.clone()),
        Source::Secret(file) => {
            let camel = file.with_file_name(match file.file_name().and_then(|n| n.to_str()) {
                Some("userdata") => "userData",
                Some("networkdata") => "networkData",
                Some(other) => other,
                None => "",
            });
            std::fs::read_to_string(file)
                .or_else(|_| std::fs::read_to_string(&camel))
                .map_err(|e| format!("the secret's file {}: {e}", file.display()))
        }
    }
}

/// Writes `data` into a new file at `path` (readable by the VMM only).
fn write_new(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, data).map_err(|e| {
        let _ = std::fs::remove_file(path);
        format!("cannot write {}: {e}", path.display())
    })
}

/// The format of an ephemeral volume's read-only base: raw, or a qcow2 image that names no
/// backing file of its own (an image from a registry must not reach other host files).
fn base_format(base: &Path) -> Result<Format, String> {
    let mut magic = [0u8; 4];
    let mut file = File::open(base).map_err(|e| format!("the image {}: {e}", base.display()))?;
    let n = std::io::Read::read(&mut file, &mut magic)
        .map_err(|e| format!("the image {}: {e}", base.display()))?;
    if n < 4 || magic != devices::block::qcow2::header::MAGIC {
        return Ok(Format::Raw);
    }
    devices::block::open_qcow2_standalone(base, true)
        .map_err(|e| format!("the image {} is refused: {e}", base.display()))?;
    Ok(Format::Qcow2)
}

/// The virtual size of an image in `format`, in whole sectors.
fn image_size(path: &Path, format: Format) -> Result<u64, String> {
    let options = devices::block::DiskOptions {
        format: Some(format),
        read_only: true,
        ..Default::default()
    };
    let disk = devices::block::open_disk(path, options)
        .map_err(|e| format!("the image {}: {e}", path.display()))?;
    Ok(disk.size() / 512 * 512)
}

fn qcow2_create(path: &Path, size: u64, backing: Option<(&Path, Format)>) -> Result<(), String> {
    devices::block::qcow2::create::create(path, size, backing, 0o660).map_err(|e| e.to_string())
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

    fn disk(id: &str) -> vmm::config::DiskConfig {
        vmm::config::DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            format: None,
            serial: None,
            num_queues: None,
            id: Some(id.into()),
            ..Default::default()
        }
    }

    fn config(disks: Vec<vmm::config::DiskConfig>) -> VmConfig {
        let mut c: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1}, "memory": {"size": 64 << 20},
        }))
        .unwrap();
        c.disks = disks;
        c
    }

    #[test]
    fn ephemeral_images_are_made_over_their_base_and_removed_with_their_folders() {
        let dir = scratch("eph");
        let base = dir.join("disk_0.img");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let overlay = dir.join("eph/disk-data/root/disk.qcow2");
        let empty = dir.join("eph/empty-disks/scratch.qcow2");
        let steps = [
            Prepare::Overlay {
                path: overlay.clone(),
                base: base.clone(),
            },
            Prepare::EmptyDisk {
                path: empty.clone(),
                size: 1 << 30,
            },
        ];
        let mut c = config(vec![disk("root"), disk("scratch")]);
        let made = prepare(&steps, &mut c).unwrap();
        let only_base = devices::block::DiskOptions {
            backing_files: devices::block::BackingFiles::Under(base.clone()),
            ..Default::default()
        };
        let opened = devices::block::open_disk(&overlay, only_base).unwrap();
        assert_eq!(opened.size(), 1 << 20);
        drop(opened);
        assert!(empty.is_file());
        drop(made);
        assert!(!dir.join("eph").exists(), "the folders made are gone too");
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 1 << 20]);

        // A base that names a backing file of its own is refused, and nothing is left.
        let evil = dir.join("evil.qcow2");
        devices::block::qcow2::create::create(
            &evil,
            1 << 20,
            Some((Path::new("/etc/passwd"), Format::Raw)),
            0o600,
        )
        .unwrap();
        let steps = [
            Prepare::EmptyDisk {
                path: empty.clone(),
                size: 1 << 20,
            },
            Prepare::Overlay {
                path: overlay.clone(),
                base: evil,
            },
        ];
        let mut c = config(vec![disk("scratch"), disk("root")]);
        let err = prepare(&steps, &mut c).unwrap_err();
        assert!(
            err.starts_with("volume 'root': the image") && err.contains("is refused"),
            "{err}"
        );
        assert!(
            !dir.join("eph").exists(),
            "a failed prepare leaves nothing behind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cloud_init_seed_is_made_from_a_secret_and_removed() {
        let dir = scratch("seed");
        let secret = dir.join("secret/seed");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("userData"), "#cloud-config\n").unwrap();
        let iso = dir.join("cloud-init-data/ns/vm/noCloud.iso");
        let steps = [Prepare::CloudInit {
            path: iso.clone(),
            config_drive: false,
            instance_id: "vm.ns".into(),
            hostname: "vm".into(),
            user_data: Source::Secret(secret.join("userdata")),
            network_data: Some(Source::Text("version: 2\n".into())),
        }];
        let mut c = config(vec![disk("seed")]);
        let made = prepare(&steps, &mut c).unwrap();
        let image = std::fs::read(&iso).unwrap();
        assert_eq!(&image[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
        drop(made);
        assert!(!dir.join("cloud-init-data").exists());
        // A secret that is not there: refused, naming the file.
        std::fs::remove_file(secret.join("userData")).unwrap();
        let err = prepare(&steps, &mut c).unwrap_err();
        assert!(
            err.starts_with("volume 'seed': the secret's file "),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
