//! One vCPU: its KVM file descriptor, its boot configuration, its saved state, and the thread
//! that runs it and routes its exits to the buses.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use devices::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::EntryPoint;
use crate::vstate::topology::Topology;
use crate::vstate::{cpuid, regs};

/// Failures to create, configure or run a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {id} ({what}): {source}")]
    Configure {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU boot state: {0}")]
    BootTables(#[from] regs::SetupError),
    #[error("KVM accepted only {set} of {wanted} MSRs on vCPU {id}")]
    PartialMsrs { id: u8, set: usize, wanted: usize },
    #[error("vCPU {id}: KVM refused the saved value of MSR {index:#x}")]
    RestoreMsr { id: u8, index: u32 },
    #[error("vCPU {id}: {reason}")]
    Incompatible { id: u8, reason: String },
}

/// How the VM asked to end, as seen by a vCPU or a device.
pub struct VmEvents {
    /// The guest powered off.
    pub shutdown: EventFd,
    /// The guest asked for a reset (reboot).
    pub reset: EventFd,
    /// A vCPU failed; `failure_reason` says why.
    pub failure: EventFd,
    pub failure_reason: Mutex<Option<String>>,
}

impl VmEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmEvents {
            shutdown: EventFd::new(libc::EFD_NONBLOCK)?,
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
            failure: EventFd::new(libc::EFD_NONBLOCK)?,
            failure_reason: Mutex::new(None),
        })
    }

    fn fail(&self, reason: String) {
        tracing::error!("{reason}");
        let mut slot = self
            .failure_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        let _ = self.failure.write(1);
    }
}

/// What the VMM asks of the vCPU threads: run, park (pause), or stop.
///
/// A paused vCPU sleeps on a condition variable outside `KVM_RUN` until it is resumed or
/// stopped; the VMM kicks the threads out of `KVM_RUN` (see [`kick_signal`]) until all of
/// them are parked.
#[derive(Default)]
pub struct RunControl {
    stop: AtomicBool,
    pause: AtomicBool,
    /// The share of time (percent) every vCPU is kept parked: live migration's auto-converge
    /// slows a guest that writes memory faster than it can be sent (see
    /// `RunningVm::set_throttle`, whose thread parks and releases the vCPUs).
    throttle: AtomicU32,
    /// Set while the throttle keeps the vCPUs parked.
    throttled: AtomicBool,
    /// How many vCPU threads are parked.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl RunControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to stop for good (parked ones wake up and return).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Asks every vCPU to park at its next exit.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sets the share of time (0 to 99 percent) the throttle keeps every vCPU parked.
    pub fn set_throttle(&self, percent: u32) {
        self.throttle.store(percent.min(99), Ordering::Release);
    }

    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::Acquire)
    }

    /// Parks the vCPUs at their next exit (`true`) or lets them run again (`false`), for the
    /// throttle; a pause is separate and wins.
    pub fn set_throttled(&self, on: bool) {
        self.throttled.store(on, Ordering::Release);
        if !on {
            let _guard = self.lock();
            self.changed.notify_all();
        }
    }

    fn held(&self) -> bool {
        self.pause.load(Ordering::Acquire) || self.throttled.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` until `count` vCPUs are parked; returns whether they are.
    pub fn wait_parked(&self, count: usize, timeout: std::time::Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |parked| *parked < count)
            .unwrap_or_else(|e| e.into_inner());
        *guard >= count
    }

    /// Called by a vCPU thread between runs: parks while a pause is requested.
    fn park_while_paused(&self) {
        if !self.held() {
            return;
        }
        let mut parked = self.lock();
        *parked += 1;
        self.changed.notify_all();
        while self.held() && !self.stop.load(Ordering::Acquire) {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        self.changed.notify_all();
    }
}

/// The period of vCPU throttling: a throttled vCPU is parked for its share of each slice.
pub const THROTTLE_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// What a running vCPU reaches: the buses, the VM's end events and the VMM's run control.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub events: Arc<VmEvents>,
    pub control: Arc<RunControl>,
}

/// A vCPU's complete architectural state, for snapshot and migration.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub lapic: kvm_lapic_state,
    pub xcrs: kvm_xcrs,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<(u32, u64)>,
    /// What the guest saw of CPUID (a restore refuses a host that lacks any of it).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// A KVM vCPU.
pub struct Vcpu {
    /// Its index among the VM's vCPUs (0 boots).
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` of `topology`; KVM's vCPU ID, and so its APIC ID, is the one the
    /// topology gives it.
    pub fn new(vm: &VmFd, id: u8, topology: &Topology) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(topology.apic_id(id)))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Vcpu { id, fd })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    fn cfg_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Configure { id, what, source }
    }

    /// Sets CPUID, the boot MSRs, FPU and LAPIC: the vCPU as it comes out of reset, for a
    /// boot or before a saved state is put back.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        topology: &Topology,
        supported_msrs: &[u32],
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter(&mut cpuid, self.id, topology);
        self.fd.set_cpuid2(&cpuid).map_err(self.cfg_err("CPUID"))?;

        let msrs = regs::boot_msrs(supported_msrs);
        let set = self.fd.set_msrs(&msrs).map_err(self.cfg_err("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::PartialMsrs {
                id: self.id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.cfg_err("FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.cfg_err("LAPIC"))?;
        regs::set_lapic_lints(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.cfg_err("LAPIC"))?;
        Ok(())
    }

    /// Sets the registers that start the kernel at `entry` (the boot vCPU only; the others wait
    /// for INIT/SIPI in the in-kernel LAPIC).
    pub fn set_boot_registers(&self, entry: EntryPoint) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(self.cfg_err("segments"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs, entry))
            .map_err(self.cfg_err("segments"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.cfg_err("registers"))?;
        Ok(())
    }

    /// Captures the vCPU's state. `msr_indices` lists the MSRs to carry.
    pub fn save(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        // MP state first: it may flush pending LAPIC events into the register state.
        let mp_state = self.fd.get_mp_state().map_err(self.cfg_err("MP state"))?;
        let msrs = self.read_msrs(msr_indices)?;
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs().map_err(self.cfg_err("registers"))?,
            sregs: self.fd.get_sregs().map_err(self.cfg_err("segments"))?,
            xsave: self.fd.get_xsave().map_err(self.cfg_err("XSAVE"))?,
            lapic: self.fd.get_lapic().map_err(self.cfg_err("LAPIC"))?,
            xcrs: self.fd.get_xcrs().map_err(self.cfg_err("XCRs"))?,
            mp_state,
            events: self.fd.get_vcpu_events().map_err(self.cfg_err("events"))?,
            msrs,
            cpuid: self.cpuid()?.as_slice().to_vec(),
        })
    }

    /// The CPUID this vCPU has now (as set, with the bits KVM keeps in step with its state).
    fn cpuid(&self) -> Result<CpuId, VcpuError> {
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.cfg_err("CPUID"))
    }

    /// `entries` as one KVM_GET_MSRS / KVM_SET_MSRS list.
    fn msr_list(&self, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<Msrs, VcpuError> {
        Msrs::from_entries(entries).map_err(|_| VcpuError::PartialMsrs {
            id: self.id,
            set: 0,
            wanted: entries.len(),
        })
    }

    /// Reads the MSRs of `indices` that this vCPU has. KVM_GET_MSRS stops at the first MSR it
    /// cannot read (the supported list names some that only exist with certain features), so
    /// that one is left out and the read goes on after it.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<_> = chunk
                .iter()
                .map(|&index| kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = self.msr_list(&entries)?;
            let n = self.fd.get_msrs(&mut msrs).map_err(self.cfg_err("MSRs"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // Skip the MSR that stopped the read, if one did.
            rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
        }
        Ok(out)
    }

    /// Puts a saved state back into a vCPU configured ([`Vcpu::configure`]) but never run:
    /// first the CPUID the guest saw, if this host offers all of it.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if let Some(reason) = cpuid::incompatible(&state.cpuid, self.cpuid()?.as_slice()) {
            return Err(VcpuError::Incompatible {
                id: self.id,
                reason,
            });
        }
        let saved = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Incompatible {
            id: self.id,
            reason: format!("{} CPUID entries saved, too many", state.cpuid.len()),
        })?;
        self.fd.set_cpuid2(&saved).map_err(self.cfg_err("CPUID"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.cfg_err("segments"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.cfg_err("registers"))?;
        // SAFETY: `state.xsave` is a legacy-size `kvm_xsave` read by KVM_GET_XSAVE, which is all
        // KVM_SET_XSAVE reads for it.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.cfg_err("XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.cfg_err("XCRs"))?;
        let entries: Vec<_> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        for chunk in entries.chunks(MSR_CHUNK) {
            let msrs = self.msr_list(chunk)?;
            let set = self.fd.set_msrs(&msrs).map_err(self.cfg_err("MSRs"))?;
            if set != chunk.len() {
                return Err(VcpuError::RestoreMsr {
                    id: self.id,
                    index: chunk[set].index,
                });
            }
        }
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.cfg_err("LAPIC"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.cfg_err("MP state"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.cfg_err("events"))?;
        Ok(())
    }
}

/// Runs `vcpu` until the guest ends the VM, a fatal error, or a stop request; parks while the
/// VMM pauses the VM. The vCPU is locked only inside `KVM_RUN` and its exit handling, so a
/// parked vCPU can be saved and restored by the VMM ([`Vcpu::save`], [`Vcpu::restore`]).
pub fn run(vcpu: Arc<Mutex<Vcpu>>, ctx: VcpuContext) {
    let id = lock(&vcpu).id;
    if let Err(e) = crate::seccomp::apply(crate::seccomp::Kind::Vcpu) {
        ctx.events.fail(format!("vCPU {id}: {e}"));
        return;
    }
    loop {
        ctx.control.park_while_paused();
        if ctx.control.stopping() {
            break;
        }
        let mut guard = lock(&vcpu);
        match guard.fd.run() {
            Ok(exit) => {
                if !handle_exit(id, exit, &ctx) {
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctx.events.fail(format!("vCPU {id} failed to run: {e}"));
                break;
            }
        }
    }
}

/// Locks a vCPU, recovering it if its thread panicked.
pub fn lock(vcpu: &Mutex<Vcpu>) -> std::sync::MutexGuard<'_, Vcpu> {
    vcpu.lock().unwrap_or_else(|e| e.into_inner())
}

/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// Routes one exit; returns false when this vCPU must stop.
fn handle_exit(id: u8, exit: VcpuExit, ctx: &VcpuContext) -> bool {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        // A triple fault resets a PC. Said, since nothing else tells a guest that restarted
        // on its own from one that asked to.
        VcpuExit::Shutdown => {
            devices::warn_limited!("vCPU {id}: triple fault: the machine resets");
            let _ = ctx.events.reset.write(1);
            return false;
        }
        VcpuExit::SystemEvent(kind, _) => {
            match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => {
                    let _ = ctx.events.shutdown.write(1);
                }
                KVM_SYSTEM_EVENT_RESET => {
                    let _ = ctx.events.reset.write(1);
                }
                KVM_SYSTEM_EVENT_CRASH => ctx.events.fail(format!("vCPU {id}: guest crashed")),
                other => ctx
                    .events
                    .fail(format!("vCPU {id}: unknown system event {other}")),
            }
            return false;
        }
        VcpuExit::FailEntry(reason, cpu) => {
            ctx.events.fail(format!(
                "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ));
            return false;
        }
        VcpuExit::InternalError => {
            ctx.events
                .fail(format!("vCPU {id}: KVM internal error (emulation failure)"));
            return false;
        }
        other => tracing::debug!("vCPU {id}: ignored exit {other:?}"),
    }
    true
}

/// The no-op handler of the signal that kicks vCPU threads out of `KVM_RUN`.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Shares the supported MSR list and CPUID among vCPUs.
pub struct CpuTemplate {
    pub cpuid: CpuId,
    pub msrs: Vec<u32>,
}

impl CpuTemplate {
    pub fn from_kvm(kvm: &kvm_ioctls::Kvm) -> Result<Self, kvm_ioctls::Error> {
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
        let msrs = kvm.get_msr_index_list()?.as_slice().to_vec();
        Ok(CpuTemplate { cpuid, msrs })
    }
}
