//! Partition tables of a boot disk: GPT (with its protective MBR) and MBR primary partitions.
//! The image is hostile: every size and offset is checked against the disk before it is used,
//! and a table that does not add up is an error naming what is wrong, never a guess.

use super::{DiskBootError, Reader};

/// Bytes per sector: virtio-blk's, and what every cloud image is laid out with.
pub const SECTOR: u64 = 512;
/// At most this many bytes of GPT partition entries are read (128 entries of 128 bytes is
/// what every tool writes; the format allows more).
const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;

/// One partition, in the order of its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers it (`/dev/vdaN`).
    pub number: u32,
    /// Byte offset and length on the disk.
    pub start: u64,
    pub len: u64,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A GPT partition: its type and unique GUIDs (text, upper case, as `blkid` shows them).
    Gpt {
        type_guid: String,
        unique_guid: String,
    },
    /// An MBR partition's type byte, and the disk's signature (for `PARTUUID=SSSSSSSS-NN`).
    Mbr { kind: u8, disk_signature: u32 },
}

impl Partition {
    /// What the kernel accepts as `root=PARTUUID=...` for this partition.
    pub fn partuuid(&self) -> String {
        match &self.kind {
            Kind::Gpt { unique_guid, .. } => unique_guid.to_lowercase(),
            Kind::Mbr { disk_signature, .. } => format!("{disk_signature:08x}-{:02x}", self.number),
        }
    }

    /// A partition that holds no file system to look into (BIOS boot, swap, extended).
    pub fn skipped(&self) -> bool {
        match &self.kind {
            Kind::Gpt { type_guid, .. } => [BIOS_BOOT, LINUX_SWAP].contains(&type_guid.as_str()),
            Kind::Mbr { kind, .. } => [0x05, 0x0f, 0x85, 0x82].contains(kind),
        }
    }
}

const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const LINUX_SWAP: &str = "0657FD6D-A4AB-4C49-8A1B-8A4E1F1E7C9E";

/// The partitions of the disk `reader` reads (of `size` bytes).
pub fn read(reader: &mut Reader, size: u64) -> Result<Vec<Partition>, DiskBootError> {
    let bad = |why: String| DiskBootError::PartitionTable(why);
    if size < 2 * SECTOR {
        return Err(bad(format!("the disk is {size} bytes: too small for one")));
    }
    let mut mbr = [0u8; SECTOR as usize];
    reader.read_at(&mut mbr, 0)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(DiskBootError::NoPartitionTable);
    }
    let entries: Vec<MbrEntry> = (0..4)
        .map(|i| MbrEntry::parse(&mbr[446 + 16 * i..462 + 16 * i]))
        .collect();
    if entries.iter().any(|e| e.kind == 0xee) {
        return read_gpt(reader, size);
    }
    let signature = u32::from_le_bytes(mbr[440..444].try_into().expect("4 bytes"));
    let mut partitions = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let start = u64::from(e.first) * SECTOR;
        let len = u64::from(e.sectors) * SECTOR;
        if e.first == 0 || start + len > size {
            return Err(bad(format!(
                "MBR partition {} (sectors {}+{}) is not within the disk ({size} bytes)",
                i + 1,
                e.first,
                e.sectors
            )));
        }
        partitions.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            kind: Kind::Mbr {
                kind: e.kind,
                disk_signature: signature,
            },
        });
    }
    if partitions.is_empty() {
        return Err(bad("the MBR lists no partition".into()));
    }
    Ok(partitions)
}

struct MbrEntry {
    kind: u8,
    first: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(b: &[u8]) -> MbrEntry {
        MbrEntry {
            kind: b[4],
            first: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            sectors: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }
}

fn read_gpt(reader: &mut Reader, size: u64) -> Result<Vec<Partition>, DiskBootError> {
    let bad = |why: String| DiskBootError::PartitionTable(format!("GPT: {why}"));
    let mut header = [0u8; SECTOR as usize];
    reader.read_at(&mut header, SECTOR)?;
    if &header[0..8] != b"EFI PART" {
        return Err(bad("a protective MBR, but no GPT header in sector 1".into()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let header_len = u32_at(12) as usize;
    if !(92..=SECTOR as usize).contains(&header_len) {
        return Err(bad(format!("header size {header_len}")));
    }
    let mut copy = header[..header_len].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != u32_at(16) {
        return Err(bad("the header's CRC-32 does not match (corrupt)".into()));
    }
    let entries_lba = u64_at(72);
    let count = u64::from(u32_at(80));
    let entry_len = u64::from(u32_at(84));
    if entry_len < 128 || entry_len % 8 != 0 {
        return Err(bad(format!("partition entry size {entry_len}")));
    }
    let bytes = count
        .checked_mul(entry_len)
        .filter(|&b| b <= MAX_GPT_ENTRY_BYTES)
        .ok_or_else(|| bad(format!("{count} partition entries of {entry_len} bytes")))?;
    let at = entries_lba
        .checked_mul(SECTOR)
        .filter(|&at| entries_lba >= 2 && at.checked_add(bytes).is_some_and(|end| end <= size))
        .ok_or_else(|| bad(format!("partition entries at sector {entries_lba}")))?;
    let mut table = vec![0u8; bytes as usize];
    reader.read_at(&mut table, at)?;
    if crc32fast::hash(&table) != u32_at(88) {
        return Err(bad(
            "the partition entries' CRC-32 does not match (corrupt)".into(),
        ));
    }
    let mut partitions = Vec::new();
    for (i, e) in table.chunks_exact(entry_len as usize).enumerate() {
        let type_guid = guid(&e[0..16]);
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let last = u64::from_le_bytes(e[40..48].try_into().expect("8 bytes"));
        let within = first >= 2
            && first <= last
            && last
                .checked_add(1)
                .and_then(|end| end.checked_mul(SECTOR))
                .is_some_and(|end| end <= size);
        if !within {
            return Err(bad(format!(
                "partition {} (sectors {first}-{last}) is not within the disk ({size} bytes)",
                i + 1
            )));
        }
        partitions.push(Partition {
            number: i as u32 + 1,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            kind: Kind::Gpt {
                type_guid,
                unique_guid: guid(&e[16..32]),
            },
        });
    }
    if partitions.is_empty() {
        return Err(bad("no partition".into()));
    }
    Ok(partitions)
}

/// A GUID as text: its first three fields are little-endian on disk.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        u16::from_le_bytes(b[4..6].try_into().expect("2 bytes")),
        u16::from_le_bytes(b[6..8].try_into().expect("2 bytes")),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_read_as_blkid_shows_them() {
        // The Linux file system type GUID as stored on disk.
        let raw = [
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ];
        assert_eq!(guid(&raw), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    }
}
