//! Several "nodes" joined by an underlay: a bridge in its own namespace, each node's external
//! interface `eth0` plugged into it with an address from 192.0.2.0/24 (TEST-NET-1, routed
//! nowhere), each node's pod CIDR routed to it from the others, and an "external client"
//! namespace on the same underlay. One agent per node, all reading one shared manifest
//! directory (the cluster's objects), each with its own `--node-name` and `--bpffs-dir`.
//!
//! Options ([`ClusterOptions`]): jumbo-frame pod veths over the 1500-byte underlay (as on
//! AWS), and an L3 overlay: pod CIDRs routed through a TUN device named as Calico's WireGuard
//! device, carried between nodes by a userspace relay (`assets/tun_relay.py`).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use crate::{Agent, AgentOptions, Netns, Node, Process, Wiring, pod_cidr6, unique, wait_until};

/// The underlay's addresses: nodes are .11, .12, ...; external clients .100, .101, ...
pub fn underlay_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

/// The underlay's IPv6 addresses (2001:db8::/32, documentation, routed nowhere), with the
/// same last number as the IPv4 ones: the underlay is dual-stack.
pub fn underlay_ip6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last as u16)
}

/// Load-balancer and external IPs are taken from here; external clients route it via the
/// first node, as a load balancer in front of the cluster would deliver it.
pub const FRONTEND_NET: &str = "198.51.100.0/24";

/// The underlay's MTU, as on AWS and most clouds.
pub const UNDERLAY_MTU: u32 = 1500;

/// The nodes' default gateway: an address on the underlay that nothing answers, so a node
/// routes as a real one (everything unknown out of `eth0`) and nothing leaves the testbed.
pub const UNDERLAY_GATEWAY: &str = "192.0.2.1";

/// The overlay's device in each node: Calico's WireGuard device name (a TUN device here,
/// link/none like WireGuard's), its MTU (WireGuard's default) and the relay's UDP port.
pub const TUNNEL_DEVICE: &str = "wireguard.cali";
pub const TUNNEL_MTU: u32 = 1420;
pub const TUNNEL_PORT: u16 = 51820;

/// How the nodes' pod networks are joined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overlay {
    /// Each node's pod CIDR is routed via that node's underlay address.
    #[default]
    None,
    /// Each node's pod CIDR is routed into [`TUNNEL_DEVICE`], a TUN device whose relay sends
    /// the packets to the node owning the destination over UDP; agents attach to it as an
    /// external interface.
    Tun,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterOptions {
    /// MTU of the pod veths, both ends (AWS: 9001); default the kernel's 1500.
    pub pod_mtu: Option<u32>,
    pub overlay: Overlay,
}

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

    /// Plugs `ns` into the underlay as `eth0` with `ip/24` and the IPv6 address of the same
    /// number ([`underlay_ip6`]).
    pub fn plug(&self, ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<()> {
        let port = unique("u");
        self.netns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.netns.ip(&["link", "set", &port, "master", "br0"])?;
        self.netns.ip(&["link", "set", &port, "up"])?;
        let mtu = UNDERLAY_MTU.to_string();
        self.netns.ip(&["link", "set", &port, "mtu", &mtu])?;
        ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        let ip6 = underlay_ip6(ip.octets()[3]);
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

pub struct ClusterNode {
    pub name: String,
    pub zone: String,
    pub ip: Ipv4Addr,
    /// The node's IPv6 underlay address.
    pub ip6: Ipv6Addr,
    pub node: Node,
}

/// The nodes' Node objects: names, zones, and InternalIPs of both families (node ports
/// listen there), as a dual-stack cluster's kubelet reports them.
pub fn node_objects(nodes: &[ClusterNode]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{topology.kubernetes.io/zone: {}}}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: \"{}\"}}, {{type: InternalIP, address: \"{}\"}}]}}\n---\n",
                n.name, n.zone, n.ip, n.ip6
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
    pub options: ClusterOptions,
    /// The overlay's relays, one per node.
    relays: Vec<Process>,
}

impl MultiNode {
    /// `pods[i]` names the pods of node i (their servers are started by the caller).
    pub fn new(pods: &[&[&str]], external_clients: usize) -> anyhow::Result<Self> {
        Self::with(pods, external_clients, ClusterOptions::default())
    }

    pub fn with(
        pods: &[&[&str]],
        external_clients: usize,
        options: ClusterOptions,
    ) -> anyhow::Result<Self> {
        let underlay = Underlay::new()?;
        let mut nodes = Vec::new();
        for (i, names) in pods.iter().enumerate() {
            let mut node = Node::new(Wiring::Routed, [10, 244, i as u8 + 1])?;
            node.pod_mtu = options.pod_mtu;
            let ip = underlay_ip(11 + i as u8);
            underlay.plug(&node.netns, ip)?;
            node.netns
                .ip(&["route", "add", "default", "via", UNDERLAY_GATEWAY])?;
            for name in *names {
                node.add_pod(name)?;
            }
            let name = format!("node-{}", (b'a' + i as u8) as char);
            let zone = format!("zone-{}", (b'a' + i as u8) as char);
            nodes.push(ClusterNode {
                name,
                zone,
                ip,
                ip6: underlay_ip6(11 + i as u8),
                node,
            });
        }
        // Each node reaches the others' pod CIDRs through them, or through the tunnel.
        let mut relays = Vec::new();
        for (i, a) in nodes.iter().enumerate() {
            let peers: Vec<(String, Ipv4Addr)> = nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, b)| (format!("10.244.{}.0/24", j + 1), b.ip))
                .collect();
            if options.overlay == Overlay::Tun {
                relays.push(start_tunnel(&a.node, a.ip, &peers)?);
            }
            for (j, b) in nodes.iter().enumerate() {
                // IPv6 pods are routed over the underlay (the TUN relay carries IPv4 only).
                if j != i && options.overlay == Overlay::None {
                    let cidr = pod_cidr6([10, 244, j as u8 + 1]);
                    a.node
                        .netns
                        .ip(&["-6", "route", "add", &cidr, "via", &b.ip6.to_string()])?;
                }
            }
            for (cidr, peer) in &peers {
                match options.overlay {
                    Overlay::None => {
                        a.node
                            .netns
                            .ip(&["route", "add", cidr, "via", &peer.to_string()])?
                    }
                    Overlay::Tun => {
                        a.node
                            .netns
                            .ip(&["route", "add", cidr, "dev", TUNNEL_DEVICE])?
                    }
                };
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
            options,
            relays,
        })
    }

    /// The agents' `--external-interfaces`: the underlay, and the tunnel if there is one.
    pub fn external_interfaces(&self) -> String {
        match self.options.overlay {
            Overlay::None => "eth0".into(),
            Overlay::Tun => format!("eth0,{TUNNEL_DEVICE}"),
        }
    }

    /// Starts one agent per node on the shared manifests, serving external traffic on `eth0`
    /// (and the tunnel device).
    pub fn start_agents(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        for n in &self.nodes {
            let options = AgentOptions {
                shared_manifests: Some(self.manifests.clone()),
                external_interfaces: Some(self.external_interfaces()),
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

/// Creates [`TUNNEL_DEVICE`] in `node` and starts its relay, sending packets for each
/// `(cidr, peer)` to that peer node's relay; returns once the relay holds the device.
///
/// Reverse-path filtering stays strict everywhere but on the tunnel device (the kernel
/// applies the larger of `all` and the interface's value, so `all` goes to 0 and each other
/// interface keeps its own 1): traffic SNATed to a node's underlay address reaches its peer
/// through the tunnel while the peer routes that address via the underlay. Calico sets
/// strict filtering on its workload interfaces only, not on `wireguard.cali`.
fn start_tunnel(
    node: &Node,
    ip: Ipv4Addr,
    peers: &[(String, Ipv4Addr)],
) -> anyhow::Result<Process> {
    let (realistic, node) = (node.realistic, &node.netns);
    if realistic {
        node.sysctl("net.ipv4.conf.eth0.rp_filter", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    }
    node.ip(&["tuntap", "add", "mode", "tun", "name", TUNNEL_DEVICE])?;
    node.ip(&[
        "link",
        "set",
        TUNNEL_DEVICE,
        "mtu",
        &TUNNEL_MTU.to_string(),
        "up",
    ])?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tun_relay.py");
    let mut args = vec![
        script.to_str().unwrap().to_string(),
        TUNNEL_DEVICE.to_string(),
        ip.to_string(),
        TUNNEL_PORT.to_string(),
    ];
    args.extend(peers.iter().map(|(cidr, peer)| format!("{cidr}={peer}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = node.spawn("python3", &args)?;
    // A TUN device has carrier while a process holds it.
    wait_until(Duration::from_secs(10), || {
        node.ip(&["link", "show", TUNNEL_DEVICE])
            .is_ok_and(|l| l.contains("LOWER_UP") && !l.contains("NO-CARRIER"))
    })
    .map_err(|e| e.context(format!("relay never attached to {TUNNEL_DEVICE}")))?;
    Ok(relay)
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        self.agents.clear();
        self.relays.clear();
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
        for relay in std::mem::take(&mut this.relays) {
            kept.pids.push(relay.child.id());
            std::mem::forget(relay);
        }
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
