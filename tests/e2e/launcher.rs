//! `podvisor launcher`: a KubeVirt VirtualMachineInstance run as a pod's entrypoint would run
//! it, its files where KubeVirt puts them (under a scratch pod root).

use libtest_mimic::{Failed, Trial};

use crate::api::ctl_ok;
use crate::harness::*;

/// A VMI with a kernelBoot kernel, a containerDisk (a qcow2 overlay over a raw base), an
/// emptyDisk, a host disk made on demand, a cloudInitNoCloud seed and a claim boots; the guest reads the
/// base through the overlay and writes over it, and mounts the seed (cidata) and reads its
/// user-data and meta-data; it sees one core of two threads, the firmware's UUID and serial
/// (SMBIOS); `/readyz` answers on TCP; SIGTERM (the pod being deleted) powers the guest off
/// within the grace period and the launcher exits 0; the base is unchanged, the overlay, the empty disk
/// and the folders made for them are gone, and the host disk and the claim (the user's data)
/// stay, the claim with what the guest wrote. A
/// second run, whose guest ignores the button, is stopped at the end of a 3 s grace period
/// (exit status 3), leaving the pod's files as found too; that run has its memory on huge
/// pages and its console on the socket `ctl console` attaches to.
fn a_vmi_boots_from_a_container_disk_and_leaves_the_pod_as_it_found_it() -> Result<(), Failed> {
    let dir = Scratch::new("launcher");
    let root = pod_with_kernel_boot(&dir)?;
    let base = root.join("var/run/kubevirt/container-disks/disk_0.img");
    let mut image = vec![0u8; 8 << 20];
    image[4096..4096 + 14].copy_from_slice(b"from-the-image");
    std::fs::write(&base, &image)?;
    std::fs::create_dir_all(root.join("var/run/kubevirt-ephemeral-disks"))?;
    // A claim as Kubernetes mounts it (filesystem mode), its disk.img already there.
    let claim = root.join("var/run/kubevirt-private/vmi-disks/claim/disk.img");
    std::fs::create_dir_all(claim.parent().unwrap())?;
    let mut claim_data = vec![0u8; 8 << 20];
    claim_data[..10].copy_from_slice(b"claim-data");
    std::fs::write(&claim, &claim_data)?;
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
    cpu: {{cores: 1, threads: 2}}
    memory: {{guest: 256Mi}}
    firmware:
      uuid: 6a1e5c1d-0b7e-4f5c-9a63-2d7c0e9b4f11
      serial: e2e-serial-7
      kernelBoot:
        kernelArgs: quiet
        container: {{image: kernels:1, kernelPath: /boot/vmlinuz, initrdPath: /boot/initrd.img}}
    devices:
      disks:
      - {{name: root, disk: {{bus: virtio}}}}
      - {{name: scratch, disk: {{}}}}
      - {{name: data, disk: {{}}, serial: data-1}}
      - {{name: seed, cdrom: {{bus: virtio}}}}
      - {{name: claim, disk: {{bus: virtio}}}}
  volumes:
  - {{name: root, containerDisk: {{image: images:1}}}}
  - {{name: scratch, emptyDisk: {{capacity: 64Mi}}}}
  - {{name: data, hostDisk: {{path: {}, type: DiskOrCreate, capacity: 16Mi}}}}
  - {{name: claim, persistentVolumeClaim: {{claimName: pvc-1}}}}
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
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let http_arg = http.to_string();
    let launcher = |console_stdio: bool| {
        let mut args = vec![
            "--http-listen",
            &http_arg,
            "--vmi",
            vmi_file.to_str().unwrap(),
            "--pod-root",
            root.to_str().unwrap(),
            "--api-socket",
            &socket,
        ];
        if console_stdio {
            args.push("--console-stdio");
        }
        Vm::spawn("launcher", &args)
    };
    let mut vm = launcher(true);
    vm.expect("podvisor-guest ready: cpus=2")?;
    vm.wait_for_shell()?;
    let seen = vm.shell_ok(
        "dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 14; echo; \
         cat /sys/block/vdb/size /sys/block/vdc/size /sys/block/vdc/serial",
    )?;
    vm.check_holds(
        "the guest's disks",
        &seen,
        &["from-the-image", "131072", "32768", "data-1"],
    )?;
    vm.shell_ok("printf guest-wrote | dd of=/dev/vda bs=4096 seek=2 conv=sync,fsync 2>/dev/null")?;
    // The claim's disk: read, and written for good.
    let on_claim = vm.shell_ok(
        "head -c 10 /dev/vde; echo; \
         printf guest-claim | dd of=/dev/vde bs=4096 seek=1 conv=sync,fsync 2>/dev/null",
    )?;
    if !on_claim.contains("claim-data") {
        return Err(vm.failure(&format!("the claim's disk: {on_claim}")));
    }
    // cores: 1, threads: 2 — one core with two threads; the firmware's UUID and serial are
    // the machine's (SMBIOS).
    let machine = vm.shell_ok(
        "cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list \
             /sys/devices/system/cpu/cpu1/topology/core_id \
             /sys/class/dmi/id/product_uuid /sys/class/dmi/id/product_serial \
             /sys/class/dmi/id/sys_vendor",
    )?;
    let lines: Vec<&str> = machine
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines
        != [
            "0-1",
            "0",
            "6a1e5c1d-0b7e-4f5c-9a63-2d7c0e9b4f11",
            "e2e-serial-7",
            "podvisor",
        ]
    {
        return Err(vm.failure(&format!("the guest's CPU topology and SMBIOS: {machine}")));
    }
    // The cloud-init seed: an ISO 9660 disk labelled cidata, its names as cloud-init wants them.
    let seed = vm.shell_ok(
        "mkdir -p /seed && mount -t iso9660 -o ro /dev/vdd /seed && ls /seed && \
         cat /seed/user-data /seed/meta-data; umount /seed",
    )?;
    vm.check_holds(
        "the cidata disk",
        &seed,
        &[
            "meta-data",
            "user-data",
            "podvisor-seed-marker",
            "instance-id: e2e-vm.pods",
            "local-hostname: e2e-vm",
        ],
    )?;
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
    // The kubelet's httpGet probe, on TCP.
    let readyz = http_get(http, "/readyz")?;
    if !readyz.starts_with("HTTP/1.1 200") || !readyz.ends_with("\r\n\r\nok\n") {
        return Err(vm.failure(&format!("GET /readyz: {readyz}")));
    }
    // Prometheus metrics on the same socket, as the node agent scrapes them.
    let metrics = ctl_ok(&socket, &["metrics"])?;
    vm.check_holds(
        "the metrics",
        &metrics,
        &[
            "kubevirt_vmi_state{state=\"Running\"} 1",
            "kubevirt_vmi_vcpu_seconds_total{id=\"1\"}",
            "kubevirt_vmi_memory_domain_bytes 268435456",
            "kubevirt_vmi_storage_write_traffic_bytes_total{drive=\"root\"}",
        ],
    )?;
    // The guest read its root disk to boot: that took time, and the metric says how much.
    let read_seconds = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("kubevirt_vmi_storage_read_times_seconds_total{drive=\"root\"} ")
        })
        .and_then(|v| v.parse::<f64>().ok());
    if !read_seconds.is_some_and(|s| s > 0.0) {
        return Err(vm.failure(&format!("no read time for the root disk:\n{metrics}")));
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
    let claim_now = std::fs::read(&claim)?;
    if claim_now.len() != 8 << 20 || !claim_now[4096..].starts_with(b"guest-claim") {
        return Err("the claim's disk.img does not hold the guest's write".into());
    }

    // Again as in a pod, the console on its socket and the events on stdout, on 2 MiB huge
    // pages the test host reserves, with a guest that ignores its power button and a 3 s
    // grace period. `ctl console` attaches twice in turn (Ctrl-] detaches; the second sees
    // what the first left on the screen); the launcher is stopped hard at the deadline (exit
    // status 3), the pages are given back and the pod's files are as found all the same.
    let vmi = std::fs::read_to_string(&vmi_file)?
        .replace(
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 3",
        )
        .replace(
            "memory: {guest: 256Mi}",
            "memory: {guest: 256Mi, hugepages: {pageSize: 2Mi}}",
        );
    std::fs::write(&vmi_file, vmi)?;
    let pages = HugePages::reserve(160)?;
    let mut vm = launcher(false);
    vm.expect("\"event\":\"booted\"")?;
    let console = || Vm::spawn("ctl", &["--api-socket", &socket, "console"]);
    let mut first = console();
    first.expect("podvisor-guest ready:")?;
    first.wait_for_shell()?;
    if pages.free()? != 160 - 128 {
        return Err(first.failure(&format!(
            "a 256 MiB guest on 2 MiB pages left {} of 160 free",
            pages.free()?
        )));
    }
    first.shell_ok("echo left-on-screen-$((6*7))")?;
    first.type_line("\u{1d}")?;
    if !first.wait()?.success() || !first.printed().contains("podvisor: detached") {
        return Err(first.failure("ctl console did not detach on Ctrl-]"));
    }
    let mut vm_console = console();
    vm_console.expect("left-on-screen-42")?;
    vm_console.shell_ok("kill $(pidof acpid); while pidof acpid; do sleep 0.1; done")?;
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
    // The console ends with the VM.
    if !vm_console.wait()?.success() || !vm_console.printed().contains("the console closed") {
        return Err(vm_console.failure("ctl console did not end with the VM"));
    }
    if walk(&root) != before {
        return Err("after a hard stop the pod's files are not as found".into());
    }
    if pages.free()? != 160 {
        return Err(format!(
            "{} of 160 huge pages free after the launcher",
            pages.free()?
        )
        .into());
    }
    Ok(())
}

/// A pod root in `dir` holding the default guest's kernel and initramfs where a kernelBoot
/// container puts them (`/boot/vmlinuz`, `/boot/initrd.img` of image `kernel-boot`).
pub fn pod_with_kernel_boot(dir: &Scratch) -> Result<std::path::PathBuf, Failed> {
    let root = dir.path("pod");
    let kernel_boot = root.join("var/run/kubevirt/container-disks/kernel-boot/boot");
    std::fs::create_dir_all(&kernel_boot)?;
    std::fs::copy(guest("bzImage"), kernel_boot.join("vmlinuz"))?;
    std::fs::copy(guest("initramfs.cpio.gz"), kernel_boot.join("initrd.img"))?;
    Ok(root)
}

/// `GET path` over TCP: the whole answer.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, Failed> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// 2 MiB huge pages the test host reserves for a test, given back when dropped.
struct HugePages {
    before: String,
}

const HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

impl HugePages {
    fn reserve(n: u64) -> Result<Self, Failed> {
        let path = format!("{HUGEPAGES_2M}/nr_hugepages");
        let before = std::fs::read_to_string(&path)?;
        std::fs::write(&path, n.to_string())?;
        let pages = HugePages { before };
        if pages.free()? != n {
            return Err(
                format!("the test host reserved {} of {n} huge pages", pages.free()?).into(),
            );
        }
        Ok(pages)
    }

    /// Pages neither in use nor reserved by a mapping (a guest's are reserved when it starts,
    /// and in use once touched).
    fn free(&self) -> Result<u64, Failed> {
        let read = |name: &str| -> Result<u64, Failed> {
            let text = std::fs::read_to_string(format!("{HUGEPAGES_2M}/{name}"))?;
            Ok(text.trim().parse()?)
        };
        Ok(read("free_hugepages")? - read("resv_hugepages")?)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{HUGEPAGES_2M}/nr_hugepages"), self.before.trim());
    }
}

/// Every file and folder under `dir`, sorted.
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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
/// The launcher's container image (resources/k8s/Containerfile), built offline with Debian's
/// podman from the podvisor binary under test, runs a VMI handed over in `PODVISOR_VMI` with
/// the pod's folders mounted where KubeVirt mounts them and `/dev/kvm` passed in: the guest
/// boots, reads its containerDisk through the overlay the launcher makes in the pod's folder,
/// and its power-off ends the container with status 0 and the overlay removed.
fn the_launcher_image_runs_a_vmi_under_podman() -> Result<(), Failed> {
    let dir = Scratch::new("podman");
    let context = dir.path("context");
    std::fs::create_dir_all(context.join("target/release"))?;
    // Without its debug info: the debug build is 140 MB, which podman's vfs storage copies
    // four times over in the emulated test host (a minute and a half of this scenario).
    let binary = context.join("target/release/podvisor");
    host_ok(
        "strip",
        &["--strip-debug", "-o", binary.to_str().unwrap(), podvisor()],
    )?;
    let root = dir.path("pod");
    let kernel_boot = root.join("var/run/kubevirt/container-disks/kernel-boot/boot");
    std::fs::create_dir_all(&kernel_boot)?;
    std::fs::copy(guest("bzImage"), kernel_boot.join("vmlinuz"))?;
    std::fs::copy(guest("initramfs.cpio.gz"), kernel_boot.join("initrd.img"))?;
    for folder in [
        "kubevirt-ephemeral-disks",
        "kubevirt-private",
        "kubevirt/sockets",
    ] {
        std::fs::create_dir_all(root.join("var/run").join(folder))?;
    }
    let base = root.join("var/run/kubevirt/container-disks/disk_0.img");
    let mut base_image = vec![0u8; 8 << 20];
    base_image[..12].copy_from_slice(b"boxed-image!");
    std::fs::write(&base, &base_image)?;
    // Storage of its own, on the scratch folder, so nothing is left in the test host's.
    let storage = [
        "--root".to_owned(),
        dir.arg("storage"),
        "--runroot".to_owned(),
        dir.arg("run"),
        "--storage-driver".to_owned(),
        "vfs".to_owned(),
    ];
    let podman = |args: &[&str]| {
        let mut cmd = std::process::Command::new("podman");
        cmd.args(&storage).args(args);
        cmd
    };
    let image = "localhost/podvisor-launcher:e2e";
    let containerfile = repo_root().join("resources/k8s/Containerfile");
    let built = podman(&[
        "build",
        "--quiet",
        "-f",
        containerfile.to_str().unwrap(),
        "-t",
        image,
        context.to_str().unwrap(),
    ])
    .output()?;
    if !built.status.success() {
        return Err(format!(
            "podman build: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        )
        .into());
    }
    let vmi = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: boxed, namespace: pods}
spec:
  terminationGracePeriodSeconds: 30
  domain:
    memory: {guest: 256Mi}
    firmware:
      serial: in-a-container
      kernelBoot:
        kernelArgs: quiet
        container: {image: kernels:1, kernelPath: /boot/vmlinuz, initrdPath: /boot/initrd.img}
    devices:
      disks:
      - {name: root, disk: {bus: virtio}}
  volumes:
  - {name: root, containerDisk: {image: images:1}}
"#;
    let mut mounts = Vec::new();
    for folder in ["kubevirt", "kubevirt-ephemeral-disks", "kubevirt-private"] {
        let host = root.join("var/run").join(folder);
        mounts.push("-v".to_owned());
        mounts.push(format!("{}:/var/run/{folder}", host.display()));
    }
    let mut run = podman(&[
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "--device",
        "/dev/kvm",
        "-e",
        "PODVISOR_VMI",
    ]);
    run.env("PODVISOR_VMI", vmi)
        .args(&mounts)
        .args([image, "--console-stdio"]);
    let mut vm = Vm::spawn_command(run);
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    let seen = vm.shell_ok("cat /sys/class/dmi/id/product_serial; head -c 12 /dev/vda; echo")?;
    if !seen.contains("in-a-container") || !seen.contains("boxed-image!") {
        return Err(vm.failure(&format!("the guest's serial number and disk: {seen}")));
    }
    // The guest's power-off ends the launcher, and with it the container, with status 0.
    vm.poweroff()?;
    // The engine's storage goes with the scratch folder (vfs layers are plain folders).
    if std::fs::read(&base)? != base_image {
        return Err("the containerDisk's base image changed".into());
    }
    let overlays = root.join("var/run/kubevirt-ephemeral-disks");
    if std::fs::read_dir(&overlays)?.next().is_some() {
        return Err("the container left files in the pod's ephemeral-disks folder".into());
    }
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("launcher_boots_a_vmi_from_a_container_disk", || {
            hang_tolerant(a_vmi_boots_from_a_container_disk_and_leaves_the_pod_as_it_found_it)
        }),
        Trial::test("launcher_image_runs_under_podman", || {
            hang_tolerant(the_launcher_image_runs_a_vmi_under_podman)
        }),
    ]
}
