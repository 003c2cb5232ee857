//! The command line. Flags map onto `vmm::config` types once, here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, PlatformConfig,
    RngConfig, VmConfig,
};

/// Default kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, Parser)]
#[command(
    name = "podvisor",
    version,
    about = "A KVM virtual machine monitor for Kubernetes pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Seccomp filters on the VMM's threads: on (a system call a thread's kind does not make
    /// stops the VMM with SIGSYS, naming it), log (let through, logged by the kernel) or off.
    #[arg(
        long,
        global = true,
        value_name = "on|log|off",
        default_value = "on",
        env = "PODVISOR_SECCOMP"
    )]
    pub seccomp: vmm::seccomp::Mode,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel and run the VM until the guest powers off (a guest reboot restarts it).
    Run(Box<RunArgs>),
    /// Start an empty VMM that serves the API (a pod's entrypoint): `vm.create`, `vm.boot`, ...
    Serve(ServeArgs),
    /// Send one request to a running podvisor's API socket and print the JSON answer.
    Ctl(crate::ctl::CtlArgs),
    /// A pod's entrypoint: run the VM a KubeVirt VirtualMachineInstance describes.
    Launcher(LauncherArgs),
}

#[derive(Debug, Args)]
pub struct LauncherArgs {
    /// The VirtualMachineInstance (kubevirt.io/v1), YAML or JSON; `-` reads stdin. Without
    /// it, the document in the environment variable PODVISOR_VMI.
    #[arg(long, value_name = "FILE|-")]
    pub vmi: Option<PathBuf>,
    /// Check the spec and exit: every problem, one line each, naming its field.
    #[arg(long, conflicts_with = "dry_run")]
    pub validate: bool,
    /// Print the VM configuration (vm.create's JSON) the spec becomes, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// The serial console on stdin/stdout (events then only with --event-monitor) instead of
    /// its socket POD_ROOT/var/run/kubevirt-private/NAMESPACE_NAME/virt-serial0, which
    /// `podvisor ctl console` attaches to while the events go to stdout (the pod's log).
    #[arg(long)]
    pub console_stdio: bool,
    /// Run the VM without the spec's network interfaces (the pod network is not wired yet).
    #[arg(long)]
    pub no_network: bool,
    /// The directory KubeVirt's in-pod paths are under (/var/run/kubevirt/...).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub pod_root: PathBuf,
    /// Files an API client's VM configuration may name must lie under one of these
    /// directories (repeatable; default: POD_ROOT). See `serve --allow-path`.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
    /// Written once the guest runs, removed at exit, for the pod's readiness probe (default:
    /// POD_ROOT/var/run/kubevirt-infra/healthy).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// The API socket (default: POD_ROOT/var/run/kubevirt/sockets/NAMESPACE_NAME.sock).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Also serve GET /readyz (200 while the VM runs) and GET /metrics over plain HTTP on
    /// this TCP address, e.g. 0.0.0.0:8080, for a kubelet httpGet probe and Prometheus;
    /// nothing else is served there.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Write one JSON object per lifecycle event: path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<String>,
    /// State that guest kernels are PVM-enabled, so they may run on a PVM /dev/kvm.
    #[arg(long)]
    pub pvm_guest: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to serve the REST API on (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Also serve GET /readyz (200 while the VM runs) and GET /metrics over plain HTTP on
    /// this TCP address, e.g. 0.0.0.0:8080, for a kubelet httpGet probe and Prometheus;
    /// nothing else is served there.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Files an API client's VM configuration may name (kernel, disks, serial file,
    /// snapshots) must lie under one of these directories (repeatable; default: anywhere).
    /// Whatever this says, an API client's entropy source is /dev/urandom, /dev/random or
    /// /dev/hwrng (or, with allowed paths, a file under one), and its serial output never
    /// goes to a device.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
    /// Write one JSON object per lifecycle event: path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<String>,
    /// State that guest kernels are PVM-enabled, so they may run on a PVM /dev/kvm.
    #[arg(long)]
    pub pvm_guest: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("brought_back").args(["restore", "receive_migration"])))]
pub struct RunArgs {
    /// Kernel to boot: a bzImage, or an ELF vmlinux with a PVH entry point. Without it, the
    /// first --disk whose image has a boot menu (GRUB's grub.cfg, loader/entries/*.conf,
    /// extlinux.conf, or Debian's /vmlinuz link) boots its default entry directly.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Without --kernel: boot this entry of the disk's menu (its number from 0, or its title).
    #[arg(long, value_name = "N|TITLE", conflicts_with = "kernel")]
    pub boot_entry: Option<String>,
    /// A cloud-init NoCloud seed disk built from these files (an ISO 9660 `cidata` image made
    /// in-process), attached read-only after the --disks: user-data=FILE[,meta-data=FILE]
    /// [,network-config=FILE]. Nothing of it stays on the host after podvisor exits.
    #[arg(long, value_name = "user-data=FILE[,...]")]
    pub cloud_init: Option<String>,
    /// Print the boot menu of each --disk (what booting without --kernel would choose from)
    /// and exit.
    #[arg(long, conflicts_with_all = ["kernel", "restore", "receive_migration"])]
    pub list_boot_entries: bool,
    /// Instead of booting, bring back the VM a snapshot directory holds (`vm.snapshot`) and
    /// run it on from where it was saved; the VM's flags come from the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initramfs", "cmdline", "cpus", "memory", "serial", "disk", "net", "rng",
        "platform", "boot_entry", "cloud_init",
    ])]
    pub restore: Option<PathBuf>,
    /// Instead of booting, wait for a live migration's source at this URL
    /// (`unix:/PATH` or `tcp:HOST:PORT`, see `vm.send-migration`) and run the VM it sends; the
    /// VM's flags come from the source.
    #[arg(long, value_name = "URL", conflicts_with_all = [
        "kernel", "initramfs", "cmdline", "cpus", "memory", "serial", "disk", "net", "rng",
        "platform", "boot_entry", "cloud_init", "restore",
    ])]
    pub receive_migration: Option<String>,
    /// With --restore or --receive-migration: put the VM's network interface ID (its `id=`,
    /// or _net<N>) on tap TAP instead of the snapshot's or the source's; the guest keeps its
    /// MAC. Repeat for more interfaces.
    #[arg(long, value_name = "ID=TAP", value_parser = vmm::config::NetRetap::parse,
          requires = "brought_back")]
    pub net_tap: Vec<vmm::config::NetRetap>,
    /// Initramfs (cpio archive, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (default with --kernel: "console=ttyS0 reboot=k panic=1"). When
    /// a disk is booted, appended to its entry's command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// vCPUs: N, or boot=N[,topology=THREADS:CORES:DIES:PACKAGES] to arrange them into
    /// threads, cores, dies and sockets (default: N single-threaded cores of one socket).
    #[arg(long, value_name = "N|boot=N,topology=T:C:D:P", default_value = "1",
          value_parser = |s: &str| CpusConfig::parse(s).map_err(|e| e.to_string()))]
    pub cpus: CpusConfig,
    /// Guest RAM, e.g. 512M or 2G (a bare number is MiB); or
    /// size=SIZE[,hugepages=on][,hugepage_size=2M|1G] for the host's reserved huge pages.
    #[arg(long, value_name = "SIZE|size=SIZE,...", default_value = "512M")]
    pub memory: String,
    /// Where COM1 goes: stdio (output to stdout, input from stdin), file=PATH,
    /// socket=PATH (attach with `podvisor ctl console`), or off.
    #[arg(
        long,
        value_name = "stdio|file=PATH|socket=PATH|off",
        default_value = "stdio"
    )]
    pub serial: String,
    /// A virtio-blk disk (repeat for several): path=FILE[,format=raw|qcow2][,readonly=on]
    /// [,direct=on][,serial=ID][,num_queues=N (default: one per vCPU)][,id=NAME]
    /// [,backing_files=on|PATH][,boot_order=N (without --kernel: only disks with one are
    /// booted from, lowest first)].
    #[arg(long, value_name = "path=FILE[,...]")]
    pub disk: Vec<String>,
    /// A virtio-net interface (repeat for several) over a tap: [tap=NAME][,mac=MAC]
    /// [,ip=ADDR,mask=MASK]. Without tap=, a new tap is created for the VM's lifetime.
    #[arg(long, value_name = "[tap=NAME][,...]", num_args = 0..=1, default_missing_value = "")]
    pub net: Vec<String>,
    /// A virtio-rng entropy device: [src=PATH] (default /dev/urandom).
    #[arg(long, value_name = "[src=PATH]", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<String>,
    /// What the guest reads about the machine (SMBIOS, /sys/class/dmi/id):
    /// [serial_number=S][,uuid=UUID][,oem_strings=[A,B,...]].
    #[arg(long, value_name = "[serial_number=S][,...]")]
    pub platform: Option<String>,
    /// Also serve the REST API on this Unix socket (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Files an API client's VM configuration may name (kernel, disks, serial file,
    /// snapshots) must lie under one of these directories (repeatable; default: anywhere).
    /// Whatever this says, an API client's entropy source is /dev/urandom, /dev/random or
    /// /dev/hwrng (or, with allowed paths, a file under one), and its serial output never
    /// goes to a device.
    #[arg(long = "allow-path", value_name = "DIR", requires = "api_socket")]
    pub allow_paths: Vec<PathBuf>,
    /// Write one JSON object per lifecycle event: path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<String>,
    /// State that the kernel is PVM-enabled, so it may run on a PVM /dev/kvm.
    #[arg(long)]
    pub pvm_guest: bool,
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<ConsoleConfig, String> {
    match s {
        "stdio" | "tty" => Ok(ConsoleConfig::Tty),
        "off" | "null" => Ok(ConsoleConfig::Off),
        _ => match s.split_once('=') {
            Some(("file", path)) if !path.is_empty() => Ok(ConsoleConfig::File(path.into())),
            Some(("socket", path)) if !path.is_empty() => Ok(ConsoleConfig::Socket(path.into())),
            _ => Err(format!(
                "invalid --serial '{s}': expected stdio, file=PATH, socket=PATH or off"
            )),
        },
    }
}

impl RunArgs {
    /// How its VM thread is started and served.
    pub fn vmm(&self) -> Result<crate::VmmArgs, String> {
        Ok(crate::VmmArgs {
            api_socket: self.api_socket.clone(),
            http_listen: None,
            event_monitor: self.event_monitor.clone(),
            pvm_guest: self.pvm_guest,
            grace_period: None,
            drop_privileges: false,
            host_paths: api_host_paths(self.api_socket.is_some(), &self.allow_paths)?,
        })
    }
}

/// The API's [`vmm::host_paths::HostPaths`] when an API is served (`Any` otherwise: the
/// command line's own configuration is the user's).
pub fn api_host_paths(
    api: bool,
    allow_paths: &[PathBuf],
) -> Result<vmm::host_paths::HostPaths, String> {
    if !api {
        return Ok(vmm::host_paths::HostPaths::Any);
    }
    vmm::host_paths::HostPaths::api(allow_paths).map_err(|e| format!("--allow-path {e}"))
}

impl RunArgs {
    /// The VM these flags describe.
    pub fn to_config(&self) -> Result<VmConfig, String> {
        Ok(VmConfig {
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: match (&self.cmdline, &self.kernel) {
                    (Some(c), _) => c.clone(),
                    (None, Some(_)) => DEFAULT_CMDLINE.to_owned(),
                    (None, None) => String::new(),
                },
                boot_entry: self.boot_entry.clone(),
            },
            cpus: self.cpus.clone(),
            memory: MemoryConfig::parse(&self.memory).map_err(|e| e.to_string())?,
            serial: parse_serial(&self.serial)?,
            disks: self
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
            net: self
                .net
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
            rng: self
                .rng
                .as_deref()
                .map(RngConfig::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
            console: None,
            platform: self
                .platform
                .as_deref()
                .map(PlatformConfig::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("podvisor").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(a) => *a,
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn restore_takes_the_vm_from_the_snapshot() {
        let a = run_args(&["run", "--restore", "/s", "--api-socket", "/a.sock"]);
        assert_eq!(a.restore, Some(PathBuf::from("/s")));
        assert_eq!(a.kernel, None);
        for flag in [["--kernel", "/k"], ["--cpus", "2"], ["--disk", "path=/d"]] {
            let e = parse(&["run", "--restore", "/s", flag[0], flag[1]]).unwrap_err();
            assert!(
                e.to_string().contains("cannot be used with"),
                "{flag:?}: {e}"
            );
        }
        // Neither a kernel nor a disk to boot: refused before anything starts.
        let e = run_args(&["run"])
            .to_config()
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("no kernel and no disk"), "{e}");
    }

    #[test]
    fn net_tap_only_with_a_vm_brought_back() {
        let a = run_args(&["run", "--restore", "/s", "--net-tap", "_net0=tap9"]);
        assert_eq!(a.net_tap[0].id, "_net0");
        assert_eq!(a.net_tap[0].tap, "tap9");
        let a = run_args(&["run", "--receive-migration", "unix:/m", "--net-tap", "n=t"]);
        assert_eq!(a.net_tap.len(), 1);
        let e = parse(&["run", "--kernel", "/k", "--net-tap", "n=t"]).unwrap_err();
        assert!(e.to_string().contains("--restore"), "{e}");
    }

    #[test]
    fn receive_migration_takes_the_vm_from_the_source() {
        let a = run_args(&["run", "--receive-migration", "unix:/m.sock"]);
        assert_eq!(a.receive_migration.as_deref(), Some("unix:/m.sock"));
        for flag in [["--kernel", "/k"], ["--restore", "/s"], ["--memory", "1G"]] {
            let e =
                parse(&["run", "--receive-migration", "unix:/m", flag[0], flag[1]]).unwrap_err();
            assert!(
                e.to_string().contains("cannot be used with"),
                "{flag:?}: {e}"
            );
        }
    }

    #[test]
    fn full_run_command() {
        let a = run_args(&[
            "run",
            "--kernel",
            "bz",
            "--initramfs",
            "i.gz",
            "--cmdline",
            "console=ttyS0 podvisor.halt",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--serial",
            "file=/tmp/out",
        ]);
        let c = a.to_config().unwrap();
        assert_eq!(c.payload.kernel, Some(PathBuf::from("bz")));
        assert_eq!(c.payload.initramfs, Some(PathBuf::from("i.gz")));
        assert_eq!(c.payload.cmdline, "console=ttyS0 podvisor.halt");
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.serial, ConsoleConfig::File("/tmp/out".into()));
        assert!(!a.pvm_guest);
    }

    #[test]
    fn defaults() {
        let c = run_args(&["run", "--kernel", "k"]).to_config().unwrap();
        assert_eq!(c.cpus.boot_vcpus, 1);
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.payload.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, ConsoleConfig::Tty);
        assert_eq!(c.payload.initramfs, None);
    }

    #[test]
    fn without_a_kernel_a_disk_boots_with_no_default_command_line() {
        let c = run_args(&["run", "--disk", "path=/d", "--boot-entry", "2"])
            .to_config()
            .unwrap();
        assert_eq!(c.payload.kernel, None);
        assert_eq!(c.payload.cmdline, "");
        assert_eq!(c.payload.boot_entry.as_deref(), Some("2"));
        let e = parse(&["run", "--kernel", "/k", "--boot-entry", "2"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let a = run_args(&["run", "--list-boot-entries", "--disk", "path=/d"]);
        assert!(a.list_boot_entries);
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(parse(&["run", "--kernel", "k", "--bogus"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--cpus", "300"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--cpus", "two"]).is_err());
        let a = run_args(&["run", "--kernel", "k", "--cpus", "topology=2:2:1:2"]);
        let t = a.cpus.topology.unwrap();
        assert_eq!(a.cpus.boot_vcpus, 8);
        assert_eq!(t, vmm::config::CpuTopology::new(2, 2, 1, 2));
        for bad in [
            "boot=2,topology=2:2",
            "boot=x",
            "topology=2:2:1:200",
            "cores=2",
        ] {
            assert!(
                parse(&["run", "--kernel", "k", "--cpus", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(parse(&["frobnicate"]).is_err());
        let a = run_args(&["run", "--kernel", "k", "--memory", "12Q"]);
        assert!(a.to_config().unwrap_err().contains("--memory"));
        let a = run_args(&["run", "--kernel", "k", "--serial", "pty"]);
        assert!(a.to_config().unwrap_err().contains("--serial"));
    }

    #[test]
    fn devices() {
        let c = run_args(&[
            "run",
            "--kernel",
            "k",
            "--disk",
            "path=/a.raw",
            "--disk",
            "path=/b.qcow2,readonly=on",
            "--net",
            "--net",
            "tap=t0,mac=52:54:00:00:00:02",
            "--rng",
        ])
        .to_config()
        .unwrap();
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].readonly);
        assert_eq!(c.net.len(), 2);
        assert_eq!(c.net[0], NetConfig::default());
        assert_eq!(c.net[1].tap.as_deref(), Some("t0"));
        assert_eq!(c.rng, Some(RngConfig::default()));
        let none = run_args(&["run", "--kernel", "k"]).to_config().unwrap();
        assert!(none.disks.is_empty() && none.net.is_empty() && none.rng.is_none());
        let bad = run_args(&["run", "--kernel", "k", "--disk", "readonly=on"]);
        assert!(bad.to_config().unwrap_err().contains("path=FILE"));
    }

    #[test]
    fn ctl_commands() {
        use crate::ctl::CtlAction;
        let action = |args: &[&str]| match parse(args).unwrap().command {
            Command::Ctl(c) => {
                assert_eq!(c.api_socket, PathBuf::from("/s"));
                c.action
            }
            other => panic!("{other:?}"),
        };
        let base = ["ctl", "--api-socket", "/s"];
        for (word, expected) in [
            ("ping", CtlAction::Ping),
            ("info", CtlAction::Info),
            ("counters", CtlAction::Counters),
            ("boot", CtlAction::Boot),
            ("pause", CtlAction::Pause),
            ("resume", CtlAction::Resume),
            ("shutdown", CtlAction::Shutdown),
            ("reboot", CtlAction::Reboot),
            ("power-button", CtlAction::PowerButton),
            ("delete", CtlAction::Delete),
            ("shutdown-vmm", CtlAction::ShutdownVmm),
        ] {
            let args: Vec<&str> = base.iter().copied().chain([word]).collect();
            assert_eq!(action(&args), expected, "{word}");
        }
        let args: Vec<&str> = base.iter().copied().chain(["create", "vm.json"]).collect();
        assert_eq!(
            action(&args),
            CtlAction::Create {
                file: "vm.json".into()
            }
        );
        assert!(parse(&["ctl", "ping"]).is_err(), "--api-socket is required");
        assert!(parse(&["ctl", "--api-socket", "/s", "create"]).is_err());
        assert!(parse(&["ctl", "--api-socket", "/s", "frobnicate"]).is_err());
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("stdio"), Ok(ConsoleConfig::Tty));
        assert_eq!(parse_serial("off"), Ok(ConsoleConfig::Off));
        assert!(parse_serial("file=").is_err());
        assert_eq!(
            parse_serial("socket=/run/c.sock"),
            Ok(ConsoleConfig::Socket("/run/c.sock".into()))
        );
        assert!(parse_serial("socket=").is_err());
    }
}
