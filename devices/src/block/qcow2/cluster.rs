//! Guest I/O on a qcow2 image, one cluster at a time: reads through the mapping (backing file,
//! zeros, data, compressed), writes in place or copy-on-write into new clusters, and zeroing /
//! discarding.

use super::super::{BlockError, DiskImage};
use super::tables::{Mapping, COPIED, ZERO};
use super::Qcow2Image;

impl Qcow2Image {
    /// The cluster containing `offset`, the offset in it, and how many of `remaining` bytes
    /// fall in it.
    pub(super) fn locate(&self, offset: u64, remaining: u64) -> (u64, u64, u64) {
        let cs = self.cluster_size();
        let in_off = offset & (cs - 1);
        (
            offset >> self.cluster_bits,
            in_off,
            (cs - in_off).min(remaining),
        )
    }

    /// Bytes of guest cluster `vc` inside the virtual disk (less than a cluster at the end).
    pub(super) fn visible(&self, vc: u64) -> u64 {
        let cs = self.cluster_size();
        self.header
            .size
            .saturating_sub(vc << self.cluster_bits)
            .min(cs)
    }

    /// Reads guest bytes at `offset` from the backing image, or zeros without one (and past
    /// the backing image's end).
    pub(super) fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let Some(backing) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let n = backing.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            backing.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Decompresses the cluster at (`host`, `len`) into the one-cluster cache.
    pub(super) fn load_compressed(&mut self, host: u64, len: u64) -> Result<&[u8], BlockError> {
        if self.decompressed.as_ref().map(|(h, _)| *h) != Some(host) {
            self.decompressed = None;
            let mut input = vec![0u8; len as usize];
            self.file.read_at(&mut input, host)?;
            let mut out = vec![0u8; self.cluster_size() as usize];
            self.decompressor
                .decompress(&input, &mut out)
                .map_err(|reason| BlockError::Decompress {
                    path: self.path().to_path_buf(),
                    offset: host,
                    reason,
                })?;
            self.decompressed = Some((host, out));
        }
        Ok(self
            .decompressed
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or_default())
    }

    pub(super) fn read_clusters(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let (vc, in_off, n) = self.locate(off, (buf.len() - pos) as u64);
            let mut n = n as usize;
            match self.mapping(vc)? {
                Mapping::Unallocated => self.read_backing(&mut buf[pos..pos + n], off)?,
                Mapping::Zero { .. } => buf[pos..pos + n].fill(0),
                Mapping::Data { host, .. } => {
                    // Extend over following clusters that are contiguous on the host.
                    let mut next = vc + 1;
                    while pos + n < buf.len() {
                        match self.mapping(next)? {
                            Mapping::Data { host: h, .. } if h == host + (next - vc) * cs => {
                                n += (cs as usize).min(buf.len() - pos - n);
                                next += 1;
                            }
                            _ => break,
                        }
                    }
                    self.file.read_at(&mut buf[pos..pos + n], host + in_off)?;
                }
                Mapping::Compressed { host, len } => {
                    let data = self.load_compressed(host, len)?;
                    buf[pos..pos + n].copy_from_slice(&data[in_off as usize..in_off as usize + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    pub(super) fn write_clusters(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let (vc, in_off, n) = self.locate(offset + pos as u64, (buf.len() - pos) as u64);
            self.write_cluster(vc, in_off, &buf[pos..pos + n as usize])?;
            pos += n as usize;
        }
        Ok(())
    }

    /// Writes guest data into an existing host cluster, refusing to overwrite metadata.
    fn write_in_place(&mut self, host: u64, in_off: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.refs.overlaps_metadata(host, self.cluster_size()) {
            return Err(self.corrupt(format!("data cluster at {host:#x} overlaps metadata")));
        }
        self.file.write_at(data, host + in_off)
    }

    /// Whether host cluster `host` is referenced once only (may be modified in place).
    pub(super) fn exclusive(&mut self, host: u64, copied: bool) -> Result<bool, BlockError> {
        Ok(copied || self.refs.get(&mut self.file, host >> self.cluster_bits)? == 1)
    }

    /// Drops a reference to `mapping`'s host clusters once the change is durable.
    pub(super) fn release(&mut self, mapping: Mapping) {
        if let Some(range) = mapping.host_range(self.cluster_size()) {
            self.pending_free_bytes += range.1;
            self.pending_free.push(range);
            if matches!(mapping, Mapping::Compressed { .. }) {
                self.decompressed = None;
            }
        }
    }

    /// Writes `data` at `in_off` of guest cluster `vc`.
    fn write_cluster(&mut self, vc: u64, in_off: u64, data: &[u8]) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let (l1_idx, l2_idx) = self.split(vc);

        // Fast path: an allocated cluster that is ours alone.
        if self.l1_entry(l1_idx)? & COPIED != 0 {
            if let Mapping::Data { host, copied: true } = self.mapping(vc)? {
                return self.write_in_place(host, in_off, data);
            }
        }

        let l2_off = self.writable_l2(l1_idx)?;
        let old = self.mapping(vc)?;
        match old {
            Mapping::Data { host, copied } if self.exclusive(host, copied)? => {
                self.write_in_place(host, in_off, data)?;
                if !copied {
                    self.set_l2_entry(l2_off, l2_idx, host | COPIED)?;
                }
                return Ok(());
            }
            Mapping::Zero {
                host: Some(host),
                copied,
            } if self.exclusive(host, copied)? => {
                // A preallocated zero cluster: fill it, then it holds data.
                let mut cluster = vec![0u8; cs as usize];
                cluster[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
                self.write_in_place(host, 0, &cluster)?;
                return self.set_l2_entry(l2_off, l2_idx, host | COPIED);
            }
            _ => {}
        }

        // Copy on write into a new cluster: the old contents, then the new data.
        let mut cluster = vec![0u8; cs as usize];
        let full = in_off == 0 && data.len() as u64 >= self.visible(vc);
        if !full {
            match old {
                Mapping::Unallocated => self.read_backing(&mut cluster, vc << self.cluster_bits)?,
                Mapping::Zero { .. } => {}
                Mapping::Data { host, .. } => {
                    self.file.read_at(&mut cluster, host)?;
                }
                Mapping::Compressed { host, len } => {
                    cluster.copy_from_slice(self.load_compressed(host, len)?);
                }
            }
        }
        cluster[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
        let new = self.refs.alloc(&mut self.file)?;
        self.file.write_at(&cluster, new)?;
        self.set_l2_entry(l2_off, l2_idx, new | COPIED)?;
        self.release(old);
        Ok(())
    }

    /// Whether guest cluster `vc` already reads as zeros without any help.
    fn reads_as_zero(&mut self, vc: u64) -> Result<bool, BlockError> {
        Ok(match self.mapping(vc)? {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    /// Zeroes (or, for `discard`, deallocates) `[offset, offset + len)`. Whole clusters change
    /// their L2 entries; partial ones are written with zeros, except by discard, which leaves
    /// them (discard is advisory).
    pub(super) fn zero_clusters(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        discard: bool,
    ) -> Result<(), BlockError> {
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let (vc, in_off, n) = self.locate(off, end - off);
            if in_off == 0 && n >= self.visible(vc) {
                self.zero_cluster(vc, may_unmap, discard)?;
            } else if !discard && !self.reads_as_zero(vc)? {
                self.write_cluster(vc, in_off, &vec![0u8; n as usize])?;
            }
            off += n;
        }
        Ok(())
    }

    /// Makes a whole guest cluster read as zeros.
    fn zero_cluster(&mut self, vc: u64, may_unmap: bool, discard: bool) -> Result<(), BlockError> {
        let has_backing = self.backing.is_some();
        let m = self.mapping(vc)?;
        if self.header.version < 3 {
            // No zero flag: only "unallocated without a backing file" reads as zeros.
            if has_backing && discard {
                return Ok(());
            }
            let in_place = matches!(m, Mapping::Data { .. }) && !may_unmap && !discard;
            if has_backing || in_place {
                let zeros = vec![0u8; self.visible(vc) as usize];
                return self.write_cluster(vc, 0, &zeros);
            }
            if m == Mapping::Unallocated {
                return Ok(());
            }
        } else {
            match m {
                Mapping::Unallocated if !has_backing => return Ok(()),
                Mapping::Zero { host: None, .. } => return Ok(()),
                Mapping::Zero { host: Some(_), .. } if !may_unmap => return Ok(()),
                _ => {}
            }
        }
        let (l1_idx, l2_idx) = self.split(vc);
        let l2_off = self.writable_l2(l1_idx)?;
        let m = self.mapping(vc)?;
        if self.header.version >= 3 && !may_unmap {
            if let Mapping::Data { host, copied } = m {
                if self.exclusive(host, copied)? {
                    return self.set_l2_entry(l2_off, l2_idx, host | COPIED | ZERO);
                }
            }
        }
        let entry = if has_backing { ZERO } else { 0 };
        self.set_l2_entry(l2_off, l2_idx, entry)?;
        self.release(m);
        Ok(())
    }
}
