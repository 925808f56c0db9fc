//! Header parsing with direct packet access: the fields the datapath needs, copied out once,
//! so later rewrites (which invalidate packet pointers) work from these copies.
//!
//! `L2` is the length of the link-layer header in front of the IPv4 header: 14 on Ethernet
//! devices (veths, bridges, VXLAN), 0 on Layer-3 devices (WireGuard, IPIP, TUN), where the
//! packet starts with its IP header. Each program is compiled for one of the two, so every
//! offset stays a constant the verifier sees.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use dataplane_common::{
    FRAGMENT_TIMEOUT_NS, FragmentKey, FragmentKey6, FragmentPorts, IPPROTO_TCP, IPPROTO_UDP, Ipv4,
    Ipv6,
};

use crate::maps::{FRAGMENTS, FRAGMENTS6};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets inside the IPv4 header.
pub const IP_TTL_OFF: usize = 8;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 flags and fragment offset (host order).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Where a packet stands in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the L4 header, the rest of the datagram follows.
    First,
    /// A later fragment: no L4 header; its ports come from the first fragment.
    Later,
}

/// What the datapath knows about a TCP/UDP packet of either family (`A`: `Ipv4`, `Ipv6`).
/// Ports are host order.
pub struct Packet<A = Ipv4> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// TTL, or IPv6's hop limit.
    pub ttl: u8,
    /// The don't-fragment bit is set: a packet too big for the next hop is answered with
    /// ICMP "fragmentation needed" instead of being fragmented. (IPv6: always.)
    pub dont_fragment: bool,
    pub fragment: Fragment,
    /// IPv4 identification or the IPv6 fragment header's (network order), which groups
    /// fragments.
    pub ip_id: u32,
    /// Offset of the L4 header from the frame start (link header + IPv4 header). Small
    /// integer types throughout: this struct lives on the entry point's stack, whose budget
    /// the whole call chain shares.
    pub l4_off: u16,
    /// IP total length, the byte count the counters use.
    pub ip_len: u16,
    /// IPv4 header length in bytes (IPv6: 40, its fixed header).
    pub ip_hlen: u8,
}

impl<A> Packet<A> {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off as usize + if self.proto == IPPROTO_TCP { 16 } else { 6 }
    }

    /// The packet carries an L4 header (not a later fragment).
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.fragment != Fragment::Later
    }

    /// A TCP segment that ends a connection (FIN or RST).
    #[inline(always)]
    pub fn is_tcp_close(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

impl<A> Packet<A> {
    /// A first fragment's ports, as its datagram's later fragments are to find them (`None`
    /// for anything but a first fragment).
    #[inline(always)]
    fn first_fragment_ports(&self, now: u64) -> Option<FragmentPorts> {
        (self.fragment == Fragment::First).then_some(FragmentPorts {
            sport: self.sport,
            dport: self.dport,
            _pad: [0; 4],
            first_seen_ns: now,
        })
    }

    /// A later fragment takes the ports its first fragment had (`known`). Without them, or
    /// with stale ones, it cannot be matched to a flow (not one the datapath translates, or
    /// its first fragment was lost or overtaken): `None`, and the stack gets it as it is.
    #[inline(always)]
    fn take_fragment_ports(&mut self, known: Option<*const FragmentPorts>) -> Option<()> {
        // SAFETY: a value from a lookup in this run.
        let ports = unsafe { *known? };
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if now.saturating_sub(ports.first_seen_ns) > FRAGMENT_TIMEOUT_NS {
            return None;
        }
        self.sport = ports.sport;
        self.dport = ports.dport;
        Some(())
    }
}

impl Packet<Ipv4> {
    /// The key grouping this packet's datagram's fragments.
    #[inline(always)]
    fn fragment_key(&self) -> FragmentKey {
        FragmentKey {
            saddr: self.saddr,
            daddr: self.daddr,
            id: self.ip_id as u16,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// A first fragment of a datagram the datapath translates: its ports are remembered so
    /// the later fragments (no L4 header) find the same flow.
    #[inline(always)]
    pub fn remember_fragment_ports(&self, now: u64) {
        if let Some(ports) = self.first_fragment_ports(now) {
            let _ = FRAGMENTS.insert(&self.fragment_key(), &ports, 0);
        }
    }
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: Ipv4,
    daddr: Ipv4,
}

/// Bytes from the frame start that parsing needs in the linear part of the skb at most:
/// the link header, a maximal IPv4 header and the TCP header up to its flags.
const PARSE_LEN: u32 = (ETH_HLEN + 60 + 14) as u32;

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Is this an IPv4 packet? On Ethernet, by its EtherType; on a Layer-3 device, by the skb's
/// protocol (set by the device from the packet's version).
#[inline(always)]
pub fn is_ipv4<const L2: usize>(ctx: &TcContext) -> bool {
    if L2 == ETH_HLEN {
        match ptr_at::<u16>(ctx, 12) {
            // SAFETY: bounds checked by ptr_at.
            Some(proto) => unsafe { *proto == ETH_P_IP.to_be() },
            None => false,
        }
    } else {
        // SAFETY: reads the program's own context.
        unsafe { (*ctx.skb.skb).protocol == ETH_P_IP.to_be() as u32 }
    }
}

/// An IPv4 TCP/UDP packet. The caller has checked the family (`is_ipv4`): the entry point
/// dispatches on it once.
#[inline(always)]
pub fn parse<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    if ctx.data_end() - ctx.data() < PARSE_LEN as usize
        && ctx.len() > ctx.data_end() as u32 - ctx.data() as u32
    {
        // Headers may sit in paged data; make them linear (rare on veth).
        ctx.pull_data(core::cmp::min(ctx.len(), PARSE_LEN)).ok()?;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, L2)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ip_hlen = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip_hlen < 20 {
        return None;
    }
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let frag_off = u16::from_be(ip.frag_off);
    let fragment = if frag_off & IP_OFFSET != 0 {
        Fragment::Later
    } else if frag_off & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    let mut pkt = Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        ttl: ip.ttl,
        dont_fragment: frag_off & IP_DF != 0,
        fragment,
        ip_id: ip.id as u32,
        l4_off: (L2 + ip_hlen) as u16,
        ip_len: u16::from_be(ip.tot_len),
        ip_hlen: ip_hlen as u8,
    };
    if fragment == Fragment::Later {
        pkt.take_fragment_ports(FRAGMENTS.get_ptr(&pkt.fragment_key()))?;
        return Some(pkt);
    }
    let l4_off = L2 + ip_hlen;
    let ports = ptr_at::<[u16; 2]>(ctx, l4_off)?;
    // SAFETY: bounds checked by ptr_at.
    let [sport, dport] = unsafe { *ports };
    pkt.sport = u16::from_be(sport);
    pkt.dport = u16::from_be(dport);
    if proto == IPPROTO_TCP {
        // SAFETY: bounds checked by ptr_at.
        pkt.tcp_flags = unsafe { *ptr_at::<u8>(ctx, l4_off + 13)? };
    }
    Some(pkt)
}

impl Packet<Ipv6> {
    #[inline(always)]
    fn fragment_key6(&self) -> FragmentKey6 {
        FragmentKey6 {
            saddr: self.saddr,
            daddr: self.daddr,
            id: self.ip_id,
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// `remember_fragment_ports` for IPv6 datagrams. A frame of its own: its key is large,
    /// and it runs for first fragments only.
    #[inline(never)]
    pub fn remember_fragment_ports6(&self, now: u64) {
        if let Some(ports) = self.first_fragment_ports(now) {
            let _ = FRAGMENTS6.insert(&self.fragment_key6(), &ports, 0);
        }
    }
}

#[repr(C)]
struct Ipv6Hdr {
    version_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: Ipv6,
    daddr: Ipv6,
}

const IPV6_HLEN: usize = 40;
/// Extension headers walked before the L4 header, at most (RFC 8200's recommended order has
/// hop-by-hop, destination options, routing, fragment, destination options): a fixed bound,
/// so the loop unrolls; a packet with more is not a service packet here.
const IPV6_MAX_EXTENSIONS: usize = 5;
/// Where an L4 header may start at most (an IPv6 extension walk stops beyond it; IPv4's is
/// at most 74): every offset stays a range the verifier can follow.
pub const MAX_L4_OFF: usize = 512;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Fragment header: offset in 8-byte units (top 13 bits) and the more-fragments bit.
const IPV6_FRAG_OFFSET: u16 = 0xfff8;
const IPV6_FRAG_MF: u16 = 0x0001;
/// Bytes parsing needs in the linear part at most: link header, fixed header, a few small
/// extension headers, the TCP header up to its flags.
const PARSE_LEN6: u32 = (ETH_HLEN + IPV6_HLEN + 64 + 14) as u32;

#[repr(C)]
struct Ipv6FragHdr {
    next_header: u8,
    _reserved: u8,
    frag_off: u16,
    id: u32,
}

/// Is this an IPv6 packet? (See `is_ipv4`.)
#[inline(always)]
pub fn is_ipv6<const L2: usize>(ctx: &TcContext) -> bool {
    if L2 == ETH_HLEN {
        match ptr_at::<u16>(ctx, 12) {
            // SAFETY: bounds checked by ptr_at.
            Some(proto) => unsafe { *proto == ETH_P_IPV6.to_be() },
            None => false,
        }
    } else {
        // SAFETY: reads the program's own context.
        unsafe { (*ctx.skb.skb).protocol == ETH_P_IPV6.to_be() as u32 }
    }
}

/// An IPv6 TCP/UDP packet, after its extension headers (hop-by-hop, routing, destination
/// options, fragment). Anything else (ICMPv6, neighbour discovery, more extension headers
/// than the bound) is `None` and passes untouched.
#[inline(always)]
///
/// Written into `pkt` (per-CPU scratch memory: on the stack it would not fit the verifier's
/// budget for the IPv6 call chain).
pub fn parse6<const L2: usize>(ctx: &TcContext, pkt: &mut Packet<Ipv6>) -> Option<()> {
    if ctx.data_end() - ctx.data() < PARSE_LEN6 as usize
        && ctx.len() > ctx.data_end() as u32 - ctx.data() as u32
    {
        ctx.pull_data(core::cmp::min(ctx.len(), PARSE_LEN6)).ok()?;
    }
    let ip = ptr_at::<Ipv6Hdr>(ctx, L2)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let mut next = ip.next_header;
    let mut off = L2 + IPV6_HLEN;
    let mut fragment = Fragment::None;
    let mut id = 0u32;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // SAFETY: bounds checked by ptr_at.
                let [following, len] = unsafe { *ptr_at::<[u8; 2]>(ctx, off)? };
                next = following;
                off += (len as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                // SAFETY: bounds checked by ptr_at.
                let frag = unsafe { &*ptr_at::<Ipv6FragHdr>(ctx, off)? };
                next = frag.next_header;
                let frag_off = u16::from_be(frag.frag_off);
                fragment = if frag_off & IPV6_FRAG_OFFSET != 0 {
                    Fragment::Later
                } else if frag_off & IPV6_FRAG_MF != 0 {
                    Fragment::First
                } else {
                    Fragment::None // an atomic fragment: a whole datagram
                };
                id = frag.id;
                off += 8;
            }
            _ => break,
        }
        if off > MAX_L4_OFF {
            return None;
        }
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return None;
    }
    *pkt = Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: next,
        tcp_flags: 0,
        ttl: ip.hop_limit,
        dont_fragment: true,
        fragment,
        ip_id: id,
        l4_off: off as u16,
        ip_len: u16::from_be(ip.payload_len).saturating_add(IPV6_HLEN as u16),
        ip_hlen: IPV6_HLEN as u8,
    };
    if fragment == Fragment::Later {
        return pkt.take_fragment_ports(FRAGMENTS6.get_ptr(&pkt.fragment_key6()));
    }
    let ports = ptr_at::<[u16; 2]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let [sport, dport] = unsafe { *ports };
    pkt.sport = u16::from_be(sport);
    pkt.dport = u16::from_be(dport);
    if next == IPPROTO_TCP {
        // SAFETY: bounds checked by ptr_at.
        pkt.tcp_flags = unsafe { *ptr_at::<u8>(ctx, off + 13)? };
    }
    Some(())
}
