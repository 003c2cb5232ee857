//! The qcow2 header: parsing and validation of every field a hostile image could abuse, and the
//! header extensions (backing format, feature-name table; unknown ones are skipped).
//!
//! Every size that later becomes an allocation (the L1 table, the refcount table, the backing
//! file name) is checked against the file's length and QEMU's own limits before use, so a
//! header can never make us allocate more memory than the file itself holds.

use std::path::Path;

use super::super::file::HostFile;
use super::super::BlockError;

/// The four bytes every qcow2 (and qcow v1) image starts with.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Size of the version 2 header; version 3 headers are at least [`V3_HEADER_LEN`].
pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_HEADER_LEN: u32 = 104;

/// Byte offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub(crate) const REFCOUNT_TABLE_FIELD: u64 = 48;
/// Byte offset of `autoclear_features`.
pub(crate) const AUTOCLEAR_FIELD: u64 = 88;

pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU refuses L1 tables larger than this (32 MiB).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses refcount tables larger than this (8 MiB).
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), the default.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// A parsed, validated qcow2 header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file: Option<Vec<u8>>,
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    /// (type, bit, name) from the feature-name table extension.
    pub feature_names: Vec<(u8, u8, String)>,
    pub data_file: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Number of L2 entries needed to map `size` bytes, or `None` on overflow.
pub(crate) fn l1_entries_needed(size: u64, cluster_bits: u32) -> Option<u64> {
    let cluster_size = 1u64 << cluster_bits;
    let clusters = size.checked_add(cluster_size - 1)? >> cluster_bits;
    let l2_entries_bits = cluster_bits - 3;
    Some(clusters.checked_add((1u64 << l2_entries_bits) - 1)? >> l2_entries_bits)
}

impl Header {
    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The name the feature table gives to incompatible bit `bit`, if any.
    fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Reads and validates the header of the image in `file`.
    pub(crate) fn read(file: &HostFile) -> Result<Self, BlockError> {
        let path = file.path();
        let file_len = file.len()?;
        let mut fixed = [0u8; V3_HEADER_LEN as usize + 8];
        let got = file.read_at(&mut fixed, 0)?;
        if got < V2_HEADER_LEN as usize {
            return Err(invalid(path, format!("file is only {file_len} bytes long")));
        }
        Self::parse(path, &fixed, file_len, |len| {
            let mut cluster0 = vec![0u8; len];
            file.read_at(&mut cluster0, 0)?;
            Ok(cluster0)
        })
    }

    /// Parses the header from its fixed part; `read_cluster0(n)` returns the first `n` bytes of
    /// the file (zero-padded) once the cluster size is known.
    fn parse(
        path: &Path,
        fixed: &[u8],
        file_len: u64,
        read_cluster0: impl FnOnce(usize) -> Result<Vec<u8>, BlockError>,
    ) -> Result<Self, BlockError> {
        if fixed[0..4] != MAGIC {
            return Err(invalid(path, "no qcow2 magic".into()));
        }
        let version = be32(fixed, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::Unsupported {
                path: path.to_path_buf(),
                feature: format!("qcow2 version {version} (only 2 and 3 exist)"),
            });
        }
        let cluster_bits = be32(fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!("cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(fixed, 24),
            crypt_method: be32(fixed, 32),
            l1_size: be32(fixed, 36),
            l1_table_offset: be64(fixed, 40),
            refcount_table_offset: be64(fixed, 48),
            refcount_table_clusters: be32(fixed, 56),
            nb_snapshots: be32(fixed, 60),
            snapshots_offset: be64(fixed, 64),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            feature_names: Vec::new(),
            data_file: None,
        };
        let mut header_length = V2_HEADER_LEN;
        if version == 3 {
            h.incompatible = be64(fixed, 72);
            h.autoclear = be64(fixed, 88);
            h.refcount_order = be32(fixed, 96);
            header_length = be32(fixed, 100);
            if header_length < V3_HEADER_LEN {
                return Err(invalid(
                    path,
                    format!("header_length {header_length} is below 104"),
                ));
            }
            if u64::from(header_length) > cluster_size {
                return Err(invalid(
                    path,
                    format!(
                        "header_length {header_length} exceeds the cluster size {cluster_size}"
                    ),
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                path,
                format!("refcount_order {} exceeds 6", h.refcount_order),
            ));
        }

        let cluster0 = read_cluster0(cluster_size.min(file_len.max(fixed.len() as u64)) as usize)?;
        let cluster0_len = cluster0.len() as u64;

        if version == 3 && header_length > V3_HEADER_LEN {
            let kind = cluster0.get(V3_HEADER_LEN as usize).copied().unwrap_or(0);
            h.compression = match kind {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(BlockError::Unsupported {
                        path: path.to_path_buf(),
                        feature: format!("compression type {other}"),
                    })
                }
            };
        }
        let compression_bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
        if compression_bit != (h.compression != Compression::Zlib) {
            return Err(invalid(
                path,
                "compression type and its incompatible feature bit disagree".into(),
            ));
        }

        // Backing file name: within the first cluster, at most 1023 bytes (QEMU's limits).
        let backing_offset = be64(fixed, 8);
        let backing_len = be32(fixed, 16);
        let mut ext_end = cluster0_len;
        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(invalid(
                    path,
                    format!("backing file name is {backing_len} bytes long"),
                ));
            }
            let end = backing_offset.checked_add(u64::from(backing_len));
            match end {
                Some(end) if end <= cluster0_len && backing_offset >= u64::from(header_length) => {
                    let name = cluster0[backing_offset as usize..end as usize].to_vec();
                    if !name.is_empty() {
                        h.backing_file = Some(name);
                    }
                    ext_end = backing_offset;
                }
                _ => {
                    return Err(invalid(
                        path,
                        format!(
                        "backing file name at {backing_offset:#x} lies outside the header cluster"
                    ),
                    ))
                }
            }
        }

        h.parse_extensions(path, &cluster0[..ext_end as usize], header_length as usize)?;
        h.check_features(path)?;
        h.check_tables(path, file_len)?;
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        path: &Path,
        area: &[u8],
        start: usize,
    ) -> Result<(), BlockError> {
        let mut off = start;
        while off + 8 <= area.len() {
            let kind = be32(area, off);
            let len = be32(area, off + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_start = off + 8;
            let Some(data) = data_start
                .checked_add(len)
                .and_then(|end| area.get(data_start..end))
            else {
                return Err(invalid(
                    path,
                    format!("header extension {kind:#x} of {len} bytes overruns the header area"),
                ));
            };
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        let name = String::from_utf8_lossy(&name[..name_len]).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                // Bitmaps, encryption and any future extension: not needed to read or write the
                // guest data (the bitmaps autoclear bit is cleared on a writable open).
                _ => {}
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn check_features(&self, path: &Path) -> Result<(), BlockError> {
        let unsupported = |feature: String| BlockError::Unsupported {
            path: path.to_path_buf(),
            feature,
        };
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros() as u8;
            let name = self.feature_name(0, bit).unwrap_or("unnamed");
            return Err(unsupported(format!(
                "unknown incompatible feature bit {bit} ('{name}')"
            )));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            let name = self.data_file.as_deref().unwrap_or("?");
            return Err(unsupported(format!("external data file '{name}'")));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)".into()));
        }
        if self.crypt_method != 0 {
            return Err(unsupported(format!(
                "encryption (method {})",
                self.crypt_method
            )));
        }
        Ok(())
    }

    fn check_tables(&self, path: &Path, file_len: u64) -> Result<(), BlockError> {
        let cluster_size = self.cluster_size();
        let l1_needed = l1_entries_needed(self.size, self.cluster_bits)
            .filter(|&n| n * 8 <= MAX_L1_BYTES)
            .ok_or_else(|| invalid(path, format!("virtual size {} is too large", self.size)))?;
        if self.size > i64::MAX as u64 {
            return Err(invalid(
                path,
                format!("virtual size {} is too large", self.size),
            ));
        }
        if u64::from(self.l1_size) < l1_needed {
            return Err(invalid(
                path,
                format!(
                    "l1_size {} cannot map the virtual size {}",
                    self.l1_size, self.size
                ),
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("l1_size {} is too large", self.l1_size),
            ));
        }
        if self.l1_size > 0 {
            check_table(
                path,
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }
        if self.refcount_table_clusters == 0 {
            return Err(invalid(path, "refcount_table_clusters is 0".into()));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                path,
                format!(
                    "refcount table of {} clusters is too large",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_table(
            path,
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            cluster_size,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                format!("{} snapshots is too many", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            check_table(
                path,
                "snapshot table",
                self.snapshots_offset,
                1,
                cluster_size,
                file_len,
            )?;
        }
        Ok(())
    }
}

/// A table at `offset` of `len` bytes must be cluster-aligned, past the header and inside the
/// file.
fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), BlockError> {
    if offset == 0 || offset & (cluster_size - 1) != 0 {
        return Err(invalid(
            path,
            format!("{what} offset {offset:#x} is not a cluster boundary past the header"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(
            path,
            format!("{what} at {offset:#x} ({len} bytes) extends beyond the end of the file ({file_len} bytes)"),
        )),
    }
}

fn invalid(path: &Path, reason: String) -> BlockError {
    BlockError::InvalidHeader {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header, 64K clusters, 1 MiB virtual size, tables at clusters 1 (refcount table)
    /// and 3 (L1), file of 4 clusters.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut h = vec![0u8; 65536 * 4];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 * 65536).to_be_bytes());
        h[48..56].copy_from_slice(&65536u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn parse(buf: &[u8]) -> Result<Header, BlockError> {
        let fixed = &buf[..112];
        Header::parse(Path::new("t.qcow2"), fixed, buf.len() as u64, |n| {
            Ok(buf[..n.min(buf.len())].to_vec())
        })
    }

    fn reason(buf: &[u8]) -> String {
        parse(buf).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let h = parse(&v3_header()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.compression, Compression::Zlib);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn rejects_hostile_fields() {
        let mut b = v3_header();
        b[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(reason(&b).contains("cluster_bits 40"), "{}", reason(&b));

        let mut b = v3_header();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(reason(&b).contains("l1_size"), "{}", reason(&b));

        let mut b = v3_header();
        b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(
            reason(&b).contains("beyond the end of the file"),
            "{}",
            reason(&b)
        );

        let mut b = v3_header();
        b[48..56].copy_from_slice(&65537u64.to_be_bytes());
        assert!(
            reason(&b).contains("not a cluster boundary"),
            "{}",
            reason(&b)
        );

        let mut b = v3_header();
        b[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(reason(&b).contains("too large"), "{}", reason(&b));

        let mut b = v3_header();
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(reason(&b).contains("refcount_order"), "{}", reason(&b));

        let mut b = v3_header();
        b[100..104].copy_from_slice(&8u32.to_be_bytes());
        assert!(reason(&b).contains("header_length"), "{}", reason(&b));

        let mut b = v3_header();
        b[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(reason(&b).contains("refcount table"), "{}", reason(&b));

        let mut b = v3_header();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(reason(&b).contains("version 4"), "{}", reason(&b));
    }

    #[test]
    fn rejects_incompatible_features_by_name() {
        let mut b = v3_header();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        // A feature-name table naming bit 9.
        b[112..116].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[116..120].copy_from_slice(&48u32.to_be_bytes());
        b[120] = 0;
        b[121] = 9;
        b[122..130].copy_from_slice(b"teleport");
        assert!(reason(&b).contains("bit 9 ('teleport')"), "{}", reason(&b));

        let mut b = v3_header();
        b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert!(reason(&b).contains("external data file"));
        let mut b = v3_header();
        b[72..80].copy_from_slice(&INCOMPAT_EXTL2.to_be_bytes());
        assert!(reason(&b).contains("extended L2"));
        let mut b = v3_header();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(reason(&b).contains("encryption"));
        let mut b = v3_header();
        b[104] = 1;
        assert!(reason(&b).contains("disagree"));
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        assert_eq!(parse(&b).unwrap().compression, Compression::Zstd);
        b[104] = 2;
        assert!(reason(&b).contains("compression type 2"));
    }

    #[test]
    fn reads_backing_name_and_format_extension() {
        let mut b = v3_header();
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        // An unknown extension is skipped.
        b[128..132].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[132..136].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&512u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[512..520].copy_from_slice(b"base.img");
        let h = parse(&b).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.img"[..]));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));

        b[132..136].copy_from_slice(&5000u32.to_be_bytes());
        assert!(reason(&b).contains("overruns"));
        b[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert!(reason(&b).contains("2000 bytes"));
    }
}
