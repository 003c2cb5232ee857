//! The device's worker: an event subscriber on the tap, the two queue notifiers and a kill
//! eventfd (see [`crate::virtio::worker_thread`] for the thread that runs it).
//!
//! The tap is watched (level-triggered EPOLLIN) only while the guest has receive buffers; when
//! they run out the worker stops watching it, enables receive-queue notifications and waits for
//! the driver's kick, so a full guest neither spins the worker nor loses frames (they queue in
//! the kernel). Work per wakeup is bounded so a reset is always noticed.
//!
//! On kill (reset or pause) the worker gives the receive chains it holds back to the ring and
//! returns itself; a resume runs it again, with its flags (the tap watched or not) and any
//! frame waiting in the bounce buffer.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::iovec::GuestIoVecs;
use super::rx::RxState;
use super::{tx, NetCounters, Tap, RX_QUEUE, TX_QUEUE};
use crate::virtio::worker_thread::DeviceWorker;
use crate::virtio::{lock_queue, ActivatedQueue, VirtioError, VirtioInterrupt};

const TOKEN_RX: u32 = 0;
const TOKEN_TX: u32 = 1;
const TOKEN_TAP: u32 = 2;
const TOKEN_KILL: u32 = 3;

/// What the device hands its worker on activation.
pub struct WorkerParts {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rx: ActivatedQueue,
    pub tx: ActivatedQueue,
    pub tap: Arc<Tap>,
    pub kill: EventFd,
    pub counters: Arc<NetCounters>,
    pub mrg_rxbuf: bool,
}

/// The receive and transmit side of one device, on its thread or paused.
pub struct Worker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx_queue: Arc<Mutex<Queue>>,
    rx_notify: EventFd,
    tx_queue: Arc<Mutex<Queue>>,
    tx_notify: EventFd,
    tap: Arc<Tap>,
    kill: EventFd,
    counters: Arc<NetCounters>,
    rx: RxState,
    tx_iovs: GuestIoVecs,
    /// The tap should be watched (the guest has receive buffers and nothing broke).
    tap_wanted: bool,
    /// The tap is in the event manager's set.
    tap_watched: bool,
    /// The kill eventfd fired (or the worker could not watch its eventfds).
    finished: bool,
    /// The receive side waits for the driver to add buffers.
    rx_stalled: bool,
    /// A queue's ring is corrupt; it is not served until a reset.
    rx_broken: bool,
    tx_broken: bool,
    /// Reading the tap failed; receive stops until a reset.
    tap_failed: bool,
}

impl Worker {
    /// A worker for `parts` (the tap to be watched).
    pub fn new(p: WorkerParts) -> Result<Worker, VirtioError> {
        Ok(Worker {
            rx: RxState::new(p.mem.clone(), p.mrg_rxbuf),
            tx_iovs: GuestIoVecs::new(p.mem.clone()),
            mem: p.mem,
            interrupt: p.interrupt,
            rx_queue: p.rx.queue,
            rx_notify: p.rx.notify,
            tx_queue: p.tx.queue,
            tx_notify: p.tx.notify,
            tap: p.tap,
            kill: p.kill,
            counters: p.counters,
            tap_wanted: true,
            tap_watched: false,
            finished: false,
            rx_stalled: false,
            rx_broken: false,
            tx_broken: false,
            tap_failed: false,
        })
    }
}

impl MutEventSubscriber for Worker {
    fn init(&mut self, ops: &mut EventOps) {
        // A new run has a new event manager: nothing is watched yet.
        self.tap_watched = false;
        for (fd, token) in [
            (self.rx_notify.as_raw_fd(), TOKEN_RX),
            (self.tx_notify.as_raw_fd(), TOKEN_TX),
            (self.kill.as_raw_fd(), TOKEN_KILL),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch its eventfds: {e:?}");
                self.finished = true;
                return;
            }
        }
        // Buffers queued before activation, a restore or a resume are served right away.
        self.process_tx();
        self.unstall_rx();
        self.process_rx();
        self.sync_tap_watch(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_KILL => {
                let _ = self.kill.read();
                self.finished = true;
                return;
            }
            // A pause or reset came in this wakeup: serve nothing more.
            _ if self.finished => return,
            TOKEN_TX => {
                // EAGAIN only means a concurrent read consumed the count.
                let _ = self.tx_notify.read();
                self.process_tx();
            }
            TOKEN_RX => {
                let _ = self.rx_notify.read();
                if self.rx_stalled {
                    self.unstall_rx();
                }
                self.process_rx();
            }
            _ => self.process_rx(),
        }
        self.sync_tap_watch(ops);
    }
}

impl DeviceWorker for Worker {
    fn finished(&self) -> bool {
        self.finished
    }

    fn hand_back(&mut self) {
        self.give_back_rx_chains();
        self.finished = false;
    }
}

impl Worker {
    /// Whether the tap should wake the worker; applied by [`Worker::sync_tap_watch`].
    fn watch_tap(&mut self, watch: bool) {
        self.tap_wanted = watch;
    }

    /// Adds the tap to the event manager's set, or removes it, as [`Worker::watch_tap`] last
    /// asked.
    fn sync_tap_watch(&mut self, ops: &mut EventOps) {
        if self.tap_wanted == self.tap_watched {
            return;
        }
        let events = Events::with_data_raw(self.tap.as_raw_fd(), TOKEN_TAP, EventSet::IN);
        let result = if self.tap_wanted {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_watched = self.tap_wanted,
            Err(e) => tracing::error!("virtio-net: watching the tap: {e:?}"),
        }
    }

    /// The driver added receive buffers: stop asking for kicks and read the tap again.
    fn unstall_rx(&mut self) {
        if self.rx_broken || self.tap_failed {
            return;
        }
        self.rx_stalled = false;
        let queue = self.rx_queue.clone();
        if let Err(e) = lock_queue(&queue).disable_notification(&self.mem) {
            self.break_rx(e);
            return;
        }
        self.watch_tap(true);
    }

    fn break_rx(&mut self, e: virtio_queue::Error) {
        crate::warn_limited!("virtio-net: receive queue disabled until reset: {e}");
        self.rx_broken = true;
        self.watch_tap(false);
    }

    fn process_rx(&mut self) {
        if self.rx_broken || self.rx_stalled || self.tap_failed {
            return;
        }
        let queue = self.rx_queue.clone();
        let mut q = lock_queue(&queue);
        let mut used = false;
        let mut kicks_enabled = false;
        // More passes when buffers arrived while notifications were being enabled.
        for pass in 0..3 {
            let out = match self.rx.process(&mut q, &self.tap, &self.counters) {
                Ok(out) => out,
                Err(e) => {
                    drop(q);
                    self.break_rx(e);
                    return;
                }
            };
            used |= out.used;
            if out.tap_failed {
                // A level-triggered tap that cannot be read would spin the worker.
                self.tap_failed = true;
                break;
            }
            if !out.stalled {
                if kicks_enabled {
                    // Buffers are flowing again: the tap drives the worker, not kicks.
                    let _ = q.disable_notification(&self.mem);
                }
                break;
            }
            match q.enable_notification(&self.mem) {
                Ok(true) => {
                    kicks_enabled = true;
                    if pass == 2 {
                        // Bounded: come back through the loop (and see a reset first).
                        let _ = self.rx_notify.write(1);
                    }
                }
                Ok(false) => {
                    self.rx_stalled = true;
                    break;
                }
                Err(e) => {
                    drop(q);
                    self.break_rx(e);
                    return;
                }
            }
        }
        let notify = used && q.needs_notification(&self.mem).unwrap_or(true);
        drop(q);
        let watch = !self.rx_stalled && !self.rx_broken && !self.tap_failed;
        self.watch_tap(watch);
        if notify {
            self.interrupt.signal_used_queue(RX_QUEUE);
        }
    }

    fn process_tx(&mut self) {
        if self.tx_broken {
            return;
        }
        let queue = self.tx_queue.clone();
        let mut q = lock_queue(&queue);
        let fd = self.tap.as_raw_fd();
        let pass = tx::process(&mut q, &self.mem, &mut self.tx_iovs, fd, &self.counters);
        if pass.more {
            // Yield so a reset is noticed; the next wakeup continues.
            let _ = self.tx_notify.write(1);
        }
        if let Some(e) = pass.error {
            crate::warn_limited!("virtio-net: transmit queue disabled until reset: {e}");
            self.tx_broken = true;
        }
        let notify = pass.taken > 0 && q.needs_notification(&self.mem).unwrap_or(true);
        drop(q);
        if notify {
            self.interrupt.signal_used_queue(TX_QUEUE);
        }
    }

    /// Chains taken for receiving but unused go back to the ring (they are the last ones
    /// taken), so a snapshot or a later activation offers them again.
    fn give_back_rx_chains(&mut self) {
        let held = self.rx.release_chains();
        if self.rx_broken {
            return;
        }
        let queue = self.rx_queue.clone();
        let mut q = lock_queue(&queue);
        for _ in 0..held {
            q.go_to_previous_position();
        }
    }
}
