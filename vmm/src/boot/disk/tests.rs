//! Direct disk boot on images made here: ext4 file systems by `mkfs.ext4 -d` (e2fsprogs),
//! partition tables written by the test itself, raw and as a qcow2 overlay (qemu-img).

use std::path::{Path, PathBuf};
use std::process::Command;

use devices::block::{open_disk, BackingFiles, DiskOptions};

use super::partitions::SECTOR;
use super::*;

const MIB: u64 = 1 << 20;
const LINUX_FS: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// An ext4 file system of `mib` MiB holding `files` ((path, contents); contents starting with
/// "->" make a symbolic link to the rest).
fn ext4(dir: &Path, name: &str, mib: u64, files: &[(&str, &str)]) -> Vec<u8> {
    let root = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&root).unwrap();
    for (path, contents) in files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match contents.strip_prefix("->") {
            Some(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
            None => std::fs::write(&p, contents).unwrap(),
        }
    }
    let image = dir.join(format!("{name}.ext4"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{mib}M"))
        .output()
        .expect("mkfs.ext4 (e2fsprogs; scripts/test-all.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(image).unwrap()
}

/// A disk with a GPT of `parts` (each 1 MiB aligned, Linux file system type); returns its path.
fn gpt_disk(dir: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let mut at = MIB;
    let mut entries = vec![0u8; 128 * 128];
    let mut layout = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&LINUX_FS);
        e[16] = i as u8 + 1; // unique GUID
        e[32..40].copy_from_slice(&(at / SECTOR).to_le_bytes());
        let last = (at + p.len() as u64) / SECTOR - 1;
        e[40..48].copy_from_slice(&last.to_le_bytes());
        layout.push(at);
        at += (p.len() as u64).div_ceil(MIB) * MIB;
    }
    let size = at + MIB;
    let mut disk = vec![0u8; size as usize];
    // Protective MBR.
    disk[446 + 4] = 0xee;
    disk[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&((size / SECTOR - 1) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let mut h = vec![0u8; 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    disk[512..512 + 92].copy_from_slice(&h);
    disk[1024..1024 + entries.len()].copy_from_slice(&entries);
    for (p, at) in parts.iter().zip(layout) {
        disk[at as usize..at as usize + p.len()].copy_from_slice(p);
    }
    let path = dir.join("disk.raw");
    std::fs::write(&path, disk).unwrap();
    path
}

/// A disk with an MBR of `parts` (type 0x83).
fn mbr_disk(dir: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let size: u64 = MIB + parts.iter().map(|p| p.len() as u64).sum::<u64>();
    let mut disk = vec![0u8; size as usize];
    let mut at = MIB;
    for (i, p) in parts.iter().enumerate() {
        let e = 446 + 16 * i;
        disk[e + 4] = 0x83;
        disk[e + 8..e + 12].copy_from_slice(&((at / SECTOR) as u32).to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&((p.len() as u64 / SECTOR) as u32).to_le_bytes());
        disk[at as usize..at as usize + p.len()].copy_from_slice(p);
        at += p.len() as u64;
    }
    disk[440..444].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let path = dir.join("disk.raw");
    std::fs::write(&path, disk).unwrap();
    path
}

fn open(path: &Path) -> Result<DiskBoot, DiskBootError> {
    let disk = open_disk(
        path,
        DiskOptions {
            read_only: true,
            backing_files: BackingFiles::Any,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    DiskBoot::open(disk)
}

fn error(path: &Path) -> String {
    match open(path) {
        Ok(b) => panic!("{} boots ({})", path.display(), b.describe()),
        Err(e) => e.to_string(),
    }
}

const DEBIAN_GRUB: &str = "\
set default=\"0\"
menuentry 'Debian GNU/Linux' $menuentry_id_option 'gnulinux-simple' {
\tinsmod ext2
\tlinux\t/boot/vmlinuz-6.1.0-9-cloud-amd64 root=PARTUUID=x ro console=tty0
\tinitrd\t/boot/initrd.img-6.1.0-9-cloud-amd64
}
";

/// A Debian-like root file system: grub.cfg under /boot, the kernel and initrd beside it.
fn debian_root(dir: &Path) -> Vec<u8> {
    ext4(
        dir,
        "root",
        16,
        &[
            ("/boot/grub/grub.cfg", DEBIAN_GRUB),
            ("/boot/vmlinuz-6.1.0-9-cloud-amd64", "KERNEL-6.1"),
            ("/boot/initrd.img-6.1.0-9-cloud-amd64", "INITRD-6.1"),
            ("/etc/hostname", "debian\n"),
        ],
    )
}

#[test]
fn a_gpt_image_with_grub_cfg_boots_raw_and_as_a_qcow2_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let root = debian_root(dir.path());
    let raw = gpt_disk(dir.path(), &[root]);
    let overlay = dir.path().join("top.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&raw)
        .arg(&overlay)
        .output()
        .expect("qemu-img (qemu-utils; scripts/test-all.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for image in [&raw, &overlay] {
        let boot = open(image).unwrap();
        assert_eq!(boot.describe(), "/boot/grub/grub.cfg on partition 1");
        let index = boot.choose(None).unwrap();
        let loaded = boot.load(index).unwrap();
        assert_eq!(loaded.kernel, b"KERNEL-6.1");
        assert_eq!(loaded.initrd.as_deref(), Some(&b"INITRD-6.1"[..]));
        assert_eq!(
            loaded.cmdline, "root=PARTUUID=x ro console=tty0 console=ttyS0",
            "a serial console is added"
        );
        assert_eq!(boot.choose(Some("Debian GNU/Linux")).unwrap(), 0);
        let e = boot.choose(Some("Windows")).unwrap_err().to_string();
        assert!(
            e.contains("'Windows'") && e.contains("--list-boot-entries"),
            "{e}"
        );
    }
}

#[test]
fn bls_entries_on_a_boot_partition_with_kernelopts() {
    let dir = tempfile::tempdir().unwrap();
    let boot = ext4(
        dir.path(),
        "boot",
        8,
        &[
            (
                "/loader/entries/m-6.5.0.conf",
                "title Old\nversion 6.5.0\nlinux /vmlinuz-6.5.0\ninitrd /initramfs-6.5.0.img\n\
                 options $kernelopts\n",
            ),
            (
                "/loader/entries/m-6.10.0.conf",
                "title New\nversion 6.10.0\nlinux /vmlinuz-6.10.0\n\
                 initrd /initramfs-6.10.0.img /early.img\noptions $kernelopts quiet\n",
            ),
            (
                "/grub2/grubenv",
                "# GRUB Environment Block\nkernelopts=root=UUID=r ro\n",
            ),
            ("/vmlinuz-6.10.0", "K610"),
            ("/initramfs-6.10.0.img", "I610"),
            ("/early.img", "+EARLY"),
            ("/vmlinuz-6.5.0", "K65"),
        ],
    );
    let root = ext4(dir.path(), "root", 8, &[("/etc/hostname", "f\n")]);
    let disk = gpt_disk(dir.path(), &[boot, root]);
    let boot = open(&disk).unwrap();
    assert_eq!(boot.describe(), "/loader/entries/*.conf on partition 1");
    let titles: Vec<&str> = boot
        .found
        .menu
        .entries
        .iter()
        .map(|e| e.title.as_str())
        .collect();
    assert_eq!(titles, ["New", "Old"]);
    let loaded = boot.load(boot.choose(None).unwrap()).unwrap();
    assert_eq!(loaded.kernel, b"K610");
    assert_eq!(
        loaded.initrd.as_deref(),
        Some(&b"I610+EARLY"[..]),
        "initrds are loaded one after the other"
    );
    assert_eq!(loaded.cmdline, "root=UUID=r ro quiet console=ttyS0");
    // The old entry names an initrd the image does not have: an error naming it.
    let e = boot
        .load(boot.choose(Some("Old")).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("'Old'") && e.contains("/initramfs-6.5.0.img"),
        "{e}"
    );
}

#[test]
fn extlinux_on_an_mbr_image_and_the_debian_links_as_a_last_resort() {
    let dir = tempfile::tempdir().unwrap();
    let fs = ext4(
        dir.path(),
        "root",
        8,
        &[
            (
                "/boot/extlinux/extlinux.conf",
                "DEFAULT linux\nLABEL linux\n  KERNEL ../vmlinuz-x\n  APPEND root=/dev/vda1 \
                 console=ttyS0,115200\n",
            ),
            ("/boot/vmlinuz-x", "KX"),
        ],
    );
    let disk = mbr_disk(dir.path(), &[fs]);
    let boot = open(&disk).unwrap();
    assert_eq!(
        boot.describe(),
        "/boot/extlinux/extlinux.conf on partition 1"
    );
    let loaded = boot.load(0).unwrap();
    assert_eq!(loaded.kernel, b"KX", "../ is resolved by the file system");
    assert_eq!(loaded.initrd, None);
    assert_eq!(loaded.cmdline, "root=/dev/vda1 console=ttyS0,115200");

    let dir = tempfile::tempdir().unwrap();
    let fs = ext4(
        dir.path(),
        "root",
        8,
        &[
            ("/vmlinuz", "->boot/vmlinuz-6.1"),
            ("/initrd.img", "->boot/initrd.img-6.1"),
            ("/boot/vmlinuz-6.1", "K61"),
            ("/boot/initrd.img-6.1", "I61"),
        ],
    );
    let disk = mbr_disk(dir.path(), &[fs]);
    let boot = open(&disk).unwrap();
    let loaded = boot.load(0).unwrap();
    assert_eq!(loaded.kernel, b"K61");
    assert_eq!(loaded.initrd.as_deref(), Some(&b"I61"[..]));
    assert_eq!(
        loaded.cmdline, "root=PARTUUID=1234abcd-01 ro console=ttyS0",
        "the partition the links are on is the root"
    );
}

#[test]
fn bad_images_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A file system on the whole disk, no partition table.
    let whole = d.join("whole.raw");
    std::fs::write(&whole, debian_root(d)).unwrap();
    assert!(
        error(&whole).contains("no partition table"),
        "{}",
        error(&whole)
    );

    // A GPT whose entries were changed after their CRC was written.
    let disk = gpt_disk(d, &[debian_root(d)]);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[1024 + 33] ^= 1;
    std::fs::write(&disk, &bytes).unwrap();
    let e = error(&disk);
    assert!(e.contains("GPT") && e.contains("CRC-32"), "{e}");

    // An MBR partition past the disk's end.
    let disk = mbr_disk(d, &[debian_root(d)]);
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&disk, &bytes).unwrap();
    let e = error(&disk);
    assert!(e.contains("not within the disk"), "{e}");

    // An XFS /boot (its magic only) and nothing else.
    let mut xfs = vec![0u8; 4 * MIB as usize];
    xfs[0..4].copy_from_slice(b"XFSB");
    let disk = gpt_disk(d, &[xfs]);
    let e = error(&disk);
    assert!(e.contains("XFS"), "{e}");

    // A file system with no menu and no kernel.
    let disk = gpt_disk(d, &[ext4(d, "empty", 8, &[("/etc/hostname", "x\n")])]);
    let e = error(&disk);
    assert!(e.contains("no boot entry") && e.contains("grub.cfg"), "{e}");

    // A grub.cfg naming a kernel the image does not have.
    let fs = ext4(d, "nokernel", 8, &[("/boot/grub/grub.cfg", DEBIAN_GRUB)]);
    let disk = gpt_disk(d, &[fs]);
    let boot = open(&disk).unwrap();
    let e = boot.load(0).err().unwrap().to_string();
    assert!(
        e.contains("'Debian GNU/Linux'") && e.contains("/boot/vmlinuz-6.1.0-9-cloud-amd64"),
        "{e}"
    );

    // A corrupt superblock (its block count zeroed) on an ext4 partition.
    let mut fs = debian_root(d);
    fs[1024 + 4..1024 + 8].fill(0);
    let disk = gpt_disk(d, &[fs]);
    let e = error(&disk);
    assert!(e.contains("partition 1: corrupt file system"), "{e}");
}

#[test]
fn every_truncation_and_many_flipped_bytes_of_an_image_give_an_error_or_a_menu() {
    // The partition table and file system paths against malformed input: no panic, no
    // hang.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(gpt_disk(d, &[debian_root(d)])).unwrap();
    let path = d.join("bad.raw");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..200 {
        let mut bytes = good.clone();
        // Flip bytes in the tables and the first blocks of the file system, where its
        // metadata is.
        for _ in 0..(1 + round % 8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = if seed.is_multiple_of(2) {
                (seed >> 8) as usize % (34 * SECTOR as usize)
            } else {
                MIB as usize + (seed >> 8) as usize % (256 << 10)
            };
            bytes[at] ^= (seed >> 40) as u8 | 1;
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(boot) = open(&path) {
            if let Ok(i) = boot.choose(None) {
                let _ = boot.load(i);
            }
        }
    }
}

/// A one-partition MBR disk in its own directory under `dir` whose `/vmlinuz` link names a
/// kernel file holding `kernel`.
fn linked_kernel_disk(dir: &Path, name: &str, kernel: &str) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir(&sub).unwrap();
    let fs = ext4(
        &sub,
        "root",
        8,
        &[
            ("/vmlinuz", "->boot/vmlinuz-1"),
            ("/boot/vmlinuz-1", kernel),
        ],
    );
    mbr_disk(&sub, &[fs])
}

#[test]
fn a_disk_boot_tries_the_disks_with_a_boot_order_lowest_first_and_no_others() {
    use crate::config::{ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, VmConfig};
    use std::io::Read;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.raw");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let a = linked_kernel_disk(dir.path(), "a", "KERNEL-A");
    let b = linked_kernel_disk(dir.path(), "b", "KERNEL-B");
    let disk = |path: &Path, boot_order: Option<u32>| DiskConfig {
        path: path.to_owned(),
        format: Some("raw".into()),
        readonly: true,
        boot_order,
        ..Default::default()
    };
    let config = |disks: Vec<DiskConfig>| VmConfig {
        payload: crate::config::PayloadConfig {
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            boot_entry: None,
        },
        cpus: CpusConfig::new(1),
        memory: MemoryConfig::new(256 << 20),
        serial: ConsoleConfig::Tty,
        disks,
        net: Vec::new(),
        rng: None,
        console: None,
        platform: None,
    };
    let booted = |c: &VmConfig| -> Result<Vec<u8>, String> {
        c.validate().map_err(|e| e.to_string())?;
        let mut payload = resolve(c).map_err(|e| e.to_string())?;
        let mut kernel = Vec::new();
        payload.kernel.read_to_end(&mut kernel).unwrap();
        Ok(kernel)
    };

    // No boot order: the first disk with a menu, past a data disk.
    let c = config(vec![disk(&data, None), disk(&a, None), disk(&b, None)]);
    assert_eq!(booted(&c).unwrap(), b"KERNEL-A");
    // The lowest boot order wins, wherever its disk is.
    let c = config(vec![
        disk(&data, None),
        disk(&a, Some(2)),
        disk(&b, Some(1)),
    ]);
    assert_eq!(booted(&c).unwrap(), b"KERNEL-B");
    let menus = list(&c).unwrap();
    assert!(
        menus.find("b/disk.raw").unwrap() < menus.find("a/disk.raw").unwrap()
            && !menus.contains("data.raw"),
        "{menus}"
    );
    // Only disks with a boot order are tried.
    let c = config(vec![disk(&data, Some(1)), disk(&a, None)]);
    let e = booted(&c).unwrap_err();
    assert!(e.contains("data.raw"), "{e}");
    // A boot order is 1 or more, and one disk's.
    let c = config(vec![disk(&a, Some(0))]);
    let e = booted(&c).unwrap_err();
    assert!(e.contains("boot_order 0: must be 1 or more"), "{e}");
    let c = config(vec![disk(&a, Some(3)), disk(&b, Some(3))]);
    let e = booted(&c).unwrap_err();
    assert!(e.contains("boot_order 3: another disk has it too"), "{e}");
}
