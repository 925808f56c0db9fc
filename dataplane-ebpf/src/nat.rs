//! Address and port rewrites with incremental IP and L4 checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{IPPROTO_UDP, Ipv4};

use crate::packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet};

type Result = core::result::Result<(), i64>;

/// UDP checksum 0 means "none": keep it 0 instead of turning it into a wrong value.
#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn set_addr(ctx: &TcContext, pkt: &Packet, field_off: usize, old: Ipv4, new: Ipv4) -> Result {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    // The address is part of the L4 pseudo-header, so both checksums change.
    ctx.l4_csum_replace(
        pkt.l4_csum_off(),
        from,
        to,
        BPF_F_PSEUDO_HDR as u64 | 4 | l4_flags(pkt),
    )?;
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)?;
    ctx.store(field_off, &new, 0)
}

#[inline(always)]
fn set_port(ctx: &TcContext, pkt: &Packet, field_off: usize, old: u16, new: u16) -> Result {
    if old == new {
        return Ok(());
    }
    let (from, to) = (old.to_be() as u64, new.to_be() as u64);
    ctx.l4_csum_replace(pkt.l4_csum_off(), from, to, 2 | l4_flags(pkt))?;
    ctx.store(field_off, &new.to_be(), 0)
}

pub fn set_source(ctx: &TcContext, pkt: &Packet, addr: Ipv4, port: u16) -> Result {
    set_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off(), pkt.sport, port)
}

pub fn set_destination(ctx: &TcContext, pkt: &Packet, addr: Ipv4, port: u16) -> Result {
    set_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off() + 2, pkt.dport, port)
}

pub fn set_source_addr(ctx: &TcContext, pkt: &Packet, addr: Ipv4) -> Result {
    set_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr, addr)
}

pub fn set_destination_addr(ctx: &TcContext, pkt: &Packet, addr: Ipv4) -> Result {
    set_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr, addr)
}
