//! Scenarios against QEMU's own tools: images made by `qemu-img`/`qemu-io`, read and written
//! through this module, then judged by `qemu-img check` (no corruption, no leaks) and
//! `qemu-img compare` (same guest bytes as a raw file with the same writes applied).
//!
//! These tests need qemu-utils (`qemu-img`, `qemu-io`); CI installs it, and a missing tool
//! fails the test with a message saying so.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;

mod chains;
mod errors;
mod guest_io;
mod qcow2_guest_io;
mod qcow2_io;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * 1024;

pub(super) fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}): these tests need qemu-utils (apt-get install qemu-utils)")
    })
}

pub(super) fn run_ok(tool: &str, args: &[&str]) -> Output {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(super) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
pub(super) fn create(path: &Path, opts: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size.as_str()]);
    run_ok("qemu-img", &args);
}

pub(super) fn qemu_io(path: &Path, cmds: &[String]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(path));
    run_ok("qemu-io", &args);
}

/// The guest bytes of `path` as QEMU reads them.
pub(super) fn qemu_read(path: &Path, extra: &[&str]) -> Vec<u8> {
    let out = path.with_extension("qemu-raw");
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([s(path), s(&out)]);
    run_ok("qemu-img", &args);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

/// `qemu-img check` must find no corruption and no leaks.
pub(super) fn assert_clean(path: &Path) {
    let out = run("qemu-img", &["check", s(path)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` must find the qcow2 image and the raw model identical.
pub(super) fn assert_same(qcow2: &Path, model: &[u8]) {
    let raw = qcow2.with_extension("model");
    fs::write(&raw, model).unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(qcow2), s(&raw)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare {}: {}{}",
        qcow2.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Read-write, backing files allowed (the tests make their chains themselves).
pub(super) fn rw() -> DiskOptions {
    DiskOptions {
        backing_files: BackingFiles::Any,
        ..DiskOptions::default()
    }
}

/// Read-only, backing files allowed.
pub(super) fn ro() -> DiskOptions {
    DiskOptions {
        read_only: true,
        ..rw()
    }
}

pub(super) fn read_all(disk: &mut dyn DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// xorshift64*: deterministic test data without a dependency.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let fill = self.next() as u8;
        let mut v = vec![fill; n];
        // A pattern that differs across sectors but compresses poorly enough to be honest.
        for (i, b) in v.iter_mut().enumerate().step_by(97) {
            *b = (self.next() as u8) ^ (i as u8);
        }
        v
    }
}

/// What a discard does to the guest data, as the model sees it.
#[derive(Clone, Copy)]
pub(super) enum Discard {
    /// Whole clusters of this many bytes read as zeros (qcow2), partial ones are untouched.
    WholeClusters(u64),
    /// All of the range reads as zeros (a hole punched in a raw file).
    Range,
    /// Nothing changes (v2 images over a backing file cannot deallocate).
    Ignored,
}

/// Applies `n` random operations (mostly writes; some write-zeroes and discards) to `disk` and
/// to the raw `model`.
pub(super) fn random_ops(
    disk: &mut dyn DiskImage,
    model: &mut [u8],
    rng: &mut Rng,
    n: usize,
    max_len: u64,
    discard: Discard,
) {
    let size = model.len() as u64;
    for _ in 0..n {
        let off = rng.below(size);
        let len = 1 + rng.below(max_len.min(size - off));
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0 => {
                disk.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            1 => {
                disk.discard(off, len).unwrap();
                match discard {
                    Discard::Range => model[o..o + l].fill(0),
                    Discard::WholeClusters(cluster) => {
                        let first = off.div_ceil(cluster) * cluster;
                        let end = off + len;
                        let last = if end == size {
                            size
                        } else {
                            end / cluster * cluster
                        };
                        if last > first {
                            model[first as usize..last as usize].fill(0);
                        }
                    }
                    Discard::Ignored => {}
                }
            }
            _ => {
                let data = rng.bytes(l);
                disk.write_at(&data, off).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
        }
    }
}

/// (cluster size, compat, refcount bits).
pub(super) const LAYOUTS: &[(u64, &str, u32)] = &[
    (512, "1.1", 16),
    (4096, "1.1", 16),
    (65536, "1.1", 16),
    (2 * MIB, "1.1", 16),
    (4096, "0.10", 16),
    (65536, "0.10", 16),
    (4096, "1.1", 1),
    (512, "1.1", 64),
    (65536, "1.1", 64),
];

/// A virtual size that is no multiple of most cluster sizes.
pub(super) const ODD_SIZE: u64 = 3 * MIB + 512;

pub(super) fn layout_opts(cluster: u64, compat: &str, refbits: u32) -> String {
    format!("cluster_size={cluster},compat={compat},refcount_bits={refbits}")
}

/// Some data written by QEMU itself, including a zero cluster on v3.
pub(super) fn populate(path: &Path, cluster: u64, v3: bool) {
    let mut cmds = vec![
        "write -P 0x11 0 64k".to_string(),
        "write -P 0x22 1048576 102400".to_string(),
        format!("write -P 0x33 {} 4096", ODD_SIZE - 4096),
    ];
    if v3 {
        cmds.push(format!("write -z {} {}", 2 * MIB, cluster.min(64 * KIB)));
    }
    qemu_io(path, &cmds);
}

pub(super) fn sha(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

/// A fresh 64K-cluster image with some data, and its bytes.
pub(super) fn sample_image(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    create(&path, "", 4 * MIB);
    qemu_io(&path, &["write -P 0x12 0 128k".into()]);
    let bytes = fs::read(&path).unwrap();
    (path, bytes)
}

pub(super) fn put_be(bytes: &mut [u8], off: usize, v: &[u8]) {
    bytes[off..off + v.len()].copy_from_slice(v);
}
