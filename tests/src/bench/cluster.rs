//! Sections 2-5, in network namespaces: one "node" per mode, each with a client pod and two
//! server pods wired like the end-to-end tests (routed /32 veths):
//! - ours: the agent (release build) with a manifest directory;
//! - iptables-legacy, iptables-nft: kube-proxy's iptables rule structure, restored with each;
//! - nftables: kube-proxy's nftables rule structure, loaded with `nft -f`;
//! - direct: no agent, no rules; the client connects to a server pod's own address.
//!
//! All modes program the same service set (`services::service_set`). Connection latency is
//! measured round-robin across the modes, so slow drift affects them alike.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use aya::maps::{HashMap, MapData};
use dataplane_agent::{
    datapath::{
        BpffsLayout,
        translate::{self, DecodedEntry, EntryKey},
    },
    plan::{FrontendAddr, Protocol},
};
use dataplane_common::{
    Backend, CtEntry, CtEntry6, CtKey, CtKey6, SCOPE_DEFAULT, ServiceKey, ServiceValue, map_names,
};
use testbed::{Netns, Node, Process, Wiring};

use super::{
    Settings, cleanup,
    maps::{IdMap, open},
    report::{Measurement, Report},
    scale_label as label,
    services::{
        self, IPERF_PORT, IPERF_VIP, MEASURED_VIP, MEASURED_VIP6, SERVICE_PORT, Service,
        TARGET_PORT,
    },
    stats::{median, median_paired_ratio, percentile},
};

const NODE_NAME: &str = "bench-node";
const SUBNET: [u8; 3] = [10, 244, 1];

/// The bench binary the namespaces run (`serve`, `connect-client`): the private copy made at
/// start (see `mod.rs`), so that a rebuild of target/release during the run changes nothing.
fn self_exe() -> PathBuf {
    super::private_binary("dataplane-bench")
}

/// Scratch space on tmpfs: manifests and rule files never wait for the disk.
fn scratch_dir(prefix: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(testbed::unique(prefix))
}

/// A node namespace with a client pod and a server pod running the compiled server (and
/// iperf3). The server pod has a second address: the measured service's two endpoints are
/// the server's two addresses, so a ClusterIP connection reaches the same process (and the
/// same namespace) as a direct one, whichever endpoint it gets.
struct BenchNode {
    label: &'static str,
    /// Dropped first: servers stop before their namespaces go.
    processes: Vec<Process>,
    node: Node,
}

/// Client and servers run pinned to these CPUs in every mode: where the two ends of a
/// connection run (same CPU or not) changes its latency by a third on this machine, and the
/// scheduler's choice persists for seconds, so unpinned runs of one mode would differ more
/// than the modes do. The packets' softirq work follows the sending side's CPU.
const CLIENT_CPU: usize = 0;

fn server_cpu() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 { 1 } else { 0 }
}

/// The server pod's second address (its first is 10.244.1.11).
const SERVER_SECOND_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 21);

impl BenchNode {
    fn new(label: &'static str, iperf: bool) -> anyhow::Result<Self> {
        // Bare: the kube-proxy modes restore complete nat and filter tables of their own, and
        // every mode must measure on the same node.
        let mut node = Node::bare(Wiring::Routed, SUBNET)?;
        cleanup::namespace(&node.netns.name);
        for name in ["client", "server"] {
            let index = node.add_pod(name)?;
            cleanup::namespace(&node.pods[index].netns.name);
        }
        let server = &node.pods[1];
        server.netns.ip(&[
            "addr",
            "add",
            &format!("{SERVER_SECOND_IP}/32"),
            "dev",
            "eth0",
        ])?;
        node.netns.ip(&[
            "route",
            "add",
            &format!("{SERVER_SECOND_IP}/32"),
            "dev",
            &server.host_if,
        ])?;
        let mut this = Self {
            label,
            processes: vec![],
            node,
        };
        let exe = self_exe();
        let exe = exe.to_str().context("bench path")?;
        let port = TARGET_PORT.to_string();
        let server_cpu = server_cpu().to_string();
        let process = this.node.pods[1]
            .netns
            .spawn("taskset", &["-c", &server_cpu, exe, "serve", &port])?;
        cleanup::pid(process.child.id());
        this.processes.push(process);
        if iperf {
            let port = IPERF_PORT.to_string();
            let process = this.node.pods[1]
                .netns
                .spawn("taskset", &["-c", &server_cpu, "iperf3", "-s", "-p", &port])?;
            cleanup::pid(process.child.id());
            this.processes.push(process);
        }
        for server in this.servers() {
            this.wait_connect(SocketAddrV4::new(server, TARGET_PORT), 5000)?;
        }
        Ok(this)
    }

    fn client(&self) -> &Netns {
        &self.node.pods[0].netns
    }

    /// The server pod's addresses: the measured service's endpoints.
    fn servers(&self) -> Vec<Ipv4Addr> {
        vec![self.server(), SERVER_SECOND_IP]
    }

    /// The server pod's IPv6 address: the measured service's IPv6 endpoint.
    fn server6(&self) -> Ipv6Addr {
        self.node.pods[1].ip6.expect("routed pods are dual-stack")
    }

    /// The server pod's first address: direct connections and iperf3 go there.
    fn server(&self) -> Ipv4Addr {
        self.node.pods[1].ip
    }

    fn wait_connect(&self, addr: impl Into<SocketAddr>, timeout_ms: u64) -> anyhow::Result<()> {
        let addr: SocketAddr = addr.into();
        let out = self
            .client()
            .command(self_exe().to_str().unwrap())
            .args(["wait-connect", &addr.to_string(), &timeout_ms.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "{}: {addr} does not accept connections: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `count` sequential connects from the client pod; their durations in microseconds.
    fn connects(&self, addr: SocketAddr, count: usize) -> anyhow::Result<Vec<f64>> {
        let out = self
            .client()
            .command("taskset")
            .args(["-c", &CLIENT_CPU.to_string()])
            .arg(self_exe())
            .args(["connect-client", &addr.to_string(), &count.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "{}: connect-client: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let values: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .map(|ns| ns / 1000.0)
            .collect();
        ensure!(values.len() == count, "{}: short client output", self.label);
        Ok(values)
    }

    /// One iperf3 TCP test from the client pod; received Gbit/s.
    fn iperf(&self, addr: Ipv4Addr, seconds: u32) -> anyhow::Result<f64> {
        let mut last_error = String::new();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(200));
            let out = self
                .client()
                .command("taskset")
                .args(["-c", &CLIENT_CPU.to_string(), "iperf3"])
                .args([
                    "-c",
                    &addr.to_string(),
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-t",
                    &seconds.to_string(),
                    "-J",
                    "--connect-timeout",
                    "3000",
                ])
                .output()?;
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps / 1e9);
            }
            last_error = json["error"].as_str().unwrap_or("no result").to_string();
        }
        bail!("{}: iperf3 to {addr}: {last_error}", self.label)
    }
}

/// The agent in the "ours" node: started with an empty manifest directory.
struct BenchAgent {
    process: Option<Process>,
    /// How it is started (again, with another `--socket-lb`).
    command: AgentCommand,
    pid: u32,
    binary: PathBuf,
    layout: BpffsLayout,
    work: PathBuf,
    manifests: PathBuf,
    log: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: IdMap<Backend>,
    /// Bulk directories written so far (names are never reused).
    generation: usize,
}

/// `dataplane-agent run` in the "ours" node.
struct AgentCommand {
    netns: PathBuf,
    binary: PathBuf,
    manifests: PathBuf,
    pod_glob: String,
    bpffs: PathBuf,
    /// The node's cgroup: `--cgroup-root`, so the socket hooks see only the node's processes.
    cgroup: Option<PathBuf>,
    log: PathBuf,
    /// More `run` arguments.
    extra: Vec<String>,
}

impl AgentCommand {
    /// Starts the agent with `--socket-lb socket_lb`, logging to a fresh log.
    fn spawn(&self, socket_lb: &str) -> anyhow::Result<std::process::Child> {
        let log_file = std::fs::File::create(&self.log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(&self.binary)
            .args(["run", "--manifests"])
            .arg(&self.manifests)
            .args(["--node-name", NODE_NAME, "--pod-interfaces"])
            .arg(&self.pod_glob)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .args(["--socket-lb", socket_lb])
            .args(&self.extra);
        if let Some(cgroup) = &self.cgroup {
            command.arg("--cgroup-root").arg(cgroup);
        }
        command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting the agent")
    }
}

impl BenchAgent {
    /// Restarts the agent with `--socket-lb socket_lb` (the maps and links stay pinned, as in
    /// an upgrade); returns once its hooks are attached and it has synced.
    fn switch_socket_lb(&mut self, socket_lb: &str) -> anyhow::Result<()> {
        self.stop();
        let child = self.command.spawn(socket_lb)?;
        self.pid = child.id();
        cleanup::pid(self.pid);
        self.process = Some(Process { child });
        let ready = testbed::wait_until(Duration::from_secs(30), || {
            let log = self.log_text();
            log.matches("socket hook").count() >= dataplane_common::SOCKET_PROGRAMS.len()
                && log.contains("took over connections")
        });
        if let Err(e) = ready {
            bail!("{e}: the agent did not restart; log:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Stops the agent (SIGTERM); the datapath stays pinned.
    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && process.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(process);
            cleanup::forget_pid(self.pid);
        }
    }

    fn start(node: &BenchNode, binary: &Path) -> anyhow::Result<Self> {
        Self::start_with(node, binary, &[])
    }

    /// [`Self::start`] with more `run` arguments.
    fn start_with(node: &BenchNode, binary: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let work = scratch_dir("dataplane-bench-");
        cleanup::dir(work.clone());
        let manifests = work.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let bpffs = PathBuf::from("/sys/fs/bpf").join(testbed::unique("dpbench-agent"));
        cleanup::agent_dir(binary.to_path_buf(), bpffs.clone());
        let log = work.join("agent.log");
        let command = AgentCommand {
            netns: node.node.netns.path(),
            binary: binary.to_path_buf(),
            manifests: manifests.clone(),
            pod_glob: node.node.pod_glob(),
            bpffs: bpffs.clone(),
            cgroup: node.node.netns.cgroup.as_ref().map(|c| c.path.clone()),
            log: log.clone(),
            extra: extra.to_vec(),
        };
        let child = command.spawn("host")?;
        let pid = child.id();
        cleanup::pid(pid);
        let layout = BpffsLayout::new(&bpffs);
        let process = Process { child };
        let links: Vec<PathBuf> = node
            .node
            .pods
            .iter()
            .map(|p| layout.link(&p.host_if))
            .collect();
        let ready = testbed::wait_until(Duration::from_secs(15), || {
            layout.map(map_names::SERVICES).exists() && links.iter().all(|l| l.exists())
        });
        if let Err(e) = ready {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{e}: the agent did not start; log:\n{text}");
        }
        Ok(Self {
            services: open(&layout, map_names::SERVICES)?,
            backends: IdMap::open(&layout, map_names::BACKENDS)?,
            process: Some(process),
            command,
            pid,
            binary: binary.to_path_buf(),
            layout,
            work,
            manifests,
            log,
            generation: 0,
        })
    }

    /// The agent's log (plain text: it colours only a terminal).
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn bulk_dir(&self) -> PathBuf {
        self.manifests.join("services")
    }

    fn slot0(&self, s: &Service) -> Option<DecodedEntry> {
        let value = self.services.get(&key(s.vip, s.port, 0), 0).ok()?;
        Some(translate::decode_slot0(&value))
    }

    /// Writes `set` into a hidden directory, then renames it into the watched directory (all
    /// services appear at once); returns the time until the maps hold every frontend with
    /// all its backends.
    fn appear(&mut self, set: &[Service]) -> anyhow::Result<Duration> {
        self.generation += 1;
        // Staged next to (not inside) the watched directory: writing 10k files there would
        // make the agent sync over and over before the measured moment.
        let stage = self.work.join(format!("stage{}", self.generation));
        std::fs::create_dir_all(&stage)?;
        for s in set {
            std::fs::write(
                stage.join(format!("{}.json", s.name)),
                services::manifest(s),
            )?;
        }
        let started = Instant::now();
        std::fs::rename(&stage, self.bulk_dir())?;
        self.wait_in_maps(set, started)
    }

    /// As [`Self::appear`], the whole set in one `v1 List` file.
    fn appear_as_list(&mut self, set: &[Service]) -> anyhow::Result<Duration> {
        self.generation += 1;
        let stage = self.work.join(format!("stage{}", self.generation));
        std::fs::create_dir_all(&stage)?;
        std::fs::write(stage.join("all.json"), services::list_manifest(set))?;
        let started = Instant::now();
        std::fs::rename(&stage, self.bulk_dir())?;
        self.wait_in_maps(set, started)
    }

    /// Waits from `started` until the maps hold every service of `set` with all its
    /// backends, then verifies them in full; returns the time until then.
    fn wait_in_maps(&self, set: &[Service], started: Instant) -> anyhow::Result<Duration> {
        // Slot 0 is written after a frontend's slots and backends: once every frontend's
        // slot 0 counts all its backends, the maps hold everything. The check walks the
        // frontends in order and never re-checks one it has seen (they only appear).
        let mut next = 0;
        while next < set.len() {
            let s = &set[next];
            if self
                .slot0(s)
                .is_some_and(|v| v.count as usize == s.endpoints.len())
            {
                next += 1;
                continue;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!(
                    "after 300 s the maps hold {next} of {} services; agent log tail:\n{}",
                    set.len(),
                    tail(&self.log_text(), 20)
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        self.verify(set)?;
        Ok(elapsed)
    }

    /// Moves the bulk directory out of the watched tree; returns when no frontend is left.
    fn disappear(&mut self, set: &[Service]) -> anyhow::Result<Duration> {
        self.generation += 1;
        let gone = self.work.join(format!("gone{}", self.generation));
        let started = Instant::now();
        std::fs::rename(self.bulk_dir(), &gone)?;
        let mut next = 0;
        while next < set.len() {
            if self.slot0(&set[next]).is_none() {
                next += 1;
                continue;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("services still programmed 300 s after their removal");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        std::fs::remove_dir_all(&gone)?;
        Ok(elapsed)
    }

    /// Every service's slots name backends with its endpoints' addresses.
    fn verify(&self, set: &[Service]) -> anyhow::Result<()> {
        for s in set {
            let count = self.slot0(s).map(|v| v.count).unwrap_or(0) as usize;
            let wanted: HashSet<std::net::IpAddr> =
                s.endpoints.iter().map(|ip| (*ip).into()).collect();
            let mut found: HashSet<std::net::IpAddr> = HashSet::new();
            for slot in 1..=count {
                let id = self
                    .services
                    .get(&key(s.vip, s.port, slot as u16), 0)
                    .with_context(|| format!("{}: slot {slot} missing", s.name))?
                    .backend_id;
                let backend = self
                    .backends
                    .get(id)
                    .and_then(|b| translate::decode_backend(&b))
                    .with_context(|| format!("{}: backend {id} missing", s.name))?;
                ensure!(
                    backend.addr.port() == s.target_port,
                    "{}: wrong backend port",
                    s.name
                );
                found.insert(backend.addr.ip());
            }
            ensure!(
                found == wanted,
                "{}: backends {found:?}, expected {wanted:?}",
                s.name
            );
        }
        Ok(())
    }

    /// Does the frontend of `s` have a backend at `addr`?
    fn has_backend(&self, s: &Service, addr: Ipv4Addr) -> bool {
        let Some(slot0) = self.slot0(s) else {
            return false;
        };
        (1..=slot0.count).any(|slot| {
            self.services
                .get(&key(s.vip, s.port, slot), 0)
                .ok()
                .and_then(|v| self.backends.get(v.backend_id))
                .and_then(|b| translate::decode_backend(&b))
                .is_some_and(|b| b.addr.ip() == addr)
        })
    }

    /// Replaces one endpoint of one service at a time (a different service each time) and
    /// measures until the maps hold the new backend. Returns milliseconds.
    fn endpoint_changes(&self, set: &mut [Service], count: usize) -> anyhow::Result<Vec<f64>> {
        let fillers = set.len().saturating_sub(2).max(1);
        let mut latencies = Vec::new();
        for c in 0..count {
            let i = (c * 7919 + 13) % fillers;
            let e = c % set[i].endpoints.len().max(1);
            let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + c as u32);
            set[i].endpoints[e] = new;
            let file = self.bulk_dir().join(format!("{}.json", set[i].name));
            let tmp = self.bulk_dir().join(format!(".{}.json.tmp", set[i].name));
            std::fs::write(&tmp, services::manifest(&set[i]))?;
            let started = Instant::now();
            std::fs::rename(&tmp, &file)?;
            while !self.has_backend(&set[i], new) {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "change {c} ({}) not in the maps after 30 s; agent log tail:\n{}",
                        set[i].name,
                        tail(&self.log_text(), 20)
                    );
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
            // Let the agent settle, so that changes are not batched together.
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(latencies)
    }

    /// Empties conntrack, so that the next connections are all new flows.
    fn clear_conntrack(&self) -> anyhow::Result<usize> {
        fn clear<K: aya::Pod, V: aya::Pod>(
            layout: &BpffsLayout,
            table: &str,
        ) -> anyhow::Result<usize> {
            let mut conntrack: HashMap<MapData, K, V> = open(layout, table)?;
            let keys: Vec<K> = conntrack.keys().filter_map(Result::ok).collect();
            for k in &keys {
                let _ = conntrack.remove(k);
            }
            Ok(keys.len())
        }
        let mut removed = 0;
        for table in [
            map_names::CONNTRACK_TCP,
            map_names::CONNTRACK_TCP_OVERFLOW,
            map_names::CONNTRACK_ANY,
        ] {
            removed += clear::<CtKey, CtEntry>(&self.layout, table)?;
        }
        for table in [
            map_names::CONNTRACK6_TCP,
            map_names::CONNTRACK6_TCP_OVERFLOW,
            map_names::CONNTRACK6_ANY,
        ] {
            removed += clear::<CtKey6, CtEntry6>(&self.layout, table)?;
        }
        Ok(removed)
    }

    fn status_kb(&self, field: &str) -> Option<f64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// CPU time (user + system) the agent has used so far.
    fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_millis(ticks * 1000 / hz))
    }

    /// Each map's memory as the kernel accounts it (`memlock` in the map's fdinfo).
    fn map_memory(&self) -> Vec<(&'static str, u64)> {
        map_names::ALL
            .iter()
            .filter_map(|name| {
                use std::os::fd::{AsFd, AsRawFd};
                let map = MapData::from_pin(self.layout.map(name)).ok()?;
                let fd = map.fd().as_fd().as_raw_fd();
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let bytes = info
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))?
                    .trim()
                    .parse()
                    .ok()?;
                Some((*name, bytes))
            })
            .collect()
    }

    /// The agent's own log of its syncs: the last `elapsed_us` it reported.
    fn last_sync_us(&self) -> Option<u64> {
        self.log_text()
            .lines()
            .rev()
            .filter(|l| l.contains("datapath programmed"))
            .find_map(|l| {
                let at = l.find("elapsed_us=")? + "elapsed_us=".len();
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new(&self.binary)
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(self.layout.dir())
            .output();
        let _ = std::fs::remove_dir_all(self.layout.dir());
        if let Some(keep) = std::env::var_os("DATAPLANE_BENCH_AGENT_LOG") {
            let _ = std::fs::copy(&self.log, keep);
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn key(vip: Ipv4Addr, port: u16, slot: u16) -> ServiceKey {
    let entry = EntryKey {
        frontend: FrontendAddr {
            addr: SocketAddrV4::new(vip, port).into(),
            protocol: Protocol::Tcp,
        },
        scope: SCOPE_DEFAULT,
    };
    translate::service_key(&entry, slot)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KubeProxy {
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl KubeProxy {
    fn label(self) -> &'static str {
        match self {
            KubeProxy::IptablesLegacy => "iptables-legacy",
            KubeProxy::IptablesNft => "iptables-nft",
            KubeProxy::Nftables => "nftables",
        }
    }

    fn loader(self) -> &'static str {
        match self {
            KubeProxy::IptablesLegacy => "iptables-legacy-restore",
            KubeProxy::IptablesNft => "iptables-nft-restore",
            KubeProxy::Nftables => "nft -f",
        }
    }

    fn run(self, node: &BenchNode, program: &str, args: &[&str]) -> anyhow::Result<()> {
        node.node.netns.run(program, args).map(|_| ())
    }

    /// Removes every rule and chain (untimed).
    fn reset(self, node: &BenchNode) -> anyhow::Result<()> {
        match self {
            KubeProxy::IptablesLegacy => {
                for table in ["nat", "filter"] {
                    self.run(node, "iptables-legacy", &["-t", table, "-F"])?;
                    self.run(node, "iptables-legacy", &["-t", table, "-X"])?;
                }
                Ok(())
            }
            KubeProxy::IptablesNft | KubeProxy::Nftables => {
                self.run(node, "nft", &["flush", "ruleset"])
            }
        }
    }

    /// Loads the rule set for `set` from scratch; returns the time the loader took (what
    /// kube-proxy's sync spends in iptables-restore / nft). `noflush`: iptables modes as
    /// kube-proxy runs them (jumps created first, then `-restore --noflush --counters`);
    /// else one complete restore of the tables.
    fn program(
        self,
        node: &BenchNode,
        set: &[Service],
        dir: &Path,
        noflush: bool,
    ) -> anyhow::Result<Duration> {
        self.reset(node)?;
        let file = dir.join(format!("{}-{}-{noflush}.rules", self.label(), set.len()));
        match self {
            KubeProxy::IptablesLegacy | KubeProxy::IptablesNft => {
                let iptables = match self {
                    KubeProxy::IptablesLegacy => "iptables-legacy",
                    _ => "iptables-nft",
                };
                if noflush {
                    for args in services::iptables_setup() {
                        self.run(node, iptables, &args)?;
                    }
                }
                if !file.exists() {
                    std::fs::write(&file, services::iptables_restore(set, !noflush))?;
                }
                let restore = format!("{iptables}-restore");
                let mut args = vec![];
                if noflush {
                    args.extend(["--noflush", "--counters"]);
                }
                args.push(file.to_str().unwrap());
                let started = Instant::now();
                self.run(node, &restore, &args)?;
                Ok(started.elapsed())
            }
            KubeProxy::Nftables => {
                if !file.exists() {
                    std::fs::write(&file, services::nft_script(set))?;
                }
                let started = Instant::now();
                self.run(node, "nft", &["-f", file.to_str().unwrap()])?;
                Ok(started.elapsed())
            }
        }
    }
}

/// A work directory for rule files, removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What connection latency is measured on: a node and the address its client connects to.
struct Target<'a> {
    label: String,
    node: &'a BenchNode,
    addr: SocketAddr,
    /// The agent whose conntrack is emptied before each run (targets in its node).
    agent: Option<&'a BenchAgent>,
}

impl<'a> Target<'a> {
    /// The measured service in the agent's node.
    fn service(label: &str, node: &'a BenchNode, agent: &'a BenchAgent) -> Self {
        Self {
            label: label.into(),
            node,
            addr: SocketAddrV4::new(MEASURED_VIP, SERVICE_PORT).into(),
            agent: Some(agent),
        }
    }

    /// The server pod's own address in the node without agent or rules.
    fn direct(node: &'a BenchNode) -> Self {
        Self {
            label: "direct".into(),
            node,
            addr: SocketAddrV4::new(node.server(), TARGET_PORT).into(),
            agent: None,
        }
    }
}

#[derive(Default, Clone)]
struct Latency {
    p50: f64,
    p99: f64,
    p50_runs: Vec<f64>,
    p99_runs: Vec<f64>,
}

impl Latency {
    /// The median over runs of the p99 (else the p50), and the per-run values.
    fn pick(&self, p99: bool) -> (f64, &[f64]) {
        if p99 {
            (self.p99, &self.p99_runs)
        } else {
            (self.p50, &self.p50_runs)
        }
    }
}

fn targets<'a>(
    ours: &'a BenchNode,
    direct: &'a BenchNode,
    kube_proxy_nodes: &'a [(KubeProxy, BenchNode)],
    agent: &'a BenchAgent,
) -> Vec<Target<'a>> {
    let measured = SocketAddrV4::new(MEASURED_VIP, SERVICE_PORT).into();
    let mut t = vec![
        Target::service("ours", ours, agent),
        Target::direct(direct),
        Target {
            label: "direct, agent attached".into(),
            node: ours,
            addr: SocketAddrV4::new(ours.server(), TARGET_PORT).into(),
            // Conntrack keeps closed flows' reply entries; a direct connection reusing a
            // client port that a ClusterIP flow to the same backend used gets its SYN-ACK
            // reverse-NATed to the ClusterIP and times out. Emptied before each run.
            agent: Some(agent),
        },
    ];
    for (mode, node) in kube_proxy_nodes {
        t.push(Target {
            label: mode.label().into(),
            node,
            addr: measured,
            agent: None,
        });
    }
    t
}

fn measure_latency(targets: &[Target], settings: &Settings) -> anyhow::Result<Vec<Latency>> {
    for t in targets {
        t.node
            .wait_connect(t.addr, 5000)
            .with_context(|| format!("{}: {} unreachable", t.label, t.addr))?;
        if let Some(agent) = t.agent {
            agent.clear_conntrack()?;
        }
        t.node.connects(t.addr, settings.warmup_connections)?;
    }
    let mut results = vec![Latency::default(); targets.len()];
    for run in 0..settings.latency_runs {
        for (t, result) in targets.iter().zip(results.iter_mut()) {
            if let Some(agent) = t.agent {
                agent.clear_conntrack()?;
            }
            let values = t.node.connects(t.addr, settings.connections)?;
            result.p50_runs.push(percentile(&values, 50.0));
            result.p99_runs.push(percentile(&values, 99.0));
            eprintln!(
                "bench: latency run {}/{}: {:<32} p50 {:>7.1} us  p99 {:>7.1} us",
                run + 1,
                settings.latency_runs,
                t.label,
                percentile(&values, 50.0),
                percentile(&values, 99.0)
            );
        }
    }
    for r in &mut results {
        r.p50 = median(&r.p50_runs);
        r.p99 = median(&r.p99_runs);
    }
    Ok(results)
}

/// The median of each round's ratio of `ours` to `baseline` (printed with `what`): each round
/// measures every target once, one after the other, so this ratio is immune to a slow spell
/// of the machine that a ratio of medians is not.
fn round_by_round(what: &str, ours: &[f64], baseline: &[f64]) -> f64 {
    let paired = median_paired_ratio(ours, baseline);
    eprintln!("bench: connect {what}: {paired:.3}x round by round");
    paired
}

fn latency_rows(
    report: &mut Report,
    scale: usize,
    is_large: bool,
    results: &[Latency],
    labels: &[String],
    settings: &Settings,
) {
    // results[0] is ours, then direct, direct with the agent attached, then the kube-proxy
    // modes.
    for (p, p99) in [("p50", false), ("p99", true)] {
        let value = |l: &Latency| l.pick(p99).0;
        let runs = |l: &Latency| l.pick(p99).1.to_vec();
        let mut m = Measurement::new(
            "2 connect latency",
            format!("TCP connect {p}, ClusterIP, {} services", label(scale)),
            "us",
            value(&results[0]),
        );
        for (l, name) in results.iter().zip(labels).skip(1) {
            m = m.baseline(name.clone(), value(l));
        }
        m = m.ratio_to("direct");
        if is_large {
            let kube_proxy: Vec<String> = labels[3..].to_vec();
            m = m.goal("<= 1.05x direct, < every kube-proxy mode", move |m| {
                m.ratio.is_some_and(|r| r <= 1.05)
                    && kube_proxy.iter().all(|k| {
                        m.baseline_value(k)
                            .is_some_and(|b| m.value.is_some_and(|v| v < b))
                    })
            });
        }
        let detail: Vec<String> = results
            .iter()
            .zip(labels)
            .map(|(l, name)| {
                format!(
                    "{name} {:?}",
                    runs(l)
                        .iter()
                        .map(|v| (v * 10.0).round() / 10.0)
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        let paired = round_by_round(
            &format!("{p}, ClusterIP, {}", label(scale)),
            results[0].pick(p99).1,
            results[1].pick(p99).1,
        );
        m = m.note(format!(
            "median over {} runs of the {p} of {} sequential connects from a client pod (compiled client, socket() to handshake done, closed with RST), after {} warm-up connects; the measured service's two endpoints are the server pod's two addresses; kube-proxy modes: the same {} services x {} endpoints as rules, the measured service last; direct: to the server pod's address in a node without agent or rules; direct, agent attached: the same in the agent's node (non-service path of the program); conntrack emptied before each run in the agent's node (stale reply entries of closed ClusterIP flows would capture direct connections reusing a client port); round by round (median of each round's ours/direct): {paired:.3}x; per-run {p}: {}",
            settings.latency_runs,
            settings.connections,
            settings.warmup_connections,
            label(scale),
            settings.endpoints,
            detail.join("; ")
        ));
        report.push(m);
    }
}

/// Section 2 over IPv6: connect latency through the measured service's IPv6 cluster IP,
/// against direct IPv6 connections to the server pod (a node without agent), interleaved with
/// the IPv4 ClusterIP again.
fn ipv6_latency_rows(
    report: &mut Report,
    (ours, direct, agent): (&BenchNode, &BenchNode, &BenchAgent),
    settings: &Settings,
) -> anyhow::Result<()> {
    eprintln!("bench: connection latency over IPv6");
    let targets = [
        Target {
            label: "ClusterIP over IPv6".into(),
            node: ours,
            addr: SocketAddr::new(MEASURED_VIP6.into(), SERVICE_PORT),
            agent: Some(agent),
        },
        Target {
            label: "direct over IPv6".into(),
            node: direct,
            addr: SocketAddr::new(direct.server6().into(), TARGET_PORT),
            agent: None,
        },
        Target::service("ClusterIP over IPv4", ours, agent),
    ];
    let results = measure_latency(&targets, settings)?;
    for (p, p99) in [("p50", false), ("p99", true)] {
        let (value, runs) = results[0].pick(p99);
        let mut m = Measurement::new(
            "2 connect latency",
            format!(
                "TCP connect {p}, ClusterIP over IPv6, {} services",
                label(settings.large)
            ),
            "us",
            value,
        );
        for (t, r) in targets.iter().zip(&results).skip(1) {
            m = m.baseline(t.label.clone(), r.pick(p99).0);
        }
        let paired = round_by_round(
            &format!("{p}, ClusterIP over IPv6, {}", label(settings.large)),
            runs,
            results[1].pick(p99).1,
        );
        report.push(
            m.ratio_to("direct over IPv6")
                .goal("<= 1.05x direct over IPv6", |m| {
                    m.ratio.is_some_and(|r| r <= 1.05)
                })
                .note(format!(
                    "as the IPv4 rows, to the measured service's IPv6 cluster IP (dual-stack; its IPv6 endpoint the server pod's IPv6 address), interleaved with direct IPv6 connects to the server pod in a node without agent and with the IPv4 ClusterIP; round by round (median of each round's ours/direct over IPv6): {paired:.3}x; per-run {p}: {runs:?}, direct {:?}, IPv4 {:?}",
                    results[1].pick(p99).1,
                    results[2].pick(p99).1
                )),
        );
    }
    Ok(())
}

/// Sections 2 and 3 again with the pods' sockets translated at `connect()` (`--socket-lb
/// all`, the agent restarted with it on the same pinned maps), next to the per-packet path's
/// figures measured before; the agent goes back to `host` afterwards.
fn socket_lb_rows(
    report: &mut Report,
    settings: &Settings,
    (ours, direct, agent): (&BenchNode, &BenchNode, &mut BenchAgent),
    per_packet_latency: Option<Latency>,
    per_packet_throughput: Option<f64>,
) -> anyhow::Result<()> {
    eprintln!("bench: restarting the agent with --socket-lb all");
    agent.switch_socket_lb("all")?;
    if settings.wants(2) {
        let targets = [
            Target::service("ours, --socket-lb all", ours, agent),
            Target::direct(direct),
        ];
        let results = measure_latency(&targets, settings)?;
        for (p, p99) in [("p50", false), ("p99", true)] {
            let value = |l: &Latency| l.pick(p99).0;
            let runs = |l: &Latency| l.pick(p99).1.to_vec();
            let mut m = Measurement::new(
                "2 connect latency",
                format!(
                    "TCP connect {p}, ClusterIP, translated at the socket (--socket-lb all), {} services",
                    label(settings.large)
                ),
                "us",
                value(&results[0]),
            )
            .baseline("direct", value(&results[1]));
            if let Some(per_packet) = &per_packet_latency {
                m = m.baseline("per-packet path", value(per_packet));
            }
            report.push(
                m.ratio_to("direct")
                    .goal("<= 1.05x direct", |m| m.ratio.is_some_and(|r| r <= 1.05))
                    .note(format!(
                        "as the per-packet row above, with the agent restarted with --socket-lb all (same pinned maps; the client pod runs under the agent's --cgroup-root): connect() is translated by the cgroup hook and the SYN goes to the server's address; per-packet path: the ClusterIP row measured before in this run; per-run {p}: ours {:?}, direct {:?}",
                        runs(&results[0]),
                        runs(&results[1])
                    )),
            );
        }
    }
    if settings.wants(3) {
        let mut via_socket = Vec::new();
        let mut direct_runs = Vec::new();
        ours.iperf(IPERF_VIP, 1)?;
        direct.iperf(direct.server(), 1)?;
        for _ in 0..settings.iperf_runs {
            via_socket.push(ours.iperf(IPERF_VIP, settings.iperf_seconds)?);
            direct_runs.push(direct.iperf(direct.server(), settings.iperf_seconds)?);
        }
        let mut m = Measurement::new(
            "3 throughput",
            format!(
                "iperf3 TCP via ClusterIP, translated at the socket (--socket-lb all), {} services",
                label(settings.large)
            ),
            "Gbit/s",
            median(&via_socket),
        )
        .baseline("direct", median(&direct_runs));
        if let Some(per_packet) = per_packet_throughput {
            m = m.baseline("per-packet path", per_packet);
        }
        report.push(
            m.ratio_to("direct")
                .goal(">= 0.95x direct", |m| m.ratio.is_some_and(|r| r >= 0.95))
                .note(format!(
                    "as the per-packet row above, with --socket-lb all; runs: socket {via_socket:?}, direct {direct_runs:?}",
                )),
        );
    }
    agent.switch_socket_lb("host")
}

pub fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let work = WorkDir(scratch_dir("dataplane-bench-rules-"));
    cleanup::dir(work.0.clone());
    std::fs::create_dir_all(&work.0)?;

    eprintln!("bench: creating namespaces (5 nodes, 3 pods each)");
    let ours = BenchNode::new("ours", true)?;
    let direct = BenchNode::new("direct", true)?;
    let kube_proxy_modes = [
        KubeProxy::IptablesLegacy,
        KubeProxy::IptablesNft,
        KubeProxy::Nftables,
    ];
    let mut kube_proxy_nodes = Vec::new();
    for mode in kube_proxy_modes {
        kube_proxy_nodes.push((mode, BenchNode::new(mode.label(), false)?));
    }
    let servers = ours.servers();
    let mut agent = BenchAgent::start(&ours, &settings.agent_binary)?;

    let servers6 = [ours.server6()];
    let large_set = services::service_set(settings.large, settings.endpoints, &servers, &servers6);
    let small_set = services::service_set(settings.small, settings.endpoints, &servers, &servers6);

    // Section 4: programming the large set, each mode from empty. The last load of each
    // mode stays for the latency measurement.
    eprintln!(
        "bench: programming {} services x {} endpoints (agent)",
        settings.large, settings.endpoints
    );
    let mut agent_runs = Vec::new();
    let mut agent_sync_us = Vec::new();
    // Run 0 is the warm-up.
    for run in 0..=settings.program_runs {
        if run > 0 {
            agent.disappear(&large_set)?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = agent.appear(&large_set)?;
        eprintln!(
            "bench: agent: {} services in {:.3} s{}",
            large_set.len(),
            took.as_secs_f64(),
            if run == 0 { " (warm-up)" } else { "" }
        );
        if run > 0 {
            agent_runs.push(took.as_secs_f64());
            agent_sync_us.extend(agent.last_sync_us());
        }
    }
    let mut restore_large = Vec::new();
    for (mode, node) in &kube_proxy_nodes {
        let runs = if *mode == KubeProxy::Nftables {
            settings.nft_program_runs
        } else {
            settings.program_runs
        };
        let mut times = Vec::new();
        for _ in 0..runs {
            eprintln!(
                "bench: {}: loading {} services",
                mode.loader(),
                large_set.len()
            );
            let took = mode.program(node, &large_set, &work.0, false)?;
            eprintln!("bench: {}: {:.2} s", mode.loader(), took.as_secs_f64());
            times.push(took.as_secs_f64());
        }
        restore_large.push((*mode, median(&times), times));
    }
    if settings.wants(4) {
        let mut m = Measurement::new(
            "4 programming",
            format!(
                "{} services x {} endpoints appear -> all in maps",
                label(settings.large),
                settings.endpoints
            ),
            "s",
            median(&agent_runs),
        );
        for (mode, value, _) in &restore_large {
            m = m.baseline(mode.loader(), *value);
        }
        let detail: Vec<String> = restore_large
            .iter()
            .map(|(mode, _, times)| format!("{} runs {times:?}", mode.loader()))
            .collect();
        report.push(
            m.ratio_to("iptables-legacy-restore")
                .goal("<= 0.5 s", |m| m.value.is_some_and(|v| v <= 0.5))
                .note(format!(
                    "agent: median of {} runs after a warm-up run: one JSON manifest (Service + EndpointSlice) per service, all appearing at once by renaming their directory into the watched one, until every frontend's slot 0 counts all its backends (then verified in full); runs {agent_runs:?}; agent-reported sync time (parse + plan + apply) {agent_sync_us:?} us; baselines: the kube-proxy rule sets loaded from empty into a fresh namespace, iptables as one complete restore of the nat and filter tables (kube-proxy passes --noflush, which with iptables-nft 1.8 is several times slower at 1k services and impractical at 10k: see info.programming_small), nftables as one `nft -f` transaction (kube-proxy's first sync); {}",
                    settings.program_runs,
                    detail.join("; ")
                )),
        );
    }

    // Sections 2 and 3 at the large scale.
    let labels: Vec<String> = ["ours", "direct", "direct, agent attached"]
        .into_iter()
        .map(String::from)
        .chain(kube_proxy_modes.iter().map(|m| m.label().to_string()))
        .collect();
    let mut per_packet_latency = None;
    if settings.wants(2) {
        eprintln!("bench: connection latency, {} services", settings.large);
        let results = measure_latency(
            &targets(&ours, &direct, &kube_proxy_nodes, &agent),
            settings,
        )?;
        latency_rows(report, settings.large, true, &results, &labels, settings);
        per_packet_latency = results.first().cloned();
        ipv6_latency_rows(report, (&ours, &direct, &agent), settings)?;
    }
    let mut per_packet_throughput = None;
    if settings.wants(3) {
        eprintln!("bench: throughput");
        let mut via_service = Vec::new();
        let mut direct_runs = Vec::new();
        let mut attached_runs = Vec::new();
        // Conntrack emptied before each run in the agent's node (see `targets`).
        agent.clear_conntrack()?;
        ours.iperf(IPERF_VIP, 1)?;
        direct.iperf(direct.server(), 1)?;
        agent.clear_conntrack()?;
        ours.iperf(ours.server(), 1)?;
        for _ in 0..settings.iperf_runs {
            agent.clear_conntrack()?;
            via_service.push(ours.iperf(IPERF_VIP, settings.iperf_seconds)?);
            direct_runs.push(direct.iperf(direct.server(), settings.iperf_seconds)?);
            agent.clear_conntrack()?;
            attached_runs.push(ours.iperf(ours.server(), settings.iperf_seconds)?);
        }
        per_packet_throughput = Some(median(&via_service));
        report.push(
            Measurement::new(
                "3 throughput",
                format!("iperf3 TCP via ClusterIP, {} services", label(settings.large)),
                "Gbit/s",
                median(&via_service),
            )
            .baseline("direct", median(&direct_runs))
            .baseline("direct, agent attached", median(&attached_runs))
            .ratio_to("direct")
            .goal(">= 0.95x direct", |m| m.ratio.is_some_and(|r| r >= 0.95))
            .note(format!(
                "median of {} runs of `iperf3 -t {}` (one TCP stream) from the client pod, interleaved, after a 1 s warm-up each; direct: to the server pod's address in a node without agent; direct, agent attached: the same in the agent's node (the program runs, non-service path); runs: ClusterIP {via_service:?}, direct {direct_runs:?}, direct attached {attached_runs:?}",
                settings.iperf_runs, settings.iperf_seconds
            )),
        );
    }
    if settings.wants(2) || settings.wants(3) {
        socket_lb_rows(
            report,
            settings,
            (&ours, &direct, &mut agent),
            per_packet_latency,
            per_packet_throughput,
        )?;
    }
    let mut large_set = large_set;
    if settings.wants(4) {
        eprintln!("bench: {} single endpoint changes", settings.changes);
        let warmup = (settings.changes / 20).max(2);
        let changes = agent.endpoint_changes(&mut large_set, warmup + settings.changes)?;
        let changes = changes[warmup..].to_vec();
        for (p, q) in [("p50", 50.0), ("p99", 99.0)] {
            let mut m = Measurement::new(
                "4 programming",
                format!(
                    "single endpoint change -> in maps {p}, {} services",
                    label(settings.large)
                ),
                "ms",
                percentile(&changes, q),
            );
            if p == "p99" {
                m = m.goal("<= 10 ms", |m| m.value.is_some_and(|v| v <= 10.0));
            }
            report.push(m.note(format!(
                "{} changes after a few warm-up ones, each replacing one endpoint address of a different service (its manifest file rewritten and renamed into place) with {} services present, timed until the service's slots name a backend with the new address (polled every 0.1 ms); min {:.2} ms, max {:.2} ms",
                changes.len(),
                label(settings.large),
                changes.iter().copied().fold(f64::INFINITY, f64::min),
                changes.iter().copied().fold(0.0, f64::max),
            )));
        }
    }
    if settings.wants(5) {
        let peak = agent.status_kb("VmHWM:").unwrap_or(f64::NAN) / 1024.0;
        let now = agent.status_kb("VmRSS:").unwrap_or(f64::NAN) / 1024.0;
        report.push(
            Measurement::new(
                "5 memory",
                format!(
                    "agent peak RSS, {} services x {} endpoints",
                    label(settings.large),
                    settings.endpoints
                ),
                "MB",
                peak,
            )
            .goal("<= 100 MB", |m| m.value.is_some_and(|v| v <= 100.0))
            .note(format!(
                "VmHWM of the agent process after {} bulk loads of the set and the endpoint changes; current VmRSS {now:.1} MB",
                settings.program_runs
            )),
        );
        // The agent at rest: nothing changes, nothing is measured.
        let rest = Duration::from_secs(if settings.quick { 3 } else { 10 });
        let before = agent.cpu_time();
        std::thread::sleep(rest);
        let used = agent
            .cpu_time()
            .zip(before)
            .map(|(a, b)| a.saturating_sub(b));
        report.push(
            Measurement::new(
                "5 memory",
                format!("agent CPU at rest, {} services", label(settings.large)),
                "%",
                used.map(|u| 100.0 * u.as_secs_f64() / rest.as_secs_f64())
                    .unwrap_or(f64::NAN),
            )
            .note(format!(
                "user + system CPU time of the agent over {} s in which no object changes (% of one CPU)",
                rest.as_secs()
            )),
        );
        let maps = agent.map_memory();
        let total: u64 = maps.iter().map(|(_, b)| b).sum();
        let detail: Vec<String> = maps
            .iter()
            .map(|(n, b)| format!("{n} {:.1} MB", *b as f64 / 1048576.0))
            .collect();
        report.push(
            Measurement::new(
                "5 memory",
                "BPF maps (kernel accounting), default capacities",
                "MB",
                total as f64 / 1048576.0,
            )
            .note(format!(
                "sum of each pinned map's `memlock` (fdinfo); hash maps are preallocated, so this follows the capacities, not the service count; {}",
                detail.join(", ")
            )),
        );
    }

    // Section 2 at the small scale.
    if settings.wants(2) {
        eprintln!("bench: switching to {} services", settings.small);
        agent.disappear(&large_set)?;
        let took_small = agent.appear(&small_set)?;
        let mut small_loads = Vec::new();
        for (mode, node) in &kube_proxy_nodes {
            // As kube-proxy runs them (iptables: --noflush, which iptables-nft 1.8 makes far
            // slower at scale); recorded in the report's info.
            let took = mode.program(node, &small_set, &work.0, true)?;
            let flags = if *mode == KubeProxy::Nftables {
                ""
            } else {
                " --noflush --counters"
            };
            small_loads.push(format!(
                "{}{flags} {:.3} s",
                mode.loader(),
                took.as_secs_f64()
            ));
        }
        eprintln!(
            "bench: {} services: agent {:.3} s; {}",
            settings.small,
            took_small.as_secs_f64(),
            small_loads.join(", ")
        );
        report.info.insert(
            "programming_small".into(),
            format!(
                "{} services: agent {:.3} s; {}",
                settings.small,
                took_small.as_secs_f64(),
                small_loads.join(", ")
            )
            .into(),
        );
        eprintln!("bench: connection latency, {} services", settings.small);
        let results = measure_latency(
            &targets(&ours, &direct, &kube_proxy_nodes, &agent),
            settings,
        )?;
        latency_rows(report, settings.small, false, &results, &labels, settings);
    }
    drop(agent);
    Ok(())
}

/// Section 7: the same large set given as one `v1 List` file (as `kubectl get -o json`
/// writes a cluster's objects) and as one file per service, each to a fresh agent: time until
/// every service is in the maps, and the agent's peak memory. The parse must cost the same
/// however the objects are split into files.
pub fn list_input(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let n = settings.list_services;
    let endpoints = settings.endpoints;
    eprintln!(
        "bench: section 7: {n} services x {endpoints} endpoints, one List file vs one file per service"
    );
    let node = BenchNode::new("ours", false)?;
    let set: Vec<Service> = (0..n).map(|i| services::filler(i, endpoints)).collect();
    // Maps and frontend limit sized for the set (the defaults fit 65,536 frontends and
    // 131,072 backends).
    let frontends = (n + 1).next_power_of_two().max(65_536);
    let backends = (n * endpoints + 2).next_power_of_two().max(131_072);
    let slots = (n * (endpoints + 1)).next_power_of_two().max(262_144);
    let mut extra = vec!["--max-frontends".to_string(), frontends.to_string()];
    for (map, size) in [
        (map_names::SERVICES, slots),
        (map_names::BACKENDS, backends),
        (map_names::BACKEND_STATS, backends),
        (map_names::SERVICE_STATS, frontends),
        (map_names::SOCKET_BACKEND_STATS, backends),
        (map_names::SOCKET_SERVICE_STATS, frontends),
        (map_names::NAMES, frontends),
    ] {
        extra.push("--map-size".into());
        extra.push(format!("{map}={size}"));
    }
    let measure = |one_list: bool| -> anyhow::Result<(f64, f64, Option<u64>)> {
        let mut agent = BenchAgent::start_with(&node, &settings.agent_binary, &extra)?;
        let took = if one_list {
            agent.appear_as_list(&set)?
        } else {
            agent.appear(&set)?
        };
        let peak = agent.status_kb("VmHWM:").unwrap_or(f64::NAN) / 1024.0;
        let sync_us = agent.last_sync_us();
        eprintln!(
            "bench: {}: {n} services in maps in {:.2} s, peak RSS {peak:.0} MB",
            if one_list {
                "one List file"
            } else {
                "one file per service"
            },
            took.as_secs_f64()
        );
        Ok((took.as_secs_f64(), peak, sync_us))
    };
    let (list_s, list_mb, list_sync) = measure(true)?;
    let (files_s, files_mb, files_sync) = measure(false)?;
    let label = label(n);
    report.push(
        Measurement::new(
            "4 programming",
            format!("{label} services x {endpoints} endpoints from one List file -> all in maps"),
            "s",
            list_s,
        )
        .baseline("one file per service", files_s)
        .ratio_to("one file per service")
        .goal("<= 3 s", |m| m.value.is_some_and(|v| v <= 3.0))
        .note(format!(
            "a fresh agent each: the set written as one JSON v1 List (every Service and EndpointSlice) or as one JSON file per service, renamed into the watched directory at once, timed until every frontend's slot 0 counts all its backends (then verified in full); agent-reported sync time (parse + plan + apply) {list_sync:?} us (List) and {files_sync:?} us (files); maps sized with --map-size and --max-frontends {frontends}"
        )),
    );
    report.push(
        Measurement::new(
            "5 memory",
            format!("agent peak RSS, {label} services x {endpoints} endpoints from one List file"),
            "MB",
            list_mb,
        )
        .baseline("one file per service", files_mb)
        .goal("<= 400 MB", |m| m.value.is_some_and(|v| v <= 400.0))
        .note("VmHWM of a fresh agent after the set appeared as one List file; baseline: the same from one file per service"),
    );
    Ok(())
}
