//! The fake API server (`testbed::apiserver`) speaks the protocol the real kube-rs client
//! expects: every test here drives it with kube-rs itself — `Api` list/get/watch/write calls,
//! and kube-runtime's `watcher` and `reflector` through resumes, compaction ("410 Gone") and
//! the server going away. No root needed; each test starts its own server.
use std::{
    collections::BTreeSet,
    future::Future,
    net::TcpStream,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Event as CoreEvent, Node, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{
        DeleteParams, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, WatchEvent,
        WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{Discovery, Scope},
    runtime::{
        WatchStreamExt,
        events::{Event as RecorderEvent, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde_json::{Value, json};
use testbed::apiserver::FakeApiServer;
use tokio::sync::mpsc;

/// Upper bound for any single expected step; a bug fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(5);
const NOT_PROXIED: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

async fn client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    Client::try_from(config).expect("client")
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    })
}

fn slice(namespace: &str, name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": "10.244.0.0/24"}})
}

fn names<K: ResourceExt>(objects: impl IntoIterator<Item = K>) -> BTreeSet<String> {
    objects.into_iter().map(|o| o.name_any()).collect()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A fake API server holding the Services `names` (no labels) in `default`.
fn server_with_services(names: &[&str]) -> FakeApiServer {
    let server = FakeApiServer::start().unwrap();
    let services: Vec<Value> = names.iter().map(|n| service("default", n, &[])).collect();
    server.apply_all(&services).unwrap();
    server
}

fn count(stats: &Value, resource: &str, kind: &str) -> u64 {
    stats["resources"][resource][kind].as_u64().unwrap_or(0)
}

/// Checks how many lists and watches of Services the server has answered; returns its stats.
fn assert_service_requests(server: &FakeApiServer, lists: u64, watches: u64) -> Value {
    let stats = server.stats().unwrap();
    assert_eq!(count(&stats, "services", "list"), lists);
    assert_eq!(count(&stats, "services", "watch"), watches);
    stats
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// Polls `condition` until it holds, failing after `timeout`.
async fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_watches(server: &FakeApiServer, n: u64) {
    eventually(&format!("{n} open watch(es)"), STEP, || {
        server.stats().unwrap()["open_watches"].as_u64() == Some(n)
    })
    .await;
}

/// A watcher event as a short string: "Init", "InitApply ns/name", "Apply ns/name", ...
fn describe<K: ResourceExt>(event: &watcher::Event<K>) -> String {
    let id = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply {}", id(o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply {}", id(o)),
        watcher::Event::Delete(o) => format!("Delete {}", id(o)),
    }
}

type Events<K> = mpsc::UnboundedReceiver<Result<watcher::Event<K>, watcher::Error>>;

/// Drives `stream` on its own task (so watches stay open between checks) and hands its items
/// over a channel; the task ends with the test.
fn drive<K: Send + 'static>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> Events<K> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_result<K>(events: &mut Events<K>) -> Result<watcher::Event<K>, watcher::Error> {
    within("the next watcher event", events.recv())
        .await
        .expect("watcher stream ended")
}

async fn next<K: ResourceExt>(events: &mut Events<K>) -> watcher::Event<K> {
    match next_result(events).await {
        Ok(event) => event,
        Err(e) => panic!("watcher error: {e}"),
    }
}

/// The next `n` events, described.
async fn take<K: ResourceExt>(events: &mut Events<K>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(describe(&next(events).await));
    }
    out
}

/// Takes the initial listing from `events` and checks that it is "Init", an "InitApply" for
/// each of `objects` ("namespace/name", in order), then "InitDone".
async fn assert_initial<K: ResourceExt>(events: &mut Events<K>, objects: &[&str]) {
    let mut want = vec!["Init".to_string()];
    want.extend(objects.iter().map(|o| format!("InitApply {o}")));
    want.push("InitDone".into());
    assert_eq!(take(events, want.len()).await, want);
}

fn store_names(store: &Store<Service>) -> BTreeSet<String> {
    store.state().iter().map(|o| o.name_any()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_version() {
    let server = FakeApiServer::start().unwrap();
    let client = client(&server).await;

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    for aggregated in [false, true] {
        let discovery = Discovery::new(client.clone());
        let discovery = if aggregated {
            discovery.run_aggregated().await.unwrap()
        } else {
            discovery.run().await.unwrap()
        };
        let resolve = |group: &str, kind: &str| {
            discovery
                .resolve_gvk(&GroupVersionKind::gvk(group, "v1", kind))
                .unwrap_or_else(|| {
                    panic!("{group}/v1 {kind} not discovered (aggregated: {aggregated})")
                })
        };
        let (slices, caps) = resolve("discovery.k8s.io", "EndpointSlice");
        assert_eq!(slices.plural, "endpointslices");
        assert_eq!(caps.scope, Scope::Namespaced);
        assert!(caps.supports_operation("watch"));
        let (services, caps) = resolve("", "Service");
        assert_eq!(services.plural, "services");
        assert_eq!(caps.scope, Scope::Namespaced);
        let (nodes, caps) = resolve("", "Node");
        assert_eq!(nodes.plural, "nodes");
        assert_eq!(caps.scope, Scope::Cluster);
        resolve("", "Event");
        resolve("events.k8s.io", "Event");
        assert_eq!(
            discovery
                .get("discovery.k8s.io")
                .unwrap()
                .preferred_version_or_latest(),
            "v1"
        );
    }

    // Resources the fake does not serve are a 404 Status, like any unknown resource.
    let status = api_error(Api::<Pod>::all(client).list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_label_selector() {
    let server = FakeApiServer::start().unwrap();
    server
        .apply_all(&[
            service("default", "plain", &[("app", "web")]),
            service(
                "default",
                "headless",
                &[("service.kubernetes.io/headless", "")],
            ),
            service(
                "default",
                "other-proxy",
                &[
                    ("service.kubernetes.io/service-proxy-name", "foo"),
                    ("app", "db"),
                ],
            ),
            service("kube-system", "dns", &[("app", "dns")]),
            service(
                "kube-system",
                "both",
                &[
                    ("service.kubernetes.io/headless", ""),
                    ("service.kubernetes.io/service-proxy-name", "foo"),
                ],
            ),
        ])
        .unwrap();
    let client = client(&server).await;
    let all = Api::<Service>::all(client.clone());

    let listed = |api: Api<Service>, selector: &'static str| async move {
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        names(list.items)
    };
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    assert_eq!(
        listed(all.clone(), NOT_PROXIED).await,
        set(&["plain", "dns"])
    );
    assert_eq!(
        listed(Api::namespaced(client.clone(), "default"), NOT_PROXIED).await,
        set(&["plain"])
    );
    assert_eq!(
        listed(all.clone(), "app").await,
        set(&["plain", "other-proxy", "dns"])
    );
    assert_eq!(listed(all.clone(), "app=web").await, set(&["plain"]));
    assert_eq!(listed(all.clone(), "app==web").await, set(&["plain"]));
    assert_eq!(
        listed(all.clone(), "app!=web").await,
        set(&["headless", "other-proxy", "dns", "both"])
    );
    assert_eq!(
        listed(all.clone(), "app in (web, dns)").await,
        set(&["plain", "dns"])
    );
    assert_eq!(
        listed(
            all.clone(),
            "app notin (web,dns),!service.kubernetes.io/headless"
        )
        .await,
        set(&["other-proxy"])
    );
    assert_eq!(
        listed(all.clone(), "app,app!=dns").await,
        set(&["plain", "other-proxy"])
    );

    // A full list: resourceVersion on the list and every item, no continue token, items
    // without kind/apiVersion (as the real server sends them) still deserialize.
    let list = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 5);
    assert!(list.metadata.continue_.is_none());
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    for item in &list.items {
        let rv: u64 = item.resource_version().unwrap().parse().unwrap();
        assert!(rv <= list_rv);
        assert!(item.uid().is_some() && item.creation_timestamp().is_some());
    }

    // A malformed selector is a 400 Status.
    let status = api_error(all.list(&ListParams::default().labels("app in (web")).await);
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_a_consistent_snapshot() {
    let server = FakeApiServer::start().unwrap();
    let services: Vec<Value> = (0..1000)
        .map(|i| service("default", &format!("svc-{i:04}"), &[]))
        .collect();
    server.apply_all(&services).unwrap();
    let client = client(&server).await;
    let api = Api::<Service>::all(client);

    let first = api.list(&ListParams::default().limit(100)).await.unwrap();
    assert_eq!(first.items.len(), 100);
    assert_eq!(first.metadata.remaining_item_count, Some(900));
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();
    // Changes after the first page do not show up in the later pages...
    server.delete("services", "default", "svc-0999").unwrap();
    server.apply(&service("default", "svc-1000", &[])).unwrap();

    let mut seen = names(first.items);
    let mut token = first.metadata.continue_.expect("a continue token");
    let mut pages = 1;
    loop {
        let page = api
            .list(&ListParams::default().limit(100).continue_token(&token))
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.metadata.resource_version.as_ref(), Some(&snapshot_rv));
        assert_eq!(page.items.len(), 100);
        let before = seen.len();
        seen.extend(names(page.items));
        assert_eq!(seen.len(), before + 100, "pages overlap");
        match page.metadata.continue_ {
            Some(next) => {
                assert_eq!(page.metadata.remaining_item_count, Some(1000 - 100 * pages));
                token = next;
            }
            None => break,
        }
    }
    assert_eq!(pages, 10);
    assert!(seen.contains("svc-0999") && !seen.contains("svc-1000"));
    // ...but a new list sees them.
    let now = names(api.list(&ListParams::default()).await.unwrap().items);
    assert!(!now.contains("svc-0999") && now.contains("svc-1000") && now.len() == 1000);

    // A continue token from before a compaction is "410 Gone", reason Expired.
    let first = api.list(&ListParams::default().limit(10)).await.unwrap();
    server.delete("services", "default", "svc-0000").unwrap();
    server.compact().unwrap();
    let token = first.metadata.continue_.unwrap();
    let status = api_error(
        api.list(&ListParams::default().limit(10).continue_token(&token))
            .await,
    );
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_by_name_and_field_selector() {
    let server = FakeApiServer::start().unwrap();
    server.apply_all(&[node("node-a"), node("node-b")]).unwrap();
    let client = client(&server).await;
    let nodes = Api::<Node>::all(client.clone());

    let only_a = nodes
        .list(&ListParams::default().fields("metadata.name=node-a"))
        .await
        .unwrap();
    assert_eq!(names(only_a.items), BTreeSet::from(["node-a".to_string()]));
    let not_a = nodes
        .list(&ListParams::default().fields("metadata.name!=node-a"))
        .await
        .unwrap();
    assert_eq!(names(not_a.items), BTreeSet::from(["node-b".to_string()]));
    let also_a = nodes
        .list(&ListParams::default().fields("metadata.name==node-a"))
        .await
        .unwrap();
    assert_eq!(also_a.items.len(), 1);

    let a = nodes.get("node-a").await.unwrap();
    assert!(a.namespace().is_none());
    assert_eq!(a.spec.unwrap().pod_cidr.as_deref(), Some("10.244.0.0/24"));
    assert!(nodes.get_opt("node-x").await.unwrap().is_none());
    let status = api_error(nodes.get("node-x").await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    let status = api_error(
        nodes
            .list(&ListParams::default().fields("spec.nope=1"))
            .await,
    );
    assert_eq!(status.code, 400);

    // A watcher on one node by field selector.
    let mut events = drive(watcher(
        nodes,
        watcher::Config::default().fields("metadata.name=node-a"),
    ));
    assert_initial(&mut events, &["/node-a"]).await;
    let mut b = node("node-b");
    b["metadata"]["labels"] = json!({"changed": "yes"});
    server.apply(&b).unwrap();
    let mut a = node("node-a");
    a["metadata"]["labels"] = json!({"changed": "yes"});
    server.apply(&a).unwrap();
    let event = next(&mut events).await;
    assert_eq!(describe(&event), "Apply /node-a");
    let watcher::Event::Apply(a) = event else {
        unreachable!()
    };
    assert_eq!(a.labels().get("changed").map(String::as_str), Some("yes"));
    server.delete("nodes", "", "node-a").unwrap();
    assert_eq!(take(&mut events, 1).await, ["Delete /node-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_lists_then_follows_changes() {
    let server = FakeApiServer::start().unwrap();
    server
        .apply_all(&[
            service("default", "a", &[("app", "web")]),
            service("default", "b", &[("app", "web")]),
            service("default", "c", &[("app", "db")]),
        ])
        .unwrap();
    let client = client(&server).await;
    let api = Api::<Service>::all(client);
    let mut events = drive(watcher(api, watcher::Config::default().labels("app=web")));
    assert_initial(&mut events, &["default/a", "default/b"]).await;

    server
        .apply(&service("default", "d", &[("app", "web")]))
        .unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/d"]);

    let before: u64 = server.objects("services").unwrap()[0]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut a = service("default", "a", &[("app", "web")]);
    a["spec"]["ports"][0]["port"] = json!(81);
    server.apply(&a).unwrap();
    let event = next(&mut events).await;
    assert_eq!(describe(&event), "Apply default/a");
    let watcher::Event::Apply(a) = event else {
        unreachable!()
    };
    assert_eq!(a.spec.unwrap().ports.unwrap()[0].port, 81);
    assert!(a.metadata.resource_version.unwrap().parse::<u64>().unwrap() > before);

    server.delete("services", "default", "b").unwrap();
    assert_eq!(take(&mut events, 1).await, ["Delete default/b"]);

    // c starts matching the selector: ADDED for this watcher.
    server
        .apply(&service("default", "c", &[("app", "web")]))
        .unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/c"]);

    // a stops matching it: DELETED, with its last matching state.
    server
        .apply(&service("default", "a", &[("app", "db")]))
        .unwrap();
    let event = next(&mut events).await;
    assert_eq!(describe(&event), "Delete default/a");
    let watcher::Event::Delete(a) = event else {
        unreachable!()
    };
    assert_eq!(a.labels().get("app").map(String::as_str), Some("web"));

    // Changes to objects that never match are not delivered at all.
    server
        .apply(&service("default", "e", &[("app", "db")]))
        .unwrap();
    server
        .apply(&service("default", "f", &[("app", "web")]))
        .unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/f"]);

    assert_service_requests(&server, 1, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_pages_a_large_initial_list() {
    let server = FakeApiServer::start().unwrap();
    let mut objects: Vec<Value> = (0..1000)
        .map(|i| service("default", &format!("svc-{i:04}"), &[]))
        .collect();
    objects.extend((0..1000).map(|i| {
        slice(
            "default",
            &format!("svc-{i:04}-1"),
            &format!("svc-{i:04}"),
            "10.0.0.1",
        )
    }));
    server.apply_all(&objects).unwrap();
    let client = client(&server).await;

    // kube-runtime's watcher lists 500 at a time by default: two pages for 1,000 services.
    let mut events = drive(watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    ));
    assert_eq!(describe(&next(&mut events).await), "Init");
    let mut seen = BTreeSet::new();
    loop {
        match next(&mut events).await {
            watcher::Event::InitApply(s) => assert!(seen.insert(s.name_any())),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {}", describe(&other)),
        }
    }
    assert_eq!(seen.len(), 1000);

    let mut slices = drive(watcher(
        Api::<EndpointSlice>::namespaced(client, "default"),
        watcher::Config::default().labels("kubernetes.io/service-name in (svc-0001,svc-0002)"),
    ));
    assert_initial(&mut slices, &["default/svc-0001-1", "default/svc-0002-1"]).await;

    server.apply(&service("default", "new", &[])).unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/new"]);
    let stats = assert_service_requests(&server, 2, 1);
    assert_eq!(count(&stats, "endpointslices.discovery.k8s.io", "list"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_resumes_after_cut_watches() {
    let server = FakeApiServer::start_with_args(&["--bookmark-interval", "0.2"]).unwrap();
    server
        .apply(&service("default", "a", &[("app", "web")]))
        .unwrap();
    let client = client(&server).await;
    let mut events = drive(watcher(
        Api::<Service>::all(client),
        watcher::Config::default().labels("app=web"),
    ));
    assert_initial(&mut events, &["default/a"]).await;
    open_watches(&server, 1).await;

    assert_eq!(server.cut_watches().unwrap(), 1);
    server
        .apply(&service("default", "b", &[("app", "web")]))
        .unwrap();
    server.delete("services", "default", "a").unwrap();
    // Resumed from its last resourceVersion: the changes, no new list.
    assert_eq!(
        take(&mut events, 2).await,
        ["Apply default/b", "Delete default/a"]
    );
    open_watches(&server, 1).await;
    assert_service_requests(&server, 1, 2);

    // Changes this watcher does not see still reach it as bookmarks, so after a compaction
    // it resumes from a bookmark's resourceVersion instead of getting "410 Gone".
    server
        .apply(&service("default", "noise", &[("app", "db")]))
        .unwrap();
    let bookmarks = |server: &FakeApiServer| server.stats().unwrap()["bookmarks"].as_u64().unwrap();
    let sent = bookmarks(&server);
    eventually("two more bookmarks", STEP, || {
        bookmarks(&server) >= sent + 2
    })
    .await;
    server.compact().unwrap();
    assert_eq!(server.cut_watches().unwrap(), 1);
    server
        .apply(&service("default", "c", &[("app", "web")]))
        .unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/c"]);
    assert_eq!(count(&server.stats().unwrap(), "services", "list"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_compaction() {
    let server = server_with_services(&["a", "b"]);
    let client = client(&server).await;
    let (store, writer) = reflector::store::<Service>();
    let mut events = drive(reflector::reflector(
        writer,
        watcher(Api::<Service>::all(client), watcher::Config::default()),
    ));
    assert_initial(&mut events, &["default/a", "default/b"]).await;
    open_watches(&server, 1).await;

    // While the watcher is away, b goes and c comes, and the history is compacted.
    server.pause_watches().unwrap();
    server.delete("services", "default", "b").unwrap();
    server.apply(&service("default", "c", &[])).unwrap();
    server.compact().unwrap();
    server.cut_watches().unwrap();
    server.resume_watches().unwrap();

    // Resuming from its old resourceVersion gets "410 Gone": the watcher lists again.
    match next_result(&mut events).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!(
            "expected a 410 watch error, got {:?}",
            other.map(|e| describe(&e))
        ),
    }
    assert_initial(&mut events, &["default/a", "default/c"]).await;
    assert_eq!(
        store_names(&store),
        BTreeSet::from(["a".to_string(), "c".to_string()])
    );
    assert_eq!(count(&server.stats().unwrap(), "services", "list"), 2);

    server.apply(&service("default", "d", &[])).unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/d"]);
    assert!(store_names(&store).contains("d"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_when_the_server_comes_back() {
    let server = server_with_services(&["a", "b"]);
    let client = client(&server).await;
    let (store, writer) = reflector::store::<Service>();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let mut events = drive(stream);
    within("the store is ready", store.wait_until_ready())
        .await
        .unwrap();
    open_watches(&server, 1).await;
    let before = Instant::now();

    server.down().unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", server.port())).is_err(),
        "the API port still accepts connections while down"
    );
    assert!(
        Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .is_err()
    );
    server.delete("services", "default", "a").unwrap();
    server.apply(&service("default", "c", &[])).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.up().unwrap();

    eventually(
        "the store converges after the server is back",
        Duration::from_secs(15),
        || store_names(&store) == BTreeSet::from(["b".to_string(), "c".to_string()]),
    )
    .await;
    println!(
        "converged {:?} after the server went down",
        before.elapsed()
    );
    // It resumed its watch (the history was kept), it did not need to list again.
    assert_eq!(count(&server.stats().unwrap(), "services", "list"), 1);
    // The errors it went through were connection errors, no events were lost.
    while let Ok(item) = events.try_recv() {
        if let Err(e) = item {
            println!("watcher error while down: {e}");
        }
    }
    server.apply(&service("default", "d", &[])).unwrap();
    eventually("a later change arrives", STEP, || {
        store_names(&store).contains("d")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher() {
    let server = server_with_services(&["a", "b"]);
    let client = client(&server).await;
    let mut events = drive(watcher(
        Api::<Service>::all(client),
        watcher::Config::default().streaming_lists(),
    ));
    assert_initial(&mut events, &["default/a", "default/b"]).await;
    server.apply(&service("default", "c", &[])).unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/c"]);
    assert_service_requests(&server, 0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watch_protocol() {
    let server = FakeApiServer::start().unwrap();
    server.apply(&service("default", "a", &[])).unwrap();
    let client = client(&server).await;
    let api = Api::<Service>::all(client);
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    // From a resourceVersion: only what came after it, then bookmarks; the stream ends at
    // timeoutSeconds.
    let started = Instant::now();
    let stream = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    server.apply(&service("default", "b", &[])).unwrap();
    let mut got = Vec::new();
    while let Some(event) = within("a watch event", stream.next()).await {
        got.push(match event.unwrap() {
            WatchEvent::Added(s) => format!("ADDED {}", s.name_any()),
            WatchEvent::Modified(s) => format!("MODIFIED {}", s.name_any()),
            WatchEvent::Deleted(s) => format!("DELETED {}", s.name_any()),
            WatchEvent::Bookmark(b) => {
                assert!(b.metadata.resource_version.parse::<u64>().unwrap() > rv.parse().unwrap());
                "BOOKMARK".into()
            }
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        });
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < STEP,
        "{elapsed:?}"
    );
    assert_eq!(got[0], "ADDED b");
    assert!(
        got[1..].iter().all(|e| e == "BOOKMARK") && got.len() >= 2,
        "{got:?}"
    );

    // From "0": synthetic ADDED events for what exists, then changes (real server semantics).
    let stream = api
        .watch(&WatchParams::default().disable_bookmarks().timeout(5), "0")
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut added = BTreeSet::new();
    for _ in 0..2 {
        match within("a synthetic ADDED", stream.next())
            .await
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(s) => added.insert(s.name_any()),
            other => panic!("expected ADDED, got {other:?}"),
        };
    }
    assert_eq!(added, BTreeSet::from(["a".to_string(), "b".to_string()]));

    // From a compacted resourceVersion: one ERROR event (410 Expired), then the end.
    server.compact().unwrap();
    let stream = api.watch(&WatchParams::default(), &rv).await.unwrap();
    let mut stream = std::pin::pin!(stream);
    match within("the ERROR event", stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        within("the end of the stream", stream.next())
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_api() {
    let server = FakeApiServer::start().unwrap();
    let client = client(&server).await;
    let api = Api::<Service>::namespaced(client.clone(), "default");
    let mut events = drive(watcher(api.clone(), watcher::Config::default()));
    assert_initial(&mut events, &[]).await;

    let svc: Service = serde_json::from_value(service("default", "a", &[])).unwrap();
    let created = api.create(&PostParams::default(), &svc).await.unwrap();
    assert!(created.uid().is_some());
    assert_eq!(take(&mut events, 1).await, ["Apply default/a"]);
    let status = api_error(api.create(&PostParams::default(), &svc).await);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.labels().get("x").map(String::as_str), Some("1"));
    assert_eq!(patched.uid(), created.uid());
    assert_eq!(take(&mut events, 1).await, ["Apply default/a"]);

    // Replacing with a stale resourceVersion is a conflict; with the current one it works.
    let status = api_error(api.replace("a", &PostParams::default(), &created).await);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let mut fresh = patched.clone();
    fresh.labels_mut().insert("y".into(), "2".into());
    api.replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(take(&mut events, 1).await, ["Apply default/a"]);

    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(take(&mut events, 1).await, ["Delete default/a"]);
    let status = api_error(api.delete("a", &DeleteParams::default()).await);
    assert_eq!(status.code, 404);
    assert!(server.objects("services").unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_can_emit_events() {
    let server = FakeApiServer::start().unwrap();
    server.apply(&node("node-a")).unwrap();
    let client = client(&server).await;

    // kube-runtime's Recorder: events.k8s.io/v1, created once, then patched as a series.
    let recorder = Recorder::new(
        client.clone(),
        Reporter::from("dataplane-agent".to_string()),
    );
    let node_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some("node-a".into()),
        ..Default::default()
    };
    let event = RecorderEvent {
        type_: EventType::Warning,
        reason: "ServiceSkipped".into(),
        note: Some("bad port".into()),
        action: "Program".into(),
        secondary: None,
    };
    within("publish", recorder.publish(&event, &node_ref))
        .await
        .unwrap();
    within("publish again", recorder.publish(&event, &node_ref))
        .await
        .unwrap();

    // And a plain core/v1 Event.
    let core: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "node-a."},
        "involvedObject": {"kind": "Node", "name": "node-a", "apiVersion": "v1"},
        "reason": "Started",
        "message": "agent started",
        "type": "Normal",
    }))
    .unwrap();
    let created = Api::<CoreEvent>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &core)
        .await
        .unwrap();
    assert!(created.name_any().starts_with("node-a."));

    let events = server.events().unwrap();
    assert_eq!(events.len(), 2, "{events:#?}");
    let recorded = events
        .iter()
        .find(|e| e["apiVersion"] == "events.k8s.io/v1")
        .unwrap();
    assert_eq!(recorded["reason"], "ServiceSkipped");
    assert_eq!(recorded["regarding"]["name"], "node-a");
    assert_eq!(recorded["series"]["count"], 2);
    let core = events.iter().find(|e| e["apiVersion"] == "v1").unwrap();
    assert_eq!(core["message"], "agent started");
    let listed = Api::<CoreEvent>::all(client)
        .list(&ListParams::default().fields("involvedObject.name=node-a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
}
