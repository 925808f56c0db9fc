//! A testbed of real network namespaces: a "node" namespace running the agent, "pod"
//! namespaces wired to it the way CNIs do (routed /32 veths with a link-local gateway and
//! proxy ARP, or veths enslaved to a bridge), and real servers in the pods. Used by the
//! end-to-end tests and by `cargo xtask demo`.
//!
//! Nodes carry what a real node's network stack has besides the datapath ([`Node::new`]):
//! kube-proxy's `KUBE-FORWARD` chain dropping conntrack-INVALID packets, a pod-egress
//! MASQUERADE as the Amazon VPC CNI installs it, and strict reverse-path filtering (Calico
//! sets it on its workload interfaces). [`Node::bare`] leaves them out.
//!
//! Everything created here is removed on drop (namespaces, pins, processes), so a failing
//! test leaves nothing behind. Traffic only ever goes to addresses inside these namespaces.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
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

/// Runs `bpftool ARGS` and fails with its message.
pub fn bpftool(args: &[&str]) -> anyhow::Result<String> {
    check(
        Command::new("bpftool").args(args).output(),
        &format!("bpftool {}", args.join(" ")),
    )
}

/// Runs `bpftool -j ARGS`: its JSON output.
pub fn bpftool_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let json_args: Vec<&str> = ["-j"].iter().chain(args).copied().collect();
    Ok(serde_json::from_str(&bpftool(&json_args)?)?)
}

/// A network namespace, deleted on drop.
/// A cgroup v2 directory of the test's own, under `dataplane-tests/` at the cgroup v2 mount:
/// a "node"'s processes (and its pods') run in it, and its agent's socket hooks attach there,
/// so several nodes on one machine never translate each other's sockets. On drop, whatever
/// still runs in it is killed and the directory removed.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// `cgroup.procs`, open for the children that join (see `Netns::command`).
    procs: std::fs::File,
}

impl Cgroup {
    /// The cgroup v2 mount: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
    /// hybrid one (as the agent's `--cgroup-root` default finds it).
    pub fn mount() -> PathBuf {
        let unified = Path::new("/sys/fs/cgroup");
        if unified.join("cgroup.controllers").exists() {
            unified.to_path_buf()
        } else {
            unified.join("unified")
        }
    }

    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = Self::mount().join("dataplane-tests").join(unique(prefix));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))?;
        Ok(Self { path, procs })
    }

    /// A command that runs in this cgroup, in the caller's network namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        self.adopt(&mut command);
        command
    }

    /// Makes `command`'s process start in this cgroup (it joins between fork and exec).
    fn adopt(&self, command: &mut Command) {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let fd = self.procs.as_raw_fd();
        // SAFETY: only a write(2) of a static buffer between fork and exec (async-signal
        // safe); "0" moves the writing process itself.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Netns {
    pub name: String,
    /// The cgroup this namespace's processes start in (a node's and its pods').
    pub cgroup: Option<std::sync::Arc<Cgroup>>,
}

impl Netns {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Self { name, cgroup: None };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// [`Netns::new`], with its processes started in `cgroup`.
    pub fn in_cgroup(prefix: &str, cgroup: &std::sync::Arc<Cgroup>) -> anyhow::Result<Self> {
        let mut ns = Self::new(prefix)?;
        ns.cgroup = Some(cgroup.clone());
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

    /// Packets this namespace's interface `dev` has transmitted: for the host end of a pod's
    /// veth, what the node sent into the pod through it (not what entered the pod with
    /// `bpf_redirect_peer`).
    pub fn tx_packets(&self, dev: &str) -> anyhow::Result<u64> {
        let text = self.ip(&["-s", "-j", "link", "show", "dev", dev])?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        json[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no tx counter for {dev} in {text}"))
    }

    /// A command that runs inside this namespace (and its cgroup, if it has one). Only the
    /// network namespace changes (not the mount namespace, as `ip netns exec` would), so
    /// bpffs pins stay visible.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = self.command_outside_cgroup(program);
        if let Some(cgroup) = &self.cgroup {
            cgroup.adopt(&mut cmd);
        }
        cmd
    }

    /// [`Netns::command`], left in the caller's cgroup.
    pub fn command_outside_cgroup(&self, program: &str) -> Command {
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

    /// Runs to completion with `input` on its stdin; stdout on success.
    pub fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: &str,
    ) -> anyhow::Result<String> {
        let what = format!("{program} {}", args.join(" "));
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {what}"))?;
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes())?;
        check(child.wait_with_output(), &what)
    }

    /// A sysctl's value in this namespace (many, like `ip_local_port_range`, are per namespace).
    pub fn sysctl_value(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.run("sysctl", &["-n", key])?.trim().to_string())
    }

    /// A counter of `/proc/net/netstat` or `/proc/net/snmp` as this namespace sees it, by its
    /// `nstat` name (`TcpExtIPReversePathFilter`, `IpReasmFails`, `IcmpOutTimeExcds`...).
    pub fn netstat(&self, name: &str) -> anyhow::Result<u64> {
        let text = self.run("cat", &["/proc/net/netstat", "/proc/net/snmp"])?;
        let lines: Vec<&str> = text.lines().collect();
        // Pairs of lines: "Prefix: Name Name ..." then "Prefix: value value ...".
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (prefix, names) = names.split_once(": ").unwrap_or_default();
            let values = values.split_once(": ").map(|v| v.1).unwrap_or_default();
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if format!("{prefix}{n}") == name {
                    return Ok(v.parse()?);
                }
            }
        }
        bail!("no counter {name} in /proc/net/netstat or /proc/net/snmp")
    }

    /// Starts `assets/echo_server.py` here, answering as `name`, and waits until its TCP
    /// ports accept on `ip`.
    pub fn serve_echo(
        &self,
        name: &str,
        ip: Ipv4Addr,
        tcp_port: u16,
        udp_port: u16,
        line_port: Option<u16>,
    ) -> anyhow::Result<Process> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/echo_server.py");
        let mut args = vec![
            script.to_str().unwrap().to_string(),
            name.to_string(),
            tcp_port.to_string(),
            udp_port.to_string(),
        ];
        args.extend(line_port.map(|p| p.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = self.spawn("python3", &args)?;
        let ports: Vec<u16> = [Some(tcp_port), line_port].into_iter().flatten().collect();
        wait_until(Duration::from_secs(10), || {
            ports.iter().all(|port| {
                self.run(
                    "python3",
                    &[
                        "-c",
                        &format!(
                            "import socket; socket.create_connection(('{ip}', {port}), 0.2).close()"
                        ),
                    ],
                )
                .is_ok()
            })
        })
        .with_context(|| format!("echo server {name} did not start"))?;
        Ok(process)
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
    /// The pod's IPv6 address (routed pods are dual-stack; bridged ones IPv4 only).
    pub ip6: Option<Ipv6Addr>,
    /// The node-side veth (where the datapath attaches).
    pub host_if: String,
    pub netns: Netns,
    processes: Vec<Process>,
}

impl Pod {
    /// Starts the echo server (HTTP on `tcp_port`, UDP echo on `udp_port`); it answers with
    /// the pod's name and the peer address it saw.
    pub fn serve(&mut self, tcp_port: u16, udp_port: u16) -> anyhow::Result<()> {
        self.serve_with_line_echo(tcp_port, udp_port, None)
    }

    /// [`Pod::serve`], and with `line_port` a TCP server that answers every line on a
    /// connection ("<pod> <peer-ip>:<peer-port> <line>"), for connections held open.
    pub fn serve_with_line_echo(
        &mut self,
        tcp_port: u16,
        udp_port: u16,
        line_port: Option<u16>,
    ) -> anyhow::Result<()> {
        let process = self
            .netns
            .serve_echo(&self.name, self.ip, tcp_port, udp_port, line_port)?;
        self.processes.push(process);
        Ok(())
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
    /// Whether the node has a real node's netfilter rules and reverse-path filtering.
    pub realistic: bool,
    /// MTU of pod veths added from now on (both ends); `None`: the kernel's default, 1500.
    pub pod_mtu: Option<u32>,
}

pub const ROUTED_GATEWAY: &str = "169.254.1.1";
/// Routed pods' IPv6 gateway: a link-local address of the node's veth, as the Amazon VPC
/// CNI's IPv6 mode wires pods (a /128 each, default route via the link-local gateway).
pub const ROUTED_GATEWAY6: &str = "fe80::1";

/// A routed pod's IPv6 address: `fd00:10:244:<c>::<index + 10>` for IPv4 `10.244.<c>.x`.
pub fn pod_ip6(subnet: [u8; 3], index: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x10,
        0x244,
        subnet[2] as u16,
        0,
        0,
        0,
        index as u16 + 10,
    )
}

/// A node's IPv6 pod CIDR (the /64 of [`pod_ip6`]).
pub fn pod_cidr6(subnet: [u8; 3]) -> String {
    format!("fd00:10:244:{:x}::/64", subnet[2])
}

/// The cluster's pod network: every node's pod subnet lies in it.
pub const POD_NETWORK: &str = "10.244.0.0/16";

/// What a Kubernetes node's netfilter holds besides the datapath, loaded into every
/// [`Node::new`]: kube-proxy's `KUBE-FORWARD` chain (it keeps it in every mode, jumped to from
/// FORWARD) with its rule dropping packets conntrack finds INVALID, and a pod-egress SNAT as
/// the Amazon VPC CNI installs it (pods' traffic to anything outside the pod network and not
/// to the node itself leaves with the node's address, from a random port).
pub const NODE_RULESET: &str = "*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m addrtype ! --dst-type LOCAL -j MASQUERADE --random-fully
COMMIT
";

impl Node {
    /// A node as a real one is: [`NODE_RULESET`] in its netfilter, and strict reverse-path
    /// filtering (`rp_filter=1`) on every interface (`all`) and on each pod veth. Strict
    /// filtering on `all` keeps the underlay working: every source a node receives is
    /// routed back through the interface it came in on (pods through their veth or the
    /// bridge, other nodes' pods through the underlay or the tunnel, clients and nodes on
    /// the underlay's subnet), and the nodes of [`multinode`] have a default route there.
    ///
    /// `DATAPLANE_TESTBED_BARE_NODES=1` makes every node bare instead: a diagnostic, to tell a
    /// fault of the datapath from one of its interplay with the node's stack.
    pub fn new(wiring: Wiring, subnet: [u8; 3]) -> anyhow::Result<Self> {
        let mut node = Self::bare(wiring, subnet)?;
        if std::env::var_os("DATAPLANE_TESTBED_BARE_NODES").is_some_and(|v| v == "1") {
            return Ok(node);
        }
        node.netns.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
        node.netns
            .run_with_input("iptables-restore", &["--noflush"], NODE_RULESET)?;
        node.realistic = true;
        Ok(node)
    }

    /// A node without netfilter rules or reverse-path filtering: only for measurements that
    /// load their own rule sets (`cargo xtask bench` builds kube-proxy's on its nodes).
    pub fn bare(wiring: Wiring, subnet: [u8; 3]) -> anyhow::Result<Self> {
        let cgroup = std::sync::Arc::new(Cgroup::new("dpn")?);
        let netns = Netns::in_cgroup("dpn", &cgroup)?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
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
            realistic: false,
            pod_mtu: None,
        })
    }

    /// Packets the INVALID rule of `KUBE-FORWARD` dropped (its packet counter). A datapath
    /// that hands the node's conntrack half a connection (a reply it never saw the request
    /// of) shows here.
    pub fn invalid_drops(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(self.realistic, "a bare node has no KUBE-FORWARD chain");
        let text = self.netns.run(
            "iptables",
            &["-t", "filter", "-L", "KUBE-FORWARD", "-v", "-x", "-n"],
        )?;
        text.lines()
            .find(|l| l.contains("DROP") && l.contains("INVALID"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no INVALID drop rule in KUBE-FORWARD:\n{text}"))
    }

    /// Packets the node dropped for failing the reverse-path filter.
    pub fn rp_filter_drops(&self) -> anyhow::Result<u64> {
        self.netns.netstat("TcpExtIPReversePathFilter")
    }

    /// What the node's stack dropped that a datapath can cause, for assertion messages:
    /// netfilter's INVALID drops, reverse-path filter drops, failed reassemblies.
    pub fn drop_report(&self) -> String {
        let show =
            |r: anyhow::Result<u64>| r.map_or_else(|e| format!("? ({e})"), |v| v.to_string());
        format!(
            "KUBE-FORWARD INVALID drops {}, rp_filter drops {}, reassembly failures {}",
            show(self.invalid_drops()),
            show(self.rp_filter_drops()),
            show(self.netns.netstat("IpReasmFails")),
        )
    }

    pub fn pod_glob(&self) -> String {
        format!("{}*", self.veth_prefix)
    }

    /// Adds pod number `index` (its address ends in `index + 10`).
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<usize> {
        let index = self.pods.len();
        let [a, b, c] = self.subnet;
        let ip = Ipv4Addr::new(a, b, c, index as u8 + 10);
        let ip6 = (self.wiring == Wiring::Routed).then(|| pod_ip6(self.subnet, index));
        let netns = match &self.netns.cgroup {
            Some(cgroup) => Netns::in_cgroup("dpp", cgroup)?,
            None => Netns::new("dpp")?,
        };
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
        if let Some(mtu) = self.pod_mtu {
            let mtu = mtu.to_string();
            self.netns.ip(&["link", "set", &host_if, "mtu", &mtu])?;
            netns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        if self.realistic {
            self.netns
                .sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "1")?;
        }
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
                // IPv6: the gateway is the veth's own link-local address (no proxy needed);
                // no duplicate address detection, so both ends work at once.
                self.netns.ip(&[
                    "addr",
                    "add",
                    &format!("{ROUTED_GATEWAY6}/64"),
                    "dev",
                    &host_if,
                    "nodad",
                ])?;
                self.netns.ip(&["link", "set", &host_if, "up"])?;
                self.netns
                    .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
                let ip6 = ip6.expect("routed pods are dual-stack");
                netns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/128"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    ROUTED_GATEWAY6,
                    "dev",
                    "eth0",
                ])?;
                self.netns
                    .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
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
            ip6,
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
    /// The node's cgroup: the agent's `--cgroup-root`.
    cgroup_root: Option<PathBuf>,
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
    /// Another agent's `--bpffs-dir` (default: one of its own). This agent never cleans it
    /// up: whatever is pinned there stays for its owner.
    pub shared_bpffs_dir: Option<PathBuf>,
}

/// How an agent that was expected to refuse its configuration ended.
#[derive(Debug)]
pub struct AgentExit {
    /// `None`: still running at the deadline (and killed).
    pub status: Option<std::process::ExitStatus>,
    /// Its stdout and stderr.
    pub output: String,
    /// Whatever it left under its `--bpffs-dir` (removed since).
    pub pinned: Vec<PathBuf>,
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
        let mut agent = Self::new(node, node_name, options)?;
        agent.restart()?;
        Ok(agent)
    }

    /// The agent's directories, not started yet.
    fn new(node: &Node, node_name: &str, options: AgentOptions) -> anyhow::Result<Self> {
        let work = std::env::temp_dir().join(unique("dataplane-e2e-"));
        let manifests = options
            .shared_manifests
            .clone()
            .unwrap_or_else(|| work.join("manifests"));
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&manifests)?;
        let agent = Self {
            log: work.join("agent.log"),
            manifests,
            bpffs_dir: options
                .shared_bpffs_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf").join(unique("dpt"))),
            process: None,
            binary: agent_binary(),
            netns_path: node.netns.path(),
            cgroup_root: node.netns.cgroup.as_ref().map(|c| c.path.clone()),
            node_name: node_name.to_string(),
            pod_glob: node.pod_glob(),
            pod_interfaces: node.pods.iter().map(|p| p.host_if.clone()).collect(),
            options,
            work,
        };
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
        let child = self.command()?.spawn()?;
        self.process = Some(Process { child });
        // Ready once the maps are pinned, every pod interface has its link, and every
        // external interface named exactly (not by a glob) is attached: its pinned link, or
        // the agent's log line when it pins it under another name (bpffs refuses names with
        // a dot, such as Calico's `wireguard.cali`).
        let bpffs = self.bpffs_dir.clone();
        let links: Vec<PathBuf> = self
            .pod_interfaces
            .iter()
            .map(|i| bpffs.join("links").join(i))
            .collect();
        let external: Vec<&str> = self
            .options
            .external_interfaces
            .iter()
            .flat_map(|e| e.split(','))
            .filter(|e| !e.contains(['*', '?', '[']))
            .collect();
        wait_until(Duration::from_secs(10), || {
            bpffs.join(dataplane_common::map_names::SERVICES).exists()
                && links.iter().all(|l| l.exists())
                && external.iter().all(|dev| {
                    bpffs.join("links").join(dev).exists()
                        || self
                            .log_text()
                            .contains(&format!("datapath attached interface={dev} "))
                })
        })
        .map_err(|e| e.context(format!("agent did not start; log:\n{}", self.log_text())))
    }

    /// `dataplane-agent run` in the node's namespace, logging to the agent's log.
    fn command(&self) -> anyhow::Result<Command> {
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
        if let Some(root) = &self.cgroup_root
            && !self.options.extra_args.iter().any(|a| a == "--cgroup-root")
        {
            command.arg("--cgroup-root").arg(root);
        }
        command
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
            .stderr(log);
        Ok(command)
    }

    /// Runs the agent for `node` as [`Agent::start_with`] would, expecting it to exit on its
    /// own (a configuration it refuses) within `timeout`; killed if it does not.
    pub fn run_to_exit(
        node: &Node,
        node_name: &str,
        options: AgentOptions,
        timeout: Duration,
    ) -> anyhow::Result<AgentExit> {
        let agent = Self::new(node, node_name, options)?;
        anyhow::ensure!(
            agent.binary.exists(),
            "agent binary {} not built",
            agent.binary.display()
        );
        let mut process = Process {
            child: agent.command()?.spawn()?,
        };
        let mut status = None;
        let _ = wait_until(timeout, || {
            status = process.child.try_wait().ok().flatten();
            status.is_some()
        });
        drop(process);
        let mut pinned = vec![];
        let mut dirs = vec![agent.bpffs_dir.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
                pinned.push(entry.path());
            }
        }
        Ok(AgentExit {
            status,
            output: agent.log_text(),
            pinned,
        })
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

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// Kills the agent at once (SIGKILL), as the OOM killer or a node crash would: no
    /// shutdown of any kind. The datapath stays, as after [`Agent::stop`].
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
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

    /// Rewrites one manifest file in place, as `cat > file` or an editor that does not rename
    /// does: opened with truncation, then written, so the agent may see it empty or partly
    /// written in between.
    pub fn rewrite_manifest_in_place(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let mut f = std::fs::File::create(self.manifests.join(file))?;
        std::io::Write::write_all(&mut f, content.as_bytes())?;
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

    /// Waits until the pinned service map shows `frontend` with exactly these backend
    /// addresses ("ip:port", in any order).
    pub fn wait_for_backend_addresses(
        &self,
        frontend: &str,
        addresses: &[String],
    ) -> anyhow::Result<()> {
        let mut wanted = addresses.to_vec();
        wanted.sort();
        wait_until(Duration::from_secs(5), || {
            self.cli_json(&["services"]).ok().is_some_and(|v| {
                v.as_array().into_iter().flatten().any(|s| {
                    let mut have: Vec<String> = s["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| b["address"].as_str().map(String::from))
                        .collect();
                    have.sort();
                    s["frontend"] == frontend && have == wanted
                })
            })
        })
        .map_err(|e| {
            e.context(format!(
                "{frontend} never had exactly the backends {wanted:?}; log:\n{}",
                self.log_text()
            ))
        })
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
        if self.options.shared_bpffs_dir.is_none() {
            let _ = Command::new(&self.binary)
                .arg("cleanup")
                .arg("--bpffs-dir")
                .arg(&self.bpffs_dir)
                .output();
        }
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

/// Which backend answered each of [`http_requests`]' answers ("<pod> <peer-ip>:<peer-port>"):
/// backend name -> count, and the client addresses the backends saw.
pub fn tally(
    answers: &[Result<String, String>],
) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
    let mut by_backend = std::collections::BTreeMap::new();
    let mut peers = Vec::new();
    for answer in answers {
        let line = answer.as_ref().expect("request failed");
        let mut parts = line.split_whitespace();
        *by_backend
            .entry(parts.next().unwrap().to_string())
            .or_default() += 1;
        peers.push(parts.next().unwrap().split(':').next().unwrap().to_string());
    }
    (by_backend, peers)
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

/// Opens one TCP connection (from the source "ip:port" when given, ip may be empty), then for every line on stdin
/// sends it and prints the line answered: "open" or "error ..." first, then per exchange the
/// answer, "closed" or "error ...".
const LINE_CLIENT: &str = r#"
import socket, sys
host, port, source = sys.argv[1].strip("[]"), int(sys.argv[2]), sys.argv[3]
try:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if source:
        source_ip, source_port = source.rsplit(":", 1)
        s.bind((source_ip.strip("[]"), int(source_port)))
    s.settimeout(3)
    s.connect((host, port))
    print("open", flush=True)
except OSError as e:
    print("error", repr(e), flush=True)
    sys.exit()
answers = s.makefile("rb")
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        answer = answers.readline()
        print(answer.decode().strip() if answer else "closed", flush=True)
    except OSError as e:
        print("error", repr(e), flush=True)
"#;

/// A TCP connection held open to a line echo server ([`Pod::serve_with_line_echo`]), one
/// request and answer at a time, for as long as the test keeps it; killed on drop.
pub struct LineConnection {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl LineConnection {
    /// Connects from `client` to `target` ("host:port", "[ipv6]:port"), from `source`
    /// ("ip:port", or ":port" for any address) when given; fails when the connection is not established
    /// within 3 s.
    pub fn open(client: &Netns, target: &str, source: Option<&str>) -> anyhow::Result<Self> {
        let (host, port) = target.rsplit_once(':').context("target is host:port")?;
        let mut child = client
            .command("python3")
            .args(["-c", LINE_CLIENT, host, port, source.unwrap_or("")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut this = Self {
            stdin: child.stdin.take().unwrap(),
            stdout: std::io::BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        let first = this.read_line()?;
        if first != "open" {
            bail!("connection to {target} not established: {first}");
        }
        Ok(this)
    }

    /// Sends `line` and returns the answer; fails when none comes within 3 s.
    pub fn exchange(&mut self, line: &str) -> anyhow::Result<String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let answer = self.read_line()?;
        if answer == "closed" || answer.starts_with("error") {
            bail!("no answer to {line:?}: {answer}");
        }
        Ok(answer)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line)?;
        Ok(line.trim().to_string())
    }
}

impl Drop for LineConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a testbed left running on purpose (`cargo xtask demo --keep`), and how to remove it.
#[derive(Debug, Default)]
pub struct Kept {
    pub namespaces: Vec<String>,
    pub pids: Vec<u32>,
    /// Agent bpffs directories, removed with `dataplane-agent cleanup`.
    pub bpffs_dirs: Vec<PathBuf>,
    pub work_dirs: Vec<PathBuf>,
    /// Nodes' cgroups: what runs there is killed, then the directory removed.
    pub cgroups: Vec<PathBuf>,
}

impl Kept {
    pub fn merge(mut self, other: Kept) -> Self {
        self.namespaces.extend(other.namespaces);
        self.pids.extend(other.pids);
        self.bpffs_dirs.extend(other.bpffs_dirs);
        self.work_dirs.extend(other.work_dirs);
        self.cgroups.extend(other.cgroups);
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "namespaces": self.namespaces,
            "pids": self.pids,
            "bpffs_dirs": self.bpffs_dirs,
            "work_dirs": self.work_dirs,
            "cgroups": self.cgroups,
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
            cgroups: strings("cgroups").into_iter().map(PathBuf::from).collect(),
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
        for cgroup in &self.cgroups {
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

impl Node {
    /// Leaves the node, its pods and their servers running; returns what to remove later.
    pub fn keep(self) -> Kept {
        let node = std::mem::ManuallyDrop::new(self);
        let mut kept = Kept {
            namespaces: vec![node.netns.name.clone()],
            cgroups: node.netns.cgroup.iter().map(|c| c.path.clone()).collect(),
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
