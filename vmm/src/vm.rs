//! A running VM: the KVM VM, its memory, devices and vCPU threads, from creation until the
//! guest powers off, resets, or fails.

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{AcpiPowerControl, Cmos, Ged, GedTrigger, I8042};
use devices::GuestMemoryMmap;
use devices::{Bus, BusDevice};
use kvm_bindings::{
    kvm_clock_data, kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
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
use crate::vcpu::{self, CpuTemplate, RunControl, Vcpu, VcpuContext, VmEvents};
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
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    ged: GedTrigger,
    /// The PCI devices (and their worker threads); dropped before the VM and its memory.
    pci: PciSegment,
    fd: Arc<VmFd>,
    /// Kept mapped while KVM uses it; dropped after `fd` (fields drop in order).
    memory: GuestMemoryMmap,
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
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        fd.register_irqfd(&ged_irq, irq::GED)
            .map_err(|e| Error::Kvm("register the GED irqfd", e))?;
        let (ged, ged_trigger) = Ged::new(ged_irq);
        pio_bus.insert(Arc::new(Mutex::new(ged)), pio::GED.0, pio::GED.1)?;
        let mmio_bus = Arc::new(Bus::new());
        let router = Arc::new(GsiRouter::new(fd.clone()));
        let mut pci = PciSegment::new(
            fd.clone(),
            &pio_bus,
            mmio_bus.clone(),
            memory.clone(),
            router,
        )?;
        for (name, device) in backends.virtio_devices(config)? {
            pci.add_virtio(name, device)?;
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
            control: Arc::new(RunControl::default()),
        };
        Ok(Vm {
            vcpus,
            ctx,
            ged: ged_trigger,
            pci,
            fd,
            memory,
        })
    }

    /// Runs every vCPU on its own thread until the guest powers off, resets, or a vCPU fails.
    pub fn run(self) -> Result<VmExit, Error> {
        let running = self.start()?;
        let exit = running.wait(None);
        running.stop();
        exit.unwrap_or_else(|| Err(Error::Guest("the VM ended without a reason".into())))
    }

    /// Starts every vCPU on its own thread.
    pub fn start(self) -> Result<RunningVm, Error> {
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
        watch(&events.shutdown, TOKEN_SHUTDOWN).map_err(Error::EventFd)?;
        watch(&events.reset, TOKEN_RESET).map_err(Error::EventFd)?;
        watch(&events.failure, TOKEN_FAILURE).map_err(Error::EventFd)?;

        let mut threads: Vec<JoinHandle<Vcpu>> = Vec::new();
        for vcpu in self.vcpus {
            let ctx = self.ctx.clone();
            let name = format!("vcpu{}", vcpu.id());
            let handle = std::thread::Builder::new()
                .name(name)
                .stack_size(devices::THREAD_STACK_SIZE)
                .spawn(move || vcpu.run(ctx))
                .map_err(Error::Thread)?;
            threads.push(handle);
        }
        Ok(RunningVm {
            threads,
            epoll,
            ctx: self.ctx,
            ged: self.ged,
            paused_clock: Mutex::new(None),
            pci: self.pci,
            fd: self.fd,
            _memory: self.memory,
        })
    }
}

const TOKEN_SHUTDOWN: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_FAILURE: u64 = 2;

/// How long a pause waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM whose vCPUs run on their own threads.
pub struct RunningVm {
    threads: Vec<JoinHandle<Vcpu>>,
    epoll: Epoll,
    ctx: VcpuContext,
    ged: GedTrigger,
    /// The guest's clock when it was paused (None while running).
    paused_clock: Mutex<Option<kvm_clock_data>>,
    /// Devices, then the VM, then its memory: fields drop in order.
    pci: PciSegment,
    fd: Arc<VmFd>,
    _memory: GuestMemoryMmap,
}

impl RunningVm {
    /// Waits until the guest powers off, resets, or a vCPU fails (for at most `timeout`;
    /// None when it runs on).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Result<VmExit, Error>> {
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut ready = [EpollEvent::default(); 3];
        loop {
            let n = match self.epoll.wait(timeout_ms, &mut ready) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(Err(Error::EventFd(e))),
            };
            // A failure wins over a simultaneous shutdown or reset.
            let tokens: Vec<u64> = ready[..n].iter().map(|e| e.data()).collect();
            let events = &self.ctx.events;
            if tokens.contains(&TOKEN_FAILURE) {
                let reason = events
                    .failure_reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| "vCPU failed".into());
                return Some(Err(Error::Guest(reason)));
            }
            if tokens.contains(&TOKEN_RESET) {
                return Some(Ok(VmExit::Reset));
            }
            if tokens.contains(&TOKEN_SHUTDOWN) {
                return Some(Ok(VmExit::Shutdown));
            }
        }
    }

    /// A file descriptor that becomes readable when [`RunningVm::wait`] has an exit to
    /// report (for callers that multiplex it with other events).
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// Ends the VM as a guest power-off would (the VMM's shutdown request).
    pub fn request_shutdown(&self) {
        let _ = self.ctx.events.shutdown.write(1);
    }

    /// Resets the VM as a guest reboot would.
    pub fn request_reset(&self) {
        let _ = self.ctx.events.reset.write(1);
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> Result<(), Error> {
        self.ged.power_button().map_err(Error::EventFd)
    }

    /// Pauses the guest: every vCPU parked outside `KVM_RUN`, every device worker idle, the
    /// guest clock stopped. Nothing changes guest memory until [`RunningVm::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        let mut clock = self.paused_clock.lock().unwrap_or_else(|e| e.into_inner());
        if clock.is_some() {
            return Ok(());
        }
        let control = &self.ctx.control;
        control.request_pause();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        // A kick that lands just before a thread enters KVM_RUN is lost: repeat until parked.
        while !control.wait_parked(self.threads.len(), Duration::from_millis(1)) {
            if Instant::now() > deadline {
                control.resume();
                return Err(Error::Guest("the vCPUs did not stop for the pause".into()));
            }
            self.kick_all();
        }
        self.pci.pause_devices();
        *clock = Some(
            self.fd
                .get_clock()
                .map_err(|e| Error::Kvm("read the guest clock", e))?,
        );
        Ok(())
    }

    /// Resumes a paused guest where it stopped; its clock does not count the pause.
    pub fn resume(&self) -> Result<(), Error> {
        let mut clock = self.paused_clock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut saved) = clock.take() else {
            return Ok(());
        };
        saved.flags = 0;
        self.fd
            .set_clock(&saved)
            .map_err(|e| Error::Kvm("restore the guest clock", e))?;
        self.pci.resume_devices()?;
        self.ctx.control.resume();
        Ok(())
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.paused_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Per-device counters, by device name.
    pub fn counters(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
        self.pci.counters()
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                // SAFETY: the pthread handle belongs to a thread that has not been joined yet,
                // so it is valid; the kick signal has a no-op handler installed.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            }
        }
    }

    /// Stops every vCPU thread (kicking each out of `KVM_RUN` until it has returned) and
    /// tears the VM down.
    pub fn stop(self) {
        self.ctx.control.request_stop();
        for t in &self.threads {
            while !t.is_finished() {
                // SAFETY: as in `kick_all`.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
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
