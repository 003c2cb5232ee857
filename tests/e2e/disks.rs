//! Disk scenarios: the guest writes through virtio-blk to raw and qcow2 images, and the host
//! checks the bytes with its own tools (`qemu-img`, `qemu-io`).

use std::path::Path;

use libtest_mimic::{Failed, Trial};

use crate::harness::{
    expect_error, find_sha256, guest, hang_tolerant, host, host_ok, qcow2_overlay, sha256_of,
    Scratch, Vm,
};

const MIB: u64 = 1 << 20;
/// The size of the file the guest writes: 16 MiB, 256 clusters of a default qcow2 (it was 64,
/// for nothing more than the emulated test host's time).
const PAYLOAD_MIB: u64 = 16;
/// Quiet: kernel messages would interleave with the shell's output.
const CMDLINE: &str = "console=ttyS0 quiet";

fn disk_arg(spec: &str) -> [&str; 2] {
    ["--disk", spec]
}

/// Boots the initramfs guest with `extra` arguments and waits for its shell.
fn boot_to_shell(extra: &[&str]) -> Result<Vm, Failed> {
    let mut vm = Vm::boot_with("bzImage", 2, "512M", CMDLINE, extra);
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    Ok(vm)
}

/// Makes a random file of [`PAYLOAD_MIB`] in the guest's RAM; returns its SHA-256.
fn guest_payload(vm: &mut Vm) -> Result<String, Failed> {
    let out = vm.shell_ok(&format!(
        "mkdir -p /tmp && head -c {} /dev/urandom > /tmp/f && sha256sum /tmp/f",
        PAYLOAD_MIB * MIB
    ))?;
    find_sha256(&out).ok_or_else(|| vm.failure(&format!("no checksum in '{out}'")))
}

/// Writes the payload to `dev` at `seek_mib` and makes it durable; then reads it back from
/// the device, past the guest's page cache, and checks it.
fn guest_write_and_verify(vm: &mut Vm, dev: &str, seek_mib: u64, sha: &str) -> Result<(), Failed> {
    vm.shell_ok(&format!(
        "dd if=/tmp/f of={dev} bs=1M seek={seek_mib} conv=fsync 2>/dev/null && sync"
    ))?;
    let out = vm.shell_ok(&format!(
        "echo 3 > /proc/sys/vm/drop_caches; dd if={dev} bs=1M skip={seek_mib} count={PAYLOAD_MIB} 2>/dev/null | sha256sum"
    ))?;
    if find_sha256(&out).as_deref() != Some(sha) {
        return Err(vm.failure(&format!("{dev} reads back '{out}', wrote {sha}")));
    }
    Ok(())
}

/// Fails unless every byte of `count` MiB of `dev` from `skip_mib` is `byte`. (Counts the
/// others with `tr -d`: listing a MiB's distinct values with od and sort took a minute of the
/// emulated test host's time.)
fn guest_bytes_are(
    vm: &mut Vm,
    dev: &str,
    skip_mib: u64,
    count: u64,
    byte: u8,
) -> Result<(), Failed> {
    let read = format!("dd if={dev} bs=1M skip={skip_mib} count={count} 2>/dev/null");
    let others = vm.shell_ok(&format!("{read} | tr -d '\\{byte:03o}' | wc -c"))?;
    if others.trim() != "0" {
        let start = vm.shell_ok(&format!("{read} | od -An -tx1 -N16"))?;
        return Err(vm.failure(&format!(
            "{} bytes of {dev} from {skip_mib} MiB are not {byte:#04x}; it starts {}",
            others.trim(),
            start.trim()
        )));
    }
    Ok(())
}

/// `qemu-img check`: 0 is clean, 3 means leaked clusters only (allowed after a kill).
fn qemu_img_check(image: &Path, allow_leaks: bool) -> Result<(), Failed> {
    let (rc, text) = host("qemu-img", &["check", image.to_str().unwrap()])?;
    match rc {
        0 => Ok(()),
        3 if allow_leaks => Ok(()),
        _ => Err(format!("qemu-img check {} exited {rc}:\n{text}", image.display()).into()),
    }
}

fn raw_disk_round_trip() -> Result<(), Failed> {
    let dir = Scratch::new("raw");
    let img = dir.path("data.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(96 * MIB))
        .map_err(|e| e.to_string())?;
    let spec = format!("path={},format=raw", dir.arg("data.raw"));
    let mut vm = boot_to_shell(&disk_arg(&spec))?;
    // One request queue per vCPU (the guest has two).
    let queues = vm.shell_ok("ls /sys/block/vda/mq")?;
    if queues.split_whitespace().count() != 2 {
        return Err(vm.failure(&format!("/dev/vda has queues '{queues}', not 0 and 1")));
    }
    let sha = guest_payload(&mut vm)?;
    guest_write_and_verify(&mut vm, "/dev/vda", 1, &sha)?;
    vm.poweroff()?;
    if sha256_of(&img, MIB, PAYLOAD_MIB * MIB)? != sha {
        return Err("the raw image does not hold what the guest wrote".into());
    }
    if sha256_of(&img, 0, MIB)? != sha256_of(Path::new("/dev/zero"), 0, MIB)? {
        return Err("the guest's write landed outside where it wrote".into());
    }
    Ok(())
}

fn qcow2_overlay_round_trip() -> Result<(), Failed> {
    let dir = Scratch::new("qcow2");
    let (base, overlay, flat) = (
        dir.arg("base.qcow2"),
        dir.arg("overlay.qcow2"),
        dir.arg("flat.raw"),
    );
    host_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "96M"])?;
    host_ok("qemu-io", &["-c", "write -q -P 0xab 0 1M", &base])?;
    let base_sha = sha256_of(Path::new(&base), 0, std::fs::metadata(&base)?.len())?;
    qcow2_overlay(&base, "qcow2", &overlay)?;

    let mut vm = boot_to_shell(&disk_arg(&format!(
        "path={overlay},backing_files={}",
        dir.root()
    )))?;
    // The base image's first MiB, through the overlay.
    guest_bytes_are(&mut vm, "/dev/vda", 0, 1, 0xab)?;
    let sha = guest_payload(&mut vm)?;
    guest_write_and_verify(&mut vm, "/dev/vda", 2, &sha)?;
    vm.poweroff()?;

    if sha256_of(Path::new(&base), 0, std::fs::metadata(&base)?.len())? != base_sha {
        return Err("the read-only base image changed".into());
    }
    qemu_img_check(Path::new(&overlay), false)?;
    host_ok("qemu-img", &["convert", "-O", "raw", &overlay, &flat])?;
    host_ok("qemu-img", &["compare", "-q", &overlay, &flat])?;
    if sha256_of(Path::new(&flat), 2 * MIB, PAYLOAD_MIB * MIB)? != sha {
        return Err("qemu-img does not read back what the guest wrote".into());
    }
    let ab = host_ok("qemu-io", &["-c", "read -q -P 0xab 0 1M", &overlay])?;
    if ab.contains("mismatch") {
        return Err(format!("the backing data changed under the overlay: {ab}").into());
    }
    Ok(())
}

fn readonly_disk_refuses_writes() -> Result<(), Failed> {
    let dir = Scratch::new("ro");
    let img = dir.arg("ro.raw");
    host_ok("qemu-img", &["create", "-q", "-f", "raw", &img, "16M"])?;
    host_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0x5a 0 1M", &img],
    )?;
    let before = sha256_of(Path::new(&img), 0, 16 * MIB)?;
    let mut vm = boot_to_shell(&disk_arg(&format!("path={img},readonly=on")))?;
    let ro = vm.shell_ok("cat /sys/block/vda/ro")?;
    if ro.trim() != "1" {
        return Err(vm.failure(&format!("the guest sees /sys/block/vda/ro = '{ro}'")));
    }
    let (out, rc) = vm.shell("dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync")?;
    if rc == 0 {
        return Err(vm.failure(&format!("a write to the read-only disk succeeded: {out}")));
    }
    // The device still serves reads.
    guest_bytes_are(&mut vm, "/dev/vda", 0, 1, 0x5a)?;
    vm.poweroff()?;
    if sha256_of(Path::new(&img), 0, 16 * MIB)? != before {
        return Err("the read-only image changed".into());
    }
    Ok(())
}

/// SIGKILL right after the guest's `sync` returns: every byte it flushed is in the images,
/// and the qcow2 has no corruption (leaked clusters are allowed). (`sync` alone writes a raw
/// block device's dirty pages back but sends the device no FLUSH; `conv=fsync` does, as a
/// file system's sync would.)
fn kill_after_sync_loses_nothing() -> Result<(), Failed> {
    let dir = Scratch::new("kill");
    let (raw, qcow2, flat) = (dir.arg("k.raw"), dir.arg("k.qcow2"), dir.arg("k-flat.raw"));
    host_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "96M"])?;
    host_ok("qemu-img", &["create", "-q", "-f", "qcow2", &qcow2, "96M"])?;
    let mut vm = boot_to_shell(&[
        "--disk",
        &format!("path={raw}"),
        "--disk",
        &format!("path={qcow2}"),
    ])?;
    let sha = guest_payload(&mut vm)?;
    vm.shell_ok(
        "dd if=/tmp/f of=/dev/vda bs=1M conv=fsync 2>/dev/null && dd if=/tmp/f of=/dev/vdb bs=1M seek=3 conv=fsync 2>/dev/null && sync",
    )?;
    vm.kill()?;
    if sha256_of(Path::new(&raw), 0, PAYLOAD_MIB * MIB)? != sha {
        return Err("the raw image lost synced data".into());
    }
    qemu_img_check(Path::new(&qcow2), true)?;
    host_ok("qemu-img", &["convert", "-O", "raw", &qcow2, &flat])?;
    if sha256_of(Path::new(&flat), 3 * MIB, PAYLOAD_MIB * MIB)? != sha {
        return Err("the qcow2 image lost synced data".into());
    }
    Ok(())
}

/// The README's disk boot: the root file system on a qcow2 overlay over the shipped image.
fn boots_from_a_qcow2_root_disk() -> Result<(), Failed> {
    let dir = Scratch::new("root");
    let overlay = dir.arg("root-overlay.qcow2");
    let base = guest("root.qcow2");
    qcow2_overlay(base.to_str().unwrap(), "qcow2", &overlay)?;
    let mut vm = Vm::boot_with(
        "vmlinux",
        1,
        "256M",
        "console=ttyS0 quiet root=/dev/vda podvisor.halt",
        &["--disk", &format!("path={overlay},backing_files=on")],
    );
    vm.expect("podvisor-guest root: /dev/vda")?;
    vm.expect("podvisor-guest ready:")?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status}")));
    }
    qemu_img_check(Path::new(&overlay), false)
}

fn bad_disks_give_clear_errors() -> Result<(), Failed> {
    let dir = Scratch::new("baddisk");
    let kernel = guest("bzImage");
    let kernel = kernel.to_str().unwrap();
    let raw = dir.arg("plain.raw");
    host_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "1M"])?;
    let corrupt = dir.path("corrupt.qcow2");
    let mut header = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    header.resize(4096, 0xee);
    std::fs::write(&corrupt, &header)?;
    let (a, b) = (dir.arg("a.qcow2"), dir.arg("b.qcow2"));
    host_ok("qemu-img", &["create", "-q", "-f", "qcow2", &a, "1M"])?;
    qcow2_overlay(&a, "qcow2", &b)?;
    // Point a back at b: a loop qemu-img refuses to create, made with its unsafe rebase.
    host_ok(
        "qemu-img",
        &["rebase", "-u", "-f", "qcow2", "-b", &b, "-F", "qcow2", &a],
    )?;
    // Issue 15's reproduction: a qcow2 that names a host file as its backing file.
    let evil = dir.arg("evil.qcow2");
    host_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            &evil,
            "64M",
        ],
    )?;
    let before: Vec<Vec<u8>> = [&raw, &a, &b, &evil]
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;

    let cases: [(String, &str); 7] = [
        ("path=/nonexistent/disk.raw".into(), "/nonexistent/disk.raw"),
        (format!("path={raw},format=qcow2"), "plain.raw"),
        (
            format!("path={},format=qcow2", corrupt.display()),
            "corrupt.qcow2",
        ),
        (format!("path={b},backing_files=on"), "loop"),
        (format!("path={raw},format=vmdk"), "vmdk"),
        (
            format!("path={evil}"),
            "backing file '/etc/passwd' refused: backing files are off for this disk",
        ),
        (
            format!("path={evil},backing_files={}", dir.root()),
            "/etc/passwd is not under backing_files=",
        ),
    ];
    for (spec, wanted) in &cases {
        let err = expect_error(&["--kernel", kernel, "--memory", "128M", "--disk", spec])?;
        if !err.contains(wanted) {
            return Err(format!("--disk {spec}: expected '{wanted}' in: {err}").into());
        }
    }
    let err = expect_error(&[
        "--kernel",
        kernel,
        "--net",
        "tap=this-name-is-far-too-long-for-linux",
    ])?;
    if !err.contains("tap") {
        return Err(format!("bad tap: {err}").into());
    }
    let after: Vec<Vec<u8>> = [&raw, &a, &b, &evil]
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    if before != after {
        return Err("a refused image was modified".into());
    }
    Ok(())
}

/// The disk scenarios, in the order they run.
pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("disk_raw_round_trip", || hang_tolerant(raw_disk_round_trip)),
        Trial::test("disk_qcow2_overlay_round_trip", || {
            hang_tolerant(qcow2_overlay_round_trip)
        }),
        Trial::test("disk_readonly_refuses_writes", || {
            hang_tolerant(readonly_disk_refuses_writes)
        }),
        Trial::test("disk_kill_after_sync_loses_nothing", || {
            hang_tolerant(kill_after_sync_loses_nothing)
        }),
        Trial::test("disk_boots_from_qcow2_root", || {
            hang_tolerant(boots_from_a_qcow2_root_disk)
        }),
        Trial::test(
            "disk_bad_input_gives_clear_errors",
            bad_disks_give_clear_errors,
        ),
    ]
}
