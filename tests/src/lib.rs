//! A testbed of real network namespaces: a "node" namespace running the agent, "pod"
//! namespaces wired to it the way CNIs do (routed /32 veths with a link-local gateway and
//! proxy ARP, or veths enslaved to a bridge), and real servers in the pods. Used by the
//! end-to-end tests and by `cargo xtask demo`.
//!
//! Everything created here is removed on drop (namespaces, pins, processes), so a failing
//! test leaves nothing behind. Traffic only ever goes to addresses inside these namespaces.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

pub mod apiserver;
pub mod manifests;
pub mod multinode;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (with a visible message) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            println!(
                "SKIPPED: {} needs root (network namespaces, BPF)",
                module_path!()
            );
            return;
        }
    };
}

/// Short unique names: interface names are limited to 15 bytes.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 10000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn check(output: std::io::Result<Output>, what: &str) -> anyhow::Result<String> {
    let output = output.with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip ARGS` and fails with its message.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    check(
        Command::new("ip").args(args).output(),
        &format!("ip {}", args.join(" ")),
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside this namespace. Only the network namespace changes (not
    /// the mount namespace, as `ip netns exec` would), so bpffs pins stay visible.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        check(
            self.command("sysctl")
                .args(["-q", "-w", &format!("{key}={value}")])
                .output(),
            &format!("sysctl {key}"),
        )
        .map(|_| ())
    }

    /// Runs to completion; stdout on success.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        check(
            self.command(program).args(args).output(),
            &format!("{program} {}", args.join(" ")),
        )
    }

    pub fn spawn(&self, program: &str, args: &[&str]) -> anyhow::Result<Process> {
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Process { child })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process, killed on drop.
pub struct Process {
    pub child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How pods are wired to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wiring {
    /// Each pod has a /32 address and a default route via 169.254.1.1, answered by the
    /// node's veth with proxy ARP (Calico, Amazon VPC CNI).
    Routed,
    /// Pods share a subnet on a bridge in the node, which is their gateway (bridge CNI).
    Bridged,
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node-side veth (where the datapath attaches).
    pub host_if: String,
    pub netns: Netns,
    processes: Vec<Process>,
}

impl Pod {
    /// Starts the echo server (HTTP on `tcp_port`, UDP echo on `udp_port`); it answers with
    /// the pod's name and the peer address it saw.
    pub fn serve(&mut self, tcp_port: u16, udp_port: u16) -> anyhow::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/echo_server.py");
        let process = self.netns.spawn(
            "python3",
            &[
                script.to_str().unwrap(),
                &self.name,
                &tcp_port.to_string(),
                &udp_port.to_string(),
            ],
        )?;
        self.processes.push(process);
        // Ready when the TCP port accepts.
        wait_until(Duration::from_secs(10), || {
            self.netns
                .run("python3", &["-c", &format!(
                    "import socket; socket.create_connection(('{}', {tcp_port}), 0.2).close()",
                    self.ip
                )])
                .is_ok()
        })
        .with_context(|| format!("echo server in {} did not start", self.name))
    }
}

/// A node namespace with pods wired to it.
pub struct Node {
    pub netns: Netns,
    pub wiring: Wiring,
    /// The pod subnet's first three octets, e.g. [10, 244, 1].
    subnet: [u8; 3],
    pub pods: Vec<Pod>,
    /// Interface name prefix of the node-side veths; the agent attaches to `<prefix>*`.
    pub veth_prefix: String,
}

pub const ROUTED_GATEWAY: &str = "169.254.1.1";

impl Node {
    pub fn new(wiring: Wiring, subnet: [u8; 3]) -> anyhow::Result<Self> {
        let netns = Netns::new("dpn")?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        let veth_prefix = unique("v");
        if wiring == Wiring::Routed {
            // The pods' gateway: a node address, so the node answers ARP for it on every veth.
            netns.ip(&["addr", "add", &format!("{ROUTED_GATEWAY}/32"), "dev", "lo"])?;
        }
        if wiring == Wiring::Bridged {
            let gw = format!("{}.{}.{}.1/24", subnet[0], subnet[1], subnet[2]);
            netns.ip(&["link", "add", "br0", "type", "bridge"])?;
            netns.ip(&["addr", "add", &gw, "dev", "br0"])?;
            netns.ip(&["link", "set", "br0", "up"])?;
        }
        Ok(Self {
            netns,
            wiring,
            subnet,
            pods: vec![],
            veth_prefix,
        })
    }

    pub fn pod_glob(&self) -> String {
        format!("{}*", self.veth_prefix)
    }

    /// Adds pod number `index` (its address ends in `index + 10`).
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<usize> {
        let index = self.pods.len();
        let [a, b, c] = self.subnet;
        let ip = Ipv4Addr::new(a, b, c, index as u8 + 10);
        let netns = Netns::new("dpp")?;
        let host_if = format!("{}p{index}", self.veth_prefix);
        self.netns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        match self.wiring {
            Wiring::Routed => {
                netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
                netns.ip(&["link", "set", "eth0", "up"])?;
                netns.ip(&[
                    "route",
                    "add",
                    ROUTED_GATEWAY,
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ])?;
                netns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    ROUTED_GATEWAY,
                    "dev",
                    "eth0",
                ])?;
                self.netns
                    .sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
                self.netns.ip(&["link", "set", &host_if, "up"])?;
                self.netns
                    .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
            }
            Wiring::Bridged => {
                netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
                netns.ip(&["link", "set", "eth0", "up"])?;
                netns.ip(&["route", "add", "default", "via", &format!("{a}.{b}.{c}.1")])?;
                self.netns.ip(&["link", "set", &host_if, "master", "br0"])?;
                self.netns.ip(&["link", "set", &host_if, "up"])?;
            }
        }
        self.pods.push(Pod {
            name: name.to_string(),
            ip,
            host_if,
            netns,
            processes: vec![],
        });
        Ok(index)
    }
}

/// The agent running in a node namespace, with its own manifest directory and bpffs
/// directory. Dropping it stops the agent and removes everything it pinned.
pub struct Agent {
    /// The manifest directory (in cluster mode: unused, and empty).
    pub manifests: PathBuf,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    process: Option<Process>,
    binary: PathBuf,
    netns_path: PathBuf,
    node_name: String,
    pod_glob: String,
    /// Interfaces the agent must have attached to before it counts as started.
    pod_interfaces: Vec<String>,
    options: AgentOptions,
    /// This agent's own scratch directory (log, and manifests unless shared).
    work: PathBuf,
}

/// How to start an agent beyond its node.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// A manifest directory shared with other agents (default: one of its own).
    pub shared_manifests: Option<PathBuf>,
    /// Cluster mode: talk to the API server of this kubeconfig instead of reading manifests.
    pub kubeconfig: Option<PathBuf>,
    /// `--external-interfaces`.
    pub external_interfaces: Option<String>,
    /// More `run` arguments.
    pub extra_args: Vec<String>,
}

pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("DATAPLANE_AGENT_BIN") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dataplane-agent")
}

impl Agent {
    /// Starts the agent for `node`, attaching to its pod veths.
    pub fn start(node: &Node, node_name: &str) -> anyhow::Result<Self> {
        Self::start_with(node, node_name, AgentOptions::default())
    }

    pub fn start_with(node: &Node, node_name: &str, options: AgentOptions) -> anyhow::Result<Self> {
        let work = std::env::temp_dir().join(unique("dataplane-e2e-"));
        let manifests = options
            .shared_manifests
            .clone()
            .unwrap_or_else(|| work.join("manifests"));
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&manifests)?;
        let mut agent = Self {
            log: work.join("agent.log"),
            manifests,
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(unique("dpt")),
            process: None,
            binary: agent_binary(),
            netns_path: node.netns.path(),
            node_name: node_name.to_string(),
            pod_glob: node.pod_glob(),
            pod_interfaces: node.pods.iter().map(|p| p.host_if.clone()).collect(),
            options,
            work,
        };
        agent.restart()?;
        Ok(agent)
    }

    /// Stops the agent (if running) and starts it again with the same directories.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        anyhow::ensure!(
            self.binary.exists(),
            "agent binary {} not built",
            self.binary.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(&self.binary)
            .arg("run");
        match &self.options.kubeconfig {
            Some(kubeconfig) => command.arg("--kubeconfig").arg(kubeconfig),
            None => command.arg("--manifests").arg(&self.manifests),
        };
        if let Some(external) = &self.options.external_interfaces {
            command.args(["--external-interfaces", external]);
        }
        let child = command
            .args(&self.options.extra_args)
            .args([
                "--node-name",
                &self.node_name,
                "--pod-interfaces",
                &self.pod_glob,
                "--bpffs-dir",
            ])
            .arg(&self.bpffs_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.process = Some(Process { child });
        // Ready once the maps are pinned and every pod interface has its link.
        let bpffs = self.bpffs_dir.clone();
        let links: Vec<PathBuf> = self
            .pod_interfaces
            .iter()
            .map(|i| bpffs.join("links").join(i))
            .collect();
        wait_until(Duration::from_secs(10), || {
            bpffs.join(dataplane_common::map_names::SERVICES).exists()
                && links.iter().all(|l| l.exists())
        })
        .map_err(|e| e.context(format!("agent did not start; log:\n{}", self.log_text())))
    }

    /// Stops the agent the way a DaemonSet update does (SIGTERM); the datapath stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if process.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes (or replaces) one manifest file. Written to a hidden file and renamed, as
    /// configuration tools do, so the agent never reads half a file.
    pub fn write_manifest(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.manifests.join(file))?;
        Ok(())
    }

    /// Runs the CLI (`services`, `flows`, ...) against this agent's pins.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        check(
            Command::new(&self.binary)
                .args(args)
                .arg("--bpffs-dir")
                .arg(&self.bpffs_dir)
                .output(),
            &format!("dataplane-agent {}", args.join(" ")),
        )
    }

    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.cli(&full)?)?)
    }

    /// Waits until the pinned service map shows `frontend` with `backends` backends.
    pub fn wait_for_backends(&self, frontend: &str, backends: usize) -> anyhow::Result<()> {
        wait_until(Duration::from_secs(5), || {
            self.cli_json(&["services"]).ok().is_some_and(|v| {
                v.as_array().into_iter().flatten().any(|s| {
                    s["frontend"] == frontend
                        && s["backends"].as_array().map(Vec::len) == Some(backends)
                })
            })
        })
        .map_err(|e| {
            e.context(format!(
                "{frontend} never had {backends} backends; log:\n{}",
                self.log_text()
            ))
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new(&self.binary)
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request per connection from `client` to `url`: the echo server's answer lines
/// ("<pod> <peer-ip>:<peer-port>"), or the error for each failed request.
pub fn http_requests(client: &Netns, url: &str, count: usize) -> Vec<Result<String, String>> {
    // One curl process, many URLs: the echo server speaks HTTP/1.0 and closes each
    // connection, so every request is a new connection (and a new backend choice).
    let mut args = vec!["-s", "--max-time", "3", "-w", "\\n"];
    let urls = vec![url; count];
    args.extend(urls.iter().copied());
    match client.command("curl").args(&args).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut answers: Vec<Result<String, String>> = text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| Ok(l.to_string()))
                .collect();
            while answers.len() < count {
                answers.push(Err(format!("curl exit {}", out.status)));
            }
            answers
        }
        Err(e) => vec![Err(e.to_string()); count],
    }
}

/// Sends one UDP datagram from `client` and returns the answer, using a fixed source port
/// when given (to stay on one conntrack entry).
pub fn udp_request(
    client: &Netns,
    target: &str,
    source_port: Option<u16>,
    payload: &str,
) -> anyhow::Result<String> {
    let bind = source_port
        .map(|p| format!(",bind=:{p},reuseaddr"))
        .unwrap_or_default();
    let out = client
        .command("sh")
        .args([
            "-c",
            &format!("printf '%s' '{payload}' | socat -T 2 - UDP:{target}{bind}"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || text.is_empty() {
        bail!(
            "UDP request to {target} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

/// What a testbed left running on purpose (`cargo xtask demo --keep`), and how to remove it.
#[derive(Debug, Default)]
pub struct Kept {
    pub namespaces: Vec<String>,
    pub pids: Vec<u32>,
    /// Agent bpffs directories, removed with `dataplane-agent cleanup`.
    pub bpffs_dirs: Vec<PathBuf>,
    pub work_dirs: Vec<PathBuf>,
}

impl Kept {
    pub fn merge(mut self, other: Kept) -> Self {
        self.namespaces.extend(other.namespaces);
        self.pids.extend(other.pids);
        self.bpffs_dirs.extend(other.bpffs_dirs);
        self.work_dirs.extend(other.work_dirs);
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "namespaces": self.namespaces,
            "pids": self.pids,
            "bpffs_dirs": self.bpffs_dirs,
            "work_dirs": self.work_dirs,
        })
    }

    pub fn from_json(value: &serde_json::Value) -> Self {
        let strings = |key: &str| -> Vec<String> {
            value[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        };
        Self {
            namespaces: strings("namespaces"),
            pids: value["pids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_u64())
                .map(|p| p as u32)
                .collect(),
            bpffs_dirs: strings("bpffs_dirs")
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            work_dirs: strings("work_dirs")
                .into_iter()
                .map(PathBuf::from)
                .collect(),
        }
    }

    /// Stops the processes and removes pins, namespaces and directories.
    pub fn teardown(&self) {
        for pid in &self.pids {
            // SAFETY: signalling a process this testbed started.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(300));
        for dir in &self.bpffs_dirs {
            let _ = Command::new(agent_binary())
                .arg("cleanup")
                .arg("--bpffs-dir")
                .arg(dir)
                .output();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for dir in &self.work_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Node {
    /// Leaves the node, its pods and their servers running; returns what to remove later.
    pub fn keep(self) -> Kept {
        let node = std::mem::ManuallyDrop::new(self);
        let mut kept = Kept {
            namespaces: vec![node.netns.name.clone()],
            ..Default::default()
        };
        for pod in &node.pods {
            kept.namespaces.push(pod.netns.name.clone());
            kept.pids.extend(pod.processes.iter().map(|p| p.child.id()));
        }
        kept
    }
}

impl Agent {
    /// Leaves the agent running; returns what to remove later.
    pub fn keep(self) -> Kept {
        let agent = std::mem::ManuallyDrop::new(self);
        Kept {
            pids: agent.process.iter().map(|p| p.child.id()).collect(),
            bpffs_dirs: vec![agent.bpffs_dir.clone()],
            work_dirs: vec![agent.work.clone()],
            ..Default::default()
        }
    }
}
