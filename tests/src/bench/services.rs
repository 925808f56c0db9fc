//! The service set every mode of sections 2-4 programs: filler ClusterIP services with
//! `endpoints` endpoints each (addresses nothing answers on; never reached), plus the two
//! measured services whose endpoints are the server pods. The same set is written as agent
//! manifests and as kube-proxy's iptables and nftables rule sets.
use std::{
    fmt::Write,
    net::{Ipv4Addr, Ipv6Addr},
};

/// The connection-latency service: the server pod's two addresses, port 80 -> 8080.
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
/// The connection-latency service's IPv6 cluster IP (the service is dual-stack: its IPv6
/// endpoint is the server pod's IPv6 address).
pub const MEASURED_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x97, 0, 0, 0, 0, 0x10);
/// The throughput service: the server pod's first address only (iperf3's control and data
/// connections must reach the same server), port 5201.
pub const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 11);
pub const IPERF_PORT: u16 = 5201;
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The pods' CIDR (kube-proxy masquerades traffic to services from outside it).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NAMESPACE: &str = "bench";

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
    /// Dual-stack (the agent's manifests only): the IPv6 cluster IP and endpoints.
    pub v6: Option<(Ipv6Addr, Vec<Ipv6Addr>)>,
}

/// `total` services: fillers first, the measured services last (kube-proxy's iptables mode
/// then walks every filler rule before matching them: its worst case, which the issue asks
/// for).
pub fn service_set(
    total: usize,
    endpoints: usize,
    servers: &[Ipv4Addr],
    servers6: &[Ipv6Addr],
) -> Vec<Service> {
    let fillers = total.saturating_sub(2);
    let mut set: Vec<Service> = (0..fillers).map(|i| filler(i, endpoints)).collect();
    set.push(Service {
        name: "measured".into(),
        vip: MEASURED_VIP,
        port: SERVICE_PORT,
        target_port: TARGET_PORT,
        endpoints: servers.to_vec(),
        v6: Some((MEASURED_VIP6, servers6.to_vec())),
    });
    set.push(Service {
        name: "iperf".into(),
        vip: IPERF_VIP,
        port: IPERF_PORT,
        target_port: IPERF_PORT,
        endpoints: servers[..1].to_vec(),
        v6: None,
    });
    set
}

pub fn filler(i: usize, endpoints: usize) -> Service {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    Service {
        name: format!("svc-{i:05}"),
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1),
        port: SERVICE_PORT,
        target_port: TARGET_PORT,
        endpoints: (0..endpoints)
            .map(|e| Ipv4Addr::from(base + (i * endpoints + e) as u32))
            .collect(),
        v6: None,
    }
}

/// A Service and its EndpointSlice, as a JSON `v1 List` (one manifest file).
pub fn manifest(s: &Service) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects(s)}).to_string()
}

/// Every Service and EndpointSlice of `set` in one JSON `v1 List`, as
/// `kubectl get services,endpointslices -A -o json` writes a cluster's.
pub fn list_manifest(set: &[Service]) -> String {
    let mut out = String::from(r#"{"apiVersion":"v1","kind":"List","items":["#);
    for (i, object) in set.iter().flat_map(objects).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&object.to_string());
    }
    out.push_str("]}");
    out
}

/// A Service and its EndpointSlice.
fn objects(s: &Service) -> Vec<serde_json::Value> {
    let slice = |family: &str, suffix: &str, addresses: Vec<String>| {
        let endpoints: Vec<serde_json::Value> = addresses
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-bench{suffix}", s.name),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": s.name}
            },
            "addressType": family,
            "ports": [{"name": "http", "protocol": "TCP", "port": s.target_port}],
            "endpoints": endpoints
        })
    };
    let mut spec = serde_json::json!({
        "type": "ClusterIP",
        "clusterIP": s.vip.to_string(),
        "clusterIPs": [s.vip.to_string()],
        "ports": [{"name": "http", "protocol": "TCP", "port": s.port, "targetPort": s.target_port}]
    });
    let mut objects = vec![
        serde_json::Value::Null, // the Service, below
        slice(
            "IPv4",
            "",
            s.endpoints.iter().map(|ip| ip.to_string()).collect(),
        ),
    ];
    if let Some((vip6, endpoints6)) = &s.v6 {
        spec["clusterIPs"] = serde_json::json!([s.vip.to_string(), vip6.to_string()]);
        spec["ipFamilies"] = serde_json::json!(["IPv4", "IPv6"]);
        spec["ipFamilyPolicy"] = serde_json::json!("PreferDualStack");
        objects.push(slice(
            "IPv6",
            "-v6",
            endpoints6.iter().map(|ip| ip.to_string()).collect(),
        ));
    }
    objects[0] = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": NAMESPACE},
        "spec": spec
    });
    objects
}

/// kube-proxy's chain-name hash: 16 characters of base32 (here from FNV-1a, not SHA-256;
/// only the shape matters).
fn chain_hash(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in text.bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    (0..16)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The nat and filter chains kube-proxy's iptables mode hooks into the built-in chains. It
/// creates them and the jumps with single `iptables` calls before its first restore; the
/// bench does the same, outside the timed restore.
pub fn iptables_setup() -> Vec<Vec<&'static str>> {
    type Jump = (
        &'static str,
        &'static [&'static str],
        &'static str,
        &'static str,
    );
    // (table, chains it creates, jumps as (built-in chain, matches, comment, target)).
    let tables: [(&str, [&str; 2], &[Jump]); 2] = [
        (
            "nat",
            ["KUBE-SERVICES", "KUBE-POSTROUTING"],
            &[
                (
                    "PREROUTING",
                    &[],
                    "kubernetes service portals",
                    "KUBE-SERVICES",
                ),
                ("OUTPUT", &[], "kubernetes service portals", "KUBE-SERVICES"),
                (
                    "POSTROUTING",
                    &[],
                    "kubernetes postrouting rules",
                    "KUBE-POSTROUTING",
                ),
            ],
        ),
        (
            "filter",
            ["KUBE-SERVICES", "KUBE-FORWARD"],
            &[
                (
                    "FORWARD",
                    &["-m", "conntrack", "--ctstate", "NEW"],
                    "kubernetes service portals",
                    "KUBE-SERVICES",
                ),
                (
                    "FORWARD",
                    &[],
                    "kubernetes forwarding rules",
                    "KUBE-FORWARD",
                ),
            ],
        ),
    ];
    let mut commands = vec![];
    for (table, chains, jumps) in tables {
        for chain in chains {
            commands.push(vec!["-t", table, "-N", chain]);
        }
        for (builtin, matches, comment, target) in jumps {
            let mut command = vec!["-t", table, "-I", builtin];
            command.extend(*matches);
            command.extend(["-m", "comment", "--comment", comment, "-j", target]);
            commands.push(command);
        }
    }
    commands
}

/// The iptables-restore input for `set`, in kube-proxy's iptables-mode structure:
/// KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with `statistic --mode random` and DNAT.
/// `full`: a complete table (built-in chains and their jumps included) for a restore without
/// `--noflush`; else what kube-proxy itself writes for `--noflush`, after creating the jumps
/// with single commands ([`iptables_setup`]).
pub fn iptables_restore(set: &[Service], full: bool) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let w = &mut rules;
    for s in set {
        let svc_port = format!("{NAMESPACE}/{}:http", s.name);
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{svc_port}:tcp")));
        writeln!(chains, ":{svc_chain} - [0:0]").unwrap();
        writeln!(
            w,
            "-A KUBE-SERVICES -m comment --comment \"{svc_port} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {svc_chain}",
            s.vip, s.port
        )
        .unwrap();
        writeln!(
            w,
            "-A {svc_chain} -m comment --comment \"{svc_port} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            s.vip, s.port
        )
        .unwrap();
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep_chain = format!("KUBE-SEP-{}", chain_hash(&format!("{svc_port}:tcp:{ep}")));
            writeln!(chains, ":{sep_chain} - [0:0]").unwrap();
            let remaining = n - i;
            if remaining > 1 {
                writeln!(
                    w,
                    "-A {svc_chain} -m comment --comment \"{svc_port} -> {ep}:{}\" -m statistic --mode random --probability {:.10} -j {sep_chain}",
                    s.target_port,
                    1.0 / remaining as f64
                )
                .unwrap();
            } else {
                writeln!(
                    w,
                    "-A {svc_chain} -m comment --comment \"{svc_port} -> {ep}:{}\" -j {sep_chain}",
                    s.target_port
                )
                .unwrap();
            }
            writeln!(
                w,
                "-A {sep_chain} -m comment --comment \"{svc_port}\" -s {ep}/32 -j KUBE-MARK-MASQ"
            )
            .unwrap();
            writeln!(
                w,
                "-A {sep_chain} -m comment --comment \"{svc_port}\" -m tcp -p tcp -j DNAT --to-destination {ep}:{}",
                s.target_port
            )
            .unwrap();
        }
    }
    // Built-in chains and their jumps, in a complete restore only (kube-proxy creates the
    // jumps with single commands before a --noflush restore).
    let (filter_builtin, filter_jumps, nat_builtin, nat_jumps) = if full {
        (
            ":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
",
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
",
        )
    } else {
        ("", "", "", "")
    };
    format!(
        "*filter
{filter_builtin}:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
{filter_jumps}-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
{nat_builtin}:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
{chains}{nat_jumps}-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
{rules}-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"
    )
}

/// The `nft -f` input kube-proxy (nftables mode) writes for `set` on its first sync: the
/// `service-ips` verdict map to per-service chains, which pick an endpoint chain with
/// `numgen random mod N vmap`.
pub fn nft_script(set: &[Service]) -> String {
    let t = "ip kube-proxy";
    let mut o = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}
add chain {t} mark-for-masquerade
add chain {t} masquerading
add chain {t} services
add chain {t} service-endpoints-check
add chain {t} cluster-ips-check
add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {t} nat-output {{ type nat hook output priority -100 ; }}
add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}
add rule {t} mark-for-masquerade mark set mark or 0x4000
add rule {t} masquerading mark and 0x4000 == 0 return
add rule {t} masquerading mark set mark xor 0x4000
add rule {t} masquerading masquerade fully-random
add rule {t} nat-prerouting jump services
add rule {t} nat-output jump services
add rule {t} nat-postrouting jump masquerading
add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}
add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}
add rule {t} filter-forward ct state new jump service-endpoints-check
add rule {t} filter-forward ct state new jump cluster-ips-check
add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips
"
    );
    let w = &mut o;
    for s in set {
        let svc_port = format!("{NAMESPACE}/{}/tcp/http", s.name);
        let svc_chain = format!("service-{}-{svc_port}", &chain_hash(&svc_port)[..8]);
        writeln!(w, "add chain {t} {svc_chain}").unwrap();
        writeln!(
            w,
            "add rule {t} {svc_chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            s.vip, s.port
        )
        .unwrap();
        let mut elements = Vec::new();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let ep_name = format!("{svc_port}__{ep}/{}", s.target_port);
            let ep_chain = format!("endpoint-{}-{ep_name}", &chain_hash(&ep_name)[..8]);
            writeln!(w, "add chain {t} {ep_chain}").unwrap();
            writeln!(
                w,
                "add rule {t} {ep_chain} ip saddr {ep} jump mark-for-masquerade"
            )
            .unwrap();
            writeln!(
                w,
                "add rule {t} {ep_chain} meta l4proto tcp dnat to {ep}:{}",
                s.target_port
            )
            .unwrap();
            elements.push(format!("{i} : goto {ep_chain}"));
        }
        writeln!(
            w,
            "add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            elements.join(", ")
        )
        .unwrap();
        writeln!(w, "add element {t} cluster-ips {{ {} }}", s.vip).unwrap();
        writeln!(
            w,
            "add element {t} service-ips {{ {} . tcp . {} : goto {svc_chain} }}",
            s.vip, s.port
        )
        .unwrap();
    }
    o
}
