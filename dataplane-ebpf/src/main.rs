//! The kernel datapath. One tc program, attached at ingress of every pod-facing interface on
//! the node, does three things:
//! - packets to a service frontend get a backend (conntrack keeps a flow on it) and DNAT;
//! - backend replies are reverse-NATed back to the frontend address;
//! - everything else passes untouched after two hash lookups.
//!
//! Entry points stay thin (aya's style); the work lives in the modules below.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bench_noop;
mod checksum;
mod counters;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod refuse;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Ingress of pod-facing interfaces: traffic from pods.
#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    match packet::parse(&ctx) {
        Some(pkt) => lb::handle(&ctx, &pkt, lb::Origin::Pod),
        // Not IPv4 TCP/UDP: an ICMP error about a translated flow, or not ours.
        None => icmp::translate_error(&ctx),
    }
}

/// Ingress of the node's external interfaces: clients outside the cluster reaching node
/// ports, load-balancer IPs and external IPs, and backends on other nodes replying.
#[classifier]
pub fn external_ingress(ctx: TcContext) -> i32 {
    match packet::parse(&ctx) {
        Some(pkt) => lb::handle(&ctx, &pkt, lb::Origin::External),
        None => icmp::translate_error(&ctx),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
