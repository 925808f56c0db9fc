//! What people and tools see of the agent and the datapath: kube-proxy's health and metrics
//! endpoints, the inspection commands (read from the pinned maps, so they work while the
//! agent is stopped) and `trace` (with the frames it runs through the live program).
pub mod frame;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod trace;
