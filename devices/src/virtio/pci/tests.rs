//! A test driver exercising the virtio PCI transport the way Linux's virtio_pci_modern does:
//! discover the capabilities, negotiate features, set up queues and MSI-X, start the device.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::pci::msix::testing::FakeMsiIrqs;
use crate::virtio::testing::*;
use crate::virtio::{
    status, Rng, VirtioInterrupt, VIRTIO_F_VERSION_1_BIT, VIRTIO_MSI_NO_VECTOR,
    VIRTIO_RING_F_EVENT_IDX_BIT,
};
use crate::Persist;
use vm_memory::Bytes;

const MEM_SIZE: usize = 0x10_0000;
const FEATURE_BIT0: u64 = 1;

// Common configuration registers.
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const GENERATION: u64 = 0x15;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

/// What a [`Dummy`] device was told.
#[derive(Default)]
struct Seen {
    acked: Mutex<Option<u64>>,
    activations: Mutex<Vec<Vec<u16>>>,
    resets: AtomicUsize,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    config: Mutex<[u8; 8]>,
}

/// A device with configurable queues, 8 bytes of configuration and a recorder.
struct Dummy {
    seen: Arc<Seen>,
    sizes: Vec<u16>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        26
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1_BIT | VIRTIO_RING_F_EVENT_IDX_BIT | FEATURE_BIT0
    }
    fn ack_features(&mut self, acked: u64) {
        *self.seen.acked.lock().unwrap() = Some(acked);
    }
    fn config_len(&self) -> u32 {
        8
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.seen.config.lock().unwrap();
        data.copy_from_slice(&c[offset as usize..offset as usize + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.seen.config.lock().unwrap();
        c[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<crate::virtio::ActivatedQueue>,
    ) -> Result<(), VirtioError> {
        let indexes = queues.iter().map(|q| q.index).collect();
        self.seen.activations.lock().unwrap().push(indexes);
        *self.seen.interrupt.lock().unwrap() = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.resets.fetch_add(1, Ordering::SeqCst);
        self.seen.interrupt.lock().unwrap().take();
    }
    fn pause(&mut self) {
        self.seen.pauses.fetch_add(1, Ordering::SeqCst);
    }
    fn resume(&mut self) -> Result<(), VirtioError> {
        self.seen.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> Result<crate::SavedState, crate::PersistError> {
        let config = *self.seen.config.lock().unwrap();
        Ok(crate::SavedState {
            version: 1,
            state: serde_json::json!(config),
        })
    }
    fn restore_state(&mut self, saved: &crate::SavedState) -> Result<(), crate::PersistError> {
        let config: [u8; 8] = serde_json::from_value(saved.state.clone()).map_err(|e| {
            crate::PersistError::Format {
                device: "dummy",
                reason: e.to_string(),
            }
        })?;
        *self.seen.config.lock().unwrap() = config;
        Ok(())
    }
}

fn dummy(queues: usize) -> (Box<dyn VirtioDevice>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let dev = Dummy {
        seen: seen.clone(),
        sizes: vec![16; queues],
    };
    (Box::new(dev), seen)
}

/// Where the driver found the virtio structures.
#[derive(Default, Debug)]
struct Caps {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    isr: u64,
    device: Option<(u64, u32)>,
    pci_cfg: usize,
    msix: usize,
}

struct Driver {
    dev: VirtioPciDevice,
    mem: GuestMemoryMmap,
    irqs: Arc<FakeMsiIrqs>,
    caps: Caps,
}

impl Driver {
    fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = guest_memory(MEM_SIZE);
        Self::with_memory(device, mem)
    }

    fn with_memory(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Self {
        let irqs = Arc::new(FakeMsiIrqs::default());
        let dev = VirtioPciDevice::new(device, mem.clone(), irqs.clone()).unwrap();
        let mut d = Driver {
            dev,
            mem,
            irqs,
            caps: Caps::default(),
        };
        d.caps = d.discover();
        d
    }

    fn cfg(&mut self, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(off as u16, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(&mut self, off: usize, data: &[u8]) {
        self.dev.write_config(off as u16, data);
    }

    fn discover(&mut self) -> Caps {
        let mut caps = Caps::default();
        let mut p = self.cfg(0x34, 1) as usize;
        while p != 0 {
            let id = self.cfg(p, 1);
            if id == 0x09 {
                assert_eq!(self.cfg(p + 4, 1), 0, "all structures in BAR 0");
                let offset = u64::from(self.cfg(p + 8, 4));
                let length = self.cfg(p + 12, 4);
                match self.cfg(p + 3, 1) {
                    1 => caps.common = offset,
                    2 => {
                        caps.notify = offset;
                        caps.notify_multiplier = self.cfg(p + 16, 4);
                    }
                    3 => caps.isr = offset,
                    4 => caps.device = Some((offset, length)),
                    5 => caps.pci_cfg = p,
                    t => panic!("unknown virtio capability {t}"),
                }
            } else if id == 0x11 {
                caps.msix = p;
            }
            p = self.cfg(p + 1, 1) as usize;
        }
        caps
    }

    fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, val: u64, len: usize) {
        self.dev.write_bar(0, off, &val.to_le_bytes()[..len]);
    }

    fn common(&mut self, reg: u64, len: usize) -> u64 {
        self.read(self.caps.common + reg, len)
    }

    fn set_common(&mut self, reg: u64, val: u64, len: usize) {
        self.write(self.caps.common + reg, val, len)
    }

    fn status(&mut self) -> u8 {
        self.common(STATUS, 1) as u8
    }

    fn add_status(&mut self, bits: u8) {
        let s = self.status();
        self.set_common(STATUS, u64::from(s | bits), 1);
    }

    fn device_features(&mut self) -> u64 {
        self.set_common(DFSELECT, 0, 4);
        let low = self.common(DF, 4);
        self.set_common(DFSELECT, 1, 4);
        low | self.common(DF, 4) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(&mut self, features: u64) -> u8 {
        self.set_common(STATUS, 0, 1);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.set_common(GFSELECT, 0, 4);
        self.set_common(GF, features & 0xffff_ffff, 4);
        self.set_common(GFSELECT, 1, 4);
        self.set_common(GF, features >> 32, 4);
        self.add_status(status::FEATURES_OK);
        self.status()
    }

    /// Enables MSI-X with vector `v` sending data `0x40 + v`, all unmasked.
    fn enable_msix(&mut self) {
        let control = self.cfg(self.caps.msix + 2, 2);
        let vectors = (control & 0x7ff) + 1;
        let table = self.cfg(self.caps.msix + 4, 4);
        assert_eq!(table & 7, 0, "table in BAR 0");
        for v in 0..u64::from(vectors) {
            let e = u64::from(table) + 16 * v;
            self.write(e, 0xfee0_0000, 4);
            self.write(e + 4, 0, 4);
            self.write(e + 8, 0x40 + v, 4);
            self.write(e + 12, 0, 4);
        }
        let control = (control as u16 | 0x8000).to_le_bytes();
        self.cfg_write(self.caps.msix + 2, &control);
    }

    fn setup_queue(&mut self, index: u16, ring: &TestRing, vector: u16) {
        self.set_common(Q_SELECT, index.into(), 2);
        self.set_common(Q_SIZE, ring.size.into(), 2);
        self.set_common(Q_DESC, ring.desc, 4);
        self.set_common(Q_DESC + 4, 0, 4);
        self.set_common(Q_DRIVER, ring.avail, 8);
        self.set_common(Q_DEVICE, ring.used & 0xffff_ffff, 4);
        self.set_common(Q_DEVICE + 4, ring.used >> 32, 4);
        self.set_common(Q_MSIX, vector.into(), 2);
        assert_eq!(self.common(Q_MSIX, 2), u64::from(vector));
        self.set_common(Q_ENABLE, 1, 2);
    }

    fn kick(&mut self, index: u16) {
        self.set_common(Q_SELECT, index.into(), 2);
        let off = self.common(Q_NOTIFY_OFF, 2);
        let addr = self.caps.notify + off * u64::from(self.caps.notify_multiplier);
        self.write(addr, index.into(), 2);
    }
}

/// An rng driven through the full handshake, queue 0 on MSI-X vector 1.
fn running_rng(features: u64) -> (Driver, TestRing, Arc<crate::virtio::rng::RngCounters>) {
    let rng = Rng::new().unwrap();
    let counters = rng.counters();
    let mut d = Driver::new(Box::new(rng));
    assert_eq!(
        d.negotiate(features) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    d.enable_msix();
    d.set_common(MSIX_CONFIG, 0, 2);
    let ring = TestRing::new(0x1000, 16);
    d.setup_queue(0, &ring, 1);
    d.add_status(status::DRIVER_OK);
    assert_eq!(d.status() & status::NEEDS_RESET, 0);
    (d, ring, counters)
}

#[test]
fn identity_capabilities_and_bar() {
    let (dev, _) = dummy(2);
    let mut d = Driver::new(dev);
    assert_eq!(d.cfg(0, 4), (0x1040 + 26) << 16 | 0x1af4);
    assert_eq!(d.cfg(8, 1), 1, "revision 1: modern device");
    assert_eq!(d.cfg(0x2c, 2), 0x1af4);
    assert!(d.cfg(0x2e, 2) >= 0x40);
    assert_eq!(d.caps.common, 0);
    assert_eq!(d.caps.notify_multiplier, NOTIFY_OFF_MULTIPLIER);
    assert_eq!(d.caps.isr, 0x1000);
    assert_eq!(d.caps.device, Some((0x2000, 8)));
    assert_ne!(d.caps.pci_cfg, 0);
    assert_ne!(d.caps.msix, 0);
    assert_eq!(d.cfg(d.caps.msix + 2, 2) & 0x7ff, 2, "3 vectors");
    // BAR 0 is a 64-bit memory BAR of 32 KiB.
    d.cfg_write(0x10, &[0xff; 4]);
    assert_eq!(d.cfg(0x10, 4), 0xffff_8004);
    d.cfg_write(0x14, &[0xff; 4]);
    assert_eq!(d.cfg(0x14, 4), 0xffff_ffff);
    d.dev.set_bar_address(0, 0x1_0000_0000).unwrap();
    assert_eq!(d.dev.bar_address(), 0x1_0000_0000);
    let notifiers = d.dev.queue_notifiers(0x1_0000_0000);
    let addrs: Vec<u64> = notifiers.iter().map(|(a, _)| *a).collect();
    assert_eq!(addrs, vec![0x1_0000_3000, 0x1_0000_3004]);
    assert_eq!(d.common(NUM_QUEUES, 2), 2);
    assert_eq!(d.device_features(), d.dev.device().features());
}

#[test]
fn features_ok_needs_version_1_and_offered_bits() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    assert_eq!(d.negotiate(FEATURE_BIT0) & status::FEATURES_OK, 0);
    assert_eq!(*seen.acked.lock().unwrap(), None);
    let unoffered = VIRTIO_F_VERSION_1_BIT | 1 << 40;
    assert_eq!(d.negotiate(unoffered) & status::FEATURES_OK, 0);
    let good = VIRTIO_F_VERSION_1_BIT | FEATURE_BIT0;
    assert_eq!(d.negotiate(good) & status::FEATURES_OK, status::FEATURES_OK);
    assert_eq!(*seen.acked.lock().unwrap(), Some(good));
    // Driver features are frozen after FEATURES_OK.
    d.set_common(GFSELECT, 0, 4);
    d.set_common(GF, 0, 4);
    assert_eq!(d.common(GF, 4), FEATURE_BIT0);
    // DRIVER_OK without FEATURES_OK is refused.
    d.negotiate(0);
    d.add_status(status::DRIVER_OK);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    assert!(seen.activations.lock().unwrap().is_empty());
}

#[test]
fn driver_ok_activates_the_enabled_queues() {
    let (dev, seen) = dummy(3);
    let mut d = Driver::new(dev);
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    d.setup_queue(1, &TestRing::new(0x1000, 16), 0);
    d.setup_queue(2, &TestRing::new(0x8000, 8), 0);
    // Queue registers of an enabled queue are frozen.
    d.set_common(Q_SELECT, 2, 2);
    d.set_common(Q_SIZE, 4, 2);
    assert_eq!(d.common(Q_SIZE, 2), 8);
    assert_eq!(d.common(Q_DESC, 8), 0x8000);
    assert_eq!(d.common(Q_DRIVER, 4), 0x9000);
    assert_eq!(d.common(Q_DEVICE + 4, 4), 0);
    assert_eq!(d.common(Q_ENABLE, 2), 1);
    d.add_status(status::DRIVER_OK);
    assert_eq!(d.status(), 0x0f);
    assert_eq!(*seen.activations.lock().unwrap(), vec![vec![1, 2]]);
    // A non-existent queue reads as size 0.
    d.set_common(Q_SELECT, 3, 2);
    assert_eq!(d.common(Q_SIZE, 2), 0);
    // Reset stops the device and clears the registers.
    d.set_common(STATUS, 0, 1);
    assert_eq!(seen.resets.load(Ordering::SeqCst), 1);
    assert_eq!(d.status(), 0);
    d.set_common(Q_SELECT, 1, 2);
    assert_eq!(d.common(Q_ENABLE, 2), 0);
    assert_eq!(d.common(Q_SIZE, 2), 16);
    assert_eq!(d.common(Q_MSIX, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(d.common(Q_DESC, 8), 0);
}

#[test]
fn invalid_queue_sets_needs_reset_and_signals_config() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    d.enable_msix();
    d.set_common(MSIX_CONFIG, 0, 2);
    let generation = d.common(GENERATION, 1);
    d.setup_queue(0, &TestRing::new(MEM_SIZE as u64, 16), 1);
    d.add_status(status::DRIVER_OK);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    assert!(seen.activations.lock().unwrap().is_empty());
    assert_eq!(d.irqs.count(0), 1, "config change interrupt");
    assert_ne!(d.common(GENERATION, 1), generation);
    // Reset recovers.
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    d.setup_queue(0, &TestRing::new(0x1000, 16), 1);
    d.add_status(status::DRIVER_OK);
    assert_eq!(d.status(), 0x0f);
}

#[test]
fn msix_vectors_beyond_the_table_read_no_vector() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    d.set_common(MSIX_CONFIG, 2, 2);
    assert_eq!(d.common(MSIX_CONFIG, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.set_common(MSIX_CONFIG, 1, 2);
    assert_eq!(d.common(MSIX_CONFIG, 2), 1);
    d.set_common(Q_MSIX, 7, 2);
    assert_eq!(d.common(Q_MSIX, 2), u64::from(VIRTIO_MSI_NO_VECTOR));

    // Interrupts go to the chosen vectors; with MSI-X off they land in the ISR byte.
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    d.set_common(MSIX_CONFIG, 1, 2);
    d.setup_queue(0, &TestRing::new(0x1000, 16), 0);
    d.add_status(status::DRIVER_OK);
    let irq = seen.interrupt.lock().unwrap().clone().unwrap();
    irq.signal_used_queue(0);
    assert_eq!(d.read(d.caps.isr, 1), 1);
    assert_eq!(d.read(d.caps.isr, 1), 0, "read to clear");
    d.enable_msix();
    irq.signal_used_queue(0);
    irq.signal_config_change();
    irq.signal_used_queue(9);
    assert_eq!((d.irqs.count(0), d.irqs.count(1)), (1, 1));
    assert_eq!(d.read(d.caps.isr, 1), 2, "config bit only");
}

#[test]
fn device_config_window() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    let (off, len) = d.caps.device.unwrap();
    d.write(off + 2, 0xbeef, 2);
    assert_eq!(seen.config.lock().unwrap()[2..4], [0xef, 0xbe]);
    assert_eq!(d.read(off, 4), 0xbeef_0000);
    // Beyond config_len: zeros, writes dropped; straddling accesses are clipped.
    d.write(off + u64::from(len), u64::MAX, 8);
    assert_eq!(d.read(off + u64::from(len), 8), 0);
    d.write(off + 6, u64::MAX, 8);
    assert_eq!(d.read(off + 4, 8), 0xffff_0000);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let (dev, _) = dummy(2);
    let mut d = Driver::new(dev);
    let cap = d.caps.pci_cfg;
    // Read num_queues (offset 0x12 of the common configuration, 2 bytes).
    d.cfg_write(cap + 12, &2u32.to_le_bytes());
    d.cfg_write(cap + 8, &0x12u32.to_le_bytes());
    assert_eq!(d.cfg(cap + 16, 2), 2);
    // Write queue_select through the window.
    d.cfg_write(cap + 8, &(Q_SELECT as u32).to_le_bytes());
    d.cfg_write(cap + 16, &1u16.to_le_bytes());
    assert_eq!(d.common(Q_SELECT, 2), 1);
    // Misaligned or oversized windows do nothing.
    d.cfg_write(cap + 8, &0x13u32.to_le_bytes());
    d.cfg_write(cap + 16, &5u16.to_le_bytes());
    d.cfg_write(cap + 12, &3u32.to_le_bytes());
    d.cfg_write(cap + 8, &0x16u32.to_le_bytes());
    d.cfg_write(cap + 16, &5u32.to_le_bytes());
    assert_eq!(d.common(Q_SELECT, 2), 1);
}

#[test]
fn rng_serves_a_request_end_to_end() {
    let (mut d, mut ring, counters) = running_rng(VIRTIO_F_VERSION_1_BIT);
    let head = ring.add_chain(&d.mem, &[(0x8000, 32, VRING_DESC_F_WRITE)]);
    // A notification written to the BAR (no ioeventfd registered) reaches the worker.
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
    assert_eq!(ring.used_elem(&d.mem, 0), (u32::from(head), 32));
    assert!(d.irqs.wait_for(1, 1, Duration::from_secs(5)));
    // The ioeventfd path: the VMM's eventfd is signalled directly.
    ring.add_chain(&d.mem, &[(0x9000, 8, VRING_DESC_F_WRITE)]);
    let (_, fd) = d.dev.queue_notifiers(0)[0];
    fd.write(1).unwrap();
    assert!(ring.wait_used(&d.mem, 2));
    assert!(d.irqs.wait_for(1, 2, Duration::from_secs(5)));
    assert_eq!(counters.bytes_served(), 40);
    assert_eq!(counters.requests(), 2);
}

#[test]
fn rng_reset_then_reactivate() {
    let (mut d, mut ring, _) = running_rng(VIRTIO_F_VERSION_1_BIT | VIRTIO_RING_F_EVENT_IDX_BIT);
    ring.add_chain(&d.mem, &[(0x8000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
    d.set_common(STATUS, 0, 1);
    assert_eq!(d.status(), 0);
    // After the reset nothing is served...
    ring.add_chain(&d.mem, &[(0x8000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(ring.used_idx(&d.mem), 1);
    // ...until the driver starts over with fresh rings.
    assert_eq!(
        d.negotiate(VIRTIO_F_VERSION_1_BIT) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    let mut ring = TestRing::new(0x10000, 16);
    d.setup_queue(0, &ring, 1);
    d.add_status(status::DRIVER_OK);
    ring.add_chain(&d.mem, &[(0x8000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
}

#[test]
fn rng_survives_save_and_restore() {
    let (mut d, mut ring, _) = running_rng(VIRTIO_F_VERSION_1_BIT);
    ring.add_chain(&d.mem, &[(0x8000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
    d.dev.set_bar_address(0, 0xc000_0000).unwrap();
    let state = d.dev.save();
    let json = serde_json::to_string(&state).unwrap();
    let state: VirtioPciState = serde_json::from_str(&json).unwrap();
    drop(d.dev);

    let irqs = Arc::new(FakeMsiIrqs::default());
    let mut dev =
        VirtioPciDevice::new(Box::new(Rng::new().unwrap()), d.mem.clone(), irqs.clone()).unwrap();
    dev.restore(&state).unwrap();
    assert_eq!(dev.save(), state);
    assert_eq!(dev.bars()[0].addr, 0xc000_0000);
    assert_eq!(irqs.route(1).unwrap().0.data, 0x41, "MSI routes replayed");
    // The restored device continues from the saved ring position.
    ring.add_chain(&d.mem, &[(0x9000, 8, VRING_DESC_F_WRITE)]);
    dev.queue_notifiers(0)[0].1.write(1).unwrap();
    assert!(ring.wait_used(&d.mem, 2));
    assert_eq!(ring.used_elem(&d.mem, 1).1, 8);
    assert!(irqs.wait_for(1, 1, Duration::from_secs(5)));
}

#[test]
fn every_register_at_every_width_is_harmless() {
    let (mut d, _, _) = running_rng(VIRTIO_F_VERSION_1_BIT);
    let patterns = [0u64, u64::MAX, 0x5a5a_5a5a_5a5a_5a5a, 1];
    for off in 0..VIRTIO_PCI_BAR_SIZE + 16 {
        for len in [1usize, 2, 4, 8] {
            d.read(off, len);
        }
    }
    for (i, off) in (0..VIRTIO_PCI_BAR_SIZE + 16).enumerate() {
        for len in [1usize, 2, 4, 8] {
            d.write(off, patterns[i % patterns.len()], len);
        }
    }
    for bar in 1..6 {
        let mut b = [0u8; 4];
        d.dev.read_bar(bar, 0, &mut b);
        d.dev.write_bar(bar, 0, &b);
    }
    for off in 0..4096usize {
        for len in [1usize, 2, 4] {
            if off % 4 + len > 4 {
                continue;
            }
            let v = d.cfg(off, len);
            d.cfg_write(off, &(!v).to_le_bytes()[..len]);
            d.cfg(off, len);
        }
    }
    // Still a working device after a reset.
    assert_eq!(
        d.negotiate(VIRTIO_F_VERSION_1_BIT) & status::FEATURES_OK,
        status::FEATURES_OK
    );
}

#[test]
fn constructor_limits() {
    let (dev, _) = dummy(MAX_QUEUES + 1);
    let irqs = Arc::new(FakeMsiIrqs::default());
    let mem = guest_memory(0x1000);
    assert!(matches!(
        VirtioPciDevice::new(dev, mem.clone(), irqs.clone()),
        Err(VirtioError::TooManyQueues { .. })
    ));
    let seen = Arc::new(Seen::default());
    let dev = Box::new(Dummy {
        seen,
        sizes: vec![16, 12],
    });
    assert!(matches!(
        VirtioPciDevice::new(dev, mem, irqs),
        Err(VirtioError::QueueMaxSize {
            index: 1,
            size: 12,
            ..
        })
    ));
}

/// virtio-blk behind the transport: configuration through the device capability, a write and
/// through the queue, then save/restore carries the acked features (DISCARD) over.
#[test]
fn blk_end_to_end_and_restore() {
    use crate::block::{open_disk, DiskOptions};
    use crate::virtio::VirtioBlk;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_OUT,
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let disk = open_disk(&path, DiskOptions::default()).unwrap();
    let blk = VirtioBlk::new(disk, Some("e2e".into())).unwrap();
    let counters = blk.counters();
    let mut d = Driver::new(Box::new(blk));
    let (cfg, _) = d.caps.device.unwrap();
    assert_eq!(d.read(cfg, 8), 128, "capacity in sectors");
    let features = VIRTIO_F_VERSION_1_BIT | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD);
    assert_eq!(
        d.negotiate(features) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    d.enable_msix();
    d.set_common(MSIX_CONFIG, 0, 2);
    let mut ring = TestRing::new(0x1000, 16);
    d.setup_queue(0, &ring, 1);
    d.add_status(status::DRIVER_OK);

    let header = |mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64| {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, vm_memory::GuestAddress(at)).unwrap();
    };
    header(&d.mem, 0x8000, VIRTIO_BLK_T_OUT, 2);
    d.mem
        .write_slice(&[0x77; 512], vm_memory::GuestAddress(0x9000))
        .unwrap();
    ring.add_chain(
        &d.mem,
        &[
            (0x8000, 16, 0),
            (0x9000, 512, 0),
            (0xa000, 1, VRING_DESC_F_WRITE),
        ],
    );
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
    assert!(d.irqs.wait_for(1, 1, Duration::from_secs(5)));
    assert_eq!(std::fs::read(&path).unwrap()[1024..1536], [0x77; 512]);

    // A running device is not saved; a paused one is, with the device behind the transport.
    assert_eq!(
        d.dev.save_function().unwrap_err(),
        crate::PersistError::Running {
            device: "virtio-blk"
        }
    );
    d.dev.pause();
    let state = d.dev.save_function().unwrap();
    assert_eq!(state.device.version, 1);
    drop(d.dev);
    let build = |path: &std::path::Path, serial: &str| {
        let disk = open_disk(path, DiskOptions::default()).unwrap();
        let blk = VirtioBlk::new(disk, Some(serial.into())).unwrap();
        let counters = blk.counters();
        let irqs = Arc::new(FakeMsiIrqs::default());
        let dev = VirtioPciDevice::new(Box::new(blk), d.mem.clone(), irqs).unwrap();
        (dev, counters)
    };
    // Not the disk that was saved: refused with the reason.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 128 * 1024]).unwrap();
    let err = build(&other, "e2e").0.restore_function(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "virtio-blk: {}: 256 sectors, the saved disk had 128",
            other.display()
        )
    );
    let err = build(&path, "nope").0.restore_function(&state).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("serial \"nope\", the saved disk's was \"e2e\""),
        "{err}"
    );
    let mut newer = state.clone();
    newer.device.version = 2;
    assert!(matches!(
        build(&path, "e2e").0.restore_function(&newer),
        Err(crate::PersistError::Version { found: 2, .. })
    ));
    let (mut dev, restored) = build(&path, "e2e");
    dev.restore_function(&state).unwrap();
    assert_eq!(
        dev.save_function().unwrap_err().to_string(),
        "virtio-blk: still running; pause it before saving"
    );
    // DISCARD is still negotiated after the restore (it is UNSUPP otherwise).
    header(&d.mem, 0x8100, VIRTIO_BLK_T_DISCARD, 0);
    let mut segment = [0u8; 16];
    segment[..8].copy_from_slice(&2u64.to_le_bytes());
    segment[8..12].copy_from_slice(&1u32.to_le_bytes());
    d.mem
        .write_slice(&segment, vm_memory::GuestAddress(0x8200))
        .unwrap();
    ring.add_chain(
        &d.mem,
        &[
            (0x8100, 16, 0),
            (0x8200, 16, 0),
            (0xa001, 1, VRING_DESC_F_WRITE),
        ],
    );
    dev.queue_notifiers(0)[0].1.write(1).unwrap();
    assert!(ring.wait_used(&d.mem, 2));
    let status: u8 = d.mem.read_obj(vm_memory::GuestAddress(0xa001)).unwrap();
    assert_eq!(status, 0);
    assert_eq!(restored.discards(), 1);
    assert_eq!(counters.write_ops(), 1);
}

#[test]
fn pause_and_resume_reach_only_a_started_device() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    let count = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    // Not started: nothing to pause or resume.
    d.dev.pause();
    assert!(d.dev.is_paused());
    d.dev.resume().unwrap();
    assert!(!d.dev.is_paused());
    assert_eq!((count(&seen.pauses), count(&seen.resumes)), (0, 0));
    // Started: one pause and one resume reach the device, however often they are asked for.
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    let ring = TestRing::new(0x1000, 16);
    d.setup_queue(0, &ring, VIRTIO_MSI_NO_VECTOR);
    d.add_status(status::DRIVER_OK);
    d.dev.resume().unwrap();
    d.dev.pause();
    d.dev.pause();
    assert_eq!((count(&seen.pauses), count(&seen.resumes)), (1, 0));
    d.dev.resume().unwrap();
    d.dev.resume().unwrap();
    assert_eq!((count(&seen.pauses), count(&seen.resumes)), (1, 1));
    // A driver reset while paused resets the device; resume then has nothing to resume.
    d.dev.pause();
    d.set_common(STATUS, 0, 1);
    assert_eq!(count(&seen.resets), 1);
    d.dev.resume().unwrap();
    assert_eq!((count(&seen.pauses), count(&seen.resumes)), (2, 1));
    assert_eq!(d.dev.device_type(), 26);
    assert!(d.dev.counters().is_empty());
}

#[test]
fn start_or_restore_while_paused_activates_on_resume() {
    let (dev, seen) = dummy(1);
    let mut d = Driver::new(dev);
    d.negotiate(VIRTIO_F_VERSION_1_BIT);
    let ring = TestRing::new(0x1000, 16);
    d.setup_queue(0, &ring, VIRTIO_MSI_NO_VECTOR);
    d.dev.pause();
    d.add_status(status::DRIVER_OK);
    assert!(seen.activations.lock().unwrap().is_empty());
    let state = d.dev.save();
    d.dev.resume().unwrap();
    assert_eq!(*seen.activations.lock().unwrap(), vec![vec![0]]);

    let (dev, seen) = dummy(1);
    let irqs = Arc::new(FakeMsiIrqs::default());
    let mut restored = VirtioPciDevice::new(dev, d.mem.clone(), irqs).unwrap();
    restored.pause();
    restored.restore(&state).unwrap();
    assert!(seen.activations.lock().unwrap().is_empty());
    assert_eq!(restored.save(), state);
    restored.resume().unwrap();
    assert_eq!(*seen.activations.lock().unwrap(), vec![vec![0]]);
    assert_eq!(seen.resumes.load(Ordering::SeqCst), 0);
}

#[test]
fn paused_rng_serves_nothing_and_saves_its_position() {
    let (mut d, mut ring, _) = running_rng(VIRTIO_F_VERSION_1_BIT);
    ring.add_chain(&d.mem, &[(0x8000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    assert!(ring.wait_used(&d.mem, 1));
    d.dev.pause();
    ring.add_chain(&d.mem, &[(0x9000, 8, VRING_DESC_F_WRITE)]);
    d.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_idx(&d.mem), 1);
    let mut buf = [0u8; 8];
    d.mem
        .read_slice(&mut buf, vm_memory::GuestAddress(0x9000))
        .unwrap();
    assert_eq!(buf, [0; 8]);
    let state = d.dev.save();
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(d.dev.device_type(), 4);
    assert_eq!(d.dev.counters()["requests"], 1);
    d.dev.resume().unwrap();
    assert!(ring.wait_used(&d.mem, 2));
    assert_eq!(d.dev.counters()["requests"], 2);
    assert_eq!(d.dev.counters()["bytes"], 16);
    // Dropped while paused: the worker stops.
    d.dev.pause();
    drop(d);
}
