//! Address and port rewrites. Addresses, ports and the IP header checksum are written with
//! direct packet access; the L4 checksum goes through `bpf_l4_csum_replace` with a
//! precomputed difference — one call for the addresses (they are in the pseudo-header, whose
//! handling depends on the skb's checksum state, e.g. CHECKSUM_PARTIAL from a local veth) and
//! one for the ports. Two helper calls per packet instead of one per field.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{IPPROTO_UDP, Ipv4, Ipv6};

use crate::packet::{IP_CSUM_OFF, MAX_L4_OFF, Packet};

type Result = core::result::Result<(), i64>;

/// The new source and destination; a field equal to the packet's is left alone. (Plain
/// values, not `Option`s: a `None`'s undefined payload lets LLVM spill any register, and the
/// verifier rejects a partial spill of a pointer.)
#[derive(Clone, Copy, Default)]
pub struct Rewrite<A = Ipv4> {
    pub saddr: A,
    pub sport: u16,
    pub daddr: A,
    pub dport: u16,
}

/// One's-complement addition with end-around carry (the kernel's `csum_add`).
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(carry as u32)
}

/// The difference replacing `old` with `new` makes to a one's-complement sum.
#[inline(always)]
fn csum_replace(diff: u32, old: u32, new: u32) -> u32 {
    csum_add(csum_add(diff, !old), new)
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn ptr_at_mut<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[repr(C)]
struct Addresses {
    check: u16,
    saddr: Ipv4,
    daddr: Ipv4,
}

/// Where IPv6's addresses start in its header.
const IPV6_SADDR_OFF: usize = 8;

#[inline(always)]
pub fn rewrite<const L2: usize>(ctx: &TcContext, pkt: &Packet, r: Rewrite) -> Result {
    // Differences, with every value as it sits in the packet (network order).
    let mut addr_diff = 0u32;
    let (saddr, daddr) = (r.saddr, r.daddr);
    if saddr != pkt.saddr {
        addr_diff = csum_replace(
            addr_diff,
            u32::from_ne_bytes(pkt.saddr),
            u32::from_ne_bytes(saddr),
        );
    }
    if daddr != pkt.daddr {
        addr_diff = csum_replace(
            addr_diff,
            u32::from_ne_bytes(pkt.daddr),
            u32::from_ne_bytes(daddr),
        );
    }
    // The IP header: addresses, and its checksum updated by the same difference (RFC 1624).
    if saddr != pkt.saddr || daddr != pkt.daddr {
        let ip = ptr_at_mut::<Addresses>(ctx, L2 + IP_CSUM_OFF).ok_or(-1i64)?;
        // SAFETY: bounds checked by ptr_at_mut; the program may write packet data.
        unsafe {
            let check = !fold(csum_add((!(*ip).check) as u32 & 0xffff, addr_diff));
            (*ip).check = check;
            (*ip).saddr = saddr;
            (*ip).daddr = daddr;
        }
    }
    ports_and_l4_checksum(ctx, pkt, addr_diff, r.sport, r.dport)
}

/// `rewrite` for IPv6: no header checksum; the addresses enter the L4 checksum through the
/// pseudo-header, as IPv4's do. A frame of its own (see `family::translate_and_forward6`).
#[inline(never)]
pub fn rewrite6<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>, r: Rewrite<Ipv6>) -> Result {
    let mut addr_diff = 0u32;
    for (old, new) in [(&pkt.saddr, &r.saddr), (&pkt.daddr, &r.daddr)] {
        if old != new {
            for (old, new) in old.words().into_iter().zip(new.words()) {
                addr_diff = csum_replace(addr_diff, old, new);
            }
        }
    }
    if r.saddr != pkt.saddr || r.daddr != pkt.daddr {
        let ip = ptr_at_mut::<[Ipv6; 2]>(ctx, L2 + IPV6_SADDR_OFF).ok_or(-1i64)?;
        // SAFETY: bounds checked by ptr_at_mut; the program may write packet data.
        unsafe { *ip = [r.saddr, r.daddr] };
    }
    ports_and_l4_checksum(ctx, pkt, addr_diff, r.sport, r.dport)
}

/// The ports, and the L4 checksum for them and for the addresses' difference `addr_diff`
/// (the part of the rewrite every family shares).
#[inline(always)]
fn ports_and_l4_checksum<A>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    addr_diff: u32,
    sport: u16,
    dport: u16,
) -> Result {
    let mut port_diff = 0u32;
    // A later fragment has no L4 header: only its addresses change (the first fragment's
    // L4 checksum covers the whole datagram, ports and pseudo-header included).
    let (sport, dport) = if pkt.has_l4_header() {
        (sport, dport)
    } else {
        (pkt.sport, pkt.dport)
    };
    if sport != pkt.sport {
        port_diff = csum_replace(port_diff, pkt.sport.to_be() as u32, sport.to_be() as u32);
    }
    if dport != pkt.dport {
        port_diff = csum_replace(port_diff, pkt.dport.to_be() as u32, dport.to_be() as u32);
    }

    if sport != pkt.sport || dport != pkt.dport {
        // Bounded for the verifier: a packet offset it cannot prove small is refused.
        let l4_off = pkt.l4_off as usize;
        if l4_off > MAX_L4_OFF {
            return Err(-1);
        }
        let ports = ptr_at_mut::<[u16; 2]>(ctx, l4_off).ok_or(-1i64)?;
        // SAFETY: as above.
        unsafe { *ports = [sport.to_be(), dport.to_be()] };
    }

    // The L4 checksum, by the helper that knows the skb's checksum state. An IPv4 UDP
    // checksum 0 means "none": it stays 0 rather than turning into a wrong value; and a
    // result of 0 is written as 0xffff, so none is ever produced (invalid in IPv6).
    let udp = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if addr_diff != 0 && pkt.has_l4_header() {
        ctx.l4_csum_replace(
            pkt.l4_csum_off(),
            0,
            addr_diff as u64,
            BPF_F_PSEUDO_HDR as u64 | udp,
        )?;
    }
    if port_diff != 0 {
        ctx.l4_csum_replace(pkt.l4_csum_off(), 0, port_diff as u64, udp)?;
    }
    Ok(())
}
