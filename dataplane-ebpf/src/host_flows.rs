//! The node's own UDP flows on a frontend's address and port, seen at egress of its external
//! interfaces (after netfilter's SNAT, so a pod's flow SNATed to the node shows with the port
//! it got). Node ports lie inside the ports a `--random-fully` SNAT picks (1024-65535), so a
//! reply to such a flow arrives at a node port; `lb::opens_connection` finds it here and lets
//! the stack have it instead of starting a service flow. TCP needs no entry: a reply is never
//! a bare SYN.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use dataplane_common::{CtKey, IPPROTO_UDP, ServiceKey};

use crate::{
    family::V4,
    maps::{Conntrack, HOST_FLOWS, SERVICES},
    packet::{Fragment, is_ipv4, parse},
};

/// Notes an outgoing UDP packet whose source is a frontend, unless it is the datapath's own
/// translated reply (a flow in conntrack). Never changes or drops the packet.
#[inline(always)]
pub fn note<const L2: usize>(ctx: &TcContext) -> i32 {
    if !is_ipv4::<L2>(ctx) {
        return TC_ACT_OK;
    }
    let Some(pkt) = parse::<L2>(ctx) else {
        return TC_ACT_OK;
    };
    if pkt.proto != IPPROTO_UDP || pkt.fragment == Fragment::Later {
        return TC_ACT_OK;
    }
    let source = ServiceKey {
        addr: pkt.saddr,
        port: pkt.sport,
        backend_slot: 0,
        proto: pkt.proto,
        ..Default::default()
    };
    if SERVICES.get_ptr(source).is_none() {
        return TC_ACT_OK;
    }
    // The tuple replies arrive with.
    let replies = CtKey::new(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto);
    if Conntrack::<V4>::get_ptr(&replies).is_some() {
        return TC_ACT_OK;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let _ = HOST_FLOWS.insert(&replies, &now, 0);
    TC_ACT_OK
}
