//! The worker thread of a virtio device, which can be stopped and started again with the same
//! state: that is how devices pause and resume.
//!
//! A worker ([`DeviceWorker`]) owns everything its thread touches: guest memory, the interrupt,
//! the queue handles and notification eventfds, and any state carried between wakeups. It is
//! an `event-manager` subscriber: each run of its thread makes an `EventManager`, adds the
//! worker (whose `init` registers its file descriptors and serves what was queued while no
//! thread ran), and dispatches events to it until its kill eventfd fires; the thread then hands
//! the worker back, so [`WorkerThread::pause`] keeps it and [`WorkerThread::resume`] runs it on
//! a new thread, where it left off. Dropping a [`WorkerThread`] stops the thread and drops the
//! worker (a reset).

use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioError;
use crate::persist::{self, Persist, PersistError, SavedState};

/// What a device's worker thread runs: an event subscriber that knows when to stop.
///
/// `init` registers the worker's file descriptors (its kill eventfd among them) and serves
/// what the driver queued while no thread ran; `process` serves one ready descriptor, and on
/// the kill eventfd reads it and marks the worker [`DeviceWorker::finished`].
pub(crate) trait DeviceWorker: MutEventSubscriber + Send + 'static {
    /// The kill eventfd fired (or a fatal error): the run ends after this wakeup.
    fn finished(&self) -> bool;
    /// Called once per wakeup, after its events were processed (e.g. to raise one interrupt
    /// for a whole batch).
    fn end_of_wakeup(&mut self) {}
    /// Readies the worker to be handed back with nothing in flight: every request taken from
    /// a queue is in the used ring or back in the available ring; clears the finished mark.
    fn hand_back(&mut self);
}

/// Runs `worker` until it is finished, and hands it back.
fn run<W: DeviceWorker>(name: &'static str, worker: W) -> W {
    if let Err(e) = crate::seccomp::apply_worker(name) {
        // Never serve the guest unfiltered: the device stops until a reset.
        tracing::error!("{name}: {e}");
        return worker;
    }
    let mut manager = match EventManager::<W>::new_with_capacity(8) {
        Ok(manager) => manager,
        Err(e) => {
            tracing::error!("{name}: cannot create its event manager: {e:?}");
            return worker;
        }
    };
    let id = manager.add_subscriber(worker);
    loop {
        match manager.subscriber_mut(id) {
            Ok(worker) if !worker.finished() => {}
            _ => break,
        }
        if let Err(e) = manager.run() {
            tracing::error!("{name}: event loop: {e:?}");
            break;
        }
        if let Ok(worker) = manager.subscriber_mut(id) {
            worker.end_of_wakeup();
        }
    }
    let mut worker = manager
        .remove_subscriber(id)
        .expect("the worker was added to this manager");
    worker.hand_back();
    worker
}

enum State<W> {
    Running(JoinHandle<W>),
    Paused(W),
    /// The thread panicked or could not be started again; only a reset helps.
    Lost,
}

/// A device worker on its thread, or parked between a pause and a resume.
pub(crate) struct WorkerThread<W: DeviceWorker> {
    name: &'static str,
    /// Wakes the thread to return; the worker watches a clone and reads it
    /// before returning.
    kill: EventFd,
    state: State<W>,
}

impl<W: DeviceWorker> WorkerThread<W> {
    /// Starts `worker` on a thread called `name`; `kill` is the eventfd that stops it.
    pub(crate) fn spawn(name: &'static str, kill: EventFd, worker: W) -> Result<Self, VirtioError> {
        let thread = start(name, worker)?;
        Ok(WorkerThread {
            name,
            kill,
            state: State::Running(thread),
        })
    }

    /// Stops the thread and keeps the worker; returns once the thread has ended (its current
    /// batch of requests completed). Pausing a paused worker does nothing.
    pub(crate) fn pause(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Running(thread) => match self.stop(thread) {
                Some(worker) => State::Paused(worker),
                None => State::Lost,
            },
            other => other,
        };
    }

    /// Runs the paused worker on a new thread; does nothing unless paused.
    pub(crate) fn resume(&mut self) -> Result<(), VirtioError> {
        match std::mem::replace(&mut self.state, State::Lost) {
            State::Paused(worker) => {
                // A kill the worker never read (its thread had ended on its own before the
                // pause) must not end the new run at once.
                let _ = self.kill.read();
                self.state = State::Running(start(self.name, worker)?);
            }
            other => self.state = other,
        }
        Ok(())
    }

    /// Whether the thread runs (not paused, not lost).
    pub(crate) fn is_running(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    fn stop(&self, thread: JoinHandle<W>) -> Option<W> {
        // If the write fails the eventfd counter is saturated, which still wakes the worker.
        let _ = self.kill.write(1);
        match thread.join() {
            Ok(worker) => Some(worker),
            Err(_) => {
                tracing::error!("{} worker panicked", self.name);
                None
            }
        }
    }
}

impl<W: DeviceWorker> Drop for WorkerThread<W> {
    fn drop(&mut self) {
        if let State::Running(thread) = std::mem::replace(&mut self.state, State::Lost) {
            self.stop(thread);
        }
    }
}

/// A device's worker slot: empty until the driver activates the device (and after a reset).
/// Devices forward their `pause`, `resume` and state saving to it.
pub(crate) trait WorkerSlot {
    /// Pauses the worker, if there is one.
    fn pause_worker(&mut self);
    /// Resumes a paused worker, if there is one.
    fn resume_worker(&mut self) -> Result<(), VirtioError>;
    /// `device`'s saved state, refused while the worker runs: a paused worker has completed
    /// its requests in flight and handed back the chains it held, so the state and the
    /// queues' positions agree.
    fn save_stopped<P: Persist>(&self, device: &P) -> Result<SavedState, PersistError>;
}

impl<W: DeviceWorker> WorkerSlot for Option<WorkerThread<W>> {
    fn pause_worker(&mut self) {
        if let Some(worker) = self {
            worker.pause();
        }
    }

    fn resume_worker(&mut self) -> Result<(), VirtioError> {
        match self {
            Some(worker) => worker.resume(),
            None => Ok(()),
        }
    }

    fn save_stopped<P: Persist>(&self, device: &P) -> Result<SavedState, PersistError> {
        if self.as_ref().is_some_and(WorkerThread::is_running) {
            return Err(PersistError::Running { device: P::NAME });
        }
        persist::save_state(device)
    }
}

fn start<W: DeviceWorker>(name: &'static str, worker: W) -> Result<JoinHandle<W>, VirtioError> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(crate::THREAD_STACK_SIZE)
        .spawn(move || run(name, worker))
        .map_err(|source| VirtioError::SpawnWorker {
            device: name,
            source,
        })
}
