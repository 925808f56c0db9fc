//! Answers the datapath sends itself, turning the received packet into the answer in place
//! and redirecting it back out of the interface it came from:
//! - a TCP reset or an ICMP (ICMPv6) port unreachable (what kube-proxy's REJECT rule sends),
//!   so a client of a service without endpoints fails at once instead of timing out;
//! - the ICMP errors a router sends about a packet it cannot forward (time exceeded,
//!   fragmentation needed), which the node would otherwise send about the *translated*
//!   packet: built here about the packet as the client sent it, so the client's stack
//!   matches the error to its socket (path MTU discovery through services).
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use dataplane_common::{IPPROTO_TCP, Ipv4, Ipv6};

use crate::{
    checksum,
    maps::ANSWER6,
    packet::{ETH_HLEN, Fragment, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_EXC_TTL: u8 = 0;

/// Refuses a connection to a service without endpoints. Inlined: the answer's builder gets
/// the frame, not one more level of the call chain whose stack the verifier caps.
#[inline(always)]
pub fn connection<const L2: usize>(ctx: &TcContext, pkt: &Packet) -> i32 {
    if pkt.proto == IPPROTO_TCP {
        tcp_reset::<L2>(ctx, pkt)
    } else {
        let error = IcmpError::new(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, pkt.daddr);
        icmp_error::<L2>(ctx, pkt, &error)
    }
}

/// A reset for the segment in `ctx`, as RFC 9293 3.10.7.1 builds it, from the address the
/// client sent to. Never inlined: the segment it builds must not sit in the entry point's
/// frame, which every call chain includes.
#[inline(never)]
pub fn tcp_reset<const L2: usize>(ctx: &TcContext, pkt: &Packet) -> i32 {
    let pseudo = pseudo_header_sum(pkt.daddr, pkt.saddr, IPPROTO_TCP, 20);
    let Some(tcp) = reset_segment::<L2, _>(ctx, pkt, pseudo) else {
        return TC_ACT_SHOT;
    };
    let ip = ipv4_header(IPPROTO_TCP, 40, pkt.daddr, pkt.saddr);
    send_back::<L2, 20, 20, 0>(ctx, ETH_P_IP, &ip, &tcp, &[])
}

/// `tcp_reset` for IPv6.
#[inline(never)]
pub fn tcp_reset6<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>) -> i32 {
    let pseudo = pseudo_header_sum6(&pkt.daddr, &pkt.saddr, IPPROTO_TCP, 20);
    let Some(tcp) = reset_segment::<L2, _>(ctx, pkt, pseudo) else {
        return TC_ACT_SHOT;
    };
    let ip = ipv6_header(IPPROTO_TCP, 20, &pkt.daddr, &pkt.saddr);
    send_back::<L2, 40, 20, 0>(ctx, ETH_P_IPV6, &ip, &tcp, &[])
}

/// The reset segment (RFC 9293 3.10.7.1) answering the segment in `ctx`, its checksum over
/// the pseudo-header sum `pseudo`; `None` for a reset (never answered) or a later fragment.
#[inline(always)]
fn reset_segment<const L2: usize, A>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    pseudo: u64,
) -> Option<[u8; 20]> {
    if pkt.tcp_flags & TCP_RST != 0 || !pkt.has_l4_header() {
        return None;
    }
    let l4 = pkt.l4_off as usize;
    let (Ok(seq), Ok(ack), Ok(data_off)) = (
        ctx.load::<u32>(l4 + 4),
        ctx.load::<u32>(l4 + 8),
        ctx.load::<u8>(l4 + 12),
    ) else {
        return None;
    };
    let (rst_seq, rst_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (u32::from_be(ack), 0, TCP_RST)
    } else {
        // The IP header (and IPv6's extension headers) and the TCP header are not data.
        let header_len = (l4 - L2) as u32 + ((data_off >> 4) as u32) * 4;
        let mut consumed = (pkt.ip_len as u32).saturating_sub(header_len);
        if pkt.tcp_flags & TCP_SYN != 0 {
            consumed += 1;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            consumed += 1;
        }
        (
            0,
            u32::from_be(seq).wrapping_add(consumed),
            TCP_RST | TCP_ACK,
        )
    };

    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&pkt.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&pkt.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    let csum = checksum::finish(checksum::add_bytes(pseudo, &tcp));
    tcp[16] = csum[0];
    tcp[17] = csum[1];
    Some(tcp)
}

/// Refuses a connection to an IPv6 frontend without endpoints: a TCP reset, or ICMPv6 port
/// unreachable (RFC 4443) quoting the datagram's header and first 8 bytes, from the address
/// the client sent to.
#[inline(always)]
pub fn connection6<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>) -> i32 {
    if pkt.proto == IPPROTO_TCP {
        tcp_reset6::<L2>(ctx, pkt)
    } else {
        port_unreachable6::<L2>(ctx, pkt)
    }
}

#[inline(always)]
fn port_unreachable6<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>) -> i32 {
    let error = Icmp6Error {
        icmp_type: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        word: 0,
        from: pkt.daddr,
    };
    icmp6_error::<L2>(ctx, pkt, &error)
}

/// The packet's hop limit ran out on this hop: ICMPv6 time exceeded, from the node (`from`).
pub fn time_exceeded6<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>, from: Ipv6) -> i32 {
    let error = Icmp6Error {
        icmp_type: ICMPV6_TIME_EXCEEDED,
        code: 0,
        word: 0,
        from,
    };
    icmp6_error::<L2>(ctx, pkt, &error)
}

/// The packet is bigger than the next hop's `mtu` (IPv6 routers never fragment): ICMPv6
/// packet too big, from the node (`from`).
pub fn packet_too_big6<const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet<Ipv6>,
    mtu: u16,
    from: Ipv6,
) -> i32 {
    let error = Icmp6Error {
        icmp_type: ICMPV6_PACKET_TOO_BIG,
        code: 0,
        word: mtu as u32,
        from,
    };
    icmp6_error::<L2>(ctx, pkt, &error)
}

/// An ICMPv6 error to send (one argument: BPF functions take at most five).
struct Icmp6Error {
    icmp_type: u8,
    code: u8,
    /// The message's second word (packet too big: the MTU).
    word: u32,
    from: Ipv6,
}

/// An ICMPv6 error (RFC 4443) quoting the packet's fixed header and first 8 bytes after it
/// (what a client's stack needs to find its socket), to the packet's source. Never inlined,
/// as `tcp_reset`; assembled in per-CPU scratch memory, not on the stack (the IPv6 chain's
/// budget).
#[inline(never)]
fn icmp6_error<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>, error: &Icmp6Error) -> i32 {
    if pkt.fragment == Fragment::Later {
        return TC_ACT_SHOT;
    }
    let Some(answer) = ANSWER6.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's copy of a per-CPU array value, used by this program run alone.
    let answer = unsafe { &mut *answer };
    // SAFETY: the helper writes exactly `quoted`'s length into it.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            L2 as u32,
            answer.quoted.as_mut_ptr() as *mut _,
            answer.quoted.len() as u32,
        )
    };
    if loaded != 0 {
        return TC_ACT_SHOT;
    }
    let icmp = &mut answer.icmp;
    *icmp = [0u8; 8];
    icmp[0] = error.icmp_type;
    icmp[1] = error.code;
    icmp[4..8].copy_from_slice(&error.word.to_be_bytes());
    let len = (8 + answer.quoted.len()) as u16;
    let pseudo = pseudo_header_sum6(&error.from, &pkt.saddr, IPPROTO_ICMPV6, len);
    let sum = checksum::add_bytes(checksum::add_bytes(pseudo, &answer.icmp), &answer.quoted);
    let csum = checksum::finish(sum);
    answer.icmp[2] = csum[0];
    answer.icmp[3] = csum[1];
    answer.ip = ipv6_header(IPPROTO_ICMPV6, len, &error.from, &pkt.saddr);
    send_back::<L2, 40, 8, 48>(ctx, ETH_P_IPV6, &answer.ip, &answer.icmp, &answer.quoted)
}

/// Where `icmp6_error` assembles its answer (`maps::ANSWER6`).
#[repr(C)]
pub struct Icmp6Answer {
    ip: [u8; 40],
    icmp: [u8; 8],
    quoted: [u8; 48],
}

/// The packet's TTL ran out on this hop: ICMP time exceeded, from the node (`from`).
pub fn time_exceeded<const L2: usize>(ctx: &TcContext, pkt: &Packet, from: Ipv4) -> i32 {
    icmp_error::<L2>(
        ctx,
        pkt,
        &IcmpError::new(ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, 0, from),
    )
}

/// The packet (don't-fragment set) is bigger than the next hop's `mtu`: ICMP fragmentation
/// needed, from the node (`from`).
pub fn fragmentation_needed<const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet,
    mtu: u16,
    from: Ipv4,
) -> i32 {
    let error = IcmpError::new(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu, from);
    icmp_error::<L2>(ctx, pkt, &error)
}

/// An ICMP error to send (one argument: BPF functions take at most five).
struct IcmpError {
    icmp_type: u8,
    code: u8,
    /// The next-hop MTU field (RFC 1191; 0 where unused).
    mtu: u16,
    /// The error's source address.
    from: Ipv4,
}

impl IcmpError {
    #[inline(always)]
    fn new(icmp_type: u8, code: u8, mtu: u16, from: Ipv4) -> Self {
        Self {
            icmp_type,
            code,
            mtu,
            from,
        }
    }
}

/// An ICMP error quoting the packet's IP header and first 8 bytes of its payload (RFC 792).
/// Never inlined, as `tcp_reset`.
#[inline(never)]
fn icmp_error<const L2: usize>(ctx: &TcContext, pkt: &Packet, error: &IcmpError) -> i32 {
    // Quoting an options header is not worth the code, and no error is ever sent about a
    // later fragment (RFC 1122 3.2.2): drop instead.
    if pkt.ip_hlen != 20 || pkt.fragment == Fragment::Later {
        return TC_ACT_SHOT;
    }
    let Ok(quoted) = ctx.load::<[u8; 28]>(L2) else {
        return TC_ACT_SHOT;
    };
    let mut icmp = [0u8; 8];
    icmp[0] = error.icmp_type;
    icmp[1] = error.code;
    icmp[6..8].copy_from_slice(&error.mtu.to_be_bytes());
    let csum = checksum::finish(checksum::add_bytes(checksum::add_bytes(0, &icmp), &quoted));
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    let ip = ipv4_header(IPPROTO_ICMP, 20 + 8 + 28, error.from, pkt.saddr);
    send_back::<L2, 20, 8, 28>(ctx, ETH_P_IP, &ip, &icmp, &quoted)
}

fn pseudo_header_sum(saddr: Ipv4, daddr: Ipv4, proto: u8, len: u16) -> u64 {
    let sum = checksum::add_bytes(0, &saddr);
    let sum = checksum::add_bytes(sum, &daddr);
    sum + proto as u64 + len as u64
}

fn ipv4_header(proto: u8, total_len: u16, saddr: Ipv4, daddr: Ipv4) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64; // TTL
    h[9] = proto;
    h[12..16].copy_from_slice(&saddr);
    h[16..20].copy_from_slice(&daddr);
    let csum = checksum::finish(checksum::add_bytes(0, &h));
    h[10] = csum[0];
    h[11] = csum[1];
    h
}

/// The IPv6 pseudo-header's sum (RFC 8200 8.1).
fn pseudo_header_sum6(saddr: &Ipv6, daddr: &Ipv6, proto: u8, len: u16) -> u64 {
    let sum = checksum::add_bytes(0, &saddr.octets);
    let sum = checksum::add_bytes(sum, &daddr.octets);
    sum + proto as u64 + len as u64
}

fn ipv6_header(proto: u8, payload_len: u16, saddr: &Ipv6, daddr: &Ipv6) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = proto;
    h[7] = 64; // hop limit
    h[8..24].copy_from_slice(&saddr.octets);
    h[24..40].copy_from_slice(&daddr.octets);
    h
}

/// Rewrites the frame as `ip | l4 | payload` (on Ethernet, with the MAC addresses swapped and
/// `ethertype`), and sends it back out of the interface it arrived on (towards the client).
fn send_back<const L2: usize, const H: usize, const L4: usize, const P: usize>(
    ctx: &TcContext,
    ethertype: u16,
    ip: &[u8; H],
    l4: &[u8; L4],
    payload: &[u8; P],
) -> i32 {
    let mut eth = [0u8; 14];
    if L2 == ETH_HLEN {
        let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
            return TC_ACT_SHOT;
        };
        eth[0..6].copy_from_slice(&macs[6..12]);
        eth[6..12].copy_from_slice(&macs[0..6]);
        eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }
    let len = (L2 + H + L4 + P) as u32;
    // SAFETY: the skb is the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return TC_ACT_SHOT;
    }
    let stored = (if L2 == ETH_HLEN {
        ctx.store(0, &eth, 0)
    } else {
        Ok(())
    })
    .and_then(|()| ctx.store(L2, ip, 0))
    .and_then(|()| ctx.store(L2 + H, l4, 0))
    .and_then(|()| {
        if P > 0 {
            ctx.store(L2 + H + L4, payload, 0)
        } else {
            Ok(())
        }
    });
    if stored.is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: reads the ingress ifindex from the program's own context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}
