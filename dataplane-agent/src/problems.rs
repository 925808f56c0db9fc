//! What in the cluster's objects this node could not program, as data ([`Problem`], with a
//! [`ProblemKind`]), and the one place that tells people about it ([`ProblemReporter`]): a log
//! line (naming the manifest file in manifest mode), the `dataplane_objects_skipped_total`
//! counter labelled with the kind, and, in cluster mode, a Warning Event on the Service it
//! affects, so that `kubectl describe service` says why it is not served (rate-limited per
//! service and kind).
use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::{debug, warn};

use crate::{
    observe::metrics::Metrics,
    source::objects::{ObjectKey, ObjectName},
};

/// Why something was skipped. The metric label and the Event reason are derived from it, so
/// they only ever take these values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// A clusterIP that is not an IP address, is unspecified, or is not of the family
    /// `ipFamilies` gives it.
    InvalidClusterIp,
    /// A port number outside 1-65535 (of a Service or a slice).
    InvalidPort,
    /// A protocol the datapath does not handle (SCTP).
    UnsupportedProtocol,
    NodePortOutOfRange,
    InvalidLoadBalancerIp,
    /// A load balancer ingress with a hostname only.
    LoadBalancerHostname,
    InvalidSourceRange,
    /// Every loadBalancerSourceRanges entry is invalid: the load-balancer IPs are not served.
    NoValidSourceRange,
    InvalidExternalIp,
    InvalidAnnotation,
    /// A service port that no port of its EndpointSlices matches.
    PortNotInSlices,
    /// A slice with endpoints and no ports.
    SliceWithoutPorts,
    /// An endpoint address that is not an address of its slice's `addressType`.
    InvalidEndpointAddress,
    /// No longer reported: IPv6 slices are served since dual stack. Kept so its metric label
    /// and Event reason stay in the contract (a label never disappears).
    Ipv6SlicesIgnored,
    /// The same frontend twice in one service.
    DuplicateFrontend,
    /// A frontend another service owns (it ranks first).
    FrontendConflict,
    /// An external or load-balancer IP that is a cluster IP or a node's address: serving it
    /// would hijack that traffic (the CVE-2020-8554 class).
    FrontendRefused,
    /// More frontends than `--max-frontends-per-service`.
    ServiceFrontendLimit,
    /// The node's total would pass `--max-frontends`.
    FrontendLimit,
    /// A map is full, or a write to it failed.
    MapFull,
    /// A manifest document that does not parse (manifest mode; logged with its file).
    InvalidManifest,
}

impl ProblemKind {
    /// The `reason` label of `dataplane_objects_skipped_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidClusterIp => "invalid_cluster_ip",
            Self::InvalidPort => "invalid_port",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::NodePortOutOfRange => "node_port_out_of_range",
            Self::InvalidLoadBalancerIp => "invalid_load_balancer_ip",
            Self::LoadBalancerHostname => "load_balancer_hostname",
            Self::InvalidSourceRange => "invalid_source_range",
            Self::NoValidSourceRange => "no_valid_source_range",
            Self::InvalidExternalIp => "invalid_external_ip",
            Self::InvalidAnnotation => "invalid_annotation",
            Self::PortNotInSlices => "port_not_in_slices",
            Self::SliceWithoutPorts => "slice_without_ports",
            Self::InvalidEndpointAddress => "invalid_endpoint_address",
            Self::Ipv6SlicesIgnored => "ipv6_slices_ignored",
            Self::DuplicateFrontend => "duplicate_frontend",
            Self::FrontendConflict => "frontend_conflict",
            Self::FrontendRefused => "frontend_refused",
            Self::ServiceFrontendLimit => "service_frontend_limit",
            Self::FrontendLimit => "frontend_limit",
            Self::MapFull => "map_full_or_write_failed",
            Self::InvalidManifest => "invalid_manifest",
        }
    }

    /// The Event's `reason` (CamelCase, as Kubernetes components write them).
    pub fn event_reason(self) -> &'static str {
        match self {
            Self::InvalidClusterIp => "InvalidClusterIP",
            Self::InvalidPort => "InvalidPort",
            Self::UnsupportedProtocol => "UnsupportedProtocol",
            Self::NodePortOutOfRange => "NodePortOutOfRange",
            Self::InvalidLoadBalancerIp => "InvalidLoadBalancerIP",
            Self::LoadBalancerHostname => "LoadBalancerHostname",
            Self::InvalidSourceRange => "InvalidSourceRange",
            Self::NoValidSourceRange => "NoValidSourceRange",
            Self::InvalidExternalIp => "InvalidExternalIP",
            Self::InvalidAnnotation => "InvalidAnnotation",
            Self::PortNotInSlices => "PortNotInEndpointSlices",
            Self::SliceWithoutPorts => "EndpointSliceWithoutPorts",
            Self::InvalidEndpointAddress => "InvalidEndpointAddress",
            Self::Ipv6SlicesIgnored => "IPv6EndpointSlicesIgnored",
            Self::DuplicateFrontend => "DuplicateFrontend",
            Self::FrontendConflict => "FrontendConflict",
            Self::FrontendRefused => "FrontendRefused",
            Self::ServiceFrontendLimit => "ServiceFrontendLimit",
            Self::FrontendLimit => "FrontendLimit",
            Self::MapFull => "MapFull",
            Self::InvalidManifest => "InvalidManifest",
        }
    }
}

/// Something in the cluster's objects this node cannot program, and skipped.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The object at fault (in manifest mode, its file is looked up by this key).
    pub object: ObjectKey,
    /// `namespace/name` of the Service it affects: where its Event goes.
    pub service: ObjectName,
    /// What is wrong, for people.
    pub reason: String,
}

impl Problem {
    /// A problem of the Service `service` itself.
    pub fn of_service(kind: ProblemKind, service: &str, reason: String) -> Self {
        Self {
            kind,
            object: ObjectKey {
                kind: crate::source::objects::Kind::Service,
                name: service.to_string(),
            },
            service: service.to_string(),
            reason,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// At most one Event per service and kind of problem in this time.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(300);
/// Events waiting for the API server; more are dropped (and logged at debug level).
const EVENT_QUEUE: usize = 256;
/// (service, kind) pairs the rate limit remembers; beyond it, no more Events until some are
/// older than [`EVENT_INTERVAL`].
const RATE_LIMIT_ENTRIES: usize = 4096;
/// The Event's `reportingController`.
pub const EVENT_CONTROLLER: &str = "dataplane-agent";

/// Reports problems: log line, metric and (cluster mode) Event.
pub struct ProblemReporter {
    metrics: Arc<Metrics>,
    events: Option<EventSink>,
}

impl ProblemReporter {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            events: None,
        }
    }

    /// Also publish Warning Events through the API server, as `node_name`'s agent. Spawns the
    /// publishing task: call inside a Tokio runtime.
    pub fn with_events(mut self, client: kube::Client, node_name: &str) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(format!("{EVENT_CONTROLLER}-{node_name}")),
            },
        );
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        tokio::spawn(publish(recorder, rx));
        self.events = Some(EventSink {
            tx,
            last: HashMap::new(),
        });
        self
    }

    /// Reports one problem. `file` is where the object came from (manifest mode); `uid` the
    /// affected Service's, when known (Events then name that exact object).
    pub fn report(&mut self, problem: &Problem, file: Option<&Path>, uid: Option<&str>) {
        self.metrics.skipped(problem.kind.label());
        let file = file.map(|f| f.display().to_string()).unwrap_or_default();
        warn!(object = %problem.object, file, kind = problem.kind.label(), reason = %problem.reason, "skipping");
        if let Some(events) = &mut self.events {
            events.send(problem, uid, Instant::now());
        }
    }

    /// A map write that failed (the map is full, or the kernel refused it).
    pub fn map_write_failed(&self) {
        self.metrics.skipped(ProblemKind::MapFull.label());
    }

    /// Manifest documents skipped (the manifest source logged each with its file).
    pub fn invalid_manifests(&self, count: u64) {
        for _ in 0..count {
            self.metrics.skipped(ProblemKind::InvalidManifest.label());
        }
    }
}

struct EventSink {
    tx: tokio::sync::mpsc::Sender<(ObjectReference, Event)>,
    /// When each (service, kind) last had an Event.
    last: HashMap<(ObjectName, ProblemKind), Instant>,
}

impl EventSink {
    fn send(&mut self, problem: &Problem, uid: Option<&str>, now: Instant) {
        if !rate_limit(&mut self.last, problem, now) {
            return;
        }
        let (namespace, name) = problem
            .service
            .split_once('/')
            .unwrap_or(("default", &problem.service));
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: uid.map(str::to_string),
            ..Default::default()
        };
        let mut note = problem.to_string();
        if note.len() > 1000 {
            // The API's limit is 1 kB.
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: problem.kind.event_reason().into(),
            note: Some(note),
            action: "Programming".into(),
            secondary: None,
        };
        if self.tx.try_send((reference, event)).is_err() {
            debug!(service = %problem.service, "event queue full; event dropped");
        }
    }
}

/// Whether `problem` may have an Event now (none for its service and kind within
/// [`EVENT_INTERVAL`]); remembers it if so.
fn rate_limit(
    last: &mut HashMap<(ObjectName, ProblemKind), Instant>,
    problem: &Problem,
    now: Instant,
) -> bool {
    let key = (problem.service.clone(), problem.kind);
    if last
        .get(&key)
        .is_some_and(|t| now.duration_since(*t) < EVENT_INTERVAL)
    {
        return false;
    }
    if last.len() >= RATE_LIMIT_ENTRIES {
        last.retain(|_, t| now.duration_since(*t) < EVENT_INTERVAL);
        if last.len() >= RATE_LIMIT_ENTRIES {
            // This many problems at once: the logs and the metric have them; the API server
            // is spared a flood.
            return false;
        }
    }
    last.insert(key, now);
    true
}

async fn publish(
    recorder: Recorder,
    mut rx: tokio::sync::mpsc::Receiver<(ObjectReference, Event)>,
) {
    let mut failing = false;
    while let Some((reference, event)) = rx.recv().await {
        match recorder.publish(&event, &reference).await {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                warn!(%error, service = reference.name.as_deref().unwrap_or(""), "cannot publish an Event");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_reasons_are_distinct() {
        use ProblemKind::*;
        let all = [
            InvalidClusterIp,
            InvalidPort,
            UnsupportedProtocol,
            NodePortOutOfRange,
            InvalidLoadBalancerIp,
            LoadBalancerHostname,
            InvalidSourceRange,
            NoValidSourceRange,
            InvalidExternalIp,
            InvalidAnnotation,
            PortNotInSlices,
            SliceWithoutPorts,
            InvalidEndpointAddress,
            Ipv6SlicesIgnored,
            DuplicateFrontend,
            FrontendConflict,
            FrontendRefused,
            ServiceFrontendLimit,
            FrontendLimit,
            MapFull,
            InvalidManifest,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|k| k.label()).collect();
        let reasons: std::collections::BTreeSet<_> = all.iter().map(|k| k.event_reason()).collect();
        assert_eq!((labels.len(), reasons.len()), (all.len(), all.len()));
    }

    #[test]
    fn one_event_per_service_and_kind_per_interval() {
        let mut last = HashMap::new();
        let p = |service: &str, kind| Problem::of_service(kind, service, "x".into());
        let t0 = Instant::now();
        let refused = p("a/web", ProblemKind::FrontendRefused);
        assert!(rate_limit(&mut last, &refused, t0));
        assert!(!rate_limit(
            &mut last,
            &refused,
            t0 + Duration::from_secs(10)
        ));
        // Another kind, or another service: its own budget.
        assert!(rate_limit(
            &mut last,
            &p("a/web", ProblemKind::InvalidPort),
            t0
        ));
        assert!(rate_limit(
            &mut last,
            &p("b/web", ProblemKind::FrontendRefused),
            t0
        ));
        assert!(rate_limit(&mut last, &refused, t0 + EVENT_INTERVAL));
        // A flood is cut off at the limit, and flows again once the entries are stale.
        let mut last = HashMap::new();
        let sent = (0..RATE_LIMIT_ENTRIES + 10)
            .filter(|i| {
                rate_limit(
                    &mut last,
                    &p(&format!("ns/s{i}"), ProblemKind::InvalidPort),
                    t0,
                )
            })
            .count();
        assert_eq!(sent, RATE_LIMIT_ENTRIES);
        let later = t0 + EVENT_INTERVAL;
        assert!(rate_limit(
            &mut last,
            &p("ns/new", ProblemKind::InvalidPort),
            later
        ));
        assert_eq!(last.len(), 1);
    }
}
