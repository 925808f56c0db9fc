//! Where the agent learns the cluster's objects from.
pub mod manifests;
