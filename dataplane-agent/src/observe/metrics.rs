//! Prometheus metrics, served as kube-proxy serves them: text format 0.0.4 on
//! `--metrics-bind-address` (default [`DEFAULT_METRICS_BIND_ADDRESS`], path [`METRICS_PATH`]).
//!
//! Two sets of metrics:
//!
//! - **kube-proxy's own**, with upstream's names, types, buckets and help text
//!   (`pkg/proxy/metrics/metrics.go`, help prefixed with `[ALPHA] ` as `component-base` writes
//!   it), so that kube-proxy dashboards and alerts keep working. The agent reports them through
//!   [`Metrics::queued`], [`Metrics::synced`] and [`Metrics::network_programming`]:
//!
//!   | name | type | labels |
//!   | --- | --- | --- |
//!   | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | |
//!   | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge | |
//!   | `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds` | gauge | |
//!   | `kubeproxy_network_programming_duration_seconds` | histogram | |
//!   | `kubeproxy_sync_proxy_rules_endpoint_changes_total` | counter | |
//!   | `kubeproxy_sync_proxy_rules_service_changes_total` | counter | |
//!   | `kubeproxy_sync_proxy_rules_no_local_endpoints_total` | gauge (sic) | `traffic_policy` |
//!
//! - **The datapath's**, `dataplane_*`: the kernel's cumulative counters, read from the pinned
//!   maps at every scrape (a [`DatapathSnapshot`]) and exposed as they are, never incremented
//!   here; plus the objects the agent skipped for bad input ([`Metrics::skipped`]):
//!
//!   | name | type | labels |
//!   | --- | --- | --- |
//!   | `dataplane_service_packets_total` | counter | `service`, `port`, `protocol`, `frontend`, `kind` |
//!   | `dataplane_service_bytes_total` | counter | same |
//!   | `dataplane_service_connections_total` | counter | same |
//!   | `dataplane_service_socket_connections_total` | counter | same (translated at the socket, `--socket-lb`) |
//!   | `dataplane_backend_packets_total` | counter | `service`, `port`, `protocol`, `backend` |
//!   | `dataplane_backend_bytes_total` | counter | same |
//!   | `dataplane_backend_connections_total` | counter | same |
//!   | `dataplane_backend_socket_connections_total` | counter | same |
//!   | `dataplane_dropped_packets_total` | counter | `reason` |
//!   | `dataplane_conntrack_entries` | gauge | |
//!   | `dataplane_map_entries` | gauge | `map` |
//!   | `dataplane_map_capacity` | gauge | `map` |
//!   | `dataplane_objects_skipped_total` | counter | `reason` |
//!
//!   Map pressure is two gauges rather than a ratio, so that both the absolute numbers and the
//!   fill level are there: `dataplane_map_entries / dataplane_map_capacity` (they share the
//!   `map` label) is the ratio to alert on.
//!
//! Counters that the kernel's maps hold are cumulative since the map was created; when the agent
//! reuses a frontend or backend id its counters start again from the slot's value, which
//! Prometheus handles as a counter reset. Rows of a snapshot that carry the same labels are
//! added up into one series (a scrape must not repeat a series).
//!
//! `prometheus-client` adds `_total` to a counter's name when it encodes it, so counters are
//! registered without it (`encoded_name`); the tests check the exposed names.
use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    io,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderName, HeaderValue},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text},
    metrics::{
        MetricType, TypedMetric,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::warn;

use super::http::{self};

/// Where kube-proxy serves its metrics by default (`--metrics-bind-address`).
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
/// The port of [`DEFAULT_METRICS_BIND_ADDRESS`].
pub const DEFAULT_METRICS_PORT: u16 = 10249;
/// The path the metrics are served on.
pub const METRICS_PATH: &str = "/metrics";
/// kube-proxy's path on the metrics address that names its mode (`iptables`, `ipvs`,
/// `nftables`); its own e2e test reads it.
pub const PROXY_MODE_PATH: &str = "/proxyMode";
/// What this proxy answers there.
pub const PROXY_MODE: &str = "ebpf";

/// How `component-base` marks the stability of kube-proxy's metrics in their help text.
const ALPHA: &str = "[ALPHA] ";

const SYNC_DURATION: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
const SYNC_DURATION_HELP: &str = "SyncProxyRules latency in seconds";
const LAST_SYNC: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
const LAST_SYNC_HELP: &str = "The last time proxy rules were successfully synced";
const LAST_QUEUED: &str = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
const LAST_QUEUED_HELP: &str = "The last time a sync of proxy rules was queued";
const NETWORK_PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
const NETWORK_PROGRAMMING_HELP: &str = "In Cluster Network Programming Latency in seconds";
const ENDPOINT_CHANGES: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
const ENDPOINT_CHANGES_HELP: &str = "Cumulative proxy rules Endpoint changes";
const SERVICE_CHANGES: &str = "kubeproxy_sync_proxy_rules_service_changes_total";
const SERVICE_CHANGES_HELP: &str = "Cumulative proxy rules Service changes";
/// A gauge, in spite of its name (as upstream).
const NO_LOCAL_ENDPOINTS: &str = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
const NO_LOCAL_ENDPOINTS_HELP: &str =
    "Number of services with a Local traffic policy and no endpoints";

const SERVICE_PACKETS: &str = "dataplane_service_packets_total";
const SERVICE_BYTES: &str = "dataplane_service_bytes_total";
const SERVICE_CONNECTIONS: &str = "dataplane_service_connections_total";
const SERVICE_SOCKET_CONNECTIONS: &str = "dataplane_service_socket_connections_total";
const BACKEND_PACKETS: &str = "dataplane_backend_packets_total";
const BACKEND_BYTES: &str = "dataplane_backend_bytes_total";
const BACKEND_CONNECTIONS: &str = "dataplane_backend_connections_total";
const BACKEND_SOCKET_CONNECTIONS: &str = "dataplane_backend_socket_connections_total";
const DROPS: &str = "dataplane_dropped_packets_total";
const CONNTRACK_ENTRIES: &str = "dataplane_conntrack_entries";
const MAP_ENTRIES: &str = "dataplane_map_entries";
const MAP_CAPACITY: &str = "dataplane_map_capacity";
const OBJECTS_SKIPPED: &str = "dataplane_objects_skipped_total";

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets: `ExponentialBuckets(0.001, 2, 15)`,
/// 1 ms to 16.384 s.
fn sync_duration_buckets() -> impl Iterator<Item = f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i))
}

/// kube-proxy's `network_programming_duration_seconds` buckets: `MergeBuckets` of 0.25 s and
/// 0.5 s, every second from 1 s to 59 s, every 5 s from 60 s to 115 s and every 30 s from 2 to
/// 5 minutes, after the 0 that `MergeBuckets` starts with.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    [0.0, 0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)))
}

/// The name to hand `prometheus-client` so that it exposes `exposed`: it appends `_total` to
/// counters itself.
fn encoded_name(exposed: &str, metric_type: MetricType) -> &str {
    match metric_type {
        MetricType::Counter => exposed.strip_suffix("_total").unwrap_or(exposed),
        _ => exposed,
    }
}

/// Packets, bytes and connections of one frontend (`ClusterIP:port/proto`, node port, load
/// balancer or external IP), as the kernel counted them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// `namespace/name`.
    pub service: String,
    /// The service port's name (may be empty).
    pub port: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `ip:port` the clients address.
    pub frontend: String,
    /// Which kind of frontend: e.g. `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalIP`.
    pub kind: String,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    /// Connections translated at the socket (`--socket-lb`), not in `connections`.
    pub socket_connections: u64,
}

/// Packets, bytes and connections balanced to one backend of a service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// `namespace/name`.
    pub service: String,
    pub port: String,
    pub protocol: String,
    /// `ip:port` of the endpoint.
    pub backend: String,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    /// Connections translated at the socket (`--socket-lb`), not in `connections`.
    pub socket_connections: u64,
}

impl ServiceCounters {
    /// Packets, bytes, connections, socket connections: the order the series are written in.
    fn counts(&self) -> [u64; 4] {
        [
            self.packets,
            self.bytes,
            self.connections,
            self.socket_connections,
        ]
    }
}

impl BackendCounters {
    /// As `ServiceCounters::counts`.
    fn counts(&self) -> [u64; 4] {
        [
            self.packets,
            self.bytes,
            self.connections,
            self.socket_connections,
        ]
    }
}

/// How full one BPF map is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPressure {
    /// The map's name, e.g. `dp_ct_v1`.
    pub map: String,
    pub entries: u64,
    /// The map's `max_entries`.
    pub capacity: u64,
}

/// What the kernel's maps hold at scrape time (the owner fills it from the pinned maps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathSnapshot {
    /// One row per frontend.
    pub services: Vec<ServiceCounters>,
    pub backends: Vec<BackendCounters>,
    /// Drop reason (e.g. `no_endpoints`) and the packets dropped or refused for it.
    pub drops: Vec<(String, u64)>,
    pub conntrack_entries: u64,
    pub maps: Vec<MapPressure>,
}

/// The metrics the agent itself updates.
#[derive(Debug)]
struct AgentMetrics {
    sync_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    endpoint_changes: Counter,
    service_changes: Counter,
    no_local_endpoints: Family<[(&'static str, &'static str); 1], Gauge>,
    skipped: Family<[(&'static str, String); 1], Counter>,
}

impl Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let kube_proxy = |help: &str| format!("{ALPHA}{help}");
        write_metric(
            &mut encoder,
            SYNC_DURATION,
            &kube_proxy(SYNC_DURATION_HELP),
            &self.sync_duration,
        )?;
        write_metric(
            &mut encoder,
            LAST_SYNC,
            &kube_proxy(LAST_SYNC_HELP),
            &self.last_sync,
        )?;
        write_metric(
            &mut encoder,
            LAST_QUEUED,
            &kube_proxy(LAST_QUEUED_HELP),
            &self.last_queued,
        )?;
        write_metric(
            &mut encoder,
            NETWORK_PROGRAMMING,
            &kube_proxy(NETWORK_PROGRAMMING_HELP),
            &self.network_programming,
        )?;
        write_metric(
            &mut encoder,
            ENDPOINT_CHANGES,
            &kube_proxy(ENDPOINT_CHANGES_HELP),
            &self.endpoint_changes,
        )?;
        write_metric(
            &mut encoder,
            SERVICE_CHANGES,
            &kube_proxy(SERVICE_CHANGES_HELP),
            &self.service_changes,
        )?;
        write_metric(
            &mut encoder,
            NO_LOCAL_ENDPOINTS,
            &kube_proxy(NO_LOCAL_ENDPOINTS_HELP),
            &self.no_local_endpoints,
        )?;
        write_metric(
            &mut encoder,
            OBJECTS_SKIPPED,
            "Kubernetes objects (or parts of them) the agent skipped for bad input, by reason",
            &self.skipped,
        )
    }
}

/// One metric with its `# HELP` and `# TYPE`, unless it has no series (a family nothing was
/// recorded in yet), as client_golang leaves those out. The help text is written as given:
/// unlike `Registry::register`, no `.` is appended, so kube-proxy's help stays word for word.
fn write_metric(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    if metric.is_empty() {
        return Ok(());
    }
    let metric_type = metric.metric_type();
    let metric_encoder =
        encoder.encode_descriptor(encoded_name(name, metric_type), help, None, metric_type)?;
    metric.encode(metric_encoder)
}

/// A family of constant series (values read from the kernel), in the order given; nothing at all
/// when there are none.
fn write_series<L, M>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut metric_encoder =
        encoder.encode_descriptor(encoded_name(name, M::TYPE), help, None, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric_encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Rows with the same labels added up into one (at the first one's position, saturating), so
/// that no series is exposed twice.
fn merge_rows<K: Hash + Eq + Copy, const N: usize>(
    rows: impl IntoIterator<Item = (K, [u64; N])>,
) -> Vec<(K, [u64; N])> {
    let mut merged: Vec<(K, [u64; N])> = Vec::new();
    let mut index: HashMap<K, usize> = HashMap::new();
    for (key, values) in rows {
        match index.get(&key) {
            Some(&i) => {
                for (total, value) in merged[i].1.iter_mut().zip(values) {
                    *total = total.saturating_add(value);
                }
            }
            None => {
                index.insert(key, merged.len());
                merged.push((key, values));
            }
        }
    }
    merged
}

/// The snapshot taken for one scrape, encoded as it is.
#[derive(Debug)]
struct DatapathCollector(DatapathSnapshot);

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = &self.0;

        let services = merge_rows(snapshot.services.iter().map(|row| {
            let labels = [
                ("service", row.service.as_str()),
                ("port", row.port.as_str()),
                ("protocol", row.protocol.as_str()),
                ("frontend", row.frontend.as_str()),
                ("kind", row.kind.as_str()),
            ];
            (labels, row.counts())
        }));
        let service_counter = |i: usize| {
            services
                .iter()
                .map(move |(labels, values)| (*labels, ConstCounter::new(values[i])))
        };
        write_series(
            &mut encoder,
            SERVICE_PACKETS,
            "Packets of the connections to a service frontend, both directions",
            service_counter(0),
        )?;
        write_series(
            &mut encoder,
            SERVICE_BYTES,
            "Bytes (IP layer) of the connections to a service frontend, both directions",
            service_counter(1),
        )?;
        write_series(
            &mut encoder,
            SERVICE_CONNECTIONS,
            "Connections to a service frontend",
            service_counter(2),
        )?;
        write_series(
            &mut encoder,
            SERVICE_SOCKET_CONNECTIONS,
            "Connections to a service frontend translated at the socket (connect/sendmsg)",
            service_counter(3),
        )?;

        let backends = merge_rows(snapshot.backends.iter().map(|row| {
            let labels = [
                ("service", row.service.as_str()),
                ("port", row.port.as_str()),
                ("protocol", row.protocol.as_str()),
                ("backend", row.backend.as_str()),
            ];
            (labels, row.counts())
        }));
        let backend_counter = |i: usize| {
            backends
                .iter()
                .map(move |(labels, values)| (*labels, ConstCounter::new(values[i])))
        };
        write_series(
            &mut encoder,
            BACKEND_PACKETS,
            "Packets of the connections balanced to a service backend, both directions",
            backend_counter(0),
        )?;
        write_series(
            &mut encoder,
            BACKEND_BYTES,
            "Bytes (IP layer) of the connections balanced to a service backend, both directions",
            backend_counter(1),
        )?;
        write_series(
            &mut encoder,
            BACKEND_CONNECTIONS,
            "Connections balanced to a service backend",
            backend_counter(2),
        )?;
        write_series(
            &mut encoder,
            BACKEND_SOCKET_CONNECTIONS,
            "Connections balanced to a service backend at the socket (connect/sendmsg)",
            backend_counter(3),
        )?;

        let drops = merge_rows(
            snapshot
                .drops
                .iter()
                .map(|(reason, count)| ([("reason", reason.as_str())], [*count])),
        );
        write_series(
            &mut encoder,
            DROPS,
            "Packets the datapath dropped, or refused with a TCP reset or ICMP unreachable, by reason",
            drops
                .iter()
                .map(|(labels, [count])| (*labels, ConstCounter::new(*count))),
        )?;

        write_metric(
            &mut encoder,
            CONNTRACK_ENTRIES,
            "Entries in the datapath's connection tracking map",
            &ConstGauge::new(snapshot.conntrack_entries),
        )?;

        let maps = merge_rows(
            snapshot
                .maps
                .iter()
                .map(|row| ([("map", row.map.as_str())], [row.entries, row.capacity])),
        );
        write_series(
            &mut encoder,
            MAP_ENTRIES,
            "Entries in a BPF map of the datapath (its fill level: divide by dataplane_map_capacity)",
            maps.iter()
                .map(|(labels, values)| (*labels, ConstGauge::new(values[0]))),
        )?;
        write_series(
            &mut encoder,
            MAP_CAPACITY,
            "Capacity (max_entries) of a BPF map of the datapath",
            maps.iter()
                .map(|(labels, values)| (*labels, ConstGauge::new(values[1]))),
        )
    }
}

/// The agent's metrics, and the datapath's read at scrape time. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    /// The agent's metrics (through one collector: see `write_metric` on help texts).
    registry: Registry,
    agent: Arc<AgentMetrics>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let agent = Arc::new(AgentMetrics {
            sync_duration: Histogram::new(sync_duration_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            skipped: Family::default(),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(agent.clone()));
        Arc::new(Metrics { registry, agent })
    }

    /// A change was queued (sets last_queued timestamp now).
    pub fn queued(&self) {
        self.agent.last_queued.set(unix_seconds(SystemTime::now()));
    }

    /// A sync finished: its duration; the number of service and endpoint(slice) changes it
    /// applied; the no-local-endpoints gauges (services whose internal/external policy is Local
    /// and have no local endpoints).
    pub fn synced(
        &self,
        duration: Duration,
        service_changes: u64,
        endpoint_changes: u64,
        no_local_internal: i64,
        no_local_external: i64,
    ) {
        let agent = &self.agent;
        agent.sync_duration.observe(duration.as_secs_f64());
        agent.last_sync.set(unix_seconds(SystemTime::now()));
        agent.service_changes.inc_by(service_changes);
        agent.endpoint_changes.inc_by(endpoint_changes);
        for (policy, count) in [
            ("internal", no_local_internal),
            ("external", no_local_external),
        ] {
            agent
                .no_local_endpoints
                .get_or_create(&[("traffic_policy", policy)])
                .set(count);
        }
    }

    /// Network programming latency of one change: from the object's change time to now.
    pub fn network_programming(&self, latency: Duration) {
        self.agent
            .network_programming
            .observe(latency.as_secs_f64());
    }

    /// An object skipped for bad input.
    pub fn skipped(&self, reason: &str) {
        self.agent
            .skipped
            .get_or_create(&[("reason", reason.to_string())])
            .inc();
    }

    /// Everything, in the Prometheus text format (version 0.0.4): the agent's metrics, then the
    /// datapath's from `snapshot`.
    pub fn render(&self, snapshot: DatapathSnapshot) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        let mut scrape = Registry::default();
        scrape.register_collector(Box::new(DatapathCollector(snapshot)));
        prometheus_text::encode(&mut text, &scrape)?;
        Ok(text)
    }

    /// Serves /metrics on the listener until aborted; `datapath` is called at each scrape for
    /// the live kernel counters.
    ///
    /// `datapath` runs on Tokio's blocking pool (it reads the kernel's maps); if it panics, that
    /// scrape gets a 500. Other paths get Go's 404. Returns only if the socket fails for good
    /// (transient accept errors are retried with a backoff); aborting the task also ends the
    /// connections it serves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        datapath: Arc<dyn Fn() -> DatapathSnapshot + Send + Sync>,
    ) -> io::Result<()> {
        let handler = move |request: Request<Incoming>| {
            let (metrics, datapath) = (self.clone(), datapath.clone());
            async move { metrics.respond(request.uri().path(), datapath).await }
        };
        http::serve(
            http::SharedListener::new(listener),
            "metrics server",
            handler,
        )
        .await
    }

    async fn respond(
        self: Arc<Self>,
        path: &str,
        datapath: Arc<dyn Fn() -> DatapathSnapshot + Send + Sync>,
    ) -> Response<Full<Bytes>> {
        if path == PROXY_MODE_PATH {
            // As kube-proxy writes it: the bare mode name, no newline.
            return text_response(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                PROXY_MODE.to_string(),
            );
        }
        if path != METRICS_PATH {
            return text_response(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "404 page not found\n".to_string(),
            );
        }
        let rendered = tokio::task::spawn_blocking(move || self.render(datapath())).await;
        match rendered {
            Ok(Ok(text)) => text_response(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
            Ok(Err(error)) => {
                warn!(%error, "metrics: encoding failed");
                internal_error()
            }
            Err(error) => {
                warn!(%error, "metrics: reading the datapath's counters failed");
                internal_error()
            }
        }
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn internal_error() -> Response<Full<Bytes>> {
    text_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain; charset=utf-8",
        "An error has occurred while collecting the metrics.\n".to_string(),
    )
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::Ipv4Addr,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use tokio::net::TcpStream;

    use super::*;

    /// Every family the scrape below exposes, with its `# TYPE`.
    const EXPECTED_TYPES: [(&str, &str); 20] = [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
        ),
        ("dataplane_objects_skipped_total", "counter"),
        ("dataplane_service_packets_total", "counter"),
        ("dataplane_service_bytes_total", "counter"),
        ("dataplane_service_connections_total", "counter"),
        ("dataplane_service_socket_connections_total", "counter"),
        ("dataplane_backend_packets_total", "counter"),
        ("dataplane_backend_bytes_total", "counter"),
        ("dataplane_backend_connections_total", "counter"),
        ("dataplane_backend_socket_connections_total", "counter"),
        ("dataplane_dropped_packets_total", "counter"),
        ("dataplane_conntrack_entries", "gauge"),
        ("dataplane_map_entries", "gauge"),
        ("dataplane_map_capacity", "gauge"),
    ];

    // ---- A strict reader of the Prometheus text format 0.0.4 ----

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    #[derive(Debug)]
    struct MetricFamily {
        name: String,
        help: Option<String>,
        kind: String,
        samples: Vec<Sample>,
    }

    fn valid_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn valid_label_name(name: &str) -> bool {
        let mut chars = name.chars();
        !name.starts_with("__")
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// A value as Go's `strconv.ParseFloat` (which Prometheus uses) reads it.
    fn parse_value(text: &str) -> f64 {
        match text {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => {
                assert!(
                    text.chars()
                        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')),
                    "bad value {text:?}"
                );
                text.parse()
                    .unwrap_or_else(|e| panic!("bad value {text:?}: {e}"))
            }
        }
    }

    /// `name{a="b",...} value`, label values unescaped.
    fn parse_sample(line: &str) -> Sample {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = &line[..name_end];
        assert!(valid_metric_name(name), "bad metric name in {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (label, after) = rest
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(
                    valid_label_name(label),
                    "bad label name {label:?} in {line:?}"
                );
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, '\n')) => panic!("raw newline in {line:?}"),
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                };
                assert!(
                    labels.insert(label.to_string(), value).is_none(),
                    "label {label} repeated in {line:?}"
                );
                rest = &after[end + 1..];
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else {
                    assert!(rest.starts_with('}'), "bad label list in {line:?}");
                }
            }
        }
        let rest = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap());
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing fields in {line:?}");
        Sample {
            name: name.to_string(),
            labels,
            value,
        }
    }

    /// Parses an exposition, asserting what Prometheus's own parser and `promtool check metrics`
    /// require: valid names, one HELP and TYPE per family before its samples, every sample in
    /// the family declared last (so families are contiguous), no series twice, histograms
    /// with increasing `le` bounds, cumulative counts, `+Inf` equal to `_count`, and a `_sum`.
    fn parse_exposition(text: &str) -> Vec<MetricFamily> {
        assert!(text.is_empty() || text.ends_with('\n'), "no final newline");
        let mut families: Vec<MetricFamily> = Vec::new();
        let mut declared = BTreeSet::new();
        let mut series = BTreeSet::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                let keyword = words.next().unwrap_or_default();
                if keyword != "HELP" && keyword != "TYPE" {
                    continue;
                }
                let name = words.next().unwrap_or_else(|| panic!("{line:?}"));
                let rest = words.next().unwrap_or_default();
                assert!(valid_metric_name(name), "bad name in {line:?}");
                let fresh = families.last().is_none_or(|f| f.name != name);
                if fresh {
                    assert!(declared.insert(name.to_string()), "{name} declared twice");
                    families.push(MetricFamily {
                        name: name.to_string(),
                        help: None,
                        kind: "untyped".to_string(),
                        samples: Vec::new(),
                    });
                }
                let family = families.last_mut().unwrap();
                assert!(family.samples.is_empty(), "{line:?} after samples");
                if keyword == "HELP" {
                    assert!(family.help.is_none(), "HELP twice for {name}");
                    let mut help = String::new();
                    let mut chars = rest.chars();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('\\') => help.push('\\'),
                                Some('n') => help.push('\n'),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            },
                            c => help.push(c),
                        }
                    }
                    family.help = Some(help);
                } else {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest),
                        "bad type in {line:?}"
                    );
                    family.kind = rest.to_string();
                }
                continue;
            }
            let sample = parse_sample(line);
            let family = families
                .last_mut()
                .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
            let belongs = match family.kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.name == format!("{}{suffix}", family.name)),
                _ => sample.name == family.name,
            };
            assert!(belongs, "{line:?} is not part of {}", family.name);
            assert!(
                series.insert((sample.name.clone(), sample.labels.clone())),
                "series repeated: {line:?}"
            );
            family.samples.push(sample);
        }
        for family in families.iter().filter(|f| f.kind == "histogram") {
            check_histogram(family);
        }
        families
    }

    fn check_histogram(family: &MetricFamily) {
        let mut by_labels: BTreeMap<Vec<(String, String)>, Vec<&Sample>> = BTreeMap::new();
        for sample in &family.samples {
            let key = sample
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            by_labels.entry(key).or_default().push(sample);
        }
        for samples in by_labels.values() {
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|s| s.name.ends_with("_bucket"))
                .map(|s| (parse_value(&s.labels["le"]), s.value))
                .collect();
            let count = samples.iter().find(|s| s.name.ends_with("_count"));
            let count = count.unwrap_or_else(|| panic!("{}: no _count", family.name));
            assert!(
                samples.iter().any(|s| s.name.ends_with("_sum")),
                "{}: no _sum",
                family.name
            );
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{}: buckets out of order or not cumulative: {buckets:?}",
                family.name
            );
            let last = buckets.last().unwrap();
            assert_eq!(last.0, f64::INFINITY, "{}: no +Inf bucket", family.name);
            assert_eq!(last.1, count.value, "{}: +Inf != _count", family.name);
        }
    }

    fn family<'a>(families: &'a [MetricFamily], name: &str) -> &'a MetricFamily {
        families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} not exposed"))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The value of the series `name{labels}`.
    fn value(families: &[MetricFamily], name: &str, pairs: &[(&str, &str)]) -> f64 {
        let wanted = labels(pairs);
        families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| s.name == name && s.labels == wanted)
            .unwrap_or_else(|| panic!("no series {name}{wanted:?}"))
            .value
    }

    /// `(le, cumulative count)` of a histogram without other labels.
    fn buckets(families: &[MetricFamily], name: &str) -> Vec<(String, f64)> {
        family(families, name)
            .samples
            .iter()
            .filter(|s| s.name.ends_with("_bucket"))
            .map(|s| (s.labels["le"].clone(), s.value))
            .collect()
    }

    // ---- HTTP ----

    use crate::observe::http::test_client::{self, Reply};

    async fn get(port: u16, path: &str) -> Reply {
        test_client::get(port, path)
            .await
            .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
    }

    type Datapath = Arc<dyn Fn() -> DatapathSnapshot + Send + Sync>;

    async fn start(
        metrics: &Arc<Metrics>,
        datapath: Datapath,
    ) -> (u16, tokio::task::JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(metrics.clone().serve(listener, datapath));
        (port, task)
    }

    fn snapshot() -> DatapathSnapshot {
        DatapathSnapshot {
            services: vec![
                ServiceCounters {
                    service: "default/web".into(),
                    port: "http".into(),
                    protocol: "TCP".into(),
                    frontend: "10.96.0.10:80".into(),
                    kind: "ClusterIP".into(),
                    packets: 42,
                    bytes: 4200,
                    connections: 7,
                    socket_connections: 5,
                },
                ServiceCounters {
                    service: "default/web".into(),
                    port: "http".into(),
                    protocol: "TCP".into(),
                    frontend: "192.168.1.5:30080".into(),
                    kind: "NodePort".into(),
                    packets: 3,
                    bytes: 300,
                    connections: 1,
                    socket_connections: 0,
                },
            ],
            backends: vec![BackendCounters {
                service: "default/web".into(),
                port: "http".into(),
                protocol: "TCP".into(),
                backend: "10.244.1.7:8080".into(),
                packets: 45,
                bytes: 4500,
                connections: 8,
                socket_connections: 5,
            }],
            drops: vec![("no_endpoints".into(), 5), ("source_range".into(), 2)],
            conntrack_entries: 16,
            maps: vec![
                MapPressure {
                    map: "dp_ct_v1".into(),
                    entries: 16,
                    capacity: 524_288,
                },
                MapPressure {
                    map: "dp_svc_v2".into(),
                    entries: 12,
                    capacity: 262_144,
                },
            ],
        }
    }

    #[tokio::test]
    async fn proxy_mode_is_served_as_kube_proxy_does() {
        let (port, task) = start(&Metrics::new(), Arc::new(snapshot)).await;
        let reply = get(port, "/proxyMode").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "ebpf");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        task.abort();
    }

    #[tokio::test]
    async fn scrape_exposes_kube_proxy_and_datapath_metrics() {
        let metrics = Metrics::new();
        let before = unix_seconds(SystemTime::now());
        metrics.queued();
        metrics.synced(Duration::from_millis(3), 2, 5, 1, 0);
        metrics.synced(Duration::from_millis(20), 1, 0, 0, 3);
        metrics.network_programming(Duration::from_millis(700));
        metrics.network_programming(Duration::from_secs(61));
        metrics.skipped("invalid_cluster_ip");
        metrics.skipped("invalid_cluster_ip");
        metrics.skipped("bad_port");
        let after = unix_seconds(SystemTime::now());

        let (port, task) = start(&metrics, Arc::new(snapshot)).await;
        let reply = get(port, "/metrics").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = &reply.body;
        assert!(!text.contains("_total_total"), "{text}");
        assert!(
            !text.contains("# EOF"),
            "OpenMetrics, not Prometheus text: {text}"
        );
        assert!(!text.contains("# UNIT"), "{text}");
        let families = parse_exposition(text);

        // Exactly these names and types, nothing else.
        let exposed: BTreeMap<&str, &str> = families
            .iter()
            .map(|f| (f.name.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(exposed, BTreeMap::from(EXPECTED_TYPES));
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let (_, name_and_type) = line.split_at("# TYPE ".len());
            assert!(
                EXPECTED_TYPES
                    .iter()
                    .any(|(n, t)| name_and_type == format!("{n} {t}")),
                "{line}"
            );
        }
        // Counters end in `_total`, once.
        for family in families.iter().filter(|f| f.kind == "counter") {
            assert!(family.name.ends_with("_total"), "{}", family.name);
            for sample in &family.samples {
                assert_eq!(sample.name, family.name);
            }
        }

        // kube-proxy's help, word for word (component-base's stability prefix, no final dot).
        let help = |name: &str| family(&families, name).help.clone().unwrap();
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_duration_seconds"),
            "[ALPHA] SyncProxyRules latency in seconds"
        );
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            "[ALPHA] The last time proxy rules were successfully synced"
        );
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"),
            "[ALPHA] The last time a sync of proxy rules was queued"
        );
        assert_eq!(
            help("kubeproxy_network_programming_duration_seconds"),
            "[ALPHA] In Cluster Network Programming Latency in seconds"
        );
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            "[ALPHA] Cumulative proxy rules Endpoint changes"
        );
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_service_changes_total"),
            "[ALPHA] Cumulative proxy rules Service changes"
        );
        assert_eq!(
            help("kubeproxy_sync_proxy_rules_no_local_endpoints_total"),
            "[ALPHA] Number of services with a Local traffic policy and no endpoints"
        );
        for family in &families {
            let help = family.help.as_deref().unwrap_or_default();
            assert!(!help.is_empty() && !help.ends_with('.'), "{family:?}");
        }

        // The sync histogram: upstream's buckets, two observations.
        let sync = buckets(&families, "kubeproxy_sync_proxy_rules_duration_seconds");
        let bounds: Vec<&str> = sync.iter().map(|(le, _)| le.as_str()).collect();
        assert_eq!(
            bounds,
            [
                "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
                "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf"
            ]
        );
        let count_at =
            |buckets: &[(String, f64)], le: &str| buckets.iter().find(|(l, _)| l == le).unwrap().1;
        assert_eq!(count_at(&sync, "0.002"), 0.0);
        assert_eq!(count_at(&sync, "0.004"), 1.0);
        assert_eq!(count_at(&sync, "0.016"), 1.0);
        assert_eq!(count_at(&sync, "0.032"), 2.0);
        assert_eq!(count_at(&sync, "+Inf"), 2.0);
        let sync_sum = value(
            &families,
            "kubeproxy_sync_proxy_rules_duration_seconds_sum",
            &[],
        );
        assert!((sync_sum - 0.023).abs() < 1e-9, "{sync_sum}");
        assert_eq!(
            value(
                &families,
                "kubeproxy_sync_proxy_rules_duration_seconds_count",
                &[]
            ),
            2.0
        );

        // The network programming histogram: upstream's 81 bounds, starting at 0.
        let programming = buckets(&families, "kubeproxy_network_programming_duration_seconds");
        let bounds: Vec<&str> = programming.iter().map(|(le, _)| le.as_str()).collect();
        let mut expected: Vec<String> = vec!["0".into(), "0.25".into(), "0.5".into()];
        expected.extend((1..=59).map(|s| s.to_string()));
        expected.extend((60..=115).step_by(5).map(|s| s.to_string()));
        expected.extend((120..=300).step_by(30).map(|s| s.to_string()));
        expected.push("+Inf".into());
        assert_eq!(bounds, expected);
        assert_eq!(bounds.len(), 82);
        assert_eq!(count_at(&programming, "0.5"), 0.0);
        assert_eq!(count_at(&programming, "1"), 1.0);
        assert_eq!(count_at(&programming, "60"), 1.0);
        assert_eq!(count_at(&programming, "65"), 2.0);
        let programming_sum = value(
            &families,
            "kubeproxy_network_programming_duration_seconds_sum",
            &[],
        );
        assert!((programming_sum - 61.7).abs() < 1e-9, "{programming_sum}");

        // Timestamps, change counters (added up), no-local gauges (set: the last sync's).
        for name in [
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        ] {
            let at = value(&families, name, &[]);
            assert!(
                before <= at && at <= after,
                "{name}: {before} <= {at} <= {after}"
            );
        }
        assert_eq!(
            value(
                &families,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                &[]
            ),
            3.0
        );
        assert_eq!(
            value(
                &families,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                &[]
            ),
            5.0
        );
        let no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
        assert_eq!(
            value(&families, no_local, &[("traffic_policy", "internal")]),
            0.0
        );
        assert_eq!(
            value(&families, no_local, &[("traffic_policy", "external")]),
            3.0
        );
        assert_eq!(family(&families, no_local).samples.len(), 2);
        assert_eq!(
            value(
                &families,
                "dataplane_objects_skipped_total",
                &[("reason", "invalid_cluster_ip")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &families,
                "dataplane_objects_skipped_total",
                &[("reason", "bad_port")]
            ),
            1.0
        );

        // The snapshot's values, with their labels.
        let cluster_ip = [
            ("service", "default/web"),
            ("port", "http"),
            ("protocol", "TCP"),
            ("frontend", "10.96.0.10:80"),
            ("kind", "ClusterIP"),
        ];
        assert_eq!(
            value(&families, "dataplane_service_packets_total", &cluster_ip),
            42.0
        );
        assert_eq!(
            value(&families, "dataplane_service_bytes_total", &cluster_ip),
            4200.0
        );
        assert_eq!(
            value(
                &families,
                "dataplane_service_connections_total",
                &cluster_ip
            ),
            7.0
        );
        let node_port = [
            ("service", "default/web"),
            ("port", "http"),
            ("protocol", "TCP"),
            ("frontend", "192.168.1.5:30080"),
            ("kind", "NodePort"),
        ];
        assert_eq!(
            value(&families, "dataplane_service_packets_total", &node_port),
            3.0
        );
        let backend = [
            ("service", "default/web"),
            ("port", "http"),
            ("protocol", "TCP"),
            ("backend", "10.244.1.7:8080"),
        ];
        assert_eq!(
            value(&families, "dataplane_backend_packets_total", &backend),
            45.0
        );
        assert_eq!(
            value(&families, "dataplane_backend_bytes_total", &backend),
            4500.0
        );
        assert_eq!(
            value(&families, "dataplane_backend_connections_total", &backend),
            8.0
        );
        assert_eq!(
            value(
                &families,
                "dataplane_dropped_packets_total",
                &[("reason", "no_endpoints")]
            ),
            5.0
        );
        assert_eq!(
            value(
                &families,
                "dataplane_dropped_packets_total",
                &[("reason", "source_range")]
            ),
            2.0
        );
        assert_eq!(value(&families, "dataplane_conntrack_entries", &[]), 16.0);
        assert_eq!(
            value(&families, "dataplane_map_entries", &[("map", "dp_ct_v1")]),
            16.0
        );
        assert_eq!(
            value(&families, "dataplane_map_capacity", &[("map", "dp_ct_v1")]),
            524_288.0
        );
        assert_eq!(
            value(&families, "dataplane_map_entries", &[("map", "dp_svc_v2")]),
            12.0
        );
        // Exact lines, as a dashboard query sees them.
        for line in [
            "dataplane_service_packets_total{service=\"default/web\",port=\"http\",protocol=\"TCP\",frontend=\"10.96.0.10:80\",kind=\"ClusterIP\"} 42",
            "dataplane_backend_connections_total{service=\"default/web\",port=\"http\",protocol=\"TCP\",backend=\"10.244.1.7:8080\"} 8",
            "dataplane_conntrack_entries 16",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        task.abort();
    }

    #[tokio::test]
    async fn before_any_sync_only_the_unlabelled_metrics_show() {
        let metrics = Metrics::new();
        let (port, task) = start(&metrics, Arc::new(DatapathSnapshot::default)).await;
        let reply = get(port, "/metrics").await;
        assert_eq!(reply.status, 200);
        let families = parse_exposition(&reply.body);
        let names: BTreeSet<&str> = families.iter().map(|f| f.name.as_str()).collect();
        // As client_golang: vectors without series are left out; plain metrics start at 0.
        assert_eq!(
            names,
            BTreeSet::from([
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "kubeproxy_network_programming_duration_seconds",
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "dataplane_conntrack_entries",
            ])
        );
        assert_eq!(
            value(
                &families,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                &[]
            ),
            0.0
        );
        assert_eq!(
            value(
                &families,
                "kubeproxy_sync_proxy_rules_duration_seconds_count",
                &[]
            ),
            0.0
        );
        assert_eq!(value(&families, "dataplane_conntrack_entries", &[]), 0.0);
        task.abort();
    }

    #[tokio::test]
    async fn every_scrape_reads_the_datapath_again() {
        let metrics = Metrics::new();
        let scrapes = Arc::new(AtomicUsize::new(0));
        let datapath: Datapath = Arc::new({
            let scrapes = scrapes.clone();
            move || {
                let n = scrapes.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                DatapathSnapshot {
                    drops: vec![("no_endpoints".into(), 10 * n)],
                    conntrack_entries: n,
                    ..DatapathSnapshot::default()
                }
            }
        });
        let (port, task) = start(&metrics, datapath).await;
        for n in 1..=3u32 {
            let families = parse_exposition(&get(port, "/metrics").await.body);
            assert_eq!(
                value(&families, "dataplane_conntrack_entries", &[]),
                f64::from(n)
            );
            assert_eq!(
                value(
                    &families,
                    "dataplane_dropped_packets_total",
                    &[("reason", "no_endpoints")]
                ),
                f64::from(10 * n)
            );
        }
        assert_eq!(scrapes.load(Ordering::SeqCst), 3);
        // Other paths: Go's 404, and no datapath read.
        for path in ["/", "/metrics/", "/healthz"] {
            let reply = get(port, path).await;
            assert_eq!(reply.status, 404, "{path}");
            assert_eq!(reply.body, "404 page not found\n");
        }
        assert_eq!(get(port, "/metrics?x=1").await.status, 200);
        assert_eq!(scrapes.load(Ordering::SeqCst), 4);
        task.abort();
    }

    #[tokio::test]
    async fn odd_label_values_are_escaped_and_repeated_rows_added_up() {
        let metrics = Metrics::new();
        metrics.skipped("quote\" backslash\\ newline\n");
        let row = ServiceCounters {
            service: "ns/a\"b".into(),
            port: String::new(),
            protocol: "UDP".into(),
            frontend: "10.96.0.53:53".into(),
            kind: "ClusterIP".into(),
            packets: 1,
            bytes: 100,
            connections: 1,
            socket_connections: 0,
        };
        let datapath: Datapath = Arc::new(move || DatapathSnapshot {
            services: vec![row.clone(), row.clone()],
            drops: vec![("no_endpoints".into(), 1), ("no_endpoints".into(), 2)],
            maps: vec![MapPressure {
                map: "dp_ct_v1".into(),
                entries: u64::MAX,
                capacity: 1,
            }],
            ..DatapathSnapshot::default()
        });
        let (port, task) = start(&metrics, datapath).await;
        let families = parse_exposition(&get(port, "/metrics").await.body);
        assert_eq!(
            value(
                &families,
                "dataplane_objects_skipped_total",
                &[("reason", "quote\" backslash\\ newline\n")]
            ),
            1.0
        );
        let labels = [
            ("service", "ns/a\"b"),
            ("port", ""),
            ("protocol", "UDP"),
            ("frontend", "10.96.0.53:53"),
            ("kind", "ClusterIP"),
        ];
        assert_eq!(
            value(&families, "dataplane_service_packets_total", &labels),
            2.0
        );
        assert_eq!(
            value(&families, "dataplane_service_bytes_total", &labels),
            200.0
        );
        assert_eq!(
            family(&families, "dataplane_service_packets_total")
                .samples
                .len(),
            1
        );
        assert_eq!(
            value(
                &families,
                "dataplane_dropped_packets_total",
                &[("reason", "no_endpoints")]
            ),
            3.0
        );
        assert_eq!(
            value(&families, "dataplane_map_entries", &[("map", "dp_ct_v1")]),
            u64::MAX as f64
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_failing_datapath_read_fails_that_scrape_only() {
        let metrics = Metrics::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let datapath: Datapath = Arc::new({
            let calls = calls.clone();
            move || {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("map read failed (test)");
                }
                DatapathSnapshot::default()
            }
        });
        let (port, task) = start(&metrics, datapath).await;
        assert_eq!(get(port, "/metrics").await.status, 500);
        assert_eq!(get(port, "/metrics").await.status, 200);
        task.abort();
    }

    #[tokio::test]
    async fn aborting_the_server_closes_its_port() {
        let metrics = Metrics::new();
        let (port, task) = start(&metrics, Arc::new(DatapathSnapshot::default)).await;
        assert_eq!(get(port, "/metrics").await.status, 200);
        task.abort();
        let _ = task.await;
        let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await;
        assert!(refused.is_err(), "still listening");
    }

    #[test]
    fn render_is_valid_text_for_every_family_and_matches_the_table() {
        let metrics = Metrics::new();
        metrics.queued();
        metrics.synced(Duration::from_secs(1), 1, 1, 0, 0);
        metrics.network_programming(Duration::ZERO);
        metrics.skipped("bad");
        let text = metrics.render(snapshot()).unwrap();
        let families = parse_exposition(&text);
        assert_eq!(families.len(), EXPECTED_TYPES.len());
        for ((name, kind), family) in EXPECTED_TYPES.iter().zip(&families) {
            assert_eq!((*name, *kind), (family.name.as_str(), family.kind.as_str()));
        }
        // A 0 s latency counts in upstream's first (0) bucket.
        let programming = buckets(&families, "kubeproxy_network_programming_duration_seconds");
        assert_eq!(programming[0], ("0".to_string(), 1.0));
    }

    #[test]
    fn counter_names_are_registered_without_their_suffix() {
        assert_eq!(
            encoded_name(ENDPOINT_CHANGES, MetricType::Counter),
            "kubeproxy_sync_proxy_rules_endpoint_changes"
        );
        // The gauge named like a counter keeps its name.
        assert_eq!(
            encoded_name(NO_LOCAL_ENDPOINTS, MetricType::Gauge),
            NO_LOCAL_ENDPOINTS
        );
    }
}
