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
