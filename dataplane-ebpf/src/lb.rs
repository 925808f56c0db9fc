//! Service load balancing: frontend lookup, conntrack, backend selection, NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use dataplane_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_HAIRPIN, CtEntry, CtKey, HAIRPIN_SNAT_ADDR, SVC_FLAG_DROP_WHEN_EMPTY, ServiceKey,
    ServiceValue, drop_reason,
};

use crate::{
    counters::{count_drop, count_flow_packet, count_service_packet},
    maps::{BACKENDS, CONNTRACK, SERVICES},
    nat,
    packet::Packet,
    refuse,
};

pub fn handle(ctx: &TcContext, pkt: &Packet) -> i32 {
    let frontend = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        backend_slot: 0,
        proto: pkt.proto,
        ..Default::default()
    };
    match SERVICES.get_ptr(frontend) {
        // SAFETY: a value from a lookup in this run; copied out at once.
        Some(service) => to_service(ctx, pkt, &frontend, unsafe { *service }),
        None => from_backend(ctx, pkt),
    }
}

fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        direction: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// The reply tuple of a forward flow: from the backend to whoever it saw as the client.
fn reply_key(pkt: &Packet, entry: &CtEntry) -> CtKey {
    let client = if entry.flags & CT_FLAG_HAIRPIN != 0 {
        entry.peer_addr
    } else {
        pkt.saddr
    };
    CtKey {
        saddr: entry.nat_addr,
        daddr: client,
        sport: entry.nat_port,
        dport: pkt.sport,
        proto: pkt.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// Is the backend this flow was sent to still programmed (same id, same address)?
#[inline(always)]
fn backend_alive(entry: &CtEntry) -> bool {
    match BACKENDS.get_ptr(entry.backend_id) {
        // SAFETY: a value from a lookup in this run.
        Some(b) => unsafe { (*b).addr == entry.nat_addr && (*b).port == entry.nat_port },
        None => false,
    }
}

fn to_service(ctx: &TcContext, pkt: &Packet, frontend: &ServiceKey, svc: ServiceValue) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = forward_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a value from a lookup in this run; fields copied out.
        let known = unsafe { *entry };
        if backend_alive(&known) {
            count_flow_packet(entry, pkt.ip_len as u64, now);
            count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
            return translate_forward(ctx, pkt, &known);
        }
        // The backend went away. Forget the flow; a TCP connection in progress cannot move,
        // so the client is told at once instead of hanging on retransmits.
        let _ = CONNTRACK.remove(reply_key(pkt, &known));
        let _ = CONNTRACK.remove(key);
        if pkt.proto == dataplane_common::IPPROTO_TCP && !pkt.is_tcp_open() {
            count_drop(drop_reason::BACKEND_GONE);
            return refuse::tcp_reset(ctx, pkt);
        }
    }
    new_flow(ctx, pkt, frontend, &svc, &key, now)
}

fn new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    frontend: &ServiceKey,
    svc: &ServiceValue,
    key: &CtKey,
    now: u64,
) -> i32 {
    if svc.count == 0 {
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count_drop(drop_reason::NO_LOCAL_ENDPOINTS);
            return TC_ACT_SHOT;
        }
        count_drop(drop_reason::NO_ENDPOINTS);
        return refuse::connection(ctx, pkt);
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
    let slot_key = ServiceKey {
        backend_slot: slot,
        ..*frontend
    };
    let Some(slot_value) = SERVICES.get_ptr(slot_key) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    // SAFETY: values from lookups in this run.
    let backend_id = unsafe { (*slot_value).backend_id };
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    let backend = unsafe { *backend };

    // A pod reaching itself: give the packet a source the pod will accept and route back.
    let hairpin = backend.addr == pkt.saddr;
    let entry = CtEntry {
        packets: 1,
        bytes: pkt.ip_len as u64,
        created_ns: now,
        last_seen_ns: now,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: if hairpin { CT_FLAG_HAIRPIN } else { 0 },
        peer_addr: if hairpin { HAIRPIN_SNAT_ADDR } else { [0; 4] },
        _pad: [0; 4],
    };
    let reply = CtEntry {
        packets: 0,
        bytes: 0,
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        peer_addr: if hairpin { pkt.saddr } else { [0; 4] },
        ..entry
    };
    // Reply entry first: by the time the backend can answer, it exists.
    if CONNTRACK.insert(reply_key(pkt, &entry), reply, 0).is_err()
        || CONNTRACK.insert(key, entry, 0).is_err()
    {
        count_drop(drop_reason::CT_INSERT_FAILED);
        return TC_ACT_SHOT;
    }
    count_service_packet(svc.rev_nat_id, backend_id, pkt.ip_len as u64, true);
    translate_forward(ctx, pkt, &entry)
}

fn translate_forward(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> i32 {
    let rewritten = nat::set_destination(ctx, pkt, entry.nat_addr, entry.nat_port).and_then(|()| {
        if entry.flags & CT_FLAG_HAIRPIN != 0 {
            nat::set_source_addr(ctx, pkt, entry.peer_addr)
        } else {
            Ok(())
        }
    });
    verdict(rewritten)
}

/// A packet that matched no frontend: a backend's reply to a translated flow, or not ours.
fn from_backend(ctx: &TcContext, pkt: &Packet) -> i32 {
    let key = CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return TC_ACT_OK;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a value from a lookup in this run; fields copied out.
    let known = unsafe { *entry };
    count_flow_packet(entry, pkt.ip_len as u64, now);
    count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
    let rewritten = nat::set_source(ctx, pkt, known.nat_addr, known.nat_port).and_then(|()| {
        if known.flags & CT_FLAG_HAIRPIN != 0 {
            nat::set_destination_addr(ctx, pkt, known.peer_addr)
        } else {
            Ok(())
        }
    });
    verdict(rewritten)
}

#[inline(always)]
fn verdict(rewritten: Result<(), i64>) -> i32 {
    match rewritten {
        Ok(()) => TC_ACT_OK,
        Err(_) => {
            count_drop(drop_reason::REWRITE_FAILED);
            TC_ACT_SHOT
        }
    }
}
