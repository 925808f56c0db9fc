//! `dataplane-agent run`: load and attach the datapath, then keep the maps equal to the plan
//! computed from the cluster's objects (a manifest directory or the API server), reacting to
//! changes within milliseconds. Level-triggered: every change recomputes the whole plan and
//! applies the difference.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use notify::Watcher;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    datapath::{
        BpffsLayout, attach::Attachments, loader::LoadedDatapath, maps::PinnedMaps,
        programmer::Programmer,
    },
    health::{ProxyHealth, ServiceHealthServer},
    metrics::Metrics,
    objects::ClusterObjects,
    plan::{self, NodeContext, Problem},
    source::{kube::ClusterWatch, manifests::ManifestDir},
};

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
}

/// kube-proxy calls the proxy unhealthy when a change has waited this long to be programmed
/// (twice its default sync period).
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

/// How often interfaces are listed to find new pods' veths.
const INTERFACE_POLL: Duration = Duration::from_millis(200);
/// Changes closer together than this are programmed together.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// How often idle conntrack entries are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(30);
/// A full recompute even without change events, in case one was missed.
const RESYNC: Duration = Duration::from_secs(30);

/// Where the objects come from, started and ready to be read.
enum Source {
    Manifests {
        dir: ManifestDir,
        _watcher: notify::RecommendedWatcher,
    },
    Cluster(ClusterWatch),
}

impl Source {
    async fn start(
        config: &SourceConfig,
        node_name: &str,
        changed: mpsc::Sender<()>,
    ) -> anyhow::Result<Self> {
        match config {
            SourceConfig::Manifests(path) => {
                let mut watcher =
                    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                        // Only what changes the objects: the agent's own reads of the files
                        // (access events) must not trigger another read.
                        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                            let _ = changed.try_send(());
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
                Ok(Self::Cluster(ClusterWatch::start(
                    client, node_name, changed,
                )))
            }
        }
    }

    /// The complete current objects, or `None` while they are not known completely (the
    /// first lists are not in yet, or the directory cannot be read).
    fn snapshot(&mut self, node_name: &str) -> Option<ClusterObjects> {
        match self {
            Self::Manifests { dir, .. } => match dir.load(node_name) {
                Ok((objects, _skipped)) => Some(objects),
                Err(e) => {
                    warn!(dir = %dir.dir().display(), error = %e, "cannot read manifests; keeping the current datapath");
                    None
                }
            },
            Self::Cluster(watch) => watch.synced().then(|| watch.snapshot(node_name)),
        }
    }

    /// The file an object came from, for messages (manifest source only).
    fn origin(&self, object: &str) -> String {
        match self {
            Self::Manifests { dir, .. } => dir
                .origin(object)
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            Self::Cluster(_) => String::new(),
        }
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // Before anything else: a SIGTERM during start-up must stop the agent between steps,
    // never kill it halfway through attaching.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let layout = BpffsLayout::new(&config.bpffs_dir);
    let mut datapath = LoadedDatapath::load(&layout, &config.map_sizes)?;
    let programmer =
        Programmer::restore(PinnedMaps::open(&layout)?).context("reading back the pinned maps")?;
    let mut attachments = Attachments::new(&config.pod_interfaces, &config.external_interfaces)?;
    info!(
        bpffs_dir = %layout.dir().display(),
        restored_frontends = programmer.frontend_count(),
        "datapath loaded"
    );
    // Restored state keeps serving while the source starts; attach before the first sync.
    attachments.sync(&mut datapath);

    let health = ProxyHealth::new(HEALTHZ_TIMEOUT);
    let listener = tokio::net::TcpListener::bind(config.healthz_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --healthz-bind-address {}",
                config.healthz_bind_address
            )
        })?;
    tokio::spawn(crate::health::serve_proxy_health(listener, health.clone()));
    // A first programming that never finishes must show as unhealthy (kube-proxy does this).
    health.updated();
    let service_health =
        ServiceHealthServer::new(std::net::Ipv4Addr::UNSPECIFIED.into(), health.clone());

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
        crate::inspect::metrics_snapshot(&maps).unwrap_or_default()
    });
    tokio::spawn(metrics.clone().serve(listener, scrape));

    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let source = Source::start(&config.source, &config.node_name, changed_tx).await?;
    let external_globs = config
        .external_interfaces
        .iter()
        .filter_map(|g| glob::Pattern::new(g).ok())
        .collect();
    let mut agent = Agent {
        source,
        programmer,
        node: config.node.clone(),
        external_globs,
        reported: BTreeSet::new(),
        health,
        service_health,
        metrics,
        previous: ClusterObjects::default(),
    };
    agent.sync();

    let mut interfaces = tokio::time::interval(INTERFACE_POLL);
    let mut resync = tokio::time::interval(RESYNC);
    let mut conntrack_gc = tokio::time::interval(CONNTRACK_GC);
    loop {
        tokio::select! {
                                    Some(()) = changed.recv() => {
                agent.health.queued_update();
                agent.metrics.queued();
                tokio::time::sleep(DEBOUNCE).await;
                while changed.try_recv().is_ok() {}
                agent.sync();
            }
                        _ = resync.tick() => agent.sync(),
            _ = conntrack_gc.tick() => {
                let removed = agent.programmer.collect_conntrack(crate::inspect::monotonic_ns());
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

/// The level-triggered loop's state: where objects come from, what the maps hold, and what
/// has been reported already.
struct Agent {
    source: Source,
    programmer: Programmer,
    node: NodeContext,
    external_globs: Vec<glob::Pattern>,
    reported: BTreeSet<Problem>,
    health: std::sync::Arc<ProxyHealth>,
    service_health: ServiceHealthServer,
    metrics: std::sync::Arc<Metrics>,
    /// The objects of the last sync, to count what changed.
    previous: ClusterObjects,
}

impl Agent {
    /// Recomputes the whole plan and applies the difference.
    fn sync(&mut self) {
        let started = std::time::Instant::now();
        self.refresh_addresses();
        let Some(objects) = self.source.snapshot(&self.node.name) else {
            return;
        };
        self.health.set_node(objects.node.as_deref());
        // SNAT for external traffic uses the node's primary address.
        let primary = plan::primary_addresses(&objects);
        if let Some(addr) = primary.first().or(self.node.local_addresses.first())
            && let Err(e) = self.programmer.set_snat_address(*addr)
        {
            warn!(error = %e, "cannot write the SNAT address");
        }
        let plan = plan::compute(&objects, &self.node);
        let problems: BTreeSet<Problem> = plan.problems.iter().cloned().collect();
        for problem in problems.difference(&self.reported) {
            let kind = problem
                .object
                .split_whitespace()
                .next()
                .unwrap_or("object")
                .to_lowercase();
            self.metrics.skipped(&kind);
            let file = self.source.origin(&problem.object);
            warn!(object = %problem.object, file, reason = %problem.reason, "skipping");
        }
        self.reported = problems;
        let report = self.programmer.apply(&plan);
        self.health.updated();
        for _ in &report.failures {
            self.metrics.skipped("map_full_or_write_failed");
        }
        self.record_sync(objects, &plan, started.elapsed());
        for (port, error) in self.service_health.sync(&plan.health_checks) {
            warn!(port, %error, "cannot serve a health check node port; retrying at the next sync");
        }
        if report.writes + report.deletes > 0 {
            info!(
                frontends = plan.frontends.len(),
                writes = report.writes,
                deletes = report.deletes,
                elapsed_us = started.elapsed().as_micros() as u64,
                "datapath programmed"
            );
        }
    }

    /// kube-proxy's sync metrics: duration, what changed since the last sync, services whose
    /// traffic policy leaves this node without endpoints, and programming latency from each
    /// changed EndpointSlice's last-change-trigger-time.
    fn record_sync(&mut self, objects: ClusterObjects, plan: &plan::Plan, elapsed: Duration) {
        /// Names added, removed or changed; an unchanged object is usually the same allocation,
        /// so the comparison is a pointer check.
        fn changed<T: PartialEq>(
            old: &std::collections::BTreeMap<String, std::sync::Arc<T>>,
            new: &std::collections::BTreeMap<String, std::sync::Arc<T>>,
        ) -> Vec<String> {
            let same = |a: &std::sync::Arc<T>, b: &std::sync::Arc<T>| {
                std::sync::Arc::ptr_eq(a, b) || **a == **b
            };
            let mut names: Vec<String> = new
                .iter()
                .filter(|(k, v)| !old.get(*k).is_some_and(|o| same(o, v)))
                .map(|(k, _)| k.clone())
                .collect();
            names.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
            names
        }
        let service_changes = changed(&self.previous.services, &objects.services);
        let slice_changes = changed(&self.previous.endpoint_slices, &objects.endpoint_slices);
        let now = std::time::SystemTime::now();
        for name in &slice_changes {
            let trigger = objects
                .endpoint_slices
                .get(name)
                .and_then(|s| s.metadata.annotations.as_ref())
                .and_then(|a| a.get("endpoints.kubernetes.io/last-change-trigger-time"))
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            if let Some(trigger) = trigger
                && let Ok(latency) = now.duration_since(std::time::SystemTime::from(trigger))
            {
                self.metrics.network_programming(latency);
            }
        }
        let no_local = |external: bool| {
            let set: BTreeSet<(&str, &str)> = plan
                .frontends
                .iter()
                .filter(|f| f.drop_when_empty && f.kind.is_external() == external)
                .map(|f| (f.service.as_str(), f.port_name.as_str()))
                .collect();
            set.len() as i64
        };
        self.metrics.synced(
            elapsed,
            service_changes.len() as u64,
            slice_changes.len() as u64,
            no_local(false),
            no_local(true),
        );
        self.previous = objects;
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
