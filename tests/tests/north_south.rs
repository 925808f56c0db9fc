//! Traffic from outside the node, across two nodes on an underlay: NodePort, LoadBalancer and
//! external IPs with both external traffic policies, health check node ports, session
//! affinity, source ranges, internal traffic policy, topology hints, and bad input. Real
//! agents, servers and clients in namespaces; run as root (skipped otherwise).
use std::{net::Ipv4Addr, time::Duration};

use testbed::{
    Netns, http_requests,
    manifests::{NodeEndpoint, service_on_nodes},
    multinode::{MultiNode, underlay_ip},
    require_root, tally, udp_request, wait_until,
};

const NODE_A: &str = "192.0.2.11";
const NODE_B: &str = "192.0.2.12";
const CLIENT: &str = "192.0.2.100";

/// A service with an HTTP (TCP 80 -> 8080) and a DNS (UDP 53 -> 5353) port (`spec_extra`
/// names them), and one EndpointSlice with `endpoints` as (address, node, zone hint).
fn service(
    name: &str,
    cluster_ip: &str,
    spec_extra: &str,
    status: &str,
    endpoints: &[Endpoint],
) -> String {
    let slice_ports = [("http", "TCP", 8080), ("dns", "UDP", 5353)];
    service_on_nodes(
        name,
        cluster_ip,
        spec_extra,
        status,
        &slice_ports,
        endpoints,
    )
}

fn ports(http_node_port: u16, dns_node_port: u16) -> String {
    format!(
        "  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: {http_node_port}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: {dns_node_port}}}"
    )
}

/// Two nodes with pods a1 (node-a) and b1 (node-b) serving, and `clients` external clients.
fn cluster(extra_pods: [&[&str]; 2], clients: usize) -> MultiNode {
    let a: Vec<&str> = ["a1"].iter().chain(extra_pods[0]).copied().collect();
    let b: Vec<&str> = ["b1"].iter().chain(extra_pods[1]).copied().collect();
    let mut cluster = MultiNode::new(&[&a, &b], clients).unwrap();
    for name in ["a1", "b1"] {
        cluster.pod(name).serve(8080, 5353).unwrap();
    }
    cluster.start_agents(&[]).unwrap();
    cluster
}

fn ip_of(cluster: &mut MultiNode, pod: &str) -> Ipv4Addr {
    cluster.pod(pod).ip
}

type Endpoint = NodeEndpoint<'static>;

/// `cluster` with no extra pods, and a1 and b1 as endpoints on their nodes.
fn cluster_with_endpoints(clients: usize) -> (MultiNode, [Endpoint; 2]) {
    let mut c = cluster([&[], &[]], clients);
    let (a1, b1) = (ip_of(&mut c, "a1"), ip_of(&mut c, "b1"));
    (c, [(a1, "node-a", None), (b1, "node-b", None)])
}

/// The spec of a NodePort service with `ports`.
fn node_port(http_node_port: u16, dns_node_port: u16) -> String {
    format!("  type: NodePort\n{}", ports(http_node_port, dns_node_port))
}

/// The spec of a LoadBalancer service with `ports`, and `spec_extra` (lines, each ending in
/// a newline).
fn load_balancer(spec_extra: &str, http_node_port: u16, dns_node_port: u16) -> String {
    format!(
        "  type: LoadBalancer\n{spec_extra}{}",
        ports(http_node_port, dns_node_port)
    )
}

/// A Service status with one load balancer ingress IP.
fn ingress(ip: &str) -> String {
    format!("loadBalancer: {{ingress: [{{ip: {ip}}}]}}")
}

/// Writes `service(..)` as the manifest `file`.
fn apply(
    c: &MultiNode,
    file: &str,
    name: &str,
    cluster_ip: &str,
    spec: &str,
    status: &str,
    endpoints: &[Endpoint],
) {
    c.write_manifest(file, &service(name, cluster_ip, spec, status, endpoints))
        .unwrap();
}

/// One HTTP GET with a short timeout: ("ok" body | "refused" | "timeout").
fn probe(client: &Netns, url: &str) -> String {
    let out = client
        .command("curl")
        .args(["-s", "--max-time", "1", url])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Some(7) => "refused".into(),
        Some(28) => "timeout".into(),
        other => format!("curl exit {other:?}"),
    }
}

/// Status code, headers and body of an HTTP GET.
fn http_get(client: &Netns, url: &str) -> (u16, String, String) {
    let out = client
        .command("curl")
        .args(["-s", "-i", "--max-time", "2", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), body.to_string())
}

fn wait_backends(cluster: &MultiNode, node: usize, frontend: &str, backends: usize) {
    cluster.agents[node]
        .wait_for_backends(frontend, backends)
        .unwrap();
}

#[test]
fn node_ports_reach_backends_on_both_nodes_with_the_node_as_source() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    apply(
        &c,
        "web.yaml",
        "web",
        "10.96.1.10",
        &node_port(30080, 30053),
        "",
        &eps,
    );
    wait_backends(&c, 0, "192.0.2.11:30080", 2);
    wait_backends(&c, 1, "192.0.2.12:30080", 2);

    for node_ip in [NODE_A, NODE_B] {
        let answers = http_requests(&c.clients[0], &format!("http://{node_ip}:30080/"), 60);
        let (by_backend, peers) = tally(&answers);
        assert_eq!(by_backend.len(), 2, "via {node_ip}: {by_backend:?}");
        // externalTrafficPolicy Cluster: SNAT to the node, so replies come back through it.
        assert!(
            peers.iter().all(|p| p == node_ip),
            "via {node_ip}: {peers:?}"
        );
        for port in 0..4 {
            let answer = udp_request(
                &c.clients[0],
                &format!("{node_ip}:30053"),
                Some(41000 + port),
                "q",
            )
            .unwrap();
            assert!(
                answer.ends_with(" q") && answer.contains(node_ip),
                "{answer}"
            );
        }
    }
}

#[test]
fn load_balancer_and_external_ips_are_served() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    let spec = load_balancer("  externalIPs: [198.51.100.20]\n", 30081, 30054);
    let status = "loadBalancer: {ingress: [{ip: 198.51.100.10}, {hostname: lb.example.invalid}]}";
    apply(&c, "lb.yaml", "lb", "10.96.1.11", &spec, status, &eps);
    wait_backends(&c, 0, "198.51.100.10:80", 2);
    wait_backends(&c, 0, "198.51.100.20:80", 2);
    for vip in ["198.51.100.10", "198.51.100.20"] {
        let (by_backend, peers) =
            tally(&http_requests(&c.clients[0], &format!("http://{vip}/"), 40));
        assert_eq!(by_backend.len(), 2, "{vip}: {by_backend:?}");
        assert!(peers.iter().all(|p| p == NODE_A), "{vip}: {peers:?}");
        let answer = udp_request(&c.clients[0], &format!("{vip}:53"), None, "q").unwrap();
        assert!(answer.ends_with(" q"), "{answer}");
    }
    assert!(
        c.agents[0].log_text().contains("hostname only"),
        "the hostname-only ingress is reported"
    );
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_health_checks_follow_endpoints() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    let spec = |http| {
        load_balancer(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
            http,
            30055,
        )
    };
    let status = &ingress("198.51.100.30");
    let serve_from = |endpoints: &[Endpoint]| {
        apply(
            &c,
            "local.yaml",
            "local",
            "10.96.1.12",
            &spec(30082),
            status,
            endpoints,
        )
    };
    serve_from(&eps[..1]);
    wait_backends(&c, 0, "192.0.2.11:30082", 1);
    wait_backends(&c, 1, "192.0.2.12:30082", 0);

    // Node A has the endpoint: the backend sees the external client's own address.
    let answers = http_requests(&c.clients[0], "http://192.0.2.11:30082/", 10);
    let (by_backend, peers) = tally(&answers);
    assert_eq!(by_backend.get("a1"), Some(&10));
    assert!(
        peers.iter().all(|p| p == CLIENT),
        "source not preserved: {peers:?}"
    );
    // Node B has none: it drops (kube-proxy drops, it does not refuse).
    assert_eq!(probe(&c.clients[0], "http://192.0.2.12:30082/"), "timeout");

    // The health check node port says which node to send traffic to.
    let check = |node: &str| http_get(&c.clients[0], &format!("http://{node}:32100/"));
    wait_until(Duration::from_secs(5), || check(NODE_A).0 == 200).unwrap();
    let (code, head, body) = check(NODE_A);
    assert_eq!(code, 200, "{head}{body}");
    assert!(
        head.to_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["service"]["name"], "local");
    assert_eq!(json["localEndpoints"], 1);
    assert_eq!(json["serviceProxyHealthy"], true);
    let (code, _, body) = check(NODE_B);
    assert_eq!(code, 503, "{body}");

    // The endpoint moves to node B: the checks follow.
    serve_from(&eps[1..]);
    wait_until(Duration::from_secs(5), || {
        check(NODE_A).0 == 503 && check(NODE_B).0 == 200
    })
    .unwrap();
    let (by_backend, peers) = tally(&http_requests(&c.clients[0], "http://192.0.2.12:30082/", 5));
    assert_eq!(by_backend.get("b1"), Some(&5));
    assert!(peers.iter().all(|p| p == CLIENT), "{peers:?}");

    // Node-level health, as kube-proxy serves it.
    for node in [NODE_A, NODE_B] {
        for path in ["healthz", "livez"] {
            let (code, _, body) = http_get(&c.clients[0], &format!("http://{node}:10256/{path}"));
            assert_eq!(code, 200, "{node}/{path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                json["lastUpdated"].is_string() && json["currentTime"].is_string(),
                "{body}"
            );
        }
    }
}

#[test]
fn session_affinity_holds_across_connections_and_frontends_then_expires() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    let spec = load_balancer(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n",
        30083,
        30056,
    );
    let status = &ingress("198.51.100.40");
    apply(
        &c,
        "sticky.yaml",
        "sticky",
        "10.96.1.13",
        &spec,
        status,
        &eps,
    );
    wait_backends(&c, 0, "192.0.2.11:30083", 2);
    wait_backends(&c, 0, "198.51.100.40:80", 2);

    let (by_backend, _) = tally(&http_requests(
        &c.clients[0],
        "http://192.0.2.11:30083/",
        50,
    ));
    assert_eq!(
        by_backend.len(),
        1,
        "50 connections, one backend: {by_backend:?}"
    );
    let first = by_backend.keys().next().unwrap().clone();
    // Another frontend of the same service port, on the same node: the same backend.
    let (via_lb, _) = tally(&http_requests(&c.clients[0], "http://198.51.100.40/", 10));
    assert_eq!(
        via_lb.keys().collect::<Vec<_>>(),
        vec![&first],
        "{via_lb:?}"
    );

    // After the timeout the choice is free again (each round: idle past the timeout, then
    // a new connection; the chance of 10 rounds all landing on one backend is 1/1024).
    let mut seen = std::collections::BTreeSet::from([first.clone()]);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(2300));
        let (round, _) = tally(&http_requests(&c.clients[0], "http://192.0.2.11:30083/", 1));
        seen.extend(round.into_keys());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "affinity never expired: only {seen:?}");
}

#[test]
fn source_ranges_limit_the_load_balancer_ip_only() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(2);
    let spec = load_balancer(
        &format!("  loadBalancerSourceRanges: [\"{CLIENT}/32\"]\n"),
        30084,
        30057,
    );
    let status = &ingress("198.51.100.50");
    apply(
        &c,
        "ranged.yaml",
        "ranged",
        "10.96.1.14",
        &spec,
        status,
        &eps,
    );
    wait_backends(&c, 0, "198.51.100.50:80", 2);
    assert!(
        probe(&c.clients[0], "http://198.51.100.50/").starts_with(['a', 'b']),
        "allowed client refused"
    );
    assert_eq!(
        probe(&c.clients[1], "http://198.51.100.50/"),
        "timeout",
        "client outside the ranges got through"
    );
    // Other frontends of the service are not limited.
    assert!(probe(&c.clients[1], "http://192.0.2.11:30084/").starts_with(['a', 'b']));
    let outside = underlay_ip(101).to_string();
    assert_ne!(outside, CLIENT);
}

#[test]
fn internal_traffic_policy_local_and_zone_hints_keep_pod_traffic_close() {
    require_root!();
    let mut c = cluster([&["client-a"], &["client-b"]], 0);
    let (a1, b1) = (ip_of(&mut c, "a1"), ip_of(&mut c, "b1"));
    let both = [(a1, "node-a", None), (b1, "node-b", None)];
    let ports = "  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]";
    let itp_spec = format!("  internalTrafficPolicy: Local\n{ports}");
    let itp = |endpoints: &[Endpoint]| {
        apply(
            &c,
            "itp.yaml",
            "itp",
            "10.96.1.15",
            &itp_spec,
            "",
            endpoints,
        )
    };
    itp(&both);
    let hinted = [
        (a1, "node-a", Some("zone-a")),
        (b1, "node-b", Some("zone-b")),
    ];
    apply(
        &c,
        "zonal.yaml",
        "zonal",
        "10.96.1.16",
        &format!("  trafficDistribution: PreferSameZone\n{ports}"),
        "",
        &hinted,
    );
    apply(
        &c,
        "remote.yaml",
        "remote",
        "10.96.1.17",
        ports,
        "",
        &[(b1, "node-b", None)],
    );
    for node in 0..2 {
        wait_backends(&c, node, "10.96.1.15:80", 1);
        wait_backends(&c, node, "10.96.1.16:80", 1);
    }
    let find = |node: usize, name: &str| {
        c.nodes[node]
            .node
            .pods
            .iter()
            .position(|p| p.name == name)
            .unwrap()
    };
    let (ia, ib) = (find(0, "client-a"), find(1, "client-b"));
    let client_a = &c.nodes[0].node.pods[ia].netns;
    let client_b = &c.nodes[1].node.pods[ib].netns;
    for (client, local) in [(client_a, "a1"), (client_b, "b1")] {
        for vip in ["10.96.1.15", "10.96.1.16"] {
            let (by_backend, _) = tally(&http_requests(client, &format!("http://{vip}/"), 20));
            assert_eq!(
                by_backend.keys().collect::<Vec<_>>(),
                vec![local],
                "{vip}: {by_backend:?}"
            );
        }
    }
    // A pod reaching a backend on the other node through a cluster IP: replies come back
    // through the node's external interface and are restored there.
    let (by_backend, peers) = tally(&http_requests(client_a, "http://10.96.1.17/", 5));
    assert_eq!(by_backend.get("b1"), Some(&5));
    assert!(
        peers
            .iter()
            .all(|p| *p == c.nodes[0].node.pods[ia].ip.to_string()),
        "{peers:?}"
    );

    // internalTrafficPolicy Local with no endpoint on the node: dropped, not refused.
    itp(&both[..1]);
    wait_backends(&c, 1, "10.96.1.15:80", 0);
    let client_b = &c.nodes[1].node.pods[ib].netns;
    assert_eq!(probe(client_b, "http://10.96.1.15/"), "timeout");
}

#[test]
fn bad_external_settings_are_reported_and_skipped() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    apply(
        &c,
        "out-of-range.yaml",
        "outofrange",
        "10.96.1.20",
        &node_port(20080, 30058),
        "",
        &eps,
    );
    apply(
        &c,
        "first.yaml",
        "first",
        "10.96.1.21",
        &node_port(30090, 30059),
        "",
        &eps,
    );
    apply(
        &c,
        "second.yaml",
        "second",
        "10.96.1.22",
        &node_port(30090, 30060),
        "",
        &eps,
    );
    let bad_ranges = load_balancer(
        "  loadBalancerSourceRanges: [\"not-a-cidr\"]\n",
        30091,
        30061,
    );
    apply(
        &c,
        "bad-ranges.yaml",
        "badranges",
        "10.96.1.23",
        &bad_ranges,
        &ingress("198.51.100.60"),
        &eps,
    );
    wait_backends(&c, 0, "10.96.1.20:80", 2);
    wait_backends(&c, 0, "192.0.2.11:30090", 2);
    wait_until(Duration::from_secs(5), || {
        c.agents[0].log_text().contains("not-a-cidr")
    })
    .unwrap();
    let log = c.agents[0].log_text();
    assert!(
        log.contains("nodePort 20080 is outside the node port range"),
        "{log}"
    );
    assert!(
        log.contains("is already used by Service default/first"),
        "{log}"
    );
    // What is valid works: the cluster IP of the bad node port, the first owner of 30090.
    assert!(probe(&c.clients[0], "http://192.0.2.11:30090/").starts_with(['a', 'b']));
    // Not a frontend: the node's own stack answers, with nothing listening there.
    assert_eq!(probe(&c.clients[0], "http://192.0.2.11:20080/"), "refused");
    // No valid source range: the load balancer IP is not served rather than open to all.
    let answer = probe(&c.clients[0], "http://198.51.100.60/");
    assert!(
        answer == "refused" || answer == "timeout",
        "served: {answer}"
    );
    assert!(probe(&c.clients[0], "http://192.0.2.11:30091/").starts_with(['a', 'b']));
}

#[test]
fn icmp_errors_about_node_port_flows_reach_the_external_client() {
    require_root!();
    let (c, eps) = cluster_with_endpoints(1);
    // The slice's UDP port is one nothing listens on: a1 answers ICMP port unreachable to the
    // node's SNAT address; the client must get it about the node port it used.
    let manifest = service_on_nodes(
        "closed",
        "10.96.1.30",
        &node_port(30092, 30062),
        "",
        &[("http", "TCP", 8080), ("dns", "UDP", 5999)],
        &eps[..1],
    );
    c.write_manifest("closed.yaml", &manifest).unwrap();
    wait_backends(&c, 0, "192.0.2.11:30062", 1);
    let probe = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
t = time.monotonic()
try:
    s.send(b"hello")
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused", time.monotonic() - t)
except socket.timeout:
    print("timeout")
"#;
    let out = c.clients[0]
        .run("python3", &["-c", probe, NODE_A, "30062"])
        .unwrap();
    assert!(out.starts_with("refused"), "{out}");
}
