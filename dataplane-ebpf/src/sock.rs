//! Socket-level load balancing: cgroup hooks translate a service address once, when a socket
//! connects (or an unconnected UDP socket sends), to the backend, so the socket talks to the
//! backend directly and its packets need no per-packet NAT. This is how the node's own
//! processes (host-network pods, node daemons) reach services: their packets never cross a
//! pod or external interface's ingress, where the tc programs work.
//!
//! The application keeps seeing the service address: `getpeername()` and the source of
//! received datagrams are translated back, from `dp_sock_v1` entries keyed by the socket's
//! cookie, which `sock_release` removes with the socket.
//!
//! Backends are chosen as for packets (`lb::choose_backend`), with the in-cluster view of a
//! frontend (internal traffic policy; the externalTrafficPolicy=Local short circuit).
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    programs::{SockAddrContext, SockContext},
};
use dataplane_common::{
    CtKey, IPPROTO_TCP, IPPROTO_UDP, Ipv4, SOCK_FORWARD, SOCK_REVERSE, SOCKET_LB_ALL,
    SOCKET_LB_HOST, SVC_FLAG_DROP_WHEN_EMPTY, ServiceKey, SockEntry, SockKey, drop_reason,
};

use crate::{
    counters::{count_drop, count_socket_connection},
    lb::{backend, backend_alive, choose_backend, in_cluster_view},
    maps::{CONFIG, SERVICES, SOCKET_CONFIG, SOCKETS},
};

/// A cgroup socket hook's verdict: go on (with the address as the program left it).
const PROCEED: i32 = 1;
/// Fail the call, with the error set by `bpf_set_retval`.
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// The address a sock_addr hook sees, in the kernel's layout (network order).
#[inline(always)]
fn user_addr(sa: &bpf_sock_addr) -> (Ipv4, u16) {
    // `user_port` holds the network-order port in its first two bytes.
    (sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn set_user_addr(sa: &mut bpf_sock_addr, addr: Ipv4, port: u16) {
    sa.user_ip4 = u32::from_ne_bytes(addr);
    sa.user_port = port.to_be() as u32;
}

/// The client address session affinity remembers for a socket: the node's own address for
/// the node's processes (as their packets would carry it), and for a pod (`all` mode) its
/// network namespace, folded into `0.0.0.0/8`, an address no packet carries — the pod's own
/// address is not known before the socket is bound. `None`: this socket is not ours to
/// translate (`--socket-lb` mode).
#[inline(always)]
fn affinity_client<C: EbpfContext>(ctx: &C) -> Option<Ipv4> {
    let config = SOCKET_CONFIG.get(0)?;
    // SAFETY: the helper reads the context it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match config.mode {
        SOCKET_LB_HOST | SOCKET_LB_ALL if netns == config.netns_cookie => {
            Some(CONFIG.get(0).map(|c| c.snat_addr).unwrap_or_default())
        }
        SOCKET_LB_ALL => {
            let [_, a, b, c] = (netns as u32 ^ (netns >> 32) as u32).to_be_bytes();
            Some([0, a, b, c])
        }
        _ => None,
    }
}

/// What the socket is to talk to instead of a frontend.
struct Translation {
    backend_id: u32,
    rev_nat_id: u32,
    addr: Ipv4,
    port: u16,
}

/// A backend for a new socket flow to the frontend `(addr, port, proto)`, or the error the
/// call fails with. `None` inside `Ok`: not a frontend, or not a socket of ours.
#[inline(always)]
fn choose<C: EbpfContext>(
    ctx: &C,
    addr: Ipv4,
    port: u16,
    proto: u8,
) -> Result<Option<(Translation, u64)>, i32> {
    let mut frontend = ServiceKey {
        addr,
        port,
        proto,
        ..Default::default()
    };
    let Some(service) = SERVICES.get_ptr(frontend) else {
        return Ok(None);
    };
    let Some(client) = affinity_client(ctx) else {
        return Ok(None);
    };
    // SAFETY: a value from a lookup in this run.
    let svc = in_cluster_view(&mut frontend, unsafe { &*service });
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
    let flow = CtKey::new(client, addr, cookie as u16, port, proto);
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(backend_id) = choose_backend(&flow, &frontend, svc, now) else {
        count_drop(drop_reason::BACKEND_MISSING);
        return Err(EHOSTUNREACH);
    };
    let Some(backend) = backend(backend_id) else {
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
fn remember(cookie: u64, proto: u8, frontend: (Ipv4, u16), to: &Translation) {
    let key = SockKey {
        cookie,
        addr: to.addr,
        port: to.port,
        proto,
        kind: SOCK_REVERSE,
    };
    let entry = SockEntry {
        addr: frontend.0,
        port: frontend.1,
        _pad: 0,
        backend_id: to.backend_id,
        rev_nat_id: to.rev_nat_id,
        // SAFETY: the helper takes no arguments.
        created_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = SOCKETS.insert(&key, &entry, 0);
    count_socket_connection(to.rev_nat_id, to.backend_id);
}

/// Sends the socket's call to a new backend for `frontend`, recorded for the socket (and by
/// `also`, for what the caller keeps besides), or fails it when the service cannot take it.
#[inline(always)]
fn to_new_backend(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    frontend: (Ipv4, u16),
    proto: u8,
    also: impl FnOnce(&Translation),
) -> i32 {
    match choose(ctx, frontend.0, frontend.1, proto) {
        Ok(Some((to, cookie))) => {
            also(&to);
            remember(cookie, proto, frontend, &to);
            set_user_addr(sa, to.addr, to.port);
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

/// `connect()` (TCP, and UDP sockets that connect): a frontend becomes a backend once, for
/// the socket's life.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = tcp_or_udp(sa) else {
        return PROCEED;
    };
    let frontend = user_addr(sa);
    to_new_backend(ctx, sa, frontend, proto, |_| {})
}

/// `sendmsg()`/`sendto()` on an unconnected UDP socket: each datagram to a frontend goes to
/// the backend the socket's earlier datagrams there went to, while it is still programmed
/// (as a UDP flow keeps its backend in conntrack), else to a new choice.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    if tcp_or_udp(sa) != Some(IPPROTO_UDP) {
        return PROCEED;
    }
    let (addr, port) = user_addr(sa);
    // Datagrams to anything but a frontend (most of them) leave before the socket's cookie
    // is taken: a first cookie is allocated, and the forward entries only name frontends.
    let frontend = ServiceKey {
        addr,
        port,
        proto: IPPROTO_UDP,
        ..Default::default()
    };
    if SERVICES.get_ptr(frontend).is_none() {
        return PROCEED;
    }
    // SAFETY: the helper reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward = SockKey {
        cookie,
        addr,
        port,
        proto: IPPROTO_UDP,
        kind: SOCK_FORWARD,
    };
    if let Some(known) = SOCKETS.get_ptr(&forward) {
        // SAFETY: a value from a lookup in this run.
        let known = unsafe { &*known };
        if backend_alive(known.backend_id, known.addr, known.port) {
            set_user_addr(sa, known.addr, known.port);
            return PROCEED;
        }
    }
    to_new_backend(ctx, sa, (addr, port), IPPROTO_UDP, |to| {
        let entry = SockEntry {
            addr: to.addr,
            port: to.port,
            _pad: 0,
            backend_id: to.backend_id,
            rev_nat_id: to.rev_nat_id,
            // SAFETY: the helper takes no arguments.
            created_ns: unsafe { bpf_ktime_get_coarse_ns() },
        };
        let _ = SOCKETS.insert(&forward, &entry, 0);
    })
}

/// The peer address the application sees (`recvmsg()`'s source, `getpeername()`): the
/// frontend it asked for instead of the backend the socket was sent to.
#[inline(always)]
pub fn restore_peer(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = tcp_or_udp(sa) else {
        return PROCEED;
    };
    let (addr, port) = user_addr(sa);
    let key = SockKey {
        // SAFETY: the helper reads the context it is given.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        proto,
        kind: SOCK_REVERSE,
    };
    if let Some(frontend) = SOCKETS.get_ptr(&key) {
        // SAFETY: a value from a lookup in this run.
        let frontend = unsafe { &*frontend };
        set_user_addr(sa, frontend.addr, frontend.port);
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
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || sk.dst_ip4 == 0 {
        return PROCEED;
    }
    // Only sockets the hooks translate have entries: in `host` mode the node's own. A pod's
    // socket (every connection a pod accepts or makes) leaves before the cookie and the LRU's
    // bucket lock.
    if affinity_client(ctx).is_none() {
        return PROCEED;
    }
    let key = SockKey {
        // SAFETY: the helper reads the context it is given.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sk.dst_ip4.to_ne_bytes(),
        port: u16::from_be(sk.dst_port),
        proto,
        kind: SOCK_REVERSE,
    };
    let _ = SOCKETS.remove(&key);
    PROCEED
}
