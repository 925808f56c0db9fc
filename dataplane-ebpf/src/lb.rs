//! Service load balancing: frontend lookup, conntrack, backend selection, NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use dataplane_common::{
    AffinityKey, AffinityValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_HAIRPIN, CT_FLAG_SNAT,
    CtEntry, CtKey, HAIRPIN_SNAT_ADDR, IPPROTO_TCP, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_MAGLEV,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES, ServiceKey, ServiceValue, SourceRangeKey,
    drop_reason,
};

use crate::{
    counters::{count_drop, count_flow_packet, count_service_packet},
    maps::{AFFINITY, BACKENDS, CONFIG, CONNTRACK, MAGLEV, SERVICES, SOURCE_RANGES},
    nat,
    packet::Packet,
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

pub fn handle(ctx: &TcContext, pkt: &Packet, origin: Origin) -> i32 {
    let frontend = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        backend_slot: 0,
        proto: pkt.proto,
        ..Default::default()
    };
    let Some(service) = SERVICES.get_ptr(frontend) else {
        return from_backend(ctx, pkt);
    };
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
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = forward_key(pkt);
    // Separate calls, not nested ones: the verifier limits the stack of a call chain.
    if let Some(verdict) = established(ctx, pkt, &key, now) {
        return verdict;
    }
    if service.flags & SVC_FLAG_SOURCE_RANGES != 0
        && origin == Origin::External
        && !source_allowed(pkt, &service)
    {
        count_drop(drop_reason::SOURCE_RANGE);
        return TC_ACT_SHOT;
    }
    new_flow(ctx, pkt, &frontend, &service, &key, now, origin)
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
    let (client, client_port) = if entry.flags & CT_FLAG_SNAT != 0 {
        (entry.peer_addr, entry.peer_port)
    } else if entry.flags & CT_FLAG_HAIRPIN != 0 {
        (entry.peer_addr, pkt.sport)
    } else {
        (pkt.saddr, pkt.sport)
    };
    CtKey {
        saddr: entry.nat_addr,
        daddr: client,
        sport: entry.nat_port,
        dport: client_port,
        proto: pkt.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    }
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

/// A packet of a known flow: translated as conntrack remembers, or — when its backend is
/// gone — `None` to choose anew (UDP, or a TCP SYN reusing the tuple), or a reset (TCP).
fn established(ctx: &TcContext, pkt: &Packet, key: &CtKey, now: u64) -> Option<i32> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a value from a lookup in this run; fields copied out.
    let known = unsafe { *entry };
    if backend_alive(known.backend_id, known.nat_addr, known.nat_port) {
        count_flow_packet(entry, pkt.ip_len as u64, now);
        count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
        return Some(translate_forward(ctx, pkt, &known));
    }
    // The backend went away. Forget the flow; a TCP connection in progress cannot move, so
    // the client is told at once instead of hanging on retransmits.
    let _ = CONNTRACK.remove(reply_key(pkt, &known));
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
        let reply = CtKey {
            saddr: backend_addr,
            daddr: snat_addr,
            sport: backend_port,
            dport: candidate,
            proto: pkt.proto,
            direction: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        if CONNTRACK.get_ptr(reply).is_none() {
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
) -> i32 {
    if svc.count == 0 {
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count_drop(drop_reason::NO_LOCAL_ENDPOINTS);
            return TC_ACT_SHOT;
        }
        count_drop(drop_reason::NO_ENDPOINTS);
        return refuse::connection(ctx, pkt);
    }
    let Some(backend_id) = choose_backend(pkt, frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    let Some(backend) = backend(backend_id) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
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
            return TC_ACT_SHOT;
        };
        let Some(port) = snat_port(pkt, config.snat_addr, backend.addr, backend.port) else {
            count_drop(drop_reason::SNAT_PORTS_EXHAUSTED);
            return TC_ACT_SHOT;
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
    let reply_inserted = CONNTRACK.insert(reply_key, entry, 0).is_ok();
    entry.packets = 1;
    entry.bytes = pkt.ip_len as u64;
    (
        entry.nat_addr,
        entry.nat_port,
        entry.peer_addr,
        entry.peer_port,
    ) = forward;
    if !reply_inserted || CONNTRACK.insert(key, entry, 0).is_err() {
        count_drop(drop_reason::CT_INSERT_FAILED);
        return TC_ACT_SHOT;
    }
    count_service_packet(svc.rev_nat_id, backend_id, pkt.ip_len as u64, true);
    translate_forward(ctx, pkt, &entry)
}

fn translate_forward(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> i32 {
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let rewrite = nat::Rewrite {
        daddr: Some(entry.nat_addr),
        dport: Some(entry.nat_port),
        saddr: (entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0).then_some(entry.peer_addr),
        sport: snat.then_some(entry.peer_port),
    };
    verdict(nat::rewrite(ctx, pkt, rewrite))
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
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a value from a lookup in this run; fields copied out.
    let known = unsafe { *entry };
    count_flow_packet(entry, pkt.ip_len as u64, now);
    count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
    let snat = known.flags & CT_FLAG_SNAT != 0;
    let rewrite = nat::Rewrite {
        saddr: Some(known.nat_addr),
        sport: Some(known.nat_port),
        daddr: (known.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0).then_some(known.peer_addr),
        dport: snat.then_some(known.peer_port),
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
