//! IPv6 and dual-stack services: a `PreferDualStack` ClusterIP with an IPv4 and an IPv6 slice,
//! served in the two-node testbed (dual-stack underlay, routed /128 IPv6 pods with a link-local
//! gateway) over both families: host-network clients through the socket hooks (TCP, connected
//! and unconnected UDP, the frontend as their peer, IPv4-mapped addresses on IPv6 sockets),
//! and pods with `--socket-lb all`. Real agents, servers and clients; run as root (skipped
//! otherwise).
use std::{collections::BTreeSet, net::Ipv6Addr};

use testbed::{
    Netns,
    manifests::{DNS, HTTP, ServicePort, dual_stack_service},
    multinode::MultiNode,
    require_root,
};

const CLUSTER_IP: &str = "10.96.0.60";
const CLUSTER_IP6: &str = "fd00:10:96::60";

/// What a client does, one operation per run, printed as one line: `PEER ANSWER`, where PEER
/// is the socket's peer (`getpeername()`, or the source of the answer for unconnected UDP)
/// as `addr:port` or `[addr]:port`.
/// `tcp HOST PORT`: an HTTP request; `udp-connected HOST PORT`, `udp-unconnected HOST PORT`:
/// one datagram and its echo. The socket's family follows HOST (IPv6 for `::ffff:a.b.c.d`).
/// Errors print as `error <errno name>`.
const CLIENT: &str = r#"
import errno, socket, sys
op, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
def text(peer):
    return "[%s]:%d" % peer[:2] if family == socket.AF_INET6 else "%s:%d" % peer
try:
    if op == "tcp":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((host, port))
        peer = s.getpeername()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        body = s.makefile("rb").read().split(b"\r\n\r\n", 1)[1].decode().strip()
        print(text(peer), body)
    elif op == "udp-connected":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((host, port))
        peer = s.getpeername()
        s.send(b"q")
        print(text(peer), s.recv(2048).decode())
    elif op == "udp-unconnected":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"q", (host, port))
        data, src = s.recvfrom(2048)
        print(text(src), data.decode())
except OSError as e:
    print("error", errno.errorcode.get(e.errno, str(e)))
"#;

fn client(ns: &Netns, op: &str, host: &str, port: u16) -> String {
    match ns
        .command("python3")
        .args(["-c", CLIENT, op, host, &port.to_string()])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(e) => format!("client failed: {e}"),
    }
}

/// Runs `op` `count` times; the backends that answered, each answer checked to show `peer`
/// as the socket's peer, and a backend that saw an IPv6 client exactly when
/// `ipv6_backend_side` (the echo servers bracket IPv6 peers).
fn backends_answering(
    ns: &Netns,
    op: &str,
    (host, port): (&str, u16),
    peer: &str,
    ipv6_backend_side: bool,
    count: usize,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..count {
        let answer = client(ns, op, host, port);
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert!(
            words.len() >= 3 && words[0] == peer,
            "{op} {host}:{port}: expected peer {peer}, got {answer:?}"
        );
        // The backend's view of the client: an IPv6 peer is bracketed.
        assert_eq!(
            words[2].starts_with('['),
            ipv6_backend_side,
            "{op} {host}:{port}: the backend saw {:?}: {answer:?}",
            words[2]
        );
        seen.insert(words[1].to_string());
    }
    seen
}

/// `ns` reaches `web` over both families: TCP to each cluster IP spreads over both
/// backends with the cluster IP as the socket's peer, and IPv6 UDP (connected and not) is
/// answered from the frontend; the backends see an IPv6 client on the IPv6 path and an IPv4
/// one on the IPv4 path.
fn serves_both_families(ns: &Netns, what: &str) {
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let v6_peer = format!("[{CLUSTER_IP6}]:80");
    let seen = backends_answering(ns, "tcp", (CLUSTER_IP6, 80), &v6_peer, true, 16);
    assert_eq!(seen, both, "{what}: IPv6 TCP spread");
    let v4_peer = format!("{CLUSTER_IP}:80");
    let seen = backends_answering(ns, "tcp", (CLUSTER_IP, 80), &v4_peer, false, 16);
    assert_eq!(seen, both, "{what}: IPv4 TCP spread");
    let dns_peer = format!("[{CLUSTER_IP6}]:53");
    for op in ["udp-connected", "udp-unconnected"] {
        let seen = backends_answering(ns, op, (CLUSTER_IP6, 53), &dns_peer, true, 8);
        assert!(!seen.is_empty(), "{what}: {op}");
    }
}

/// `web` (dual-stack ClusterIP: HTTP and DNS) on web-0 (node a) and web-1 (node b), agents
/// started with `extra_args`, both families programmed.
fn cluster(extra_args: &[&str]) -> MultiNode {
    let mut c = MultiNode::new(&[&["web-0", "client-pod"], &["web-1"]], 0).unwrap();
    for name in ["web-0", "web-1"] {
        c.pod(name).serve(8080, 5353).unwrap();
    }
    let v4 = [c.pod("web-0").ip, c.pod("web-1").ip];
    let v6: Vec<Ipv6Addr> = ["web-0", "web-1"]
        .iter()
        .map(|p| c.pod(p).ip6.expect("routed pods are dual-stack"))
        .collect();
    c.write_manifest(
        "web.yaml",
        &dual_stack_service("web", (CLUSTER_IP, CLUSTER_IP6), &[HTTP, DNS], (&v4, &v6)),
    )
    .unwrap();
    c.start_agents(extra_args).unwrap();
    for agent in &c.agents {
        agent
            .wait_for_backends(&format!("{CLUSTER_IP}:80"), 2)
            .unwrap();
        agent
            .wait_for_backends(&format!("[{CLUSTER_IP6}]:80"), 2)
            .unwrap();
    }
    c
}

#[test]
fn host_clients_reach_a_dual_stack_service_over_both_families() {
    require_root!();
    let c = cluster(&[]);
    let node = &c.nodes[0].node.netns;
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let v6_peer = format!("[{CLUSTER_IP6}]:80");
    serves_both_families(node, "a host client");
    // An IPv6 socket to the IPv4 cluster IP, mapped (`::ffff:10.96.0.60`): the IPv4 service,
    // its IPv4 backends, the mapped frontend as the peer.
    let mapped = format!("::ffff:{CLUSTER_IP}");
    let seen = backends_answering(
        node,
        "tcp",
        (&mapped, 80),
        &format!("[{mapped}]:80"),
        false,
        16,
    );
    assert_eq!(seen, both, "IPv4-mapped TCP spread");

    // Counted per family's frontend.
    let services = c.agents[0].cli_json(&["services"]).unwrap();
    let connections = |frontend: &str| {
        services
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["frontend"] == frontend)
            .and_then(|s| s["socket_connections"].as_u64())
            .unwrap_or(0)
    };
    assert!(connections(&v6_peer) >= 16, "{services:#}");
    assert!(
        connections(&format!("{CLUSTER_IP}:80")) >= 32,
        "{services:#}"
    );
}

#[test]
fn pods_reach_a_dual_stack_service_over_both_families_with_socket_lb_all() {
    require_root!();
    let mut c = cluster(&["--socket-lb", "all"]);
    serves_both_families(
        &c.pod("client-pod").netns,
        "a pod, translated at the socket",
    );
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_host_clients_and_pods_at_once() {
    require_root!();
    let mut c = MultiNode::new(&[&["client-pod"], &[]], 0).unwrap();
    c.write_manifest(
        "empty.yaml",
        &dual_stack_service(
            "empty",
            ("10.96.0.61", "fd00:10:96::61"),
            &[HTTP, DNS],
            (&[], &[]),
        ),
    )
    .unwrap();
    c.start_agents(&[]).unwrap();
    c.agents[0]
        .wait_for_backends("[fd00:10:96::61]:80", 0)
        .unwrap();
    // A host client, at the socket.
    let answer = client(&c.nodes[0].node.netns, "tcp", "fd00:10:96::61", 80);
    assert_eq!(answer, "error ECONNREFUSED");
    // A pod, on the packet path: a TCP reset, and ICMPv6 port unreachable for UDP (which a
    // connected socket reports as refused).
    let pod = &c.pod("client-pod").netns;
    assert_eq!(
        client(pod, "tcp", "fd00:10:96::61", 80),
        "error ECONNREFUSED"
    );
    assert_eq!(
        client(pod, "udp-connected", "fd00:10:96::61", 53),
        "error ECONNREFUSED"
    );
    let client_ip6 = c.pod("client-pod").ip6.unwrap();
    let refused = c.agents[0]
        .cli_json(&[
            "trace",
            "--from",
            &client_ip6.to_string(),
            "--to",
            "[fd00:10:96::61]:80/TCP",
        ])
        .unwrap();
    assert!(
        refused["translated"].as_str().unwrap().ends_with("TCP RST")
            && refused["verdict"].as_str().unwrap().starts_with("answered"),
        "{refused:#}"
    );
}

/// Pods under the default `--socket-lb host`: their IPv6 connections take the tc packet path
/// (DNAT at the pod's veth, conntrack, the reply restored), with the client's own IPv6
/// address kept; the IPv4 path beside it is unchanged; a pod reaching itself through the
/// IPv6 service is answered (hairpin from `100::a9fe:2a01`).
#[test]
fn pods_reach_a_dual_stack_service_over_both_families_through_the_packet_path() {
    require_root!();
    let mut c = cluster(&[]);
    let client_ip6 = c.pod("client-pod").ip6.unwrap();
    let pod = &c.pod("client-pod").netns;
    let v6_peer = format!("[{CLUSTER_IP6}]:80");
    serves_both_families(pod, "a pod on the packet path");
    // Translated packets for web-0, on the client's node, enter its namespace directly: the
    // host end of its veth transmits none of them (each connection sends it at least a SYN,
    // an ACK, the request and a FIN).
    let web0_host_if = c.pod("web-0").host_if.clone();
    let node_a = &c.nodes[0].node;
    let pod = &node_a
        .pods
        .iter()
        .find(|p| p.name == "client-pod")
        .unwrap()
        .netns;
    let node_a = &node_a.netns;
    let transmitted_before = node_a.tx_packets(&web0_host_if).unwrap();
    let to_web0 = (0..24)
        .filter(|_| client(pod, "tcp", CLUSTER_IP6, 80).contains(" web-0 "))
        .count() as u64;
    let transmitted = node_a.tx_packets(&web0_host_if).unwrap() - transmitted_before;
    assert!(to_web0 > 0, "no IPv6 connection reached web-0");
    assert!(
        transmitted < to_web0,
        "{transmitted} packets went out of web-0's host veth for {to_web0} IPv6 connections"
    );
    // The backend saw the pod's own address (no SNAT inside the cluster).
    let answer = client(pod, "tcp", CLUSTER_IP6, 80);
    assert!(
        answer.contains(&format!("[{client_ip6}]:")),
        "the backend saw another source: {answer:?}"
    );
    // Flows through the packet path are counted on the IPv6 frontend.
    let flows = c.agents[0].cli_json(&["flows"]).unwrap();
    assert!(
        flows
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["frontend"] == v6_peer.as_str() && f["source"] == "packet"),
        "no IPv6 packet flow in {flows:#}"
    );
    // `trace` takes IPv6: the pod's next connection, explained and taken out again.
    let trace = c.agents[0]
        .cli_json(&[
            "trace",
            "--from",
            &format!("[{client_ip6}]:45678"),
            "--to",
            &format!("[{CLUSTER_IP6}]:80/TCP"),
        ])
        .unwrap();
    assert_eq!(trace["service"], "default/web", "{trace:#}");
    assert_eq!(
        trace["frontend"],
        format!("[{CLUSTER_IP6}]:80/TCP").as_str()
    );
    let backend = trace["backend"].as_str().unwrap_or_default().to_string();
    let web_ips6: Vec<Ipv6Addr> = ["web-0", "web-1"]
        .iter()
        .map(|p| c.pod(p).ip6.unwrap())
        .collect();
    assert!(
        web_ips6.iter().any(|ip| backend == format!("[{ip}]:8080")),
        "{trace:#}"
    );
    assert_eq!(
        trace["translated"],
        format!("[{client_ip6}]:45678 -> {backend} TCP").as_str()
    );
    assert!(
        trace["verdict"].as_str().unwrap().starts_with("forwarded"),
        "{trace:#}"
    );
    // Hairpin: web-0 through the IPv6 service, over and over, reaches itself too.
    let web0 = &c.pod("web-0").netns;
    let mut hairpinned = false;
    for _ in 0..24 {
        let answer = client(web0, "tcp", CLUSTER_IP6, 80);
        assert!(answer.starts_with(&v6_peer), "{answer:?}");
        if answer.contains(" web-0 [100::a9fe:2a01]:") {
            hairpinned = true;
            break;
        }
    }
    assert!(
        hairpinned,
        "web-0 never reached itself through the IPv6 service"
    );
}

/// A dual-stack NodePort service from a client outside the cluster: the node port on the
/// node's IPv6 address reaches both backends (the one on the other node through the
/// underlay, SNATed to the node's IPv6 address, as externalTrafficPolicy Cluster does), as
/// the node port on its IPv4 address does.
#[test]
fn an_external_client_reaches_a_dual_stack_node_port_over_both_families() {
    require_root!();
    let mut c = MultiNode::new(&[&["web-0"], &["web-1"]], 1).unwrap();
    for name in ["web-0", "web-1"] {
        c.pod(name).serve(8080, 5353).unwrap();
    }
    let v4 = [c.pod("web-0").ip, c.pod("web-1").ip];
    let v6: Vec<Ipv6Addr> = ["web-0", "web-1"]
        .iter()
        .map(|p| c.pod(p).ip6.unwrap())
        .collect();
    let manifest = dual_stack_service("np", ("10.96.0.62", "fd00:10:96::62"), &[HTTP], (&v4, &v6))
        .replacen("type: ClusterIP", "type: NodePort", 1)
        .replacen("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}", 1);
    c.write_manifest("np.yaml", &manifest).unwrap();
    c.start_agents(&[]).unwrap();
    let node_a6 = c.nodes[0].ip6;
    let frontend6 = format!("[{node_a6}]:30080");
    c.agents[0].wait_for_backends(&frontend6, 2).unwrap();
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let client_ns = &c.clients[0];
    let seen = backends_answering(
        client_ns,
        "tcp",
        (&node_a6.to_string(), 30080),
        &frontend6,
        true,
        16,
    );
    assert_eq!(seen, both, "IPv6 node port");
    // web-1 (the other node) saw node a's IPv6 address: SNAT, so its replies return there.
    let mut saw_snat = false;
    for _ in 0..16 {
        let answer = client(client_ns, "tcp", &node_a6.to_string(), 30080);
        if answer.contains(&format!(" web-1 [{node_a6}]:")) {
            saw_snat = true;
            break;
        }
    }
    assert!(
        saw_snat,
        "web-1 never answered from behind node a's IPv6 SNAT"
    );
    let node_a = c.nodes[0].ip.to_string();
    let seen = backends_answering(
        client_ns,
        "tcp",
        (&node_a, 30080),
        &format!("{node_a}:30080"),
        false,
        16,
    );
    assert_eq!(seen, both, "IPv4 node port");
}

/// Path MTU discovery through an IPv6 service: jumbo-frame pods (9001) over the 1500-byte
/// underlay, the backend on the other node. The node's "packet too big" about the
/// translated packet reaches the pod about the cluster IP, so its socket learns the path MTU.
#[test]
fn packet_too_big_from_the_node_teaches_the_pod_the_path_mtu_to_an_ipv6_cluster_ip() {
    require_root!();
    let options = testbed::multinode::ClusterOptions {
        pod_mtu: Some(9001),
        ..Default::default()
    };
    let mut c = MultiNode::with(&[&["client-pod"], &["web-1"]], 0, options).unwrap();
    c.pod("web-1").serve(8080, 5353).unwrap();
    let v4 = [c.pod("web-1").ip];
    let v6 = [c.pod("web-1").ip6.unwrap()];
    c.write_manifest(
        "web.yaml",
        &dual_stack_service("web", (CLUSTER_IP, CLUSTER_IP6), &[HTTP, DNS], (&v4, &v6)),
    )
    .unwrap();
    c.start_agents(&[]).unwrap();
    c.agents[0]
        .wait_for_backends(&format!("[{CLUSTER_IP6}]:53"), 1)
        .unwrap();
    // A connected UDP socket that may not fragment (IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO)
    // sends 3000 bytes until its path MTU (IPV6_MTU) drops or a send fails with EMSGSIZE.
    const PROBE: &str = r#"
import errno, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 23, 2)
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(30):
    try:
        s.send(b"x" * 3000)
    except OSError as e:
        if e.errno == errno.EMSGSIZE:
            print("emsgsize", s.getsockopt(socket.IPPROTO_IPV6, 24))
            sys.exit()
        raise
    time.sleep(0.1)
    mtu = s.getsockopt(socket.IPPROTO_IPV6, 24)
    if mtu < 9000:
        print("mtu", mtu)
        sys.exit()
print("never", s.getsockopt(socket.IPPROTO_IPV6, 24))
"#;
    let pod = &c.pod("client-pod").netns;
    let probe = |host: &str, port: &str| {
        let out = pod
            .command("python3")
            .args(["-c", PROBE, host, port])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &String::from_utf8_lossy(&out.stderr)
    };
    // The testbed's own path MTU discovery, nothing translated: straight to the backend.
    let direct = probe(&v6[0].to_string(), "5353");
    assert!(
        direct.starts_with("mtu 1500") || direct.starts_with("emsgsize 1500"),
        "pod to pod: {direct}"
    );
    let out = probe(CLUSTER_IP6, "53");
    assert!(
        out.starts_with("mtu 1500") || out.starts_with("emsgsize 1500"),
        "the pod's socket never learned the path MTU to the IPv6 cluster IP: {out}"
    );
}

/// Held IPv6 connections, from a pod (packet path) and from the node (socket), through the
/// IPv6 cluster IP keep their backends, as kube-proxy's conntrack semantics say, across an
/// agent restart, the rolling update's first step (the endpoints terminating, still serving)
/// and the endpoint's removal from its slice (TCP keeps going to the old pod).
#[test]
fn held_ipv6_connections_survive_a_restart_and_a_rolling_update() {
    require_root!();
    let lines = ServicePort {
        name: "lines",
        protocol: "TCP",
        port: 9000,
        target_port: 9000,
    };
    let mut c = MultiNode::new(&[&["web-0", "client-pod"], &["web-1"]], 0).unwrap();
    for name in ["web-0", "web-1"] {
        c.pod(name)
            .serve_with_line_echo(8080, 5353, Some(9000))
            .unwrap();
    }
    let v4 = [c.pod("web-0").ip, c.pod("web-1").ip];
    let v6: Vec<Ipv6Addr> = ["web-0", "web-1"]
        .iter()
        .map(|p| c.pod(p).ip6.unwrap())
        .collect();
    let manifest = |v6_conditions: &str, v6: &[Ipv6Addr]| {
        let ports = [ServicePort { ..lines }];
        let text = dual_stack_service("web", (CLUSTER_IP, CLUSTER_IP6), &ports, (&v4, v6));
        let (v4_part, v6_part) = text.split_once("addressType: IPv6").unwrap();
        format!(
            "{v4_part}addressType: IPv6{}",
            v6_part.replace(
                "ready: true, serving: true, terminating: false",
                v6_conditions
            )
        )
    };
    c.write_manifest(
        "web.yaml",
        &manifest("ready: true, serving: true, terminating: false", &v6),
    )
    .unwrap();
    c.start_agents(&[]).unwrap();
    c.agents[0]
        .wait_for_backends(&format!("[{CLUSTER_IP6}]:9000"), 2)
        .unwrap();
    let target = format!("[{CLUSTER_IP6}]:9000");
    let mut held: Vec<(String, testbed::LineConnection)> = Vec::new();
    for i in 0..4 {
        let from_pod =
            testbed::LineConnection::open(&c.pod("client-pod").netns, &target, None).unwrap();
        held.push((format!("pod {i}"), from_pod));
        let from_node =
            testbed::LineConnection::open(&c.nodes[0].node.netns, &target, None).unwrap();
        held.push((format!("node {i}"), from_node));
    }
    // Each connection's backend, by its first answer.
    let mut backend_of = Vec::new();
    for (name, conn) in &mut held {
        let answer = conn.exchange("hello").unwrap();
        backend_of.push((
            name.clone(),
            answer.split_whitespace().next().unwrap().to_string(),
        ));
    }
    let check = |step: &str, held: &mut Vec<(String, testbed::LineConnection)>| {
        for ((name, conn), (_, backend)) in held.iter_mut().zip(&backend_of) {
            let answer = conn
                .exchange(step)
                .unwrap_or_else(|e| panic!("{name} broke at {step}: {e}"));
            assert!(
                answer.starts_with(backend.as_str()),
                "{name} moved from {backend} at {step}: {answer}"
            );
        }
    };
    check("before", &mut held);
    c.agents[0].restart().unwrap();
    check("after a restart", &mut held);
    c.write_manifest(
        "web.yaml",
        &manifest("ready: false, serving: true, terminating: true", &v6),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    check("endpoints terminating", &mut held);
    c.write_manifest(
        "web.yaml",
        &manifest("ready: true, serving: true, terminating: false", &v6[1..]),
    )
    .unwrap();
    c.agents[0]
        .wait_for_backends(&format!("[{CLUSTER_IP6}]:9000"), 1)
        .unwrap();
    check("web-0 gone from the slice", &mut held);
}

/// An IPv6 load-balancer IP from outside: externalTrafficPolicy Local keeps the client's
/// IPv6 address and uses this node's endpoint only, loadBalancerSourceRanges (IPv6) admit
/// one client and drop the other, and sessionAffinity ClientIP holds.
#[test]
fn an_ipv6_load_balancer_ip_keeps_the_client_and_its_source_ranges() {
    require_root!();
    let mut c = MultiNode::new(&[&["web-0"], &["web-1"]], 2).unwrap();
    for name in ["web-0", "web-1"] {
        c.pod(name).serve(8080, 5353).unwrap();
    }
    let (web0, web1) = (c.pod("web-0").ip6.unwrap(), c.pod("web-1").ip6.unwrap());
    let lb_ip = "2001:db8:1::10";
    let allowed = testbed::multinode::underlay_ip6(100);
    let endpoint = |ip: Ipv6Addr, node: &str| {
        format!("  - {{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}\n")
    };
    let manifest = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: lb6, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: fd00:10:96::63
  clusterIPs: [\"fd00:10:96::63\"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [\"{allowed}/128\"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30091}}
status: {{loadBalancer: {{ingress: [{{ip: \"{lb_ip}\"}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb6-v6abc
  namespace: default
  labels: {{kubernetes.io/service-name: lb6}}
addressType: IPv6
ports:
  - {{name: http, protocol: TCP, port: 8080}}
endpoints:
{}{}",
        endpoint(web0, "node-a"),
        endpoint(web1, "node-b")
    );
    c.write_manifest("lb6.yaml", &manifest).unwrap();
    c.start_agents(&[]).unwrap();
    let frontend = format!("[{lb_ip}]:80");
    // Node a's view under the Local policy: its own endpoint only.
    c.agents[0].wait_for_backends(&frontend, 1).unwrap();
    // The load balancer delivers to node a.
    for client in &c.clients {
        client
            .ip(&[
                "-6",
                "route",
                "add",
                "2001:db8:1::/64",
                "via",
                &c.nodes[0].ip6.to_string(),
            ])
            .unwrap();
    }
    let answers: Vec<String> = (0..8)
        .map(|_| client(&c.clients[0], "tcp", lb_ip, 80))
        .collect();
    for answer in &answers {
        assert_eq!(
            answer,
            &format!("[{lb_ip}]:80 web-0 [{allowed}]:{}", port_of(answer)),
            "the Local policy keeps the client's address and node a's endpoint"
        );
    }
    // The other client is outside the source ranges: dropped, so its connect times out.
    let refused = client(&c.clients[1], "tcp", lb_ip, 80);
    assert!(refused.starts_with("error"), "{refused}");
}

/// The client port in an answer's `[addr]:port` peer.
fn port_of(answer: &str) -> &str {
    answer.rsplit(':').next().unwrap_or("")
}
