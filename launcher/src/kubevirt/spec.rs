//! The part of a KubeVirt `VirtualMachineInstance` (kubevirt.io/v1) that the launcher reads,
//! as serde types. Every object keeps the fields it does not name in `rest`, so that
//! [`super::translate`] can tell the user about each one, by its path: ignored with a warning
//! when it is harmless here, refused when the VM would not be what the spec asks for.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Fields an object has beyond the ones its type names.
pub type Rest = BTreeMap<String, Value>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vmi {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Metadata,
    pub spec: VmiSpec,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    pub domain: Domain,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub networks: Vec<Network>,
    pub termination_grace_period_seconds: Option<u64>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    pub cpu: Option<Cpu>,
    pub memory: Option<Memory>,
    pub resources: Option<Resources>,
    pub firmware: Option<Firmware>,
    #[serde(default)]
    pub devices: Devices,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct Cpu {
    pub cores: Option<u32>,
    pub sockets: Option<u32>,
    pub threads: Option<u32>,
    pub model: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct Memory {
    pub guest: Option<Value>,
    pub hugepages: Option<Hugepages>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hugepages {
    pub page_size: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, Value>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Firmware {
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub kernel_boot: Option<KernelBoot>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    pub kernel_args: Option<String>,
    pub container: Option<KernelBootContainer>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelBootContainer {
    pub image: Option<String>,
    pub kernel_path: Option<String>,
    pub initrd_path: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
pub struct Devices {
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    pub rng: Option<Value>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: Option<String>,
    pub disk: Option<DiskTarget>,
    pub cdrom: Option<DiskTarget>,
    pub lun: Option<DiskTarget>,
    pub serial: Option<String>,
    pub boot_order: Option<u32>,
    pub cache: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

/// `disk`, `cdrom` or `lun`: how the guest sees the volume.
#[derive(Debug, Deserialize)]
pub struct DiskTarget {
    pub bus: Option<String>,
    pub readonly: Option<bool>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: Option<String>,
    pub bridge: Option<Value>,
    pub masquerade: Option<Value>,
    pub mac_address: Option<String>,
    pub model: Option<String>,
    #[serde(default)]
    pub ports: Vec<Value>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: Option<String>,
    pub container_disk: Option<ContainerDisk>,
    pub persistent_volume_claim: Option<ClaimRef>,
    pub data_volume: Option<DataVolumeRef>,
    pub empty_disk: Option<EmptyDisk>,
    pub host_disk: Option<HostDisk>,
    pub ephemeral: Option<Ephemeral>,
    pub cloud_init_no_cloud: Option<CloudInit>,
    pub cloud_init_config_drive: Option<CloudInit>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerDisk {
    pub image: Option<String>,
    pub path: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    pub claim_name: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct DataVolumeRef {
    pub name: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct EmptyDisk {
    pub capacity: Option<Value>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct HostDisk {
    pub path: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub capacity: Option<Value>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ephemeral {
    pub persistent_volume_claim: Option<ClaimRef>,
    #[serde(flatten)]
    pub rest: Rest,
}

/// `cloudInitNoCloud` and `cloudInitConfigDrive` share their fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    pub user_data: Option<String>,
    pub user_data_base64: Option<String>,
    pub user_data_secret_ref: Option<SecretRef>,
    pub network_data: Option<String>,
    pub network_data_base64: Option<String>,
    pub network_data_secret_ref: Option<SecretRef>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct SecretRef {
    pub name: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Debug, Deserialize)]
pub struct Network {
    pub name: Option<String>,
    pub pod: Option<Value>,
    pub multus: Option<Value>,
    #[serde(flatten)]
    pub rest: Rest,
}
