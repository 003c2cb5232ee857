//! The register state a vCPU starts a kernel with: segments and descriptor tables, boot page
//! tables, control registers, MSRs, FPU and local APIC.

use devices::GuestMemoryMmap;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A GDT entry from flags, base and limit (the layout of the x86 segment descriptor).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` a GDT entry at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Boot GDTs: null, code, data, TSS.
const GDT_64: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const GDT_32: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the vCPU boot {what} to guest memory: {source}")]
pub struct SetupError {
    what: &'static str,
    #[source]
    source: vm_memory::GuestMemoryError,
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    val: T,
    addr: u64,
) -> Result<(), SetupError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| SetupError { what, source })
}

/// Writes the GDT, IDT and (for 64-bit entry) identity page tables covering the first 1 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), SetupError> {
    let gdt = match entry {
        EntryPoint::Linux64 { .. } => GDT_64,
        EntryPoint::Pvh { .. } => GDT_32,
    };
    for (i, e) in gdt.iter().enumerate() {
        write(mem, "GDT", *e, BOOT_GDT_START + (i as u64) * 8)?;
    }
    write(mem, "IDT", 0u64, BOOT_IDT_START)?;
    if let EntryPoint::Linux64 { .. } = entry {
        write(mem, "page tables", PDPTE_START | 0x03, PML4_START)?;
        write(mem, "page tables", PDE_START | 0x03, PDPTE_START)?;
        for i in 0..512u64 {
            // 2 MiB pages: present, writable, huge.
            write(mem, "page tables", (i << 21) | 0x83, PDE_START + i * 8)?;
        }
    }
    Ok(())
}

/// Segment and control registers for `entry`, starting from the vCPU's current `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: EntryPoint) -> kvm_sregs {
    let gdt = match entry {
        EntryPoint::Linux64 { .. } => GDT_64,
        EntryPoint::Pvh { .. } => GDT_32,
    };
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for `entry`.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// The FPU as a reset CPU has it.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs with boot values, restricted to the ones KVM supports (`supported`).
pub fn boot_msrs(supported: &[u32]) -> Msrs {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        // MTRRs enabled, default type write-back.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).expect("boot MSR list is far below the FAM limit")
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, as a BIOS leaves them.
pub fn set_lapic_lints(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let code = segment_from_gdt(GDT_64[1], 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.present),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(GDT_32[2], 2);
        assert_eq!(
            (data.selector, data.type_, data.db, data.s, data.g),
            (16, 3, 1, 1, 1)
        );
        let tss = segment_from_gdt(GDT_32[3], 3);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.limit),
            (24, 0xb, 0, 0x67)
        );
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_entry() {
        let entry = EntryPoint::Linux64 {
            entry: GuestAddress(0x100200),
        };
        let s = boot_sregs(kvm_sregs::default(), entry);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        let r = boot_regs(entry);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, ZERO_PAGE_START, 2));
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode() {
        let entry = EntryPoint::Pvh {
            entry: GuestAddress(0x1000000),
        };
        let s = boot_sregs(kvm_sregs::default(), entry);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!(boot_regs(entry).rbx, PVH_INFO_START);
    }

    #[test]
    fn identity_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(
            &mem,
            EntryPoint::Linux64 {
                entry: GuestAddress(0),
            },
        )
        .unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, GDT_64[1]);
    }

    #[test]
    fn msrs_filtered_to_supported() {
        let msrs = boot_msrs(&[MSR_STAR, MSR_MTRR_DEF_TYPE, 0x1234]);
        let idx: Vec<u32> = msrs.as_slice().iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![MSR_STAR, MSR_MTRR_DEF_TYPE]);
    }

    #[test]
    fn lapic_lints() {
        let mut l = kvm_lapic_state::default();
        set_lapic_lints(&mut l);
        assert_eq!((l.regs[APIC_LVT0 + 1] as u8) & 7, 7);
        assert_eq!((l.regs[APIC_LVT1 + 1] as u8) & 7, 4);
    }
}
