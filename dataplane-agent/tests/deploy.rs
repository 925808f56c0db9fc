//! Every manifest in `deploy/` parses into its typed Kubernetes struct, and the RBAC grants
//! the agent exactly what it uses.
use std::path::Path;

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

/// Every document of every YAML file in deploy/, with its file name.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        if file.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if !value.is_null() {
                out.push((
                    file.file_name().unwrap().to_string_lossy().into_owned(),
                    value,
                ));
            }
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, value: &serde_yaml::Value) -> T {
    serde_yaml::from_value(value.clone()).unwrap_or_else(|e| {
        panic!(
            "{file}: {} does not parse: {e}",
            value["kind"].as_str().unwrap_or("?")
        )
    })
}

#[test]
fn every_manifest_parses_into_its_typed_struct() {
    let docs = documents();
    assert!(!docs.is_empty());
    for (file, value) in &docs {
        match value["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, value)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, value)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, value)),
            "DaemonSet" => drop(typed::<k8s_openapi::api::apps::v1::DaemonSet>(file, value)),
            "Kustomization" => {}
            other => panic!("{file}: unexpected kind {other:?}: add it to this test"),
        }
    }
}

#[test]
fn the_cluster_role_grants_what_the_agent_uses_and_nothing_else() {
    let docs = documents();
    let (file, value) = docs
        .iter()
        .find(|(_, v)| v["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let role: ClusterRole = typed(file, value);
    let mut grants: Vec<String> = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    grants.push(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        [
            "/events:create",
            "/events:patch",
            "/events:update",
            "/nodes:get",
            "/nodes:list",
            "/nodes:watch",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch",
            "events.k8s.io/events:update",
        ]
    );
    let (file, value) = docs
        .iter()
        .find(|(_, v)| v["kind"] == "ClusterRoleBinding")
        .unwrap();
    let binding: ClusterRoleBinding = typed(file, value);
    assert_eq!(binding.role_ref.name, "dataplane-agent");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "dataplane-agent")
    );
}
