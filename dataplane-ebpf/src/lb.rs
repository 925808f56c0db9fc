//! Service load balancing: frontend lookup, conntrack, backend selection, NAT.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use dataplane_common::{
    AffinityKey, AffinityValue, CT_FLAG_CLOSING, CT_FLAG_FIN, CT_FLAG_HAIRPIN, CT_FLAG_REPLY,
    CT_FLAG_RESET, CT_FLAG_SNAT, CtEntry, CtKey, DEFAULT_SNAT_PORTS, HAIRPIN_SNAT_ADDR,
    HOST_FLOW_TIMEOUT_NS, IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_MAGLEV,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES, ServiceKey, ServiceValue, SourceRangeKey,
    drop_reason,
};

use crate::{
    counters::{count_drop, count_flow_packet, count_service_packet},
    forward::translate_and_forward,
    maps::{
        AFFINITY, ANY_TABLE, BACKENDS, CONFIG, CONNTRACK, CtTable, HOST_FLOWS, MAGLEV, SERVICES,
        SOURCE_RANGES, TCP_TABLES,
    },
    nat,
    packet::{Fragment, Packet, TCP_RST, TCP_SYN},
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
pub fn handle<const L2: usize>(ctx: &TcContext, pkt: &Packet, origin: Origin) -> i32 {
    // One lookup on the packet's own tuple finds a known flow in either direction: on the
    // established path, conntrack is the only hash lookup.
    let key = tuple_key(pkt);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        pkt.remember_fragment_ports(now);
        // SAFETY: a value from a lookup in this run.
        if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 {
            return reply::<L2>(ctx, pkt, entry, now);
        }
        if let Some(verdict) = established::<L2>(ctx, pkt, &key, entry, now) {
            return verdict;
        }
    }
    // A later fragment never starts a flow: only its first fragment has the L4 header.
    if pkt.fragment == Fragment::Later {
        return TC_ACT_OK;
    }
    let Some(service) = SERVICES.get_ptr(frontend_key(pkt)) else {
        return TC_ACT_OK;
    };
    if origin == Origin::External && !opens_connection(pkt) {
        return TC_ACT_OK;
    }
    // Two frames side by side rather than nested: the verifier caps the stack of the whole
    // call chain, and each is large.
    let mut chosen = Chosen::default();
    let new_flow = match to_frontend(pkt, service, origin, &mut chosen) {
        // The flow's table chosen once: one map in the frame, not a branch at each use.
        CHOSEN if pkt.proto == IPPROTO_TCP => open_flow(&TCP_TABLES, pkt, &chosen),
        CHOSEN => open_flow(&ANY_TABLE, pkt, &chosen),
        REFUSE => NewFlow::Refuse,
        verdict => NewFlow::Verdict(verdict),
    };
    match new_flow {
        NewFlow::Verdict(verdict) => verdict,
        NewFlow::Forward(rewrite) => translate_and_forward::<L2>(ctx, pkt, rewrite),
        NewFlow::Refuse => refuse::connection::<L2>(ctx, pkt),
    }
}

/// Can this packet from outside the node, addressed to a frontend with no flow of ours, open
/// a connection there? Only a TCP SYN can; a UDP datagram can unless it answers a flow the
/// node itself sent from that address and port (its own, or a pod's it SNATed there: node
/// ports lie inside the ports a `--random-fully` SNAT picks). Everything else belongs to the
/// node's own connections and goes to its stack.
#[inline(always)]
fn opens_connection(pkt: &Packet) -> bool {
    match pkt.proto {
        IPPROTO_TCP => pkt.is_tcp_open(),
        IPPROTO_UDP => match HOST_FLOWS.get_ptr(&tuple_key(pkt)) {
            Some(last_sent) => {
                let now = unsafe { bpf_ktime_get_coarse_ns() };
                // SAFETY: a value from a lookup in this run.
                now.saturating_sub(unsafe { *last_sent }) > HOST_FLOW_TIMEOUT_NS
            }
            None => true,
        },
        _ => true,
    }
}

/// What `to_frontend` chose for a new flow, handed to `open_flow`: the frontend entry's
/// settings (after the scope choice) and the backend.
#[derive(Default)]
struct Chosen {
    rev_nat_id: u32,
    flags: u16,
    origin_external: bool,
    backend_id: u32,
    backend: dataplane_common::Backend,
    now: u64,
}

/// What became of a new flow. The translation and a refusal are done by the caller: their
/// frames are large, and the verifier caps the stack of the whole call chain.
enum NewFlow {
    Verdict(i32),
    /// Translate as given and forward.
    Forward(nat::Rewrite),
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

/// The frontend as clients inside the cluster see it (pods, and the node's own processes):
/// for an externalTrafficPolicy=Local frontend, its internal-scope entry, which uses every
/// endpoint (kube-proxy's short circuit for in-cluster traffic). Updates `frontend` to the
/// key used.
#[inline(always)]
pub fn in_cluster_view<'a>(frontend: &mut ServiceKey, svc: &'a ServiceValue) -> &'a ServiceValue {
    if svc.flags & SVC_FLAG_TWO_SCOPES == 0 {
        return svc;
    }
    let internal = ServiceKey {
        scope: SCOPE_INTERNAL,
        ..*frontend
    };
    match SERVICES.get_ptr(internal) {
        Some(value) => {
            *frontend = internal;
            // SAFETY: a value from a lookup in this run, valid for the rest of it.
            unsafe { &*value }
        }
        None => svc,
    }
}

/// `to_frontend` filled in its `Chosen`: the flow is to be opened.
const CHOSEN: i32 = -1;
/// `to_frontend` found no endpoints to use: the connection is to be refused.
const REFUSE: i32 = -2;

/// The first packet of a flow to a frontend: the scope and source checks, then a backend
/// (into `chosen`; returns `CHOSEN`), or `REFUSE`, or the verdict for the packet. A plain
/// integer result: an enum returned through memory leaves a stack pointer in the return
/// register, which the verifier rejects.
#[inline(never)]
fn to_frontend(
    pkt: &Packet,
    service: *const ServiceValue,
    origin: Origin,
    chosen: &mut Chosen,
) -> i32 {
    let mut frontend = frontend_key(pkt);
    // Read in place, not copied: this frame is on the verifier's capped call chain.
    // SAFETY: a value from a lookup in this run, valid for the rest of it.
    let mut svc = unsafe { &*service };
    if origin == Origin::Pod {
        svc = in_cluster_view(&mut frontend, svc);
    }
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0
        && origin == Origin::External
        && !source_allowed(pkt, svc)
    {
        count_drop(drop_reason::SOURCE_RANGE);
        return TC_ACT_SHOT;
    }
    if svc.count == 0 {
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count_drop(drop_reason::NO_LOCAL_ENDPOINTS);
            return TC_ACT_SHOT;
        }
        count_drop(drop_reason::NO_ENDPOINTS);
        return REFUSE;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(backend_id) = choose_backend(&tuple_key(pkt), &frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    let Some(backend) = backend(backend_id) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    *chosen = Chosen {
        rev_nat_id: svc.rev_nat_id,
        flags: svc.flags,
        origin_external: origin == Origin::External,
        backend_id,
        backend,
        now,
    };
    CHOSEN
}

/// The conntrack key of a packet as it arrives.
#[inline(always)]
fn tuple_key(pkt: &Packet) -> CtKey {
    CtKey::new(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
}

/// The reply tuple of a forward flow: from the backend to whoever it saw as the client.
#[inline(always)]
fn reply_key(pkt: &Packet, entry: &CtEntry) -> CtKey {
    tuple_key(pkt).reply_of(entry)
}

/// Is the backend this flow was sent to still programmed (same id, same address)? An array
/// lookup, which the verifier inlines: no helper call on the established path.
#[inline(always)]
pub fn backend_alive(backend_id: u32, addr: [u8; 4], port: u16) -> bool {
    match BACKENDS.get_ptr(backend_id) {
        // SAFETY: a value from a lookup in this run. Unused ids hold zeroes.
        Some(b) => unsafe { (*b).addr == addr && (*b).port == port },
        None => false,
    }
}

/// The backend with this id, if the id is in use (unused array slots hold zeroes).
#[inline(always)]
pub fn backend(backend_id: u32) -> Option<dataplane_common::Backend> {
    // SAFETY: a value from a lookup in this run.
    let b = unsafe { *BACKENDS.get_ptr(backend_id)? };
    (b.addr != [0; 4]).then_some(b)
}

/// A TCP FIN or RST (`reset`): both entries of the flow (this one, and the other
/// direction's at `other`) are marked closing (see `CT_FLAG_CLOSING`) and, after an RST,
/// reset (`CT_FLAG_RESET`); after a FIN this direction is marked as having sent it
/// (`CT_FLAG_FIN`), so the agent tells a half-closed connection from a closed one. Rare
/// packets: the second lookup costs nothing on the per-packet path.
#[inline(always)]
fn note_closing(entry: *mut CtEntry, other: &CtKey, reset: bool) {
    let (own, others) = if reset {
        let flags = CT_FLAG_CLOSING | CT_FLAG_RESET;
        (flags, flags)
    } else {
        (CT_FLAG_CLOSING | CT_FLAG_FIN, CT_FLAG_CLOSING)
    };
    // SAFETY: `entry` came from a lookup in this run.
    unsafe { (*entry).flags |= own };
    if let Some(other) = CONNTRACK.get_ptr_mut(other) {
        // SAFETY: as above.
        unsafe { (*other).flags |= others };
    }
}

/// A packet of a known flow: translated as conntrack remembers, or `None` to choose anew —
/// when a SYN reopens a closed connection's tuple, or a UDP flow's backend is gone.
///
/// kube-proxy's semantics: a TCP connection keeps its backend until it ends, even once the
/// endpoint is gone from every EndpointSlice (the pod may still be draining; kube-proxy
/// flushes only UDP conntrack entries); a UDP flow keeps its backend while it is an endpoint
/// of the service in any condition (the agent keeps such backends programmed), and moves
/// to a current one when it is gone.
#[inline(always)]
fn established<const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtEntry,
    now: u64,
) -> Option<i32> {
    // SAFETY: a value from a lookup in this run, read in place.
    let known = unsafe { &*entry };
    let keeps_backend = if pkt.proto == IPPROTO_TCP {
        known.flags & CT_FLAG_CLOSING == 0 || !pkt.is_tcp_open()
    } else {
        backend_alive(known.backend_id, known.nat_addr, known.nat_port)
    };
    if keeps_backend {
        count_flow_packet(entry, pkt.ip_len as u64, now);
        count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
        if pkt.is_tcp_close() {
            note_closing(entry, &reply_key(pkt, known), pkt.tcp_flags & TCP_RST != 0);
        }
        return Some(translate_forward::<L2>(ctx, pkt, known));
    }
    // Forget the flow; its next packet (this one) starts a new one.
    let _ = CONNTRACK.remove(&reply_key(pkt, known));
    let _ = CONNTRACK.remove(key);
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
fn flow_hash(flow: &CtKey) -> u32 {
    dataplane_common::flow_hash(
        u32::from_be_bytes(flow.saddr),
        u32::from_be_bytes(flow.daddr),
        flow.sport,
        flow.dport,
        flow.proto,
    )
}

/// The backend id for a new flow (`flow`: client to frontend; its source keys session
/// affinity, the whole tuple the Maglev hash): the one a live affinity entry names, else
/// from the Maglev table or a random slot.
pub fn choose_backend(
    flow: &CtKey,
    frontend: &ServiceKey,
    svc: &ServiceValue,
    now: u64,
) -> Option<u32> {
    let affinity = AffinityKey {
        service_port_id: svc.service_port_id,
        client: flow.saddr,
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
        let index = core::hint::black_box(dataplane_common::maglev_slot(flow_hash(flow)));
        // SAFETY: a value from a lookup in this run; index is below the table's length.
        unsafe { *(*table).backend_ids.get(index)? }
    } else {
        // checked: a `%` the compiler cannot prove safe links a panic the verifier rejects.
        let slot = unsafe { bpf_get_prandom_u32() }.checked_rem(svc.count as u32)? as u16 + 1;
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

/// How many ports a new SNATed flow tries before it gives up (counted as
/// `SNAT_PORTS_EXHAUSTED`).
const SNAT_PORT_TRIES: u32 = 8;

/// Claims a SNAT source port for a flow to the backend in `reply` (whose `dport` is set
/// here) by inserting the flow's reply entry under it: the insert fails when the tuple is
/// taken, so two CPUs can never share a port. The client's own port is tried first when it
/// lies in the range (the backend sees the port the client used), else a random one; then
/// the ports after it, wrapping around the range (as Linux picks ephemeral ports), so a
/// small range is searched whole. Returns the port, or 0 when every try was taken.
///
/// Plain scalars in and out (BPF functions take five arguments at most, and an `Option`
/// return counts as one more), should it ever need a frame of its own.
#[inline(always)]
fn claim_snat_port<T: CtTable>(
    table: &T,
    client_port: u16,
    reply: &mut CtKey,
    entry: &CtEntry,
    (min, max): (u16, u16),
) -> u16 {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    // The candidate's place in the range.
    let first = if client_port >= min && client_port <= max {
        (client_port - min) as u32
    } else {
        (unsafe { bpf_get_prandom_u32() }) % span
    };
    // A constant trip count: the loop unrolls, and the verifier walks straight-line code.
    for i in 0..SNAT_PORT_TRIES {
        if i >= span {
            break;
        }
        let candidate = min.wrapping_add(((first + i) % span) as u16);
        reply.dport = candidate;
        if table.insert(reply, entry, BPF_NOEXIST as u64).is_ok() {
            return candidate;
        }
    }
    0
}

/// Opens the flow `chosen` describes: its conntrack entries (the reply's first, with the
/// SNAT port claimed there), counters, then the translation to do.
#[inline(never)]
fn open_flow<T: CtTable>(table: &T, pkt: &Packet, chosen: &Chosen) -> NewFlow {
    let (now, backend_id, backend) = (chosen.now, chosen.backend_id, chosen.backend);
    let mut entry = CtEntry {
        packets: 1,
        bytes: pkt.ip_len as u64,
        created_ns: now,
        last_seen_ns: now,
        backend_id,
        rev_nat_id: chosen.rev_nat_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        peer_addr: [0; 4],
        peer_port: 0,
        _pad: [0; 2],
    };
    let external_snat = chosen.origin_external
        && chosen.flags & SVC_FLAG_EXTERNAL != 0
        && chosen.flags & SVC_FLAG_EXTERNAL_LOCAL == 0;
    // The ports this flow's SNAT may take (first, last), if it has one.
    let mut snat = None;
    if external_snat {
        // Replies must come back through this node: the source becomes the node's address,
        // the port is claimed below with the reply entry.
        let Some(config) = CONFIG.get(0) else {
            return NewFlow::Verdict(TC_ACT_SHOT);
        };
        entry.flags = CT_FLAG_SNAT;
        entry.peer_addr = config.snat_addr;
        snat = Some(
            if config.snat_port_min != 0 && config.snat_port_min <= config.snat_port_max {
                (config.snat_port_min, config.snat_port_max)
            } else {
                DEFAULT_SNAT_PORTS
            },
        );
    } else if backend.addr == pkt.saddr {
        // A pod reaching itself: give the packet a source the pod will accept and route back.
        entry.flags = CT_FLAG_HAIRPIN;
        entry.peer_addr = HAIRPIN_SNAT_ADDR;
    }
    // Reply entry first: by the time the backend can answer, it exists. One struct, turned
    // from the reply's view into the forward one, keeps the stack small.
    let mut reply_key = reply_key(pkt, &entry);
    let mut forward = (
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
    let reply_inserted = match snat {
        Some(range) => match claim_snat_port(table, pkt.sport, &mut reply_key, &entry, range) {
            0 => {
                count_drop(drop_reason::SNAT_PORTS_EXHAUSTED);
                return NewFlow::Verdict(TC_ACT_SHOT);
            }
            port => {
                forward.3 = port;
                true
            }
        },
        None => table.insert(&reply_key, &entry, 0).is_ok(),
    };
    entry.flags &= !CT_FLAG_REPLY;
    entry.packets = 1;
    entry.bytes = pkt.ip_len as u64;
    (
        entry.nat_addr,
        entry.nat_port,
        entry.peer_addr,
        entry.peer_port,
    ) = forward;
    if !reply_inserted || table.insert(&tuple_key(pkt), &entry, 0).is_err() {
        if reply_inserted {
            let _ = table.remove(&reply_key);
        }
        count_drop(drop_reason::CT_INSERT_FAILED);
        return NewFlow::Verdict(TC_ACT_SHOT);
    }
    count_service_packet(chosen.rev_nat_id, backend_id, pkt.ip_len as u64, true);
    pkt.remember_fragment_ports(now);
    NewFlow::Forward(forward_rewrite(pkt, &entry))
}

#[inline(always)]
fn translate_forward<const L2: usize>(ctx: &TcContext, pkt: &Packet, entry: &CtEntry) -> i32 {
    translate_and_forward::<L2>(ctx, pkt, forward_rewrite(pkt, entry))
}

/// How a packet of a flow towards its backend is rewritten, by its forward entry.
#[inline(always)]
fn forward_rewrite(pkt: &Packet, entry: &CtEntry) -> nat::Rewrite {
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    nat::Rewrite {
        daddr: entry.nat_addr,
        dport: entry.nat_port,
        saddr: if entry.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0 {
            entry.peer_addr
        } else {
            pkt.saddr
        },
        sport: if snat { entry.peer_port } else { pkt.sport },
    }
}

/// A backend's reply to a translated flow: back to the client, from the frontend.
#[inline(always)]
fn reply<const L2: usize>(ctx: &TcContext, pkt: &Packet, entry: *mut CtEntry, now: u64) -> i32 {
    // SAFETY: a value from a lookup in this run, read in place.
    let known = unsafe { &*entry };
    if pkt.proto == IPPROTO_TCP
        && pkt.tcp_flags & TCP_SYN != 0
        && known.flags & CT_FLAG_CLOSING != 0
    {
        // A SYN-ACK on a closed flow's tuple answers a SYN that went straight to the pod from
        // the same client port (a reopened service flow gets fresh entries): the old flow
        // must not capture this connection.
        let key = tuple_key(pkt);
        let _ = CONNTRACK.remove(&key.forward_of(known));
        let _ = CONNTRACK.remove(&key);
        return TC_ACT_OK;
    }
    count_flow_packet(entry, pkt.ip_len as u64, now);
    count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
    if pkt.is_tcp_close() {
        let reset = pkt.tcp_flags & TCP_RST != 0;
        note_closing(entry, &tuple_key(pkt).forward_of(known), reset);
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
    translate_and_forward::<L2>(ctx, pkt, rewrite)
}
