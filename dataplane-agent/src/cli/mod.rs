//! The command line: `run` (the agent) and the tools, parsed by clap and dispatched here.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

pub mod output;
use dataplane_agent::{
    datapath::{
        BpffsLayout, attach,
        layout::DEFAULT_BPFFS_DIR,
        maps::PinnedMaps,
        programmer::ConntrackTimeouts,
        socket_lb::{self, SocketLbMode},
    },
    observe::inspect::{self, FlowSort},
    plan::{self, Algorithm, Cidr, NodeContext, Protocol},
    run::{RunConfig, SourceConfig, parse_go_duration, run},
    source::{kube as kube_source, manifests::ManifestDir, objects::ClusterObjects},
};
use output::{GraphOutput, Output, emit, print_json, render_svg};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF service dataplane replacing kube-proxy: node agent and tools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text for people or JSON for log pipelines (level from RUST_LOG).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where Kubernetes objects come from: a manifest directory, or the API server (in-cluster
/// config, `--kubeconfig`, or `KUBECONFIG`).
#[derive(clap::Args)]
pub struct SourceArgs {
    /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON), watched.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig file for the API server (default: in-cluster config, then KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

impl SourceArgs {
    fn config(&self) -> SourceConfig {
        match &self.manifests {
            Some(dir) => SourceConfig::Manifests(dir.clone()),
            None => SourceConfig::Cluster {
                kubeconfig: self.kubeconfig.clone(),
            },
        }
    }

    fn load_once(&self, node_name: &str) -> anyhow::Result<ClusterObjects> {
        match self.config() {
            SourceConfig::Manifests(path) => {
                let mut dir = ManifestDir::new(&path);
                let (objects, _skipped) = dir
                    .load(node_name)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(objects)
            }
            SourceConfig::Cluster { kubeconfig } => runtime()?.block_on(async {
                let client = kube_source::client(kubeconfig.as_deref()).await?;
                kube_source::load_once(client, node_name).await
            }),
        }
    }
}

/// Settings the plan depends on besides the objects.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// CIDRs (IPv4 or IPv6) whose local addresses serve node ports (default: the node's
    /// InternalIPs, of each family).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    nodeport_addresses: Vec<Cidr>,
    /// The cluster's node port range, as the API server's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: (u16, u16),
    /// Backend choice for new flows on every frontend (default: Maglev on external frontends,
    /// random on cluster IPs). The annotation dataplane.dev/lb-algorithm overrides it per
    /// service.
    #[arg(long, value_enum)]
    lb_algorithm: Option<Algorithm>,
    /// At most this many frontends (ports x addresses) for one Service: beyond it, its
    /// external IPs, then its load-balancer IPs, then its last ports are left out, and the
    /// Service gets a Warning.
    #[arg(long, default_value_t = plan::DEFAULT_MAX_FRONTENDS_PER_SERVICE, value_parser = parse_count)]
    max_frontends_per_service: usize,
    /// At most this many frontends on the node: a Service that would pass it is not
    /// programmed, as if the map were full (raise it with the frontend maps' --map-size).
    #[arg(long, default_value_t = plan::DEFAULT_MAX_FRONTENDS, value_parser = parse_count)]
    max_frontends: usize,
}

impl NodeArgs {
    fn context(&self, node_name: &str) -> NodeContext {
        NodeContext {
            nodeport_cidrs: self.nodeport_addresses.clone(),
            nodeport_range: self.service_node_port_range,
            algorithm: self.lb_algorithm,
            max_frontends_per_service: self.max_frontends_per_service,
            max_frontends: self.max_frontends,
            local_addresses: attach::local_addresses()
                .map(|l| {
                    l.into_iter()
                        .map(|(_, ip)| ip)
                        .filter(|ip| !ip.is_loopback())
                        .collect()
                })
                .unwrap_or_default(),
            ..NodeContext::named(node_name)
        }
    }
}

/// `IP`, `IP:PORT`, `[IPv6]:PORT` or a bare IPv6 address.
fn parse_from(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port())));
    }
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|e| format!("{text:?}: {e} (IP, IP:PORT or [IPv6]:PORT)"))
}

/// `IP:PORT/PROTO` or `[IPv6]:PORT/PROTO`.
fn parse_to(text: &str) -> Result<(std::net::SocketAddr, Protocol), String> {
    let (addr, proto) = text.rsplit_once('/').ok_or("expected IP:PORT/PROTO")?;
    let protocol = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => return Err(format!("protocol {other}: TCP or UDP")),
    };
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok((addr, protocol))
}

fn parse_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    Cidr::parse(text)
}

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text.split_once('-').ok_or("expected LOW-HIGH")?;
    let parse = |t: &str| t.trim().parse::<u16>().map_err(|e| format!("{t:?}: {e}"));
    let (low, high) = (parse(low)?, parse(high)?);
    if low > high {
        return Err(format!("{low} is above {high}"));
    }
    Ok((low, high))
}

fn parse_map_size(text: &str) -> Result<(String, u32), String> {
    let (name, entries) = text.split_once('=').ok_or("expected NAME=ENTRIES")?;
    let entries = entries.parse().map_err(|e| format!("{entries:?}: {e}"))?;
    Ok((name.to_string(), entries))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[derive(Subcommand)]
// Parsed once per process: `run`'s many flags need no box.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Program the datapath from Kubernetes objects and keep it in sync.
    Run {
        #[command(flatten)]
        source: SourceArgs,
        /// This node's name (selects its Node object).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Globs of pod-facing interfaces to attach to, now and as they appear.
        #[arg(long, value_delimiter = ',', required = true)]
        pod_interfaces: Vec<String>,
        /// Globs of the node's external interfaces (node ports, load-balancer and external IPs
        /// are served there, and other nodes' replies arrive there): uplinks and the overlay
        /// devices of common CNIs (Calico IPIP, VXLAN and WireGuard; flannel VXLAN and
        /// WireGuard).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "eth*,ens*,eno*,enp*,bond*,tunl0,vxlan.calico,wireguard.cali,flannel.1,flannel-wg"
        )]
        external_interfaces: Vec<String>,
        /// Source ports for traffic SNATed to the node (externalTrafficPolicy Cluster), as
        /// LOW-HIGH: outside the node's ephemeral ports (net.ipv4.ip_local_port_range) and
        /// the node port range, so a SNATed flow never takes the tuple of the node's own
        /// connection. Checked at start.
        #[arg(long, default_value = dataplane_agent::run::DEFAULT_SNAT_PORT_RANGE, value_parser = parse_port_range)]
        snat_port_range: (u16, u16),
        /// Idle time after which an open TCP connection is forgotten (kube-proxy's flag).
        #[arg(long, default_value = "24h", value_parser = parse_go_duration)]
        conntrack_tcp_timeout_established: Duration,
        /// Idle time after which a TCP connection that sent a FIN (possibly half-closed,
        /// still carrying data the other way) is forgotten (kube-proxy's flag).
        #[arg(long, default_value = "1h", value_parser = parse_go_duration)]
        conntrack_tcp_timeout_close_wait: Duration,
        /// Idle time after which a UDP flow that never saw a reply is forgotten (kube-proxy's
        /// flag; default Linux's nf_conntrack_udp_timeout).
        #[arg(long, default_value = "30s", value_parser = parse_go_duration)]
        conntrack_udp_timeout: Duration,
        /// Idle time after which a UDP flow that saw replies is forgotten (kube-proxy's flag;
        /// default Linux's nf_conntrack_udp_timeout_stream).
        #[arg(long, default_value = "120s", value_parser = parse_go_duration)]
        conntrack_udp_timeout_stream: Duration,
        /// Which sockets are translated at connect()/sendmsg() by cgroup hooks: `host`, the
        /// node's own processes (host-network pods, node daemons), which the tc programs
        /// cannot see; `all`, pods' sockets too (their established packets then skip
        /// per-packet NAT, but a service mesh sidecar sees the backend, not the service);
        /// `off`, none.
        #[arg(long, value_enum, default_value = "host")]
        socket_lb: SocketLbMode,
        /// The cgroup v2 directory the socket hooks attach to; processes outside it are never
        /// translated. Default: the cgroup v2 mount (/sys/fs/cgroup, or
        /// /sys/fs/cgroup/unified on hybrid hosts).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
        /// Where /healthz and /livez are served, as kube-proxy's flag.
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: std::net::SocketAddr,
        /// Where Prometheus /metrics is served, as kube-proxy's flag.
        #[arg(long, default_value = dataplane_agent::observe::metrics::DEFAULT_METRICS_BIND_ADDRESS)]
        metrics_bind_address: std::net::SocketAddr,
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Capacity of a map when it is created, as NAME=ENTRIES (repeatable), e.g.
        /// dp_ct_tcp_v3=1048576.
        #[arg(long = "map-size", value_parser = parse_map_size)]
        map_sizes: Vec<(String, u32)>,
    },
    /// Print, without touching the kernel, every frontend this node would program and the
    /// backends new connections there would use.
    Plan {
        #[command(flatten)]
        source: SourceArgs,
        /// The node to plan for (locality and topology hints depend on it).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove every program link and pin the agent made under the bpffs directory.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Frontends and their backends as the pinned maps hold them.
    Services {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Backends as the pinned maps hold them, with the services using them and counters.
    Backends {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Conntrack entries: client, frontend, backend, and packets/bytes each way.
    Flows {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Only flows of this service (`namespace/name`, or `name`).
        #[arg(long)]
        service: Option<String>,
        /// Only flows to this backend (`ip` or `ip:port`).
        #[arg(long)]
        backend: Option<String>,
        /// Only flows with this address on any side.
        #[arg(long)]
        ip: Option<String>,
        #[arg(long, value_enum, default_value = "frontend")]
        sort: FlowSort,
        /// Refresh every second, like top (table output).
        #[arg(long)]
        watch: bool,
    },
    /// Per-service and per-backend traffic, drops by reason, and each map's fill.
    Stats {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run the live program on a synthetic packet (BPF_PROG_TEST_RUN, live maps) and show what
    /// it did: frontend, backend and why, translation, verdict. Leaves no state behind.
    Trace {
        /// Source address, with a port or not (a free one is picked). Needed for the pod and
        /// external entries; with `--entry host`, the socket is bound to it if given.
        #[arg(long, value_parser = parse_from)]
        from: Option<(IpAddr, Option<u16>)>,
        /// Destination as IP:PORT/PROTO, e.g. 10.96.0.10:80/TCP or
        /// [fd00:10:96::a]:80/TCP.
        #[arg(long, value_parser = parse_to)]
        to: (std::net::SocketAddr, Protocol),
        /// The program the packet enters: from a pod, or from an external interface; or
        /// `host`: a real connection from this process through the socket hooks.
        #[arg(long, value_enum, default_value = "pod")]
        entry: dataplane_agent::observe::trace::Entry,
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Who talks to which service and which backends serve it, from the current flows.
    Graph {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "dot")]
        output: GraphOutput,
    },
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: in `kubectl logs` and files they are escape-code noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs one command.
pub fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            source,
            node_name,
            pod_interfaces,
            external_interfaces,
            node,
            healthz_bind_address,
            metrics_bind_address,
            bpffs_dir,
            map_sizes,
            snat_port_range,
            conntrack_tcp_timeout_established,
            conntrack_tcp_timeout_close_wait,
            conntrack_udp_timeout,
            conntrack_udp_timeout_stream,
            socket_lb,
            cgroup_root,
        } => {
            let config = RunConfig {
                socket_lb,
                cgroup_root,
                snat_ports: snat_port_range,
                conntrack_timeouts: ConntrackTimeouts {
                    tcp_established: conntrack_tcp_timeout_established,
                    tcp_close_wait: conntrack_tcp_timeout_close_wait,
                    udp: conntrack_udp_timeout,
                    udp_stream: conntrack_udp_timeout_stream,
                },
                source: source.config(),
                node: node.context(&node_name),
                node_name,
                pod_interfaces,
                external_interfaces,
                bpffs_dir,
                map_sizes: map_sizes.into_iter().collect(),
                healthz_bind_address,
                metrics_bind_address,
            };
            runtime()?.block_on(run(config))
        }
        Command::Plan {
            source,
            node_name,
            node,
            output,
        } => {
            let objects = source.load_once(&node_name)?;
            let plan = dataplane_agent::plan::compute(&objects, &node.context(&node_name));
            for problem in &plan.problems {
                eprintln!("skipped: {problem}");
            }
            let list: Vec<_> = plan.frontends.iter().map(|f| f.to_json()).collect();
            emit(output, &list, |_| inspect::print_plan(&plan))
        }
        Command::Cleanup { bpffs_dir } => cleanup(&BpffsLayout::new(bpffs_dir)),
        Command::Services { bpffs_dir, output } => {
            let maps = PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?;
            let views = inspect::services(&maps)?;
            emit(output, &views, |v| inspect::print_services(v))
        }
        Command::Backends { bpffs_dir, output } => {
            let views = inspect::backends(&PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?)?;
            emit(output, &views, |v| inspect::print_backends(v))
        }
        Command::Flows {
            bpffs_dir,
            output,
            service,
            backend,
            ip,
            sort,
            watch,
        } => {
            let maps = PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?;
            let filter = inspect::FlowFilter {
                service,
                backend,
                ip,
            };
            loop {
                let mut views: Vec<_> = inspect::flows(&maps)?
                    .into_iter()
                    .filter(|f| filter.matches(f))
                    .collect();
                inspect::sort_flows(&mut views, sort);
                emit(output, &views, |views| {
                    if watch {
                        print!("\x1b[2J\x1b[H"); // clear the screen, as top does
                    }
                    inspect::print_flows(views);
                })?;
                if !watch {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Command::Trace {
            from,
            to,
            entry,
            bpffs_dir,
            output,
        } => {
            let host = entry == dataplane_agent::observe::trace::Entry::Host;
            anyhow::ensure!(
                from.is_some() || host,
                "--from is needed with --entry pod or external"
            );
            let unspecified: IpAddr = match to.0 {
                std::net::SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            let from = from.unwrap_or((unspecified, None));
            // A real socket (host) binds only what was asked; a synthetic packet needs a port.
            let port = match from.1 {
                Some(port) => port,
                None if host => 0,
                None => 40000 + (std::process::id() % 20000) as u16,
            };
            let layout = BpffsLayout::new(bpffs_dir);
            let result = dataplane_agent::observe::trace::trace(
                &layout,
                std::net::SocketAddr::new(from.0, port),
                to.0,
                to.1,
                entry,
            )?;
            emit(output, &result, dataplane_agent::observe::trace::print)
        }
        Command::Stats { bpffs_dir, output } => {
            let view = inspect::stats_view(&PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?)?;
            emit(output, &view, inspect::print_stats)
        }
        Command::Graph { bpffs_dir, output } => {
            let flows = inspect::flows(&PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?)?;
            let edges = inspect::graph(&flows);
            match output {
                GraphOutput::Json => print_json(&serde_json::json!({ "edges": edges })),
                GraphOutput::Dot => {
                    print!("{}", inspect::graph_dot(&edges));
                    Ok(())
                }
                GraphOutput::Svg => {
                    let svg = render_svg(&inspect::graph_dot(&edges))?;
                    print!("{svg}");
                    Ok(())
                }
            }
        }
    }
}

fn cleanup(layout: &BpffsLayout) -> anyhow::Result<()> {
    if !layout.dir().exists() {
        eprintln!(
            "nothing to clean up: {} does not exist",
            layout.dir().display()
        );
        return Ok(());
    }
    // Not under a running agent: it would attach again what this detaches.
    let _lock = layout.lock()?;
    for link in attach::detach_all(layout)
        .into_iter()
        .chain(socket_lb::detach_all(layout))
    {
        eprintln!("detached {link}");
    }
    let mut pins: Vec<PathBuf> = dataplane_common::PROGRAMS
        .iter()
        .chain(&dataplane_common::SOCKET_PROGRAMS)
        .map(|name| layout.program(name))
        .collect();
    pins.extend(
        (dataplane_common::map_names::ALL.iter())
            .chain(&dataplane_common::map_names::RETIRED)
            // An upgrade's old conntrack, should an agent have stopped before moving it.
            .chain(&[
                dataplane_common::map_names::CONNTRACK_V1,
                dataplane_common::map_names::CONNTRACK_V2,
                dataplane_common::map_names::CONNTRACK_TCP_V3,
            ])
            .map(|name| layout.map(name)),
    );
    for pin in pins {
        if std::fs::remove_file(&pin).is_ok() {
            eprintln!("removed {}", pin.display());
        }
    }
    let _ = std::fs::remove_dir(layout.egress_links_dir());
    let _ = std::fs::remove_dir(layout.links_dir());
    std::fs::remove_dir(layout.dir()).with_context(|| {
        format!(
            "{} still holds files this agent did not make",
            layout.dir().display()
        )
    })?;
    eprintln!("removed {}", layout.dir().display());
    Ok(())
}
