//! podvisor's virtual machine monitor core: KVM, guest memory, vCPUs and Linux boot.
//!
//! [`controller::Controller`] owns a VM for its whole life: it creates it from a
//! [`config::VmConfig`], boots it, pauses and resumes it, runs it until the guest powers off,
//! and builds it anew in the same process each time the guest reboots, as a physical machine
//! would restart.
//!
//! Where things are:
//! - the VM's life: [`lifecycle`] (states and the rules of every request), [`controller`] (the
//!   thread that owns the VM), [`events`] (what it reports);
//! - the machine: [`builder`] builds it from a configuration (then boots a payload or restores
//!   a saved state), [`vm`] runs it, [`persist`] is its saved state;
//! - [`vstate`]: the KVM parts — `/dev/kvm`, guest memory, vCPUs, CPUID, registers, MSI routes;
//! - [`device_manager`]: every device by type, the buses, PCI, and the devices' saved state;
//! - [`boot`]: loading kernels and initramfs, boot parameters, ACPI tables;
//! - [`config`] (what a VM is made of), [`backends`] (the host files and taps it uses),
//!   [`console`] (COM1's input and output), [`layout`] (the guest's memory and port map).

pub mod backends;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod controller;
pub mod device_manager;
pub mod events;
pub mod host_paths;
pub mod layout;
pub mod lifecycle;
pub mod migration;
pub mod persist;
pub mod privileges;
pub mod seccomp;
pub mod snapshot;
pub mod vm;
pub mod vstate;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use config::VmConfig;
pub use console::Console;
pub use vm::{RunningVm, Vm, VmExit};

/// Everything that can stop a VM from running, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    KvmOpen(#[from] vstate::kvm::KvmError),
    #[error("KVM failed to {0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] vstate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot build ACPI tables: {0}")]
    Acpi(#[from] boot::acpi::AcpiError),
    #[error("cannot build SMBIOS tables: {0}")]
    Smbios(#[from] boot::smbios::SmbiosError),
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] devices::BusError),
    #[error("eventfd/epoll failure: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot install the vCPU signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("the guest stopped: {0}")]
    Guest(String),
    #[error("PCI: {0}")]
    Pci(String),
    #[error("interrupts: {0}")]
    Interrupts(String),
    #[error("{0}")]
    Device(String),
    #[error("cannot restore the VM: {0}")]
    Restore(String),
    #[error("cannot save the VM: {0}")]
    Save(String),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
}

/// Options of a VM run that are not part of the VM itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The user states the kernel is PVM-enabled, so PVM's `/dev/kvm` may run it.
    pub pvm_guest: bool,
    /// Set (e.g. by a SIGTERM handler) to press the guest's ACPI power button; the run
    /// clears it once pressed.
    pub power_button: Arc<AtomicBool>,
    /// Once the first boot has opened the VM's taps, the VM's thread gives up every
    /// capability but file access ([`privileges`]), before it starts the vCPUs.
    pub drop_privileges: bool,
    /// Which host files a configuration that is not the command line's may name: checked
    /// on a snapshot's configuration when it is restored and on a migrated VM's when it is
    /// received (the API checks the configurations it is given itself).
    pub host_paths: host_paths::HostPaths,
}
