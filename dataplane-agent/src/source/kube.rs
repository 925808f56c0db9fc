//! Cluster source: Services, EndpointSlices and this node's Node from the API server, with
//! kube-rs watchers (list, then watch; relist on 410; exponential backoff when the API server
//! is away) feeding reflector stores. The stores keep the last state through any outage, so
//! losing the API server never changes the datapath.
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
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::objects::{ClusterObjects, object_name};

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

/// Watches the three kinds; `changed` gets a message after every change once all three have
/// been listed completely.
pub struct ClusterWatch {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    synced: [Arc<AtomicBool>; 3],
}

impl ClusterWatch {
    pub fn start(client: Client, node_name: &str, changed: mpsc::Sender<()>) -> Self {
        let selector = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let node_selector =
            watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let synced = [(); 3].map(|_| Arc::new(AtomicBool::new(false)));
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            selector.clone(),
            &synced[0],
            &changed,
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            selector,
            &synced[1],
            &changed,
        );
        let node = spawn_reflector(
            Api::<Node>::all(client),
            node_selector,
            &synced[2],
            &changed,
        );
        Self {
            services,
            slices,
            node,
            synced,
        }
    }

    /// All three kinds have been listed completely at least once. Until then nothing may be
    /// pruned: a partial view would delete services that merely were not listed yet.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    pub fn snapshot(&self, node_name: &str) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for svc in self.services.state() {
            objects
                .services
                .insert(object_name(&svc.metadata), svc.clone());
        }
        for slice in self.slices.state() {
            objects
                .endpoint_slices
                .insert(object_name(&slice.metadata), slice.clone());
        }
        objects.node = self
            .node
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name));
        objects
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    synced: &Arc<AtomicBool>,
    changed: &mpsc::Sender<()>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(drive(
        stream,
        K::kind(&()).into_owned(),
        synced.clone(),
        changed.clone(),
    ));
    reader
}

async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    kind: String,
    synced: Arc<AtomicBool>,
    changed: mpsc::Sender<()>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    info!(kind, "watch recovered");
                    failing = false;
                }
                match event {
                    // Mid-relist: the store swaps in the new list at InitDone.
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    watcher::Event::InitDone => {
                        if !synced.swap(true, Ordering::AcqRel) {
                            info!(kind, "initial list complete");
                        }
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                }
                let _ = changed.try_send(());
            }
            Err(e) => {
                // The backoff retries; the stores and the datapath stay as they are.
                if !failing {
                    warn!(kind, error = %e, "watch failed; keeping the datapath as it is and retrying");
                    failing = true;
                }
            }
        }
    }
}

/// One complete read, for `plan`: the same watchers, until each has listed once.
pub async fn load_once(client: Client, node_name: &str) -> anyhow::Result<ClusterObjects> {
    let (tx, mut rx) = mpsc::channel(1);
    let watch = ClusterWatch::start(client, node_name, tx);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !watch.synced() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the API server did not answer within 30 s"
        );
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await;
    }
    Ok(watch.snapshot(node_name))
}
