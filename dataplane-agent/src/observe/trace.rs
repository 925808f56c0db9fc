//! `trace`: runs the live, pinned program on a synthetic packet through BPF_PROG_TEST_RUN,
//! against the live maps, and explains what it did. The state a new flow creates (conntrack
//! and affinity entries, counters) is taken out again afterwards, so live traffic and the
//! inspection tools see no trace of the trace.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use anyhow::Context;
use aya::Pod;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use dataplane_common::{
    AffinityKeyOf, BackendOf, CT_FLAG_REPLY, CtEntryOf, CtKeyOf, MAGLEV_TABLE_SIZE,
    PROG_EXTERNAL_INGRESS, PROG_POD_INGRESS, SCOPE_DEFAULT, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV,
    ServiceKeyOf, TrafficStats,
};
use serde::Serialize;

use crate::{
    datapath::{
        BpffsLayout,
        family::Family,
        maps::PinnedMaps,
        translate::{self, EntryKey},
    },
    observe::frame::{IpFields, L4, TO_NODE},
    plan::{FrontendAddr, Protocol},
};

/// Which program the synthetic packet enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Entry {
    /// As if sent by a pod (pod_ingress).
    Pod,
    /// As if arriving on an external interface (external_ingress).
    External,
    /// A real connection from this process, translated by the socket hooks (sock_connect4):
    /// run it on the node (in its network namespace and under the agent's --cgroup-root, as
    /// `kubectl exec` into the agent's pod is). TCP opens and closes a connection to the
    /// backend; UDP connects without sending anything.
    Host,
}

#[derive(Debug, Serialize)]
pub struct TraceResult {
    pub packet: String,
    pub program: &'static str,
    /// The frontend matched, if any: `ip:port/PROTO` and its service.
    pub frontend: Option<String>,
    pub service: Option<String>,
    /// How the backend was chosen: conntrack, affinity, maglev (with the slot), random.
    pub choice: Option<String>,
    pub backend: Option<String>,
    /// The packet as it left the program.
    pub translated: String,
    pub verdict: &'static str,
}

/// A TCP SYN or a UDP datagram with valid checksums, of the addresses' family.
fn synthetic_packet(from: SocketAddr, to: SocketAddr, protocol: Protocol) -> Vec<u8> {
    let l4 = match protocol {
        Protocol::Tcp => L4::Tcp {
            flags: 0x02, // SYN
            seq: 1,
            ack: 0,
        },
        Protocol::Udp => L4::Udp {
            payload: b"trace",
            zero_checksum: false,
        },
    };
    let ip = IpFields {
        ttl: 64,
        id: 0,
        flags: 0x40, // don't fragment
    };
    match (from, to) {
        (SocketAddr::V6(from), SocketAddr::V6(to)) => {
            crate::observe::frame::frame6(TO_NODE, from, to, &[], l4)
        }
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            crate::observe::frame::frame(TO_NODE, from, to, l4, ip)
        }
        _ => unreachable!("checked by `trace`"),
    }
}

/// `src -> dst PROTO` of a TCP/UDP frame of either family, or what else it is.
fn describe(frame: &[u8]) -> String {
    if frame.len() >= 54 && frame[12..14] == [0x86, 0xdd] {
        return describe6(frame);
    }
    if frame.len() < 38 || frame[12..14] != [0x08, 0x00] {
        return format!("{} bytes, neither IPv4 nor IPv6", frame.len());
    }
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    let l4 = 14 + (frame[14] & 0x0f) as usize * 4;
    match frame[23] {
        6 | 17 if frame.len() >= l4 + 4 => {
            let proto = if frame[23] == 6 { "TCP" } else { "UDP" };
            let flags = if frame[23] == 6 && frame.len() > l4 + 13 && frame[l4 + 13] & 0x04 != 0 {
                " RST"
            } else {
                ""
            };
            format!(
                "{}:{} -> {}:{} {proto}{flags}",
                ip(26),
                port(l4),
                ip(30),
                port(l4 + 2)
            )
        }
        1 => format!(
            "{} -> {} ICMP type {} code {}",
            ip(26),
            ip(30),
            frame[l4],
            frame[l4 + 1]
        ),
        p => format!("{} -> {} protocol {p}", ip(26), ip(30)),
    }
}

/// `describe` for IPv6 frames (no extension headers: the trace builds none, and the
/// datapath's answers carry none).
fn describe6(frame: &[u8]) -> String {
    let ip = |o: usize| {
        let octets: [u8; 16] = frame[o..o + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(octets)
    };
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    let (src, dst, l4) = (ip(22), ip(38), 54);
    match frame[20] {
        6 | 17 if frame.len() >= l4 + 4 => {
            let proto = if frame[20] == 6 { "TCP" } else { "UDP" };
            let flags = if frame[20] == 6 && frame.len() > l4 + 13 && frame[l4 + 13] & 0x04 != 0 {
                " RST"
            } else {
                ""
            };
            format!(
                "[{src}]:{} -> [{dst}]:{} {proto}{flags}",
                port(l4),
                port(l4 + 2)
            )
        }
        58 if frame.len() >= l4 + 2 => format!(
            "{src} -> {dst} ICMPv6 type {} code {}",
            frame[l4],
            frame[l4 + 1]
        ),
        p => format!("{src} -> {dst} next header {p}"),
    }
}

/// Takes one trace packet's counts back out of a per-CPU stats entry (from the CPU that
/// counted it: the first with enough).
fn subtract(
    array: &mut aya::maps::PerCpuArray<aya::maps::MapData, TrafficStats>,
    id: u32,
    packets: u64,
    bytes: u64,
    connections: u64,
) {
    let Ok(values) = array.get(&id, 0) else {
        return;
    };
    let mut values: Vec<TrafficStats> = values.iter().copied().collect();
    if let Some(v) = values
        .iter_mut()
        .find(|v| v.packets >= packets && v.bytes >= bytes && v.connections >= connections)
    {
        v.packets -= packets;
        v.bytes -= bytes;
        v.connections -= connections;
        if let Ok(values) = aya::maps::PerCpuValues::try_from(values) {
            let _ = array.set(id, values, 0);
        }
    }
}

pub fn trace(
    layout: &BpffsLayout,
    from: SocketAddr,
    to: SocketAddr,
    protocol: Protocol,
    entry: Entry,
) -> anyhow::Result<TraceResult> {
    let maps = PinnedMaps::open(layout)?;
    let program_name = match entry {
        Entry::Pod => PROG_POD_INGRESS,
        Entry::External => PROG_EXTERNAL_INGRESS,
        Entry::Host => {
            return match (from, to) {
                (SocketAddr::V4(from), SocketAddr::V4(to)) => trace_host(&maps, from, to, protocol),
                _ => anyhow::bail!("--entry host traces IPv4 connections only"),
            };
        }
    };
    match (from, to) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => {
            trace_packet::<dataplane_common::Ipv4>(layout, maps, program_name, (from, to), protocol)
        }
        (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            trace_packet::<dataplane_common::Ipv6>(layout, maps, program_name, (from, to), protocol)
        }
        _ => anyhow::bail!("--from {from} and --to {to} are of different families"),
    }
}

/// Runs the program on a synthetic packet of family `A` from `from` to `to`.
fn trace_packet<A: Family + dataplane_common::Address>(
    layout: &BpffsLayout,
    mut maps: PinnedMaps,
    program_name: &'static str,
    (from, to): (SocketAddr, SocketAddr),
    protocol: Protocol,
) -> anyhow::Result<TraceResult>
where
    ServiceKeyOf<A>: Pod,
    BackendOf<A>: Pod,
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
    AffinityKeyOf<A>: Pod,
{
    let program = SchedClassifier::from_pin(layout.program(program_name)).with_context(|| {
        format!("no pinned {program_name} program: is the agent's datapath loaded?")
    })?;
    let proto = protocol.number();
    let frontend_key = translate::service_key(
        &EntryKey {
            frontend: FrontendAddr { addr: to, protocol },
            scope: SCOPE_DEFAULT,
        },
        0,
    );
    let slot0 = A::maps(&maps).services.get(&frontend_key, 0).ok();
    let service = slot0.map(|s| translate::decode_slot0(&s));
    let forward = CtKeyOf::new(
        A::octets(from.ip()),
        A::octets(to.ip()),
        from.port(),
        to.port(),
        proto,
    );
    // A reply entry on this tuple would be another flow's, not one this packet continues.
    let forward_entry = |maps: &PinnedMaps| {
        A::maps(maps)
            .conntrack
            .get(&forward, 0)
            .ok()
            .filter(|e: &CtEntryOf<A>| e.flags & CT_FLAG_REPLY == 0)
    };
    let known_flow = forward_entry(&maps);
    let affinity_key = service.as_ref().map(|s| AffinityKeyOf {
        service_port_id: s.settings.service_port_id,
        client: A::octets(from.ip()),
    });
    let known_affinity = affinity_key.and_then(|k| A::maps(&maps).affinity.get(&k, 0).ok());
    let drops_before: Vec<u64> = (0..dataplane_common::capacity::DROP_REASONS)
        .map(|r| maps.drops.get(&r, 0).unwrap_or(0))
        .collect();

    let input = synthetic_packet(from, to, protocol);
    let mut output = vec![0u8; 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    output.truncate(result.data_size_out as usize);

    let created = forward_entry(&maps);
    let mut choice = None;
    let mut backend = None;
    if let Some(flow) = created {
        backend = Some(SocketAddr::new(flow.nat_addr.ip(), flow.nat_port).to_string());
        choice = Some(if known_flow.is_some() {
            "conntrack: an established flow keeps its backend".to_string()
        } else if known_affinity.is_some_and(|a| a.backend_id == flow.backend_id)
            && (service.as_ref()).is_some_and(|s| s.settings.flags & SVC_FLAG_AFFINITY != 0)
        {
            "session affinity: this client's remembered backend".to_string()
        } else if let Some(s) =
            (service.as_ref()).filter(|s| s.settings.flags & SVC_FLAG_MAGLEV != 0)
        {
            let rev_nat_id = s.rev_nat_id;
            let hash = dataplane_common::flow_hash_of(&forward);
            let slot = dataplane_common::maglev_slot(hash);
            format!(
                "maglev: flow hash {hash:#010x} -> slot {slot} of {MAGLEV_TABLE_SIZE} (frontend id {rev_nat_id})"
            )
        } else {
            service
                .as_ref()
                .map(|s| format!("random: one of {} backends", s.count))
                .unwrap_or_default()
        });
        // Take the new flow out again: conntrack entries, affinity, counters.
        if known_flow.is_none() {
            let reply = forward.reply_of(&flow);
            let _ = A::maps_mut(&mut maps).conntrack.remove(&reply);
            let _ = A::maps_mut(&mut maps).conntrack.remove(&forward);
            if let (Some(key), None) = (affinity_key, known_affinity) {
                let _ = A::maps_mut(&mut maps).affinity.remove(&key);
            }
            let bytes = input.len() as u64 - 14; // the IP layer, as the counters count
            subtract(&mut maps.service_stats, flow.rev_nat_id, 1, bytes, 1);
            subtract(&mut maps.backend_stats, flow.backend_id, 1, bytes, 1);
        }
    }
    for (reason, before) in drops_before.iter().enumerate() {
        let now = maps.drops.get(&(reason as u32), 0).unwrap_or(0);
        if now > *before {
            let _ = maps.drops.set(reason as u32, now - 1, 0); // this packet's drop
        }
    }
    let names = crate::observe::inspect::services(&maps)?;
    let frontend_name = format!("{to}");
    let service_name = names
        .iter()
        .find(|s| s.frontend == frontend_name && s.protocol == protocol.to_string())
        .map(|s| s.service.clone());
    // A redirect either forwards the translated packet (FIB) or sends an answer back.
    let answered = match from.ip() {
        std::net::IpAddr::V4(ip) => output.get(30..34) == Some(&ip.octets()[..]),
        std::net::IpAddr::V6(ip) => output.get(38..54) == Some(&ip.octets()[..]),
    };
    Ok(TraceResult {
        packet: describe(&input),
        program: program_name,
        frontend: service.map(|_| format!("{to}/{protocol}")),
        service: service_name,
        choice,
        backend,
        translated: describe(&output),
        verdict: match result.return_value {
            0 => "forwarded (TC_ACT_OK)",
            2 => "dropped (TC_ACT_SHOT)",
            7 if answered => "answered: sent back to the client (TC_ACT_REDIRECT)",
            7 => "forwarded: out of the interface the FIB names, past netfilter (TC_ACT_REDIRECT)",
            _ => "other",
        },
    })
}

/// `--entry host`: connects a real socket from this process to `to` and reads what the
/// socket hooks made of it: the translation they recorded under the socket's cookie.
fn trace_host(
    maps: &PinnedMaps,
    from: SocketAddrV4,
    to: SocketAddrV4,
    protocol: Protocol,
) -> anyhow::Result<TraceResult> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let frontend_key = translate::service_key(
        &EntryKey {
            frontend: FrontendAddr {
                addr: to.into(),
                protocol,
            },
            scope: SCOPE_DEFAULT,
        },
        0,
    );
    let service =
        (maps.v4.services.get(&frontend_key, 0).ok()).map(|s| translate::decode_slot0(&s));
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let kind = match protocol {
        Protocol::Tcp => libc::SOCK_STREAM,
        Protocol::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: plain socket calls on a descriptor owned here, with correctly sized arguments.
    let (_socket, connected, cookie, peer) = unsafe {
        let fd = libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let socket = OwnedFd::from_raw_fd(fd);
        if !from.ip().is_unspecified() || from.port() != 0 {
            let local = sockaddr(from);
            if libc::bind(fd, (&raw const local).cast(), len) != 0 {
                anyhow::bail!("binding {from}: {}", std::io::Error::last_os_error());
            }
        }
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let (mut cookie, mut cookie_len) = (0u64, 8 as libc::socklen_t);
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut cookie_len,
        );
        let remote = sockaddr(to);
        let connected = if libc::connect(fd, (&raw const remote).cast(), len) == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        let mut peer: libc::sockaddr_in = std::mem::zeroed();
        let mut peer_len = len;
        let peer = (libc::getpeername(socket.as_raw_fd(), (&raw mut peer).cast(), &mut peer_len)
            == 0)
            .then(|| {
                SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(peer.sin_addr.s_addr)),
                    u16::from_be(peer.sin_port),
                )
            });
        (socket, connected, cookie, peer)
    };
    // Read while the socket is open: its release removes the translation.
    let translation = maps
        .sockets
        .iter()
        .flatten()
        .find(|(key, _)| key.cookie == cookie && key.kind == dataplane_common::SOCK_REVERSE);
    let names = crate::observe::inspect::services(maps)?;
    let service_name = names
        .iter()
        .find(|s| s.frontend == to.to_string() && s.protocol == protocol.to_string())
        .map(|s| s.service.clone());
    let backend = translation
        .map(|(key, _)| SocketAddrV4::new(Ipv4Addr::from(key.addr), key.port).to_string());
    let choice = backend.as_ref().and(service.as_ref()).map(|s| {
        if s.settings.flags & SVC_FLAG_AFFINITY != 0 {
            "session affinity: the node's remembered backend, or a new choice".to_string()
        } else if s.settings.flags & SVC_FLAG_MAGLEV != 0 {
            "maglev: hash of the node's address and the socket".to_string()
        } else {
            format!("random: one of {} backends", s.count)
        }
    });
    let shown = peer.map_or("no peer".to_string(), |p| format!("getpeername() {p}"));
    Ok(TraceResult {
        packet: format!("connect() to {to} {protocol}"),
        program: dataplane_common::PROG_SOCK_CONNECT4,
        frontend: service.as_ref().map(|_| format!("{to}/{protocol}")),
        service: service_name,
        choice,
        translated: match (&backend, &connected) {
            (Some(b), Ok(())) => format!("socket connected to {b}; {shown}"),
            (Some(b), Err(e)) => format!("socket sent to {b}, connect failed: {e}"),
            (None, Ok(())) => format!("socket connected untranslated; {shown}"),
            (None, Err(e)) => format!("connect failed: {e}"),
        },
        backend,
        verdict: match (&translation, &connected) {
            (Some(_), Ok(())) => "translated at connect()",
            (Some(_), Err(_)) => "translated at connect(); the backend did not accept",
            (None, Err(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                "refused at connect(): no endpoints"
            }
            (None, Err(e)) if e.raw_os_error() == Some(libc::EHOSTUNREACH) => {
                "refused at connect(): no endpoint this node may use"
            }
            (None, _) if service.is_some() => {
                "not translated: this process is outside the agent's --socket-lb scope (cgroup or network namespace)"
            }
            (None, _) => "not translated: not a service address",
        },
    })
}

pub fn print(result: &TraceResult) {
    println!("packet      {}", result.packet);
    println!("program     {}", result.program);
    match (&result.frontend, &result.service) {
        (Some(f), Some(s)) => println!("frontend    {f}  ({s})"),
        (Some(f), None) => println!("frontend    {f}"),
        _ => println!("frontend    none: not a service address"),
    }
    if let Some(choice) = &result.choice {
        println!(
            "backend     {}  by {choice}",
            result.backend.as_deref().unwrap_or("-")
        );
    }
    println!("translated  {}", result.translated);
    println!("verdict     {}", result.verdict);
}
