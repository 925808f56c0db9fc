//! The Kubernetes objects the agent acts on, as one snapshot keyed by `namespace/name`.
//! Every source (manifest directory, API server) fills the same snapshot; the planner reads it.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
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

/// Objects are shared (`Arc`), not copied: a snapshot of 10,000 services costs pointers, and
/// an object that did not change is the same allocation from one snapshot to the next.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: BTreeMap<ObjectName, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectName, Arc<EndpointSlice>>,
    /// This node (the one named by `--node-name`), once seen.
    pub node: Option<Arc<Node>>,
}

/// One object of a kind the agent understands.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

impl Object {
    /// `Kind namespace/name`, the form messages about objects use.
    pub fn describe(&self) -> String {
        match self {
            Object::Service(s) => format!("Service {}", object_name(&s.metadata)),
            Object::EndpointSlice(s) => format!("EndpointSlice {}", object_name(&s.metadata)),
            Object::Node(n) => format!("Node {}", n.metadata.name.as_deref().unwrap_or("")),
        }
    }
}

impl ClusterObjects {
    /// Adds or replaces an object. Nodes other than `node_name` are ignored.
    pub fn apply(&mut self, object: Object, node_name: &str) {
        match object {
            Object::Service(svc) => {
                self.services.insert(object_name(&svc.metadata), svc);
            }
            Object::EndpointSlice(slice) => {
                self.endpoint_slices
                    .insert(object_name(&slice.metadata), slice);
            }
            Object::Node(node) => {
                if node.metadata.name.as_deref() == Some(node_name) {
                    self.node = Some(node);
                }
            }
        }
    }
}
