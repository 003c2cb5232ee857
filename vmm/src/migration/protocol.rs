//! The migration stream: framed messages, each with its kind, length and CRC-32, so that a
//! truncated or corrupt stream is refused at the frame where it went wrong.
//!
//! ```text
//! frame   := magic "PVMG" | kind u32 | length u32 | crc32 u32 | payload[length]   (little-endian)
//! sender  → HELLO {format, version, local} → CONFIG VmConfig [→ MEMFD] → MEMORY...
//!           → STATE MachineState → COMPLETE
//! receiver  answers HELLO, CONFIG, STATE and COMPLETE with ACK, or anything with ERROR(reason)
//! MEMORY  := (gpa u64 | length u32 | kind u32 [| data[length] when kind is DATA])...
//! MEMFD   := one byte "M" carrying the guest memory's memfd (SCM_RIGHTS; `local` only)
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
pub const VERSION: u32 = 2;
/// The largest frame either side accepts (a memory frame is at most [`MEMORY_FRAME`] of
/// data plus its entries).
const MAX_FRAME: u32 = 64 << 20;
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

/// Reads one frame into `payload`'s allocation (a memory frame's, kept from frame to frame:
/// a fresh 4 MiB buffer for each costs page faults on both sides).
pub fn read_frame_into(
    input: &mut impl Read,
    mut payload: Vec<u8>,
) -> Result<Frame, MigrationError> {
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
    if crc32fast::hash(&payload) != word(12) {
        return Err(MigrationError::Protocol(format!(
            "a {kind:?} frame with a bad checksum (corrupt stream)"
        )));
    }
    Ok(Frame { kind, payload })
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

/// Builds memory frames: ranges are added until the frame holds [`MEMORY_FRAME`] bytes.
#[derive(Default)]
pub struct MemoryFrame {
    buf: Vec<u8>,
    data: usize,
}

impl MemoryFrame {
    pub fn add_data(&mut self, gpa: u64, data: &[u8]) {
        self.entry(gpa, data.len() as u32, RANGE_DATA);
        self.buf.extend_from_slice(data);
        self.data += data.len();
    }

    pub fn add_zeros(&mut self, gpa: u64, len: u32) {
        self.entry(gpa, len, RANGE_ZEROS);
    }

    fn entry(&mut self, gpa: u64, len: u32, kind: u32) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&kind.to_le_bytes());
    }

    pub fn is_full(&self) -> bool {
        self.data >= MEMORY_FRAME
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The frame's payload.
    pub fn payload(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the builder for the next frame (keeping its allocation).
    pub fn clear(&mut self) {
        self.data = 0;
        self.buf.clear();
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
        let mut f = MemoryFrame::default();
        f.add_data(0x1000, &[7u8; 4096]);
        f.add_zeros(0x5000, 8192);
        let payload = f.payload().to_vec();
        f.clear();
        assert!(f.is_empty());
        let ranges = parse_memory(&payload).unwrap();
        assert_eq!(
            ranges,
            vec![
                Range::Data {
                    gpa: 0x1000,
                    data: &[7u8; 4096]
                },
                Range::Zeros {
                    gpa: 0x5000,
                    len: 8192
                }
            ]
        );
        // A length past the payload's end is refused, not read beyond.
        assert!(parse_memory(&payload[..payload.len() - 40]).is_err());
    }
}
