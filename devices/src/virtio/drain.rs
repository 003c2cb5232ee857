//! The loop every device worker runs when the driver kicks a queue: take the available
//! chains in batches with notifications off, serve each, and look once more after turning
//! notifications back on, so that a chain made available in between is not missed (with
//! VIRTIO_F_EVENT_IDX, `enable_notification` tells whether the driver added one).

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

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

    /// Whether this wakeup has done enough work (bytes moved, say): no more chains are
    /// taken, as if the limit had been reached.
    fn spent(&self) -> bool {
        false
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
        // One chain at a time: a chain taken must be served, and the server may have done
        // enough before the next.
        while out.taken < limit && !server.spent() {
            let chain: Option<DescriptorChain<&GuestMemoryMmap>> = q.iter(mem)?.next();
            let Some(chain) = chain else {
                break;
            };
            out.taken += 1;
            if chain.head_index() >= q.size() {
                server.bad_head();
                continue;
            }
            server.serve(q, chain)?;
        }
        server.end_batch(q)?;
        if out.taken >= limit || server.spent() {
            out.more = true;
            return Ok(());
        }
        if !q.enable_notification(mem)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, TestRing};

    /// Records what it was handed; puts each chain in the used ring with its head as length.
    #[derive(Default)]
    struct Recorder {
        served: Vec<u16>,
        bad: usize,
        batches: usize,
    }

    impl ChainServer for Recorder {
        fn serve(
            &mut self,
            q: &mut Queue,
            chain: DescriptorChain<&GuestMemoryMmap>,
        ) -> Result<(), virtio_queue::Error> {
            let head = chain.head_index();
            self.served.push(head);
            q.add_used(chain.memory(), head, u32::from(head))
        }

        fn bad_head(&mut self) {
            self.bad += 1;
        }

        fn end_batch(&mut self, _q: &mut Queue) -> Result<(), virtio_queue::Error> {
            self.batches += 1;
            Ok(())
        }
    }

    fn queue(ring: &TestRing) -> Queue {
        let mut q = Queue::new(ring.size).unwrap();
        q.set_desc_table_address(Some(ring.desc as u32), Some(0));
        q.set_avail_ring_address(Some(ring.avail as u32), Some(0));
        q.set_used_ring_address(Some(ring.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    #[test]
    fn serves_every_chain_up_to_the_limit_then_asks_to_be_woken() {
        let mem = guest_memory(1 << 20);
        let mut ring = TestRing::new(0x1000, 16);
        let mut q = queue(&ring);
        let heads: Vec<u16> = (0..5)
            .map(|_| ring.add_chain(&mem, &[(0x8000, 16, 0)]))
            .collect();

        let mut server = Recorder::default();
        let pass = drain_queue(&mut q, &mem, 3, &mut server);
        assert_eq!(
            (pass.taken, pass.more, pass.error.is_none()),
            (3, true, true)
        );
        assert_eq!(server.served, heads[..3]);
        assert_eq!(ring.used_idx(&mem), 3);

        let pass = drain_queue(&mut q, &mem, 3, &mut server);
        assert_eq!(
            (pass.taken, pass.more, pass.error.is_none()),
            (2, false, true)
        );
        assert_eq!(server.served, heads);
        assert_eq!(
            ring.used_elem(&mem, 4),
            (u32::from(heads[4]), u32::from(heads[4]))
        );
        assert_eq!(server.bad, 0);
        assert!(server.batches >= 2);

        // Nothing available: nothing taken, nothing to come back for.
        let pass = drain_queue(&mut q, &mem, 3, &mut server);
        assert_eq!((pass.taken, pass.more), (0, false));
    }

    #[test]
    fn a_head_outside_the_ring_is_counted_and_skipped() {
        let mem = guest_memory(1 << 20);
        let mut ring = TestRing::new(0x1000, 16);
        let mut q = queue(&ring);
        ring.push_avail(&mem, 200);
        let good = ring.add_chain(&mem, &[(0x8000, 16, 0)]);

        let mut server = Recorder::default();
        let pass = drain_queue(&mut q, &mem, 16, &mut server);
        assert_eq!(
            (pass.taken, pass.more, pass.error.is_none()),
            (2, false, true)
        );
        assert_eq!((server.bad, server.served.clone()), (1, vec![good]));
        assert_eq!(ring.used_idx(&mem), 1);
    }

    #[test]
    fn a_corrupt_available_index_is_an_error() {
        let mem = guest_memory(1 << 20);
        let ring = TestRing::new(0x1000, 16);
        let mut q = queue(&ring);
        // More chains "available" than the ring holds.
        ring.set_avail_idx(&mem, 40);

        let mut server = Recorder::default();
        let pass = drain_queue(&mut q, &mem, 64, &mut server);
        assert!(pass.error.is_some());
        assert_eq!((pass.taken, server.served.len()), (0, 0));
    }
}
