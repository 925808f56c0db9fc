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

/// A ClusterIP Service with `ports`, and one EndpointSlice holding `endpoints` (all ready).
pub fn service(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    endpoints: &[Ipv4Addr],
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
        .map(|ip| format!("  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"))
        .collect();
    let endpoints_yaml = if endpoints.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{endpoint_list}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  ports:
{service_ports}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc12
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
{slice_ports}{endpoints_yaml}"
    )
}
