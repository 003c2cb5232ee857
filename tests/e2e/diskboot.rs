//! Distribution images booted with no separate kernel (issue 14), from the disks
//! `resources/guest/debian-image.sh` builds: the Debian 12 cloud image (GPT, ext4 root,
//! grub-mkconfig's grub.cfg, systemd, cloud-init) as a qcow2 overlay configured by a
//! `--cloud-init` seed; and the same root booted from a Fedora-style /boot with a Boot Loader
//! Specification entry, and from an MBR disk with an extlinux.conf.

use std::path::PathBuf;
use std::time::Duration;

use libtest_mimic::{Failed, Trial};

use crate::harness::{
    hang_tolerant, host_ok, podvisor, qcow2_overlay, repo_root, stall_report, Scratch, Vm, HUNG,
};

/// How long the Debian guest may take from start to cloud-init's marker: systemd and
/// cloud-init in a guest of the emulated test host.
const CLOUD_INIT_WAIT: Duration = Duration::from_secs(360);
/// How long from start to systemd's greeting from the root file system.
const SYSTEMD_WAIT: Duration = Duration::from_secs(150);
/// Appended to the image's command line: the kernel's notices (its banner and command line)
/// but not its info messages. Every character on the serial console is a VM exit, and boots
/// that print the whole kernel log freeze in the emulated test host far more often.
const QUIETER: &str = "loglevel=6";

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("diskboot_debian_cloud_image_runs_its_cloud_init", || {
            hang_tolerant(debian_cloud_image_runs_its_cloud_init)
        }),
        Trial::test("diskboot_bls_and_extlinux_layouts_boot_the_root", || {
            hang_tolerant(bls_and_extlinux_layouts_boot_the_root)
        }),
    ]
}

/// One of the disks debian-image.sh builds.
fn built(file: &str) -> Result<PathBuf, Failed> {
    let path = repo_root().join("target/guest/debian").join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: resources/guest/debian-image.sh builds it (scripts/test-all.sh does)",
            path.display()
        )
        .into())
    }
}

/// A qcow2 overlay in `dir` over the Debian image, as `--disk` takes it: the guest writes to
/// the overlay, never to the cached image.
fn debian_overlay(dir: &Scratch) -> Result<String, Failed> {
    let image = built("debian.raw")?;
    let overlay = dir.arg("debian.qcow2");
    qcow2_overlay(image.to_str().unwrap(), "raw", &overlay)?;
    Ok(format!("path={overlay},backing_files=on"))
}

/// The boot menus podvisor reads from `disks`; each of `wanted` must be in them.
fn menu_has(disks: &[&str], wanted: &[&str]) -> Result<(), Failed> {
    let mut args = vec!["run", "--list-boot-entries"];
    for d in disks {
        args.extend(["--disk", d]);
    }
    let menu = host_ok(podvisor(), &args)?;
    for w in wanted {
        if !menu.contains(w) {
            return Err(format!("--list-boot-entries has no '{w}':\n{menu}").into());
        }
    }
    Ok(())
}

/// Waits up to `limit` for `pattern`. A miss by a guest that still prints is a plain failure
/// (it runs, and went elsewhere); by a silent one, a stall with podvisor's threads, so that a
/// frozen test host is told apart from a guest that never got there.
fn wait_for(vm: &mut Vm, pattern: &str, limit: Duration) -> Result<(), Failed> {
    if vm.expect_within(pattern, limit).is_ok() {
        return Ok(());
    }
    let printed = vm.output_len();
    std::thread::sleep(Duration::from_secs(10));
    let alive = vm.output_len() > printed;
    let threads = stall_report(vm.pid());
    let _ = vm.kill();
    if alive {
        return Err(vm.failure(&format!(
            "no '{pattern}' within {limit:?}, while the guest went on printing"
        )));
    }
    Err(vm.failure(&format!(
        "{HUNG} no '{pattern}' within {limit:?}\n{threads}"
    )))
}

fn debian_cloud_image_runs_its_cloud_init() -> Result<(), Failed> {
    let dir = Scratch::new("debian");
    let disk = debian_overlay(&dir)?;
    // The menu the image's grub-mkconfig wrote, as podvisor reads it.
    menu_has(
        &[&disk],
        &[
            "/boot/grub/grub.cfg on partition 1",
            "0* Debian GNU/Linux",
            "vmlinuz-",
        ],
    )?;
    let user_data = dir.path("user-data");
    // The marker line carries the command line the kernel booted with: grub.cfg's, with the
    // serial console podvisor added and the `quiet` given here.
    std::fs::write(
        &user_data,
        "#cloud-config\n\
         hostname: podvisor-e2e\n\
         locale: false\n\
         ssh_genkeytypes: []\n\
         write_files:\n\
         - path: /var/tmp/podvisor-e2e\n\
         \x20 content: written-by-cloud-init\n\
         runcmd:\n\
         - [sh, -c, 'echo \"podvisor-cloud-init $(hostname) $(cat /var/tmp/podvisor-e2e) cmdline: $(cat /proc/cmdline)\" > /dev/ttyS0']\n",
    )?;
    // Quiet, and on one vCPU: the emulated test host froze this boot (systemd's and the
    // kernel's whole log on the serial console, two vCPUs) in a third of CI's sessions.
    let mut vm = Vm::start(&[
        "--disk",
        &disk,
        "--cloud-init",
        &format!("user-data={}", user_data.display()),
        "--cmdline",
        "quiet",
        "--memory",
        "1G",
    ]);
    let marker = "podvisor-cloud-init podvisor-e2e written-by-cloud-init cmdline:";
    wait_for(&mut vm, marker, CLOUD_INIT_WAIT)?;
    // The rest of the marker line.
    if vm.expect_within("\n", Duration::from_secs(30)).is_err() {
        return Err(vm.failure("the marker line never ended"));
    }
    let line = vm
        .printed()
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_default()
        .to_owned();
    for wanted in ["console=tty0", "console=ttyS0", "quiet"] {
        if !line.split_whitespace().any(|w| w == wanted) {
            return Err(vm.failure(&format!(
                "not grub.cfg's command line with podvisor's console: no '{wanted}' in {line}"
            )));
        }
    }
    // systemd's shutdown would cost another minute of the suite's time: the default guest's
    // scenarios check the power-off path.
    vm.kill()?;
    Ok(())
}

fn bls_and_extlinux_layouts_boot_the_root() -> Result<(), Failed> {
    let dir = Scratch::new("layouts");
    let root = debian_overlay(&dir)?;
    for (file, source, title, layout) in [
        (
            "bls-boot.raw",
            "/loader/entries/*.conf on partition 1",
            "0* Debian GNU/Linux 12 (BLS)",
            "podvisor.layout=bls",
        ),
        (
            "extlinux-boot.raw",
            "/extlinux/extlinux.conf on partition 1",
            "1* Debian GNU/Linux (extlinux)",
            "podvisor.layout=extlinux",
        ),
    ] {
        // Read-only: the boot disk is the boot loader's, the root is on the next disk.
        let boot = format!("path={},readonly=on", built(file)?.display());
        menu_has(&[&boot, &root], &[source, title, layout])?;
        let mut vm = Vm::start(&[
            "--disk",
            &boot,
            "--disk",
            &root,
            "--cmdline",
            QUIETER,
            "--memory",
            "512M",
        ]);
        let cmdline = vm.expect("Kernel command line:")?;
        if !cmdline.contains(layout) || !cmdline.contains("console=ttyS0") {
            return Err(vm.failure(&format!("{file}: not its entry's command line: {cmdline}")));
        }
        // systemd greets from the root its initramfs found by UUID on the second disk
        // ("Welcome to " and the system's name in bold).
        wait_for(&mut vm, "Debian GNU/Linux 12 (bookworm)", SYSTEMD_WAIT)?;
        vm.kill()?;
    }
    Ok(())
}
