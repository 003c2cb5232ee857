//! SMBIOS tables: who made the machine and which one it is, for the guest's
//! `/sys/class/dmi/id` (`product_uuid`, `product_serial`, ...), `dmidecode`, and the software
//! that identifies a VM by them (cloud-init, guest agents, licence checks).
//!
//! A SMBIOS 3.0 (64-bit) entry point at [`layout::SMBIOS_START`], where a kernel booted without
//! EFI finds it by scanning `[0xf0000, 1 MiB)` on a 16-byte grid, followed by the structure
//! table:
//!
//! ```text
//! type 0   BIOS information (vendor, version; "this is a virtual machine")
//! type 1   system information (manufacturer, product, serial number, UUID, family)
//! type 11  OEM strings (only when some are given)
//! type 127 end of table
//! ```
//!
//! Each structure is a formatted part followed by its strings (NUL-terminated, the set ending
//! with one more NUL); a string field holds the string's 1-based number, 0 for none.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::config::PlatformConfig;
use crate::layout;

/// What the guest reads as the machine's manufacturer, product and BIOS vendor.
const MAKER: &str = "podvisor";

/// Length of the SMBIOS 3.0 entry point structure.
const ENTRY_POINT_LEN: usize = 24;
/// The structure table follows the entry point, 16-byte aligned.
const TABLE_OFFSET: u64 = 32;

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_OEM_STRINGS: u8 = 11;
const TYPE_END: u8 = 127;

/// BIOS characteristics: bit 3, "BIOS characteristics are not supported".
const BIOS_CHARACTERISTICS_UNSUPPORTED: u64 = 1 << 3;
/// BIOS characteristics extension byte 2: bit 4, "SMBIOS table describes a virtual machine".
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System information wake-up type: power switch.
const WAKE_UP_POWER_SWITCH: u8 = 6;

/// Why the tables were not written.
#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    /// The tables do not fit their area.
    #[error("the SMBIOS tables take {len} bytes; at most {limit} fit below 1 MiB")]
    TooLarge { len: usize, limit: usize },
    /// The area is not guest memory.
    #[error("the SMBIOS area at {0:#x} is not guest memory")]
    NotInGuestMemory(u64),
    /// Writing into guest memory failed.
    #[error("failed to write the SMBIOS tables: {0}")]
    GuestMemoryWrite(#[source] GuestMemoryError),
}

/// Writes the entry point and the structure table at [`layout::SMBIOS_START`]. `platform`
/// has been validated ([`PlatformConfig::validate`]).
pub fn create_smbios_tables<M: GuestMemory>(
    mem: &M,
    platform: Option<&PlatformConfig>,
) -> Result<(), SmbiosError> {
    let default = PlatformConfig::default();
    let table = structure_table(platform.unwrap_or(&default));
    let start = layout::SMBIOS_START;
    let limit = (layout::SMBIOS_END - start - TABLE_OFFSET) as usize;
    if table.len() > limit {
        return Err(SmbiosError::TooLarge {
            len: table.len(),
            limit,
        });
    }
    let table_addr = start + TABLE_OFFSET;
    let entry = entry_point(table_addr, table.len() as u32);
    if !mem.check_range(
        GuestAddress(start),
        TABLE_OFFSET as usize + table.len(),
        Permissions::Write,
    ) {
        return Err(SmbiosError::NotInGuestMemory(start));
    }
    mem.write_slice(&entry, GuestAddress(start))
        .and_then(|()| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(SmbiosError::GuestMemoryWrite)
}

/// The SMBIOS 3.0 entry point: anchor, checksum, version 3.0, and where the table is.
fn entry_point(table_addr: u64, table_len: u32) -> [u8; ENTRY_POINT_LEN] {
    let mut e = [0u8; ENTRY_POINT_LEN];
    e[0..5].copy_from_slice(b"_SM3_");
    e[6] = ENTRY_POINT_LEN as u8;
    e[7] = 3; // major version
    e[8] = 0; // minor version
    e[9] = 0; // docrev
    e[10] = 1; // entry point revision: SMBIOS 3.0
    e[12..16].copy_from_slice(&table_len.to_le_bytes()); // structure table maximum size
    e[16..24].copy_from_slice(&table_addr.to_le_bytes());
    e[5] = checksum(&e);
    e
}

/// The byte that makes `bytes` sum to 0 (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// One structure being built: its formatted part, then its strings.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Self {
        // Type, length (set in `finish`), handle.
        let mut formatted = vec![kind, 0];
        formatted.extend_from_slice(&handle.to_le_bytes());
        Structure {
            formatted,
            strings: Vec::new(),
        }
    }

    fn byte(&mut self, b: u8) -> &mut Self {
        self.formatted.push(b);
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.formatted.extend_from_slice(b);
        self
    }

    /// A string field: the string's number in this structure's set, 0 when `s` is empty.
    fn string(&mut self, s: &str) -> &mut Self {
        if s.is_empty() {
            return self.byte(0);
        }
        self.strings.push(s.to_owned());
        let n = self.strings.len() as u8;
        self.byte(n)
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.formatted[1] = self.formatted.len() as u8;
        out.extend_from_slice(&self.formatted);
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        if self.strings.is_empty() {
            out.push(0);
        }
        out.push(0);
    }
}

/// Every structure, in order, ending with type 127.
fn structure_table(platform: &PlatformConfig) -> Vec<u8> {
    let mut out = Vec::new();

    Structure::new(TYPE_BIOS, 0)
        .string(MAKER) // vendor
        .string(env!("CARGO_PKG_VERSION")) // BIOS version
        .bytes(&0xe800u16.to_le_bytes()) // starting address segment
        .string("") // release date
        .byte(0) // ROM size
        .bytes(&BIOS_CHARACTERISTICS_UNSUPPORTED.to_le_bytes())
        .byte(0) // extension byte 1
        .byte(BIOS_EXT2_VIRTUAL_MACHINE)
        .bytes(&[0, 0]) // system BIOS major, minor release
        .bytes(&[0xff, 0xff]) // no embedded controller firmware
        .finish(&mut out);

    let uuid = platform
        .uuid
        .as_deref()
        .and_then(parse_uuid)
        .unwrap_or([0; 16]);
    Structure::new(TYPE_SYSTEM, 0x100)
        .string(MAKER) // manufacturer
        .string(MAKER) // product name
        .string("") // version
        .string(platform.serial_number.as_deref().unwrap_or(""))
        .bytes(&smbios_uuid_bytes(&uuid))
        .byte(WAKE_UP_POWER_SWITCH)
        .string("") // SKU number
        .string(MAKER) // family
        .finish(&mut out);

    let oem = platform.oem_strings.as_deref().unwrap_or(&[]);
    if !oem.is_empty() {
        let mut s = Structure::new(TYPE_OEM_STRINGS, 0xb00);
        s.byte(oem.len() as u8);
        for o in oem {
            s.strings.push(o.clone());
        }
        s.finish(&mut out);
    }

    Structure::new(TYPE_END, 0x7f00).finish(&mut out);
    out
}

/// Parses a UUID written as 8-4-4-4-12 hex digits into its 16 bytes, in the order written;
/// `None` when it is not one.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// SMBIOS 2.6 and later store the UUID's first three fields little-endian (as EFI GUIDs), so
/// that the guest reads back the UUID as it was written.
fn smbios_uuid_bytes(uuid: &[u8; 16]) -> [u8; 16] {
    let mut b = *uuid;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    fn memory() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Finds the entry point as Linux does (a 16-byte grid over [0xf0000, 1 MiB)) and returns
    /// the structures: (type, formatted part, strings).
    fn read_back(mem: &Mem) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut area = vec![0u8; 0x10000];
        mem.read_slice(&mut area, GuestAddress(0xf0000)).unwrap();
        let at = (0..area.len())
            .step_by(16)
            .find(|&i| area[i..].starts_with(b"_SM3_"))
            .expect("an entry point on the 16-byte grid");
        let entry = &area[at..at + ENTRY_POINT_LEN];
        assert_eq!(entry[6] as usize, ENTRY_POINT_LEN);
        assert_eq!(checksum(entry), 0, "the entry point sums to 0");
        assert_eq!((entry[7], entry[8]), (3, 0));
        let len = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as usize;
        let addr = u64::from_le_bytes(entry[16..24].try_into().unwrap());
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();

        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let kind = table[pos];
            let flen = table[pos + 1] as usize;
            let formatted = table[pos..pos + flen].to_vec();
            let mut p = pos + flen;
            let mut strings = Vec::new();
            if table[p] == 0 {
                p += 2;
            } else {
                while table[p] != 0 {
                    let end = p + table[p..].iter().position(|&c| c == 0).unwrap();
                    strings.push(String::from_utf8(table[p..end].to_vec()).unwrap());
                    p = end + 1;
                }
                p += 1;
            }
            out.push((kind, formatted, strings));
            pos = p;
            if kind == TYPE_END {
                assert_eq!(pos, len, "the table ends with type 127");
                return out;
            }
        }
    }

    fn string(s: &(u8, Vec<u8>, Vec<String>), field: usize) -> &str {
        match s.1[field] {
            0 => "",
            n => &s.2[n as usize - 1],
        }
    }

    #[test]
    fn system_information_carries_serial_and_uuid() {
        let mem = memory();
        let platform = PlatformConfig {
            serial_number: Some("SN-0042".into()),
            uuid: Some("5ad7a5c6-6a0c-4e1b-9c67-0123456789ab".into()),
            oem_strings: Some(vec!["io.kubevirt:vm".into(), "x=y".into()]),
        };
        create_smbios_tables(&mem, Some(&platform)).unwrap();
        let s = read_back(&mem);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, [TYPE_BIOS, TYPE_SYSTEM, TYPE_OEM_STRINGS, TYPE_END]);

        let bios = &s[0];
        assert_eq!(bios.1.len(), 0x18);
        assert_eq!(string(bios, 4), MAKER);
        assert_eq!(
            bios.1[19] & BIOS_EXT2_VIRTUAL_MACHINE,
            BIOS_EXT2_VIRTUAL_MACHINE
        );

        let system = &s[1];
        assert_eq!(system.1.len(), 0x1b);
        assert_eq!(string(system, 4), MAKER);
        assert_eq!(string(system, 7), "SN-0042");
        // As Linux prints product_uuid for SMBIOS >= 2.6 (%pUl: first fields little-endian).
        let u = &system.1[8..24];
        let printed = format!(
            "{:08x}-{:04x}-{:04x}-{}-{}",
            u32::from_le_bytes(u[0..4].try_into().unwrap()),
            u16::from_le_bytes(u[4..6].try_into().unwrap()),
            u16::from_le_bytes(u[6..8].try_into().unwrap()),
            hex(&u[8..10]),
            hex(&u[10..16])
        );
        assert_eq!(printed, "5ad7a5c6-6a0c-4e1b-9c67-0123456789ab");

        let oem = &s[2];
        assert_eq!(oem.1[4], 2);
        assert_eq!(oem.2, ["io.kubevirt:vm", "x=y"]);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn without_platform_the_machine_is_still_described() {
        let mem = memory();
        create_smbios_tables(&mem, None).unwrap();
        let s = read_back(&mem);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, [TYPE_BIOS, TYPE_SYSTEM, TYPE_END]);
        assert_eq!(string(&s[1], 7), "", "no serial number");
        assert_eq!(&s[1].1[8..24], &[0; 16], "no UUID");
    }

    #[test]
    fn too_many_oem_strings_do_not_fit() {
        let mem = memory();
        let platform = PlatformConfig {
            oem_strings: Some(vec!["x".repeat(300); 255]),
            ..Default::default()
        };
        let err = create_smbios_tables(&mem, Some(&platform)).unwrap_err();
        assert!(matches!(err, SmbiosError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn outside_guest_memory_is_an_error() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x80000)]).unwrap();
        let err = create_smbios_tables(&mem, None).unwrap_err();
        assert!(matches!(err, SmbiosError::NotInGuestMemory(_)), "{err}");
    }

    #[test]
    fn uuids_parse_in_canonical_form_only() {
        assert_eq!(
            parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap(),
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        for bad in [
            "",
            "00112233445566778899aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeefg",
            "0011223-34455-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeeff0",
            "+0112233-4455-6677-8899-aabbccddeeff",
        ] {
            assert!(parse_uuid(bad).is_none(), "{bad}");
        }
    }
}
