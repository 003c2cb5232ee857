//! Errors: hostile images, format mismatches, read-only images and out-of-range requests.

use std::fs;

use super::*;

#[test]
fn hostile_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = sample_image(dir.path(), "h.qcow2");
    let l1_offset = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let reftable_offset = u64::from_be_bytes(good[48..56].try_into().unwrap()) as usize;
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, &str)> = vec![
        (
            "cluster_bits 40",
            Box::new(|b| put_be(b, 20, &40u32.to_be_bytes())),
            "cluster_bits 40",
        ),
        (
            "huge l1_size",
            Box::new(|b| put_be(b, 36, &0x0fff_ffffu32.to_be_bytes())),
            "l1_size",
        ),
        (
            "L1 beyond EOF",
            Box::new(|b| put_be(b, 40, &(1u64 << 40).to_be_bytes())),
            "beyond the end",
        ),
        (
            "misaligned refcount table",
            Box::new(|b| put_be(b, 48, &0x10200u64.to_be_bytes())),
            "not a cluster boundary",
        ),
        (
            "huge refcount table",
            Box::new(|b| put_be(b, 56, &0x00ff_ffffu32.to_be_bytes())),
            "refcount table",
        ),
        ("truncated", Box::new(|b| b.truncate(50)), "only 50 bytes"),
        (
            "dirty bit",
            Box::new(|b| put_be(b, 72, &1u64.to_be_bytes())),
            "dirty bit",
        ),
        (
            "version 1",
            Box::new(|b| put_be(b, 4, &1u32.to_be_bytes())),
            "qcow version 1",
        ),
        (
            "L2 table beyond EOF",
            Box::new(move |b| put_be(b, l1_offset, &((1u64 << 63) | (1u64 << 40)).to_be_bytes())),
            "beyond the end of the file",
        ),
        (
            "unaligned L2 table",
            Box::new(move |b| put_be(b, l1_offset, &0x10200u64.to_be_bytes())),
            "unaligned",
        ),
    ];
    for (what, patch, expected) in cases {
        let mut bytes = good.clone();
        patch(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        let result = open_disk(&path, rw()).and_then(|mut d| {
            let mut buf = vec![0u8; 4096];
            d.read_at(&mut buf, 0)?;
            d.write_at(&buf, 0)
        });
        let err = result.err().unwrap_or_else(|| panic!("{what}: opened"));
        assert!(err.to_string().contains(expected), "{what}: {err}");
    }

    // Refcount block pointing past the end of the file: reading works, allocating fails.
    let mut bytes = good.clone();
    put_be(&mut bytes, reftable_offset, &(1u64 << 40).to_be_bytes());
    fs::write(&path, &bytes).unwrap();
    let mut disk = open_disk(&path, rw()).unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    let err = disk.write_at(&buf, 2 * MIB).unwrap_err();
    assert!(err.to_string().contains("refcount block"), "{err}");
}

#[test]
fn format_given_probed_and_mismatched() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    fs::write(&raw, vec![0u8; 65536]).unwrap();
    let qcow = dir.path().join("disk.qcow2");
    create(&qcow, "", MIB);

    let err = open_disk(
        &raw,
        DiskOptions {
            format: Some(Format::Qcow2),
            ..rw()
        },
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "'{}' is a raw image but format=qcow2 was given",
            raw.display()
        )
    );

    // An explicit raw format wins over the contents.
    let disk = open_disk(
        &qcow,
        DiskOptions {
            format: Some(Format::Raw),
            ..ro()
        },
    )
    .unwrap();
    assert_eq!(disk.format(), Format::Raw);
    assert_eq!(disk.size(), fs::metadata(&qcow).unwrap().len());
    assert_eq!(probe_format(&qcow).unwrap(), Format::Qcow2);
    assert_eq!(probe_format(&raw).unwrap(), Format::Raw);

    // A probed raw image refuses to become a qcow2 image...
    let mut disk = open_disk(&raw, rw()).unwrap();
    assert_eq!(disk.format(), Format::Raw);
    let err = disk.write_at(b"QFI\xfb\0\0\0\x03", 0).unwrap_err();
    assert!(
        matches!(err, BlockError::ProbedRawSignature { .. }),
        "{err}"
    );
    disk.write_at(b"FI\xfb", 1).unwrap();
    assert!(matches!(
        disk.write_at(b"Q", 0),
        Err(BlockError::ProbedRawSignature { .. })
    ));
    disk.write_at(b"QFI\xfa", 0).unwrap();
    drop(disk);
    // ... unless the format is given.
    let mut disk = open_disk(
        &raw,
        DiskOptions {
            format: Some(Format::Raw),
            ..rw()
        },
    )
    .unwrap();
    disk.write_at(b"QFI\xfb\0\0\0\x03", 0).unwrap();
    drop(disk);
    // Now the bytes say qcow2, but the explicit format still reads it as raw.
    let mut disk = open_disk(
        &raw,
        DiskOptions {
            format: Some(Format::Raw),
            ..ro()
        },
    )
    .unwrap();
    let mut head = [0u8; 4];
    disk.read_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"QFI\xfb");
}

#[test]
fn read_only_and_out_of_range_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_image(dir.path(), "ro.qcow2");
    let raw = dir.path().join("ro.raw");
    fs::write(&raw, vec![1u8; 8192]).unwrap();
    for p in [&path, &raw] {
        let before = fs::read(p).unwrap();
        let mut disk = open_disk(p, ro()).unwrap();
        assert!(disk.is_read_only());
        assert!(matches!(
            disk.write_at(&[1], 0),
            Err(BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            disk.write_zeroes(0, 512, true),
            Err(BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            disk.discard(0, 512),
            Err(BlockError::ReadOnly { .. })
        ));
        disk.flush().unwrap();
        let size = disk.size();
        let mut buf = [0u8; 16];
        assert!(matches!(
            disk.read_at(&mut buf, size - 8),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(&mut buf, u64::MAX - 4),
            Err(BlockError::OutOfRange { .. })
        ));
        disk.read_at(&mut buf, size - 16).unwrap();
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        disk.read_vectored_at(&mut [&mut a, &mut b], 0).unwrap();
        drop(disk);
        assert!(fs::read(p).unwrap() == before);

        let mut disk = open_disk(p, rw()).unwrap();
        let size = disk.size();
        assert!(matches!(
            disk.write_at(&[1, 2], size - 1),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_zeroes(size, 1, false),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_vectored_at(&[&[1], &[2, 3]], size - 2),
            Err(BlockError::OutOfRange { .. })
        ));
        disk.write_vectored_at(&[&[1], &[2, 3]], size - 3).unwrap();
        let mut tail = [0u8; 3];
        disk.read_at(&mut tail, size - 3).unwrap();
        assert_eq!(tail, [1, 2, 3]);
    }
}

/// Issue 15, item 4: an image written by one opener cannot be opened by another (two VMs,
/// or the same image given twice), as QEMU's image locking; readers share.
#[test]
fn an_image_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    fs::write(&path, vec![0u8; 65536]).unwrap();
    let writer = open_disk(&path, rw()).unwrap();
    for options in [rw(), ro()] {
        let err = open_disk(&path, options).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "'{}': in use: another process writes it",
                path.display()
            )),
            "{err}"
        );
    }
    drop(writer);
    let reader = open_disk(&path, ro()).unwrap();
    let second_reader = open_disk(&path, ro()).unwrap();
    let err = open_disk(&path, rw()).err().unwrap().to_string();
    assert!(err.contains("in use: another process reads it"), "{err}");
    drop((reader, second_reader));
    open_disk(&path, rw()).unwrap();

    // A backing file is only read: two overlays over one base each lock their own file.
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0u8; 65536]).unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for overlay in [&a, &b] {
        crate::block::qcow2::create::create(overlay, 65536, Some((&base, Format::Raw)), 0o600)
            .unwrap();
    }
    let _a = open_disk(&a, rw()).unwrap();
    let _b = open_disk(&b, rw()).unwrap();
    let err = open_disk(&base, rw()).err().unwrap().to_string();
    assert!(err.contains("in use: another process reads it"), "{err}");
}

#[test]
fn an_unlinked_image_opens_through_proc_self_fd() {
    // A disk built in memory (the --cloud-init seed) is an unlinked file the VM reaches
    // through /proc/self/fd/N, which has no name to canonicalize to.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.raw");
    fs::write(&path, vec![0x5a; 4096]).unwrap();
    let file = fs::File::open(&path).unwrap();
    fs::remove_file(&path).unwrap();
    let by_fd = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ));
    let options = DiskOptions {
        format: Some(Format::Raw),
        read_only: true,
        ..DiskOptions::default()
    };
    let mut disk = open_disk(&by_fd, options).unwrap();
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 1024).unwrap();
    assert_eq!(buf, [0x5a; 512]);
    // A name that is not there at all is still an error.
    let options = DiskOptions {
        read_only: true,
        ..DiskOptions::default()
    };
    assert!(open_disk(&dir.path().join("missing.raw"), options).is_err());
}
