//! The desired state of this node's datapath, computed from the cluster's objects alone: every
//! frontend and the backends new connections there may use. `run` programs exactly this, and
//! `plan` prints it, so the two cannot disagree. The plan is kept per service ([`Planner`]):
//! a change plans again only the services it touched.
pub mod endpoints;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use serde::Serialize;

use crate::source::objects::{
    Address, ClusterObjects, Kind, ObjectKey, ObjectName, Slice, SliceEndpoint,
};
use endpoints::{EndpointInfo, PortPolicy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => dataplane_common::IPPROTO_TCP,
            Protocol::Udp => dataplane_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            dataplane_common::IPPROTO_TCP => Some(Protocol::Tcp),
            dataplane_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// A Kubernetes protocol name; `None` (absent) means TCP, as in the API.
    fn parse(name: Option<&str>) -> Result<Self, String> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(format!(
                "protocol {other} is not supported (TCP and UDP are)"
            )),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An IP family, as Services (`ipFamilies`) and EndpointSlices (`addressType`) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// Address bits: the longest CIDR prefix.
    pub fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// `IPv4` or `IPv6`.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIP => "ExternalIP",
        }
    }

    /// Frontends for traffic from outside the cluster.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

/// How new flows pick a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Uniformly at random among the backends.
    Random,
    /// Maglev consistent hashing of the flow: every node picks the same backend for a flow,
    /// and a backend change moves few flows.
    Maglev,
}

/// What identifies a frontend in the datapath (either family: an IPv6 frontend prints as
/// `[fd00::a]:80`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

/// An IPv4 (/0-32) or IPv6 (/0-128) CIDR, its address masked to the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `None` when the prefix is longer than the family's addresses.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= IpFamily::of(addr).bits()).then(|| Self {
            addr: masked(addr, prefix),
            prefix,
        })
    }

    /// `10.0.0.0/8`, `fd00::/64`; an address alone is a host route.
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not a CIDR");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix = match prefix {
            Some(p) => p.parse().map_err(|_| invalid())?,
            None => IpFamily::of(addr).bits(),
        };
        Self::new(addr, prefix).ok_or_else(invalid)
    }

    /// False for an address of the other family.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpFamily::of(ip) == IpFamily::of(self.addr) && masked(ip, self.prefix) == self.addr
    }
}

/// `addr` with the bits past `prefix` cleared.
fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectName,
    /// The service port's name ("" when unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    pub frontend: FrontendAddr,
    /// Backends for new connections, sorted; empty means connections are refused...
    pub backends: Vec<SocketAddr>,
    /// ...or dropped, when endpoints exist elsewhere but policy keeps this node from them.
    pub drop_when_empty: bool,
    /// externalTrafficPolicy Local on an external frontend: the client's source is kept.
    pub external_local: bool,
    /// For an external-local frontend: the backends pods reaching it use (every usable
    /// endpoint, kube-proxy's short circuit for in-cluster clients).
    pub internal_backends: Option<Vec<SocketAddr>>,
    /// The service port's other endpoints, in any condition (terminating, not ready, or
    /// left out by policy), sorted: no new connection goes to them, but flows already there
    /// keep them (kube-proxy's conntrack semantics), so they stay programmed.
    pub retained: Vec<SocketAddr>,
    /// sessionAffinity ClientIP: seconds a client keeps its backend.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (LoadBalancer frontends only); empty allows every source.
    pub source_ranges: Vec<Cidr>,
    pub algorithm: Algorithm,
}

pub use crate::problems::{Problem, ProblemKind};

#[derive(Debug, Default)]
pub struct Plan {
    /// Sorted by frontend address; one entry per frontend.
    pub frontends: Vec<Frontend>,
    /// Health check node ports to serve (externalTrafficPolicy Local services).
    pub health_checks: Vec<crate::observe::health::ServiceHealth>,
    pub problems: Vec<Problem>,
}

/// The `plan -o json` contract: one object per frontend, with every attribute the datapath
/// is programmed with. Keys are only ever added.
#[derive(Serialize)]
pub struct FrontendJson<'a> {
    pub service: &'a str,
    pub port: &'a str,
    pub protocol: Protocol,
    pub kind: FrontendKind,
    pub frontend: String,
    pub backends: Vec<String>,
    /// Endpoints kept for the flows already there (`Frontend::retained`); omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<String>,
    /// With no backends: `refuse` (TCP reset, ICMP unreachable) or `drop` (endpoints exist,
    /// but none this node may use under the traffic policy).
    pub when_empty: &'static str,
    /// externalTrafficPolicy Local on an external frontend: this node's endpoints only, the
    /// client's address kept.
    pub external_local: bool,
    /// For an external-local frontend: the backends pods reaching it use (every usable
    /// endpoint); omitted for a frontend with one view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_backends: Option<Vec<String>>,
    /// sessionAffinity ClientIP: seconds a client keeps its backend; omitted without.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges; empty allows every source.
    pub source_ranges: Vec<String>,
    pub algorithm: Algorithm,
}

impl Frontend {
    pub fn to_json(&self) -> FrontendJson<'_> {
        let addrs = |list: &[SocketAddr]| list.iter().map(|b| b.to_string()).collect();
        FrontendJson {
            service: &self.service,
            port: &self.port_name,
            protocol: self.frontend.protocol,
            kind: self.kind,
            frontend: self.frontend.addr.to_string(),
            backends: addrs(&self.backends),
            retained: addrs(&self.retained),
            when_empty: if self.drop_when_empty {
                "drop"
            } else {
                "refuse"
            },
            external_local: self.external_local,
            internal_backends: self.internal_backends.as_deref().map(addrs),
            affinity_timeout: self.affinity_timeout,
            source_ranges: self.source_ranges.iter().map(|c| c.to_string()).collect(),
            algorithm: self.algorithm,
        }
    }
}

/// Labels that take a Service (and its slices) away from the default proxy, as kube-proxy's
/// watch selector `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

pub fn proxied_by_us(labels: &BTreeMap<String, String>) -> bool {
    !(labels.contains_key(LABEL_SERVICE_PROXY_NAME) || labels.contains_key(LABEL_HEADLESS))
}

/// Annotation choosing a service's load-balancing algorithm: `random` or `maglev`.
pub const ANNOTATION_LB_ALGORITHM: &str = "dataplane.dev/lb-algorithm";
/// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What the plan depends on besides the cluster's objects: this node and the agent's flags.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub name: String,
    /// `--nodeport-addresses`: node ports listen on local addresses inside these CIDRs (of
    /// either family); empty means the node's primary addresses (its Node's InternalIPs, of
    /// each family).
    pub nodeport_cidrs: Vec<Cidr>,
    /// Addresses configured on this node, of either family (for `nodeport_cidrs`).
    pub local_addresses: Vec<IpAddr>,
    /// `--service-node-port-range`.
    pub nodeport_range: (u16, u16),
    /// `--lb-algorithm`: forced for every frontend, or `None` for the default (Maglev for
    /// external frontends, random for cluster IPs). A service's annotation wins over both.
    pub algorithm: Option<Algorithm>,
    /// `--max-frontends-per-service`: one Service's frontends (ports x addresses) beyond this
    /// are not programmed, external IPs first, then load-balancer IPs.
    pub max_frontends_per_service: usize,
    /// `--max-frontends`: a Service whose frontends would take the node's total past this is
    /// not programmed (as if the map were full).
    pub max_frontends: usize,
}

/// `--max-frontends-per-service` when not given: far above what a real Service needs (a
/// NodePort service with 100 ports on 9 node addresses), far below what would hurt.
pub const DEFAULT_MAX_FRONTENDS_PER_SERVICE: usize = 1_024;
/// `--max-frontends` when not given: the datapath's default frontend id space.
pub const DEFAULT_MAX_FRONTENDS: usize = dataplane_common::capacity::FRONTENDS as usize;

impl NodeContext {
    /// A node with the defaults (used by tests and tools).
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            nodeport_cidrs: vec![],
            local_addresses: vec![],
            nodeport_range: (30000, 32767),
            algorithm: None,
            max_frontends_per_service: DEFAULT_MAX_FRONTENDS_PER_SERVICE,
            max_frontends: DEFAULT_MAX_FRONTENDS,
        }
    }

    /// The addresses node ports are served on, per family as kube-proxy's
    /// `NewNodePortAddresses` picks them: the local addresses inside the family's
    /// `--nodeport-addresses` CIDRs, or, when the flag names none of the family, the family's
    /// default (here the node's primary addresses of the family; kube-proxy's iptables mode
    /// takes every address).
    fn nodeport_addresses(&self, objects: &ClusterObjects) -> Vec<IpAddr> {
        let primary = primary_addresses(objects);
        let of_family = |family| move |ip: &&IpAddr| IpFamily::of(**ip) == family;
        let mut addresses: Vec<IpAddr> = [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .flat_map(|family| {
                let cidrs: Vec<&Cidr> = (self.nodeport_cidrs.iter())
                    .filter(|c| IpFamily::of(c.addr) == family)
                    .collect();
                let candidates = if cidrs.is_empty() {
                    &primary
                } else {
                    &self.local_addresses
                };
                (candidates.iter().filter(of_family(family)))
                    .filter(move |ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(**ip)))
                    .copied()
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// The node's InternalIP addresses, from its Node object.
pub fn primary_addresses(objects: &ClusterObjects) -> Vec<IpAddr> {
    node_addresses(objects, |kind| kind == "InternalIP")
}

/// The node's addresses its Node object lists with a type `wanted` accepts.
fn node_addresses(objects: &ClusterObjects, wanted: impl Fn(&str) -> bool) -> Vec<IpAddr> {
    let addresses = objects
        .node()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    addresses
        .into_iter()
        .flatten()
        .filter(|a| wanted(&a.type_))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The whole plan at once (the `plan` command, tests).
pub fn compute(objects: &ClusterObjects, node: &NodeContext) -> Plan {
    let mut planner = Planner::default();
    planner.update(objects, node, None);
    let mut plan = Plan {
        frontends: planner.frontends().into_iter().cloned().collect(),
        health_checks: planner.health_checks.values().cloned().collect(),
        problems: planner
            .services
            .keys()
            .flat_map(|name| planner.problems_of(name))
            .collect(),
    };
    plan.problems.sort_by_cached_key(|p| p.to_string());
    plan.problems.dedup();
    plan
}

/// What every service's plan depends on besides its own objects.
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeInputs {
    zone: String,
    nodeport_addresses: Vec<IpAddr>,
    /// The node's own addresses (its Node's, and those node ports are served on), sorted: no
    /// external or load-balancer IP may take them.
    node_addresses: Vec<IpAddr>,
}

/// One service's part of the plan.
#[derive(Debug)]
struct ServicePlan {
    /// Its frontends, each address once; one another service also wants goes to the service
    /// that ranks first for it ([`Rank`]).
    frontends: Vec<Frontend>,
    /// Its cluster IPs: no other service's external or load-balancer IP may take them.
    cluster_ips: Vec<IpAddr>,
    /// When the Service was created (`None`: not said, ranks after every dated one).
    created: Option<k8s_openapi::jiff::Timestamp>,
    /// Problems of the service and its slices (conflicts with other services come on top).
    problems: Vec<Problem>,
    /// The problems last reported, to report each once.
    reported: Vec<Problem>,
    health_check: Option<crate::observe::health::ServiceHealth>,
    /// Ports of it whose policy leaves this node without endpoints: (internal, external).
    no_local: (i64, i64),
}

/// Which of the services wanting one frontend address gets it: cluster IPs and node ports
/// first, then load-balancer IPs, then external IPs; among equals the oldest Service, then
/// the first by `namespace/name`. (Alphabetical order alone would let any namespace named
/// `aaa` take cluster DNS with an external IP.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Rank {
    class: u8,
    /// Undated services rank after dated ones.
    undated: bool,
    created: k8s_openapi::jiff::Timestamp,
}

impl Rank {
    const FIRST: Self = Self {
        class: 0,
        undated: false,
        created: k8s_openapi::jiff::Timestamp::MIN,
    };

    fn of(kind: FrontendKind, created: Option<k8s_openapi::jiff::Timestamp>) -> Self {
        Self {
            class: match kind {
                FrontendKind::ClusterIP | FrontendKind::NodePort => 0,
                FrontendKind::LoadBalancer => 1,
                FrontendKind::ExternalIP => 2,
            },
            undated: created.is_none(),
            created: created.unwrap_or(k8s_openapi::jiff::Timestamp::MIN),
        }
    }

    /// An external or load-balancer frontend: refused on a cluster IP or a node address.
    fn is_external_address(self) -> bool {
        self.class > 0
    }
}

/// One service wanting one frontend address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    addr: FrontendAddr,
    rank: Rank,
    service: ObjectName,
}

impl Claim {
    fn first(addr: FrontendAddr) -> Self {
        Self {
            addr,
            rank: Rank::FIRST,
            service: String::new(),
        }
    }
}

/// The plan kept per service, so that a change recomputes only the services it touches.
#[derive(Debug, Default)]
pub struct Planner {
    node: Option<NodeInputs>,
    services: BTreeMap<ObjectName, ServicePlan>,
    /// Every (frontend, rank, service wanting it); the first claim not refused owns it.
    claims: BTreeSet<Claim>,
    /// Every (cluster IP, service having it).
    cluster_ips: BTreeSet<(IpAddr, ObjectName)>,
    health_checks: BTreeMap<ObjectName, crate::observe::health::ServiceHealth>,
    no_local: (i64, i64),
}

/// What one [`Planner::update`] changed, for the programmer and the logs.
#[derive(Debug, Default)]
pub struct PlanUpdate {
    /// Services whose frontends may differ: program all of theirs.
    pub services: BTreeSet<ObjectName>,
    /// Frontends no service has any more.
    pub removed: Vec<FrontendAddr>,
    /// Problems not reported before.
    pub problems: Vec<Problem>,
    /// Every service was planned again.
    pub all: bool,
}

fn claims_of(name: &ObjectName, plan: Option<&ServicePlan>) -> Vec<Claim> {
    plan.into_iter()
        .flat_map(|p| {
            p.frontends.iter().map(|f| Claim {
                addr: f.frontend,
                rank: Rank::of(f.kind, p.created),
                service: name.clone(),
            })
        })
        .collect()
}

impl Planner {
    /// Plans the `touched` services again; every service when `touched` is `None`, when
    /// nothing was planned yet, or when what all services depend on changed (this node's
    /// zone or addresses; other changes to its Node do not matter here).
    pub fn update(
        &mut self,
        objects: &ClusterObjects,
        node: &NodeContext,
        touched: Option<&BTreeSet<ObjectName>>,
    ) -> PlanUpdate {
        let nodeport_addresses = node.nodeport_addresses(objects);
        let mut node_addresses = node_addresses(objects, |_| true);
        node_addresses.extend(&nodeport_addresses);
        node_addresses.sort();
        node_addresses.dedup();
        let inputs = NodeInputs {
            zone: objects
                .node()
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(LABEL_ZONE))
                .cloned()
                .unwrap_or_default(),
            nodeport_addresses,
            node_addresses,
        };
        let names: BTreeSet<ObjectName> = match touched {
            Some(touched) if self.node.as_ref() == Some(&inputs) => touched.clone(),
            _ => self
                .services
                .keys()
                .chain(objects.services().keys())
                .cloned()
                .collect(),
        };
        let all = touched.is_none() || self.node.as_ref() != Some(&inputs);
        self.node = Some(inputs);
        let inputs = self.node.as_ref().expect("just set");
        let list: Vec<&ObjectName> = names.iter().collect();
        let plans = crate::parallel::map(&list, |name| {
            let service = objects.services().get(*name)?;
            plan_service(name, service, objects, node, inputs)
        });
        // Who owned each address the change may move, before it: the touched services'
        // frontends, and every frontend on a cluster IP that comes or goes.
        let mut owners: BTreeMap<FrontendAddr, Option<ObjectName>> = BTreeMap::new();
        let mut old_frontends = BTreeSet::new();
        for (name, new) in names.iter().zip(&plans) {
            old_frontends.extend(self.owned(name).map(|f| f.frontend));
            let old = self.services.get(name);
            let addrs = old
                .into_iter()
                .chain(new.as_ref())
                .flat_map(|p| p.frontends.iter().map(|f| f.frontend));
            let ips = old
                .into_iter()
                .chain(new.as_ref())
                .flat_map(|p| p.cluster_ips.iter());
            let on_ips = ips.flat_map(|ip| self.claims_on_ip(*ip).map(|c| c.addr));
            for addr in addrs.chain(on_ips).collect::<Vec<_>>() {
                if let std::collections::btree_map::Entry::Vacant(e) = owners.entry(addr) {
                    e.insert(self.owner(&addr).cloned());
                }
            }
        }
        let mut update = PlanUpdate {
            all,
            ..Default::default()
        };
        for (name, mut new) in names.into_iter().zip(plans) {
            let old = self.services.remove(&name);
            let old_claims = claims_of(&name, old.as_ref());
            if let Some(plan) = &mut new {
                let total = self.claims.len() - old_claims.len() + plan.frontends.len();
                if total > node.max_frontends {
                    plan.problems.push(Problem::of_service(
                        ProblemKind::FrontendLimit,
                        &name,
                        format!(
                            "its {} frontends would take this node past --max-frontends {}; none of them is programmed",
                            plan.frontends.len(),
                            node.max_frontends
                        ),
                    ));
                    plan.frontends = vec![];
                }
            }
            for claim in &old_claims {
                self.claims.remove(claim);
            }
            self.claims.extend(claims_of(&name, new.as_ref()));
            for ip in old.iter().flat_map(|p| &p.cluster_ips) {
                self.cluster_ips.remove(&(*ip, name.clone()));
            }
            for ip in new.iter().flat_map(|p| &p.cluster_ips) {
                self.cluster_ips.insert((*ip, name.clone()));
            }
            let (reported, no_local) = old.map(|p| (p.reported, p.no_local)).unwrap_or_default();
            self.no_local.0 -= no_local.0;
            self.no_local.1 -= no_local.1;
            match new.as_ref().and_then(|p| p.health_check.clone()) {
                Some(h) => self.health_checks.insert(name.clone(), h),
                None => self.health_checks.remove(&name),
            };
            if let Some(mut plan) = new {
                plan.reported = reported;
                plan.no_local = no_local;
                self.services.insert(name.clone(), plan);
            }
            update.services.insert(name);
        }
        for (addr, old_owner) in owners {
            let owner = self.owner(&addr);
            if owner != old_owner.as_ref() {
                old_frontends.insert(addr);
                update.services.extend(owner.cloned());
                update.services.extend(old_owner);
            }
        }
        let mut new_frontends = BTreeSet::new();
        for name in &update.services {
            new_frontends.extend(self.owned(name).map(|f| f.frontend));
            let problems = self.problems_of(name);
            let no_local = self.count_no_local(name);
            let Some(plan) = self.services.get_mut(name) else {
                continue;
            };
            self.no_local.0 += no_local.0 - plan.no_local.0;
            self.no_local.1 += no_local.1 - plan.no_local.1;
            plan.no_local = no_local;
            update.problems.extend(
                problems
                    .iter()
                    .filter(|p| !plan.reported.contains(p))
                    .cloned(),
            );
            plan.reported = problems;
        }
        update.removed = old_frontends.difference(&new_frontends).copied().collect();
        update
    }

    /// Ports of `service` whose policy leaves this node without endpoints, among the
    /// frontends it owns: (internal, external).
    fn count_no_local(&self, service: &str) -> (i64, i64) {
        let count = |external: bool| {
            let ports: BTreeSet<&str> = self
                .owned(service)
                .filter(|f| f.drop_when_empty && f.kind.is_external() == external)
                .map(|f| f.port_name.as_str())
                .collect();
            ports.len() as i64
        };
        (count(false), count(true))
    }

    /// The claims of `addr`, best ranked first.
    fn claims_of_addr(&self, addr: &FrontendAddr) -> impl Iterator<Item = &Claim> {
        self.claims
            .range(Claim::first(*addr)..)
            .take_while(move |c| c.addr == *addr)
    }

    /// Every claim on an address with this IP (any port and protocol).
    fn claims_on_ip(&self, ip: IpAddr) -> impl Iterator<Item = &Claim> {
        let first = FrontendAddr {
            addr: SocketAddr::new(ip, 0),
            protocol: Protocol::Tcp,
        };
        self.claims
            .range(Claim::first(first)..)
            .take_while(move |c| c.addr.addr.ip() == ip)
    }

    /// Why `claim` may not have its address at all, whoever else wants it.
    fn refusal(&self, claim: &Claim) -> Option<String> {
        if !claim.rank.is_external_address() {
            return None;
        }
        let ip = claim.addr.addr.ip();
        if let Some((_, holder)) = self
            .cluster_ips
            .range((ip, String::new())..)
            .next()
            .filter(|(i, _)| *i == ip)
        {
            return Some(format!("{ip} is the cluster IP of Service {holder}"));
        }
        let node = self.node.as_ref()?;
        node.node_addresses
            .binary_search(&ip)
            .is_ok()
            .then(|| format!("{ip} is an address of this node"))
    }

    fn owner(&self, addr: &FrontendAddr) -> Option<&ObjectName> {
        self.claims_of_addr(addr)
            .find(|c| self.refusal(c).is_none())
            .map(|c| &c.service)
    }

    /// The frontends `service` programs: those it owns.
    fn owned<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Frontend> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|p| &p.frontends)
            .filter(move |f| self.owner(&f.frontend).map(String::as_str) == Some(service))
    }

    /// The frontends of `services` that they own.
    pub fn frontends_of<'a>(
        &'a self,
        services: impl IntoIterator<Item = &'a ObjectName>,
    ) -> Vec<&'a Frontend> {
        let mut out: Vec<&Frontend> = services.into_iter().flat_map(|s| self.owned(s)).collect();
        out.sort_by_key(|f| f.frontend);
        out
    }

    /// Every frontend of the plan, sorted by address.
    pub fn frontends(&self) -> Vec<&Frontend> {
        self.frontends_of(self.services.keys())
    }

    /// Frontends the services want (one two services want counts twice).
    pub fn frontend_count(&self) -> usize {
        self.claims.len()
    }

    /// Services whose traffic policy leaves this node without endpoints: (internal, external).
    pub fn no_local_endpoints(&self) -> (i64, i64) {
        self.no_local
    }

    /// Health check node ports to serve (externalTrafficPolicy Local services).
    pub fn health_checks(&self) -> Vec<crate::observe::health::ServiceHealth> {
        self.health_checks.values().cloned().collect()
    }

    fn problems_of(&self, service: &str) -> Vec<Problem> {
        let Some(plan) = self.services.get(service) else {
            return vec![];
        };
        let mut problems = plan.problems.clone();
        for f in &plan.frontends {
            let claim = Claim {
                addr: f.frontend,
                rank: Rank::of(f.kind, plan.created),
                service: service.to_string(),
            };
            if let Some(why) = self.refusal(&claim) {
                problems.push(Problem::of_service(
                    ProblemKind::FrontendRefused,
                    service,
                    format!(
                        "{:?} frontend {} {} is refused: {why}",
                        f.kind, f.frontend.addr, f.frontend.protocol
                    ),
                ));
            } else if let Some(owner) = self.owner(&f.frontend).filter(|o| *o != service) {
                problems.push(conflict(service, f, owner));
            }
        }
        problems
    }
}

fn conflict(service: &str, f: &Frontend, owner: &str) -> Problem {
    let kind = if owner == service {
        ProblemKind::DuplicateFrontend
    } else {
        ProblemKind::FrontendConflict
    };
    Problem::of_service(
        kind,
        service,
        format!(
            "{:?} frontend {} {} is already used by Service {owner}",
            f.kind, f.frontend.addr, f.frontend.protocol
        ),
    )
}

/// kube-proxy serves a health check node port for externalTrafficPolicy Local services that
/// are externally reachable, saying whether this node has local endpoints.
fn health_check(
    service: &Service,
    local_endpoints: usize,
) -> Option<crate::observe::health::ServiceHealth> {
    let spec = service.spec.as_ref()?;
    let port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    (spec.external_traffic_policy.as_deref() == Some("Local")).then(|| {
        crate::observe::health::ServiceHealth {
            namespace: service
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: service.metadata.name.clone().unwrap_or_default(),
            port,
            local_endpoints,
        }
    })
}

/// One service's frontends and problems; `None` when it has no frontends to plan (not for
/// this proxy, ExternalName, headless).
///
/// Each IP family the Service has a cluster IP of is planned on its own, as kube-proxy's
/// per-family proxiers do (`MetaProxier`): that family's cluster IP, node addresses,
/// load-balancer and external IPs, source ranges, and the endpoints of its EndpointSlices
/// (`addressType`) only, with the traffic policies applied per family.
fn plan_service(
    name: &ObjectName,
    service: &Service,
    objects: &ClusterObjects,
    node: &NodeContext,
    inputs: &NodeInputs,
) -> Option<ServicePlan> {
    let mut plan = ServicePlan {
        frontends: vec![],
        cluster_ips: vec![],
        created: service.metadata.creation_timestamp.as_ref().map(|t| t.0),
        problems: vec![],
        reported: vec![],
        health_check: None,
        no_local: (0, 0),
    };
    let problem = |kind: ProblemKind, reason: String| Problem::of_service(kind, name, reason);
    let spec = service.spec.as_ref()?;
    let labels = service.metadata.labels.as_ref();
    if spec.type_.as_deref() == Some("ExternalName") || !labels.is_none_or(proxied_by_us) {
        return None;
    }
    let cluster_ips = cluster_ips(service, |reason| {
        plan.problems
            .push(problem(ProblemKind::InvalidClusterIp, reason))
    });
    if cluster_ips.is_empty() {
        // Headless (nothing to report), or no valid cluster IP (reported).
        return (!plan.problems.is_empty()).then_some(plan);
    }
    plan.cluster_ips = cluster_ips.clone();
    let families: Vec<IpFamily> = cluster_ips.iter().map(|ip| IpFamily::of(*ip)).collect();
    let mut settings = ServiceSettings::of(service, name, &mut plan.problems);
    // Addresses of a family the Service has no cluster IP of: no proxier of that family
    // serves the Service.
    settings.keep_families(&families);
    let slices: Vec<(&ObjectName, &Slice)> =
        objects.slices_of(name).filter(|(_, s)| s.proxied).collect();
    let endpoints: Vec<ServiceEndpoints> = families
        .iter()
        .map(|family| {
            ServiceEndpoints::collect(name, &slices, *family, &node.name, &mut plan.problems)
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut local_endpoints = 0;
    let mut ports = vec![];
    for port in spec.ports.iter().flatten() {
        match service_port(port) {
            Ok((protocol, number)) => ports.push((port, protocol, number)),
            Err((kind, reason)) => {
                let port_name = port.name.as_deref().unwrap_or_default();
                plan.problems
                    .push(problem(kind, format!("port {port_name:?}: {reason}")));
            }
        }
    }
    let budget = FrontendBudget::of(&ports, &cluster_ips, &settings, inputs, node);
    if let Some(reason) = budget.problem() {
        plan.problems
            .push(problem(ProblemKind::ServiceFrontendLimit, reason));
    }
    let load_balancer_ips: Option<&[IpAddr]> = (settings.load_balancer_ips.as_deref())
        .map(|ips| &ips[..budget.load_balancer_ips.min(ips.len())]);
    let external_ips =
        &settings.external_ips[..budget.external_ips.min(settings.external_ips.len())];
    for (port, protocol, number) in ports.into_iter().take(budget.ports) {
        let port_name = port.name.clone().unwrap_or_default();
        for ((cluster_ip, family), endpoints) in cluster_ips.iter().zip(&families).zip(&endpoints) {
            let of_family = |ip: &&IpAddr| IpFamily::of(**ip) == *family;
            let policy = port_policy(service, port, *family);
            let port_endpoints = endpoints.for_port(&port_name, protocol).unwrap_or_default();
            let categorized = match endpoints.for_port(&port_name, protocol) {
                Some(port_endpoints) => {
                    endpoints::categorize(port_endpoints, &policy, &node.name, &inputs.zone)
                }
                None => {
                    if endpoints.has_ports {
                        plan.problems.push(problem(
                            ProblemKind::PortNotInSlices,
                            format!(
                                "port {port_name:?} ({protocol}) matches no port of its {} EndpointSlices",
                                family.name()
                            ),
                        ));
                    }
                    // No endpoints: the frontends exist and refuse connections.
                    Default::default()
                }
            };
            let mut frontends = vec![];
            let internal = categorized.internal(&policy);
            if *family == families[0] {
                // The health check answers for the Service's primary family.
                local_endpoints =
                    local_endpoints.max(categorized.local.as_ref().map_or(0, Vec::len));
            }
            frontends.push((
                FrontendKind::ClusterIP,
                SocketAddr::new(*cluster_ip, number),
            ));
            match port.node_port {
                Some(node_port) if policy.externally_accessible && node_port != 0 => {
                    match u16::try_from(node_port).ok().filter(|p| (node.nodeport_range.0..=node.nodeport_range.1).contains(p)) {
                        Some(node_port) => frontends.extend(
                            inputs.nodeport_addresses.iter().filter(of_family).map(|ip| (FrontendKind::NodePort, SocketAddr::new(*ip, node_port))),
                        ),
                        None => plan.problems.push(problem(ProblemKind::NodePortOutOfRange, format!(
                            "port {port_name:?}: nodePort {node_port} is outside the node port range {}-{}",
                            node.nodeport_range.0, node.nodeport_range.1
                        ))),
                    }
                }
                _ => {}
            }
            frontends.extend(
                (load_balancer_ips.into_iter().flatten())
                    .filter(of_family)
                    .map(|ip| (FrontendKind::LoadBalancer, SocketAddr::new(*ip, number))),
            );
            frontends.extend(
                (external_ips.iter())
                    .filter(of_family)
                    .map(|ip| (FrontendKind::ExternalIP, SocketAddr::new(*ip, number))),
            );

            for (kind, addr) in frontends {
                let frontend = FrontendAddr { addr, protocol };
                let external = kind.is_external();
                let mut backends = if external {
                    categorized.external(&policy)
                } else {
                    internal.clone()
                };
                backends.sort();
                let external_local = external && policy.external_local;
                let internal_backends = external_local.then(|| {
                    let mut all = categorized.cluster.clone().unwrap_or_default();
                    all.sort();
                    all
                });
                let mut retained: Vec<SocketAddr> = port_endpoints
                    .iter()
                    .map(|e| e.addr)
                    .filter(|a| {
                        backends.binary_search(a).is_err()
                            && internal_backends
                                .as_ref()
                                .is_none_or(|all| all.binary_search(a).is_err())
                    })
                    .collect();
                retained.sort();
                let algorithm = settings
                    .algorithm
                    .or(node.algorithm)
                    .unwrap_or(if external {
                        Algorithm::Maglev
                    } else {
                        Algorithm::Random
                    });
                let f = Frontend {
                    service: name.clone(),
                    port_name: port_name.clone(),
                    kind,
                    frontend,
                    drop_when_empty: backends.is_empty() && categorized.has_any,
                    backends,
                    external_local,
                    internal_backends,
                    retained,
                    affinity_timeout: settings.affinity_timeout,
                    // A range applies to the frontends of its own family.
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        (settings.source_ranges.iter())
                            .filter(|c| IpFamily::of(c.addr) == *family)
                            .copied()
                            .collect()
                    } else {
                        vec![]
                    },
                    algorithm,
                };
                if !seen.insert(frontend) {
                    plan.problems.push(conflict(name, &f, name));
                    continue;
                }
                plan.frontends.push(f);
            }
        }
    }
    plan.health_check = health_check(service, local_endpoints);
    plan.frontends.shrink_to_fit(); // kept for every service
    Some(plan)
}

/// How many of a service's frontends `--max-frontends-per-service` lets it have, decided
/// before any is built (a hostile Service must not cost its frontends' memory first). Cluster
/// IPs and node ports come first, port by port; then load-balancer IPs, then external IPs,
/// whole addresses (every port of an address, or none of it).
#[derive(Debug, PartialEq, Eq)]
struct FrontendBudget {
    /// The first ports served.
    ports: usize,
    load_balancer_ips: usize,
    external_ips: usize,
    /// What the service asked for: (ports, load-balancer IPs, external IPs, frontends).
    wanted: (usize, usize, usize, usize),
    limit: usize,
}

impl FrontendBudget {
    fn of(
        ports: &[(&ServicePort, Protocol, u16)],
        cluster_ips: &[IpAddr],
        settings: &ServiceSettings,
        inputs: &NodeInputs,
        node: &NodeContext,
    ) -> Self {
        let limit = node.max_frontends_per_service;
        let lb = settings.load_balancer_ips.as_ref().map_or(0, Vec::len);
        let ext = settings.external_ips.len();
        // Cluster IPs and node ports of each port (node ports counted whenever asked for).
        // Node addresses of the Service's families.
        let node_addresses = (inputs.nodeport_addresses.iter())
            .filter(|a| (cluster_ips.iter()).any(|c| IpFamily::of(*c) == IpFamily::of(**a)))
            .count();
        let per_port: Vec<usize> = ports
            .iter()
            .map(|(port, _, _)| {
                let node_ports = port.node_port.is_some_and(|p| p != 0);
                cluster_ips.len() + if node_ports { node_addresses } else { 0 }
            })
            .collect();
        let internal: usize = per_port.iter().sum();
        let mut left = limit;
        let mut served = 0;
        for n in per_port {
            if n > left {
                break;
            }
            left -= n;
            served += 1;
        }
        let all_ports = served == ports.len();
        let per_address = ports.len().max(1);
        let load_balancer_ips = if all_ports {
            lb.min(left / per_address)
        } else {
            0
        };
        left -= load_balancer_ips * ports.len();
        let external_ips = if all_ports {
            ext.min(left / per_address)
        } else {
            0
        };
        Self {
            ports: served,
            load_balancer_ips,
            external_ips,
            wanted: (ports.len(), lb, ext, internal + (lb + ext) * ports.len()),
            limit,
        }
    }

    /// What the limit left out, if anything.
    fn problem(&self) -> Option<String> {
        let (ports, lb, ext, frontends) = self.wanted;
        if (self.ports, self.load_balancer_ips, self.external_ips) == (ports, lb, ext) {
            return None;
        }
        Some(format!(
            "{frontends} frontends are more than --max-frontends-per-service {}: serving {} of {ports} ports, {} of {lb} load-balancer IPs, {} of {ext} external IPs",
            self.limit, self.ports, self.load_balancer_ips, self.external_ips
        ))
    }
}

/// Per-service settings that apply to every port.
struct ServiceSettings {
    /// `None` when the service's source ranges leave no valid range: its load-balancer IPs are
    /// not programmed at all rather than opened to everyone.
    load_balancer_ips: Option<Vec<IpAddr>>,
    external_ips: Vec<IpAddr>,
    source_ranges: Vec<Cidr>,
    affinity_timeout: Option<u32>,
    algorithm: Option<Algorithm>,
}

impl ServiceSettings {
    /// Drops the addresses and ranges of the families not in `families`.
    fn keep_families(&mut self, families: &[IpFamily]) {
        let wanted = |ip: &IpAddr| families.contains(&IpFamily::of(*ip));
        if let Some(ips) = &mut self.load_balancer_ips {
            ips.retain(wanted);
        }
        self.external_ips.retain(wanted);
        self.source_ranges.retain(|c| wanted(&c.addr));
    }

    fn of(service: &Service, name: &str, problems: &mut Vec<Problem>) -> Self {
        let mut problem = |kind: ProblemKind, reason: String| {
            problems.push(Problem::of_service(kind, name, reason))
        };
        let spec = service.spec.as_ref().expect("checked by caller");
        let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
        let mut load_balancer_ips = vec![];
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer delivers to the node itself, as kube-proxy assumes.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            match entry.ip.as_deref().map(str::parse::<IpAddr>) {
                Some(Ok(ip)) => load_balancer_ips.push(ip),
                Some(Err(_)) => problem(
                    ProblemKind::InvalidLoadBalancerIp,
                    format!(
                        "load balancer ingress IP {:?} is not an IP address",
                        entry.ip.as_deref().unwrap_or("")
                    ),
                ),
                None => problem(
                    ProblemKind::LoadBalancerHostname,
                    format!(
                        "load balancer ingress {:?} has a hostname only; it is skipped",
                        entry.hostname.as_deref().unwrap_or("")
                    ),
                ),
            }
        }
        let mut source_ranges = vec![];
        let ranges = spec.load_balancer_source_ranges.iter().flatten();
        let mut invalid = 0;
        for text in ranges.clone() {
            match Cidr::parse(text) {
                Ok(cidr) => source_ranges.push(cidr),
                Err(reason) => {
                    invalid += 1;
                    problem(
                        ProblemKind::InvalidSourceRange,
                        format!("loadBalancerSourceRanges: {reason}; the range is skipped"),
                    )
                }
            }
        }
        let all_invalid = invalid > 0 && source_ranges.is_empty();
        if all_invalid && !load_balancer_ips.is_empty() {
            problem(
                ProblemKind::NoValidSourceRange,
                "no valid loadBalancerSourceRanges: its load balancer IPs are not served".into(),
            );
        }
        let external_ips = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|text| match text.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    problem(
                        ProblemKind::InvalidExternalIp,
                        format!("externalIPs entry {text:?} is not an IP address; it is skipped"),
                    );
                    None
                }
            })
            .collect();
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let config = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref());
            config
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.clamp(1, 86_400) as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let annotation = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM));
        let algorithm = match annotation.map(String::as_str) {
            None => None,
            Some("random") => Some(Algorithm::Random),
            Some("maglev") => Some(Algorithm::Maglev),
            Some(other) => {
                problem(
                    ProblemKind::InvalidAnnotation,
                    format!(
                        "annotation {ANNOTATION_LB_ALGORITHM}: {other:?} is neither random nor maglev; using the default"
                    ),
                );
                None
            }
        };
        Self {
            load_balancer_ips: (is_lb && !all_invalid).then_some(load_balancer_ips),
            external_ips,
            source_ranges,
            affinity_timeout,
            algorithm,
        }
    }
}

/// The traffic policies of a service port in one family: it is externally accessible when it
/// has a node port, or load-balancer or external IPs of that family (kube-proxy's
/// `ExternallyAccessible`, on the family-filtered lists).
fn port_policy(service: &Service, port: &ServicePort, family: IpFamily) -> PortPolicy {
    let spec = service.spec.as_ref();
    let of_family = |text: &str| text.parse().is_ok_and(|ip| IpFamily::of(ip) == family);
    let has_lb_ip = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|ingress| {
            ingress
                .iter()
                .any(|i| i.ip.as_deref().is_some_and(of_family))
        });
    let has_external_ips = spec
        .and_then(|s| s.external_ips.as_ref())
        .is_some_and(|ips| ips.iter().any(|ip| of_family(ip)));
    PortPolicy {
        internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
        external_local: spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local"),
        externally_accessible: port.node_port.unwrap_or(0) != 0 || has_lb_ip || has_external_ips,
    }
}

/// A service's cluster IP of each family it has, the primary first, as kube-proxy's
/// `GetClusterIPByFamily` reads them: `clusterIPs[i]` is of family `ipFamilies[i]`; without
/// `ipFamilies` (objects from before dual stack) an address is of its own family. Without
/// `clusterIPs`, `clusterIP` (which the API keeps equal to `clusterIPs[0]`). Headless services
/// have none. An entry that is not an IP address, is unspecified, is not of its family, or
/// repeats a family is reported (`report`) and skipped: the other family is still served.
fn cluster_ips(service: &Service, mut report: impl FnMut(String)) -> Vec<IpAddr> {
    let spec = service.spec.as_ref().expect("checked by caller");
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).collect(),
    };
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, text) in listed.into_iter().enumerate() {
        if text.is_empty() || text == "None" {
            continue;
        }
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => {
                report(format!("clusterIP {text} is unspecified"));
                continue;
            }
            Ok(ip) => ip,
            Err(_) => {
                report(format!("clusterIP {text:?} is not an IP address"));
                continue;
            }
        };
        let family = IpFamily::of(ip);
        let named = families.get(i);
        if !families.is_empty() && named.is_none() {
            report(format!(
                "clusterIP {text} has no family in ipFamilies; it is skipped"
            ));
        } else if let Some(named) = named.filter(|f| *f != family.name()) {
            report(format!(
                "clusterIP {text} is not of its family {named} (ipFamilies); it is skipped"
            ));
        } else if ips.iter().any(|other| IpFamily::of(*other) == family) {
            report(format!(
                "clusterIP {text} is a second {} cluster IP; it is skipped",
                family.name()
            ));
        } else {
            ips.push(ip);
        }
    }
    ips
}

fn service_port(port: &ServicePort) -> Result<(Protocol, u16), (ProblemKind, String)> {
    let protocol = Protocol::parse(port.protocol.as_deref())
        .map_err(|e| (ProblemKind::UnsupportedProtocol, e))?;
    let number = valid_port(port.port).map_err(|e| (ProblemKind::InvalidPort, e))?;
    Ok((protocol, number))
}

fn valid_port(port: i32) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {port} is outside 1-65535")),
    }
}

/// A service's endpoints from all its slices, grouped by slice port (name, protocol) and
/// deduplicated by address and port as upstream's EndpointSliceCache does (a local copy of a
/// duplicate wins).
struct ServiceEndpoints {
    by_port: BTreeMap<(String, Protocol), Vec<EndpointInfo>>,
    /// Some slice had at least one valid port.
    has_ports: bool,
}

impl ServiceEndpoints {
    /// The endpoints of the slices of `family` (`addressType`; FQDN slices are not for
    /// proxies).
    fn collect(
        service: &ObjectName,
        slices: &[(&ObjectName, &Slice)],
        family: IpFamily,
        node_name: &str,
        problems: &mut Vec<Problem>,
    ) -> Self {
        let mut by_port: BTreeMap<(String, Protocol), BTreeMap<SocketAddr, EndpointInfo>> =
            BTreeMap::new();
        let mut has_ports = false;
        let slices = (slices.iter()).filter(|(_, slice)| slice.address_type == family.name());
        for (slice_name, slice) in slices {
            let problem = |kind: ProblemKind, reason: String| Problem {
                kind,
                object: ObjectKey {
                    kind: Kind::EndpointSlice,
                    name: slice_name.to_string(),
                },
                service: service.clone(),
                reason,
            };
            if slice.ports.as_ref().is_none_or(|p| p.is_empty()) && !slice.endpoints.is_empty() {
                problems.push(problem(
                    ProblemKind::SliceWithoutPorts,
                    "has endpoints but no ports; its endpoints are not used".into(),
                ));
            }
            for port in slice.ports.iter().flatten() {
                // Upstream ignores ports without a name field or without a number.
                let (Some(name), Some(number)) = (port.name.as_ref(), port.port) else {
                    continue;
                };
                let Ok(number) = valid_port(number) else {
                    problems.push(problem(
                        ProblemKind::InvalidPort,
                        format!("port {name:?}: port {number} is outside 1-65535"),
                    ));
                    continue;
                };
                let Ok(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                    continue;
                };
                has_ports = true;
                let set = by_port.entry((name.clone(), protocol)).or_default();
                for endpoint in &slice.endpoints {
                    let ip = match &endpoint.address {
                        None => continue,
                        Some(Address::V4(ip)) => IpAddr::V4(*ip),
                        Some(Address::V6(ip)) => IpAddr::V6(*ip),
                        Some(Address::Other(address)) => {
                            problems.push(problem(
                                ProblemKind::InvalidEndpointAddress,
                                format!("address {address:?} is not an {} address", family.name()),
                            ));
                            continue;
                        }
                    };
                    if IpFamily::of(ip) != family {
                        problems.push(problem(
                            ProblemKind::InvalidEndpointAddress,
                            format!("address \"{ip}\" is not an {} address", family.name()),
                        ));
                        continue;
                    }
                    let info = endpoint_info(endpoint, SocketAddr::new(ip, number), node_name);
                    let keep_existing = set.get(&info.addr).is_some_and(|e| !info.local || e.local);
                    if !keep_existing {
                        set.insert(info.addr, info);
                    }
                }
            }
        }
        let by_port = by_port
            .into_iter()
            .map(|(k, v)| (k, v.into_values().collect()))
            .collect();
        Self { by_port, has_ports }
    }

    fn for_port(&self, name: &str, protocol: Protocol) -> Option<&[EndpointInfo]> {
        self.by_port
            .get(&(name.to_string(), protocol))
            .map(Vec::as_slice)
    }
}

/// An endpoint's conditions as upstream reads them: absent `ready` and `serving` mean true,
/// absent `terminating` means false.
fn endpoint_info(endpoint: &SliceEndpoint, addr: SocketAddr, node_name: &str) -> EndpointInfo {
    EndpointInfo {
        addr,
        ready: endpoint.ready.unwrap_or(true),
        serving: endpoint.serving.unwrap_or(true),
        terminating: endpoint.terminating.unwrap_or(false),
        local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
        zone_hints: endpoint
            .hints
            .iter()
            .flat_map(|h| &h.zones)
            .cloned()
            .collect(),
        node_hints: endpoint
            .hints
            .iter()
            .flat_map(|h| &h.nodes)
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::manifests::parse_documents;

    /// The plan of node `node-a` for the objects in `yaml`.
    pub(crate) fn plan_of(yaml: &str) -> Plan {
        let (objects, skipped) = parse_documents(std::path::Path::new("t.yaml"), yaml);
        assert!(skipped.is_empty(), "{skipped:?}");
        let mut cluster = ClusterObjects::default();
        for o in objects {
            cluster.insert(o, "node-a");
        }
        compute(&cluster, &NodeContext::named("node-a"))
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.2], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.3], conditions: {ready: true}}
- {addresses: [10.0.0.1]}
"#;

    #[test]
    fn joins_slices_by_label_matches_ports_by_name_and_keeps_ready_endpoints() {
        let plan = plan_of(WEB);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        let json: Vec<_> = plan
            .frontends
            .iter()
            .map(|f| serde_json::to_value(f.to_json()).unwrap())
            .collect();
        assert_eq!(
            serde_json::Value::Array(json),
            serde_json::json!([
                // The unready endpoint takes no new connection, but stays for flows on it.
                {"service": "shop/web", "port": "dns", "protocol": "UDP", "kind": "ClusterIP",
                 "frontend": "10.96.0.10:53", "backends": ["10.0.0.1:5353"],
                 "retained": ["10.0.0.2:5353"], "when_empty": "refuse", "external_local": false,
                 "source_ranges": [], "algorithm": "random"},
                {"service": "shop/web", "port": "http", "protocol": "TCP", "kind": "ClusterIP",
                 "frontend": "10.96.0.10:80", "backends": ["10.0.0.1:8080", "10.0.0.3:8080"],
                 "retained": ["10.0.0.2:8080"], "when_empty": "refuse", "external_local": false,
                 "source_ranges": [], "algorithm": "random"},
            ])
        );
    }

    #[test]
    fn bad_services_are_reported_and_skipped_without_disturbing_others() {
        let plan = plan_of(&format!(
            "{WEB}\n---\n{}",
            r#"apiVersion: v1
kind: Service
metadata: {name: badip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badports}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: zero, port: 0}, {name: big, port: 70000}, {name: sctp, port: 9, protocol: SCTP}, {name: ok, port: 81}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
"#
        ));
        let problems: Vec<String> = plan.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("default/badip") && p.contains("not an IP"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("\"zero\"") && p.contains("outside 1-65535"))
        );
        assert!(problems.iter().any(|p| p.contains("\"big\"")));
        assert!(problems.iter().any(|p| p.contains("SCTP")));
        let frontends: Vec<String> = plan
            .frontends
            .iter()
            .map(|f| f.frontend.addr.to_string())
            .collect();
        assert_eq!(
            frontends,
            ["10.96.0.10:53", "10.96.0.10:80", "10.96.0.11:81"]
        );
    }

    /// Applies `yaml`'s objects to `objects`, plans what they touched, and checks the
    /// planner then agrees with a plan computed from scratch.
    fn change(
        planner: &mut Planner,
        objects: &mut ClusterObjects,
        yaml: &str,
        delete: &[&str],
    ) -> PlanUpdate {
        let mut touched = crate::source::objects::Touched::default();
        let (parsed, _) = parse_documents(std::path::Path::new("t.yaml"), yaml);
        for o in parsed {
            objects.apply(
                crate::source::objects::Delta::Apply(o),
                "node-a",
                &mut touched,
            );
        }
        for key in delete {
            let key = crate::source::objects::ObjectKey::parse(key).unwrap();
            objects.apply(
                crate::source::objects::Delta::Delete(key),
                "node-a",
                &mut touched,
            );
        }
        let node = NodeContext::named("node-a");
        let update = planner.update(objects, &node, Some(&touched.services));
        let whole = compute(objects, &node);
        let kept: Vec<&Frontend> = planner.frontends();
        assert_eq!(kept, whole.frontends.iter().collect::<Vec<_>>());
        update
    }

    #[test]
    fn a_change_plans_only_what_it_touched_and_agrees_with_a_whole_plan() {
        let mut planner = Planner::default();
        let mut objects = ClusterObjects::default();
        let first = change(&mut planner, &mut objects, WEB, &[]);
        assert!(first.all);
        // A second service claims web's cluster IP and port: web keeps it (first by name).
        let rival = "apiVersion: v1
kind: Service
metadata: {name: zz, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
";
        let update = change(&mut planner, &mut objects, rival, &[]);
        assert!(!update.all);
        assert_eq!(update.services, BTreeSet::from(["shop/zz".to_string()]));
        assert!(update.removed.is_empty());
        assert_eq!(update.problems.len(), 1, "{:?}", update.problems);
        assert!(
            update.problems[0]
                .reason
                .contains("already used by Service shop/web")
        );
        // One slice changes: only web is planned again.
        let slice = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.9]}]
";
        let update = change(&mut planner, &mut objects, slice, &[]);
        assert_eq!(update.services, BTreeSet::from(["shop/web".to_string()]));
        // web goes: the rival takes the frontend over, web's other frontend is removed.
        let update = change(&mut planner, &mut objects, "", &["Service shop/web"]);
        assert_eq!(
            update.services,
            BTreeSet::from(["shop/web".to_string(), "shop/zz".to_string()])
        );
        let dns = FrontendAddr {
            addr: "10.96.0.10:53".parse().unwrap(),
            protocol: Protocol::Udp,
        };
        assert_eq!(update.removed, vec![dns]);
        assert_eq!(planner.frontends()[0].service, "shop/zz");
    }

    const KUBE_DNS: &str = "apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, creationTimestamp: '2026-01-01T00:00:00Z'}
spec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}
";

    /// A Service in a namespace that sorts first, older than DNS, claiming the DNS cluster IP
    /// as an external IP on DNS's port and on another one.
    const HIJACK: &str = "apiVersion: v1
kind: Service
metadata: {name: evil, namespace: aaa, creationTimestamp: '2020-01-01T00:00:00Z'}
spec:
  clusterIP: 10.96.5.5
  externalIPs: [10.96.0.10, 203.0.113.7]
  ports: [{name: dns, port: 53, protocol: UDP}, {name: web, port: 80}]
";

    fn owner_of(
        planner: &Planner,
        addr: &str,
        protocol: Protocol,
    ) -> Option<(String, FrontendKind)> {
        let addr = FrontendAddr {
            addr: addr.parse().unwrap(),
            protocol,
        };
        planner
            .frontends()
            .into_iter()
            .find(|f| f.frontend == addr)
            .map(|f| (f.service.clone(), f.kind))
    }

    #[test]
    fn an_external_ip_cannot_take_a_cluster_ip_in_either_order() {
        for order in [[KUBE_DNS, HIJACK], [HIJACK, KUBE_DNS]] {
            let mut planner = Planner::default();
            let mut objects = ClusterObjects::default();
            let mut problems = vec![];
            for yaml in order {
                problems.extend(change(&mut planner, &mut objects, yaml, &[]).problems);
            }
            let dns = Some(("kube-system/kube-dns".to_string(), FrontendKind::ClusterIP));
            assert_eq!(owner_of(&planner, "10.96.0.10:53", Protocol::Udp), dns);
            // Not even another port of the cluster IP.
            assert_eq!(owner_of(&planner, "10.96.0.10:80", Protocol::Tcp), None);
            // Its other external IP is served.
            assert!(owner_of(&planner, "203.0.113.7:53", Protocol::Udp).is_some());
            let refused: Vec<&Problem> = problems
                .iter()
                .filter(|p| p.kind == ProblemKind::FrontendRefused)
                .collect();
            assert_eq!(refused.len(), 2, "{problems:?}");
            assert!(refused.iter().all(|p| p.service == "aaa/evil"));
            assert!(
                refused[0]
                    .reason
                    .contains("cluster IP of Service kube-system/kube-dns"),
                "{refused:?}"
            );
        }
        // Once DNS goes, nothing protects the address: the external IP is served.
        let mut planner = Planner::default();
        let mut objects = ClusterObjects::default();
        change(&mut planner, &mut objects, KUBE_DNS, &[]);
        change(&mut planner, &mut objects, HIJACK, &[]);
        let update = change(
            &mut planner,
            &mut objects,
            "",
            &["Service kube-system/kube-dns"],
        );
        assert!(update.services.contains("aaa/evil"), "{update:?}");
        assert_eq!(
            owner_of(&planner, "10.96.0.10:53", Protocol::Udp),
            Some(("aaa/evil".to_string(), FrontendKind::ExternalIP))
        );
    }

    #[test]
    fn node_addresses_are_refused_as_external_ips() {
        let node = "apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.168.1.5}]}
";
        let service = "apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, externalIPs: [192.168.1.5], ports: [{port: 22}]}
";
        let plan = plan_of(&format!("{node}---\n{service}"));
        assert_eq!(plan.frontends.len(), 1, "{:?}", plan.frontends);
        assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
        assert_eq!(plan.problems[0].kind, ProblemKind::FrontendRefused);
        assert!(plan.problems[0].reason.contains("an address of this node"));
    }

    /// The same protection in IPv6: a node address, or another Service's IPv6 cluster IP.
    #[test]
    fn ipv6_node_addresses_and_cluster_ips_are_refused_as_external_ips() {
        let plan = plan_of(
            "apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: '2001:db8::5'}]}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec: {ipFamilies: [IPv6], clusterIPs: ['fd00:10:96::a'], ports: [{port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: evil, namespace: aaa}
spec:
  ipFamilies: [IPv6]
  clusterIPs: ['fd00:10:96::66']
  externalIPs: ['2001:db8::5', 'fd00:10:96::a']
  ports: [{port: 53, protocol: UDP}]
",
        );
        let frontends: Vec<String> = (plan.frontends.iter())
            .map(|f| format!("{} {}", f.service, f.frontend.addr))
            .collect();
        assert_eq!(
            frontends,
            [
                "kube-system/dns [fd00:10:96::a]:53",
                "aaa/evil [fd00:10:96::66]:53"
            ]
        );
        let reasons: Vec<&str> = plan.problems.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "ExternalIP frontend [2001:db8::5]:53 UDP is refused: 2001:db8::5 is an address of this node",
                "ExternalIP frontend [fd00:10:96::a]:53 UDP is refused: fd00:10:96::a is the cluster IP of Service kube-system/dns",
            ]
        );
    }

    #[test]
    fn conflicts_go_by_frontend_kind_then_age_then_name() {
        let svc = |ns: &str, created: &str, kind: &str| {
            let (external, status) = match kind {
                "lb" => (
                    "",
                    "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n",
                ),
                _ => ("  externalIPs: [198.51.100.1]\n", ""),
            };
            format!(
                "apiVersion: v1
kind: Service
metadata: {{name: s, namespace: {ns}{created}}}
spec:
  type: {}
  clusterIP: 10.96.{}.1
{external}  ports: [{{port: 80, nodePort: 0}}]
{status}---
",
                if kind == "lb" {
                    "LoadBalancer"
                } else {
                    "ClusterIP"
                },
                ns.len()
            )
        };
        let owner = |yaml: String| {
            let plan = plan_of(&yaml);
            let f = plan
                .frontends
                .iter()
                .find(|f| f.frontend.addr.to_string() == "198.51.100.1:80")
                .unwrap();
            (f.service.clone(), f.kind)
        };
        let old = ", creationTimestamp: '2020-01-01T00:00:00Z'";
        let new = ", creationTimestamp: '2026-01-01T00:00:00Z'";
        // A load-balancer IP beats an external IP, however old.
        assert_eq!(
            owner(svc("a", old, "ext") + &svc("bb", new, "lb")),
            ("bb/s".to_string(), FrontendKind::LoadBalancer)
        );
        // Equals: the older wins, whatever the names; then the first name; undated last.
        assert_eq!(
            owner(svc("a", new, "ext") + &svc("bb", old, "ext")).0,
            "bb/s"
        );
        assert_eq!(owner(svc("a", "", "ext") + &svc("bb", "", "ext")).0, "a/s");
        assert_eq!(
            owner(svc("a", "", "ext") + &svc("bb", new, "ext")).0,
            "bb/s"
        );
    }

    #[test]
    fn a_service_with_too_many_frontends_keeps_its_cluster_ips_and_whole_addresses() {
        let ips: Vec<String> = (0..300)
            .map(|i| format!("203.0.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let ports: Vec<String> = (0..10)
            .map(|p| format!("{{name: p{p}, port: {}}}", 8000 + p))
            .collect();
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata: {{name: wide}}
spec: {{clusterIP: 10.96.0.30, externalIPs: [{}], ports: [{}]}}
",
            ips.join(", "),
            ports.join(", ")
        );
        let plan = plan_of(&yaml);
        let count = |kind| plan.frontends.iter().filter(|f| f.kind == kind).count();
        assert_eq!(count(FrontendKind::ClusterIP), 10);
        // (1024 - 10) / 10 addresses, every port of each.
        assert_eq!(count(FrontendKind::ExternalIP), 1010);
        assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
        assert_eq!(plan.problems[0].kind, ProblemKind::ServiceFrontendLimit);
        assert!(
            plan.problems[0].reason.contains(
                "serving 10 of 10 ports, 0 of 0 load-balancer IPs, 101 of 300 external IPs"
            ),
            "{}",
            plan.problems[0]
        );
    }

    #[test]
    fn services_past_the_total_limit_are_not_programmed_and_others_are() {
        let mut node = NodeContext::named("node-a");
        node.max_frontends = 3;
        let service = |name: &str, ip: &str, ports: usize| {
            let ports: Vec<String> = (0..ports)
                .map(|p| format!("{{name: p{p}, port: {}}}", 80 + p))
                .collect();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{}]}}\n---\n",
                ports.join(", ")
            )
        };
        let yaml = service("a", "10.96.0.1", 2)
            + &service("b", "10.96.0.2", 2)
            + &service("c", "10.96.0.3", 1);
        let (parsed, _) = parse_documents(std::path::Path::new("t.yaml"), &yaml);
        let mut objects = ClusterObjects::default();
        for o in parsed {
            objects.insert(o, "node-a");
        }
        let plan = compute(&objects, &node);
        let served: BTreeSet<&str> = plan.frontends.iter().map(|f| f.service.as_str()).collect();
        assert_eq!(served, BTreeSet::from(["default/a", "default/c"]));
        assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
        assert_eq!(plan.problems[0].kind, ProblemKind::FrontendLimit);
        assert_eq!(plan.problems[0].service, "default/b");
    }

    #[test]
    fn cidrs_of_both_families_parse_mask_and_match_their_own_family_only() {
        let v4 = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(v4.to_string(), "10.0.0.0/8");
        assert!(v4.contains("10.200.0.1".parse().unwrap()));
        assert!(!v4.contains("::ffff:10.0.0.1".parse().unwrap()));
        let v6 = Cidr::parse(" fd00:1:2:3::7/64 ").unwrap();
        assert_eq!(v6.to_string(), "fd00:1:2:3::/64");
        assert!(v6.contains("fd00:1:2:3:ffff::1".parse().unwrap()));
        assert!(!v6.contains("fd00:1:2:4::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("::/0").unwrap().prefix, 0);
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            Cidr::parse("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        for bad in ["10.0.0.0/33", "fd00::/129", "fd00::/x", "fd00::zz/64", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    /// A dual-stack NodePort service with externalTrafficPolicy Local, on a node with an
    /// InternalIP of each family.
    fn dual_stack_node_port(v6_endpoints: &str) -> String {
        format!(
            "apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: 192.0.2.11}}, {{type: InternalIP, address: '2001:db8::11'}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIPs: ['fd00:10:96::1', 10.96.0.1]
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.0.0.1], nodeName: node-a}}, {{addresses: [10.0.0.2], nodeName: node-b}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints: {v6_endpoints}
"
        )
    }

    fn summary(plan: &Plan) -> Vec<String> {
        (plan.frontends.iter())
            .map(|f| {
                let backends: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
                let when_empty = if f.drop_when_empty { "drop" } else { "" };
                format!(
                    "{:?} {} -> {}{when_empty}",
                    f.kind,
                    f.frontend.addr,
                    backends.join(",")
                )
            })
            .collect()
    }

    #[test]
    fn each_family_has_its_node_ports_endpoints_and_traffic_policy() {
        // IPv6: no endpoint on this node, so its node port drops (one exists elsewhere) while
        // IPv4's uses its local one.
        let plan = plan_of(&dual_stack_node_port(
            "[{addresses: ['fd00:10:244::2'], nodeName: node-b}]",
        ));
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(
            summary(&plan),
            [
                "ClusterIP 10.96.0.1:80 -> 10.0.0.1:8080,10.0.0.2:8080",
                "NodePort 192.0.2.11:30080 -> 10.0.0.1:8080",
                "NodePort [2001:db8::11]:30080 -> drop",
                "ClusterIP [fd00:10:96::1]:80 -> [fd00:10:244::2]:8080",
            ]
        );
        // The pods' view of the IPv6 node port: every IPv6 endpoint.
        let internal = plan.frontends[2].internal_backends.as_ref().unwrap();
        assert_eq!(internal, &["[fd00:10:244::2]:8080".parse().unwrap()]);
        // The health check answers for the primary family (IPv6 here): no local endpoint.
        let (mut objects, _) = parse_documents(
            std::path::Path::new("t.yaml"),
            &dual_stack_node_port("[]").replace(
                "externalTrafficPolicy: Local",
                "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
            ),
        );
        let mut cluster = ClusterObjects::default();
        for o in objects.drain(..) {
            cluster.insert(o, "node-a");
        }
        let plan = compute(&cluster, &NodeContext::named("node-a"));
        assert_eq!(plan.health_checks.len(), 1);
        assert_eq!(plan.health_checks[0].local_endpoints, 0);
    }

    #[test]
    fn node_port_addresses_may_be_ipv6_cidrs() {
        let yaml = dual_stack_node_port("[{addresses: ['fd00:10:244::1'], nodeName: node-a}]");
        let (parsed, _) = parse_documents(std::path::Path::new("t.yaml"), &yaml);
        let mut objects = ClusterObjects::default();
        for o in parsed {
            objects.insert(o, "node-a");
        }
        let mut node = NodeContext::named("node-a");
        node.nodeport_cidrs = vec![Cidr::parse("2001:db8:1::/64").unwrap()];
        node.local_addresses = [
            "192.0.2.11",
            "2001:db8::11",
            "2001:db8:1::5",
            "2001:db8:1::6",
        ]
        .map(|a| a.parse().unwrap())
        .to_vec();
        let plan = compute(&objects, &node);
        let node_ports: Vec<String> = (plan.frontends.iter())
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| format!("{} -> {:?}", f.frontend.addr, f.backends))
            .collect();
        // IPv4: no CIDR of the family given, its default (the primary InternalIP).
        assert_eq!(
            node_ports,
            [
                "192.0.2.11:30080 -> [10.0.0.1:8080]",
                "[2001:db8:1::5]:30080 -> [[fd00:10:244::1]:8080]",
                "[2001:db8:1::6]:30080 -> [[fd00:10:244::1]:8080]",
            ]
        );
    }

    #[test]
    fn a_single_stack_service_ignores_the_other_familys_addresses_and_slices() {
        let plan = plan_of(
            "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  externalIPs: ['2001:db8::7', 203.0.113.7]
  loadBalancerSourceRanges: ['2001:db8::/32']
  ports: [{name: http, port: 80, nodePort: 0}]
status: {loadBalancer: {ingress: [{ip: '2001:db8::8'}, {ip: 198.51.100.8}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:10:244::1']}]
",
        );
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(
            summary(&plan),
            [
                "ClusterIP 10.96.0.1:80 -> ",
                "LoadBalancer 198.51.100.8:80 -> ",
                "ExternalIP 203.0.113.7:80 -> ",
            ]
        );
        // Only IPv6 ranges: none applies to the IPv4 load-balancer IP (kube-proxy filters the
        // ranges by family, so it is open).
        assert!(plan.frontends[1].source_ranges.is_empty());
    }

    #[test]
    fn a_cluster_ip_of_the_wrong_family_skips_only_that_family() {
        let plan = plan_of(
            "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.1, 10.96.0.2, 'fd00::1']
  ports: [{name: http, port: 80}]
",
        );
        assert_eq!(summary(&plan), ["ClusterIP 10.96.0.1:80 -> "]);
        let problems: Vec<String> = plan.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems,
            [
                "Service default/web: clusterIP 10.96.0.2 is not of its family IPv6 (ipFamilies); it is skipped",
                "Service default/web: clusterIP fd00::1 has no family in ipFamilies; it is skipped",
            ]
        );
        assert!(
            plan.problems
                .iter()
                .all(|p| p.kind == ProblemKind::InvalidClusterIp)
        );
    }

    #[test]
    fn a_slice_with_the_api_maximum_of_1000_endpoints_is_used_whole() {
        let endpoints: String = (0..1000)
            .map(|i| format!("- {{addresses: [10.1.{}.{}]}}\n", i / 250, i % 250 + 1))
            .collect();
        let plan = plan_of(&format!(
            "apiVersion: v1
kind: Service
metadata: {{name: big}}
spec: {{clusterIP: 10.96.0.50, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: big-1, labels: {{kubernetes.io/service-name: big}}}}
addressType: IPv4
ports: [{{name: \"\", port: 8080}}]
endpoints:
{endpoints}"
        ));
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert_eq!(plan.frontends[0].backends.len(), 1000);
    }
}
