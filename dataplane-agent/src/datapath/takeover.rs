//! Taking over connections from kube-proxy. Until the agent programs a frontend, packets to it
//! pass to the node's stack, where kube-proxy's rules DNAT them and the kernel's connection
//! tracking keeps each connection on its backend. Once the frontend is programmed, the
//! datapath sees those connections' packets first; without an entry of its own it would treat
//! them as new and pick another backend. So before the first programming, the agent reads the
//! kernel's conntrack table (ctnetlink) and seeds its own with every NATed flow to a frontend
//! it is about to serve: same backend, same SNAT, both directions. After kube-proxy's rules
//! are removed the connections go on unchanged.
use std::{collections::HashSet, net::Ipv4Addr};

use dataplane_common::{CT_FLAG_REPLY, CT_FLAG_SNAT, CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::plan::{FrontendAddr, Protocol};

/// One direction of a kernel conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// A kernel conntrack entry: the tuple as the client sent it, and the tuple the replies
/// carry (which shows the DNAT and SNAT applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFlow {
    pub proto: u8,
    pub original: Tuple,
    pub reply: Tuple,
}

/// The agent's conntrack entries (forward, reply) for the kernel's NATed flows to
/// `frontends`; flows that are not NATed, or to other addresses, are left out. Pure: the
/// frontend and backend ids are filled in once the frontends are programmed
/// (`Programmer::adopt_flows`).
pub fn entries_for(
    flows: &[KernelFlow],
    frontends: &HashSet<FrontendAddr>,
    now_ns: u64,
) -> Vec<(CtKey, CtEntry)> {
    let mut out = Vec::new();
    for flow in flows {
        let protocol = match flow.proto {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            _ => continue,
        };
        let (o, r) = (flow.original, flow.reply);
        let frontend = FrontendAddr {
            addr: (o.dst, o.dport).into(),
            protocol,
        };
        // DNATed: the replies come from somewhere else than the client sent to.
        if !frontends.contains(&frontend) || (r.src, r.sport) == (o.dst, o.dport) {
            continue;
        }
        // SNATed too: the backend answers another address than the client's.
        let snat = (r.dst, r.dport) != (o.src, o.sport);
        let forward_key = CtKey::new(o.src.octets(), o.dst.octets(), o.sport, o.dport, flow.proto);
        let forward = CtEntry {
            created_ns: now_ns,
            last_seen_ns: now_ns,
            nat_addr: r.src.octets(),
            nat_port: r.sport,
            flags: if snat { CT_FLAG_SNAT } else { 0 },
            peer_addr: if snat { r.dst.octets() } else { [0; 4] },
            peer_port: if snat { r.dport } else { 0 },
            ..Default::default()
        };
        let reply_key = forward_key.reply_of(&forward);
        let reply = CtEntry {
            created_ns: now_ns,
            last_seen_ns: now_ns,
            nat_addr: o.dst.octets(),
            nat_port: o.dport,
            flags: forward.flags | CT_FLAG_REPLY,
            peer_addr: if snat { o.src.octets() } else { [0; 4] },
            peer_port: if snat { o.sport } else { 0 },
            ..Default::default()
        };
        out.push((forward_key, forward));
        out.push((reply_key, reply));
    }
    out
}

/// The kernel's IPv4 TCP and UDP conntrack entries that were NATed, read over ctnetlink
/// (a dump of `IPCTNL_MSG_CT_GET`) in this network namespace.
pub fn kernel_nat_flows() -> std::io::Result<Vec<KernelFlow>> {
    const NETLINK_NETFILTER: i32 = 12;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_GET: u16 = 1;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_STATUS: u16 = 3;
    const IPS_NAT_MASK: u32 = (1 << 4) | (1 << 5); // SRC_NAT | DST_NAT

    let mut request = Vec::with_capacity(20);
    request.extend_from_slice(&20u32.to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    request.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]); // nfgenmsg: family, v0, res_id

    // SAFETY: plain socket calls on a descriptor this function owns (closed on return).
    let socket = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: sends a buffer this function owns on its own socket.
    if unsafe { libc::send(fd, request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut flows = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receives into a buffer this function owns.
        let n = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut data = &buffer[..n as usize];
        while data.len() >= 16 {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            if len < 16 || len > data.len() {
                return Err(std::io::Error::other("truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(flows),
                NLMSG_ERROR => {
                    let error = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                    return Err(std::io::Error::from_raw_os_error(-error));
                }
                _ => {
                    // After the header (16) and nfgenmsg (4): attributes.
                    let attrs = attributes(&data[20..len]);
                    let status = attrs
                        .iter()
                        .find(|(t, _)| *t == CTA_STATUS)
                        .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
                    let tuple = |which| {
                        attrs
                            .iter()
                            .find(|(t, _)| *t == which)
                            .and_then(|(_, v)| parse_tuple(v))
                    };
                    if let (Some(status), Some((proto, original)), Some((_, reply))) =
                        (status, tuple(CTA_TUPLE_ORIG), tuple(CTA_TUPLE_REPLY))
                        && status & IPS_NAT_MASK != 0
                    {
                        flows.push(KernelFlow {
                            proto,
                            original,
                            reply,
                        });
                    }
                }
            }
            data = &data[align(len).min(data.len())..];
        }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink attribute list: (type without the nested/byte-order flags, payload).
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[align(len).min(data.len())..];
    }
    out
}

/// CTA_TUPLE_{ORIG,REPLY}: CTA_TUPLE_IP {CTA_IP_V4_SRC, CTA_IP_V4_DST} and CTA_TUPLE_PROTO
/// {CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT}.
fn parse_tuple(data: &[u8]) -> Option<(u8, Tuple)> {
    let mut tuple = Tuple {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
    };
    let mut proto = None;
    for (kind, value) in attributes(data) {
        match kind {
            1 => {
                for (kind, value) in attributes(value) {
                    let addr = Ipv4Addr::from(<[u8; 4]>::try_from(value.get(..4)?).ok()?);
                    match kind {
                        1 => tuple.src = addr,
                        2 => tuple.dst = addr,
                        _ => {}
                    }
                }
            }
            2 => {
                for (kind, value) in attributes(value) {
                    match kind {
                        1 => proto = value.first().copied(),
                        2 => tuple.sport = u16::from_be_bytes(value.get(..2)?.try_into().ok()?),
                        3 => tuple.dport = u16::from_be_bytes(value.get(..2)?.try_into().ok()?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, tuple))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
        }
    }

    #[test]
    fn nated_flows_to_served_frontends_become_both_entries() {
        let frontends: HashSet<FrontendAddr> = [
            FrontendAddr {
                addr: "10.96.0.10:80".parse::<SocketAddr>().unwrap(),
                protocol: Protocol::Tcp,
            },
            FrontendAddr {
                addr: "192.0.2.11:30080".parse::<SocketAddr>().unwrap(),
                protocol: Protocol::Tcp,
            },
        ]
        .into();
        let flows = [
            // A pod to a ClusterIP, DNATed.
            KernelFlow {
                proto: IPPROTO_TCP,
                original: tuple("10.244.1.10", 40000, "10.96.0.10", 80),
                reply: tuple("10.244.1.11", 8080, "10.244.1.10", 40000),
            },
            // An outside client to a node port, DNATed and masqueraded.
            KernelFlow {
                proto: IPPROTO_TCP,
                original: tuple("192.0.2.100", 50000, "192.0.2.11", 30080),
                reply: tuple("10.244.2.11", 8080, "192.0.2.11", 61234),
            },
            // Not a frontend we serve, and a frontend flow that was not NATed.
            KernelFlow {
                proto: IPPROTO_TCP,
                original: tuple("10.244.1.10", 40001, "10.96.9.9", 80),
                reply: tuple("10.244.1.12", 8080, "10.244.1.10", 40001),
            },
            KernelFlow {
                proto: IPPROTO_TCP,
                original: tuple("10.244.1.10", 40002, "10.96.0.10", 80),
                reply: tuple("10.96.0.10", 80, "10.244.1.10", 40002),
            },
        ];
        let entries = entries_for(&flows, &frontends, 7);
        assert_eq!(entries.len(), 4, "two flows, two entries each");
        let (fwd_key, fwd) = entries[0];
        assert_eq!(
            fwd_key,
            CtKey::new([10, 244, 1, 10], [10, 96, 0, 10], 40000, 80, IPPROTO_TCP)
        );
        assert_eq!(
            (fwd.nat_addr, fwd.nat_port, fwd.flags),
            ([10, 244, 1, 11], 8080, 0)
        );
        let (reply_key, reply) = entries[1];
        assert_eq!(
            reply_key,
            CtKey::new([10, 244, 1, 11], [10, 244, 1, 10], 8080, 40000, IPPROTO_TCP)
        );
        assert_eq!(
            (reply.nat_addr, reply.nat_port, reply.flags),
            ([10, 96, 0, 10], 80, CT_FLAG_REPLY)
        );
        // The node port flow keeps kube-proxy's SNAT: the backend saw 192.0.2.11:61234.
        let (fwd_key, fwd) = entries[2];
        assert_eq!(fwd.flags, CT_FLAG_SNAT);
        assert_eq!((fwd.peer_addr, fwd.peer_port), ([192, 0, 2, 11], 61234));
        let (reply_key, reply) = entries[3];
        assert_eq!(reply_key, fwd_key.reply_of(&fwd));
        assert_eq!(
            reply_key,
            CtKey::new([10, 244, 2, 11], [192, 0, 2, 11], 8080, 61234, IPPROTO_TCP)
        );
        assert_eq!(
            reply_key.forward_of(&reply),
            fwd_key,
            "the two entries name each other"
        );
    }

    #[test]
    fn ctnetlink_attributes_parse() {
        // CTA_TUPLE_IP{src 10.0.0.1, dst 10.96.0.10}, CTA_TUPLE_PROTO{6, 40000, 80}.
        let attr = |kind: u16, payload: &[u8]| {
            let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(payload);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out
        };
        let ip = [attr(1, &[10, 0, 0, 1]), attr(2, &[10, 96, 0, 10])].concat();
        let proto = [
            attr(1, &[6]),
            attr(2, &40000u16.to_be_bytes()),
            attr(3, &80u16.to_be_bytes()),
        ]
        .concat();
        let tuple_attrs = [attr(1 | 0x8000, &ip), attr(2 | 0x8000, &proto)].concat();
        assert_eq!(
            parse_tuple(&tuple_attrs),
            Some((6, tuple("10.0.0.1", 40000, "10.96.0.10", 80)))
        );
    }
}
