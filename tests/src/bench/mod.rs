//! The benchmark suite behind `cargo xtask bench`. Sections (the numbering):
//! 1. per-packet cost through BPF_PROG_TEST_RUN (`packets`);
//! 2. TCP connect latency, 3. iperf3 throughput, 4. programming time and 5. memory, in
//!    network namespaces this bench creates (`cluster`), against kube-proxy's rule
//!    structures (`services`) and direct pod traffic;
//! 6. XDP: not used by the datapath yet, reported as not applicable;
//! 7. the large input as one `v1 List` file against one file per service (`cluster`):
//!    programming time and agent memory (`--sections 7` runs it alone).
//!
//! Each figure is the median of several runs after a warm-up. Goals are reported, never
//! asserted: the exit status only says whether every section could run.
mod cleanup;
mod cluster;
mod maps;
mod net;
mod packets;
mod packets6;
mod report;
mod services;
mod stats;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::Context;
use report::{Measurement, Report};

pub struct Settings {
    pub quick: bool,
    /// Section 1.
    pub repeats: u32,
    pub runs: usize,
    pub single_runs: usize,
    pub packet_scales: Vec<usize>,
    /// Sections 2-5: the smaller and the larger service count.
    pub small: usize,
    pub large: usize,
    pub endpoints: usize,
    pub connections: usize,
    pub warmup_connections: usize,
    pub latency_runs: usize,
    /// Runs of each bulk programming measurement (the agent, iptables-restore), and of
    /// `nft -f`, which takes minutes at 10k services on this kernel.
    pub program_runs: usize,
    pub nft_program_runs: usize,
    pub changes: usize,
    pub iperf_seconds: u32,
    pub iperf_runs: usize,
    /// Section 7: services in the one-List-file input.
    pub list_services: usize,
    pub agent_binary: PathBuf,
    pub sections: Vec<u8>,
}

impl Settings {
    fn full(agent_binary: PathBuf) -> Self {
        Self {
            quick: false,
            repeats: 1_000_000,
            runs: 5,
            single_runs: 100_000,
            packet_scales: vec![10, 10_000, 100_000],
            small: 1_000,
            large: 10_000,
            endpoints: 10,
            connections: 5_000,
            warmup_connections: 500,
            latency_runs: 15,
            program_runs: 3,
            nft_program_runs: 1,
            changes: 200,
            iperf_seconds: 5,
            iperf_runs: 5,
            list_services: 100_000,
            agent_binary,
            sections: vec![1, 2, 3, 4, 5, 6, 7],
        }
    }

    /// A smoke run: every section, smaller scales, fewer repeats.
    fn quick(agent_binary: PathBuf) -> Self {
        Self {
            quick: true,
            repeats: 100_000,
            runs: 3,
            single_runs: 10_000,
            packet_scales: vec![10, 1_000, 10_000],
            small: 100,
            large: 1_000,
            endpoints: 10,
            connections: 1_000,
            warmup_connections: 100,
            latency_runs: 5,
            program_runs: 1,
            nft_program_runs: 1,
            changes: 20,
            iperf_seconds: 1,
            iperf_runs: 1,
            list_services: 10_000,
            ..Self::full(agent_binary)
        }
    }

    pub fn wants(&self, section: u8) -> bool {
        self.sections.contains(&section)
    }
}

const USAGE: &str = "usage: dataplane-bench [--quick] [--out FILE] [--agent BINARY] [--sections 1,2,...]
       dataplane-bench connect-client ADDR:PORT COUNT | wait-connect ADDR:PORT TIMEOUT_MS | serve PORT...
       dataplane-bench per-packet-loop KIND SERVICES SECONDS   (for perf / bpftool prog profile)";

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("connect-client") => net::connect_client(&args[1..]),
        Some("wait-connect") => net::wait_connect(&args[1..]),
        Some("serve") => net::serve(&args[1..]),
        Some("per-packet-loop") => {
            cleanup::install_signal_thread();
            let result = packets::profile_loop(&args[1..]);
            cleanup::teardown();
            result
        }
        _ => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    let mut quick = false;
    let mut out = None;
    let mut agent = None;
    let mut sections = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(PathBuf::from(it.next().context(USAGE)?)),
            "--agent" => agent = Some(PathBuf::from(it.next().context(USAGE)?)),
            "--sections" => {
                sections = Some(
                    it.next()
                        .context(USAGE)?
                        .split(',')
                        .map(|s| s.trim().parse::<u8>())
                        .collect::<Result<Vec<_>, _>>()
                        .context(USAGE)?,
                )
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        testbed::is_root(),
        "the bench needs root (network namespaces, BPF)"
    );
    let exe = std::env::current_exe()?;
    let agent = agent.unwrap_or_else(|| exe.with_file_name("dataplane-agent"));
    anyhow::ensure!(
        agent.exists(),
        "agent binary {} not built (cargo build --release -p dataplane-agent)",
        agent.display()
    );
    cleanup::install_signal_thread();
    // Private copies of both binaries: a rebuild of target/release while the bench runs
    // (another shell, an IDE) must not pull them from under the namespaces.
    let agent = make_private_copies(&exe, &agent)?;
    let result = run(settings_for(quick, agent, sections), out);
    cleanup::teardown_all();
    result
}

fn settings_for(quick: bool, agent: PathBuf, sections: Option<Vec<u8>>) -> Settings {
    let mut settings = if quick {
        Settings::quick(agent)
    } else {
        Settings::full(agent)
    };
    if let Some(sections) = sections {
        settings.sections = sections;
    }
    settings
}

fn run(settings: Settings, out: Option<PathBuf>) -> anyhow::Result<()> {
    let quick = settings.quick;
    let out = out.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/report.json")
    });
    let started = Instant::now();
    let mut report = Report::default();
    machine_info(&settings, &mut report);
    let load = read_trimmed("/proc/loadavg");
    if load
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!(
            "bench: warning: load average {load}: something else runs on this machine and will disturb the figures"
        );
    }
    report.info.insert("loadavg_start".into(), load.into());
    println!(
        "dataplane-bench: kernel {}, {}; {} run",
        report.info["kernel"].as_str().unwrap_or("?"),
        report.info["cpu"].as_str().unwrap_or("?"),
        if quick { "quick" } else { "full" }
    );
    let mut failed = Vec::new();
    // Each part runs on its own: one that fails is reported as not measured, and the
    // namespaces it made are torn down before the next.
    type Part = fn(&Settings, &mut Report) -> anyhow::Result<()>;
    let parts: [(&[u8], &'static str, &str, Part); 3] = [
        (&[1], "1 per-packet", "section 1", packets::run),
        (
            &[2, 3, 4, 5],
            "2-5 namespaces",
            "sections 2-5",
            cluster::run,
        ),
        (
            &[7],
            "4 programming",
            "section 7 (one List file)",
            cluster::list_input,
        ),
    ];
    for (sections, row, what, part) in parts {
        if !sections.iter().any(|s| settings.wants(*s)) {
            continue;
        }
        if let Err(e) = part(&settings, &mut report) {
            eprintln!("bench: {what} failed: {e:#}");
            report.push(
                Measurement::not_measured(row, format!("{what} failed"), "").note(format!("{e:#}")),
            );
            failed.push(sections[0]);
        }
        cleanup::teardown();
    }
    if settings.wants(6) {
        report.push(
            Measurement::not_measured("6 XDP", "XDP per-packet cost vs tc", "ns")
                .goal("not applicable", |_| true)
                .note("not applicable: the datapath does not use XDP (external traffic is handled by the tc program external_ingress); skipped"),
        );
    }
    let elapsed = started.elapsed();
    report
        .info
        .insert("loadavg_end".into(), read_trimmed("/proc/loadavg").into());
    report
        .info
        .insert("duration_s".into(), elapsed.as_secs_f64().round().into());
    report.write_json(&out)?;
    println!("\n{}", report.table());
    println!(
        "dataplane-bench: {} measurements in {:.0} s; report written to {}",
        report.measurements.len(),
        elapsed.as_secs_f64(),
        out.display()
    );
    let missed: Vec<&str> = report
        .measurements
        .iter()
        .filter(|m| m.pass == Some(false))
        .map(|m| m.name.as_str())
        .collect();
    if !missed.is_empty() {
        println!("goals missed ({}): {}", missed.len(), missed.join("; "));
    }
    anyhow::ensure!(failed.is_empty(), "sections {failed:?} could not run");
    Ok(())
}

fn private_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("dataplane-bench-bin-{}", std::process::id()))
}

/// The private copy of `name` (made by `make_private_copies`).
pub fn private_binary(name: &str) -> PathBuf {
    private_dir().join(name)
}

/// Copies the bench binary and the agent into a private directory (removed at exit);
/// returns the agent's copy.
fn make_private_copies(bench: &Path, agent: &Path) -> anyhow::Result<PathBuf> {
    let dir = private_dir();
    std::fs::create_dir_all(&dir)?;
    cleanup::exit_dir(dir.clone());
    std::fs::copy(bench, dir.join("dataplane-bench"))
        .with_context(|| format!("copying {}", bench.display()))?;
    std::fs::copy(agent, dir.join("dataplane-agent"))
        .with_context(|| format!("copying {}", agent.display()))?;
    Ok(dir.join("dataplane-agent"))
}

/// "10", "10k": service counts as the rows name them.
pub fn scale_label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn first_line_of(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine_info(settings: &Settings, report: &mut Report) {
    let cpuinfo = read_trimmed("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let virtualized = cpuinfo.contains(" hypervisor");
    let mem_mb = read_trimmed("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let info = &mut report.info;
    info.insert(
        "kernel".into(),
        read_trimmed("/proc/sys/kernel/osrelease").into(),
    );
    info.insert("cpu".into(), cpu.into());
    info.insert("cpus".into(), cpus.into());
    info.insert("memory_mb".into(), mem_mb.into());
    info.insert("virtual_machine".into(), virtualized.into());
    info.insert("quick".into(), settings.quick.into());
    info.insert(
        "started_unix".into(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .into(),
    );
    info.insert(
        "git_revision".into(),
        first_line_of(
            "git",
            &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"],
        )
        .into(),
    );
    info.insert(
        "tools".into(),
        serde_json::json!({
            "iptables-legacy": first_line_of("iptables-legacy", &["--version"]),
            "iptables-nft": first_line_of("iptables-nft", &["--version"]),
            "nft": first_line_of("nft", &["--version"]),
            "iperf3": first_line_of("iperf3", &["--version"]),
        }),
    );
    info.insert(
        "settings".into(),
        serde_json::json!({
            "repeats": settings.repeats,
            "runs": settings.runs,
            "single_runs": settings.single_runs,
            "packet_scales": settings.packet_scales,
            "latency_scales": [settings.small, settings.large],
            "endpoints_per_service": settings.endpoints,
            "connections_per_run": settings.connections,
            "latency_runs": settings.latency_runs,
            "program_runs": settings.program_runs,
            "nft_program_runs": settings.nft_program_runs,
            "endpoint_changes": settings.changes,
            "iperf_seconds": settings.iperf_seconds,
            "iperf_runs": settings.iperf_runs,
            "list_services": settings.list_services,
        }),
    );
}
