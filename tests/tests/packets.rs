//! Packet fixtures through BPF_PROG_TEST_RUN: the real program, loaded in the kernel with maps
//! programmed by the agent's own code, run on crafted frames. Each case is
//! {description, input frame, expected output frame, expected verdict}; expected frames are
//! built from scratch (checksums computed here, independently of the datapath), so byte
//! equality proves the incremental checksum updates too.
//!
//! Cases run in order: the reply cases rely on conntrack entries the forward cases created.
//!
//! Each test runs in a network namespace of its own (its thread's), because the datapath
//! forwards translated packets through a FIB lookup in the namespace the test run happens in:
//! with forwarding off there (a new namespace's default), every translated packet goes to the
//! stack (`TC_ACT_OK`), whatever the machine's own routes; the forwarding test adds routes.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use dataplane_agent::{
    datapath::{
        BpffsLayout,
        loader::{LoadedDatapath, MapSizes},
        maps::PinnedMaps,
        programmer::Programmer,
    },
    observe::frame::{IpFields, L4, checksum},
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

/// A fixture frame with the default IPv4 fields (TTL 64, id 0x1234).
fn frame(macs: ([u8; 6], [u8; 6]), src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Vec<u8> {
    dataplane_agent::observe::frame::frame(macs, src, dst, l4, IpFields::default())
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
    dataplane_agent::observe::frame::ipv4_header(
        proto,
        total,
        (src, dst),
        IpFields { ttl, id, flags },
    )
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
    answered_icmp_error([3, 3], 0, EMPTY_VIP, request)
}

/// An ICMP error the datapath answers `original` with (`kind` = [type, code], `mtu` in the
/// next-hop MTU field): from `from` to the original's source, quoting its IP header and
/// first 8 bytes, sent back to the client (IP id 0, don't-fragment, TTL 64).
fn answered_icmp_error(kind: [u8; 2], mtu: u16, from: Ipv4Addr, original: &[u8]) -> Vec<u8> {
    let quoted = &original[14..14 + 28];
    let to = Ipv4Addr::new(original[26], original[27], original[28], original[29]);
    let mut icmp = vec![kind[0], kind[1], 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    let c = checksum(&[&icmp, quoted]);
    icmp[2..4].copy_from_slice(&c);
    let ip = ipv4_header(1, 20 + 8 + 28, from, to, 64, 0, 0x40);
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
            addr: sock(ip, port).into(),
            protocol,
        },
        backends: backends.iter().map(|&b| b.into()).collect(),
        drop_when_empty: false,
        external_local: false,
        internal_backends: None,
        retained: vec![],
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

/// The `web` service's TCP port: 80 to BACKEND:8080.
fn web_tcp() -> Frontend {
    frontend(
        "default/web",
        VIP,
        80,
        Protocol::Tcp,
        &[sock(BACKEND, 8080)],
    )
}

/// The `web` service: TCP 80 to BACKEND:8080, UDP 53 to BACKEND:5353.
fn web_frontends() -> [Frontend; 2] {
    [
        web_tcp(),
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

/// Moves the calling thread (the test's) into a new network namespace with only `lo`, up.
/// BPF_PROG_TEST_RUN runs the program on the loopback device of the caller's namespace, so
/// the FIB the datapath asks is this one. The namespace goes with the thread.
fn isolate_network() {
    // SAFETY: unshare affects only the calling thread's namespaces.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET)"
    );
    ip(&["link", "set", "lo", "up"]);
}

/// Runs `ip ARGS` in the calling thread's network namespace (a child inherits it).
fn ip(args: &[&str]) {
    testbed::ip(args).unwrap();
}

/// The datapath loaded under pins of its own (removed when `Pins` drops, which a tuple
/// binding does last), and the agent's programmer on its maps; the test's thread in a
/// network namespace of its own.
/// `sizes`: (map name, entries) for the maps not at their default size.
fn load(prefix: &str, sizes: &[(&str, u32)]) -> (Pins, LoadedDatapath, Programmer) {
    let sizes: MapSizes = sizes.iter().map(|(m, n)| (m.to_string(), *n)).collect();
    isolate_network();
    let pins = Pins(BpffsLayout::new(
        std::path::Path::new("/sys/fs/bpf").join(testbed::unique(prefix)),
    ));
    let datapath = LoadedDatapath::load(&pins.0, &sizes).unwrap();
    let programmer = Programmer::restore(PinnedMaps::open(&pins.0).unwrap()).unwrap();
    (pins, datapath, programmer)
}

/// [`load`] with the default map sizes, and `frontends` programmed.
fn load_serving(prefix: &str, frontends: Vec<Frontend>) -> (Pins, LoadedDatapath, Programmer) {
    let (pins, datapath, mut programmer) = load(prefix, &[]);
    assert!(programmer.apply(&plan_of(frontends)).failures.is_empty());
    (pins, datapath, programmer)
}

/// Runs `pod_ingress` on `input`: the verdict and the frame it left with.
fn run_pod_ingress(datapath: &mut LoadedDatapath, input: &[u8]) -> (u32, Vec<u8>) {
    run_program(datapath, dataplane_common::PROG_POD_INGRESS, input)
}

/// Runs one of the datapath's programs on `input`: the verdict and the frame it left with.
fn run_program(datapath: &mut LoadedDatapath, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 2048];
    let result = datapath
        .program(program)
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
    let (_pins, mut datapath, mut programmer) = load("dpfix", &[]);
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

    run_cases(&mut datapath, cases());
}

/// Runs each case through `pod_ingress`, in order, and reports every mismatch.
fn run_cases(datapath: &mut LoadedDatapath, cases: impl IntoIterator<Item = Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let (verdict, out) = run_pod_ingress(datapath, &case.input);
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
    let (_pins, mut datapath, mut programmer) = load(
        "dpfull",
        &[
            (dataplane_common::map_names::SERVICES, 8),
            (dataplane_common::map_names::BACKENDS, 5),
        ],
    );
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
    let (pins, mut datapath, mut programmer) = load_serving("dpgc", web_frontends().into());
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
            .v4
            .conntrack
            .keys()
            .filter(|k| k.is_ok())
            .count()
    };
    assert_eq!(entries(), 4, "a forward and a reply entry per flow");
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    assert_eq!(programmer.collect_conntrack(now), 0, "nothing is idle yet");
    let hours = |h: u64| now + h * 3600 * 1_000_000_000;
    assert_eq!(
        programmer.collect_conntrack(hours(1)),
        2,
        "UDP idle for an hour goes, TCP stays"
    );
    assert_eq!(
        programmer.collect_conntrack(hours(25)),
        2,
        "TCP idle past a day (kube-proxy's --conntrack-tcp-timeout-established) goes"
    );
    assert_eq!(entries(), 0);
}

#[test]
fn a_closed_tcp_flow_reopens_on_a_new_syn_and_goes_after_a_short_idle_time() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load_serving("dpfin", vec![web_tcp()]);
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
            .v4
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
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    assert_eq!(programmer.collect_conntrack(now), 0, "not idle yet");
    assert_eq!(
        programmer.collect_conntrack(now + 600 * 1_000_000_000),
        0,
        "a connection closed one way may still carry data the other way: kept for minutes"
    );

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

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// `frame` with another TTL and IP flags byte (0x40: don't fragment), header checksum
/// recomputed from scratch.
fn with_ttl_and_flags(mut f: Vec<u8>, ttl: u8, flags: u8) -> Vec<u8> {
    f[14 + 8] = ttl;
    f[14 + 6] = flags;
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&[&f[14..34]]);
    f[14 + 10..14 + 12].copy_from_slice(&c);
    f
}

/// A UDP datagram from `src` to `dst` (IP id `id`) as two fragments: the first with the UDP
/// header and 16 bytes of `payload` (more-fragments set), the second with the rest at offset
/// 24.
fn udp_fragments(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    (id, ttl): (u16, u8),
) -> [Vec<u8>; 2] {
    let whole = frame(
        TO_NODE,
        src,
        dst,
        L4::Udp {
            payload,
            zero_checksum: false,
        },
    );
    let udp = &whole[34..];
    let (first, rest) = udp.split_at(24);
    let fragment = |data: &[u8], flags_offset: u16| {
        let mut ip = ipv4_header(17, 20 + data.len() as u16, *src.ip(), *dst.ip(), ttl, id, 0);
        ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c);
        [&TO_NODE.0[..], &TO_NODE.1, &[0x08, 0x00], &ip, data].concat()
    };
    [fragment(first, 0x2000), fragment(rest, 3)]
}

/// Translated packets leave through the interface the FIB names (`TC_ACT_REDIRECT`, TTL
/// decremented as a router does), past netfilter; packets this hop cannot forward are
/// answered as a router would, about the packet as the client sent it; fragments of a
/// datagram are translated like its first.
#[test]
fn translated_packets_are_forwarded_by_the_fib_or_answered_as_a_router() {
    require_root!();
    let (_pins, mut datapath, mut programmer) = load("dpfwd", &[]);
    // Backends behind an interface with a small MTU; forwarding on.
    ip(&[
        "link", "add", "fwd0", "mtu", "1280", "type", "veth", "peer", "name", "fwd1",
    ]);
    ip(&["link", "set", "fwd0", "up"]);
    ip(&["link", "set", "fwd1", "up"]);
    ip(&["route", "add", "10.0.0.0/24", "dev", "fwd0"]);
    let out = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        programmer
            .apply(&plan_of(web_frontends().into()))
            .failures
            .is_empty()
    );
    programmer.set_snat(NODE.into(), (61000, 61001)).unwrap();

    let tcp = |flags| L4::Tcp {
        flags,
        seq: 1,
        ack: 0,
    };
    let syn = frame(TO_NODE, sock(CLIENT, 40700), sock(VIP, 80), tcp(SYN));
    let expired = with_ttl_and_flags(
        frame(TO_NODE, sock(CLIENT, 40701), sock(VIP, 80), tcp(SYN)),
        1,
        0x40,
    );
    let big = with_ttl_and_flags(
        frame(
            TO_NODE,
            sock(CLIENT, 40702),
            sock(VIP, 53),
            L4::Udp {
                payload: &[7u8; 1372],
                zero_checksum: false,
            },
        ),
        64,
        0x40,
    );
    let payload: Vec<u8> = (0..40).collect();
    let [first, later] = udp_fragments(sock(CLIENT, 40703), sock(VIP, 53), &payload, (1, 64));
    let [first_out, later_out] =
        udp_fragments(sock(CLIENT, 40703), sock(BACKEND, 5353), &payload, (1, 63));
    let [_, orphan] = udp_fragments(sock(CLIENT, 40704), sock(VIP, 53), &payload, (2, 64));
    let cases = [
        Case {
            description: "a SYN to a ClusterIP goes to its backend through the FIB, TTL - 1",
            expected: with_ttl_and_flags(
                frame(TO_NODE, sock(CLIENT, 40700), sock(BACKEND, 8080), tcp(SYN)),
                63,
                0,
            ),
            input: syn,
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "a packet whose TTL runs out here gets time exceeded about the cluster IP",
            expected: answered_icmp_error([11, 0], 0, NODE, &expired),
            input: expired,
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "a don't-fragment datagram too big for the backend's route gets fragmentation needed",
            expected: answered_icmp_error([3, 4], 1280, NODE, &big),
            input: big,
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "the first fragment of a datagram to a ClusterIP is translated, ports included",
            input: first,
            expected: first_out,
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "its later fragment (no UDP header) is translated by the first one's ports",
            input: later,
            expected: later_out,
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            description: "a later fragment whose first was never seen passes untouched",
            expected: orphan.clone(),
            input: orphan,
            verdict: TC_ACT_OK,
        },
    ];
    run_cases(&mut datapath, cases);
}

/// On external frontends only a TCP SYN opens a flow, and a UDP datagram answering a flow the
/// node itself sent from the frontend's address and port (seen by the egress program) goes to
/// the stack. SNAT ports come from the configured range, each claimed once.
#[test]
fn external_frontends_open_flows_only_for_new_connections_with_ports_from_the_snat_range() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load("dpext", &[]);
    let node_port = |port, protocol, backend| Frontend {
        kind: FrontendKind::NodePort,
        algorithm: Algorithm::Maglev,
        ..frontend("default/web", NODE, port, protocol, &[backend])
    };
    let plan = plan_of(vec![
        node_port(30080, Protocol::Tcp, sock(BACKEND, 8080)),
        node_port(30053, Protocol::Udp, sock(BACKEND, 5353)),
    ]);
    assert!(programmer.apply(&plan).failures.is_empty());
    programmer.set_snat(NODE.into(), (61000, 61001)).unwrap();
    let ingress = dataplane_common::PROG_EXTERNAL_INGRESS;
    let tcp = |flags| L4::Tcp {
        flags,
        seq: 1,
        ack: 1,
    };
    let udp = L4::Udp {
        payload: b"dns",
        zero_checksum: false,
    };

    let ack = frame(TO_NODE, sock(REMOTE, 50000), sock(NODE, 30080), tcp(0x10));
    assert_eq!(
        run_program(&mut datapath, ingress, &ack),
        (TC_ACT_OK, ack.clone()),
        "an ACK with no flow (the node's own connection) passes untouched"
    );
    let syn_ack = frame(
        TO_NODE,
        sock(REMOTE, 50000),
        sock(NODE, 30080),
        tcp(SYN_ACK),
    );
    assert_eq!(
        run_program(&mut datapath, ingress, &syn_ack),
        (TC_ACT_OK, syn_ack.clone()),
        "a SYN-ACK with no flow passes untouched"
    );

    let mut snat_ports = Vec::new();
    for client_port in [50001, 50002] {
        let syn = frame(
            TO_NODE,
            sock(REMOTE, client_port),
            sock(NODE, 30080),
            tcp(SYN),
        );
        let (verdict, out) = run_program(&mut datapath, ingress, &syn);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out[26..30], &NODE.octets(), "SNATed to the node");
        assert_eq!(&out[30..34], &BACKEND.octets());
        snat_ports.push(u16::from_be_bytes([out[34], out[35]]));
    }
    snat_ports.sort();
    assert_eq!(snat_ports, [61000, 61001], "each port of the range, once");
    let syn = frame(TO_NODE, sock(REMOTE, 50003), sock(NODE, 30080), tcp(SYN));
    let (verdict, _) = run_program(&mut datapath, ingress, &syn);
    assert_eq!(verdict, TC_ACT_SHOT, "no SNAT port left");
    let exhausted = PinnedMaps::open(&pins.0)
        .unwrap()
        .drops
        .get(&dataplane_common::drop_reason::SNAT_PORTS_EXHAUSTED, 0)
        .unwrap();
    assert_eq!(exhausted, 1);

    // The node sends from its node port (as a --random-fully SNAT may pick it): the answer is
    // the node's, not a new connection to the service.
    let sent = frame(TO_NODE, sock(NODE, 30053), sock(REMOTE, 53), udp);
    assert_eq!(
        run_program(&mut datapath, dataplane_common::PROG_EXTERNAL_EGRESS, &sent),
        (TC_ACT_OK, sent.clone()),
        "egress never changes a packet"
    );
    let answer = frame(TO_NODE, sock(REMOTE, 53), sock(NODE, 30053), udp);
    assert_eq!(
        run_program(&mut datapath, ingress, &answer),
        (TC_ACT_OK, answer.clone()),
        "the answer to the node's own flow passes untouched"
    );
    let query = frame(TO_NODE, sock(REMOTE, 54), sock(NODE, 30053), udp);
    let (verdict, out) = run_program(&mut datapath, ingress, &query);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        &out[30..34],
        &BACKEND.octets(),
        "another client's datagram is served"
    );
}

/// A flow's two entries live and expire as one: a UDP client that keeps sending keeps the
/// entry its (silent) server's answer needs, for as long as the client sends.
#[test]
fn a_flows_entries_expire_together_by_its_latest_packet() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load("dpct", &[]);
    assert!(
        programmer
            .apply(&plan_of(web_frontends().into()))
            .failures
            .is_empty()
    );
    let query = |port| {
        frame(
            TO_NODE,
            sock(CLIENT, port),
            sock(VIP, 53),
            L4::Udp {
                payload: b"q",
                zero_checksum: false,
            },
        )
    };
    let answer = frame(
        TO_NODE,
        sock(BACKEND, 5353),
        sock(CLIENT, 41000),
        L4::Udp {
            payload: b"a",
            zero_checksum: false,
        },
    );
    run_pod_ingress(&mut datapath, &query(41000));
    run_pod_ingress(&mut datapath, &answer);
    // The server has been silent for 165 s; the client sent just now.
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    let seconds = |s: u64| s * 1_000_000_000;
    let maps = PinnedMaps::open(&pins.0).unwrap();
    let reply_key = dataplane_common::CtKey::new(
        BACKEND.octets(),
        CLIENT.octets(),
        5353,
        41000,
        dataplane_common::IPPROTO_UDP,
    );
    let mut reply = maps.v4.conntrack.get(&reply_key, 0).unwrap();
    reply.last_seen_ns = now - seconds(165);
    let mut conntrack = maps.v4.conntrack;
    conntrack.insert(reply_key, reply, 0).unwrap();
    assert_eq!(
        programmer.collect_conntrack(now),
        0,
        "the client's packets keep both"
    );
    assert_eq!(
        programmer.collect_conntrack(now + seconds(60)),
        0,
        "an answered flow idle for a minute stays (udp-timeout-stream 120 s)"
    );
    assert_eq!(
        programmer.collect_conntrack(now + seconds(121)),
        2,
        "both entries go together"
    );

    // A flow that never saw an answer goes after the shorter UDP timeout.
    run_pod_ingress(&mut datapath, &query(41001));
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    assert_eq!(programmer.collect_conntrack(now + seconds(29)), 0);
    assert_eq!(programmer.collect_conntrack(now + seconds(31)), 2);
}

/// Session affinity returns a remembered backend only while it still takes new connections
/// on the service port: once it left (here: terminating, kept only for its flows), the
/// client's next connection gets a fresh choice, and its open connection stays where it is.
#[test]
fn session_affinity_forgets_a_backend_that_left_the_service() {
    require_root!();
    let (_pins, mut datapath, mut programmer) = load("dpaff", &[]);
    let backends = [sock(BACKEND, 8080), sock(Ipv4Addr::new(10, 0, 0, 3), 8080)];
    let with = |backends: &[SocketAddrV4], retained: &[SocketAddrV4]| {
        plan_of(vec![Frontend {
            affinity_timeout: Some(600),
            retained: retained.iter().map(|&b| b.into()).collect(),
            ..frontend("default/aff", VIP, 80, Protocol::Tcp, backends)
        }])
    };
    assert!(programmer.apply(&with(&backends, &[])).failures.is_empty());
    let (verdict, first) = destination_of(&mut datapath, VIP, 42000);
    assert_eq!(verdict, TC_ACT_OK);
    for port in 42001..42010 {
        assert_eq!(
            destination_of(&mut datapath, VIP, port).1,
            first,
            "affinity: the same backend"
        );
    }
    let (left, stays): (Vec<_>, Vec<_>) = backends.iter().partition(|b| *b.ip() == first);
    assert!(programmer.apply(&with(&stays, &left)).failures.is_empty());
    let (_, next) = destination_of(&mut datapath, VIP, 42010);
    assert_eq!(
        next,
        *stays[0].ip(),
        "a fresh choice, not the backend that left"
    );
    assert_eq!(
        destination_of(&mut datapath, VIP, 42000).1,
        first,
        "the open connection keeps its backend"
    );
}

/// TCP flows and the rest live in separate conntrack tables: a burst of one-shot UDP flows
/// (DNS) several times the size of its table evicts other UDP flows, never an idle TCP
/// connection.
#[test]
fn a_burst_of_udp_flows_does_not_evict_tcp_connections() {
    require_root!();
    let (pins, mut datapath, mut programmer) = load(
        "dpctsplit",
        &[
            (dataplane_common::map_names::CONNTRACK_TCP, 64),
            (dataplane_common::map_names::CONNTRACK_ANY, 64),
        ],
    );
    assert!(
        programmer
            .apply(&plan_of(web_frontends().into()))
            .failures
            .is_empty()
    );
    let (verdict, to) = destination_of(&mut datapath, VIP, 43000);
    assert_eq!((verdict, to), (TC_ACT_OK, BACKEND));
    for port in 0..256u16 {
        let query = frame(
            TO_NODE,
            sock(
                Ipv4Addr::new(10, 0, 2, (port % 250) as u8 + 1),
                20000 + port,
            ),
            sock(VIP, 53),
            L4::Udp {
                payload: b"q",
                zero_checksum: false,
            },
        );
        assert_eq!(run_pod_ingress(&mut datapath, &query).0, TC_ACT_OK);
    }
    let maps = PinnedMaps::open(&pins.0).unwrap();
    let tcp_flow = dataplane_common::CtKey::new(
        CLIENT.octets(),
        VIP.octets(),
        43000,
        80,
        dataplane_common::IPPROTO_TCP,
    );
    assert!(
        maps.v4.conntrack.get(&tcp_flow, 0).is_ok(),
        "the idle TCP connection is still tracked"
    );
    assert!(
        maps.v4.conntrack.any.keys().count() <= 64,
        "UDP stayed in its own table"
    );
}

/// A connection closed both ways goes (with its SNAT port) soon after; one closed one way
/// only is half-closed and stays for the close-wait timeout.
#[test]
fn a_connection_closed_both_ways_goes_soon_and_a_half_closed_one_stays() {
    require_root!();
    let (_pins, mut datapath, mut programmer) = load_serving("dpfin2", vec![web_tcp()]);
    let segment = |from, to, flags| {
        frame(
            TO_NODE,
            from,
            to,
            L4::Tcp {
                flags,
                seq: 1,
                ack: 1,
            },
        )
    };
    let client = sock(CLIENT, 44000);
    for frame in [
        segment(client, sock(VIP, 80), SYN),
        segment(sock(BACKEND, 8080), client, SYN_ACK),
        segment(client, sock(VIP, 80), 0x11), // FIN, ACK
    ] {
        assert_eq!(run_pod_ingress(&mut datapath, &frame).0, TC_ACT_OK);
    }
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    let seconds = |s: u64| now + s * 1_000_000_000;
    assert_eq!(
        programmer.collect_conntrack(seconds(60)),
        0,
        "half-closed: the backend may still be sending"
    );
    let backend_fin = segment(sock(BACKEND, 8080), client, 0x11);
    assert_eq!(run_pod_ingress(&mut datapath, &backend_fin).0, TC_ACT_OK);
    let now = dataplane_agent::observe::inspect::monotonic_ns();
    assert_eq!(
        programmer.collect_conntrack(now + 11 * 1_000_000_000),
        2,
        "closed both ways: gone after ten idle seconds"
    );
}

/// The TCP table is a hash that never evicts: while it is full, new TCP flows go to the LRU
/// overflow (none refused, with or without an agent), their packets are found there both
/// ways, and the agent's collection moves them back once the table has room, then marks the
/// overflow unused.
#[test]
fn a_full_tcp_table_sends_new_flows_to_the_overflow_and_the_agent_moves_them_back() {
    require_root!();
    use dataplane_common::{CtKey, IPPROTO_TCP, drop_reason, map_names};
    const ACK: u8 = 0x10;
    let sizes = [
        (map_names::CONNTRACK_TCP, 4),
        (map_names::CONNTRACK_TCP_OVERFLOW, 64),
    ];
    let (pins, mut datapath, mut programmer) = load("dpctovf", &sizes);
    assert!(
        programmer
            .apply(&plan_of(web_frontends().into()))
            .failures
            .is_empty()
    );
    let mut maps = PinnedMaps::open(&pins.0).unwrap();
    assert!(!maps.v4.conntrack.overflow_in_use());
    // Four flows, two entries each: two fill the table, two go to the overflow.
    for port in 44000..44004u16 {
        assert_eq!(
            destination_of(&mut datapath, VIP, port),
            (TC_ACT_OK, BACKEND)
        );
    }
    assert_eq!(maps.v4.conntrack.tcp.keys().count(), 4, "the table is full");
    assert_eq!(maps.v4.conntrack.tcp_overflow.keys().count(), 4);
    assert!(maps.v4.conntrack.overflow_in_use());
    let failed = maps.drops.get(&drop_reason::CT_INSERT_FAILED, 0).unwrap();
    assert_eq!(failed, 0, "no connection refused");
    assert_eq!(maps.capacities[map_names::CONNTRACK_TCP_OVERFLOW], 64);

    // The last flow's packets, both ways, are found in the overflow.
    let last = CtKey::new(CLIENT.octets(), VIP.octets(), 44003, 80, IPPROTO_TCP);
    assert!(maps.v4.conntrack.tcp_overflow.get(&last, 0).is_ok());
    let tcp = |flags| L4::Tcp {
        flags,
        seq: 2,
        ack: 2,
    };
    let ack = frame(TO_NODE, sock(CLIENT, 44003), sock(VIP, 80), tcp(ACK));
    let (verdict, out) = run_pod_ingress(&mut datapath, &ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Ipv4Addr::new(out[30], out[31], out[32], out[33]), BACKEND);
    assert_eq!(
        maps.v4
            .conntrack
            .tcp_overflow
            .get(&last, 0)
            .unwrap()
            .packets,
        2
    );
    let answer = frame(TO_NODE, sock(BACKEND, 8080), sock(CLIENT, 44003), tcp(ACK));
    let (verdict, out) = run_pod_ingress(&mut datapath, &answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        Ipv4Addr::new(out[26], out[27], out[28], out[29]),
        VIP,
        "the reply is translated back"
    );

    // Room in the table (the first two flows closed and collected): the collection moves
    // the overflow's flows back and marks it unused; the flows keep working from the table.
    let keys: Vec<CtKey> = maps
        .v4
        .conntrack
        .tcp
        .keys()
        .filter_map(Result::ok)
        .collect();
    for key in &keys {
        maps.v4.conntrack.tcp.remove(key).unwrap();
    }
    programmer.collect_conntrack(dataplane_agent::observe::inspect::monotonic_ns());
    assert_eq!(maps.v4.conntrack.tcp.keys().count(), 4);
    assert_eq!(maps.v4.conntrack.tcp_overflow.keys().count(), 0);
    assert!(!maps.v4.conntrack.overflow_in_use());
    let (verdict, out) = run_pod_ingress(&mut datapath, &ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Ipv4Addr::new(out[30], out[31], out[32], out[33]), BACKEND);
    assert_eq!(maps.v4.conntrack.tcp.get(&last, 0).unwrap().packets, 3);
}

// IPv6 fixtures: frames built here from scratch (checksums over the IPv6 pseudo-header
// computed independently of the datapath), run through `pod_ingress`.

const CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const BACKEND6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 2);
const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const ROUTER6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const EMPTY_VIP6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);

/// An IPv6 fixture frame (`observe::frame::frame6`: hop limit 64, checksums computed).
fn frame6(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): (std::net::Ipv6Addr, u16),
    (dst, dport): (std::net::Ipv6Addr, u16),
    extensions: &[u8],
    l4: L4,
) -> Vec<u8> {
    use std::net::SocketAddrV6;
    dataplane_agent::observe::frame::frame6(
        macs,
        SocketAddrV6::new(src, sport, 0, 0),
        SocketAddrV6::new(dst, dport, 0, 0),
        extensions,
        l4,
    )
}

/// An ICMPv6 error (`kind` = [type, code], `word` its second 32-bit word: the MTU of a
/// packet too big) from `src` to `dst` quoting `quoted`, hop limit 64.
fn icmp6_error(
    (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr),
    kind: [u8; 2],
    word: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind[0], kind[1], 0, 0];
    icmp.extend_from_slice(&word.to_be_bytes());
    let len = (icmp.len() + quoted.len()) as u32;
    let pseudo = [
        &src.octets()[..],
        &dst.octets(),
        &len.to_be_bytes(),
        &[0, 0, 0, 58],
    ]
    .concat();
    let c = checksum(&[&pseudo, &icmp, quoted]);
    icmp[2..4].copy_from_slice(&c);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(len as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    [
        &TO_NODE.0[..],
        &TO_NODE.1,
        &[0x86, 0xdd],
        &ip,
        &icmp,
        quoted,
    ]
    .concat()
}

/// The first 48 bytes of an IPv6 frame's packet (header and 8 bytes), as an ICMPv6 error
/// quotes them, with its addresses and ports replaced (the quoted L4 checksum left alone).
fn quote6(
    frame: &[u8],
    (src, sport): (std::net::Ipv6Addr, u16),
    (dst, dport): (std::net::Ipv6Addr, u16),
) -> Vec<u8> {
    let mut q = frame[14..14 + 48].to_vec();
    q[8..24].copy_from_slice(&src.octets());
    q[24..40].copy_from_slice(&dst.octets());
    q[40..42].copy_from_slice(&sport.to_be_bytes());
    q[42..44].copy_from_slice(&dport.to_be_bytes());
    q
}

/// A hop-by-hop options header (8 bytes: PadN) followed by `next`.
fn hop_by_hop(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn frontend6(
    ip: std::net::Ipv6Addr,
    port: u16,
    protocol: Protocol,
    backends: &[(std::net::Ipv6Addr, u16)],
) -> Frontend {
    Frontend {
        frontend: FrontendAddr {
            addr: std::net::SocketAddr::new(ip.into(), port),
            protocol,
        },
        backends: backends
            .iter()
            .map(|&(ip, port)| std::net::SocketAddr::new(ip.into(), port))
            .collect(),
        ..frontend("default/web6", VIP, port, protocol, &[])
    }
}

#[test]
fn ipv6_packet_fixtures_through_bpf_prog_test_run() {
    require_root!();
    let (_pins, mut datapath, mut programmer) = load("dpfix6", &[]);
    let plan = plan_of(vec![
        frontend6(VIP6, 80, Protocol::Tcp, &[(BACKEND6, 8080)]),
        frontend6(VIP6, 53, Protocol::Udp, &[(BACKEND6, 5353)]),
        frontend6(EMPTY_VIP6, 80, Protocol::Tcp, &[]),
        frontend6(EMPTY_VIP6, 53, Protocol::Udp, &[]),
    ]);
    let report = programmer.apply(&plan);
    assert!(report.failures.is_empty(), "{:?}", report.failures);

    let tcp = |flags, seq, ack| L4::Tcp { flags, seq, ack };
    let udp = |payload: &'static [u8]| L4::Udp {
        payload,
        zero_checksum: false,
    };
    let syn_to_empty = frame6(
        TO_NODE,
        (CLIENT6, 41000),
        (EMPTY_VIP6, 80),
        &[],
        tcp(SYN, 7000, 0),
    );
    let udp_to_empty = frame6(
        TO_NODE,
        (CLIENT6, 41001),
        (EMPTY_VIP6, 53),
        &[],
        udp(b"query"),
    );
    // The reset: from the frontend, RST|ACK acknowledging the SYN (RFC 9293 3.10.7.1), window
    // 0; IPv6 hop limit 64.
    let mut reset = frame6(
        TO_CLIENT,
        (EMPTY_VIP6, 80),
        (CLIENT6, 41000),
        &[],
        tcp(RST_ACK, 0, 7001),
    );
    reset[14 + 40 + 14..14 + 40 + 16].copy_from_slice(&[0, 0]);
    reset[14 + 40 + 16..14 + 40 + 18].copy_from_slice(&[0, 0]);
    let pseudo = [
        &EMPTY_VIP6.octets()[..],
        &CLIENT6.octets(),
        &20u32.to_be_bytes(),
        &[0, 0, 0, 6],
    ]
    .concat();
    let c = checksum(&[&pseudo, &reset[54..74]]);
    reset[70..72].copy_from_slice(&c);
    // ICMPv6 port unreachable from the frontend, quoting the datagram's first 48 bytes.
    let quoted = &udp_to_empty[14..14 + 48];
    let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
    let icmp_len = (8 + quoted.len()) as u32;
    let pseudo = [
        &EMPTY_VIP6.octets()[..],
        &CLIENT6.octets(),
        &icmp_len.to_be_bytes(),
        &[0, 0, 0, 58],
    ]
    .concat();
    let c = checksum(&[&pseudo, &icmp, quoted]);
    icmp[2..4].copy_from_slice(&c);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(icmp_len as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 64]);
    ip.extend_from_slice(&EMPTY_VIP6.octets());
    ip.extend_from_slice(&CLIENT6.octets());
    let unreachable = [
        &CLIENT_MAC[..],
        &NODE_MAC,
        &[0x86, 0xdd],
        &ip,
        &icmp,
        quoted,
    ]
    .concat();
    let udp_query6 = frame6(TO_NODE, (CLIENT6, 40001), (VIP6, 53), &[], udp(b"query"));
    // Neighbour solicitation for the VIP: ICMPv6, never touched.
    let mut ns = frame6(TO_NODE, (CLIENT6, 0), (VIP6, 0), &[], udp(b""));
    ns[14 + 6] = 58;

    run_cases(
        &mut datapath,
        [
            Case {
                description: "IPv6: TCP SYN to a ClusterIP is sent to the backend",
                input: frame6(
                    TO_NODE,
                    (CLIENT6, 40000),
                    (VIP6, 80),
                    &[],
                    tcp(SYN, 1000, 0),
                ),
                expected: frame6(
                    TO_NODE,
                    (CLIENT6, 40000),
                    (BACKEND6, 8080),
                    &[],
                    tcp(SYN, 1000, 0),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: the backend's SYN-ACK comes back from the ClusterIP",
                input: frame6(
                    TO_NODE,
                    (BACKEND6, 8080),
                    (CLIENT6, 40000),
                    &[],
                    tcp(SYN_ACK, 5000, 1001),
                ),
                expected: frame6(
                    TO_NODE,
                    (VIP6, 80),
                    (CLIENT6, 40000),
                    &[],
                    tcp(SYN_ACK, 5000, 1001),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: UDP to a ClusterIP is sent to the backend",
                input: frame6(TO_NODE, (CLIENT6, 40001), (VIP6, 53), &[], udp(b"query")),
                expected: frame6(
                    TO_NODE,
                    (CLIENT6, 40001),
                    (BACKEND6, 5353),
                    &[],
                    udp(b"query"),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: the UDP answer comes back from the ClusterIP",
                input: frame6(
                    TO_NODE,
                    (BACKEND6, 5353),
                    (CLIENT6, 40001),
                    &[],
                    udp(b"answer"),
                ),
                expected: frame6(TO_NODE, (VIP6, 53), (CLIENT6, 40001), &[], udp(b"answer")),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: a backend's port unreachable reaches the client about the cluster IP",
                input: icmp6_error(
                    (BACKEND6, CLIENT6),
                    [1, 4],
                    0,
                    &quote6(&udp_query6, (CLIENT6, 40001), (BACKEND6, 5353)),
                ),
                expected: icmp6_error(
                    (VIP6, CLIENT6),
                    [1, 4],
                    0,
                    &quote6(&udp_query6, (CLIENT6, 40001), (VIP6, 53)),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: packet too big about a reply reaches the backend about its own packet",
                input: icmp6_error(
                    (ROUTER6, VIP6),
                    [2, 0],
                    1280,
                    &quote6(&udp_query6, (VIP6, 53), (CLIENT6, 40001)),
                ),
                expected: icmp6_error(
                    (ROUTER6, BACKEND6),
                    [2, 0],
                    1280,
                    &quote6(&udp_query6, (BACKEND6, 5353), (CLIENT6, 40001)),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: UDP behind a hop-by-hop header is translated, the header kept",
                input: frame6(
                    TO_NODE,
                    (CLIENT6, 40002),
                    (VIP6, 53),
                    &hop_by_hop(17),
                    udp(b"q"),
                ),
                expected: frame6(
                    TO_NODE,
                    (CLIENT6, 40002),
                    (BACKEND6, 5353),
                    &hop_by_hop(17),
                    udp(b"q"),
                ),
                verdict: TC_ACT_OK,
            },
            Case {
                description: "IPv6: a SYN to a service without endpoints is answered with a reset",
                input: syn_to_empty,
                expected: reset,
                verdict: TC_ACT_REDIRECT,
            },
            Case {
                description: "IPv6: UDP to a service without endpoints gets ICMPv6 port unreachable",
                input: udp_to_empty.clone(),
                expected: unreachable,
                verdict: TC_ACT_REDIRECT,
            },
            Case {
                description: "IPv6: ICMPv6 (neighbour discovery) passes untouched",
                expected: ns.clone(),
                input: ns,
                verdict: TC_ACT_OK,
            },
        ],
    );
}
