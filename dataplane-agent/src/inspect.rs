//! `services` and `flows`: what the pinned maps hold, as tables for people and JSON for tools.
//! Reads only the pins, so it works while the agent is stopped.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use dataplane_common::{
    BACKEND_STATE_TERMINATING, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_HAIRPIN, CtEntry, CtKey,
    ServiceKey, TrafficStats,
};
use serde::Serialize;

use crate::{datapath::maps::PinnedMaps, plan::Protocol};

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceBackendView {
    pub backend_id: u32,
    pub address: String,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub frontend: String,
    pub protocol: String,
    pub frontend_id: u32,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub backends: Vec<ServiceBackendView>,
}

#[derive(Debug, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub backend_id: u32,
    pub frontend_id: u32,
    pub hairpin: bool,
    pub to_backend: Counters,
    pub to_client: Counters,
    pub age_seconds: f64,
    pub idle_seconds: f64,
}

fn protocol_name(n: u8) -> String {
    Protocol::from_number(n)
        .map(|p| p.to_string())
        .unwrap_or_else(|| n.to_string())
}

fn socket(addr: [u8; 4], port: u16) -> String {
    SocketAddrV4::new(Ipv4Addr::from(addr), port).to_string()
}

pub fn services(maps: &PinnedMaps) -> anyhow::Result<Vec<ServiceView>> {
    let mut frontends: BTreeMap<(u8, [u8; 4], u16), (u32, u16)> = BTreeMap::new();
    let mut slots: BTreeMap<ServiceKey, u32> = BTreeMap::new();
    for entry in maps.services.iter() {
        let (key, value) = entry?;
        if key.backend_slot == 0 {
            frontends.insert(
                (key.proto, key.addr, key.port),
                (value.rev_nat_id, value.count),
            );
        } else {
            slots.insert(key, value.backend_id);
        }
    }
    let stats =
        |array: &aya::maps::Array<_, TrafficStats>, id: u32| array.get(&id, 0).unwrap_or_default();
    let mut out = Vec::new();
    for ((proto, addr, port), (rev_nat_id, count)) in frontends {
        let s = stats(&maps.service_stats, rev_nat_id);
        let mut backends = Vec::new();
        for slot in 1..=count {
            let key = ServiceKey {
                addr,
                port,
                backend_slot: slot,
                proto,
                ..Default::default()
            };
            let Some(&backend_id) = slots.get(&key) else {
                continue;
            };
            let Ok(backend) = maps.backends.get(&backend_id, 0) else {
                continue;
            };
            let b = stats(&maps.backend_stats, backend_id);
            backends.push(ServiceBackendView {
                backend_id,
                address: socket(backend.addr, backend.port),
                state: if backend.state == BACKEND_STATE_TERMINATING {
                    "terminating"
                } else {
                    "active"
                },
                packets: b.packets,
                bytes: b.bytes,
                connections: b.connections,
            });
        }
        out.push(ServiceView {
            frontend: socket(addr, port),
            protocol: protocol_name(proto),
            frontend_id: rev_nat_id,
            packets: s.packets,
            bytes: s.bytes,
            connections: s.connections,
            backends,
        });
    }
    Ok(out)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-parameter; CLOCK_MONOTONIC is what bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A reply entry's tuple: protocol, backend address and port, client address and port.
type ReplyTuple = (u8, [u8; 4], u16, [u8; 4], u16);

pub fn flows(maps: &PinnedMaps) -> anyhow::Result<Vec<FlowView>> {
    let mut forward = Vec::new();
    let mut reply: BTreeMap<ReplyTuple, CtEntry> = BTreeMap::new();
    for entry in maps.conntrack.iter() {
        let (key, value): (CtKey, CtEntry) = entry?;
        match key.direction {
            CT_DIR_FORWARD => forward.push((key, value)),
            CT_DIR_REPLY => {
                reply.insert(
                    (key.proto, key.saddr, key.sport, key.daddr, key.dport),
                    value,
                );
            }
            _ => {}
        }
    }
    let now = monotonic_ns();
    let seconds = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    let mut out: Vec<FlowView> = forward
        .into_iter()
        .map(|(key, fwd)| {
            let hairpin = fwd.flags & CT_FLAG_HAIRPIN != 0;
            let seen_client = if hairpin { fwd.peer_addr } else { key.saddr };
            let back = reply.get(&(
                key.proto,
                fwd.nat_addr,
                fwd.nat_port,
                seen_client,
                key.sport,
            ));
            let to_client = back
                .map(|r| Counters {
                    packets: r.packets,
                    bytes: r.bytes,
                })
                .unwrap_or_default();
            let last_seen = back.map_or(fwd.last_seen_ns, |r| r.last_seen_ns.max(fwd.last_seen_ns));
            FlowView {
                protocol: protocol_name(key.proto),
                client: socket(key.saddr, key.sport),
                frontend: socket(key.daddr, key.dport),
                backend: socket(fwd.nat_addr, fwd.nat_port),
                backend_id: fwd.backend_id,
                frontend_id: fwd.rev_nat_id,
                hairpin,
                to_backend: Counters {
                    packets: fwd.packets,
                    bytes: fwd.bytes,
                },
                to_client,
                age_seconds: seconds(fwd.created_ns),
                idle_seconds: seconds(last_seen),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(out)
}

pub fn print_services(views: &[ServiceView]) {
    println!(
        "{:<22} {:<5} {:>5} {:>8} {:>10} {:>12} {:>6}",
        "FRONTEND", "PROTO", "ID", "BACKENDS", "PACKETS", "BYTES", "CONNS"
    );
    for s in views {
        println!(
            "{:<22} {:<5} {:>5} {:>8} {:>10} {:>12} {:>6}",
            s.frontend,
            s.protocol,
            s.frontend_id,
            s.backends.len(),
            s.packets,
            s.bytes,
            s.connections
        );
        for b in &s.backends {
            println!(
                "  -> {:<22} id {:<6} {:<11} {:>10} {:>12} {:>6}",
                b.address, b.backend_id, b.state, b.packets, b.bytes, b.connections
            );
        }
    }
}

pub fn print_flows(views: &[FlowView]) {
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:>8} {:>10} {:>8} {:>10} {:>8}",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "PKTS>", "BYTES>", "<PKTS", "<BYTES", "IDLE(s)"
    );
    for f in views {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:>8} {:>10} {:>8} {:>10} {:>8.1}",
            f.protocol,
            f.client,
            f.frontend,
            f.backend,
            f.to_backend.packets,
            f.to_backend.bytes,
            f.to_client.packets,
            f.to_client.bytes,
            f.idle_seconds
        );
    }
}

pub fn print_plan(plan: &crate::plan::Plan) {
    println!(
        "{:<22} {:<5} {:<10} {:<30} {:<10} BACKENDS",
        "FRONTEND", "PROTO", "KIND", "SERVICE", "PORT"
    );
    for f in &plan.frontends {
        let backends: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
        let backends = if backends.is_empty() {
            if f.drop_when_empty {
                "(none here: dropped)".to_string()
            } else {
                "(none: refused)".to_string()
            }
        } else {
            backends.join(",")
        };
        println!(
            "{:<22} {:<5} {:<10} {:<30} {:<10} {}",
            f.frontend.addr.to_string(),
            f.frontend.protocol.to_string(),
            format!("{:?}", f.kind),
            f.service,
            f.port_name,
            backends
        );
    }
}
