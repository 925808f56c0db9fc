use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dataplane_agent::{
    datapath::{BpffsLayout, attach, layout::DEFAULT_BPFFS_DIR, maps::PinnedMaps},
    inspect,
    run::{RunConfig, run},
};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF service dataplane replacing kube-proxy: node agent and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

/// Where Kubernetes objects come from.
#[derive(clap::Args)]
struct SourceArgs {
    /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON).
    #[arg(long)]
    manifests: PathBuf,
}

impl SourceArgs {
    fn load_once(
        &self,
        node_name: &str,
    ) -> anyhow::Result<dataplane_agent::objects::ClusterObjects> {
        let mut dir = dataplane_agent::source::manifests::ManifestDir::new(&self.manifests);
        let (objects, _skipped) = dir
            .load(node_name)
            .with_context(|| format!("reading {}", self.manifests.display()))?;
        Ok(objects)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath from Kubernetes objects and keep it in sync.
    Run {
        /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON), watched.
        #[arg(long)]
        manifests: PathBuf,
        /// This node's name (selects its Node object).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Globs of pod-facing interfaces to attach to, now and as they appear.
        #[arg(long, value_delimiter = ',', required = true)]
        pod_interfaces: Vec<String>,
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Print, without touching the kernel, every frontend this node would program and the
    /// backends new connections there would use.
    Plan {
        #[command(flatten)]
        source: SourceArgs,
        /// The node to plan for (locality and topology hints depend on it).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove every program link and pin the agent made under the bpffs directory.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Frontends and their backends as the pinned maps hold them.
    Services {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Conntrack entries: client, frontend, backend, and packets/bytes each way.
    Flows {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run {
            manifests,
            node_name,
            pod_interfaces,
            bpffs_dir,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(run(RunConfig {
                manifests,
                node_name,
                pod_interfaces,
                bpffs_dir,
            }))
        }
        Command::Plan {
            source,
            node_name,
            output,
        } => {
            let objects = source.load_once(&node_name)?;
            let plan = dataplane_agent::plan::compute(&objects, &node_name);
            for problem in &plan.problems {
                eprintln!("skipped: {problem}");
            }
            match output {
                Output::Json => {
                    let list: Vec<_> = plan.frontends.iter().map(|f| f.to_json()).collect();
                    print_json(&list)
                }
                Output::Table => {
                    inspect::print_plan(&plan);
                    Ok(())
                }
            }
        }
        Command::Cleanup { bpffs_dir } => cleanup(&BpffsLayout::new(bpffs_dir)),
        Command::Services { bpffs_dir, output } => {
            let maps = PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?;
            let views = inspect::services(&maps)?;
            match output {
                Output::Json => print_json(&views),
                Output::Table => {
                    inspect::print_services(&views);
                    Ok(())
                }
            }
        }
        Command::Flows { bpffs_dir, output } => {
            let maps = PinnedMaps::open(&BpffsLayout::new(bpffs_dir))?;
            let views = inspect::flows(&maps)?;
            match output {
                Output::Json => print_json(&views),
                Output::Table => {
                    inspect::print_flows(&views);
                    Ok(())
                }
            }
        }
    }
}

fn cleanup(layout: &BpffsLayout) -> anyhow::Result<()> {
    if !layout.dir().exists() {
        eprintln!(
            "nothing to clean up: {} does not exist",
            layout.dir().display()
        );
        return Ok(());
    }
    for link in attach::detach_all(layout) {
        eprintln!("detached {link}");
    }
    let mut pins: Vec<PathBuf> = vec![layout.program()];
    pins.extend(
        dataplane_common::map_names::ALL
            .iter()
            .map(|name| layout.map(name)),
    );
    for pin in pins {
        if std::fs::remove_file(&pin).is_ok() {
            eprintln!("removed {}", pin.display());
        }
    }
    let _ = std::fs::remove_dir(layout.links_dir());
    std::fs::remove_dir(layout.dir()).with_context(|| {
        format!(
            "{} still holds files this agent did not make",
            layout.dir().display()
        )
    })?;
    eprintln!("removed {}", layout.dir().display());
    Ok(())
}
