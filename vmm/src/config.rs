//! What a VM is made of, as the user asked for it. The CLI and the REST API (`vm.create`, in
//! Cloud Hypervisor's JSON shapes) both map to these types; [`VmConfig::validate`] checks them
//! once, after which the VMM trusts them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Smallest guest the VMM accepts.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
/// Largest vCPU count: APIC IDs must stay below the xAPIC broadcast ID 0xff.
pub const MAX_VCPUS: u8 = 254;

/// The kernel to boot and what to hand it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// A bzImage, or an ELF vmlinux with a PVH entry point. Without one, the first disk that
    /// has a boot menu is booted directly (see [`crate::boot::disk`]): its default entry, or
    /// `boot_entry`, with `cmdline` appended to the entry's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// Booting a disk: the entry to boot (its number in the menu, from 0, or its title).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_entry: Option<String>,
}

/// vCPUs of the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    /// Cloud Hypervisor's hotplug ceiling. podvisor has no vCPU hotplug: when given, it must
    /// equal `boot_vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
    /// How the vCPUs are arranged; without it, each is a single-threaded core of one socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
}

/// Threads × cores × dies × packages (sockets), as Cloud Hypervisor's `topology`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

impl CpuTopology {
    pub const fn new(
        threads_per_core: u8,
        cores_per_die: u8,
        dies_per_package: u8,
        packages: u8,
    ) -> Self {
        CpuTopology {
            threads_per_core,
            cores_per_die,
            dies_per_package,
            packages,
        }
    }

    /// How many vCPUs it holds.
    pub fn vcpus(&self) -> u32 {
        [
            self.threads_per_core,
            self.cores_per_die,
            self.dies_per_package,
            self.packages,
        ]
        .iter()
        .map(|&n| u32::from(n))
        .product()
    }
}

impl CpusConfig {
    /// `n` vCPUs at boot, no hotplug ceiling given.
    pub fn new(boot_vcpus: u8) -> Self {
        CpusConfig {
            boot_vcpus,
            max_vcpus: None,
            topology: None,
        }
    }

    /// Parses the CLI's `--cpus`: `N`, or `boot=N[,topology=THREADS:CORES:DIES:PACKAGES]` (as
    /// Cloud Hypervisor's).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let what = "--cpus";
        if let Ok(n) = s.parse::<u64>() {
            return u8::try_from(n)
                .map(CpusConfig::new)
                .map_err(|_| ConfigError::Vcpus(n));
        }
        let mut boot = None;
        let mut topology = None;
        for (key, value) in parse_options(what, s, &["boot", "topology"])? {
            match key {
                "boot" => {
                    boot = Some(value.parse::<u8>().map_err(|_| {
                        ConfigError::Options(format!(
                            "{what}: boot={value}: expected a number of vCPUs (1 to {MAX_VCPUS})"
                        ))
                    })?)
                }
                _ => {
                    let n: Vec<u8> = value
                        .split(':')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()
                        .filter(|n: &Vec<u8>| n.len() == 4)
                        .ok_or_else(|| {
                            ConfigError::Options(format!(
                                "{what}: topology={value}: expected \
                                 THREADS_PER_CORE:CORES_PER_DIE:DIES_PER_PACKAGE:PACKAGES"
                            ))
                        })?;
                    topology = Some(CpuTopology {
                        threads_per_core: n[0],
                        cores_per_die: n[1],
                        dies_per_package: n[2],
                        packages: n[3],
                    });
                }
            }
        }
        // Without boot=, the topology says how many.
        let boot = match (boot, &topology) {
            (Some(b), _) => b,
            (None, Some(t)) => u8::try_from(t.vcpus()).map_err(|_| {
                ConfigError::Options(format!(
                    "{what}: topology={}:{}:{}:{} is {} vCPUs; podvisor runs 1 to {MAX_VCPUS}",
                    t.threads_per_core,
                    t.cores_per_die,
                    t.dies_per_package,
                    t.packages,
                    t.vcpus()
                ))
            })?,
            (None, None) => {
                return Err(ConfigError::Options(format!(
                    "{what}: '{s}': expected N or boot=N[,topology=T:C:D:P]"
                )))
            }
        };
        Ok(CpusConfig {
            boot_vcpus: boot,
            max_vcpus: None,
            topology,
        })
    }

    /// Checks the count and the topology.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.boot_vcpus == 0 || self.boot_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.boot_vcpus.into()));
        }
        if let Some(max) = self.max_vcpus {
            if max != self.boot_vcpus {
                return Err(ConfigError::MaxVcpus {
                    boot: self.boot_vcpus,
                    max,
                });
            }
        }
        if let Some(t) = &self.topology {
            let topology = crate::vstate::topology::Topology::of(self);
            if t.vcpus() == 0 {
                return Err(ConfigError::Topology(
                    "every count must be at least 1".into(),
                ));
            }
            let describe = || {
                format!(
                    "{} threads per core × {} cores per die × {} dies per package × {} packages",
                    t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages
                )
            };
            if t.vcpus() != u32::from(self.boot_vcpus) {
                return Err(ConfigError::Topology(format!(
                    "{} is {} vCPUs, not boot_vcpus ({})",
                    describe(),
                    t.vcpus(),
                    self.boot_vcpus
                )));
            }
            let max = topology.max_apic_id(self.boot_vcpus);
            if max >= 0xff {
                return Err(ConfigError::Topology(format!(
                    "{} numbers its vCPUs up to APIC ID {max}; podvisor's xAPIC IDs end at 254",
                    describe()
                )));
            }
        }
        Ok(())
    }
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes; a multiple of 4 KiB (of the huge page size with `hugepages`).
    pub size: u64,
    /// Back guest RAM with the host's reserved huge pages (hugetlbfs), not ordinary memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hugepages: bool,
    /// Their size in bytes, 2 MiB or 1 GiB; without it, the host's default huge page size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
}

/// Huge page sizes x86_64 hosts have.
pub const HUGEPAGE_SIZES: [u64; 2] = [2 << 20, 1 << 30];

impl MemoryConfig {
    /// `size` bytes of ordinary memory.
    pub fn new(size: u64) -> Self {
        MemoryConfig {
            size,
            hugepages: false,
            hugepage_size: None,
        }
    }

    /// Parses the CLI's `--memory`: `SIZE`, or `size=SIZE[,hugepages=on]
    /// [,hugepage_size=2M|1G]` (as Cloud Hypervisor's).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let what = "--memory";
        if !s.contains('=') {
            return parse_size(s)
                .map(MemoryConfig::new)
                .map_err(|e| ConfigError::Options(format!("{what}: {e}")));
        }
        let mut size = None;
        let mut memory = MemoryConfig::new(0);
        for (key, value) in parse_options(what, s, &["size", "hugepages", "hugepage_size"])? {
            let bytes = |v: &str| {
                parse_size(v).map_err(|e| ConfigError::Options(format!("{what}: {key}=: {e}")))
            };
            match key {
                "size" => size = Some(bytes(value)?),
                "hugepages" => memory.hugepages = parse_on_off(what, key, value)?,
                _ => memory.hugepage_size = Some(bytes(value)?),
            }
        }
        memory.size =
            size.ok_or_else(|| ConfigError::Options(format!("{what}: size=SIZE is required")))?;
        Ok(memory)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.size < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooSmall(self.size));
        }
        if !self.size.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.size));
        }
        match (self.hugepages, self.hugepage_size) {
            (false, Some(_)) => Err(ConfigError::Hugepages(
                "hugepage_size is given without hugepages".into(),
            )),
            (true, Some(page)) if !HUGEPAGE_SIZES.contains(&page) => Err(ConfigError::Hugepages(
                format!("hugepage_size {page} is not 2 MiB or 1 GiB"),
            )),
            (true, Some(page)) if !self.size.is_multiple_of(page) => {
                Err(ConfigError::Hugepages(format!(
                    "size {} MiB is not a multiple of the {} MiB huge pages",
                    self.size >> 20,
                    page >> 20
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Where COM1's output goes and whether it takes input. In JSON, Cloud Hypervisor's shape:
/// `{"mode": "Tty"}`, `{"mode": "File", "file": PATH}`, `{"mode": "Socket", "socket": PATH}`,
/// `{"mode": "Off"}` (or `Null`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConsoleJson", into = "ConsoleJson")]
pub enum ConsoleConfig {
    /// The VMM's stdout and stdin (in raw mode when stdin is a terminal).
    #[default]
    Tty,
    /// Appended to a file; no input.
    File(PathBuf),
    /// A Unix socket (created mode 0600) that one client at a time attaches to, for output and
    /// input; a new client first gets the last 64 KiB of output. Output nobody reads in time
    /// is dropped, never waited for.
    Socket(PathBuf),
    /// The UART exists but its output is dropped (Cloud Hypervisor's `Null` means the same).
    Off,
}

/// [`ConsoleConfig`] as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleJson {
    mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
}

impl TryFrom<ConsoleJson> for ConsoleConfig {
    type Error = String;

    fn try_from(j: ConsoleJson) -> Result<Self, String> {
        let needs = |what: Option<PathBuf>, field: &str| {
            what.ok_or_else(|| format!("serial mode {} needs \"{field}\"", j.mode))
        };
        Ok(match j.mode.as_str() {
            "Tty" => ConsoleConfig::Tty,
            "File" => ConsoleConfig::File(needs(j.file.clone(), "file")?),
            "Socket" => ConsoleConfig::Socket(needs(j.socket.clone(), "socket")?),
            "Off" | "Null" => ConsoleConfig::Off,
            other => {
                return Err(format!(
                    "unknown serial mode '{other}' (Tty, File, Socket, Off or Null)"
                ))
            }
        })
    }
}

impl From<ConsoleConfig> for ConsoleJson {
    fn from(c: ConsoleConfig) -> Self {
        let (mode, file, socket) = match c {
            ConsoleConfig::Tty => ("Tty", None, None),
            ConsoleConfig::File(f) => ("File", Some(f), None),
            ConsoleConfig::Socket(s) => ("Socket", None, Some(s)),
            ConsoleConfig::Off => ("Off", None, None),
        };
        ConsoleJson {
            mode: mode.into(),
            file,
            socket,
        }
    }
}

/// Cloud Hypervisor's `console` (a virtio-console). podvisor has none, so only the modes that
/// ask for no console (`Off`, `Null`) are accepted; [`VmConfig::validate`] rejects the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioConsoleConfig {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// An image file (raw or qcow2) or a block device.
    pub path: PathBuf,
    /// The guest gets VIRTIO_BLK_F_RO and the image is opened read-only.
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    #[serde(default)]
    pub direct: bool,
    /// "raw" or "qcow2"; probed from the file when absent (a qcow2 header means qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Which backing files a qcow2 image may name: none (the default: such an image is
    /// refused), regular files anywhere (`true`), or only under a path (a directory, or
    /// exactly one file).
    #[serde(default, skip_serializing_if = "BackingFilesConfig::is_off")]
    pub backing_files: BackingFilesConfig,
    /// The disk's ID as the guest reads it (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Request queues (1 to 64); one per vCPU when absent, as QEMU does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A disk boot (no kernel) tries the disks that have a boot order, lowest first, and no
    /// others; without any, every disk in turn (as libvirt's per-device `<boot order>` and
    /// KubeVirt's `bootOrder`). 1 or more, one disk each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
}

/// [`DiskConfig::backing_files`]: `false`/`true` (Cloud Hypervisor's) or a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackingFilesConfig {
    Allowed(bool),
    Under(PathBuf),
}

impl Default for BackingFilesConfig {
    fn default() -> Self {
        BackingFilesConfig::Allowed(false)
    }
}

impl BackingFilesConfig {
    pub fn is_off(&self) -> bool {
        *self == BackingFilesConfig::Allowed(false)
    }

    /// The disk layer's policy.
    pub fn policy(&self) -> devices::block::BackingFiles {
        match self {
            BackingFilesConfig::Allowed(false) => devices::block::BackingFiles::Refused,
            BackingFilesConfig::Allowed(true) => devices::block::BackingFiles::Any,
            BackingFilesConfig::Under(path) => devices::block::BackingFiles::Under(path.clone()),
        }
    }
}

/// A virtio-net interface over a host tap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// An existing tap (or one to create with this name); a new kernel-named tap when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Host-side IPv4 address given to the tap (and the tap brought up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Netmask of `ip`; 255.255.255.0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Ipv4Addr>,
    /// The guest's MAC address; a stable one derived from the tap and position when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Another tap for a network interface of a VM that is brought back (`vm.restore`,
/// `vm.receive-migration`): the snapshot's or the source's tap may not exist here, or be
/// someone else's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRetap {
    /// The interface's ID: its configured one, or `_net<N>`.
    pub id: String,
    pub tap: String,
}

impl NetRetap {
    /// Parses the command line's `ID=TAP`.
    pub fn parse(s: &str) -> Result<NetRetap, String> {
        match s.split_once('=') {
            Some((id, tap)) if !id.is_empty() && !tap.is_empty() => Ok(NetRetap {
                id: id.to_owned(),
                tap: tap.to_owned(),
            }),
            _ => Err(format!(
                "'{s}' is not ID=TAP (a network interface's ID, e.g. _net0, and a tap's name)"
            )),
        }
    }
}

/// A virtio-rng entropy device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Where the random bytes come from.
    #[serde(default = "default_rng_src")]
    pub src: PathBuf,
}

fn default_rng_src() -> PathBuf {
    PathBuf::from("/dev/urandom")
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: default_rng_src(),
        }
    }
}

/// What the guest reads about the machine in its SMBIOS tables (`/sys/class/dmi/id`), in
/// Cloud Hypervisor's `platform` shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// The system's serial number (`product_serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// The system's UUID (`product_uuid`), 8-4-4-4-12 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// OEM strings (SMBIOS type 11), e.g. for software in the guest to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
}

/// Most OEM strings one SMBIOS type 11 structure counts.
pub const MAX_OEM_STRINGS: usize = 255;

impl PlatformConfig {
    /// Checks what the SMBIOS tables can carry (whether they fit is known only when written).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(uuid) = &self.uuid {
            if crate::boot::smbios::parse_uuid(uuid).is_none() {
                return Err(ConfigError::Platform(format!(
                    "uuid '{uuid}' is not a UUID (8-4-4-4-12 hex digits)"
                )));
            }
        }
        if let Some(serial) = &self.serial_number {
            if serial.contains('\0') {
                return Err(ConfigError::Platform(
                    "serial_number contains a NUL byte".into(),
                ));
            }
        }
        let oem = self.oem_strings.as_deref().unwrap_or(&[]);
        if oem.len() > MAX_OEM_STRINGS {
            return Err(ConfigError::Platform(format!(
                "{} oem_strings; at most {MAX_OEM_STRINGS}",
                oem.len()
            )));
        }
        if let Some((i, _)) = oem
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.contains('\0'))
        {
            return Err(ConfigError::Platform(format!(
                "oem_strings[{i}] is empty or contains a NUL byte"
            )));
        }
        Ok(())
    }

    /// Parses the CLI's `[serial_number=S][,uuid=U][,oem_strings=[A,B,...]]` (as Cloud
    /// Hypervisor's `--platform`).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let what = "--platform";
        let mut platform = PlatformConfig::default();
        // The list may hold commas: take it out before splitting the rest.
        let mut rest = s.to_owned();
        if let Some(start) = s.find("oem_strings=[") {
            let list_start = start + "oem_strings=[".len();
            let len = s[list_start..].find(']').ok_or_else(|| {
                ConfigError::Options(format!("{what}: oem_strings=[... has no closing ']'"))
            })?;
            platform.oem_strings = Some(
                s[list_start..list_start + len]
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            );
            rest = format!("{}{}", &s[..start], &s[list_start + len + 1..]);
        }
        for (key, value) in parse_options(what, &rest, &["serial_number", "uuid", "oem_strings"])? {
            match key {
                "serial_number" => platform.serial_number = Some(value.to_owned()),
                "uuid" => platform.uuid = Some(value.to_owned()),
                _ => {
                    return Err(ConfigError::Options(format!(
                        "{what}: oem_strings takes a list: oem_strings=[A,B]"
                    )))
                }
            }
        }
        Ok(platform)
    }
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    #[serde(default)]
    pub serial: ConsoleConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// Accepted for Cloud Hypervisor compatibility; see [`VirtioConsoleConfig`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<VirtioConsoleConfig>,
    /// The machine's identity in its SMBIOS tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
}

/// A configuration the VMM cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("--memory must be at least {min} MiB, got {0} bytes", min = MIN_MEMORY_BYTES >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory must be a multiple of 4 KiB, got {0} bytes")]
    MemoryUnaligned(u64),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("payload: {0}")]
    Payload(String),
    #[error("disk {0}: unknown format '{1}' (use raw or qcow2)")]
    DiskFormat(PathBuf, String),
    #[error("disk {0}: serial '{1}' is longer than 20 bytes")]
    DiskSerial(PathBuf, String),
    #[error("disk {0}: num_queues must be between 1 and {max}, got {1}", max = devices::virtio::block::MAX_QUEUES)]
    DiskQueues(PathBuf, u16),
    #[error("disk {0}: boot_order {1}: {2}")]
    DiskBootOrder(PathBuf, u32, &'static str),
    #[error("{0} devices: at most {max} PCI devices fit the bus", max = MAX_PCI_DEVICES)]
    TooManyDevices(usize),
    #[error(
        "net: '{0}' is not a usable MAC address (six hex bytes like 52:54:00:12:34:56, unicast)"
    )]
    Mac(String),
    #[error(
        "cpus: max_vcpus ({max}) must equal boot_vcpus ({boot}): podvisor has no vCPU hotplug"
    )]
    MaxVcpus { boot: u8, max: u8 },
    #[error("console: mode '{0}' is not supported: podvisor has no virtio-console (use mode Off or Null; the guest's console is the serial port)")]
    VirtioConsole(String),
    #[error("platform: {0}")]
    Platform(String),
    #[error("cpus: topology: {0}")]
    Topology(String),
    #[error("memory: {0}")]
    Hugepages(String),
    #[error("{0}")]
    Options(String),
}

/// PCI device numbers 1..32 (0 is the host bridge).
pub const MAX_PCI_DEVICES: usize = 31;

impl VmConfig {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        if let Some(console) = &self.console {
            if !matches!(console.mode.as_str(), "Off" | "Null") {
                return Err(ConfigError::VirtioConsole(console.mode.clone()));
            }
        }
        self.memory.validate()?;
        if self.payload.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.payload.cmdline.len()));
        }
        if self.payload.kernel.is_none() {
            if self.disks.is_empty() {
                return Err(ConfigError::Payload(
                    "no kernel and no disk to boot from: give a kernel, or a disk whose image \
                     has a boot menu"
                        .into(),
                ));
            }
            if self.payload.initramfs.is_some() {
                return Err(ConfigError::Payload(
                    "an initramfs needs a kernel (a disk boot loads the initrd its entry names)"
                        .into(),
                ));
            }
        } else if self.payload.boot_entry.is_some() {
            return Err(ConfigError::Payload(
                "boot_entry picks an entry of a disk's boot menu: not with a kernel".into(),
            ));
        }
        for disk in &self.disks {
            if let Some(f) = &disk.format {
                if devices::block::Format::from_name(f).is_none() {
                    return Err(ConfigError::DiskFormat(disk.path.clone(), f.clone()));
                }
            }
            if let Some(serial) = &disk.serial {
                if serial.len() > 20 {
                    return Err(ConfigError::DiskSerial(disk.path.clone(), serial.clone()));
                }
            }
            if let Some(n) = disk.num_queues {
                if !(1..=devices::virtio::block::MAX_QUEUES).contains(&n) {
                    return Err(ConfigError::DiskQueues(disk.path.clone(), n));
                }
            }
        }
        let mut boot_orders = std::collections::BTreeSet::new();
        for disk in &self.disks {
            if let Some(order) = disk.boot_order {
                if order == 0 {
                    return Err(ConfigError::DiskBootOrder(
                        disk.path.clone(),
                        order,
                        "must be 1 or more",
                    ));
                }
                if !boot_orders.insert(order) {
                    return Err(ConfigError::DiskBootOrder(
                        disk.path.clone(),
                        order,
                        "another disk has it too",
                    ));
                }
            }
        }
        for net in &self.net {
            if let Some(mac) = &net.mac {
                if mac.parse::<devices::virtio::MacAddr>().is_err() {
                    return Err(ConfigError::Mac(mac.clone()));
                }
            }
        }
        if let Some(platform) = &self.platform {
            platform.validate()?;
        }
        let count = self.disks.len() + self.net.len() + usize::from(self.rng.is_some());
        if count > MAX_PCI_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        Ok(())
    }
}

/// Parses a memory size: a number with an optional K, M, G or T suffix (powers of 1024, an
/// optional trailing "iB" or "B"). A bare number means MiB, as QEMU's `-m` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected a number such as 512M or 2G"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown unit '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Splits `key=value,key=value` device options (the CLI's `--disk`/`--net`/`--rng` syntax, as
/// Cloud Hypervisor's); a value may not contain a comma.
fn parse_options<'a>(
    what: &str,
    s: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::Options(format!("{what}: '{item}' is not key=value")))?;
        if !known.contains(&key) {
            return Err(ConfigError::Options(format!(
                "{what}: unknown option '{key}' (known: {})",
                known.join(", ")
            )));
        }
        if seen.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::Options(format!("{what}: '{key}' given twice")));
        }
        seen.push((key, value));
    }
    Ok(seen)
}

fn parse_on_off(what: &str, key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::Options(format!(
            "{what}: {key}={value}: expected on or off"
        ))),
    }
}

impl DiskConfig {
    /// The request queues the disk gets in a VM with `vcpus` vCPUs.
    pub fn queues(&self, vcpus: u8) -> u16 {
        self.num_queues
            .unwrap_or_else(|| u16::from(vcpus).min(devices::virtio::block::MAX_QUEUES))
    }

    /// The disks a disk boot tries, in order (see [`DiskConfig::boot_order`]).
    pub fn boot_candidates(disks: &[DiskConfig]) -> Vec<&DiskConfig> {
        let mut ordered: Vec<&DiskConfig> =
            disks.iter().filter(|d| d.boot_order.is_some()).collect();
        if ordered.is_empty() {
            return disks.iter().collect();
        }
        ordered.sort_by_key(|d| d.boot_order);
        ordered
    }

    /// Parses `path=FILE[,format=raw|qcow2][,readonly=on][,direct=on][,serial=ID]
    /// [,num_queues=N][,id=NAME][,backing_files=on|off|PATH][,boot_order=N]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let what = "--disk";
        let mut disk = DiskConfig::default();
        let mut path = None;
        for (key, value) in parse_options(
            what,
            s,
            &[
                "path",
                "format",
                "readonly",
                "direct",
                "serial",
                "num_queues",
                "id",
                "backing_files",
                "boot_order",
            ],
        )? {
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "format" => disk.format = Some(value.to_owned()),
                "readonly" => disk.readonly = parse_on_off(what, key, value)?,
                "direct" => disk.direct = parse_on_off(what, key, value)?,
                "backing_files" if !value.is_empty() => {
                    disk.backing_files = match value {
                        "on" | "true" => BackingFilesConfig::Allowed(true),
                        "off" | "false" => BackingFilesConfig::Allowed(false),
                        dir => BackingFilesConfig::Under(PathBuf::from(dir)),
                    }
                }
                "serial" => disk.serial = Some(value.to_owned()),
                "num_queues" => {
                    disk.num_queues = Some(value.parse().map_err(|_| {
                        ConfigError::Options(format!(
                            "{what}: num_queues={value}: expected a number of queues"
                        ))
                    })?)
                }
                "id" => disk.id = Some(value.to_owned()),
                "boot_order" => {
                    disk.boot_order = Some(value.parse().map_err(|_| {
                        ConfigError::Options(format!(
                            "{what}: boot_order={value}: expected a number (1 is tried first)"
                        ))
                    })?)
                }
                _ => {
                    return Err(ConfigError::Options(format!(
                        "{what}: {key}= needs a value"
                    )))
                }
            }
        }
        disk.path =
            path.ok_or_else(|| ConfigError::Options(format!("{what}: path=FILE is required")))?;
        Ok(disk)
    }
}

impl NetConfig {
    /// Parses `[tap=NAME][,mac=MAC][,ip=ADDR][,mask=MASK][,id=NAME]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let what = "--net";
        let mut net = NetConfig::default();
        let addr = |key: &str, value: &str| {
            value.parse::<Ipv4Addr>().map_err(|_| {
                ConfigError::Options(format!("{what}: {key}={value} is not an IPv4 address"))
            })
        };
        for (key, value) in parse_options(what, s, &["tap", "mac", "ip", "mask", "id"])? {
            match key {
                "tap" if !value.is_empty() => net.tap = Some(value.to_owned()),
                "mac" => net.mac = Some(value.to_owned()),
                "ip" => net.ip = Some(addr(key, value)?),
                "mask" => net.mask = Some(addr(key, value)?),
                "id" => net.id = Some(value.to_owned()),
                _ => {
                    return Err(ConfigError::Options(format!(
                        "{what}: {key}= needs a value"
                    )))
                }
            }
        }
        Ok(net)
    }
}

impl RngConfig {
    /// Parses `[src=PATH]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut rng = RngConfig::default();
        for (_, value) in parse_options("--rng", s, &["src"])? {
            rng.src = PathBuf::from(value);
        }
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("k".into()),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
                boot_entry: None,
            },
            cpus: CpusConfig::new(2),
            memory: MemoryConfig::new(512 << 20),
            serial: ConsoleConfig::Tty,
            disks: Vec::new(),
            net: Vec::new(),
            rng: None,
            console: None,
            platform: None,
        }
    }

    #[test]
    fn platform_options() {
        let p = PlatformConfig::parse(
            "serial_number=SN1,oem_strings=[a=1,b],uuid=00112233-4455-6677-8899-aabbccddeeff",
        )
        .unwrap();
        assert_eq!(p.serial_number.as_deref(), Some("SN1"));
        assert_eq!(
            p.uuid.as_deref(),
            Some("00112233-4455-6677-8899-aabbccddeeff")
        );
        assert_eq!(p.oem_strings, Some(vec!["a=1".to_owned(), "b".to_owned()]));
        p.validate().unwrap();
        for bad in [
            "oem_strings=[a",
            "oem_strings=a",
            "uuid=1,uuid=2",
            "vendor=x",
        ] {
            assert!(PlatformConfig::parse(bad).is_err(), "{bad}");
        }
        for bad in ["uuid=00112233", "oem_strings=[a,,b]", "serial_number=a\0b"] {
            let p = PlatformConfig::parse(bad).unwrap();
            assert!(
                matches!(p.validate(), Err(ConfigError::Platform(_))),
                "{bad}"
            );
        }
        let many = PlatformConfig {
            oem_strings: Some(vec!["x".into(); MAX_OEM_STRINGS + 1]),
            ..Default::default()
        };
        assert!(many.validate().is_err());
        // The VM's validation checks it too.
        let mut vm = config();
        vm.platform = Some(PlatformConfig {
            uuid: Some("nope".into()),
            ..Default::default()
        });
        assert!(matches!(vm.validate(), Err(ConfigError::Platform(_))));
    }

    #[test]
    fn device_options() {
        let d = DiskConfig::parse("path=/a.qcow2,format=qcow2,readonly=on,direct=off,serial=x1")
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/a.qcow2"));
        assert_eq!(d.format.as_deref(), Some("qcow2"));
        assert!(d.readonly && !d.direct);
        assert_eq!(d.serial.as_deref(), Some("x1"));
        // Queues: one per vCPU unless given.
        assert_eq!((d.num_queues, d.queues(1), d.queues(4)), (None, 1, 4));
        let q = DiskConfig::parse("path=/a,num_queues=2").unwrap();
        assert_eq!((q.num_queues, q.queues(8)), (Some(2), 2));
        assert_eq!(d.boot_order, None);
        let o = DiskConfig::parse("path=/a,boot_order=2").unwrap();
        assert_eq!(o.boot_order, Some(2));
        assert_eq!(serde_json::to_value(&o).unwrap()["boot_order"], 2);
        // Backing files: off unless asked for; on (Cloud Hypervisor's `true`), or under a path.
        assert!(d.backing_files.is_off());
        for (opt, want, json) in [
            (
                "on",
                BackingFilesConfig::Allowed(true),
                serde_json::json!(true),
            ),
            (
                "off",
                BackingFilesConfig::Allowed(false),
                serde_json::Value::Null,
            ),
            (
                "/b",
                BackingFilesConfig::Under("/b".into()),
                serde_json::json!("/b"),
            ),
        ] {
            let b = DiskConfig::parse(&format!("path=/a,backing_files={opt}")).unwrap();
            assert_eq!(b.backing_files, want);
            let v = serde_json::to_value(&b).unwrap();
            assert_eq!(v.get("backing_files").cloned().unwrap_or_default(), json);
            let back: DiskConfig = serde_json::from_value(v).unwrap();
            assert_eq!(back, b);
        }
        assert_eq!(
            BackingFilesConfig::Under("/b".into()).policy(),
            devices::block::BackingFiles::Under("/b".into())
        );
        for bad in [
            "path=/a,num_queues=",
            "path=/a,num_queues=two",
            "path=/a,num_queues=-1",
            "path=/a,num_queues=70000",
            "path=/a,boot_order=",
            "path=/a,boot_order=first",
            "path=/a,boot_order=-1",
            "",
            "format=raw",
            "path=",
            "path=/a,readonly=maybe",
            "path=/a,colour=red",
            "path=/a,path=/b",
            "/a",
        ] {
            assert!(DiskConfig::parse(bad).is_err(), "{bad}");
        }
        let n = NetConfig::parse("tap=tap0,mac=52:54:00:00:00:01,ip=10.0.0.1,mask=255.255.255.252")
            .unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(NetConfig::parse("").unwrap(), NetConfig::default());
        assert!(NetConfig::parse("ip=10.0.0.300").is_err());
        assert_eq!(
            RngConfig::parse("").unwrap().src,
            PathBuf::from("/dev/urandom")
        );
        assert_eq!(
            RngConfig::parse("src=/dev/random").unwrap().src,
            PathBuf::from("/dev/random")
        );
    }

    #[test]
    fn device_validation() {
        let mut c = config();
        c.disks.push(DiskConfig {
            path: "/d".into(),
            format: Some("vmdk".into()),
            ..Default::default()
        });
        assert!(matches!(c.validate(), Err(ConfigError::DiskFormat(..))));
        let mut c = config();
        c.disks.push(DiskConfig {
            path: "/d".into(),
            serial: Some("x".repeat(21)),
            ..Default::default()
        });
        assert!(matches!(c.validate(), Err(ConfigError::DiskSerial(..))));
        for n in [0, 65] {
            let mut c = config();
            c.disks.push(DiskConfig {
                path: "/d".into(),
                num_queues: Some(n),
                ..Default::default()
            });
            assert_eq!(c.validate(), Err(ConfigError::DiskQueues("/d".into(), n)));
        }
        let mut c = config();
        c.net = vec![NetConfig {
            mac: Some("01:00:00:00:00:01".into()),
            ..Default::default()
        }];
        assert!(matches!(c.validate(), Err(ConfigError::Mac(_))));
        c.net = vec![NetConfig::default(); 32];
        assert_eq!(c.validate(), Err(ConfigError::TooManyDevices(32)));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn validation() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.cpus.boot_vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.cpus.boot_vcpus = 255;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(255)));
        let mut c = config();
        c.memory.size = 1 << 20;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(1 << 20)));
        c.memory.size = (64 << 20) + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::MemoryUnaligned((64 << 20) + 1))
        );
        let mut c = config();
        c.payload.cmdline = "x".repeat(4000);
        assert_eq!(c.validate(), Err(ConfigError::CmdlineTooLong(4000)));
        // A disk boot: needs a disk; takes no initramfs; boot_entry only without a kernel.
        let mut c = config();
        c.payload.kernel = None;
        c.disks.clear();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("no kernel and no disk"), "{e}");
        c.disks.push(DiskConfig::parse("path=/d").unwrap());
        c.payload.boot_entry = Some("1".into());
        assert_eq!(c.validate(), Ok(()));
        c.payload.initramfs = Some("/i".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("an initramfs needs a kernel"), "{e}");
        let mut c = config();
        c.payload.boot_entry = Some("1".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not with a kernel"), "{e}");
    }

    #[test]
    fn memory_options() {
        assert_eq!(
            MemoryConfig::parse("1G").unwrap(),
            MemoryConfig::new(1 << 30)
        );
        let m = MemoryConfig::parse("size=2G,hugepages=on,hugepage_size=1G").unwrap();
        assert_eq!(
            (m.size, m.hugepages, m.hugepage_size),
            (2 << 30, true, Some(1 << 30))
        );
        m.validate().unwrap();
        let m = MemoryConfig::parse("size=512M,hugepages=on").unwrap();
        assert_eq!((m.hugepages, m.hugepage_size), (true, None));
        m.validate().unwrap();
        for bad in [
            "size=1G,hugepages=maybe",
            "hugepages=on",
            "12Q",
            "size=1G,thp=on",
        ] {
            assert!(MemoryConfig::parse(bad).is_err(), "{bad}");
        }
        for (bad, why) in [
            ("size=1G,hugepage_size=2M", "without hugepages"),
            (
                "size=1G,hugepages=on,hugepage_size=4M",
                "not 2 MiB or 1 GiB",
            ),
            ("size=1536M,hugepages=on,hugepage_size=1G", "not a multiple"),
        ] {
            match MemoryConfig::parse(bad).unwrap().validate() {
                Err(ConfigError::Hugepages(m)) => assert!(m.contains(why), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // JSON as Cloud Hypervisor writes it; ordinary memory writes no hugepage fields.
        let m: MemoryConfig =
            serde_json::from_str(r#"{"size":2097152000,"hugepages":true,"hugepage_size":2097152}"#)
                .unwrap();
        assert_eq!(m.hugepage_size, Some(2 << 20));
        assert_eq!(
            serde_json::to_string(&MemoryConfig::new(1 << 30)).unwrap(),
            r#"{"size":1073741824}"#
        );
    }

    #[test]
    fn topologies() {
        let t = CpuTopology::new;
        let parsed = CpusConfig::parse("boot=4,topology=2:2:1:1").unwrap();
        assert_eq!(parsed.topology, Some(t(2, 2, 1, 1)));
        parsed.validate().unwrap();
        assert_eq!(CpusConfig::parse("3").unwrap(), CpusConfig::new(3));
        assert_eq!(CpusConfig::parse("300"), Err(ConfigError::Vcpus(300)));
        let err = |cpus: CpusConfig| match cpus.validate() {
            Err(ConfigError::Topology(m)) => m,
            other => panic!("{other:?}"),
        };
        // The product must be the vCPU count.
        let m = err(CpusConfig::parse("boot=4,topology=2:1:1:1").unwrap());
        assert_eq!(
            m,
            "2 threads per core × 1 cores per die × 1 dies per package × 1 packages is 2 vCPUs, \
             not boot_vcpus (4)"
        );
        assert!(err(CpusConfig::parse("boot=1,topology=0:1:1:1").unwrap()).contains("at least 1"));
        // 3 threads × 3 cores × 3 dies × 9 packages: 243 vCPUs, but APIC IDs up to (8 << 6) + 42.
        let m = err(CpusConfig::parse("topology=3:3:3:9").unwrap());
        assert!(m.contains("APIC ID 554"), "{m}");
        // JSON as Cloud Hypervisor writes it.
        let c: CpusConfig = serde_json::from_str(
            r#"{"boot_vcpus":2,"topology":{"threads_per_core":2,"cores_per_die":1,
                "dies_per_package":1,"packages":1}}"#,
        )
        .unwrap();
        assert_eq!(c.topology, Some(t(2, 1, 1, 1)));
    }

    #[test]
    fn cloud_hypervisor_extras() {
        let mut c = config();
        c.cpus.max_vcpus = Some(2);
        assert_eq!(c.validate(), Ok(()));
        c.cpus.max_vcpus = Some(4);
        assert_eq!(c.validate(), Err(ConfigError::MaxVcpus { boot: 2, max: 4 }));
        let mut c = config();
        for (mode, ok) in [
            ("Off", true),
            ("Null", true),
            ("Tty", false),
            ("Pty", false),
        ] {
            c.console = Some(VirtioConsoleConfig {
                mode: mode.into(),
                file: None,
            });
            assert_eq!(c.validate().is_ok(), ok, "{mode}");
        }
        let serial: ConsoleConfig = serde_json::from_str(r#"{"mode":"Null"}"#).unwrap();
        assert_eq!(serial, ConsoleConfig::Off);
        let serial: ConsoleConfig =
            serde_json::from_str(r#"{"mode":"Socket","socket":"/run/s"}"#).unwrap();
        assert_eq!(serial, ConsoleConfig::Socket("/run/s".into()));
        assert_eq!(
            serde_json::to_value(&serial).unwrap(),
            serde_json::json!({"mode": "Socket", "socket": "/run/s"})
        );
        for (bad, why) in [
            (
                r#"{"mode":"Socket"}"#,
                "serial mode Socket needs \"socket\"",
            ),
            (r#"{"mode":"File"}"#, "serial mode File needs \"file\""),
            (r#"{"mode":"Pty"}"#, "unknown serial mode 'Pty'"),
        ] {
            let err = serde_json::from_str::<ConsoleConfig>(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn json_round_trip() {
        let mut c = config();
        c.serial = ConsoleConfig::File("/tmp/s".into());
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
    }
}
