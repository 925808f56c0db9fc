//! ICMP errors about translated flows, translated back (as conntrack's NAT does), so the
//! host that gets one sees it about the addresses it used: a client learns "port
//! unreachable" about the cluster IP it sent to, and a backend learns "fragmentation needed"
//! about its own reply, so path MTU discovery keeps working through the service.
//!
//! Two directions, told apart by which conntrack entry the quoted packet matches:
//! - about a packet towards a backend (quoted: client -> backend): the error travels back to
//!   the client; its quoted destination becomes the frontend again (and, for SNATed flows,
//!   its quoted source and outer destination the client again);
//! - about a backend's reply (quoted: frontend -> client): the error travels to the frontend
//!   address; it goes to the backend instead, quoting the packet as the backend sent it.
//!
//! Rare packets: parsed with bpf_skb_load_bytes, off the per-packet fast path.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use dataplane_common::{
    CT_FLAG_HAIRPIN, CT_FLAG_REPLY, CT_FLAG_SNAT, CtKey, IPPROTO_TCP, IPPROTO_UDP, Ipv4,
};

use crate::{
    family::V4,
    forward::forward_icmp_error,
    maps::Conntrack,
    packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, is_ipv4},
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

struct IcmpError {
    ttl: u8,
    outer_saddr: Ipv4,
    outer_daddr: Ipv4,
    proto: u8,
    inner_saddr: Ipv4,
    inner_daddr: Ipv4,
    inner_sport: u16,
    inner_dport: u16,
}

fn parse<const L2: usize>(ctx: &TcContext) -> Option<IcmpError> {
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

type Result = core::result::Result<(), i64>;

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
pub fn translate_error<const L2: usize>(ctx: &TcContext) -> i32 {
    let Some(e) = parse::<L2>(ctx) else {
        return TC_ACT_OK;
    };
    // The quoted tuple, turned around, is the tuple of the flow's other direction.
    let key = CtKey::new(
        e.inner_daddr,
        e.inner_saddr,
        e.inner_dport,
        e.inner_sport,
        e.proto,
    );
    let Some(entry) = Conntrack::<V4>::get_ptr(&key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a value from a lookup in this run; copied out at once.
    let entry = unsafe { *entry };
    if entry.flags & CT_FLAG_REPLY != 0 {
        // About a packet towards a backend.
        let client = entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0;
        let rewritten = set_inner_addr::<L2>(ctx, INNER_DADDR_OFF, e.inner_daddr, entry.nat_addr)
            .and_then(|()| {
                set_inner_port::<L2>(ctx, INNER_DPORT_OFF, e.inner_dport, entry.nat_port)
            })
            .and_then(|()| {
                // An error from the backend itself now comes from the frontend.
                if e.outer_saddr == e.inner_daddr {
                    set_outer_addr::<L2>(ctx, IP_SADDR_OFF, e.outer_saddr, entry.nat_addr)
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
                set_inner_addr::<L2>(ctx, INNER_SADDR_OFF, e.inner_saddr, entry.peer_addr)
                    .and_then(|()| set_inner_port::<L2>(ctx, INNER_SPORT_OFF, e.inner_sport, port))
                    .and_then(|()| {
                        set_outer_addr::<L2>(ctx, IP_DADDR_OFF, e.outer_daddr, entry.peer_addr)
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
        return forward::<L2>(ctx, rewritten, saddr, daddr, e.ttl);
    }
    // About a backend's reply as the client saw it (the entry is the forward one).
    if entry.flags & CT_FLAG_HAIRPIN != 0 {
        return TC_ACT_OK;
    }
    let rewritten = set_inner_addr::<L2>(ctx, INNER_SADDR_OFF, e.inner_saddr, entry.nat_addr)
        .and_then(|()| set_inner_port::<L2>(ctx, INNER_SPORT_OFF, e.inner_sport, entry.nat_port))
        .and_then(|()| set_outer_addr::<L2>(ctx, IP_DADDR_OFF, e.outer_daddr, entry.nat_addr))
        .and_then(|()| {
            if entry.flags & CT_FLAG_SNAT == 0 {
                return Ok(());
            }
            set_inner_addr::<L2>(ctx, INNER_DADDR_OFF, e.inner_daddr, entry.peer_addr).and_then(
                |()| set_inner_port::<L2>(ctx, INNER_DPORT_OFF, e.inner_dport, entry.peer_port),
            )
        });
    forward::<L2>(ctx, rewritten, e.outer_saddr, entry.nat_addr, e.ttl)
}

/// A translated error goes on like the flow's own packets (past netfilter, which tracks no
/// flow it belongs to and would call it INVALID).
#[inline(always)]
fn forward<const L2: usize>(
    ctx: &TcContext,
    rewritten: Result,
    saddr: Ipv4,
    daddr: Ipv4,
    ttl: u8,
) -> i32 {
    match rewritten {
        Ok(()) => forward_icmp_error::<L2>(ctx, saddr, daddr, ttl),
        Err(_) => aya_ebpf::bindings::TC_ACT_SHOT,
    }
}
