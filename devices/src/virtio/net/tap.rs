//! The host side of virtio-net: a Linux tap interface opened through `/dev/net/tun`.
//!
//! Frames cross the tap with a 12-byte `virtio_net_hdr_v1` in front (IFF_VNET_HDR with
//! TUNSETVNETHDRSZ 12), so the guest's header goes to the kernel and back unchanged, and
//! checksum/segmentation offloads pass through without work in the VMM.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_LEN};

const TUN_PATH: &str = "/dev/net/tun";
/// Template for kernel-chosen names.
pub const DEFAULT_TAP_TEMPLATE: &str = "podvisor%d";
const IFNAMSIZ: usize = 16;

const IFF_UP: i16 = 0x1;
const IFF_RUNNING: i16 = 0x40;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

// _IOW('T', n, int) and friends from <linux/if_tun.h>; <linux/sockios.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;

/// TUNSETOFFLOAD flags: what the kernel may hand the device (the guest must accept it).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// `struct ifreq`: the name and a 24-byte union (flags, a sockaddr, ...).
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> Self {
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// Stores a `sockaddr_in` with `addr` (port 0).
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

/// An open tap interface (non-blocking, close-on-exec, with virtio-net headers). The interface
/// goes away when the last file descriptor on it closes, unless it was made persistent.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    ufo: bool,
}

fn validate_name(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        Some("contains '/', ':', a space or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::InvalidTapName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

impl Tap {
    /// Opens tap `name` (attaching to it if it exists, creating it otherwise), or with `None`
    /// a new tap named by the kernel from `podvisor%d`.
    pub fn open(name: Option<&str>) -> Result<Tap, NetError> {
        let wanted = name.unwrap_or(DEFAULT_TAP_TEMPLATE);
        validate_name(wanted)?;
        let open_err = |source| NetError::OpenTap {
            name: wanted.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(open_err)?;
        let mut req = IfReq::named(wanted);
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (40 bytes, C layout)
        // and outlives the call; the fd is a tun control file we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        let mut tap = Tap {
            file,
            name: req.name(),
            ufo: false,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `hdr_len`.
        let ret = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(tap.error("setting the virtio-net header size"));
        }
        // Kernels differ on UFO; offer it to the guest only when this one takes it.
        tap.ufo = tap
            .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO)
            .is_ok();
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A tap over any datagram-like file (tests and the fuzz targets use a socket pair).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
            ufo: false,
        }
    }

    fn error(&self, what: &'static str) -> NetError {
        NetError::TapIoctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// The interface name (as the kernel chose it for a template).
    /// Another handle on the same tap (a duplicated file descriptor): the tap lives until the
    /// last handle closes, so a VMM can keep one across device re-creation.
    pub fn try_clone(&self) -> Result<Tap, NetError> {
        let file = self.file.try_clone().map_err(|source| NetError::TapIoctl {
            name: self.name.clone(),
            what: "duplicating its file descriptor",
            source,
        })?;
        Ok(Tap {
            file,
            name: self.name.clone(),
            ufo: self.ufo,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the tap outlive its file descriptors (until deleted, or made non-persistent and
    /// closed): a pod's launcher makes its guest's tap so, to put it on a bridge before the
    /// VMM opens it.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), NetError> {
        // SAFETY: TUNSETPERSIST takes its argument by value (0 or 1); the fd is our tap's.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if ret < 0 {
            return Err(self.error("setting it persistent"));
        }
        Ok(())
    }

    /// Whether the kernel accepts UDP fragmentation offload on this tap.
    pub fn supports_ufo(&self) -> bool {
        self.ufo
    }

    /// Sets which offloads (`TUN_F_*`) the kernel may use in frames it hands the device.
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if ret < 0 {
            return Err(self.error("setting offloads (TUNSETOFFLOAD)"));
        }
        Ok(())
    }

    fn if_ioctl(
        &self,
        req: libc::c_ulong,
        ifr: &mut IfReq,
        what: &'static str,
    ) -> Result<(), NetError> {
        // SAFETY: socket() takes no pointers; the returned fd is checked and then owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.error(what));
        }
        // SAFETY: `fd` is a freshly created socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the SIOC[GS]IF* requests read/write a `struct ifreq`; `ifr` is one and
        // outlives the call.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut IfReq) };
        if ret < 0 {
            return Err(self.error(what));
        }
        Ok(())
    }

    /// Gives the host side of the interface `addr` with netmask `mask` (like `ip addr add`).
    pub fn set_ip(&self, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), NetError> {
        let mut ifr = IfReq::named(&self.name);
        ifr.set_ipv4(addr);
        self.if_ioctl(SIOCSIFADDR, &mut ifr, "setting the IPv4 address")?;
        let mut ifr = IfReq::named(&self.name);
        ifr.set_ipv4(mask);
        self.if_ioctl(SIOCSIFNETMASK, &mut ifr, "setting the netmask")
    }

    /// Brings the interface up.
    pub fn up(&self) -> Result<(), NetError> {
        let mut ifr = IfReq::named(&self.name);
        self.if_ioctl(SIOCGIFFLAGS, &mut ifr, "reading interface flags")?;
        let flags = ifr.flags() | IFF_UP | IFF_RUNNING;
        ifr.set_flags(flags);
        self.if_ioctl(SIOCSIFFLAGS, &mut ifr, "bringing the interface up")
    }

    /// Sets the host side's MAC address (a tap allows it while up).
    pub fn set_host_mac(&self, mac: [u8; 6]) -> Result<(), NetError> {
        let mut ifr = IfReq::named(&self.name);
        ifr.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        ifr.data[2..8].copy_from_slice(&mac);
        self.if_ioctl(SIOCSIFHWADDR, &mut ifr, "setting the MAC address")
    }

    /// The host side's MAC address (the address guest frames to the host are sent to).
    pub fn host_mac(&self) -> Result<[u8; 6], NetError> {
        let mut ifr = IfReq::named(&self.name);
        self.if_ioctl(SIOCGIFHWADDR, &mut ifr, "reading the MAC address")?;
        let mut mac = [0; 6];
        mac.copy_from_slice(&ifr.data[2..8]);
        Ok(mac)
    }

    /// Reads one frame (with its header) into `buf`; `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_before_touching_the_kernel() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "eth0:1"] {
            let err = Tap::open(Some(bad)).unwrap_err();
            assert!(
                matches!(err, NetError::InvalidTapName { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut r = IfReq::named("tap0");
        r.set_flags(IFF_TAP | IFF_NO_PI);
        assert_eq!(r.name(), "tap0");
        assert_eq!(r.flags(), 0x1002);
        r.set_ipv4(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(&r.data[4..8], &[10, 1, 2, 3]);
    }
}
