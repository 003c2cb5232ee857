//! The platform's I/O as a hostile guest reaches it: port I/O to the legacy devices (COM1's
//! 16550, the CMOS RTC, the i8042, the ACPI power controls, the GED) and to PCI
//! configuration through 0xcf8/0xcfc; MMIO to the ECAM window and to the BARs of a virtio-rng
//! PCI function, which the guest may size and move (the BAR moves relocate it on the MMIO bus,
//! as the VMM does). Every width, every offset, reads and writes. Any panic, abort or hang is
//! a bug: every byte here is the guest's.
//!
//! Input: a list of operations of 4 to 12 bytes: kind (port/MMIO, read/write), target, offset,
//! width, value (see the loop).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{AcpiPowerControl, Cmos, Ged, Serial, I8042};
use devices::pci::{
    BarReprogram, MsiIrqs, MsiMessage, PciBarRegion, PciConfigIo, PciConfigMmio, PciDevice,
    PciRoot, PCI_CONFIG_IO_LEN, PCI_CONFIG_IO_PORT,
};
use devices::virtio::{Rng, VirtioPciDevice};
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Where the VMM puts ECAM and the BARs (vmm::layout).
const ECAM: u64 = 0xe000_0000;
const ECAM_LEN: u64 = 1 << 20;
const BAR_BASE: u64 = 0xc000_0000;
/// Ports of the legacy devices and PCI configuration (vmm::layout::pio).
const PORTS: [(u64, u64); 6] = [
    (0x3f8, 8),
    (0x60, 5),
    (0x70, 2),
    (0x600, 3),
    (0x610, 1),
    (PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_LEN),
];
/// Operations per input.
const MAX_OPS: usize = 1024;

struct NoIrqs;

impl MsiIrqs for NoIrqs {
    fn update(&self, _: u16, _: MsiMessage, _: bool) {}
    fn trigger(&self, _: u16) {}
}

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

/// The machine's buses with every device on them.
fn platform() -> Option<(Bus, Arc<Bus>)> {
    let pio = Bus::new();
    let mmio = Arc::new(Bus::new());
    let serial = Serial::new(evt(), Box::new(std::io::sink())).ok()?;
    pio.insert(Arc::new(Mutex::new(serial)), 0x3f8, 8).ok()?;
    pio.insert(Arc::new(Mutex::new(I8042::new(evt()))), 0x60, 5)
        .ok()?;
    pio.insert(Arc::new(Mutex::new(Cmos::new())), 0x70, 2)
        .ok()?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPowerControl::new(evt(), evt()))),
        0x600,
        3,
    )
    .ok()?;
    pio.insert(Arc::new(Mutex::new(Ged::new(evt()).0)), 0x610, 1)
        .ok()?;

    let root = Arc::new(Mutex::new(PciRoot::new()));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        PCI_CONFIG_IO_PORT,
        PCI_CONFIG_IO_LEN,
    )
    .ok()?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        ECAM,
        ECAM_LEN,
    )
    .ok()?;

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).ok()?;
    let rng = Rng::with_source(std::fs::File::open("/dev/zero").ok()?);
    let mut pci = VirtioPciDevice::new(Box::new(rng), mem, Arc::new(NoIrqs)).ok()?;
    let mut mapped = HashMap::new();
    let mut next = BAR_BASE;
    for bar in pci.bars() {
        pci.set_bar_address(bar.index, next).ok()?;
        mapped.insert(bar.index, (Some(next), bar.size));
        next += bar.size.max(0x1000);
    }
    let device: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(pci));
    for (&index, &(addr, size)) in &mapped {
        let region = PciBarRegion::new(device.clone(), index);
        mmio.insert(Arc::new(Mutex::new(region)), addr?, size)
            .ok()?;
    }
    root.lock().ok()?.add_device(device.clone()).ok()?;
    // The guest moves a BAR: relocate it on the MMIO bus (left unmapped where it would
    // overlap something), as the VMM's PCI segment does.
    let weak = Arc::downgrade(&mmio);
    let mapped = Mutex::new(mapped);
    root.lock()
        .ok()?
        .set_bar_reprogram_handler(Box::new(move |_slot, mv: BarReprogram| {
            let Some(mmio) = weak.upgrade() else { return };
            let mut mapped = mapped.lock().unwrap_or_else(|e| e.into_inner());
            let Some((current, _)) = mapped.get_mut(&mv.bar) else {
                return;
            };
            if let Some(old) = current.take() {
                let _ = mmio.remove(old);
            }
            let region = PciBarRegion::new(device.clone(), mv.bar);
            if mmio
                .insert(Arc::new(Mutex::new(region)), mv.new, mv.size)
                .is_ok()
            {
                *current = Some(mv.new);
            }
        }));
    Some((pio, mmio))
}

fuzz_target!(|data: &[u8]| {
    let Some((pio, mmio)) = platform() else {
        return;
    };
    let mut rest = data;
    for _ in 0..MAX_OPS {
        let [kind, target, off_lo, off_hi, tail @ ..] = rest else {
            break;
        };
        let width = [1usize, 2, 4, 8][usize::from(kind >> 2 & 3)];
        let offset = u64::from(u16::from_le_bytes([*off_lo, *off_hi]));
        let write = kind & 1 != 0;
        let addr = if kind & 2 == 0 {
            // A port: one of the devices' (most of the time), or any.
            match PORTS.get(usize::from(*target % 8)) {
                Some((base, len)) => base + offset % len,
                None => offset,
            }
        } else if target & 1 == 0 {
            ECAM + u64::from(u32::from_le_bytes([*off_lo, *off_hi, *target, 0])) % ECAM_LEN
        } else {
            BAR_BASE + offset
        };
        let n = if write { width.min(tail.len()) } else { 0 };
        let (value, next) = tail.split_at(n);
        rest = next;
        let bus: &Bus = if kind & 2 == 0 { &pio } else { &mmio };
        if write {
            bus.write(addr, value);
        } else {
            let mut buf = [0u8; 8];
            bus.read(addr, &mut buf[..width]);
        }
    }
});
