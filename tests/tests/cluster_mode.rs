//! The agent against an API server: the unmodified kube-rs client of `dataplane-agent run
//! --kubeconfig` talking list/watch to the fake API server (tests/assets/fake_apiserver.py),
//! which runs inside the node's namespace. Covers convergence, dropped watches, relists after
//! 410, an API server that goes away, start-up without it, and 1,000 services at start-up.
use std::{net::Ipv4Addr, time::Duration};

use serde_json::{Value, json};
use testbed::{
    Agent, AgentOptions, Node, Wiring, apiserver::FakeApiServer, http_requests, require_root,
    wait_until,
};

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

fn slice(service: &str, endpoints: &[Ipv4Addr]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>()
    })
}

fn node_object() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
}

/// A node with a client pod and two web pods, the API server in the node's namespace, and
/// (unless `start_agent` is false) the agent in cluster mode.
struct ApiCluster {
    agent: Option<Agent>,
    api: FakeApiServer,
    node: Node,
}

impl ApiCluster {
    fn new(subnet: [u8; 3], start_agent: bool) -> Self {
        let mut node = Node::new(Wiring::Routed, subnet).unwrap();
        node.add_pod("client").unwrap();
        for i in 0..2 {
            let index = node.add_pod(&format!("web-{i}")).unwrap();
            node.pods[index].serve(8080, 5353).unwrap();
        }
        let api = FakeApiServer::start_in_netns(&node.netns.path()).unwrap();
        api.apply(&node_object()).unwrap();
        let mut cluster = Self {
            agent: None,
            api,
            node,
        };
        if start_agent {
            cluster.start_agent();
        }
        cluster
    }

    fn start_agent(&mut self) {
        let options = AgentOptions {
            kubeconfig: Some(self.api.kubeconfig()),
            ..Default::default()
        };
        self.agent = Some(Agent::start_with(&self.node, "node-a", options).unwrap());
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn web(&self, i: usize) -> Ipv4Addr {
        self.node.pods[i + 1].ip
    }

    fn frontends(&self) -> Vec<String> {
        let services = self.agent().cli_json(&["services"]).unwrap();
        services
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["frontend"].as_str().unwrap().to_string())
            .collect()
    }

    /// Publishes the service `name` with `endpoints` and waits until the agent serves them.
    fn publish(&self, name: &str, cluster_ip: &str, endpoints: &[Ipv4Addr]) {
        self.api
            .apply_all(&[service(name, cluster_ip), slice(name, endpoints)])
            .unwrap();
        self.agent()
            .wait_for_backends(&format!("{cluster_ip}:80"), endpoints.len())
            .unwrap();
    }

    /// `result`'s value, or a panic with the agent's log.
    fn or_log<T>(&self, result: anyhow::Result<T>) -> T {
        result
            .map_err(|e| e.context(self.agent().log_text()))
            .unwrap()
    }

    /// Waits up to `timeout` for the agent to stop serving `frontend`.
    fn wait_gone(&self, frontend: &str, timeout: Duration) {
        self.or_log(wait_until(timeout, || {
            !self.frontends().contains(&frontend.to_string())
        }));
    }

    fn answers(&self, vip: &str, count: usize) -> usize {
        http_requests(&self.node.pods[0].netns, &format!("http://{vip}/"), count)
            .iter()
            .filter(|a| a.is_ok())
            .count()
    }
}

#[test]
fn converges_on_changes_and_after_dropped_watches() {
    require_root!();
    let c = ApiCluster::new([10, 244, 20], true);
    c.publish("web", "10.96.2.10", &[c.web(0), c.web(1)]);
    assert_eq!(c.answers("10.96.2.10", 10), 10);

    // Watches cut: the agent resumes and still sees what happens next.
    assert!(
        c.api.cut_watches().unwrap() >= 3,
        "the agent watches services, slices and its node"
    );
    c.api.apply(&slice("web", &[c.web(1)])).unwrap();
    c.agent().wait_for_backends("10.96.2.10:80", 1).unwrap();
    c.api.delete("services", "default", "web").unwrap();
    c.wait_gone("10.96.2.10:80", Duration::from_secs(5));
}

#[test]
fn a_relist_after_410_removes_what_vanished_while_disconnected() {
    require_root!();
    let c = ApiCluster::new([10, 244, 21], true);
    c.api
        .apply_all(&[
            service("keep", "10.96.2.20"),
            slice("keep", &[c.web(0)]),
            service("gone", "10.96.2.21"),
            slice("gone", &[c.web(1)]),
        ])
        .unwrap();
    c.agent().wait_for_backends("10.96.2.21:80", 1).unwrap();
    c.agent().wait_for_backends("10.96.2.20:80", 1).unwrap();

    // The service disappears while no event can reach the agent, and the history that
    // would tell it is compacted away: resuming gets 410, so the agent must relist.
    c.api.pause_watches().unwrap();
    c.api.delete("services", "default", "gone").unwrap();
    c.api.compact().unwrap();
    c.api.cut_watches().unwrap();
    c.api.resume_watches().unwrap();
    c.wait_gone("10.96.2.21:80", Duration::from_secs(10));
    assert!(
        c.frontends().contains(&"10.96.2.20:80".to_string()),
        "the relist pruned a live service"
    );
    assert_eq!(c.answers("10.96.2.20", 5), 5);
}

#[test]
fn losing_the_api_server_keeps_the_datapath_and_it_converges_when_back() {
    require_root!();
    let c = ApiCluster::new([10, 244, 22], true);
    c.publish("web", "10.96.2.30", &[c.web(0)]);

    c.api.down().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.answers("10.96.2.30", 10),
        10,
        "traffic stopped with the API server"
    );
    c.agent().wait_for_backends("10.96.2.30:80", 1).unwrap();
    assert!(
        c.agent().log_text().contains("watch failed"),
        "{}",
        c.agent().log_text()
    );

    c.api.up().unwrap();
    c.api.apply(&slice("web", &[c.web(0), c.web(1)])).unwrap();
    c.or_log(c.agent().wait_for_backends("10.96.2.30:80", 2));
}

#[test]
fn an_agent_starting_without_the_api_server_prunes_nothing() {
    require_root!();
    let mut c = ApiCluster::new([10, 244, 23], true);
    c.publish("web", "10.96.2.40", &[c.web(0), c.web(1)]);

    // Restart with the API server down: the restored datapath keeps serving untouched.
    c.api.down().unwrap();
    c.agent.as_mut().unwrap().restart().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.agent().wait_for_backends("10.96.2.40:80", 2).unwrap();
    assert_eq!(c.answers("10.96.2.40", 10), 10);

    // Back: the first full list arrives, and only then does the agent prune.
    c.api.up().unwrap();
    c.api.delete("services", "default", "web").unwrap();
    c.wait_gone("10.96.2.40:80", Duration::from_secs(10));
}

#[test]
fn a_thousand_services_with_ten_thousand_endpoints_sync_at_start_up() {
    require_root!();
    let mut c = ApiCluster::new([10, 244, 24], false);
    let mut objects = Vec::new();
    for i in 0..1000u32 {
        let name = format!("svc-{i}");
        objects.push(service(
            &name,
            &format!("10.97.{}.{}", i / 250, i % 250 + 1),
        ));
        let endpoints: Vec<Ipv4Addr> = (0..10u32)
            .map(|e| Ipv4Addr::from(0x0a80_0000 + i * 10 + e))
            .collect();
        objects.push(slice(&name, &endpoints));
    }
    c.api.apply_all(&objects).unwrap();
    c.start_agent();
    c.or_log(wait_until(Duration::from_secs(60), || {
        c.frontends().len() == 1000
    }));
    let services = c.agent().cli_json(&["services"]).unwrap();
    let backends: usize = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["backends"].as_array().unwrap().len())
        .sum();
    assert_eq!(backends, 10_000);
}

#[test]
fn skipped_objects_raise_warning_events_on_their_service() {
    require_root!();
    let c = ApiCluster::new([10, 244, 25], true);
    let mut dns = service("kube-dns", "10.96.2.50");
    dns["metadata"]["namespace"] = json!("kube-system");
    // An older Service, in a namespace that sorts first, claiming DNS's cluster IP as an
    // external IP; and one with a port the datapath cannot serve.
    let mut evil = service("evil", "10.96.2.51");
    evil["metadata"]["namespace"] = json!("aaa");
    evil["spec"]["externalIPs"] = json!(["10.96.2.50"]);
    let mut sctp = service("sctp", "10.96.2.52");
    sctp["spec"]["ports"] = json!([{"name": "s", "port": 9, "protocol": "SCTP"}]);
    c.api.apply_all(&[evil, dns, sctp]).unwrap();
    c.agent().wait_for_backends("10.96.2.50:80", 0).unwrap();
    let warning = |name: &str, reason: &str| {
        c.api.events().unwrap().into_iter().find(|e| {
            let regarding = e.get("regarding").or_else(|| e.get("involvedObject"));
            regarding.is_some_and(|r| r["name"] == name && r["kind"] == "Service")
                && e["type"] == "Warning"
                && e["reason"] == reason
        })
    };
    wait_until(Duration::from_secs(10), || {
        warning("evil", "FrontendRefused").is_some()
            && warning("sctp", "UnsupportedProtocol").is_some()
    })
    .map_err(|e| {
        e.context(format!(
            "events: {:?}\nagent log:\n{}",
            c.api.events(),
            c.agent().log_text()
        ))
    })
    .unwrap();
    let event = warning("evil", "FrontendRefused").unwrap();
    assert_eq!(event["metadata"]["namespace"], "aaa", "{event}");
    assert_eq!(event["regarding"]["namespace"], "aaa", "{event}");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("10.96.2.50") && note.contains("kube-system/kube-dns"),
        "{event}"
    );
    // The frontend stays kube-dns's.
    let services = c.agent().cli_json(&["services"]).unwrap();
    let owner: Vec<&Value> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["frontend"] == "10.96.2.50:80")
        .map(|s| &s["service"])
        .collect();
    assert_eq!(owner, [&json!("kube-system/kube-dns")]);
    // Rate-limited: the next full resyncs add no Event for the same problem.
    let count = c.api.events().unwrap().len();
    c.api.cut_watches().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.api.events().unwrap().len(), count);
}
