//! virtio-rng (entropy device, virtio 1.x section 5.4): one queue of device-writable buffers
//! that the device fills with random bytes from the host.
//!
//! The queue is served by a worker thread started on activation; it waits in an `event-manager`
//! loop on the queue's notification eventfd and a kill eventfd, and is stopped and joined on reset and drop.
//! Pause stops the thread the same way but keeps the worker (memory, interrupt, queue, broken
//! flag), and resume runs it again on a new thread.
//! Work per wakeup is bounded (bytes per request, requests per wakeup), so a hostile driver
//! cannot keep the worker from noticing a reset.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::drain::{drain_queue, ChainServer};
use super::worker_thread::{DeviceWorker, WorkerSlot, WorkerThread};
use super::{
    acked_subset, lock_queue, ActivatedQueue, VirtioDevice, VirtioError, VirtioInterrupt,
    VIRTIO_F_VERSION_1_BIT, VIRTIO_RING_F_EVENT_IDX_BIT,
};
use crate::persist::{self, Persist, PersistError, SavedState};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most; longer buffers get this many.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
/// Requests handled per wakeup before the worker yields (and re-arms itself).
const MAX_REQUESTS_PER_WAKEUP: usize = 1024;

const TOKEN_NOTIFY: u32 = 0;
const TOKEN_KILL: u32 = 1;

/// What the device has done, for metrics.
#[derive(Debug, Default)]
pub struct RngCounters {
    bytes_served: AtomicU64,
    requests: AtomicU64,
    bad_requests: AtomicU64,
}

impl RngCounters {
    /// Random bytes written to guest buffers.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }

    /// Requests completed (put in the used ring).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests with read-only descriptors, buffers outside guest memory or an invalid head;
    /// they complete with what could be written (possibly nothing).
    pub fn bad_requests(&self) -> u64 {
        self.bad_requests.load(Ordering::Relaxed)
    }
}

/// The virtio entropy device.
pub struct Rng {
    source: File,
    acked_features: u64,
    counters: Arc<RngCounters>,
    worker: Option<WorkerThread<RngWorker>>,
}

impl Rng {
    /// A device serving bytes from the host's `/dev/urandom`.
    pub fn new() -> Result<Self, VirtioError> {
        let source = File::open("/dev/urandom").map_err(|source| VirtioError::Io {
            what: "opening /dev/urandom for virtio-rng",
            source,
        })?;
        Ok(Self::with_source(source))
    }

    /// A device serving bytes read from `source`.
    pub fn with_source(source: File) -> Self {
        Rng {
            source,
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        }
    }

    /// The device's counters (keep the Arc before boxing the device into a transport; once
    /// boxed, [`VirtioDevice::counters`] reports them by name).
    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1_BIT | VIRTIO_RING_F_EVENT_IDX_BIT
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn config_len(&self) -> u32 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), VirtioError> {
        self.worker = None;
        let got = queues.len();
        let Some(queue) = queues.into_iter().next().filter(|_| got == 1) else {
            return Err(VirtioError::QueueCount {
                device: "virtio-rng",
                expected: 1,
                got,
            });
        };
        let io = |what| move |source| VirtioError::Io { what, source };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio-rng kill eventfd"))?;
        let worker = RngWorker {
            mem,
            interrupt,
            index: queue.index,
            queue: queue.queue,
            notify: queue.notify,
            kill: kill.try_clone().map_err(io("virtio-rng kill eventfd"))?,
            finished: false,
            source: self
                .source
                .try_clone()
                .map_err(io("virtio-rng entropy source"))?,
            counters: self.counters.clone(),
            broken: false,
        };
        self.worker = Some(WorkerThread::spawn("virtio-rng", kill, worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker thread stops and joins it.
        self.worker = None;
    }

    fn pause(&mut self) {
        self.worker.pause_worker();
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.worker.resume_worker()
    }

    fn save_state(&self) -> Result<SavedState, PersistError> {
        self.worker.save_stopped(self)
    }

    fn restore_state(&mut self, saved: &SavedState) -> Result<(), PersistError> {
        self.worker = None;
        persist::restore_state(self, saved)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("bytes", c.bytes_served()),
            ("requests", c.requests()),
            ("bad_requests", c.bad_requests()),
        ])
    }
}

/// Saved state of an [`Rng`] (its queue is saved by the transport).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub acked_features: u64,
}

impl Persist for Rng {
    const NAME: &'static str = "virtio-rng";
    type State = RngState;

    fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    fn restore(&mut self, state: &RngState) -> Result<(), PersistError> {
        self.acked_features = acked_subset(Self::NAME, state.acked_features, self.features())?;
        Ok(())
    }
}

struct RngWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    index: u16,
    queue: Arc<Mutex<Queue>>,
    notify: EventFd,
    kill: EventFd,
    /// The kill eventfd fired.
    finished: bool,
    source: File,
    counters: Arc<RngCounters>,
    /// The driver corrupted the ring; nothing more is served until a reset.
    broken: bool,
}

impl MutEventSubscriber for RngWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [(&self.notify, TOKEN_NOTIFY), (&self.kill, TOKEN_KILL)] {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                tracing::error!("virtio-rng: cannot watch its eventfds: {e:?}");
                self.finished = true;
                return;
            }
        }
        // Buffers queued before activation, a snapshot or a resume are served right away.
        self.process_queue();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TOKEN_KILL {
            let _ = self.kill.read();
            self.finished = true;
            return;
        }
        // EAGAIN only means a concurrent read already consumed the count.
        let _ = self.notify.read();
        self.process_queue();
    }
}

impl DeviceWorker for RngWorker {
    fn finished(&self) -> bool {
        self.finished
    }

    fn hand_back(&mut self) {
        self.finished = false;
    }
}

impl RngWorker {
    fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let queue = self.queue.clone();
        let mut q = lock_queue(&queue);
        let mut server = Filler {
            mem: &self.mem,
            source: &mut self.source,
            counters: &self.counters,
        };
        let pass = drain_queue(&mut q, &self.mem, MAX_REQUESTS_PER_WAKEUP, &mut server);
        if pass.more {
            let _ = self.notify.write(1);
        }
        if let Some(e) = pass.error {
            crate::warn_limited!("virtio-rng: queue {} disabled until reset: {e}", self.index);
            self.broken = true;
        }
        if pass.taken > 0 && q.needs_notification(&self.mem).unwrap_or(true) {
            drop(q);
            self.interrupt.signal_used_queue(self.index);
        }
    }
}

/// Serves a request: fills its buffers from the entropy source.
struct Filler<'a> {
    mem: &'a GuestMemoryMmap,
    source: &'a mut File,
    counters: &'a RngCounters,
}

impl ChainServer for Filler<'_> {
    fn serve(
        &mut self,
        q: &mut Queue,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), virtio_queue::Error> {
        let head = chain.head_index();
        let len = fill_chain(chain, self.mem, self.source, self.counters);
        q.add_used(self.mem, head, len)
    }

    fn bad_head(&mut self) {
        self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Fills the device-writable buffers of `chain`, at most [`MAX_BYTES_PER_REQUEST`] bytes in
/// all; returns how many bytes were written (the used length).
fn fill_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    source: &mut File,
    counters: &RngCounters,
) -> u32 {
    let mut written = 0usize;
    let mut descriptors = 0usize;
    let mut bad = false;
    for desc in chain {
        descriptors += 1;
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
        if !desc.is_write_only() {
            bad = true;
            continue;
        }
        let want = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
        let done = fill_buffer(mem, desc.addr(), want, source);
        written += done;
        if done < want {
            bad = true;
            break;
        }
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_served
        .fetch_add(written as u64, Ordering::Relaxed);
    if bad || descriptors == 0 {
        counters.bad_requests.fetch_add(1, Ordering::Relaxed);
    }
    written as u32
}

/// Copies `len` bytes from `source` to guest memory at `addr`; stops early at the end of guest
/// memory or of the source and returns the number of bytes written.
fn fill_buffer(
    mem: &GuestMemoryMmap,
    addr: vm_memory::GuestAddress,
    len: usize,
    source: &mut File,
) -> usize {
    let mut buf = [0u8; 4096];
    let mut done = 0;
    while done < len {
        let Some(at) = addr.0.checked_add(done as u64) else {
            break;
        };
        let chunk = (len - done).min(buf.len());
        let n = match source.read(&mut buf[..chunk]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::warn_limited!("virtio-rng: reading the entropy source: {e}");
                break;
            }
        };
        match mem.write(&buf[..n], vm_memory::GuestAddress(at)) {
            Ok(w) => {
                done += w;
                if w < n {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::virtio::testing::*;

    const MEM_SIZE: usize = 0x10_0000;

    struct Running {
        mem: GuestMemoryMmap,
        ring: TestRing,
        rng: Rng,
        notify: EventFd,
        irq: Arc<CountingInterrupt>,
    }

    fn queue_for(ring: &TestRing, event_idx: bool) -> Arc<Mutex<Queue>> {
        let mut q = Queue::new(RNG_QUEUE_SIZE).unwrap();
        q.set_size(ring.size);
        q.set_desc_table_address(Some(ring.desc as u32), Some(0));
        q.set_avail_ring_address(Some(ring.avail as u32), Some(0));
        q.set_used_ring_address(Some(ring.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Arc::new(Mutex::new(q))
    }

    fn start(event_idx: bool) -> Running {
        let mem = guest_memory(MEM_SIZE);
        let ring = TestRing::new(0x1000, 16);
        let mut rng = Rng::new().unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let queue = ActivatedQueue {
            index: 0,
            queue: queue_for(&ring, event_idx),
            notify: notify.try_clone().unwrap(),
        };
        rng.activate(mem.clone(), irq.clone(), vec![queue]).unwrap();
        Running {
            mem,
            ring,
            rng,
            notify,
            irq,
        }
    }

    impl Running {
        /// Submits a chain, kicks the device and waits for it to be used; returns its length.
        fn request(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
            let head = self.ring.add_chain(&self.mem, descs);
            let idx = self.ring.avail_idx(&self.mem);
            self.notify.write(1).unwrap();
            assert!(self.ring.wait_used(&self.mem, idx), "request not served");
            let (id, len) = self.ring.used_elem(&self.mem, idx - 1);
            assert_eq!(id, u32::from(head));
            len
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem
                .read_slice(&mut buf, vm_memory::GuestAddress(addr))
                .unwrap();
            buf
        }
    }

    #[test]
    fn fills_device_writable_buffers_and_interrupts() {
        let mut r = start(false);
        let len = r.request(&[
            (0x8000, 16, VRING_DESC_F_WRITE),
            (0x9000, 32, VRING_DESC_F_WRITE),
        ]);
        assert_eq!(len, 48);
        assert_ne!(r.read(0x8000, 16), vec![0; 16]);
        assert_ne!(r.read(0x9000, 32), vec![0; 32]);
        assert!(r.irq.wait_used(1));
        let c = r.rng.counters();
        assert_eq!(
            (c.bytes_served(), c.requests(), c.bad_requests()),
            (48, 1, 0)
        );
    }

    #[test]
    fn hostile_descriptors_complete_without_crashing() {
        let mut r = start(false);
        // A read-only descriptor is skipped, the writable one still served.
        assert_eq!(
            r.request(&[(0x8000, 16, 0), (0x9000, 8, VRING_DESC_F_WRITE)]),
            8
        );
        assert_eq!(r.read(0x8000, 16), vec![0; 16]);
        // Outside guest memory, and straddling its end.
        assert_eq!(
            r.request(&[(MEM_SIZE as u64 * 4, 64, VRING_DESC_F_WRITE)]),
            0
        );
        assert_eq!(r.request(&[(u64::MAX - 4, 64, VRING_DESC_F_WRITE)]), 0);
        assert_eq!(
            r.request(&[(MEM_SIZE as u64 - 8, 64, VRING_DESC_F_WRITE)]),
            8
        );
        // A huge length is served up to the per-request bound.
        let len = r.request(&[(0x10000, u32::MAX, VRING_DESC_F_WRITE)]);
        assert_eq!(len as usize, MAX_BYTES_PER_REQUEST);
        // An indirect table outside memory yields nothing.
        assert_eq!(
            r.request(&[(MEM_SIZE as u64 * 2, 64, VRING_DESC_F_INDIRECT)]),
            0
        );
        // A descriptor that loops onto itself is bounded by the ring size.
        let head = 15;
        r.ring.write_desc(
            &r.mem,
            head,
            0x8000,
            8,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            head,
        );
        r.ring.push_avail(&r.mem, head);
        let idx = r.ring.avail_idx(&r.mem);
        r.notify.write(1).unwrap();
        assert!(r.ring.wait_used(&r.mem, idx));
        assert_eq!(r.ring.used_elem(&r.mem, idx - 1), (15, 8 * 16));
        let c = r.rng.counters();
        assert_eq!(c.requests(), 7);
        assert_eq!(c.bad_requests(), 5);
    }

    #[test]
    fn out_of_range_head_is_dropped_and_the_queue_continues() {
        let mut r = start(false);
        r.ring.push_avail(&r.mem, 999);
        let head = r.ring.add_chain(&r.mem, &[(0x8000, 4, VRING_DESC_F_WRITE)]);
        r.notify.write(1).unwrap();
        assert!(r.ring.wait_used(&r.mem, 1));
        assert_eq!(r.ring.used_elem(&r.mem, 0), (u32::from(head), 4));
        assert_eq!(r.rng.counters().bad_requests(), 1);
    }

    #[test]
    fn corrupt_avail_index_disables_the_queue_until_reset() {
        let mut r = start(false);
        r.ring.set_avail_idx(&r.mem, 1000);
        r.notify.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(r.ring.used_idx(&r.mem), 0);
        // Reset and a fresh activation serve again.
        r.rng.reset();
        r.ring = TestRing::new(0x4000, 16);
        let queue = ActivatedQueue {
            index: 0,
            queue: queue_for(&r.ring, false),
            notify: r.notify.try_clone().unwrap(),
        };
        r.rng
            .activate(r.mem.clone(), r.irq.clone(), vec![queue])
            .unwrap();
        assert_eq!(r.request(&[(0x8000, 4, VRING_DESC_F_WRITE)]), 4);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mut r = start(true);
        r.ring.set_used_event(&r.mem, 5);
        r.request(&[(0x8000, 4, VRING_DESC_F_WRITE)]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(r.irq.used.load(Ordering::SeqCst), 0);
        // used_event = 1: the next used entry (index 1 -> 2) crosses it.
        r.ring.set_used_event(&r.mem, 1);
        r.request(&[(0x8000, 4, VRING_DESC_F_WRITE)]);
        assert!(r.irq.wait_used(1));
    }

    #[test]
    fn reset_stops_the_worker() {
        let mut r = start(false);
        assert_eq!(r.request(&[(0x8000, 4, VRING_DESC_F_WRITE)]), 4);
        r.rng.reset();
        r.ring.add_chain(&r.mem, &[(0x8000, 4, VRING_DESC_F_WRITE)]);
        r.notify.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(r.ring.used_idx(&r.mem), 1);
        r.rng.reset();
    }

    /// Queues a 16-byte request and kicks the device; returns the avail index it makes.
    fn submit(r: &mut Running, addr: u64) -> u16 {
        r.ring.add_chain(&r.mem, &[(addr, 16, VRING_DESC_F_WRITE)]);
        r.notify.write(1).unwrap();
        r.ring.avail_idx(&r.mem)
    }

    /// Nothing is served within a while: the used ring stays at `used` and `addr` stays zero.
    fn assert_not_served(r: &Running, used: u16, addr: u64) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(r.ring.used_idx(&r.mem), used, "served while stopped");
        assert_eq!(r.read(addr, 16), vec![0; 16], "guest memory written");
    }

    #[test]
    fn pause_stops_service_and_resume_serves_what_was_queued() {
        let mut r = start(false);
        assert_eq!(r.request(&[(0x8000, 16, VRING_DESC_F_WRITE)]), 16);
        r.rng.pause();
        let idx = submit(&mut r, 0x9000);
        assert_not_served(&r, 1, 0x9000);
        let irqs = r.irq.used.load(Ordering::SeqCst);
        r.rng.resume().unwrap();
        assert!(r.ring.wait_used(&r.mem, idx), "not served after resume");
        assert_eq!(r.ring.used_elem(&r.mem, 1), (1, 16));
        assert_ne!(r.read(0x9000, 16), vec![0; 16]);
        assert!(r.irq.wait_used(irqs + 1));
        // Still running: a request after the resume is served too.
        assert_eq!(r.request(&[(0xa000, 8, VRING_DESC_F_WRITE)]), 8);
        let c = VirtioDevice::counters(&r.rng);
        assert_eq!(c["requests"], 3);
        assert_eq!(c["bytes"], 40);
        assert_eq!(c["bad_requests"], 0);
    }

    #[test]
    fn pause_resume_reset_and_drop_in_any_order() {
        // Inactive: pause and resume do nothing (and start no worker).
        let mut rng = Rng::new().unwrap();
        rng.pause();
        rng.resume().unwrap();
        rng.pause();
        drop(rng);

        let mut r = start(false);
        // Resume without pause, pause twice, resume twice: one running worker.
        r.rng.resume().unwrap();
        r.rng.pause();
        r.rng.pause();
        r.rng.resume().unwrap();
        r.rng.resume().unwrap();
        assert_eq!(r.request(&[(0x8000, 4, VRING_DESC_F_WRITE)]), 4);
        // Reset while paused: resume afterwards does not bring the worker back.
        r.rng.pause();
        r.rng.reset();
        r.rng.resume().unwrap();
        submit(&mut r, 0x9000);
        assert_not_served(&r, 1, 0x9000);
        // A fresh activation (the queue starts over at the top of the ring) serves again.
        let queue = ActivatedQueue {
            index: 0,
            queue: queue_for(&r.ring, false),
            notify: r.notify.try_clone().unwrap(),
        };
        r.rng
            .activate(r.mem.clone(), r.irq.clone(), vec![queue])
            .unwrap();
        assert!(r.ring.wait_used(&r.mem, 2));
        // Drop while paused joins nothing and does not hang.
        r.rng.pause();
        drop(r);
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let mut rng = Rng::new().unwrap();
        let mem = guest_memory(MEM_SIZE);
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
        assert!(matches!(
            rng.activate(mem, irq, Vec::new()),
            Err(VirtioError::QueueCount { got: 0, .. })
        ));
        assert_eq!(
            rng.features() & VIRTIO_F_VERSION_1_BIT,
            VIRTIO_F_VERSION_1_BIT
        );
        assert_eq!(rng.device_type(), 4);
    }
}
