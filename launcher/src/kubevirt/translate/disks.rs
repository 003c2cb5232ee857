//! A VMI's disks and volumes: which file each disk is, in which format, and what must be made
//! before the VM boots.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;
use vmm::config::{BackingFilesConfig, DiskConfig};

use super::{Prepare, Source, Translator};
use crate::kubevirt::quantity;
use crate::kubevirt::spec::{CloudInit, Disk, DiskTarget, Rest, Vmi, Volume};

impl Translator<'_> {
    pub(super) fn disks(
        &mut self,
        vmi: &Vmi,
        name: &str,
        namespace: &str,
    ) -> (Vec<DiskConfig>, Vec<Prepare>) {
        let spec = &vmi.spec;
        let mut volumes: BTreeMap<&str, (usize, &Volume)> = BTreeMap::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let path = format!("spec.volumes[{i}]");
            match v.name.as_deref() {
                None | Some("") => self.error(&format!("{path}.name"), "missing"),
                Some(n) if volumes.contains_key(n) => self.error(
                    &format!("{path}.name"),
                    format!("a second volume named '{n}'"),
                ),
                Some(n) => {
                    volumes.insert(n, (i, v));
                }
            }
        }
        let mut disks = Vec::new();
        let mut prepare = Vec::new();
        let mut used: BTreeMap<&str, usize> = BTreeMap::new();
        let mut boot_orders: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, disk) in spec.domain.devices.disks.iter().enumerate() {
            let path = format!("spec.domain.devices.disks[{i}]");
            self.rest(&path, "spec.domain.devices.disks[]", &disk.rest);
            let Some(disk_name) = disk.name.as_deref().filter(|n| !n.is_empty()) else {
                self.error(&format!("{path}.name"), "missing");
                continue;
            };
            if let Some(first) = used.insert(disk_name, i) {
                self.error(
                    &format!("{path}.name"),
                    format!("'{disk_name}' is also disks[{first}]"),
                );
                continue;
            }
            if let Some(order) = disk.boot_order {
                if order == 0 {
                    self.error(&format!("{path}.bootOrder"), "must be 1 or more");
                } else if let Some(other) = boot_orders.insert(order, i) {
                    self.error(
                        &format!("{path}.bootOrder"),
                        format!("{order} is also the boot order of disks[{other}]"),
                    );
                }
            }
            let Some(&(index, volume)) = volumes.get(disk_name) else {
                self.error(
                    &format!("{path}.name"),
                    format!("no volume named '{disk_name}' in spec.volumes"),
                );
                continue;
            };
            let readonly = self.target(&path, disk);
            self.volume(
                index,
                volume,
                disk,
                readonly,
                (name, namespace),
                &mut disks,
                &mut prepare,
            );
        }
        // KubeVirt gives a volume no disk names a virtio disk of its own.
        for (volume_name, &(index, volume)) in &volumes {
            if !used.contains_key(volume_name) {
                let implied = Disk {
                    name: Some((*volume_name).to_owned()),
                    disk: None,
                    cdrom: None,
                    lun: None,
                    serial: None,
                    boot_order: None,
                    cache: None,
                    rest: Rest::new(),
                };
                self.volume(
                    index,
                    volume,
                    &implied,
                    false,
                    (name, namespace),
                    &mut disks,
                    &mut prepare,
                );
            }
        }
        (disks, prepare)
    }

    /// Checks a disk's `disk`/`cdrom`/`lun`; returns whether the guest sees it read-only.
    fn target(&mut self, path: &str, disk: &Disk) -> bool {
        let targets: Vec<(&str, &DiskTarget)> = [
            ("disk", &disk.disk),
            ("cdrom", &disk.cdrom),
            ("lun", &disk.lun),
        ]
        .into_iter()
        .filter_map(|(k, t)| t.as_ref().map(|t| (k, t)))
        .collect();
        if targets.len() > 1 {
            self.error(path, "more than one of disk, cdrom and lun");
        }
        if let Some(cache) = disk.cache.as_deref() {
            if !matches!(cache, "none" | "writeback") {
                self.error(
                    &format!("{path}.cache"),
                    format!("'{cache}' is not supported (none or writeback)"),
                );
            }
        }
        if let Some(serial) = &disk.serial {
            if serial.len() > 20 {
                self.error(
                    &format!("{path}.serial"),
                    format!("'{serial}' is longer than 20 bytes"),
                );
            }
        }
        let Some(&(kind, target)) = targets.first() else {
            return false;
        };
        let tpath = format!("{path}.{kind}");
        self.rest(
            &tpath,
            &format!("spec.domain.devices.disks[].{kind}"),
            &target.rest,
        );
        // KubeVirt's default bus: virtio for disks and luns, sata for CD-ROMs.
        let bus = target
            .bus
            .as_deref()
            .unwrap_or(if kind == "cdrom" { "sata" } else { "virtio" });
        if bus != "virtio" {
            self.error(
                &format!("{tpath}.bus"),
                format!("'{bus}' is not supported: podvisor's disks are virtio (bus: virtio)"),
            );
        }
        target.readonly.unwrap_or(kind == "cdrom")
    }

    #[allow(clippy::too_many_arguments)]
    fn volume(
        &mut self,
        index: usize,
        volume: &Volume,
        disk: &Disk,
        readonly: bool,
        (vmi_name, namespace): (&str, &str),
        disks: &mut Vec<DiskConfig>,
        prepare: &mut Vec<Prepare>,
    ) {
        let layout = &self.options.layout;
        let path = format!("spec.volumes[{index}]");
        let name = volume.name.clone().unwrap_or_default();
        self.rest(&path, "spec.volumes[]", &volume.rest);
        let kinds = [
            volume.container_disk.is_some(),
            volume.persistent_volume_claim.is_some(),
            volume.data_volume.is_some(),
            volume.empty_disk.is_some(),
            volume.host_disk.is_some(),
            volume.ephemeral.is_some(),
            volume.cloud_init_no_cloud.is_some(),
            volume.cloud_init_config_drive.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds != 1 {
            if kinds == 0 && volume.rest.is_empty() {
                self.error(
                    &path,
                    "no volume source (containerDisk, persistentVolumeClaim, ...)",
                );
            } else if kinds > 1 {
                self.error(&path, "more than one volume source");
            }
            return;
        }
        // A claim mounted read-only can only be read.
        let claim_read_only = volume
            .persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.read_only);
        let (file, format, prep) = if let Some(cd) = &volume.container_disk {
            let p = format!("{path}.containerDisk");
            self.rest(&p, "spec.volumes[].containerDisk", &cd.rest);
            if cd.image.as_deref().unwrap_or("").is_empty() {
                self.error(&format!("{p}.image"), "missing");
            }
            if cd.path.is_some() {
                self.warnings.push(format!(
                    "{p}.path: ignored (the image is where the pod's containerDisk volume puts it)"
                ));
            }
            let overlay = layout.overlay(&name);
            (
                overlay.clone(),
                "qcow2",
                Prepare::Overlay {
                    path: overlay,
                    base: layout.container_disk(index),
                },
            )
        } else if volume.persistent_volume_claim.is_some() || volume.data_volume.is_some() {
            // A claim, named directly or through its DataVolume: mounted the same way.
            let (p, rest, name_field, claim_name) =
                match (&volume.persistent_volume_claim, &volume.data_volume) {
                    (Some(c), _) => ("persistentVolumeClaim", &c.rest, "claimName", &c.claim_name),
                    (None, Some(dv)) => ("dataVolume", &dv.rest, "name", &dv.name),
                    (None, None) => unreachable!("one of the two, checked above"),
                };
            self.rest(&format!("{path}.{p}"), &format!("spec.volumes[].{p}"), rest);
            if claim_name.as_deref().unwrap_or("").is_empty() {
                self.error(&format!("{path}.{p}.{name_field}"), "missing");
            }
            let image = layout.claim_image(&name);
            (
                image.clone(),
                "raw",
                Prepare::Claim {
                    image,
                    device: layout.claim_device(&name),
                },
            )
        } else if let Some(empty) = &volume.empty_disk {
            let p = format!("{path}.emptyDisk");
            self.rest(&p, "spec.volumes[].emptyDisk", &empty.rest);
            let size = self.capacity(&format!("{p}.capacity"), empty.capacity.as_ref(), true);
            let file = layout.empty_disk(&name);
            (
                file.clone(),
                "qcow2",
                Prepare::EmptyDisk {
                    path: file,
                    size: size.unwrap_or(0),
                },
            )
        } else if let Some(host) = &volume.host_disk {
            let p = format!("{path}.hostDisk");
            self.rest(&p, "spec.volumes[].hostDisk", &host.rest);
            let file = PathBuf::from(host.path.clone().unwrap_or_default());
            if !file.is_absolute() {
                self.error(&format!("{p}.path"), "missing, or not an absolute path");
            }
            let create = match host.kind.as_deref() {
                Some("Disk") => false,
                Some("DiskOrCreate") => true,
                other => {
                    self.error(
                        &format!("{p}.type"),
                        format!("{other:?}: Disk or DiskOrCreate"),
                    );
                    false
                }
            };
            let size = self.capacity(&format!("{p}.capacity"), host.capacity.as_ref(), create);
            (
                file.clone(),
                "raw",
                Prepare::HostDisk {
                    path: file,
                    create,
                    size,
                },
            )
        } else if let Some(eph) = &volume.ephemeral {
            let p = format!("{path}.ephemeral");
            self.rest(&p, "spec.volumes[].ephemeral", &eph.rest);
            if eph.persistent_volume_claim.is_none() {
                self.error(&format!("{p}.persistentVolumeClaim"), "missing");
            }
            let overlay = layout.overlay(&name);
            (
                overlay.clone(),
                "qcow2",
                Prepare::Overlay {
                    path: overlay,
                    base: layout.claim_image(&name),
                },
            )
        } else {
            let (config_drive, ci, field) =
                match (&volume.cloud_init_no_cloud, &volume.cloud_init_config_drive) {
                    (Some(ci), _) => (false, ci, "cloudInitNoCloud"),
                    (None, Some(ci)) => (true, ci, "cloudInitConfigDrive"),
                    (None, None) => unreachable!("exactly one volume source, checked above"),
                };
            let p = format!("{path}.{field}");
            let (user_data, network_data) = self.cloud_init(&p, &name, ci);
            let file = layout.cloud_init(namespace, vmi_name, config_drive);
            (
                file.clone(),
                "raw",
                Prepare::CloudInit {
                    path: file,
                    config_drive,
                    instance_id: format!("{vmi_name}.{namespace}"),
                    hostname: vmi_name.to_owned(),
                    user_data,
                    network_data,
                },
            )
        };
        let readonly = readonly || claim_read_only || matches!(prep, Prepare::CloudInit { .. });
        // An overlay's image may name the base it was made over, and nothing else.
        let backing_files = match &prep {
            Prepare::Overlay { base, .. } => BackingFilesConfig::Under(base.clone()),
            _ => BackingFilesConfig::default(),
        };
        disks.push(DiskConfig {
            path: file,
            format: Some(format.into()),
            backing_files,
            readonly,
            direct: disk.cache.as_deref() == Some("none"),
            serial: disk.serial.clone(),
            num_queues: None,
            id: Some(name),
            boot_order: disk.boot_order,
        });
        prepare.push(prep);
    }

    fn capacity(&mut self, path: &str, value: Option<&Value>, required: bool) -> Option<u64> {
        match value.map(|v| (v, quantity::bytes(v))) {
            None if required => {
                self.error(path, "missing");
                None
            }
            None => None,
            Some((_, Some(bytes))) if bytes > 0 => Some(bytes.div_ceil(512) * 512),
            Some((v, _)) => {
                self.error(path, format!("{v} is not a positive quantity (e.g. 2Gi)"));
                None
            }
        }
    }

    fn cloud_init(&mut self, path: &str, volume: &str, ci: &CloudInit) -> (Source, Option<Source>) {
        self.rest(path, "spec.volumes[].cloudInit", &ci.rest);
        let secret = self.options.layout.secret(volume);
        let doc = |t: &mut Self,
                   what: &str,
                   text: &Option<String>,
                   base64: &Option<String>,
                   secret_ref: &Option<crate::kubevirt::spec::SecretRef>|
         -> Option<Source> {
            let given = [text.is_some(), base64.is_some(), secret_ref.is_some()]
                .iter()
                .filter(|g| **g)
                .count();
            if given > 1 {
                t.error(
                    path,
                    format!("more than one of {what}, {what}Base64 and {what}SecretRef"),
                );
            }
            if let Some(text) = text {
                return Some(Source::Text(text.clone()));
            }
            if let Some(b64) = base64 {
                use base64::Engine;
                let compact: String = b64.split_whitespace().collect();
                return match base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map(String::from_utf8)
                {
                    Ok(Ok(text)) => Some(Source::Text(text)),
                    _ => {
                        t.error(&format!("{path}.{what}Base64"), "not base64 of UTF-8 text");
                        None
                    }
                };
            }
            if let Some(r) = secret_ref {
                t.rest(&format!("{path}.{what}SecretRef"), "", &r.rest);
                if r.name.as_deref().unwrap_or("").is_empty() {
                    t.error(&format!("{path}.{what}SecretRef.name"), "missing");
                }
                // KubeVirt mounts the secret per volume; the key is the lower-case name.
                return Some(Source::Secret(secret.join(what.to_lowercase())));
            }
            None
        };
        let user = doc(
            self,
            "userData",
            &ci.user_data,
            &ci.user_data_base64,
            &ci.user_data_secret_ref,
        );
        let network = doc(
            self,
            "networkData",
            &ci.network_data,
            &ci.network_data_base64,
            &ci.network_data_secret_ref,
        );
        let user = user.unwrap_or_else(|| {
            self.error(path, "no userData, userDataBase64 or userDataSecretRef");
            Source::Text(String::new())
        });
        (user, network)
    }
}
