//! The Kubernetes objects the agent acts on, keyed by `namespace/name`. Sources report changes
//! as [`Delta`]s; applying them says which services' plans may have changed ([`Touched`]), so a
//! change costs the planner one service, not all of them.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::{EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// `namespace/name`, the way Kubernetes tools print an object.
pub type ObjectName = String;

pub fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectName {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Label that joins an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Annotation the EndpointSlice controller sets to when the change behind a slice happened.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The service a slice belongs to (`namespace/<service-name label>`), if labelled.
pub fn slice_service(slice: &Slice) -> Option<ObjectName> {
    slice.service.clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// Which object: its kind and `namespace/name` (a Node's plain name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: ObjectName,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.kind, self.name)
    }
}

impl ObjectKey {
    /// The `Kind name` form messages use, back into a key.
    pub fn parse(text: &str) -> Option<Self> {
        let (kind, name) = text.split_once(' ')?;
        let kind = match kind {
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "Node" => Kind::Node,
            _ => return None,
        };
        Some(Self {
            kind,
            name: name.to_string(),
        })
    }
}

/// One object of a kind the agent understands.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<Slice>),
    Node(Arc<Node>),
}

impl Object {
    /// A Service as kept: lists trimmed to their length (a parser that does not know a
    /// list's length leaves room to grow, which over 10,000s of objects is most of the
    /// memory).
    pub fn service(mut service: Service) -> Self {
        keep_only_what_is_read(
            &mut service.metadata,
            &[crate::plan::ANNOTATION_LB_ALGORITHM],
        );
        if let Some(spec) = &mut service.spec {
            spec.ports.as_mut().map(Vec::shrink_to_fit);
            spec.cluster_ips.as_mut().map(Vec::shrink_to_fit);
        }
        Object::Service(Arc::new(service))
    }

    /// An EndpointSlice as kept: what the planner reads of it (see [`Slice`]).
    pub fn endpoint_slice(mut slice: EndpointSlice) -> Self {
        // What the labels and annotations say is kept as fields: a map of one entry costs
        // half a kilobyte, for every slice.
        let meta = &mut slice.metadata;
        let labels = meta.labels.take().unwrap_or_default();
        let service = labels.get(LABEL_SERVICE_NAME).map(|service| {
            format!(
                "{}/{service}",
                meta.namespace.as_deref().unwrap_or("default")
            )
        });
        let proxied = crate::plan::proxied_by_us(&labels);
        let trigger = meta
            .annotations
            .take()
            .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME)?.parse().ok());
        // Its name is all that is kept of the rest (owner references, generateName...).
        let name = object_name(meta);
        let mut ports = slice.ports;
        ports.as_mut().map(Vec::shrink_to_fit);
        let endpoints = slice.endpoints.into_iter().flatten().map(|e| {
            let conditions = e.conditions.unwrap_or_default();
            let hints = e.hints.unwrap_or_default();
            let zones: Vec<String> = hints
                .for_zones
                .into_iter()
                .flatten()
                .map(|z| z.name)
                .collect();
            let nodes: Vec<String> = hints
                .for_nodes
                .into_iter()
                .flatten()
                .map(|n| n.name)
                .collect();
            SliceEndpoint {
                address: e.addresses.into_iter().next().map(|a| match a.parse() {
                    Ok(std::net::IpAddr::V4(ip)) => Address::V4(ip),
                    Ok(std::net::IpAddr::V6(ip)) => Address::V6(ip),
                    Err(_) => Address::Other(a.into()),
                }),
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating,
                node_name: e.node_name.map(String::into_boxed_str),
                hints: (!zones.is_empty() || !nodes.is_empty())
                    .then(|| Box::new(Hints { zones, nodes })),
            }
        });
        Object::EndpointSlice(Arc::new(Slice {
            name,
            service,
            proxied,
            trigger,
            address_type: slice.address_type,
            ports,
            endpoints: endpoints.collect(),
        }))
    }

    pub fn key(&self) -> ObjectKey {
        let (kind, name) = match self {
            Object::Service(s) => (Kind::Service, object_name(&s.metadata)),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, s.name.clone()),
            Object::Node(n) => (Kind::Node, n.metadata.name.clone().unwrap_or_default()),
        };
        ObjectKey { kind, name }
    }
}

/// Drops what the agent never reads of an object's metadata: `managedFields`, owner
/// references, finalizers, labels other
/// than the proxy's, annotations other than `annotations` (`kubectl apply` keeps a whole copy
/// of the object in one). In a real cluster these are most of an object's size.
fn keep_only_what_is_read(meta: &mut ObjectMeta, annotations: &[&str]) {
    use crate::plan::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    let labels = [LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS];
    if let Some(map) = &mut meta.labels {
        map.retain(|k, _| labels.contains(&k.as_str()));
    }
    if let Some(map) = &mut meta.annotations {
        map.retain(|k, _| annotations.contains(&k.as_str()));
    }
    for map in [&mut meta.labels, &mut meta.annotations] {
        if map.as_ref().is_some_and(|m| m.is_empty()) {
            *map = None;
        }
    }
}

/// An EndpointSlice as the agent keeps it: its endpoints reduced to what the planner reads.
/// The API's form of an endpoint takes 350 bytes before its first address; at 10,000s of
/// services the endpoints would be most of the agent's memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    /// `namespace/name`. (Of its metadata only this is kept, and what its labels and
    /// annotations say, in the fields below.)
    pub name: ObjectName,
    /// `namespace/<kubernetes.io/service-name label>`, when labelled.
    pub service: Option<ObjectName>,
    /// Not labelled for another proxy, nor headless.
    pub proxied: bool,
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    pub trigger: Option<k8s_openapi::jiff::Timestamp>,
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    /// The first address: the only one that counts.
    pub address: Option<Address>,
    /// The conditions as given (absent is not false: see `plan`).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Box<str>>,
    /// Topology hints, when it has any (most endpoints have none).
    pub hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints: `forZones` and `forNodes` names.
#[derive(Clone, Debug, PartialEq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

/// An endpoint's address: an IP address of either family takes no allocation.
#[derive(Clone, Debug, PartialEq)]
pub enum Address {
    V4(std::net::Ipv4Addr),
    V6(std::net::Ipv6Addr),
    /// Anything else, as written (not an address).
    Other(Box<str>),
}

/// A change a source observed.
#[derive(Debug)]
pub enum Delta {
    /// Added or changed.
    Apply(Object),
    Delete(ObjectKey),
    /// Every object of the kind (a relist): the others of that kind are gone.
    Relist(Kind, Vec<Object>),
}

/// What applying deltas changed: the services to plan again, and kube-proxy's change counts.
#[derive(Debug, Default)]
pub struct Touched {
    /// Services whose plan may differ (their Service or one of their slices changed).
    pub services: BTreeSet<ObjectName>,
    /// This node's Node changed.
    pub node: bool,
    pub service_changes: u64,
    pub slice_changes: u64,
    /// The last-change-trigger-time of each changed slice that has one.
    pub triggers: Vec<SystemTime>,
}

/// Objects are shared (`Arc`), not copied: a source and this store hold the same allocation.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    services: BTreeMap<ObjectName, Arc<Service>>,
    endpoint_slices: BTreeMap<ObjectName, Arc<Slice>>,
    /// This node (the one named by `--node-name`), once seen.
    node: Option<Arc<Node>>,
    /// (service, slice) by the service-name label, to plan one service. (Not a set per
    /// service: a set of one costs a node of eleven.)
    slices_by_service: BTreeSet<(ObjectName, ObjectName)>,
}

impl ClusterObjects {
    pub fn services(&self) -> &BTreeMap<ObjectName, Arc<Service>> {
        &self.services
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_deref()
    }

    /// The slices labelled for `service`.
    pub fn slices_of<'a>(
        &'a self,
        service: &str,
    ) -> impl Iterator<Item = (&'a ObjectName, &'a Slice)> {
        self.slices_by_service
            .range((service.to_string(), String::new())..)
            .take_while(move |(s, _)| s == service)
            .filter_map(|(_, name)| Some((name, &**self.endpoint_slices.get(name)?)))
    }

    /// Applies one change (a Node other than `node_name` is ignored), noting what it touched.
    pub fn apply(&mut self, delta: Delta, node_name: &str, touched: &mut Touched) {
        match delta {
            Delta::Apply(Object::Service(svc)) => {
                let name = object_name(&svc.metadata);
                if self.services.get(&name).is_some_and(|old| same(old, &svc)) {
                    return;
                }
                self.services.insert(name.clone(), svc);
                touched.service_changes += 1;
                touched.services.insert(name);
            }
            Delta::Apply(Object::EndpointSlice(slice)) => {
                let name = slice.name.clone();
                if let Some(old) = self.endpoint_slices.get(&name) {
                    if same(old, &slice) {
                        return;
                    }
                    let old = old.clone();
                    self.unindex(&name, &old, touched);
                }
                touched.triggers.extend(slice.trigger.map(SystemTime::from));
                touched.slice_changes += 1;
                if let Some(service) = slice_service(&slice) {
                    touched.services.insert(service.clone());
                    self.slices_by_service.insert((service, name.clone()));
                }
                self.endpoint_slices.insert(name, slice);
            }
            Delta::Apply(Object::Node(node)) => {
                if node.metadata.name.as_deref() != Some(node_name)
                    || self.node.as_ref().is_some_and(|old| same(old, &node))
                {
                    return;
                }
                self.node = Some(node);
                touched.node = true;
            }
            Delta::Delete(key) => match key.kind {
                Kind::Service => {
                    if self.services.remove(&key.name).is_some() {
                        touched.service_changes += 1;
                        touched.services.insert(key.name);
                    }
                }
                Kind::EndpointSlice => {
                    if let Some(old) = self.endpoint_slices.remove(&key.name) {
                        touched.slice_changes += 1;
                        self.unindex(&key.name, &old, touched);
                    }
                }
                Kind::Node => {
                    if key.name == node_name && self.node.take().is_some() {
                        touched.node = true;
                    }
                }
            },
            Delta::Relist(kind, objects) => {
                let keep: BTreeSet<ObjectKey> = objects.iter().map(Object::key).collect();
                let gone: Vec<ObjectName> = match kind {
                    Kind::Service => self.services.keys().cloned().collect(),
                    Kind::EndpointSlice => self.endpoint_slices.keys().cloned().collect(),
                    Kind::Node => self.node.iter().map(|_| node_name.to_string()).collect(),
                };
                for name in gone {
                    let key = ObjectKey { kind, name };
                    if !keep.contains(&key) {
                        self.apply(Delta::Delete(key), node_name, touched);
                    }
                }
                for object in objects {
                    self.apply(Delta::Apply(object), node_name, touched);
                }
            }
        }
    }

    /// Adds or replaces an object (a snapshot being built; nothing is noted).
    pub fn insert(&mut self, object: Object, node_name: &str) {
        self.apply(Delta::Apply(object), node_name, &mut Touched::default());
    }

    fn unindex(&mut self, name: &str, old: &Slice, touched: &mut Touched) {
        let Some(service) = slice_service(old) else {
            return;
        };
        let entry = (service, name.to_string());
        self.slices_by_service.remove(&entry);
        touched.services.insert(entry.0);
    }
}

/// An unchanged object is usually the same allocation, so this is mostly a pointer check.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_keep_only_the_metadata_the_agent_reads() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "helm.sh/chart": "web-1.0",
                           "service.kubernetes.io/service-proxy-name": "other"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a whole copy\": 1}",
                    "dataplane.dev/lb-algorithm": "maglev"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"clusterIP": "10.96.0.1"}
        }))
        .unwrap();
        let Object::Service(kept) = Object::service(service) else {
            unreachable!()
        };
        let meta = &kept.metadata;
        assert!(meta.managed_fields.is_none());
        assert_eq!(
            meta.labels.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["service.kubernetes.io/service-proxy-name"]
        );
        assert_eq!(
            meta.annotations
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["dataplane.dev/lb-algorithm"]
        );
        assert_eq!(meta.uid.as_deref(), Some("u-1"));
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "labels": {"app": "web"},
                         "annotations": {"other": "x"}},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        let Object::EndpointSlice(kept) = Object::endpoint_slice(slice) else {
            unreachable!()
        };
        assert_eq!(kept.name, "default/web-1");
        assert_eq!(kept.service, None);
    }
}
