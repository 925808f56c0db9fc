//! What keeps bad or hostile input from hurting the node: a source that cannot be read is
//! refused before the kernel is touched; an external IP cannot take a cluster IP (DNS);
//! one Service with thousands of frontends is capped while every other one keeps working;
//! and kube-proxy's own URLs answer as its e2e test reads them.
use std::time::Duration;

use testbed::{Agent, Node, Wiring, http_requests, require_root, udp_request, wait_until};

fn curl(node: &Node, url: &str) -> (u16, String) {
    let out = node
        .netns
        .command("curl")
        .args(["-s", "--max-time", "3", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn service(namespace: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}, creationTimestamp: '{created}'}}
spec:
{spec}"
    )
}

fn slice(namespace: &str, service: &str, port: &str, protocol: &str, ips: &[String]) -> String {
    let endpoints: Vec<String> = ips
        .iter()
        .map(|ip| format!("- {{addresses: [{ip}]}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {service}-1, namespace: {namespace}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: {port}, port: 5353, protocol: {protocol}}}, {{name: http, port: 8080, protocol: TCP}}]
endpoints:
{}
",
        endpoints.join("\n")
    )
}

/// `run` with a source it cannot read exits with the flag named, before loading, attaching
/// or pinning anything: the bpffs directory is never created.
#[test]
fn a_source_that_cannot_be_read_is_refused_before_anything_is_pinned() {
    require_root!();
    let node = Node::new(Wiring::Routed, [10, 244, 60]).unwrap();
    let missing = std::env::temp_dir().join(testbed::unique("no-such-manifests-"));
    let bpffs = std::path::Path::new("/sys/fs/bpf").join(testbed::unique("dpt-guard"));
    for (flag, path) in [("--manifests", &missing), ("--kubeconfig", &missing)] {
        let out = node
            .netns
            .command(testbed::agent_binary().to_str().unwrap())
            .arg("run")
            .arg(flag)
            .arg(path)
            .args([
                "--node-name",
                "node-a",
                "--pod-interfaces",
                "veth*",
                "--bpffs-dir",
            ])
            .arg(&bpffs)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{flag}: expected a refusal:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("{flag} {}", path.display())),
            "the error must name the flag and the path:\n{stderr}"
        );
        assert!(
            !bpffs.exists(),
            "{flag}: {} was created before the refusal",
            bpffs.display()
        );
    }
}

#[test]
fn kube_proxy_urls_answer_as_its_e2e_test_reads_them() {
    require_root!();
    let node = Node::new(Wiring::Routed, [10, 244, 61]).unwrap();
    let agent = Agent::start(&node, "node-a").unwrap();
    // /proxyMode on the metrics address: the mode's name alone.
    wait_until(Duration::from_secs(5), || {
        curl(&node, "http://127.0.0.1:10249/proxyMode").0 == 200
    })
    .unwrap();
    let (code, body) = curl(&node, "http://127.0.0.1:10249/proxyMode");
    assert_eq!((code, body.as_str()), (200, "ebpf"));
    // /healthz with kube-proxy's fields (and ours kept): not eligible before its Node is
    // known, then 200 and eligible.
    let (code, body) = curl(&node, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], false, "{body}");
    agent
        .write_manifest(
            "node.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n",
        )
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        curl(&node, "http://127.0.0.1:10256/healthz").0 == 200
    })
    .map_err(|e| e.context(agent.log_text()))
    .unwrap();
    let (_, body) = curl(&node, "http://127.0.0.1:10256/healthz");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    for field in ["lastUpdated", "currentTime"] {
        let time = json[field].as_str().unwrap_or_default();
        assert!(
            time.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "{field}: {body}"
        );
    }
    assert_eq!(json["nodeEligible"], true, "{body}");
    assert_eq!(json["healthy"], true, "{body}");
    drop(agent);
}

/// kube-dns's cluster IP and port, claimed as an external IP by an older Service in a
/// namespace that sorts first: DNS stays with kube-dns whichever Service arrives first, and
/// the other one is told why with a warning and a metric.
#[test]
fn an_external_ip_on_the_dns_cluster_ip_cannot_take_dns_in_either_order() {
    require_root!();
    let mut node = Node::new(Wiring::Routed, [10, 244, 62]).unwrap();
    node.add_pod("client").unwrap();
    for name in ["dns", "evil"] {
        let i = node.add_pod(name).unwrap();
        node.pods[i].serve(8080, 5353).unwrap();
    }
    let dns_ip = node.pods[1].ip.to_string();
    let evil_ip = node.pods[2].ip.to_string();
    let kube_dns = service(
        "kube-system",
        "kube-dns",
        "2026-01-01T00:00:00Z",
        "  clusterIP: 10.96.0.10\n  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]\n",
    ) + "---\n"
        + &slice("kube-system", "kube-dns", "dns", "UDP", &[dns_ip]);
    let evil = service(
        "aaa",
        "evil",
        "2020-01-01T00:00:00Z",
        "  clusterIP: 10.96.7.7\n  externalIPs: [10.96.0.10]\n  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]\n",
    ) + "---\n"
        + &slice("aaa", "evil", "dns", "UDP", &[evil_ip]);
    let ask = |node: &Node| {
        udp_request(&node.pods[0].netns, "10.96.0.10:53", None, "q")
            .unwrap_or_else(|e| format!("error: {e}"))
    };
    for (first, second) in [(&kube_dns, &evil), (&evil, &kube_dns)] {
        let agent = Agent::start(&node, "node-a").unwrap();
        agent.write_manifest("first.yaml", first).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        agent.write_manifest("second.yaml", second).unwrap();
        agent.wait_for_backends("10.96.7.7:53", 1).unwrap();
        agent.wait_for_backends("10.96.0.10:53", 1).unwrap();
        for _ in 0..5 {
            let answer = ask(&node);
            assert!(answer.starts_with("dns "), "DNS answered by {answer:?}");
        }
        wait_until(Duration::from_secs(5), || {
            agent.log_text().contains("frontend_refused")
        })
        .map_err(|e| e.context(agent.log_text()))
        .unwrap();
        let (_, metrics) = curl(&node, "http://127.0.0.1:10249/metrics");
        assert!(
            metrics.contains("dataplane_objects_skipped_total{reason=\"frontend_refused\"}"),
            "{metrics}"
        );
        drop(agent);
    }
}

/// One Service with 400 external IPs x 50 ports (20,000 frontends asked for) next to an
/// ordinary one: the hostile one is capped at --max-frontends-per-service, the agent's
/// memory stays small, and the ordinary Service keeps answering.
#[test]
fn a_hostile_service_is_capped_and_every_other_service_keeps_working() {
    require_root!();
    let mut node = Node::new(Wiring::Routed, [10, 244, 63]).unwrap();
    node.add_pod("client").unwrap();
    let i = node.add_pod("web").unwrap();
    node.pods[i].serve(8080, 5353).unwrap();
    let web_ip = node.pods[i].ip.to_string();
    let agent = Agent::start(&node, "node-a").unwrap();
    let web = service(
        "default",
        "web",
        "2026-01-01T00:00:00Z",
        "  clusterIP: 10.96.8.1\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    ) + "---\n"
        + &slice(
            "default",
            "web",
            "dns",
            "UDP",
            std::slice::from_ref(&web_ip),
        );
    agent.write_manifest("web.yaml", &web).unwrap();
    agent.wait_for_backends("10.96.8.1:80", 1).unwrap();

    let ips: Vec<String> = (0..400)
        .map(|n| format!("203.0.{}.{}", n / 200, n % 200 + 1))
        .collect();
    let ports: Vec<String> = (0..50)
        .map(|p| format!("{{name: p{p}, port: {}, targetPort: 8080}}", 1000 + p))
        .collect();
    let hostile = service(
        "zzz",
        "wide",
        "2026-01-01T00:00:00Z",
        &format!(
            "  clusterIP: 10.96.8.2\n  externalIPs: [{}]\n  ports: [{}]\n",
            ips.join(", "),
            ports.join(", ")
        ),
    );
    agent.write_manifest("hostile.yaml", &hostile).unwrap();
    wait_until(Duration::from_secs(10), || {
        agent.log_text().contains("service_frontend_limit")
    })
    .map_err(|e| e.context(agent.log_text()))
    .unwrap();
    // Programmed: its 50 cluster IP frontends and (1024 - 50) / 50 = 19 whole addresses.
    wait_until(Duration::from_secs(10), || {
        let services = agent.cli_json(&["services"]).unwrap();
        let wide = services
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["service"] == "zzz/wide")
            .count();
        wide == 50 + 19 * 50
    })
    .map_err(|e| e.context(agent.log_text()))
    .unwrap();
    let answers = http_requests(&node.pods[0].netns, "http://10.96.8.1/", 10);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|t| t.starts_with("web "))),
        "{answers:?}"
    );
    let pid = agent.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kb < 150 * 1024, "agent peak RSS {peak_kb} kB");
    let (_, metrics) = curl(&node, "http://127.0.0.1:10249/metrics");
    assert!(
        metrics.contains("dataplane_objects_skipped_total{reason=\"service_frontend_limit\"}"),
        "{metrics}"
    );
}
