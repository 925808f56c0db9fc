//! The datapath on a node as a real one is: kube-proxy's `KUBE-FORWARD` INVALID drop, a
//! pod-egress MASQUERADE, strict reverse-path filtering (all in every testbed node), the
//! node's own connections, jumbo-frame pods over a 1500-byte underlay, fragments, a Layer-3
//! tunnel device, and the ICMP errors the node's forwarding generates. One test (or a few)
//! per way the node's stack and the datapath can get in each other's way. Real agents,
//! servers and clients in namespaces; run as root (skipped otherwise).
use std::{net::Ipv4Addr, time::Duration};

use testbed::{
    Agent, AgentOptions, LineConnection, Netns, Node, Wiring,
    manifests::{DNS, HTTP, NodeEndpoint, service, service_on_nodes},
    multinode::{ClusterOptions, MultiNode, Overlay, underlay_ip},
    require_root, udp_request,
};

const NODE_A: &str = "192.0.2.11";
const NODE_B: &str = "192.0.2.12";
const CLIENT: &str = "192.0.2.100";
/// The line echo servers' port (held connections), in pods and behind services.
const LINES: u16 = 9000;

/// One service port: (name, protocol, port, targetPort, nodePort).
type Port<'a> = (&'a str, &'a str, u16, u16, Option<u16>);

/// A Service (`spec_extra`: type, traffic policy...) with `ports`, and one EndpointSlice with
/// `endpoints` as (address, node).
fn service_yaml(
    name: &str,
    cluster_ip: &str,
    spec_extra: &str,
    ports: &[Port],
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let service_ports: String = ports
        .iter()
        .map(|(n, proto, port, target, node_port)| {
            let node_port = node_port
                .map(|p| format!(", nodePort: {p}"))
                .unwrap_or_default();
            format!(
                "  - {{name: {n}, protocol: {proto}, port: {port}, targetPort: {target}{node_port}}}\n"
            )
        })
        .collect();
    let slice_ports: Vec<(&str, &str, u16)> = ports
        .iter()
        .map(|(n, proto, _, target, _)| (*n, *proto, *target))
        .collect();
    let endpoints: Vec<NodeEndpoint> = endpoints
        .iter()
        .map(|(ip, node)| (*ip, *node, None))
        .collect();
    let spec = format!("{spec_extra}\n  ports:\n{service_ports}");
    service_on_nodes(name, cluster_ip, &spec, "", &slice_ports, &endpoints)
}

/// What each step of a test found: every step runs, and the test fails at the end listing
/// every step that failed (so one run shows every broken path, not just the first).
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("ok     {what}: {detail}"),
            Err(e) => {
                println!("FAILED {what}: {e}");
                self.failures.push(format!("{what}: {e}"));
            }
        }
    }

    /// `what` over TCP (HTTP GET to port 80) and UDP (a datagram to port 53) from `client`
    /// to `ip`: answered by `backend`, which saw the client as `peer`.
    fn http_and_dns(
        &mut self,
        what: &str,
        client: &Netns,
        ip: &str,
        (backend, peer): (&str, &str),
    ) {
        self.check(
            &format!("{what}, TCP"),
            from(get(client, &format!("http://{ip}/")), backend, peer),
        );
        self.check(
            &format!("{what}, UDP"),
            from(udp(client, &format!("{ip}:53"), "q"), backend, peer),
        );
    }

    /// Fails the test with every failed step and what the nodes' stacks dropped.
    fn finish(self, nodes: &[&Node]) {
        let drops: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}: {}", n.netns.name, n.drop_report()))
            .collect();
        assert!(
            self.failures.is_empty(),
            "{} step(s) failed:\n  {}\nnode stacks:\n  {}",
            self.failures.len(),
            self.failures.join("\n  "),
            drops.join("\n  ")
        );
    }
}

/// One HTTP GET with `curl --max-time 2`: the body, or curl's exit and error.
fn get(client: &Netns, url: &str) -> Result<String, String> {
    let out = client
        .command("curl")
        .args(["-sS", "--max-time", "2", url])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "curl {url}: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `answer` comes from `backend` and names `peer` (a whole address, or "ip:" for any port).
fn from(answer: Result<String, String>, backend: &str, peer: &str) -> Result<String, String> {
    let answer = answer?;
    let mut words = answer.split_whitespace();
    let (name, seen) = (words.next(), words.next().unwrap_or(""));
    if name == Some(backend) && (seen == peer || (peer.ends_with(':') && seen.starts_with(peer))) {
        Ok(answer)
    } else {
        Err(format!("expected {backend} seeing {peer}, got {answer:?}"))
    }
}

/// An error with its causes, as a step's failure.
fn text<T>(result: anyhow::Result<T>) -> Result<T, String> {
    result.map_err(|e| format!("{e:#}"))
}

fn udp(client: &Netns, target: &str, payload: &str) -> Result<String, String> {
    text(udp_request(client, target, None, payload))
}

/// One exchange on a held connection, if it was opened.
fn exchange(held: &mut anyhow::Result<LineConnection>, line: &str) -> Result<String, String> {
    match held {
        Ok(connection) => text(connection.exchange(line)),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Sends a UDP datagram of `size` bytes and waits up to 1 s for the whole echo, up to five
/// times from one socket, as a real UDP client retries (the first datagrams may only teach
/// the path's MTU). Prints "ok <tries> <backend>" or "failed <what each try saw>".
const UDP_RETRY: &str = r#"
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes(ord("a") + i % 26 for i in range(size))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 0))
errors = []
for attempt in range(1, 6):
    try:
        s.sendto(payload, (host, port))
        deadline = time.monotonic() + 1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole answer within 1 s")
            s.settimeout(left)
            data, _ = s.recvfrom(65535)
            if data.endswith(b" " + payload):
                print("ok", attempt, data.split(b" ")[0].decode())
                sys.exit(0)
            errors.append(f"answer of {len(data)} bytes")
    except OSError as e:
        errors.append(repr(e))
print("failed", "; ".join(errors))
"#;

/// A `size`-byte UDP request to `host:port` answered whole by `backend` (with retries).
fn udp_whole(
    client: &Netns,
    host: &str,
    port: u16,
    size: usize,
    backend: &str,
) -> Result<String, String> {
    let out = text(client.run(
        "python3",
        &["-c", UDP_RETRY, host, &port.to_string(), &size.to_string()],
    ))?;
    let out = out.trim().to_string();
    let words: Vec<&str> = out.split_whitespace().collect();
    match words.as_slice() {
        ["ok", tries, name] if *name == backend => Ok(format!("{tries} tries")),
        _ => Err(out),
    }
}

/// A two-node cluster whose servers also echo lines on [`LINES`], agents started.
fn cluster(pods: [&[&str]; 2], servers: &[&str], options: ClusterOptions) -> MultiNode {
    let mut c = MultiNode::with(&pods, 1, options).unwrap();
    for name in servers {
        c.pod(name)
            .serve_with_line_echo(8080, 5353, Some(LINES))
            .unwrap();
    }
    c.start_agents(&[]).unwrap();
    c
}

fn pod_ip(c: &mut MultiNode, name: &str) -> Ipv4Addr {
    c.pod(name).ip
}

fn pod_netns<'a>(c: &'a MultiNode, name: &str) -> &'a Netns {
    c.nodes
        .iter()
        .flat_map(|n| &n.node.pods)
        .find(|p| p.name == name)
        .map(|p| &p.netns)
        .unwrap()
}

const WEB: [Port; 3] = [
    ("http", "TCP", 80, 8080, None),
    ("dns", "UDP", 53, 5353, None),
    ("lines", "TCP", LINES, LINES, None),
];

fn with_node_ports<'a>(ports: &[Port<'a>], node_ports: &[u16]) -> Vec<Port<'a>> {
    ports
        .iter()
        .zip(node_ports)
        .map(|(&(n, proto, port, target, _), np)| (n, proto, port, target, Some(*np)))
        .collect()
}

/// Writes `name` (`name.yaml`) as a NodePort service with `ports` on `node_ports` and one
/// endpoint, and waits until node A serves each node port.
fn publish_node_port(
    c: &MultiNode,
    name: &str,
    cluster_ip: &str,
    ports: &[Port],
    node_ports: &[u16],
    endpoint: (Ipv4Addr, &str),
) {
    let ports = with_node_ports(ports, node_ports);
    let yaml = service_yaml(name, cluster_ip, "  type: NodePort", &ports, &[endpoint]);
    c.write_manifest(&format!("{name}.yaml"), &yaml).unwrap();
    for port in node_ports {
        c.agents[0]
            .wait_for_backends(&format!("{NODE_A}:{port}"), 1)
            .unwrap();
    }
}

/// Finding 1: the datapath translates before netfilter, so the node's conntrack sees replies
/// of connections it never saw (kube-proxy's own `-m conntrack --ctstate INVALID -j DROP`
/// drops them) and reverse-path filtering sees cluster IPs and node addresses arrive on pod
/// veths. Every service path must work on such a node, and the INVALID rule drop nothing.
#[test]
fn every_service_path_works_through_kube_proxys_invalid_drop_and_strict_rp_filter() {
    require_root!();
    let mut c = cluster(
        [&["a1", "client-a"], &["b1"]],
        &["a1", "b1"],
        ClusterOptions::default(),
    );
    let (a1, b1, client_a) = (
        pod_ip(&mut c, "a1"),
        pod_ip(&mut c, "b1"),
        pod_ip(&mut c, "client-a"),
    );
    let local = "  type: NodePort\n  externalTrafficPolicy: Local";
    c.write_manifest(
        "web-a.yaml",
        &service_yaml(
            "web-a",
            "10.96.1.10",
            local,
            &with_node_ports(&WEB, &[30081, 30054, 30091]),
            &[(a1, "node-a")],
        ),
    )
    .unwrap();
    publish_node_port(
        &c,
        "web-b",
        "10.96.1.11",
        &WEB,
        &[30080, 30053, 30090],
        (b1, "node-b"),
    );
    c.write_manifest(
        "empty.yaml",
        &service_yaml("empty", "10.96.1.20", "", &WEB, &[]),
    )
    .unwrap();
    for agent in &c.agents {
        agent.wait_for_backends("10.96.1.10:80", 1).unwrap();
        agent.wait_for_backends("10.96.1.11:80", 1).unwrap();
        agent.wait_for_backends("10.96.1.20:80", 0).unwrap();
    }
    c.agents[0]
        .wait_for_backends(&format!("{NODE_A}:30081"), 1)
        .unwrap();
    c.agents[0]
        .wait_for_backends(&format!("{NODE_A}:30080"), 1)
        .unwrap();

    let mut checks = Checks::default();
    let pod = pod_netns(&c, "client-a");
    let me = format!("{client_a}:");
    // A connection held open across everything below.
    let mut held = LineConnection::open(pod, &format!("10.96.1.10:{LINES}"), None);
    checks.check(
        "held connection to a ClusterIP: opened, first exchange",
        from(exchange(&mut held, "first"), "a1", &me),
    );
    checks.http_and_dns(
        "ClusterIP, backend on the same node",
        pod,
        "10.96.1.10",
        ("a1", &me),
    );
    checks.http_and_dns(
        "ClusterIP, backend on the other node",
        pod,
        "10.96.1.11",
        ("b1", &me),
    );
    checks.check(
        "hairpin: a pod through its own ClusterIP",
        from(
            get(pod_netns(&c, "a1"), "http://10.96.1.10/"),
            "a1",
            "169.254.42.1:",
        ),
    );
    let outside = &c.clients[0];
    for (node_ip, name) in [(NODE_A, "other node"), (NODE_B, "same node")] {
        checks.check(
            &format!("NodePort, externalTrafficPolicy Cluster, backend on the {name}, TCP"),
            from(
                get(outside, &format!("http://{node_ip}:30080/")),
                "b1",
                &format!("{node_ip}:"),
            ),
        );
        checks.check(
            &format!("NodePort, externalTrafficPolicy Cluster, backend on the {name}, UDP"),
            from(
                udp(outside, &format!("{node_ip}:30053"), "q"),
                "b1",
                &format!("{node_ip}:"),
            ),
        );
    }
    checks.check(
        "NodePort, externalTrafficPolicy Local, TCP",
        from(
            get(outside, &format!("http://{NODE_A}:30081/")),
            "a1",
            &format!("{CLIENT}:"),
        ),
    );
    checks.check(
        "NodePort, externalTrafficPolicy Local, UDP",
        from(
            udp(outside, &format!("{NODE_A}:30054"), "q"),
            "a1",
            &format!("{CLIENT}:"),
        ),
    );
    let started = std::time::Instant::now();
    let refused = match get(pod, "http://10.96.1.20/") {
        Ok(body) => Err(format!("answered: {body}")),
        Err(e) if e.contains("exit Some(7)") && started.elapsed() < Duration::from_secs(1) => {
            Ok(format!("{e} after {:?}", started.elapsed()))
        }
        Err(e) => Err(format!("{e} after {:?}", started.elapsed())),
    };
    checks.check("a service without endpoints refuses at once", refused);
    checks.check(
        "held connection to a ClusterIP: second exchange, after everything above",
        from(exchange(&mut held, "second"), "a1", &me),
    );

    // Bridged pods (bridge CNI) on a node of their own.
    let mut node = Node::new(Wiring::Bridged, [10, 244, 20]).unwrap();
    node.add_pod("client").unwrap();
    let web = node.add_pod("web").unwrap();
    node.pods[web].serve(8080, 5353).unwrap();
    let agent = Agent::start(&node, "node-c").unwrap();
    agent
        .write_manifest(
            "web.yaml",
            &service("web", "10.96.0.10", &[HTTP, DNS], &[node.pods[web].ip]),
        )
        .unwrap();
    agent.wait_for_backends("10.96.0.10:80", 1).unwrap();
    let bridged = format!("{}:", node.pods[0].ip);
    checks.check(
        "ClusterIP from a bridged pod, TCP",
        from(
            get(&node.pods[0].netns, "http://10.96.0.10/"),
            "web",
            &bridged,
        ),
    );
    checks.check(
        "ClusterIP from a bridged pod, UDP",
        from(
            udp(&node.pods[0].netns, "10.96.0.10:53", "q"),
            "web",
            &bridged,
        ),
    );

    let nodes = [&c.nodes[0].node, &c.nodes[1].node, &node];
    for n in nodes {
        checks.check(
            &format!("KUBE-FORWARD INVALID drops on {}", n.netns.name),
            match n.invalid_drops() {
                Ok(0) => Ok("0".into()),
                Ok(n) => Err(format!("{n} packets dropped")),
                Err(e) => Err(format!("{e:#}")),
            },
        );
    }
    checks.finish(&nodes);
}

/// Finding 2: a node port must not take the node's own traffic. A pod's connection to the
/// outside leaves with the node's address (the pod-egress SNAT); when netfilter picks a
/// source port that is also a node port, the answers to it belong to the pod, not to the
/// node port's backend: only a TCP SYN (or a datagram of no flow the node sent) opens a
/// node port flow.
#[test]
fn answers_to_the_nodes_own_snat_on_a_node_port_number_reach_the_pod() {
    require_root!();
    let mut c = cluster(
        [&["a1", "client-a"], &[]],
        &["a1"],
        ClusterOptions::default(),
    );
    let (a1, client_a) = (pod_ip(&mut c, "a1"), pod_ip(&mut c, "client-a"));
    let _outside = c.clients[0]
        .serve_echo("outside", underlay_ip(100), 8080, 5353, None)
        .unwrap();
    publish_node_port(
        &c,
        "web",
        "10.96.2.10",
        &WEB[..2],
        &[30080, 30053],
        (a1, "node-a"),
    );
    // As if MASQUERADE's random port had been the node port: exactly this pod's flows.
    let node = &c.nodes[0].node;
    for (proto, port, node_port) in [("tcp", "8080", "30080"), ("udp", "5353", "30053")] {
        node.netns
            .run(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-I",
                    "POSTROUTING",
                    "1",
                    "-s",
                    &client_a.to_string(),
                    "-d",
                    CLIENT,
                    "-p",
                    proto,
                    "--dport",
                    port,
                    "-j",
                    "SNAT",
                    "--to-source",
                    &format!("{NODE_A}:{node_port}"),
                ],
            )
            .unwrap();
    }

    let mut checks = Checks::default();
    let pod = pod_netns(&c, "client-a");
    checks.check(
        "a pod's TCP connection SNATed to node-IP:30080 (a TCP node port) gets its answer",
        from(
            get(pod, &format!("http://{CLIENT}:8080/")),
            "outside",
            &format!("{NODE_A}:30080"),
        ),
    );
    checks.check(
        "a pod's UDP datagram SNATed to node-IP:30053 (a UDP node port) gets its answer",
        from(
            udp(pod, &format!("{CLIENT}:5353"), "q"),
            "outside",
            &format!("{NODE_A}:30053"),
        ),
    );
    let outside = &c.clients[0];
    checks.check(
        "an external client still reaches TCP node port 30080",
        from(
            get(outside, &format!("http://{NODE_A}:30080/")),
            "a1",
            &format!("{NODE_A}:"),
        ),
    );
    checks.check(
        "an external client still reaches UDP node port 30053",
        from(
            udp(outside, &format!("{NODE_A}:30053"), "q"),
            "a1",
            &format!("{NODE_A}:"),
        ),
    );
    checks.finish(&[&c.nodes[0].node]);
}

/// The peer port a line echo answer names.
fn peer_port(answer: &str) -> Option<u16> {
    answer
        .split_whitespace()
        .nth(1)?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// Finding 3: the SNAT of externalTrafficPolicy Cluster must not take ports the node's own
/// connections use. An outside client holds a connection from port 40000 (inside Linux's
/// ephemeral range); the node's own connection from node-IP:40000 to the same backend must
/// get its answers, and the held connection keep working.
#[test]
fn an_outside_clients_source_port_never_takes_the_nodes_own_connection() {
    require_root!();
    let mut c = cluster([&["a1"], &[]], &["a1"], ClusterOptions::default());
    let a1 = pod_ip(&mut c, "a1");
    publish_node_port(&c, "web", "10.96.3.10", &WEB[2..], &[30090], (a1, "node-a"));

    let mut checks = Checks::default();
    let mut held = LineConnection::open(&c.clients[0], &format!("{NODE_A}:30090"), Some(":40000"));
    checks.check(
        "an outside client's connection from port 40000 to the node port",
        from(exchange(&mut held, "one"), "a1", &format!("{NODE_A}:")),
    );
    let own = LineConnection::open(
        &c.nodes[0].node.netns,
        &format!("{a1}:{LINES}"),
        Some(&format!("{NODE_A}:40000")),
    )
    .and_then(|mut own| own.exchange("node"));
    checks.check(
        "the node's own connection from node-IP:40000 to the backend",
        from(text(own), "a1", &format!("{NODE_A}:40000")),
    );
    checks.check(
        "the outside client's held connection afterwards",
        exchange(&mut held, "two").and_then(|answer| {
            let port = peer_port(&answer);
            if (30000..=32767).contains(&port.unwrap_or(0)) {
                Err(format!("SNATed to a node port: {answer}"))
            } else {
                from(Ok(answer), "a1", &format!("{NODE_A}:"))
            }
        }),
    );
    checks.finish(&[&c.nodes[0].node]);
}

/// Finding 3: a SNAT port range overlapping the node's ephemeral ports (read from the node's
/// own `net.ipv4.ip_local_port_range`) is refused at start: a non-zero exit, an error naming
/// `--snat-port-range` and the ephemeral range it overlaps (both bounds), and nothing pinned.
#[test]
fn a_snat_port_range_overlapping_the_ephemeral_ports_is_refused_before_anything_is_pinned() {
    require_root!();
    let c = MultiNode::new(&[&["a1"]], 0).unwrap();
    let node = &c.nodes[0].node;
    let ephemeral = node
        .netns
        .sysctl_value("net.ipv4.ip_local_port_range")
        .unwrap();
    let (low, high) = ephemeral.split_once(char::is_whitespace).unwrap();
    let (low, high) = (low.trim(), high.trim());
    let options = AgentOptions {
        shared_manifests: Some(c.manifests.clone()),
        external_interfaces: Some("eth0".into()),
        extra_args: vec!["--snat-port-range".into(), "32000-33000".into()],
        ..Default::default()
    };
    let exit = Agent::run_to_exit(node, "node-a", options, Duration::from_secs(10)).unwrap();
    let status = exit.status;
    assert!(
        status.is_some_and(|s| !s.success()),
        "exit {status:?}, expected a refusal:\n{}",
        exit.output
    );
    assert!(
        exit.output.contains("--snat-port-range")
            && exit.output.contains(low)
            && exit.output.contains(high),
        "the error must name --snat-port-range and the ephemeral range {low}-{high}:\n{}",
        exit.output
    );
    assert!(
        exit.pinned.is_empty(),
        "pinned before refusing: {:?}",
        exit.pinned
    );
}

/// Finding 3: with `--snat-port-range 61000-61001` one backend takes two SNATed connections
/// from outside, on those ports; a third is dropped and counted.
#[test]
fn connections_beyond_the_snat_port_range_are_dropped_and_counted() {
    require_root!();
    let mut c = MultiNode::new(&[&["a1"], &[]], 1).unwrap();
    c.pod("a1")
        .serve_with_line_echo(8080, 5353, Some(LINES))
        .unwrap();
    c.start_agents(&["--snat-port-range", "61000-61001"])
        .unwrap();
    let a1 = pod_ip(&mut c, "a1");
    publish_node_port(&c, "web", "10.96.3.20", &WEB[2..], &[30090], (a1, "node-a"));
    let target = format!("{NODE_A}:30090");
    let mut held = vec![];
    for i in 0..2 {
        let mut connection = LineConnection::open(&c.clients[0], &target, None)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        let answer = connection.exchange("hello").unwrap();
        let port = peer_port(&answer);
        assert!(
            answer.starts_with("a1 ") && matches!(port, Some(61000..=61001)),
            "connection {i}: {answer}"
        );
        held.push(connection);
    }
    let third = LineConnection::open(&c.clients[0], &target, None)
        .and_then(|mut connection| connection.exchange("hello"));
    assert!(third.is_err(), "a third connection got {third:?}");
    for (i, connection) in held.iter_mut().enumerate() {
        let answer = connection.exchange("again").unwrap();
        assert!(answer.starts_with("a1 "), "connection {i}: {answer}");
    }
    let stats = c.agents[0].cli_json(&["stats"]).unwrap();
    assert!(
        stats["drops"]["snat_ports_exhausted"].as_u64() >= Some(1),
        "{stats:#}"
    );
}

/// Finding 4: UDP datagrams bigger than the path's MTU travel as fragments, and only the
/// first carries the ports. Jumbo-frame pods (9001) over the 1500-byte underlay; the
/// backend is always on the other node. The client retries as real ones do: the first
/// datagrams may only teach the pod, and the backend, the path MTU.
#[test]
fn fragmented_udp_through_a_cluster_ip_and_a_node_port_is_answered_whole() {
    require_root!();
    let options = ClusterOptions {
        pod_mtu: Some(9001),
        ..Default::default()
    };
    let mut c = cluster([&["client-a"], &["b1"]], &["b1"], options);
    let b1 = pod_ip(&mut c, "b1");
    publish_node_port(
        &c,
        "echo",
        "10.96.4.10",
        &WEB[1..2],
        &[30053],
        (b1, "node-b"),
    );
    c.agents[0].wait_for_backends("10.96.4.10:53", 1).unwrap();
    // The testbed's own path, without a service: pod to pod, path MTU discovery and all.
    let direct = udp_whole(pod_netns(&c, "client-a"), &b1.to_string(), 5353, 8000, "b1");
    assert!(direct.is_ok(), "pod to pod: {direct:?}");
    let mut checks = Checks::default();
    for size in [1000, 3000, 8000] {
        checks.check(
            &format!("{size} bytes from a pod to a ClusterIP, backend on the other node"),
            udp_whole(pod_netns(&c, "client-a"), "10.96.4.10", 53, size, "b1"),
        );
        checks.check(
            &format!("{size} bytes from outside to a NodePort, backend on the other node"),
            udp_whole(&c.clients[0], NODE_A, 30053, size, "b1"),
        );
    }
    checks.finish(&[&c.nodes[0].node, &c.nodes[1].node]);
}

/// Finding 5: a Layer-3 tunnel device (no Ethernet header; a TUN device named as Calico's
/// WireGuard device) carries the pod network between the nodes, and the agents serve it as
/// an external interface. Requests go out through it and replies come back through it.
#[test]
fn services_answer_across_a_layer3_tunnel_device() {
    require_root!();
    let options = ClusterOptions {
        overlay: Overlay::Tun,
        ..Default::default()
    };
    let mut c = cluster(
        [&["a1", "client-a"], &["b1", "client-b"]],
        &["a1", "b1"],
        options,
    );
    let (a1, b1) = (pod_ip(&mut c, "a1"), pod_ip(&mut c, "b1"));
    let (client_a, client_b) = (pod_ip(&mut c, "client-a"), pod_ip(&mut c, "client-b"));
    // The testbed's own overlay, before any service: pod to pod across the tunnel.
    for (client, server, name) in [("client-a", b1, "b1"), ("client-b", a1, "a1")] {
        let answer = get(pod_netns(&c, client), &format!("http://{server}:8080/"));
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with(name)),
            "the tunnel itself does not carry {client} -> {name}: {answer:?}"
        );
    }
    publish_node_port(
        &c,
        "to-b",
        "10.96.5.10",
        &WEB[..2],
        &[30080, 30053],
        (b1, "node-b"),
    );
    c.write_manifest(
        "to-a.yaml",
        &service_yaml("to-a", "10.96.5.11", "", &WEB[..2], &[(a1, "node-a")]),
    )
    .unwrap();
    c.agents[0].wait_for_backends("10.96.5.10:80", 1).unwrap();
    c.agents[1].wait_for_backends("10.96.5.11:80", 1).unwrap();
    c.agents[0]
        .wait_for_backends(&format!("{NODE_A}:30080"), 1)
        .unwrap();

    let mut checks = Checks::default();
    let (pod_a, pod_b) = (pod_netns(&c, "client-a"), pod_netns(&c, "client-b"));
    let (me_a, me_b) = (format!("{client_a}:"), format!("{client_b}:"));
    checks.http_and_dns(
        "a pod on node A to a ClusterIP served on node B",
        pod_a,
        "10.96.5.10",
        ("b1", &me_a),
    );
    checks.http_and_dns(
        "a pod on node B to a ClusterIP served on node A",
        pod_b,
        "10.96.5.11",
        ("a1", &me_b),
    );
    let node_a = format!("{NODE_A}:");
    checks.check(
        "outside to a NodePort on node A served on node B, TCP",
        from(
            get(&c.clients[0], &format!("http://{NODE_A}:30080/")),
            "b1",
            &node_a,
        ),
    );
    checks.check(
        "outside to a NodePort on node A served on node B, UDP",
        from(
            udp(&c.clients[0], &format!("{NODE_A}:30053"), "q"),
            "b1",
            &node_a,
        ),
    );
    checks.finish(&[&c.nodes[0].node, &c.nodes[1].node]);
}

/// Sends one datagram with IP TTL 1 on a UDP socket connected to HOST:PORT with IP_RECVERR,
/// and prints the error queued on the socket within 2 s: "error <origin> <type> <code>
/// <offender>", or "none". A connected socket only takes an ICMP error quoting the address
/// it connected to.
const TTL_PROBE: &str = r#"
import select, socket, struct, sys
IP_RECVERR, MSG_ERRQUEUE = 11, 0x2000
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
s.setsockopt(socket.SOL_IP, socket.IP_TTL, 1)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ttl")
poll = select.poll()
poll.register(s, select.POLLERR)
if not poll.poll(2000):
    print("none")
    sys.exit()
_, ancillary, _, _ = s.recvmsg(512, 512, MSG_ERRQUEUE)
for level, kind, data in ancillary:
    if level == socket.SOL_IP and kind == IP_RECVERR:
        errno, origin, icmp_type, code = struct.unpack("=IBBB", data[:7])
        print("error", origin, icmp_type, code, socket.inet_ntoa(data[20:24]))
"#;

/// Sends an 8000-byte datagram with the DF bit (IP_PMTUDISC_DO) on a UDP socket connected to
/// HOST:PORT, then for up to 2 s watches what the socket learned: "mtu N" once IP_MTU is at
/// most 1500, "emsgsize" when a further send is refused as too big, else "unchanged N".
const PMTU_PROBE: &str = r#"
import errno, socket, sys, time
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"x" * 8000)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    mtu = s.getsockopt(socket.SOL_IP, IP_MTU)
    if mtu <= 1500:
        print("mtu", mtu)
        sys.exit()
    time.sleep(0.05)
try:
    s.send(b"x" * 8000)
    print("unchanged", s.getsockopt(socket.SOL_IP, IP_MTU))
except OSError as e:
    print("emsgsize" if e.errno == errno.EMSGSIZE else f"error {e!r}")
"#;

/// Jumbo-frame pods over the 1500-byte underlay, a UDP ClusterIP whose backend is on the
/// other node, checked to answer ordinary datagrams.
fn icmp_cluster() -> MultiNode {
    let options = ClusterOptions {
        pod_mtu: Some(9001),
        ..Default::default()
    };
    let mut c = cluster([&["client-a"], &["b1"]], &["b1"], options);
    let b1 = pod_ip(&mut c, "b1");
    c.write_manifest(
        "echo.yaml",
        &service_yaml("echo", "10.96.6.10", "", &WEB[1..2], &[(b1, "node-b")]),
    )
    .unwrap();
    c.agents[0].wait_for_backends("10.96.6.10:53", 1).unwrap();
    let answer = udp(pod_netns(&c, "client-a"), "10.96.6.10:53", "q");
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("b1 ")),
        "the service does not answer at all: {answer:?}"
    );
    c
}

/// Runs an ICMP probe script in client-a's pod against `host:port`; its one-line report.
fn run_probe(c: &MultiNode, script: &str, host: &str, port: &str) -> String {
    pod_netns(c, "client-a")
        .run("python3", &["-c", script, host, port])
        .unwrap()
        .trim()
        .to_string()
}

/// Finding 6: the node's "time exceeded" about a translated packet must reach the pod about
/// the cluster IP it sent to (traceroute through a service).
#[test]
fn time_exceeded_from_the_node_reaches_the_pod_about_the_cluster_ip() {
    require_root!();
    let mut c = icmp_cluster();
    let b1 = pod_ip(&mut c, "b1").to_string();
    let probe = |host: &str, port: &str| run_probe(&c, TTL_PROBE, host, port);
    // The node's own error when nothing is translated: straight to the backend pod.
    let direct = probe(&b1, "5353");
    assert!(direct.starts_with("error 2 11"), "pod to pod: {direct}");
    let out = probe("10.96.6.10", "53");
    let words: Vec<&str> = out.split_whitespace().collect();
    // origin 2: SO_EE_ORIGIN_ICMP; type 11: time exceeded.
    assert!(
        matches!(words.as_slice(), ["error", "2", "11", ..]),
        "the pod's socket got no time exceeded: {out} ({})",
        c.nodes[0]
            .node
            .netns
            .netstat("IcmpOutTimeExcds")
            .map_or_else(
                |e| e.to_string(),
                |n| format!("node A sent {n} time exceeded")
            )
    );
}

/// Finding 6: the node's "fragmentation needed" about a translated packet too big for the
/// next hop must reach the pod about the cluster IP, so path MTU discovery works.
#[test]
fn fragmentation_needed_from_the_node_teaches_the_pod_the_path_mtu_to_the_cluster_ip() {
    require_root!();
    let mut c = icmp_cluster();
    let b1 = pod_ip(&mut c, "b1").to_string();
    let probe = |host: &str, port: &str| run_probe(&c, PMTU_PROBE, host, port);
    // Path MTU discovery when nothing is translated: straight to the backend pod.
    let direct = probe(&b1, "5353");
    assert!(direct.starts_with("mtu 1500"), "pod to pod: {direct}");
    let out = probe("10.96.6.10", "53");
    assert!(
        out.starts_with("mtu") || out.starts_with("emsgsize"),
        "the pod's socket never learned the path MTU: {out} ({})",
        c.nodes[0]
            .node
            .netns
            .netstat("IcmpOutDestUnreachs")
            .map_or_else(
                |e| e.to_string(),
                |n| format!("node A sent {n} destination unreachable")
            )
    );
}
