//! The device's worker thread: epoll on the tap, the two queue notifiers and a kill eventfd.
//!
//! The tap is watched (level-triggered EPOLLIN) only while the guest has receive buffers; when
//! they run out the worker stops watching it, enables receive-queue notifications and waits for
//! the driver's kick, so a full guest neither spins the worker nor loses frames (they queue in
//! the kernel). Work per wakeup is bounded so a reset is always noticed.
//!
//! On kill (reset or pause) the worker gives the receive chains it holds back to the ring and
//! returns itself; a resume runs it again, with its epoll set, flags and any frame waiting in
//! the bounce buffer.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::iovec::GuestIoVecs;
use super::rx::RxState;
use super::{tx, NetCounters, Tap, RX_QUEUE, TX_QUEUE};
use crate::virtio::worker_thread::DeviceWorker;
use crate::virtio::{lock_queue, ActivatedQueue, VirtioError, VirtioInterrupt};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;

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
    epoll: Epoll,
    rx: RxState,
    tx_iovs: GuestIoVecs,
    /// The tap is in the epoll set.
    tap_watched: bool,
    /// The receive side waits for the driver to add buffers.
    rx_stalled: bool,
    /// A queue's ring is corrupt; it is not served until a reset.
    rx_broken: bool,
    tx_broken: bool,
    /// Reading the tap failed; receive stops until a reset.
    tap_failed: bool,
}

impl Worker {
    /// A worker for `parts`, with its epoll set (the tap watched).
    pub fn new(parts: WorkerParts) -> Result<Worker, VirtioError> {
        let io = |what| move |source| VirtioError::Io { what, source };
        let epoll = Epoll::new().map_err(io("virtio-net epoll"))?;
        for (fd, token) in [
            (parts.rx.notify.as_raw_fd(), TOKEN_RX),
            (parts.tx.notify.as_raw_fd(), TOKEN_TX),
            (parts.kill.as_raw_fd(), TOKEN_KILL),
            (parts.tap.as_raw_fd(), TOKEN_TAP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io("virtio-net epoll registration"))?;
        }
        Ok(Worker::with_epoll(parts, epoll))
    }

    fn with_epoll(p: WorkerParts, epoll: Epoll) -> Self {
        Worker {
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
            epoll,
            tap_watched: true,
            rx_stalled: false,
            rx_broken: false,
            tx_broken: false,
            tap_failed: false,
        }
    }
}

impl DeviceWorker for Worker {
    fn run(mut self) -> Self {
        // Buffers queued before activation, a restore or a resume are served right away.
        self.process_tx();
        self.unstall_rx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll_wait: {e}");
                    break;
                }
            };
            let (mut rx, mut tx, mut kicked) = (false, false, false);
            for e in &events[..n] {
                match e.data() {
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        self.give_back_rx_chains();
                        return self;
                    }
                    TOKEN_TX => {
                        // EAGAIN only means a concurrent read consumed the count.
                        let _ = self.tx_notify.read();
                        tx = true;
                    }
                    TOKEN_RX => {
                        let _ = self.rx_notify.read();
                        kicked = true;
                    }
                    _ => rx = true,
                }
            }
            if tx {
                self.process_tx();
            }
            if kicked {
                if self.rx_stalled {
                    self.unstall_rx();
                }
                rx = true;
            }
            if rx {
                self.process_rx();
            }
        }
        self.give_back_rx_chains();
        self
    }
}

impl Worker {
    fn watch_tap(&mut self, watch: bool) {
        if watch == self.tap_watched {
            return;
        }
        let op = if watch {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let fd = self.tap.as_raw_fd();
        match self
            .epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_TAP))
        {
            Ok(()) => self.tap_watched = watch,
            Err(e) => tracing::error!("virtio-net: epoll_ctl on the tap: {e}"),
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
        tracing::warn!("virtio-net: receive queue disabled until reset: {e}");
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
            tracing::warn!("virtio-net: transmit queue disabled until reset: {e}");
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
