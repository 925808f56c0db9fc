//! Header parsing with direct packet access: the fields the datapath needs, copied out once,
//! so later rewrites (which invalidate packet pointers) work from these copies.
use aya_ebpf::programs::TcContext;
use dataplane_common::{IPPROTO_TCP, IPPROTO_UDP, Ipv4};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header, relative to the frame start.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath knows about an IPv4 TCP/UDP packet. Ports are host order.
pub struct Packet {
    pub saddr: Ipv4,
    pub daddr: Ipv4,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// IPv4 header length in bytes; the L4 header starts at `ETH_HLEN + ip_hlen`.
    pub ip_hlen: usize,
    /// IP total length, the byte count the counters use.
    pub ip_len: u16,
}

impl Packet {
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.ip_hlen
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off() + if self.proto == IPPROTO_TCP { 16 } else { 6 }
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

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
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
/// Ethernet, a maximal IPv4 header and the TCP header up to its flags.
const PARSE_LEN: u32 = (ETH_HLEN + 60 + 14) as u32;

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return None;
    }
    if ctx.data_end() - ctx.data() < PARSE_LEN as usize
        && ctx.len() > ctx.data_end() as u32 - ctx.data() as u32
    {
        // Headers may sit in paged data; make them linear (rare on veth).
        ctx.pull_data(core::cmp::min(ctx.len(), PARSE_LEN)).ok()?;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ip_hlen = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip_hlen < 20 || u16::from_be(ip.frag_off) & 0x1fff != 0 {
        return None;
    }
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let (saddr, daddr, ip_len) = (ip.saddr, ip.daddr, u16::from_be(ip.tot_len));
    let l4 = ETH_HLEN + ip_hlen;
    let ports = ptr_at::<[u16; 2]>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let [sport, dport] = unsafe { *ports };
    let tcp_flags = if proto == IPPROTO_TCP {
        // SAFETY: bounds checked by ptr_at.
        unsafe { *ptr_at::<u8>(ctx, l4 + 13)? }
    } else {
        0
    };
    Some(Packet {
        saddr,
        daddr,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        proto,
        tcp_flags,
        ip_hlen,
        ip_len,
    })
}
