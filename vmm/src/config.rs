//! What a VM is made of, as the user asked for it. The CLI and (later) the REST API both map to
//! these types; [`VmConfig::validate`] checks them once, after which the VMM trusts them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Smallest guest the VMM accepts.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
/// Largest vCPU count: APIC IDs must stay below the xAPIC broadcast ID 0xff.
pub const MAX_VCPUS: u8 = 254;

/// The kernel to boot and what to hand it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// A bzImage, or an ELF vmlinux with a PVH entry point.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// vCPUs of the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes; a multiple of 4 KiB.
    pub size: u64,
}

/// Where COM1's output goes and whether it takes input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", tag = "mode", content = "file")]
pub enum ConsoleConfig {
    /// The VMM's stdout and stdin (in raw mode when stdin is a terminal).
    #[default]
    Tty,
    /// Appended to a file; no input.
    File(PathBuf),
    /// The UART exists but its output is dropped.
    Off,
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    #[serde(default)]
    pub serial: ConsoleConfig,
}

/// A configuration the VMM cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("--memory must be at least {min} MiB, got {0} bytes", min = MIN_MEMORY_BYTES >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory must be a multiple of 4 KiB, got {0} bytes")]
    MemoryUnaligned(u64),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
}

impl VmConfig {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus.boot_vcpus == 0 || self.cpus.boot_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.cpus.boot_vcpus));
        }
        if self.memory.size < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooSmall(self.memory.size));
        }
        if !self.memory.size.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.memory.size));
        }
        if self.payload.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.payload.cmdline.len()));
        }
        Ok(())
    }
}

/// Parses a memory size: a number with an optional K, M, G or T suffix (powers of 1024, an
/// optional trailing "iB" or "B"). A bare number means MiB, as QEMU's `-m` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected a number such as 512M or 2G"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown unit '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: "k".into(),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
            },
            cpus: CpusConfig { boot_vcpus: 2 },
            memory: MemoryConfig { size: 512 << 20 },
            serial: ConsoleConfig::Tty,
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn validation() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.cpus.boot_vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.cpus.boot_vcpus = 255;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(255)));
        let mut c = config();
        c.memory.size = 1 << 20;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(1 << 20)));
        c.memory.size = (64 << 20) + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::MemoryUnaligned((64 << 20) + 1))
        );
        let mut c = config();
        c.payload.cmdline = "x".repeat(4000);
        assert_eq!(c.validate(), Err(ConfigError::CmdlineTooLong(4000)));
    }

    #[test]
    fn json_round_trip() {
        let mut c = config();
        c.serial = ConsoleConfig::File("/tmp/s".into());
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
    }
}
