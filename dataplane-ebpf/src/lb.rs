//! Service load balancing: frontend lookup, conntrack, backend selection, NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use dataplane_common::{
    AffinityKey, AffinityValue, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CT_FLAG_REPLY, CT_FLAG_SNAT,
    CtEntry, CtKey, HAIRPIN_SNAT_ADDR, IPPROTO_TCP, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_MAGLEV,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES, ServiceKey, ServiceValue, SourceRangeKey,
    drop_reason,
};

use crate::{
    counters::{count_drop, count_flow_packet, count_service_packet},
    maps::{AFFINITY, BACKENDS, CONFIG, CONNTRACK, MAGLEV, SERVICES, SOURCE_RANGES},
    nat,
    packet::{Packet, TCP_SYN},
    refuse,
};

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod's veth: in-cluster traffic.
    Pod,
    /// From an external interface: traffic from outside the node, or another node's replies.
    External,
}

/// Everything on the per-packet path is inlined into the entry point: each call and return
/// costs a few nanoseconds (more with the CPU's return-thunk mitigations), which on an
/// established flow is a good share of the total. New flows, rare, get their own frame.
#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet, origin: Origin) -> i32 {
    // One lookup on the packet's own tuple finds a known flow in either direction: on the
    // established path, conntrack is the only hash lookup.
    let key = tuple_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // SAFETY: a value from a lookup in this run.
        if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 {
            return reply(ctx, pkt, entry, now);
        }
        if let Some(verdict) = established(ctx, pkt, &key, entry, now) {
            return verdict;
        }
    }
    let Some(service) = SERVICES.get_ptr(frontend_key(pkt)) else {
        return TC_ACT_OK;
    };
    match to_frontend(ctx, pkt, service, origin) {
        NewFlow::Verdict(verdict) => verdict,
        NewFlow::Refuse => refuse::connection(ctx, pkt),
    }
}

/// What became of a new flow. A refusal is built by the caller: its frame is large, and
/// the verifier caps the stack of the whole call chain.
enum NewFlow {
    Verdict(i32),
    Refuse,
}

/// The frontend a packet is addressed to (default scope, slot 0).
#[inline(always)]
fn frontend_key(pkt: &Packet) -> ServiceKey {
    ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        backend_slot: 0,
        proto: pkt.proto,
        ..Default::default()
    }
}

/// The first packet of a flow to a frontend: the scope and source checks, then a backend.
#[inline(never)]
fn to_frontend(
    ctx: &TcContext,
    pkt: &Packet,
    service: *const ServiceValue,
    origin: Origin,
) -> NewFlow {
    let frontend = frontend_key(pkt);
    // SAFETY: a value from a lookup in this run; copied out at once.
    let service = unsafe { *service };
    let (frontend, service) = if origin == Origin::Pod && service.flags & SVC_FLAG_TWO_SCOPES != 0 {
        // Pods reaching an externalTrafficPolicy=Local frontend use every endpoint.
        let internal = ServiceKey {
            scope: SCOPE_INTERNAL,
            ..frontend
        };
        match SERVICES.get_ptr(internal) {
            // SAFETY: as above.
            Some(value) => (internal, unsafe { *value }),
            None => (frontend, service),
        }
    } else {
        (frontend, service)
    };
    if service.flags & SVC_FLAG_SOURCE_RANGES != 0
        && origin == Origin::External
        && !source_allowed(pkt, &service)
    {
        count_drop(drop_reason::SOURCE_RANGE);
        return NewFlow::Verdict(TC_ACT_SHOT);
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    new_flow(ctx, pkt, &frontend, &service, &tuple_key(pkt), now, origin)
}

/// The conntrack key of a packet as it arrives.
#[inline(always)]
fn tuple_key(pkt: &Packet) -> CtKey {
    CtKey::new(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
}

/// The reply tuple of a forward flow: from the backend to whoever it saw as the client.
#[inline(always)]
fn reply_key(pkt: &Packet, entry: &CtEntry) -> CtKey {
    let (client, client_port) = if entry.flags & CT_FLAG_SNAT != 0 {
        (entry.peer_addr, entry.peer_port)
    } else if entry.flags & CT_FLAG_HAIRPIN != 0 {
        (entry.peer_addr, pkt.sport)
    } else {
        (pkt.saddr, pkt.sport)
    };
    CtKey::new(
        entry.nat_addr,
        client,
        entry.nat_port,
        client_port,
        pkt.proto,
    )
}

/// The forward tuple of a reply entry (`reply` is its key): from the client, as it sent it,
/// to the frontend.
#[inline(always)]
fn forward_key_of_reply(reply: &CtKey, entry: &CtEntry) -> CtKey {
    let client = if entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0 {
        entry.peer_addr
    } else {
        reply.daddr
    };
    let client_port = if entry.flags & CT_FLAG_SNAT != 0 {
        entry.peer_port
    } else {
        reply.dport
    };
    CtKey::new(
        client,
        entry.nat_addr,
        client_port,
        entry.nat_port,
        reply.proto,
    )
}

/// Is the backend this flow was sent to still programmed (same id, same address)? An array
/// lookup, which the verifier inlines: no helper call on the established path.
#[inline(always)]
fn backend_alive(backend_id: u32, addr: [u8; 4], port: u16) -> bool {
    match BACKENDS.get_ptr(backend_id) {
        // SAFETY: a value from a lookup in this run. Unused ids hold zeroes.
        Some(b) => unsafe { (*b).addr == addr && (*b).port == port },
        None => false,
    }
}

/// The backend with this id, if the id is in use (unused array slots hold zeroes).
#[inline(always)]
fn backend(backend_id: u32) -> Option<dataplane_common::Backend> {
    // SAFETY: a value from a lookup in this run.
    let b = unsafe { *BACKENDS.get_ptr(backend_id)? };
    (b.addr != [0; 4]).then_some(b)
}

/// A TCP FIN or RST: both entries of the flow (this one, and the other direction's at
/// `other`) are marked closing (see `CT_FLAG_CLOSING`). Rare packets: the second lookup
/// costs nothing on the per-packet path.
#[inline(always)]
fn note_closing(entry: *mut CtEntry, other: &CtKey) {
    // SAFETY: `entry` came from a lookup in this run.
    unsafe { (*entry).flags |= CT_FLAG_CLOSING };
    if let Some(other) = CONNTRACK.get_ptr_mut(other) {
        // SAFETY: as above.
        unsafe { (*other).flags |= CT_FLAG_CLOSING };
    }
}

/// A packet of a known flow: translated as conntrack remembers, or — when its backend is
/// gone, or a SYN reopens a closed connection's tuple — `None` to choose anew (UDP, or a TCP
/// SYN), or a reset (TCP).
#[inline(always)]
fn established(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtEntry,
    now: u64,
) -> Option<i32> {
    // SAFETY: a value from a lookup in this run, read in place.
    let known = unsafe { &*entry };
    let reopened = known.flags & CT_FLAG_CLOSING != 0 && pkt.is_tcp_open();
    if !reopened && backend_alive(known.backend_id, known.nat_addr, known.nat_port) {
        count_flow_packet(entry, pkt.ip_len as u64, now);
        count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
        if pkt.is_tcp_close() {
            note_closing(entry, &reply_key(pkt, known));
        }
        return Some(translate_forward(ctx, pkt, known));
    }
    // Forget the flow. A TCP connection in progress whose backend went away cannot move, so
    // the client is told at once instead of hanging on retransmits.
    let _ = CONNTRACK.remove(&reply_key(pkt, known));
    let _ = CONNTRACK.remove(key);
    if pkt.proto == IPPROTO_TCP && !pkt.is_tcp_open() {
        count_drop(drop_reason::BACKEND_GONE);
        return Some(refuse::tcp_reset(ctx, pkt));
    }
    None
}

fn source_allowed(pkt: &Packet, svc: &ServiceValue) -> bool {
    let key = Key::new(
        64,
        SourceRangeKey {
            rev_nat_id_be: svc.rev_nat_id.to_be(),
            addr: pkt.saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
fn flow_hash(pkt: &Packet) -> u32 {
    dataplane_common::flow_hash(
        u32::from_be_bytes(pkt.saddr),
        u32::from_be_bytes(pkt.daddr),
        pkt.sport,
        pkt.dport,
        pkt.proto,
    )
}

/// The backend id for a new flow: the one a live affinity entry names, else from the Maglev
/// table or a random slot.
fn choose_backend(
    pkt: &Packet,
    frontend: &ServiceKey,
    svc: &ServiceValue,
    now: u64,
) -> Option<u32> {
    let affinity = AffinityKey {
        service_port_id: svc.service_port_id,
        client: pkt.saddr,
    };
    if svc.flags & SVC_FLAG_AFFINITY != 0
        && let Some(remembered) = AFFINITY.get_ptr_mut(affinity)
    {
        // SAFETY: a value from a lookup in this run.
        let remembered = unsafe { &mut *remembered };
        let fresh = now.saturating_sub(remembered.last_used_ns)
            < svc.affinity_timeout as u64 * 1_000_000_000;
        if fresh && backend(remembered.backend_id).is_some() {
            remembered.last_used_ns = now;
            return Some(remembered.backend_id);
        }
    }
    let backend_id = if svc.flags & SVC_FLAG_MAGLEV != 0 {
        let table = MAGLEV.get_ptr(svc.rev_nat_id)?;
        // black_box keeps LLVM from folding the slot's scaling into the shift, which would
        // leave the verifier a bound one element too loose.
        let index = core::hint::black_box(dataplane_common::maglev_slot(flow_hash(pkt)));
        // SAFETY: a value from a lookup in this run; index is below the table's length.
        unsafe { *(*table).backend_ids.get(index)? }
    } else {
        let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
        let slot_value = SERVICES.get_ptr(ServiceKey {
            backend_slot: slot,
            ..*frontend
        })?;
        // SAFETY: a value from a lookup in this run.
        unsafe { (*slot_value).backend_id }
    };
    if svc.flags & SVC_FLAG_AFFINITY != 0 {
        let _ = AFFINITY.insert(
            affinity,
            AffinityValue {
                last_used_ns: now,
                backend_id,
                _pad: [0; 4],
            },
            0,
        );
    }
    Some(backend_id)
}

/// A source port for SNAT that no other flow to this backend uses: the client's own port when
/// free, else a few random ones from the ephemeral range.
fn snat_port(
    pkt: &Packet,
    snat_addr: [u8; 4],
    backend_addr: [u8; 4],
    backend_port: u16,
) -> Option<u16> {
    // Ports below the ephemeral range could collide with node ports on the node's address.
    let mut candidate = if pkt.sport >= 32768 {
        pkt.sport
    } else {
        random_ephemeral_port()
    };
    for _ in 0..4 {
        let reply = CtKey::new(backend_addr, snat_addr, backend_port, candidate, pkt.proto);
        if CONNTRACK.get_ptr(&reply).is_none() {
            return Some(candidate);
        }
        candidate = random_ephemeral_port();
    }
    None
}

/// A port from Linux's default ephemeral range, 32768-60999.
#[inline(always)]
fn random_ephemeral_port() -> u16 {
    32768 + (unsafe { bpf_get_prandom_u32() } % 28232) as u16
}

fn new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    frontend: &ServiceKey,
    svc: &ServiceValue,
    key: &CtKey,
    now: u64,
    origin: Origin,
) -> NewFlow {
    if svc.count == 0 {
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count_drop(drop_reason::NO_LOCAL_ENDPOINTS);
            return NewFlow::Verdict(TC_ACT_SHOT);
        }
        count_drop(drop_reason::NO_ENDPOINTS);
        return NewFlow::Refuse;
    }
    let Some(backend_id) = choose_backend(pkt, frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return NewFlow::Verdict(TC_ACT_SHOT);
    };
    let Some(backend) = backend(backend_id) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return NewFlow::Verdict(TC_ACT_SHOT);
    };

    let mut entry = CtEntry {
        packets: 1,
        bytes: pkt.ip_len as u64,
        created_ns: now,
        last_seen_ns: now,
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        peer_addr: [0; 4],
        peer_port: 0,
        _pad: [0; 2],
    };
    let external_snat = origin == Origin::External
        && svc.flags & SVC_FLAG_EXTERNAL != 0
        && svc.flags & SVC_FLAG_EXTERNAL_LOCAL == 0;
    if external_snat {
        // Replies must come back through this node: the source becomes the node's address.
        let Some(config) = CONFIG.get(0) else {
            return NewFlow::Verdict(TC_ACT_SHOT);
        };
        let Some(port) = snat_port(pkt, config.snat_addr, backend.addr, backend.port) else {
            count_drop(drop_reason::SNAT_PORTS_EXHAUSTED);
            return NewFlow::Verdict(TC_ACT_SHOT);
        };
        entry.flags = CT_FLAG_SNAT;
        entry.peer_addr = config.snat_addr;
        entry.peer_port = port;
    } else if backend.addr == pkt.saddr {
        // A pod reaching itself: give the packet a source the pod will accept and route back.
        entry.flags = CT_FLAG_HAIRPIN;
        entry.peer_addr = HAIRPIN_SNAT_ADDR;
    }
    // Reply entry first: by the time the backend can answer, it exists. One struct, turned
    // from the reply's view into the forward one, keeps the stack small.
    let reply_key = reply_key(pkt, &entry);
    let forward = (
        entry.nat_addr,
        entry.nat_port,
        entry.peer_addr,
        entry.peer_port,
    );
    entry.packets = 0;
    entry.bytes = 0;
    entry.nat_addr = pkt.daddr;
    entry.nat_port = pkt.dport;
    entry.peer_addr = if entry.flags != 0 { pkt.saddr } else { [0; 4] };
    entry.peer_port = if entry.flags & CT_FLAG_SNAT != 0 {
        pkt.sport
    } else {
        0
    };
    entry.flags |= CT_FLAG_REPLY;
    let reply_inserted = CONNTRACK.insert(&reply_key, &entry, 0).is_ok();
    entry.flags &= !CT_FLAG_REPLY;
    entry.packets = 1;
    entry.bytes = pkt.ip_len as u64;
    (
        entry.nat_addr,
        entry.nat_port,
        entry.peer_addr,
        entry.peer_port,
    ) = forward;
    if !reply_inserted || CONNTRACK.insert(key, &entry, 0).is_err() {
        count_drop(drop_reason::CT_INSERT_FAILED);
        return NewFlow::Verdict(TC_ACT_SHOT);
    }
    count_service_packet(svc.rev_nat_id, backend_id, pkt.ip_len as u64, true);
    NewFlow::Verdict(translate_forward(ctx, pkt, &entry))
}

#[inline(always)]
fn translate_forward(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> i32 {
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let rewrite = nat::Rewrite {
        daddr: entry.nat_addr,
        dport: entry.nat_port,
        saddr: if entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0 {
            entry.peer_addr
        } else {
            pkt.saddr
        },
        sport: if snat { entry.peer_port } else { pkt.sport },
    };
    verdict(nat::rewrite(ctx, pkt, rewrite))
}

/// A backend's reply to a translated flow: back to the client, from the frontend.
#[inline(always)]
fn reply(ctx: &TcContext, pkt: &Packet, entry: *mut CtEntry, now: u64) -> i32 {
    // SAFETY: a value from a lookup in this run, read in place.
    let known = unsafe { &*entry };
    if pkt.proto == IPPROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && known.flags & CT_FLAG_CLOSING != 0
    {
        // A SYN-ACK on a closed flow's tuple answers a SYN that went straight to the pod from
        // the same client port (a reopened service flow gets fresh entries): the old flow
        // must not capture this connection.
        let key = tuple_key(pkt);
        let _ = CONNTRACK.remove(&forward_key_of_reply(&key, known));
        let _ = CONNTRACK.remove(&key);
        return TC_ACT_OK;
    }
    count_flow_packet(entry, pkt.ip_len as u64, now);
    count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
    if pkt.is_tcp_close() {
        note_closing(entry, &forward_key_of_reply(&tuple_key(pkt), known));
    }
    let snat = known.flags & CT_FLAG_SNAT != 0;
    let rewrite = nat::Rewrite {
        saddr: known.nat_addr,
        sport: known.nat_port,
        daddr: if known.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0 {
            known.peer_addr
        } else {
            pkt.daddr
        },
        dport: if snat { known.peer_port } else { pkt.dport },
    };
    verdict(nat::rewrite(ctx, pkt, rewrite))
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
