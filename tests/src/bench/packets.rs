//! Section 1: per-packet cost through BPF_PROG_TEST_RUN.
//!
//! The real `pod_ingress` program and the no-op floor (`bench_noop`) are loaded from the
//! agent's embedded object with the agent's loader; the maps are written directly (the
//! layouts of `dataplane-common`), with 10, 10k and 100k ClusterIP services.
//!
//! BPF_PROG_TEST_RUN runs the program `repeat` times on the *same* packet buffer without
//! restoring it, so a program that rewrites the packet sees its own output on the next
//! repeat. A measurement is only sound if every repeat takes the path it claims to. So:
//! - Established and reply packets use two frontends that point at each other (A:80 has the
//!   single backend B:8080, and B:8080 the single backend A:80). The DNAT of a packet to A
//!   turns it into a packet to B, which is itself an established flow, and back: every repeat
//!   is an established (or reply) packet with the full rewrite. Checked: the conntrack
//!   entries' packet counters grow by exactly the number of repeats.
//! - New flows use the same pair in a second datapath whose TCP conntrack table is full (one
//!   entry, taken) and whose overflow LRU holds 2 entries: each new flow misses both, fails
//!   the table's insert and inserts two entries into the overflow, evicting the previous
//!   flow's, so every repeat misses conntrack and inserts. Checked: the frontends' connection
//!   counters grow by exactly the number of repeats, and no insert failed. This is the
//!   slowest new-flow path (a full table, eviction included). The common path, single runs
//!   (repeat = 1) of distinct new flows into an ample conntrack table, is measured against
//!   single runs of the no-op.
//! - A non-service packet is not rewritten; checked: the output equals the input.
//!
//! The datapath sends a translated packet through a FIB lookup: out of the interface the FIB
//! names (`bpf_redirect_neigh`, TTL decremented), or to the stack where the FIB does not
//! forward. The section runs on a thread in a network namespace of its own, where the
//! translated addresses have a route, and measures both: the rows without "forwarded" with
//! forwarding off on the test device (the FIB answers "not forwarded" at once; the path the
//! packet took before the FIB step existed, plus that answer), the "forwarded" rows with it
//! on (lookup, TTL, redirect). A forwarded packet's TTL drops at every repeat, so those rows
//! run many short test runs of `FORWARDED_REPEAT` repeats from TTL 255.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, bail, ensure};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use dataplane_agent::{
    datapath::{
        BpffsLayout,
        loader::{LoadedDatapath, MapSizes},
        translate::{self, EntryKey, EntrySettings},
    },
    observe::frame::{self, IpFields, L4},
    plan::{BackendAddr, FrontendAddr, Protocol},
};
use dataplane_common::{
    Backend, CtEntry, CtKey, IPPROTO_TCP, PROG_POD_INGRESS, SCOPE_DEFAULT, ServiceKey,
    ServiceValue, TrafficStats, drop_reason, map_names,
};
use serde_json::json;

use super::{
    Settings, cleanup,
    maps::{IdMap, open},
    report::{Measurement, Report},
    scale_label,
    stats::{median, percentile},
};

const SECTION: &str = "1 per-packet";
const NOOP: &str = "bench_noop";
pub(super) const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
/// Repeats per test run of a forwarded packet: it starts at TTL 255 and loses one per repeat.
const FORWARDED_REPEAT: u32 = 200;

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 5), 40000);
const FRONTEND_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 255, 1), 80);
const FRONTEND_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 255, 2), 8080);
/// Frontend for the single-run new-flow cross-check; its backend is a plain address.
const FRONTEND_C: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 255, 3), 80);
const BACKEND_C: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 8080);
const NOT_A_SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 99), 80);
/// The bench frontends; the rest of each service count is filler services.
const BENCH_FRONTENDS: usize = 3;
/// Filler services' backends come from a pool of this many distinct addresses, two each.
const BACKEND_POOL: u32 = 50_000;
const FILLER_BACKENDS: u32 = 2;
const FIRST_POOL_BACKEND_ID: u32 = 4;
const FIRST_FILLER_FRONTEND_ID: u32 = 4;

pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_ACK: u8 = 0x10;

/// Ethernet + IPv4 + TCP (no payload), checksums computed.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    tcp_frame_with_ttl(src, dst, flags, 64)
}

fn tcp_frame_with_ttl(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, ttl: u8) -> Vec<u8> {
    let l4 = L4::Tcp {
        flags,
        seq: 1,
        ack: if flags & TCP_ACK != 0 { 1 } else { 0 },
    };
    let ip = IpFields {
        ttl,
        id: 0x1234,
        flags: 0x40, // don't fragment
    };
    frame::frame(frame::TO_NODE, src, dst, l4, ip)
}

fn destination(frame: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

fn source(frame: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4) -> CtKey {
    CtKey::new(
        src.ip().octets(),
        dst.ip().octets(),
        src.port(),
        dst.port(),
        IPPROTO_TCP,
    )
}

fn service_key(f: SocketAddrV4, slot: u16) -> ServiceKey {
    let entry = EntryKey {
        frontend: FrontendAddr {
            addr: f.into(),
            protocol: Protocol::Tcp,
        },
        scope: SCOPE_DEFAULT,
    };
    translate::service_key(&entry, slot)
}

fn pool_backend(j: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + j),
        8080,
    )
}

fn filler_frontend(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i),
        80,
    )
}

/// A pin directory on bpffs, removed on drop.
pub(super) struct PinDir(pub(super) BpffsLayout);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.dir());
    }
}

/// One loaded datapath with its maps, programmed by hand.
struct Instance {
    datapath: LoadedDatapath,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: IdMap<Backend>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    drops: Array<MapData, u64>,
    pool_backends: u32,
    fillers: u32,
    _pins: PinDir,
}

impl Instance {
    fn load(name: &str, conntrack_entries: Option<u32>) -> anyhow::Result<Self> {
        let dir = std::path::Path::new("/sys/fs/bpf").join(testbed::unique(name));
        cleanup::dir(dir.clone());
        let pins = PinDir(BpffsLayout::new(dir));
        let mut sizes = MapSizes::new();
        // 100k services with two backend slots each, and 100k frontend ids.
        sizes.insert(map_names::SERVICES.into(), 524_288);
        sizes.insert(map_names::SERVICE_STATS.into(), 131_072);
        if let Some(entries) = conntrack_entries {
            // The TCP table full (filled below), new flows into an overflow this small.
            sizes.insert(map_names::CONNTRACK_TCP.into(), 1);
            sizes.insert(map_names::CONNTRACK_TCP_OVERFLOW.into(), entries);
        }
        let mut datapath = LoadedDatapath::load(&pins.0, &sizes)?;
        let noop: &mut SchedClassifier = datapath
            .ebpf
            .program_mut(NOOP)
            .context(
                "the BPF object has no bench_noop program (rebuild with `cargo xtask build-ebpf`)",
            )?
            .try_into()?;
        noop.load().context("loading bench_noop")?;
        let layout = pins.0.clone();
        let mut instance = Self {
            datapath,
            services: open(&layout, map_names::SERVICES)?,
            backends: IdMap::open(&layout, map_names::BACKENDS)?,
            conntrack: open(&layout, map_names::CONNTRACK_TCP)?,
            service_stats: open(&layout, map_names::SERVICE_STATS)?,
            drops: open(&layout, map_names::DROPS)?,
            pool_backends: 0,
            fillers: 0,
            _pins: pins,
        };
        if conntrack_entries.is_some() {
            let taken = ct_key(
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 1),
                FRONTEND_C,
            );
            instance.conntrack.insert(taken, CtEntry::default(), 0)?;
        }
        // A -> B, B -> A (the ping-pong pair), C -> a plain backend.
        for (id, frontend, backend) in [
            (1, FRONTEND_A, FRONTEND_B),
            (2, FRONTEND_B, FRONTEND_A),
            (3, FRONTEND_C, BACKEND_C),
        ] {
            instance.add_backend(id, backend)?;
            instance.add_frontend(id, frontend, &[id])?;
        }
        Ok(instance)
    }

    fn program(&self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .datapath
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    fn add_backend(&mut self, id: u32, addr: SocketAddrV4) -> anyhow::Result<()> {
        let backend = BackendAddr {
            addr: addr.into(),
            protocol: Protocol::Tcp,
        };
        self.backends.insert(id, translate::backend(&backend))?;
        Ok(())
    }

    /// Slots first, then slot 0 (the agent's order).
    fn add_frontend(
        &mut self,
        id: u32,
        frontend: SocketAddrV4,
        backend_ids: &[u32],
    ) -> anyhow::Result<()> {
        for (i, backend_id) in backend_ids.iter().enumerate() {
            let value = translate::slot(*backend_id);
            self.services
                .insert(service_key(frontend, i as u16 + 1), value, 0)?;
        }
        let settings = EntrySettings {
            flags: 0,
            affinity_timeout: 0,
            service_port_id: id,
        };
        let value = translate::slot0(id, backend_ids.len(), settings);
        self.services.insert(service_key(frontend, 0), value, 0)?;
        Ok(())
    }

    /// Programs filler services until the datapath holds `services` in all.
    fn fill_to(&mut self, services: usize) -> anyhow::Result<()> {
        let wanted = services.saturating_sub(BENCH_FRONTENDS) as u32;
        let pool_needed = (wanted * FILLER_BACKENDS).min(BACKEND_POOL);
        while self.pool_backends < pool_needed {
            let j = self.pool_backends;
            self.add_backend(FIRST_POOL_BACKEND_ID + j, pool_backend(j))?;
            self.pool_backends += 1;
        }
        while self.fillers < wanted {
            let i = self.fillers;
            let ids: Vec<u32> = (0..FILLER_BACKENDS)
                .map(|k| FIRST_POOL_BACKEND_ID + (i * FILLER_BACKENDS + k) % BACKEND_POOL)
                .collect();
            self.add_frontend(FIRST_FILLER_FRONTEND_ID + i, filler_frontend(i), &ids)?;
            self.fillers += 1;
        }
        Ok(())
    }

    fn ct_packets(&self, key: &CtKey) -> u64 {
        self.conntrack.get(key, 0).map(|e| e.packets).unwrap_or(0)
    }

    fn connections(&self, frontend_id: u32) -> u64 {
        // Per-CPU counters: summed over the CPUs.
        self.service_stats
            .get(&frontend_id, 0)
            .map(|values| values.iter().map(|s| s.connections).sum())
            .unwrap_or(0)
    }

    fn drops(&self, reason: u32) -> u64 {
        self.drops.get(&reason, 0).unwrap_or(0)
    }
}

pub(super) struct Outcome {
    /// Average ns per repeat, as the kernel reports it.
    pub(super) ns: f64,
    pub(super) retval: u32,
    pub(super) out: Vec<u8>,
}

pub(super) fn test_run(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<Outcome> {
    let mut out = vec![0u8; 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(Outcome {
        ns: result.duration.as_nanos() as f64,
        retval: result.return_value,
        out,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    NonService,
    Established,
    NewFlow,
    Reply,
    EstablishedForwarded,
    ReplyForwarded,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::NonService,
        Kind::Established,
        Kind::NewFlow,
        Kind::Reply,
        Kind::EstablishedForwarded,
        Kind::ReplyForwarded,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::NonService => "non-service",
            Kind::Established => "established flow",
            Kind::NewFlow => "new flow, TCP table full (overflow)",
            Kind::Reply => "reply",
            Kind::EstablishedForwarded => "established flow, forwarded by the FIB",
            Kind::ReplyForwarded => "reply, forwarded by the FIB",
        }
    }

    fn forwarded(self) -> bool {
        self.unforwarded().is_some()
    }

    /// For a forwarded kind, the same packet handed to the stack.
    fn unforwarded(self) -> Option<Kind> {
        match self {
            Kind::EstablishedForwarded => Some(Kind::Established),
            Kind::ReplyForwarded => Some(Kind::Reply),
            _ => None,
        }
    }

    fn method(self) -> &'static str {
        match self {
            Kind::NonService => "TCP SYN to a non-service address; checked: passed unchanged",
            Kind::Established => {
                "TCP ACK on an established flow; frontends A and B DNAT to each other so every repeat is an established packet with the full rewrite; checked: conntrack counted exactly one packet per repeat"
            }
            Kind::NewFlow => {
                "TCP SYN, conntrack miss + insert of 2 entries, the slowest path: A/B pair in a datapath whose TCP table is full (1 entry, taken), so each flow misses it and the overflow, fails the table's insert and goes to the overflow LRU of 2 entries, evicting the previous flow (eviction included); checked: one new connection per repeat, no insert failed; the common path is the single-runs row"
            }
            Kind::Reply => {
                "TCP ACK from the backend, reverse NAT; A/B pair so every repeat is a reply packet; checked: reply entries counted exactly one packet per repeat"
            }
            Kind::EstablishedForwarded => {
                "as the established row, with forwarding on: FIB lookup, TTL decrement, bpf_redirect_neigh; runs of 200 repeats from TTL 255; checked: verdict TC_ACT_REDIRECT, one conntrack packet per repeat"
            }
            Kind::ReplyForwarded => {
                "as the reply row, with forwarding on: FIB lookup, TTL decrement, bpf_redirect_neigh; runs of 200 repeats from TTL 255; checked: verdict TC_ACT_REDIRECT, one reply-entry packet per repeat"
            }
        }
    }
}

/// The pair of datapaths for one service count: `main` (ample conntrack, flows A and B
/// established) and `fresh` (a full TCP table and an overflow of 2 entries, for new flows).
struct Scale {
    services: usize,
    main: Instance,
    fresh: Instance,
}

impl Scale {
    fn new(services: usize) -> anyhow::Result<Self> {
        let mut main = Instance::load("dpbench", None)?;
        let mut fresh = Instance::load("dpbenchnf", Some(2))?;
        main.fill_to(services)?;
        fresh.fill_to(services)?;
        // Flows A and B in the main datapath: the first SYN of each creates its entries.
        let prog = main.program(PROG_POD_INGRESS)?;
        let to_b = test_run(prog, &tcp_frame(CLIENT, FRONTEND_A, TCP_SYN), 1)?;
        ensure!(
            to_b.retval == TC_ACT_OK && destination(&to_b.out) == FRONTEND_B,
            "SYN to A was not sent to B"
        );
        let to_a = test_run(prog, &tcp_frame(CLIENT, FRONTEND_B, TCP_SYN), 1)?;
        ensure!(
            to_a.retval == TC_ACT_OK && destination(&to_a.out) == FRONTEND_A,
            "SYN to B was not sent to A"
        );
        Ok(Self {
            services,
            main,
            fresh,
        })
    }
}

fn run_noop(scale: &Scale, repeat: u32) -> anyhow::Result<f64> {
    let frame = tcp_frame(CLIENT, FRONTEND_A, TCP_SYN);
    let outcome = test_run(scale.main.program(NOOP)?, &frame, repeat)?;
    ensure!(
        outcome.retval == TC_ACT_OK,
        "no-op verdict {}",
        outcome.retval
    );
    Ok(outcome.ns)
}

/// One run of `repeat` repeats of a `kind` packet, checked to have taken that path every
/// time; the kernel's average ns per repeat.
fn run_kind(kind: Kind, scale: &Scale, repeat: u32) -> anyhow::Result<f64> {
    if kind.forwarded() {
        return run_forwarded(kind, scale, repeat);
    }
    let (main, fresh) = (&scale.main, &scale.fresh);
    let fwd_a = ct_key(CLIENT, FRONTEND_A);
    let fwd_b = ct_key(CLIENT, FRONTEND_B);
    // Replies: from B (the backend of the flow to A), and from A (the backend of B's flow).
    let rev_b = ct_key(FRONTEND_B, CLIENT);
    let rev_a = ct_key(FRONTEND_A, CLIENT);
    let pod_ingress = main.program(PROG_POD_INGRESS)?;
    let outcome = match kind {
        Kind::NonService => {
            let frame = tcp_frame(CLIENT, NOT_A_SERVICE, TCP_SYN);
            let o = test_run(pod_ingress, &frame, repeat)?;
            ensure!(
                o.retval == TC_ACT_OK && o.out == frame,
                "verdict {} or the packet changed",
                o.retval
            );
            o
        }
        Kind::Established => {
            let frame = tcp_frame(CLIENT, FRONTEND_A, TCP_ACK);
            let counted = || main.ct_packets(&fwd_a) + main.ct_packets(&fwd_b);
            let before = counted();
            let o = test_run(pod_ingress, &frame, repeat)?;
            let grew = counted() - before;
            let expected = if repeat.is_multiple_of(2) {
                FRONTEND_A
            } else {
                FRONTEND_B
            };
            ensure!(
                grew == repeat as u64,
                "{grew} established packets counted for {repeat} repeats"
            );
            ensure!(
                o.retval == TC_ACT_OK && destination(&o.out) == expected,
                "verdict {}, destination {}",
                o.retval,
                destination(&o.out)
            );
            o
        }
        Kind::Reply => {
            let frame = tcp_frame(FRONTEND_B, CLIENT, TCP_ACK);
            let counted = || main.ct_packets(&rev_a) + main.ct_packets(&rev_b);
            let before = counted();
            let o = test_run(pod_ingress, &frame, repeat)?;
            let grew = counted() - before;
            let expected = if repeat.is_multiple_of(2) {
                FRONTEND_B
            } else {
                FRONTEND_A
            };
            ensure!(
                grew == repeat as u64,
                "{grew} reply packets counted for {repeat} repeats"
            );
            ensure!(
                o.retval == TC_ACT_OK && source(&o.out) == expected,
                "verdict {}, source {}",
                o.retval,
                source(&o.out)
            );
            o
        }
        Kind::EstablishedForwarded | Kind::ReplyForwarded => unreachable!("run_forwarded"),
        Kind::NewFlow => {
            let frame = tcp_frame(CLIENT, FRONTEND_A, TCP_SYN);
            let failed = fresh.drops(drop_reason::CT_INSERT_FAILED);
            let counted = || fresh.connections(1) + fresh.connections(2);
            let before = counted();
            let o = test_run(fresh.program(PROG_POD_INGRESS)?, &frame, repeat)?;
            let grew = counted() - before;
            ensure!(
                grew == repeat as u64,
                "{grew} new connections counted for {repeat} repeats (conntrack hits?)"
            );
            ensure!(o.retval == TC_ACT_OK, "verdict {}", o.retval);
            let failed = fresh.drops(drop_reason::CT_INSERT_FAILED) - failed;
            ensure!(failed == 0, "{failed} conntrack inserts failed");
            o
        }
    };
    Ok(outcome.ns)
}

/// About `repeat` repeats of an established or reply packet with forwarding on, as runs of
/// `FORWARDED_REPEAT` from TTL 255 (each repeat decrements it); the mean of the kernel's
/// per-repeat averages.
fn run_forwarded(kind: Kind, scale: &Scale, repeat: u32) -> anyhow::Result<f64> {
    let main = &scale.main;
    let (frame, keys) = match kind {
        Kind::EstablishedForwarded => (
            tcp_frame_with_ttl(CLIENT, FRONTEND_A, TCP_ACK, 255),
            [ct_key(CLIENT, FRONTEND_A), ct_key(CLIENT, FRONTEND_B)],
        ),
        _ => (
            tcp_frame_with_ttl(FRONTEND_B, CLIENT, TCP_ACK, 255),
            [ct_key(FRONTEND_A, CLIENT), ct_key(FRONTEND_B, CLIENT)],
        ),
    };
    let counted = || main.ct_packets(&keys[0]) + main.ct_packets(&keys[1]);
    let pod_ingress = main.program(PROG_POD_INGRESS)?;
    let runs = repeat.div_ceil(FORWARDED_REPEAT);
    let _forwarding = Forwarding::on()?;
    let before = counted();
    let mut total = 0.0;
    for _ in 0..runs {
        let o = test_run(pod_ingress, &frame, FORWARDED_REPEAT)?;
        ensure!(
            o.retval == TC_ACT_REDIRECT,
            "verdict {} (not forwarded by the FIB)",
            o.retval
        );
        total += o.ns;
    }
    let grew = counted() - before;
    ensure!(
        grew == (runs * FORWARDED_REPEAT) as u64,
        "{grew} packets counted for {} repeats",
        runs * FORWARDED_REPEAT
    );
    Ok(total / runs as f64)
}

/// Forwarding on the test runs' device (loopback) while it lives: the FIB then forwards the
/// translated packets over the namespace's route instead of answering "not forwarded".
struct Forwarding;

const LO_FORWARDING: &str = "/proc/sys/net/ipv4/conf/lo/forwarding";

impl Forwarding {
    fn on() -> anyhow::Result<Self> {
        std::fs::write(LO_FORWARDING, "1").context(LO_FORWARDING)?;
        Ok(Self)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let _ = std::fs::write(LO_FORWARDING, "0");
    }
}

/// Moves the calling thread into a network namespace of its own (it goes with the thread)
/// with a route for every address the bench translates to, through a veth pair, and IP
/// forwarding on except on loopback (see `Forwarding`). BPF_PROG_TEST_RUN runs programs on
/// the caller's loopback, so this is the FIB they see, whatever the machine's own.
fn isolate_network() -> anyhow::Result<()> {
    // SAFETY: unshare changes only the calling thread's namespaces.
    ensure!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    for args in [
        &["link", "set", "lo", "up"][..],
        &[
            "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
        ],
        &["link", "set", "bench0", "up"],
        &["link", "set", "bench1", "up"],
        &["route", "add", "10.0.0.0/8", "dev", "bench0"],
    ] {
        let out = std::process::Command::new("ip").args(args).output()?;
        ensure!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    std::fs::write(LO_FORWARDING, "0")?;
    Ok(())
}

/// Keeps the calling thread on one CPU while it lives, and restores its affinity after.
/// BPF_PROG_TEST_RUN runs the program on the calling CPU; staying on one makes the runs
/// comparable and the LRU conntrack's per-CPU lists (which decide what an insert evicts)
/// behave the same in every run.
struct PinnedToCpu(libc::cpu_set_t);

impl PinnedToCpu {
    fn last_cpu() -> anyhow::Result<(Self, usize)> {
        // SAFETY: affinity calls on the current thread with a correctly sized set.
        unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            ensure!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) == 0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .rev()
                .find(|c| libc::CPU_ISSET(*c, &saved))
                .context("no CPU in the affinity mask")?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            ensure!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) == 0,
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            );
            Ok((Self(saved), cpu))
        }
    }
}

impl Drop for PinnedToCpu {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

pub fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                isolate_network()?;
                run_isolated(settings, report)
            })
            .join()
            .unwrap_or_else(|_| bail!("the per-packet thread panicked"))
    })
}

fn run_isolated(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let (_pinned, cpu) = PinnedToCpu::last_cpu()?;
    report.info.insert("per_packet_cpu".into(), cpu.into());
    let mut scales = Vec::new();
    for &services in &settings.packet_scales {
        eprintln!("bench: per-packet: loading and programming datapaths with {services} services");
        scales.push(Scale::new(services)?);
    }
    let (smallest, largest) = match (scales.first(), scales.last()) {
        (Some(s), Some(l)) => (s, l),
        _ => bail!("no service counts"),
    };
    record_program_info(&smallest.main, report);

    // Warm-up, then rounds: in each round every (kind, service count) once, so that drift
    // over the section affects all figures alike.
    let warmup = (settings.repeats / 10).max(1000);
    run_noop(smallest, warmup)?;
    for kind in Kind::ALL {
        for scale in &scales {
            run_kind(kind, scale, warmup).with_context(|| {
                format!(
                    "{} with {} services (warm-up)",
                    kind.label(),
                    scale.services
                )
            })?;
        }
    }
    let mut noop_runs = Vec::new();
    let mut runs: Vec<Vec<Vec<f64>>> = vec![vec![vec![]; scales.len()]; Kind::ALL.len()];
    for round in 0..settings.runs {
        eprintln!("bench: per-packet: round {}/{}", round + 1, settings.runs);
        noop_runs.push(run_noop(smallest, settings.repeats)?);
        for (k, kind) in Kind::ALL.iter().enumerate() {
            for (s, scale) in scales.iter().enumerate() {
                let ns = run_kind(*kind, scale, settings.repeats).with_context(|| {
                    format!("{} with {} services", kind.label(), scale.services)
                })?;
                runs[k][s].push(ns);
            }
        }
    }

    let how = format!(
        "median of {} runs x {} repeats (BPF_PROG_TEST_RUN's average per repeat) after a warm-up run, interleaved with every other row",
        settings.runs, settings.repeats
    );
    let noop_ns = median(&noop_runs);
    report.push(
        Measurement::new(SECTION, "no-op tc program (floor)", "ns", noop_ns)
            .note(format!("{how}; runs {noop_runs:?}")),
    );
    for (k, kind) in Kind::ALL.iter().enumerate() {
        for (s, scale) in scales.iter().enumerate() {
            let ns = median(&runs[k][s]);
            let name = format!("{}, {} services", kind.label(), scale_label(scale.services));
            let mut m = Measurement::new(SECTION, name, "ns", ns).baseline("noop", noop_ns);
            if let Some(unforwarded) = kind.unforwarded() {
                // What the FIB step costs: the same packet handed to the stack.
                let u = Kind::ALL
                    .iter()
                    .position(|k| *k == unforwarded)
                    .expect("in ALL");
                m = m.baseline("to the stack", median(&runs[u][s]));
            }
            let mut m =
                m.ratio_to("noop")
                    .note(format!("{how}; {}; runs {:?}", kind.method(), runs[k][s]));
            if matches!(kind, Kind::Established | Kind::EstablishedForwarded) {
                m = m.goal("<= 3x noop", |m| m.ratio.is_some_and(|r| r <= 3.0));
            }
            report.push(m);
        }
        if scales.len() > 1 {
            let smallest_label = format!("{} services", scale_label(smallest.services));
            report.push(
                Measurement::new(
                    SECTION,
                    format!(
                        "{}: {} vs {} services",
                        kind.label(),
                        scale_label(largest.services),
                        scale_label(smallest.services)
                    ),
                    "ns",
                    median(&runs[k][scales.len() - 1]),
                )
                .baseline(smallest_label.clone(), median(&runs[k][0]))
                .ratio_to(&smallest_label)
                .goal(format!("<= 1.10x {smallest_label}"), |m| {
                    m.ratio.is_some_and(|r| r <= 1.10)
                }),
            );
        }
    }
    // A connection translated at the socket (`--socket-lb all`) sends its packets to the
    // backend's own address: the program's non-service path, next to the per-packet one.
    let index = |kind: Kind| Kind::ALL.iter().position(|k| *k == kind).expect("in ALL");
    let (non_service, established) = (index(Kind::NonService), index(Kind::Established));
    for (s, scale) in scales.iter().enumerate() {
        let m = Measurement::new(
            SECTION,
            format!(
                "established flow translated at the socket (--socket-lb all), {} services",
                scale_label(scale.services)
            ),
            "ns",
            median(&runs[non_service][s]),
        )
        .baseline("noop", noop_ns)
        .baseline("per-packet path", median(&runs[established][s]));
        report.push(
            m.ratio_to("noop")
                .goal("<= 3x noop", |m| m.ratio.is_some_and(|r| r <= 3.0))
                .note(format!(
                    "the socket's packets are addressed to the backend: the non-service row's measurement ({}), shown here next to the per-packet established row; runs {:?}",
                    Kind::NonService.method(),
                    runs[non_service][s]
                )),
        );
    }
    ipv6_rows(smallest, noop_ns, settings, report)?;
    single_run_cross_check(&smallest.main, settings, smallest.services, report)?;
    Ok(())
}

/// The IPv6 rows (`packets6`), each in the same rounds as its IPv4 row at the smallest
/// service count, interleaved.
fn ipv6_rows(
    scale: &Scale,
    noop_ns: f64,
    settings: &Settings,
    report: &mut Report,
) -> anyhow::Result<()> {
    use super::packets6::{Kind6, Pair6, run_kind6};
    eprintln!("bench: per-packet: IPv6 beside IPv4");
    let pair = Pair6::new()?;
    let kinds = [
        (Kind::NonService, Kind6::NonService),
        (Kind::Established, Kind6::Established),
        (Kind::NewFlow, Kind6::NewFlow),
        (Kind::Reply, Kind6::Reply),
    ];
    let warmup = (settings.repeats / 10).max(1000);
    for (v4, v6) in kinds {
        run_kind(v4, scale, warmup)?;
        run_kind6(v6, &pair, warmup)?;
    }
    let mut runs = vec![(Vec::new(), Vec::new()); kinds.len()];
    for _ in 0..settings.runs {
        for (k, (v4, v6)) in kinds.iter().enumerate() {
            runs[k].0.push(run_kind(*v4, scale, settings.repeats)?);
            runs[k].1.push(run_kind6(*v6, &pair, settings.repeats)?);
        }
    }
    for (k, (v4, _)) in kinds.iter().enumerate() {
        let (v4_runs, v6_runs) = &runs[k];
        report.push(
            Measurement::new(
                SECTION,
                format!(
                    "IPv6 {}, {} services",
                    v4.label(),
                    scale_label(scale.services)
                ),
                "ns",
                median(v6_runs),
            )
            .baseline("noop", noop_ns)
            .baseline("IPv4", median(v4_runs))
            .ratio_to("IPv4")
            .note(format!(
                "as the IPv4 row ({}), with IPv6 frontends programmed by the agent's programmer, interleaved with the IPv4 row in {} rounds of {} repeats; runs IPv6 {v6_runs:?}, IPv4 {v4_runs:?}",
                v4.method(),
                settings.runs,
                settings.repeats
            )),
        );
    }
    Ok(())
}

/// New flows without eviction: single runs (repeat = 1) of distinct flows to frontend C, the
/// mean of the kernel's per-run times, against single runs of the no-op (a single run's
/// time includes one clock read more than a repeated run's).
fn single_run_cross_check(
    main: &Instance,
    settings: &Settings,
    scale: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let count = settings.single_runs;
    let clients: Vec<SocketAddrV4> = (0..count as u32)
        .map(|i| {
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i / 50_000),
                10_000 + (i % 50_000) as u16,
            )
        })
        .collect();
    let noop = main.program(NOOP)?;
    let prog = main.program(PROG_POD_INGRESS)?;
    let frame = tcp_frame(CLIENT, FRONTEND_C, TCP_SYN);
    let mut noop_runs = Vec::new();
    let mut flow_runs = Vec::new();
    // Per run: p50, p99 and p99.9 of the single runs' times.
    let mut tails = Vec::new();
    let mut conntrack = main_conntrack(main)?;
    for run in 0..=settings.runs {
        let mut noop_total = 0.0;
        for _ in 0..count {
            noop_total += test_run(noop, &frame, 1)?.ns;
        }
        let before = main.connections(3);
        let mut flow_total = 0.0;
        let mut singles = Vec::with_capacity(count);
        for client in &clients {
            let outcome = test_run(prog, &tcp_frame(*client, FRONTEND_C, TCP_SYN), 1)?;
            ensure!(
                destination(&outcome.out) == BACKEND_C,
                "a new flow to C was not sent to its backend"
            );
            flow_total += outcome.ns;
            singles.push(outcome.ns);
        }
        let grew = main.connections(3) - before;
        ensure!(
            grew == count as u64,
            "{grew} new connections for {count} single runs"
        );
        // Leave conntrack as it was (outside the measured runs).
        for client in &clients {
            let _ = conntrack.remove(&ct_key(*client, FRONTEND_C));
            let _ = conntrack.remove(&ct_key(BACKEND_C, *client));
        }
        if run > 0 {
            noop_runs.push(noop_total / count as f64);
            flow_runs.push(flow_total / count as f64);
            let p50 = percentile(&singles, 50.0);
            let slow = singles.iter().filter(|ns| **ns > 4.0 * p50).count();
            tails.push((
                p50,
                percentile(&singles, 99.0),
                percentile(&singles, 99.9),
                format!("{:.2}%", 100.0 * slow as f64 / count as f64),
            ));
        }
    }
    let noop_single = median(&noop_runs);
    let how = format!(
        "median of {} runs, each the mean of {count} single BPF_PROG_TEST_RUN calls (repeat = 1), after a warm-up run",
        settings.runs
    );
    report.push(
        Measurement::new(
            SECTION,
            "no-op, single runs (floor for the next row)",
            "ns",
            noop_single,
        )
        .note(format!("{how}; runs {noop_runs:?}")),
    );
    report.push(
        Measurement::new(
            SECTION,
            format!("new flow, single runs, no eviction, {} services", scale_label(scale)),
            "ns",
            median(&flow_runs),
        )
        .baseline("noop single", noop_single)
        .ratio_to("noop single")
        .note(format!(
            "{how}; each run a distinct flow into an ample conntrack map (cross-check of the repeated new-flow row without LRU eviction); runs {flow_runs:?}; per run (p50, p99, p99.9 in ns, share of runs slower than 4x p50) of the single runs: {tails:?}"
        )),
    );
    Ok(())
}

fn main_conntrack(main: &Instance) -> anyhow::Result<HashMap<MapData, CtKey, CtEntry>> {
    open(&main.datapath.layout, map_names::CONNTRACK_TCP)
}

/// Program sizes as the kernel reports them (verified, translated and JIT-compiled).
fn record_program_info(main: &Instance, report: &mut Report) {
    let mut info = serde_json::Map::new();
    for name in [PROG_POD_INGRESS, NOOP] {
        let Ok(prog) = main.program(name) else {
            continue;
        };
        if let Ok(i) = prog.info() {
            info.insert(
                name.to_string(),
                json!({
                    "verified_insns": i.verified_instruction_count(),
                    "xlated_insns": i.size_translated().map(|b| b / 8),
                    "jited_bytes": i.size_jitted(),
                    "id": i.id(),
                }),
            );
        }
    }
    report.info.insert("programs".into(), info.into());
}

/// `per-packet-loop KIND SERVICES SECONDS` (for profiling with perf or `bpftool prog
/// profile`): programs SERVICES services and runs KIND packets (noop, non-service,
/// established, new-flow, reply) for SECONDS, printing each run's ns per packet.
pub fn profile_loop(args: &[String]) -> anyhow::Result<()> {
    let [kind, services, seconds] = args else {
        bail!(
            "usage: per-packet-loop noop|non-service|established|new-flow|reply SERVICES SECONDS"
        );
    };
    let kind = match kind.as_str() {
        "noop" => None,
        "non-service" => Some(Kind::NonService),
        "established" => Some(Kind::Established),
        "new-flow" => Some(Kind::NewFlow),
        "reply" => Some(Kind::Reply),
        other => bail!("unknown kind {other:?}"),
    };
    let (_pinned, cpu) = PinnedToCpu::last_cpu()?;
    let scale = Scale::new(services.parse()?)?;
    eprintln!(
        "per-packet-loop: pod_ingress id {}, running on CPU {cpu}",
        scale.main.program(PROG_POD_INGRESS)?.info()?.id()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds.parse()?);
    while std::time::Instant::now() < deadline {
        let ns = match kind {
            None => run_noop(&scale, 1_000_000)?,
            Some(kind) => run_kind(kind, &scale, 1_000_000)?,
        };
        println!("{ns}");
    }
    Ok(())
}
