//! `dataplane-agent run`: load and attach the datapath, then keep the maps equal to the plan
//! computed from the manifest directory, reacting to file changes within milliseconds.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use notify::Watcher;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    datapath::{
        BpffsLayout, attach::Attachments, loader::LoadedDatapath, maps::PinnedMaps,
        programmer::Programmer,
    },
    plan::{self, Problem},
    source::manifests::ManifestDir,
};

pub struct RunConfig {
    pub manifests: PathBuf,
    pub node_name: String,
    pub pod_interfaces: Vec<String>,
    pub bpffs_dir: PathBuf,
}

/// How often interfaces are listed to find new pods' veths.
const INTERFACE_POLL: Duration = Duration::from_millis(200);
/// Changes closer together than this are programmed together.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A full re-read even without file events, in case one was missed.
const RESYNC: Duration = Duration::from_secs(30);

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // Before anything else: a SIGTERM during start-up must stop the agent between steps,
    // never kill it halfway through attaching.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let layout = BpffsLayout::new(&config.bpffs_dir);
    let mut datapath = LoadedDatapath::load(&layout)?;
    let mut programmer =
        Programmer::restore(PinnedMaps::open(&layout)?).context("reading back the pinned maps")?;
    let mut attachments = Attachments::new(&config.pod_interfaces)?;
    info!(
        bpffs_dir = %layout.dir().display(),
        restored_frontends = programmer.frontend_count(),
        "datapath loaded"
    );

    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changed_tx.try_send(());
        }
    })?;
    watcher
        .watch(&config.manifests, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", config.manifests.display()))?;

    let mut source = ManifestDir::new(&config.manifests);
    let mut reported = BTreeSet::new();
    sync(
        &mut source,
        &config.node_name,
        &mut programmer,
        &mut reported,
    );
    attachments.sync(&mut datapath);

    let mut interfaces = tokio::time::interval(INTERFACE_POLL);
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            Some(()) = changed.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while changed.try_recv().is_ok() {}
                sync(&mut source, &config.node_name, &mut programmer, &mut reported);
            }
            _ = resync.tick() => sync(&mut source, &config.node_name, &mut programmer, &mut reported),
            _ = interfaces.tick() => attachments.sync(&mut datapath),
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    // Programs, links and maps stay pinned: traffic keeps flowing until the next agent.
    info!(attached = ?attachments.attached().collect::<Vec<_>>(), "stopping; datapath left in place");
    Ok(())
}

fn sync(
    source: &mut ManifestDir,
    node_name: &str,
    programmer: &mut Programmer,
    reported: &mut BTreeSet<Problem>,
) {
    let started = std::time::Instant::now();
    let (objects, _skipped) = match source.load(node_name) {
        Ok(loaded) => loaded,
        Err(e) => {
            // Keep the datapath as it is rather than flushing it on a read error.
            warn!(dir = %source.dir().display(), error = %e, "cannot read manifests; keeping the current datapath");
            return;
        }
    };
    let plan = plan::compute(&objects, node_name);
    let problems: BTreeSet<Problem> = plan.problems.iter().cloned().collect();
    for problem in problems.difference(reported) {
        let file = source
            .origin(&problem.object)
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        warn!(object = %problem.object, file, reason = %problem.reason, "skipping");
    }
    *reported = problems;
    let report = programmer.apply(&plan);
    if report.writes + report.deletes > 0 {
        info!(
            frontends = plan.frontends.len(),
            writes = report.writes,
            deletes = report.deletes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "datapath programmed"
        );
    }
}
