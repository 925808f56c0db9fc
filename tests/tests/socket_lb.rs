//! Socket-level load balancing (`--socket-lb`): host-network clients (processes in a node's
//! namespace and cgroup) reach every kind of frontend over TCP, connected and unconnected UDP,
//! see the service address as their peer, are refused at once without endpoints, keep
//! affinity, and are moved off a backend that leaves; processes outside the node's namespace
//! or cgroup are left alone; `host` leaves pods to the tc path, `all` translates them too.
//! Real agents, servers and clients in namespaces and per-node cgroups; run as root (skipped
//! otherwise).
use std::{net::Ipv4Addr, time::Duration};

use testbed::{
    Agent, LineConnection, Netns,
    manifests::{DNS, HTTP, READY, ServicePort, service, service_with},
    multinode::MultiNode,
    require_root, wait_until,
};

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_A: &str = "192.0.2.11";
const NODE_PORT: u16 = 30080;
const LINES: u16 = 9000;

/// What a host client does, one operation per run, printed as one line:
/// `tcp HOST PORT`: connect, print the peer name and the HTTP answer;
/// `udp-connected HOST PORT`: connect, send, print the peer name and the answer;
/// `udp-unconnected HOST PORT`: sendto, print the answer's source and the answer;
/// `connect-only HOST PORT`: connect a UDP socket (no packet), print the peer name.
/// Errors print as `error <errno name> <seconds taken>`.
const CLIENT: &str = r#"
import errno, socket, sys, time
op, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.monotonic()
try:
    if op == "tcp":
        s = socket.create_connection((host, port), 3)
        peer = s.getpeername()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        body = s.makefile("rb").read().split(b"\r\n\r\n", 1)[1].decode().strip()
        print("%s:%d %s" % (peer[0], peer[1], body))
    elif op == "udp-connected":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((host, port))
        peer = s.getpeername()
        s.send(b"q")
        print("%s:%d %s" % (peer[0], peer[1], s.recv(2048).decode()))
    elif op == "udp-unconnected":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"q", (host, port))
        data, src = s.recvfrom(2048)
        print("%s:%d %s" % (src[0], src[1], data.decode()))
    elif op == "connect-only":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, port))
        peer = s.getpeername()
        print("%s:%d" % peer)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, str(e)), "%.3f" % (time.monotonic() - start))
"#;

fn client(ns: &Netns, op: &str, host: &str, port: u16) -> String {
    output(
        ns.command("python3")
            .args(["-c", CLIENT, op, host, &port.to_string()]),
    )
}

/// A command's stdout, trimmed, or what went wrong.
fn output(command: &mut std::process::Command) -> String {
    match command.output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => format!(
            "client failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("client failed: {e}"),
    }
}

/// `answer` shows `peer` as the socket's peer, answered by one of `backends`; the backend's
/// name.
fn answered_by<'a>(answer: &str, peer: &str, backends: &[&'a str]) -> Result<&'a str, String> {
    let mut words = answer.split_whitespace();
    let (seen_peer, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if seen_peer != peer {
        return Err(format!("peer {seen_peer:?}, expected {peer}: {answer:?}"));
    }
    backends
        .iter()
        .find(|b| **b == name)
        .copied()
        .ok_or_else(|| format!("answered by {name:?}, expected one of {backends:?}: {answer:?}"))
}

/// The socket-translated connections the agent counted for `frontend`.
fn socket_connections(agent: &Agent, frontend: &str) -> u64 {
    agent
        .cli_json(&["services"])
        .ok()
        .and_then(|v| {
            v.as_array()?
                .iter()
                .find(|s| s["frontend"] == frontend)
                .and_then(|s| s["socket_connections"].as_u64())
        })
        .unwrap_or(0)
}

/// `web` (ClusterIP with a node port; HTTP and DNS ports) on web-0 (node a) and web-1
/// (node b); agents on both nodes in the given mode.
fn cluster(extra_args: &[&str]) -> MultiNode {
    let mut c = MultiNode::new(&[&["web-0", "client-pod"], &["web-1"]], 0).unwrap();
    for name in ["web-0", "web-1"] {
        c.pod(name)
            .serve_with_line_echo(8080, 5353, Some(LINES))
            .unwrap();
    }
    let ips = [c.pod("web-0").ip, c.pod("web-1").ip];
    c.write_manifest("web.yaml", &web(&ips)).unwrap();
    c.start_agents(extra_args).unwrap();
    for agent in &c.agents {
        agent
            .wait_for_backends(&format!("{CLUSTER_IP}:80"), ips.len())
            .unwrap();
    }
    c
}

/// The line echo servers' port, for connections held open.
const LINES_PORT: ServicePort<'static> = ServicePort {
    name: "lines",
    protocol: "TCP",
    port: LINES,
    target_port: LINES,
};

/// `web` as a NodePort service (HTTP on node port 30080), all `endpoints` ready.
fn web(endpoints: &[Ipv4Addr]) -> String {
    service("web", CLUSTER_IP, &[HTTP, DNS, LINES_PORT], endpoints)
        .replacen("type: ClusterIP", "type: NodePort", 1)
        .replacen(
            "port: 80, targetPort: 8080}",
            &format!("port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}"),
            1,
        )
}

#[test]
fn host_clients_reach_cluster_ips_and_node_ports_and_see_the_service_address() {
    require_root!();
    let c = cluster(&[]);
    let node = &c.nodes[0].node.netns;
    let backends = ["web-0", "web-1"];
    let mut failures = vec![];
    let mut check = |what: &str, result: Result<&str, String>| match result {
        Ok(b) => println!("ok     {what}: {b}"),
        Err(e) => {
            println!("FAILED {what}: {e}");
            failures.push(format!("{what}: {e}"));
        }
    };
    let cluster_http = format!("{CLUSTER_IP}:80");
    let cluster_dns = format!("{CLUSTER_IP}:53");
    for (op, port, peer) in [
        ("tcp", 80, &cluster_http),
        ("udp-connected", 53, &cluster_dns),
        ("udp-unconnected", 53, &cluster_dns),
    ] {
        let answer = client(node, op, CLUSTER_IP, port);
        check(
            &format!("{op} to the cluster IP"),
            answered_by(&answer, peer, &backends),
        );
    }
    let answer = client(node, "tcp", NODE_A, NODE_PORT);
    check(
        "tcp to the node's own node port",
        answered_by(&answer, &format!("{NODE_A}:{NODE_PORT}"), &backends),
    );
    let seen = socket_connections(&c.agents[0], &cluster_http);
    assert!(
        failures.is_empty(),
        "{} step(s) failed:\n  {}\nagent log:\n{}",
        failures.len(),
        failures.join("\n  "),
        c.agents[0].log_text()
    );
    assert!(
        seen >= 1,
        "services shows {seen} socket connections for {cluster_http}"
    );
}

/// `sticky` (sessionAffinity ClientIP, on web-0 and web-1) and `empty` (no endpoints).
fn sticky_and_empty(ips: &[Ipv4Addr]) -> String {
    let ready: Vec<_> = ips.iter().map(|ip| (*ip, READY)).collect();
    let sticky = service_with(
        "sticky",
        "10.96.0.30",
        &[HTTP],
        &ready,
        "  sessionAffinity: ClientIP\n",
    );
    let empty = service("empty", "10.96.0.31", &[HTTP, DNS], &[]);
    format!("{sticky}\n---\n{empty}")
}

#[test]
fn a_service_without_endpoints_refuses_at_connect_and_affinity_holds_for_host_clients() {
    require_root!();
    let c = cluster(&[]);
    let ips = [c.nodes[0].node.pods[0].ip, c.nodes[1].node.pods[0].ip];
    c.write_manifest("more.yaml", &sticky_and_empty(&ips))
        .unwrap();
    let agent = &c.agents[0];
    agent.wait_for_backends("10.96.0.30:80", 2).unwrap();
    agent.wait_for_backends("10.96.0.31:80", 0).unwrap();
    let node = &c.nodes[0].node.netns;
    for (op, port) in [("tcp", 80), ("udp-connected", 53)] {
        let answer = client(node, op, "10.96.0.31", port);
        let words: Vec<&str> = answer.split_whitespace().collect();
        match words.as_slice() {
            ["error", "ECONNREFUSED", seconds] => assert!(
                seconds.parse::<f64>().unwrap() < 0.5,
                "{op}: refused only after {seconds} s"
            ),
            _ => panic!("{op} to a service without endpoints: {answer:?}, expected ECONNREFUSED"),
        }
    }
    let backends: Vec<String> = (0..10)
        .map(|_| {
            let answer = client(node, "tcp", "10.96.0.30", 80);
            answered_by(&answer, "10.96.0.30:80", &["web-0", "web-1"])
                .unwrap_or_else(|e| panic!("sticky: {e}"))
                .to_string()
        })
        .collect();
    assert!(
        backends.iter().all(|b| *b == backends[0]),
        "session affinity not kept for a host client: {backends:?}"
    );
    // `trace --entry host` makes a real connection from the node and shows its translation.
    let trace = |to: &str| -> serde_json::Value {
        let out = output(
            node.command(testbed::agent_binary().to_str().unwrap())
                .args(["trace", "--entry", "host", "--to", to, "-o", "json"])
                .arg("--bpffs-dir")
                .arg(&agent.bpffs_dir),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("trace {to}: {e}: {out}"))
    };
    let sticky = trace("10.96.0.30:80/TCP");
    assert_eq!(sticky["verdict"], "translated at connect()", "{sticky}");
    assert_eq!(sticky["service"], "default/sticky", "{sticky}");
    let web = if backends[0] == "web-0" {
        ips[0]
    } else {
        ips[1]
    };
    assert_eq!(sticky["backend"], format!("{web}:8080"), "{sticky}");
    let empty = trace("10.96.0.31:53/UDP");
    assert_eq!(
        empty["verdict"], "refused at connect(): no endpoints",
        "{empty}"
    );
}

#[test]
fn sockets_outside_the_nodes_namespace_or_cgroup_are_not_translated() {
    require_root!();
    let c = cluster(&[]);
    let agent = &c.agents[0];
    let node = &c.nodes[0].node;
    let cgroup = node
        .netns
        .cgroup
        .as_ref()
        .expect("testbed nodes have a cgroup");
    let frontend = format!("{CLUSTER_IP}:53");
    let args = ["-c", CLIENT, "connect-only", CLUSTER_IP, "53"];
    let before = socket_connections(agent, &frontend);
    let outsiders = [
        (
            "node namespace, outside the node's cgroup",
            output(node.netns.command_outside_cgroup("python3").args(args)),
        ),
        (
            "node's cgroup, root namespace",
            output(cgroup.command("python3").args(args)),
        ),
        (
            "a pod (node's cgroup, pod namespace; --socket-lb host)",
            output(node.pods[1].netns.command("python3").args(args)),
        ),
        (
            "node b (its own agent translates it)",
            output(c.nodes[1].node.netns.command("python3").args(args)),
        ),
    ];
    for (who, answer) in &outsiders {
        assert_eq!(answer, &frontend, "{who}: connect-only answered {answer:?}");
    }
    assert_eq!(
        socket_connections(agent, &frontend),
        before,
        "node a's agent translated a socket outside its node: {outsiders:?}"
    );
    // The same call from the node itself is translated (and counted).
    let answer = output(node.netns.command("python3").args(args));
    assert_eq!(answer, frontend);
    assert_eq!(socket_connections(agent, &frontend), before + 1);
}

/// A resolver on a connected UDP socket (as glibc and Go's resolvers use them): a query every
/// 100 ms for `seconds`, answered within 500 ms or counted lost; on a socket error (the agent
/// terminated the socket) or a lost query it reconnects. Beside it, an unconnected socket
/// sends the same queries with `sendto` and must never see an error or change its source
/// port. Prints one line per query, `<connected answer or "lost ...">|<unconnected answer or
/// "lost ...">`, then `port-kept` or `port-changed`.
const RESOLVER: &str = r#"
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.connect((host, port))
    return s
c = connected()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.5)
u.bind(("", 0))
source_port = u.getsockname()[1]
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    i += 1
    try:
        c.send(b"q%d" % i)
        a = c.recv(2048).decode().split()[0]
    except OSError as e:
        a = "lost " + type(e).__name__
        c.close()
        c = connected()
    try:
        u.sendto(b"u%d" % i, (host, port))
        data, src = u.recvfrom(2048)
        b = data.decode().split()[0]
    except OSError as e:
        b = "lost " + type(e).__name__
    print(a + "|" + b, flush=True)
    time.sleep(0.1)
print("port-kept" if u.getsockname()[1] == source_port else "port-changed", flush=True)
"#;

#[test]
fn connected_udp_sockets_move_when_their_backend_leaves_and_tcp_keeps_it() {
    require_root!();
    let mut c = cluster(&[]);
    let (web0, web1) = (c.pod("web-0").ip, c.pod("web-1").ip);
    // Only web-0 serves at first: every socket starts there.
    c.write_manifest("web.yaml", &web(&[web0])).unwrap();
    let agent = &c.agents[0];
    agent
        .wait_for_backends(&format!("{CLUSTER_IP}:53"), 1)
        .unwrap();
    let node = &c.nodes[0].node.netns;
    let mut held = LineConnection::open(node, &format!("{CLUSTER_IP}:{LINES}"), None).unwrap();
    let before = held.exchange("before").unwrap();
    assert!(before.starts_with("web-0 "), "{before}");
    let resolver = node
        .command("python3")
        .args(["-c", RESOLVER, CLUSTER_IP, "53", "5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // web-0 leaves the service (still running: a socket left on it would keep answering).
    c.write_manifest("web.yaml", &web(&[web1])).unwrap();
    let out = resolver.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    let (connected, unconnected): (Vec<&str>, Vec<&str>) =
        lines.iter().filter_map(|l| l.split_once('|')).unzip();
    let report = lines.join("\n");
    assert!(connected.len() > 20, "too few queries:\n{report}");
    let lost = |names: &[&str]| names.iter().filter(|n| n.starts_with("lost")).count();
    assert!(
        lost(&connected) <= 1,
        "the connected resolver lost more than one query:\n{report}"
    );
    assert_eq!(
        lost(&unconnected),
        0,
        "the unconnected socket lost queries:\n{report}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("port-kept"),
        "{report}"
    );
    for (name, names) in [("connected", &connected), ("unconnected", &unconnected)] {
        assert_eq!(names.first(), Some(&"web-0"), "{name}:\n{report}");
        // Within a second of the change (10 queries), every answer comes from web-1.
        assert!(
            names[names.len() - 10..].iter().all(|n| *n == "web-1"),
            "{name} socket still on web-0 after it left:\n{report}"
        );
    }
    // The TCP connection translated at the socket keeps its backend (kube-proxy's semantics).
    let after = held.exchange("after").unwrap();
    assert!(after.starts_with("web-0 "), "{after}");
    assert!(
        agent
            .log_text()
            .contains("connected UDP sockets whose backend left were terminated"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn socket_translations_are_forgotten_when_the_sockets_close() {
    require_root!();
    let c = cluster(&[]);
    let agent = &c.agents[0];
    let entries = || -> u64 {
        let stats = agent.cli_json(&["stats"]).unwrap();
        stats["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == "dp_sock_v1")
            .and_then(|m| m["entries"].as_u64())
            .expect("stats shows dp_sock_v1")
    };
    let baseline = entries();
    // 100,000 short-lived connected UDP sockets and 1,000 TCP connections (to the line
    // servers, whose listen backlog takes bursts), all translated.
    let churn = format!(
        "import socket\n\
         for i in range(100000):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('{CLUSTER_IP}', 53)); s.close()\n\
         for i in range(1000):\n\
         \x20   socket.create_connection(('{CLUSTER_IP}', {LINES}), 3).close()\n\
         print('done')"
    );
    let node = &c.nodes[0].node.netns;
    assert_eq!(output(node.command("python3").args(["-c", &churn])), "done");
    let translated = socket_connections(agent, &format!("{CLUSTER_IP}:53"));
    assert!(translated >= 100_000, "only {translated} translated");
    if wait_until(Duration::from_secs(10), || entries() <= baseline).is_err() {
        let left: Vec<_> = agent
            .cli_json(&["flows"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["source"] == "socket")
            .take(20)
            .cloned()
            .collect();
        panic!(
            "dp_sock_v1 holds {} entries, {baseline} before; socket translations left: {left:#?}",
            entries()
        );
    }
}

/// Flows `flows` shows from `client_ip`, by source (`packet` or `socket`).
fn flow_sources(agent: &Agent, client_ip: Ipv4Addr) -> Vec<String> {
    let flows = agent.cli_json(&["flows"]).unwrap();
    flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{client_ip}:")))
        })
        .map(|f| f["source"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn host_mode_leaves_pods_to_the_per_packet_path() {
    require_root!();
    let mut c = cluster(&[]);
    let pod_ip = c.pod("client-pod").ip;
    let agent = &c.agents[0];
    let frontend = format!("{CLUSTER_IP}:80");
    let before = socket_connections(agent, &frontend);
    let pod = &c.nodes[0].node.pods[1].netns;
    let answer = client(pod, "tcp", CLUSTER_IP, 80);
    answered_by(&answer, &frontend, &["web-0", "web-1"]).unwrap();
    assert_eq!(socket_connections(agent, &frontend), before);
    let sources = flow_sources(agent, pod_ip);
    assert_eq!(sources, ["packet"], "the pod's flow in `flows`");
}

#[test]
fn all_mode_translates_pod_sockets_too() {
    require_root!();
    let mut c = cluster(&["--socket-lb", "all"]);
    let pod_ip = c.pod("client-pod").ip;
    let agent = &c.agents[0];
    let frontend = format!("{CLUSTER_IP}:80");
    let before = socket_connections(agent, &frontend);
    let pod = &c.nodes[0].node.pods[1].netns;
    for (op, port, peer) in [
        ("tcp", 80, frontend.clone()),
        ("udp-connected", 53, format!("{CLUSTER_IP}:53")),
        ("udp-unconnected", 53, format!("{CLUSTER_IP}:53")),
    ] {
        let answer = client(pod, op, CLUSTER_IP, port);
        answered_by(&answer, &peer, &["web-0", "web-1"]).unwrap_or_else(|e| panic!("{op}: {e}"));
    }
    assert_eq!(socket_connections(agent, &frontend), before + 1);
    // Translated at the socket: the tc path saw only pod-to-pod packets.
    assert!(
        flow_sources(agent, pod_ip).is_empty(),
        "per-packet flows from the pod: {:?}",
        agent.cli_json(&["flows"]).unwrap()
    );
    // The node's own processes are translated as in `host` mode.
    let node = &c.nodes[0].node.netns;
    let answer = client(node, "tcp", CLUSTER_IP, 80);
    answered_by(&answer, &frontend, &["web-0", "web-1"]).unwrap();
    assert_eq!(socket_connections(agent, &frontend), before + 2);
}

/// The programs attached at a cgroup (bpftool's view), by name.
fn attached_programs(cgroup: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut names: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn restarts_take_the_socket_hooks_over_and_cleanup_removes_them() {
    require_root!();
    let mut c = cluster(&[]);
    let cgroup = c.nodes[0].node.netns.cgroup.clone().unwrap();
    let hooks = attached_programs(&cgroup.path);
    assert_eq!(
        hooks.len(),
        dataplane_common::SOCKET_PROGRAMS.len(),
        "hooks after start: {hooks:?}"
    );
    // A host client connecting all through a restart: never refused, never untranslated.
    let node_path = c.nodes[0].node.netns.path();
    let loop_client = format!(
        "import socket, time\n\
         ok = bad = 0\n\
         end = time.monotonic() + 4\n\
         while time.monotonic() < end:\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{CLUSTER_IP}', {LINES}), 1)\n\
         \x20       ok += s.getpeername() == ('{CLUSTER_IP}', {LINES})\n\
         \x20       s.close()\n\
         \x20   except OSError:\n\
         \x20       bad += 1\n\
         \x20   time.sleep(0.01)\n\
         print(ok, bad)"
    );
    let running = c.nodes[0]
        .node
        .netns
        .command("python3")
        .args(["-c", &loop_client])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.agents[0].restart().unwrap();
    let out = running.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts[0] > 50 && counts[1] == 0,
        "connections through the restart (translated, failed): {text:?} ({})",
        node_path.display()
    );
    let log = c.agents[0].log_text();
    assert_eq!(
        log.matches("socket hook attached").count(),
        2 * dataplane_common::SOCKET_PROGRAMS.len(),
        "start and restart each attach every hook:\n{log}"
    );
    assert_eq!(
        attached_programs(&cgroup.path),
        hooks,
        "the restart replaced the programs in place (no second set)"
    );
    assert!(
        log.lines()
            .filter(|l| l.contains("socket hook attached"))
            .skip(dataplane_common::SOCKET_PROGRAMS.len())
            .all(|l| l.contains("replaced program in pinned link")),
        "{log}"
    );
    // `cleanup` (after the agent stops) detaches them.
    let agent = c.agents.remove(0);
    drop(agent);
    assert_eq!(attached_programs(&cgroup.path), Vec::<String>::new());
}

/// `lb`: a LoadBalancer service with externalTrafficPolicy Local, an external IP and a
/// load-balancer IP; `itp`: a ClusterIP service with internalTrafficPolicy Local. Both have
/// their one endpoint, `web-1`, on node b.
fn policies(web1: Ipv4Addr) -> String {
    let slice = |name: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- {{addresses: [\"{web1}\"], nodeName: node-b}}
"
        )
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  externalIPs: [198.51.100.50]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30091}}
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.51}}]}}}}
---
{}---
apiVersion: v1
kind: Service
metadata: {{name: itp, namespace: default}}
spec:
  clusterIP: 10.96.0.41
  internalTrafficPolicy: Local
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
{}",
        slice("lb"),
        slice("itp")
    )
}

#[test]
fn host_clients_get_kube_proxys_traffic_policies_on_every_kind_of_frontend() {
    require_root!();
    let mut c = cluster(&[]);
    let web1 = c.pod("web-1").ip;
    c.write_manifest("policies.yaml", &policies(web1)).unwrap();
    let agent = &c.agents[0];
    agent.wait_for_backends("198.51.100.51:80", 0).unwrap();
    agent.wait_for_backends("10.96.0.41:80", 0).unwrap();
    let node = &c.nodes[0].node.netns;
    // externalTrafficPolicy Local, no endpoint on node a: traffic from the node itself uses
    // every endpoint (kube-proxy's short circuit), on every external kind of frontend.
    for (what, op, host, port) in [
        ("load-balancer IP, TCP", "tcp", "198.51.100.51", 80),
        (
            "load-balancer IP, connected UDP",
            "udp-connected",
            "198.51.100.51",
            53,
        ),
        ("external IP, TCP", "tcp", "198.51.100.50", 80),
        (
            "external IP, unconnected UDP",
            "udp-unconnected",
            "198.51.100.50",
            53,
        ),
        ("the node's own node port, TCP", "tcp", NODE_A, 30090),
        (
            "the node's own node port, UDP",
            "udp-connected",
            NODE_A,
            30091,
        ),
    ] {
        let answer = client(node, op, host, port);
        answered_by(&answer, &format!("{host}:{port}"), &["web-1"])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // internalTrafficPolicy Local, no endpoint on node a: kube-proxy drops the node's traffic;
    // the socket learns it at once.
    for (op, port) in [("tcp", 80), ("udp-connected", 53)] {
        let answer = client(node, op, "10.96.0.41", port);
        assert!(
            answer.starts_with("error EHOSTUNREACH"),
            "{op} to an internalTrafficPolicy Local service without local endpoints: {answer}"
        );
    }
}
