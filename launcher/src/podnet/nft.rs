//! The NAT table of the masquerade binding, written to the kernel as nf_tables netlink batches
//! (no `nft` binary and no libnftnl in the pod): one table of the launcher's own, made in one
//! batch and deleted whole.
//!
//! The messages are built here from the kernel's uapi (`linux/netfilter/nf_tables.h`,
//! `nfnetlink.h`): a well-kept crate that writes NAT rules over netlink under a licence this
//! project can take does not exist yet.

use std::io;
use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;

// Attributes.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;

const NFT_META_IIFNAME: u32 = 6;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_NAT_DNAT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_ACCEPT: u32 = 1;
const IFNAMSIZ: usize = 16;

/// One netlink attribute (or nest of them), as bytes.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(mut self, kind: u16, value: &[u8]) -> Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn string(self, kind: u16, s: &str) -> Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v)
    }

    /// nf_tables' numbers are big-endian.
    fn u32(self, kind: u16, n: u32) -> Self {
        self.put(kind, &n.to_be_bytes())
    }

    fn nest(self, kind: u16, inner: Attrs) -> Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// One expression of a rule.
fn expr(name: &str, data: Attrs) -> Attrs {
    Attrs::default()
        .string(NFTA_EXPR_NAME, name)
        .nest(NFTA_EXPR_DATA, data)
}

fn value(bytes: &[u8]) -> Attrs {
    Attrs::default().put(NFTA_DATA_VALUE, bytes)
}

/// `reg1 == bytes`
fn cmp_eq(bytes: &[u8]) -> Attrs {
    expr(
        "cmp",
        Attrs::default()
            .u32(NFTA_CMP_SREG, NFT_REG_1)
            .u32(NFTA_CMP_OP, NFT_CMP_EQ)
            .nest(NFTA_CMP_DATA, value(bytes)),
    )
}

fn meta(key: u32) -> Attrs {
    expr(
        "meta",
        Attrs::default()
            .u32(NFTA_META_KEY, key)
            .u32(NFTA_META_DREG, NFT_REG_1),
    )
}

fn payload(base: u32, offset: u32, len: u32) -> Attrs {
    expr(
        "payload",
        Attrs::default()
            .u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
            .u32(NFTA_PAYLOAD_BASE, base)
            .u32(NFTA_PAYLOAD_OFFSET, offset)
            .u32(NFTA_PAYLOAD_LEN, len),
    )
}

/// What the masquerade binding asks of the pod's NAT.
#[derive(Clone, Debug, PartialEq)]
pub struct MasqueradeNat {
    /// The table, the launcher's own.
    pub table: String,
    /// The pod interface: connections arriving on it go to the guest.
    pub pod_interface: String,
    pub guest: Ipv4Addr,
    /// Only these (protocol number, port) go to the guest; all of them when empty.
    pub ports: Vec<(u8, u16)>,
}

impl MasqueradeNat {
    /// The rules, each a list of expressions: (chain, expressions).
    fn rules(&self) -> Vec<(&'static str, Vec<Attrs>)> {
        let mut iif = [0u8; IFNAMSIZ];
        let name = self.pod_interface.as_bytes();
        iif[..name.len().min(IFNAMSIZ - 1)].copy_from_slice(&name[..name.len().min(IFNAMSIZ - 1)]);
        let dnat = || {
            [
                expr(
                    "immediate",
                    Attrs::default()
                        .u32(NFTA_IMMEDIATE_DREG, NFT_REG_1)
                        .nest(NFTA_IMMEDIATE_DATA, value(&self.guest.octets())),
                ),
                expr(
                    "nat",
                    Attrs::default()
                        .u32(NFTA_NAT_TYPE, NFT_NAT_DNAT)
                        .u32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4))
                        .u32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1),
                ),
            ]
        };
        let mut rules = Vec::new();
        let inbound = |extra: Vec<Attrs>| {
            let mut e = vec![meta(NFT_META_IIFNAME), cmp_eq(&iif)];
            e.extend(extra);
            e.extend(dnat());
            ("prerouting", e)
        };
        if self.ports.is_empty() {
            rules.push(inbound(Vec::new()));
        }
        for &(proto, port) in &self.ports {
            rules.push(inbound(vec![
                meta(NFT_META_L4PROTO),
                cmp_eq(&[proto]),
                // The destination port: bytes 2-3 of the TCP or UDP header.
                payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
                cmp_eq(&port.to_be_bytes()),
            ]));
        }
        // From the guest, out by the pod's address: ip saddr == guest → masquerade.
        rules.push((
            "postrouting",
            vec![
                payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
                cmp_eq(&self.guest.octets()),
                expr("masq", Attrs::default()),
            ],
        ));
        rules
    }

    /// The batch that makes the table, its two NAT chains and their rules.
    fn install_batch(&self) -> Vec<u8> {
        let mut b = Batch::default();
        b.add(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            Attrs::default().string(NFTA_TABLE_NAME, &self.table),
        );
        for (chain, hook, priority) in [
            ("prerouting", NF_INET_PRE_ROUTING, -100i32),
            ("postrouting", NF_INET_POST_ROUTING, 100),
        ] {
            b.add(
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                Attrs::default()
                    .string(NFTA_CHAIN_TABLE, &self.table)
                    .string(NFTA_CHAIN_NAME, chain)
                    .nest(
                        NFTA_CHAIN_HOOK,
                        Attrs::default()
                            .u32(NFTA_HOOK_HOOKNUM, hook)
                            .u32(NFTA_HOOK_PRIORITY, priority as u32),
                    )
                    .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                    .string(NFTA_CHAIN_TYPE, "nat"),
            );
        }
        for (chain, exprs) in self.rules() {
            let mut list = Attrs::default();
            for e in exprs {
                list = list.nest(NFTA_LIST_ELEM, e);
            }
            b.add(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                Attrs::default()
                    .string(NFTA_RULE_TABLE, &self.table)
                    .string(NFTA_RULE_CHAIN, chain)
                    .nest(NFTA_RULE_EXPRESSIONS, list),
            );
        }
        b.finish()
    }
}

/// A netfilter netlink socket, in the network namespace of the thread that opened it (all it
/// does happens there, whichever thread asks later).
pub struct Nft(Socket);

impl Nft {
    pub fn open() -> io::Result<Nft> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Nft(socket))
    }

    /// Makes the table of `nat`.
    pub fn install(&self, nat: &MasqueradeNat) -> io::Result<()> {
        self.send(&nat.install_batch())
    }

    /// Deletes a table (and everything in it).
    pub fn remove(&self, table: &str) -> io::Result<()> {
        let mut b = Batch::default();
        b.add(
            NFT_MSG_DELTABLE,
            0,
            Attrs::default().string(NFTA_TABLE_NAME, table),
        );
        self.send(&b.finish())
    }
}

/// nf_tables messages between a batch's begin and end, each asking for an ACK.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    seq: u32,
}

impl Batch {
    fn message(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) {
        let len = 16 + 4 + attrs.len();
        self.seq += 1;
        self.bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&self.seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version, resource id (big-endian).
        self.bytes.extend_from_slice(&[family, 0]);
        self.bytes.extend_from_slice(&res_id.to_be_bytes());
        self.bytes.extend_from_slice(attrs);
    }

    fn add(&mut self, msg: u16, flags: u16, attrs: Attrs) {
        if self.bytes.is_empty() {
            self.message(
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                NFPROTO_UNSPEC,
                NFNL_SUBSYS_NFTABLES,
                &[],
            );
        }
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        self.message(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_IPV4,
            0,
            &attrs.0,
        );
    }

    fn finish(mut self) -> Vec<u8> {
        self.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.bytes
    }
}

impl Nft {
    /// Sends a batch and reads the kernel's answers: an error answer is the error.
    fn send(&self, batch: &[u8]) -> io::Result<()> {
        let socket = &self.0;
        socket.send(batch, 0)?;
        // Messages with ACK: one answer each (the batch's begin and end have none).
        let wanted = count_acked(batch);
        let mut answered = 0;
        let mut buf = vec![0u8; 16384];
        while answered < wanted {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                if len < 16 || at + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    answered += 1;
                }
                at += len.next_multiple_of(4);
            }
        }
        Ok(())
    }
}

fn count_acked(batch: &[u8]) -> usize {
    let mut at = 0;
    let mut count = 0;
    while at + 16 <= batch.len() {
        let len = u32::from_ne_bytes(batch[at..at + 4].try_into().expect("4 bytes")) as usize;
        let flags = u16::from_ne_bytes(batch[at + 6..at + 8].try_into().expect("2 bytes"));
        if flags & NLM_F_ACK != 0 {
            count += 1;
        }
        at += len.next_multiple_of(4);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_as_netlink_wants() {
        let a = Attrs::default().string(NFTA_TABLE_NAME, "nat");
        assert_eq!(a.0, [8, 0, 1, 0, b'n', b'a', b't', 0]);
        let a = Attrs::default().u32(NFTA_HOOK_HOOKNUM, 4);
        assert_eq!(a.0, [8, 0, 1, 0, 0, 0, 0, 4]);
        let n = Attrs::default().nest(NFTA_CHAIN_HOOK, Attrs::default().put(1, &[7]));
        assert_eq!(n.0, [12, 0, 4, 0x80, 5, 0, 1, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn a_batch_has_its_begin_and_end_and_one_ack_per_message() {
        let nat = MasqueradeNat {
            table: "podvisor_nat".into(),
            pod_interface: "eth0".into(),
            guest: Ipv4Addr::new(10, 0, 2, 2),
            ports: vec![(6, 80), (17, 53)],
        };
        let batch = nat.install_batch();
        // table, two chains, two inbound rules (one per port), one outbound.
        assert_eq!(count_acked(&batch), 6);
        let kind_at = |at: usize| u16::from_ne_bytes([batch[at + 4], batch[at + 5]]);
        assert_eq!(kind_at(0), NFNL_MSG_BATCH_BEGIN);
        let mut at = 0;
        let mut last = 0;
        while at < batch.len() {
            last = at;
            at += u32::from_ne_bytes(batch[at..at + 4].try_into().unwrap()) as usize;
        }
        assert_eq!(at, batch.len());
        assert_eq!(kind_at(last), NFNL_MSG_BATCH_END);
        let all_ports = MasqueradeNat {
            ports: Vec::new(),
            ..nat
        };
        assert_eq!(count_acked(&all_ports.install_batch()), 5);
    }
}

#[cfg(test)]
mod kernel_tests {
    //! Against the kernel, in network namespaces: needs nf_tables (the test host has it; a
    //! kernel without it skips, saying so).
    use super::*;
    use crate::podnet::netlink::Netlink;
    use crate::podnet::netns::{assert_masqueraded, configure_guest, pod_on_a_node, PodOnANode};

    #[test]
    fn connections_to_the_pod_reach_the_guest_and_the_guests_leave_as_the_pod() {
        let Some(PodOnANode { node, pod, guest }) = pod_on_a_node() else {
            return;
        };
        let nat = MasqueradeNat {
            table: "podvisor_nat".into(),
            pod_interface: "eth0".into(),
            guest: Ipv4Addr::new(10, 0, 2, 2),
            ports: Vec::new(),
        };
        let installed = pod.run(move || {
            let nl = Netlink::open().unwrap();
            let tap0 = nl.existing("tap0").unwrap().index;
            nl.up(tap0, None).unwrap();
            nl.add_address(tap0, "10.0.2.1/24".parse().unwrap())
                .unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
            Nft::open().and_then(|n| n.install(&nat))
        });
        if let Err(e) = &installed {
            if e.raw_os_error() == Some(libc::EPROTONOSUPPORT)
                || e.raw_os_error() == Some(libc::ENOENT)
            {
                eprintln!("skipped: this kernel has no nf_tables NAT ({e})");
                return;
            }
        }
        installed.expect("the NAT table");
        configure_guest(
            &guest,
            "10.0.2.2/24".parse().unwrap(),
            Ipv4Addr::new(10, 0, 2, 1),
        );
        assert_masqueraded(&node, &guest);
        pod.run(|| Nft::open()?.remove("podvisor_nat")).unwrap();
    }
}
