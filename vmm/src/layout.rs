//! The guest physical address map of a podvisor x86_64 VM.
//!
//! ```text
//! 0x0000_0500  boot GDT, then IDT            (boot.rs)
//! 0x0000_6000  PVH hvm_start_info, modlist   (boot.rs)
//! 0x0000_7000  bzImage zero page / PVH memmap
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA start: [EBDA, 1 MiB) is reserved in the e820 map
//! 0x000e_0000  ACPI RSDP, followed by the other ACPI tables
//! 0x000f_0000  SMBIOS entry point, followed by the structure table
//! 0x0010_0000  kernel (bzImage protected-mode part or vmlinux segments)
//! ...          RAM up to min(size, 3 GiB), initramfs at its top
//! 0xc000_0000  32-bit MMIO hole: PCI BARs up to 0xe000_0000, then the PCI ECAM window,
//!              IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`) for bzImage boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for 64-bit bzImage entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below it is usable, the rest of the first MiB is not.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI RSDP: the kernel scans [0xe0000, 0x100000) for it on bzImage boot.
pub const RSDP_START: u64 = 0xe0000;
/// Upper bound of the ACPI table area.
pub const ACPI_END: u64 = SMBIOS_START;
/// SMBIOS 3.0 entry point: a kernel booted without EFI scans [0xf0000, 0x100000) for it.
pub const SMBIOS_START: u64 = 0xf0000;
/// Upper bound of the SMBIOS area.
pub const SMBIOS_END: u64 = 0x10_0000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM below 4 GiB ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Where the VMM places PCI BARs: (start, size), the first 512 MiB of the MMIO hole.
pub const PCI_BAR_WINDOW: (u64, u64) = (MMIO_HOLE_START, 0x2000_0000);
/// PCI ECAM (MMCONFIG) window of segment 0: (start, size), bus 0 only (1 MiB).
pub const PCI_MMCONFIG: (u64, u64) = (0xe000_0000, 1 << 20);
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// Number of IOAPIC pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// Port I/O map of the legacy devices.
pub mod pio {
    /// CMOS RTC index/data ports.
    pub const CMOS: (u64, u64) = (0x70, 2);
    /// i8042 controller (data port 0x60, command/status port 0x64).
    pub const I8042: (u64, u64) = (0x60, 5);
    /// COM1 16550 UART.
    pub const COM1: (u64, u64) = (0x3f8, 8);
    /// ACPI power controls: sleep control (+0), sleep status (+1), reset (+2).
    pub const ACPI_POWER: (u64, u64) = (0x600, 3);
    /// ACPI generic event device's event register.
    pub const GED: (u64, u64) = (0x610, 1);
}

/// Legacy IRQ lines (GSIs), identical on the IOAPIC.
pub mod irq {
    pub const COM1: u32 = 4;
    /// ACPI generic event device (power button).
    pub const GED: u32 = 5;
    pub const RTC: u32 = 8;
}
