//! ICMP errors about translated flows, translated back (as conntrack's NAT does), so the
//! host that gets one sees it about the addresses it used: a client learns "port
//! unreachable" about the cluster IP it sent to, and a backend learns "fragmentation needed"
//! ("packet too big" in ICMPv6) about its own reply, so path MTU discovery keeps working
//! through the service.
//!
//! Two directions, told apart by which conntrack entry the quoted packet matches:
//! - about a packet towards a backend (quoted: client -> backend): the error travels back to
//!   the client; its quoted destination becomes the frontend again (and, for SNATed flows,
//!   its quoted source and outer destination the client again);
//! - about a backend's reply (quoted: frontend -> client): the error travels to the frontend
//!   address; it goes to the backend instead, quoting the packet as the backend sent it.
//!
//! Written once over `IcmpFamily`: where each family keeps the fields, and how a change
//! enters its checksums (IPv4: the quoted header's own checksum absorbs address changes;
//! ICMPv6: its checksum covers the outer pseudo-header and the whole quote).
//!
//! Rare packets: parsed with bpf_skb_load_bytes, off the per-packet fast path.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    CT_FLAG_HAIRPIN, CT_FLAG_REPLY, CT_FLAG_SNAT, CtKeyOf, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6,
};

use crate::{
    family::{PacketFamily, V4, V6},
    forward::{Forwarding, forward_icmp_error},
    maps::Conntrack,
    packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, is_ipv4, is_ipv6},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Offsets from the IP header. The outer header must be option-free, as must the quoted one:
/// the offsets are fixed.
const ICMP_OFF: usize = 20;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
const INNER_IP_OFF: usize = ICMP_OFF + 8;
const INNER_CSUM_OFF: usize = INNER_IP_OFF + 10;
const INNER_SADDR_OFF: usize = INNER_IP_OFF + 12;
const INNER_DADDR_OFF: usize = INNER_IP_OFF + 16;
const INNER_SPORT_OFF: usize = INNER_IP_OFF + 20;
const INNER_DPORT_OFF: usize = INNER_IP_OFF + 22;

const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// ICMPv6 offsets from the IPv6 header: no extension headers, outer or quoted.
const ICMP6_OFF: usize = 40;
const ICMP6_CSUM_OFF: usize = ICMP6_OFF + 2;
const INNER6_IP_OFF: usize = ICMP6_OFF + 8;
const INNER6_SADDR_OFF: usize = INNER6_IP_OFF + 8;
const INNER6_DADDR_OFF: usize = INNER6_IP_OFF + 24;
const INNER6_SPORT_OFF: usize = INNER6_IP_OFF + 40;
const INNER6_DPORT_OFF: usize = INNER6_IP_OFF + 42;
const IP6_SADDR_OFF: usize = 8;
const IP6_DADDR_OFF: usize = 24;

/// The fields of an ICMP error a translation rewrites.
#[derive(Clone, Copy)]
enum Field {
    OuterSaddr,
    OuterDaddr,
    InnerSaddr,
    InnerDaddr,
}

#[derive(Clone, Copy)]
enum PortField {
    InnerSport,
    InnerDport,
}

/// What translating ICMP errors needs of a family.
trait IcmpFamily: PacketFamily<Addr: Forwarding> {
    /// The ICMP protocol number (for the FIB lookup).
    const ICMP: u8;
    fn parse<const L2: usize>(ctx: &TcContext) -> Option<IcmpError<Self::Addr>>;
    fn set_addr<const L2: usize>(
        ctx: &TcContext,
        field: Field,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result;
    fn set_port<const L2: usize>(ctx: &TcContext, field: PortField, old: u16, new: u16) -> Result;
}

struct IcmpError<A> {
    ttl: u8,
    outer_saddr: A,
    outer_daddr: A,
    proto: u8,
    inner_saddr: A,
    inner_daddr: A,
    inner_sport: u16,
    inner_dport: u16,
}

type Result = core::result::Result<(), i64>;

fn parse4<const L2: usize>(ctx: &TcContext) -> Option<IcmpError<Ipv4>> {
    if !is_ipv4::<L2>(ctx) {
        return None;
    }
    let outer: [u8; 20] = ctx.load(L2).ok()?;
    let fragment = u16::from_be_bytes([outer[6], outer[7]]) & 0x1fff;
    if outer[0] != 0x45 || outer[9] != IPPROTO_ICMP || fragment != 0 {
        return None;
    }
    let icmp_type: u8 = ctx.load(L2 + ICMP_OFF).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner: [u8; 20] = ctx.load(L2 + INNER_IP_OFF).ok()?;
    let proto = inner[9];
    if inner[0] != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let ports: [u8; 4] = ctx.load(L2 + INNER_SPORT_OFF).ok()?;
    Some(IcmpError {
        ttl: outer[8],
        outer_saddr: [outer[12], outer[13], outer[14], outer[15]],
        outer_daddr: [outer[16], outer[17], outer[18], outer[19]],
        proto,
        inner_saddr: [inner[12], inner[13], inner[14], inner[15]],
        inner_daddr: [inner[16], inner[17], inner[18], inner[19]],
        inner_sport: u16::from_be_bytes([ports[0], ports[1]]),
        inner_dport: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

fn set_outer_addr<const L2: usize>(ctx: &TcContext, off: usize, old: Ipv4, new: Ipv4) -> Result {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l3_csum_replace(L2 + IP_CSUM_OFF, from, to, 4)?;
    ctx.store(L2 + off, &new, 0)
}

/// The quoted header's checksum absorbs the change, so the ICMP checksum (which covers the
/// quoted header) stays right without an update.
fn set_inner_addr<const L2: usize>(ctx: &TcContext, off: usize, old: Ipv4, new: Ipv4) -> Result {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l3_csum_replace(L2 + INNER_CSUM_OFF, from, to, 4)?;
    ctx.store(L2 + off, &new, 0)
}

fn set_inner_port<const L2: usize>(ctx: &TcContext, off: usize, old: u16, new: u16) -> Result {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        L2 + ICMP_CSUM_OFF,
        old.to_be() as u64,
        new.to_be() as u64,
        2,
    )?;
    ctx.store(L2 + off, &new.to_be(), 0)
}

/// Translates an ICMP error about a translated flow; anything else passes untouched.
#[inline(always)]
pub fn translate_error<const L2: usize>(ctx: &TcContext) -> i32 {
    translate::<V4, L2>(ctx)
}

/// `translate_error` for ICMPv6. A frame of its own (the IPv6 chain's stack budget).
#[inline(never)]
pub fn translate_error6<const L2: usize>(ctx: &TcContext) -> i32 {
    translate::<V6, L2>(ctx)
}

#[inline(always)]
fn translate<F: IcmpFamily, const L2: usize>(ctx: &TcContext) -> i32 {
    let Some(e) = F::parse::<L2>(ctx) else {
        return TC_ACT_OK;
    };
    // The quoted tuple, turned around, is the tuple of the flow's other direction.
    let key = CtKeyOf::new(
        e.inner_daddr,
        e.inner_saddr,
        e.inner_dport,
        e.inner_sport,
        e.proto,
    );
    let Some(entry) = Conntrack::<F>::get_ptr(&key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a value from a lookup in this run, read in place.
    let entry = unsafe { &*entry };
    if entry.flags & CT_FLAG_REPLY != 0 {
        // About a packet towards a backend.
        let client = entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0;
        let rewritten = F::set_addr::<L2>(ctx, Field::InnerDaddr, e.inner_daddr, entry.nat_addr)
            .and_then(|()| {
                F::set_port::<L2>(ctx, PortField::InnerDport, e.inner_dport, entry.nat_port)
            })
            .and_then(|()| {
                // An error from the backend itself now comes from the frontend.
                if e.outer_saddr == e.inner_daddr {
                    F::set_addr::<L2>(ctx, Field::OuterSaddr, e.outer_saddr, entry.nat_addr)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                if !client {
                    return Ok(());
                }
                let port = if entry.flags & CT_FLAG_SNAT != 0 {
                    entry.peer_port
                } else {
                    e.inner_sport
                };
                F::set_addr::<L2>(ctx, Field::InnerSaddr, e.inner_saddr, entry.peer_addr)
                    .and_then(|()| {
                        F::set_port::<L2>(ctx, PortField::InnerSport, e.inner_sport, port)
                    })
                    .and_then(|()| {
                        F::set_addr::<L2>(ctx, Field::OuterDaddr, e.outer_daddr, entry.peer_addr)
                    })
            });
        let saddr = if e.outer_saddr == e.inner_daddr {
            entry.nat_addr
        } else {
            e.outer_saddr
        };
        let daddr = if client {
            entry.peer_addr
        } else {
            e.outer_daddr
        };
        return forward::<F, L2>(ctx, rewritten, saddr, daddr, e.ttl);
    }
    // About a backend's reply as the client saw it (the entry is the forward one).
    if entry.flags & CT_FLAG_HAIRPIN != 0 {
        return TC_ACT_OK;
    }
    let rewritten = F::set_addr::<L2>(ctx, Field::InnerSaddr, e.inner_saddr, entry.nat_addr)
        .and_then(|()| F::set_port::<L2>(ctx, PortField::InnerSport, e.inner_sport, entry.nat_port))
        .and_then(|()| F::set_addr::<L2>(ctx, Field::OuterDaddr, e.outer_daddr, entry.nat_addr))
        .and_then(|()| {
            if entry.flags & CT_FLAG_SNAT == 0 {
                return Ok(());
            }
            F::set_addr::<L2>(ctx, Field::InnerDaddr, e.inner_daddr, entry.peer_addr).and_then(
                |()| F::set_port::<L2>(ctx, PortField::InnerDport, e.inner_dport, entry.peer_port),
            )
        });
    forward::<F, L2>(ctx, rewritten, e.outer_saddr, entry.nat_addr, e.ttl)
}

/// A translated error goes on like the flow's own packets (past netfilter, which tracks no
/// flow it belongs to and would call it INVALID).
#[inline(always)]
fn forward<F: IcmpFamily, const L2: usize>(
    ctx: &TcContext,
    rewritten: Result,
    saddr: F::Addr,
    daddr: F::Addr,
    ttl: u8,
) -> i32 {
    match rewritten {
        Ok(()) => forward_icmp_error::<F::Addr, L2>(ctx, F::ICMP, saddr, daddr, ttl),
        Err(_) => TC_ACT_SHOT,
    }
}

impl IcmpFamily for V4 {
    const ICMP: u8 = IPPROTO_ICMP;

    #[inline(always)]
    fn parse<const L2: usize>(ctx: &TcContext) -> Option<IcmpError<Ipv4>> {
        parse4::<L2>(ctx)
    }

    #[inline(always)]
    fn set_addr<const L2: usize>(ctx: &TcContext, field: Field, old: Ipv4, new: Ipv4) -> Result {
        match field {
            Field::OuterSaddr => set_outer_addr::<L2>(ctx, IP_SADDR_OFF, old, new),
            Field::OuterDaddr => set_outer_addr::<L2>(ctx, IP_DADDR_OFF, old, new),
            Field::InnerSaddr => set_inner_addr::<L2>(ctx, INNER_SADDR_OFF, old, new),
            Field::InnerDaddr => set_inner_addr::<L2>(ctx, INNER_DADDR_OFF, old, new),
        }
    }

    #[inline(always)]
    fn set_port<const L2: usize>(ctx: &TcContext, field: PortField, old: u16, new: u16) -> Result {
        let off = match field {
            PortField::InnerSport => INNER_SPORT_OFF,
            PortField::InnerDport => INNER_DPORT_OFF,
        };
        set_inner_port::<L2>(ctx, off, old, new)
    }
}

impl IcmpFamily for V6 {
    const ICMP: u8 = IPPROTO_ICMPV6;

    /// An ICMPv6 destination unreachable, packet too big or time exceeded, quoting a TCP or
    /// UDP packet; no extension headers either side (the offsets are fixed).
    fn parse<const L2: usize>(ctx: &TcContext) -> Option<IcmpError<Ipv6>> {
        if !is_ipv6::<L2>(ctx) {
            return None;
        }
        // Field by field, not whole headers: the IPv6 chain's stack budget.
        let [next_header, hop_limit]: [u8; 2] = ctx.load(L2 + 6).ok()?;
        if next_header != IPPROTO_ICMPV6 {
            return None;
        }
        let icmp_type: u8 = ctx.load(L2 + ICMP6_OFF).ok()?;
        if !matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
        ) {
            return None;
        }
        let version: u8 = ctx.load(L2 + INNER6_IP_OFF).ok()?;
        let proto: u8 = ctx.load(L2 + INNER6_IP_OFF + 6).ok()?;
        if version >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
            return None;
        }
        let ports: [u8; 4] = ctx.load(L2 + INNER6_SPORT_OFF).ok()?;
        Some(IcmpError {
            ttl: hop_limit,
            outer_saddr: ctx.load(L2 + IP6_SADDR_OFF).ok()?,
            outer_daddr: ctx.load(L2 + IP6_DADDR_OFF).ok()?,
            proto,
            inner_saddr: ctx.load(L2 + INNER6_SADDR_OFF).ok()?,
            inner_daddr: ctx.load(L2 + INNER6_DADDR_OFF).ok()?,
            inner_sport: u16::from_be_bytes([ports[0], ports[1]]),
            inner_dport: u16::from_be_bytes([ports[2], ports[3]]),
        })
    }

    /// The address, and the ICMPv6 checksum: the outer addresses through its pseudo-header,
    /// the quoted ones as part of the message.
    fn set_addr<const L2: usize>(ctx: &TcContext, field: Field, old: Ipv6, new: Ipv6) -> Result {
        if old == new {
            return Ok(());
        }
        let (off, pseudo) = match field {
            Field::OuterSaddr => (IP6_SADDR_OFF, true),
            Field::OuterDaddr => (IP6_DADDR_OFF, true),
            Field::InnerSaddr => (INNER6_SADDR_OFF, false),
            Field::InnerDaddr => (INNER6_DADDR_OFF, false),
        };
        let flags = if pseudo { BPF_F_PSEUDO_HDR as u64 } else { 0 };
        for (old, new) in old.words().into_iter().zip(new.words()) {
            ctx.l4_csum_replace(L2 + ICMP6_CSUM_OFF, old as u64, new as u64, 4 | flags)?;
        }
        ctx.store(L2 + off, &new, 0)
    }

    fn set_port<const L2: usize>(ctx: &TcContext, field: PortField, old: u16, new: u16) -> Result {
        if old == new {
            return Ok(());
        }
        let off = match field {
            PortField::InnerSport => INNER6_SPORT_OFF,
            PortField::InnerDport => INNER6_DPORT_OFF,
        };
        ctx.l4_csum_replace(
            L2 + ICMP6_CSUM_OFF,
            old.to_be() as u64,
            new.to_be() as u64,
            2,
        )?;
        ctx.store(L2 + off, &new.to_be(), 0)
    }
}
