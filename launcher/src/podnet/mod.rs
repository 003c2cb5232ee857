//! The pod network as KubeVirt wires it for a guest: what the launcher sets up inside the
//! pod's network namespace so that the guest has the pod's connectivity.

pub mod bridge;
pub mod dhcp;
pub mod netlink;
pub mod nft;

use std::fmt;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bridge::{BridgeBinding, BridgeSpec};

/// Why the pod network could not be wired.
#[derive(Debug)]
pub enum PodNetError {
    /// A request to the kernel failed.
    Netlink(netlink::NetlinkError),
    /// The pod is not as the binding needs it.
    Refused(String),
}

impl fmt::Display for PodNetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodNetError::Netlink(e) => write!(f, "pod network: {e}"),
            PodNetError::Refused(why) => write!(f, "pod network: {why}"),
        }
    }
}

impl std::error::Error for PodNetError {}

impl From<netlink::NetlinkError> for PodNetError {
    fn from(e: netlink::NetlinkError) -> Self {
        PodNetError::Netlink(e)
    }
}

/// The pod's networks, wired for the guest by a thread of their own that keeps only the
/// capability to unwire them (CAP_NET_ADMIN) while the rest of the launcher gives up its
/// privileges; dropping this unwires them all.
pub struct PodNetwork {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PodNetwork {
    /// Wires every binding in turn, in the launcher's (the pod's) network namespace; on a
    /// failure, the ones wired already are unwired and the error is returned.
    pub fn wire(specs: Vec<BridgeSpec>) -> Result<PodNetwork, PodNetError> {
        if specs.is_empty() {
            return Ok(PodNetwork {
                stop: None,
                thread: None,
            });
        }
        let (done_tx, done_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("podnet".into())
            .spawn(move || {
                let mut bindings = Vec::new();
                for spec in &specs {
                    match BridgeBinding::wire(spec) {
                        Ok(b) => bindings.push(b),
                        Err(e) => {
                            while let Some(b) = bindings.pop() {
                                drop(b);
                            }
                            let _ = done_tx.send(Err(e));
                            return;
                        }
                    }
                }
                let keep = [vmm::privileges::Capability::CAP_NET_ADMIN];
                if let Err(e) = vmm::privileges::keep_only(&keep) {
                    tracing::debug!("pod network: {e}");
                }
                // Until it unwires the bindings, as the VM thread's.
                vmm::seccomp::apply_or_exit(vmm::seccomp::Kind::Vmm);
                let _ = done_tx.send(Ok(()));
                // Until the launcher ends.
                let _ = stop_rx.recv();
                while let Some(b) = bindings.pop() {
                    drop(b);
                }
            })
            .map_err(|e| PodNetError::Refused(format!("cannot start its thread: {e}")))?;
        let done = done_rx.recv().unwrap_or_else(|_| {
            Err(PodNetError::Refused(
                "its thread ended before wiring it".into(),
            ))
        });
        let network = PodNetwork {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        done.map(|()| network)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod netns;
