//! `services`, `backends`, `flows`, `stats` and `graph`: what the pinned maps hold, as tables
//! for people and JSON for tools. Reads only the pins, so it works while the agent is stopped.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use aya::Pod;
use dataplane_common::{
    BackendOf, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CT_FLAG_REPLY, CT_FLAG_SNAT, CtEntryOf, CtKeyOf,
    FrontendName, ServiceKeyOf, drop_reason,
};
use serde::Serialize;

use crate::{
    datapath::{
        family::Family,
        maps::{Conntrack, FamilyMaps, PinnedMaps},
        translate,
    },
    plan::{FrontendAddr, Protocol},
};

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Who a frontend belongs to, from the names the agent records beside the maps.
#[derive(Debug, Serialize, Clone, Default, PartialEq, Eq)]
pub struct FrontendLabel {
    /// `namespace/name`, or "" when unknown.
    pub service: String,
    pub port: String,
    pub kind: &'static str,
}

fn label(names: &BTreeMap<u32, FrontendName>, frontend_id: u32) -> FrontendLabel {
    let Some(name) = names.get(&frontend_id) else {
        return FrontendLabel::default();
    };
    let name = translate::decode_name(name);
    FrontendLabel {
        service: name.service,
        port: name.port,
        kind: name.kind.name(),
    }
}

fn names(maps: &PinnedMaps) -> anyhow::Result<BTreeMap<u32, FrontendName>> {
    let mut out = BTreeMap::new();
    for entry in maps.names.iter() {
        let (id, name) = entry?;
        out.insert(id, name);
    }
    Ok(out)
}

/// Backends are always active: endpoints that take no new connection (terminating, not
/// ready) are not in any slot, and show in `plan -o json` as `retained`.
const BACKEND_STATE: &str = "active";

#[derive(Debug, Serialize)]
pub struct ServiceBackendView {
    pub backend_id: u32,
    pub address: String,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    /// Connections translated at the socket (`--socket-lb`): not in `connections`, and their
    /// packets are in no counter (they take no per-packet path).
    pub socket_connections: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub frontend: String,
    pub protocol: String,
    pub frontend_id: u32,
    pub service: String,
    pub port: String,
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    /// Connections translated at the socket (see `ServiceBackendView`).
    pub socket_connections: u64,
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
    pub service: String,
    pub hairpin: bool,
    /// The TCP connection sent FIN or RST: conntrack forgets it after a short idle time.
    pub closing: bool,
    /// The source the backend saw, when external traffic was SNATed to the node.
    pub snat: Option<String>,
    pub to_backend: Counters,
    pub to_client: Counters,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    /// `packet`: translated per packet by the tc programs (conntrack); `socket`: translated
    /// once at `connect()`/`sendmsg()` (`--socket-lb`): the client is the socket (its
    /// cookie), and there are no packet counters.
    pub source: &'static str,
}

fn protocol_name(n: u8) -> String {
    Protocol::from_number(n)
        .map(|p| p.to_string())
        .unwrap_or_else(|| n.to_string())
}

/// `10.0.0.1:80`, `[fd00::1]:80`.
fn socket<A: Family>(addr: A, port: u16) -> String {
    SocketAddr::new(addr.ip(), port).to_string()
}

use crate::datapath::maps::{counter_sum, stats_sum as stats};

/// Every frontend of both families: IPv4 first, then IPv6; each by protocol, then address and
/// port.
pub fn services(maps: &PinnedMaps) -> anyhow::Result<Vec<ServiceView>> {
    let (v4, v6) = services_by_family(maps)?;
    Ok(v4.into_iter().chain(v6).collect())
}

/// The frontends of each family (IPv4, IPv6), each by protocol, then address and port.
fn services_by_family(maps: &PinnedMaps) -> anyhow::Result<(Vec<ServiceView>, Vec<ServiceView>)> {
    let names = names(maps)?;
    let sorted = |mut list: Vec<(FrontendAddr, ServiceView)>| {
        list.sort_by_key(|(key, _)| (key.protocol.number(), key.addr));
        list.into_iter().map(|(_, view)| view).collect()
    };
    Ok((
        sorted(family_services(maps, &maps.v4, &names)?),
        sorted(family_services(maps, &maps.v6, &names)?),
    ))
}

fn family_services<A: Family>(
    maps: &PinnedMaps,
    family: &FamilyMaps<A>,
    names: &BTreeMap<u32, FrontendName>,
) -> anyhow::Result<Vec<(FrontendAddr, ServiceView)>>
where
    ServiceKeyOf<A>: Pod,
    BackendOf<A>: Pod,
{
    let mut entries = Vec::new();
    for entry in family.services.iter() {
        entries.push(entry?);
    }
    let decoded = translate::decode_services(entries);
    let mut out = Vec::new();
    // The pods' view of a frontend (its internal scope) is shown once, by its default entry.
    let frontends = decoded
        .entries
        .iter()
        .filter(|(key, _)| key.scope == dataplane_common::SCOPE_DEFAULT);
    for (key, entry) in frontends {
        let s = stats(&maps.service_stats, entry.rev_nat_id);
        let mut backends = Vec::new();
        for &backend_id in entry.slots.iter().take(entry.count as usize) {
            let Some(backend) = family
                .backends
                .get(&backend_id, 0)
                .ok()
                .and_then(|b| translate::decode_backend(&b))
            else {
                continue;
            };
            let b = stats(&maps.backend_stats, backend_id);
            backends.push(ServiceBackendView {
                backend_id,
                address: backend.addr.to_string(),
                state: BACKEND_STATE,
                packets: b.packets,
                bytes: b.bytes,
                connections: b.connections,
                socket_connections: counter_sum(&maps.socket_backend_stats, backend_id),
            });
        }
        let name = label(names, entry.rev_nat_id);
        out.push((
            key.frontend,
            ServiceView {
                frontend: key.frontend.addr.to_string(),
                protocol: key.frontend.protocol.to_string(),
                frontend_id: entry.rev_nat_id,
                service: name.service,
                port: name.port,
                kind: name.kind,
                packets: s.packets,
                bytes: s.bytes,
                connections: s.connections,
                socket_connections: counter_sum(&maps.socket_service_stats, entry.rev_nat_id),
                backends,
            },
        ));
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub backend_id: u32,
    pub address: String,
    pub protocol: String,
    pub state: &'static str,
    /// The services (`namespace/name`) whose frontends use it.
    pub services: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub socket_connections: u64,
}

pub fn backends(maps: &PinnedMaps) -> anyhow::Result<Vec<BackendView>> {
    let mut used_by: BTreeMap<u32, std::collections::BTreeSet<String>> = BTreeMap::new();
    for service in services(maps)? {
        for b in &service.backends {
            let owner = if service.service.is_empty() {
                service.frontend.clone()
            } else {
                service.service.clone()
            };
            used_by.entry(b.backend_id).or_default().insert(owner);
        }
    }
    let mut out = Vec::new();
    let in_use = |id: u32, backend: Option<crate::plan::BackendAddr>| Some((id, backend?));
    let v4 = crate::datapath::maps::backends_in_use(&maps.v4.backends).into_iter();
    let v6 = crate::datapath::maps::backends_in_use(&maps.v6.backends).into_iter();
    let decoded = (v4.filter_map(|(id, b)| in_use(id, translate::decode_backend(&b))))
        .chain(v6.filter_map(|(id, b)| in_use(id, translate::decode_backend(&b))));
    for (id, backend) in decoded {
        let s = stats(&maps.backend_stats, id);
        out.push(BackendView {
            backend_id: id,
            address: backend.addr.to_string(),
            protocol: backend.protocol.to_string(),
            state: BACKEND_STATE,
            services: used_by
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            packets: s.packets,
            bytes: s.bytes,
            connections: s.connections,
            socket_connections: counter_sum(&maps.socket_backend_stats, id),
        });
    }
    out.sort_by_key(|b| b.backend_id);
    Ok(out)
}

/// The clock `bpf_ktime_get_coarse_ns` reads (CLOCK_MONOTONIC_COARSE), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The flows of one family's conntrack tables, by their forward entries.
fn family_flows<A: Family>(
    conntrack: &Conntrack<A>,
    names: &BTreeMap<u32, FrontendName>,
) -> anyhow::Result<Vec<FlowView>>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let mut forward = Vec::new();
    let mut reply: HashMap<CtKeyOf<A>, CtEntryOf<A>> = HashMap::new();
    for entry in conntrack.iter() {
        let (key, value) = entry?;
        if value.flags & CT_FLAG_REPLY == 0 {
            forward.push((key, value));
        } else {
            reply.insert(key, value);
        }
    }
    let now = monotonic_ns();
    let seconds = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    let out = forward
        .into_iter()
        .map(|(key, fwd)| {
            let snat = fwd.flags & CT_FLAG_SNAT != 0;
            let (seen_addr, seen_port) = if snat {
                (fwd.peer_addr, fwd.peer_port)
            } else if fwd.flags & CT_FLAG_HAIRPIN != 0 {
                (fwd.peer_addr, key.sport)
            } else {
                (key.saddr, key.sport)
            };
            let back = reply.get(&key.reply_of(&fwd));
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
                service: label(names, fwd.rev_nat_id).service,
                hairpin: fwd.flags & CT_FLAG_HAIRPIN != 0,
                closing: (fwd.flags | back.map_or(0, |r| r.flags)) & CT_FLAG_CLOSING != 0,
                snat: snat.then(|| socket(seen_addr, seen_port)),
                to_backend: Counters {
                    packets: fwd.packets,
                    bytes: fwd.bytes,
                },
                to_client,
                age_seconds: seconds(fwd.created_ns),
                idle_seconds: seconds(last_seen),
                source: "packet",
            }
        })
        .collect();
    Ok(out)
}

/// Flows of both families' conntrack, and the sockets translated at the socket.
pub fn flows(maps: &PinnedMaps) -> anyhow::Result<Vec<FlowView>> {
    let names = names(maps)?;
    let mut out = family_flows(&maps.v4.conntrack, &names)?;
    out.extend(family_flows(&maps.v6.conntrack, &names)?);
    let now = monotonic_ns();
    let seconds = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    // Sockets translated at the socket: their reverse entries, one per translation.
    for entry in maps.sockets.iter() {
        let (key, sock) = entry?;
        if key.kind != dataplane_common::SOCK_REVERSE {
            continue;
        }
        out.push(FlowView {
            protocol: protocol_name(key.proto),
            client: format!("socket:{}", key.cookie),
            frontend: socket(sock.addr, sock.port),
            backend: socket(key.addr, key.port),
            backend_id: sock.backend_id,
            frontend_id: sock.rev_nat_id,
            service: label(&names, sock.rev_nat_id).service,
            hairpin: false,
            closing: false,
            snat: None,
            to_backend: Counters::default(),
            to_client: Counters::default(),
            age_seconds: seconds(sock.created_ns),
            idle_seconds: 0.0,
            source: "socket",
        });
    }
    out.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(out)
}

/// `flows` filters: every given one must match.
#[derive(Debug, Default, Clone)]
pub struct FlowFilter {
    /// `namespace/name` (or its `name` alone).
    pub service: Option<String>,
    /// A backend `ip` or `ip:port`.
    pub backend: Option<String>,
    /// An address on any side of the flow.
    pub ip: Option<String>,
}

/// The address of `ip:port` or `[ip6]:port`; of anything else (`socket:cookie`), what comes
/// before its first colon.
fn host(text: &str) -> String {
    match text.parse::<SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => text.split(':').next().unwrap_or("").to_string(),
    }
}

impl FlowFilter {
    pub fn matches(&self, flow: &FlowView) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| flow.service == *s || flow.service.rsplit('/').next() == Some(s))
            && self
                .backend
                .as_ref()
                .is_none_or(|b| flow.backend == *b || host(&flow.backend) == *b)
            && self.ip.as_ref().is_none_or(|ip| {
                [&flow.client, &flow.frontend, &flow.backend]
                    .iter()
                    .any(|a| host(a) == *ip)
                    || flow.snat.as_deref().is_some_and(|s| host(s) == *ip)
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowSort {
    /// By frontend, then client.
    Frontend,
    /// Most bytes (both ways) first.
    Bytes,
    /// Most packets (both ways) first.
    Packets,
}

pub fn sort_flows(flows: &mut [FlowView], by: FlowSort) {
    match by {
        FlowSort::Frontend => {}
        FlowSort::Bytes => {
            flows.sort_by_key(|f| std::cmp::Reverse(f.to_backend.bytes + f.to_client.bytes))
        }
        FlowSort::Packets => {
            flows.sort_by_key(|f| std::cmp::Reverse(f.to_backend.packets + f.to_client.packets))
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Serialize)]
pub struct StatsView {
    pub services: Vec<ServiceView>,
    pub drops: BTreeMap<&'static str, u64>,
    pub conntrack_entries: u64,
    pub maps: Vec<MapUsage>,
}

fn count<K, V, I: Iterator<Item = Result<(K, V), aya::maps::MapError>>>(iter: I) -> u64 {
    iter.filter(|e| e.is_ok()).count() as u64
}

pub fn stats_view(maps: &PinnedMaps) -> anyhow::Result<StatsView> {
    use dataplane_common::map_names as n;
    let mut drops = BTreeMap::new();
    for reason in 1..dataplane_common::capacity::DROP_REASONS {
        let value = maps.drops.get(&reason, 0).unwrap_or(0);
        if value > 0 || drop_reason::name(reason) != "unknown" {
            drops.insert(drop_reason::name(reason), value);
        }
    }
    let (tcp_entries, overflow_entries, any_entries) = (
        count(maps.v4.conntrack.tcp.iter()),
        count(maps.v4.conntrack.tcp_overflow.iter()),
        count(maps.v4.conntrack.any.iter()),
    );
    let (tcp6_entries, overflow6_entries, any6_entries) = (
        count(maps.v6.conntrack.tcp.iter()),
        count(maps.v6.conntrack.tcp_overflow.iter()),
        count(maps.v6.conntrack.any.iter()),
    );
    let conntrack_entries = tcp_entries
        + overflow_entries
        + any_entries
        + tcp6_entries
        + overflow6_entries
        + any6_entries;
    let capacity = |name: &'static str| maps.capacities.get(name).copied().unwrap_or(0) as u64;
    let usage = |map: &'static str, entries: u64| MapUsage {
        map,
        entries,
        capacity: capacity(map),
    };
    // Backends counted from the services' slots: cheaper than reading the whole arrays.
    let (v4, v6) = services_by_family(maps)?;
    let backend_ids = |views: &[ServiceView]| {
        let ids: std::collections::BTreeSet<u32> = (views.iter())
            .flat_map(|s| s.backends.iter().map(|b| b.backend_id))
            .collect();
        ids.len() as u64
    };
    let maps_usage = vec![
        usage(n::SERVICES, count(maps.v4.services.iter())),
        usage(n::BACKENDS, backend_ids(&v4)),
        usage(n::CONNTRACK_TCP, tcp_entries),
        usage(n::CONNTRACK_TCP_OVERFLOW, overflow_entries),
        usage(n::CONNTRACK_ANY, any_entries),
        usage(n::AFFINITY, count(maps.v4.affinity.iter())),
        usage(n::SOURCE_RANGES, count(maps.v4.source_ranges.iter())),
        usage(n::MAGLEV, count(maps.maglev.iter())),
        usage(n::NAMES, count(maps.names.iter())),
        usage(n::SOCKETS, count(maps.sockets.iter())),
        usage(n::SERVICES6, count(maps.v6.services.iter())),
        usage(n::BACKENDS6, backend_ids(&v6)),
        usage(n::CONNTRACK6_TCP, tcp6_entries),
        usage(n::CONNTRACK6_TCP_OVERFLOW, overflow6_entries),
        usage(n::CONNTRACK6_ANY, any6_entries),
        usage(n::AFFINITY6, count(maps.v6.affinity.iter())),
        usage(n::SOURCE_RANGES6, count(maps.v6.source_ranges.iter())),
    ];
    Ok(StatsView {
        services: v4.into_iter().chain(v6).collect(),
        drops,
        conntrack_entries,
        maps: maps_usage,
    })
}

/// The service graph: who talks to which service, and which backends serve it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    pub connections: u64,
    pub bytes: u64,
}

/// Edges client -> service and service -> backend, aggregated over the current flows.
pub fn graph(flows: &[FlowView]) -> Vec<GraphEdge> {
    let mut edges: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for f in flows {
        let service = if f.service.is_empty() {
            f.frontend.clone()
        } else {
            f.service.clone()
        };
        let client = host(&f.client);
        let bytes = f.to_backend.bytes + f.to_client.bytes;
        for key in [(client, service.clone()), (service, f.backend.clone())] {
            let e = edges.entry(key).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
    }
    edges
        .into_iter()
        .map(|((from, to), (connections, bytes))| GraphEdge {
            from,
            to,
            connections,
            bytes,
        })
        .collect()
}

/// Graphviz DOT of the graph: services as boxes, clients and backends as ellipses.
pub fn graph_dot(edges: &[GraphEdge]) -> String {
    let mut out =
        String::from("digraph services {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
    let services: std::collections::BTreeSet<&str> = edges
        .iter()
        .filter(|e| edges.iter().any(|o| o.from == e.to))
        .map(|e| e.to.as_str())
        .collect();
    for s in &services {
        out.push_str(&format!(
            "  \"{s}\" [shape=box, style=filled, fillcolor=\"#dde8ff\"];\n"
        ));
    }
    for e in edges {
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{} conn, {} B\"];\n",
            e.from, e.to, e.connections, e.bytes
        ));
    }
    out.push_str("}\n");
    out
}

pub fn print_services(views: &[ServiceView]) {
    println!(
        "{:<22} {:<5} {:<12} {:<28} {:>5} {:>8} {:>10} {:>12} {:>6} {:>7}",
        "FRONTEND",
        "PROTO",
        "KIND",
        "SERVICE",
        "ID",
        "BACKENDS",
        "PACKETS",
        "BYTES",
        "CONNS",
        "SOCKETS"
    );
    for s in views {
        let service = if s.port.is_empty() {
            s.service.clone()
        } else {
            format!("{}:{}", s.service, s.port)
        };
        println!(
            "{:<22} {:<5} {:<12} {:<28} {:>5} {:>8} {:>10} {:>12} {:>6} {:>7}",
            s.frontend,
            s.protocol,
            s.kind,
            service,
            s.frontend_id,
            s.backends.len(),
            s.packets,
            s.bytes,
            s.connections,
            s.socket_connections
        );
        for b in &s.backends {
            println!(
                "  -> {:<22} id {:<6} {:<11} {:>10} {:>12} {:>6} {:>7}",
                b.address,
                b.backend_id,
                b.state,
                b.packets,
                b.bytes,
                b.connections,
                b.socket_connections
            );
        }
    }
}

pub fn print_backends(views: &[BackendView]) {
    println!(
        "{:>6} {:<22} {:<5} {:<11} {:>10} {:>12} {:>6}  SERVICES",
        "ID", "BACKEND", "PROTO", "STATE", "PACKETS", "BYTES", "CONNS"
    );
    for b in views {
        println!(
            "{:>6} {:<22} {:<5} {:<11} {:>10} {:>12} {:>6}  {}",
            b.backend_id,
            b.address,
            b.protocol,
            b.state,
            b.packets,
            b.bytes,
            b.connections,
            b.services.join(",")
        );
    }
}

pub fn print_flows(views: &[FlowView]) {
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:<20} {:>8} {:>10} {:>8} {:>10} {:>8}",
        "PROTO",
        "CLIENT",
        "FRONTEND",
        "BACKEND",
        "SERVICE",
        "PKTS>",
        "BYTES>",
        "<PKTS",
        "<BYTES",
        "IDLE(s)"
    );
    for f in views {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<20} {:>8} {:>10} {:>8} {:>10} {:>8.1}",
            f.protocol,
            f.client,
            f.frontend,
            f.backend,
            f.service,
            f.to_backend.packets,
            f.to_backend.bytes,
            f.to_client.packets,
            f.to_client.bytes,
            f.idle_seconds
        );
    }
}

pub fn print_stats(view: &StatsView) {
    println!(
        "{:<22} {:<5} {:<28} {:>10} {:>12} {:>6}",
        "FRONTEND", "PROTO", "SERVICE", "PACKETS", "BYTES", "CONNS"
    );
    for s in &view.services {
        println!(
            "{:<22} {:<5} {:<28} {:>10} {:>12} {:>6}",
            s.frontend, s.protocol, s.service, s.packets, s.bytes, s.connections
        );
    }
    println!("\nDROPS");
    for (reason, count) in &view.drops {
        println!("  {reason:<26} {count}");
    }
    println!("\nMAPS (entries / capacity)");
    for m in &view.maps {
        let percent = if m.capacity > 0 {
            m.entries as f64 * 100.0 / m.capacity as f64
        } else {
            0.0
        };
        println!(
            "  {:<18} {:>9} / {:<9} {:>6.2}%",
            m.map, m.entries, m.capacity, percent
        );
    }
    println!("\nconntrack entries: {}", view.conntrack_entries);
}

pub fn print_plan(plan: &crate::plan::Plan) {
    println!(
        "{:<22} {:<5} {:<12} {:<30} {:<10} BACKENDS",
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
            "{:<22} {:<5} {:<12} {:<30} {:<10} {}",
            f.frontend.addr.to_string(),
            f.frontend.protocol.to_string(),
            format!("{:?}", f.kind),
            f.service,
            f.port_name,
            backends
        );
    }
}

/// The kernel's counters for the metrics endpoint, from the pinned maps.
pub fn metrics_snapshot(
    maps: &PinnedMaps,
) -> anyhow::Result<crate::observe::metrics::DatapathSnapshot> {
    use crate::observe::metrics::{
        BackendCounters, DatapathSnapshot, MapPressure, ServiceCounters,
    };
    let view = stats_view(maps)?;
    let mut snapshot = DatapathSnapshot {
        drops: view
            .drops
            .iter()
            .map(|(r, c)| (r.to_string(), *c))
            .collect(),
        conntrack_entries: view.conntrack_entries,
        maps: view
            .maps
            .iter()
            .map(|m| MapPressure {
                map: m.map.into(),
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect(),
        ..Default::default()
    };
    for s in &view.services {
        snapshot.services.push(ServiceCounters {
            service: s.service.clone(),
            port: s.port.clone(),
            protocol: s.protocol.clone(),
            frontend: s.frontend.clone(),
            kind: s.kind.to_string(),
            packets: s.packets,
            bytes: s.bytes,
            connections: s.connections,
            socket_connections: s.socket_connections,
        });
        for b in &s.backends {
            snapshot.backends.push(BackendCounters {
                service: s.service.clone(),
                port: s.port.clone(),
                protocol: s.protocol.clone(),
                backend: b.address.clone(),
                packets: b.packets,
                bytes: b.bytes,
                connections: b.connections,
                socket_connections: b.socket_connections,
            });
        }
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(client: &str, frontend: &str, backend: &str) -> FlowView {
        FlowView {
            protocol: "TCP".into(),
            client: client.into(),
            frontend: frontend.into(),
            backend: backend.into(),
            backend_id: 1,
            frontend_id: 1,
            service: "shop/web".into(),
            hairpin: false,
            closing: false,
            snat: None,
            to_backend: Counters::default(),
            to_client: Counters::default(),
            age_seconds: 0.0,
            idle_seconds: 0.0,
            source: "packet",
        }
    }

    /// IPv6 flows print as `[addr]:port`; filters and the graph take their address whole.
    #[test]
    fn ipv6_flows_are_filtered_and_graphed_by_their_whole_address() {
        assert_eq!(host("[fd00::1]:80"), "fd00::1");
        assert_eq!(host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(host("socket:42"), "socket");
        let v6 = flow(
            "[2001:db8::5]:40000",
            "[fd00:10:96::a]:80",
            "[fd00:10:244::1]:8080",
        );
        let by_backend = FlowFilter {
            backend: Some("fd00:10:244::1".into()),
            ..Default::default()
        };
        let by_ip = FlowFilter {
            ip: Some("2001:db8::5".into()),
            ..Default::default()
        };
        let other = FlowFilter {
            ip: Some("fd00".into()),
            ..Default::default()
        };
        assert!(by_backend.matches(&v6) && by_ip.matches(&v6) && !other.matches(&v6));
        let edges = graph(&[v6]);
        assert_eq!(edges[0].from, "2001:db8::5");
        assert_eq!(edges[1].to, "[fd00:10:244::1]:8080");
    }
}
