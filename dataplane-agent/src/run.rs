//! `dataplane-agent run`: load and attach the datapath, then keep the maps equal to the plan
//! computed from the cluster's objects (a manifest directory or the API server), reacting to
//! changes within milliseconds. A change plans and programs again only the services it
//! touched; a periodic full sync re-reads, recomputes and applies everything, in case a change
//! was missed.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use notify::Watcher;
use tracing::{info, warn};

use crate::{
    datapath::{
        BpffsLayout,
        attach::Attachments,
        loader::LoadedDatapath,
        maps::PinnedMaps,
        programmer::Programmer,
        socket_lb::{self, SocketLbMode},
    },
    observe::health::{ProxyHealth, ServiceHealthServer},
    observe::metrics::Metrics,
    plan::{self, NodeContext, Planner},
    problems::ProblemReporter,
    source::objects::{ClusterObjects, Delta, ObjectKey, Touched},
    source::{Inbox, Pending, kube::ClusterWatch, manifests::ManifestDir},
};
use dataplane_common::{CtEntry, CtKey};

pub enum SourceConfig {
    Manifests(PathBuf),
    /// The API server: this kubeconfig, or in-cluster / `KUBECONFIG` when `None`.
    Cluster {
        kubeconfig: Option<PathBuf>,
    },
}

pub struct RunConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub pod_interfaces: Vec<String>,
    /// Interfaces traffic from outside the node arrives on.
    pub external_interfaces: Vec<String>,
    pub bpffs_dir: PathBuf,
    pub map_sizes: crate::datapath::loader::MapSizes,
    /// The plan's node-dependent settings (`local_addresses` is refreshed at every sync).
    pub node: NodeContext,
    /// Where /healthz and /livez are served (kube-proxy's --healthz-bind-address).
    pub healthz_bind_address: std::net::SocketAddr,
    /// Where /metrics is served (kube-proxy's --metrics-bind-address).
    pub metrics_bind_address: std::net::SocketAddr,
    /// Source ports for SNATed external flows (`--snat-port-range`), inclusive.
    pub snat_ports: (u16, u16),
    /// kube-proxy's `--conntrack-*` timeouts.
    pub conntrack_timeouts: crate::datapath::programmer::ConntrackTimeouts,
    /// Which sockets the cgroup hooks translate, and the cgroup v2 directory they attach to.
    pub socket_lb: SocketLbMode,
    /// `None`: the cgroup v2 mount.
    pub cgroup_root: Option<PathBuf>,
}

/// A duration as Go writes it (kube-proxy's flags take these): a sequence of decimal numbers,
/// each with an optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), e.g.
/// `90s`, `1h30m`, `1.5h`; `0` alone means zero.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 90s, 1h30m, 24h)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// `--snat-port-range` when not given (the datapath's own fallback is the same range).
pub const DEFAULT_SNAT_PORT_RANGE: &str = "1024-29999";

/// The ports the node picks for its own connections: `net.ipv4.ip_local_port_range` less
/// `net.ipv4.ip_local_reserved_ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EphemeralPorts {
    pub range: (u16, u16),
    /// Inclusive ranges the kernel never picks.
    pub reserved: Vec<(u16, u16)>,
}

impl EphemeralPorts {
    fn contains(&self, port: u16) -> bool {
        (self.range.0..=self.range.1).contains(&port)
            && !self.reserved.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }
}

/// Checks `--snat-port-range` against the ports the node uses itself: its ephemeral ports
/// (of this network namespace) and the node port range. A SNAT port in either could give a
/// SNATed flow the tuple of one of the node's own connections.
pub fn check_snat_ports(
    snat: (u16, u16),
    node_ports: (u16, u16),
    ephemeral: &EphemeralPorts,
) -> anyhow::Result<()> {
    let range = |(a, b): (u16, u16)| format!("{a}-{b}");
    anyhow::ensure!(snat.0 > 0, "--snat-port-range cannot include port 0");
    anyhow::ensure!(
        !(snat.0..=snat.1).any(|p| ephemeral.contains(p)),
        "--snat-port-range {} overlaps the node's ephemeral ports {} \
         (net.ipv4.ip_local_port_range, less net.ipv4.ip_local_reserved_ports): SNATed flows \
         could take the tuple of the node's own connections; choose a range outside it, or \
         reserve it with net.ipv4.ip_local_reserved_ports",
        range(snat),
        range(ephemeral.range),
    );
    let overlaps = |(a, b): (u16, u16)| snat.0 <= b && a <= snat.1;
    anyhow::ensure!(
        !overlaps(node_ports),
        "--snat-port-range {} overlaps the node port range {} (--service-node-port-range)",
        range(snat),
        range(node_ports),
    );
    Ok(())
}

/// The node's ephemeral ports, as this network namespace has them.
pub fn ephemeral_ports() -> anyhow::Result<EphemeralPorts> {
    let read =
        |path: &str| std::fs::read_to_string(path).with_context(|| format!("reading {path}"));
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = read(path)?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let range = match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) => (low, high),
        _ => anyhow::bail!("{path} holds {text:?}, not two ports"),
    };
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let reserved = parse_port_list(&read(path)?)
        .with_context(|| format!("{path} is not a list of ports and ranges"))?;
    Ok(EphemeralPorts { range, reserved })
}

/// `1000,2000-2100` (the sysctl's format; empty for none) as inclusive ranges.
fn parse_port_list(text: &str) -> Option<Vec<(u16, u16)>> {
    text.trim()
        .split(',')
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => item.parse().ok().map(|p| (p, p)),
        })
        .collect()
}

/// Checks that the objects' source can be read at all (the manifest directory exists, the
/// kubeconfig parses), before anything is loaded, attached or pinned.
pub fn check_source(source: &SourceConfig) -> anyhow::Result<()> {
    match source {
        SourceConfig::Manifests(dir) => {
            let meta =
                std::fs::metadata(dir).with_context(|| format!("--manifests {}", dir.display()))?;
            anyhow::ensure!(
                meta.is_dir(),
                "--manifests {} is not a directory",
                dir.display()
            );
            std::fs::read_dir(dir).with_context(|| format!("--manifests {}", dir.display()))?;
        }
        SourceConfig::Cluster {
            kubeconfig: Some(path),
        } => {
            kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
        }
        SourceConfig::Cluster { kubeconfig: None } => {}
    }
    Ok(())
}

/// kube-proxy calls the proxy unhealthy when a change has waited this long to be programmed
/// (twice its default sync period).
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

/// How often interfaces are listed to find new pods' veths.
const INTERFACE_POLL: Duration = Duration::from_millis(200);
/// How often idle conntrack entries are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(30);
/// A full read, recompute and apply even without change events, in case one was missed.
const RESYNC: Duration = Duration::from_secs(30);

/// Where the objects come from, started and ready to be read.
enum Source {
    Manifests {
        dir: ManifestDir,
        _watcher: notify::RecommendedWatcher,
    },
    /// The watch, and the client (for Events).
    Cluster(ClusterWatch, kube::Client),
}

impl Source {
    async fn start(
        config: &SourceConfig,
        node_name: &str,
        inbox: Arc<Inbox>,
    ) -> anyhow::Result<Self> {
        match config {
            SourceConfig::Manifests(path) => {
                let mut watcher =
                    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                        use notify::{
                            EventKind,
                            event::{AccessKind, AccessMode, ModifyKind},
                        };
                        match event {
                            // A file written in place is read once its writer closes it, not
                            // while it is half written.
                            Ok(e) if matches!(e.kind, EventKind::Modify(ModifyKind::Data(_))) => {}
                            Ok(e)
                                if e.kind
                                    == EventKind::Access(AccessKind::Close(AccessMode::Write)) =>
                            {
                                inbox.push(|p| p.paths.extend(e.paths))
                            }
                            // The agent's own reads of the files must not trigger another read.
                            Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
                            Ok(e) if !e.need_rescan() => inbox.push(|p| p.paths.extend(e.paths)),
                            // Events were lost (queue overflow): only a full read is safe.
                            _ => inbox.push(|p| p.rescan = true),
                        }
                    })?;
                watcher
                    .watch(path, notify::RecursiveMode::Recursive)
                    .with_context(|| format!("watching {}", path.display()))?;
                Ok(Self::Manifests {
                    dir: ManifestDir::new(path),
                    _watcher: watcher,
                })
            }
            SourceConfig::Cluster { kubeconfig } => {
                let client = crate::source::kube::client(kubeconfig.as_deref()).await?;
                let watch = ClusterWatch::start(client.clone(), node_name, inbox);
                Ok(Self::Cluster(watch, client))
            }
        }
    }

    /// The changes in `pending`, the manifest files read as needed (all of them when `full`);
    /// `None` when the directory cannot be read.
    fn changes(&mut self, pending: Pending, full: bool) -> Option<Vec<Delta>> {
        match self {
            Self::Manifests { dir, .. } if full => match dir.rescan() {
                Ok(deltas) => Some(deltas),
                Err(e) => {
                    warn!(dir = %dir.dir().display(), error = %e, "cannot read manifests; keeping the current datapath");
                    None
                }
            },
            Self::Manifests { dir, .. } => Some(dir.update(pending.paths)),
            Self::Cluster(..) => Some(pending.deltas),
        }
    }

    /// Manifest documents skipped since the last call.
    fn take_skipped(&mut self) -> u64 {
        match self {
            Self::Manifests { dir, .. } => dir.take_skipped(),
            Self::Cluster(..) => 0,
        }
    }

    /// The objects are known completely (the API server's first lists are in).
    fn ready(&self) -> bool {
        match self {
            Self::Manifests { .. } => true,
            Self::Cluster(watch, _) => watch.synced(),
        }
    }

    /// The file an object came from, for messages (manifest source only).
    fn origin(&self, object: &ObjectKey) -> Option<&std::path::Path> {
        match self {
            Self::Manifests { dir, .. } => dir.origin(object),
            Self::Cluster(..) => None,
        }
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // Before anything else: a SIGTERM during start-up must stop the agent between steps,
    // never kill it halfway through attaching.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Settings are checked before anything is loaded, attached or pinned.
    check_snat_ports(
        config.snat_ports,
        config.node.nodeport_range,
        &ephemeral_ports()?,
    )?;
    check_source(&config.source)?;
    for glob in config
        .pod_interfaces
        .iter()
        .chain(&config.external_interfaces)
    {
        glob::Pattern::new(glob).with_context(|| format!("interface glob {glob:?}"))?;
    }
    let (socket_lb, cgroup_root) =
        socket_lb::resolve(config.socket_lb, config.cgroup_root.as_deref())?;
    let layout = BpffsLayout::new(&config.bpffs_dir);
    let _lock = layout.lock()?;
    let mut datapath = LoadedDatapath::load(&layout, &config.map_sizes)?;
    let mut programmer =
        Programmer::restore(PinnedMaps::open(&layout)?).context("reading back the pinned maps")?;
    programmer.set_conntrack_timeouts(config.conntrack_timeouts);
    if datapath.fresh_counters {
        programmer.counters_start_at_zero();
    }
    let mut attachments = Attachments::new(&config.pod_interfaces, &config.external_interfaces)?;
    info!(
        bpffs_dir = %layout.dir().display(),
        restored_frontends = programmer.frontend_count(),
        "datapath loaded"
    );
    // Restored state keeps serving while the source starts; attach before the first sync.
    attachments.sync(&mut datapath);
    let mut socket_maps = PinnedMaps::open(&layout)?;
    socket_lb::attach(&mut datapath, &mut socket_maps, socket_lb, &cgroup_root)?;
    datapath.finish_upgrade()?;

    let health = ProxyHealth::new(HEALTHZ_TIMEOUT);
    let listener = tokio::net::TcpListener::bind(config.healthz_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --healthz-bind-address {}",
                config.healthz_bind_address
            )
        })?;
    tokio::spawn(crate::observe::health::serve_proxy_health(
        listener,
        health.clone(),
    ));
    // A first programming that never finishes must show as unhealthy (kube-proxy does this).
    health.updated();
    let service_health = ServiceHealthServer::new(health_check_bind_ip(), health.clone());

    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(config.metrics_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --metrics-bind-address {}",
                config.metrics_bind_address
            )
        })?;
    // Scrapes read the kernel's counters from their own handles on the pinned maps.
    let scrape_maps = std::sync::Mutex::new(PinnedMaps::open(&layout)?);
    let scrape = std::sync::Arc::new(move || {
        let maps = scrape_maps.lock().unwrap_or_else(|p| p.into_inner());
        crate::observe::inspect::metrics_snapshot(&maps).unwrap_or_default()
    });
    tokio::spawn(metrics.clone().serve(listener, scrape));

    let inbox = Arc::new(Inbox::default());
    let source = Source::start(&config.source, &config.node_name, inbox.clone()).await?;
    let mut problems = ProblemReporter::new(metrics.clone());
    if let Source::Cluster(_, client) = &source {
        problems = problems.with_events(client.clone(), &config.node_name);
    }
    let external_globs = config
        .external_interfaces
        .iter()
        .filter_map(|g| glob::Pattern::new(g).ok())
        .collect();
    let mut agent = Agent {
        source,
        inbox,
        objects: ClusterObjects::default(),
        planner: Planner::default(),
        programmer,
        snat_ports: config.snat_ports,
        node: config.node.clone(),
        external_globs,
        health,
        service_health,
        metrics,
        problems,
        touched: Touched::default(),
        rescan: false,
        took_over: false,
        socket_lb,
        socket_maps,
    };
    agent.sync(true);

    let mut interfaces = tokio::time::interval(INTERFACE_POLL);
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    let mut conntrack_gc = tokio::time::interval(CONNTRACK_GC);
    loop {
        tokio::select! {
            // Leading edge: the first change is programmed at once; whatever arrives while a
            // sync runs waits in the inbox and goes together into the next one.
            () = agent.inbox.changed() => {
                agent.health.queued_update();
                agent.metrics.queued();
                agent.sync(false);
            }
            _ = resync.tick() => agent.sync(true),
            _ = conntrack_gc.tick() => {
                let removed = agent.programmer.collect_conntrack(crate::observe::inspect::monotonic_ns());
                if removed > 0 {
                    tracing::debug!(removed, "idle conntrack entries removed");
                }
            }
            _ = interfaces.tick() => attachments.sync(&mut datapath),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    // Programs, links and maps stay pinned: traffic keeps flowing until the next agent.
    info!(attached = ?attachments.attached().collect::<Vec<_>>(), "stopping; datapath left in place");
    Ok(())
}

/// Seeds conntrack with the kernel's NATed flows to `frontends` (kube-proxy's, during a
/// switch-over) so they keep their backends once the datapath serves the frontends.
fn adopt_kernel_flows(
    programmer: &mut Programmer,
    frontends: &[&crate::plan::Frontend],
) -> Vec<(CtKey, CtEntry)> {
    use crate::datapath::takeover;
    let flows = match takeover::kernel_nat_flows() {
        Ok(flows) => flows,
        Err(e) => {
            warn!(error = %e, "cannot read the kernel's connection tracking (ctnetlink); connections NATed by kube-proxy will be balanced anew");
            return vec![];
        }
    };
    let wanted = frontends.iter().map(|f| f.frontend).collect();
    let entries = takeover::entries_for(&flows, &wanted, crate::observe::inspect::monotonic_ns());
    let adopted = programmer.adopt_flows(&entries);
    info!(
        kernel_nat_flows = flows.len(),
        adopted_entries = adopted,
        "took over connections from the kernel's connection tracking"
    );
    entries
}

/// The loop's state: where objects come from, the objects, the plan, what the maps hold, and
/// what changed but is not programmed yet.
struct Agent {
    source: Source,
    inbox: Arc<Inbox>,
    objects: ClusterObjects,
    planner: Planner,
    programmer: Programmer,
    snat_ports: (u16, u16),
    node: NodeContext,
    external_globs: Vec<glob::Pattern>,
    health: Arc<ProxyHealth>,
    service_health: ServiceHealthServer,
    metrics: Arc<Metrics>,
    problems: ProblemReporter,
    /// Changes applied to `objects` and not programmed yet (the source was not ready).
    touched: Touched,
    /// The directory could not be read at the last full sync: read it all again.
    rescan: bool,
    /// The kernel's NATed flows were adopted (once, before the first programming).
    took_over: bool,
    socket_lb: SocketLbMode,
    /// Handles on the pinned maps for the socket hooks' state.
    socket_maps: PinnedMaps,
}

impl Agent {
    /// Programs what changed since the last sync: the services touched, or, when `full`,
    /// every service (the whole plan is applied and anything else programmed goes).
    fn sync(&mut self, full: bool) {
        let started = std::time::Instant::now();
        let pending = self.inbox.take();
        let full = full || pending.rescan || self.rescan;
        let changes = self.source.changes(pending, full);
        self.problems.invalid_manifests(self.source.take_skipped());
        let Some(deltas) = changes else {
            self.rescan = true;
            return;
        };
        self.rescan = false;
        for delta in deltas {
            self.objects
                .apply(delta, &self.node.name, &mut self.touched);
        }
        if !self.source.ready() {
            return;
        }
        let touched = std::mem::take(&mut self.touched);
        self.refresh_addresses();
        self.health.set_node(self.objects.node());
        // SNAT for external traffic uses the node's primary address of each family.
        let primary = plan::primary_addresses(&self.objects);
        for ipv6 in [false, true] {
            let of_family = |ip: &&std::net::IpAddr| ip.is_ipv6() == ipv6;
            let addr = (primary.iter().find(of_family)).or(self
                .node
                .local_addresses
                .iter()
                .find(of_family));
            if let Some(addr) = addr
                && let Err(e) = self.programmer.set_snat(*addr, self.snat_ports)
            {
                warn!(error = %e, %addr, "cannot write the SNAT address");
            }
        }
        let read_us = started.elapsed().as_micros() as u64;
        let update = self.planner.update(
            &self.objects,
            &self.node,
            (!full).then_some(&touched.services),
        );
        for problem in &update.problems {
            let uid = self.objects.services().get(&problem.service);
            let uid = uid.and_then(|s| s.metadata.uid.as_deref());
            let file = self.source.origin(&problem.object);
            self.problems.report(problem, file, uid);
        }
        let plan_us = started.elapsed().as_micros() as u64 - read_us;
        let report = if update.all {
            let frontends = self.planner.frontends();
            // Before the first programming: connections kube-proxy's rules opened.
            let adopted = if self.took_over {
                vec![]
            } else {
                self.took_over = true;
                adopt_kernel_flows(&mut self.programmer, &frontends)
            };
            let report = self.programmer.apply_all(&frontends);
            self.programmer.label_adopted_flows(&adopted);
            report
        } else {
            let frontends = self.planner.frontends_of(&update.services);
            self.programmer.apply_changes(&frontends, &update.removed)
        };
        self.health.updated();
        for _ in &report.failures {
            self.problems.map_write_failed();
        }
        if report.writes + report.deletes > 0 {
            self.terminate_stale_udp_sockets();
        }
        self.record_sync(&touched, started.elapsed());
        for (port, error) in self.service_health.sync(&self.planner.health_checks()) {
            warn!(port, %error, "cannot serve a health check node port; retrying at the next sync");
        }
        if report.writes + report.deletes > 0 {
            info!(
                frontends = self.planner.frontend_count(),
                services = update.services.len(),
                writes = report.writes,
                deletes = report.deletes,
                elapsed_us = started.elapsed().as_micros() as u64,
                read_us,
                plan_us,
                "datapath programmed"
            );
        }
    }

    /// kube-proxy's sync metrics: duration, what changed since the last sync, services whose
    /// traffic policy leaves this node without endpoints, and programming latency from each
    /// changed EndpointSlice's last-change-trigger-time.
    fn record_sync(&mut self, touched: &Touched, elapsed: Duration) {
        let now = std::time::SystemTime::now();
        for trigger in &touched.triggers {
            if let Ok(latency) = now.duration_since(*trigger) {
                self.metrics.network_programming(latency);
            }
        }
        let (no_local_internal, no_local_external) = self.planner.no_local_endpoints();
        self.metrics.synced(
            elapsed,
            touched.service_changes,
            touched.slice_changes,
            no_local_internal,
            no_local_external,
        );
    }

    /// Connected UDP sockets whose backend is no longer an endpoint of their service are
    /// terminated, so their applications reconnect to a current one (kube-proxy flushes such
    /// flows' conntrack entries; a connected socket would otherwise keep sending to the gone
    /// pod's address).
    fn terminate_stale_udp_sockets(&mut self) {
        if self.socket_lb == SocketLbMode::Off {
            return;
        }
        let mut endpoints = socket_lb::UdpEndpoints::new();
        for frontend in self.planner.frontends() {
            if frontend.frontend.protocol != plan::Protocol::Udp {
                continue;
            }
            // Socket-level load balancing translates IPv4 sockets only.
            let std::net::SocketAddr::V4(addr) = frontend.frontend.addr else {
                continue;
            };
            let set = endpoints
                .entry((addr.ip().octets(), addr.port()))
                .or_default();
            let all = frontend
                .backends
                .iter()
                .chain(frontend.internal_backends.iter().flatten())
                .chain(&frontend.retained);
            set.extend(all.filter_map(|b| match b {
                std::net::SocketAddr::V4(b) => Some((b.ip().octets(), b.port())),
                std::net::SocketAddr::V6(_) => None,
            }));
        }
        let entries = self.socket_maps.sockets.iter().flatten();
        let stale = socket_lb::stale_udp_translations(entries, &endpoints);
        let terminated =
            socket_lb::end_stale_udp_translations(&mut self.socket_maps, &stale, self.socket_lb);
        if terminated > 0 {
            info!(
                terminated,
                "connected UDP sockets whose backend left were terminated"
            );
        }
    }

    /// This node's addresses, those on external interfaces first (the first is the SNAT
    /// address when the Node object names no InternalIP).
    fn refresh_addresses(&mut self) {
        match crate::datapath::attach::local_addresses() {
            Ok(list) => {
                let globs = &self.external_globs;
                let (external, other): (Vec<_>, Vec<_>) = list
                    .into_iter()
                    .partition(|(name, _)| globs.iter().any(|g| g.matches(name)));
                self.node.local_addresses = external
                    .into_iter()
                    .chain(other)
                    .map(|(_, ip)| ip)
                    .filter(|ip| !ip.is_loopback())
                    .collect();
            }
            Err(e) => warn!(error = %e, "cannot list this node's addresses"),
        }
    }
}

/// Where the health check node ports listen: `::` when a socket there takes both families
/// (IPv6 is on and `net.ipv6.bindv6only` is 0, Linux's default), so load balancers of either
/// family can probe them; else `0.0.0.0`.
fn health_check_bind_ip() -> std::net::IpAddr {
    let dual_stack = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .is_ok_and(|v| v.trim() == "0")
        && std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok();
    if dual_stack {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{
        DEFAULT_SNAT_PORT_RANGE, EphemeralPorts, SourceConfig, check_snat_ports, check_source,
        parse_go_duration, parse_port_list,
    };

    #[test]
    fn sources_that_cannot_be_read_are_refused_with_the_flag_named() {
        let dir = tempfile::tempdir().unwrap();
        check_source(&SourceConfig::Manifests(dir.path().into())).unwrap();
        let missing = check_source(&SourceConfig::Manifests("/nonexistent".into()))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("--manifests /nonexistent"), "{missing}");
        let file = dir.path().join("svc.yaml");
        std::fs::write(&file, "kind: Service\n").unwrap();
        assert!(check_source(&SourceConfig::Manifests(file.clone())).is_err());
        let kubeconfig = check_source(&SourceConfig::Cluster {
            kubeconfig: Some(dir.path().join("nope")),
        })
        .unwrap_err();
        assert!(
            format!("{kubeconfig:#}").contains("--kubeconfig"),
            "{kubeconfig:#}"
        );
    }

    #[test]
    fn durations_parse_as_go_writes_them() {
        let secs = Duration::from_secs;
        assert_eq!(parse_go_duration("24h"), Ok(secs(86_400)));
        assert_eq!(parse_go_duration("1h30m"), Ok(secs(5_400)));
        assert_eq!(parse_go_duration("1.5h"), Ok(secs(5_400)));
        assert_eq!(parse_go_duration("90s"), Ok(secs(90)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "1d", "h", "-5s", "1h x"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }

    const NODE_PORTS: (u16, u16) = (30000, 32767);

    fn linux_default() -> EphemeralPorts {
        EphemeralPorts {
            range: (32768, 60999),
            reserved: vec![],
        }
    }

    #[test]
    fn the_default_snat_range_is_clear_of_linux_defaults_and_the_datapath_agrees() {
        let (low, high) = DEFAULT_SNAT_PORT_RANGE.split_once('-').unwrap();
        let default = (low.parse().unwrap(), high.parse().unwrap());
        assert_eq!(default, dataplane_common::DEFAULT_SNAT_PORTS);
        check_snat_ports(default, NODE_PORTS, &linux_default()).unwrap();
    }

    #[test]
    fn snat_ranges_overlapping_the_nodes_own_ports_are_refused_with_the_flag_named() {
        let ephemeral = check_snat_ports((32000, 33000), NODE_PORTS, &linux_default())
            .unwrap_err()
            .to_string();
        assert!(
            ephemeral.contains("--snat-port-range 32000-33000"),
            "{ephemeral}"
        );
        assert!(ephemeral.contains("32768-60999"), "{ephemeral}");
        let node_ports = check_snat_ports((29000, 30001), NODE_PORTS, &linux_default())
            .unwrap_err()
            .to_string();
        assert!(
            node_ports.contains("node port range 30000-32767"),
            "{node_ports}"
        );
        assert!(check_snat_ports((0, 10), NODE_PORTS, &linux_default()).is_err());
        check_snat_ports((20000, 29999), NODE_PORTS, &linux_default()).unwrap();
    }

    #[test]
    fn reserved_ports_make_room_inside_a_wide_ephemeral_range() {
        let wide = EphemeralPorts {
            range: (1024, 65535),
            reserved: parse_port_list("61000-65535\n").unwrap(),
        };
        check_snat_ports((61000, 65535), NODE_PORTS, &wide).unwrap();
        assert!(check_snat_ports((60000, 61000), NODE_PORTS, &wide).is_err());
        assert_eq!(parse_port_list("\n"), Some(vec![]));
        assert_eq!(
            parse_port_list("80,8000-8100\n"),
            Some(vec![(80, 80), (8000, 8100)])
        );
        assert_eq!(parse_port_list("x"), None);
    }
}
