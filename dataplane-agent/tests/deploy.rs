//! Every manifest in `deploy/` parses into its typed Kubernetes struct (with no field the
//! struct does not know), the RBAC grants the agent exactly what it uses, and the DaemonSet
//! runs the agent as the README says: host network on every node, not privileged, exactly
//! the capabilities it needs (checked against the kernel when run as root), bpffs shared with
//! the host, health probes on the agent's health port, and only flags the agent has.
use std::{
    collections::BTreeSet,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;

const AGENT: &str = env!("CARGO_BIN_EXE_dataplane-agent");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every YAML file in deploy/, with its file name.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let dir = deploy_dir();
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        if file.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if !value.is_null() {
                out.push((
                    file.file_name().unwrap().to_string_lossy().into_owned(),
                    value,
                ));
            }
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, value: &serde_yaml::Value) -> T {
    serde_yaml::from_value(value.clone()).unwrap_or_else(|e| {
        panic!(
            "{file}: {} does not parse: {e}",
            value["kind"].as_str().unwrap_or("?")
        )
    })
}

/// The typed struct of a manifest serializes back to the manifest itself: the structs ignore
/// fields they do not know, so a misspelt field would otherwise pass unnoticed (and the API
/// server would drop it just as silently).
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(
    file: &str,
    value: &serde_yaml::Value,
) {
    let parsed: T = typed(file, value);
    let original = serde_json::to_value(value).unwrap();
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(
        back,
        original,
        "{file}: {} has a field its type does not know (or a value it rewrites)",
        value["kind"].as_str().unwrap_or("?")
    );
}

fn the_one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs = documents();
    let found: Vec<_> = docs.iter().filter(|(_, v)| v["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/");
    typed(&found[0].0, &found[0].1)
}

fn daemonset() -> DaemonSet {
    the_one("DaemonSet")
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec.template.spec.clone().expect("a pod template spec")
}

/// The agent's container (named after the DaemonSet).
fn agent_container(pod: &PodSpec) -> Container {
    pod.containers
        .iter()
        .find(|c| c.name == "dataplane-agent")
        .cloned()
        .expect("a container named dataplane-agent")
}

/// The init container whose script mounts bpffs.
fn bpffs_init_container(pod: &PodSpec) -> Container {
    pod.init_containers
        .iter()
        .flatten()
        .find(|c| {
            c.command
                .iter()
                .flatten()
                .any(|part| part.contains("mount -t bpf bpf /sys/fs/bpf"))
        })
        .cloned()
        .expect("an init container that runs `mount -t bpf bpf /sys/fs/bpf`")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn every_manifest_parses_into_its_typed_struct() {
    let docs = documents();
    assert!(!docs.is_empty());
    for (file, value) in &docs {
        match value["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => round_trips::<ServiceAccount>(file, value),
            "ClusterRole" => round_trips::<ClusterRole>(file, value),
            "ClusterRoleBinding" => round_trips::<ClusterRoleBinding>(file, value),
            "DaemonSet" => round_trips::<DaemonSet>(file, value),
            "Kustomization" => {}
            other => panic!("{file}: unexpected kind {other:?}: add it to this test"),
        }
    }
}

#[test]
fn the_cluster_role_grants_what_the_agent_uses_and_nothing_else() {
    let docs = documents();
    let (file, value) = docs
        .iter()
        .find(|(_, v)| v["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let role: ClusterRole = typed(file, value);
    let mut grants: Vec<String> = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    grants.push(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        [
            "/events:create",
            "/events:patch",
            "/events:update",
            "/nodes:get",
            "/nodes:list",
            "/nodes:watch",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch",
            "events.k8s.io/events:update",
        ]
    );
    let (file, value) = docs
        .iter()
        .find(|(_, v)| v["kind"] == "ClusterRoleBinding")
        .unwrap();
    let binding: ClusterRoleBinding = typed(file, value);
    assert_eq!(binding.role_ref.name, "dataplane-agent");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "dataplane-agent")
    );
}

#[test]
fn the_daemonset_runs_as_the_rbac_service_account() {
    let ds = daemonset();
    let account: ServiceAccount = the_one("ServiceAccount");
    let binding: ClusterRoleBinding = the_one("ClusterRoleBinding");
    let pod = pod_spec(&ds);
    let name = pod.service_account_name.as_deref();
    assert_eq!(name, account.metadata.name.as_deref());
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(subject.name.as_str()), name);
    assert_eq!(subject.namespace, ds.metadata.namespace);
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    assert_ne!(pod.automount_service_account_token, Some(false));
}

#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network() {
    let ds = daemonset();
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    // The node's resolver: cluster DNS is a cluster IP, which connections the node itself
    // opens cannot reach through this datapath once kube-proxy's rules are gone.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.toleration_seconds.is_none()),
        "a toleration with operator Exists and no key or effect tolerates every taint: {tolerations:?}"
    );
    let strategy = ds.spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    // Two agents on a node would fight over its host ports and pins.
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
    assert!(pod.termination_grace_period_seconds.is_some());
    let selector = ds.spec.selector.match_labels.clone();
    let labels = ds.spec.template.metadata.clone();
    let labels = labels.and_then(|m| m.labels).unwrap_or_default();
    for (key, value) in selector.unwrap_or_default() {
        assert_eq!(labels.get(&key), Some(&value), "selector label {key}");
    }
}

#[test]
fn the_agent_is_not_privileged_and_has_exactly_its_capabilities() {
    let pod = pod_spec(&daemonset());
    let agent = agent_container(&pod);
    let security = agent.security_context.clone().expect("a securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.expect("capabilities");
    let mut added = capabilities.add.unwrap_or_default();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(capabilities.drop.unwrap_or_default(), ["ALL"]);
    // Memory limits must leave room for the maps, which are charged to this container.
    let resources = agent.resources.expect("resources");
    assert!(
        resources
            .requests
            .unwrap_or_default()
            .contains_key("memory")
    );
    assert!(resources.limits.unwrap_or_default().contains_key("memory"));
    // The only privileged container is the short init step that mounts bpffs.
    for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged)
            == Some(true);
        if privileged {
            assert_eq!(container.name, bpffs_init_container(&pod).name);
        }
    }
}

#[test]
fn bpffs_is_a_host_path_shared_both_ways_with_the_init_step() {
    let pod = pod_spec(&daemonset());
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume for /sys/fs/bpf");
    assert_eq!(
        volume.host_path.as_ref().unwrap().type_.as_deref(),
        Some("DirectoryOrCreate")
    );
    let mount_of = |container: &Container| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .cloned()
            .unwrap_or_else(|| panic!("{} does not mount {}", container.name, volume.name))
    };
    let init = bpffs_init_container(&pod);
    let init_mount = mount_of(&init);
    assert_eq!(init_mount.mount_path, "/sys/fs/bpf");
    assert_eq!(
        init_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_ne!(init_mount.read_only, Some(true));
    // The API server accepts Bidirectional only in privileged containers.
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let agent_mount = mount_of(&agent_container(&pod));
    assert_eq!(agent_mount.mount_path, "/sys/fs/bpf");
    assert_eq!(
        agent_mount.mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    assert_ne!(agent_mount.read_only, Some(true));
    // The agent pins under its default --bpffs-dir, on that mount.
    let args = agent_container(&pod).args.unwrap_or_default();
    assert!(!args.iter().any(|a| a.starts_with("--bpffs-dir")));
}

/// The init container's script, as the container runtime would run it (`command` as argv).
fn init_script(init: &Container) -> (String, Vec<String>) {
    let command = init.command.clone().unwrap_or_default();
    assert!(
        command.len() >= 3 && command[0].ends_with("sh") && command[1].starts_with('-'),
        "the init step is a shell script: {command:?}"
    );
    (command[0].clone(), command[1..].to_vec())
}

#[test]
fn the_init_step_mounts_bpffs_only_when_missing() {
    let init = bpffs_init_container(&pod_spec(&daemonset()));
    let (shell, args) = init_script(&init);
    let script = args.last().unwrap();
    assert!(script.contains("mount -t bpf bpf /sys/fs/bpf"));
    assert!(script.contains("/proc/sys/net/ipv4/conf/all/accept_local"));
    let syntax = Command::new(&shell)
        .arg("-n")
        .arg("-c")
        .arg(script)
        .output();
    assert!(
        syntax.unwrap().status.success(),
        "the script does not parse"
    );

    if !is_root() || !have("unshare") || !Path::new("/sys/fs/bpf").is_dir() {
        eprintln!("SKIPPED: running the init script needs root, unshare and /sys/fs/bpf");
        return;
    }
    // A private mount and network namespace: a tmpfs hides the host's /sys/fs/bpf, so the
    // first run must mount bpffs and the second must find it; accept_local is the new network
    // namespace's own.
    let mut run_twice = vec![
        "mount -t tmpfs tmpfs /sys/fs/bpf".to_string(),
        "echo before $(stat -f -c %T /sys/fs/bpf) $(cat /proc/sys/net/ipv4/conf/all/accept_local)"
            .to_string(),
    ];
    for _ in 0..2 {
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        run_twice.push(format!("{shell} {}", quoted.join(" ")));
    }
    run_twice.push(
        "echo after $(stat -f -c %T /sys/fs/bpf) $(cat /proc/sys/net/ipv4/conf/all/accept_local)"
            .to_string(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "sh", "-ec"])
        .arg(run_twice.join("\n"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unshare failed") {
        eprintln!(
            "SKIPPED: cannot create namespaces here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "before tmpfs 0",
            "/sys/fs/bpf: mounted a bpf filesystem",
            "net.ipv4.conf.all.accept_local = 1",
            "/sys/fs/bpf is a bpf filesystem",
            "net.ipv4.conf.all.accept_local = 1",
            "after bpf_fs 1",
        ]
    );
}

fn http_get(probe: &Option<k8s_openapi::api::core::v1::Probe>) -> (String, IntOrString) {
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("an httpGet probe");
    (get.path.unwrap_or_default(), get.port)
}

/// The value following `flag` in the agent's arguments.
fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
        })
}

#[test]
fn probes_ask_the_agents_health_port() {
    let agent = agent_container(&pod_spec(&daemonset()));
    let args = agent.args.clone().unwrap_or_default();
    let bind: std::net::SocketAddr = arg_value(&args, "--healthz-bind-address")
        .expect("--healthz-bind-address")
        .parse()
        .unwrap();
    assert_eq!(bind.port(), 10256);
    // The kubelet probes the pod IP, which is the node's: the server must listen beyond
    // loopback.
    assert!(bind.ip().is_unspecified());
    assert_eq!(
        http_get(&agent.liveness_probe),
        ("/livez".to_string(), IntOrString::Int(10256))
    );
    assert_eq!(
        http_get(&agent.readiness_probe),
        ("/healthz".to_string(), IntOrString::Int(10256))
    );
    let metrics = arg_value(&args, "--metrics-bind-address").expect("--metrics-bind-address");
    let metrics: std::net::SocketAddr = metrics.parse().unwrap();
    assert_ne!(metrics.port(), bind.port());
}

#[test]
fn the_node_name_comes_from_the_downward_api() {
    let agent = agent_container(&pod_spec(&daemonset()));
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME in env");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    let args = agent.args.unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert_eq!(
        arg_value(&args, "--node-name").as_deref(),
        Some("$(NODE_NAME)")
    );
}

fn kustomization() -> serde_yaml::Value {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|v| v.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = kustomization();
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], "kube-system");
    let mut listed = strings(&k["resources"]);
    listed.sort();
    let mut files: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);

    // Every container's image is one the kustomization sets.
    let names: BTreeSet<String> = k["images"]
        .as_sequence()
        .expect("images")
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    let pod = pod_spec(&daemonset());
    for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
        let image = container.image.clone().unwrap_or_default();
        assert!(
            names.contains(&image),
            "{}: image {image:?} is not in the kustomization's images {names:?}",
            container.name
        );
    }
}

#[test]
fn the_agent_reaches_the_api_server_directly() {
    // A host-network pod reaches cluster IPs only through kube-proxy's rules; the agent gets
    // the API server's own address from the generated ConfigMap.
    let k = kustomization();
    let agent = agent_container(&pod_spec(&daemonset()));
    let referenced: Vec<String> = agent
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref().map(|c| c.name.clone()))
        .collect();
    assert!(!referenced.is_empty(), "the agent has no envFrom ConfigMap");
    for name in referenced {
        let generator = k["configMapGenerator"]
            .as_sequence()
            .expect("configMapGenerator")
            .iter()
            .find(|g| g["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no configMapGenerator named {name}"));
        let mut keys = Vec::new();
        for file in strings(&generator["envs"]) {
            let text = std::fs::read_to_string(deploy_dir().join(&file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (key, value) = line.split_once('=').expect("KEY=VALUE");
                if key == "KUBERNETES_SERVICE_PORT" {
                    value.parse::<u16>().expect("a port");
                }
                assert!(!value.is_empty(), "{file}: {key} is empty");
                keys.push(key.to_string());
            }
        }
        keys.sort();
        assert_eq!(keys, ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]);
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn every_flag_the_daemonset_passes_exists_in_the_agent() {
    let agent = agent_container(&pod_spec(&daemonset()));
    let args = agent.args.clone().unwrap_or_default();
    let subcommand = args.first().expect("a subcommand").clone();
    let help = Command::new(AGENT)
        .args([subcommand.as_str(), "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "{subcommand} --help failed");
    let help = String::from_utf8_lossy(&help.stdout);
    let known: BTreeSet<&str> = help.split_whitespace().collect();
    let missing: Vec<&str> = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap())
        .filter(|flag| !known.contains(flag))
        .collect();
    assert!(
        missing.is_empty(),
        "`dataplane-agent {subcommand}` has no {missing:?}"
    );

    // The values parse too: clap exits with 2 on a bad argument. The run then stops at once at
    // the bpffs check (the directory is not on a bpf filesystem), before touching anything.
    let not_bpffs = tempfile::tempdir().unwrap();
    let node_args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-a"))
        .collect();
    let mut child = Command::new(AGENT)
        .args(&node_args)
        .arg("--bpffs-dir")
        .arg(not_bpffs.path().join("dataplane"))
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("the agent exits");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_ne!(
        status.code(),
        Some(2),
        "the agent rejects the arguments: {stderr}"
    );
    assert!(stderr.contains("not on a bpf filesystem"), "{stderr}");
}

/// A network and mount namespace of its own (a `sleep` holds them), with a veth pair — the
/// pod side `veth-dp0`, the node side `eth-dp0` — and a bpffs at `bpffs`.
struct Sandbox {
    holder: Child,
    pid: u32,
    /// A cgroup v2 directory of the sandbox's own for the socket hooks (`--cgroup-root`).
    cgroup: PathBuf,
    bpffs: tempfile::TempDir,
    manifests: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Result<Self, String> {
        let mut holder = Command::new("unshare")
            .args([
                "--net",
                "--mount",
                "--propagation",
                "private",
                "sleep",
                "300",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = holder.id();
        let start = Instant::now();
        // unshare execs sleep once the namespaces exist and the mounts are private.
        let comm = || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        while comm().trim() != "sleep" {
            if let Some(status) = holder.try_wait().unwrap() {
                let mut err = String::new();
                holder
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return Err(format!("unshare: {status}: {err}"));
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = holder.kill();
                return Err("unshare did not create the namespaces".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let unified = std::path::Path::new("/sys/fs/cgroup");
        let mount = if unified.join("cgroup.controllers").exists() {
            unified.to_path_buf()
        } else {
            unified.join("unified")
        };
        let cgroup = mount.join(format!("dataplane-deploy-{pid}"));
        std::fs::create_dir_all(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
        let sandbox = Self {
            holder,
            pid,
            cgroup,
            bpffs: tempfile::tempdir().unwrap(),
            manifests: tempfile::tempdir().unwrap(),
        };
        std::fs::write(
            sandbox.manifests.path().join("objects.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
             status: {addresses: [{type: InternalIP, address: 192.0.2.11}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{name: http, port: 8080}]\n\
             endpoints: [{addresses: [10.0.0.1], nodeName: node-a}]\n",
        )
        .unwrap();
        let setup = format!(
            "ip link set lo up && ip link add veth-dp0 type veth peer name eth-dp0 && \
             ip addr add 192.0.2.11/24 dev eth-dp0 && ip link set veth-dp0 up && \
             ip link set eth-dp0 up && mount -t bpf bpf {}",
            sandbox.bpffs.path().display()
        );
        let out = sandbox.command("sh", &["-ec", &setup]).output().unwrap();
        if !out.status.success() {
            return Err(format!(
                "setting up the sandbox: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(sandbox)
    }

    /// `program args` inside the namespaces.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid.to_string())
            .args(["-n", "-m", "--", program])
            .args(args);
        cmd
    }

    /// The agent inside the namespaces with exactly `capabilities` (as root in a container:
    /// bounding set = permitted = effective), optionally behind a read-only /proc/sys as
    /// container runtimes mount it (in a mount namespace of its own).
    fn agent(&self, capabilities: &[String], read_only_proc_sys: bool, args: &[String]) -> Command {
        let bounding = std::iter::once("-all".to_string())
            .chain(
                capabilities
                    .iter()
                    .map(|c| format!("+{}", c.to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let mut script = String::new();
        if read_only_proc_sys {
            script.push_str(
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && ",
            );
        }
        script.push_str(r#"exec setpriv --bounding-set "$0" --inh-caps -all -- "$@""#);
        let unshare = ["--mount", "--propagation", "private", "sh", "-c"];
        let mut cmd = self.command("unshare", &unshare);
        cmd.args([script.as_str(), bounding.as_str(), AGENT])
            .args(args)
            .env("NO_COLOR", "1");
        cmd
    }

    fn run_args(&self, dir: &str) -> Vec<String> {
        [
            "run",
            "--manifests",
            &self.manifests.path().display().to_string(),
            "--node-name",
            "node-a",
            "--pod-interfaces",
            "veth-dp*",
            "--external-interfaces",
            "eth-dp*",
            "--bpffs-dir",
            &self.bpffs.path().join(dir).display().to_string(),
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--cgroup-root",
            &self.cgroup.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The namespaces, the veths, the bpffs and every pin in it go with their last process.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Runs the agent until its log shows `until` (or it exits, or 20 s pass), then stops it with
/// SIGTERM; returns whether it was still running and its log.
fn run_agent_until(mut cmd: Command, until: &[&str]) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let read = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let mut running = true;
    while start.elapsed() < Duration::from_secs(20) {
        if child.try_wait().unwrap().is_some() {
            running = false;
            break;
        }
        let text = read();
        if until.iter().all(|u| text.matches(u).count() > 0) {
            // The interface poll runs every 200 ms: give it a few rounds.
            std::thread::sleep(Duration::from_millis(700));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: the pid is our child's (nsenter and sh exec the agent).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_with_timeout(&mut child, Duration::from_secs(10)).is_none() {
        running = false;
    }
    (running, read())
}

fn sandbox_or_skip() -> Option<Sandbox> {
    if !is_root() {
        eprintln!("SKIPPED: running the agent with the DaemonSet's capabilities needs root");
        return None;
    }
    for tool in ["unshare", "nsenter", "setpriv", "ip"] {
        if !have(tool) {
            eprintln!("SKIPPED: needs {tool}");
            return None;
        }
    }
    match Sandbox::new() {
        Ok(sandbox) => Some(sandbox),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

fn daemonset_capabilities() -> Vec<String> {
    let agent = agent_container(&pod_spec(&daemonset()));
    agent
        .security_context
        .and_then(|s| s.capabilities)
        .and_then(|c| c.add)
        .unwrap_or_default()
}

#[test]
fn the_daemonsets_capabilities_suffice_and_each_is_needed() {
    let Some(sandbox) = sandbox_or_skip() else {
        return;
    };
    let capabilities = daemonset_capabilities();

    // Each one missing, the agent cannot load its datapath and exits.
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let dir = format!("without-{}", missing.to_lowercase());
        let (running, log) = run_agent_until(
            sandbox.agent(&fewer, false, &sandbox.run_args(&dir)),
            &["datapath programmed"],
        );
        assert!(
            !running && !log.contains("datapath loaded"),
            "the agent runs without CAP_{missing}: the DaemonSet need not add it\n{log}"
        );
    }

    // All of them: it loads, pins, attaches to both interfaces and programs the service...
    let attached = [
        "interface=veth-dp0",
        "interface=eth-dp0",
        "datapath programmed",
    ];
    let (running, log) = run_agent_until(
        sandbox.agent(&capabilities, false, &sandbox.run_args("dataplane")),
        &attached,
    );
    assert!(running, "the agent stopped\n{log}");
    for line in attached {
        assert!(log.contains(line), "no {line:?} in\n{log}");
    }
    assert!(!log.contains("cannot attach"), "{log}");
    // ...and a restarted agent takes over the pinned links (the rolling update's path).
    let (running, log) = run_agent_until(
        sandbox.agent(&capabilities, false, &sandbox.run_args("dataplane")),
        &["interface=veth-dp0", "interface=eth-dp0"],
    );
    assert!(running, "the restarted agent stopped\n{log}");
    // Twelve links: the pod veth's ingress, the external interface's ingress and egress, and
    // the nine socket hooks at the cgroup (four per family and the release hook).
    assert_eq!(
        log.matches("replaced program in pinned link").count(),
        3 + dataplane_common::SOCKET_PROGRAMS.len(),
        "{log}"
    );

    // `kubectl exec ... dataplane-agent services` runs with the same capabilities.
    let dir = sandbox.bpffs.path().join("dataplane").display().to_string();
    let out = sandbox
        .agent(
            &capabilities,
            true,
            &[
                "services".into(),
                "-o".into(),
                "json".into(),
                "--bpffs-dir".into(),
                dir,
            ],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("10.96.0.10:80"), "{stdout}");
}

#[test]
fn the_agent_runs_cleanly_behind_a_read_only_proc_sys() {
    let Some(sandbox) = sandbox_or_skip() else {
        return;
    };
    let capabilities = daemonset_capabilities();
    let (running, log) = run_agent_until(
        sandbox.agent(&capabilities, true, &sandbox.run_args("dataplane")),
        &[
            "interface=veth-dp0",
            "interface=eth-dp0",
            "datapath programmed",
        ],
    );
    assert!(running, "the agent stopped\n{log}");
    assert!(!log.contains("cannot attach"), "{log}");
    let accept_local = sandbox
        .command("cat", &["/proc/sys/net/ipv4/conf/eth-dp0/accept_local"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&accept_local.stdout).trim(), "1");
}
