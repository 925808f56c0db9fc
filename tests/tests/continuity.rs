//! Connections survive every control-plane change (issue 10): kube-proxy's contract is that
//! what changes in Services and EndpointSlices decides where *new* connections go, while a
//! connection already established keeps its backend pod for as long as it lives. Each test
//! holds real connections (Python clients, the testbed's echo servers) across one kind of
//! change and then checks that they still exchange data with the same pod (every answer
//! names the pod that sent it). Run as root; skipped (with a message) otherwise.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use testbed::{
    Agent, AgentOptions, LineConnection, Netns, Node, Wiring, http_requests,
    manifests::{Conditions, DNS, HTTP, NOT_READY, READY, ServicePort, TERMINATING, service_with},
    require_root, udp_request, wait_until,
};

const VIP: &str = "10.96.0.10";

/// The echo servers' line port: one answer per line on a connection held open.
const LINES: ServicePort<'static> = ServicePort {
    name: "lines",
    protocol: "TCP",
    port: 7000,
    target_port: 7000,
};

/// How long the UDP server stays silent before it answers (the issue's case). Linux's
/// conntrack keeps a UDP flow 30 s without a reply and 120 s with one, counted from the last
/// packet in *either* direction: a client that keeps sending keeps the flow, and its return
/// path, alive however long the server takes.
const UDP_SILENCE: Duration = Duration::from_secs(165);
/// How often the UDP client sends meanwhile.
const UDP_SEND_EVERY: Duration = Duration::from_secs(2);

/// How long the server of a half-closed connection stays silent between two parts of its
/// answer: longer than the old 10 s closing timeout plus the agent's 30 s conntrack
/// collection period (so the old timeout cannot hide between two collections), shorter than
/// Linux's `nf_conntrack_tcp_timeout_close_wait` (60 s) that a half-closed connection idles
/// in behind kube-proxy.
const HALF_CLOSED_SILENCE: Duration = Duration::from_secs(42);

/// A node with a client pod and backend pods, each serving HTTP on 8080, UDP echo on 5353
/// and line echo on 7000, and the agent.
struct Bed {
    agent: Agent,
    node: Node,
}

impl Bed {
    fn new(subnet: [u8; 3], backends: &[&str]) -> Self {
        let mut node = Node::new(Wiring::Routed, subnet).unwrap();
        node.add_pod("client").unwrap();
        for name in backends {
            let index = node.add_pod(name).unwrap();
            node.pods[index]
                .serve_with_line_echo(8080, 5353, Some(LINES.target_port))
                .unwrap();
        }
        let agent = Agent::start(&node, "node-a").unwrap();
        Self { agent, node }
    }

    /// A bed in 10.244.`subnet`.0/24 with the backends `names`, and their addresses.
    fn pair(subnet: u8, names: [&str; 2]) -> (Self, Ipv4Addr, Ipv4Addr) {
        let bed = Self::new([10, 244, subnet], &names);
        let (first, second) = (bed.ip(0), bed.ip(1));
        (bed, first, second)
    }

    fn client(&self) -> &Netns {
        &self.node.pods[0].netns
    }

    /// Backend number `i` (pod `i + 1`).
    fn ip(&self, i: usize) -> Ipv4Addr {
        self.node.pods[i + 1].ip
    }

    /// Service "web" on [`VIP`] (HTTP, DNS and LINES) with these endpoints.
    fn manifest(endpoints: &[(Ipv4Addr, Conditions)]) -> String {
        service_with("web", VIP, &[HTTP, DNS, LINES], endpoints, "")
    }

    fn publish(&self, endpoints: &[(Ipv4Addr, Conditions)]) {
        self.agent
            .write_manifest("web.yaml", &Self::manifest(endpoints))
            .unwrap();
    }

    /// Waits until new connections to `frontend` ("ip:port") go to exactly `backends`.
    fn wait_for(&self, frontend: &str, backends: &[Ipv4Addr], port: u16) {
        let addresses: Vec<String> = backends.iter().map(|ip| format!("{ip}:{port}")).collect();
        self.agent
            .wait_for_backend_addresses(frontend, &addresses)
            .unwrap();
    }

    /// Runs `script` (arguments: the pod's name, `port`, `silence` in seconds) in the first
    /// backend pod, waits until it listens, and publishes it as the one-port service `name`
    /// at `cluster_ip`.
    fn serve_script(
        &self,
        script: &str,
        silence: Duration,
        name: &str,
        cluster_ip: &str,
        protocol: &str,
        port: u16,
    ) -> testbed::Process {
        let pod = &self.node.pods[1];
        let silence = silence.as_secs_f64().to_string();
        let server = pod
            .netns
            .spawn(
                "python3",
                &["-c", script, &pod.name, &port.to_string(), &silence],
            )
            .unwrap();
        let ss = if protocol == "UDP" { "-Hlun" } else { "-Hltn" };
        wait_until(Duration::from_secs(5), || {
            pod.netns
                .run("ss", &[ss, &format!("sport = :{port}")])
                .is_ok_and(|out| !out.trim().is_empty())
        })
        .expect("the server listens");
        let service_port = ServicePort {
            name,
            protocol,
            port,
            target_port: port,
        };
        let manifest = service_with(name, cluster_ip, &[service_port], &[(pod.ip, READY)], "");
        self.agent
            .write_manifest(&format!("{name}.yaml"), &manifest)
            .unwrap();
        self.wait_for(&format!("{cluster_ip}:{port}"), &[pod.ip], port);
        server
    }

    fn wait_for_lines(&self, backends: &[Ipv4Addr]) {
        self.wait_for(
            &format!("{VIP}:{}", LINES.port),
            backends,
            LINES.target_port,
        );
    }

    /// Publishes `endpoints` and waits until the ready ones are the line port's backends.
    fn publish_and_wait(&self, endpoints: &[(Ipv4Addr, Conditions)]) {
        self.publish(endpoints);
        let ready: Vec<Ipv4Addr> = endpoints
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(ip, _)| *ip)
            .collect();
        self.wait_for_lines(&ready);
    }

    fn hold(&self) -> LineConnection {
        LineConnection::open(self.client(), &format!("{VIP}:{}", LINES.port), None).unwrap()
    }

    /// A connection held on web-0 (published alone first, so it lands there), then web-1
    /// published ready beside it.
    fn hold_on_web0_with_web1_ready(&self) -> LineConnection {
        let (w0, w1) = (self.ip(0), self.ip(1));
        self.publish_and_wait(&[(w0, READY)]);
        let mut held = self.hold();
        assert_answers(&mut held, "web-0", "before any change");
        self.publish_and_wait(&[(w0, READY), (w1, READY)]);
        held
    }
}

/// The pod an echo answer names ("<pod> <peer> ...").
fn pod_of(answer: &str) -> &str {
    answer.split_whitespace().next().unwrap_or("")
}

/// One exchange on a held connection, which must be answered by `pod`.
fn assert_answers(held: &mut LineConnection, pod: &str, when: &str) {
    match held.exchange(when) {
        Ok(answer) => assert_eq!(
            pod_of(&answer),
            pod,
            "{when}: the held connection moved to another pod: {answer}"
        ),
        Err(e) => panic!("{when}: the held connection to {pod} broke: {e:#}"),
    }
}

/// Pods answering `count` new HTTP connections, each once per connection.
fn new_connections(bed: &Bed, count: usize) -> Vec<String> {
    http_requests(bed.client(), &format!("http://{VIP}/"), count)
        .into_iter()
        .map(|a| pod_of(&a.expect("a new connection failed")).to_string())
        .collect()
}

#[test]
fn a_terminating_endpoint_keeps_its_held_connection_and_gets_no_new_ones() {
    require_root!();
    let (bed, w0, w1) = Bed::pair(101, ["web-0", "web-1"]);
    let mut held = bed.hold_on_web0_with_web1_ready();
    assert_answers(&mut held, "web-0", "with web-1 added");

    // A rolling update's first step: web-0 is being deleted and drains, web-1 is ready.
    bed.publish_and_wait(&[(w0, TERMINATING), (w1, READY)]);
    for i in 0..5 {
        assert_answers(
            &mut held,
            "web-0",
            &format!("web-0 terminating, exchange {i}"),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pods = new_connections(&bed, 20);
    assert!(
        pods.iter().all(|p| p == "web-1"),
        "new connections went to the terminating endpoint: {pods:?}"
    );
    for i in 0..5 {
        let mut fresh = bed.hold();
        assert_answers(&mut fresh, "web-1", &format!("new held connection {i}"));
    }
    assert_answers(&mut held, "web-0", "after the new connections");
}

#[test]
fn a_backend_flapping_not_ready_and_back_keeps_its_held_connection() {
    require_root!();
    let (bed, w0, w1) = Bed::pair(102, ["web-0", "web-1"]);
    let mut held = bed.hold_on_web0_with_web1_ready();

    // A short blip, nothing sent meanwhile: a failing readiness probe (ready false, not
    // serving, same address), then passing again.
    bed.publish_and_wait(&[(w0, NOT_READY), (w1, READY)]);
    bed.publish_and_wait(&[(w0, READY), (w1, READY)]);
    assert_answers(&mut held, "web-0", "after a quiet flap");
    // Longer ones, with the connection in use while web-0 is not ready.
    for round in 0..3 {
        bed.publish_and_wait(&[(w0, NOT_READY), (w1, READY)]);
        assert_answers(
            &mut held,
            "web-0",
            &format!("round {round}, web-0 not ready"),
        );
        bed.publish_and_wait(&[(w0, READY), (w1, READY)]);
        assert_answers(
            &mut held,
            "web-0",
            &format!("round {round}, web-0 ready again"),
        );
    }
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert_answers(
            &mut held,
            "web-0",
            &format!("after the flaps, exchange {i}"),
        );
    }
}

#[test]
fn rewriting_the_endpointslice_file_in_place_never_disturbs_a_held_connection() {
    require_root!();
    let (bed, w0, w1) = Bed::pair(103, ["web-0", "web-1"]);
    bed.publish_and_wait(&[(w0, READY)]);
    let mut held = bed.hold();
    assert_answers(&mut held, "web-0", "before any change");
    let endpoints = [(w0, READY), (w1, READY)];
    bed.publish_and_wait(&endpoints);

    // The same content, again and again, the way `cat > web.yaml` writes it: truncated, then
    // written. Nothing changed, so nothing may happen to the connection.
    let content = Bed::manifest(&endpoints);
    for i in 0..200 {
        bed.agent
            .rewrite_manifest_in_place("web.yaml", &content)
            .unwrap();
        assert_answers(&mut held, "web-0", &format!("after in-place rewrite {i}"));
    }
    // Whatever the agent read meanwhile, it ends with the file's content...
    bed.wait_for_lines(&[w0, w1]);
    // ...and the connection is still there once it has caught up.
    std::thread::sleep(Duration::from_millis(500));
    assert_answers(&mut held, "web-0", "after the rewrites settled");
}

#[test]
fn session_affinity_leaves_an_endpoint_removed_from_the_service() {
    require_root!();
    let (bed, b1, b2) = Bed::pair(104, ["b1", "b2"]);
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n";
    let publish_aff = |endpoints: &[Ipv4Addr]| {
        let endpoints: Vec<_> = endpoints.iter().map(|ip| (*ip, READY)).collect();
        bed.agent
            .write_manifest(
                "aff.yaml",
                &service_with("aff", "10.96.0.40", &[HTTP], &endpoints, affinity),
            )
            .unwrap();
    };
    // b1 also serves another service, all along: it stays a backend of this node.
    bed.agent
        .write_manifest(
            "other.yaml",
            &service_with("other", "10.96.0.41", &[HTTP], &[(b1, READY)], ""),
        )
        .unwrap();
    bed.wait_for("10.96.0.41:80", &[b1], 8080);
    let aff = |count| -> Vec<String> {
        http_requests(bed.client(), "http://10.96.0.40/", count)
            .into_iter()
            .map(|a| pod_of(&a.expect("a connection to aff failed")).to_string())
            .collect()
    };

    // The client lands on b1 (alone at first), and affinity keeps it there once b2 is added.
    publish_aff(&[b1]);
    bed.wait_for("10.96.0.40:80", &[b1], 8080);
    assert_eq!(aff(3), ["b1"; 3]);
    publish_aff(&[b1, b2]);
    bed.wait_for("10.96.0.40:80", &[b1, b2], 8080);
    let pods = aff(10);
    assert!(
        pods.iter().all(|p| p == "b1"),
        "affinity did not hold: {pods:?}"
    );

    // b1 leaves aff's EndpointSlice (it stays in other's): aff's new connections go to b2.
    publish_aff(&[b2]);
    bed.wait_for("10.96.0.40:80", &[b2], 8080);
    let pods = aff(10);
    assert!(
        pods.iter().all(|p| p == "b2"),
        "new connections to aff still went to b1, no longer its endpoint: {pods:?}"
    );
    let other: Vec<String> = http_requests(bed.client(), "http://10.96.0.41/", 3)
        .into_iter()
        .map(|a| pod_of(&a.unwrap()).to_string())
        .collect();
    assert_eq!(other, ["b1"; 3], "other keeps b1");
}

/// A UDP server that answers only once it has been silent for SILENCE seconds after the
/// first datagram, to the last sender, naming the pod and how many datagrams it got.
const SILENT_UDP_SERVER: &str = r#"
import select, socket, sys, time
name, port, silence = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
data, peer = s.recvfrom(2000)
first, count = time.monotonic(), 1
while (left := first + silence - time.monotonic()) > 0:
    if select.select([s], [], [], left)[0]:
        data, peer = s.recvfrom(2000)
        count += 1
s.sendto(f"{name} {peer[0]}:{peer[1]} answered after {count} datagrams".encode(), peer)
"#;

/// A UDP client on one socket (fixed source port, connected to the service) that sends a
/// datagram every EVERY seconds until an answer comes or LIMIT seconds pass; prints
/// "answer <seconds> <sent> <text>" or "timeout <seconds> <sent> <errors>".
const PATIENT_UDP_CLIENT: &str = r#"
import select, socket, sys, time
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
every, limit = float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.connect((host, port))
start, sent, errors = time.monotonic(), 0, []
while time.monotonic() - start < limit:
    s.send(f"tick {sent}".encode())
    sent += 1
    deadline = time.monotonic() + every
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            continue
        try:
            data = s.recv(2000)
        except OSError as e:
            errors.append(repr(e))
            continue
        print("answer", round(time.monotonic() - start), sent, data.decode(), flush=True)
        sys.exit()
print("timeout", round(time.monotonic() - start), sent, errors, flush=True)
"#;

#[test]
fn a_udp_flow_whose_server_answers_after_a_long_silence_gets_the_answer() {
    require_root!();
    let bed = Bed::new([10, 244, 105], &["slow-0"]);
    let _server = bed.serve_script(
        SILENT_UDP_SERVER,
        UDP_SILENCE,
        "slow",
        "10.96.0.54",
        "UDP",
        5400,
    );

    let limit = UDP_SILENCE + Duration::from_secs(15);
    let started = Instant::now();
    let out = bed
        .client()
        .run(
            "python3",
            &[
                "-c",
                PATIENT_UDP_CLIENT,
                "10.96.0.54",
                "5400",
                "40500",
                &UDP_SEND_EVERY.as_secs_f64().to_string(),
                &limit.as_secs_f64().to_string(),
            ],
        )
        .unwrap();
    let client = format!("{}:40500", bed.node.pods[0].ip);
    assert!(
        out.starts_with("answer") && out.contains(&format!("slow-0 {client} answered")),
        "after {:?}, the answer given after {UDP_SILENCE:?} of silence never reached the \
         client: {out}",
        started.elapsed()
    );
}

#[test]
fn an_endpoint_gone_from_every_slice_keeps_tcp_and_moves_udp() {
    require_root!();
    let (bed, w0, w1) = Bed::pair(106, ["web-0", "web-1"]);
    bed.publish_and_wait(&[(w0, READY)]);
    bed.wait_for(&format!("{VIP}:53"), &[w0], 5353);
    let mut held = bed.hold();
    assert_answers(&mut held, "web-0", "before any change");
    let udp = |payload: &str| udp_request(bed.client(), &format!("{VIP}:53"), Some(40600), payload);
    let first = udp("one").unwrap();
    assert_eq!(pod_of(&first), "web-0", "{first}");

    // web-0 leaves every slice (deleted, or its slice replaced); web-1 takes over.
    bed.publish_and_wait(&[(w1, READY)]);
    bed.wait_for(&format!("{VIP}:53"), &[w1], 5353);

    // UDP: the same flow (same client port) moves to a current backend on its next datagram.
    let second = udp("two").unwrap();
    assert_eq!(
        pod_of(&second),
        "web-1",
        "the UDP flow stayed on the gone endpoint: {first} then {second}"
    );
    // New TCP connections never go to the gone endpoint.
    let pods = new_connections(&bed, 20);
    assert!(
        pods.iter().all(|p| p == "web-1"),
        "a new connection went to the gone endpoint: {pods:?}"
    );
    // TCP: kube-proxy never resets an established connection; the pod may still drain it.
    for i in 0..3 {
        assert_answers(&mut held, "web-0", &format!("web-0 gone, exchange {i}"));
    }
}

/// Serves each connection in a thread: reads the request until the client half-closes, then
/// answers "<pod> part 1" at once, "<pod> part 2..4" after SILENCE seconds, one a second,
/// and closes.
const HALF_CLOSE_SERVER: &str = r#"
import socket, sys, threading, time
name, port, silence = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def serve(conn):
    try:
        while conn.recv(1000):
            pass
        conn.sendall(f"{name} part 1\n".encode())
        time.sleep(silence)
        for i in (2, 3, 4):
            conn.sendall(f"{name} part {i}\n".encode())
            time.sleep(1)
    except OSError:
        pass
    conn.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Sends a request, half-closes (SHUT_WR), then reads until the server closes; prints the
/// outcome ("eof", "reset", "timeout") and the seconds it took, then what it received.
const HALF_CLOSE_CLIENT: &str = r#"
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), 3)
s.sendall(b"request\n")
s.shutdown(socket.SHUT_WR)
s.settimeout(timeout)
start, data = time.monotonic(), b""
try:
    while chunk := s.recv(1000):
        data += chunk
    outcome = "eof"
except ConnectionResetError:
    outcome = "reset"
except socket.timeout:
    outcome = "timeout"
print(outcome, round(time.monotonic() - start, 1))
print(data.decode(), end="")
"#;

#[test]
fn a_half_closed_connection_receives_everything_the_server_sends() {
    require_root!();
    let bed = Bed::new([10, 244, 107], &["web-0"]);
    let _server = bed.serve_script(
        HALF_CLOSE_SERVER,
        HALF_CLOSED_SILENCE,
        "stream",
        "10.96.0.71",
        "TCP",
        7100,
    );

    let timeout = (HALF_CLOSED_SILENCE + Duration::from_secs(5)).as_secs_f64();
    let out = bed
        .client()
        .run(
            "python3",
            &[
                "-c",
                HALF_CLOSE_CLIENT,
                "10.96.0.71",
                "7100",
                &timeout.to_string(),
            ],
        )
        .unwrap();
    let mut lines = out.lines();
    let outcome = lines.next().unwrap_or("");
    let received: Vec<&str> = lines.collect();
    assert!(
        outcome.starts_with("eof") && received.len() == 4,
        "the half-closed connection ended with {outcome:?} after receiving {received:?} \
         (the server was silent for {HALF_CLOSED_SILENCE:?} after part 1)"
    );
    assert_eq!(
        received,
        [
            "web-0 part 1",
            "web-0 part 2",
            "web-0 part 3",
            "web-0 part 4"
        ]
    );
}

/// Every pin under `dir` with what identifies the object behind it: the pin's inode (a
/// re-pinned object gets a new one) and, for links, the program they run.
fn pins(dir: &std::path::Path) -> Vec<(String, u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = vec![];
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            let program = if path.starts_with(dir.join("links")) && !meta.is_dir() {
                let out = std::process::Command::new("bpftool")
                    .args(["-j", "link", "show", "pinned"])
                    .arg(&path)
                    .output()
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .map(|v| v["prog_id"].to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            found.push((path.display().to_string(), meta.ino(), program));
        }
    }
    found.sort();
    found
}

#[test]
fn a_second_agent_on_the_same_bpffs_dir_refuses_to_start() {
    require_root!();
    let bed = Bed::new([10, 244, 108], &["web-0"]);
    let w0 = bed.ip(0);
    bed.publish_and_wait(&[(w0, READY)]);
    let mut held = bed.hold();
    assert_answers(&mut held, "web-0", "before the second agent");
    let before = pins(&bed.agent.bpffs_dir);

    // A second agent for the same node and directory (a DaemonSet pod started while the old
    // one still runs, or a hand-started debug copy), with its own (empty) manifests. Other
    // ports for health and metrics, so only the directory can stop it.
    let options = AgentOptions {
        shared_bpffs_dir: Some(bed.agent.bpffs_dir.clone()),
        extra_args: [
            "--healthz-bind-address",
            "127.0.0.1:10266",
            "--metrics-bind-address",
            "127.0.0.1:10259",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let second = Agent::run_to_exit(&bed.node, "node-a", options, Duration::from_secs(10)).unwrap();
    let dir = bed.agent.bpffs_dir.display().to_string();
    let after = pins(&bed.agent.bpffs_dir);
    assert!(
        second.status.is_some_and(|s| !s.success()),
        "the second agent did not exit with an error (status {:?}); its output:\n{}",
        second.status,
        second.output
    );
    assert!(
        second.output.contains(&dir),
        "the second agent's error does not name {dir}:\n{}",
        second.output
    );
    assert_eq!(
        before, after,
        "the second agent changed the first one's pins"
    );

    // The first agent still serves, and still programs changes.
    assert_answers(&mut held, "web-0", "after the second agent");
    let pods = new_connections(&bed, 5);
    assert_eq!(pods, ["web-0"; 5]);
    bed.agent
        .write_manifest(
            "later.yaml",
            &service_with("later", "10.96.0.80", &[HTTP], &[(w0, READY)], ""),
        )
        .unwrap();
    bed.wait_for("10.96.0.80:80", &[w0], 8080);
}
