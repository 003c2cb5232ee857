//! Where KubeVirt puts a VM's files in its pod, under a root: `/` in a pod, a scratch
//! directory in tests (`podvisor launcher --pod-root`).

use std::path::PathBuf;

/// The pod's file layout.
#[derive(Clone, Debug)]
pub struct PodLayout {
    root: PathBuf,
}

impl PodLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PodLayout { root: root.into() }
    }

    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The read-only image of the containerDisk that is volume `index` of the spec.
    pub fn container_disk(&self, index: usize) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt/container-disks/disk_{index}.img"
        ))
    }

    /// A file of the kernelBoot container (its `kernelPath` or `initrdPath`).
    pub fn kernel_boot(&self, path_in_image: &str) -> PathBuf {
        self.at("/var/run/kubevirt/container-disks/kernel-boot")
            .join(path_in_image.trim_start_matches('/'))
    }

    /// The writable overlay of an ephemeral volume (containerDisk, ephemeral).
    pub fn overlay(&self, volume: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt-ephemeral-disks/disk-data/{volume}/disk.qcow2"
        ))
    }

    /// A claim's (PVC, DataVolume) image in filesystem mode.
    pub fn claim_image(&self, volume: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt-private/vmi-disks/{volume}/disk.img"
        ))
    }

    /// A claim's block device in block mode.
    pub fn claim_device(&self, volume: &str) -> PathBuf {
        self.at(&format!("/dev/{volume}"))
    }

    /// An emptyDisk's image.
    pub fn empty_disk(&self, volume: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt-ephemeral-disks/empty-disks/{volume}.qcow2"
        ))
    }

    /// The disk a cloud-init volume becomes.
    pub fn cloud_init(&self, namespace: &str, name: &str, config_drive: bool) -> PathBuf {
        let file = if config_drive {
            "configdrive.iso"
        } else {
            "noCloud.iso"
        };
        self.at(&format!(
            "/var/run/kubevirt-ephemeral-disks/cloud-init-data/{namespace}/{name}/{file}"
        ))
    }

    /// A secret's files, mounted for a cloud-init volume's `...SecretRef`.
    pub fn secret(&self, volume: &str) -> PathBuf {
        self.at(&format!("/var/run/kubevirt-private/secret/{volume}"))
    }

    /// The serial console's socket (`podvisor ctl console`, as `virtctl console`).
    pub fn console_socket(&self, namespace: &str, name: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt-private/{namespace}_{name}/virt-serial0"
        ))
    }

    /// The file that says the guest runs (the pod's readiness probe reads it).
    pub fn ready_file(&self) -> PathBuf {
        self.at("/var/run/kubevirt-infra/healthy")
    }

    /// What a pod interface had before its bridge binding took its address (kept while the
    /// binding holds it, for the next launcher if this one is killed).
    pub fn pod_interface_record(&self, interface: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt-private/podnet-{interface}.json"
        ))
    }

    /// The pod's resolver configuration, whose name servers and search domains the guest
    /// is given.
    pub fn resolv_conf(&self) -> PathBuf {
        self.at("/etc/resolv.conf")
    }

    /// The API socket the node talks to.
    pub fn api_socket(&self, namespace: &str, name: &str) -> PathBuf {
        self.at(&format!(
            "/var/run/kubevirt/sockets/{namespace}_{name}.sock"
        ))
    }
}
