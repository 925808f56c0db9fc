//! Everything that touches the kernel: loading and pinning the BPF object, attaching it to
//! interfaces, and writing the desired state into its maps.
pub mod attach;
pub mod family;
pub mod layout;
pub mod loader;
pub mod maglev;
pub mod maps;
#[cfg(test)]
pub mod model;
mod netlink;
pub mod programmer;
pub mod sock_diag;
pub mod socket_lb;
pub mod takeover;
pub mod translate;

pub use layout::BpffsLayout;
