//! `cargo xtask <task>`: setup, build-ebpf, test, demo.
mod build;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks for the eBPF dataplane")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (packages, bpf-linker, bpffs mount).
    Setup,
    /// Build the BPF programs for bpfel-unknown-none, with BTF.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Setup, BPF build, and the whole test suite (privileged tests run as root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a namespace "node" with pods and a service, run the agent, send traffic and show
    /// what the datapath did.
    Demo {
        /// Leave the demo running for exploring with the CLI and bpftool.
        #[arg(long)]
        keep: bool,
        /// Remove a demo left running by --keep.
        #[arg(long)]
        down: bool,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, echoing it first, and fails with its exit status.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", render(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", render(cmd)))?;
    anyhow::ensure!(status.success(), "{} failed: {status}", render(cmd));
    Ok(())
}

pub fn render(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf { release } => build::build_ebpf(release).map(|_| ()),
        Task::Test { args } => test(&args),
        Task::Demo { keep, down } => demo::demo(keep, down),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    build::build_ebpf(true)?;
    let root = workspace_root();
    // The end-to-end tests start the agent binary as a separate process, in a namespace.
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "-p", "dataplane-agent"]))?;
    let agent = root.join("target/debug/dataplane-agent");
    let mut unit = Command::new("cargo");
    unit.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "dataplane-tests", "--"])
        .args(args);
    run(&mut unit)?;
    // Privileged tests share the machine's two cores and time real traffic: one at a time.
    let mut e2e = Command::new("cargo");
    e2e.current_dir(&root)
        .env("DATAPLANE_AGENT_BIN", &agent)
        .args(["test", "-p", "dataplane-tests", "--", "--test-threads=1"])
        .args(args);
    run(&mut e2e)
}
