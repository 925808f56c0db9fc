//! `cargo xtask demo`: the whole thing on one machine. A two-node namespace "cluster" on an
//! underlay, pods on both nodes, a ClusterIP+NodePort service and a UDP one, one agent per
//! node; traffic from a pod and from an external client; then what the datapath holds
//! (`services`, `flows`, `stats`) and the service graph (DOT, and SVG through Graphviz).
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context;
use testbed::{Kept, http_requests, multinode::MultiNode, udp_request};

use crate::{build, run, setup, workspace_root};

fn state_file() -> PathBuf {
    workspace_root().join("target/demo-state.json")
}

fn step(message: &str) {
    eprintln!("\n==> {message}");
}

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]
";

fn slices(web: &[(String, &str)]) -> String {
    let endpoints: String = web
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: shop, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}]
endpoints:
{endpoints}"
    )
}

pub fn demo(keep: bool, down: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        testbed::is_root(),
        "the demo creates network namespaces and loads BPF: run it as root"
    );
    if down {
        return teardown();
    }
    if state_file().exists() {
        step("removing the demo left running earlier");
        teardown()?;
    }

    step("installing what is missing and building (the first run takes a few minutes)");
    setup::setup()?;
    build::build_ebpf(true)?;
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "-p",
        "dataplane-agent",
    ]))?;
    let agent = workspace_root().join("target/debug/dataplane-agent");

    step(
        "creating a two-node cluster: node-a (zone-a) and node-b (zone-b) on an underlay, and an external client",
    );
    let mut cluster = MultiNode::new(&[&["client", "web-a"], &["web-b"]], 1)?;
    for name in ["web-a", "web-b"] {
        let pod = cluster.pod(name);
        pod.serve(8080, 5353)?;
        eprintln!("    {name}: {} (HTTP :8080, UDP :5353)", pod.ip);
    }

    step(
        "starting one agent per node and publishing Services shop/web (ClusterIP + NodePort 30080) and shop/dns",
    );
    cluster.start_agents(&[])?;
    let web: Vec<(String, &str)> = vec![
        (cluster.pod("web-a").ip.to_string(), "node-a"),
        (cluster.pod("web-b").ip.to_string(), "node-b"),
    ];
    cluster.write_manifest("services.yaml", SERVICES)?;
    cluster.write_manifest("endpointslices.yaml", &slices(&web))?;
    cluster.agents[0].wait_for_backends("10.96.0.10:80", 2)?;
    cluster.agents[0].wait_for_backends("192.0.2.11:30080", 2)?;
    eprintln!("    manifests: {}", cluster.manifests.display());
    for (agent, node) in cluster.agents.iter().zip(&cluster.nodes) {
        eprintln!(
            "    {}: {} pinned maps in {}",
            node.name,
            node.ip,
            agent.bpffs_dir.display()
        );
    }

    step(
        "traffic: 30 HTTP requests from pod client to the ClusterIP, 20 from the external client to node-a's NodePort, 3 DNS-style UDP requests",
    );
    let client = &cluster.pod("client").netns;
    report(
        "client -> 10.96.0.10:80",
        &http_requests(client, "http://10.96.0.10/", 30),
    )?;
    let client = &cluster.pod("client").netns;
    for i in 0..3 {
        eprintln!(
            "    UDP: {}",
            udp_request(client, "10.96.0.53:53", Some(41000 + i), "hello")?
        );
    }
    report(
        "external -> 192.0.2.11:30080",
        &http_requests(&cluster.clients[0], "http://192.0.2.11:30080/", 20),
    )?;
    std::thread::sleep(Duration::from_millis(100));

    let node_a = &cluster.agents[0];
    step("dataplane-agent services   (node-a)");
    print!("{}", node_a.cli(&["services"])?);
    step("dataplane-agent flows --sort bytes   (node-a)");
    print!("{}", node_a.cli(&["flows", "--sort", "bytes"])?);
    step("dataplane-agent stats   (node-a)");
    print!("{}", node_a.cli(&["stats"])?);
    step(
        "dataplane-agent graph   (node-a: who talks to which service, and which backends serve it)",
    );
    let dot = node_a.cli(&["graph", "-o", "dot"])?;
    print!("{dot}");
    let out_dir = workspace_root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("graph.dot"), &dot)?;
    match node_a.cli(&["graph", "-o", "svg"]) {
        Ok(svg) => {
            std::fs::write(out_dir.join("graph.svg"), svg)?;
            eprintln!("    SVG: {}", out_dir.join("graph.svg").display());
        }
        Err(e) => eprintln!(
            "    no SVG ({e:#}); DOT: {}",
            out_dir.join("graph.dot").display()
        ),
    }

    if keep {
        let bpffs = cluster.agents[0].bpffs_dir.clone();
        let client_ns = cluster.pod("client").netns.name.clone();
        let kept = cluster.keep();
        std::fs::write(state_file(), serde_json::to_string_pretty(&kept.to_json())?)?;
        step("left running (remove with `cargo xtask demo --down`). Try:");
        eprintln!(
            "    {} services --bpffs-dir {}",
            agent.display(),
            bpffs.display()
        );
        eprintln!(
            "    {} flows --watch --bpffs-dir {}",
            agent.display(),
            bpffs.display()
        );
        eprintln!("    bpftool map dump pinned {}/dp_svc_v2", bpffs.display());
        eprintln!("    nsenter --net=/run/netns/{client_ns} curl -s http://10.96.0.10/");
    } else {
        step("cleaning up (use --keep to leave the demo running)");
    }
    Ok(())
}

/// Prints which backend answered how often; fails if any request failed.
fn report(what: &str, answers: &[Result<String, String>]) -> anyhow::Result<()> {
    let mut by_backend = std::collections::BTreeMap::<String, usize>::new();
    for answer in answers {
        let line = answer
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{what}: request failed: {e}"))?;
        *by_backend
            .entry(line.split_whitespace().next().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    eprintln!("    {what}: answers by backend {by_backend:?}");
    Ok(())
}

fn teardown() -> anyhow::Result<()> {
    let path = state_file();
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("no demo is running");
        return Ok(());
    };
    let kept = Kept::from_json(&serde_json::from_str(&text).context("reading the demo state")?);
    kept.teardown();
    std::fs::remove_file(&path)?;
    eprintln!("demo removed");
    Ok(())
}
