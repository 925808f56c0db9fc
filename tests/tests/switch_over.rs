//! Switching a node from kube-proxy to the agent keeps the connections kube-proxy's rules
//! opened: the agent adopts the kernel's NATed flows (ctnetlink) before it programs their
//! frontends, and they keep their backends after kube-proxy's rules are removed.
//!
//! The rules are kube-proxy's own structures, built here for one ClusterIP: iptables mode
//! (KUBE-SERVICES -> KUBE-SVC-… -> KUBE-SEP-… with `statistic --mode random` and DNAT) and
//! nftables mode (a `service-ips` verdict map, `numgen random` over endpoint chains).
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use testbed::{
    Agent, AgentOptions, LineConnection, Node, Wiring,
    manifests::{ServicePort, service},
    require_root, unique, wait_until,
};

const VIP: &str = "10.96.0.10";
const PORT: u16 = 7000;
const LINES: ServicePort<'static> = ServicePort {
    name: "lines",
    protocol: "TCP",
    port: PORT,
    target_port: PORT,
};
const HELD: usize = 50;

enum Mode {
    Iptables,
    Nftables,
}

fn kube_proxy_rules(mode: &Mode, backends: &[Ipv4Addr]) -> (&'static str, String) {
    match mode {
        Mode::Iptables => {
            let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-LINES - [0:0]\n");
            for i in 0..backends.len() {
                rules += &format!(":KUBE-SEP-{i} - [0:0]\n");
            }
            rules += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
            rules +=
                "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
            rules += &format!(
                "-A KUBE-SERVICES -d {VIP}/32 -p tcp -m tcp --dport {PORT} -j KUBE-SVC-LINES\n"
            );
            for (i, ip) in backends.iter().enumerate() {
                let left = backends.len() - i;
                if left > 1 {
                    rules += &format!(
                        "-A KUBE-SVC-LINES -m statistic --mode random --probability {:.5} -j KUBE-SEP-{i}\n",
                        1.0 / left as f64
                    );
                } else {
                    rules += &format!("-A KUBE-SVC-LINES -j KUBE-SEP-{i}\n");
                }
                rules += &format!(
                    "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {ip}:{PORT}\n"
                );
            }
            ("iptables-restore", rules + "COMMIT\n")
        }
        Mode::Nftables => {
            // As kube-proxy's nftables mode writes it (`nft -f` commands).
            let t = "ip kube-proxy";
            let mut rules = format!(
                "add table {t}\n\
                 add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
                 add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
                 add rule {t} nat-prerouting ip daddr . meta l4proto . th dport vmap @service-ips\n\
                 add chain {t} service-lines\n"
            );
            let mut endpoints = Vec::new();
            for (i, ip) in backends.iter().enumerate() {
                rules += &format!(
                    "add chain {t} endpoint-{i}\nadd rule {t} endpoint-{i} meta l4proto tcp dnat to {ip}:{PORT}\n"
                );
                endpoints.push(format!("{i} : goto endpoint-{i}"));
            }
            rules += &format!(
                "add rule {t} service-lines numgen random mod {} vmap {{ {} }}\n\
                 add element {t} service-ips {{ {VIP} . tcp . {PORT} : goto service-lines }}\n",
                backends.len(),
                endpoints.join(", ")
            );
            ("nft", rules)
        }
    }
}

fn remove_kube_proxy_rules(node: &Node, mode: &Mode) {
    match mode {
        Mode::Iptables => {
            let saved = node.netns.run("iptables-save", &["-t", "nat"]).unwrap();
            let kept: String = saved
                .lines()
                .filter(|l| {
                    !l.contains("KUBE-SERVICES")
                        && !l.contains("KUBE-SVC")
                        && !l.contains("KUBE-SEP")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            node.netns
                .run_with_input("iptables-restore", &["-T", "nat"], &kept)
                .unwrap();
            let left = node.netns.run("iptables-save", &["-t", "nat"]).unwrap();
            assert!(!left.contains("KUBE-SVC"), "{left}");
        }
        Mode::Nftables => {
            node.netns
                .run("nft", &["delete", "table", "ip", "kube-proxy"])
                .unwrap();
        }
    }
}

/// Which pod answered a line: the echo server's first word.
fn pod_of(answer: &str) -> String {
    answer.split_whitespace().next().unwrap_or("").to_string()
}

/// A node (realistic ruleset) with a client pod and three backend pods serving lines on
/// `PORT`; the backends' addresses.
fn node_with_line_servers(subnet: u8) -> (Node, Vec<Ipv4Addr>) {
    let mut node = Node::new(Wiring::Routed, [10, 244, subnet]).unwrap();
    node.add_pod("client").unwrap();
    for i in 0..3 {
        let index = node.add_pod(&format!("web-{i}")).unwrap();
        node.pods[index]
            .serve_with_line_echo(8080, 5353, Some(PORT))
            .unwrap();
    }
    let backends: Vec<Ipv4Addr> = node.pods[1..].iter().map(|p| p.ip).collect();
    (node, backends)
}

/// `HELD` connections from the client pod to `target`, each with the pod that answered it.
fn hold_connections(node: &Node, target: &str) -> Vec<(LineConnection, String)> {
    (0..HELD)
        .map(|i| {
            let mut c = LineConnection::open(&node.pods[0].netns, target, None).unwrap();
            let pod = pod_of(&c.exchange(&format!("before {i}")).unwrap());
            (c, pod)
        })
        .collect()
}

fn switch_over_keeps_connections(mode: Mode, subnet: u8) {
    let (node, backends) = node_with_line_servers(subnet);

    // kube-proxy serves the node: its rules, and connections through them.
    let (tool, rules) = kube_proxy_rules(&mode, &backends);
    let args: &[&str] = match mode {
        Mode::Iptables => &["--noflush"],
        Mode::Nftables => &["-f", "-"],
    };
    node.netns.run_with_input(tool, args, &rules).unwrap();
    let target = format!("{VIP}:{PORT}");
    let mut held = hold_connections(&node, &target);
    let spread: BTreeMap<&str, usize> = held.iter().fold(BTreeMap::new(), |mut m, (_, p)| {
        *m.entry(p.as_str()).or_default() += 1;
        m
    });
    assert!(
        spread.len() > 1,
        "kube-proxy's rules spread the connections: {spread:?}"
    );

    // The agent takes over, with the service in its manifests from the start.
    let manifests = std::env::temp_dir().join(unique("dataplane-switch-"));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("lines.yaml"),
        service("lines", VIP, &[LINES], &backends),
    )
    .unwrap();
    let agent = Agent::start_with(
        &node,
        "node-a",
        AgentOptions {
            shared_manifests: Some(manifests.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    agent.wait_for_backends(&target, 3).unwrap();

    // Still through kube-proxy's rules present, then with them gone.
    for phase in ["rules present", "rules removed"] {
        if phase == "rules removed" {
            remove_kube_proxy_rules(&node, &mode);
        }
        let mut broken = Vec::new();
        for (i, (connection, pod)) in held.iter_mut().enumerate() {
            match connection.exchange(&format!("{phase} {i}")) {
                Ok(answer) if pod_of(&answer) == *pod => {}
                other => broken.push(format!("{i} on {pod}: {other:?}")),
            }
        }
        assert!(
            broken.is_empty(),
            "{phase}: {} of {HELD} held connections broke:\n{}\nagent log:\n{}",
            broken.len(),
            broken.join("\n"),
            agent.log_text()
        );
    }
    let log = agent.log_text();
    assert!(
        log.contains("took over connections from the kernel's connection tracking"),
        "{log}"
    );
    // New connections are the agent's now, and work.
    wait_until(Duration::from_secs(3), || {
        LineConnection::open(&node.pods[0].netns, &target, None)
            .and_then(|mut c| c.exchange("new"))
            .is_ok()
    })
    .unwrap();
    drop(agent);
    let _ = std::fs::remove_dir_all(&manifests);
}

#[test]
fn connections_opened_through_kube_proxys_iptables_rules_survive_the_switch_over() {
    require_root!();
    switch_over_keeps_connections(Mode::Iptables, 31);
}

#[test]
fn connections_opened_through_kube_proxys_nftables_rules_survive_the_switch_over() {
    require_root!();
    switch_over_keeps_connections(Mode::Nftables, 32);
}

/// Rolling back (README "Rolling back"): kube-proxy's rules come back while the agent still
/// runs, then the agent stops and `cleanup` detaches its datapath. The agent's connections are
/// not in the kernel's connection tracking, so kube-proxy's rules pick a backend for their next
/// packet afresh: those that land on their own backend go on, the others break (measured and
/// printed here; the README states it). New connections work at once.
#[test]
fn rolling_back_to_kube_proxy_keeps_new_connections_and_some_old_ones() {
    require_root!();
    let (node, backends) = node_with_line_servers(33);
    let mut agent = Agent::start(&node, "node-a").unwrap();
    agent
        .write_manifest("lines.yaml", &service("lines", VIP, &[LINES], &backends))
        .unwrap();
    let target = format!("{VIP}:{PORT}");
    agent.wait_for_backends(&target, 3).unwrap();
    let mut held = hold_connections(&node, &target);

    let (tool, rules) = kube_proxy_rules(&Mode::Iptables, &backends);
    node.netns
        .run_with_input(tool, &["--noflush"], &rules)
        .unwrap();
    agent.stop();
    agent.cli(&["cleanup"]).unwrap();

    let survived = held
        .iter_mut()
        .enumerate()
        .map(|(i, (c, pod))| {
            c.exchange(&format!("after {i}"))
                .is_ok_and(|answer| pod_of(&answer) == *pod)
        })
        .filter(|survived| *survived)
        .count();
    println!("rolled back: {survived} of {HELD} held connections survived");
    let mut fresh = LineConnection::open(&node.pods[0].netns, &target, None).unwrap();
    assert!(
        fresh.exchange("new").is_ok(),
        "new connections work through kube-proxy's rules"
    );
    assert!(
        0 < survived && survived < HELD,
        "{survived} of {HELD}: kube-proxy re-balances the agent's connections at random"
    );
}
