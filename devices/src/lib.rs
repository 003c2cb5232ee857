//! podvisor's emulated devices.
//!
//! Every device is a small type that implements [`BusDevice`] and, so that snapshots and live
//! migration can carry it, [`Persist`]. The VM owns the devices and places them on a [`Bus`] (one
//! for port I/O, one for MMIO); a device never calls back into the VMM, it reports through the
//! event file descriptors it was given.

pub mod block;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use persist::{Persist, PersistError, SavedState};

/// Guest memory as every device and the VMM see it: the one place to switch in a dirty-page
/// bitmap (for live migration) instead of `()`.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<()>;

/// Stack size of the VMM's threads (vCPUs, device workers, the VMM loop, console input,
/// payload readers). Only pages a thread touches are resident, so the size is headroom; it
/// is kept under 2 MiB because a 2 MiB stack mapping that happens to be 2 MiB-aligned gets a
/// whole transparent huge page on its first touch where the host sets THP `enabled=always`
/// (measured: 2 MiB of one podvisor's 4.7 MiB overhead came from one such stack).
pub const THREAD_STACK_SIZE: usize = 1 << 20;
