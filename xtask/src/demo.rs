//! `cargo xtask demo`: the whole thing on one machine. Builds a namespace "node" with a client
//! pod and three web pods, runs the agent there with a ClusterIP service, sends HTTP and UDP
//! through it, and prints what the datapath holds (`services`, `flows`).
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context;
use testbed::{
    Agent, Kept, Node, Wiring, http_requests,
    manifests::{DNS, HTTP, service},
    udp_request,
};

use crate::{build, run, setup, workspace_root};

const VIP: &str = "10.96.0.10";

fn state_file() -> PathBuf {
    workspace_root().join("target/demo-state.json")
}

fn step(message: &str) {
    eprintln!("\n==> {message}");
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

    step("creating a node namespace with a client pod and three web pods (routed /32 veths)");
    let mut node = Node::new(Wiring::Routed, [10, 244, 1])?;
    node.add_pod("client")?;
    for i in 0..3 {
        let index = node.add_pod(&format!("web-{i}"))?;
        node.pods[index].serve(8080, 5353)?;
        eprintln!(
            "    web-{i}: {} (HTTP :8080, UDP :5353)",
            node.pods[index].ip
        );
    }

    step(
        "starting the agent on the node and publishing Service default/web (ClusterIP 10.96.0.10)",
    );
    let agent = Agent::start(&node, "demo-node")?;
    let web_ips: Vec<_> = node.pods[1..].iter().map(|p| p.ip).collect();
    agent.write_manifest("web.yaml", &service("web", VIP, &[HTTP, DNS], &web_ips))?;
    agent.wait_for_backends("10.96.0.10:80", 3)?;
    eprintln!("    manifests: {}", agent.manifests.display());
    eprintln!("    pinned maps: {}", agent.bpffs_dir.display());

    step("sending 30 HTTP requests and 3 UDP datagrams from the client pod to the ClusterIP");
    let client = &node.pods[0].netns;
    let answers = http_requests(client, &format!("http://{VIP}/"), 30);
    let mut by_backend = std::collections::BTreeMap::<String, usize>::new();
    for answer in &answers {
        let line = answer
            .as_ref()
            .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
        *by_backend
            .entry(line.split_whitespace().next().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    eprintln!("    HTTP answers by backend: {by_backend:?}");
    for i in 0..3 {
        let answer = udp_request(client, &format!("{VIP}:53"), Some(41000 + i), "hello")?;
        eprintln!("    UDP answer: {answer}");
    }
    std::thread::sleep(Duration::from_millis(100));

    step("dataplane-agent services");
    print!("{}", agent.cli(&["services"])?);
    step("dataplane-agent flows");
    print!("{}", agent.cli(&["flows"])?);

    if keep {
        let kept = node.keep().merge(agent.keep());
        std::fs::write(state_file(), serde_json::to_string_pretty(&kept.to_json())?)?;
        let bpffs = &kept.bpffs_dirs[0];
        step("left running (remove with `cargo xtask demo --down`). Try:");
        eprintln!(
            "    target/debug/dataplane-agent services --bpffs-dir {}",
            bpffs.display()
        );
        eprintln!(
            "    target/debug/dataplane-agent flows -o json --bpffs-dir {}",
            bpffs.display()
        );
        eprintln!("    bpftool map dump pinned {}/dp_svc_v2", bpffs.display());
        eprintln!(
            "    nsenter --net=/run/netns/{} curl -s http://{VIP}/",
            kept.namespaces[1]
        );
    } else {
        step("cleaning up (use --keep to leave the demo running)");
    }
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
