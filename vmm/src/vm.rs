//! A VM: the KVM VM, its memory, its devices and its vCPUs, built by [`crate::builder`], and
//! then running on vCPU threads until the guest powers off, resets, or fails.

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backends::Backends;
use crate::config::VmConfig;
use crate::console::Console;
use crate::device_manager::DeviceManager;
use crate::persist::{self, MachineState};
use crate::vstate::vcpu::{self, CpuTemplate, Vcpu, VcpuContext};
use crate::{builder, Error};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    Shutdown,
    /// The guest asked for a reset; the caller builds the VM anew.
    Reset,
}

/// A VM ready to run: built, and either booting a payload or restored from a saved state.
pub struct Vm {
    pub(crate) vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// The MSRs a saved vCPU carries (those KVM supports).
    pub(crate) msrs: Vec<u32>,
    pub(crate) ctx: VcpuContext,
    /// The devices (and their worker threads); dropped before the VM and its memory.
    pub(crate) devices: DeviceManager,
    pub(crate) fd: Arc<VmFd>,
    /// Kept mapped while KVM uses it; dropped after `fd` (fields drop in order).
    pub(crate) memory: GuestMemoryMmap,
}

impl Vm {
    /// Builds the machine `config` describes and loads its payload: ready to boot.
    pub fn new(
        kvm: &Kvm,
        template: &CpuTemplate,
        config: &VmConfig,
        console: &Console,
        backends: &Backends,
    ) -> Result<Self, Error> {
        // A disk boot reads the disk before the VM opens (and locks) it.
        let disk = match config.payload.kernel {
            Some(_) => None,
            None => Some(crate::boot::disk::resolve(config)?),
        };
        let vm = builder::build(kvm, template, config, console, backends)?;
        builder::load_payload(&vm, config, disk)?;
        Ok(vm)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Puts a saved machine back into this one, which must be built (not booted) from the same
    /// configuration, with the saved guest memory already copied in: the KVM VM's interrupt
    /// controllers, timer and clock, every vCPU, then every device.
    pub fn restore(&self, state: &MachineState) -> Result<(), Error> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(Error::Restore(format!(
                "{} vCPUs saved, this VM has {}",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        persist::restore_kvm(&self.fd, &state.kvm)?;
        for (vcpu, saved) in self.vcpus.iter().zip(&state.vcpus) {
            vcpu::lock(vcpu).restore(saved)?;
        }
        self.devices.restore(&state.devices)
    }

    /// Changes the locks on the disk images (see [`devices::block::lock`]): a live
    /// migration's two ends share them until one of them takes the VM over.
    pub fn set_disk_locks(&self, mode: devices::block::LockMode) -> Result<(), Error> {
        self.devices.set_backend_locks(mode)
    }

    /// Has every device read its backend again (a disk image's metadata): another VMM wrote
    /// it since this machine was built (see [`crate::migration`]).
    pub fn reload_backends(&self) -> Result<(), Error> {
        self.devices.reload_backends()
    }

    /// Restores `state` (see [`Vm::restore`]) with the devices paused, and starts the vCPU
    /// threads parked: the VM is paused where it was saved, its clock stopped at the saved
    /// time; [`RunningVm::resume`] continues it.
    pub fn start_restored(self, state: &MachineState) -> Result<RunningVm, Error> {
        self.devices.pause();
        self.restore(state)?;
        self.ctx.control.request_pause();
        let running = self.start()?;
        *running
            .paused_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(state.kvm.clock);
        Ok(running)
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

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in &self.vcpus {
            let (vcpu, ctx) = (vcpu.clone(), self.ctx.clone());
            let name = format!("vcpu{}", vcpu::lock(&vcpu).id());
            let handle = std::thread::Builder::new()
                .name(name)
                .stack_size(devices::THREAD_STACK_SIZE)
                .spawn(move || vcpu::run(vcpu, ctx))
                .map_err(Error::Thread)?;
            threads.push(handle);
        }
        Ok(RunningVm {
            threads,
            vcpus: self.vcpus,
            msrs: self.msrs,
            epoll,
            ctx: self.ctx,
            paused_clock: Mutex::new(None),
            throttler: Mutex::new(None),
            devices: self.devices,
            fd: self.fd,
            memory: self.memory,
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
    threads: Vec<JoinHandle<()>>,
    /// Shared with their threads, which lock them only inside `KVM_RUN`.
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    msrs: Vec<u32>,
    epoll: Epoll,
    ctx: VcpuContext,
    /// The guest's clock when it was paused (None while running).
    paused_clock: Mutex<Option<kvm_clock_data>>,
    /// The thread that kicks throttled vCPUs out of `KVM_RUN` (see [`RunningVm::set_throttle`]).
    throttler: Mutex<Option<JoinHandle<()>>>,
    /// Devices, then the VM, then its memory: fields drop in order.
    devices: DeviceManager,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
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
            if let Some(exit) = self.exit_of(&ready[..n], true) {
                return Some(exit);
            }
        }
    }

    /// How the guest ended, if it has powered off, reset or failed (an exit
    /// [`RunningVm::wait`] would report, left for it to report).
    pub fn pending_exit(&self) -> Option<String> {
        let mut ready = [EpollEvent::default(); 3];
        let n = self.epoll.wait(0, &mut ready).ok()?;
        Some(match self.exit_of(&ready[..n], false)? {
            Ok(VmExit::Reset) => "reset".into(),
            Ok(VmExit::Shutdown) => "powered off".into(),
            Err(Error::Guest(reason)) => format!("failed ({reason})"),
            Err(e) => format!("failed ({e})"),
        })
    }

    /// The exit the `ready` events report; a failure wins over a simultaneous shutdown or
    /// reset. `take`: the failure's reason is taken (it is being reported), else copied.
    fn exit_of(&self, ready: &[EpollEvent], take: bool) -> Option<Result<VmExit, Error>> {
        let tokens: Vec<u64> = ready.iter().map(|e| e.data()).collect();
        if tokens.contains(&TOKEN_FAILURE) {
            let mut slot = self
                .ctx
                .events
                .failure_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let reason = if take { slot.take() } else { slot.clone() };
            return Some(Err(Error::Guest(
                reason.unwrap_or_else(|| "vCPU failed".into()),
            )));
        }
        if tokens.contains(&TOKEN_RESET) {
            return Some(Ok(VmExit::Reset));
        }
        tokens
            .contains(&TOKEN_SHUTDOWN)
            .then_some(Ok(VmExit::Shutdown))
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
        self.devices.power_button()
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
        // Threads that ended (their vCPU stopped the VM) cannot park.
        let live = || self.threads.iter().filter(|t| !t.is_finished()).count();
        while !control.wait_parked(live(), Duration::from_millis(1)) {
            if Instant::now() > deadline {
                control.resume();
                return Err(Error::Guest("the vCPUs did not stop for the pause".into()));
            }
            self.kick_all();
        }
        self.devices.pause();
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
        self.devices.resume()?;
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

    /// Saves the whole machine but its memory ([`RunningVm::memory`]): the KVM VM's state,
    /// every vCPU and every device. Only while paused.
    pub fn save(&self) -> Result<MachineState, Error> {
        let clock = self.paused_clock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(clock) = *clock else {
            return Err(Error::Save("it is running; pause it first".into()));
        };
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| vcpu::lock(v).save(&self.msrs))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            kvm: persist::save_kvm(&self.fd, clock)?,
            vcpus,
            devices: self.devices.save()?,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Starts logging the pages written to guest memory, by the guest and by devices; what
    /// was logged before is forgotten.
    pub fn start_dirty_log(&self) -> Result<(), Error> {
        builder::register_memory(&self.fd, &self.memory, true)?;
        builder::dirty_log(&self.fd, &self.memory).map(|_| ())
    }

    /// The pages written since the last call, per memory region (see [`builder::dirty_log`]).
    pub fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, Error> {
        builder::dirty_log(&self.fd, &self.memory)
    }

    /// Stops logging written pages.
    pub fn stop_dirty_log(&self) -> Result<(), Error> {
        builder::register_memory(&self.fd, &self.memory, false)
    }

    /// Slows the guest: a thread of its own keeps every vCPU parked `percent` (0-99) of each
    /// [`vcpu::THROTTLE_SLICE`], kicking them out of `KVM_RUN` for it (live migration's
    /// auto-converge). 0 ends the throttling; a pause must not start while it runs.
    pub fn set_throttle(&self, percent: u32) -> Result<(), Error> {
        let control = &self.ctx.control;
        control.set_throttle(percent);
        let mut throttler = self.throttler.lock().unwrap_or_else(|e| e.into_inner());
        if percent == 0 {
            if let Some(t) = throttler.take() {
                let _ = t.join();
            }
            return Ok(());
        }
        if throttler.is_none() {
            let control = control.clone();
            let vcpus: Vec<libc::pthread_t> =
                self.threads.iter().map(|t| t.as_pthread_t()).collect();
            let t = std::thread::Builder::new()
                .name("throttle".into())
                .stack_size(devices::THREAD_STACK_SIZE)
                .spawn(move || {
                    let kick = || {
                        for &thread in &vcpus {
                            // SAFETY: the vCPU threads are joined only after this thread
                            // (`stop` and `set_throttle(0)` join it first), so each handle
                            // is valid; the kick signal has a no-op handler installed.
                            unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
                        }
                    };
                    let mut released = std::time::Instant::now();
                    loop {
                        let percent = control.throttle();
                        if percent == 0 || control.stopping() {
                            break;
                        }
                        // Parked for `percent` of the time: as long, against how long they
                        // really ran (this thread may oversleep on a busy host), as the share
                        // asks; kicked every millisecond until all are parked, since a kick
                        // that lands just before KVM_RUN is lost.
                        let ran = released.elapsed().min(vcpu::THROTTLE_SLICE * 2);
                        let held = ran * percent / (100 - percent);
                        let start = std::time::Instant::now();
                        control.set_throttled(true);
                        let mut all_parked = false;
                        while start.elapsed() < held {
                            let left = held - start.elapsed().min(held);
                            if all_parked {
                                std::thread::sleep(left);
                                break;
                            }
                            kick();
                            all_parked = control.wait_parked(
                                vcpus.len(),
                                left.min(std::time::Duration::from_millis(1)),
                            );
                        }
                        control.set_throttled(false);
                        released = std::time::Instant::now();
                        std::thread::sleep(vcpu::THROTTLE_SLICE * (100 - percent) / 100);
                    }
                    control.set_throttled(false);
                })
                .map_err(Error::Thread)?;
            *throttler = Some(t);
        }
        Ok(())
    }

    /// Makes every disk durable on the host (while paused), for another VMM to open next.
    pub fn flush_disks(&self) -> Result<(), Error> {
        self.devices.flush()
    }

    /// Changes the locks on the disk images (see [`Vm::set_disk_locks`]).
    pub fn set_disk_locks(&self, mode: devices::block::LockMode) -> Result<(), Error> {
        self.devices.set_backend_locks(mode)
    }

    /// Per-device counters, by device name.
    pub fn counters(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
        self.devices.counters()
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
        let _ = self.set_throttle(0);
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
