//! Backing chains: read-through, copy-up, probing, loops and missing files.

use std::fs;

use super::*;

#[test]
fn backing_chain_raw_qcow2_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut rng = Rng(99);
    fs::write(&base, rng.bytes((3 * MIB) as usize)).unwrap();
    // Relative backing names, resolved against the overlay's directory.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    qemu_io(
        &mid,
        &[
            "write -P 0x44 8192 10000".into(),
            "write -z 1048576 65536".into(),
        ],
    );
    // The top is larger than its backing file: the rest reads as zeros.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ],
    );
    let (base_before, mid_before) = (sha(&base), sha(&mid));

    let mut model = qemu_read(&top, &[]);
    let mut disk = open_disk(&top, rw()).unwrap();
    assert_eq!(disk.size(), 4 * MIB);
    assert!(read_all(disk.as_mut()) == model);
    // Partial-cluster writes copy the rest of the cluster from the backing chain.
    random_ops(
        disk.as_mut(),
        &mut model,
        &mut rng,
        80,
        100 * KIB,
        Discard::WholeClusters(65536),
    );
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);

    assert!(sha(&base) == base_before, "base image changed");
    assert!(sha(&mid) == mid_before, "middle image changed");
    assert_clean(&top);
    assert_same(&top, &model);
}

#[test]
fn backing_format_is_probed_when_the_header_does_not_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, "", MIB);
    qemu_io(&base, &["write -P 0x55 0 4096".into()]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    // Hide the backing-format extension by renaming it to an unknown type.
    let mut bytes = fs::read(&top).unwrap();
    let pos = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[pos..pos + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    fs::write(&top, bytes).unwrap();
    let mut disk = open_disk(&top, ro()).unwrap();
    let mut buf = [0u8; 8];
    disk.read_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [0x55; 8]);
}

#[test]
fn backing_loops_and_missing_backing_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create(&a, "", MIB);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
            "1M",
        ],
    );
    run_ok(
        "qemu-img",
        &["rebase", "-q", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)],
    );
    let err = open_disk(&a, rw())
        .err()
        .expect("a loop must not open")
        .to_string();
    let expected = format!(
        "backing chain loop: {} -> {} -> {}",
        a.display(),
        b.display(),
        a.display()
    );
    assert_eq!(err, expected);

    // An image that is its own backing file.
    run_ok(
        "qemu-img",
        &["rebase", "-q", "-u", "-b", "a.qcow2", "-F", "qcow2", s(&a)],
    );
    let err = open_disk(&a, ro()).err().unwrap().to_string();
    assert!(err.starts_with("backing chain loop:"), "{err}");

    let c = dir.path().join("c.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.raw",
            "-F",
            "raw",
            s(&c),
            "1M",
        ],
    );
    let err = open_disk(&c, ro()).err().unwrap().to_string();
    assert!(
        err.contains("cannot open backing file") && err.contains("missing.raw"),
        "{err}"
    );

    // An unknown backing format.
    run_ok(
        "qemu-img",
        &["rebase", "-q", "-u", "-b", "a.qcow2", "-F", "vmdk", s(&c)],
    );
    let err = open_disk(&c, ro()).err().unwrap().to_string();
    assert!(err.contains("unsupported image format 'vmdk'"), "{err}");
}

/// A live migration's destination opens the disk while the source still writes it, and reads
/// the metadata again once the source has flushed: it must then see the source's new
/// clusters, and keep reading through the backing file it already opened.
#[test]
fn reload_sees_what_another_writer_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    fs::write(&base, vec![0x11u8; (2 * MIB) as usize]).unwrap();
    // Relative backing name, resolved against the overlay's directory.
    create(
        &top,
        "cluster_size=65536,backing_file=base.raw,backing_fmt=raw",
        2 * MIB,
    );
    // As in a live migration: the source runs the VM, shares the image while the destination
    // opens it, lets go once it has flushed, and the destination takes the image over.
    let mut source = open_disk(&top, rw()).unwrap();
    let source_lock = source.image_lock().unwrap();
    source_lock.set(LockMode::Standby).unwrap();
    let standby = DiskOptions {
        standby: true,
        ..rw()
    };
    let mut destination = open_disk(&top, standby).unwrap();
    let destination_lock = destination.image_lock().unwrap();
    // Neither may write it alone yet.
    assert!(destination_lock.set(LockMode::Active).is_err());
    // New clusters (a new L2 table and refcounts), beyond what the destination has read.
    source.write_at(&[0x22u8; 4096], MIB).unwrap();
    source.write_at(&[0x33u8; 512], 4096).unwrap();
    source.flush().unwrap();
    source_lock.set(LockMode::Released).unwrap();

    let mut buf = [0u8; 4096];
    destination.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf[0], 0x11, "without a reload the old tables are used");
    destination.reload().unwrap();
    destination_lock.set(LockMode::Active).unwrap();
    // The source cannot take it back now.
    assert!(source_lock.set(LockMode::Standby).is_err());
    destination.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    destination.read_at(&mut buf, 4096).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x33));
    assert!(
        buf[512..].iter().all(|&b| b == 0x11),
        "through the backing file"
    );
    drop(source);

    // The destination goes on writing where the source stopped, without corrupting it.
    destination.write_at(&[0x44u8; 4096], MIB + 65536).unwrap();
    destination.flush().unwrap();
    // A lock lives as long as any handle on the open file: the lock's own, too.
    drop((destination, destination_lock, source_lock));
    assert_clean(&top);
    let guest = qemu_read(&top, &[]);
    assert!(guest[MIB as usize..][..4096].iter().all(|&b| b == 0x22));
    assert!(guest[(MIB + 65536) as usize..][..4096]
        .iter()
        .all(|&b| b == 0x44));

    // An image with changes of its own not yet written refuses to forget them.
    let mut disk = open_disk(&top, rw()).unwrap();
    disk.write_at(&[0x55u8; 4096], 3 * MIB / 2).unwrap();
    let err = disk.reload().unwrap_err().to_string();
    assert!(err.contains("not written"), "{err}");
    disk.flush().unwrap();
    disk.reload().unwrap();

    // A raw image reads its size again.
    let raw = dir.path().join("grows.raw");
    fs::write(&raw, vec![0u8; 4096]).unwrap();
    let mut disk = open_disk(&raw, rw()).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(8192)
        .unwrap();
    assert_eq!(disk.size(), 4096);
    disk.reload().unwrap();
    assert_eq!(disk.size(), 8192);
}

/// An overlay over `backing` (as named in its header: absolute or relative) at `path`.
fn overlay(path: &Path, backing: &Path, format: Format) {
    crate::block::qcow2::create::create(path, 2 * MIB, Some((backing, format)), 0o600).unwrap();
}

fn with_backing(backing_files: BackingFiles) -> DiskOptions {
    DiskOptions {
        backing_files,
        read_only: true,
        ..DiskOptions::default()
    }
}

#[test]
fn backing_files_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0x5a; MIB as usize]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, &base, Format::Raw);

    let err = open_disk(&top, DiskOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        format!(
            "'{}': backing file '{}' refused: backing files are off for this disk \
             (backing_files=on allows regular files, backing_files=PATH only those under PATH)",
            top.display(),
            base.display()
        )
    );
    for allowed in [
        BackingFiles::Any,
        BackingFiles::Under(dir.path().to_path_buf()),
        BackingFiles::Under(base.clone()),
    ] {
        let mut disk = open_disk(&top, with_backing(allowed.clone())).unwrap();
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0x5a; 4], "{allowed:?}");
    }
    // Allowed under another directory, or another file: refused.
    let other = tempfile::tempdir().unwrap();
    let err = open_disk(&top, with_backing(BackingFiles::Under(other.path().into())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("refused") && err.contains("is not under backing_files="),
        "{err}"
    );
    let err = open_disk(&top, with_backing(BackingFiles::Under(top.clone())))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is not under backing_files="), "{err}");
}

#[test]
fn a_backing_file_cannot_reach_host_files_or_devices() {
    let dir = tempfile::tempdir().unwrap();
    let under = BackingFiles::Under(dir.path().to_path_buf());
    // A host secret named directly, or through a link inside the allowed directory.
    let secret = Path::new("/etc/passwd");
    let top = dir.path().join("top.qcow2");
    overlay(&top, secret, Format::Raw);
    for policy in [BackingFiles::Refused, under.clone()] {
        let err = open_disk(&top, with_backing(policy))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("backing file '/etc/passwd' refused"), "{err}");
    }
    std::os::unix::fs::symlink(secret, dir.path().join("link")).unwrap();
    let linked = dir.path().join("linked.qcow2");
    overlay(&linked, Path::new("link"), Format::Raw);
    let err = open_disk(&linked, with_backing(under.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("/etc/passwd is not under backing_files="),
        "{err}"
    );
    // A device is never a backing file, even when every regular file is allowed.
    let device = dir.path().join("device.qcow2");
    overlay(&device, Path::new("/dev/zero"), Format::Raw);
    let err = open_disk(&device, with_backing(BackingFiles::Any))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("'/dev/zero' refused: not a regular file"),
        "{err}"
    );
    // Nor is a directory.
    let folder = dir.path().join("folder.qcow2");
    overlay(&folder, dir.path(), Format::Raw);
    let err = open_disk(&folder, with_backing(BackingFiles::Any))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("refused: not a regular file"), "{err}");
}

#[test]
fn a_backing_chain_is_at_most_sixteen_files_deep() {
    let dir = tempfile::tempdir().unwrap();
    let mut below = dir.path().join("0.raw");
    fs::write(&below, vec![1u8; 4096]).unwrap();
    let mut layers = Vec::new();
    for n in 1..=MAX_BACKING_FILES + 1 {
        let path = dir.path().join(format!("{n}.qcow2"));
        let format = if n == 1 { Format::Raw } else { Format::Qcow2 };
        overlay(&path, &below, format);
        layers.push(path.clone());
        below = path;
    }
    // The 16th layer has 16 files below it; the 17th has 17.
    let deepest_allowed = &layers[MAX_BACKING_FILES - 1];
    let mut disk = open_disk(deepest_allowed, with_backing(BackingFiles::Any)).unwrap();
    let mut buf = [0u8; 1];
    disk.read_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [1]);
    let err = open_disk(&layers[MAX_BACKING_FILES], with_backing(BackingFiles::Any))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("the backing chain is deeper than 16 files"),
        "{err}"
    );
}
