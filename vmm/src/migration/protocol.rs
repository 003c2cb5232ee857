//! The migration stream: framed messages, each with its kind, length and CRC-32, so that a
//! truncated or corrupt stream is refused at the frame where it went wrong.
//!
//! ```text
//! frame   := magic "PVMG" | kind u32 | length u32 | crc32 u32 | payload[length]   (little-endian)
//! sender  → HELLO {format, version, local} → CONFIG VmConfig [→ MEMFD | → PLAN] → MEMORY...
//!           → STATE MachineState → COMPLETE
//! receiver  answers HELLO, CONFIG, STATE and COMPLETE with ACK, or anything with ERROR(reason)
//! MEMORY  := (gpa u64 | length u32 | kind u32 [| data[length] when kind is DATA])...
//! MEMFD   := one byte "M" carrying the guest memory's memfd (SCM_RIGHTS; `local` only)
//! PLAN    := {"ranges": [[gpa, length], ...]}: what the first pass will send (not `local`)
//! ```
//! JSON payloads carry the configuration and machine state (the snapshot's formats); memory
//! travels as binary pages, all-zero pages as a range without data. With `local` (both VMMs on
//! one host, a Unix socket) the memory is not sent at all: the destination maps the source's
//! memfd, and no MEMORY frames follow.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::MigrationError;

const MAGIC: [u8; 4] = *b"PVMG";
/// The stream's name in HELLO.
pub const FORMAT: &str = "podvisor-migration";
/// The version of the stream this podvisor sends and receives.
pub const VERSION: u32 = 3;
/// The largest frame either side accepts (a memory frame is at most [`MEMORY_FRAME`] of
/// data plus its entries).
const MAX_FRAME: u32 = 64 << 20;
/// Ranges in a PLAN at most (some 40 bytes of JSON each: well within [`MAX_FRAME`]).
pub const PLAN_RANGES: usize = 1 << 20;
/// Data bytes per memory frame.
pub const MEMORY_FRAME: usize = 4 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Config = 2,
    Memory = 3,
    State = 4,
    Complete = 5,
    Ack = 6,
    Error = 7,
    Plan = 8,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Config,
            3 => Kind::Memory,
            4 => Kind::State,
            5 => Kind::Complete,
            6 => Kind::Ack,
            7 => Kind::Error,
            8 => Kind::Plan,
            _ => return None,
        })
    }
}

/// HELLO's payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub format: String,
    pub version: u32,
    /// The guest memory's memfd follows CONFIG; no memory is sent.
    #[serde(default)]
    pub local: bool,
}

/// PLAN's payload: the guest-memory ranges (guest address, length) that hold data and that the
/// first pass will send, in the order it sends them; the destination faults them in ahead of
/// the stream.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Plan {
    /// At most [`PLAN_RANGES`].
    pub ranges: Vec<(u64, u64)>,
}

/// COMPLETE's payload: whether the destination resumes the guest (it was running).
#[derive(Debug, Serialize, Deserialize)]
pub struct Complete {
    pub resume: bool,
}

/// A received frame.
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The payload as JSON of type `T`.
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, MigrationError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            MigrationError::Protocol(format!("a {:?} frame that does not parse: {e}", self.kind))
        })
    }
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| MigrationError::Protocol(format!("a {kind:?} frame is too large")))?;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.write_all(&header)
        .and_then(|()| out.write_all(payload))
        .map_err(MigrationError::Connection)
}

/// Writes a frame with a JSON payload.
pub fn write_json(
    out: &mut impl Write,
    kind: Kind,
    value: &impl Serialize,
) -> Result<(), MigrationError> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| MigrationError::Protocol(format!("cannot encode {kind:?}: {e}")))?;
    write_frame(out, kind, &payload)
}

/// Reads one frame, checking its magic, kind, length and checksum.
pub fn read_frame(input: &mut impl Read) -> Result<Frame, MigrationError> {
    read_frame_into(input, Vec::new())
}

/// A frame's header: its kind, payload length and the payload's CRC-32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub len: u32,
    pub crc32: u32,
}

/// Reads a frame's header, checking its magic, kind and length.
pub fn read_header(input: &mut impl Read) -> Result<Header, MigrationError> {
    let mut header = [0u8; 16];
    input
        .read_exact(&mut header)
        .map_err(MigrationError::Connection)?;
    if header[..4] != MAGIC {
        return Err(MigrationError::Protocol(
            "not a podvisor migration stream (bad frame magic)".into(),
        ));
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let kind = Kind::from_u32(word(4))
        .ok_or_else(|| MigrationError::Protocol(format!("unknown frame kind {}", word(4))))?;
    let len = word(8);
    if len > MAX_FRAME {
        return Err(MigrationError::Protocol(format!(
            "a {kind:?} frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    Ok(Header {
        kind,
        len,
        crc32: word(12),
    })
}

/// Reads one frame into `payload`'s allocation (a memory frame's, kept from frame to frame:
/// a fresh 4 MiB buffer for each costs page faults on both sides).
pub fn read_frame_into(input: &mut impl Read, payload: Vec<u8>) -> Result<Frame, MigrationError> {
    let header = read_header(input)?;
    read_payload(input, header, payload)
}

/// Reads the payload of the frame `header` began, checking its checksum.
pub fn read_payload(
    input: &mut impl Read,
    header: Header,
    mut payload: Vec<u8>,
) -> Result<Frame, MigrationError> {
    let Header { kind, len, crc32 } = header;
    payload.clear();
    payload.reserve(len as usize);
    let got = input
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .map_err(MigrationError::Connection)?;
    if got != len as usize {
        return Err(MigrationError::Connection(
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    if crc32fast::hash(&payload) != crc32 {
        return Err(MigrationError::Protocol(format!(
            "a {kind:?} frame with a bad checksum (corrupt stream)"
        )));
    }
    Ok(Frame { kind, payload })
}

/// One range of a memory frame as it is read: its guest address, length and whether data
/// follows (else the range is zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeHead {
    pub gpa: u64,
    pub len: u32,
    pub data: bool,
}

/// Parses a memory frame's 16-byte range header.
pub fn parse_range_head(head: &[u8; ENTRY]) -> Result<RangeHead, MigrationError> {
    let gpa = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let data = match u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) {
        RANGE_DATA => true,
        RANGE_ZEROS => false,
        other => {
            return Err(MigrationError::Protocol(format!(
                "malformed memory frame: range kind {other}"
            )))
        }
    };
    Ok(RangeHead { gpa, len, data })
}

/// Reads the peer's answer: ACK, or ERROR with its reason.
pub fn read_ack(input: &mut impl Read, after: &str) -> Result<(), MigrationError> {
    let frame = read_frame(input)?;
    match frame.kind {
        Kind::Ack => Ok(()),
        Kind::Error => Err(MigrationError::Peer(
            String::from_utf8_lossy(&frame.payload).into_owned(),
        )),
        other => Err(MigrationError::Protocol(format!(
            "expected an answer to {after}, got a {other:?} frame"
        ))),
    }
}

/// One range of a memory frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Range<'a> {
    Data { gpa: u64, data: &'a [u8] },
    Zeros { gpa: u64, len: u32 },
}

const RANGE_DATA: u32 = 0;
const RANGE_ZEROS: u32 = 1;

/// Builds memory frames. Guest memory is read straight into the frame's buffer, where its
/// runs of non-zero pages become data ranges in place and zero pages drop out (a range of
/// zeros, or nothing): a page is copied once on its way out, and not at all again unless zero
/// pages before it in the same run make it move down.
pub struct MemoryFrame {
    /// Fixed length: [`MemoryFrame::payload`] is its first `used` bytes.
    buf: Vec<u8>,
    used: usize,
}

/// Bytes of a memory range's header.
pub const ENTRY: usize = 16;
const FRAME_PAGE: usize = 4096;
/// Compared against with `==` (a `memcmp`, vectorised), not byte by byte.
static ZERO_PAGE: [u8; FRAME_PAGE] = [0; FRAME_PAGE];

impl Default for MemoryFrame {
    fn default() -> Self {
        MemoryFrame {
            buf: vec![0u8; MEMORY_FRAME + ENTRY],
            used: 0,
        }
    }
}

/// What [`MemoryFrame::add_memory`] added.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    pub data: u64,
    pub zeros: u64,
}

impl MemoryFrame {
    /// Whether a run of `len` bytes still fits: its data, and an entry for every page in
    /// the worst case (pages that alternate between data and zeros).
    pub fn has_room(&self, len: usize) -> bool {
        self.used + Self::worst_case(len) <= self.buf.len()
    }

    fn worst_case(len: usize) -> usize {
        len + ENTRY * (len.div_ceil(FRAME_PAGE) + 1)
    }

    /// Adds `len` bytes (whole pages but maybe the last) of guest memory at `gpa`, which
    /// `read` copies into the slice it is given: runs of non-zero pages as data ranges, runs of
    /// zero pages as zero ranges, or not at all with `skip_zeros`. The caller checks
    /// [`MemoryFrame::has_room`] first; a run larger than an empty frame is refused.
    pub fn add_memory<E>(
        &mut self,
        gpa: u64,
        len: usize,
        skip_zeros: bool,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Added, E> {
        assert!(
            self.has_room(len),
            "a run of {len} bytes does not fit the frame (check has_room)"
        );
        // The run lands right after the header its first range would have.
        let base = self.used + ENTRY;
        read(&mut self.buf[base..base + len])?;
        let mut added = Added::default();
        // Ranges are written from `self.used` on; a range's data is never ahead of where it
        // was read (zero pages left behind make room for more headers than they cost), so it
        // moves down or stays.
        let mut at = 0;
        while at < len {
            let zero = |i: usize| {
                let page = &self.buf[base + i..base + (i + FRAME_PAGE).min(len)];
                page == &ZERO_PAGE[..page.len()]
            };
            let is_zero = zero(at);
            let mut end = (at + FRAME_PAGE).min(len);
            while end < len && zero(end) == is_zero {
                end = (end + FRAME_PAGE).min(len);
            }
            let n = end - at;
            let range_gpa = gpa + at as u64;
            if is_zero {
                added.zeros += n as u64;
                if !skip_zeros {
                    self.entry(range_gpa, n as u32, RANGE_ZEROS);
                }
            } else {
                added.data += n as u64;
                self.entry(range_gpa, n as u32, RANGE_DATA);
                self.buf.copy_within(base + at..base + end, self.used);
                self.used += n;
            }
            at = end;
        }
        Ok(added)
    }

    fn entry(&mut self, gpa: u64, len: u32, kind: u32) {
        let e = &mut self.buf[self.used..self.used + ENTRY];
        e[..8].copy_from_slice(&gpa.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..].copy_from_slice(&kind.to_le_bytes());
        self.used += ENTRY;
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The frame's payload.
    pub fn payload(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    /// Empties the builder for the next frame (keeping its buffer).
    pub fn clear(&mut self) {
        self.used = 0;
    }
}

/// The ranges of a memory frame's payload, or why it is malformed.
pub fn parse_memory(payload: &[u8]) -> Result<Vec<Range<'_>>, MigrationError> {
    let bad = |what: &str| MigrationError::Protocol(format!("malformed memory frame: {what}"));
    let mut ranges = Vec::new();
    let mut at = 0usize;
    while at < payload.len() {
        let head = payload.get(at..at + 16).ok_or_else(|| bad("a cut entry"))?;
        let gpa = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let kind = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        at += 16;
        match kind {
            RANGE_DATA => {
                let data = payload
                    .get(at..at + len as usize)
                    .ok_or_else(|| bad("data past its end"))?;
                at += len as usize;
                ranges.push(Range::Data { gpa, data });
            }
            RANGE_ZEROS => ranges.push(Range::Zeros { gpa, len }),
            other => return Err(bad(&format!("range kind {other}"))),
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        let mut buf = Vec::new();
        write_json(&mut buf, Kind::Complete, &Complete { resume: true }).unwrap();
        let frame = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(frame.kind, Kind::Complete);
        assert!(frame.json::<Complete>().unwrap().resume);
        // Any flipped byte of the payload: a bad checksum; of the magic: not a stream.
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 1;
        let e = read_frame(&mut bad.as_slice()).err().unwrap();
        assert!(e.to_string().contains("checksum"), "{e}");
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(read_frame(&mut bad.as_slice()).is_err());
        // Truncated: a connection error (EOF), never a partial frame.
        let cut = &buf[..buf.len() - 1];
        assert!(matches!(
            read_frame(&mut &cut[..]),
            Err(MigrationError::Connection(_))
        ));
    }

    #[test]
    fn memory_frames_carry_data_and_zero_ranges() {
        const P: usize = 4096;
        // Pages: data, zero, zero, data, data, zero, and a half page of data.
        let mut memory = vec![0u8; 6 * P + P / 2];
        memory[..P].fill(7);
        memory[3 * P + 5] = 1;
        memory[4 * P..5 * P].fill(9);
        memory[6 * P + 100] = 3;
        let read = |at: usize, len: usize| {
            let src = memory[at..at + len].to_vec();
            move |buf: &mut [u8]| -> Result<(), ()> {
                buf.copy_from_slice(&src);
                Ok(())
            }
        };
        let mut f = MemoryFrame::default();
        let added = f
            .add_memory(0x1000, memory.len(), false, read(0, memory.len()))
            .unwrap();
        assert_eq!(
            added,
            Added {
                data: 3 * P as u64 + P as u64 / 2,
                zeros: 3 * P as u64
            }
        );
        let payload = f.payload().to_vec();
        let ranges = parse_memory(&payload).unwrap();
        assert_eq!(
            ranges,
            vec![
                Range::Data {
                    gpa: 0x1000,
                    data: &memory[..P]
                },
                Range::Zeros {
                    gpa: 0x2000,
                    len: 2 * P as u32
                },
                Range::Data {
                    gpa: 0x4000,
                    data: &memory[3 * P..5 * P]
                },
                Range::Zeros {
                    gpa: 0x6000,
                    len: P as u32
                },
                Range::Data {
                    gpa: 0x7000,
                    data: &memory[6 * P..]
                },
            ]
        );
        // Skipping zeros, and a second run into the same frame after the first.
        f.clear();
        assert!(f.is_empty());
        f.add_memory(0, 3 * P, true, read(0, 3 * P)).unwrap();
        f.add_memory(0x10000, 3 * P, true, read(3 * P, 3 * P))
            .unwrap();
        assert_eq!(
            parse_memory(f.payload()).unwrap(),
            vec![
                Range::Data {
                    gpa: 0,
                    data: &memory[..P]
                },
                Range::Data {
                    gpa: 0x10000,
                    data: &memory[3 * P..5 * P]
                },
            ]
        );
        // A length past the payload's end is refused, not read beyond.
        assert!(parse_memory(&payload[..payload.len() - 40]).is_err());
    }

    /// Pages that alternate between data and zeros, the worst case for the in-place layout,
    /// still come out whole; the frame takes runs until `has_room` says no.
    #[test]
    fn memory_frames_survive_alternating_pages_and_fill_up() {
        const P: usize = 4096;
        let run = 64 * P;
        let mut memory = vec![0u8; run];
        for (i, page) in memory.chunks_mut(P).enumerate() {
            if i % 2 == 1 || i % 7 == 0 {
                page.fill(i as u8 | 1);
            }
        }
        let mut f = MemoryFrame::default();
        let mut runs = 0u64;
        while f.has_room(run) {
            f.add_memory(
                runs * run as u64,
                run,
                runs.is_multiple_of(2),
                |buf: &mut [u8]| {
                    buf.copy_from_slice(&memory);
                    Ok::<(), ()>(())
                },
            )
            .unwrap();
            runs += 1;
        }
        assert!(runs >= (MEMORY_FRAME / run) as u64 - 1, "{runs} runs");
        let mut back = vec![0u8; runs as usize * run];
        for range in parse_memory(f.payload()).unwrap() {
            if let Range::Data { gpa, data } = range {
                back[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
            }
        }
        for r in 0..runs as usize {
            assert_eq!(&back[r * run..(r + 1) * run], &memory[..], "run {r}");
        }
    }
}
