//! Where the agent learns the cluster's objects from.
pub mod kube;
pub mod manifests;
