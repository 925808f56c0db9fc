//! Service load balancing: frontend lookup, conntrack, backend selection, NAT.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use dataplane_common::{
    Address, AffinityKeyOf, AffinityValue, BackendOf, CT_FLAG_CLOSING, CT_FLAG_FIN,
    CT_FLAG_HAIRPIN, CT_FLAG_REPLY, CT_FLAG_RESET, CT_FLAG_SNAT, CtEntryOf, CtKeyOf,
    DEFAULT_SNAT_PORTS, HOST_FLOW_TIMEOUT_NS, IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL,
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES, ServiceKeyOf, ServiceValue,
    drop_reason,
};

use crate::{
    counters::{count_drop, count_flow_packet, count_service_packet},
    family::{Family, PacketFamily},
    maps::{AnyTable, CONFIG, Conntrack, CtTable, MAGLEV, TcpTables},
    nat,
    packet::{Fragment, Packet, TCP_RST, TCP_SYN},
};

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod's veth: in-cluster traffic.
    Pod,
    /// From an external interface: traffic from outside the node, or another node's replies.
    External,
}

/// What becomes of a packet after conntrack and the frontends have had their say.
enum Step<A> {
    /// Done: this verdict.
    Verdict(i32),
    /// Translate it so and forward it.
    Forward(nat::Rewrite<A>),
    /// No known flow takes it: a new flow, if it is to a frontend.
    New,
    /// A new flow to open, as `to_frontend` chose it (in `FlowScratch`).
    Open,
    /// Refuse the connection (no endpoints).
    Refuse,
}

/// `Step`s as a frame's plain integer result: a verdict (`TC_ACT_*`, never negative) or one
/// of these, with the rewrite in an out-parameter.
const STEP_FORWARD: i32 = -1;
const STEP_NEW: i32 = -2;
const STEP_REFUSE: i32 = -3;
const STEP_OPEN: i32 = -4;

impl<A: Copy> Step<A> {
    #[inline(always)]
    fn to_frame(self, out: &mut nat::Rewrite<A>) -> i32 {
        match self {
            Step::Verdict(verdict) => verdict,
            Step::Forward(rewrite) => {
                *out = rewrite;
                STEP_FORWARD
            }
            Step::New => STEP_NEW,
            Step::Refuse => STEP_REFUSE,
            Step::Open => STEP_OPEN,
        }
    }

    /// Runs `frame` (a function of its own returning `to_frame`'s integer) and rebuilds its
    /// step.
    #[inline(always)]
    fn from_frame<P>(frame: impl FnOnce(&P, &mut nat::Rewrite<A>) -> i32, pkt: &P) -> Self
    where
        A: Default,
    {
        let mut rewrite = nat::Rewrite::default();
        match frame(pkt, &mut rewrite) {
            STEP_FORWARD => Step::Forward(rewrite),
            STEP_NEW => Step::New,
            STEP_REFUSE => Step::Refuse,
            STEP_OPEN => Step::Open,
            verdict => Step::Verdict(verdict),
        }
    }
}

/// Everything on the IPv4 per-packet path is inlined into its frame: each call and return
/// costs a few nanoseconds (more with the CPU's return-thunk mitigations), which on an
/// established flow is a good share of the total. New flows, rare, get their own frame.
/// A family with `OWN_FRAMES` (IPv6, whose structures are four times larger) takes known
/// flows, new flows and the translation in frames of their own, side by side, to stay
/// within the verifier's stack budget for the call chain.
#[inline(always)]
pub fn handle<F: PacketFamily, const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    origin: Origin,
) -> i32 {
    if F::OWN_FRAMES {
        return handle_in_frames::<F, L2>(ctx, pkt, origin);
    }
    let mut step = known_flow::<F>(pkt);
    if let Step::New = step {
        step = new_flow::<F>(pkt, origin);
    }
    if let Step::Open = step {
        step = open_chosen_flow::<F>(pkt);
    }
    match step {
        Step::Verdict(verdict) => verdict,
        Step::Forward(rewrite) => F::translate_and_forward::<L2>(ctx, pkt, rewrite),
        Step::New | Step::Open => TC_ACT_OK,
        Step::Refuse => F::refuse::<L2>(ctx, pkt),
    }
}

/// `handle` with the known flow, the new flow's choice and its opening each in a frame of
/// its own, side by side, sharing one rewrite. Each frame returns its step as a plain
/// integer (`Step::to_frame`): a struct returned through memory leaves a stack pointer in
/// the return register, which the verifier rejects.
#[inline(always)]
fn handle_in_frames<F: PacketFamily, const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    origin: Origin,
) -> i32 {
    #[inline(never)]
    fn known<F: PacketFamily>(pkt: &Packet<F::Addr>, out: &mut nat::Rewrite<F::Addr>) -> i32 {
        known_flow::<F>(pkt).to_frame(out)
    }
    #[inline(never)]
    fn new<F: PacketFamily>(
        pkt: &Packet<F::Addr>,
        origin: Origin,
        out: &mut nat::Rewrite<F::Addr>,
    ) -> i32 {
        new_flow::<F>(pkt, origin).to_frame(out)
    }
    #[inline(never)]
    fn open<F: PacketFamily>(pkt: &Packet<F::Addr>, out: &mut nat::Rewrite<F::Addr>) -> i32 {
        open_chosen_flow::<F>(pkt).to_frame(out)
    }
    let mut rewrite = nat::Rewrite::default();
    let mut code = known::<F>(pkt, &mut rewrite);
    if code == STEP_NEW {
        code = new::<F>(pkt, origin, &mut rewrite);
    }
    if code == STEP_OPEN {
        code = open::<F>(pkt, &mut rewrite);
        if code == STEP_FORWARD
            && let Some(scratch) = F::flow_scratch().get_ptr(0)
        {
            // SAFETY: this CPU's copy of a per-CPU array value (see `FlowScratch`).
            F::remember_fragment_ports(pkt, unsafe { (*scratch).chosen.now });
        }
    }
    match code {
        STEP_FORWARD => F::translate_and_forward::<L2>(ctx, pkt, rewrite),
        STEP_REFUSE => F::refuse::<L2>(ctx, pkt),
        STEP_NEW | STEP_OPEN => TC_ACT_OK,
        verdict => verdict,
    }
}

/// A packet of a flow conntrack knows, in either direction; `Step::New` when it starts a
/// new flow.
#[inline(always)]
fn known_flow<F: PacketFamily>(pkt: &Packet<F::Addr>) -> Step<F::Addr> {
    // One lookup on the packet's own tuple finds a known flow in either direction: on the
    // established path, conntrack is the only hash lookup.
    let key = tuple_key(pkt);
    let Some(entry) = Conntrack::<F>::get_ptr_mut(&key) else {
        return Step::New;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    F::remember_fragment_ports(pkt, now);
    // SAFETY: a value from a lookup in this run.
    if unsafe { (*entry).flags } & CT_FLAG_REPLY != 0 {
        return reply::<F>(pkt, entry, now);
    }
    match established::<F>(pkt, &key, entry, now) {
        Some(rewrite) => Step::Forward(rewrite),
        None => Step::New,
    }
}

/// A packet no known flow takes: to a frontend, a new flow (or a refusal); else untouched.
#[inline(always)]
fn new_flow<F: PacketFamily>(pkt: &Packet<F::Addr>, origin: Origin) -> Step<F::Addr> {
    // A later fragment never starts a flow: only its first fragment has the L4 header.
    if pkt.fragment == Fragment::Later {
        return Step::Verdict(TC_ACT_OK);
    }
    let Some(service) = F::services().get_ptr(frontend_key(pkt)) else {
        return Step::Verdict(TC_ACT_OK);
    };
    if origin == Origin::External && !opens_connection::<F>(pkt) {
        return Step::Verdict(TC_ACT_OK);
    }
    let Some(scratch) = F::flow_scratch().get_ptr_mut(0) else {
        return Step::Verdict(TC_ACT_SHOT);
    };
    // SAFETY: this CPU's copy of a per-CPU array value (see `FlowScratch`).
    let chosen = unsafe { &mut (*scratch).chosen };
    match to_frontend::<F>(pkt, service, origin, chosen) {
        CHOSEN => Step::Open,
        REFUSE => Step::Refuse,
        verdict => Step::Verdict(verdict),
    }
}

/// Opens the new flow `to_frontend` chose (in the scratch memory), in a frame beside the
/// one that chose it: the verifier caps the stack of the whole call chain, and each is large.
#[inline(always)]
fn open_chosen_flow<F: PacketFamily>(pkt: &Packet<F::Addr>) -> Step<F::Addr> {
    let Some(scratch) = F::flow_scratch().get_ptr_mut(0) else {
        return Step::Verdict(TC_ACT_SHOT);
    };
    // SAFETY: this CPU's copy of a per-CPU array value (see `FlowScratch`).
    let scratch = unsafe { &mut *scratch };
    // The flow's table chosen once: one map in the frame, not a branch at each use.
    let step = match (pkt.proto == IPPROTO_TCP, F::OWN_FRAMES) {
        // Already in a frame of its own (`handle_in_frames`).
        (true, true) => open_flow::<F, _>(&TcpTables::<F>::NEW, pkt, scratch),
        (false, true) => open_flow::<F, _>(&AnyTable::<F>::NEW, pkt, scratch),
        (true, false) => open_flow_frame::<F, _>(&TcpTables::<F>::NEW, pkt, scratch),
        (false, false) => open_flow_frame::<F, _>(&AnyTable::<F>::NEW, pkt, scratch),
    };
    // (`handle_in_frames` remembers fragments beside this frame.)
    if !F::OWN_FRAMES && matches!(step, Step::Forward(_)) {
        F::remember_fragment_ports(pkt, scratch.chosen.now);
    }
    step
}

/// Can this packet from outside the node, addressed to a frontend with no flow of ours, open
/// a connection there? Only a TCP SYN can; a UDP datagram can unless it answers a flow the
/// node itself sent from that address and port (its own, or a pod's it SNATed there: node
/// ports lie inside the ports a `--random-fully` SNAT picks). Everything else belongs to the
/// node's own connections and goes to its stack.
#[inline(always)]
fn opens_connection<F: PacketFamily>(pkt: &Packet<F::Addr>) -> bool {
    match pkt.proto {
        IPPROTO_TCP => pkt.is_tcp_open(),
        IPPROTO_UDP => match F::host_flows().get_ptr(&tuple_key(pkt)) {
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

/// Per-CPU working memory of a new flow: what `to_frontend` chose, and the entries and keys
/// `open_flow` builds. Off the stack: an IPv6 flow's (twice 80 + 40 bytes, and the registers
/// their addresses need) would not fit the verifier's budget for the call chain. A tc
/// program runs to completion on its CPU without another entering, so one value per CPU
/// serves every program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowScratch<A> {
    chosen: Chosen<A>,
    forward_entry: CtEntryOf<A>,
    reply_entry: CtEntryOf<A>,
    forward_key: CtKeyOf<A>,
    reply_key: CtKeyOf<A>,
}

/// What `to_frontend` chose for a new flow, handed to `open_flow`: the frontend entry's
/// settings (after the scope choice) and the backend.
#[derive(Clone, Copy, Default)]
pub struct Chosen<A> {
    rev_nat_id: u32,
    flags: u16,
    origin_external: bool,
    backend_id: u32,
    backend: BackendOf<A>,
    now: u64,
}

/// The frontend a packet is addressed to (default scope, slot 0).
#[inline(always)]
fn frontend_key<A: Address>(pkt: &Packet<A>) -> ServiceKeyOf<A> {
    ServiceKeyOf {
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
pub fn in_cluster_view<'a, F: Family>(
    frontend: &mut ServiceKeyOf<F::Addr>,
    svc: &'a ServiceValue,
) -> &'a ServiceValue {
    if svc.flags & SVC_FLAG_TWO_SCOPES == 0 {
        return svc;
    }
    let internal = ServiceKeyOf {
        scope: SCOPE_INTERNAL,
        ..*frontend
    };
    match F::services().get_ptr(internal) {
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
fn to_frontend<F: PacketFamily>(
    pkt: &Packet<F::Addr>,
    service: *const ServiceValue,
    origin: Origin,
    chosen: &mut Chosen<F::Addr>,
) -> i32 {
    let mut frontend = frontend_key(pkt);
    // Read in place, not copied: this frame is on the verifier's capped call chain.
    // SAFETY: a value from a lookup in this run, valid for the rest of it.
    let mut svc = unsafe { &*service };
    if origin == Origin::Pod {
        svc = in_cluster_view::<F>(&mut frontend, svc);
    }
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0
        && origin == Origin::External
        && !F::source_allowed(svc.rev_nat_id, pkt.saddr)
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
    let Some(backend_id) = choose_backend::<F>(&tuple_key(pkt), &frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return TC_ACT_SHOT;
    };
    let Some(backend) = backend::<F>(backend_id) else {
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
fn tuple_key<A: Copy>(pkt: &Packet<A>) -> CtKeyOf<A> {
    CtKeyOf::new(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
}

/// The reply tuple of a forward flow: from the backend to whoever it saw as the client.
#[inline(always)]
fn reply_key<A: Copy>(pkt: &Packet<A>, entry: &CtEntryOf<A>) -> CtKeyOf<A> {
    tuple_key(pkt).reply_of(entry)
}

/// Is the backend this flow was sent to still programmed (same id, same address)? An array
/// lookup, which the verifier inlines: no helper call on the established path.
#[inline(always)]
pub fn backend_alive<F: Family>(backend_id: u32, addr: F::Addr, port: u16) -> bool {
    match F::backends().get_ptr(backend_id) {
        // SAFETY: a value from a lookup in this run. Unused ids hold zeroes.
        Some(b) => unsafe { (*b).addr == addr && (*b).port == port },
        None => false,
    }
}

/// The backend with this id, if the id is in use (unused array slots hold zeroes).
#[inline(always)]
pub fn backend<F: Family>(backend_id: u32) -> Option<BackendOf<F::Addr>> {
    // SAFETY: a value from a lookup in this run.
    let b = unsafe { *F::backends().get_ptr(backend_id)? };
    (!b.addr.is_unspecified()).then_some(b)
}

/// A TCP FIN or RST (`reset`): both entries of the flow (this one, and the other
/// direction's at `other`) are marked closing (see `CT_FLAG_CLOSING`) and, after an RST,
/// reset (`CT_FLAG_RESET`); after a FIN this direction is marked as having sent it
/// (`CT_FLAG_FIN`), so the agent tells a half-closed connection from a closed one. Rare
/// packets: the second lookup costs nothing on the per-packet path.
#[inline(always)]
fn note_closing<F: PacketFamily>(
    entry: *mut CtEntryOf<F::Addr>,
    other: &CtKeyOf<F::Addr>,
    reset: bool,
) {
    let (own, others) = if reset {
        let flags = CT_FLAG_CLOSING | CT_FLAG_RESET;
        (flags, flags)
    } else {
        (CT_FLAG_CLOSING | CT_FLAG_FIN, CT_FLAG_CLOSING)
    };
    // SAFETY: `entry` came from a lookup in this run.
    unsafe { (*entry).flags |= own };
    if let Some(other) = Conntrack::<F>::get_ptr_mut(other) {
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
fn established<F: PacketFamily>(
    pkt: &Packet<F::Addr>,
    key: &CtKeyOf<F::Addr>,
    entry: *mut CtEntryOf<F::Addr>,
    now: u64,
) -> Option<nat::Rewrite<F::Addr>> {
    // SAFETY: a value from a lookup in this run, read in place.
    let known = unsafe { &*entry };
    let keeps_backend = if pkt.proto == IPPROTO_TCP {
        known.flags & CT_FLAG_CLOSING == 0 || !pkt.is_tcp_open()
    } else {
        backend_alive::<F>(known.backend_id, known.nat_addr, known.nat_port)
    };
    if keeps_backend {
        count_flow_packet(entry, pkt.ip_len as u64, now);
        count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
        if pkt.is_tcp_close() {
            note_closing::<F>(entry, &reply_key(pkt, known), pkt.tcp_flags & TCP_RST != 0);
        }
        return Some(forward_rewrite(pkt, known));
    }
    // Forget the flow; its next packet (this one) starts a new one.
    let _ = Conntrack::<F>::remove(&reply_key(pkt, known));
    let _ = Conntrack::<F>::remove(key);
    None
}

/// The backend id for a new flow (`flow`: client to frontend; its source keys session
/// affinity, the whole tuple the Maglev hash): the one a live affinity entry names, else
/// from the Maglev table or a random slot. A frame of its own, off the new-flow frame.
#[inline(never)]
pub fn choose_backend<F: Family>(
    flow: &CtKeyOf<F::Addr>,
    frontend: &ServiceKeyOf<F::Addr>,
    svc: &ServiceValue,
    now: u64,
) -> Option<u32> {
    let affinity = AffinityKeyOf {
        service_port_id: svc.service_port_id,
        client: flow.saddr,
    };
    if svc.flags & SVC_FLAG_AFFINITY != 0
        && let Some(remembered) = F::affinity().get_ptr_mut(affinity)
    {
        // SAFETY: a value from a lookup in this run.
        let remembered = unsafe { &mut *remembered };
        let fresh = now.saturating_sub(remembered.last_used_ns)
            < svc.affinity_timeout as u64 * 1_000_000_000;
        if fresh && backend::<F>(remembered.backend_id).is_some() {
            remembered.last_used_ns = now;
            return Some(remembered.backend_id);
        }
    }
    let backend_id = if svc.flags & SVC_FLAG_MAGLEV != 0 {
        let table = MAGLEV.get_ptr(svc.rev_nat_id)?;
        // black_box keeps LLVM from folding the slot's scaling into the shift, which would
        // leave the verifier a bound one element too loose.
        let index = core::hint::black_box(dataplane_common::maglev_slot(
            dataplane_common::flow_hash_of(flow),
        ));
        // SAFETY: a value from a lookup in this run; index is below the table's length.
        unsafe { *(*table).backend_ids.get(index)? }
    } else {
        // checked: a `%` the compiler cannot prove safe links a panic the verifier rejects.
        let slot = unsafe { bpf_get_prandom_u32() }.checked_rem(svc.count as u32)? as u16 + 1;
        let slot_value = F::services().get_ptr(ServiceKeyOf {
            backend_slot: slot,
            ..*frontend
        })?;
        // SAFETY: a value from a lookup in this run.
        unsafe { (*slot_value).backend_id }
    };
    if svc.flags & SVC_FLAG_AFFINITY != 0 {
        let _ = F::affinity().insert(
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
#[inline(never)]
fn claim_snat_port<A, T: CtTable<A>>(
    table: &T,
    client_port: u16,
    reply: &mut CtKeyOf<A>,
    entry: &CtEntryOf<A>,
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

/// `open_flow` in a frame of its own (a step through `Step::to_frame`, as
/// `known_flow_frame`).
#[inline(always)]
fn open_flow_frame<F: PacketFamily, T: CtTable<F::Addr>>(
    table: &T,
    pkt: &Packet<F::Addr>,
    scratch: &mut FlowScratch<F::Addr>,
) -> Step<F::Addr> {
    #[inline(never)]
    fn frame<F: PacketFamily, T: CtTable<F::Addr>>(
        table: &T,
        pkt: &Packet<F::Addr>,
        scratch: &mut FlowScratch<F::Addr>,
        rewrite: &mut nat::Rewrite<F::Addr>,
    ) -> i32 {
        open_flow::<F, T>(table, pkt, scratch).to_frame(rewrite)
    }
    Step::from_frame(
        |pkt, rewrite| frame::<F, T>(table, pkt, scratch, rewrite),
        pkt,
    )
}

/// Opens the flow `chosen` describes: its conntrack entries (the reply's first, with the
/// SNAT port claimed there), counters, then the translation to do.
#[inline(always)]
fn open_flow<F: PacketFamily, T: CtTable<F::Addr>>(
    table: &T,
    pkt: &Packet<F::Addr>,
    scratch: &mut FlowScratch<F::Addr>,
) -> Step<F::Addr> {
    let chosen = &scratch.chosen;
    let (now, backend_id, backend) = (chosen.now, chosen.backend_id, &chosen.backend);
    let entry = &mut scratch.forward_entry;
    *entry = CtEntryOf {
        packets: 1,
        bytes: pkt.ip_len as u64,
        created_ns: now,
        last_seen_ns: now,
        backend_id,
        rev_nat_id: chosen.rev_nat_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        peer_addr: F::Addr::default(),
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
        let (Some(config), Some(snat_addr)) = (CONFIG.get(0), F::snat_addr()) else {
            return Step::Verdict(TC_ACT_SHOT);
        };
        entry.flags = CT_FLAG_SNAT;
        entry.peer_addr = snat_addr;
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
        entry.peer_addr = F::HAIRPIN_ADDR;
    }
    // Reply entry first: by the time the backend can answer, it exists.
    scratch.reply_key = reply_key(pkt, &scratch.forward_entry);
    let reply = &mut scratch.reply_entry;
    *reply = scratch.forward_entry;
    reply.packets = 0;
    reply.bytes = 0;
    reply.nat_addr = pkt.daddr;
    reply.nat_port = pkt.dport;
    reply.peer_addr = if reply.flags != 0 {
        pkt.saddr
    } else {
        F::Addr::default()
    };
    reply.peer_port = if reply.flags & CT_FLAG_SNAT != 0 {
        pkt.sport
    } else {
        0
    };
    reply.flags |= CT_FLAG_REPLY;
    let reply_inserted = match snat {
        Some(range) => match claim_snat_port(
            table,
            pkt.sport,
            &mut scratch.reply_key,
            &scratch.reply_entry,
            range,
        ) {
            0 => {
                count_drop(drop_reason::SNAT_PORTS_EXHAUSTED);
                return Step::Verdict(TC_ACT_SHOT);
            }
            port => {
                scratch.forward_entry.peer_port = port;
                true
            }
        },
        None => table
            .insert(&scratch.reply_key, &scratch.reply_entry, 0)
            .is_ok(),
    };
    scratch.forward_key = tuple_key(pkt);
    if !reply_inserted
        || table
            .insert(&scratch.forward_key, &scratch.forward_entry, 0)
            .is_err()
    {
        if reply_inserted {
            let _ = table.remove(&scratch.reply_key);
        }
        count_drop(drop_reason::CT_INSERT_FAILED);
        return Step::Verdict(TC_ACT_SHOT);
    }
    count_service_packet(chosen.rev_nat_id, backend_id, pkt.ip_len as u64, true);
    Step::Forward(forward_rewrite(pkt, &scratch.forward_entry))
}

/// How a packet of a flow towards its backend is rewritten, by its forward entry.
#[inline(always)]
fn forward_rewrite<A: Copy>(pkt: &Packet<A>, entry: &CtEntryOf<A>) -> nat::Rewrite<A> {
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
fn reply<F: PacketFamily>(
    pkt: &Packet<F::Addr>,
    entry: *mut CtEntryOf<F::Addr>,
    now: u64,
) -> Step<F::Addr> {
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
        let _ = Conntrack::<F>::remove(&key.forward_of(known));
        let _ = Conntrack::<F>::remove(&key);
        return Step::Verdict(TC_ACT_OK);
    }
    count_flow_packet(entry, pkt.ip_len as u64, now);
    count_service_packet(known.rev_nat_id, known.backend_id, pkt.ip_len as u64, false);
    if pkt.is_tcp_close() {
        let reset = pkt.tcp_flags & TCP_RST != 0;
        note_closing::<F>(entry, &tuple_key(pkt).forward_of(known), reset);
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
    Step::Forward(rewrite)
}
