//! A VMI's spec to the VM podvisor runs: its [`VmConfig`], the files to make before it boots,
//! and what the spec asks that podvisor leaves aside. Every problem names its field's path
//! (`spec.domain.devices.disks[1].cdrom.bus`); all of them are reported at once.

use std::path::PathBuf;

use vmm::config::{
    ConsoleConfig, CpuTopology, CpusConfig, MemoryConfig, PayloadConfig, PlatformConfig, RngConfig,
    VmConfig, HUGEPAGE_SIZES, MAX_VCPUS,
};

mod disks;
mod network;

use super::layout::PodLayout;
use super::quantity;
use super::spec::{Rest, Vmi};

/// How the spec is read.
pub struct Options {
    pub layout: PodLayout,
    /// Start without the spec's network interfaces instead of refusing them.
    pub no_network: bool,
}

/// The VM a VMI asks for.
#[derive(Debug)]
pub struct Launch {
    pub name: String,
    pub namespace: String,
    pub config: VmConfig,
    /// Files to make before the VM boots, in order.
    pub prepare: Vec<Prepare>,
    /// The guest's NICs' places on the pod's networks, to wire before the VM boots.
    pub nics: Vec<PodNic>,
    /// `spec.terminationGracePeriodSeconds` (KubeVirt's default: 30).
    pub grace_period_s: u64,
    /// Fields left aside, one line each.
    pub warnings: Vec<String>,
}

/// A guest NIC on a pod network: its binding, its tap and the pod interface it is bound to.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNic {
    /// Bridge or masquerade (with the ports to forward).
    pub kind: crate::podnet::bridge::Kind,
    /// `eth0` (the pod network), `net1`, ... (Multus networks).
    pub pod_interface: String,
    /// `k6t-<pod interface>`, as KubeVirt names it.
    pub bridge: String,
    pub tap: String,
    /// The guest's MAC (the spec's, or one derived from the VMI and its network).
    pub mac: [u8; 6],
}

/// A file a volume needs before the VM boots.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepare {
    /// A qcow2 image at `path` over the read-only `base` (containerDisk, ephemeral), removed
    /// when the launcher ends.
    Overlay { path: PathBuf, base: PathBuf },
    /// A claim's `disk.img`, or else its block device; in filesystem mode a missing image is
    /// created, sparse, as large as the volume's file system.
    Claim { image: PathBuf, device: PathBuf },
    /// A sparse qcow2 image of `size` bytes (emptyDisk), removed when the launcher ends.
    EmptyDisk { path: PathBuf, size: u64 },
    /// A host disk: must exist, or (`create`) is made sparse at `size` bytes when missing.
    HostDisk {
        path: PathBuf,
        create: bool,
        size: Option<u64>,
    },
    /// A cloud-init disk (NoCloud `cidata`, or a `config-2` config drive), removed when the
    /// launcher ends.
    CloudInit {
        path: PathBuf,
        config_drive: bool,
        instance_id: String,
        hostname: String,
        user_data: Source,
        network_data: Option<Source>,
    },
}

/// Where a cloud-init document comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Text(String),
    /// A file of a mounted secret (`userdata`/`networkdata`, or their camel-case names).
    Secret(PathBuf),
}

/// The spec's problems: one line each, naming the field.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<String>);

impl std::fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.join("\n"))
    }
}

/// Fields that change nothing about the VM podvisor runs (scheduling, bookkeeping, options of
/// devices podvisor has no counterpart for and guests do without): ignored, one warning each.
const HARMLESS: &[(&str, &[&str])] = &[
    ("", &["status"]),
    (
        "metadata",
        &[
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "ownerReferences",
            "finalizers",
            "generateName",
            "selfLink",
        ],
    ),
    (
        "spec",
        &[
            "nodeSelector",
            "affinity",
            "tolerations",
            "topologySpreadConstraints",
            "schedulerName",
            "priorityClassName",
            "evictionStrategy",
            "hostname",
            "subdomain",
            "dnsPolicy",
            "dnsConfig",
            "readinessProbe",
            "livenessProbe",
            "startStrategy",
            "architecture",
            "accessCredentials",
        ],
    ),
    (
        "spec.domain",
        &["machine", "features", "clock", "chassis", "ioThreadsPolicy"],
    ),
    ("spec.domain.resources", &["overcommitGuestOverhead"]),
    (
        "spec.domain.devices",
        &[
            "autoattachGraphicsDevice",
            "autoattachSerialConsole",
            "autoattachMemBalloon",
            "autoattachPodInterface",
            "autoattachVSOCK",
            "blockMultiQueue",
            "networkInterfaceMultiqueue",
            "useVirtioTransitional",
            "logSerialConsole",
        ],
    ),
    ("spec.domain.cpu", &["dedicatedCpuPlacement", "features"]),
    (
        "spec.domain.devices.disks[]",
        &["io", "dedicatedIOThread", "errorPolicy", "tag", "blockSize"],
    ),
    ("spec.domain.devices.disks[].disk", &["pciAddress"]),
    ("spec.domain.devices.disks[].cdrom", &["tray"]),
    (
        "spec.volumes[].containerDisk",
        &["imagePullPolicy", "imagePullSecret"],
    ),
    ("spec.volumes[].persistentVolumeClaim", &["hotpluggable"]),
    ("spec.volumes[].dataVolume", &["hotpluggable"]),
    ("spec.volumes[].hostDisk", &["shared"]),
    (
        "spec.domain.firmware.kernelBoot.container",
        &["imagePullPolicy", "imagePullSecret"],
    ),
];

/// Interface bindings that exist in KubeVirt but not here.
const OTHER_BINDINGS: &[&str] = &["sriov", "slirp", "passt", "macvtap", "binding"];

/// Reads the VMI into a [`Launch`], or every problem it has.
pub fn translate(vmi: &Vmi, options: &Options) -> Result<Launch, SpecErrors> {
    let mut t = Translator {
        options,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let launch = t.vmi(vmi);
    if t.errors.is_empty() {
        Ok(Launch {
            warnings: t.warnings,
            ..launch
        })
    } else {
        Err(SpecErrors(t.errors))
    }
}

struct Translator<'a> {
    options: &'a Options,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Translator<'_> {
    fn error(&mut self, path: &str, message: impl std::fmt::Display) {
        self.errors.push(format!("{path}: {message}"));
    }

    /// Reports the fields of an object at `path` that its type does not read: harmless ones
    /// as warnings, the others as errors. `kind` names the place in [`HARMLESS`] (indices as
    /// `[]`).
    fn rest(&mut self, path: &str, kind: &str, rest: &Rest) {
        let harmless = HARMLESS
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(&[][..], |(_, names)| *names);
        for key in rest.keys() {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if harmless.contains(&key.as_str()) {
                self.warnings.push(format!(
                    "{field}: ignored (it changes nothing podvisor runs)"
                ));
            } else {
                self.error(&field, "not supported by podvisor");
            }
        }
    }

    fn vmi(&mut self, vmi: &Vmi) -> Launch {
        if let Some(v) = vmi
            .api_version
            .as_deref()
            .filter(|v| *v != "kubevirt.io/v1")
        {
            self.error("apiVersion", format!("'{v}', expected kubevirt.io/v1"));
        }
        if let Some(k) = vmi
            .kind
            .as_deref()
            .filter(|k| *k != "VirtualMachineInstance")
        {
            self.error("kind", format!("'{k}', expected VirtualMachineInstance"));
        }
        self.rest("", "", &vmi.rest);
        self.rest("metadata", "metadata", &vmi.metadata.rest);
        let name = vmi.metadata.name.clone().unwrap_or_default();
        if !is_dns_label(&name) {
            self.error(
                "metadata.name",
                format!("'{name}' is not a DNS label (lower-case letters, digits, '-')"),
            );
        }
        let namespace = vmi
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let spec = &vmi.spec;
        self.rest("spec", "spec", &spec.rest);
        let domain = &spec.domain;
        self.rest("spec.domain", "spec.domain", &domain.rest);

        let vcpus = self.vcpus(vmi);
        let memory = self.memory(vmi);
        let payload = self.payload(vmi);
        let platform = self.platform(vmi);
        let (disks, prepare) = self.disks(vmi, &name, &namespace);
        let (net, nics) = self.network(vmi, &name, &namespace);
        let rng = domain.devices.rng.as_ref().map(|_| RngConfig::default());
        self.rest(
            "spec.domain.devices",
            "spec.domain.devices",
            &domain.devices.rest,
        );

        Launch {
            config: VmConfig {
                payload,
                cpus: vcpus,
                memory,
                serial: ConsoleConfig::Tty,
                disks,
                net,
                rng,
                console: None,
                platform,
            },
            prepare,
            nics,
            grace_period_s: spec.termination_grace_period_seconds.unwrap_or(30),
            warnings: Vec::new(),
            name,
            namespace,
        }
    }

    /// The vCPUs and their topology: `cpu.sockets` × `cpu.cores` × `cpu.threads`; without
    /// sockets and cores, as KubeVirt does, as many sockets as the CPU limit (or request)
    /// counts whole CPUs.
    fn vcpus(&mut self, vmi: &Vmi) -> CpusConfig {
        let domain = &vmi.spec.domain;
        let cpu = domain.cpu.as_ref();
        if let Some(cpu) = cpu {
            self.rest("spec.domain.cpu", "spec.domain.cpu", &cpu.rest);
            if let Some(model) = cpu.model.as_deref() {
                if model != "host-passthrough" && model != "host-model" {
                    self.warnings.push(format!(
                        "spec.domain.cpu.model: '{model}' ignored: the guest sees the host's CPU \
                         (host-passthrough)"
                    ));
                }
            }
        }
        let (mut cores, mut sockets, threads) = cpu
            .map(|c| (c.cores, c.sockets, c.threads))
            .unwrap_or_default();
        if cores.is_none() && sockets.is_none() {
            let counted = domain.resources.as_ref().and_then(|r| {
                [("limits", &r.limits), ("requests", &r.requests)]
                    .into_iter()
                    .find_map(|(kind, map)| Some((kind, map.get("cpu")?)))
            });
            if let Some((kind, value)) = counted {
                let n = quantity::cpus(value).and_then(|n| u32::try_from(n).ok());
                if n.is_none() {
                    self.error(
                        &format!("spec.domain.resources.{kind}.cpu"),
                        format!("{value} is not a CPU quantity (e.g. 2, 500m)"),
                    );
                }
                sockets = Some(n.unwrap_or(1).max(1));
                cores = Some(1);
            }
        }
        let [cores, sockets, threads] = [cores, sockets, threads].map(|n| n.unwrap_or(1));
        let count = u64::from(cores) * u64::from(sockets) * u64::from(threads);
        let boot = match u8::try_from(count) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => {
                self.error(
                    "spec.domain.cpu",
                    format!("cores × sockets × threads is {count}; podvisor runs 1 to {MAX_VCPUS} vCPUs"),
                );
                return CpusConfig::new(1);
            }
        };
        // Each count is at most the product, which fits a u8.
        let config = CpusConfig {
            boot_vcpus: boot,
            max_vcpus: None,
            topology: Some(CpuTopology::new(
                threads as u8,
                cores as u8,
                1,
                sockets as u8,
            )),
        };
        if let Err(e) = config.validate() {
            self.error("spec.domain.cpu", e);
        }
        config
    }

    /// Guest RAM: `memory.guest` or the memory request, on the spec's huge pages if any.
    fn memory(&mut self, vmi: &Vmi) -> MemoryConfig {
        let domain = &vmi.spec.domain;
        let mut guest = None;
        let mut hugepage_size = None;
        if let Some(memory) = &domain.memory {
            self.rest("spec.domain.memory", "spec.domain.memory", &memory.rest);
            if let Some(hp) = &memory.hugepages {
                self.rest(
                    "spec.domain.memory.hugepages",
                    "spec.domain.memory.hugepages",
                    &hp.rest,
                );
                let path = "spec.domain.memory.hugepages.pageSize";
                match hp
                    .page_size
                    .as_ref()
                    .map(|q| (q, quantity::bytes(&serde_json::Value::String(q.clone()))))
                {
                    Some((_, Some(size))) if HUGEPAGE_SIZES.contains(&size) => {
                        hugepage_size = Some(size)
                    }
                    Some((q, _)) => self.error(path, format!("{q} is not 2Mi or 1Gi")),
                    None => self.error(path, "missing (2Mi or 1Gi)"),
                }
            }
            guest = memory
                .guest
                .as_ref()
                .map(|q| ("spec.domain.memory.guest", q));
        }
        if let Some(resources) = &domain.resources {
            self.rest(
                "spec.domain.resources",
                "spec.domain.resources",
                &resources.rest,
            );
            for key in resources.limits.keys().filter(|k| *k != "cpu") {
                self.warnings.push(format!(
                    "spec.domain.resources.limits.{key}: ignored (a limit of the pod, not the \
                     guest's size)"
                ));
            }
            if guest.is_none() {
                guest = resources
                    .requests
                    .get("memory")
                    .map(|q| ("spec.domain.resources.requests.memory", q));
            }
        }
        let Some((path, quantity)) = guest else {
            self.error(
                "spec.domain.memory.guest",
                "no guest memory: set it, or spec.domain.resources.requests.memory",
            );
            return MemoryConfig::new(0);
        };
        let size = match quantity::bytes(quantity) {
            // libvirt and QEMU take memory in whole MiB as well: round up.
            Some(bytes) if bytes >= vmm::config::MIN_MEMORY_BYTES => bytes.div_ceil(1 << 20) << 20,
            Some(bytes) => {
                self.error(
                    path,
                    format!(
                        "{bytes} bytes; podvisor needs at least {} MiB",
                        vmm::config::MIN_MEMORY_BYTES >> 20
                    ),
                );
                0
            }
            None => {
                self.error(
                    path,
                    format!("{quantity} is not a quantity (e.g. 1Gi, 512Mi)"),
                );
                0
            }
        };
        if let Some(page) = hugepage_size.filter(|&p| size > 0 && !size.is_multiple_of(p)) {
            self.error(
                path,
                format!(
                    "{} MiB is not a whole number of {} MiB huge pages",
                    size >> 20,
                    page >> 20
                ),
            );
        }
        MemoryConfig {
            size,
            hugepages: hugepage_size.is_some(),
            hugepage_size,
        }
    }

    /// The guest's SMBIOS identity: `firmware.uuid` and `firmware.serial`, as libvirt gives
    /// them to a KubeVirt guest (`/sys/class/dmi/id/product_uuid`, `product_serial`).
    fn platform(&mut self, vmi: &Vmi) -> Option<PlatformConfig> {
        let firmware = vmi.spec.domain.firmware.as_ref()?;
        if firmware.uuid.is_none() && firmware.serial.is_none() {
            return None;
        }
        if let Some(uuid) = firmware
            .uuid
            .as_deref()
            .filter(|u| vmm::boot::smbios::parse_uuid(u).is_none())
        {
            self.error(
                "spec.domain.firmware.uuid",
                format!("'{uuid}' is not a UUID (8-4-4-4-12 hex digits)"),
            );
        }
        if firmware.serial.as_deref().is_some_and(|s| s.contains('\0')) {
            self.error("spec.domain.firmware.serial", "contains a NUL byte");
        }
        let platform = PlatformConfig {
            serial_number: firmware.serial.clone(),
            uuid: firmware.uuid.clone(),
            oem_strings: None,
        };
        Some(platform)
    }

    /// The kernel of `firmware.kernelBoot`; without one, none: the VMM boots the disks' own
    /// menus (their boot loader's configuration), the disks with a `bootOrder` only, lowest
    /// first, when any has one — what firmware and a boot loader would boot.
    fn payload(&mut self, vmi: &Vmi) -> PayloadConfig {
        let empty = PayloadConfig {
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            boot_entry: None,
        };
        let Some(firmware) = &vmi.spec.domain.firmware else {
            return empty;
        };
        let path = "spec.domain.firmware";
        let mut rest = firmware.rest.clone();
        if let Some(bootloader) = rest.remove("bootloader") {
            self.bootloader(&bootloader);
        }
        self.rest(path, path, &rest);
        let Some(kb) = &firmware.kernel_boot else {
            return empty;
        };
        let path = "spec.domain.firmware.kernelBoot";
        self.rest(path, path, &kb.rest);
        let Some(container) = &kb.container else {
            self.error(
                &format!("{path}.container"),
                "missing: the kernel's container",
            );
            return empty;
        };
        let cpath = format!("{path}.container");
        self.rest(&cpath, &cpath, &container.rest);
        if container.image.as_deref().unwrap_or("").is_empty() {
            self.error(&format!("{cpath}.image"), "missing");
        }
        let file = |t: &mut Self, field: &str, value: &Option<String>| -> Option<PathBuf> {
            let v = value.as_deref()?;
            if !v.starts_with('/') || v.split('/').any(|c| c == "..") {
                t.error(
                    &format!("{cpath}.{field}"),
                    format!("'{v}' must be an absolute path in the image, without '..'"),
                );
                return None;
            }
            Some(t.options.layout.kernel_boot(v))
        };
        let kernel = file(self, "kernelPath", &container.kernel_path);
        if container.kernel_path.is_none() {
            self.error(&format!("{cpath}.kernelPath"), "missing");
        }
        let initramfs = file(self, "initrdPath", &container.initrd_path);
        let mut cmdline = kb.kernel_args.clone().unwrap_or_default();
        // The launcher's console is the first serial port.
        if !cmdline
            .split_whitespace()
            .any(|w| w.starts_with("console="))
        {
            cmdline = format!("{cmdline} console=ttyS0").trim().to_owned();
        }
        PayloadConfig {
            kernel,
            initramfs,
            cmdline,
            boot_entry: None,
        }
    }
}

impl Translator<'_> {
    /// `firmware.bootloader`: BIOS or EFI, as KubeVirt's firmware would boot the disk. podvisor
    /// boots the disk's menu itself, with no firmware, which serves both — but it cannot do
    /// Secure Boot (on by default with `efi`), which needs firmware that checks signatures.
    fn bootloader(&mut self, bootloader: &serde_json::Value) {
        let path = "spec.domain.firmware.bootloader";
        let Some(kinds) = bootloader.as_object() else {
            self.error(path, "not an object");
            return;
        };
        let ignored = |kind: &str| {
            format!("{path}.{kind}: ignored (podvisor boots the disk's kernel itself, with no firmware)")
        };
        for (kind, value) in kinds {
            match kind.as_str() {
                "bios" => self.warnings.push(ignored(kind)),
                "efi" => {
                    let secure_boot = value.get("secureBoot");
                    match secure_boot.map(serde_json::Value::as_bool) {
                        None | Some(Some(true)) => self.error(
                            &format!("{path}.efi.secureBoot"),
                            "Secure Boot needs UEFI firmware, and podvisor boots the disk's \
                             kernel itself (set secureBoot: false)",
                        ),
                        Some(Some(false)) => self.warnings.push(ignored(kind)),
                        Some(None) => {
                            self.error(&format!("{path}.efi.secureBoot"), "not true or false")
                        }
                    }
                }
                _ => self.error(&format!("{path}.{kind}"), "not supported by podvisor"),
            }
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
