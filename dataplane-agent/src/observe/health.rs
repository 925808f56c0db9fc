//! kube-proxy's health endpoints, with kube-proxy's semantics (`pkg/proxy/healthcheck` upstream).
//!
//! - [`ProxyHealth`] + [`serve_proxy_health`]: the node-level server kube-proxy runs on
//!   `--healthz-bind-address` (default `0.0.0.0:10256`). `/livez` says whether the datapath
//!   keeps up with the changes queued for it; `/healthz` says the same and, in addition, whether
//!   this node should receive load-balancer traffic at all (not while its Node object is being
//!   deleted or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint).
//! - [`ServiceHealthServer`]: one listener per `healthCheckNodePort` of the
//!   `externalTrafficPolicy: Local` load balancer services, answering 200 while the service has
//!   endpoints on this node (and the proxy itself is healthy), 503 otherwise, so that cloud load
//!   balancers only send such traffic to nodes that can serve it locally.
//!
//! The rules, as in upstream `proxy_health.go`:
//! - The proxy is healthy while it is starting up (before the first [`ProxyHealth::updated`]);
//!   kube-proxy's sync loop calls `Updated` once when it starts, so that a first programming
//!   that never completes is noticed: the agent's loop should do the same.
//! - After that it is healthy while nothing is queued, and while the oldest update queued and
//!   not yet programmed has waited less than the timeout (kube-proxy uses twice its
//!   `--iptables-sync-period`, i.e. 60 s by default). Later queued updates do not move that
//!   oldest time; [`ProxyHealth::updated`] clears it.
//! - A healthy response reports `lastUpdated` as the current time (compatibility with older
//!   releases); an unhealthy one reports when the datapath was last programmed.
//! - Node eligibility only affects `/healthz`; `/livez` and the per-service checks only look at
//!   the proxy's own health.
use std::{
    collections::{BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderName, HeaderValue},
};
use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use serde::Serialize;
use tokio::{net::TcpListener, runtime::Handle, task::AbortHandle};
use tracing::{debug, warn};

use super::http::{Body, SharedListener, serve};

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// The port kube-proxy serves `/healthz` and `/livez` on by default.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;

const X_CONTENT_TYPE_OPTIONS: &str = "x-content-type-options";
const X_LOAD_BALANCING_ENDPOINT_WEIGHT: &str = "x-load-balancing-endpoint-weight";
const APPLICATION_JSON: &str = "application/json";
/// How Go's `encoding/json` writes the zero `time.Time`.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// One moment on both clocks: the monotonic one for timeouts, the wall one for reporting.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    mono: Instant,
    wall: SystemTime,
}

impl Stamp {
    fn now() -> Self {
        Stamp {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

#[derive(Debug)]
struct ProxyState {
    /// When the datapath was last programmed with everything queued; `None` while starting up.
    last_updated: Option<Stamp>,
    /// The oldest update queued since then, not yet programmed.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// Node-level health: what kube-proxy serves on --healthz-bind-address (default 0.0.0.0:10256).
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<ProxyState>,
}

/// The proxy's health at one moment (upstream's `ProxyHealth` struct, without the per IP family
/// `status`: this datapath is programmed as one unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// The proxy itself keeps up with its updates (node eligibility not included).
    pub healthy: bool,
    /// When the datapath was last programmed (`None` before the first time).
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    /// The node may receive load-balancer traffic (affects `/healthz` only).
    pub node_eligible: bool,
}

impl ProxyHealth {
    pub fn new(healthz_timeout: Duration) -> Arc<Self> {
        Arc::new(ProxyHealth {
            timeout: healthz_timeout,
            state: Mutex::new(ProxyState {
                last_updated: None,
                oldest_pending: None,
                // Eligible until a Node says otherwise (kube-proxy only starts serving once it has
                // its Node object, so it has no "not yet known" state to report).
                node_eligible: true,
            }),
        })
    }

    pub fn healthz_timeout(&self) -> Duration {
        self.timeout
    }

    /// A change to programme has been queued (kube-proxy's QueuedUpdate).
    pub fn queued_update(&self) {
        self.queued_update_at(Instant::now());
    }

    /// The datapath has been programmed with everything queued so far (kube-proxy's Updated).
    pub fn updated(&self) {
        self.updated_at(Stamp::now());
    }

    /// This node's Node object changed (None when unknown): /healthz reports unhealthy while it
    /// is being deleted (deletionTimestamp set) or tainted ToBeDeletedByClusterAutoscaler.
    ///
    /// `None` makes the node ineligible, as upstream does when it has no Node object; before
    /// the first call the node counts as eligible.
    pub fn set_node(&self, node: Option<&Node>) {
        let eligible = node.is_some_and(node_eligible);
        self.lock().node_eligible = eligible;
    }

    /// The proxy's own health, as `/livez` and the service health checks see it (upstream's
    /// `Health().Healthy`).
    pub fn is_healthy(&self) -> bool {
        self.snapshot().healthy
    }

    /// Whether `/healthz` would count this node as eligible.
    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        self.snapshot_at(Stamp::now())
    }

    fn lock(&self) -> MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queued_update_at(&self, now: Instant) {
        let mut state = self.lock();
        // Only the oldest pending update counts: later ones do not move it.
        state.oldest_pending.get_or_insert(now);
    }

    fn updated_at(&self, now: Stamp) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some(now);
    }

    fn snapshot_at(&self, now: Stamp) -> HealthSnapshot {
        let state = self.lock();
        let healthy = match (state.last_updated, state.oldest_pending) {
            // Starting up: healthy until the first update, whatever is queued.
            (None, _) => true,
            // Fully programmed.
            (Some(_), None) => true,
            // Something is queued: healthy while it is not late yet.
            (Some(_), Some(queued)) => now.mono.saturating_duration_since(queued) < self.timeout,
        };
        HealthSnapshot {
            healthy,
            last_updated: state.last_updated.map(|stamp| stamp.wall),
            current_time: now.wall,
            node_eligible: state.node_eligible,
        }
    }
}

/// Not being deleted and not tainted for deletion by the cluster autoscaler.
fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let taints = node.spec.as_ref().and_then(|spec| spec.taints.as_deref());
    !taints
        .unwrap_or_default()
        .iter()
        .any(|taint| taint.key == TO_BE_DELETED_TAINT)
}

fn timestamp(time: SystemTime) -> Option<Timestamp> {
    let (seconds, nanoseconds) = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => (i64::try_from(after.as_secs()).ok()?, after.subsec_nanos()),
        Err(before) => {
            let before = before.duration();
            let seconds = -i64::try_from(before.as_secs()).ok()?;
            match before.subsec_nanos() {
                0 => (seconds, 0),
                nanos => (seconds - 1, 1_000_000_000 - nanos),
            }
        }
    };
    Timestamp::new(seconds, i32::try_from(nanoseconds).ok()?).ok()
}

/// A time as Go's `encoding/json` writes a UTC `time.Time` (RFC 3339, fraction as needed).
fn go_time(time: Option<SystemTime>) -> String {
    match time.and_then(timestamp) {
        Some(timestamp) => timestamp.to_string(),
        None => GO_ZERO_TIME.to_string(),
    }
}

/// The body of `/healthz` and `/livez`, fields in upstream's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyHealthBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        HeaderName::from_static(X_CONTENT_TYPE_OPTIONS),
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `/healthz` (`with_node` true) or `/livez` (false).
fn proxy_health_response(snapshot: HealthSnapshot, with_node: bool) -> Response<Body> {
    let healthy = snapshot.healthy && (!with_node || snapshot.node_eligible);
    let last_updated = if healthy {
        // As upstream: a healthy proxy reports "now", as older releases did whose timestamp
        // moved with every sync loop run even when nothing changed.
        Some(snapshot.current_time)
    } else {
        snapshot.last_updated
    };
    let body = ProxyHealthBody {
        last_updated: go_time(last_updated),
        current_time: go_time(Some(snapshot.current_time)),
        node_eligible: with_node.then_some(snapshot.node_eligible),
        healthy: snapshot.healthy,
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    response(status, APPLICATION_JSON, body)
}

/// The node-level server's routes: exact paths, any method, as Go's `ServeMux` patterns.
fn route_proxy_health(health: &ProxyHealth, path: &str, now: Stamp) -> Response<Body> {
    match path {
        "/healthz" => proxy_health_response(health.snapshot_at(now), true),
        "/livez" => proxy_health_response(health.snapshot_at(now), false),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 page not found\n".to_string(),
        ),
    }
}

/// The body of a service health check, laid out byte for byte as upstream writes it.
fn service_health_body(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(namespace),
        quote(name),
        local_endpoints,
        proxy_healthy
    )
}

/// Any path, any method: 200 with local endpoints and a healthy proxy, 503 otherwise.
fn service_health_response(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> Response<Body> {
    let status = if local_endpoints != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = service_health_body(namespace, name, local_endpoints, proxy_healthy);
    let mut response = response(status, APPLICATION_JSON, body);
    response.headers_mut().insert(
        HeaderName::from_static(X_LOAD_BALANCING_ENDPOINT_WEIGHT),
        HeaderValue::from(local_endpoints),
    );
    response
}

/// Serves /healthz and /livez for `health` on `listener` until the task is dropped/aborted.
///
/// Returns only if the socket fails for good (transient accept errors are retried); kube-proxy
/// restarts its server after 5 s in that case.
pub async fn serve_proxy_health(listener: TcpListener, health: Arc<ProxyHealth>) -> io::Result<()> {
    serve(
        SharedListener::new(listener),
        "health server",
        move |request: Request<Incoming>| {
            let response = route_proxy_health(&health, request.uri().path(), Stamp::now());
            async move { response }
        },
    )
    .await
}

/// One service's health check port, as the agent computed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// The service's `healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// One open health check port.
struct Instance {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    listener: SharedListener,
    task: AbortHandle,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // The socket closes now (new connections are refused from here on); the task, and
        // with it the connections it serves, ends at its next poll.
        self.listener.close();
        self.task.abort();
    }
}

/// Per-service health check node ports (externalTrafficPolicy: Local services).
pub struct ServiceHealthServer {
    bind_ip: IpAddr,
    proxy: Arc<ProxyHealth>,
    runtime: Option<Handle>,
    /// By namespace and name, as upstream: a service whose port changes gets a new listener.
    services: HashMap<(String, String), Instance>,
}

impl ServiceHealthServer {
    /// `bind_ip`: address to listen on (kube-proxy listens on all node addresses: 0.0.0.0).
    ///
    /// Go's listener on `0.0.0.0` also accepts IPv6; here `::` does that (IPv4 too, with
    /// Linux's default `net.ipv6.bindv6only=0`). Listeners run on the Tokio runtime current
    /// here, or else on the one current when [`ServiceHealthServer::sync`] is called.
    pub fn new(bind_ip: IpAddr, proxy: Arc<ProxyHealth>) -> Self {
        ServiceHealthServer {
            bind_ip,
            proxy,
            runtime: Handle::try_current().ok(),
            services: HashMap::new(),
        }
    }

    /// Makes the set of listeners equal to `services` (start new ports, stop removed ones,
    /// update endpoint counts in place without re-binding). Returns the ports that could not be
    /// bound, with the error, so the caller can log/count them; others keep working.
    ///
    /// A port that could not be bound is tried again on the next call. If a service appears
    /// twice, its last entry counts.
    pub fn sync(&mut self, services: &[ServiceHealth]) -> Vec<(u16, io::Error)> {
        let mut wanted: Vec<&ServiceHealth> = Vec::with_capacity(services.len());
        let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(services.len());
        for service in services {
            match index.get(&(service.namespace.as_str(), service.name.as_str())) {
                Some(&i) => wanted[i] = service,
                None => {
                    index.insert((&service.namespace, &service.name), wanted.len());
                    wanted.push(service);
                }
            }
        }

        // Close first, so that a port moving from one service to another can be bound again.
        self.services.retain(|(namespace, name), instance| {
            let keep = index
                .get(&(namespace.as_str(), name.as_str()))
                .is_some_and(|&i| wanted[i].port == instance.port);
            if !keep {
                debug!(
                    namespace,
                    name,
                    port = instance.port,
                    "closing service health check"
                );
            }
            keep
        });

        let mut failed = Vec::new();
        for service in wanted {
            let key = (service.namespace.clone(), service.name.clone());
            if let Some(instance) = self.services.get(&key) {
                instance
                    .local_endpoints
                    .store(service.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(service) {
                Ok(instance) => {
                    debug!(
                        namespace = service.namespace,
                        name = service.name,
                        port = service.port,
                        "opened service health check"
                    );
                    self.services.insert(key, instance);
                }
                Err(error) => failed.push((service.port, error)),
            }
        }
        failed
    }

    /// The ports listened on now.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.services
            .values()
            .map(|instance| instance.port)
            .collect()
    }

    fn open(&self, service: &ServiceHealth) -> io::Result<Instance> {
        let runtime = match &self.runtime {
            Some(runtime) => runtime.clone(),
            None => Handle::try_current()
                .map_err(|_| io::Error::other("no Tokio runtime to serve health checks on"))?,
        };
        // std sets SO_REUSEADDR, as Go does; binding fails while another socket listens there.
        let listener = std::net::TcpListener::bind(SocketAddr::new(self.bind_ip, service.port))?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let listener = SharedListener::new(listener);
        let local_endpoints = Arc::new(AtomicUsize::new(service.local_endpoints));

        let handler = {
            let namespace: Arc<str> = service.namespace.as_str().into();
            let name: Arc<str> = service.name.as_str().into();
            let local_endpoints = local_endpoints.clone();
            let proxy = self.proxy.clone();
            move |_: Request<Incoming>| {
                let count = local_endpoints.load(Ordering::Relaxed);
                let response =
                    service_health_response(&namespace, &name, count, proxy.is_healthy());
                async move { response }
            }
        };
        let (namespace, name, port) = (
            service.namespace.clone(),
            service.name.clone(),
            service.port,
        );
        let task = runtime.spawn({
            let listener = listener.clone();
            async move {
                if let Err(error) = serve(listener, "service health check", handler).await {
                    warn!(namespace, name, port, %error, "service health check stopped");
                }
            }
        });
        Ok(Instance {
            port: service.port,
            local_endpoints,
            listener,
            task: task.abort_handle(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };
    use serde_json::Value;
    use tokio::io::AsyncReadExt;

    use tokio::net::TcpStream;

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    use crate::observe::http::test_client::{Reply, get, get_keep_alive};

    async fn get_ok(port: u16, path: &str) -> Reply {
        get(port, path)
            .await
            .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
    }

    /// A loopback port nothing listens on (bound then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn assert_refused(port: u16) {
        // The listener is closed synchronously by `sync`: no retry needed.
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Err(e) => assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionRefused,
                "port {port}: {e}"
            ),
            Ok(_) => panic!("port {port} still accepts connections"),
        }
    }

    async fn start_proxy_server(
        health: &Arc<ProxyHealth>,
    ) -> (u16, tokio::task::JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(serve_proxy_health(listener, health.clone()));
        (port, task)
    }

    fn service(namespace: &str, name: &str, port: u16, local_endpoints: usize) -> ServiceHealth {
        ServiceHealth {
            namespace: namespace.into(),
            name: name.into(),
            port,
            local_endpoints,
        }
    }

    fn node_with_taints(keys: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                taints: Some(
                    keys.iter()
                        .map(|key| Taint {
                            key: key.to_string(),
                            effect: "NoSchedule".into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn deleted_node() -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                deletion_timestamp: Some(Time(timestamp(SystemTime::now()).unwrap())),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn parse_go_time(value: &Value) -> Timestamp {
        value
            .as_str()
            .expect("time string")
            .parse()
            .expect("RFC 3339 time")
    }

    /// Upstream's updater sequence (healthcheck_test.go, one proxier), on a fake clock.
    #[test]
    fn timeout_rules_match_upstream() {
        let health = ProxyHealth::new(Duration::from_secs(10));
        let start = Stamp::now();
        let at = |secs: u64| Stamp {
            mono: start.mono + Duration::from_secs(secs),
            wall: start.wall + Duration::from_secs(secs),
        };
        let healthy = |t: Stamp| health.snapshot_at(t).healthy;

        // Healthy by default, and while starting up even with updates queued for a long time.
        assert!(healthy(at(0)));
        health.queued_update_at(at(0).mono);
        assert!(healthy(at(100)));
        assert_eq!(health.snapshot_at(at(100)).last_updated, None);

        // After the first update: healthy as long as nothing is queued.
        health.updated_at(at(100));
        assert!(healthy(at(125)));

        // Queued and not programmed for the timeout: unhealthy, exactly at the timeout.
        health.queued_update_at(at(125).mono);
        assert!(healthy(at(134)));
        assert!(!healthy(at(135)));
        assert!(!healthy(at(150)));
        let snapshot = health.snapshot_at(at(150));
        assert_eq!(snapshot.last_updated, Some(at(100).wall));
        assert_eq!(snapshot.current_time, at(150).wall);

        // Programmed: healthy again.
        health.updated_at(at(150));
        assert!(healthy(at(155)));

        // Later queued updates do not move the oldest pending one.
        health.queued_update_at(at(160).mono);
        health.queued_update_at(at(168).mono);
        assert!(healthy(at(169)));
        assert!(!healthy(at(170)));
        health.updated_at(at(171));
        assert!(healthy(at(171)));
        assert!(healthy(at(500)));
    }

    #[test]
    fn node_eligibility_rules() {
        let health = ProxyHealth::new(Duration::from_secs(10));
        assert!(health.node_eligible(), "eligible before any Node is seen");
        health.set_node(Some(&node_with_taints(&[])));
        assert!(health.node_eligible());
        health.set_node(Some(&Node::default()));
        assert!(health.node_eligible(), "no spec at all");
        health.set_node(Some(&node_with_taints(&["other"])));
        assert!(health.node_eligible(), "other taints do not matter");
        health.set_node(Some(&node_with_taints(&["other", TO_BE_DELETED_TAINT])));
        assert!(!health.node_eligible());
        health.set_node(Some(&node_with_taints(&["other"])));
        assert!(health.node_eligible(), "untainted again");
        health.set_node(Some(&deleted_node()));
        assert!(!health.node_eligible());
        health.set_node(Some(&Node::default()));
        assert!(health.node_eligible());
        health.set_node(None);
        assert!(
            !health.node_eligible(),
            "no Node object: not eligible, as upstream"
        );
        // Node eligibility is not part of the proxy's own health.
        assert!(health.is_healthy());
    }

    #[test]
    fn times_are_written_as_go_does() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(
            go_time(Some(epoch + Duration::from_secs(1))),
            "1970-01-01T00:00:01Z"
        );
        assert_eq!(
            go_time(Some(epoch + Duration::from_millis(1500))),
            "1970-01-01T00:00:01.5Z"
        );
        assert_eq!(
            go_time(Some(epoch + Duration::from_nanos(1_000_000_123))),
            "1970-01-01T00:00:01.000000123Z"
        );
        assert_eq!(go_time(None), GO_ZERO_TIME);
        let before_epoch = epoch - Duration::from_millis(1500);
        assert_eq!(go_time(Some(before_epoch)), "1969-12-31T23:59:58.5Z");
    }

    #[test]
    fn service_body_is_laid_out_as_upstream() {
        assert_eq!(
            service_health_body("default", "web", 3, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[tokio::test]
    async fn healthz_and_livez_follow_the_update_timeout() {
        let timeout = Duration::from_millis(800);
        let health = ProxyHealth::new(timeout);
        let (port, _task) = start_proxy_server(&health).await;

        // Starting up: healthy.
        for path in ["/healthz", "/livez"] {
            let reply = get_ok(port, path).await;
            assert_eq!(reply.status, 200, "{path}: {reply:?}");
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
            let body = reply.json();
            assert_eq!(body["healthy"], true);
            assert_eq!(
                body["lastUpdated"], body["currentTime"],
                "healthy: lastUpdated is now"
            );
            // Upstream's field order, compact as Go's json.Marshal writes it.
            let mut fields: Vec<&str> = body
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            fields.sort_by_key(|field| reply.body.find(&format!("\"{field}\":")));
            assert!(
                reply.body.starts_with("{\"lastUpdated\":\""),
                "{}",
                reply.body
            );
            assert!(!reply.body.contains(' '), "{}", reply.body);
            if path == "/healthz" {
                assert_eq!(
                    fields,
                    ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
                );
                assert_eq!(body["nodeEligible"], true);
            } else {
                assert_eq!(fields, ["lastUpdated", "currentTime", "healthy"]);
            }
        }
        // Query strings do not matter; other paths are not found.
        assert_eq!(get_ok(port, "/healthz?verbose=1").await.status, 200);
        let missing = get_ok(port, "/metrics").await;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.body, "404 page not found\n");
        assert_eq!(get_ok(port, "/healthz/").await.status, 404);

        health.updated();
        let programmed_at = SystemTime::now();
        health.queued_update();
        assert_eq!(
            get_ok(port, "/healthz").await.status,
            200,
            "pending but not late"
        );

        tokio::time::sleep(timeout + Duration::from_millis(100)).await;
        for path in ["/healthz", "/livez"] {
            let reply = get_ok(port, path).await;
            assert_eq!(reply.status, 503, "{path}: {reply:?}");
            let body = reply.json();
            assert_eq!(body["healthy"], false);
            let last_updated = parse_go_time(&body["lastUpdated"]);
            let current_time = parse_go_time(&body["currentTime"]);
            let programmed = timestamp(programmed_at).unwrap();
            assert!(
                last_updated <= programmed,
                "lastUpdated is when it was programmed"
            );
            assert!(current_time.duration_since(last_updated).unsigned_abs() >= timeout);
        }
        assert!(!health.is_healthy());

        health.updated();
        for path in ["/healthz", "/livez"] {
            let reply = get_ok(port, path).await;
            assert_eq!(reply.status, 200, "{path}: {reply:?}");
            assert_eq!(reply.json()["healthy"], true);
        }
    }

    #[tokio::test]
    async fn healthz_reports_nodes_going_away_and_livez_does_not() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let (port, _task) = start_proxy_server(&health).await;
        health.updated();

        let cases = [
            ("other taint", Some(node_with_taints(&["other"])), 200),
            (
                "autoscaler taint",
                Some(node_with_taints(&[TO_BE_DELETED_TAINT])),
                503,
            ),
            ("untainted", Some(node_with_taints(&[])), 200),
            ("being deleted", Some(deleted_node()), 503),
            ("unknown", None, 503),
            ("back", Some(Node::default()), 200),
        ];
        for (case, node, status) in cases {
            health.set_node(node.as_ref());
            let healthz = get_ok(port, "/healthz").await;
            assert_eq!(healthz.status, status, "{case}: {healthz:?}");
            let body = healthz.json();
            assert_eq!(body["nodeEligible"], status == 200, "{case}");
            assert_eq!(body["healthy"], true, "{case}: the proxy itself is fine");

            let livez = get_ok(port, "/livez").await;
            assert_eq!(livez.status, 200, "{case}: {livez:?}");
            assert!(livez.json().get("nodeEligible").is_none(), "{case}");
        }
    }

    #[tokio::test]
    async fn service_checks_follow_local_endpoints_and_proxy_health() {
        let health = ProxyHealth::new(Duration::from_millis(200));
        let mut server = ServiceHealthServer::new(LOCALHOST, health.clone());
        let (port_a, port_b) = (free_port(), free_port());
        let failed = server.sync(&[
            service("default", "web", port_a, 0),
            service("prod", "api", port_b, 2),
        ]);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(server.ports(), BTreeSet::from([port_a, port_b]));

        let check = |port: u16,
                     path: &'static str,
                     status: u16,
                     namespace: &'static str,
                     name: &'static str,
                     endpoints: usize,
                     proxy_healthy: bool| async move {
            let reply = get_ok(port, path).await;
            assert_eq!(reply.status, status, "{reply:?}");
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(
                reply.header("x-load-balancing-endpoint-weight"),
                Some(endpoints.to_string().as_str())
            );
            assert_eq!(
                reply.body,
                service_health_body(namespace, name, endpoints, proxy_healthy)
            );
            let body = reply.json();
            assert_eq!(body["service"]["namespace"], namespace);
            assert_eq!(body["service"]["name"], name);
            assert_eq!(body["localEndpoints"], endpoints);
            assert_eq!(body["serviceProxyHealthy"], proxy_healthy);
        };

        check(port_a, "/", 503, "default", "web", 0, true).await;
        check(port_b, "/healthz", 200, "prod", "api", 2, true).await;
        check(port_b, "/any/path?at=all", 200, "prod", "api", 2, true).await;

        // Endpoints come and go.
        assert!(
            server
                .sync(&[
                    service("default", "web", port_a, 3),
                    service("prod", "api", port_b, 0)
                ])
                .is_empty()
        );
        check(port_a, "/", 200, "default", "web", 3, true).await;
        check(port_b, "/", 503, "prod", "api", 0, true).await;

        // The node going away does not change the service checks (only /healthz)...
        health.updated();
        health.set_node(Some(&deleted_node()));
        check(port_a, "/", 200, "default", "web", 3, true).await;

        // ...but a proxy that does not keep up makes every service check fail.
        health.queued_update();
        tokio::time::sleep(Duration::from_millis(300)).await;
        check(port_a, "/", 503, "default", "web", 3, false).await;
        check(port_b, "/", 503, "prod", "api", 0, false).await;
        health.updated();
        check(port_a, "/", 200, "default", "web", 3, true).await;
    }

    #[tokio::test]
    async fn endpoint_counts_change_in_place() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let mut server = ServiceHealthServer::new(LOCALHOST, health);
        let port = free_port();
        assert!(
            server
                .sync(&[service("default", "web", port, 1)])
                .is_empty()
        );

        let mut connection = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        let reply = get_keep_alive(&mut connection, "/").await;
        assert_eq!(
            (reply.status, reply.json()["localEndpoints"].clone()),
            (200, Value::from(1))
        );

        // Same port: the listener and its connections stay; the next answer has the new count.
        assert!(
            server
                .sync(&[service("default", "web", port, 0)])
                .is_empty()
        );
        let reply = get_keep_alive(&mut connection, "/").await;
        assert_eq!(
            (reply.status, reply.json()["localEndpoints"].clone()),
            (503, Value::from(0))
        );
        assert!(
            server
                .sync(&[service("default", "web", port, 4)])
                .is_empty()
        );
        let reply = get_keep_alive(&mut connection, "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("4"));
    }

    #[tokio::test]
    async fn taken_port_is_reported_and_others_serve() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let mut server = ServiceHealthServer::new(LOCALHOST, health);
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let (port_a, port_b) = (free_port(), free_port());
        let wanted = [
            service("default", "a", port_a, 1),
            service("default", "taken", taken_port, 1),
            service("default", "b", port_b, 1),
        ];

        let failed = server.sync(&wanted);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, taken_port);
        assert_eq!(failed[0].1.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(server.ports(), BTreeSet::from([port_a, port_b]));
        assert_eq!(get_ok(port_a, "/").await.status, 200);
        assert_eq!(get_ok(port_b, "/").await.status, 200);

        // Still taken: reported again. Freed: the next sync binds it.
        assert_eq!(server.sync(&wanted).len(), 1);
        drop(taken);
        assert!(server.sync(&wanted).is_empty());
        let reply = get_ok(taken_port, "/").await;
        assert_eq!(reply.json()["service"]["name"], "taken");
        assert_eq!(get_ok(port_a, "/").await.status, 200);
    }

    #[tokio::test]
    async fn removed_services_stop_listening() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let mut server = ServiceHealthServer::new(LOCALHOST, health);
        let (port_a, port_b, port_c) = (free_port(), free_port(), free_port());
        assert!(
            server
                .sync(&[
                    service("default", "a", port_a, 1),
                    service("default", "b", port_b, 1)
                ])
                .is_empty()
        );
        assert_eq!(get_ok(port_a, "/").await.status, 200);

        // Removed: refused at once, even with a connection open to it.
        let mut open = TcpStream::connect((Ipv4Addr::LOCALHOST, port_a))
            .await
            .unwrap();
        assert!(
            server
                .sync(&[service("default", "b", port_b, 1)])
                .is_empty()
        );
        assert_refused(port_a).await;
        assert_eq!(get_ok(port_b, "/").await.status, 200);
        // Its connections end too (as Go's Server.Close): the server side closes.
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), open.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // A port change moves the listener.
        assert!(
            server
                .sync(&[service("default", "b", port_c, 1)])
                .is_empty()
        );
        assert_refused(port_b).await;
        assert_eq!(get_ok(port_c, "/").await.json()["service"]["name"], "b");

        // A port handed from one service to another in one sync.
        assert!(
            server
                .sync(&[service("default", "c", port_c, 2)])
                .is_empty()
        );
        assert_eq!(get_ok(port_c, "/").await.json()["service"]["name"], "c");

        // Empty set, then dropping the server: nothing listens.
        assert!(
            server
                .sync(&[service("default", "a", port_a, 1)])
                .is_empty()
        );
        assert!(server.sync(&[]).is_empty());
        assert!(server.ports().is_empty());
        assert_refused(port_a).await;
        assert_refused(port_c).await;
        assert!(
            server
                .sync(&[service("default", "a", port_a, 1)])
                .is_empty()
        );
        drop(server);
        assert_refused(port_a).await;
    }

    #[tokio::test]
    async fn duplicate_entries_last_one_counts() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let mut server = ServiceHealthServer::new(LOCALHOST, health);
        let (port_a, port_b) = (free_port(), free_port());
        let failed = server.sync(&[
            service("default", "a", port_a, 1),
            service("default", "a", port_b, 0),
        ]);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(server.ports(), BTreeSet::from([port_b]));
        assert_eq!(get_ok(port_b, "/").await.status, 503);
    }
}
