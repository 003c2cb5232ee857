//! Device scenarios: the guest finds its PCI devices and uses them; the ACPI power button.

use libtest_mimic::{Failed, Trial};

use crate::harness::{hang_tolerant, Vm};

fn rng_feeds_the_guest() -> Result<(), Failed> {
    let mut vm = Vm::boot_with("bzImage", 1, "256M", "console=ttyS0 quiet", &["--rng"]);
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    let current = vm.shell_ok("cat /sys/class/misc/hw_random/rng_current")?;
    if !current.contains("virtio_rng") {
        return Err(vm.failure(&format!("hw_random uses '{current}', not virtio_rng")));
    }
    // 64 KiB from the device, and not all the same byte.
    let out = vm.shell_ok(
        "head -c 65536 /dev/hwrng | od -An -v -tx1 | tr -s ' ' '\\n' | sort -u | wc -l",
    )?;
    // The count is the last number printed (the kernel may log to the console meanwhile:
    // "hrtimer: interrupt took ... ns" in a slow test host).
    let distinct: u32 = out
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .ok_or_else(|| vm.failure(&format!("od said '{out}'")))?;
    if distinct < 200 {
        return Err(vm.failure(&format!(
            "only {distinct} distinct byte values from /dev/hwrng"
        )));
    }
    vm.type_line("poweroff")?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status}")));
    }
    Ok(())
}

/// SIGTERM (a pod being deleted) presses the ACPI power button; the guest's acpid powers it
/// off cleanly and podvisor exits 0.
fn sigterm_shuts_the_guest_down_cleanly() -> Result<(), Failed> {
    let mut vm = Vm::boot_with("bzImage", 1, "256M", "console=ttyS0 quiet", &[]);
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    // acpid is running once the shell is up.
    vm.shell_ok("pidof acpid")?;
    vm.terminate()?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor exited with {status} after SIGTERM")));
    }
    Ok(())
}

/// The device scenarios, in the order they run.
pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("rng_feeds_the_guest", || hang_tolerant(rng_feeds_the_guest)),
        Trial::test("sigterm_shuts_the_guest_down_cleanly", || {
            hang_tolerant(sigterm_shuts_the_guest_down_cleanly)
        }),
    ]
}
