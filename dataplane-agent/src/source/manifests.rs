//! Standalone source: Kubernetes objects read from YAML/JSON files in a directory, which the
//! agent keeps watching. Files are multi-document; each document is one object or a `List`.
//! A document that does not parse is skipped with a message naming the file and object, and
//! the rest of the directory still counts.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;
use tracing::warn;

use crate::objects::{ClusterObjects, Object};

/// Why a document was skipped: what a user needs to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    /// `Kind namespace/name` where the document got that far, else its position.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.object,
            self.reason
        )
    }
}

struct ParsedFile {
    modified: Option<SystemTime>,
    len: u64,
    objects: Vec<Object>,
    skipped: Vec<Skipped>,
}

/// Keeps the parse of every file, so a change re-reads only the files that changed.
#[derive(Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ParsedFile>,
    /// `Kind namespace/name` -> the file it came from, for messages about the object.
    origins: BTreeMap<String, PathBuf>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            origins: BTreeMap::new(),
        }
    }

    /// The file an object (`Kind namespace/name`) was read from.
    pub fn origin(&self, object: &str) -> Option<&Path> {
        self.origins.get(object).map(PathBuf::as_path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads what changed and returns the objects of the whole directory, logging each
    /// newly skipped document once.
    pub fn load(&mut self, node_name: &str) -> std::io::Result<(ClusterObjects, Vec<Skipped>)> {
        let mut present = BTreeMap::new();
        for path in manifest_files(&self.dir)? {
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(_) => continue, // vanished between listing and reading
            };
            present.insert(path, (meta.modified().ok(), meta.len()));
        }
        self.files.retain(|path, _| present.contains_key(path));
        for (path, (modified, len)) in present {
            let fresh = self
                .files
                .get(&path)
                .is_some_and(|f| f.modified == modified && f.len == len && modified.is_some());
            if fresh {
                continue;
            }
            let parsed = match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let (objects, skipped) = parse_documents(&path, &text);
                    ParsedFile {
                        modified,
                        len,
                        objects,
                        skipped,
                    }
                }
                Err(e) => ParsedFile {
                    modified,
                    len,
                    objects: vec![],
                    skipped: vec![Skipped {
                        file: path.clone(),
                        object: "file".into(),
                        reason: format!("cannot read: {e}"),
                    }],
                },
            };
            for s in &parsed.skipped {
                warn!(file = %s.file.display(), object = %s.object, reason = %s.reason, "skipping manifest document");
            }
            self.files.insert(path, parsed);
        }
        let mut cluster = ClusterObjects::default();
        let mut skipped = Vec::new();
        self.origins.clear();
        for (path, file) in &self.files {
            for object in &file.objects {
                self.origins.insert(object.describe(), path.clone());
                cluster.apply(object.clone(), node_name);
            }
            skipped.extend(file.skipped.iter().cloned());
        }
        Ok((cluster, skipped))
    }
}

fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue; // editors' and writers' temporary files
            }
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Parses every document in `text`. Exposed for tests and for other sources of raw manifests.
pub fn parse_documents(file: &Path, text: &str) -> (Vec<Object>, Vec<Skipped>) {
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let position = format!("document {}", index + 1);
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue, // empty document
            Ok(value) => value,
            Err(e) => {
                skipped.push(Skipped {
                    file: file.into(),
                    object: position,
                    reason: format!("invalid YAML: {e}"),
                });
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        parse_value(file, &position, value, &mut objects, &mut skipped);
    }
    (objects, skipped)
}

fn parse_value(
    file: &Path,
    position: &str,
    value: serde_yaml::Value,
    objects: &mut Vec<Object>,
    skipped: &mut Vec<Skipped>,
) {
    let text = |key: &str| {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let meta_text = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let name = meta_text("name");
    let label = format!(
        "{} {}/{} ({position})",
        if kind.is_empty() { "object" } else { &kind },
        meta_text("namespace").unwrap_or_else(|| "default".into()),
        name.clone().unwrap_or_default()
    );
    let skip = |reason: String, skipped: &mut Vec<Skipped>| {
        skipped.push(Skipped {
            file: file.into(),
            object: label.clone(),
            reason,
        })
    };
    let typed = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|v| v.as_sequence())
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                parse_value(
                    file,
                    &format!("{position}, item {}", i + 1),
                    item,
                    objects,
                    skipped,
                );
            }
            return;
        }
        ("v1", "Service") => {
            serde_yaml::from_value(value).map(|s| Object::Service(std::sync::Arc::new(s)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml::from_value(value).map(|s| Object::EndpointSlice(std::sync::Arc::new(s)))
        }
        ("v1", "Node") => {
            serde_yaml::from_value(value).map(|n| Object::Node(std::sync::Arc::new(n)))
        }
        _ => {
            // Other kinds (Deployments, Pods...) may share the directory; they are not ours.
            return;
        }
    };
    match typed {
        Ok(object) if name.is_some() => objects.push(object),
        Ok(_) => skip("metadata.name is missing".into(), skipped),
        Err(e) => skip(format!("does not match the {kind} schema: {e}"), skipped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_file_with_a_bad_document_keeps_the_good_ones() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {ports: [{port: "not a number"}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
"#;
        let (objects, skipped) = parse_documents(Path::new("x.yaml"), text);
        assert_eq!(objects.len(), 2);
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].object.starts_with("Service default/broken"),
            "{:?}",
            skipped[0]
        );
        assert!(skipped[0].to_string().contains("x.yaml"));
    }

    #[test]
    fn invalid_yaml_is_reported_with_its_file() {
        let (objects, skipped) = parse_documents(Path::new("bad.yaml"), "kind: [unclosed\n");
        assert!(objects.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("invalid YAML"));
    }

    #[test]
    fn json_lists_are_expanded() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}},
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"}}]}"#;
        let (objects, skipped) = parse_documents(Path::new("l.json"), text);
        assert_eq!(objects.len(), 2);
        assert!(skipped.is_empty());
    }
}
