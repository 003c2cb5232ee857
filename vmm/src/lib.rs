//! podvisor's virtual machine monitor core: KVM, guest memory, vCPUs and Linux boot.
//!
//! [`run`] is the whole life of a VM started from a [`config::VmConfig`]: it creates the VM,
//! runs it until the guest powers off, and builds it anew in the same process each time the
//! guest reboots, as a physical machine would restart.

pub mod acpi;
pub mod backends;
pub mod boot;
pub mod config;
pub mod console;
pub mod controller;
pub mod cpuid;
pub mod events;
pub mod interrupts;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod pci;
pub mod regs;
pub mod vcpu;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::VmConfig;
pub use console::Console;
pub use vm::{RunningVm, Vm, VmExit};

/// Everything that can stop a VM from running, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    KvmOpen(#[from] kvm::KvmError),
    #[error("KVM failed to {0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot build ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
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
    #[error("the guest stopped: {0}")]
    Guest(String),
    #[error("PCI: {0}")]
    Pci(String),
    #[error("interrupts: {0}")]
    Interrupts(String),
    #[error("{0}")]
    Device(String),
}

/// Options of a VM run that are not part of the VM itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The user states the kernel is PVM-enabled, so PVM's `/dev/kvm` may run it.
    pub pvm_guest: bool,
    /// Set (e.g. by a SIGTERM handler) to press the guest's ACPI power button; the run
    /// clears it once pressed.
    pub power_button: Arc<AtomicBool>,
}

/// How often a run checks [`RunOptions::power_button`].
const POWER_BUTTON_POLL: Duration = Duration::from_millis(100);

/// Runs the VM described by `config` until the guest powers off; guest reboots restart it in
/// this process.
pub fn run(config: &VmConfig, console: &Console, options: &RunOptions) -> Result<(), Error> {
    config.validate()?;
    let kvm = kvm::open(options.pvm_guest)?;
    let template = vcpu::CpuTemplate::from_kvm(&kvm)
        .map_err(|e| Error::Kvm("read supported CPUID/MSRs", e))?;
    let backends = backends::Backends::open(config)?;
    loop {
        let vm = Vm::new(&kvm, &template, config, console, &backends)?.start()?;
        let exit = loop {
            if let Some(exit) = vm.wait(Some(POWER_BUTTON_POLL)) {
                break exit;
            }
            if options.power_button.swap(false, Ordering::AcqRel) {
                tracing::info!("pressing the guest's power button");
                vm.power_button()?;
            }
        };
        vm.stop();
        match exit? {
            VmExit::Shutdown => return Ok(()),
            VmExit::Reset => {
                tracing::info!("guest reset: restarting the VM");
                console
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset();
            }
        }
    }
}
