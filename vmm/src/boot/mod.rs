//! Loading a Linux kernel, its initramfs and command line into guest memory, and the boot
//! protocol structures that tell the kernel where everything is: the zero page for a bzImage,
//! `hvm_start_info` for a PVH ELF vmlinux. Both carry the same e820 memory map.

pub mod acpi;
pub mod disk;
pub mod payload;
pub mod smbios;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::boot::payload::PayloadFile;
use crate::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START};
use crate::vstate::memory::{low_ram_end, ram_ranges};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// How the vCPUs enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode at `entry`, RSI pointing at the zero page (bzImage).
    Linux64 { entry: GuestAddress },
    /// 32-bit protected mode at `entry`, EBX pointing at `hvm_start_info` (PVH).
    Pvh { entry: GuestAddress },
}

/// Failures to boot the payload the user gave.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel '{0}' is neither a bzImage nor an ELF vmlinux")]
    UnknownKernelFormat(PathBuf),
    #[error("kernel '{0}' is an ELF file without a PVH entry point (build it with CONFIG_PVH=y, or boot its bzImage)")]
    NoPvhEntry(PathBuf),
    #[error("cannot load kernel '{path}': {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initramfs '{path}' ({size} bytes) does not fit in guest memory; give the guest more memory")]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initramfs '{path}': {source}")]
    InitramfsRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// What the kernel loader left in memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    result_end: u64,
    initrd_addr_max: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Loads a bzImage or a PVH-capable ELF vmlinux.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    load_kernel_from(mem, open("kernel", path)?, path)
}

/// Loads the kernel in `file` (`path` names it in errors: a file, or one in a disk image).
pub fn load_kernel_from(
    mem: &GuestMemoryMmap,
    file: File,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = PayloadFile::new(file, mem);
    let mut magic = [0u8; 0x206];
    let n = read_prefix(file.file_mut(), &mut magic).map_err(|source| BootError::Open {
        what: "kernel",
        path: path.to_owned(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    if n >= 4 && magic[..4] == *b"\x7fELF" {
        let r =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(loaded(r, EntryPoint::Pvh { entry })),
            _ => Err(BootError::NoPvhEntry(path.to_owned())),
        }
    } else if n >= 0x206 && magic[0x202..0x206] == *b"HdrS" {
        let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
        let entry = r.kernel_load.unchecked_add(0x200);
        Ok(loaded(r, EntryPoint::Linux64 { entry }))
    } else {
        Err(BootError::UnknownKernelFormat(path.to_owned()))
    }
}

fn read_prefix(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(n)
}

fn loaded(r: KernelLoaderResult, entry: EntryPoint) -> LoadedKernel {
    let initrd_addr_max = r
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(u64::from(u32::MAX));
    LoadedKernel {
        entry,
        result_end: r.kernel_end,
        initrd_addr_max,
        setup_header: r.setup_header,
    }
}

/// Where an initramfs landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Highest page-aligned address for `size` bytes below both `ram_end` and `addr_max`, above the
/// kernel.
pub fn initramfs_addr(size: u64, ram_end: u64, addr_max: u64, kernel_end: u64) -> Option<u64> {
    let top = ram_end.min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Copies the initramfs to the top of low RAM.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<Initramfs, BootError> {
    load_initramfs_from(mem, open("initramfs", path)?, path, kernel, mem_size)
}

/// Copies the initramfs in `file` (`path` names it in errors) to the top of low RAM.
pub fn load_initramfs_from(
    mem: &GuestMemoryMmap,
    file: File,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<Initramfs, BootError> {
    let mut file = PayloadFile::new(file, mem);
    let size = file
        .file()
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initramfs",
            path: path.to_owned(),
            source,
        })?
        .len();
    let kernel_end = kernel.result_end.max(HIMEM_START);
    let addr = initramfs_addr(
        size,
        low_ram_end(mem_size),
        kernel.initrd_addr_max,
        kernel_end,
    )
    .ok_or_else(|| BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
    })?;
    let read_err = |source| BootError::InitramfsRead {
        path: path.to_owned(),
        source,
    };
    let mut done = 0u64;
    while done < size {
        let n = mem
            .get_slice(
                GuestAddress(addr + done),
                (size - done).min(1 << 30) as usize,
            )
            .map_err(read_err)
            .and_then(|slice| {
                let mut slice = slice;
                file.read_volatile(&mut slice).map_err(|e| {
                    read_err(vm_memory::GuestMemoryError::IOError(std::io::Error::other(
                        e,
                    )))
                })
            })?;
        if n == 0 {
            return Err(read_err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: size as usize,
                completed: done as usize,
            }));
        }
        done += n as u64;
    }
    Ok(Initramfs {
        addr: GuestAddress(addr),
        size,
    })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(|e| BootError::Load {
        path: PathBuf::from("<cmdline>"),
        source: e,
    })
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: RAM below the EBDA, the reserved BIOS area holding the ACPI tables,
/// then RAM from 1 MiB (and above 4 GiB).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.raw_value();
        let (start, len) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    // The PCI ECAM window: Linux uses MMCONFIG only where the firmware reserved it.
    map.push(E820Entry {
        addr: crate::layout::PCI_MMCONFIG.0,
        size: crate::layout::PCI_MMCONFIG.1,
        kind: E820_RESERVED,
    });
    map.sort_unstable_by_key(|e| e.addr);
    map
}

/// Writes the bzImage zero page.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// Writes `hvm_start_info`, its module list and memory map for PVH boot.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initramfs: Option<Initramfs>,
    rsdp: GuestAddress,
    mem_size: u64,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    if let Some(initramfs) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: initramfs.addr.raw_value(),
                size: initramfs.size,
                ..Default::default()
            }],
            GuestAddress(layout::PVH_MODLIST_START),
        );
    }
    params.set_sections(&map, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 << 20);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[3],
            E820Entry {
                addr: crate::layout::PCI_MMCONFIG.0,
                size: crate::layout::PCI_MMCONFIG.1,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[1].addr + m[1].size, HIMEM_START);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_large_guest_has_high_ram() {
        let m = e820_map(6 << 30);
        assert_eq!(m.len(), 5);
        assert_eq!(m[2].addr + m[2].size, layout::MMIO_HOLE_START);
        assert_eq!(
            (m[3].addr, m[3].kind),
            (layout::PCI_MMCONFIG.0, E820_RESERVED)
        );
        assert_eq!(m[4].addr, layout::FOUR_GIB);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initramfs_goes_to_top_of_ram_page_aligned() {
        assert_eq!(
            initramfs_addr(0x1800, 0x100_0000, u64::from(u32::MAX), 0x20_0000),
            Some(0xff_e000)
        );
        // Limited by the kernel's initrd_addr_max.
        assert_eq!(
            initramfs_addr(0x1000, 0x1000_0000, 0x7ff_ffff, 0x20_0000),
            Some(0x7ff_f000)
        );
        // Would overlap the kernel.
        assert_eq!(
            initramfs_addr(0x100_0000, 0x100_0000, u64::MAX, 0x20_0000),
            None
        );
        assert_eq!(initramfs_addr(u64::MAX, 0x100_0000, u64::MAX, 0), None);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_fields() {
        let m = mem();
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64 {
                entry: GuestAddress(0x100200),
            },
            result_end: 0x80_0000,
            initrd_addr_max: 0x7fff_ffff,
            setup_header: None,
        };
        let initrd = Initramfs {
            addr: GuestAddress(0x300_0000),
            size: 1234,
        };
        write_zero_page(&m, &kernel, 13, Some(initrd), 64 << 20).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn pvh_start_info_fields() {
        let m = mem();
        let initrd = Initramfs {
            addr: GuestAddress(0x300_0000),
            size: 4321,
        };
        write_pvh_start_info(&m, Some(initrd), GuestAddress(layout::RSDP_START), 64 << 20).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, layout::RSDP_START);
        assert_eq!(info.memmap_entries, 4);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 4321));
        let e: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                layout::PVH_MEMMAP_START + 2 * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!((e.addr, e.type_), (HIMEM_START, E820_RAM));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let dir = std::env::temp_dir().join(format!("podvisor-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, b"not a kernel at all").unwrap();
        let err = load_kernel(&mem(), &bad).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01garbage").unwrap();
        assert!(load_kernel(&mem(), &elf).is_err());
        let missing = dir.join("missing");
        let err = load_kernel(&mem(), &missing).unwrap_err();
        assert!(err.to_string().contains("cannot open kernel"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_line_is_nul_terminated() {
        let m = mem();
        load_command_line(&m, "console=ttyS0 quiet").unwrap();
        let mut buf = [0u8; 20];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }
}
