//! The VM's PCI segment: the root bus behind the 0xcf8 ports and the ECAM window, BAR placement
//! in the 32-bit MMIO hole, and each virtio function's MSI-X vectors (KVM routes + irqfds) and
//! queue notifications (KVM ioeventfds).
//!
//! BARs are placed by the VMM, as firmware would, before the guest starts. A guest may move a
//! BAR (Linux does so only when it finds an assignment it dislikes); the BAR's bus mapping and
//! its ioeventfds follow it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use devices::pci::root::{PciConfigIoState, PciRootState};
use devices::pci::{
    BarReprogram, PciBarRegion, PciConfigIo, PciConfigMmio, PciDevice, PciRoot, PCI_CONFIG_IO_LEN,
    PCI_CONFIG_IO_PORT,
};
use devices::virtio::pci::VirtioFunctionState;
use devices::virtio::{VirtioDevice, VirtioPciDevice};
use devices::GuestMemoryMmap;
use devices::{Bus, Persist};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{PCI_BAR_WINDOW, PCI_MMCONFIG};
use crate::vstate::interrupts::{GsiRouter, KvmMsiIrqs};
use crate::Error;

/// A virtio function on the bus, as the VMM tracks it.
struct VirtioFunction {
    /// The device's ID (e.g. `_disk0`), the key of its counters.
    name: String,
    device: Arc<Mutex<VirtioPciDevice>>,
    /// Where each BAR is mapped on the MMIO bus now (None while a move left it nowhere).
    mapped: HashMap<u8, Option<u64>>,
    /// The queue notification eventfds (clones) and their offsets inside BAR 0.
    notifiers: Vec<(u64, EventFd)>,
}

/// The PCI devices of a VM and what maps them into the guest.
pub struct PciSegment {
    vm: Arc<VmFd>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    router: Arc<GsiRouter>,
    root: Arc<Mutex<PciRoot>>,
    config_io: Arc<Mutex<PciConfigIo>>,
    bars: AddressAllocator,
    functions: Arc<Mutex<HashMap<u8, VirtioFunction>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciSegment {
    /// The root bus with its host bridge, reachable through `pio` (0xcf8) and `mmio` (ECAM).
    pub fn new(
        vm: Arc<VmFd>,
        pio: &Bus,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        router: Arc<GsiRouter>,
    ) -> Result<Self, Error> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
        pio.insert(config_io.clone(), PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_LEN)?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            PCI_MMCONFIG.0,
            PCI_MMCONFIG.1,
        )?;
        let bars = AddressAllocator::new(PCI_BAR_WINDOW.0, PCI_BAR_WINDOW.1)
            .map_err(|e| Error::Pci(format!("BAR window: {e}")))?;
        let functions: Arc<Mutex<HashMap<u8, VirtioFunction>>> = Arc::default();
        let handler = {
            // Weak: the bus holds the ECAM device, which holds the root, which holds this.
            let (vm, mmio, functions) = (vm.clone(), Arc::downgrade(&mmio), functions.clone());
            Box::new(move |slot: u8, mv: BarReprogram| {
                let Some(mmio) = mmio.upgrade() else { return };
                if let Some(f) = lock(&functions).get_mut(&slot) {
                    move_bar(&vm, &mmio, f, mv);
                }
            })
        };
        lock(&root).set_bar_reprogram_handler(handler);
        Ok(PciSegment {
            vm,
            mmio,
            mem,
            router,
            root,
            config_io,
            bars,
            functions,
        })
    }

    /// Puts a virtio device on the bus behind the modern virtio-pci transport; returns its
    /// device number.
    pub fn add_virtio(&mut self, name: String, device: Box<dyn VirtioDevice>) -> Result<u8, Error> {
        let vectors = VirtioPciDevice::msix_vector_count(device.as_ref());
        let msi = Arc::new(KvmMsiIrqs::new(self.router.clone(), vectors)?);
        let mut pci = VirtioPciDevice::new(device, self.mem.clone(), msi)
            .map_err(|e| Error::Pci(e.to_string()))?;
        let mut mapped = HashMap::new();
        for bar in pci.bars() {
            let range = self
                .bars
                .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
                .map_err(|e| Error::Pci(format!("no room for a {:#x}-byte BAR: {e}", bar.size)))?;
            pci.set_bar_address(bar.index, range.start())
                .map_err(|e| Error::Pci(e.to_string()))?;
            mapped.insert(bar.index, Some(range.start()));
        }
        let base = pci.bar_address();
        let mut notifiers = Vec::new();
        for (addr, fd) in pci.queue_notifiers(base) {
            let fd = fd.try_clone().map_err(Error::EventFd)?;
            self.vm
                .register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| Error::Kvm("register a queue ioeventfd", e))?;
            notifiers.push((addr - base, fd));
        }
        let bar_sizes: Vec<(u8, u64)> = pci.bars().iter().map(|b| (b.index, b.size)).collect();
        let device = Arc::new(Mutex::new(pci));
        let slot = lock(&self.root)
            .add_device(device.clone() as Arc<Mutex<dyn PciDevice>>)
            .map_err(|e| Error::Pci(e.to_string()))?;
        for (index, size) in bar_sizes {
            let addr = mapped[&index].unwrap_or_default();
            let region = PciBarRegion::new(device.clone() as Arc<Mutex<dyn PciDevice>>, index);
            self.mmio.insert(Arc::new(Mutex::new(region)), addr, size)?;
        }
        lock(&self.functions).insert(
            slot,
            VirtioFunction {
                name,
                device,
                mapped,
                notifiers,
            },
        );
        Ok(slot)
    }
}

impl PciSegment {
    /// Stops every device's worker (see [`VirtioPciDevice::pause`]).
    pub fn pause_devices(&self) {
        for f in lock(&self.functions).values() {
            lock(&f.device).pause();
        }
    }

    /// Flushes every device's backend (see `VirtioDevice::flush`); while paused.
    pub fn flush_devices(&self) -> Result<(), Error> {
        self.on_every_device(VirtioPciDevice::flush)
    }

    /// Has every device read its backend again (see [`VirtioDevice::reload_backend`]).
    pub fn reload_backends(&self) -> Result<(), Error> {
        self.on_every_device(VirtioPciDevice::reload_backend)
    }

    /// Changes every device's backend lock (see [`devices::block::lock`]).
    pub fn set_backend_locks(&self, mode: devices::block::LockMode) -> Result<(), Error> {
        self.on_every_device(|d| d.set_backend_lock(mode))
    }

    /// Restarts the workers [`PciSegment::pause_devices`] stopped.
    pub fn resume_devices(&self) -> Result<(), Error> {
        self.on_every_device(VirtioPciDevice::resume)
    }

    /// Calls `op` on every device in slot order; the first failure names its device.
    fn on_every_device(
        &self,
        op: impl Fn(&mut VirtioPciDevice) -> Result<(), devices::virtio::VirtioError>,
    ) -> Result<(), Error> {
        for f in lock(&self.functions).values() {
            op(&mut lock(&f.device)).map_err(|e| Error::Device(format!("{}: {e}", f.name)))?;
        }
        Ok(())
    }

    /// Every device's counters, by device ID.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        lock(&self.functions)
            .values()
            .map(|f| {
                let counters = lock(&f.device)
                    .counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                (f.name.clone(), counters)
            })
            .collect()
    }
}

/// Saved state of the PCI segment: the CONFIG_ADDRESS latch, the host bridge, and every
/// virtio function by device number (transport and device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSegmentState {
    pub config_io: PciConfigIoState,
    pub root: PciRootState,
    pub functions: Vec<PciFunctionState>,
}

/// One virtio function's saved state, with where it sits and what it is called.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    pub slot: u8,
    pub name: String,
    pub function: VirtioFunctionState,
}

impl PciSegment {
    /// Saves the root and every function, in device-number order. The functions must be
    /// paused ([`PciSegment::pause_devices`]).
    pub fn save(&self) -> Result<PciSegmentState, Error> {
        let functions = lock(&self.functions);
        let mut slots: Vec<u8> = functions.keys().copied().collect();
        slots.sort_unstable();
        let mut saved = Vec::new();
        for slot in slots {
            let f = &functions[&slot];
            let function = lock(&f.device)
                .save_function()
                .map_err(|e| Error::Device(format!("{}: {e}", f.name)))?;
            saved.push(PciFunctionState {
                slot,
                name: f.name.clone(),
                function,
            });
        }
        Ok(PciSegmentState {
            config_io: lock(&self.config_io).save(),
            root: lock(&self.root).save(),
            functions: saved,
        })
    }

    /// Restores a state saved by [`PciSegment::save`] into a segment built from the same
    /// configuration: the same functions at the same device numbers. A BAR the guest had moved
    /// is mapped (with its queue notifications) where the guest left it.
    pub fn restore(&self, state: &PciSegmentState) -> Result<(), Error> {
        let mut functions = lock(&self.functions);
        let mut here: Vec<(u8, &str)> = functions
            .iter()
            .map(|(s, f)| (*s, f.name.as_str()))
            .collect();
        here.sort_unstable();
        let saved: Vec<(u8, &str)> = state
            .functions
            .iter()
            .map(|f| (f.slot, f.name.as_str()))
            .collect();
        if here != saved {
            return Err(Error::Device(format!(
                "PCI: the saved machine has devices {saved:?}, this one {here:?}"
            )));
        }
        lock(&self.config_io)
            .restore(&state.config_io)
            .map_err(|e| Error::Device(e.to_string()))?;
        lock(&self.root)
            .restore(&state.root)
            .map_err(|e| Error::Device(e.to_string()))?;
        for saved in &state.functions {
            let Some(f) = functions.get_mut(&saved.slot) else {
                continue;
            };
            let bars = {
                let mut device = lock(&f.device);
                device
                    .restore_function(&saved.function)
                    .map_err(|e| Error::Device(format!("{}: {e}", f.name)))?;
                device.bars()
            };
            for bar in bars {
                let old = f.mapped.get(&bar.index).copied().flatten();
                if old != Some(bar.addr) {
                    let mv = BarReprogram {
                        bar: bar.index,
                        old: old.unwrap_or(bar.addr),
                        new: bar.addr,
                        size: bar.size,
                        kind: bar.kind,
                    };
                    move_bar(&self.vm, &self.mmio, f, mv);
                }
            }
        }
        Ok(())
    }
}

/// Follows a guest BAR move: the bus mapping and, for BAR 0, the queue ioeventfds.
fn move_bar(vm: &VmFd, mmio: &Bus, f: &mut VirtioFunction, mv: BarReprogram) {
    let Some(current) = f.mapped.get_mut(&mv.bar) else {
        return;
    };
    if *current == Some(mv.new) {
        return;
    }
    let region = match current.take() {
        Some(old) => match mmio.remove(old) {
            Ok((region, _)) => Some(region),
            Err(e) => {
                devices::warn_limited!("BAR {} move: {e}", mv.bar);
                None
            }
        },
        None => None,
    };
    let region = region.unwrap_or_else(|| {
        Arc::new(Mutex::new(PciBarRegion::new(
            f.device.clone() as Arc<Mutex<dyn PciDevice>>,
            mv.bar,
        )))
    });
    // Sizing writes and half-written 64-bit addresses pass through odd places; a BAR that
    // would overlap another device stays unmapped until the guest settles on an address.
    match mmio.insert(region, mv.new, mv.size) {
        Ok(()) => *current = Some(mv.new),
        Err(e) => tracing::debug!("BAR {} left unmapped at {:#x}: {e}", mv.bar, mv.new),
    }
    if mv.bar != 0 {
        return;
    }
    for (offset, fd) in &f.notifiers {
        let _ = vm.unregister_ioevent(fd, &IoEventAddress::Mmio(mv.old + offset), NoDatamatch);
        if current.is_some() {
            if let Err(e) =
                vm.register_ioevent(fd, &IoEventAddress::Mmio(mv.new + offset), NoDatamatch)
            {
                devices::warn_limited!("queue notification at {:#x}: {e}", mv.new + offset);
            }
        }
    }
}
