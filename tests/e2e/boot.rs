//! Boot scenarios: kernels (bzImage, PVH), CPU and memory shapes, reboot, bad input.

use std::path::Path;

use libtest_mimic::{Failed, Trial};

use crate::harness::{expect_error, guest, hang_tolerant, parse_ready, Scratch, Vm};

fn boot_and_halt(kernel: &str, cpus: u8, memory_mib: u64, cmdline: &str) -> Result<(), Failed> {
    let mut vm = Vm::boot(kernel, cpus, &format!("{memory_mib}M"), cmdline);
    let line = vm.expect("podvisor-guest ready:")?;
    let (got_cpus, memtotal_kb) = parse_ready(&line)?;
    if got_cpus != u32::from(cpus) {
        return Err(vm.failure(&format!("guest sees {got_cpus} CPUs, expected {cpus}")));
    }
    // MemTotal excludes what the kernel reserves for itself; it must still be most of RAM.
    let ram_kb = memory_mib * 1024;
    if memtotal_kb > ram_kb || memtotal_kb < ram_kb * 3 / 4 {
        return Err(vm.failure(&format!(
            "guest MemTotal {memtotal_kb} kB is implausible for {memory_mib} MiB"
        )));
    }
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status} after poweroff")));
    }
    Ok(())
}

fn reboot_comes_back() -> Result<(), Failed> {
    let mut vm = Vm::boot("bzImage", 2, "256M", "console=ttyS0 quiet reboot=k");
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    vm.type_line("reboot -f")?;
    let line = vm.expect("podvisor-guest ready:")?;
    if parse_ready(&line)?.0 != 2 {
        return Err(vm.failure("wrong CPU count after reboot"));
    }
    vm.wait_for_shell()?;
    vm.type_line("poweroff -f")?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status} after poweroff")));
    }
    Ok(())
}

fn bad_kernel_files_give_clear_errors() -> Result<(), Failed> {
    let dir = Scratch::new("badkernel");
    let garbage = dir.path("garbage");
    std::fs::write(&garbage, b"this is not a kernel").map_err(|e| e.to_string())?;
    let truncated = dir.path("truncated-bzImage");
    let bz = std::fs::read(guest("bzImage")).map_err(|e| e.to_string())?;
    std::fs::write(&truncated, &bz[..4096]).map_err(|e| e.to_string())?;
    let cases: [(&Path, &str); 3] = [
        (&garbage, "neither a bzImage nor an ELF vmlinux"),
        (&truncated, "cannot load kernel"),
        (Path::new("/nonexistent/kernel"), "cannot open kernel"),
    ];
    for (kernel, wanted) in cases {
        let stderr = expect_error(&["--kernel", kernel.to_str().unwrap(), "--memory", "128M"])?;
        if !stderr.contains(wanted) {
            return Err(format!("kernel {kernel:?}: expected '{wanted}', got: {stderr}").into());
        }
    }
    let stderr = expect_error(&[
        "--kernel",
        guest("bzImage").to_str().unwrap(),
        "--initramfs",
        "/nonexistent/initramfs",
    ])?;
    if !stderr.contains("cannot open initramfs") {
        return Err(format!("missing initramfs: got {stderr}").into());
    }
    Ok(())
}

fn too_much_memory_is_refused() -> Result<(), Failed> {
    let stderr = expect_error(&[
        "--kernel",
        guest("bzImage").to_str().unwrap(),
        "--memory",
        "64T",
    ])?;
    if !stderr.contains("more than this host can give") {
        return Err(format!("got: {stderr}").into());
    }
    Ok(())
}

/// The boot scenarios, in the order they run.
pub fn trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    for (kernel, label) in [("bzImage", "bzimage"), ("vmlinux", "pvh")] {
        for (cpus, mib) in [(1u8, 256u64), (2, 1024)] {
            // Quiet: every character on the serial console is a VM exit, and in the emulated
            // test host boots that print the whole kernel log froze far more often than
            // quiet ones (docs/testhost-stability.md, 2026-12-03).
            let cmdline = "console=ttyS0 quiet podvisor.halt";
            trials.push(Trial::test(
                format!("boot_{label}_{cpus}cpu_{mib}mib"),
                move || hang_tolerant(|| boot_and_halt(kernel, cpus, mib, cmdline)),
            ));
        }
    }
    trials.push(Trial::test("reboot_comes_back_to_ready", || {
        hang_tolerant(reboot_comes_back)
    }));
    trials.push(Trial::test(
        "bad_kernel_files_give_clear_errors",
        bad_kernel_files_give_clear_errors,
    ));
    trials.push(Trial::test(
        "too_much_memory_is_refused",
        too_much_memory_is_refused,
    ));
    trials
}
