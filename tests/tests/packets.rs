//! Packet fixtures through BPF_PROG_TEST_RUN: the real program, loaded in the kernel with maps
//! programmed by the agent's own code, run on crafted frames. Each case is
//! {description, input frame, expected output frame, expected verdict}; expected frames are
//! built from scratch (checksums computed here, independently of the datapath), so byte
//! equality proves the incremental checksum updates too.
//!
//! Cases run in order: the reply cases rely on conntrack entries the forward cases created.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use dataplane_agent::{
    datapath::{
        BpffsLayout,
        loader::{LoadedDatapath, MapSizes},
        maps::PinnedMaps,
        programmer::Programmer,
    },
    plan::{Algorithm, Frontend, FrontendAddr, FrontendKind, Plan, Protocol},
};
use testbed::require_root;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const HAIRPIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LOCAL_ONLY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 9);
const HAIRPIN_SNAT: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn checksum(chunks: &[&[u8]]) -> [u8; 2] {
    let mut sum = 0u64;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u64;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

#[derive(Clone, Copy)]
enum L4<'a> {
    Tcp {
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        payload: &'a [u8],
        zero_checksum: bool,
    },
}

/// An Ethernet + IPv4 + TCP/UDP frame with every checksum computed from scratch.
fn frame(macs: ([u8; 6], [u8; 6]), src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Vec<u8> {
    let (proto, mut l4_bytes) = match l4 {
        L4::Tcp { flags, seq, ack } => {
            let mut t = vec![0u8; 20];
            t[4..8].copy_from_slice(&seq.to_be_bytes());
            t[8..12].copy_from_slice(&ack.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            (6u8, t)
        }
        L4::Udp { payload, .. } => {
            let mut u = vec![0u8; 8];
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(payload);
            (17u8, u)
        }
    };
    l4_bytes[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4_bytes[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let len = l4_bytes.len() as u16;
    let pseudo = [
        &src.ip().octets()[..],
        &dst.ip().octets(),
        &[0, proto],
        &len.to_be_bytes(),
    ]
    .concat();
    let csum_at = if proto == 6 { 16 } else { 6 };
    if !matches!(
        l4,
        L4::Udp {
            zero_checksum: true,
            ..
        }
    ) {
        let c = checksum(&[&pseudo, &l4_bytes]);
        l4_bytes[csum_at..csum_at + 2].copy_from_slice(&c);
    }
    let ip = ipv4_header(proto, 20 + len, *src.ip(), *dst.ip(), 64, 0x1234, 0);
    [&macs.0[..], &macs.1, &[0x08, 0x00], &ip, &l4_bytes].concat()
}

fn ipv4_header(
    proto: u8,
    total: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    id: u16,
    flags: u8,
) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&[flags, 0, ttl, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c);
    ip
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

const TO_NODE: ([u8; 6], [u8; 6]) = (NODE_MAC, CLIENT_MAC);
const TO_CLIENT: ([u8; 6], [u8; 6]) = (CLIENT_MAC, NODE_MAC);
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const RST_ACK: u8 = 0x14;

/// What the datapath must answer to a UDP datagram for a service without endpoints.
fn icmp_port_unreachable(request: &[u8]) -> Vec<u8> {
    let quoted = &request[14..14 + 28];
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    let c = checksum(&[&icmp, quoted]);
    icmp[2..4].copy_from_slice(&c);
    let ip = ipv4_header(1, 20 + 8 + 28, EMPTY_VIP, CLIENT, 64, 0, 0x40);
    [
        &CLIENT_MAC[..],
        &NODE_MAC,
        &[0x08, 0x00],
        &ip,
        &icmp,
        quoted,
    ]
    .concat()
}

/// A reset as the datapath builds it (IP id 0, don't-fragment, window 0).
fn reset(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut f = frame(TO_CLIENT, src, dst, L4::Tcp { flags, seq, ack });
    let ip = ipv4_header(6, 40, *src.ip(), *dst.ip(), 64, 0, 0x40);
    f[14..34].copy_from_slice(&ip);
    f[14 + 20 + 14..14 + 20 + 16].copy_from_slice(&[0, 0]); // window
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&[0, 0]);
    let pseudo = [
        &src.ip().octets()[..],
        &dst.ip().octets(),
        &[0, 6],
        &20u16.to_be_bytes(),
    ]
    .concat();
    let c = checksum(&[&pseudo, &f[34..54]]);
    f[50..52].copy_from_slice(&c);
    f
}

/// The first 28 bytes of a frame's IP packet (header and 8 bytes), as an ICMP error quotes
/// them, with its addresses and ports replaced and its header checksum recomputed (the quoted
/// L4 checksum is left alone, as NAT devices leave it).
fn quote(frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut q = frame[14..14 + 28].to_vec();
    q[12..16].copy_from_slice(&src.ip().octets());
    q[16..20].copy_from_slice(&dst.ip().octets());
    q[20..22].copy_from_slice(&src.port().to_be_bytes());
    q[22..24].copy_from_slice(&dst.port().to_be_bytes());
    q[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&[&q[..20]]);
    q[10..12].copy_from_slice(&c);
    q
}

/// An ICMP error (`kind` = [type, code]) from `src` to `dst` quoting `quoted`.
fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: [u8; 2],
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind[0], kind[1], 0, 0, 0, 0, 0x05, 0xdc]; // next-hop MTU 1500
    let c = checksum(&[&icmp, quoted]);
    icmp[2..4].copy_from_slice(&c);
    let ip = ipv4_header(1, (20 + 8 + quoted.len()) as u16, src, dst, 64, 7, 0);
    [&macs.0[..], &macs.1, &[0x08, 0x00], &ip, &icmp, quoted].concat()
}

struct Case {
    description: &'static str,
    input: Vec<u8>,
    expected: Vec<u8>,
    verdict: u32,
}

fn cases() -> Vec<Case> {
    let syn = frame(
        TO_NODE,
        sock(CLIENT, 40000),
        sock(VIP, 80),
        L4::Tcp {
            flags: SYN,
            seq: 1000,
            ack: 0,
        },
    );
    let udp_to_empty = frame(
        TO_NODE,
        sock(CLIENT, 40002),
        sock(EMPTY_VIP, 53),
        L4::Udp {
            payload: b"query",
            zero_checksum: false,
        },
    );
    let udp_query = frame(
        TO_NODE,
        sock(CLIENT, 40001),
        sock(VIP, 53),
        L4::Udp {
            payload: b"query",
            zero_checksum: false,
        },
    );
    let untouched = |input: Vec<u8>, description| Case {
        description,
        expected: input.clone(),
        input,
        verdict: TC_ACT_OK,
    };
    let udp = |payload: &'static [u8], zero| L4::Udp {
        payload,
        zero_checksum: zero,
    };
    vec![
        Case {
            description: "TCP SYN to a ClusterIP is sent to the backend",
            expected: frame(
                TO_NODE,
                sock(CLIENT, 40000),
                sock(BACKEND, 8080),
                L4::Tcp {
                    flags: SYN,
                    seq: 1000,
                    ack: 0,
                },
            ),
            input: syn.clone(),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "the backend's SYN-ACK comes back from the ClusterIP",
            input: frame(
                TO_NODE,
                sock(BACKEND, 8080),
                sock(CLIENT, 40000),
                L4::Tcp {
                    flags: SYN_ACK,
                    seq: 5000,
                    ack: 1001,
                },
            ),
            expected: frame(
                TO_NODE,
                sock(VIP, 80),
                sock(CLIENT, 40000),
                L4::Tcp {
                    flags: SYN_ACK,
                    seq: 5000,
                    ack: 1001,
                },
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "the same SYN again follows conntrack",
            expected: frame(
                TO_NODE,
                sock(CLIENT, 40000),
                sock(BACKEND, 8080),
                L4::Tcp {
                    flags: SYN,
                    seq: 1000,
                    ack: 0,
                },
            ),
            input: syn,
            verdict: TC_ACT_OK,
        },
        Case {
            description: "UDP to a ClusterIP is sent to the backend",
            input: frame(
                TO_NODE,
                sock(CLIENT, 40001),
                sock(VIP, 53),
                udp(b"query", false),
            ),
            expected: frame(
                TO_NODE,
                sock(CLIENT, 40001),
                sock(BACKEND, 5353),
                udp(b"query", false),
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "the UDP answer comes back from the ClusterIP",
            input: frame(
                TO_NODE,
                sock(BACKEND, 5353),
                sock(CLIENT, 40001),
                udp(b"answer", false),
            ),
            expected: frame(
                TO_NODE,
                sock(VIP, 53),
                sock(CLIENT, 40001),
                udp(b"answer", false),
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "a backend's port unreachable reaches the client about the cluster IP",
            input: icmp_error(
                TO_NODE,
                BACKEND,
                CLIENT,
                [3, 3],
                &quote(&udp_query, sock(CLIENT, 40001), sock(BACKEND, 5353)),
            ),
            expected: icmp_error(
                TO_NODE,
                VIP,
                CLIENT,
                [3, 3],
                &quote(&udp_query, sock(CLIENT, 40001), sock(VIP, 53)),
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "fragmentation needed about a reply reaches the backend about its own packet",
            input: icmp_error(
                TO_NODE,
                ROUTER,
                VIP,
                [3, 4],
                &quote(&udp_query, sock(VIP, 53), sock(CLIENT, 40001)),
            ),
            expected: icmp_error(
                TO_NODE,
                ROUTER,
                BACKEND,
                [3, 4],
                &quote(&udp_query, sock(BACKEND, 5353), sock(CLIENT, 40001)),
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "UDP without a checksum keeps none",
            input: frame(TO_NODE, sock(CLIENT, 40003), sock(VIP, 53), udp(b"q", true)),
            expected: frame(
                TO_NODE,
                sock(CLIENT, 40003),
                sock(BACKEND, 5353),
                udp(b"q", true),
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "a pod reaching itself gets a source it accepts",
            input: frame(
                TO_NODE,
                sock(BACKEND, 40004),
                sock(HAIRPIN_VIP, 80),
                L4::Tcp {
                    flags: SYN,
                    seq: 7,
                    ack: 0,
                },
            ),
            expected: frame(
                TO_NODE,
                sock(HAIRPIN_SNAT, 40004),
                sock(BACKEND, 8080),
                L4::Tcp {
                    flags: SYN,
                    seq: 7,
                    ack: 0,
                },
            ),
            verdict: TC_ACT_OK,
        },
        Case {
            description: "and its reply is restored to ClusterIP -> pod",
            input: frame(
                TO_NODE,
                sock(BACKEND, 8080),
                sock(HAIRPIN_SNAT, 40004),
                L4::Tcp {
                    flags: SYN_ACK,
                    seq: 9,
                    ack: 8,
                },
            ),
            expected: frame(
                TO_NODE,
                sock(HAIRPIN_VIP, 80),
                sock(BACKEND, 40004),
                L4::Tcp {
                    flags: SYN_ACK,
                    seq: 9,
                    ack: 8,
                },
            ),
            verdict: TC_ACT_OK,
        },
        untouched(
            frame(
                TO_NODE,
                sock(CLIENT, 40000),
                sock(Ipv4Addr::new(10, 0, 0, 99), 80),
                L4::Tcp {
                    flags: SYN,
                    seq: 1,
                    ack: 0,
                },
            ),
            "traffic to a non-service address passes untouched",
        ),
        untouched(
            frame(
                TO_NODE,
                sock(CLIENT, 40000),
                sock(VIP, 81),
                L4::Tcp {
                    flags: SYN,
                    seq: 1,
                    ack: 0,
                },
            ),
            "a ClusterIP's unknown port passes untouched",
        ),
        untouched(
            frame(
                TO_NODE,
                sock(CLIENT, 40000),
                sock(VIP, 80),
                udp(b"x", false),
            ),
            "the wrong protocol for a service port passes untouched",
        ),
        untouched(
            [&NODE_MAC[..], &CLIENT_MAC, &[0x08, 0x06], &[0u8; 28]].concat(),
            "ARP passes untouched",
        ),
        Case {
            description: "TCP SYN to a service without endpoints is reset",
            input: frame(
                TO_NODE,
                sock(CLIENT, 40005),
                sock(EMPTY_VIP, 80),
                L4::Tcp {
                    flags: SYN,
                    seq: 777,
                    ack: 0,
                },
            ),
            expected: reset(sock(EMPTY_VIP, 80), sock(CLIENT, 40005), 0, 778, RST_ACK),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "traffic-policy Local with endpoints only on other nodes is dropped, not refused",
            input: frame(
                TO_NODE,
                sock(CLIENT, 40006),
                sock(LOCAL_ONLY_VIP, 80),
                L4::Tcp {
                    flags: SYN,
                    seq: 1,
                    ack: 0,
                },
            ),
            expected: frame(
                TO_NODE,
                sock(CLIENT, 40006),
                sock(LOCAL_ONLY_VIP, 80),
                L4::Tcp {
                    flags: SYN,
                    seq: 1,
                    ack: 0,
                },
            ),
            verdict: TC_ACT_SHOT,
        },
        Case {
            description: "UDP to a service without endpoints gets ICMP port unreachable",
            expected: icmp_port_unreachable(&udp_to_empty),
            input: udp_to_empty,
            verdict: TC_ACT_REDIRECT,
        },
    ]
}

fn frontend(
    service: &str,
    ip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    backends: &[SocketAddrV4],
) -> Frontend {
    Frontend {
        service: service.into(),
        port_name: String::new(),
        kind: FrontendKind::ClusterIP,
        frontend: FrontendAddr {
            addr: sock(ip, port),
            protocol,
        },
        backends: backends.to_vec(),
        drop_when_empty: false,
        external_local: false,
        internal_backends: None,
        affinity_timeout: None,
        source_ranges: vec![],
        algorithm: Algorithm::Random,
    }
}

/// A plan of just these frontends.
fn plan_of(frontends: Vec<Frontend>) -> Plan {
    Plan {
        frontends,
        problems: vec![],
        health_checks: vec![],
    }
}

/// The `web` service: TCP 80 to BACKEND:8080, UDP 53 to BACKEND:5353.
fn web_frontends() -> [Frontend; 2] {
    [
        frontend(
            "default/web",
            VIP,
            80,
            Protocol::Tcp,
            &[sock(BACKEND, 8080)],
        ),
        frontend(
            "default/web",
            VIP,
            53,
            Protocol::Udp,
            &[sock(BACKEND, 5353)],
        ),
    ]
}

struct Pins(BpffsLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.dir());
    }
}

/// The datapath loaded under pins of its own (removed when `Pins` drops, which a tuple
/// binding does last), and the agent's programmer on its maps.
fn load(prefix: &str, sizes: &MapSizes) -> (Pins, LoadedDatapath, Programmer) {
    let pins = Pins(BpffsLayout::new(
        std::path::Path::new("/sys/fs/bpf").join(testbed::unique(prefix)),
    ));
    let datapath = LoadedDatapath::load(&pins.0, sizes).unwrap();
    let programmer = Programmer::restore(PinnedMaps::open(&pins.0).unwrap()).unwrap();
    (pins, datapath, programmer)
}

/// Runs `pod_ingress` on `input`: the verdict and the frame it left with.
fn run_pod_ingress(datapath: &mut LoadedDatapath, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 256];
    let result = datapath
        .program(dataplane_common::PROG_POD_INGRESS)
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap();
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn packet_fixtures_through_bpf_prog_test_run() {
    require_root!();
    let (_pins, mut datapath, mut programmer) = load("dpfix", &Default::default());
    let plan = plan_of(
        web_frontends()
            .into_iter()
            .chain([
                frontend("default/empty", EMPTY_VIP, 80, Protocol::Tcp, &[]),
                frontend("default/empty", EMPTY_VIP, 53, Protocol::Udp, &[]),
                frontend(
                    "default/self",
                    HAIRPIN_VIP,
                    80,
                    Protocol::Tcp,
                    &[sock(BACKEND, 8080)],
                ),
                Frontend {
                    drop_when_empty: true,
                    ..frontend("default/node-local", LOCAL_ONLY_VIP, 80, Protocol::Tcp, &[])
                },
            ])
            .collect(),
    );
    let report = programmer.apply(&plan);
    assert!(report.failures.is_empty(), "{:?}", report.failures);

    let mut failures = Vec::new();
    for case in cases() {
        let (verdict, out) = run_pod_ingress(&mut datapath, &case.input);
        if verdict != case.verdict || out != case.expected {
            failures.push(format!(
                "{}:\n  verdict {} (expected {})\n  got      {:02x?}\n  expected {:02x?}",
                case.description, verdict, case.verdict, out, case.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn syn_to(vip: Ipv4Addr, client_port: u16) -> Vec<u8> {
    frame(
        TO_NODE,
        sock(CLIENT, client_port),
        sock(vip, 80),
        L4::Tcp {
            flags: SYN,
            seq: 1,
            ack: 0,
        },
    )
}

/// Runs a SYN to `vip` and returns the verdict and the destination it left with.
fn destination_of(
    datapath: &mut LoadedDatapath,
    vip: Ipv4Addr,
    client_port: u16,
) -> (u32, Ipv4Addr) {
    let (verdict, out) = run_pod_ingress(datapath, &syn_to(vip, client_port));
    (verdict, Ipv4Addr::new(out[30], out[31], out[32], out[33]))
}

#[test]
fn a_full_map_skips_what_does_not_fit_and_keeps_the_rest_working() {
    require_root!();
    let sizes = [
        (dataplane_common::map_names::SERVICES.to_string(), 8),
        (dataplane_common::map_names::BACKENDS.to_string(), 5),
    ]
    .into();
    let (_pins, mut datapath, mut programmer) = load("dpfull", &sizes);
    let vip = |n| Ipv4Addr::new(10, 96, 1, n);
    let backend = |n| sock(Ipv4Addr::new(10, 0, 0, n), 8080);
    let fe =
        |n, backends: &[SocketAddrV4]| frontend("default/svc", vip(n), 80, Protocol::Tcp, backends);

    // 6 of 8 service entries, 3 of the 4 backend ids (1..=4) the 5-entry array allows.
    let mut frontends = vec![
        fe(1, &[backend(1), backend(2), backend(3)]),
        fe(2, &[backend(1)]),
    ];
    let report = programmer.apply(&plan_of(frontends.clone()));
    assert!(report.failures.is_empty(), "{:?}", report.failures);

    // Two more backends (one fits) and two more frontends (one fits).
    frontends.push(fe(3, &[backend(4), backend(5)]));
    frontends.push(fe(4, &[backend(1)]));
    let report = programmer.apply(&plan_of(frontends.clone()));
    let failures = report.failures.join("\n");
    assert_eq!(report.failures.len(), 2, "{failures}");
    assert!(
        failures.contains("backend 10.0.0.5:8080") && failures.contains("no free backend id"),
        "{failures}"
    );
    assert!(failures.contains("frontend 10.96.1.4:80"), "{failures}");

    // What was programmed before works as before; what fitted works; what did not is absent.
    for port in 40000..40010 {
        let (verdict, to) = destination_of(&mut datapath, vip(1), port);
        assert_eq!(verdict, TC_ACT_OK);
        assert!(
            [1, 2, 3].contains(&to.octets()[3]) && to.octets()[..3] == [10, 0, 0],
            "{to}"
        );
    }
    assert_eq!(
        destination_of(&mut datapath, vip(2), 40100),
        (TC_ACT_OK, Ipv4Addr::new(10, 0, 0, 1))
    );
    assert_eq!(
        destination_of(&mut datapath, vip(3), 40101),
        (TC_ACT_OK, Ipv4Addr::new(10, 0, 0, 4))
    );
    assert_eq!(
        destination_of(&mut datapath, vip(4), 40102),
        (TC_ACT_OK, vip(4)),
        "not programmed: untouched"
    );

    // Room frees up: the next apply programs what was skipped.
    frontends.remove(1);
    let report = programmer.apply(&plan_of(frontends));
    assert_eq!(
        report.failures.len(),
        1,
        "only backend 5 still lacks room: {:?}",
        report.failures
    );
    assert_eq!(
        destination_of(&mut datapath, vip(4), 40103),
        (TC_ACT_OK, Ipv4Addr::new(10, 0, 0, 1))
    );
}

#[test]
fn idle_conntrack_entries_are_collected_by_protocol_timeout() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load("dpgc", &Default::default());
    let plan = plan_of(web_frontends().into());
    assert!(programmer.apply(&plan).failures.is_empty());
    let run = |datapath: &mut LoadedDatapath, frame: Vec<u8>| run_pod_ingress(datapath, &frame);
    run(&mut datapath, syn_to(VIP, 40500));
    run(
        &mut datapath,
        frame(
            TO_NODE,
            sock(CLIENT, 40501),
            sock(VIP, 53),
            L4::Udp {
                payload: b"q",
                zero_checksum: false,
            },
        ),
    );
    let entries = || {
        PinnedMaps::open(&pins.0)
            .unwrap()
            .conntrack
            .keys()
            .filter(|k| k.is_ok())
            .count()
    };
    assert_eq!(entries(), 4, "a forward and a reply entry per flow");
    let now = dataplane_agent::inspect::monotonic_ns();
    assert_eq!(programmer.collect_conntrack(now), 0, "nothing is idle yet");
    let hours = |h: u64| now + h * 3600 * 1_000_000_000;
    assert_eq!(
        programmer.collect_conntrack(hours(1)),
        2,
        "UDP idle for an hour goes, TCP stays"
    );
    assert_eq!(
        programmer.collect_conntrack(hours(7)),
        2,
        "TCP idle past six hours goes"
    );
    assert_eq!(entries(), 0);
}

#[test]
fn a_closed_tcp_flow_reopens_on_a_new_syn_and_goes_after_a_short_idle_time() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load("dpfin", &Default::default());
    let plan = plan_of(vec![frontend(
        "default/web",
        VIP,
        80,
        Protocol::Tcp,
        &[sock(BACKEND, 8080)],
    )]);
    assert!(programmer.apply(&plan).failures.is_empty());
    let mut run = |flags: u8| {
        let input = frame(
            TO_NODE,
            sock(CLIENT, 40600),
            sock(VIP, 80),
            L4::Tcp {
                flags,
                seq: 1,
                ack: 0,
            },
        );
        assert_eq!(run_pod_ingress(&mut datapath, &input).0, TC_ACT_OK);
    };
    let maps = || PinnedMaps::open(&pins.0).unwrap();
    let flags = || -> Vec<u16> {
        let mut flags: Vec<u16> = maps()
            .conntrack
            .iter()
            .map(|e| e.unwrap().1.flags & dataplane_common::CT_FLAG_CLOSING)
            .collect();
        flags.sort();
        flags
    };
    let connections = || {
        // The only frontend has the first id.
        dataplane_agent::datapath::maps::stats_sum(&maps().service_stats, 1).connections
    };

    run(SYN);
    assert_eq!(flags(), [0, 0], "an open flow: forward and reply entries");
    run(0x11); // FIN, ACK
    let closing = dataplane_common::CT_FLAG_CLOSING;
    assert_eq!(flags(), [closing, closing], "a FIN marks both entries");
    let now = dataplane_agent::inspect::monotonic_ns();
    assert_eq!(programmer.collect_conntrack(now), 0, "not idle yet");

    // The client reuses the tuple: a new connection, not the old one's leftovers.
    run(SYN);
    assert_eq!(flags(), [0, 0], "the SYN opened a fresh flow");
    assert_eq!(connections(), 2);

    run(0x04); // RST
    let seconds = |s: u64| now + s * 1_000_000_000;
    assert_eq!(
        programmer.collect_conntrack(seconds(11)),
        2,
        "a closed flow goes after ten idle seconds"
    );
}
