//! Message-signalled interrupts through KVM: a GSI routing table shared by the VM and one
//! [`MsiIrqs`] per PCI device whose vectors are irqfds bound to MSI routes.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table keeps KVM's default routes
//! for the legacy GSIs (PIC and IOAPIC pins) beside the MSI routes and is re-sent whole on
//! every change. Changes come from the guest programming MSI-X tables (rare, not on the
//! interrupt path); delivery is an eventfd write that KVM turns into the routed message.
//! A guest write that changes no route sends nothing: masking and unmasking a vector, or
//! rewriting a masked vector's message, costs no ioctl (a guest could otherwise make the VMM
//! send the whole table, thousands of entries, per cheap MMIO write).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::pci::{MsiIrqs, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::IOAPIC_PINS;
use crate::Error;

/// The first GSI handed out for MSIs: the ones below are the IOAPIC's pins.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's limit on routes (KVM_MAX_IRQ_ROUTES), less the legacy ones.
const MAX_GSI: u32 = 4096;

/// The VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
    /// Tables sent to KVM so far.
    sent: AtomicU64,
}

struct RouterState {
    /// MSI routes by GSI; a GSI allocated but not (or no longer) routed is absent.
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// KVM's default routes: GSIs 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC only.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            routes.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        routes.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

impl GsiRouter {
    /// The routing table of `vm`, which has its in-kernel irqchip already.
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
            sent: AtomicU64::new(0),
        }
    }

    /// How many routing tables were sent to KVM.
    pub fn tables_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `count` consecutive GSIs for MSIs; returns the first.
    fn allocate(&self, count: u32) -> Result<u32, Error> {
        let mut state = self.lock();
        let first = state.next_gsi;
        match first.checked_add(count) {
            Some(end) if end <= MAX_GSI => {
                state.next_gsi = end;
                Ok(first)
            }
            _ => Err(Error::Interrupts(format!(
                "out of interrupt routes ({count} more MSI vectors requested)"
            ))),
        }
    }

    /// Routes `gsi` to `msg` (or removes its route) and sends the table to KVM if that
    /// changed it.
    fn set(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        let mut state = self.lock();
        let changed = match msg {
            Some(m) => state.msi.insert(gsi, m) != Some(m),
            None => state.msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let mut entries = legacy_routes();
        entries.extend(state.msi.iter().map(|(&g, &m)| msi_route(g, m)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| {
            Error::Interrupts(format!("routing table of {} entries: {e:?}", entries.len()))
        })?;
        // Sent while holding the lock, so tables reach KVM in the order they were built.
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| Error::Kvm("set GSI routing", e))
    }
}

/// The MSI-X vectors of one PCI function: vector `i` is GSI `first_gsi + i`, fired by
/// writing irqfd `i`.
pub struct KvmMsiIrqs {
    router: Arc<GsiRouter>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
}

impl KvmMsiIrqs {
    /// Allocates `vectors` GSIs and binds an irqfd to each.
    pub fn new(router: Arc<GsiRouter>, vectors: u16) -> Result<Self, Error> {
        let first_gsi = router.allocate(u32::from(vectors))?;
        let mut irqfds = Vec::with_capacity(usize::from(vectors));
        for i in 0..u32::from(vectors) {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            router
                .vm
                .register_irqfd(&fd, first_gsi + i)
                .map_err(|e| Error::Kvm("register MSI irqfd", e))?;
            irqfds.push(fd);
        }
        Ok(KvmMsiIrqs {
            router,
            first_gsi,
            irqfds,
        })
    }
}

impl MsiIrqs for KvmMsiIrqs {
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) {
        if usize::from(vector) >= self.irqfds.len() {
            return;
        }
        // A masked vector keeps its route until it is unmasked: `trigger` is not called for
        // it, and the guest usually unmasks it with the same message.
        if masked {
            return;
        }
        let gsi = self.first_gsi + u32::from(vector);
        if let Err(e) = self.router.set(gsi, Some(msg)) {
            tracing::error!("MSI vector {vector} (GSI {gsi}): {e}");
        }
    }

    fn trigger(&self, vector: u16) {
        if let Some(fd) = self.irqfds.get(usize::from(vector)) {
            // Fails only when the counter is saturated, which still leaves the interrupt pending.
            let _ = fd.write(1);
        }
    }
}

impl Drop for KvmMsiIrqs {
    fn drop(&mut self) {
        for (i, fd) in self.irqfds.iter().enumerate() {
            let gsi = self.first_gsi + i as u32;
            let _ = self.router.vm.unregister_irqfd(fd, gsi);
            let _ = self.router.set(gsi, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let routes = legacy_routes();
        // 16 PIC routes + 24 IOAPIC routes.
        assert_eq!(routes.len(), 40);
        let chips_of = |gsi: u32| {
            routes
                .iter()
                .filter(|r| r.gsi == gsi)
                // SAFETY: every legacy route is an irqchip route.
                .map(|r| unsafe { (r.u.irqchip.irqchip, r.u.irqchip.pin) })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            chips_of(4),
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        assert_eq!(
            chips_of(9),
            vec![(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]
        );
        assert_eq!(chips_of(20), vec![(KVM_IRQCHIP_IOAPIC, 20)]);
    }

    /// Issue 15, item 8: only a changed route costs a routing table.
    #[test]
    fn only_a_changed_route_is_sent_to_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = Arc::new(GsiRouter::new(vm));
        let irqs = KvmMsiIrqs::new(router.clone(), 4).unwrap();
        let msg = |data| MsiMessage {
            address: 0xfee0_0000,
            data,
        };
        irqs.update(0, msg(0x41), false);
        assert_eq!(router.tables_sent(), 1);
        // A guest toggling the mask, or rewriting the same message, sends nothing.
        for _ in 0..1000 {
            irqs.update(0, msg(0x41), true);
            irqs.update(0, msg(0x41), false);
        }
        assert_eq!(router.tables_sent(), 1);
        // A message changed while masked is sent once, when the vector is unmasked.
        for data in 0..1000 {
            irqs.update(0, msg(data), true);
        }
        assert_eq!(router.tables_sent(), 1);
        irqs.update(0, msg(0x42), false);
        assert_eq!(router.tables_sent(), 2);
        drop(irqs);
        assert_eq!(router.tables_sent(), 3, "the route removed at the end");
    }

    #[test]
    fn msi_route_splits_the_address() {
        let e = msi_route(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI route.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
