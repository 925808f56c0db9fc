//! ClusterIP end to end: real pods (namespaces), real servers and clients, the real agent
//! and datapath. Run as root; skipped (with a message) otherwise.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use testbed::{
    Agent, Node, Wiring, http_requests,
    manifests::{DNS, HTTP, service},
    require_root, tally, udp_request, wait_until,
};

const VIP: &str = "10.96.0.10";

/// A node with a client pod and three web pods serving HTTP on 8080 and UDP on 5353.
struct Cluster {
    agent: Agent,
    node: Node,
}

impl Cluster {
    fn new(wiring: Wiring, subnet: [u8; 3]) -> Self {
        let mut node = Node::new(wiring, subnet).unwrap();
        node.add_pod("client").unwrap();
        for i in 0..3 {
            let index = node.add_pod(&format!("web-{i}")).unwrap();
            node.pods[index].serve(8080, 5353).unwrap();
        }
        let agent = Agent::start(&node, "node-a").unwrap();
        Self { agent, node }
    }

    /// A routed node in 10.244.`subnet`.0/24 with the first `serving` web pods published and
    /// programmed; and every web pod's address.
    fn routed(subnet: u8, serving: usize) -> (Self, Vec<Ipv4Addr>) {
        let cluster = Self::new(Wiring::Routed, [10, 244, subnet]);
        let ips = cluster.web_ips();
        cluster.publish_and_wait(&ips[..serving]);
        (cluster, ips)
    }

    fn client(&self) -> &testbed::Netns {
        &self.node.pods[0].netns
    }

    fn web_ips(&self) -> Vec<Ipv4Addr> {
        self.node.pods[1..].iter().map(|p| p.ip).collect()
    }

    /// Packets the node transmitted into the web pods through the host ends of their veths.
    fn transmitted_to_web_pods(&self) -> u64 {
        self.node.pods[1..]
            .iter()
            .map(|p| self.node.netns.tx_packets(&p.host_if).unwrap())
            .sum()
    }

    fn publish_web(&self, endpoints: &[Ipv4Addr]) {
        self.agent
            .write_manifest("web.yaml", &service("web", VIP, &[HTTP, DNS], endpoints))
            .unwrap();
    }

    /// Publishes `endpoints` and waits until both service ports have them as backends.
    fn publish_and_wait(&self, endpoints: &[Ipv4Addr]) {
        self.publish_web(endpoints);
        for port in [80, 53] {
            self.agent
                .wait_for_backends(&format!("{VIP}:{port}"), endpoints.len())
                .unwrap();
        }
    }

    /// A TCP connection from the client pod to the service's port 80, open with half a
    /// request sent, until `HeldConnection::finish`.
    fn hold_connection(&self) -> HeldConnection {
        let go = self.agent.manifests.parent().unwrap().join("go");
        let mut child = self
            .client()
            .command("python3")
            .args(["-c", HOLD, VIP, "80", go.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert_eq!(line.trim(), "open");
        HeldConnection { child, stdout, go }
    }
}

struct HeldConnection {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    go: std::path::PathBuf,
}

impl HeldConnection {
    /// Sends the rest of the request: "data", "reset", "closed" or "timeout", and the seconds
    /// the answer took.
    fn finish(mut self) -> String {
        std::fs::write(&self.go, "").unwrap();
        let mut outcome = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut outcome).unwrap();
        outcome
    }
}

impl Drop for HeldConnection {
    /// Also when a test fails before `finish`: no client left behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spreads_over_every_backend(wiring: Wiring, subnet: [u8; 3], requests: usize) {
    let cluster = Cluster::new(wiring, subnet);
    // A broken file next to the good one must not stop anything.
    cluster
        .agent
        .write_manifest("broken.yaml", "kind: Service\nmetadata: [unclosed\n")
        .unwrap();
    let bad_ip = service("badip", "10.96.0.300", &[HTTP], &[]);
    cluster.agent.write_manifest("badip.yaml", &bad_ip).unwrap();
    cluster.publish_and_wait(&cluster.web_ips());

    let transmitted_before = cluster.transmitted_to_web_pods();
    let answers = http_requests(cluster.client(), &format!("http://{VIP}/"), requests);
    let transmitted = cluster.transmitted_to_web_pods() - transmitted_before;
    let (by_backend, peers) = tally(&answers);
    assert_eq!(by_backend.len(), 3, "every backend answers: {by_backend:?}");
    for (backend, count) in &by_backend {
        assert!(
            *count * 100 >= requests * 15,
            "{backend} got {count} of {requests}: {by_backend:?}"
        );
    }
    // No SNAT for pod-to-service traffic: backends see the client pod's own address.
    let client_ip = cluster.node.pods[0].ip.to_string();
    assert!(
        peers.iter().all(|p| *p == client_ip),
        "backends saw {peers:?}, not {client_ip}"
    );
    // Each request sends the backend at least four packets (SYN, ACK, request, FIN). Routed
    // pods' veths lead straight into the pods: translated packets enter them without the
    // host end transmitting (only the odd ARP does). A bridge is no veth: the FIB names it,
    // and packets leave through the neighbour output, bridge and veth, as before.
    match wiring {
        Wiring::Routed => assert!(
            transmitted < requests as u64 / 10,
            "{transmitted} packets went through the host ends of the veths for {requests} requests"
        ),
        Wiring::Bridged => assert!(
            transmitted >= 4 * requests as u64,
            "{transmitted} packets through the bridged veths for {requests} requests"
        ),
    }
    let log = cluster.agent.log_text();
    assert!(
        log.contains("badip.yaml")
            && log.contains("Service default/badip")
            && log.contains("not an IP"),
        "the invalid service is named with its file: {log}"
    );
    assert!(
        cluster.agent.log_text().contains("broken.yaml"),
        "the bad file is named in the log"
    );
}

#[test]
fn routed_pods_reach_every_backend_with_their_own_address() {
    require_root!();
    spreads_over_every_backend(Wiring::Routed, [10, 244, 1], 300);
}

#[test]
fn bridged_pods_reach_every_backend_with_their_own_address() {
    require_root!();
    spreads_over_every_backend(Wiring::Bridged, [10, 244, 2], 300);
}

#[test]
fn udp_request_response_and_exact_flow_counters() {
    require_root!();
    let (cluster, _) = Cluster::routed(3, 3);

    // Ten datagrams from one source port: one flow, one backend.
    let mut reply_bytes = 0;
    let mut backends = std::collections::BTreeSet::new();
    for i in 0..10 {
        let payload = format!("ping-{i}");
        let answer = udp_request(
            cluster.client(),
            &format!("{VIP}:53"),
            Some(40000),
            &payload,
        )
        .unwrap();
        assert!(answer.ends_with(&payload), "{answer}");
        backends.insert(answer.split_whitespace().next().unwrap().to_string());
        reply_bytes += 28 + answer.len() as u64;
    }
    assert_eq!(
        backends.len(),
        1,
        "conntrack keeps the flow on one backend: {backends:?}"
    );

    let flows = cluster.agent.cli_json(&["flows"]).unwrap();
    let client = format!("{}:40000", cluster.node.pods[0].ip);
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["client"] == client.as_str() && f["frontend"] == "10.96.0.10:53")
        .unwrap_or_else(|| panic!("no flow for {client} in {flows:#}"));
    assert_eq!(flow["protocol"], "UDP");
    assert_eq!(flow["to_backend"]["packets"], 10);
    assert_eq!(flow["to_backend"]["bytes"], 10 * (28 + 6));
    assert_eq!(flow["to_client"]["packets"], 10);
    assert_eq!(flow["to_client"]["bytes"], reply_bytes);
    assert!(flow["backend"].as_str().unwrap().ends_with(":5353"));

    // TCP: every request is its own connection and its own flow entry.
    let before = cluster
        .agent
        .cli_json(&["flows"])
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let answers = http_requests(cluster.client(), &format!("http://{VIP}/"), 20);
    let body_bytes: u64 = answers
        .iter()
        .map(|a| a.as_ref().unwrap().len() as u64 + 1)
        .sum();
    let flows = cluster.agent.cli_json(&["flows"]).unwrap();
    let tcp: Vec<_> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["frontend"] == "10.96.0.10:80")
        .collect();
    assert_eq!(tcp.len(), 20, "{} flows before", before);
    for f in &tcp {
        // SYN, ACK, request, ACK(s), FIN, ACK: at least 4 packets each way.
        assert!(f["to_backend"]["packets"].as_u64().unwrap() >= 4, "{f}");
        assert!(f["to_client"]["packets"].as_u64().unwrap() >= 4, "{f}");
    }
    let to_client: u64 = tcp
        .iter()
        .map(|f| f["to_client"]["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        to_client > body_bytes,
        "{to_client} bytes counted for {body_bytes} bytes of bodies"
    );
    let services = cluster.agent.cli_json(&["services"]).unwrap();
    let http = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "10.96.0.10:80")
        .unwrap();
    assert_eq!(http["connections"], 20);
    let per_backend: u64 = http["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(per_backend, 20);
}

#[test]
fn endpoint_changes_reach_new_connections_within_a_second() {
    require_root!();
    let (cluster, ips) = Cluster::routed(4, 3);

    // Remove web-2.
    let changed = Instant::now();
    cluster.publish_and_wait(&ips[..2]);
    let programmed = changed.elapsed();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(changed.elapsed()));
    let (by_backend, _) = tally(&http_requests(
        cluster.client(),
        &format!("http://{VIP}/"),
        60,
    ));
    assert!(
        !by_backend.contains_key("web-2"),
        "removed endpoint still chosen: {by_backend:?}"
    );
    assert!(
        programmed < Duration::from_secs(1),
        "removal took {programmed:?} to reach the maps"
    );

    // Bring it back.
    let changed = Instant::now();
    cluster.publish_and_wait(&ips);
    assert!(
        changed.elapsed() < Duration::from_secs(1),
        "addition took {:?}",
        changed.elapsed()
    );
    let (by_backend, _) = tally(&http_requests(
        cluster.client(),
        &format!("http://{VIP}/"),
        90,
    ));
    assert!(
        by_backend.contains_key("web-2"),
        "added endpoint never chosen: {by_backend:?}"
    );

    // A pod that appears after the agent started: its veth is attached as it shows up.
    let mut cluster = cluster;
    let index = cluster.node.add_pod("web-3").unwrap();
    cluster.node.pods[index].serve(8080, 5353).unwrap();
    let link = cluster
        .agent
        .bpffs_dir
        .join("links")
        .join(&cluster.node.pods[index].host_if);
    wait_until(Duration::from_secs(2), || link.exists()).expect("new pod interface attached");
    let mut all = ips.clone();
    all.push(cluster.node.pods[index].ip);
    cluster.publish_and_wait(&all);
    let (by_backend, _) = tally(&http_requests(
        cluster.client(),
        &format!("http://{VIP}/"),
        120,
    ));
    assert!(
        by_backend.contains_key("web-3"),
        "new pod never answered: {by_backend:?}"
    );
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    require_root!();
    for (wiring, subnet) in [
        (Wiring::Routed, [10, 244, 5]),
        (Wiring::Bridged, [10, 244, 6]),
    ] {
        let cluster = Cluster::new(wiring, subnet);
        let web0 = &cluster.node.pods[1];
        cluster
            .agent
            .write_manifest(
                "self.yaml",
                &service("self", "10.96.0.30", &[HTTP], &[web0.ip]),
            )
            .unwrap();
        cluster.agent.wait_for_backends("10.96.0.30:80", 1).unwrap();
        let answers = http_requests(&web0.netns, "http://10.96.0.30/", 5);
        let (by_backend, peers) = tally(&answers);
        assert_eq!(by_backend.get("web-0"), Some(&5), "{wiring:?}: {answers:?}");
        // The pod cannot accept its own address as a source; the datapath substitutes one.
        assert!(
            peers.iter().all(|p| p == "169.254.42.1"),
            "{wiring:?}: {peers:?}"
        );
    }
}

/// Connects (TCP) or sends and waits for an answer (UDP) from `client`; prints the outcome
/// and the seconds it took, measured inside the namespace.
const PROBE: &str = r#"
import socket, sys, time
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(3)
t = time.monotonic()
try:
    s.connect((host, port))
    if proto == "udp":
        s.send(b"hello")
        s.recv(100)
    print("connected", time.monotonic() - t)
except ConnectionRefusedError:
    print("refused", time.monotonic() - t)
except socket.timeout:
    print("timeout", time.monotonic() - t)
"#;

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    require_root!();
    let cluster = Cluster::new(Wiring::Routed, [10, 244, 7]);
    cluster
        .agent
        .write_manifest(
            "empty.yaml",
            &service("empty", "10.96.0.20", &[HTTP, DNS], &[]),
        )
        .unwrap();
    cluster.agent.wait_for_backends("10.96.0.20:80", 0).unwrap();
    for (proto, port) in [("tcp", "80"), ("udp", "53")] {
        let out = cluster
            .client()
            .run("python3", &["-c", PROBE, proto, "10.96.0.20", port])
            .unwrap();
        let mut words = out.split_whitespace();
        assert_eq!(words.next(), Some("refused"), "{proto}: {out}");
        let seconds: f64 = words.next().unwrap().parse().unwrap();
        assert!(seconds < 0.1, "{proto}: refusal took {seconds} s");
    }
    let drops = cluster.agent.cli(&["services"]).unwrap();
    assert!(drops.contains("10.96.0.20:80"));
}

/// Holds a TCP connection open with half a request, sends the rest when `go` exists, and
/// prints what came back.
const HOLD: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)
s.sendall(b"GET / HTTP/1.0\r\n")
print("open", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
s.settimeout(3)
t = time.monotonic()
try:
    s.sendall(b"\r\n")
    data = s.recv(1000)
    while data and (more := s.recv(1000)):
        data += more
    body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    print("data" if data else "closed", time.monotonic() - t, body)
except ConnectionResetError:
    print("reset", time.monotonic() - t)
except socket.timeout:
    print("timeout", time.monotonic() - t)
"#;

/// kube-proxy's contract for an endpoint gone from every slice: its UDP flows move (kube-proxy
/// flushes their conntrack entries), its TCP connections are left alone (the pod may still be
/// draining them).
#[test]
fn udp_flows_leave_a_backend_that_disappears_and_tcp_connections_stay() {
    require_root!();
    let (cluster, ips) = Cluster::routed(8, 2);

    // UDP: the same flow moves to the remaining backend on its next datagram.
    let first = udp_request(cluster.client(), &format!("{VIP}:53"), Some(40001), "one").unwrap();
    let chosen = first.split_whitespace().next().unwrap().to_string();
    let (keep, _) = if chosen == "web-0" {
        (ips[1], ips[0])
    } else {
        (ips[0], ips[1])
    };
    cluster.publish_and_wait(&[keep]);
    let second = udp_request(cluster.client(), &format!("{VIP}:53"), Some(40001), "two").unwrap();
    assert_ne!(
        second.split_whitespace().next().unwrap(),
        chosen,
        "{first} then {second}"
    );

    // TCP: a connection whose backend is gone keeps going to it (the pod still runs here).
    cluster.publish_and_wait(&[ips[2]]);
    let held = cluster.hold_connection();
    cluster.publish_and_wait(&ips[..1]);
    wait_until(Duration::from_secs(5), || {
        cluster
            .agent
            .cli_json(&["services"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["frontend"] == "10.96.0.10:80"
                    && s["backends"][0]["address"] == format!("{}:8080", ips[0]).as_str()
            })
    })
    .unwrap();
    let outcome = held.finish();
    assert!(outcome.starts_with("data"), "{outcome}");
    assert!(
        outcome.contains("web-2"),
        "answered by the old backend: {outcome}"
    );
}

/// One HTTP/1.0 GET from a fixed local port; prints the body.
const GET_FROM_PORT: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode(), end="")
"#;

#[test]
fn a_closed_service_flow_does_not_capture_a_direct_connection_from_its_port() {
    require_root!();
    let (cluster, ips) = Cluster::routed(12, 1);
    // SO_REUSEADDR: whichever side closed first, the port is free for another destination.
    let get_from_port = |ip: &str, port: &str| {
        cluster
            .client()
            .run("python3", &["-c", GET_FROM_PORT, ip, port, "41000"])
    };

    let via_service = get_from_port(VIP, "80").unwrap();
    assert!(via_service.starts_with("web-0"), "{via_service}");
    let client = format!("{}:41000", cluster.node.pods[0].ip);
    wait_until(Duration::from_secs(3), || {
        let flows = cluster.agent.cli_json(&["flows"]).unwrap();
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == client.as_str() && f["closing"] == true)
    })
    .unwrap_or_else(|e| {
        let flows = cluster.agent.cli_json(&["flows"]).unwrap();
        panic!("the finished connection shows as closing in `flows` ({e}): {flows:#}")
    });

    // Same client port, straight to the pod: its answer must not be turned into the
    // service's (the client would reset it).
    let direct = get_from_port(&ips[0].to_string(), "8080")
        .expect("a direct connection from the service flow's client port");
    assert!(direct.starts_with("web-0"), "{direct}");
    let flows = cluster.agent.cli_json(&["flows"]).unwrap();
    assert!(
        !flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == client.as_str()),
        "the closed flow's entries are gone: {flows:#}"
    );
}

#[test]
fn every_map_prints_named_fields_in_bpftool() {
    require_root!();
    let (cluster, _) = Cluster::routed(9, 3);
    http_requests(cluster.client(), &format!("http://{VIP}/"), 3);
    let expected_fields: &[(&str, &[&str])] = &[
        (
            "dp_svc_v2",
            &["backend_slot", "rev_nat_id", "count", "service_port_id"],
        ),
        ("dp_backends_v2", &["addr", "port", "state"]),
        (
            "dp_ct_tcp_v4",
            &["saddr", "proto", "packets", "flags", "nat_addr"],
        ),
        ("dp_ct_ovf_v4", &[]),
        ("dp_ct_ovfon_v1", &["\"value\": 0"]),
        ("dp_ct_any_v3", &[]),
        ("dp_svc_stats_v2", &["packets", "bytes", "connections"]),
        ("dp_be_stats_v2", &["packets", "bytes", "connections"]),
        ("dp_drops_v1", &["\"value\": 0"]),
        ("dp_affinity_v1", &[]),
        ("dp_srcrange_v1", &[]),
        ("dp_maglev_v1", &[]),
        (
            "dp_config_v1",
            &["snat_addr", "snat_port_min", "snat_port_max"],
        ),
        ("dp_names_v1", &["service", "port", "kind"]),
        // Filled by fragmented datagrams and by the node's own UDP flows from a frontend.
        ("dp_frag_v1", &[]),
        ("dp_hostflow_v1", &[]),
        // Filled by the node's own sockets (none in this test): the mode is always written.
        ("dp_sock_v1", &[]),
        ("dp_sockcfg_v1", &["mode", "netns_cookie"]),
        ("dp_svc_sock_v1", &[]),
        ("dp_be_sock_v1", &[]),
        // The pods' veths (this cluster's pods are all behind one).
        ("dp_podif_v1", &["key", "value"]),
        // IPv6 (an IPv4-only cluster here): the arrays print their zeroed fields.
        ("dp_svc6_v1", &[]),
        ("dp_be6_v1", &["addr", "port", "state"]),
        ("dp_ct6_tcp_v1", &[]),
        ("dp_ct6_ovf_v1", &[]),
        ("dp_ct6_ovfon_v1", &["\"value\": 0"]),
        ("dp_ct6_any_v1", &[]),
        ("dp_aff6_v1", &[]),
        ("dp_srcrange6_v1", &[]),
        ("dp_config6_v1", &["snat_addr"]),
        ("dp_frag6_v1", &[]),
        ("dp_hostflow6_v1", &[]),
        ("dp_sock6_v1", &[]),
    ];
    for name in dataplane_common::map_names::ALL {
        let path = cluster.agent.bpffs_dir.join(name);
        let out = std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (_, fields) = expected_fields
            .iter()
            .find(|(n, _)| *n == name)
            .expect("every map is listed");
        for field in *fields {
            assert!(
                text.contains(field),
                "{name} dump lacks {field}: {}",
                &text[..text.len().min(400)]
            );
        }
        assert!(
            !text.contains("\"0x"),
            "{name} printed raw bytes, not BTF fields"
        );
    }
}

#[test]
fn stopping_the_agent_keeps_traffic_and_cleanup_removes_everything() {
    require_root!();
    let (mut cluster, _) = Cluster::routed(10, 3);
    cluster.agent.stop();
    let answers = http_requests(cluster.client(), &format!("http://{VIP}/"), 10);
    assert!(
        answers.iter().all(|a| a.is_ok()),
        "traffic stopped with the agent: {answers:?}"
    );
    // The CLI reads the pins while the agent is stopped.
    assert!(
        cluster
            .agent
            .cli(&["services"])
            .unwrap()
            .contains("10.96.0.10:80")
    );

    // One tcx link per pod interface runs the pinned program; cleanup detaches them all.
    let program = cluster.agent.bpffs_dir.join("pod_ingress");
    let prog_id =
        bpftool_json(&["prog", "show", "pinned", program.to_str().unwrap()])["id"].clone();
    let links_running = || {
        let links = bpftool_json(&["link", "show"]);
        links
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["prog_id"] == prog_id)
            .count()
    };
    assert_eq!(links_running(), cluster.node.pods.len());
    cluster.agent.cli(&["cleanup"]).unwrap();
    assert!(!cluster.agent.bpffs_dir.exists(), "pins left behind");
    assert_eq!(links_running(), 0, "program still attached after cleanup");
    let answers = http_requests(cluster.client(), &format!("http://{VIP}/"), 1);
    assert!(
        answers[0].is_err(),
        "the service still answers after cleanup"
    );
}

#[test]
fn upgrading_from_conntrack_v1_keeps_open_connections() {
    upgrading_keeps_open_connections("dp_ct_v1", true, 13);
}

#[test]
fn upgrading_from_conntrack_v2_keeps_open_connections() {
    upgrading_keeps_open_connections("dp_ct_v2", false, 15);
}

/// v3: TCP flows in an LRU hash of their own (same key and value as today's tables).
#[test]
fn upgrading_from_conntrack_tcp_v3_keeps_open_connections() {
    upgrading_keeps_open_connections("dp_ct_tcp_v3", false, 16);
}

/// An agent upgraded from a release whose conntrack map was `old` (with the direction byte
/// in its keys when `direction_in_key`) moves the flows and keeps a held connection.
fn upgrading_keeps_open_connections(old: &str, direction_in_key: bool, subnet: u8) {
    require_root!();
    let (mut cluster, _) = Cluster::routed(subnet, 3);
    let held = cluster.hold_connection();
    let before = cluster.agent.cli_json(&["flows"]).unwrap();
    assert_eq!(before.as_array().unwrap().len(), 1, "{before:#}");

    // What the previous release left behind: its conntrack map (v1: direction byte at key
    // offset 13, no reply flag), and nothing in the current tables.
    cluster.agent.stop();
    let v1 = cluster.agent.bpffs_dir.join(old);
    let v2 = cluster
        .agent
        .bpffs_dir
        .join(dataplane_common::map_names::CONNTRACK_TCP);
    let (v1, v2) = (v1.to_str().unwrap(), v2.to_str().unwrap());
    bpftool(&[
        "map", "create", v1, "type", "lru_hash", "key", "16", "value", "56", "entries", "1024",
        "name", old,
    ]);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    for entry in bpftool_json(&["map", "dump", "pinned", v2])
        .as_array()
        .unwrap()
    {
        let bytes = |field: &str| -> Vec<u8> {
            entry[field]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect()
        };
        let (mut key, mut value) = (bytes("key"), bytes("value"));
        if direction_in_key {
            let flags = u16::from_le_bytes([value[46], value[47]]);
            key[13] = u8::from(flags & dataplane_common::CT_FLAG_REPLY != 0);
            value[46..48]
                .copy_from_slice(&(flags & !dataplane_common::CT_FLAG_REPLY).to_le_bytes());
        }
        let mut args = vec![
            "map".to_string(),
            "update".into(),
            "pinned".into(),
            v1.into(),
            "key".into(),
            "hex".into(),
        ];
        args.extend(hex(&key));
        args.extend(["value".into(), "hex".into()]);
        args.extend(hex(&value));
        bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut args = vec![
            "map".to_string(),
            "delete".into(),
            "pinned".into(),
            v2.into(),
            "key".into(),
            "hex".into(),
        ];
        args.extend(hex(&bytes("key")));
        bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    cluster.agent.restart().unwrap();
    let moved = |log: &str| {
        log.lines()
            .any(|l| l.contains("old table removed") && l.contains(old))
    };
    wait_until(Duration::from_secs(5), || moved(&cluster.agent.log_text())).unwrap();
    let log = cluster.agent.log_text();
    assert!(log.contains("moved=2 failed=0"), "{log}");
    assert!(
        !std::path::Path::new(v1).exists(),
        "the old map is unpinned"
    );
    let after = cluster.agent.cli_json(&["flows"]).unwrap();
    let fields = |v: &serde_json::Value| {
        let f = &v[0];
        (
            f["client"].clone(),
            f["backend"].clone(),
            f["to_backend"].clone(),
            f["to_client"].clone(),
        )
    };
    assert_eq!(fields(&before), fields(&after), "{after:#}");

    let outcome = held.finish();
    assert!(outcome.starts_with("data"), "held connection: {outcome}");
}

fn bpftool(args: &[&str]) {
    testbed::bpftool(args).unwrap();
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    testbed::bpftool_json(args).unwrap()
}

/// Sends one HTTP request per connection every 20 ms for `seconds` and prints
/// "<ok> <failed>" at the end.
const LOAD: &str = r#"
import socket, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.create_connection((host, 80), 1)
        s.settimeout(1)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(1000)
            if not chunk:
                break
            data += chunk
        s.close()
        if b"200 OK" in data:
            ok += 1
        else:
            failed += 1
    except OSError:
        failed += 1
    time.sleep(0.02)
print(ok, failed)
"#;

#[test]
fn restarting_the_agent_keeps_every_connection_and_service() {
    require_root!();
    let (mut cluster, _) = Cluster::routed(11, 3);

    // A connection held open across the restart (half a request sent before it)...
    let held = cluster.hold_connection();
    // ...and a client sending requests all through it.
    let load = cluster
        .client()
        .command("python3")
        .args(["-c", LOAD, VIP, "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let ids_before = cluster.agent.cli_json(&["services"]).unwrap();
    cluster.agent.restart().unwrap();
    // The restarted agent has read its state back and changed nothing.
    wait_until(Duration::from_secs(5), || {
        cluster.agent.log_text().matches("datapath loaded").count() == 2
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let ids_after = cluster.agent.cli_json(&["services"]).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<(String, u64, Vec<u64>)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let backends = s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["backend_id"].as_u64().unwrap())
                    .collect();
                (
                    s["frontend"].as_str().unwrap().to_string(),
                    s["frontend_id"].as_u64().unwrap(),
                    backends,
                )
            })
            .collect()
    };
    assert_eq!(
        ids(&ids_before),
        ids(&ids_after),
        "ids changed across the restart"
    );

    let outcome = held.finish();
    assert!(outcome.starts_with("data"), "held connection: {outcome}");

    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(counts[0] > 50, "too few requests went through: {text}");
    assert_eq!(counts[1], 0, "requests failed during the restart: {text}");
    assert!(
        cluster
            .agent
            .log_text()
            .contains("replaced program in pinned link"),
        "{}",
        cluster.agent.log_text()
    );
}

#[test]
fn a_backends_icmp_error_reaches_the_client_about_the_cluster_ip() {
    require_root!();
    let cluster = Cluster::new(Wiring::Routed, [10, 244, 12]);
    // UDP to a backend port nothing listens on: the backend answers ICMP port unreachable,
    // which the client's socket (connected to the cluster IP) only accepts translated.
    let closed = testbed::manifests::ServicePort {
        name: "dns",
        protocol: "UDP",
        port: 53,
        target_port: 5999,
    };
    let web0 = cluster.node.pods[1].ip;
    cluster
        .agent
        .write_manifest(
            "closed.yaml",
            &service("closed", "10.96.0.50", &[closed], &[web0]),
        )
        .unwrap();
    cluster.agent.wait_for_backends("10.96.0.50:53", 1).unwrap();
    let out = cluster
        .client()
        .run("python3", &["-c", PROBE, "udp", "10.96.0.50", "53"])
        .unwrap();
    assert!(
        out.starts_with("refused"),
        "the client never learned: {out}"
    );
}

#[test]
fn inspection_commands_name_services_filter_flows_and_graph_the_traffic() {
    require_root!();
    let cluster = Cluster::new(Wiring::Routed, [10, 244, 13]);
    cluster.publish_web(&cluster.web_ips());
    let web0 = cluster.node.pods[1].ip;
    cluster
        .agent
        .write_manifest(
            "other.yaml",
            &service("other", "10.96.0.60", &[HTTP], &[web0]),
        )
        .unwrap();
    cluster.agent.wait_for_backends("10.96.0.10:80", 3).unwrap();
    cluster.agent.wait_for_backends("10.96.0.60:80", 1).unwrap();
    let to_web = http_requests(cluster.client(), &format!("http://{VIP}/"), 12);
    let to_other = http_requests(cluster.client(), "http://10.96.0.60/", 4);
    assert!(to_web.iter().chain(&to_other).all(|a| a.is_ok()));
    let client_ip = cluster.node.pods[0].ip.to_string();

    // services: names from the agent's records.
    let services = cluster.agent.cli_json(&["services"]).unwrap();
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "10.96.0.10:80")
        .unwrap();
    assert_eq!(
        (
            web["service"].as_str(),
            web["port"].as_str(),
            web["kind"].as_str()
        ),
        (Some("default/web"), Some("http"), Some("ClusterIP"))
    );

    // flows: filters.
    let flows = |args: &[&str]| {
        cluster
            .agent
            .cli_json(&[&["flows"], args].concat())
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(flows(&["--service", "default/web"]), 12);
    assert_eq!(flows(&["--service", "other"]), 4);
    assert_eq!(
        flows(&["--backend", &web0.to_string(), "--service", "other"]),
        4
    );
    assert_eq!(flows(&["--ip", &client_ip]), 16);
    assert_eq!(flows(&["--ip", "10.9.9.9"]), 0);

    // graph: client -> service -> backend edges carrying the connections sent.
    let graph = cluster.agent.cli_json(&["graph"]).unwrap();
    let edges = graph["edges"].as_array().unwrap();
    let edge = |from: &str, to: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)
            .map(|e| e["connections"].as_u64().unwrap())
    };
    assert_eq!(edge(&client_ip, "default/web"), Some(12), "{graph:#}");
    assert_eq!(edge(&client_ip, "default/other"), Some(4), "{graph:#}");
    let to_backends: u64 = edges
        .iter()
        .filter(|e| e["from"] == "default/web")
        .map(|e| e["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(to_backends, 12);
    assert!(edges.iter().all(|e| e["bytes"].as_u64().unwrap() > 0));
    let dot = cluster.agent.cli(&["graph", "-o", "dot"]).unwrap();
    assert!(
        dot.starts_with("digraph") && dot.contains("\"default/web\""),
        "{dot}"
    );
    let svg = cluster.agent.cli(&["graph", "-o", "svg"]).unwrap();
    assert!(
        svg.contains("<svg"),
        "graphviz output: {}",
        &svg[..svg.len().min(200)]
    );

    // stats and backends.
    let stats = cluster.agent.cli_json(&["stats"]).unwrap();
    assert!(
        stats["conntrack_entries"].as_u64().unwrap() >= 32,
        "{stats:#}"
    );
    let ct = stats["maps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            ["dp_ct_tcp_v4", "dp_ct_ovf_v4", "dp_ct_any_v3"].contains(&m["map"].as_str().unwrap())
        })
        .map(|m| {
            assert!(m["capacity"].as_u64().unwrap() > 0, "{m}");
            m["entries"].as_u64().unwrap()
        })
        .sum::<u64>();
    assert_eq!(
        Some(ct),
        stats["conntrack_entries"].as_u64(),
        "both tables counted"
    );
    assert!(stats["drops"]["no_endpoints"].is_u64(), "{stats:#}");
    let backends = cluster.agent.cli_json(&["backends"]).unwrap();
    let b0 = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == format!("{web0}:8080").as_str())
        .unwrap();
    assert_eq!(
        b0["services"],
        serde_json::json!(["default/other", "default/web"])
    );

    // Metrics, with kube-proxy's names, on the node's 127.0.0.1:10249.
    let metrics = cluster
        .node
        .netns
        .run("curl", &["-s", "http://127.0.0.1:10249/metrics"])
        .unwrap();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "dataplane_conntrack_entries",
        "dataplane_map_capacity{map=\"dp_ct_tcp_v4\"}",
        "dataplane_map_capacity{map=\"dp_ct_ovf_v4\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("dataplane_service_connections_total")
                && l.contains("frontend=\"10.96.0.60:80\"")
        })
        .unwrap_or_else(|| panic!("no connections metric for 10.96.0.60:80:\n{metrics}"));
    assert!(
        line.ends_with(" 4") && line.contains("service=\"default/other\""),
        "{line}"
    );
}

#[test]
fn trace_explains_a_packet_on_the_live_program_and_leaves_nothing_behind() {
    require_root!();
    let cluster = Cluster::new(Wiring::Routed, [10, 244, 14]);
    cluster.publish_web(&cluster.web_ips());
    cluster
        .agent
        .write_manifest("empty.yaml", &service("empty", "10.96.0.20", &[HTTP], &[]))
        .unwrap();
    cluster.agent.wait_for_backends("10.96.0.10:80", 3).unwrap();
    cluster.agent.wait_for_backends("10.96.0.20:80", 0).unwrap();
    http_requests(cluster.client(), &format!("http://{VIP}/"), 3);
    let client = cluster.node.pods[0].ip.to_string();
    let flows_before = cluster.agent.cli_json(&["flows"]).unwrap();
    let stats_before = cluster.agent.cli_json(&["stats"]).unwrap();

    let trace = cluster
        .agent
        .cli_json(&[
            "trace",
            "--from",
            &format!("{client}:45678"),
            "--to",
            "10.96.0.10:80/TCP",
        ])
        .unwrap();
    assert_eq!(trace["service"], "default/web", "{trace:#}");
    assert_eq!(trace["frontend"], "10.96.0.10:80/TCP");
    assert!(
        trace["choice"].as_str().unwrap().starts_with("random"),
        "{trace:#}"
    );
    let backend = trace["backend"].as_str().unwrap().to_string();
    assert!(
        cluster
            .web_ips()
            .iter()
            .any(|ip| backend == format!("{ip}:8080")),
        "{trace:#}"
    );
    assert_eq!(
        trace["translated"],
        format!("{client}:45678 -> {backend} TCP").as_str()
    );
    assert_eq!(trace["verdict"], "forwarded (TC_ACT_OK)");

    let refused = cluster
        .agent
        .cli_json(&["trace", "--from", &client, "--to", "10.96.0.20:80/TCP"])
        .unwrap();
    assert!(
        refused["translated"].as_str().unwrap().ends_with("TCP RST"),
        "{refused:#}"
    );
    assert!(
        refused["verdict"].as_str().unwrap().starts_with("answered"),
        "{refused:#}"
    );
    let elsewhere = cluster
        .agent
        .cli_json(&["trace", "--from", &client, "--to", "10.244.14.11:8080/TCP"])
        .unwrap();
    assert!(
        elsewhere["frontend"].is_null() && elsewhere["verdict"] == "forwarded (TC_ACT_OK)",
        "{elsewhere:#}"
    );

    // No flow, counter or drop from the traces.
    assert_eq!(
        cluster
            .agent
            .cli_json(&["flows"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        flows_before.as_array().unwrap().len()
    );
    let stats_after = cluster.agent.cli_json(&["stats"]).unwrap();
    assert_eq!(stats_after["services"], stats_before["services"]);
    assert_eq!(stats_after["drops"], stats_before["drops"]);
}

/// A deleted pod's veth leaves no link pin behind (its link is defunct); the others stay.
#[test]
fn the_link_pin_of_a_vanished_interface_is_removed() {
    require_root!();
    let cluster = Cluster::new(Wiring::Routed, [10, 244, 14]);
    let gone = cluster.node.pods[3].host_if.clone();
    let kept = cluster.node.pods[1].host_if.clone();
    let pin = |interface: &str| cluster.agent.bpffs_dir.join("links").join(interface);
    let ifindex = |interface: &str| -> u64 {
        let text = cluster
            .node
            .netns
            .ip(&["-j", "link", "show", "dev", interface])
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json[0]["ifindex"].as_u64().unwrap()
    };
    // The veths that lead into pods, as the datapath hands packets through them.
    let pod_interfaces = || -> Vec<u64> {
        let path = cluster.agent.bpffs_dir.join("dp_podif_v1");
        bpftool_json(&["map", "dump", "pinned", path.to_str().unwrap()])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["formatted"]["key"].as_u64().unwrap())
            .collect()
    };
    let (gone_index, kept_index) = (ifindex(&gone), ifindex(&kept));
    assert!(pin(&gone).exists());
    assert!(
        pod_interfaces().contains(&gone_index) && pod_interfaces().contains(&kept_index),
        "every pod veth is listed: {:?}",
        pod_interfaces()
    );
    // A veth pair with both ends in the node matches the pod glob and gets the program, but
    // leads into no pod: not listed (a peer redirect through it would drop every packet).
    let (loop_a, loop_b) = (format!("{kept}la"), format!("{kept}lb"));
    cluster
        .node
        .netns
        .ip(&[
            "link", "add", &loop_a, "type", "veth", "peer", "name", &loop_b,
        ])
        .unwrap();
    cluster
        .node
        .netns
        .ip(&["link", "set", &loop_a, "up"])
        .unwrap();
    cluster
        .node
        .netns
        .ip(&["link", "set", &loop_b, "up"])
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        pin(&loop_a).exists() && pin(&loop_b).exists()
    })
    .unwrap_or_else(|e| panic!("{e}: {}", cluster.agent.log_text()));
    let listed = pod_interfaces();
    assert!(
        !listed.contains(&ifindex(&loop_a)) && !listed.contains(&ifindex(&loop_b)),
        "a veth inside the node is listed as a pod's: {listed:?}"
    );

    cluster.node.netns.ip(&["link", "del", &gone]).unwrap();
    wait_until(Duration::from_secs(5), || !pin(&gone).exists())
        .unwrap_or_else(|e| panic!("{e}: {}", cluster.agent.log_text()));
    assert!(pin(&kept).exists(), "the other pods' pins stay");
    wait_until(Duration::from_secs(5), || {
        !pod_interfaces().contains(&gone_index)
    })
    .unwrap_or_else(|e| panic!("{e}: the vanished veth is still listed"));
    assert!(
        pod_interfaces().contains(&kept_index),
        "the other pods' veths stay listed"
    );
    cluster.node.netns.ip(&["link", "del", &loop_a]).unwrap();
}
