//! Parsing a descriptor chain into a block request (virtio 1.x section 5.2.6).
//!
//! The chain is guest input and is trusted in nothing. It is read as the spec frames it, with
//! no assumption on how the driver split it into descriptors: the device-readable bytes are the
//! 16-byte header followed by the OUT data (or DISCARD/WRITE_ZEROES segments); the
//! device-writable bytes are the IN data (or GET_ID string) followed by the status byte, the
//! very last writable byte. What cannot be parsed completes with IOERR when a status byte
//! exists, and is returned to the driver untouched when none does (or when the chain is cut
//! short, so where the status byte lies is unknown).

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_LEN: usize = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not implement (completes with UNSUPP).
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// Whether the device writes the data buffers (rather than reads them).
    pub fn device_writes(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A guest buffer: `len` bytes at `addr` (not yet checked against guest memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestType,
    /// First sector (512 bytes) addressed, for IN and OUT.
    pub sector: u64,
    /// The data buffers between header and status, in order; device-writable for IN and
    /// GET_ID, device-readable otherwise.
    pub data: Vec<Segment>,
    /// Total length of `data` (at most 4 GiB: the queue ends longer chains).
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// There is no status byte to write (no writable byte, a readable descriptor after a
    /// writable one, or a chain cut short): the chain is returned with nothing written.
    NoStatus(&'static str),
    /// The request is malformed; it completes with IOERR written at `status`.
    Malformed {
        status: GuestAddress,
        reason: &'static str,
    },
}

/// The descriptors of a chain, split by direction.
#[derive(Default)]
struct Parts {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

/// Parses the chain starting at the head the queue handed out.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Request, ParseError> {
    let mut parts = Parts::default();
    let mut cut_short = false;
    for desc in chain {
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            parts.writable.push(segment);
        } else if !parts.writable.is_empty() {
            return Err(ParseError::NoStatus(
                "a device-readable descriptor follows a device-writable one",
            ));
        } else {
            parts.readable.push(segment);
        }
        // The queue stops early on a loop, a bad indirect table, a descriptor outside guest
        // memory or 4 GiB of buffers: the last descriptor seen then still says NEXT.
        cut_short = desc.has_next();
    }
    if cut_short {
        return Err(ParseError::NoStatus(
            "the chain loops, is longer than 4 GiB or has an invalid descriptor or indirect table",
        ));
    }
    let status = take_status(&mut parts.writable)?;
    let malformed = |reason| ParseError::Malformed { status, reason };

    let (header, data_out) = split_off(&parts.readable, HEADER_LEN as u64);
    let mut raw = [0u8; HEADER_LEN];
    if total(&header) < HEADER_LEN as u64 {
        return Err(malformed(
            "the header is shorter than 16 device-readable bytes",
        ));
    }
    let mut at = 0;
    for seg in &header {
        let end = at + seg.len as usize;
        mem.read_slice(&mut raw[at..end], seg.addr)
            .map_err(|_| malformed("the header is outside guest memory"))?;
        at = end;
    }
    let kind = RequestType::from_raw(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector);

    let data_in = parts.writable;
    let data = match kind {
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
        kind if kind.device_writes() => {
            if total(&data_out) != 0 {
                return Err(malformed("device-readable data in a request that reads"));
            }
            data_in
        }
        _ => {
            if total(&data_in) != 0 {
                return Err(malformed("device-writable data in a request that writes"));
            }
            data_out
        }
    };
    Ok(Request {
        kind,
        sector,
        data_len: total(&data),
        data,
        status,
    })
}

/// Takes the status byte, the last device-writable byte, off the end of `writable`.
fn take_status(writable: &mut Vec<Segment>) -> Result<GuestAddress, ParseError> {
    while let Some(last) = writable.last_mut() {
        if last.len == 0 {
            writable.pop();
            continue;
        }
        last.len -= 1;
        let status = last
            .addr
            .0
            .checked_add(u64::from(last.len))
            .map(GuestAddress)
            .ok_or(ParseError::NoStatus("the status byte's address overflows"))?;
        if last.len == 0 {
            writable.pop();
        }
        return Ok(status);
    }
    Err(ParseError::NoStatus(
        "no device-writable byte for the status",
    ))
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` after their first `at` bytes (fewer if they hold fewer); zero-length
/// segments are dropped.
fn split_off(segments: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::with_capacity(segments.len());
    let mut left = at;
    for seg in segments.iter().filter(|s| s.len > 0) {
        if left == 0 {
            tail.push(*seg);
            continue;
        }
        let take = u64::from(seg.len).min(left);
        left -= take;
        head.push(Segment {
            addr: seg.addr,
            len: take as u32,
        });
        if take < u64::from(seg.len) {
            // `take` bytes fit in guest addresses only if the sum does not wrap.
            if let Some(addr) = seg.addr.0.checked_add(take) {
                tail.push(Segment {
                    addr: GuestAddress(addr),
                    len: seg.len - take as u32,
                });
            }
        }
    }
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_off_cuts_inside_a_segment() {
        let (h, t) = split_off(&[seg(0x100, 10), seg(0x200, 0), seg(0x300, 20)], 16);
        assert_eq!(h, vec![seg(0x100, 10), seg(0x300, 6)]);
        assert_eq!(t, vec![seg(0x306, 14)]);
        let (h, t) = split_off(&[seg(0x100, 4)], 16);
        assert_eq!((h, t), (vec![seg(0x100, 4)], vec![]));
    }

    #[test]
    fn status_is_the_last_writable_byte() {
        let mut w = vec![seg(0x100, 512), seg(0x400, 1), seg(0x500, 0)];
        assert_eq!(take_status(&mut w), Ok(GuestAddress(0x400)));
        assert_eq!(w, vec![seg(0x100, 512)]);
        let mut w = vec![seg(0x100, 513)];
        assert_eq!(take_status(&mut w), Ok(GuestAddress(0x300)));
        assert_eq!(w, vec![seg(0x100, 512)]);
        assert!(matches!(
            take_status(&mut vec![seg(0x100, 0)]),
            Err(ParseError::NoStatus(_))
        ));
    }
}
