//! The loop every device worker runs when the driver kicks a queue: take the available
//! chains in batches with notifications off, serve each, and look once more after turning
//! notifications back on, so that a chain made available in between is not missed (with
//! VIRTIO_F_EVENT_IDX, `enable_notification` tells whether the driver added one).

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// One device's way of serving the chains of a queue, for [`drain_queue`].
pub trait ChainServer {
    /// Serves one chain whose head index lies inside the ring. The chain goes to the used
    /// ring here, or later for a request left in flight.
    fn serve(
        &mut self,
        q: &mut Queue,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), virtio_queue::Error>;

    /// A chain whose head index lies outside the ring: nothing can be returned for it, so it
    /// is only counted and skipped.
    fn bad_head(&mut self);

    /// Runs after each batch (e.g. to hand queued I/O to the kernel).
    fn end_batch(&mut self, _q: &mut Queue) -> Result<(), virtio_queue::Error> {
        Ok(())
    }
}

/// What one [`drain_queue`] did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Chains taken from the available ring, bad ones included.
    pub taken: usize,
    /// It stopped at its limit: chains may be left, and the caller wakes itself again (after
    /// looking for a reset or pause) rather than wait for a kick that will not come.
    pub more: bool,
    /// The queue is unusable (the driver corrupted it): the device stops serving it until
    /// the driver resets it.
    pub error: Option<virtio_queue::Error>,
}

/// Serves the chains the driver made available, at most `limit` of them.
pub fn drain_queue(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    limit: usize,
    server: &mut impl ChainServer,
) -> Drained {
    let mut out = Drained::default();
    if let Err(e) = drain(q, mem, limit, server, &mut out) {
        out.error = Some(e);
    }
    out
}

fn drain(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    limit: usize,
    server: &mut impl ChainServer,
    out: &mut Drained,
) -> Result<(), virtio_queue::Error> {
    loop {
        q.disable_notification(mem)?;
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> =
            q.iter(mem)?.take(limit - out.taken).collect();
        for chain in chains {
            out.taken += 1;
            if chain.head_index() >= q.size() {
                server.bad_head();
                continue;
            }
            server.serve(q, chain)?;
        }
        server.end_batch(q)?;
        if out.taken >= limit {
            out.more = true;
            return Ok(());
        }
        if !q.enable_notification(mem)? {
            return Ok(());
        }
    }
}
