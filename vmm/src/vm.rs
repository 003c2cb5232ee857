//! A running VM: the KVM VM, its memory, devices and vCPU threads, from creation until the
//! guest powers off, resets, or fails.

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{AcpiPowerControl, Cmos, I8042};
use devices::{Bus, BusDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::backends::Backends;
use crate::boot::{self, EntryPoint};
use crate::config::VmConfig;
use crate::console::Console;
use crate::interrupts::GsiRouter;
use crate::layout::{irq, pio};
use crate::pci::PciSegment;
use crate::vcpu::{self, CpuTemplate, Vcpu, VcpuContext, VmEvents};
use crate::{memory, Error};

/// TSS for KVM on Intel: three pages just below the BIOS area at the top of 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    Shutdown,
    /// The guest asked for a reset; the caller builds the VM anew.
    Reset,
}

/// A VM ready to run.
pub struct Vm {
    /// The PCI devices (and their worker threads); dropped before the VM and its memory.
    _pci: PciSegment,
    _fd: Arc<VmFd>,
    /// Kept mapped while KVM uses it; dropped after `_fd` (fields drop in order).
    _memory: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
}

impl Vm {
    /// Creates the VM, loads the payload and configures every vCPU.
    pub fn new(
        kvm: &Kvm,
        template: &CpuTemplate,
        config: &VmConfig,
        console: &Console,
        backends: &Backends,
    ) -> Result<Self, Error> {
        let fd = Arc::new(kvm.create_vm().map_err(|e| Error::Kvm("create VM", e))?);
        let memory = memory::create_guest_memory(config.memory.size)?;
        register_memory(&fd, &memory)?;
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
        let pio_bus = legacy_devices(&events, console)?;
        fd.register_irqfd(&console.irq, irq::COM1)
            .map_err(|e| Error::Kvm("register COM1 irqfd", e))?;
        let mmio_bus = Arc::new(Bus::new());
        let router = Arc::new(GsiRouter::new(fd.clone()));
        let mut pci = PciSegment::new(
            fd.clone(),
            &pio_bus,
            mmio_bus.clone(),
            memory.clone(),
            router,
        )?;
        for device in backends.virtio_devices(config)? {
            pci.add_virtio(device)?;
        }

        tracing::debug!("VM, memory and legacy devices created");
        let payload = &config.payload;
        let kernel = boot::load_kernel(&memory, &payload.kernel)?;
        tracing::debug!("kernel loaded: {:?}", kernel.entry);
        let initramfs = payload
            .initramfs
            .as_deref()
            .map(|p| boot::load_initramfs(&memory, p, &kernel, config.memory.size))
            .transpose()?;
        tracing::debug!("initramfs loaded");
        boot::load_command_line(&memory, &payload.cmdline)?;
        let rsdp = acpi::create_acpi_tables(
            &memory,
            &AcpiConfig {
                vcpus: config.cpus.boot_vcpus,
            },
        )?;
        match kernel.entry {
            EntryPoint::Linux64 { .. } => boot::write_zero_page(
                &memory,
                &kernel,
                payload.cmdline.len(),
                initramfs,
                config.memory.size,
            )?,
            EntryPoint::Pvh { .. } => {
                boot::write_pvh_start_info(&memory, initramfs, rsdp, config.memory.size)?
            }
        }
        crate::regs::write_boot_tables(&memory, kernel.entry).map_err(vcpu::VcpuError::from)?;

        let mut vcpus = Vec::new();
        for id in 0..config.cpus.boot_vcpus {
            let vcpu = Vcpu::new(&fd, id)?;
            vcpu.configure(
                &template.cpuid,
                config.cpus.boot_vcpus,
                &template.msrs,
                kernel.entry,
            )?;
            vcpus.push(vcpu);
        }
        tracing::debug!("{} vCPUs configured", vcpus.len());
        let ctx = VcpuContext {
            pio: Arc::new(pio_bus),
            mmio: mmio_bus,
            events,
            stop: Arc::new(AtomicBool::new(false)),
        };
        Ok(Vm {
            _pci: pci,
            _fd: fd,
            _memory: memory,
            vcpus,
            ctx,
        })
    }

    /// Runs every vCPU on its own thread until the guest powers off, resets, or a vCPU fails.
    pub fn run(self) -> Result<VmExit, Error> {
        vcpu::install_kick_handler().map_err(Error::Signal)?;
        let epoll = Epoll::new().map_err(Error::EventFd)?;
        let watch = |fd: &EventFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
        };
        let events = self.ctx.events.clone();
        watch(&events.shutdown, 0).map_err(Error::EventFd)?;
        watch(&events.reset, 1).map_err(Error::EventFd)?;
        watch(&events.failure, 2).map_err(Error::EventFd)?;

        let mut threads: Vec<JoinHandle<Vcpu>> = Vec::new();
        for vcpu in self.vcpus {
            let ctx = self.ctx.clone();
            let name = format!("vcpu{}", vcpu.id());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run(ctx))
                .map_err(Error::Thread)?;
            threads.push(handle);
        }

        let mut ready = [EpollEvent::default(); 3];
        let exit = loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::EventFd(e)),
            };
            // A failure wins over a simultaneous shutdown or reset.
            let mut tokens: Vec<u64> = ready[..n].iter().map(|e| e.data()).collect();
            tokens.sort_unstable_by(|a, b| b.cmp(a));
            match tokens.first() {
                Some(2) => {
                    let reason = events
                        .failure_reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .unwrap_or_else(|| "vCPU failed".into());
                    break Err(Error::Guest(reason));
                }
                Some(1) => break Ok(VmExit::Reset),
                Some(0) => break Ok(VmExit::Shutdown),
                _ => continue,
            }
        };
        stop_vcpus(&self.ctx.stop, threads);
        exit
    }
}

/// Stops every vCPU thread: raises the stop flag and kicks each thread out of `KVM_RUN` until it
/// has returned.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<Vcpu>>) {
    stop.store(true, Ordering::Release);
    for t in threads {
        while !t.is_finished() {
            // SAFETY: the pthread handle belongs to a thread that has not been joined yet, so it
            // is valid; the kick signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = t.join();
    }
}

fn register_memory(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let region_def = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region maps `memory_size` bytes at `userspace_addr` and stays mapped for
        // as long as the VM exists: `Vm` owns both and drops the VM fd first.
        unsafe { fd.set_user_memory_region(region_def) }
            .map_err(|e| Error::Kvm("register guest memory", e))?;
    }
    Ok(())
}

/// Builds the port I/O bus with COM1, the i8042, the CMOS RTC and the ACPI power controls.
fn legacy_devices(events: &VmEvents, console: &Console) -> Result<Bus, Error> {
    let bus = Bus::new();
    let dup = |e: &EventFd| e.try_clone().map_err(Error::EventFd);
    type Placed = (Arc<Mutex<dyn BusDevice>>, (u64, u64));
    let devices: [Placed; 4] = [
        (console.serial.clone(), pio::COM1),
        (
            Arc::new(Mutex::new(I8042::new(dup(&events.reset)?))),
            pio::I8042,
        ),
        (Arc::new(Mutex::new(Cmos::new())), pio::CMOS),
        (
            Arc::new(Mutex::new(AcpiPowerControl::new(
                dup(&events.shutdown)?,
                dup(&events.reset)?,
            ))),
            pio::ACPI_POWER,
        ),
    ];
    for (device, (base, len)) in devices {
        bus.insert(device, base, len)?;
    }
    Ok(bus)
}
