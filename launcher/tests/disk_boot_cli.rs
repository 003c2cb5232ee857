//! `podvisor run` without `--kernel`, as a user runs it: `--list-boot-entries` shows a disk
//! image's boot menu; an image podvisor cannot boot is one clear line (before any guest
//! runs); `--cloud-init` leaves nothing behind.

use std::process::Command;

fn podvisor(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// An MBR disk with one ext4 partition (`mkfs.ext4 -d`) holding a grub.cfg of two entries.
fn grub_disk(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        "set default=\"1\"\n\
         menuentry 'Linux 6.1' {\n\tlinux /boot/vmlinuz-6.1 root=/dev/vda1 ro\n}\n\
         menuentry 'Linux 6.2' {\n\tlinux /boot/vmlinuz-6.2 root=/dev/vda1 ro quiet\n}\n",
    )
    .unwrap();
    let fs = dir.join("fs.ext4");
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg("8M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs; scripts/test-all.sh installs it)");
    assert!(made.success());
    let fs = std::fs::read(fs).unwrap();
    let mut disk = vec![0u8; 1 << 20];
    disk[446 + 4] = 0x83;
    disk[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&((fs.len() / 512) as u32).to_le_bytes());
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    disk.extend(fs);
    let path = dir.join("disk.raw");
    std::fs::write(&path, disk).unwrap();
    path
}

#[test]
fn list_boot_entries_shows_the_menu_and_a_bad_image_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = grub_disk(dir.path());
    let arg = format!("path={},format=raw", disk.display());
    let (code, out, err) = podvisor(&["run", "--list-boot-entries", "--disk", &arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{}: /boot/grub/grub.cfg on partition 1\n  \
             0  Linux 6.1\n      /boot/vmlinuz-6.1 root=/dev/vda1 ro console=ttyS0\n  \
             1* Linux 6.2\n      /boot/vmlinuz-6.2 root=/dev/vda1 ro quiet console=ttyS0\n",
            disk.display()
        )
    );

    let blank = dir.path().join("blank.raw");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let arg = format!("path={},format=raw", blank.display());
    let (code, out, err) = podvisor(&["run", "--list-boot-entries", "--disk", &arg]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("blank.raw") && err.contains("no partition table"),
        "{err}"
    );
    let (code, _, err) = podvisor(&["run", "--list-boot-entries"]);
    assert_eq!(code, 1);
    assert!(err.contains("no --disk"), "{err}");
}

#[test]
fn a_boot_that_fails_says_why_in_one_line_and_leaves_no_seed_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = grub_disk(dir.path());
    let user_data = dir.path().join("user-data");
    std::fs::write(&user_data, "#cloud-config\n").unwrap();
    let seeds = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("podvisor-cidata-")
            })
            .count()
    };
    let before = seeds();
    // The seed disk (no partition table) is passed over; the grub disk's default entry
    // names a kernel its file system does not have.
    let (code, _, err) = podvisor(&[
        "run",
        "--pvm-guest",
        "--serial",
        "off",
        "--disk",
        &format!("path={},format=raw", disk.display()),
        "--cloud-init",
        &format!("user-data={}", user_data.display()),
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("boot entry 'Linux 6.2'") && err.contains("/boot/vmlinuz-6.2"),
        "{err}"
    );
    assert_eq!(
        seeds(),
        before,
        "a seed disk was left in the temporary folder"
    );
    let (code, _, err) = podvisor(&[
        "run",
        "--disk",
        &format!("path={}", disk.display()),
        "--cloud-init",
        "user-data=/nonexistent/ud",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent/ud"), "{err}");
}
