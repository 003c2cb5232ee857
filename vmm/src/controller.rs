//! The VM's life under an API: create, boot, pause, resume, reboot, shut down, delete, by the
//! rules of [`crate::lifecycle`] (Cloud Hypervisor's, stricter: a request in the wrong state is
//! refused with the reason, never half done).
//!
//! One thread owns the VM. Requests reach it through a channel (each with its own reply
//! channel), and the thread also watches the running VM for the guest powering off, resetting
//! or failing, so the state is always what the guest did last. Lifecycle events go to the
//! [`EventMonitor`].

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::backends::{self, Backends};
use crate::builder;
use crate::config::{NetRetap, VmConfig};
use crate::console::Console;
use crate::events::EventMonitor;
use crate::lifecycle::{self, Action, Refusal, VmState};
use crate::migration::{
    self, Endpoint, MigrationError, MigrationInfo, MigrationState, SendOptions,
};
use crate::snapshot::{self, SnapshotError};
use crate::vm::{RunningVm, Vm, VmExit};
use crate::vstate::kvm;
use crate::vstate::vcpu::CpuTemplate;
use crate::{Error, RunOptions};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request needs a VM and none has been created (HTTP 404).
    #[error("{0}")]
    NoVm(String),
    /// The request is not allowed in the VM's current state (HTTP 409).
    #[error("{0}")]
    WrongState(String),
    /// The request itself is invalid, e.g. a configuration that does not validate (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Something failed on the host (HTTP 500).
    #[error("{0}")]
    Failed(String),
}

impl From<Refusal> for ControlError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NoVm { .. } => ControlError::NoVm(refusal.to_string()),
            Refusal::Exists { .. } | Refusal::WrongState { .. } => {
                ControlError::WrongState(refusal.to_string())
            }
        }
    }
}

/// What the API asks of the VM.
#[derive(Debug)]
pub enum Request {
    Create(Box<VmConfig>),
    Boot,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    Delete,
    Info,
    Counters,
    /// Writes a snapshot of the paused VM into this directory (`vm.snapshot`).
    Snapshot(PathBuf),
    /// Brings back, paused, the VM snapshotted in this directory (`vm.restore`), its network
    /// interfaces on these taps instead of the snapshot's.
    Restore(PathBuf, Vec<NetRetap>),
    /// Live-migrates the running VM to a podvisor receiving at this endpoint
    /// (`vm.send-migration`); answers once the guest runs there.
    SendMigration(Endpoint, SendOptions),
    /// Waits at this endpoint for a source and takes its VM (`vm.receive-migration`), its
    /// network interfaces on these taps instead of the source's.
    ReceiveMigration(Endpoint, Vec<NetRetap>),
    /// Cancels the outgoing migration under way (`vm.cancel-migration`); answered at once,
    /// while the VM's thread sends.
    CancelMigration,
    /// Stops the VM (if any) and ends the VM thread (`vmm.shutdown`).
    ShutdownVmm,
}

impl Request {
    /// Its row in the lifecycle table (`None`: `vmm.shutdown`, allowed always).
    pub fn action(&self) -> Option<Action> {
        Some(match self {
            Request::Create(_) => Action::Create,
            Request::Boot => Action::Boot,
            Request::Pause => Action::Pause,
            Request::Resume => Action::Resume,
            Request::Shutdown => Action::Shutdown,
            Request::Reboot => Action::Reboot,
            Request::PowerButton => Action::PowerButton,
            Request::Delete => Action::Delete,
            Request::Info => Action::Info,
            Request::Counters => Action::Counters,
            Request::Snapshot(_) => Action::Snapshot,
            Request::Restore(..) => Action::Restore,
            Request::SendMigration(..) => Action::SendMigration,
            Request::ReceiveMigration(..) => Action::ReceiveMigration,
            Request::CancelMigration => Action::CancelMigration,
            Request::ShutdownVmm => return None,
        })
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    Info {
        config: Box<VmConfig>,
        state: VmState,
        /// The VM's current or last failed outgoing migration.
        migration: Option<MigrationInfo>,
    },
    Counters(BTreeMap<String, BTreeMap<String, u64>>),
}

type Envelope = (Request, Sender<Result<Reply, ControlError>>);

/// What `vm.info` reports, published by the VM thread after every change (and during a
/// migration, after every round) so that readers need not cross to it.
type InfoSnapshot = Arc<RwLock<Option<(Arc<VmConfig>, VmState, Option<MigrationInfo>)>>>;

/// The handle API threads use to reach the VM's thread.
#[derive(Clone)]
pub struct Controller {
    requests: Sender<Envelope>,
    wake: Arc<EventFd>,
    info: InfoSnapshot,
    cancel: migration::Cancel,
}

/// What ended the controller thread.
#[derive(Debug)]
pub struct Ended {
    /// The guest powered off (or the VM was shut down) while `exit_on_shutdown` was set.
    pub guest_shutdown: bool,
}

impl Controller {
    /// Starts the VM thread. With `exit_on_shutdown` (`podvisor run`), the thread ends when
    /// the guest powers off; otherwise (`podvisor serve`) the VM stays in Shutdown and can be
    /// booted again or deleted.
    pub fn start(
        options: RunOptions,
        events: EventMonitor,
        exit_on_shutdown: bool,
    ) -> Result<(Controller, JoinHandle<Result<Ended, Error>>), Error> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        let info = InfoSnapshot::default();
        let cancel = migration::Cancel::default();
        let owner = VmOwner {
            cancel: cancel.clone(),
            generation: 0,
            info: info.clone(),
            options,
            events,
            exit_on_shutdown,
            kvm: None,
            vm: None,
            requests: rx,
            wake: wake.clone(),
            watched: None,
            ended: None,
            migrated_away: false,
        };
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .stack_size(devices::THREAD_STACK_SIZE)
            .spawn(move || run(owner))
            .map_err(Error::Thread)?;
        Ok((
            Controller {
                requests: tx,
                wake,
                info,
                cancel,
            },
            thread,
        ))
    }

    /// Sends `request` to the VM's thread and waits for its answer (`Info` is answered from
    /// the state the VM thread last published, which every completed request has updated).
    pub fn handle(&self, request: Request) -> Result<Reply, ControlError> {
        if let Request::Info = request {
            let info = self.info.read().unwrap_or_else(|e| e.into_inner());
            return match info.as_ref() {
                Some((config, state, migration)) => Ok(Reply::Info {
                    config: Box::new(VmConfig::clone(config)),
                    state: *state,
                    migration: migration.clone(),
                }),
                None => Err(Refusal::NoVm {
                    action: Action::Info.name(),
                }
                .into()),
            };
        }
        if let Request::CancelMigration = request {
            // The VM's thread is busy sending: the rules are checked against what it last
            // published, and the migration is stopped from here.
            let state = self
                .info
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(_, state, _)| *state);
            lifecycle::next_state(Action::CancelMigration, state)?;
            self.cancel
                .cancel()
                .map_err(|e| ControlError::WrongState(e.to_string()))?;
            return Ok(Reply::Done);
        }
        let (tx, rx) = mpsc::channel();
        let gone = || ControlError::Failed("the VMM is shutting down".into());
        self.requests.send((request, tx)).map_err(|_| gone())?;
        let _ = self.wake.write(1);
        rx.recv().map_err(|_| gone())?
    }
}

/// A created VM: its configuration, console, host resources and (when booted) the running VM.
struct OwnedVm {
    config: Arc<VmConfig>,
    console: Console,
    backends: Option<Backends>,
    running: Option<RunningVm>,
    state: VmState,
    /// Its current or last failed outgoing migration.
    migration: Option<MigrationInfo>,
}

struct VmOwner {
    /// Counts VM boots (and reboots), so each running VM is told apart from the last.
    generation: u64,
    info: InfoSnapshot,
    options: RunOptions,
    events: EventMonitor,
    exit_on_shutdown: bool,
    kvm: Option<(Kvm, CpuTemplate)>,
    vm: Option<OwnedVm>,
    requests: Receiver<Envelope>,
    wake: Arc<EventFd>,
    /// What the event manager watches of the running VM, and which boot it is from.
    watched: Option<(OwnedFd, u64)>,
    /// Set when the VM thread must end, with why.
    ended: Option<Result<Ended, Error>>,
    /// The VM left for another host (`vm.send-migration`).
    migrated_away: bool,
    /// Shared with [`Controller`]: cancels the outgoing migration.
    cancel: migration::Cancel,
}

const TOKEN_REQUEST: u32 = 0;
const TOKEN_VM: u32 = 1;

/// The VM thread: an `event-manager` loop with the [`VmOwner`] as its one subscriber. The
/// timeout lets a SIGTERM (power button) flag be noticed.
fn run(owner: VmOwner) -> Result<Ended, Error> {
    crate::seccomp::apply(crate::seccomp::Kind::Vmm)?;
    let mut manager =
        EventManager::<VmOwner>::new().map_err(|e| event_loop_error(e, "create the event loop"))?;
    let id = manager.add_subscriber(owner);
    let lost = || Error::Guest("the VM thread lost its state (a bug)".into());
    loop {
        let owner = manager.subscriber_mut(id).map_err(|_| lost())?;
        if let Some(ended) = owner.ended.take() {
            return ended;
        }
        if owner
            .options
            .power_button
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            if let Some(r) = owner.vm.as_ref().and_then(|v| v.running.as_ref()) {
                r.power_button()?;
            }
        }
        manager
            .run_with_timeout(200)
            .map_err(|e| event_loop_error(e, "wait for events"))?;
    }
}

impl MutEventSubscriber for VmOwner {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&*self.wake, TOKEN_REQUEST, EventSet::IN)) {
            self.ended = Some(Err(event_loop_error(e, "watch the request eventfd")));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.ended.is_some() {
            return;
        }
        match events.data() {
            TOKEN_VM => {
                let ended = self.check_vm();
                self.publish();
                match ended {
                    Ok(None) => {}
                    Ok(Some(ended)) => self.ended = Some(Ok(ended)),
                    Err(e) => self.ended = Some(Err(e)),
                }
            }
            _ => {
                let _ = self.wake.read();
                if let Some(ended) = self.serve_requests() {
                    self.ended = Some(Ok(ended));
                }
            }
        }
        if let Err(e) = self.watch_vm(ops) {
            self.ended = Some(Err(e));
        }
    }
}

impl VmOwner {
    /// Serves every request waiting; `Some` when the VM thread must end.
    fn serve_requests(&mut self) -> Option<Ended> {
        loop {
            match self.requests.try_recv() {
                Ok((Request::ShutdownVmm, reply)) => {
                    if self.vm.is_some() {
                        self.stop_vm();
                        self.events.emit("vm", "shutdown");
                    }
                    self.events.emit("vmm", "shutdown");
                    self.vm = None;
                    self.publish();
                    let _ = reply.send(Ok(Reply::Done));
                    return Some(Ended {
                        guest_shutdown: false,
                    });
                }
                Ok((request, reply)) => {
                    let result = self.serve(request);
                    self.publish();
                    let _ = reply.send(result);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                // Every controller handle is gone: nobody can reach the VM.
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.stop_vm();
                    return Some(Ended {
                        guest_shutdown: false,
                    });
                }
            }
        }
        let shut_down = self
            .vm
            .as_ref()
            .is_some_and(|v| v.state == VmState::Shutdown);
        // A VM that migrated away ends `podvisor run` as a power-off does.
        let migrated = std::mem::take(&mut self.migrated_away);
        (self.exit_on_shutdown && (shut_down || migrated)).then_some(Ended {
            guest_shutdown: true,
        })
    }

    /// Watches the running VM's exit events (its epoll fd is readable when one is due). The
    /// event manager watches a duplicate the owner closes itself, after taking it out of the
    /// set: the VM's own fd closes with the VM, and a closed fd cannot be taken out.
    fn watch_vm(&mut self, ops: &mut EventOps) -> Result<(), Error> {
        let now = self
            .vm
            .as_ref()
            .and_then(|v| v.running.as_ref())
            .map(|r| (r.exit_fd(), self.generation));
        if now.map(|(_, g)| g) == self.watched.as_ref().map(|(_, g)| *g) {
            return Ok(());
        }
        if let Some((fd, _)) = self.watched.take() {
            let _ = ops.remove(Events::new(&fd, EventSet::IN));
        }
        if let Some((fd, generation)) = now {
            // SAFETY: `fd` is the running VM's epoll fd, open while the VM (owned by `self`)
            // lives; it is only borrowed here to duplicate it.
            let dup = unsafe { BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(Error::EventFd)?;
            ops.add(Events::with_data(&dup, TOKEN_VM, EventSet::IN))
                .map_err(|e| event_loop_error(e, "watch the VM"))?;
            self.watched = Some((dup, generation));
        }
        Ok(())
    }

    /// The running VM reported an exit: a power-off ends it, a reset reboots it.
    fn check_vm(&mut self) -> Result<Option<Ended>, Error> {
        let Some(owned) = self.vm.as_mut() else {
            return Ok(None);
        };
        let Some(exit) = owned
            .running
            .as_ref()
            .and_then(|r| r.wait(Some(std::time::Duration::ZERO)))
        else {
            return Ok(None);
        };
        match exit {
            Ok(VmExit::Reset) => {
                self.events.emit("vm", "rebooting");
                self.reboot_vm().map_err(|e| Error::Guest(e.to_string()))?;
                self.events.emit("vm", "rebooted");
                Ok(None)
            }
            Ok(VmExit::Shutdown) => {
                self.stop_vm();
                self.events.emit("vm", "shutdown");
                Ok(self.exit_on_shutdown.then_some(Ended {
                    guest_shutdown: true,
                }))
            }
            Err(e) => {
                self.stop_vm();
                Err(e)
            }
        }
    }

    /// Publishes the VM's configuration and state for `vm.info`.
    fn publish(&self) {
        let now = self
            .vm
            .as_ref()
            .map(|v| (v.config.clone(), v.state, v.migration.clone()));
        *self.info.write().unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn state(&self) -> Option<VmState> {
        self.vm.as_ref().map(|v| v.state)
    }

    /// Checks `request` against the lifecycle table, carries it out and moves the VM to the
    /// state the table names.
    fn serve(&mut self, request: Request) -> Result<Reply, ControlError> {
        let Some(action) = request.action() else {
            return Err(misrouted());
        };
        let next = lifecycle::next_state(action, self.state())?;
        let reply = match request {
            Request::Create(config) => {
                config
                    .validate()
                    .map_err(|e| ControlError::Invalid(e.to_string()))?;
                let console = Console::new(&config.serial)
                    .map_err(|e| ControlError::Invalid(e.to_string()))?;
                start_console_input(&console)?;
                self.vm = Some(OwnedVm {
                    config: Arc::from(config),
                    console,
                    backends: None,
                    running: None,
                    state: VmState::Created,
                    migration: None,
                });
                self.events.emit("vm", "created");
                Reply::Done
            }
            Request::Boot => {
                self.events.emit("vm", "booting");
                self.boot_vm()?;
                self.events.emit("vm", "booted");
                Reply::Done
            }
            Request::Pause => {
                self.events.emit("vm", "pausing");
                self.running()?.pause().map_err(failed)?;
                self.events.emit("vm", "paused");
                Reply::Done
            }
            Request::Resume => {
                self.events.emit("vm", "resuming");
                self.running()?.resume().map_err(failed)?;
                self.events.emit("vm", "resumed");
                Reply::Done
            }
            Request::Shutdown => {
                self.stop_vm();
                self.events.emit("vm", "shutdown");
                Reply::Done
            }
            Request::Reboot => {
                self.events.emit("vm", "rebooting");
                self.reboot_vm()?;
                self.events.emit("vm", "rebooted");
                Reply::Done
            }
            Request::PowerButton => {
                self.running()?.power_button().map_err(failed)?;
                Reply::Done
            }
            Request::Delete => {
                if self.vm.is_some() {
                    self.stop_vm();
                    self.events.emit("vm", "deleted");
                }
                Reply::Done
            }
            Request::Info => {
                let vm = self.vm.as_ref().ok_or_else(|| failed_state("vm.info"))?;
                Reply::Info {
                    config: Box::new(VmConfig::clone(&vm.config)),
                    state: vm.state,
                    migration: vm.migration.clone(),
                }
            }
            Request::Counters => {
                let vm = self
                    .vm
                    .as_ref()
                    .ok_or_else(|| failed_state("vm.counters"))?;
                Reply::Counters(
                    vm.running
                        .as_ref()
                        .map(RunningVm::counters)
                        .unwrap_or_default(),
                )
            }
            Request::Snapshot(dir) => {
                self.events.emit("vm", "snapshotting");
                let vm = self
                    .vm
                    .as_ref()
                    .ok_or_else(|| failed_state("vm.snapshot"))?;
                let running = self.running()?;
                let state = running.save().map_err(failed)?;
                snapshot::write(&dir, &vm.config, &state, running.memory()).map_err(
                    |e| match e {
                        SnapshotError::Destination { .. } => ControlError::Invalid(e.to_string()),
                        _ => ControlError::Failed(e.to_string()),
                    },
                )?;
                self.events.emit("vm", "snapshotted");
                Reply::Done
            }
            Request::Restore(dir, retaps) => {
                self.events.emit("vm", "restoring");
                self.restore_vm(&dir, &retaps)?;
                self.events.emit("vm", "restored");
                Reply::Done
            }
            Request::SendMigration(endpoint, options) => {
                self.send_migration(&endpoint, &options)?;
                Reply::Done
            }
            Request::ReceiveMigration(endpoint, retaps) => {
                self.receive_migration(&endpoint, &retaps)?;
                Reply::Done
            }
            Request::CancelMigration | Request::ShutdownVmm => return Err(misrouted()),
        };
        match next {
            Some(state) => self.set_state(state),
            None => self.vm = None,
        }
        Ok(reply)
    }

    fn running(&self) -> Result<&RunningVm, ControlError> {
        self.vm
            .as_ref()
            .and_then(|v| v.running.as_ref())
            .ok_or_else(|| ControlError::Failed("the VM is not running".into()))
    }

    fn set_state(&mut self, state: VmState) {
        if let Some(v) = self.vm.as_mut() {
            v.state = state;
        }
    }

    /// Builds and starts the VM from its configuration.
    fn boot_vm(&mut self) -> Result<(), ControlError> {
        let (kvm, template) = open_kvm(&mut self.kvm, self.options.pvm_guest)?;
        let owned = self.vm.as_mut().ok_or_else(|| failed_state("vm.boot"))?;
        if owned.backends.is_none() {
            let config = Arc::make_mut(&mut owned.config);
            owned.backends = Some(Backends::open(config).map_err(failed)?);
            if self.options.drop_privileges {
                // The taps are open: this thread, and the vCPUs and workers it starts from
                // now on, need no more privileges than file access.
                crate::privileges::drop_after_setup().map_err(ControlError::Failed)?;
            }
        }
        let backends = owned.backends.as_ref().expect("opened above");
        let vm = Vm::new(kvm, template, &owned.config, &owned.console, backends).map_err(failed)?;
        owned.running = Some(vm.start().map_err(failed)?);
        self.generation += 1;
        owned.state = VmState::Running;
        Ok(())
    }

    /// Builds the VM a snapshot describes and restores it, paused. Everything about the
    /// snapshot that does not fit (a corrupt section, another CPU, a missing disk) is the
    /// request's fault (400), and leaves no VM.
    fn restore_vm(&mut self, dir: &Path, retaps: &[NetRetap]) -> Result<(), ControlError> {
        let invalid = |e: Error| ControlError::Invalid(e.to_string());
        let snap = snapshot::read(dir).map_err(|e| invalid(e.into()))?;
        let mut config = snap.config.clone();
        backends::retap(&mut config, retaps).map_err(ControlError::Invalid)?;
        config
            .validate()
            .map_err(|e| ControlError::Invalid(format!("the snapshot's configuration: {e}")))?;
        self.options
            .host_paths
            .check_config(&config)
            .map_err(|e| ControlError::Invalid(format!("the snapshot's configuration: {e}")))?;
        let console =
            Console::new(&config.serial).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let backends = Backends::open(&mut config).map_err(invalid)?;
        let (kvm, template) = open_kvm(&mut self.kvm, self.options.pvm_guest)?;
        let vm = builder::build(kvm, template, &config, &console, &backends).map_err(failed)?;
        snap.load_memory(vm.memory())
            .map_err(|e| invalid(e.into()))?;
        let running = vm.start_restored(&snap.machine).map_err(invalid)?;
        start_console_input(&console)?;
        self.generation += 1;
        self.vm = Some(OwnedVm {
            config: Arc::new(config),
            console,
            backends: Some(backends),
            running: Some(running),
            state: VmState::Paused,
            migration: None,
        });
        Ok(())
    }

    /// Live-migrates the running VM; on success it is stopped here (the guest runs at the
    /// destination) and `podvisor run` ends as after a power-off.
    fn send_migration(
        &mut self,
        endpoint: &Endpoint,
        options: &SendOptions,
    ) -> Result<(), ControlError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| failed_state("vm.send-migration"))?;
        let running = self.running()?;
        self.events.emit("vm", "migration-started");
        let events = &self.events;
        let info = &self.info;
        // vm.info shows each round (the VM thread is busy with the migration meanwhile).
        let show = |migration: MigrationInfo| {
            let mut published = info.write().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, m)) = published.as_mut() {
                *m = Some(migration);
            }
        };
        show(MigrationInfo {
            state: MigrationState::Sending,
            progress: migration::Progress::default(),
            error: None,
        });
        let mut last = migration::Progress::default();
        let mut report = |p: &migration::Progress| {
            tracing::info!(
                "migration round {}: {} MiB sent, {} MiB dirty, {} ms expected downtime",
                p.round,
                p.bytes_sent >> 20,
                p.bytes_left >> 20,
                p.expected_downtime_ms
            );
            events.emit_with(
                "vm",
                "migration-round",
                serde_json::to_value(p).ok().as_ref(),
            );
            last = p.clone();
            show(MigrationInfo {
                state: MigrationState::Sending,
                progress: p.clone(),
                error: None,
            });
        };
        let result = migration::send::send(
            running,
            &vm.config,
            endpoint,
            options,
            &self.cancel,
            &mut report,
        );
        match result {
            Ok(done) => {
                tracing::info!(
                    "migrated: {} rounds, {} MiB sent, guest paused {} ms",
                    done.round,
                    done.bytes_sent >> 20,
                    done.downtime_ms.unwrap_or(0)
                );
                self.stop_vm();
                self.migrated_away = true;
                let figures = serde_json::to_value(&done).ok();
                self.events
                    .emit_with("vm", "migration-completed", figures.as_ref());
                Ok(())
            }
            Err(e) => {
                let unresolved = matches!(e, MigrationError::Unresolved(_));
                if unresolved {
                    tracing::error!("{e}");
                } else {
                    tracing::warn!("migration failed, the guest runs on here: {e}");
                }
                self.events.emit_with(
                    "vm",
                    "migration-failed",
                    Some(&serde_json::json!({ "error": e.to_string(), "paused": unresolved })),
                );
                if let Some(vm) = self.vm.as_mut() {
                    if unresolved {
                        vm.state = VmState::Paused;
                    }
                    vm.migration = Some(MigrationInfo {
                        state: MigrationState::Failed,
                        progress: last,
                        error: Some(e.to_string()),
                    });
                }
                Err(migration_error(e))
            }
        }
    }

    /// Waits for a source at `endpoint` and runs the VM it sends.
    fn receive_migration(
        &mut self,
        endpoint: &Endpoint,
        retaps: &[NetRetap],
    ) -> Result<(), ControlError> {
        let listener = endpoint.listen().map_err(migration_error)?;
        let (kvm, template) = open_kvm(&mut self.kvm, self.options.pvm_guest)?;
        self.events.emit("vm", "migration-receiving");
        let received =
            migration::receive::receive(&listener, kvm, template, retaps, &self.options.host_paths)
                .map_err(|e| {
                    self.events.emit_with(
                        "vm",
                        "migration-failed",
                        Some(&serde_json::json!({ "error": e.to_string() })),
                    );
                    migration_error(e)
                })?;
        start_console_input(&received.console)?;
        self.generation += 1;
        self.vm = Some(OwnedVm {
            config: Arc::new(received.config),
            console: received.console,
            backends: Some(received.backends),
            running: Some(received.running),
            state: VmState::Running,
            migration: None,
        });
        self.events.emit("vm", "migration-completed");
        Ok(())
    }

    /// Stops the running VM, if any; the VM is then Shutdown.
    fn stop_vm(&mut self) {
        if let Some(owned) = self.vm.as_mut() {
            if let Some(running) = owned.running.take() {
                running.stop();
            }
            owned.state = VmState::Shutdown;
        }
    }

    /// A reset: the VM is built anew from its configuration, as `podvisor run` does.
    fn reboot_vm(&mut self) -> Result<(), ControlError> {
        if let Some(owned) = self.vm.as_mut() {
            if let Some(running) = owned.running.take() {
                running.stop();
            }
            owned
                .console
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reset();
        }
        self.boot_vm()
    }
}

/// KVM and the host's CPU template, opened on first use and kept in `slot` (a field of its
/// own, so the caller can borrow the VM beside it).
fn open_kvm(
    slot: &mut Option<(Kvm, CpuTemplate)>,
    pvm_guest: bool,
) -> Result<&(Kvm, CpuTemplate), ControlError> {
    if slot.is_none() {
        let kvm = kvm::open(pvm_guest).map_err(|e| failed(e.into()))?;
        let template = CpuTemplate::from_kvm(&kvm)
            .map_err(|e| failed(Error::Kvm("read supported CPUID/MSRs", e)))?;
        *slot = Some((kvm, template));
    }
    slot.as_ref()
        .ok_or_else(|| ControlError::Failed("KVM is not open (a bug)".into()))
}

/// Starts feeding stdin to COM1 when the console reads the terminal.
fn start_console_input(console: &Console) -> Result<(), ControlError> {
    if console.wants_stdin {
        console
            .spawn_input(std::io::stdin())
            .map_err(|e| ControlError::Failed(format!("console input: {e}")))?;
    }
    Ok(())
}

/// An event-manager failure as the VM thread reports it.
fn event_loop_error(e: event_manager::Error, what: &str) -> Error {
    Error::EventFd(std::io::Error::other(format!("{what}: {e:?}")))
}

fn failed(e: Error) -> ControlError {
    ControlError::Failed(e.to_string())
}

/// A migration failure as the API answers it: the request's fault (a bad URL, nobody
/// listening, a port in use) is 400, the rest 500.
fn migration_error(e: MigrationError) -> ControlError {
    match e {
        MigrationError::Invalid(_) => ControlError::Invalid(e.to_string()),
        _ => ControlError::Failed(e.to_string()),
    }
}

/// The VM thread's loop takes vmm.shutdown, and [`Controller::handle`] vm.cancel-migration,
/// before [`VmOwner::serve`] would.
fn misrouted() -> ControlError {
    ControlError::Failed("vmm.shutdown or vm.cancel-migration misrouted (a bug)".into())
}

/// The VM is not what the lifecycle table said it is (a bug, reported rather than panicked on).
fn failed_state(action: &str) -> ControlError {
    ControlError::Failed(format!(
        "{action}: the VM is not in the state checked (a bug)"
    ))
}
