//! qcow2 reads and writes straight between guest memory and the image: across cluster
//! boundaries and every kind of cluster (data, unallocated over a backing file or past its
//! end, zero, compressed), merged into one system call per host-contiguous run, and with
//! `O_DIRECT` for aligned and misaligned guest buffers.

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The disk layer takes plain slices (no dirty bitmap; the virtio-blk worker marks pages).
type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::*;

const MEM: u64 = 16 * MIB;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

/// Guest buffers for `total` bytes: pieces of random lengths (multiples of `unit`) at
/// scattered guest addresses, each `shift` bytes past a 4 KiB boundary. Returns the slices and
/// their guest addresses.
fn scattered<'m>(
    mem: &'m GuestMemoryMmap,
    rng: &mut Rng,
    total: u64,
    unit: u64,
    shift: u64,
) -> Vec<(GuestAddress, VolatileSlice<'m>)> {
    let mut out = Vec::new();
    let mut left = total;
    let mut addr = 4096 * rng.below(64) + shift;
    while left > 0 {
        let units = 1 + rng.below(left.div_ceil(unit).min(40));
        let len = (units * unit).min(left);
        let a = GuestAddress(addr);
        out.push((a, mem.get_slice(a, len as usize).unwrap()));
        left -= len;
        // A gap, so that neighbouring pieces are never contiguous in guest memory.
        addr = (addr + len + 4096).next_multiple_of(4096) + shift;
        assert!(addr + MIB < MEM, "test buffers overflow guest memory");
    }
    out
}

fn slices_of<'m>(bufs: &[(GuestAddress, VolatileSlice<'m>)]) -> Vec<VolatileSlice<'m>> {
    bufs.iter().map(|(_, s)| *s).collect()
}

fn gather(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, VolatileSlice<'_>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (addr, s) in bufs {
        let mut part = vec![0u8; s.len()];
        mem.read_slice(&mut part, *addr).unwrap();
        out.extend_from_slice(&part);
    }
    out
}

fn fill(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, VolatileSlice<'_>)], data: &[u8]) {
    let mut at = 0;
    for (addr, s) in bufs {
        mem.write_slice(&data[at..at + s.len()], *addr).unwrap();
        at += s.len();
    }
}

/// A qcow2 image over a shorter qcow2 backing file, holding data, zero, compressed and
/// unallocated clusters (some past the end of the backing file).
fn layered_image(dir: &Path, cluster: u64, compat: &str) -> PathBuf {
    let base = dir.join(format!("base-{cluster}-{compat}.qcow2"));
    create(&base, "cluster_size=65536", 2 * MIB);
    qemu_io(
        &base,
        &[
            "write -P 0x5a 0 2M".into(),
            "write -P 0x3c 300k 100k".into(),
        ],
    );
    let top = dir.join(format!("top-{cluster}-{compat}.qcow2"));
    let opts = format!("cluster_size={cluster},compat={compat}");
    let name = base.file_name().unwrap().to_str().unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            name,
            "-F",
            "qcow2",
            s(&top),
            &ODD_SIZE.to_string(),
        ],
    );
    let c = cluster;
    let mut cmds = vec![
        format!("write -P 0x11 {} {}", c, 3 * c),
        "write -P 0x22 1048576 200000".to_string(),
        format!("write -c -P 0x44 {} {}", 8 * c, 2 * c),
        format!("write -c -P 0x45 {} {}", 2 * MIB, c),
        format!("write -P 0x33 {} 4096", ODD_SIZE - 4096),
    ];
    if compat == "1.1" {
        cmds.push(format!("write -z {} {}", 5 * c, 2 * c));
        cmds.push(format!("write -z {} {}", 2 * MIB + 4 * c, c));
    }
    qemu_io(&top, &cmds);
    top
}

const GUEST_LAYOUTS: &[(u64, &str)] =
    &[(512, "1.1"), (4096, "1.1"), (65536, "1.1"), (65536, "0.10")];

#[test]
fn guest_reads_match_qemu_across_every_kind_of_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    for &(cluster, compat) in GUEST_LAYOUTS {
        let img = layered_image(dir.path(), cluster, compat);
        let expected = qemu_read(&img, &[]);
        let mut disk = open_disk(&img, ro()).unwrap();
        let mut rng = Rng(cluster ^ 0xfeed);
        // The whole disk at once, then random ranges (byte-granular and sector-granular).
        let mut ranges = vec![(0, ODD_SIZE)];
        for i in 0..80 {
            let off = rng.below(ODD_SIZE);
            let len = 1 + rng.below((300 * KIB).min(ODD_SIZE - off));
            ranges.push(if i % 2 == 0 {
                (off, len)
            } else {
                let o = off / 512 * 512;
                (o, (len.div_ceil(512) * 512).min(ODD_SIZE - o))
            });
        }
        for (off, len) in ranges {
            let bufs = scattered(&mem, &mut rng, len, 512, 0);
            disk.read_volatile_at(&slices_of(&bufs), off).unwrap();
            let got = gather(&mem, &bufs);
            assert!(
                got[..] == expected[off as usize..(off + len) as usize],
                "{}: {len} bytes at {off}",
                img.display()
            );
        }
    }
}

#[test]
fn guest_writes_match_qemu_across_every_kind_of_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    for &(cluster, compat) in GUEST_LAYOUTS {
        let img = layered_image(dir.path(), cluster, compat);
        let mut model = qemu_read(&img, &[]);
        let mut rng = Rng(cluster * 7 + compat.len() as u64);
        {
            let mut disk = open_disk(&img, rw()).unwrap();
            for i in 0..60 {
                let off = rng.below(ODD_SIZE);
                let len = 1 + rng.below((260 * KIB).min(ODD_SIZE - off));
                let (off, len) = if i % 3 == 0 {
                    (off, len)
                } else {
                    let o = off / 512 * 512;
                    (o, (len.div_ceil(512) * 512).min(ODD_SIZE - o))
                };
                let data = rng.bytes(len as usize);
                let bufs = scattered(&mem, &mut rng, len, 512, 0);
                fill(&mem, &bufs, &data);
                disk.write_volatile_at(&slices_of(&bufs), off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                if i % 10 == 0 {
                    disk.flush().unwrap();
                }
            }
            // Read back through guest memory before the close.
            let bufs = scattered(&mem, &mut rng, ODD_SIZE, 64 * KIB, 0);
            disk.read_volatile_at(&slices_of(&bufs), 0).unwrap();
            assert!(gather(&mem, &bufs) == model, "{}", img.display());
        }
        assert_clean(&img);
        assert_same(&img, &model);
    }
}

#[test]
fn host_contiguous_clusters_go_out_in_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("merge.qcow2");
    create(&img, "cluster_size=65536", 16 * MIB);
    let mem = memory();
    let mut disk = open_qcow2_standalone(&img, false).unwrap();
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    disk.host_file_mut().set_write_hook(Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let mut rng = Rng(17);
    let data = rng.bytes(MIB as usize);
    let bufs = scattered(&mem, &mut rng, MIB, 4096, 0);
    fill(&mem, &bufs, &data);
    // 16 new clusters, allocated one after the other: one pwritev.
    disk.write_volatile_at(&slices_of(&bufs), 2 * MIB).unwrap();
    assert_eq!(writes.load(Ordering::Relaxed), 1, "allocating write");
    // The same clusters again, in place, starting mid-cluster: one pwritev.
    disk.write_volatile_at(&slices_of(&bufs[1..]), 2 * MIB + 4096)
        .unwrap();
    assert_eq!(writes.load(Ordering::Relaxed), 2, "in-place write");
    // A write straddling allocated and new clusters: the partial new head cluster is one
    // write (its old contents around the data), the allocated ones another.
    disk.write_volatile_at(&slices_of(&bufs[..1]), 2 * MIB - 2048)
        .unwrap();
    assert_eq!(writes.load(Ordering::Relaxed), 4, "partial + in place");
    drop(disk);
    let mut model = vec![0u8; 16 * MIB as usize];
    let at = 2 * MIB as usize;
    model[at..at + data.len()].copy_from_slice(&data);
    let tail = &data[bufs[0].1.len()..];
    model[at + 4096..at + 4096 + tail.len()].copy_from_slice(tail);
    let head = &data[..bufs[0].1.len()];
    model[at - 2048..at - 2048 + head.len()].copy_from_slice(head);
    assert_clean(&img);
    assert_same(&img, &model);
}

#[test]
fn direct_guest_io_with_aligned_and_misaligned_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let img = layered_image(dir.path(), 65536, "1.1");
    let mut model = qemu_read(&img, &[]);
    let direct = DiskOptions {
        direct: true,
        ..rw()
    };
    let mut disk = match open_disk(&img, direct) {
        Ok(d) => d,
        Err(BlockError::DirectUnsupported { path }) => {
            eprintln!(
                "skipping: no O_DIRECT on the filesystem of {}",
                path.display()
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut rng = Rng(99);
    for i in 0..80u64 {
        // Even: 4 KiB-aligned buffers, offsets and lengths (the direct path); odd: buffers
        // 512 bytes past a page boundary and sector-granular offsets (the fallback).
        let (unit, shift) = if i % 2 == 0 { (4096, 0) } else { (512, 512) };
        let off = rng.below(ODD_SIZE - 4096) / unit * unit;
        let len = ((1 + rng.below(200 * KIB)) / unit * unit).clamp(unit, ODD_SIZE - 4096 - off);
        let len = len / unit * unit;
        let bufs = scattered(&mem, &mut rng, len, unit, shift);
        if i % 4 < 2 {
            let data = rng.bytes(len as usize);
            fill(&mem, &bufs, &data);
            disk.write_volatile_at(&slices_of(&bufs), off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        } else {
            disk.read_volatile_at(&slices_of(&bufs), off).unwrap();
            assert!(
                gather(&mem, &bufs)[..] == model[off as usize..(off + len) as usize],
                "{len} bytes at {off} (unit {unit})"
            );
        }
    }
    drop(disk);
    assert_clean(&img);
    assert_same(&img, &model);
    let _ = fs::remove_file(&img);
}

#[test]
fn passthrough_only_for_data_clusters_the_active_layer_owns() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pass.qcow2");
    create(&img, "cluster_size=4096", MIB);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 16k".into(),
            "write -c -P 0x22 64k 4k".into(),
            "write -z 128k 4k".into(),
        ],
    );
    run_ok("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
    let mem = memory();
    let bufs = [mem.get_slice(GuestAddress(0), 8192).unwrap()];
    let mut disk = open_disk(&img, rw()).unwrap();
    // Reads of allocated data: the host range holds the guest bytes.
    let (fd, at) = disk.passthrough(&bufs, 4096, false).unwrap();
    let mut got = [0u8; 8192];
    // SAFETY: pread(2) into a local buffer of the given length, on a descriptor the open
    // image keeps open.
    let n = unsafe { libc::pread(fd, got.as_mut_ptr().cast(), 8192, at as libc::off_t) };
    assert_eq!(n, 8192);
    assert_eq!(got, [0x11; 8192]);
    // Not for compressed, zero or unallocated clusters, nor past the end.
    for off in [64 * KIB, 128 * KIB, 200 * KIB, MIB - 4096] {
        assert!(disk.passthrough(&bufs, off, false).is_none(), "{off}");
    }
    // Writes: not into clusters shared with the snapshot, until copied on write.
    assert!(disk.passthrough(&bufs, 0, true).is_none());
    mem.write_slice(&[0x33; 8192], GuestAddress(0)).unwrap();
    disk.write_volatile_at(&bufs, 0).unwrap();
    let (fd, at) = disk.passthrough(&bufs, 0, true).unwrap();
    // SAFETY: as above.
    let n = unsafe { libc::pread(fd, got.as_mut_ptr().cast(), 8192, at as libc::off_t) };
    assert_eq!(n, 8192);
    assert_eq!(got, [0x33; 8192]);
    drop(disk);
    assert_clean(&img);
    let mut ro_disk = open_disk(&img, ro()).unwrap();
    assert!(ro_disk.passthrough(&bufs, 0, true).is_none());
    assert!(ro_disk.passthrough(&bufs, 0, false).is_some());
}

/// Microbenchmark (run by hand: `cargo test --release -p devices --lib bench_ -- --ignored
/// --nocapture`): 1 MiB sequential reads and writes of an allocated 64 KiB-cluster qcow2
/// image opened with `O_DIRECT`, straight into guest memory and through the bounce buffer
/// (the path every qcow2 request took before).
#[test]
#[ignore]
fn bench_qcow2_sequential_1m() {
    use crate::block::guest_io::{read_by_copy, write_by_copy};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bench.qcow2");
    const SIZE: u64 = 256 * MIB;
    create(&img, "cluster_size=65536", SIZE);
    qemu_io(&img, &[format!("write -P 0x5a 0 {SIZE}")]);
    let mem = memory();
    // 1 MiB as 256 page-aligned 4 KiB buffers, as a Linux guest's bio would be.
    let bufs: Vec<VolatileSlice<'_>> = (0..256u64)
        .map(|i| mem.get_slice(GuestAddress(i * 8192), 4096).unwrap())
        .collect();
    let direct = DiskOptions {
        direct: true,
        ..rw()
    };
    let mut disk = open_disk(&img, direct).unwrap();
    for pass in 0..2 {
        let mut times = Vec::new();
        for (name, copy) in [("direct", false), ("bounce", true)] {
            let start = std::time::Instant::now();
            for i in 0..SIZE / MIB {
                if copy {
                    read_by_copy(disk.as_mut(), &bufs, i * MIB).unwrap();
                } else {
                    disk.read_volatile_at(&bufs, i * MIB).unwrap();
                }
            }
            let read = SIZE as f64 / MIB as f64 / start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            for i in 0..SIZE / MIB {
                if copy {
                    write_by_copy(disk.as_mut(), &bufs, i * MIB).unwrap();
                } else {
                    disk.write_volatile_at(&bufs, i * MIB).unwrap();
                }
            }
            let write = SIZE as f64 / MIB as f64 / start.elapsed().as_secs_f64();
            times.push(format!(
                "{name}: read {read:.0} MiB/s, write {write:.0} MiB/s"
            ));
        }
        eprintln!("pass {pass}: {}", times.join("; "));
    }
}
