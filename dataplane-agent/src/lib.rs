//! The node agent: Kubernetes objects in (`source`, `objects`), desired datapath state out
//! (`plan`), written into the kernel's maps (`datapath`), and read back for people (`inspect`).
pub mod datapath;
pub mod endpoints;
pub mod frame;
pub mod health;
pub mod inspect;
pub mod maglev;
pub mod metrics;
pub mod objects;
pub mod parallel;
pub mod plan;
pub mod problems;
pub mod run;
pub mod source;
pub mod trace;
