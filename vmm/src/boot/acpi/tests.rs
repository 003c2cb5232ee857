//! Builds the tables into guest memory and parses them back.

use super::*;
use crate::config::CpuTopology;
use devices::GuestMemoryMmap;

const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const FADT_SLEEP_STATUS_REG: usize = 256;

fn memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc.wrapping_add(*b))
}

/// Reads the whole table at `addr`, checking its signature and checksum.
fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = read(mem, addr, SDT_HEADER_LEN);
    assert_eq!(&header[0..4], signature, "table at {addr:#x}");
    let bytes = read(mem, addr, u32_at(&header, 4) as usize);
    assert_eq!(
        sum(&bytes),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert_eq!(&bytes[10..16], &OEM_ID);
    bytes
}

struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    dsdt: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Vec<u8>,
    addrs: [u64; 6],
}

/// Builds the tables for `vcpus` in 2 MiB of guest memory and parses them back.
fn build(vcpus: u8) -> Tables {
    let mem = memory(2 << 20);
    let rsdp_addr = create_acpi_tables(&mem, &AcpiConfig::new(&CpusConfig::new(vcpus))).unwrap();
    assert_eq!(rsdp_addr, GuestAddress(layout::RSDP_START));

    let rsdp = read(&mem, rsdp_addr.0, 36);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = table(&mem, xsdt_addr, b"XSDT");
    assert_eq!(xsdt.len(), SDT_HEADER_LEN + 24, "three XSDT entries");
    let fadt_addr = u64_at(&xsdt, 36);
    let madt_addr = u64_at(&xsdt, 44);
    let mcfg_addr = u64_at(&xsdt, 52);
    let mcfg = table(&mem, mcfg_addr, b"MCFG");
    let fadt = table(&mem, fadt_addr, b"FACP");
    let dsdt_addr = u64_at(&fadt, FADT_X_DSDT);
    let dsdt = table(&mem, dsdt_addr, b"DSDT");
    let madt = table(&mem, madt_addr, b"APIC");
    Tables {
        rsdp,
        xsdt,
        fadt,
        dsdt,
        madt,
        mcfg,
        addrs: [
            rsdp_addr.0,
            xsdt_addr,
            fadt_addr,
            dsdt_addr,
            madt_addr,
            mcfg_addr,
        ],
    }
}

/// MADT interrupt controller structures as (type, body).
fn madt_structures(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut structures = Vec::new();
    let mut offset = 44;
    while offset < madt.len() {
        let len = madt[offset + 1] as usize;
        assert!(
            len >= 2 && offset + len <= madt.len(),
            "MADT structure at {offset}"
        );
        structures.push((madt[offset], &madt[offset..offset + len]));
        offset += len;
    }
    structures
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn rsdp_is_revision_2_with_valid_checksums() {
    for vcpus in [1, 4] {
        let t = build(vcpus);
        assert_eq!(&t.rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&t.rsdp[0..20]), 0, "checksum of the ACPI 1.0 part");
        assert_eq!(sum(&t.rsdp), 0, "extended checksum");
        assert_eq!(&t.rsdp[9..15], &OEM_ID);
        assert_eq!(t.rsdp[15], 2, "revision");
        assert_eq!(u32_at(&t.rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(&t.rsdp, 20), 36, "length");
    }
}

#[test]
fn tables_are_aligned_disjoint_and_below_acpi_end() {
    for vcpus in [1, 4, 255] {
        let t = build(vcpus);
        let lens = [
            t.rsdp.len(),
            t.xsdt.len(),
            t.fadt.len(),
            t.dsdt.len(),
            t.madt.len(),
        ];
        let mut ranges: Vec<(u64, u64)> = t
            .addrs
            .iter()
            .zip(lens)
            .map(|(a, l)| (*a, a + l as u64))
            .collect();
        ranges.sort();
        for (start, end) in &ranges {
            assert_eq!(start % 16, 0, "table at {start:#x}");
            assert!(*start >= layout::RSDP_START && *end <= layout::ACPI_END);
        }
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
    }
}

#[test]
fn fadt_is_hardware_reduced_with_power_registers() {
    let t = build(1);
    let fadt = &t.fadt;
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "revision");

    let flags = u32_at(fadt, FADT_FLAGS);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

    // GAS: SystemIO, 8 bits wide, offset 0, byte access, address.
    let io_byte_reg = |port: u64| [[1, 8, 0, 1].as_slice(), &port.to_le_bytes()].concat();
    let gas = |offset: usize| &fadt[offset..offset + 12];
    assert_eq!(gas(FADT_SLEEP_CONTROL_REG), io_byte_reg(0x600));
    assert_eq!(gas(FADT_SLEEP_STATUS_REG), io_byte_reg(0x601));
    assert_eq!(gas(FADT_RESET_REG), io_byte_reg(0x602));
    assert_eq!(fadt[FADT_RESET_VALUE], 1);

    let iapc_boot_arch = u16_at(fadt, 109);
    assert_eq!(iapc_boot_arch, 1 << 2, "only VGA not present");
    assert_eq!(u32_at(fadt, 36), 0, "no FACS");
    assert_eq!(u64_at(fadt, 132), 0, "no X_FACS");
    assert_eq!(u32_at(fadt, 40), 0, "DSDT only through X_DSDT");
    assert_eq!(&fadt[268..276], b"PODVISOR");
}

#[test]
fn madt_lists_every_vcpu_and_the_ioapic() {
    for vcpus in [1u8, 4] {
        let t = build(vcpus);
        assert_eq!(u32_at(&t.madt, 36), 0xfee0_0000, "local APIC address");
        let structures = madt_structures(&t.madt);

        let lapics: Vec<&[u8]> = structures
            .iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(lapics.len(), vcpus as usize);
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic.len(), 8);
            assert_eq!(lapic[2] as usize, i, "processor UID");
            assert_eq!(lapic[3] as usize, i, "APIC ID");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }

        let ioapics: Vec<&[u8]> = structures
            .iter()
            .filter(|(kind, _)| *kind == 1)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].len(), 12);
        assert_eq!(ioapics[0][2], IOAPIC_ID);
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let nmis: Vec<&[u8]> = structures
            .iter()
            .filter(|(kind, _)| *kind == 4)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(nmis, [[4, 6, 0xff, 0, 0, 1].as_slice()], "NMI on LINT1");
        assert_eq!(structures.len(), vcpus as usize + 2);
    }
}

#[test]
fn madt_numbers_apics_by_the_topology() {
    let mem = memory(2 << 20);
    // 2 threads × 3 cores: the core number starts at bit 1 and takes two bits.
    let mut cpus = CpusConfig::new(6);
    cpus.topology = Some(CpuTopology {
        threads_per_core: 2,
        cores_per_die: 3,
        dies_per_package: 1,
        packages: 1,
    });
    create_acpi_tables(&mem, &AcpiConfig::new(&cpus)).unwrap();
    let rsdp = read(&mem, layout::RSDP_START, 36);
    let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
    let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
    let ids: Vec<(u8, u8)> = madt_structures(&madt)
        .iter()
        .filter(|(kind, _)| *kind == 0)
        .map(|(_, s)| (s[2], s[3]))
        .collect();
    assert_eq!(ids, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]);
    cpus.topology = Some(CpuTopology {
        threads_per_core: 1,
        cores_per_die: 3,
        dies_per_package: 1,
        packages: 2,
    });
    create_acpi_tables(&mem, &AcpiConfig::new(&cpus)).unwrap();
    let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
    let ids: Vec<u8> = madt_structures(&madt)
        .iter()
        .filter(|(kind, _)| *kind == 0)
        .map(|(_, s)| s[3])
        .collect();
    assert_eq!(ids, [0, 1, 2, 4, 5, 6], "package 1 starts at APIC ID 4");
}

#[test]
fn dsdt_has_s5_and_the_legacy_devices() {
    let dsdt = build(4).dsdt;
    // Name (_S5_, Package (4) { 5, 0, 0, 0 })
    assert!(contains(
        &dsdt,
        &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 4, 0x0a, 5, 0, 0, 0]
    ));
    assert!(contains(&dsdt, b"\\_SB_"));
    assert!(contains(&dsdt, b"COM1"));
    assert!(contains(&dsdt, b"RTC_"));
    // _HID EISAID ("PNP0501") and EISAID ("PNP0B00") as DWord constants.
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
    // IO (Decode16, base, base, 1, len) descriptors.
    assert!(contains(&dsdt, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
    assert!(contains(&dsdt, &[0x47, 1, 0x70, 0, 0x70, 0, 1, 2]));
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 4 } and { 8 }.
    assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
    assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 8, 0, 0, 0]));
}

#[test]
fn memory_ending_below_the_acpi_area_is_an_error() {
    let mem = memory(layout::RSDP_START);
    let err = create_acpi_tables(&mem, &AcpiConfig::new(&CpusConfig::new(1))).unwrap_err();
    assert!(
        matches!(err, AcpiError::NotInGuestMemory { start, .. } if start == layout::RSDP_START),
        "{err}"
    );
}

#[test]
fn memory_ending_inside_the_acpi_area_is_an_error_and_untouched() {
    let mem = memory(layout::RSDP_START + 0x100);
    let err = create_acpi_tables(&mem, &AcpiConfig::new(&CpusConfig::new(1))).unwrap_err();
    assert!(matches!(err, AcpiError::NotInGuestMemory { .. }), "{err}");
    assert!(read(&mem, layout::RSDP_START, 0x100)
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn zero_vcpus_is_an_error() {
    let mem = memory(2 << 20);
    let err = create_acpi_tables(&mem, &AcpiConfig::new(&CpusConfig::new(0))).unwrap_err();
    assert!(matches!(err, AcpiError::NoVcpus), "{err}");
}

#[test]
fn mcfg_describes_the_ecam_of_bus_0() {
    let t = build(1);
    // Header, 8 reserved bytes, one 16-byte allocation structure.
    assert_eq!(t.mcfg.len(), SDT_HEADER_LEN + 8 + 16);
    let entry = &t.mcfg[SDT_HEADER_LEN + 8..];
    assert_eq!(u64_at(entry, 0), layout::PCI_MMCONFIG.0);
    assert_eq!(u16_at(entry, 8), 0, "segment");
    assert_eq!((entry[10], entry[11]), (0, 0), "buses 0..=0");
}

#[test]
fn dsdt_has_the_pci_host_bridge_with_its_bar_window() {
    let t = build(1);
    assert!(contains(&t.dsdt, b"PCI0"));
    // EISA IDs PNP0A08 and PNP0A03, compressed.
    assert!(contains(&t.dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(contains(&t.dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
    // The DWord memory descriptor's minimum and maximum.
    let (start, size) = layout::PCI_BAR_WINDOW;
    let mut range = (start as u32).to_le_bytes().to_vec();
    range.extend_from_slice(&((start + size - 1) as u32).to_le_bytes());
    assert!(contains(&t.dsdt, &range));
}
