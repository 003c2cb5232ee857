//! `podvisor launcher`: a KubeVirt VirtualMachineInstance run as a pod's entrypoint would run
//! it, its files where KubeVirt puts them (under a scratch pod root).

use libtest_mimic::{Failed, Trial};

use crate::api::ctl_ok;
use crate::harness::*;

/// A VMI with a kernelBoot kernel, a containerDisk (a qcow2 overlay over a raw base), an
/// emptyDisk, a host disk made on demand and a cloudInitNoCloud seed boots; the guest reads the
/// base through the overlay and writes over it, and mounts the seed (cidata) and reads its
/// user-data and meta-data; SIGTERM (the pod being deleted) powers the guest off within the
/// grace period and the launcher exits 0; the base is unchanged, the overlay, the empty disk
/// and the folders made for them are gone, and the host disk (the user's data) stays. A
/// second run, whose guest ignores the button, is stopped at the end of a 3 s grace period
/// (exit status 3), leaving the pod's files as found too.
fn a_vmi_boots_from_a_container_disk_and_leaves_the_pod_as_it_found_it() -> Result<(), Failed> {
    let dir = Scratch::new("launcher");
    let root = dir.path("pod");
    let kernel_boot = root.join("var/run/kubevirt/container-disks/kernel-boot/boot");
    std::fs::create_dir_all(&kernel_boot)?;
    std::fs::copy(guest("bzImage"), kernel_boot.join("vmlinuz"))?;
    std::fs::copy(guest("initramfs.cpio.gz"), kernel_boot.join("initrd.img"))?;
    let base = root.join("var/run/kubevirt/container-disks/disk_0.img");
    let mut image = vec![0u8; 8 << 20];
    image[4096..4096 + 14].copy_from_slice(b"from-the-image");
    std::fs::write(&base, &image)?;
    std::fs::create_dir_all(root.join("var/run/kubevirt-ephemeral-disks"))?;
    let host_disk = dir.path("host-data.img");
    let before: Vec<_> = walk(&root);

    let vmi = format!(
        r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {{name: e2e-vm, namespace: pods, labels: {{app: e2e}}}}
spec:
  terminationGracePeriodSeconds: 60
  domain:
    cpu: {{cores: 2}}
    memory: {{guest: 256Mi}}
    firmware:
      kernelBoot:
        kernelArgs: quiet
        container: {{image: kernels:1, kernelPath: /boot/vmlinuz, initrdPath: /boot/initrd.img}}
    devices:
      disks:
      - {{name: root, disk: {{bus: virtio}}}}
      - {{name: scratch, disk: {{}}}}
      - {{name: data, disk: {{}}, serial: data-1}}
      - {{name: seed, cdrom: {{bus: virtio}}}}
  volumes:
  - {{name: root, containerDisk: {{image: images:1}}}}
  - {{name: scratch, emptyDisk: {{capacity: 64Mi}}}}
  - {{name: data, hostDisk: {{path: {}, type: DiskOrCreate, capacity: 16Mi}}}}
  - name: seed
    cloudInitNoCloud:
      userData: |
        #cloud-config
        runcmd: [echo podvisor-seed-marker]
"#,
        host_disk.display()
    );
    let vmi_file = dir.path("vmi.yaml");
    std::fs::write(&vmi_file, vmi)?;
    let socket = dir.arg("api.sock");
    let launcher = || {
        Vm::spawn(
            "launcher",
            &[
                "--vmi",
                vmi_file.to_str().unwrap(),
                "--pod-root",
                root.to_str().unwrap(),
                "--api-socket",
                &socket,
                "--console-stdio",
            ],
        )
    };
    let mut vm = launcher();
    vm.expect("podvisor-guest ready: cpus=2")?;
    vm.wait_for_shell()?;
    let seen = vm.shell_ok(
        "dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 14; echo; \
         cat /sys/block/vdb/size /sys/block/vdc/size /sys/block/vdc/serial",
    )?;
    for expected in ["from-the-image", "131072", "32768", "data-1"] {
        if !seen.contains(expected) {
            return Err(vm.failure(&format!("the guest's disks: no '{expected}' in {seen}")));
        }
    }
    vm.shell_ok("printf guest-wrote | dd of=/dev/vda bs=4096 seek=2 conv=sync,fsync 2>/dev/null")?;
    // The cloud-init seed: an ISO 9660 disk labelled cidata, its names as cloud-init wants them.
    let seed = vm.shell_ok(
        "mkdir -p /seed && mount -t iso9660 -o ro /dev/vdd /seed && ls /seed && \
         cat /seed/user-data /seed/meta-data; umount /seed",
    )?;
    for expected in [
        "meta-data",
        "user-data",
        "podvisor-seed-marker",
        "instance-id: e2e-vm.pods",
        "local-hostname: e2e-vm",
    ] {
        if !seed.contains(expected) {
            return Err(vm.failure(&format!("the cidata disk: no '{expected}' in {seed}")));
        }
    }
    if seed.contains("network-config") {
        return Err(vm.failure(&format!("a network-config nobody asked for: {seed}")));
    }
    let info: serde_json::Value = serde_json::from_str(&ctl_ok(&socket, &["info"])?)?;
    if info["state"] != "Running" {
        return Err(vm.failure(&format!("vm.info on the launcher's socket: {info}")));
    }
    // Set up, the launcher keeps no capability but file access, on every thread that runs on.
    for task in std::fs::read_dir(format!("/proc/{}/task", vm.pid()))? {
        let task = task?.path();
        let name = std::fs::read_to_string(task.join("comm"))?;
        let name = name.trim();
        if !(name.starts_with("vcpu") || name == "podvisor" || name.starts_with("api")) {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        if field("CapEff:") != "0000000000000006" || field("NoNewPrivs:") != "1" {
            return Err(vm.failure(&format!(
                "thread {name}: CapEff {}, NoNewPrivs {}",
                field("CapEff:"),
                field("NoNewPrivs:")
            )));
        }
    }
    if !root.join("var/run/kubevirt-infra/healthy").is_file() {
        return Err(vm.failure("no readiness file while the guest runs"));
    }
    // Prometheus metrics on the same socket, as the node agent scrapes them.
    let metrics = ctl_ok(&socket, &["metrics"])?;
    for expected in [
        "kubevirt_vmi_state{state=\"Running\"} 1",
        "kubevirt_vmi_vcpu_seconds_total{id=\"1\"}",
        "kubevirt_vmi_memory_domain_bytes 268435456",
        "kubevirt_vmi_storage_write_traffic_bytes_total{drive=\"root\"}",
    ] {
        if !metrics.contains(expected) {
            return Err(vm.failure(&format!("no '{expected}' in the metrics:\n{metrics}")));
        }
    }
    vm.shell_ok("pidof acpid")?;
    vm.terminate()?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("the launcher exited with {status} after SIGTERM")));
    }
    if std::fs::read(&base)? != image {
        return Err("the containerDisk's base image changed".into());
    }
    let after = walk(&root);
    if after != before {
        return Err(format!("the pod's files were {before:?}, are now {after:?}").into());
    }
    if std::fs::metadata(&host_disk)?.len() != 16 << 20 {
        return Err("the host disk is gone or not 16 MiB".into());
    }

    // Again, with a guest that ignores its power button and a 3 s grace period: stopped
    // hard at the deadline, exit status 3, and the pod's files as found all the same.
    let vmi = std::fs::read_to_string(&vmi_file)?.replace(
        "terminationGracePeriodSeconds: 60",
        "terminationGracePeriodSeconds: 3",
    );
    std::fs::write(&vmi_file, vmi)?;
    let mut vm = launcher();
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    vm.shell_ok("kill $(pidof acpid); while pidof acpid; do sleep 0.1; done")?;
    let asked = std::time::Instant::now();
    vm.terminate()?;
    let status = vm.wait()?;
    let took = asked.elapsed();
    if status.code() != Some(3) || took < std::time::Duration::from_secs(3) {
        return Err(vm.failure(&format!(
            "a guest ignoring SIGTERM: the launcher exited with {status} after {took:?}"
        )));
    }
    if !vm
        .printed()
        .contains("did not power off within 3 s of SIGTERM")
    {
        return Err(vm.failure("no word of the hard stop"));
    }
    if walk(&root) != before {
        return Err("after a hard stop the pod's files are not as found".into());
    }
    Ok(())
}

/// Every file and folder under `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The launcher scenarios.
pub fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "launcher_boots_a_vmi_from_a_container_disk",
        || hang_tolerant(a_vmi_boots_from_a_container_disk_and_leaves_the_pod_as_it_found_it),
    )]
}
