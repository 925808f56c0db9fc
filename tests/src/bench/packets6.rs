//! Section 1, IPv6: the per-packet rows for IPv6 packets, each measured beside the same IPv4
//! row in the same rounds (10 services). The same method as `packets`: a ping-pong pair of
//! IPv6 frontends that DNAT to each other (every repeat an established packet, or a reply,
//! with the full rewrite; checked by the conntrack counters), a second datapath whose IPv6
//! TCP table is full (every repeat a new flow into a 2-entry overflow; checked by the
//! connection counters), and a non-service packet (checked unchanged). The frontends are
//! programmed by the agent's own programmer, from a plan.
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use anyhow::{Context, ensure};
use aya::{
    maps::{HashMap, MapData},
    programs::SchedClassifier,
};
use dataplane_agent::{
    datapath::{
        BpffsLayout,
        loader::{LoadedDatapath, MapSizes},
        maps::PinnedMaps,
        programmer::Programmer,
    },
    observe::frame::{self, L4},
    plan::{Algorithm, Frontend, FrontendAddr, FrontendKind, Plan, Protocol},
};
use dataplane_common::{CtEntry6, CtKey6, IPPROTO_TCP, PROG_POD_INGRESS, drop_reason, map_names};

use super::{
    cleanup,
    packets::{Outcome, PinDir, TC_ACT_OK, TCP_ACK, TCP_SYN, test_run},
};

const CLIENT: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5),
    40000,
    0,
    0,
);
const FRONTEND_A: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0xff, 1),
    80,
    0,
    0,
);
const FRONTEND_B: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0xff, 2),
    8080,
    0,
    0,
);
const NOT_A_SERVICE: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 99), 80, 0, 0);

/// Ethernet + IPv6 + TCP (no payload), checksums computed.
pub fn tcp_frame6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    let l4 = L4::Tcp {
        flags,
        seq: 1,
        ack: if flags & TCP_ACK != 0 { 1 } else { 0 },
    };
    frame::frame6(frame::TO_NODE, src, dst, &[], l4)
}

fn address(frame: &[u8], at: usize, port_at: usize) -> SocketAddrV6 {
    let octets: [u8; 16] = frame[at..at + 16].try_into().expect("16 bytes");
    let port = u16::from_be_bytes([frame[port_at], frame[port_at + 1]]);
    SocketAddrV6::new(octets.into(), port, 0, 0)
}

fn destination(frame: &[u8]) -> SocketAddrV6 {
    address(frame, 38, 56)
}

fn source(frame: &[u8]) -> SocketAddrV6 {
    address(frame, 22, 54)
}

fn ct_key(src: SocketAddrV6, dst: SocketAddrV6) -> CtKey6 {
    CtKey6::new(
        src.ip().octets().into(),
        dst.ip().octets().into(),
        src.port(),
        dst.port(),
        IPPROTO_TCP,
    )
}

/// A datapath with the IPv6 ping-pong pair programmed (frontend ids 1 and 2).
pub struct Instance6 {
    datapath: LoadedDatapath,
    maps: PinnedMaps,
    conntrack: HashMap<MapData, CtKey6, CtEntry6>,
    _pins: PinDir,
}

impl Instance6 {
    /// `full_table`: the IPv6 TCP table holds one entry, taken, and new flows go to an
    /// overflow of 2 entries.
    pub fn load(name: &str, full_table: bool) -> anyhow::Result<Self> {
        let dir = std::path::Path::new("/sys/fs/bpf").join(testbed::unique(name));
        cleanup::dir(dir.clone());
        let pins = PinDir(BpffsLayout::new(dir));
        let mut sizes = MapSizes::new();
        if full_table {
            sizes.insert(map_names::CONNTRACK6_TCP.into(), 1);
            sizes.insert(map_names::CONNTRACK6_TCP_OVERFLOW.into(), 2);
        }
        let datapath = LoadedDatapath::load(&pins.0, &sizes)?;
        let mut programmer = Programmer::restore(PinnedMaps::open(&pins.0)?)?;
        let frontend = |addr: SocketAddrV6, backend: SocketAddrV6| Frontend {
            service: "bench/pingpong6".into(),
            port_name: String::new(),
            kind: FrontendKind::ClusterIP,
            frontend: FrontendAddr {
                addr: SocketAddr::V6(addr),
                protocol: Protocol::Tcp,
            },
            backends: vec![SocketAddr::V6(backend)],
            drop_when_empty: false,
            external_local: false,
            internal_backends: None,
            retained: vec![],
            affinity_timeout: None,
            source_ranges: vec![],
            algorithm: Algorithm::Random,
        };
        let plan = Plan {
            frontends: vec![
                frontend(FRONTEND_A, FRONTEND_B),
                frontend(FRONTEND_B, FRONTEND_A),
            ],
            ..Default::default()
        };
        let report = programmer.apply(&plan);
        ensure!(
            report.failures.is_empty(),
            "programming the IPv6 pair: {:?}",
            report.failures
        );
        let mut conntrack: HashMap<MapData, CtKey6, CtEntry6> =
            super::maps::open(&pins.0, map_names::CONNTRACK6_TCP)?;
        if full_table {
            let taken = ct_key(NOT_A_SERVICE, FRONTEND_A);
            conntrack.insert(taken, CtEntry6::default(), 0)?;
        }
        Ok(Self {
            datapath,
            maps: PinnedMaps::open(&pins.0)?,
            conntrack,
            _pins: pins,
        })
    }

    fn program(&self) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .datapath
            .ebpf
            .program(PROG_POD_INGRESS)
            .context("no pod_ingress")?
            .try_into()?)
    }

    fn ct_packets(&self, key: &CtKey6) -> u64 {
        self.conntrack.get(key, 0).map(|e| e.packets).unwrap_or(0)
    }

    fn connections(&self) -> u64 {
        [1u32, 2]
            .iter()
            .filter_map(|id| self.maps.service_stats.get(id, 0).ok())
            .map(|values| values.iter().map(|s| s.connections).sum::<u64>())
            .sum()
    }

    fn insert_failures(&self) -> u64 {
        self.maps
            .drops
            .get(&drop_reason::CT_INSERT_FAILED, 0)
            .unwrap_or(0)
    }
}

/// The IPv6 pair's two datapaths: `main` (flows A and B established) and `fresh` (new flows).
pub struct Pair6 {
    main: Instance6,
    fresh: Instance6,
}

impl Pair6 {
    pub fn new() -> anyhow::Result<Self> {
        let main = Instance6::load("dpbench6", false)?;
        let fresh = Instance6::load("dpbench6nf", true)?;
        let prog = main.program()?;
        for (to, expected) in [(FRONTEND_A, FRONTEND_B), (FRONTEND_B, FRONTEND_A)] {
            let o = test_run(prog, &tcp_frame6(CLIENT, to, TCP_SYN), 1)?;
            ensure!(
                o.retval == TC_ACT_OK && destination(&o.out) == expected,
                "IPv6 SYN to {to} was not sent to {expected}"
            );
        }
        Ok(Self { main, fresh })
    }
}

/// The IPv6 kinds measured, by the IPv4 row each stands beside.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind6 {
    NonService,
    Established,
    NewFlow,
    Reply,
}

/// One run of `repeat` repeats of an IPv6 `kind` packet, checked as the IPv4 rows are.
pub fn run_kind6(kind: Kind6, pair: &Pair6, repeat: u32) -> anyhow::Result<f64> {
    let main = &pair.main;
    let outcome: Outcome = match kind {
        Kind6::NonService => {
            let frame = tcp_frame6(CLIENT, NOT_A_SERVICE, TCP_SYN);
            let o = test_run(main.program()?, &frame, repeat)?;
            ensure!(
                o.retval == TC_ACT_OK && o.out == frame,
                "IPv6 non-service: verdict {} or the packet changed",
                o.retval
            );
            o
        }
        Kind6::Established => {
            let keys = [ct_key(CLIENT, FRONTEND_A), ct_key(CLIENT, FRONTEND_B)];
            let counted = || keys.iter().map(|k| main.ct_packets(k)).sum::<u64>();
            let before = counted();
            let o = test_run(
                main.program()?,
                &tcp_frame6(CLIENT, FRONTEND_A, TCP_ACK),
                repeat,
            )?;
            let grew = counted() - before;
            ensure!(
                grew == repeat as u64 && o.retval == TC_ACT_OK,
                "IPv6 established: {grew} packets counted for {repeat} repeats, verdict {}",
                o.retval
            );
            o
        }
        Kind6::Reply => {
            let keys = [ct_key(FRONTEND_A, CLIENT), ct_key(FRONTEND_B, CLIENT)];
            let counted = || keys.iter().map(|k| main.ct_packets(k)).sum::<u64>();
            let before = counted();
            let o = test_run(
                main.program()?,
                &tcp_frame6(FRONTEND_B, CLIENT, TCP_ACK),
                repeat,
            )?;
            let grew = counted() - before;
            let expected = if repeat.is_multiple_of(2) {
                FRONTEND_B
            } else {
                FRONTEND_A
            };
            ensure!(
                grew == repeat as u64 && o.retval == TC_ACT_OK && source(&o.out) == expected,
                "IPv6 reply: {grew} packets counted for {repeat} repeats, verdict {}, source {}",
                o.retval,
                source(&o.out)
            );
            o
        }
        Kind6::NewFlow => {
            let fresh = &pair.fresh;
            let (before, failed) = (fresh.connections(), fresh.insert_failures());
            let o = test_run(
                fresh.program()?,
                &tcp_frame6(CLIENT, FRONTEND_A, TCP_SYN),
                repeat,
            )?;
            let grew = fresh.connections() - before;
            ensure!(
                grew == repeat as u64 && o.retval == TC_ACT_OK,
                "IPv6 new flow: {grew} connections for {repeat} repeats, verdict {}",
                o.retval
            );
            ensure!(
                fresh.insert_failures() == failed,
                "IPv6 new flow: conntrack inserts failed"
            );
            o
        }
    };
    Ok(outcome.ns)
}
