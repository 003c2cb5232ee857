//! A hostile driver of a virtio PCI function: arbitrary writes to guest memory (rings,
//! descriptors, indirect tables, request headers), configuration-space and BAR accesses of
//! every width and offset (common configuration, ISR, device configuration, notifications,
//! MSI-X table and PBA), with the device behind it a virtio-blk over an in-memory disk, a
//! virtio-rng, or a virtio-net over a socket pair standing for its tap, from which hostile
//! frames (virtio-net header included) arrive. The device's workers serve whatever the queues
//! hold meanwhile, on their own threads as in the VMM. Any panic, abort or hang is a bug:
//! every byte here is the guest's (or the network's).
//!
//! Input: the first byte picks the device (and whether the disk is read-only), then a list of
//! operations, each an opcode byte and its operands (see `Op`).
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;

use devices::block::{BlockError, DiskImage, Format};
use devices::pci::{MsiIrqs, MsiMessage, PciDevice};
use devices::virtio::pci::{VIRTIO_PCI_BAR, VIRTIO_PCI_BAR_SIZE};
use devices::virtio::{MacAddr, Rng, Tap, VirtioBlk, VirtioNet, VirtioPciDevice};
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: small, so that random addresses land inside it often.
const MEM_SIZE: usize = 64 << 10;
/// The in-memory disk's size.
const DISK_SIZE: usize = 64 << 10;
/// Operations per input (a bound on the time one input takes).
const MAX_OPS: usize = 512;

/// Interrupts go nowhere.
struct NoIrqs;

impl MsiIrqs for NoIrqs {
    fn update(&self, _: u16, _: MsiMessage, _: bool) {}
    fn trigger(&self, _: u16) {}
}

/// A disk in memory.
struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, BlockError> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|r| r.end <= self.data.len())
            .ok_or_else(|| BlockError::OutOfRange {
                path: self.path().to_owned(),
                offset,
                len: len as u64,
                size: self.size(),
            })
    }

    fn writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path().to_owned(),
            });
        }
        Ok(())
    }
}

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn path(&self) -> &Path {
        Path::new("fuzz-disk")
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.writable()?;
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _: bool) -> Result<(), BlockError> {
        self.writable()?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn reload(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// Reads operands off the input; a short input reads as zeros, then ends the list.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, i| v | u64::from(self.byte().unwrap_or(0)) << (8 * i))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

/// The device `pick` names, and for a virtio-net the other end of its "tap".
fn device(pick: u8, mem: &GuestMemoryMmap) -> Option<(VirtioPciDevice, Option<UnixDatagram>)> {
    let mut network = None;
    let device: Box<dyn devices::virtio::VirtioDevice> = if pick & 3 == 3 {
        let (tap, peer) = UnixDatagram::pair().ok()?;
        tap.set_nonblocking(true).ok()?;
        peer.set_nonblocking(true).ok()?;
        let tap = Tap::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(tap)), "fuzz");
        network = Some(peer);
        Box::new(VirtioNet::new(tap, MacAddr::stable_for("fuzz")).ok()?)
    } else if pick & 1 == 0 {
        let disk = MemDisk {
            data: vec![0xa5; DISK_SIZE],
            read_only: pick & 2 != 0,
        };
        let queues = 1 + u16::from(pick >> 2 & 1);
        Box::new(VirtioBlk::with_queues(Box::new(disk), Some("fuzz".into()), queues).ok()?)
    } else {
        Box::new(Rng::with_source(std::fs::File::open("/dev/zero").ok()?))
    };
    let pci = VirtioPciDevice::new(device, mem.clone(), Arc::new(NoIrqs)).ok()?;
    Some((pci, network))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(pick) = input.byte() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let Some((mut dev, network)) = device(pick, &mem) else {
        return;
    };
    for _ in 0..MAX_OPS {
        let Some(op) = input.byte() else {
            break;
        };
        // Widths a vCPU can make: 1, 2, 4 or 8 bytes.
        let width = 1usize << (op >> 4 & 3);
        match op & 0xf {
            // Guest memory: up to 255 bytes anywhere (some straddle the end of RAM).
            0 => {
                let addr = u64::from(input.u16()) % MEM_SIZE as u64;
                let len = usize::from(input.byte().unwrap_or(0));
                let bytes = input.bytes(len).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            // BAR writes and reads, mostly in the regions that decode something.
            1 | 2 => {
                let offset = u64::from(input.u16()) % VIRTIO_PCI_BAR_SIZE;
                let value = input.u64().to_le_bytes();
                let data = &value[..width];
                dev.write_bar(VIRTIO_PCI_BAR, offset, data);
            }
            3 => {
                let offset = u64::from(input.u16()) % VIRTIO_PCI_BAR_SIZE;
                let mut data = [0u8; 8];
                dev.read_bar(VIRTIO_PCI_BAR, offset, &mut data[..width]);
            }
            // Configuration space, as the root hands it over: within 4 KiB, never across a
            // 4-byte boundary.
            4 | 5 => {
                let offset = input.u16() % 4096;
                let width = width.min(4 - usize::from(offset % 4));
                let value = input.u64().to_le_bytes();
                let _ = dev.write_config(offset, &value[..width]);
            }
            6 => {
                let offset = input.u16() % 4096;
                let width = width.min(4 - usize::from(offset % 4));
                let mut data = [0u8; 4];
                dev.read_config(offset, &mut data[..width]);
            }
            // Queue notifications (what the ioeventfds would carry).
            7 | 8 | 9 => {
                let queue = u64::from(input.byte().unwrap_or(0) % 4);
                // The notification region (at 0x3000 in the BAR, 4 bytes per queue).
                dev.write_bar(VIRTIO_PCI_BAR, 0x3000 + 4 * queue, &[0; 4]);
            }
            // What the VMM does between guest accesses: pause, resume, flush, save.
            10 => dev.pause(),
            11 => {
                let _ = dev.resume();
            }
            12 => {
                let _ = dev.flush();
            }
            13 => {
                let _ = dev.save_function();
            }
            // A frame from the network (a virtio-net header, then anything), after taking
            // what the guest sent (so that the socket does not fill up for good).
            14 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 8;
                let frame = input.bytes(len).to_vec();
                if let Some(peer) = &network {
                    let mut sent = [0u8; 2048];
                    while peer.recv(&mut sent).is_ok() {}
                    let _ = peer.send(&frame);
                }
            }
            // Let the workers run a little.
            _ => std::thread::yield_now(),
        }
    }
    // Dropping the function resets its device: its workers stop, whatever they were doing.
});
