//! Booting a disk image without a separate kernel: the image's partition table, its boot file
//! system (ext2/3/4, read in-process and read-only through podvisor's own block layer, so raw,
//! qcow2 and backing chains alike) and the boot menu in it name the kernel, initrds and
//! command line, as a boot loader in the guest would find them — without firmware or a boot
//! loader running in the guest.
//!
//! Where the menu is looked for, partition by partition in table order: Boot Loader
//! Specification entries (`/loader/entries/*.conf`, or under `/boot`), then GRUB's `grub.cfg`
//! (`/grub`, `/grub2`, or under `/boot`), then `extlinux.conf`/`syslinux.cfg`; when no file
//! system has one, the `/vmlinuz` and `/initrd.img` links Debian and Ubuntu keep (under `/` or
//! `/boot`), with `root=PARTUUID=...` of their partition.

pub mod menu;
pub mod partitions;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use devices::block::DiskImage;

pub use menu::{Entry, Menu};
pub use partitions::Partition;

/// The largest kernel and initrd (each) read from an image: a file beyond this is refused
/// rather than read into memory.
pub const MAX_KERNEL: u64 = 256 << 20;
pub const MAX_INITRD: u64 = 1 << 30;
/// The largest boot menu file read.
const MAX_MENU_FILE: u64 = 4 << 20;
/// At most this many BLS entries are read.
const MAX_BLS_ENTRIES: usize = 256;

/// Why a disk cannot be booted directly; each names the image's problem in one line.
#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    #[error("reading the disk: {0}")]
    Read(String),
    #[error(
        "no partition table (MBR or GPT): podvisor boots a partitioned image without --kernel"
    )]
    NoPartitionTable,
    #[error("partition table: {0}")]
    PartitionTable(String),
    #[error("no boot file system: {0}")]
    NoBootFs(String),
    #[error("no boot entry: {0}")]
    NoEntry(String),
    #[error("boot entry '{entry}': {why}")]
    BadEntry { entry: String, why: String },
    #[error("partition {partition}: corrupt file system: {why}")]
    Corrupt { partition: u32, why: String },
}

/// Reads the disk image for the partition table and the file systems (shared by the file
/// systems open at once).
#[derive(Clone)]
pub struct Reader(Rc<RefCell<Box<dyn DiskImage>>>);

impl Reader {
    pub fn new(disk: Box<dyn DiskImage>) -> Reader {
        Reader(Rc::new(RefCell::new(disk)))
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskBootError> {
        self.0
            .borrow_mut()
            .read_at(buf, offset)
            .map_err(|e| DiskBootError::Read(e.to_string()))
    }

    fn size(&self) -> u64 {
        self.0.borrow().size()
    }
}

/// A partition's bytes, as ext4-view reads them: nothing outside the partition.
struct PartitionReader {
    disk: Reader,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(format!(
                "a read at {start_byte} (+{}) past the partition's end ({})",
                dst.len(),
                self.len
            )
            .into());
        }
        self.disk
            .read_at(dst, self.start + start_byte)
            .map_err(|e| e.to_string().into())
    }
}

/// A file system of the image, open.
struct BootFs {
    partition: Partition,
    fs: ext4_view::Ext4,
}

impl BootFs {
    fn exists(&self, path: &str) -> bool {
        self.fs.exists(path).unwrap_or(false)
    }

    /// A regular file's contents, at most `max` bytes long (`what` names it in errors).
    fn read(&self, path: &str, max: u64, what: &str) -> Result<Vec<u8>, String> {
        let metadata = self
            .fs
            .metadata(path)
            .map_err(|e| format!("{what} {path}: {e}"))?;
        if metadata.is_dir() {
            return Err(format!("{what} {path} is a directory"));
        }
        if metadata.len() > max {
            return Err(format!(
                "{what} {path} is {} MiB, more than the {} MiB podvisor reads",
                metadata.len() >> 20,
                max >> 20
            ));
        }
        self.fs
            .read(path)
            .map_err(|e| format!("{what} {path}: {e}"))
    }

    fn text(&self, path: &str) -> Option<String> {
        if !self.exists(path) {
            return None;
        }
        self.read(path, MAX_MENU_FILE, "menu")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn uuid(&self) -> String {
        self.fs.uuid().to_string()
    }
}

/// A boot menu found on the image: where, and what.
pub struct Found {
    pub menu: Menu,
    /// Which file system (index into [`DiskBoot::file_systems`]) and which file.
    fs: usize,
    pub source: String,
    /// The menu file was under `/boot` of its file system (paths that are not there are
    /// also tried under `/boot`).
    under_boot: bool,
}

/// A disk opened for direct boot: its partitions, the file systems podvisor reads, and the
/// menu found on them.
pub struct DiskBoot {
    file_systems: Vec<BootFs>,
    pub found: Found,
}

/// The kernel, initrd (initrds concatenated, as boot loaders load them) and command line of
/// one entry.
pub struct Loaded {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

impl DiskBoot {
    /// Reads `disk`'s partition table and file systems and finds its boot menu.
    pub fn open(disk: Box<dyn DiskImage>) -> Result<DiskBoot, DiskBootError> {
        let mut reader = Reader::new(disk);
        let size = reader.size();
        let parts = partitions::read(&mut reader, size)?;
        let mut file_systems = Vec::new();
        let mut others = Vec::new();
        for p in parts.into_iter().filter(|p| !p.skipped()) {
            let kind = probe(&mut reader, &p)?;
            if kind != "ext4" {
                others.push(format!("partition {} holds {kind}", p.number));
                continue;
            }
            let fs = ext4_view::Ext4::load(Box::new(PartitionReader {
                disk: reader.clone(),
                start: p.start,
                len: p.len,
            }))
            .map_err(|e| DiskBootError::Corrupt {
                partition: p.number,
                why: e.to_string(),
            })?;
            file_systems.push(BootFs { partition: p, fs });
        }
        if file_systems.is_empty() {
            return Err(DiskBootError::NoBootFs(format!(
                "no ext2/3/4 file system on the image ({}); podvisor reads ext2/3/4 /boot \
                 file systems",
                others.join(", ")
            )));
        }
        let found = find_menu(&file_systems).ok_or_else(|| {
            DiskBootError::NoEntry(format!(
                "no loader/entries/*.conf, grub.cfg, extlinux.conf or /vmlinuz on the image's \
                 ext2/3/4 file systems (partitions {})",
                file_systems
                    .iter()
                    .map(|f| f.partition.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if found.menu.entries.is_empty() {
            return Err(DiskBootError::NoEntry(format!(
                "{} names no kernel",
                found.source
            )));
        }
        Ok(DiskBoot {
            file_systems,
            found,
        })
    }

    /// The entry `choice` names: its number in the menu (from 0) or its title; the menu's
    /// default when None.
    pub fn choose(&self, choice: Option<&str>) -> Result<usize, DiskBootError> {
        let entries = &self.found.menu.entries;
        let Some(choice) = choice else {
            return Ok(self.found.menu.default.min(entries.len() - 1));
        };
        if let Ok(n) = choice.parse::<usize>() {
            if n < entries.len() {
                return Ok(n);
            }
        }
        entries
            .iter()
            .position(|e| e.title == choice)
            .ok_or_else(|| {
                DiskBootError::NoEntry(format!(
                    "'{choice}' is neither an entry's number (0-{}) nor its title \
                     (--list-boot-entries shows them)",
                    entries.len() - 1
                ))
            })
    }

    /// Reads entry `index`'s kernel and initrds.
    pub fn load(&self, index: usize) -> Result<Loaded, DiskBootError> {
        let entry = &self.found.menu.entries[index];
        let bad = |why: String| DiskBootError::BadEntry {
            entry: entry.title.clone(),
            why,
        };
        let fs = match &entry.fs_uuid {
            Some(uuid) => self
                .file_systems
                .iter()
                .find(|f| f.uuid().eq_ignore_ascii_case(uuid))
                .ok_or_else(|| bad(format!("no file system with UUID {uuid} on the image")))?,
            None => &self.file_systems[self.found.fs],
        };
        let path_of = |p: &str| -> String {
            let p = if p.starts_with('/') {
                p.to_owned()
            } else {
                format!("/{p}")
            };
            if !fs.exists(&p) && self.found.under_boot && fs.exists(&format!("/boot{p}")) {
                format!("/boot{p}")
            } else {
                p
            }
        };
        let kernel = fs
            .read(&path_of(&entry.kernel), MAX_KERNEL, "kernel")
            .map_err(bad)?;
        let mut initrd: Option<Vec<u8>> = None;
        for path in &entry.initrds {
            let room = MAX_INITRD - initrd.as_ref().map_or(0, |i| i.len() as u64);
            let data = fs.read(&path_of(path), room, "initrd").map_err(bad)?;
            initrd.get_or_insert_with(Vec::new).extend(data);
        }
        Ok(Loaded {
            kernel,
            initrd,
            cmdline: with_serial_console(&entry.cmdline),
        })
    }

    /// Where the menu was found (for the log and `--list-boot-entries`).
    pub fn describe(&self) -> String {
        let fs = &self.file_systems[self.found.fs];
        format!("{} on partition {}", self.found.source, fs.partition.number)
    }
}

/// `console=ttyS0` appended when the command line names no serial console: the serial port
/// is where podvisor shows the guest.
pub fn with_serial_console(cmdline: &str) -> String {
    let serial = cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console=ttyS") || w.starts_with("console=uart"));
    if serial {
        cmdline.to_owned()
    } else if cmdline.is_empty() {
        "console=ttyS0".to_owned()
    } else {
        format!("{cmdline} console=ttyS0")
    }
}

/// What a partition holds, by its magic numbers: "ext4" (ext2/3/4), or a name for the error.
fn probe(reader: &mut Reader, p: &Partition) -> Result<&'static str, DiskBootError> {
    let mut head = vec![0u8; 0x10048.min(p.len as usize)];
    reader.read_at(&mut head, p.start)?;
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    Ok(if at(1080, &[0x53, 0xef]) {
        "ext4"
    } else if at(0, b"XFSB") {
        "XFS (podvisor reads ext2/3/4)"
    } else if at(0x10040, b"_BHRfS_M") {
        "btrfs (podvisor reads ext2/3/4)"
    } else if at(54, b"FAT") || at(82, b"FAT32") {
        "FAT"
    } else {
        "no file system podvisor knows"
    })
}

/// The first menu on the file systems, in the order of the module's docs.
fn find_menu(file_systems: &[BootFs]) -> Option<Found> {
    let env = |fs: &BootFs| -> HashMap<String, String> {
        [
            "/grub2/grubenv",
            "/boot/grub2/grubenv",
            "/grub/grubenv",
            "/boot/grub/grubenv",
        ]
        .iter()
        .find_map(|p| fs.text(p))
        .map(|t| menu::grubenv(&t))
        .unwrap_or_default()
    };
    for (i, fs) in file_systems.iter().enumerate() {
        for dir in ["/loader/entries", "/boot/loader/entries"] {
            let Ok(listing) = fs.fs.read_dir(dir) else {
                continue;
            };
            let mut files = Vec::new();
            for entry in listing.flatten().take(MAX_BLS_ENTRIES) {
                let name = entry.file_name().as_str().unwrap_or("").to_owned();
                let Some(stem) = name.strip_suffix(".conf") else {
                    continue;
                };
                if let Some(text) = fs.text(&format!("{dir}/{name}")) {
                    files.push((stem.to_owned(), text));
                }
            }
            if !files.is_empty() {
                return Some(Found {
                    menu: menu::bls(&files, &env(fs)),
                    fs: i,
                    source: format!("{dir}/*.conf"),
                    under_boot: dir.starts_with("/boot"),
                });
            }
        }
        for path in [
            "/grub/grub.cfg",
            "/grub2/grub.cfg",
            "/boot/grub/grub.cfg",
            "/boot/grub2/grub.cfg",
        ] {
            if let Some(text) = fs.text(path) {
                let menu = menu::grub(&text, &env(fs));
                if !menu.entries.is_empty() {
                    return Some(Found {
                        menu,
                        fs: i,
                        source: path.to_owned(),
                        under_boot: path.starts_with("/boot"),
                    });
                }
            }
        }
        for path in [
            "/extlinux/extlinux.conf",
            "/boot/extlinux/extlinux.conf",
            "/syslinux/syslinux.cfg",
            "/boot/syslinux/syslinux.cfg",
            "/extlinux.conf",
        ] {
            if let Some(text) = fs.text(path) {
                let dir = path.rsplit_once('/').map_or("/", |(d, _)| d);
                return Some(Found {
                    menu: menu::extlinux(&text, if dir.is_empty() { "/" } else { dir }),
                    fs: i,
                    source: path.to_owned(),
                    under_boot: path.starts_with("/boot"),
                });
            }
        }
    }
    for (i, fs) in file_systems.iter().enumerate() {
        for dir in ["", "/boot"] {
            let kernel = format!("{dir}/vmlinuz");
            if !fs.exists(&kernel) {
                continue;
            }
            let initrd = format!("{dir}/initrd.img");
            let entry = Entry {
                title: format!("{kernel} on partition {}", fs.partition.number),
                kernel,
                initrds: if fs.exists(&initrd) {
                    vec![initrd]
                } else {
                    Vec::new()
                },
                cmdline: format!("root=PARTUUID={} ro", fs.partition.partuuid()),
                fs_uuid: None,
            };
            return Some(Found {
                menu: Menu {
                    entries: vec![entry],
                    default: 0,
                },
                fs: i,
                source: format!("{dir}/vmlinuz"),
                under_boot: false,
            });
        }
    }
    None
}

/// What a disk boot loads: the chosen entry's kernel and initrd in memory files, and its
/// command line with the configuration's appended.
pub struct DiskPayload {
    pub kernel: std::fs::File,
    pub initrd: Option<std::fs::File>,
    /// Names them in errors and the log: `IMAGE:PATH` of the kernel.
    pub name: std::path::PathBuf,
    pub cmdline: String,
}

/// Opens `disk` to read its boot menu: read-only, with a shared lock, as the VM's
/// configuration says otherwise (format, backing files).
fn open_read_only(
    disk: &crate::config::DiskConfig,
) -> Result<Box<dyn DiskImage>, devices::block::BlockError> {
    let mut options = crate::backends::disk_options(disk, true);
    options.read_only = true;
    devices::block::open_disk(&disk.path, options)
}

/// The boot menus of the disks a boot would try (all of `config`'s, or those with a
/// `boot_order`, in that order), as `podvisor run --list-boot-entries` prints them: per disk,
/// where its menu is and its entries (number, `*` for the default, title, kernel and command
/// line), or why it has none. An error when no disk has one.
pub fn list(config: &crate::config::VmConfig) -> Result<String, crate::Error> {
    let mut out = String::new();
    let mut any = false;
    for disk in crate::config::DiskConfig::boot_candidates(&config.disks) {
        let opened = open_read_only(disk)
            .map_err(|e| DiskBootError::Read(e.to_string()))
            .and_then(DiskBoot::open);
        match opened {
            Ok(boot) => {
                any = true;
                out += &format!("{}: {}\n", disk.path.display(), boot.describe());
                let menu = &boot.found.menu;
                for (i, e) in menu.entries.iter().enumerate() {
                    let mark = if i == menu.default { '*' } else { ' ' };
                    out += &format!(
                        "  {i}{mark} {}\n      {} {}\n",
                        e.title,
                        e.kernel,
                        with_serial_console(&e.cmdline)
                    );
                }
            }
            Err(e) => out += &format!("{}: {e}\n", disk.path.display()),
        }
    }
    if any {
        Ok(out)
    } else {
        Err(crate::Error::Device(out.trim_end().to_owned()))
    }
}

/// Boots the first of `config`'s disks that has a boot menu (of those with a `boot_order`,
/// lowest first, when any has one): its `boot_entry` or default. Each disk is opened
/// read-only here and closed again before the VM opens it.
pub fn resolve(config: &crate::config::VmConfig) -> Result<DiskPayload, crate::Error> {
    let failed = |disk: &std::path::Path, e: &dyn std::fmt::Display| {
        crate::Error::Device(format!(
            "booting disk '{}' (no --kernel given): {e}",
            disk.display()
        ))
    };
    let mut first_error = None;
    for disk in crate::config::DiskConfig::boot_candidates(&config.disks) {
        let image = open_read_only(disk).map_err(|e| failed(&disk.path, &e))?;
        let boot = match DiskBoot::open(image) {
            Ok(boot) => boot,
            // A data disk: the next one may be the boot disk.
            Err(e) => {
                first_error.get_or_insert_with(|| failed(&disk.path, &e));
                continue;
            }
        };
        let index = boot
            .choose(config.payload.boot_entry.as_deref())
            .map_err(|e| failed(&disk.path, &e))?;
        let entry = &boot.found.menu.entries[index];
        tracing::info!(
            "booting '{}' from {} of disk {}",
            entry.title,
            boot.describe(),
            disk.path.display()
        );
        let name = format!("{}:{}", disk.path.display(), entry.kernel).into();
        let loaded = boot.load(index).map_err(|e| failed(&disk.path, &e))?;
        let file_of =
            |bytes: &[u8], what: &std::ffi::CStr| -> Result<std::fs::File, crate::Error> {
                let mut f = crate::vstate::memory::memfd(what, None)?;
                std::io::Write::write_all(&mut f, bytes)
                    .and_then(|()| std::io::Seek::rewind(&mut f))
                    .map_err(|e| failed(&disk.path, &e))?;
                Ok(f)
            };
        let mut cmdline = loaded.cmdline;
        if !config.payload.cmdline.is_empty() {
            cmdline = format!("{cmdline} {}", config.payload.cmdline);
        }
        return Ok(DiskPayload {
            kernel: file_of(&loaded.kernel, c"podvisor-kernel")?,
            initrd: loaded
                .initrd
                .as_deref()
                .map(|i| file_of(i, c"podvisor-initrd"))
                .transpose()?,
            name,
            cmdline,
        });
    }
    Err(first_error
        .unwrap_or_else(|| crate::Error::Device("no kernel given and no disk to boot from".into())))
}

#[cfg(test)]
mod tests;
