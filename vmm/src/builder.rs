//! Building a VM from its configuration, in two steps: [`build`] makes the virtual hardware
//! (KVM VM, guest memory, interrupt controllers and timer, every device, the vCPUs in their
//! reset state) and boots nothing; then either [`load_payload`] loads the kernel and sets the
//! boot registers (a boot or a reboot), or [`Vm::restore`] puts a saved machine back.

use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::backends::Backends;
use crate::boot::acpi::{self, AcpiConfig};
use crate::boot::{self, EntryPoint};
use crate::config::VmConfig;
use crate::console::Console;
use crate::device_manager::DeviceManager;
use crate::vm::Vm;
use crate::vstate::memory;
use crate::vstate::topology::Topology;
use crate::vstate::vcpu::{self, CpuTemplate, RunControl, Vcpu, VcpuContext, VmEvents};
use crate::Error;
use devices::GuestMemoryMmap;

/// TSS for KVM on Intel: three pages just below the BIOS area at the top of 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Builds the machine `config` describes, without a payload: the vCPUs are in their reset
/// state and guest memory is empty.
pub fn build(
    kvm: &Kvm,
    template: &CpuTemplate,
    config: &VmConfig,
    console: &Console,
    backends: &Backends,
) -> Result<Vm, Error> {
    let memory = memory::create_guest_memory(&config.memory)?;
    build_on(kvm, template, config, console, backends, memory)
}

/// Like [`build`], on guest memory made (and filled) beforehand, e.g. by a migration that
/// received the memory before the machine state: `memory` must be [`memory::create_guest_memory`]'s
/// for `config`.
pub fn build_on(
    kvm: &Kvm,
    template: &CpuTemplate,
    config: &VmConfig,
    console: &Console,
    backends: &Backends,
    memory: GuestMemoryMmap,
) -> Result<Vm, Error> {
    let fd = Arc::new(kvm.create_vm().map_err(|e| Error::Kvm("create VM", e))?);
    register_memory(&fd, &memory, false)?;
    fd.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| Error::Kvm("set TSS address", e))?;
    fd.create_irq_chip()
        .map_err(|e| Error::Kvm("create irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(|e| Error::Kvm("create PIT", e))?;

    let events = Arc::new(VmEvents::new().map_err(Error::EventFd)?);
    let devices = DeviceManager::new(&fd, &memory, &events, console, backends, config)?;
    tracing::debug!("VM, memory and devices created");

    let topology = Topology::of(&config.cpus);
    let mut vcpus = Vec::new();
    for id in 0..config.cpus.boot_vcpus {
        let vcpu = Vcpu::new(&fd, id, &topology)?;
        vcpu.configure(&template.cpuid, &topology, &template.msrs)?;
        vcpus.push(Arc::new(std::sync::Mutex::new(vcpu)));
    }
    tracing::debug!("{} vCPUs created", vcpus.len());
    let ctx = VcpuContext {
        pio: devices.pio().clone(),
        mmio: devices.mmio().clone(),
        events,
        control: Arc::new(RunControl::default()),
    };
    Ok(Vm {
        vcpus,
        msrs: template.msrs.clone(),
        ctx,
        devices,
        fd,
        memory,
    })
}

/// Loads the kernel, initramfs and command line, writes the ACPI and SMBIOS tables and the boot
/// parameters, and points the boot vCPU at the kernel's entry.
/// A configuration without a kernel boots from its disk: `disk` is what [`boot::disk::resolve`]
/// read from it (before the VM opened its disks).
pub fn load_payload(
    vm: &Vm,
    config: &VmConfig,
    disk: Option<boot::disk::DiskPayload>,
) -> Result<(), Error> {
    let memory = &vm.memory;
    let payload = &config.payload;
    let size = config.memory.size;
    let (kernel, initramfs, cmdline) = match (disk, &payload.kernel) {
        (Some(d), _) => {
            let kernel = boot::load_kernel_from(memory, d.kernel, &d.name)?;
            let initramfs = d
                .initrd
                .map(|f| boot::load_initramfs_from(memory, f, &d.name, &kernel, size))
                .transpose()?;
            (kernel, initramfs, d.cmdline)
        }
        (None, Some(path)) => {
            let kernel = boot::load_kernel(memory, path)?;
            let initramfs = payload
                .initramfs
                .as_deref()
                .map(|p| boot::load_initramfs(memory, p, &kernel, size))
                .transpose()?;
            (kernel, initramfs, payload.cmdline.clone())
        }
        (None, None) => {
            return Err(Error::Device(
                "no kernel to boot and none read from a disk (a bug)".into(),
            ))
        }
    };
    tracing::debug!("kernel and initramfs loaded: {:?}", kernel.entry);
    boot::load_command_line(memory, &cmdline)?;
    let rsdp = acpi::create_acpi_tables(memory, &AcpiConfig::new(&config.cpus))?;
    boot::smbios::create_smbios_tables(memory, config.platform.as_ref())?;
    match kernel.entry {
        EntryPoint::Linux64 { .. } => boot::write_zero_page(
            memory,
            &kernel,
            cmdline.len(),
            initramfs,
            config.memory.size,
        )?,
        EntryPoint::Pvh { .. } => {
            boot::write_pvh_start_info(memory, initramfs, rsdp, config.memory.size)?
        }
    }
    crate::vstate::regs::write_boot_tables(memory, kernel.entry).map_err(vcpu::VcpuError::from)?;
    if let Some(boot_vcpu) = vm.vcpus.first() {
        vcpu::lock(boot_vcpu).set_boot_registers(kernel.entry)?;
    }
    Ok(())
}

/// Gives KVM the guest's memory, one slot per region (slot N is region N), logging the pages
/// the guest writes when `log_dirty` (for live migration; [`dirty_log`] reads the log). Called
/// again on the same memory, it turns the logging on or off.
pub(crate) fn register_memory(
    fd: &VmFd,
    memory: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let region_def = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region maps `memory_size` bytes at `userspace_addr` and stays mapped for
        // as long as the VM exists: `Vm` owns both and drops the VM fd first.
        unsafe { fd.set_user_memory_region(region_def) }
            .map_err(|e| Error::Kvm("register guest memory", e))?;
    }
    Ok(())
}

/// The pages written since the last call (or since logging began), per region of `memory`
/// (one bit per 4 KiB page, in `u64` words): by the guest's vCPUs (KVM's log of each slot)
/// and by the VMM's devices (the memory's own bitmaps). Reading clears both.
pub(crate) fn dirty_log(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, Error> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut bits = fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| Error::Kvm("read the dirty-page log", e))?;
            let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (word, dev) in bits.iter_mut().zip(devices) {
                *word |= dev;
            }
            Ok(bits)
        })
        .collect()
}
