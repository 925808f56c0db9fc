//! Cluster source: Services, EndpointSlices and this node's Node from the API server, with
//! kube-rs watchers (list, then watch; relist on 410; exponential backoff when the API server
//! is away) whose events become [`Delta`]s. The agent keeps the last state through any
//! outage, so losing the API server never changes the datapath.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::Inbox;
use crate::source::objects::{ClusterObjects, Delta, Kind, Object, Touched};

/// kube-proxy's own filter: services (and their slices) meant for another proxy, and headless
/// ones, are not watched at all.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How to reach the API server: an explicit kubeconfig file, else in-cluster config or
/// `KUBECONFIG`/`~/.kube/config` (kube's usual inference).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Watches the three kinds and reports their changes to `inbox`; a (re)list is reported as a
/// whole at its end, so the objects are held once: by the agent, not by a watcher cache too.
pub struct ClusterWatch {
    synced: [Arc<AtomicBool>; 3],
}

impl ClusterWatch {
    pub fn start(client: Client, node_name: &str, inbox: Arc<Inbox>) -> Self {
        let selector = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let node_selector =
            watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let synced = [(); 3].map(|_| Arc::new(AtomicBool::new(false)));
        spawn_watch(
            Api::<Service>::all(client.clone()),
            selector.clone(),
            Kind::Service,
            Object::service,
            &synced[0],
            &inbox,
        );
        spawn_watch(
            Api::<EndpointSlice>::all(client.clone()),
            selector,
            Kind::EndpointSlice,
            Object::endpoint_slice,
            &synced[1],
            &inbox,
        );
        spawn_watch(
            Api::<Node>::all(client),
            node_selector,
            Kind::Node,
            |n| Object::Node(Arc::new(n)),
            &synced[2],
            &inbox,
        );
        Self { synced }
    }

    /// All three kinds have been listed completely at least once. Until then nothing may be
    /// pruned: a partial view would delete services that merely were not listed yet.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    synced: &Arc<AtomicBool>,
    inbox: &Arc<Inbox>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(drive(stream, kind, wrap, synced.clone(), inbox.clone()));
}

async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    kind: Kind,
    wrap: fn(K) -> Object,
    synced: Arc<AtomicBool>,
    inbox: Arc<Inbox>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    let mut listing = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    info!(?kind, "watch recovered");
                    failing = false;
                }
                let delta = match event {
                    // Mid-relist: the list counts as a whole at InitDone.
                    watcher::Event::Init => {
                        listing.clear();
                        continue;
                    }
                    watcher::Event::InitApply(object) => {
                        listing.push(wrap(object));
                        continue;
                    }
                    watcher::Event::InitDone => {
                        if !synced.swap(true, Ordering::AcqRel) {
                            info!(?kind, "initial list complete");
                        }
                        Delta::Relist(kind, std::mem::take(&mut listing))
                    }
                    watcher::Event::Apply(object) => Delta::Apply(wrap(object)),
                    watcher::Event::Delete(object) => Delta::Delete(wrap(object).key()),
                };
                inbox.push(|p| p.deltas.push(delta));
            }
            Err(e) => {
                // The backoff retries; the objects and the datapath stay as they are.
                if !failing {
                    warn!(?kind, error = %e, "watch failed; keeping the datapath as it is and retrying");
                    failing = true;
                }
            }
        }
    }
}

/// One complete read, for `plan`: the same watches, until each has listed once.
pub async fn load_once(client: Client, node_name: &str) -> anyhow::Result<ClusterObjects> {
    let inbox = Arc::new(Inbox::default());
    let watch = ClusterWatch::start(client, node_name, inbox.clone());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !watch.synced() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the API server did not answer within 30 s"
        );
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), inbox.changed()).await;
    }
    let mut objects = ClusterObjects::default();
    for delta in inbox.take().deltas {
        objects.apply(delta, node_name, &mut Touched::default());
    }
    Ok(objects)
}
