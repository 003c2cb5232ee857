//! `podvisor launcher --validate` and `--dry-run`, and refused specs, as a user runs them: no
//! VM, no KVM.

use std::io::Write;
use std::process::{Command, Stdio};

fn podvisor(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(args)
        .env_remove("PODVISOR_VMI")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const VMI: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: demo, labels: {a: b}}
spec:
  domain:
    resources: {requests: {memory: 256Mi}}
    firmware: {kernelBoot: {kernelArgs: quiet, container: {image: k, kernelPath: /vmlinux}}}
    devices:
      disks: [{name: data, disk: {bus: virtio}}]
  volumes:
  - name: data
    hostDisk: {path: /var/lib/data.img, type: DiskOrCreate, capacity: 1Gi}
"#;

#[test]
fn validate_and_dry_run() {
    let (rc, out, err) = podvisor(&["launcher", "--vmi", "-", "--validate"], VMI);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "VMI default/demo is valid\n");
    assert_eq!(
        err,
        "podvisor: warning: metadata.labels: ignored (it changes nothing podvisor runs)\n"
    );

    let (rc, out, err) = podvisor(
        &["launcher", "--vmi", "-", "--dry-run", "--pod-root", "/pod"],
        VMI,
    );
    assert_eq!(rc, 0, "{err}");
    let config: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(config["memory"]["size"], 256 << 20);
    assert_eq!(
        config["payload"]["kernel"],
        "/pod/var/run/kubevirt/container-disks/kernel-boot/vmlinux"
    );
    assert_eq!(config["payload"]["cmdline"], "quiet console=ttyS0");
    assert_eq!(config["disks"][0]["path"], "/var/lib/data.img");
    assert_eq!(config["disks"][0]["format"], "raw");
}

#[test]
fn a_bad_vmi_is_every_problem_by_its_field_and_nothing_else() {
    let bad = VMI
        .replace("bus: virtio", "bus: scsi")
        .replace("256Mi", "lots");
    let (rc, out, err) = podvisor(&["launcher", "--vmi", "-", "--validate"], &bad);
    assert_eq!(rc, 1);
    assert_eq!(out, "");
    assert!(
        err.starts_with("podvisor: error: the VMI has 2 problems:\n"),
        "{err}"
    );
    assert!(
        err.contains("  spec.domain.resources.requests.memory: \"lots\" is not a quantity"),
        "{err}"
    );
    assert!(
        err.contains("  spec.domain.devices.disks[0].disk.bus: 'scsi' is not supported"),
        "{err}"
    );
    let (rc, _, err) = podvisor(&["launcher", "--validate"], "");
    assert_eq!(rc, 1);
    assert_eq!(
        err,
        "podvisor: error: no VMI: give --vmi FILE (or -), or set PODVISOR_VMI\n"
    );
    let (rc, _, err) = podvisor(
        &["launcher", "--vmi", "/nonexistent.yaml", "--validate"],
        "",
    );
    assert_eq!(rc, 1);
    assert!(
        err.starts_with("podvisor: error: cannot read the VMI /nonexistent.yaml: "),
        "{err}"
    );
    let (rc, _, err) = podvisor(&["launcher", "--vmi", "-", "--validate"], "spec: [");
    assert_eq!(rc, 1);
    assert!(
        err.starts_with("podvisor: error: the VMI: not a YAML or JSON document"),
        "{err}"
    );
}

/// The example VMIs in resources/k8s/vmis (written as KubeVirt's examples are) validate; the
/// one without kernelBoot boots its disks directly.
#[test]
fn the_example_vmis_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/k8s/vmis");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let (rc, out, err) = podvisor(
            &["launcher", "--vmi", path.to_str().unwrap(), "--validate"],
            "",
        );
        assert_eq!(rc, 0, "{}: {err}", path.display());
        assert!(out.ends_with("is valid\n"), "{out}");
        if path.ends_with("containerdisk-cloudinit.yaml") {
            let (rc, out, err) = podvisor(
                &["launcher", "--vmi", path.to_str().unwrap(), "--dry-run"],
                "",
            );
            assert_eq!(rc, 0, "{err}");
            let config: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(config["payload"].get("kernel"), None, "{out}");
            assert_eq!(config["disks"].as_array().map(Vec::len), Some(2), "{out}");
        }
        seen += 1;
    }
    assert!(seen >= 5, "{seen} examples");
}

/// Every file and folder under `dir`, sorted.
fn tree(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A spec that is refused, or whose volumes cannot be prepared, leaves the pod's folders as
/// they were: nothing made for it stays behind.
#[test]
fn a_refused_vmi_leaves_nothing_behind() {
    let root = std::env::temp_dir().join(format!("podvisor-refused-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("var/run/kubevirt-private")).unwrap();
    let before = tree(&root);
    let pod = root.to_str().unwrap();
    let bad = VMI.replace("bus: virtio", "bus: sata");
    let (rc, _, err) = podvisor(&["launcher", "--vmi", "-", "--pod-root", pod], &bad);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(tree(&root), before);
    // Valid, but its containerDisk's image is not where the pod should hold it; an emptyDisk
    // and a cloud-init seed would be made before it is found missing.
    let missing = r##"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: demo}
spec:
  domain:
    resources: {requests: {memory: 256Mi}}
    firmware: {kernelBoot: {container: {image: k, kernelPath: /vmlinux}}}
  volumes:
  - {name: scratch, emptyDisk: {capacity: 64Mi}}
  - {name: seed, cloudInitNoCloud: {userData: "#cloud-config"}}
  - {name: root, containerDisk: {image: img}}
"##;
    let (rc, _, err) = podvisor(
        &["launcher", "--vmi", "-", "--pod-root", pod, "--no-network"],
        missing,
    );
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.starts_with("podvisor: error: volume 'root': the image "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(tree(&root), before, "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
