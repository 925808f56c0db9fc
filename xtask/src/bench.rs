//! `cargo xtask bench`: builds the BPF object, the agent and the bench binary (release), then
//! runs the benchmark suite (`tests/src/bench/`), which prints a table and writes
//! `target/bench/report.json`.
//!
//! The bench binary links the agent library, so it sits behind the `bench` feature of
//! `dataplane-tests`: xtask itself must build before the BPF object exists.
use std::process::Command;

use crate::{build, run, setup, workspace_root};

pub fn bench(quick: bool, args: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        testbed::is_root(),
        "the bench needs root (network namespaces, BPF): run `sudo cargo xtask bench`"
    );
    setup::setup()?;
    for tool in ["iptables-legacy", "iptables-nft", "nft", "iperf3"] {
        anyhow::ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing (apt-get install iptables nftables iperf3)"
        );
    }
    build::build_ebpf(true)?;
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "dataplane-agent",
        "--bin",
        "dataplane-agent",
    ]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "dataplane-tests",
        "--bin",
        "dataplane-bench",
        "--features",
        "bench",
    ]))?;
    let release = root.join("target/release");
    let mut cmd = Command::new(release.join("dataplane-bench"));
    cmd.current_dir(&root)
        .arg("--agent")
        .arg(release.join("dataplane-agent"))
        .arg("--out")
        .arg(root.join("target/bench/report.json"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(args);
    run(&mut cmd)
}
