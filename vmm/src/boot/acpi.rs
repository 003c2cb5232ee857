//! ACPI tables for a hardware-reduced x86_64 guest.
//!
//! The tables live in the BIOS area reserved in the e820 map, starting with the RSDP at
//! [`layout::RSDP_START`] where a bzImage kernel finds it by scanning `[0xe0000, 1 MiB)`; a PVH
//! kernel is handed its address in `hvm_start_info.rsdp_paddr`:
//!
//! ```text
//! RSDP (rev 2) ─► XSDT ─┬─► FADT (hardware-reduced) ─► DSDT (\_S5_, \_SB.COM1, \_SB.RTC_,
//!                       │                       \_SB.PCI0, \_SB.PWRB, \_SB.GED_)
//!                       ├─► MADT (local APICs, IOAPIC, LINT1 NMI)
//!                       └─► MCFG (ECAM of PCI segment 0, bus 0)
//! ```
//!
//! The guest is hardware-reduced ACPI: no PM1 blocks, no SCI, no FACS. It powers off by writing
//! `SLP_TYP = 5 | SLP_EN` to the sleep control register and resets by writing 1 to the reset
//! register, both ports of [`layout::pio::ACPI_POWER`]. The power button is a generic event
//! device: its interrupt makes the guest run `\_SB.GED_._EVT`, which reads the event register
//! at [`layout::pio::GED`] and notifies `\_SB.PWRB`.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, Checksum};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::config::CpusConfig;
use crate::layout;
use crate::vstate::topology::Topology;

/// OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"PODVSR";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity".
const HYPERVISOR_VENDOR: [u8; 8] = *b"PODVISOR";

/// Alignment of every table after the RSDP (which the spec wants on a 16-byte boundary too).
const TABLE_ALIGN: u64 = 16;
/// Length of the common system description table header.
const SDT_HEADER_LEN: usize = 36;
/// The XSDT lists the FADT, the MADT and the MCFG.
const XSDT_LEN: usize = SDT_HEADER_LEN + 3 * std::mem::size_of::<u64>();

/// Sleep control register (write `SLP_TYP << 2 | SLP_EN`).
pub const SLEEP_CONTROL_PORT: u16 = layout::pio::ACPI_POWER.0 as u16;
/// Sleep status register.
pub const SLEEP_STATUS_PORT: u16 = SLEEP_CONTROL_PORT + 1;
/// Reset register.
pub const RESET_PORT: u16 = SLEEP_CONTROL_PORT + 2;
/// Value the guest writes to [`RESET_PORT`] to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// `SLP_TYP` of S5 (soft off) in `\_S5_`; must equal `devices::legacy::power::S5_SLEEP_TYPE`,
/// which the power control device compares the written value against.
const S5_SLEEP_TYPE: u8 = 5;

/// FADT IA-PC boot architecture flag: do not probe for VGA hardware.
///
/// Left clear on purpose: bit 1 (8042 present, so Linux does not probe a keyboard controller),
/// bit 3 (MSI not supported: PCI devices use MSI-X) and bit 5 (CMOS RTC not present: there is
/// one at port 0x70).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// ID of the (only) IOAPIC: 0, the reset value of KVM's in-kernel IOAPIC ID register, so the
/// MADT and the hardware agree. IOAPIC and local APIC IDs are separate name spaces on x86_64.
const IOAPIC_ID: u8 = 0;

/// MADT Local APIC NMI structure (type 4, 6 bytes), which `acpi_tables` does not provide:
/// NMI arrives on LINT1 of every processor (UID 0xff), with the bus' default polarity and
/// trigger mode (flags 0).
const MADT_LOCAL_APIC_NMI_ALL_LINT1: [u8; 6] = [4, 6, 0xff, 0, 0, 1];

/// What the ACPI tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has ACPI processor UID `i`.
    pub vcpus: u8,
    /// How they are arranged: it gives vCPU `i` its local APIC ID.
    pub topology: Topology,
}

impl AcpiConfig {
    /// The tables of the vCPUs `cpus` describes.
    pub fn new(cpus: &CpusConfig) -> Self {
        AcpiConfig {
            vcpus: cpus.boot_vcpus,
            topology: Topology::of(cpus),
        }
    }
}

/// Failure to build or place the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The MADT must list at least one processor.
    #[error("the ACPI tables need at least one vCPU")]
    NoVcpus,
    /// The tables do not fit below [`layout::ACPI_END`].
    #[error("the ACPI tables end at {end:#x}, past the end of the ACPI area at {limit:#x}")]
    TablesTooLarge {
        /// End of the last table.
        end: u64,
        /// [`layout::ACPI_END`].
        limit: u64,
    },
    /// Guest memory does not cover the whole table area.
    #[error("the ACPI table area [{start:#x}, {end:#x}) is not in guest memory")]
    NotInGuestMemory {
        /// Start of the area (the RSDP).
        start: u64,
        /// End of the area (of the last table).
        end: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("failed to write the ACPI {table} table at guest address {addr:#x}: {source}")]
    GuestMemoryWrite {
        /// Which table: "RSDP", "XSDT", "FADT", "DSDT" or "MADT".
        table: &'static str,
        /// Guest physical address of the table.
        addr: u64,
        /// What vm-memory reported.
        source: GuestMemoryError,
    },
}

/// Writes the RSDP at [`layout::RSDP_START`], followed by the XSDT, FADT, DSDT and MADT (each
/// 16-byte aligned, all below [`layout::ACPI_END`]), into guest memory and returns the RSDP
/// address.
///
/// Nothing is written unless all tables fit and the whole area is guest memory.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if config.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }

    let dsdt = dsdt();
    let madt = madt(config.vcpus, &config.topology);
    let mcfg = mcfg();

    let rsdp_addr = layout::RSDP_START;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align_up(xsdt_addr + XSDT_LEN as u64);
    let dsdt_addr = align_up(fadt_addr + FADT::len() as u64);
    let madt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let mcfg_addr = align_up(madt_addr + madt.len() as u64);
    let end = mcfg_addr + mcfg.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::TablesTooLarge {
            end,
            limit: layout::ACPI_END,
        });
    }

    let fadt = to_bytes(&fadt(dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, *b"PODVXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), XSDT_LEN);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let area_len = usize::try_from(end - rsdp_addr).expect("the ACPI area is below 1 MiB");
    if !mem.check_range(GuestAddress(rsdp_addr), area_len, Permissions::Write) {
        return Err(AcpiError::NotInGuestMemory {
            start: rsdp_addr,
            end,
        });
    }

    let tables: [(&'static str, u64, &[u8]); 6] = [
        ("RSDP", rsdp_addr, &rsdp),
        ("XSDT", xsdt_addr, &xsdt),
        ("FADT", fadt_addr, &fadt),
        ("DSDT", dsdt_addr, &dsdt),
        ("MADT", madt_addr, &madt),
        ("MCFG", mcfg_addr, &mcfg),
    ];
    for (table, addr, bytes) in tables {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::GuestMemoryWrite {
                table,
                addr,
                source,
            })?;
    }

    Ok(GuestAddress(rsdp_addr))
}

/// Hardware-reduced FADT: power off and reset through the I/O ports of the power control
/// device, no FACS, no legacy PM blocks.
fn fadt(dsdt_addr: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"PODVFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.sleep_control_reg = io_port_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_register(SLEEP_STATUS_PORT);
    fadt.reset_reg = io_port_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize()
}

/// An 8-bit register at an I/O port.
fn io_port_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// MADT: one enabled local APIC per vCPU (its APIC ID from the topology), the IOAPIC with
/// GSIs from 0 and NMI on LINT1.
///
/// No interrupt source override: KVM's in-kernel IOAPIC routes legacy IRQ n to pin n.
fn madt(vcpus: u8, topology: &Topology) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"PODVAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..vcpus {
        // Config validation keeps APIC IDs below 0xff.
        let apic_id = topology.apic_id(id) as u8;
        madt.add_structure(ProcessorLocalApic::new(id, apic_id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, layout::IOAPIC_START as u32, 0));

    let mut madt = to_bytes(&madt);
    append_structure(&mut madt, &MADT_LOCAL_APIC_NMI_ALL_LINT1);
    madt
}

/// MCFG: the ECAM window of PCI segment 0, which has bus 0 only.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"PODVMCFG", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_MMCONFIG.0, 0, 0, 0);
    to_bytes(&mcfg)
}

/// Appends a structure to a serialised table, fixing its length and checksum.
fn append_structure(table: &mut Vec<u8>, structure: &[u8]) {
    table.extend_from_slice(structure);
    let len = u32::try_from(table.len()).expect("ACPI tables are far below 4 GiB");
    table[4..8].copy_from_slice(&len.to_le_bytes());
    table[9] = 0;
    let mut checksum = Checksum::default();
    checksum.append(table);
    table[9] = checksum.value();
}

/// DSDT: the S5 sleep state, the legacy devices Linux cannot discover otherwise, and the PCI
/// host bridge with its windows.
fn dsdt() -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );
    let com1 = legacy_device("COM1", "PNP0501", layout::pio::COM1, layout::irq::COM1);
    let rtc = legacy_device("RTC_", "PNP0B00", layout::pio::CMOS, layout::irq::RTC);
    let sb = aml::Scope::raw(
        "\\_SB_".into(),
        [
            com1,
            rtc,
            pci_host_bridge(),
            power_button(),
            generic_event_device(),
        ]
        .concat(),
    );

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN as u32,
        6,
        OEM_ID,
        *b"PODVDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&to_bytes(&s5));
    dsdt.append_slice(&sb);
    dsdt.as_slice().to_vec()
}

/// An always-present ISA device, serialised: `_HID` an EISA ID, `_UID` 0, one I/O port range and
/// one edge-triggered, active-high, exclusive interrupt.
fn legacy_device(name: &str, eisa_id: &str, (port, len): (u64, u64), irq: u32) -> Vec<u8> {
    let port = u16::try_from(port).expect("legacy devices use 16-bit I/O ports");
    let len = u8::try_from(len).expect("legacy devices have short I/O ranges");
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(eisa_id));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let present = aml::Return::new(&0x0fu8);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&present]);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::IO::new(port, port, 1, len),
            &aml::Interrupt::new(true, true, false, false, irq),
        ]),
    );
    to_bytes(&aml::Device::new(name.into(), vec![&hid, &uid, &sta, &crs]))
}

/// The PCI host bridge of segment 0: bus 0, configuration ports 0xcf8-0xcff, the rest of the
/// port space and the 32-bit BAR window for its devices. Its devices use MSI-X only, so there
/// is no INTx routing table (`_PRT`).
fn pci_host_bridge() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let (window, size) = layout::PCI_BAR_WINDOW;
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::AddressSpace::new_bus_number(0u16, 0u16),
            &aml::IO::new(0xcf8, 0xcf8, 1, 8),
            &aml::AddressSpace::new_io(0u16, 0xcf7u16, None),
            &aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None),
            &aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                window as u32,
                (window + size - 1) as u32,
                None,
            ),
        ]),
    );
    to_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    ))
}

/// The power button, a control-method button (events come through the GED).
fn power_button() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    to_bytes(&aml::Device::new("PWRB".into(), vec![&hid, &uid]))
}

/// The generic event device: an edge interrupt and `_EVT`, which reads (and so clears) the
/// event register and notifies the device each set bit stands for.
fn generic_event_device() -> Vec<u8> {
    let (port, len) = layout::pio::GED;
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
            true,
            true,
            false,
            false,
            layout::irq::GED,
        )]),
    );
    let port = port as u32;
    let len = len as u32;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = aml::Local(0);
    let bit = aml::Local(1);
    let power_button_bit = u64::from(devices::legacy::ged::EVENT_POWER_BUTTON);
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&events, &gdat);
    let mask = aml::And::new(&bit, &events, &power_button_bit);
    let is_set = aml::Equal::new(&bit, &power_button_bit);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let when_set = aml::If::new(&is_set, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &mask, &when_set]);
    to_bytes(&aml::Device::new(
        "GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

#[cfg(test)]
mod tests;
