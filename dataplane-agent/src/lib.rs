//! The node agent, one folder per stage:
//! - `source`: Kubernetes objects in (the API server's watches, or a manifest directory),
//!   kept reduced to what planning reads (`source::objects`);
//! - `plan`: the desired datapath for this node, with kube-proxy's endpoint semantics
//!   (`plan::endpoints`) and typed `problems` for what is skipped;
//! - `datapath`: everything that touches the kernel: loading, attaching (tc and cgroup
//!   hooks), and writing the plan into the maps (`translate` says what entries, the
//!   `programmer` in what order);
//! - `observe`: what people and tools see: health and metrics over HTTP, the inspection
//!   commands, `trace`;
//! - `run`: the agent's loop tying them together. `main.rs` only parses and dispatches.
pub mod datapath;
pub mod observe;
pub mod parallel;
pub mod plan;
pub mod problems;
pub mod run;
pub mod source;
