//! `cargo xtask <task>`: setup, build-ebpf, test, demo, bench.
mod bench;
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
    /// Run the benchmark suite (root, about 10 minutes): per-packet cost, connection latency,
    /// throughput, programming time and memory, against kube-proxy's rule structures; prints
    /// a table and writes target/bench/report.json.
    Bench {
        /// A fast smoke run: fewer repeats, smaller scales.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the bench binary (e.g. `-- --sections 1,4`).
        #[arg(last = true)]
        args: Vec<String>,
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
        Task::Bench { quick, args } => bench::bench(quick, &args),
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
    if !testbed::is_root() {
        eprintln!("xtask: not root: privileged tests (namespaces, BPF) will be SKIPPED");
    }
    let mut totals = TestTotals::default();
    let mut unit = Command::new("cargo");
    unit.current_dir(&root)
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "dataplane-tests",
            "--",
        ])
        .args(args);
    let unit_ok = run_tests(&mut unit, &mut totals)?;
    // Privileged tests share the machine's two cores and time real traffic: one at a time.
    // --nocapture so that a skip says so in the output.
    let mut e2e = Command::new("cargo");
    e2e.current_dir(&root)
        .env("DATAPLANE_AGENT_BIN", &agent)
        .args([
            "test",
            "--no-fail-fast",
            "-p",
            "dataplane-tests",
            // The benchmark's own unit tests (its statistics) too.
            "--features",
            "bench",
            "--",
            "--test-threads=1",
            "--nocapture",
        ])
        .args(args);
    let e2e_ok = run_tests(&mut e2e, &mut totals)?;
    // The README's first command, as a user runs it.
    if testbed::is_root() {
        eprintln!("+ cargo xtask demo");
        match demo::demo(false, false) {
            Ok(()) => totals.passed += 1,
            Err(e) => {
                eprintln!("demo FAILED: {e:#}");
                totals.failed += 1;
            }
        }
    } else {
        println!("SKIPPED: the demo needs root");
        totals.skipped += 1;
    }
    // libtest counts a skipped test as passed; the summary does not.
    let passed = totals.passed - totals.skipped.min(totals.passed);
    println!(
        "xtask test: {passed} passed, {} failed, {} skipped",
        totals.failed, totals.skipped
    );
    anyhow::ensure!(unit_ok && e2e_ok && totals.failed == 0, "tests failed");
    Ok(())
}

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

/// Runs a `cargo test` command, passing its output through, and adds up its results.
fn run_tests(cmd: &mut Command, totals: &mut TestTotals) -> anyhow::Result<bool> {
    use std::io::BufRead;
    eprintln!("+ {}", render(cmd));
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("SKIPPED:") {
            totals.skipped += 1;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim()
                                .trim_start_matches("ok.")
                                .trim_start_matches("FAILED.")
                                .trim()
                                .parse()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            totals.passed += count("passed");
            totals.failed += count("failed");
        }
    }
    Ok(child.wait()?.success())
}
