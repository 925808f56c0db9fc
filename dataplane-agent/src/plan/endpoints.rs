//! Which endpoints a service port uses on this node, with upstream kube-proxy's semantics
//! (`pkg/proxy/topology.go` CategorizeEndpoints, `endpointslicecache.go`), feature gates at
//! their current defaults (PreferSameTrafficDistribution on):
//!
//! - "usable" means ready; when no endpoint is ready, serving-and-terminating ones are used
//!   instead (separately for cluster and for local traffic);
//! - topology hints apply only when every ready endpoint carries them and at least one is for
//!   this node (`forNodes`, checked first) or this node's zone (`forZones`); otherwise they are
//!   ignored entirely;
//! - local endpoints (on this node) ignore topology.
use std::{collections::BTreeSet, net::SocketAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub local: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl EndpointInfo {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The traffic policies of one service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (meaningful only when externally accessible).
    pub external_local: bool,
    /// Has a node port, load-balancer IPs or external IPs.
    pub externally_accessible: bool,
}

impl PortPolicy {
    fn external_policy_local(&self) -> bool {
        self.externally_accessible && self.external_local
    }

    /// Cluster endpoints serve internal traffic under policy Cluster, and external traffic
    /// (even with policy Local they are needed for traffic from inside the cluster).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || self.external_policy_local()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// The result of categorizing a port's endpoints. `None` means the port never uses that kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    pub cluster: Option<Vec<SocketAddr>>,
    pub local: Option<Vec<SocketAddr>>,
    /// Some usable endpoint exists somewhere in the cluster (even if none is used here).
    pub has_any: bool,
}

impl Categorized {
    /// Backends for traffic from inside the cluster (ClusterIP).
    pub fn internal(&self, policy: &PortPolicy) -> Vec<SocketAddr> {
        let chosen = if policy.internal_local {
            &self.local
        } else {
            &self.cluster
        };
        chosen.clone().unwrap_or_default()
    }

    /// Backends for traffic from outside (NodePort, LoadBalancer, external IPs).
    pub fn external(&self, policy: &PortPolicy) -> Vec<SocketAddr> {
        let chosen = if policy.external_policy_local() {
            &self.local
        } else {
            &self.cluster
        };
        chosen.clone().unwrap_or_default()
    }
}

fn filter(endpoints: &[EndpointInfo], keep: impl Fn(&EndpointInfo) -> bool) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter(|e| keep(e))
        .map(|e| e.addr)
        .collect()
}

pub fn categorize(
    endpoints: &[EndpointInfo],
    policy: &PortPolicy,
    node_name: &str,
    zone: &str,
) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        out.cluster = policy.uses_cluster_endpoints().then(Vec::new);
        out.local = policy.uses_local_endpoints().then(Vec::new);
        return out;
    }
    if policy.uses_cluster_endpoints() {
        let mode = topology_mode(endpoints, node_name, zone);
        let mut cluster = filter(endpoints, |e| {
            e.ready && available_for_topology(e, mode, node_name, zone)
        });
        if cluster.is_empty() {
            // No ready endpoint anywhere (topology already fell back if the problem was
            // topology): fall back to those still serving while terminating.
            cluster = filter(endpoints, EndpointInfo::serving_terminating);
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
    }
    if !policy.uses_local_endpoints() {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in endpoints {
        if e.ready {
            out.has_any = true;
            local_ready |= e.local;
        } else if e.serving_terminating() {
            out.has_any = true;
            local_serving_terminating |= e.local;
        }
    }
    out.local = Some(if local_ready {
        filter(endpoints, |e| e.local && e.ready)
    } else if local_serving_terminating {
        filter(endpoints, |e| e.local && e.serving_terminating())
    } else {
        vec![]
    });
    out
}

fn topology_mode(endpoints: &[EndpointInfo], node_name: &str, zone: &str) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for e in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if e.node_hints.is_empty() {
            all_node_hints = false;
        } else if e.node_hints.contains(node_name) {
            for_node = true;
        }
        if e.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if e.zone_hints.contains(zone) {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(
    e: &EndpointInfo,
    mode: TopologyMode,
    node_name: &str,
    zone: &str,
) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.contains(node_name),
        TopologyMode::PreferSameZone => e.zone_hints.contains(zone),
    }
}

/// Upstream's table test for CategorizeEndpoints (pkg/proxy/topology_test.go), every case
/// that applies with the feature gates at their defaults: topology hints are followed
/// whenever present (the hints annotation is the EndpointSlice controller's business, not the
/// proxy's), and terminating endpoints are always a fallback.
#[cfg(test)]
mod upstream_table {
    use super::*;

    struct Ep {
        addr: &'static str,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    }

    const fn ready(addr: &'static str) -> Ep {
        Ep {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            zones: &[],
            nodes: &[],
        }
    }

    impl Ep {
        const fn local(mut self) -> Self {
            self.local = true;
            self
        }
        const fn unready(mut self) -> Self {
            self.ready = false;
            self.serving = false;
            self
        }
        const fn terminating(mut self) -> Self {
            self.ready = false;
            self.serving = true;
            self.terminating = true;
            self
        }
        const fn zones(mut self, zones: &'static [&'static str]) -> Self {
            self.zones = zones;
            self
        }
        const fn nodes(mut self, nodes: &'static [&'static str]) -> Self {
            self.nodes = nodes;
            self
        }
    }

    struct Case {
        name: &'static str,
        zone: &'static str,
        policy: PortPolicy,
        endpoints: Vec<Ep>,
        cluster: Option<&'static [&'static str]>,
        local: Option<&'static [&'static str]>,
        only_remote: bool,
    }

    const CLUSTER: PortPolicy = PortPolicy {
        internal_local: false,
        external_local: false,
        externally_accessible: false,
    };
    const ITP_LOCAL: PortPolicy = PortPolicy {
        internal_local: true,
        external_local: false,
        externally_accessible: false,
    };
    const fn node_port(internal_local: bool, external_local: bool) -> PortPolicy {
        PortPolicy {
            internal_local,
            external_local,
            externally_accessible: true,
        }
    }

    fn abcd_zones() -> Vec<Ep> {
        vec![
            ready("10.1.2.3:80").zones(&["zone-a"]),
            ready("10.1.2.4:80").zones(&["zone-b"]),
            ready("10.1.2.5:80").zones(&["zone-c"]),
            ready("10.1.2.6:80").zones(&["zone-a"]),
        ]
    }

    fn cases() -> Vec<Case> {
        let case = |name, zone, policy, endpoints, cluster, local| Case {
            name,
            zone,
            policy,
            endpoints,
            cluster,
            local,
            only_remote: false,
        };
        vec![
            case(
                "hints, zone-a",
                "zone-a",
                CLUSTER,
                abcd_zones(),
                Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                None,
            ),
            case(
                "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                "zone-a",
                node_port(false, true),
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a"]).local(),
                    ready("10.1.2.4:80").zones(&["zone-b"]).local(),
                    ready("10.1.2.5:80").zones(&["zone-c"]),
                    ready("10.1.2.6:80").zones(&["zone-a"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            ),
            case(
                "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                "zone-a",
                node_port(true, false),
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a"]).local(),
                    ready("10.1.2.4:80").zones(&["zone-b"]).local(),
                    ready("10.1.2.5:80").zones(&["zone-c"]),
                    ready("10.1.2.6:80").zones(&["zone-a"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            ),
            case(
                "empty node labels",
                "",
                CLUSTER,
                vec![ready("10.1.2.3:80").zones(&["zone-a"])],
                Some(&["10.1.2.3:80"]),
                None,
            ),
            case(
                "node in different zone, no endpoint filtering",
                "zone-b",
                CLUSTER,
                vec![ready("10.1.2.3:80").zones(&["zone-a"])],
                Some(&["10.1.2.3:80"]),
                None,
            ),
            case(
                "unready endpoint",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a"]),
                    ready("10.1.2.4:80").zones(&["zone-b"]),
                    ready("10.1.2.5:80").zones(&["zone-c"]),
                    ready("10.1.2.6:80").zones(&["zone-a"]).unready(),
                ],
                Some(&["10.1.2.3:80"]),
                None,
            ),
            case(
                "only unready endpoints in same zone (should not filter)",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a"]).unready(),
                    ready("10.1.2.4:80").zones(&["zone-b"]),
                    ready("10.1.2.5:80").zones(&["zone-c"]),
                    ready("10.1.2.6:80").zones(&["zone-a"]).unready(),
                ],
                Some(&["10.1.2.4:80", "10.1.2.5:80"]),
                None,
            ),
            case(
                "missing hints, no filtering applied",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a"]),
                    ready("10.1.2.4:80").zones(&["zone-b"]),
                    ready("10.1.2.5:80"),
                    ready("10.1.2.6:80").zones(&["zone-a"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
                None,
            ),
            case(
                "multiple hints per endpoint, filtering includes any endpoint with zone included",
                "zone-c",
                CLUSTER,
                vec![
                    ready("10.1.2.3:80").zones(&["zone-a", "zone-b", "zone-c"]),
                    ready("10.1.2.4:80").zones(&["zone-b", "zone-c"]),
                    ready("10.1.2.5:80").zones(&["zone-b", "zone-d"]),
                    ready("10.1.2.6:80").zones(&["zone-c"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                None,
            ),
            case(
                "conflicting topology and localness require merging allEndpoints",
                "zone-a",
                node_port(false, true),
                vec![
                    ready("10.0.0.0:80").zones(&["zone-a"]).local(),
                    ready("10.0.0.1:80").zones(&["zone-b"]).local(),
                    ready("10.0.0.2:80").zones(&["zone-a"]),
                    ready("10.0.0.3:80").zones(&["zone-b"]),
                ],
                Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ),
            case(
                "internalTrafficPolicy: Local, with empty endpoints",
                "",
                ITP_LOCAL,
                vec![],
                None,
                Some(&[]),
            ),
            Case {
                only_remote: true,
                ..case(
                    "internalTrafficPolicy: Local, but all endpoints are remote",
                    "",
                    ITP_LOCAL,
                    vec![ready("10.0.0.0:80"), ready("10.0.0.1:80")],
                    None,
                    Some(&[]),
                )
            },
            case(
                "internalTrafficPolicy: Local, all endpoints are local",
                "",
                ITP_LOCAL,
                vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80").local()],
                None,
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ),
            case(
                "internalTrafficPolicy: Local, some endpoints are local",
                "",
                ITP_LOCAL,
                vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
                None,
                Some(&["10.0.0.0:80"]),
            ),
            case(
                "Cluster traffic policy, endpoints not Ready",
                "",
                CLUSTER,
                vec![
                    ready("10.0.0.0:80").unready(),
                    ready("10.0.0.1:80").unready(),
                ],
                Some(&[]),
                None,
            ),
            case(
                "Cluster traffic policy, some endpoints are Ready",
                "",
                CLUSTER,
                vec![ready("10.0.0.0:80").unready(), ready("10.0.0.1:80")],
                Some(&["10.0.0.1:80"]),
                None,
            ),
            case(
                "Cluster traffic policy, all endpoints are terminating",
                "",
                CLUSTER,
                vec![
                    ready("10.0.0.0:80").terminating().local(),
                    ready("10.0.0.1:80").terminating(),
                ],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                None,
            ),
            case(
                "iTP: Local, eTP: Cluster, some endpoints local",
                "",
                node_port(true, false),
                vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                Some(&["10.0.0.0:80"]),
            ),
            case(
                "iTP: Cluster, eTP: Local, some endpoints local",
                "",
                node_port(false, true),
                vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                Some(&["10.0.0.0:80"]),
            ),
            case(
                "iTP: Local, eTP: Local, some endpoints local",
                "",
                node_port(true, true),
                vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                Some(&["10.0.0.0:80"]),
            ),
            case(
                "iTP: Local, eTP: Local, all endpoints remote",
                "",
                node_port(true, true),
                vec![ready("10.0.0.0:80"), ready("10.0.0.1:80")],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                Some(&[]),
            ),
            Case {
                only_remote: true,
                ..case(
                    "iTP: Local, eTP: Local, all endpoints remote and terminating",
                    "",
                    node_port(true, true),
                    vec![
                        ready("10.0.0.0:80").terminating(),
                        ready("10.0.0.1:80").terminating(),
                    ],
                    Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                    Some(&[]),
                )
            },
            case(
                "iTP: Cluster, eTP: Local, with terminating endpoints",
                "",
                node_port(false, true),
                vec![
                    ready("10.0.0.0:80"),
                    ready("10.0.0.1:80").unready().local(),
                    ready("10.0.0.2:80").terminating().local(),
                    ready("10.0.0.3:80").terminating(),
                ],
                Some(&["10.0.0.0:80"]),
                Some(&["10.0.0.2:80"]),
            ),
            case(
                "externalTrafficPolicy ignored if not externally accessible",
                "",
                PortPolicy {
                    external_local: true,
                    ..CLUSTER
                },
                vec![ready("10.0.0.0:80"), ready("10.0.0.1:80").local()],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                None,
            ),
            case(
                "no cluster endpoints for iTP:Local internal-only service",
                "",
                ITP_LOCAL,
                vec![ready("10.0.0.0:80"), ready("10.0.0.1:80").local()],
                None,
                Some(&["10.0.0.1:80"]),
            ),
            // Node hints (PreferSameNode), in the order upstream's newer table has them.
            case(
                "PreferSameNode: every ready endpoint has a node hint and one is for this node",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.0.0.0:80").zones(&["zone-a"]).nodes(&["node-a"]),
                    ready("10.0.0.1:80").zones(&["zone-a"]).nodes(&["node-b"]),
                ],
                Some(&["10.0.0.0:80"]),
                None,
            ),
            case(
                "PreferSameNode hints for other nodes only: fall back to zone hints",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.0.0.0:80").zones(&["zone-a"]).nodes(&["node-b"]),
                    ready("10.0.0.1:80").zones(&["zone-b"]).nodes(&["node-c"]),
                ],
                Some(&["10.0.0.0:80"]),
                None,
            ),
            case(
                "a ready endpoint without a node hint: node hints ignored, zone hints used",
                "zone-a",
                CLUSTER,
                vec![
                    ready("10.0.0.0:80").zones(&["zone-a"]).nodes(&["node-a"]),
                    ready("10.0.0.1:80").zones(&["zone-a"]),
                    ready("10.0.0.2:80").zones(&["zone-b"]),
                ],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                None,
            ),
        ]
    }

    fn set(list: Option<Vec<SocketAddr>>) -> Option<BTreeSet<String>> {
        list.map(|l| l.iter().map(|a| a.to_string()).collect())
    }

    /// `10.1.2.3:80` as `[fd00::a01:203]:80`: the table again in IPv6, where every rule must
    /// hold alike (kube-proxy runs the same code per family).
    fn in_ipv6(addr: &str) -> String {
        let v4: std::net::SocketAddrV4 = addr.parse().unwrap();
        let [a, b, c, d] = v4.ip().octets();
        let ip = std::net::Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        );
        std::net::SocketAddr::new(ip.into(), v4.port()).to_string()
    }

    /// The failures of the table with its addresses written by `addr`.
    fn failures(addr: impl Fn(&str) -> String) -> Vec<String> {
        let mut failures = Vec::new();
        for case in cases() {
            let endpoints: Vec<EndpointInfo> = case
                .endpoints
                .iter()
                .map(|e| EndpointInfo {
                    addr: addr(e.addr).parse().unwrap(),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    local: e.local,
                    zone_hints: e.zones.iter().map(|z| z.to_string()).collect(),
                    node_hints: e.nodes.iter().map(|n| n.to_string()).collect(),
                })
                .collect();
            let got = categorize(&endpoints, &case.policy, "node-a", case.zone);
            let want_cluster = case.cluster.map(|l| l.iter().map(|s| addr(s)).collect());
            let want_local = case.local.map(|l| l.iter().map(|s| addr(s)).collect());
            let reachable = want_cluster
                .iter()
                .chain(want_local.iter())
                .any(|s: &BTreeSet<String>| !s.is_empty());
            let want_any = reachable || case.only_remote;
            if set(got.cluster.clone()) != want_cluster
                || set(got.local.clone()) != want_local
                || got.has_any != want_any
            {
                failures.push(format!(
                    "{}: got cluster {:?} local {:?} any {}; want cluster {:?} local {:?} any {}",
                    case.name,
                    got.cluster,
                    got.local,
                    got.has_any,
                    want_cluster,
                    want_local,
                    want_any
                ));
            }
        }
        failures
    }

    #[test]
    fn categorize_endpoints_matches_upstream() {
        let failures = failures(str::to_string);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn categorize_endpoints_matches_upstream_in_ipv6() {
        assert_eq!(in_ipv6("10.1.2.3:80"), "[fd00::a01:203]:80");
        let failures = failures(in_ipv6);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
