//! The kernel datapath. The same service load balancing runs at ingress of every pod-facing
//! interface and of the node's external interfaces:
//! - packets to a service frontend get a backend (conntrack keeps a flow on it) and DNAT;
//! - backend replies are reverse-NATed back to the frontend address;
//! - translated packets leave through the interface the FIB names, past netfilter;
//! - everything else passes untouched after two hash lookups.
//!
//! External interfaces also get an egress program that notes the node's own flows from a
//! frontend's address and port, so their replies are not taken for new connections.
//! Ethernet and Layer-3 devices (WireGuard, IPIP, TUN) each get their own build of a program.
//!
//! The node's own sockets (and, with `--socket-lb all`, pods') are translated once, at
//! `connect()`/`sendmsg()`, by cgroup hooks (`sock`).
//!
//! Entry points stay thin (aya's style); the work lives in the modules below.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bench_noop;
mod checksum;
mod counters;
mod family;
mod forward;
mod host_flows;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod refuse;
mod sock;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, SockContext, TcContext},
};
use family::{V4, V6};
use packet::ETH_HLEN;
use sock::V4Mapped;

/// Everything arriving on an interface: a TCP/UDP packet of either family goes through load
/// balancing; an ICMP or ICMPv6 error about a translated flow is translated; anything else
/// (neighbour discovery and the rest of ICMPv6 among it) passes untouched.
#[inline(always)]
fn ingress<const L2: usize>(ctx: &TcContext, origin: lb::Origin) -> i32 {
    if packet::is_ipv4::<L2>(ctx) {
        ingress4::<L2>(ctx, origin)
    } else if packet::is_ipv6::<L2>(ctx) {
        // ICMPv6 in a frame beside the load balancer's, not below it (the stack budget).
        match ingress6::<L2>(ctx, origin) {
            NOT_TCP_OR_UDP => icmp::translate_error6::<L2>(ctx),
            verdict => verdict,
        }
    } else {
        TC_ACT_OK
    }
}

/// Each family in a frame of its own: the verifier caps the stack of a whole call chain
/// (512 bytes), and either family's path takes most of it.
#[inline(never)]
fn ingress4<const L2: usize>(ctx: &TcContext, origin: lb::Origin) -> i32 {
    match packet::parse::<L2>(ctx) {
        Some(pkt) => lb::handle::<V4, L2>(ctx, &pkt, origin),
        None => icmp::translate_error::<L2>(ctx),
    }
}

#[inline(never)]
fn ingress6<const L2: usize>(ctx: &TcContext, origin: lb::Origin) -> i32 {
    let Some(pkt) = maps::PACKET6.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's copy of a per-CPU array value, used by this program run alone (a tc
    // program runs to completion on its CPU without another entering).
    let pkt = unsafe { &mut *pkt };
    match packet::parse6::<L2>(ctx, pkt) {
        Some(()) => lb::handle::<V6, L2>(ctx, pkt, origin),
        None => NOT_TCP_OR_UDP,
    }
}

/// `ingress6`'s answer for a packet it does not load-balance (never a tc verdict).
const NOT_TCP_OR_UDP: i32 = i32::MIN;

/// Ingress of pod-facing interfaces: traffic from pods.
#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    ingress::<ETH_HLEN>(&ctx, lb::Origin::Pod)
}

/// Ingress of the node's external interfaces: clients outside the cluster reaching node
/// ports, load-balancer IPs and external IPs, and backends on other nodes replying.
#[classifier]
pub fn external_ingress(ctx: TcContext) -> i32 {
    ingress::<ETH_HLEN>(&ctx, lb::Origin::External)
}

/// `external_ingress` for Layer-3 devices (no link header): WireGuard, IPIP tunnels.
#[classifier]
pub fn external_ingress_l3(ctx: TcContext) -> i32 {
    ingress::<0>(&ctx, lb::Origin::External)
}

/// Egress of the node's external interfaces: notes the node's own flows from frontends.
#[classifier]
pub fn external_egress(ctx: TcContext) -> i32 {
    host_flows::note::<ETH_HLEN>(&ctx)
}

/// `external_egress` for Layer-3 devices.
#[classifier]
pub fn external_egress_l3(ctx: TcContext) -> i32 {
    host_flows::note::<0>(&ctx)
}

/// `connect()` of the node's sockets (and pods', with `--socket-lb all`) to a frontend:
/// translated to a backend once, at the socket (see `sock`).
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4>(&ctx)
}

/// `sendmsg()` of unconnected UDP sockets to a frontend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V4>(&ctx)
}

/// `recvmsg()` on UDP sockets: a translated socket's datagrams come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_peer::<V4>(&ctx)
}

/// `getpeername()`: a translated socket's peer is the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_peer::<V4>(&ctx)
}

/// The same four for IPv6 sockets: IPv6 frontends, and IPv4 ones by their mapped addresses.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::ipv6_hook(&ctx, sock::connect::<V6>, sock::connect::<V4Mapped>)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::ipv6_hook(&ctx, sock::sendmsg::<V6>, sock::sendmsg::<V4Mapped>)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::ipv6_hook(
        &ctx,
        sock::restore_peer::<V6>,
        sock::restore_peer::<V4Mapped>,
    )
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::ipv6_hook(
        &ctx,
        sock::restore_peer::<V6>,
        sock::restore_peer::<V4Mapped>,
    )
}

/// A socket is released: its translation is forgotten.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
