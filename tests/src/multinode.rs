//! Several "nodes" joined by an underlay: a bridge in its own namespace, each node's external
//! interface `eth0` plugged into it with an address from 192.0.2.0/24 (TEST-NET-1, routed
//! nowhere), each node's pod CIDR routed to it from the others, and an "external client"
//! namespace on the same underlay. One agent per node, all reading one shared manifest
//! directory (the cluster's objects), each with its own `--node-name` and `--bpffs-dir`.
use std::{net::Ipv4Addr, path::PathBuf};

use crate::{Agent, AgentOptions, Netns, Node, Wiring, unique};

/// The underlay's addresses: nodes are .11, .12, ...; external clients .100, .101, ...
pub fn underlay_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

/// Load-balancer and external IPs are taken from here; external clients route it via the
/// first node, as a load balancer in front of the cluster would deliver it.
pub const FRONTEND_NET: &str = "198.51.100.0/24";

pub struct Underlay {
    pub netns: Netns,
}

impl Underlay {
    pub fn new() -> anyhow::Result<Self> {
        let netns = Netns::new("dpu")?;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { netns })
    }

    /// Plugs `ns` into the underlay as `eth0` with `ip/24`.
    pub fn plug(&self, ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<()> {
        let port = unique("u");
        self.netns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.netns.ip(&["link", "set", &port, "master", "br0"])?;
        self.netns.ip(&["link", "set", &port, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

pub struct ClusterNode {
    pub name: String,
    pub zone: String,
    pub ip: Ipv4Addr,
    pub node: Node,
}

/// The nodes' Node objects: names, zones, and InternalIPs (node ports listen there).
pub fn node_objects(nodes: &[ClusterNode]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{topology.kubernetes.io/zone: {}}}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: \"{}\"}}]}}\n---\n",
                n.name, n.zone, n.ip
            )
        })
        .collect()
}

pub struct MultiNode {
    pub underlay: std::mem::ManuallyDrop<Underlay>,
    pub nodes: Vec<ClusterNode>,
    /// External clients, at .100, .101, ...
    pub clients: Vec<Netns>,
    pub manifests: PathBuf,
    /// One per node, in the same order; started by [`MultiNode::start_agents`].
    pub agents: Vec<Agent>,
}

impl MultiNode {
    /// `pods[i]` names the pods of node i (their servers are started by the caller).
    pub fn new(pods: &[&[&str]], external_clients: usize) -> anyhow::Result<Self> {
        let underlay = Underlay::new()?;
        let mut nodes = Vec::new();
        for (i, names) in pods.iter().enumerate() {
            let mut node = Node::new(Wiring::Routed, [10, 244, i as u8 + 1])?;
            let ip = underlay_ip(11 + i as u8);
            underlay.plug(&node.netns, ip)?;
            for name in *names {
                node.add_pod(name)?;
            }
            let name = format!("node-{}", (b'a' + i as u8) as char);
            let zone = format!("zone-{}", (b'a' + i as u8) as char);
            nodes.push(ClusterNode {
                name,
                zone,
                ip,
                node,
            });
        }
        // Each node reaches the others' pod CIDRs through them.
        for (i, a) in nodes.iter().enumerate() {
            for (j, b) in nodes.iter().enumerate() {
                if i != j {
                    let cidr = format!("10.244.{}.0/24", j + 1);
                    a.node
                        .netns
                        .ip(&["route", "add", &cidr, "via", &b.ip.to_string()])?;
                }
            }
        }
        let mut clients = Vec::new();
        for k in 0..external_clients {
            let client = Netns::new("dpx")?;
            underlay.plug(&client, underlay_ip(100 + k as u8))?;
            client.ip(&[
                "route",
                "add",
                FRONTEND_NET,
                "via",
                &nodes[0].ip.to_string(),
            ])?;
            clients.push(client);
        }
        let manifests = std::env::temp_dir().join(unique("dataplane-cluster-"));
        std::fs::create_dir_all(&manifests)?;
        std::fs::write(manifests.join("nodes.yaml"), node_objects(&nodes))?;
        Ok(Self {
            underlay: std::mem::ManuallyDrop::new(underlay),
            nodes,
            clients,
            manifests,
            agents: vec![],
        })
    }

    /// Starts one agent per node on the shared manifests, serving external traffic on `eth0`.
    pub fn start_agents(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        for n in &self.nodes {
            let options = AgentOptions {
                shared_manifests: Some(self.manifests.clone()),
                external_interfaces: Some("eth0".into()),
                extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            };
            self.agents
                .push(Agent::start_with(&n.node, &n.name, options)?);
        }
        Ok(())
    }

    /// Writes a manifest file every agent reads.
    pub fn write_manifest(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    /// The pod named `name`, on whichever node.
    pub fn pod(&mut self, name: &str) -> &mut crate::Pod {
        self.nodes
            .iter_mut()
            .flat_map(|n| n.node.pods.iter_mut())
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        self.agents.clear();
        self.nodes.clear();
        self.clients.clear();
        // SAFETY: dropped exactly once, here (`keep` skips this Drop).
        unsafe { std::mem::ManuallyDrop::drop(&mut self.underlay) };
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

impl MultiNode {
    /// Leaves everything running; returns what to remove later (`cargo xtask demo --keep`).
    pub fn keep(mut self) -> crate::Kept {
        let mut kept = crate::Kept::default();
        for agent in std::mem::take(&mut self.agents) {
            kept = kept.merge(agent.keep());
        }
        let mut this = std::mem::ManuallyDrop::new(self);
        for node in std::mem::take(&mut this.nodes) {
            kept = kept.merge(node.node.keep());
        }
        for client in std::mem::take(&mut this.clients) {
            kept.namespaces.push(client.name.clone());
            std::mem::forget(client);
        }
        kept.namespaces.push(this.underlay.netns.name.clone());
        kept.work_dirs.push(this.manifests.clone());
        kept
    }
}
