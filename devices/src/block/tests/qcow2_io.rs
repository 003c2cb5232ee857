//! Reading and writing qcow2 images of every layout; compressed and zero clusters, snapshots,
//! refcount-table growth, crash consistency, O_DIRECT.

use std::fs;

use super::*;

#[test]
fn reads_match_qemu_for_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    for &(cluster, compat, refbits) in LAYOUTS {
        let path = dir
            .path()
            .join(format!("r-{cluster}-{compat}-{refbits}.qcow2"));
        create(&path, &layout_opts(cluster, compat, refbits), ODD_SIZE);
        populate(&path, cluster, compat == "1.1");
        let expected = qemu_read(&path, &[]);
        let mut disk = open_disk(&path, ro()).unwrap();
        assert_eq!(disk.format(), Format::Qcow2);
        assert_eq!(disk.size(), ODD_SIZE);
        assert!(read_all(disk.as_mut()) == expected, "{}", path.display());
        // Unaligned reads across cluster boundaries.
        let mut rng = Rng(cluster ^ 0x5eed);
        for _ in 0..50 {
            let off = rng.below(ODD_SIZE);
            let len = 1 + rng.below((200 * KIB).min(ODD_SIZE - off));
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, off).unwrap();
            assert!(buf[..] == expected[off as usize..(off + len) as usize]);
        }
    }
}

#[test]
fn random_writes_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for &(cluster, compat, refbits) in LAYOUTS {
        let path = dir
            .path()
            .join(format!("w-{cluster}-{compat}-{refbits}.qcow2"));
        create(&path, &layout_opts(cluster, compat, refbits), ODD_SIZE);
        populate(&path, cluster, compat == "1.1");
        let mut model = qemu_read(&path, &[]);
        let mut rng = Rng(cluster * 31 + u64::from(refbits));
        let ops = if cluster >= MIB { 15 } else { 60 };
        {
            let mut disk = open_disk(&path, rw()).unwrap();
            random_ops(
                disk.as_mut(),
                &mut model,
                &mut rng,
                ops,
                150 * KIB,
                Discard::WholeClusters(cluster),
            );
            // Reads see the writes before any flush...
            assert!(read_all(disk.as_mut()) == model, "{}", path.display());
            disk.flush().unwrap();
            random_ops(
                disk.as_mut(),
                &mut model,
                &mut rng,
                ops / 3,
                20 * KIB,
                Discard::WholeClusters(cluster),
            );
            // ... and the close flushes the rest.
        }
        assert_clean(&path);
        assert_same(&path, &model);
    }
}

#[test]
fn refcount_table_grows_and_moves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and the
    // initial one-cluster table 2 MiB, so writing 6 MiB must grow the table (twice).
    create(&path, "cluster_size=512,refcount_bits=64", 8 * MIB);
    let before = fs::read(&path).unwrap()[48..60].to_vec();
    let mut model = vec![0u8; (8 * MIB) as usize];
    let mut rng = Rng(7);
    {
        let mut disk = open_disk(&path, rw()).unwrap();
        let data = rng.bytes((6 * MIB) as usize);
        disk.write_at(&data, MIB).unwrap();
        model[MIB as usize..(7 * MIB) as usize].copy_from_slice(&data);
        random_ops(
            disk.as_mut(),
            &mut model,
            &mut rng,
            40,
            64 * KIB,
            Discard::WholeClusters(512),
        );
    }
    assert_ne!(
        fs::read(&path).unwrap()[48..60],
        before[..],
        "the refcount table did not move"
    );
    assert_clean(&path);
    assert_same(&path, &model);
}

#[test]
fn compressed_clusters_read_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut rng = Rng(3);
    let mut data = vec![0u8; (2 * MIB) as usize];
    for chunk in data.chunks_mut(4096) {
        let v = rng.next() as u8;
        chunk.fill(v);
        chunk[7] = 1;
    }
    fs::write(&src, &data).unwrap();
    for kind in ["zlib", "zstd"] {
        for cluster in ["4096", "65536"] {
            let img = dir.path().join(format!("c-{kind}-{cluster}.qcow2"));
            let opts = format!("compression_type={kind},cluster_size={cluster}");
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &opts,
                    s(&src),
                    s(&img),
                ],
            );
            let mut model = data.clone();
            let mut disk = open_disk(&img, rw()).unwrap();
            assert!(read_all(disk.as_mut()) == model, "{}", img.display());
            let cs: u64 = cluster.parse().unwrap();
            random_ops(
                disk.as_mut(),
                &mut model,
                &mut rng,
                40,
                3 * cs,
                Discard::WholeClusters(cs),
            );
            assert!(read_all(disk.as_mut()) == model, "{}", img.display());
            drop(disk);
            assert_clean(&img);
            assert_same(&img, &model);
        }
    }
}

#[test]
fn zero_clusters_write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0xbb; MIB as usize]).unwrap();
    for compat in ["1.1", "0.10"] {
        for with_backing in [false, true] {
            let img = dir.path().join(format!("z-{compat}-{with_backing}.qcow2"));
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o"];
            let opts = format!("compat={compat},cluster_size=4096");
            args.push(&opts);
            if with_backing {
                args.extend(["-b", "base.raw", "-F", "raw"]);
            }
            args.extend([s(&img), "1M"]);
            run_ok("qemu-img", &args);
            qemu_io(&img, &["write -P 0x66 0 256k".into()]);
            if compat == "1.1" {
                qemu_io(
                    &img,
                    &["write -z 8192 8192".into(), "discard 16384 4096".into()],
                );
            }
            let mut model = qemu_read(&img, &[]);
            {
                let mut disk = open_disk(&img, rw()).unwrap();
                assert!(read_all(disk.as_mut()) == model);
                // Whole clusters (kept allocated or not), partial clusters, unallocated ones.
                for (off, len, unmap) in [
                    (0, 4096, false),
                    (4096, 4096, true),
                    (30000, 5000, true),
                    (512 * 1024, 8192, false),
                ] {
                    disk.write_zeroes(off, len, unmap).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                // Discard: whole clusters read as zeros except v2 images over a backing file,
                // whose clusters cannot be deallocated.
                disk.discard(65536, 3 * 4096 + 100).unwrap();
                if compat == "1.1" || !with_backing {
                    model[65536..65536 + 3 * 4096].fill(0);
                }
                assert!(read_all(disk.as_mut()) == model, "{}", img.display());
            }
            assert_clean(&img);
            assert_same(&img, &model);
        }
    }
}

#[test]
fn internal_snapshots_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    create(&img, "cluster_size=4096", 2 * MIB);
    qemu_io(&img, &["write -P 0x77 0 1M".into()]);
    run_ok("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
    let snapshot = qemu_read(&img, &[]);
    let mut model = snapshot.clone();
    {
        let mut disk = open_disk(&img, rw()).unwrap();
        random_ops(
            disk.as_mut(),
            &mut model,
            &mut Rng(11),
            60,
            64 * KIB,
            Discard::WholeClusters(4096),
        );
    }
    assert_clean(&img);
    assert_same(&img, &model);
    assert!(
        qemu_read(&img, &["-l", "snapshot.name=s1"]) == snapshot,
        "the snapshot changed"
    );
}

#[test]
fn a_crash_after_any_write_leaves_a_consistent_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    // Small clusters and 64-bit refcounts: a refcount block covers 32 KiB and the first table
    // 2 MiB, so the session creates many blocks and L2 tables and grows the table; caches of
    // two tables make every request evict (and so write back) metadata.
    create(&img, "cluster_size=512,refcount_bits=64", 4 * MIB);
    let table_before = fs::read(&img).unwrap()[48..60].to_vec();
    let snaps = dir.path().join("snaps");
    fs::create_dir(&snaps).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let mut model = vec![0u8; (4 * MIB) as usize];
    {
        let mut disk = open_qcow2_standalone(&img, false).unwrap();
        disk.shrink_caches(2).unwrap();
        let (src, dst, n) = (img.clone(), snaps.clone(), count.clone());
        disk.host_file_mut().set_write_hook(Box::new(move || {
            // What a process killed right after this write leaves behind.
            let i = n.fetch_add(1, Ordering::Relaxed);
            if i % 7 == 0 && i < 7 * 300 {
                fs::copy(&src, dst.join(format!("{i:05}.qcow2"))).unwrap();
            }
        }));
        let mut rng = Rng(5);
        let data = rng.bytes((2 * MIB + 300 * KIB) as usize);
        disk.write_at(&data, MIB).unwrap();
        model[MIB as usize..MIB as usize + data.len()].copy_from_slice(&data);
        random_ops(
            &mut disk,
            &mut model,
            &mut rng,
            30,
            20 * KIB,
            Discard::WholeClusters(512),
        );
        disk.flush().unwrap();
        random_ops(
            &mut disk,
            &mut model,
            &mut rng,
            30,
            40 * KIB,
            Discard::WholeClusters(512),
        );
    }
    assert!(count.load(Ordering::Relaxed) > 300, "{count:?} writes");
    assert_ne!(
        fs::read(&img).unwrap()[48..60],
        table_before[..],
        "no table growth"
    );
    for entry in fs::read_dir(&snaps).unwrap() {
        let path = entry.unwrap().path();
        let out = run("qemu-img", &["check", s(&path)]);
        // 0: clean; 3: leaked clusters only. 2 would be corruption.
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_clean(&img);
    assert_same(&img, &model);
}

#[test]
fn direct_io_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("direct.qcow2");
    let raw = dir.path().join("direct.raw");
    create(&img, "cluster_size=4096", 2 * MIB);
    fs::write(&raw, vec![0u8; (2 * MIB) as usize]).unwrap();
    let direct = DiskOptions {
        direct: true,
        ..DiskOptions::default()
    };
    let mut disk = match open_disk(&img, direct.clone()) {
        Ok(d) => d,
        Err(BlockError::DirectUnsupported { path }) => {
            eprintln!(
                "skipping: O_DIRECT unsupported on the filesystem of {}",
                path.display()
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut raw_disk = open_disk(
        &raw,
        DiskOptions {
            format: Some(Format::Raw),
            ..direct
        },
    )
    .unwrap();
    let mut model = vec![0u8; (2 * MIB) as usize];
    let mut model2 = model.clone();
    random_ops(
        disk.as_mut(),
        &mut model,
        &mut Rng(8),
        50,
        30 * KIB,
        Discard::WholeClusters(4096),
    );
    random_ops(
        raw_disk.as_mut(),
        &mut model2,
        &mut Rng(8),
        50,
        30 * KIB,
        Discard::Range,
    );
    assert!(read_all(disk.as_mut()) == model);
    assert!(read_all(raw_disk.as_mut()) == model2);
    drop((disk, raw_disk));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 2 * MIB);
    assert_clean(&img);
    assert_same(&img, &model);
}

/// Many random sessions over random layouts, backing files, snapshots and compressed
/// clusters, reopening the image between bursts. Slow: `cargo test -p devices -- --ignored`
/// (PODVISOR_BLOCK_STRESS=N sets the number of sessions, 30 by default).
#[test]
#[ignore]
fn stress_random_sessions() {
    let sessions: u64 = std::env::var("PODVISOR_BLOCK_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..sessions {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1));
        let &(cluster, compat, refbits) = &LAYOUTS[rng.below(LAYOUTS.len() as u64) as usize];
        let cluster = cluster.min(65536);
        let size = MIB + 512 * rng.below(2048);
        let img = dir.path().join(format!("s{seed}.qcow2"));
        let base = dir.path().join(format!("s{seed}.raw"));
        let mut opts = layout_opts(cluster, compat, refbits);
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        let kind = rng.below(4);
        if kind == 1 {
            fs::write(&base, rng.bytes(size as usize / 2)).unwrap();
            args.extend([
                "-b".into(),
                base.file_name().unwrap().to_str().unwrap().into(),
                "-F".into(),
                "raw".into(),
            ]);
        }
        if kind == 2 && compat == "1.1" && refbits > 1 {
            opts.push_str(",compression_type=zstd");
        }
        args.extend(["-o".into(), opts.clone(), s(&img).into(), size.to_string()]);
        if kind == 2 {
            let src = dir.path().join(format!("s{seed}.src"));
            let mut data = vec![0u8; size as usize];
            for chunk in data.chunks_mut(4096) {
                chunk.fill(rng.next() as u8);
            }
            fs::write(&src, data).unwrap();
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &opts,
                    s(&src),
                    s(&img),
                ],
            );
        } else {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_ok("qemu-img", &args);
        }
        qemu_io(&img, &["write -P 0x21 0 100k".into()]);
        if kind == 3 && refbits > 1 {
            run_ok("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
        }
        let snapshot =
            (kind == 3 && refbits > 1).then(|| qemu_read(&img, &["-l", "snapshot.name=s1"]));
        let mut model = qemu_read(&img, &[]);
        for burst in 0..3 {
            // One burst with two-table caches, so that metadata is evicted all the time.
            let mut disk: Box<dyn DiskImage> = if kind != 1 && burst == 1 {
                let mut q = open_qcow2_standalone(&img, false).unwrap();
                q.shrink_caches(2).unwrap();
                Box::new(q)
            } else {
                open_disk(&img, rw()).unwrap()
            };
            let max_len = [600, 20 * KIB, 200 * KIB][burst];
            let discard = if compat == "0.10" && kind == 1 {
                Discard::Ignored
            } else {
                Discard::WholeClusters(cluster)
            };
            random_ops(disk.as_mut(), &mut model, &mut rng, 80, max_len, discard);
            let got = read_all(disk.as_mut());
            if got != model {
                let first = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
                panic!("seed {seed} burst {burst} {opts} kind {kind} size {size}: first difference at {first:#x}");
            }
        }
        assert_clean(&img);
        assert_same(&img, &model);
        if let Some(snap) = snapshot {
            assert!(
                qemu_read(&img, &["-l", "snapshot.name=s1"]) == snap,
                "seed {seed}: snapshot"
            );
        }
        eprintln!("seed {seed}: {} {opts} kind {kind} ok", img.display());
    }
}

/// A guest that rewrites and discards the same data again and again without ever flushing
/// (issue 15, item 2): the freed clusters are reused, so the file stays near the size of
/// what the image holds, instead of growing by a cluster per round.
#[test]
fn freed_clusters_are_reused_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("churn.qcow2");
    create(&path, "cluster_size=65536", 64 * MIB);
    let mut model = vec![0u8; (64 * MIB) as usize];
    {
        let mut disk = open_disk(&path, rw()).unwrap();
        for round in 0..2000u64 {
            let at = (round % 7) * 64 * KIB;
            let data = vec![(round % 251) as u8 + 1; (64 * KIB) as usize];
            disk.write_at(&data, at).unwrap();
            model[at as usize..(at + 64 * KIB) as usize].copy_from_slice(&data);
            if round % 3 != 0 {
                disk.discard(at, 64 * KIB).unwrap();
                model[at as usize..(at + 64 * KIB) as usize].fill(0);
            }
        }
        let len = fs::metadata(&path).unwrap().len();
        // 2000 rounds without reuse: ~88 MiB. With it: the metadata, seven data clusters and
        // at most a sixteenth of the virtual size waiting to be reclaimed.
        assert!(len < 8 * MIB, "the image grew to {len} bytes");
        assert!(read_all(disk.as_mut()) == model);
    }
    assert_clean(&path);
    assert_same(&path, &model);
}
