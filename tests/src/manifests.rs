//! Kubernetes manifests for tests: a Service and its EndpointSlice, as YAML.
use std::net::Ipv4Addr;

pub struct ServicePort<'a> {
    pub name: &'a str,
    pub protocol: &'a str,
    pub port: u16,
    pub target_port: u16,
}

pub const HTTP: ServicePort<'static> = ServicePort {
    name: "http",
    protocol: "TCP",
    port: 80,
    target_port: 8080,
};
pub const DNS: ServicePort<'static> = ServicePort {
    name: "dns",
    protocol: "UDP",
    port: 53,
    target_port: 5353,
};

/// An endpoint's conditions in an EndpointSlice, as the EndpointSlice controller writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A running pod that passes its readiness probe.
pub const READY: Conditions = Conditions {
    ready: true,
    serving: true,
    terminating: false,
};
/// A running pod failing its readiness probe.
pub const NOT_READY: Conditions = Conditions {
    ready: false,
    serving: false,
    terminating: false,
};
/// A pod being deleted that still passes its readiness probe (draining: the first step of a
/// rolling update).
pub const TERMINATING: Conditions = Conditions {
    ready: false,
    serving: true,
    terminating: true,
};

/// A ClusterIP Service with `ports`, and one EndpointSlice holding `endpoints` (all ready).
pub fn service(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    endpoints: &[Ipv4Addr],
) -> String {
    let endpoints: Vec<(Ipv4Addr, Conditions)> = endpoints.iter().map(|ip| (*ip, READY)).collect();
    service_with(name, cluster_ip, ports, &endpoints, "")
}

/// [`service`] with each endpoint's conditions, and `spec_extra` (YAML lines indented by two
/// spaces, e.g. `"  sessionAffinity: ClientIP\n"`) added to the Service's spec.
pub fn service_with(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    endpoints: &[(Ipv4Addr, Conditions)],
    spec_extra: &str,
) -> String {
    let service_ports: String = ports
        .iter()
        .map(|p| {
            format!(
                "  - {{name: {}, protocol: {}, port: {}, targetPort: {}}}\n",
                p.name, p.protocol, p.port, p.target_port
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
{spec_extra}  ports:
{service_ports}---
{}",
        slice(name, "abc12", "IPv4", ports, endpoints)
    )
}

/// An EndpointSlice of `service` named `{service}-{suffix}` of `family` (`addressType`), for
/// `ports` (their target ports), holding `endpoints` in their conditions.
fn slice<A: std::fmt::Display>(
    service: &str,
    suffix: &str,
    family: &str,
    ports: &[ServicePort],
    endpoints: &[(A, Conditions)],
) -> String {
    let slice_ports: String = ports
        .iter()
        .map(|p| {
            format!(
                "  - {{name: {}, protocol: {}, port: {}}}\n",
                p.name, p.protocol, p.target_port
            )
        })
        .collect();
    let endpoint_list: String = endpoints
        .iter()
        .map(|(ip, c)| {
            format!(
                "  - {{addresses: [\"{ip}\"], conditions: {{ready: {}, serving: {}, terminating: {}}}}}\n",
                c.ready, c.serving, c.terminating
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{suffix}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: {family}
ports:
{slice_ports}{}",
        endpoints_yaml(&endpoint_list)
    )
}

/// An EndpointSlice's `endpoints` field from its list items (`"  - {...}\n"` lines).
fn endpoints_yaml(list: &str) -> String {
    if list.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{list}")
    }
}

/// An endpoint on a node: its address, the node's name and, optionally, the zone it is hinted
/// for.
pub type NodeEndpoint<'a> = (Ipv4Addr, &'a str, Option<&'a str>);

/// A Service with `spec` (YAML lines indented by two spaces, its ports included) and `status`
/// (the inside of the status map), and one EndpointSlice with `slice_ports` as
/// (name, protocol, port) and `endpoints` on their nodes.
pub fn service_on_nodes(
    name: &str,
    cluster_ip: &str,
    spec: &str,
    status: &str,
    slice_ports: &[(&str, &str, u16)],
    endpoints: &[NodeEndpoint],
) -> String {
    let slice_ports: String = slice_ports
        .iter()
        .map(|(n, proto, port)| format!("  - {{name: {n}, protocol: {proto}, port: {port}}}\n"))
        .collect();
    let endpoint_list: String = endpoints
        .iter()
        .map(|(ip, node, zone)| {
            let hints = zone
                .map(|z| format!(", hints: {{forZones: [{{name: {z}}}]}}"))
                .unwrap_or_default();
            format!("  - {{addresses: [\"{ip}\"], nodeName: {node}{hints}}}\n")
        })
        .collect();
    let endpoints = endpoints_yaml(&endpoint_list);
    let spec = spec.trim_end();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {cluster_ip}
{spec}
status: {{{status}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
{slice_ports}{endpoints}"
    )
}

/// A dual-stack ClusterIP Service (`ipFamilyPolicy: PreferDualStack`, IPv4 first) with
/// `cluster_ips` (IPv4, IPv6), and one EndpointSlice per family holding that family's
/// `endpoints` (all ready), as the EndpointSlice controller writes them.
pub fn dual_stack_service(
    name: &str,
    cluster_ips: (&str, &str),
    ports: &[ServicePort],
    endpoints: (&[Ipv4Addr], &[std::net::Ipv6Addr]),
) -> String {
    let v4: Vec<(Ipv4Addr, Conditions)> = endpoints.0.iter().map(|ip| (*ip, READY)).collect();
    let v4_only = service_with(name, cluster_ips.0, ports, &v4, "");
    // The IPv4 document, made dual-stack, and a second slice for the IPv6 endpoints.
    let dual = v4_only.replacen(
        &format!("  clusterIP: {}\n", cluster_ips.0),
        &format!(
            "  clusterIP: {}\n  clusterIPs: [\"{}\", \"{}\"]\n  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n",
            cluster_ips.0, cluster_ips.0, cluster_ips.1
        ),
        1,
    );
    let v6: Vec<(std::net::Ipv6Addr, Conditions)> =
        endpoints.1.iter().map(|ip| (*ip, READY)).collect();
    format!("{dual}---\n{}", slice(name, "v6abc", "IPv6", ports, &v6))
}
