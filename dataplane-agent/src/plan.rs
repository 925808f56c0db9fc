//! The desired state of this node's datapath, computed from the cluster's objects alone: every
//! frontend and the backends new connections there may use. `run` programs exactly this, and
//! `plan` prints it, so the two cannot disagree. The plan is kept per service ([`Planner`]):
//! a change plans again only the services it touched.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use serde::Serialize;

use crate::{
    endpoints::{self, EndpointInfo, PortPolicy},
    objects::{ClusterObjects, LABEL_SERVICE_NAME, ObjectName, Slice, SliceEndpoint, object_name},
};

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

/// What identifies a frontend in the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
}

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or(format!("{text:?} is not an IPv4 CIDR"))?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(ip) & mask == u32::from(self.addr)
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
    pub backends: Vec<SocketAddrV4>,
    /// ...or dropped, when endpoints exist elsewhere but policy keeps this node from them.
    pub drop_when_empty: bool,
    /// externalTrafficPolicy Local on an external frontend: the client's source is kept.
    pub external_local: bool,
    /// For an external-local frontend: the backends pods reaching it use (every usable
    /// endpoint, kube-proxy's short circuit for in-cluster clients).
    pub internal_backends: Option<Vec<SocketAddrV4>>,
    /// The service port's other endpoints, in any condition (terminating, not ready, or
    /// left out by policy), sorted: no new connection goes to them, but flows already there
    /// keep them (kube-proxy's conntrack semantics), so they stay programmed.
    pub retained: Vec<SocketAddrV4>,
    /// sessionAffinity ClientIP: seconds a client keeps its backend.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (LoadBalancer frontends only); empty allows every source.
    pub source_ranges: Vec<Cidr>,
    pub algorithm: Algorithm,
}

/// Something in the cluster's objects this node cannot program, and was skipped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Sorted by frontend address; one entry per frontend.
    pub frontends: Vec<Frontend>,
    /// Health check node ports to serve (externalTrafficPolicy Local services).
    pub health_checks: Vec<crate::health::ServiceHealth>,
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
        let addrs = |list: &[SocketAddrV4]| list.iter().map(|b| b.to_string()).collect();
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

fn proxied_by_us(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    let labels = meta.labels.as_ref();
    !labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

/// Annotation choosing a service's load-balancing algorithm: `random` or `maglev`.
pub const ANNOTATION_LB_ALGORITHM: &str = "dataplane.dev/lb-algorithm";
/// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What the plan depends on besides the cluster's objects: this node and the agent's flags.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub name: String,
    /// `--nodeport-addresses`: node ports listen on local addresses inside these CIDRs;
    /// empty means the node's primary address (its Node's InternalIP).
    pub nodeport_cidrs: Vec<Cidr>,
    /// IPv4 addresses configured on this node (for `nodeport_cidrs`).
    pub local_addresses: Vec<Ipv4Addr>,
    /// `--service-node-port-range`.
    pub nodeport_range: (u16, u16),
    /// `--lb-algorithm`: forced for every frontend, or `None` for the default (Maglev for
    /// external frontends, random for cluster IPs). A service's annotation wins over both.
    pub algorithm: Option<Algorithm>,
}

impl NodeContext {
    /// A node with the defaults (used by tests and tools).
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            nodeport_cidrs: vec![],
            local_addresses: vec![],
            nodeport_range: (30000, 32767),
            algorithm: None,
        }
    }

    /// The addresses node ports are served on.
    fn nodeport_addresses(&self, objects: &ClusterObjects) -> Vec<Ipv4Addr> {
        let mut addresses: Vec<Ipv4Addr> = if self.nodeport_cidrs.is_empty() {
            primary_addresses(objects)
        } else {
            self.local_addresses
                .iter()
                .filter(|ip| self.nodeport_cidrs.iter().any(|c| c.contains(**ip)))
                .copied()
                .collect()
        };
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// The node's InternalIP addresses (IPv4), from its Node object.
pub fn primary_addresses(objects: &ClusterObjects) -> Vec<Ipv4Addr> {
    let addresses = objects
        .node()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    addresses
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
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
    plan.problems.sort();
    plan.problems.dedup();
    plan
}

/// What every service's plan depends on besides its own objects.
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeInputs {
    zone: String,
    nodeport_addresses: Vec<Ipv4Addr>,
}

/// One service's part of the plan.
#[derive(Debug)]
struct ServicePlan {
    /// Its frontends, each address once; one another service also wants goes to the service
    /// first by name.
    frontends: Vec<Frontend>,
    /// Problems of the service and its slices (conflicts with other services come on top).
    problems: Vec<Problem>,
    /// The problems last reported, to report each once.
    reported: Vec<Problem>,
    health_check: Option<crate::health::ServiceHealth>,
    /// Ports of it whose policy leaves this node without endpoints: (internal, external).
    no_local: (i64, i64),
}

/// The plan kept per service, so that a change recomputes only the services it touches.
#[derive(Debug, Default)]
pub struct Planner {
    node: Option<NodeInputs>,
    services: BTreeMap<ObjectName, ServicePlan>,
    /// Every (frontend, service wanting it); the first service of a frontend owns it.
    claims: BTreeSet<(FrontendAddr, ObjectName)>,
    health_checks: BTreeMap<ObjectName, crate::health::ServiceHealth>,
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

impl Planner {
    /// Plans the `touched` services again; every service when `touched` is `None`, when
    /// nothing was planned yet, or when what all services depend on changed (this node's
    /// zone or node port addresses; other changes to its Node do not matter here).
    pub fn update(
        &mut self,
        objects: &ClusterObjects,
        node: &NodeContext,
        touched: Option<&BTreeSet<ObjectName>>,
    ) -> PlanUpdate {
        let inputs = NodeInputs {
            zone: objects
                .node()
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(LABEL_ZONE))
                .cloned()
                .unwrap_or_default(),
            nodeport_addresses: node.nodeport_addresses(objects),
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
        let mut old_frontends = BTreeSet::new();
        let mut owners: BTreeMap<FrontendAddr, Option<ObjectName>> = BTreeMap::new();
        let list: Vec<&ObjectName> = names.iter().collect();
        let plans = crate::parallel::map(&list, |name| {
            let service = objects.services().get(*name)?;
            plan_service(name, service, objects, node, &inputs)
        });
        for (name, new) in names.iter().zip(plans) {
            old_frontends.extend(self.owned(name).map(|f| f.frontend));
            let old = self.services.remove(name);
            let old_addrs: Vec<FrontendAddr> = old
                .iter()
                .flat_map(|p| &p.frontends)
                .map(|f| f.frontend)
                .collect();
            let new_addrs: Vec<FrontendAddr> = new
                .iter()
                .flat_map(|p| &p.frontends)
                .map(|f| f.frontend)
                .collect();
            // Frontends another service also wants may change hands: note who had them.
            for addr in old_addrs.iter().chain(&new_addrs) {
                let contested = self
                    .claims
                    .range((*addr, String::new())..)
                    .take_while(|(a, _)| a == addr)
                    .any(|(_, other)| other != name);
                if contested && !owners.contains_key(addr) {
                    owners.insert(*addr, self.owner(addr).cloned());
                }
            }
            for addr in old_addrs {
                self.claims.remove(&(addr, name.clone()));
            }
            for addr in new_addrs {
                self.claims.insert((addr, name.clone()));
            }
            let (reported, no_local) = old.map(|p| (p.reported, p.no_local)).unwrap_or_default();
            self.no_local.0 -= no_local.0;
            self.no_local.1 -= no_local.1;
            match new.as_ref().and_then(|p| p.health_check.clone()) {
                Some(h) => self.health_checks.insert(name.clone(), h),
                None => self.health_checks.remove(name),
            };
            if let Some(mut plan) = new {
                plan.reported = reported;
                plan.no_local = no_local;
                self.services.insert(name.clone(), plan);
            }
        }
        self.node = Some(inputs);
        let mut update = PlanUpdate {
            services: names,
            all,
            ..Default::default()
        };
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

    fn owner(&self, addr: &FrontendAddr) -> Option<&ObjectName> {
        self.claims
            .range((*addr, String::new())..)
            .next()
            .filter(|(a, _)| a == addr)
            .map(|(_, name)| name)
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
    pub fn health_checks(&self) -> Vec<crate::health::ServiceHealth> {
        self.health_checks.values().cloned().collect()
    }

    fn problems_of(&self, service: &str) -> Vec<Problem> {
        let Some(plan) = self.services.get(service) else {
            return vec![];
        };
        let mut problems = plan.problems.clone();
        for f in &plan.frontends {
            if let Some(owner) = self.owner(&f.frontend).filter(|o| *o != service) {
                problems.push(conflict(service, f, owner));
            }
        }
        problems
    }
}

fn conflict(service: &str, f: &Frontend, owner: &str) -> Problem {
    Problem {
        object: format!("Service {service}"),
        reason: format!(
            "{:?} frontend {} {} is already used by Service {owner}",
            f.kind, f.frontend.addr, f.frontend.protocol
        ),
    }
}

/// kube-proxy serves a health check node port for externalTrafficPolicy Local services that
/// are externally reachable, saying whether this node has local endpoints.
fn health_check(service: &Service, local_endpoints: usize) -> Option<crate::health::ServiceHealth> {
    let spec = service.spec.as_ref()?;
    let port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    (spec.external_traffic_policy.as_deref() == Some("Local")).then(|| {
        crate::health::ServiceHealth {
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
fn plan_service(
    name: &ObjectName,
    service: &Service,
    objects: &ClusterObjects,
    node: &NodeContext,
    inputs: &NodeInputs,
) -> Option<ServicePlan> {
    let mut plan = ServicePlan {
        frontends: vec![],
        problems: vec![],
        reported: vec![],
        health_check: None,
        no_local: (0, 0),
    };
    let problem = |reason: String| Problem {
        object: format!("Service {name}"),
        reason,
    };
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") || !proxied_by_us(&service.metadata) {
        return None;
    }
    let cluster_ips = match cluster_ips(service) {
        Ok(ips) => ips,
        Err(reason) => {
            plan.problems.push(problem(reason));
            return Some(plan);
        }
    };
    if cluster_ips.is_empty() {
        return None; // headless, or IPv6-only (this datapath is IPv4)
    }
    let settings = ServiceSettings::of(service, node, &mut plan.problems);
    let slices: Vec<(&ObjectName, &Slice)> = objects
        .slices_of(name)
        .filter(|(_, s)| proxied_by_us(&s.metadata))
        .collect();
    let endpoints = ServiceEndpoints::collect(&slices, &node.name, &mut plan.problems);
    let mut seen = BTreeSet::new();
    let mut local_endpoints = 0;
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let (protocol, number) = match service_port(port) {
            Ok(p) => p,
            Err(reason) => {
                plan.problems
                    .push(problem(format!("port {port_name:?}: {reason}")));
                continue;
            }
        };
        let policy = port_policy(service, port);
        let port_endpoints = endpoints.for_port(&port_name, protocol).unwrap_or_default();
        let categorized = match endpoints.for_port(&port_name, protocol) {
            Some(port_endpoints) => {
                endpoints::categorize(port_endpoints, &policy, &node.name, &inputs.zone)
            }
            None => {
                if endpoints.has_ports {
                    plan.problems.push(problem(format!(
                        "port {port_name:?} ({protocol}) matches no port of its EndpointSlices"
                    )));
                }
                // No endpoints: the frontends exist and refuse connections.
                Default::default()
            }
        };
        let mut frontends = vec![];
        let internal = categorized.internal(&policy);
        local_endpoints = local_endpoints.max(categorized.local.as_ref().map_or(0, Vec::len));
        for ip in &cluster_ips {
            frontends.push((FrontendKind::ClusterIP, SocketAddrV4::new(*ip, number)));
        }
        match port.node_port {
            Some(node_port) if policy.externally_accessible && node_port != 0 => {
                match u16::try_from(node_port).ok().filter(|p| (node.nodeport_range.0..=node.nodeport_range.1).contains(p)) {
                    Some(node_port) => frontends.extend(
                        inputs.nodeport_addresses.iter().map(|ip| (FrontendKind::NodePort, SocketAddrV4::new(*ip, node_port))),
                    ),
                    None => plan.problems.push(problem(format!(
                        "port {port_name:?}: nodePort {node_port} is outside the node port range {}-{}",
                        node.nodeport_range.0, node.nodeport_range.1
                    ))),
                }
            }
            _ => {}
        }
        if let Some(ips) = &settings.load_balancer_ips {
            frontends.extend(
                ips.iter()
                    .map(|ip| (FrontendKind::LoadBalancer, SocketAddrV4::new(*ip, number))),
            );
        }
        frontends.extend(
            settings
                .external_ips
                .iter()
                .map(|ip| (FrontendKind::ExternalIP, SocketAddrV4::new(*ip, number))),
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
            let mut retained: Vec<SocketAddrV4> = port_endpoints
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
                source_ranges: if kind == FrontendKind::LoadBalancer {
                    settings.source_ranges.clone()
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
    plan.health_check = health_check(service, local_endpoints);
    plan.frontends.shrink_to_fit(); // kept for every service
    Some(plan)
}

/// Per-service settings that apply to every port.
struct ServiceSettings {
    /// `None` when the service's source ranges leave no valid range: its load-balancer IPs are
    /// not programmed at all rather than opened to everyone.
    load_balancer_ips: Option<Vec<Ipv4Addr>>,
    external_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<Cidr>,
    affinity_timeout: Option<u32>,
    algorithm: Option<Algorithm>,
}

impl ServiceSettings {
    fn of(service: &Service, node: &NodeContext, problems: &mut Vec<Problem>) -> Self {
        let name = object_name(&service.metadata);
        let mut problem = |reason: String| {
            problems.push(Problem {
                object: format!("Service {name}"),
                reason,
            })
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
                Some(Ok(IpAddr::V4(ip))) => load_balancer_ips.push(ip),
                Some(Ok(IpAddr::V6(_))) => {}
                Some(Err(_)) => problem(format!(
                    "load balancer ingress IP {:?} is not an IP address",
                    entry.ip.as_deref().unwrap_or("")
                )),
                None => problem(format!(
                    "load balancer ingress {:?} has a hostname only; it is skipped",
                    entry.hostname.as_deref().unwrap_or("")
                )),
            }
        }
        let mut source_ranges = vec![];
        let ranges = spec.load_balancer_source_ranges.iter().flatten();
        let mut invalid = 0;
        for text in ranges.clone() {
            match Cidr::parse(text) {
                Ok(cidr) => source_ranges.push(cidr),
                Err(reason) if text.contains(':') => drop(reason), // IPv6 ranges: other family
                Err(reason) => {
                    invalid += 1;
                    problem(format!(
                        "loadBalancerSourceRanges: {reason}; the range is skipped"
                    ))
                }
            }
        }
        let all_invalid = invalid > 0 && source_ranges.is_empty();
        if all_invalid && !load_balancer_ips.is_empty() {
            problem(
                "no valid loadBalancerSourceRanges: its load balancer IPs are not served".into(),
            );
        }
        let external_ips = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|text| match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => Some(ip),
                Ok(IpAddr::V6(_)) => None,
                Err(_) => {
                    problem(format!(
                        "externalIPs entry {text:?} is not an IP address; it is skipped"
                    ));
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
                problem(format!(
                    "annotation {ANNOTATION_LB_ALGORITHM}: {other:?} is neither random nor maglev; using the default"
                ));
                None
            }
        };
        let _ = node;
        Self {
            load_balancer_ips: (is_lb && !all_invalid).then_some(load_balancer_ips),
            external_ips,
            source_ranges,
            affinity_timeout,
            algorithm,
        }
    }
}

fn port_policy(service: &Service, port: &ServicePort) -> PortPolicy {
    let spec = service.spec.as_ref();
    let has_lb_ip = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|ingress| ingress.iter().any(|i| i.ip.is_some()));
    let has_external_ips = spec
        .and_then(|s| s.external_ips.as_ref())
        .is_some_and(|ips| !ips.is_empty());
    PortPolicy {
        internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
        external_local: spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local"),
        externally_accessible: port.node_port.unwrap_or(0) != 0 || has_lb_ip || has_external_ips,
    }
}

/// The IPv4 cluster IPs of a service. Headless services have none.
fn cluster_ips(service: &Service) -> Result<Vec<Ipv4Addr>, String> {
    let spec = service.spec.as_ref().expect("checked by caller");
    let mut listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let Some(primary) = spec.cluster_ip.as_deref()
        && !listed.contains(&primary)
    {
        listed.insert(0, primary);
    }
    let mut ips = Vec::new();
    for text in listed {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if !ip.is_unspecified() => ips.push(ip),
            Ok(IpAddr::V4(_)) => return Err(format!("clusterIP {text} is unspecified")),
            Ok(IpAddr::V6(_)) => {} // the other family of a dual-stack service
            Err(_) => return Err(format!("clusterIP {text:?} is not an IP address")),
        }
    }
    Ok(ips)
}

fn service_port(port: &ServicePort) -> Result<(Protocol, u16), String> {
    let protocol = Protocol::parse(port.protocol.as_deref())?;
    let number = valid_port(port.port)?;
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
    fn collect(
        slices: &[(&ObjectName, &Slice)],
        node_name: &str,
        problems: &mut Vec<Problem>,
    ) -> Self {
        let mut by_port: BTreeMap<(String, Protocol), BTreeMap<SocketAddrV4, EndpointInfo>> =
            BTreeMap::new();
        let mut has_ports = false;
        let mut ipv6_slices = 0;
        for (slice_name, slice) in slices {
            let problem = |reason: String| Problem {
                object: format!("EndpointSlice {slice_name}"),
                reason,
            };
            match slice.address_type.as_str() {
                "IPv4" => {}
                "IPv6" => {
                    ipv6_slices += 1;
                    continue;
                }
                _ => continue, // FQDN slices are not for proxies
            }
            if slice.ports.as_ref().is_none_or(|p| p.is_empty()) && !slice.endpoints.is_empty() {
                problems.push(problem(
                    "has endpoints but no ports; its endpoints are not used".into(),
                ));
            }
            for port in slice.ports.iter().flatten() {
                // Upstream ignores ports without a name field or without a number.
                let (Some(name), Some(number)) = (port.name.as_ref(), port.port) else {
                    continue;
                };
                let Ok(number) = valid_port(number) else {
                    problems.push(problem(format!(
                        "port {name:?}: port {number} is outside 1-65535"
                    )));
                    continue;
                };
                let Ok(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                    continue;
                };
                has_ports = true;
                let set = by_port.entry((name.clone(), protocol)).or_default();
                for endpoint in &slice.endpoints {
                    let Some(address) = endpoint.address.as_ref() else {
                        continue;
                    };
                    let Ok(ip) = address.parse::<Ipv4Addr>() else {
                        problems.push(problem(format!(
                            "address {address:?} is not an IPv4 address"
                        )));
                        continue;
                    };
                    let info = endpoint_info(endpoint, SocketAddrV4::new(ip, number), node_name);
                    let keep_existing = set.get(&info.addr).is_some_and(|e| !info.local || e.local);
                    if !keep_existing {
                        set.insert(info.addr, info);
                    }
                }
            }
        }
        if ipv6_slices > 0 {
            problems.push(Problem {
                object: format!("EndpointSlices of {}", service_of(slices)),
                reason: format!("{ipv6_slices} IPv6 slice(s) ignored: this datapath is IPv4 (dual stack comes later)"),
            });
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

fn service_of(slices: &[(&ObjectName, &Slice)]) -> String {
    slices
        .first()
        .map(|(_, s)| {
            let service = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .cloned();
            format!(
                "Service {}/{}",
                s.metadata.namespace.as_deref().unwrap_or("default"),
                service.unwrap_or_default()
            )
        })
        .unwrap_or_default()
}

/// An endpoint's conditions as upstream reads them: absent `ready` and `serving` mean true,
/// absent `terminating` means false.
fn endpoint_info(endpoint: &SliceEndpoint, addr: SocketAddrV4, node_name: &str) -> EndpointInfo {
    EndpointInfo {
        addr,
        ready: endpoint.ready.unwrap_or(true),
        serving: endpoint.serving.unwrap_or(true),
        terminating: endpoint.terminating.unwrap_or(false),
        local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
        zone_hints: endpoint.zone_hints.iter().cloned().collect(),
        node_hints: endpoint.node_hints.iter().cloned().collect(),
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
        let mut touched = crate::objects::Touched::default();
        let (parsed, _) = parse_documents(std::path::Path::new("t.yaml"), yaml);
        for o in parsed {
            objects.apply(crate::objects::Delta::Apply(o), "node-a", &mut touched);
        }
        for key in delete {
            let key = crate::objects::ObjectKey::parse(key).unwrap();
            objects.apply(crate::objects::Delta::Delete(key), "node-a", &mut touched);
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
