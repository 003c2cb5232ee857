//! The saved state of a whole machine but its memory ([`MachineState`]), and of the KVM VM
//! itself: the in-kernel PIC pair and IOAPIC, the PIT and the guest clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vstate::vcpu::VcpuState;
use crate::Error;

/// Everything a paused machine is, but its memory: what a snapshot or a migration carries
/// beside the guest's RAM.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub kvm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// The KVM VM's own devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// The guest clock when the VM was paused.
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| Error::Kvm("read an interrupt controller", e))?;
    Ok(chip)
}

/// Reads the KVM VM's state; `clock` is the clock read when the VM was paused.
pub fn save_kvm(fd: &VmFd, clock: kvm_clock_data) -> Result<KvmVmState, Error> {
    Ok(KvmVmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(|e| Error::Kvm("read the PIT", e))?,
        clock,
    })
}

/// Puts the KVM VM's state back (before the vCPUs' LAPICs, which the IOAPIC routes to).
pub fn restore_kvm(fd: &VmFd, state: &KvmVmState) -> Result<(), Error> {
    let chips = [
        (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &state.ioapic),
    ];
    for (id, chip) in chips {
        if chip.chip_id != id {
            return Err(Error::Restore(format!(
                "interrupt controller {id}: the saved state is of controller {}",
                chip.chip_id
            )));
        }
        fd.set_irqchip(chip)
            .map_err(|e| Error::Kvm("restore an interrupt controller", e))?;
    }
    fd.set_pit2(&state.pit)
        .map_err(|e| Error::Kvm("restore the PIT", e))?;
    let mut clock = state.clock;
    clock.flags = 0;
    fd.set_clock(&clock)
        .map_err(|e| Error::Kvm("restore the guest clock", e))?;
    Ok(())
}
