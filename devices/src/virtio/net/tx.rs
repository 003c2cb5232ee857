//! Transmit: each chain is a `virtio_net_hdr_v1` and a frame in device-readable buffers,
//! written to the tap with one `writev` straight from guest memory.

use std::os::fd::RawFd;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::iovec::GuestIoVecs;
use super::{NetCounters, MAX_PACKET_LEN, VNET_HDR_LEN};
use crate::virtio::drain::{drain_queue, ChainServer, Drained};

/// Chains sent per wakeup before the worker yields (and re-arms itself).
pub const MAX_TX_PER_WAKEUP: usize = 256;

/// Sends the available transmit chains (at most [`MAX_TX_PER_WAKEUP`]).
pub fn process(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    iovs: &mut GuestIoVecs,
    tap: RawFd,
    counters: &NetCounters,
) -> Drained {
    let mut sender = Sender {
        mem,
        iovs,
        tap,
        counters,
    };
    let pass = drain_queue(q, mem, MAX_TX_PER_WAKEUP, &mut sender);
    sender.iovs.clear();
    pass
}

/// Writes each chain's frame to the tap.
struct Sender<'a> {
    mem: &'a GuestMemoryMmap,
    iovs: &'a mut GuestIoVecs,
    tap: RawFd,
    counters: &'a NetCounters,
}

impl ChainServer for Sender<'_> {
    fn serve(
        &mut self,
        q: &mut Queue,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), virtio_queue::Error> {
        let (iovs, counters) = (&mut *self.iovs, self.counters);
        let head = chain.head_index();
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
            match iovs.writev(self.tap, 0..iovs.len()) {
                Ok(_) => {
                    NetCounters::add(&counters.tx_packets, 1);
                    NetCounters::add(&counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Err(e) => {
                    // The kernel refused the frame (bad header, interface down, queue full):
                    // like a NIC, drop it and go on.
                    tracing::debug!("virtio-net: tap write: {e}");
                    NetCounters::add(&counters.tx_errors, 1);
                }
            }
        } else {
            NetCounters::add(&counters.tx_dropped, 1);
        }
        q.add_used(self.mem, head, 0)
    }

    fn bad_head(&mut self) {
        NetCounters::add(&self.counters.tx_dropped, 1);
    }
}
