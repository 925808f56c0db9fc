//! Socket-level load balancing: cgroup hooks translate a service address once, when a socket
//! connects (or an unconnected UDP socket sends), to the backend, so the socket talks to the
//! backend directly and its packets need no per-packet NAT. This is how the node's own
//! processes (host-network pods, node daemons) reach services: their packets never cross a
//! pod or external interface's ingress, where the tc programs work.
//!
//! The application keeps seeing the service address: `getpeername()` and the source of
//! received datagrams are translated back, from `dp_sock_v1` (`dp_sock6_v1`) entries keyed by
//! the socket's cookie, which `sock_release` removes with the socket.
//!
//! Backends are chosen as for packets (`lb::choose_backend`), with the in-cluster view of a
//! frontend (internal traffic policy; the externalTrafficPolicy=Local short circuit).
//!
//! Both families, written once over `SockFamily`: IPv4 sockets, IPv6 sockets to IPv6
//! frontends, and IPv6 sockets to IPv4-mapped addresses (`::ffff:10.96.0.10`), which reach the
//! IPv4 service and get its backend, mapped (`V4Mapped`).
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    btf_maps::LruHashMap,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    programs::{SockAddrContext, SockContext},
};
use dataplane_common::{
    CtKeyOf, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, SOCK_FORWARD, SOCK_REVERSE, SOCKET_LB_ALL,
    SOCKET_LB_HOST, SVC_FLAG_DROP_WHEN_EMPTY, ServiceKeyOf, SockEntry, SockEntry6, SockKey,
    SockKey6, capacity, drop_reason,
};

use crate::{
    counters::{count_drop, count_socket_connection},
    family::{Affinity, Backends, Family, Services, V4, V6},
    lb::{backend, backend_alive, choose_backend, in_cluster_view},
    maps::{CONFIG, CONFIG6, SOCKET_CONFIG, SOCKETS, SOCKETS6},
};

/// A cgroup socket hook's verdict: go on (with the address as the program left it).
const PROCEED: i32 = 1;
/// Fail the call, with the error set by `bpf_set_retval`.
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const AF_INET6: u32 = 10;

type Sockets<K, V> = LruHashMap<K, V, { capacity::SOCKETS as usize }>;

/// A family as the socket hooks see it: where a hook's address sits in the context, and
/// the socket map's layout.
pub trait SockFamily: Family {
    type Key;
    type Entry;

    fn sockets() -> &'static Sockets<Self::Key, Self::Entry>;
    /// The address a sock_addr hook sees (network order), and its port (host order).
    fn user_addr(sa: &bpf_sock_addr) -> (Self::Addr, u16);
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: Self::Addr, port: u16);
    fn key(cookie: u64, addr: Self::Addr, port: u16, proto: u8, kind: u8) -> Self::Key;
    fn entry(to: (Self::Addr, u16), backend_id: u32, rev_nat_id: u32, now: u64) -> Self::Entry;
    /// An entry's address, port and backend id.
    fn target(entry: &Self::Entry) -> (Self::Addr, u16, u32);
    /// The node's own address of the family, the client its sockets are for affinity.
    fn node_addr() -> Self::Addr;
    /// A pod's socket (`all` mode) as an affinity client: its network namespace folded into
    /// an address no packet carries (the pod's own is not known before the socket binds).
    fn pod_client(netns: u64) -> Self::Addr;
}

/// The port a sock_addr hook sees: `user_port` holds it in network order in its first two
/// bytes.
#[inline(always)]
fn user_port(sa: &bpf_sock_addr) -> u16 {
    u16::from_be(sa.user_port as u16)
}

#[inline(always)]
fn fold(netns: u64) -> [u8; 4] {
    (netns as u32 ^ (netns >> 32) as u32).to_be_bytes()
}

impl SockFamily for V4 {
    type Key = SockKey;
    type Entry = SockEntry;

    #[inline(always)]
    fn sockets() -> &'static Sockets<SockKey, SockEntry> {
        &SOCKETS
    }
    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> (Ipv4, u16) {
        (sa.user_ip4.to_ne_bytes(), user_port(sa))
    }
    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: Ipv4, port: u16) {
        sa.user_ip4 = u32::from_ne_bytes(addr);
        sa.user_port = port.to_be() as u32;
    }
    #[inline(always)]
    fn key(cookie: u64, addr: Ipv4, port: u16, proto: u8, kind: u8) -> SockKey {
        SockKey {
            cookie,
            addr,
            port,
            proto,
            kind,
        }
    }
    #[inline(always)]
    fn entry((addr, port): (Ipv4, u16), backend_id: u32, rev_nat_id: u32, now: u64) -> SockEntry {
        SockEntry {
            addr,
            port,
            _pad: 0,
            backend_id,
            rev_nat_id,
            created_ns: now,
        }
    }
    #[inline(always)]
    fn target(entry: &SockEntry) -> (Ipv4, u16, u32) {
        (entry.addr, entry.port, entry.backend_id)
    }
    #[inline(always)]
    fn node_addr() -> Ipv4 {
        CONFIG.get(0).map(|c| c.snat_addr).unwrap_or_default()
    }
    /// Folded into `0.0.0.0/8`.
    #[inline(always)]
    fn pod_client(netns: u64) -> Ipv4 {
        let [_, a, b, c] = fold(netns);
        [0, a, b, c]
    }
}

impl SockFamily for V6 {
    type Key = SockKey6;
    type Entry = SockEntry6;

    #[inline(always)]
    fn sockets() -> &'static Sockets<SockKey6, SockEntry6> {
        &SOCKETS6
    }
    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> (Ipv6, u16) {
        (ipv6_of(sa.user_ip6), user_port(sa))
    }
    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: Ipv6, port: u16) {
        sa.user_ip6 = addr.words();
        sa.user_port = port.to_be() as u32;
    }
    #[inline(always)]
    fn key(cookie: u64, addr: Ipv6, port: u16, proto: u8, kind: u8) -> SockKey6 {
        SockKey6 {
            cookie,
            addr,
            port,
            proto,
            kind,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn entry((addr, port): (Ipv6, u16), backend_id: u32, rev_nat_id: u32, now: u64) -> SockEntry6 {
        SockEntry6 {
            created_ns: now,
            addr,
            port,
            _pad: 0,
            backend_id,
            rev_nat_id,
            _pad1: 0,
        }
    }
    #[inline(always)]
    fn target(entry: &SockEntry6) -> (Ipv6, u16, u32) {
        (entry.addr, entry.port, entry.backend_id)
    }
    #[inline(always)]
    fn node_addr() -> Ipv6 {
        CONFIG6.get(0).map(|c| c.snat_addr).unwrap_or_default()
    }
    /// Folded into `100::/64`, the discard-only prefix (RFC 6666).
    #[inline(always)]
    fn pod_client(netns: u64) -> Ipv6 {
        let [a, b, c, d] = fold(netns);
        Ipv6::new([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d])
    }
}

/// An IPv6 socket talking to an IPv4-mapped address (`::ffff:a.b.c.d`): the IPv4 service,
/// its maps and socket entries; only the address in the hook's context is the mapped form.
pub struct V4Mapped;

impl Family for V4Mapped {
    type Addr = Ipv4;

    #[inline(always)]
    fn services() -> &'static Services<Ipv4> {
        V4::services()
    }
    #[inline(always)]
    fn backends() -> &'static Backends<Ipv4> {
        V4::backends()
    }
    #[inline(always)]
    fn affinity() -> &'static Affinity<Ipv4> {
        V4::affinity()
    }
}

/// `::ffff:0:0/96`, as the first three words of an address in memory.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, 0xffff_u32.to_be()];

#[inline(always)]
fn is_v4_mapped(words: [u32; 4]) -> bool {
    words[0] == V4_MAPPED_PREFIX[0]
        && words[1] == V4_MAPPED_PREFIX[1]
        && words[2] == V4_MAPPED_PREFIX[2]
}

impl SockFamily for V4Mapped {
    type Key = SockKey;
    type Entry = SockEntry;

    #[inline(always)]
    fn sockets() -> &'static Sockets<SockKey, SockEntry> {
        V4::sockets()
    }
    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> (Ipv4, u16) {
        (sa.user_ip6[3].to_ne_bytes(), user_port(sa))
    }
    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: Ipv4, port: u16) {
        let [a, b, c] = V4_MAPPED_PREFIX;
        sa.user_ip6 = [a, b, c, u32::from_ne_bytes(addr)];
        sa.user_port = port.to_be() as u32;
    }
    #[inline(always)]
    fn key(cookie: u64, addr: Ipv4, port: u16, proto: u8, kind: u8) -> SockKey {
        V4::key(cookie, addr, port, proto, kind)
    }
    #[inline(always)]
    fn entry(to: (Ipv4, u16), backend_id: u32, rev_nat_id: u32, now: u64) -> SockEntry {
        V4::entry(to, backend_id, rev_nat_id, now)
    }
    #[inline(always)]
    fn target(entry: &SockEntry) -> (Ipv4, u16, u32) {
        V4::target(entry)
    }
    #[inline(always)]
    fn node_addr() -> Ipv4 {
        V4::node_addr()
    }
    #[inline(always)]
    fn pod_client(netns: u64) -> Ipv4 {
        V4::pod_client(netns)
    }
}

#[inline(always)]
fn ipv6_of(words: [u32; 4]) -> Ipv6 {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    Ipv6::new([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ])
}

/// The client address session affinity remembers for a socket: the node's own address for
/// the node's processes (as their packets would carry it), and for a pod (`all` mode) its
/// network namespace (`SockFamily::pod_client`). `None`: this socket is not ours to
/// translate (`--socket-lb` mode).
#[inline(always)]
fn affinity_client<F: SockFamily, C: EbpfContext>(ctx: &C) -> Option<F::Addr> {
    let config = SOCKET_CONFIG.get(0)?;
    // SAFETY: the helper reads the context it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match config.mode {
        SOCKET_LB_HOST | SOCKET_LB_ALL if netns == config.netns_cookie => Some(F::node_addr()),
        SOCKET_LB_ALL => Some(F::pod_client(netns)),
        _ => None,
    }
}

/// What the socket is to talk to instead of a frontend.
struct Translation<A> {
    backend_id: u32,
    rev_nat_id: u32,
    addr: A,
    port: u16,
}

/// A backend for a new socket flow to the frontend `(addr, port, proto)`, and the socket's
/// cookie, or the error the call fails with. `None` inside `Ok`: not a frontend, or not a
/// socket of ours.
#[inline(always)]
fn choose<F: SockFamily, C: EbpfContext>(
    ctx: &C,
    addr: F::Addr,
    port: u16,
    proto: u8,
) -> Result<Option<(Translation<F::Addr>, u64)>, i32> {
    let mut frontend = ServiceKeyOf {
        addr,
        port,
        proto,
        ..Default::default()
    };
    let Some(service) = F::services().get_ptr(frontend) else {
        return Ok(None);
    };
    let Some(client) = affinity_client::<F, C>(ctx) else {
        return Ok(None);
    };
    // SAFETY: a value from a lookup in this run.
    let svc = in_cluster_view::<F>(&mut frontend, unsafe { &*service });
    if svc.count == 0 {
        // No endpoint at all: refused, as the datapath answers a packet with a reset. None
        // this node may use under its traffic policy while others exist: unreachable (the
        // datapath drops that packet; a socket learns it at once).
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count_drop(drop_reason::NO_LOCAL_ENDPOINTS);
            return Err(EHOSTUNREACH);
        }
        count_drop(drop_reason::NO_ENDPOINTS);
        return Err(ECONNREFUSED);
    }
    // SAFETY: the helper reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The flow as Maglev hashes it: no source port is chosen yet, so the socket's cookie
    // stands in for it (each socket its own hash, as each connection has).
    let flow = CtKeyOf::new(client, addr, cookie as u16, port, proto);
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(backend_id) = choose_backend::<F>(&flow, &frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return Err(EHOSTUNREACH);
    };
    let Some(backend) = backend::<F>(backend_id) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return Err(EHOSTUNREACH);
    };
    let to = Translation {
        backend_id,
        rev_nat_id: svc.rev_nat_id,
        addr: backend.addr,
        port: backend.port,
    };
    Ok(Some((to, cookie)))
}

/// Records `to` for the socket (the reverse entry, so the frontend can be given back) and
/// counts the connection.
#[inline(always)]
fn remember<F: SockFamily>(
    cookie: u64,
    proto: u8,
    frontend: (F::Addr, u16),
    to: &Translation<F::Addr>,
) {
    let key = F::key(cookie, to.addr, to.port, proto, SOCK_REVERSE);
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let entry = F::entry(frontend, to.backend_id, to.rev_nat_id, now);
    let _ = F::sockets().insert(&key, &entry, 0);
    count_socket_connection(to.rev_nat_id, to.backend_id);
}

/// Sends the socket's call to a new backend for `frontend`, recorded for the socket (and by
/// `also`, for what the caller keeps besides), or fails it when the service cannot take it.
#[inline(always)]
fn to_new_backend<F: SockFamily>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    frontend: (F::Addr, u16),
    proto: u8,
    also: impl FnOnce(&Translation<F::Addr>, u64),
) -> i32 {
    match choose::<F, _>(ctx, frontend.0, frontend.1, proto) {
        Ok(Some((to, cookie))) => {
            also(&to, cookie);
            remember::<F>(cookie, proto, frontend, &to);
            F::set_user_addr(sa, to.addr, to.port);
            PROCEED
        }
        Ok(None) => PROCEED,
        Err(errno) => fail(errno),
    }
}

/// Fails the socket call with `errno`.
#[inline(always)]
fn fail(errno: i32) -> i32 {
    // SAFETY: a plain helper call; allowed in the cgroup socket hooks that may fail.
    unsafe { bpf_set_retval(-errno) };
    FAIL
}

#[inline(always)]
fn tcp_or_udp(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol as u8 {
        p @ (IPPROTO_TCP | IPPROTO_UDP) => Some(p),
        _ => None,
    }
}

/// An IPv6 hook's call goes to the IPv6 service, or, for an IPv4-mapped address, to the
/// IPv4 one.
#[inline(always)]
pub fn ipv6_hook(
    ctx: &SockAddrContext,
    v6: fn(&SockAddrContext) -> i32,
    mapped: fn(&SockAddrContext) -> i32,
) -> i32 {
    // SAFETY: the context the kernel passed.
    let words = unsafe { (*ctx.sock_addr).user_ip6 };
    if is_v4_mapped(words) {
        mapped(ctx)
    } else {
        v6(ctx)
    }
}

/// `connect()` (TCP, and UDP sockets that connect): a frontend becomes a backend once, for
/// the socket's life.
#[inline(always)]
pub fn connect<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = tcp_or_udp(sa) else {
        return PROCEED;
    };
    let frontend = F::user_addr(sa);
    to_new_backend::<F>(ctx, sa, frontend, proto, |_, _| {})
}

/// `sendmsg()`/`sendto()` on an unconnected UDP socket: each datagram to a frontend goes to
/// the backend the socket's earlier datagrams there went to, while it is still programmed
/// (as a UDP flow keeps its backend in conntrack), else to a new choice.
#[inline(always)]
pub fn sendmsg<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    if tcp_or_udp(sa) != Some(IPPROTO_UDP) {
        return PROCEED;
    }
    let (addr, port) = F::user_addr(sa);
    // Datagrams to anything but a frontend (most of them) leave before the socket's cookie
    // is taken: a first cookie is allocated, and the forward entries only name frontends.
    let frontend = ServiceKeyOf {
        addr,
        port,
        proto: IPPROTO_UDP,
        ..Default::default()
    };
    if F::services().get_ptr(frontend).is_none() {
        return PROCEED;
    }
    // SAFETY: the helper reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward = F::key(cookie, addr, port, IPPROTO_UDP, SOCK_FORWARD);
    if let Some(known) = F::sockets().get_ptr(&forward) {
        // SAFETY: a value from a lookup in this run.
        let (to, to_port, backend_id) = F::target(unsafe { &*known });
        if backend_alive::<F>(backend_id, to, to_port) {
            F::set_user_addr(sa, to, to_port);
            return PROCEED;
        }
    }
    to_new_backend::<F>(ctx, sa, (addr, port), IPPROTO_UDP, |to, cookie| {
        // SAFETY: the helper takes no arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let entry = F::entry((to.addr, to.port), to.backend_id, to.rev_nat_id, now);
        let forward = F::key(cookie, addr, port, IPPROTO_UDP, SOCK_FORWARD);
        let _ = F::sockets().insert(&forward, &entry, 0);
    })
}

/// The peer address the application sees (`recvmsg()`'s source, `getpeername()`): the
/// frontend it asked for instead of the backend the socket was sent to.
#[inline(always)]
pub fn restore_peer<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = tcp_or_udp(sa) else {
        return PROCEED;
    };
    let (addr, port) = F::user_addr(sa);
    // SAFETY: the helper reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = F::key(cookie, addr, port, proto, SOCK_REVERSE);
    if let Some(frontend) = F::sockets().get_ptr(&key) {
        // SAFETY: a value from a lookup in this run.
        let (frontend, frontend_port, _) = F::target(unsafe { &*frontend });
        F::set_user_addr(sa, frontend, frontend_port);
    }
    PROCEED
}

/// A socket is released: its reverse entry goes with it (a connected socket's peer is the
/// backend it was sent to). Unconnected UDP sockets' entries age out of the LRU.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sk = unsafe { &*ctx.sock };
    let proto = sk.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let port = u16::from_be(sk.dst_port);
    if sk.family == AF_INET6 {
        if is_v4_mapped(sk.dst_ip6) {
            forget::<V4Mapped>(ctx, sk.dst_ip6[3].to_ne_bytes(), port, proto)
        } else {
            forget::<V6>(ctx, ipv6_of(sk.dst_ip6), port, proto)
        }
    } else {
        forget::<V4>(ctx, sk.dst_ip4.to_ne_bytes(), port, proto)
    }
}

/// Removes the reverse entry of a released socket connected to `peer`, if it can have one.
#[inline(always)]
fn forget<F: SockFamily>(ctx: &SockContext, peer: F::Addr, port: u16, proto: u8) -> i32 {
    use dataplane_common::Address;
    if peer.is_unspecified() {
        return PROCEED;
    }
    // Only sockets the hooks translate have entries: in `host` mode the node's own. A pod's
    // socket (every connection a pod accepts or makes) leaves before the cookie and the LRU's
    // bucket lock.
    if affinity_client::<F, _>(ctx).is_none() {
        return PROCEED;
    }
    // SAFETY: the helper reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = F::sockets().remove(&F::key(cookie, peer, port, proto, SOCK_REVERSE));
    PROCEED
}
