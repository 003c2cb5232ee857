//! Decompression of compressed clusters: raw deflate (zlib type, the default) or zstd frames.
//!
//! A compressed cluster must decompress to exactly one cluster; trailing input (the descriptor
//! rounds the size up to whole sectors) is ignored, as QEMU does. Output is bounded by the
//! caller's one-cluster buffer, and zstd frames declaring windows larger than
//! [`MAX_ZSTD_WINDOW`] are refused before the decoder allocates anything.

use std::io::Read;

use flate2::{Decompress, FlushDecompress, Status};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use super::header::Compression;

/// Largest zstd window we accept (QEMU's compressor stays far below it).
const MAX_ZSTD_WINDOW: u64 = 32 << 20;
const ZSTD_MAGIC: u32 = 0xfd2f_b528;

/// Decompresses clusters of one image.
pub(crate) struct Decompressor {
    kind: Compression,
    zstd: Option<FrameDecoder>,
}

impl Decompressor {
    pub(crate) fn new(kind: Compression) -> Self {
        Self { kind, zstd: None }
    }

    /// Fills `out` (one cluster) from the compressed bytes `input`.
    pub(crate) fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        match self.kind {
            Compression::Zlib => inflate_raw(input, out),
            Compression::Zstd => {
                let dec = self.zstd.get_or_insert_with(FrameDecoder::new);
                zstd_frames(dec, input, out)
            }
        }
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = Decompress::new(false);
    loop {
        let (in_pos, out_pos) = (d.total_in() as usize, d.total_out() as usize);
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        let done = d.total_out() as usize;
        if done == out.len() {
            return Ok(());
        }
        let progressed = d.total_in() as usize != in_pos || done != out_pos;
        if status == Status::StreamEnd || !progressed {
            return Err(format!(
                "deflate stream ends after {done} of {} bytes",
                out.len()
            ));
        }
    }
}

/// The window a zstd frame header at the start of `input` declares, checked before decoding.
fn zstd_window(input: &[u8]) -> Result<u64, String> {
    let magic = input
        .get(0..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("truncated zstd frame")?;
    if magic != ZSTD_MAGIC {
        return Err(format!("bad zstd frame magic {magic:#x}"));
    }
    let descriptor = *input.get(4).ok_or("truncated zstd frame")?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let wd = *input.get(5).ok_or("truncated zstd frame")?;
        let log = 10 + u64::from(wd >> 3);
        if log > 40 {
            return Err("zstd window too large".into());
        }
        let base = 1u64 << log;
        return Ok(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the frame content size.
    let dict_bytes = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_bytes = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let start = 5 + dict_bytes;
    let field = input
        .get(start..start + fcs_bytes)
        .ok_or("truncated zstd frame")?;
    let mut v = [0u8; 8];
    v[..fcs_bytes].copy_from_slice(field);
    let size = u64::from_le_bytes(v);
    Ok(if fcs_bytes == 2 { size + 256 } else { size })
}

fn zstd_frames(dec: &mut FrameDecoder, mut input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut filled = 0;
    while filled < out.len() {
        let window = zstd_window(input)?;
        if window > MAX_ZSTD_WINDOW {
            return Err(format!("zstd window of {window} bytes is too large"));
        }
        dec.reset(&mut input).map_err(|e| format!("zstd: {e}"))?;
        loop {
            let before = input.len();
            let want = out.len() - filled;
            dec.decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(want))
                .map_err(|e| format!("zstd: {e}"))?;
            let n = dec
                .read(&mut out[filled..])
                .map_err(|e| format!("zstd: {e}"))?;
            filled += n;
            if filled == out.len() {
                return Ok(());
            }
            if dec.is_finished() && dec.can_collect() == 0 {
                break;
            }
            if n == 0 && input.len() == before {
                return Err(format!(
                    "zstd data ends after {filled} of {} bytes",
                    out.len()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn inflates_raw_deflate_and_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xff; 100]);
        let mut out = vec![0u8; 4096];
        Decompressor::new(Compression::Zlib)
            .decompress(&compressed, &mut out)
            .unwrap();
        assert_eq!(out, data);
        // Too short a stream for the cluster, and garbage.
        let mut big = vec![0u8; 8192];
        assert!(inflate_raw(&compressed, &mut big).is_err());
        assert!(inflate_raw(&[0xff; 64], &mut out).is_err());
        assert!(inflate_raw(&[], &mut out).is_err());
    }

    #[test]
    fn refuses_huge_zstd_windows_and_garbage() {
        let mut out = vec![0u8; 4096];
        let mut d = Decompressor::new(Compression::Zstd);
        // Single-segment frame claiming a 2^60-byte content size.
        let mut frame = ZSTD_MAGIC.to_le_bytes().to_vec();
        frame.push(0xe0);
        frame.extend_from_slice(&(1u64 << 60).to_le_bytes());
        frame.extend_from_slice(&[0; 16]);
        assert!(d
            .decompress(&frame, &mut out)
            .unwrap_err()
            .contains("too large"));
        assert!(d.decompress(&[1, 2, 3], &mut out).is_err());
        assert!(d.decompress(&[0; 64], &mut out).is_err());
    }
}
