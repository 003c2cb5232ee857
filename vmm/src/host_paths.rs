//! Which host files a VM configuration from an API client may name.
//!
//! A configuration names host paths: the kernel and initramfs it boots, its disks, where its
//! serial output goes, where its random bytes come from, where a snapshot is written. From
//! the command line those are the user's own choice. From the API they are a client's, and
//! the socket's file mode is then all that stands between that client and every file the VMM
//! can open: the rng device would stream a secret to the guest, a disk would open a host
//! block device read-write, the serial output would append to any file.
//!
//! [`HostPaths::Api`] is the API's policy: the entropy source is one of the kernel's random
//! devices, serial output never goes to a device or a FIFO, and when `roots` are given every
//! file the configuration names (and every backing file a disk may follow) lies under one
//! of them, symbolic links resolved. A VMM in a pod passes its pod's own directories.

use std::path::{Path, PathBuf};

use crate::config::{BackingFilesConfig, ConsoleConfig, VmConfig};

/// The random devices an API client may name as an entropy source without `roots`.
pub const RANDOM_DEVICES: [&str; 3] = ["/dev/urandom", "/dev/random", "/dev/hwrng"];

/// Which host paths a configuration may name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostPaths {
    /// Any (the command line's own configuration).
    #[default]
    Any,
    /// An API client's configuration (see the module docs); `roots` canonical, none = no
    /// limit on where files are.
    Api { roots: Vec<PathBuf> },
}

impl HostPaths {
    /// The API's policy with files under `roots` only (none: anywhere). Each root must be an
    /// existing directory.
    pub fn api(roots: &[PathBuf]) -> Result<Self, String> {
        let roots = roots
            .iter()
            .map(|root| {
                let canonical =
                    std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
                if !canonical.is_dir() {
                    return Err(format!("{}: not a directory", root.display()));
                }
                Ok(canonical)
            })
            .collect::<Result<_, String>>()?;
        Ok(HostPaths::Api { roots })
    }

    fn roots(&self) -> Option<&[PathBuf]> {
        match self {
            HostPaths::Any => None,
            HostPaths::Api { roots } => Some(roots),
        }
    }

    /// Whether `path` (which may not exist yet) lies under one of the roots, or there are
    /// none; the reason when not.
    pub fn check(&self, what: &str, path: &Path) -> Result<(), String> {
        let Some(roots) = self.roots().filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        let resolved = resolve(path);
        if roots.iter().any(|root| resolved.starts_with(root)) {
            return Ok(());
        }
        Err(format!(
            "{what} {}: not under an allowed path ({})",
            path.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// Checks every host path `config` names.
    pub fn check_config(&self, config: &VmConfig) -> Result<(), String> {
        if *self == HostPaths::Any {
            return Ok(());
        }
        let restricted = self.roots().is_some_and(|r| !r.is_empty());
        if let Some(kernel) = &config.payload.kernel {
            self.check("kernel", kernel)?;
        }
        if let Some(initramfs) = &config.payload.initramfs {
            self.check("initramfs", initramfs)?;
        }
        for disk in &config.disks {
            self.check("disk", &disk.path)?;
            match &disk.backing_files {
                BackingFilesConfig::Allowed(true) if restricted => {
                    return Err(format!(
                        "disk {}: backing_files=true would follow backing files anywhere; \
                         name a directory under an allowed path instead",
                        disk.path.display()
                    ))
                }
                BackingFilesConfig::Under(under) => self.check("backing_files", under)?,
                BackingFilesConfig::Allowed(_) => {}
            }
        }
        match &config.serial {
            ConsoleConfig::File(file) => {
                self.check("serial file", file)?;
                if let Ok(meta) = std::fs::metadata(file) {
                    if !meta.is_file() {
                        return Err(format!(
                            "serial file {}: not a regular file",
                            file.display()
                        ));
                    }
                }
            }
            ConsoleConfig::Socket(socket) => self.check("serial socket", socket)?,
            ConsoleConfig::Tty | ConsoleConfig::Off => {}
        }
        if let Some(rng) = &config.rng {
            let device = RANDOM_DEVICES.iter().any(|d| rng.src == Path::new(d));
            let under_a_root = restricted && self.check("rng src", &rng.src).is_ok();
            if !(device || under_a_root) {
                return Err(format!(
                    "rng src {}: only {} (or, with allowed paths, a file under one)",
                    rng.src.display(),
                    RANDOM_DEVICES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// `path` with symbolic links resolved as far as it exists: a file yet to be made is
/// resolved through its existing parent.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return canonical;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolve(parent).join(name),
        // A relative name with nothing to resolve: against the working directory.
        _ => std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, RngConfig};

    fn config(dir: &Path) -> VmConfig {
        let mut c: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": dir.join("bzImage")},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64u64 << 20},
        }))
        .unwrap();
        c.disks.push(DiskConfig {
            path: dir.join("disk.raw"),
            ..Default::default()
        });
        c
    }

    #[test]
    fn files_stay_under_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        std::fs::create_dir(&pod).unwrap();
        std::fs::write(pod.join("bzImage"), b"").unwrap();
        let api = HostPaths::api(std::slice::from_ref(&pod)).unwrap();
        let mut c = config(&pod);
        api.check_config(&c).unwrap();
        // Not yet made, under a root: fine (a serial file, a snapshot's folder).
        c.serial = ConsoleConfig::File(pod.join("new/../console.log"));
        api.check_config(&c).unwrap();

        let outside = [
            ("disk", "/dev/sda"),
            ("kernel", "/boot/vmlinuz"),
            ("serial file", "/etc/cron.d/evil"),
            ("backing_files", "/"),
        ];
        for (what, path) in outside {
            let mut c = config(&pod);
            match what {
                "disk" => c.disks[0].path = path.into(),
                "kernel" => c.payload.kernel = Some(path.into()),
                "serial file" => c.serial = ConsoleConfig::File(path.into()),
                _ => c.disks[0].backing_files = BackingFilesConfig::Under(path.into()),
            }
            let err = api.check_config(&c).unwrap_err();
            assert!(
                err.starts_with(&format!("{what} {path}: not under an allowed path")),
                "{err}"
            );
        }
        // A link inside a root that leads out of it.
        std::os::unix::fs::symlink("/etc", pod.join("etc")).unwrap();
        let mut c = config(&pod);
        c.disks[0].path = pod.join("etc/shadow");
        assert!(api
            .check_config(&c)
            .unwrap_err()
            .contains("not under an allowed path"));
        // Backing files anywhere would escape the roots.
        let mut c = config(&pod);
        c.disks[0].backing_files = BackingFilesConfig::Allowed(true);
        assert!(api
            .check_config(&c)
            .unwrap_err()
            .contains("backing_files=true"));
        // A root must be a directory.
        assert!(HostPaths::api(&[pod.join("bzImage")]).is_err());
        // The command line's configuration is not checked.
        HostPaths::Any.check_config(&c).unwrap();
    }

    #[test]
    fn entropy_comes_from_a_random_device_and_serial_never_goes_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let open = HostPaths::api(&[]).unwrap();
        let mut c = config(dir.path());
        for ok in RANDOM_DEVICES {
            c.rng = Some(RngConfig { src: ok.into() });
            open.check_config(&c).unwrap();
        }
        c.rng = Some(RngConfig {
            src: "/etc/shadow".into(),
        });
        let err = open.check_config(&c).unwrap_err();
        assert!(
            err.starts_with("rng src /etc/shadow: only /dev/urandom"),
            "{err}"
        );
        // With roots, a file under one may feed the device (a test's fixed bytes).
        let roots = HostPaths::api(&[dir.path().to_path_buf()]).unwrap();
        c.rng = Some(RngConfig {
            src: dir.path().join("bytes"),
        });
        roots.check_config(&c).unwrap();
        assert!(open.check_config(&c).is_err());

        let mut c = config(dir.path());
        c.serial = ConsoleConfig::File("/dev/null".into());
        let err = open.check_config(&c).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        c.serial = ConsoleConfig::File(dir.path().join("console.log"));
        open.check_config(&c).unwrap();
    }
}
