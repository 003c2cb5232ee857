//! A disk image from anyone's registry, as the direct disk boot reads it: partition table
//! (GPT, MBR), file systems (ext2/3/4 and the probes for others), boot menus, kernel and
//! initrd. Whatever the bytes, the result is a menu or one error — never a panic, a hang or
//! an allocation the image's size does not justify.
#![no_main]

use std::path::Path;

use devices::block::{BlockError, DiskImage, Format};
use libfuzzer_sys::fuzz_target;
use vmm::boot::disk::DiskBoot;

/// The input as a read-only disk.
struct Bytes(Vec<u8>);

impl Bytes {
    fn read_only(&self) -> BlockError {
        BlockError::ReadOnly {
            path: self.path().to_owned(),
        }
    }
}

impl DiskImage for Bytes {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn path(&self) -> &Path {
        Path::new("fuzz-input")
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| BlockError::OutOfRange {
                path: self.path().to_owned(),
                offset,
                len: buf.len() as u64,
                size: self.size(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> Result<(), BlockError> {
        Err(self.read_only())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(self.read_only())
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Err(self.read_only())
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn reload(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(boot) = DiskBoot::open(Box::new(Bytes(data.to_vec()))) else {
        return;
    };
    let _ = boot.describe();
    for i in 0..boot.found.menu.entries.len() {
        let _ = boot.load(i);
    }
    let _ = boot.choose(Some("1"));
    let _ = boot.choose(Some("Debian"));
});
