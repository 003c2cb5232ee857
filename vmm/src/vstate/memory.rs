//! Guest RAM: one memfd holds all of it, mapped shared so that snapshots and live migration can
//! hand the same pages to another process.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use devices::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress};

use crate::config::MemoryConfig;
use crate::layout::{FOUR_GIB, MMIO_HOLE_START};

/// Failures to provide guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {requested_mib} MiB is more than this host can give ({available_mib} MiB {source_name})")]
    TooLarge {
        requested_mib: u64,
        available_mib: u64,
        source_name: &'static str,
    },
    #[error("cannot create the guest memory file: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest memory regions: {0}")]
    Regions(String),
    /// A guest memory file handed over by another VMM does not fit.
    #[error("the guest memory file handed over {0}")]
    Handed(String),
    /// The host cannot give the huge pages asked for.
    #[error("guest memory on huge pages: {0}")]
    HugePages(String),
}

/// The guest-physical RAM ranges for `size` bytes of RAM: below the 32-bit MMIO hole, then the
/// rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(FOUR_GIB), size - low));
    }
    ranges
}

/// The end of RAM below 4 GiB.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// The value of `key` (e.g. `MemTotal:`) in /proc/meminfo, in bytes.
fn meminfo_bytes(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// Refuses a guest larger than the host (or this process's cgroup) could ever back.
pub fn check_host_capacity(size: u64) -> Result<(), MemoryError> {
    let mem_total = meminfo_bytes("MemTotal:");
    let cgroup_max = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    for (limit, source_name) in [(mem_total, "of RAM"), (cgroup_max, "cgroup memory.max")] {
        if let Some(limit) = limit {
            if size > limit {
                return Err(MemoryError::TooLarge {
                    requested_mib: size >> 20,
                    available_mib: limit >> 20,
                    source_name,
                });
            }
        }
    }
    Ok(())
}

/// A new memfd; on hugetlbfs when `huge_page` (bytes) is given.
pub(crate) fn memfd(name: &std::ffi::CStr, huge_page: Option<u64>) -> Result<File, MemoryError> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if let Some(page) = huge_page {
        flags |= libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid; the returned
    // descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Asks for transparent huge pages behind `mapping`. Every 2 MiB page the host backs guest RAM
/// with is one nested page-table entry instead of 512, so the guest takes ~100x fewer EPT/NPT
/// faults while it boots. The kernel grants them for a memfd only when
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`, `within_size`, `always` or
/// `force`; otherwise this is a no-op and [`shmem_huge_pages`] says so.
fn advise_huge_pages(mapping: &MmapRegion<AtomicBitmap>) {
    // SAFETY: the range is exactly one mapping this process owns; MADV_HUGEPAGE changes only
    // how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            "transparent huge pages unavailable for guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Keeps guest RAM out of any core dump of the VMM: a crash must not write a tenant's
/// memory to the node's disk.
fn exclude_from_core_dumps(mapping: &MmapRegion<AtomicBitmap>) -> Result<(), MemoryError> {
    // SAFETY: the range is exactly one mapping this process owns; MADV_DONTDUMP changes only
    // whether a core dump includes it.
    let rc = unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_DONTDUMP) };
    if rc != 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether the host lets a memfd mapping that asks for them use transparent huge pages.
pub fn shmem_huge_pages() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .map(|s| shmem_setting_allows_huge(&s))
        .unwrap_or(false)
}

fn shmem_setting_allows_huge(setting: &str) -> bool {
    ["[always]", "[within_size]", "[advise]", "[force]"]
        .iter()
        .any(|s| setting.contains(s))
}

/// `lseek(file, offset, whence)` for `SEEK_DATA` / `SEEK_HOLE`: the offset found.
pub(crate) fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor `file` owns only moves its offset, which nothing here
    // uses (guest RAM is mapped; snapshots read with pread).
    let at = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), offset, whence) };
    if at < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// The parts of `region` that hold data, as (offset in the region, length): the pages the
/// guest never wrote are holes in the memfd, zeros nobody needs to read (or to fault in).
/// Without a file behind the region, or where the file cannot tell, the whole region.
pub fn data_ranges(region: &GuestRegionMmap) -> Vec<(u64, u64)> {
    use vm_memory::GuestMemoryRegion;
    match region.file_offset() {
        Some(f) => file_data_ranges(f.file(), f.start(), region.len()),
        None => vec![(0, region.len())],
    }
}

/// The parts of `file`'s `[base, base + len)` that hold data, as (offset from `base`, length),
/// in order; holes read as zeros. Where the file cannot tell, all of it.
pub(crate) fn file_data_ranges(file: &File, base: u64, len: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let data = match seek(file, base + at, libc::SEEK_DATA) {
            Ok(data) => data,
            // Nothing but a hole from here on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(_) => return vec![(0, len)],
        };
        if data >= base + len {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)
            .unwrap_or(base + len)
            .min(base + len);
        ranges.push((data - base, hole - data));
        at = hole - base;
    }
    ranges
}

/// Seals that keep a guest memory file at its size: a mapping of it never reaches past its end
/// (which would be SIGBUS for whoever touches it), whoever else holds it.
const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

fn seals(file: &File) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS reads the seals of a descriptor this `File` owns; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(seals)
}

/// The huge page size `config` asks for (its own, or the host's default), None for ordinary
/// memory; checks that the RAM is a whole number of them and that the host has that many
/// free.
fn huge_page_size(config: &MemoryConfig) -> Result<Option<u64>, MemoryError> {
    if !config.hugepages {
        return Ok(None);
    }
    let page = match config.hugepage_size {
        Some(page) => page,
        None => meminfo_bytes("Hugepagesize:").ok_or_else(|| {
            MemoryError::HugePages(
                "the host has no huge pages (no Hugepagesize in /proc/meminfo)".into(),
            )
        })?,
    };
    let mib = page >> 20;
    if page == 0 || !config.size.is_multiple_of(page) {
        return Err(MemoryError::HugePages(format!(
            "{} MiB is not a whole number of {mib} MiB pages",
            config.size >> 20
        )));
    }
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page >> 10);
    let read = |name: &str| {
        std::fs::read_to_string(format!("{dir}/{name}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(free), Some(reserved)) = (read("free_hugepages"), read("resv_hugepages")) else {
        return Err(MemoryError::HugePages(format!(
            "the host has no {mib} MiB huge pages ({dir} is missing)"
        )));
    };
    let needed = config.size / page;
    let available = free.saturating_sub(reserved);
    if needed > available {
        return Err(MemoryError::HugePages(format!(
            "{needed} pages of {mib} MiB are needed and the host has {available} free \
             (reserve more in {dir}/nr_hugepages)"
        )));
    }
    Ok(Some(page))
}

/// Creates the zeroed, memfd-backed guest RAM `config` asks for (ordinary memory, or the
/// host's huge pages), laid out by [`ram_ranges`]. The memfd is sealed at its size, so that it
/// can be handed to another VMM ([`memfd_of`]).
pub fn create_guest_memory(config: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let size = config.size;
    check_host_capacity(size)?;
    let huge_page = huge_page_size(config)?;
    let file = memfd(c"podvisor-guest-ram", huge_page)?;
    if huge_page.is_none() && !shmem_huge_pages() {
        tracing::info!(
            "guest RAM on 4 KiB pages: the host's \
             /sys/kernel/mm/transparent_hugepage/shmem_enabled does not allow huge pages \
             for memfds ('advise' does; see README, Host setup)"
        );
    }
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    // SAFETY: F_ADD_SEALS on a descriptor this `File` owns, with valid seal flags.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    map_guest_memory(&file, size)
}

/// Maps guest RAM that another VMM on this host handed over (a live migration's `local`
/// mode): the same pages, shared. The file must be a guest memory file of exactly `size`
/// bytes, sealed at that size.
pub fn guest_memory_from_memfd(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = file.metadata().map_err(MemoryError::Memfd)?.len();
    if len != size {
        return Err(MemoryError::Handed(format!(
            "holds {len} bytes; the VM has {size}"
        )));
    }
    let sealed = seals(file).map_err(|e| MemoryError::Handed(format!("has no seals ({e})")))?;
    if sealed & SIZE_SEALS != SIZE_SEALS {
        return Err(MemoryError::Handed(
            "is not sealed at its size (it could shrink under the guest)".into(),
        ));
    }
    map_guest_memory(file, size)
}

/// The memfd behind `memory` (every region maps a part of it).
pub fn memfd_of(memory: &GuestMemoryMmap) -> Option<&File> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .next()
        .and_then(|r| r.file_offset())
        .map(|f| f.file())
}

/// Whether `file` lives on hugetlbfs (its pages are the host's reserved huge pages).
pub fn is_hugetlb(file: &File) -> bool {
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, which outlives the call, about a descriptor `file` owns.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as libc::c_long == HUGETLBFS_MAGIC
}

/// Maps `file` (`size` bytes) as guest RAM laid out by [`ram_ranges`].
fn map_guest_memory(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // Huge pages are reserved when mapped (so a host that runs short refuses here instead of
    // killing the guest at its first touch); ordinary memory is allocated as the guest writes.
    let hugetlb = is_hugetlb(file);
    let flags = if hugetlb {
        libc::MAP_SHARED
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    let mut regions = Vec::new();
    let mut offset = 0;
    for (addr, len) in ram_ranges(size) {
        let file_offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        let mapping = MmapRegion::<AtomicBitmap>::build(
            Some(file_offset),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|source| MemoryError::Mmap { size: len, source })?;
        if !hugetlb {
            advise_huge_pages(&mapping);
        }
        exclude_from_core_dumps(&mapping)?;
        regions.push(
            GuestRegionMmap::new(mapping, addr).ok_or_else(|| {
                MemoryError::Regions(format!("region at {:#x} overflows", addr.0))
            })?,
        );
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_low_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(FOUR_GIB), (4 << 30) - MMIO_HOLE_START)
            ]
        );
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn huge_pages_come_from_the_hosts_reserve_or_are_refused_clearly() {
        let config = |size: u64, page: Option<u64>| MemoryConfig {
            size,
            hugepages: true,
            hugepage_size: page,
        };
        let err = create_guest_memory(&config(1536 << 20, Some(1 << 30))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest memory on huge pages: 1536 MiB is not a whole number of 1024 MiB pages"
        );
        // As many 2 MiB pages as this host has free decides which answer is right.
        let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
        let read = |name: &str| -> u64 {
            std::fs::read_to_string(format!("{dir}/{name}"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0)
        };
        let available = read("free_hugepages") - read("resv_hugepages");
        match create_guest_memory(&config(64 << 20, Some(2 << 20))) {
            Ok(mem) => {
                assert!(
                    available >= 32,
                    "{available} free pages, yet 32 were mapped"
                );
                assert!(is_hugetlb(memfd_of(&mem).unwrap()));
                mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
                assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 7);
            }
            Err(e) => {
                assert!(available < 32, "{available} free pages, yet: {e}");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "guest memory on huge pages: 32 pages of 2 MiB are needed and the host \
                         has {available} free (reserve more in {dir}/nr_hugepages)"
                    )
                );
            }
        }
        assert!(!is_hugetlb(
            memfd_of(&create_guest_memory(&MemoryConfig::new(64 << 20)).unwrap()).unwrap()
        ));
    }

    #[test]
    fn memory_is_memfd_backed_and_usable() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
    }

    /// Issue 15, item 5: a core dump of the VMM never holds guest RAM.
    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        let start = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut flags = None;
        while let Some(line) = lines.next() {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((from, _)) = range.split_once('-') else {
                continue;
            };
            if usize::from_str_radix(from, 16) == Ok(start) {
                flags = lines.find_map(|l| l.strip_prefix("VmFlags:").map(str::to_owned));
                break;
            }
        }
        let flags = flags.expect("the guest RAM mapping is in /proc/self/smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "VmFlags:{flags}"
        );
    }

    #[test]
    fn only_written_pages_are_data() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(data_ranges(region).is_empty(), "fresh memory is all hole");
        mem.write_obj(1u8, GuestAddress(0x30_0000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x200_0000)).unwrap();
        let ranges = data_ranges(region);
        // Pages (or, with huge pages, 2 MiB pages) around the two writes, nothing else.
        assert_eq!(ranges.len(), 2, "{ranges:x?}");
        assert!(ranges[0].0 <= 0x30_0000 && ranges[0].0 + ranges[0].1 > 0x30_0000);
        assert!(ranges[1].0 <= 0x200_0000 && ranges[1].0 + ranges[1].1 > 0x200_0000);
        assert!(ranges.iter().map(|r| r.1).sum::<u64>() <= 4 << 20);
    }

    #[test]
    fn memory_handed_over_is_the_same_pages_and_must_fit() {
        let mem = create_guest_memory(&crate::config::MemoryConfig::new(64 << 20)).unwrap();
        let file = memfd_of(&mem).unwrap();
        let other = guest_memory_from_memfd(file, 64 << 20).unwrap();
        mem.write_obj(0x5au8, GuestAddress(0x12_3456)).unwrap();
        assert_eq!(other.read_obj::<u8>(GuestAddress(0x12_3456)).unwrap(), 0x5a);
        // Sealed at its size: it cannot shrink under the other side.
        assert!(file.set_len(32 << 20).is_err());
        let err = guest_memory_from_memfd(file, 128 << 20).unwrap_err();
        assert!(err.to_string().contains("holds 67108864 bytes"), "{err}");
        // A file that could shrink is refused.
        let loose = memfd(c"test-unsealed", None).unwrap();
        loose.set_len(64 << 20).unwrap();
        let err = guest_memory_from_memfd(&loose, 64 << 20).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
    }

    #[test]
    fn huge_pages_follow_the_selected_shmem_setting() {
        let options = ["always", "within_size", "advise", "never", "deny", "force"];
        for selected in options {
            let line = options
                .map(|o| {
                    if o == selected {
                        format!("[{o}]")
                    } else {
                        o.to_string()
                    }
                })
                .join(" ");
            let expected = !matches!(selected, "never" | "deny");
            assert_eq!(shmem_setting_allows_huge(&line), expected, "{line}");
        }
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let err = check_host_capacity(1 << 60).unwrap_err();
        assert!(
            err.to_string().contains("more than this host can give"),
            "{err}"
        );
    }
}
