//! A distribution's cloud image booted with no separate kernel: the Debian 12 image
//! `resources/guest/debian-image.sh` builds (GPT, ext4 root, grub-mkconfig's grub.cfg,
//! systemd, cloud-init), as a qcow2 overlay, configured by a `--cloud-init` seed.

use std::time::Duration;

use libtest_mimic::{Failed, Trial};

use crate::harness::{host_ok, repo_root, Scratch, Vm};

/// How long the Debian guest may take from start to cloud-init's marker: systemd and
/// cloud-init in a guest of the emulated test host.
const CLOUD_INIT_WAIT: Duration = Duration::from_secs(420);

pub fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "diskboot_debian_cloud_image_runs_its_cloud_init",
        debian_cloud_image_runs_its_cloud_init,
    )]
}

fn debian_cloud_image_runs_its_cloud_init() -> Result<(), Failed> {
    let image = repo_root().join("target/guest/debian/debian.raw");
    if !image.exists() {
        return Err(format!(
            "{} is missing: resources/guest/debian-image.sh builds it (scripts/test-all.sh does)",
            image.display()
        )
        .into());
    }
    let dir = Scratch::new("debian");
    let overlay = dir.arg("debian.qcow2");
    host_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            image.to_str().unwrap(),
            &overlay,
        ],
    )?;
    let disk = format!("path={overlay},backing_files=on");
    // The menu the image's grub-mkconfig wrote, as podvisor reads it.
    let menu = host_ok(
        crate::harness::podvisor(),
        &["run", "--list-boot-entries", "--disk", &disk],
    )?;
    for wanted in [
        "/boot/grub/grub.cfg on partition 1",
        "0* Debian GNU/Linux",
        "vmlinuz-",
    ] {
        if !menu.contains(wanted) {
            return Err(format!("--list-boot-entries has no '{wanted}':\n{menu}").into());
        }
    }
    let user_data = dir.path("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\n\
         hostname: podvisor-e2e\n\
         write_files:\n\
         - path: /var/tmp/podvisor-e2e\n\
         \x20 content: written-by-cloud-init\n\
         runcmd:\n\
         - [sh, -c, 'echo \"podvisor-cloud-init $(hostname) $(cat /var/tmp/podvisor-e2e)\" > /dev/ttyS0']\n\
         power_state:\n\
         \x20 mode: poweroff\n\
         \x20 condition: true\n",
    )?;
    let mut vm = Vm::start(&[
        "--disk",
        &disk,
        "--cloud-init",
        &format!("user-data={}", user_data.display()),
        "--cpus",
        "2",
        "--memory",
        "1G",
    ]);
    // The guest's kernel speaks on the serial console podvisor added to its command line.
    vm.expect("Linux version")?;
    if vm
        .expect_within(
            "podvisor-cloud-init podvisor-e2e written-by-cloud-init",
            CLOUD_INIT_WAIT,
        )
        .is_err()
    {
        return Err(vm.failure("no cloud-init marker: the user-data did not run"));
    }
    // cloud-init's power_state powers the guest off: podvisor ends with it.
    let status = vm.wait()?;
    if !status.success() {
        return Err(vm.failure(&format!("podvisor exited with {status}")));
    }
    Ok(())
}
