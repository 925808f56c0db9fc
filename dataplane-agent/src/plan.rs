//! The desired state of this node's datapath, computed from the cluster's objects alone: every
//! frontend and the backends new connections there may use. `run` programs exactly this, and
//! `plan` prints it, so the two cannot disagree.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use serde::Serialize;

use crate::objects::{ClusterObjects, LABEL_SERVICE_NAME, ObjectName, object_name};

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectName,
    /// The service port's name ("" when unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    pub frontend: FrontendAddr,
    /// Backends for new connections, sorted; empty means connections are refused.
    pub backends: Vec<SocketAddrV4>,
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
    pub problems: Vec<Problem>,
}

/// The `plan -o json` contract: one object per frontend.
#[derive(Serialize)]
pub struct FrontendJson<'a> {
    pub service: &'a str,
    pub port: &'a str,
    pub protocol: Protocol,
    pub kind: FrontendKind,
    pub frontend: String,
    pub backends: Vec<String>,
}

impl Frontend {
    pub fn to_json(&self) -> FrontendJson<'_> {
        FrontendJson {
            service: &self.service,
            port: &self.port_name,
            protocol: self.frontend.protocol,
            kind: self.kind,
            frontend: self.frontend.addr.to_string(),
            backends: self.backends.iter().map(|b| b.to_string()).collect(),
        }
    }
}

pub fn compute(objects: &ClusterObjects) -> Plan {
    let mut plan = Plan::default();
    let slices = slices_by_service(&objects.endpoint_slices);
    let mut seen: BTreeMap<FrontendAddr, ObjectName> = BTreeMap::new();
    for (name, service) in &objects.services {
        let problem = |reason: String| Problem {
            object: format!("Service {name}"),
            reason,
        };
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let cluster_ips = match cluster_ips(service) {
            Ok(ips) => ips,
            Err(reason) => {
                plan.problems.push(problem(reason));
                continue;
            }
        };
        if cluster_ips.is_empty() {
            continue; // headless, or IPv6-only (this datapath is IPv4)
        }
        let service_slices = slices.get(name).map(Vec::as_slice).unwrap_or(&[]);
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
            let backends = backends_for_port(service_slices, &port_name, protocol);
            for ip in &cluster_ips {
                let frontend = FrontendAddr {
                    addr: SocketAddrV4::new(*ip, number),
                    protocol,
                };
                if let Some(owner) = seen.get(&frontend) {
                    plan.problems.push(problem(format!(
                        "frontend {} {protocol} is already used by Service {owner}",
                        frontend.addr
                    )));
                    continue;
                }
                seen.insert(frontend, name.clone());
                plan.frontends.push(Frontend {
                    service: name.clone(),
                    port_name: port_name.clone(),
                    kind: FrontendKind::ClusterIP,
                    frontend,
                    backends: backends.clone(),
                });
            }
        }
    }
    plan.frontends.sort_by_key(|f| f.frontend);
    plan.problems.sort();
    plan
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

fn slices_by_service(
    slices: &BTreeMap<ObjectName, EndpointSlice>,
) -> BTreeMap<ObjectName, Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectName, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.values() {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue;
        };
        let mut meta = slice.metadata.clone();
        meta.name = Some(service.clone());
        by_service
            .entry(object_name(&meta))
            .or_default()
            .push(slice);
    }
    by_service
}

/// Whether an endpoint takes new connections. The API says an absent `ready` means ready.
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|c| c.ready)
        .unwrap_or(true)
}

/// The backends of one service port: endpoints of every IPv4 slice of the service whose port
/// of the same name and protocol is valid, deduplicated and sorted.
fn backends_for_port(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
) -> Vec<SocketAddrV4> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let target_port = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            let same_protocol = Protocol::parse(p.protocol.as_deref()).ok() == Some(protocol);
            (same_name && same_protocol)
                .then_some(p.port?)
                .and_then(|n| valid_port(n).ok())
        });
        let Some(target_port) = target_port else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if !is_ready(endpoint) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    backends.insert(SocketAddrV4::new(ip, target_port));
                }
            }
        }
    }
    backends.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_documents;

    fn plan_of(yaml: &str) -> Plan {
        let (objects, skipped) = parse_documents(std::path::Path::new("t.yaml"), yaml);
        assert!(skipped.is_empty(), "{skipped:?}");
        let mut cluster = ClusterObjects::default();
        for o in objects {
            cluster.apply(o, "node-a");
        }
        compute(&cluster)
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
                {"service": "shop/web", "port": "dns", "protocol": "UDP", "kind": "ClusterIP",
                 "frontend": "10.96.0.10:53", "backends": ["10.0.0.1:5353"]},
                {"service": "shop/web", "port": "http", "protocol": "TCP", "kind": "ClusterIP",
                 "frontend": "10.96.0.10:80", "backends": ["10.0.0.1:8080", "10.0.0.3:8080"]},
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
}
