//! Transmit: each chain is a `virtio_net_hdr_v1` and a frame in device-readable buffers,
//! written to the tap with one `writev` straight from guest memory.

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::iovec::GuestIoVecs;
use super::{NetCounters, MAX_PACKET_LEN, VNET_HDR_LEN};

/// Chains sent per wakeup before the worker yields (and re-arms itself).
pub const MAX_TX_PER_WAKEUP: usize = 256;

/// What a transmit pass did.
#[derive(Debug, Default)]
pub struct TxOutcome {
    /// Chains went to the used ring.
    pub used: bool,
    /// The pass stopped at its bound with chains left.
    pub more: bool,
}

/// Sends the available transmit chains (at most [`MAX_TX_PER_WAKEUP`]).
pub fn process(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    iovs: &mut GuestIoVecs,
    tap: RawFd,
    counters: &NetCounters,
) -> Result<TxOutcome, virtio_queue::Error> {
    let mut out = TxOutcome::default();
    let mut sent = 0;
    loop {
        q.disable_notification(mem)?;
        while sent < MAX_TX_PER_WAKEUP {
            let Some(chain) = q.iter(mem)?.next() else {
                break;
            };
            sent += 1;
            let head = chain.head_index();
            if head >= q.size() {
                // Nothing can be returned for an index outside the ring.
                NetCounters::add(&counters.tx_dropped, 1);
                continue;
            }
            iovs.clear();
            let mut len = 0usize;
            let mut ok = true;
            for desc in chain {
                len += desc.len() as usize;
                if desc.is_write_only()
                    || len > MAX_PACKET_LEN
                    || iovs.push(desc.addr(), desc.len()).is_err()
                {
                    ok = false;
                    break;
                }
            }
            if ok && len >= VNET_HDR_LEN {
                match iovs.writev(tap, 0..iovs.len()) {
                    Ok(_) => {
                        NetCounters::add(&counters.tx_packets, 1);
                        NetCounters::add(&counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        // The kernel refused the frame (bad header, interface down, queue
                        // full): like a NIC, drop it and go on.
                        tracing::debug!("virtio-net: tap write: {e}");
                        NetCounters::add(&counters.tx_errors, 1);
                    }
                }
            } else {
                NetCounters::add(&counters.tx_dropped, 1);
            }
            q.add_used(mem, head, 0)?;
            out.used = true;
        }
        if sent >= MAX_TX_PER_WAKEUP {
            out.more = true;
            break;
        }
        if !q.enable_notification(mem)? {
            break;
        }
    }
    iovs.clear();
    Ok(out)
}
