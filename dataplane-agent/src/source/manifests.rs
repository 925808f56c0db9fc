//! Standalone source: Kubernetes objects read from YAML/JSON files in a directory, which the
//! agent keeps watching. Files are multi-document; each document is one object or a `List`.
//! A document that does not parse is skipped with a message naming the file and object, and
//! the rest of the directory still counts.
//!
//! The watcher names the paths that changed: [`ManifestDir::update`] reads just those (a
//! directory that appears is listed), and says which objects changed. [`ManifestDir::rescan`]
//! checks the whole tree (at start, periodically, and when the watcher lost events).
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use tracing::warn;

use crate::source::objects::{ClusterObjects, Delta, Object, ObjectKey};

/// Why a document was skipped: what a user needs to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    /// `Kind namespace/name` where the document got that far, else its position.
    pub object: String,
    pub reason: String,
    /// The file could not be read to its end (an I/O error, or a syntax error after which
    /// the YAML stream cannot be followed): what it defines is not known, rather than bad.
    pub unreadable: bool,
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
    /// Each object's key and its last position in `objects` (a later copy in the same file
    /// wins), so that finding an object costs the same in a 100,000-object `List` as in a
    /// file of its own.
    keys: HashMap<ObjectKey, usize>,
    skipped: Vec<Skipped>,
}

impl ParsedFile {
    fn new(
        modified: Option<SystemTime>,
        len: u64,
        objects: Vec<Object>,
        skipped: Vec<Skipped>,
    ) -> Self {
        let keys = objects
            .iter()
            .enumerate()
            .map(|(i, o)| (o.key(), i))
            .collect();
        Self {
            modified,
            len,
            objects,
            keys,
            skipped,
        }
    }

    fn object(&self, key: &ObjectKey) -> Option<&Object> {
        self.keys.get(key).map(|i| &self.objects[*i])
    }
}

/// Keeps the parse of every file, so a change re-reads only the files that changed.
#[derive(Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: HashMap<PathBuf, ParsedFile>,
    /// Which files define each object. An object in several files is taken from the last
    /// file in path order, as if the files were applied in order.
    /// (The files of each object, in path order; almost always one, shared by all the
    /// objects of the file.)
    origins: HashMap<ObjectKey, Vec<Arc<Path>>>,
    /// Documents skipped (and logged) since [`ManifestDir::take_skipped`] last asked.
    skipped: u64,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Default::default()
        }
    }

    /// The file an object was read from.
    pub fn origin(&self, object: &ObjectKey) -> Option<&Path> {
        self.winner(object)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many documents were skipped (each logged once) since the last call.
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    /// Re-reads what changed in the whole tree and returns the objects of the whole
    /// directory, logging each newly skipped document once.
    pub fn load(&mut self, node_name: &str) -> std::io::Result<(ClusterObjects, Vec<Skipped>)> {
        self.rescan()?;
        let mut cluster = ClusterObjects::default();
        let mut skipped = Vec::new();
        let mut files: Vec<(&PathBuf, &ParsedFile)> = self.files.iter().collect();
        files.sort_by_key(|(path, _)| *path); // a later file's copy of an object wins
        for (_, file) in files {
            for object in &file.objects {
                cluster.insert(object.clone(), node_name);
            }
            skipped.extend(file.skipped.iter().cloned());
        }
        Ok((cluster, skipped))
    }

    /// Checks every file's size and modification time and re-reads those that changed (the
    /// safety net for changes the watcher did not report).
    pub fn rescan(&mut self) -> std::io::Result<Vec<Delta>> {
        let mut present = HashMap::new();
        for path in manifest_files(&self.dir)? {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // vanished between listing and reading
            };
            present.insert(path, (meta.modified().ok(), meta.len()));
        }
        let mut touched = BTreeSet::new();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            self.forget(&path, &mut touched);
        }
        let stale = present
            .into_iter()
            .filter(|(path, (modified, len))| {
                !self
                    .files
                    .get(path)
                    .is_some_and(|f| f.modified == *modified && f.len == *len && modified.is_some())
            })
            .map(|(path, _)| path)
            .collect();
        self.read(stale, &mut touched);
        Ok(self.deltas(touched))
    }

    /// Re-reads the files at `paths`, which the watcher reported changed (a path may be a
    /// directory that appeared or went, or a file that is gone), and returns what changed.
    pub fn update(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Vec<Delta> {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        if paths.iter().any(|p| is_atomic_writer_path(&self.dir, p)) {
            // A ConfigMap volume's update: the kubelet swaps its `..data` symlink, so every
            // file changes at once while no event names one. Read them all.
            return self.rescan().unwrap_or_else(|e| {
                warn!(dir = %self.dir.display(), error = %e, "cannot read manifests");
                vec![]
            });
        }
        let mut touched = BTreeSet::new();
        let mut read = HashSet::new();
        for path in paths {
            let Ok(relative) = path.strip_prefix(&self.dir) else {
                continue;
            };
            if relative
                .iter()
                .any(|c| c.to_string_lossy().starts_with('.'))
            {
                continue; // editors' and writers' temporary files
            }
            if is_manifest(&path) && path.is_file() {
                read.insert(path);
                continue;
            }
            if !path.is_dir() && self.files.contains_key(&path) {
                self.forget(&path, &mut touched);
                continue;
            }
            // A directory that appeared, changed or went (rare: a walk of what is known).
            let present: HashSet<PathBuf> = manifest_files(&path)
                .unwrap_or_default()
                .into_iter()
                .collect();
            let gone: Vec<PathBuf> = self
                .files
                .keys()
                .filter(|p| p.starts_with(&path) && !present.contains(*p))
                .cloned()
                .collect();
            for file in gone {
                self.forget(&file, &mut touched);
            }
            read.extend(present);
        }
        self.read(read.into_iter().collect(), &mut touched);
        self.deltas(touched)
    }

    fn forget(&mut self, path: &Path, touched: &mut BTreeSet<ObjectKey>) {
        if let Some(old) = self.files.remove(path) {
            for key in old.keys.into_keys() {
                if let Some(files) = self.origins.get_mut(&key) {
                    files.retain(|f| **f != *path);
                    if files.is_empty() {
                        self.origins.remove(&key);
                    }
                }
                touched.insert(key);
            }
        }
    }

    /// Reads and parses `paths`, in parallel (a directory that appears brings 10,000s of
    /// files), then records what they define.
    fn read(&mut self, paths: Vec<PathBuf>, touched: &mut BTreeSet<ObjectKey>) {
        let parsed = crate::parallel::map(&paths, |path| parse_file(path));
        for (path, parsed) in paths.into_iter().zip(parsed) {
            if let Some(s) = parsed.skipped.iter().find(|s| s.unreadable)
                && self.files.contains_key(&path)
            {
                // Half written, or broken by an edit: its objects stay as last read, rather
                // than vanishing (and their services with them) until it is fixed.
                warn!(file = %path.display(), object = %s.object, reason = %s.reason, "cannot read manifest file; keeping its last good objects");
                continue;
            }
            self.forget(&path, touched);
            for s in &parsed.skipped {
                warn!(file = %s.file.display(), object = %s.object, reason = %s.reason, "skipping manifest document");
            }
            self.skipped += parsed.skipped.len() as u64;
            let shared: Arc<Path> = Arc::from(path.as_path());
            self.origins.reserve(parsed.keys.len());
            for key in parsed.keys.keys() {
                let files = self.origins.entry(key.clone()).or_default();
                if let Err(at) = files.binary_search(&shared) {
                    files.insert(at, shared.clone());
                }
                touched.insert(key.clone());
            }
            self.files.insert(path, parsed);
        }
    }

    /// The file `key` is taken from: the last in path order that defines it.
    fn winner(&self, key: &ObjectKey) -> Option<&Path> {
        self.origins.get(key)?.last().map(|p| &**p)
    }

    /// The current version of each touched object, or its deletion.
    fn deltas(&self, touched: BTreeSet<ObjectKey>) -> Vec<Delta> {
        touched
            .into_iter()
            .map(|key| {
                let object = self
                    .winner(&key)
                    .and_then(|path| self.files[path].object(&key));
                match object {
                    Some(object) => Delta::Apply(object.clone()),
                    None => Delta::Delete(key),
                }
            })
            .collect()
    }
}

fn parse_file(path: &Path) -> ParsedFile {
    use std::io::Read;
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|mut file| {
        let meta = file.metadata()?;
        file.read_to_string(&mut text)?;
        Ok(meta)
    });
    match read {
        Ok(meta) => {
            let (objects, skipped) = parse_documents(path, &text);
            ParsedFile::new(meta.modified().ok(), meta.len(), objects, skipped)
        }
        Err(e) => ParsedFile::new(
            None,
            0,
            vec![],
            vec![Skipped {
                file: path.into(),
                object: "file".into(),
                reason: format!("cannot read: {e}"),
                unreadable: true,
            }],
        ),
    }
}

/// A path of the kubelet's atomic writer (ConfigMap and Secret volumes): `..data`, its
/// temporary `..data_tmp` and the timestamped `..2026_...` directories.
fn is_atomic_writer_path(dir: &Path, path: &Path) -> bool {
    path.strip_prefix(dir).is_ok_and(|relative| {
        relative
            .iter()
            .any(|c| c.to_string_lossy().starts_with(".."))
    })
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files under `dir`, in no particular order.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue; // editors' and writers' temporary files
            }
            // The entry's type needs no stat, except for symbolic links.
            let is_dir = match entry.file_type() {
                Ok(t) if t.is_symlink() => path.is_dir(),
                Ok(t) => t.is_dir(),
                Err(_) => continue,
            };
            if is_dir {
                pending.push(path);
            } else if is_manifest(&path) {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Parses every document in `text`. Exposed for tests and for other sources of raw manifests.
/// JSON (a `.json` file, or text that starts like JSON) goes straight into the typed objects;
/// anything else, or JSON that does not parse, is read as YAML.
pub fn parse_documents(file: &Path, text: &str) -> (Vec<Object>, Vec<Skipped>) {
    let mut out = Parsed::default();
    let json =
        file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with(['{', '[']);
    if json {
        let documents: Result<Vec<&RawValue>, _> = serde_json::Deserializer::from_str(text)
            .into_iter::<&RawValue>()
            .collect();
        if let Ok(documents) = documents {
            for (index, document) in documents.into_iter().enumerate() {
                let position = format!("document {}", index + 1);
                parse_document(file, &position, Body::Json(document), &mut out);
            }
            return (out.objects, out.skipped);
        }
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let position = format!("document {}", index + 1);
        match serde_yaml::Value::deserialize(document) {
            Ok(value) => parse_document(file, &position, Body::Yaml(value), &mut out),
            Err(e) => {
                out.skipped.push(Skipped {
                    file: file.into(),
                    object: position,
                    reason: format!("invalid YAML: {e}"),
                    unreadable: true,
                });
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
    (out.objects, out.skipped)
}

#[derive(Default)]
struct Parsed {
    objects: Vec<Object>,
    skipped: Vec<Skipped>,
}

/// One document, JSON kept as text until its kind is known, so that it is parsed once into
/// its type; YAML has to be read into a value first.
enum Body<'a> {
    Json(&'a RawValue),
    Yaml(serde_yaml::Value),
}

/// What identifies a document. Fields of the wrong type read as absent, as in a YAML value.
#[derive(Default)]
struct Header {
    api_version: String,
    kind: String,
    name: Option<String>,
    namespace: Option<String>,
}

impl Body<'_> {
    fn header(&self) -> Header {
        match self {
            Body::Json(raw) => {
                #[derive(Deserialize)]
                struct Fields<'a> {
                    #[serde(rename = "apiVersion", borrow)]
                    api_version: Option<&'a RawValue>,
                    #[serde(borrow)]
                    kind: Option<&'a RawValue>,
                    #[serde(borrow)]
                    metadata: Option<&'a RawValue>,
                }
                #[derive(Deserialize)]
                struct Meta<'a> {
                    #[serde(borrow)]
                    name: Option<&'a RawValue>,
                    #[serde(borrow)]
                    namespace: Option<&'a RawValue>,
                }
                let text = |v: Option<&RawValue>| {
                    v.and_then(|v| serde_json::from_str::<String>(v.get()).ok())
                };
                let Ok(fields) = serde_json::from_str::<Fields>(raw.get()) else {
                    return Header::default(); // not an object
                };
                let meta = fields
                    .metadata
                    .and_then(|m| serde_json::from_str::<Meta>(m.get()).ok());
                Header {
                    api_version: text(fields.api_version).unwrap_or_default(),
                    kind: text(fields.kind).unwrap_or_default(),
                    name: meta.as_ref().and_then(|m| text(m.name)),
                    namespace: meta.as_ref().and_then(|m| text(m.namespace)),
                }
            }
            Body::Yaml(value) => {
                let text =
                    |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
                let meta = |key: &str| text(value.get("metadata").and_then(|m| m.get(key)));
                Header {
                    api_version: text(value.get("apiVersion")).unwrap_or_default(),
                    kind: text(value.get("kind")).unwrap_or_default(),
                    name: meta("name"),
                    namespace: meta("namespace"),
                }
            }
        }
    }

    fn is_null(&self) -> bool {
        match self {
            Body::Json(raw) => raw.get() == "null",
            Body::Yaml(value) => value.is_null(),
        }
    }

    /// A `List`'s items.
    fn items(self) -> Vec<Self> {
        match self {
            Body::Json(raw) => {
                #[derive(Deserialize)]
                struct List<'a> {
                    #[serde(borrow, default)]
                    items: Vec<&'a RawValue>,
                }
                serde_json::from_str::<List>(raw.get())
                    .map(|l| l.items.into_iter().map(Body::Json).collect())
                    .unwrap_or_default()
            }
            Body::Yaml(mut value) => match value.get_mut("items").map(std::mem::take) {
                Some(serde_yaml::Value::Sequence(items)) => {
                    items.into_iter().map(Body::Yaml).collect()
                }
                _ => vec![],
            },
        }
    }

    fn typed<T: DeserializeOwned>(self) -> Result<T, String> {
        match self {
            Body::Json(raw) => serde_json::from_str(raw.get()).map_err(|e| e.to_string()),
            Body::Yaml(value) => serde_yaml::from_value(value).map_err(|e| e.to_string()),
        }
    }
}

fn parse_document(file: &Path, position: &str, body: Body, out: &mut Parsed) {
    if body.is_null() {
        return; // empty document
    }
    let header = body.header();
    let kind = header.kind.as_str();
    let label = format!(
        "{} {}/{} ({position})",
        if kind.is_empty() { "object" } else { kind },
        header.namespace.as_deref().unwrap_or("default"),
        header.name.as_deref().unwrap_or_default()
    );
    let typed = match (header.api_version.as_str(), kind) {
        ("v1", "List") => {
            let items: Vec<(usize, Body)> = body.items().into_iter().enumerate().collect();
            let parse = |(i, item): (usize, Body), out: &mut Parsed| {
                parse_document(file, &format!("{position}, item {}", i + 1), item, out)
            };
            if items.iter().all(|(_, item)| matches!(item, Body::Json(_))) {
                // A whole cluster's objects in one file: its items are parsed in parallel,
                // as the files of a directory are.
                let parsed = crate::parallel::map(&items, |(i, item)| {
                    let Body::Json(raw) = item else {
                        unreachable!("checked above")
                    };
                    let mut one = Parsed::default();
                    parse((*i, Body::Json(raw)), &mut one);
                    one
                });
                for one in parsed {
                    out.objects.extend(one.objects);
                    out.skipped.extend(one.skipped);
                }
            } else {
                for item in items {
                    parse(item, out);
                }
            }
            return;
        }
        ("v1", "Service") => body.typed().map(Object::service),
        ("discovery.k8s.io/v1", "EndpointSlice") => body.typed().map(Object::endpoint_slice),
        ("v1", "Node") => body.typed().map(|n| Object::Node(Arc::new(n))),
        _ => {
            // Other kinds (Deployments, Pods...) may share the directory; they are not ours.
            return;
        }
    };
    let reason = match typed {
        Ok(object) if header.name.is_some() => {
            out.objects.push(object);
            return;
        }
        Ok(_) => "metadata.name is missing".to_string(),
        Err(e) => format!("does not match the {kind} schema: {e}"),
    };
    out.skipped.push(Skipped {
        file: file.into(),
        object: label,
        reason,
        unreadable: false,
    });
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
    fn update_reads_only_the_reported_paths_and_reports_what_changed() {
        let root = tempfile::tempdir().unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}"}},"spec":{{"clusterIP":"{ip}"}}}}"#
            )
        };
        std::fs::write(root.path().join("a.json"), svc("a", "10.96.0.1")).unwrap();
        let mut dir = ManifestDir::new(root.path());
        let keys = |deltas: Vec<Delta>| -> Vec<String> {
            deltas
                .iter()
                .map(|d| match d {
                    Delta::Apply(o) => format!("apply {}", o.key()),
                    Delta::Delete(k) => format!("delete {k}"),
                    Delta::Relist(..) => unreachable!(),
                })
                .collect()
        };
        assert_eq!(keys(dir.rescan().unwrap()), ["apply Service default/a"]);
        // A directory appears (renamed in): all its files are read.
        let sub = root.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("b.json"), svc("b", "10.96.0.2")).unwrap();
        std::fs::write(sub.join("a.yaml"), svc("a", "10.96.0.3")).unwrap();
        assert_eq!(
            keys(dir.update([sub.clone()])),
            ["apply Service default/a", "apply Service default/b"]
        );
        assert_eq!(
            dir.origin(&ObjectKey::parse("Service default/a").unwrap()),
            Some(sub.join("a.yaml").as_path())
        );
        // A file another one overrides changes: nothing to report.
        std::fs::write(root.path().join("a.json"), svc("a", "10.96.0.4")).unwrap();
        let deltas = dir.update([root.path().join("a.json")]);
        assert!(matches!(&deltas[..], [Delta::Apply(Object::Service(s))]
            if s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("10.96.0.3")));
        // The directory goes: b is deleted, a falls back to the other file.
        std::fs::remove_dir_all(&sub).unwrap();
        let deltas = dir.update([sub]);
        assert_eq!(
            keys(deltas),
            ["apply Service default/a", "delete Service default/b"]
        );
        assert_eq!(
            dir.origin(&ObjectKey::parse("Service default/a").unwrap()),
            Some(root.path().join("a.json").as_path())
        );
    }

    fn svc_yaml(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}}}\n"
        )
    }

    fn applied_ips(deltas: &[Delta]) -> Vec<String> {
        deltas
            .iter()
            .map(|d| match d {
                Delta::Apply(Object::Service(s)) => s
                    .spec
                    .as_ref()
                    .unwrap()
                    .cluster_ip
                    .clone()
                    .unwrap_or_default(),
                Delta::Apply(o) => format!("apply {}", o.key()),
                Delta::Delete(k) => format!("delete {k}"),
                Delta::Relist(..) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn a_file_that_cannot_be_read_to_its_end_keeps_its_last_good_objects() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("web.yaml");
        std::fs::write(
            &file,
            svc_yaml("web", "10.96.0.1") + "---\n" + &svc_yaml("db", "10.96.0.2"),
        )
        .unwrap();
        let mut dir = ManifestDir::new(root.path());
        assert_eq!(applied_ips(&dir.rescan().unwrap()).len(), 2);
        // Half written: a syntax error where the writer stopped. Nothing is deleted.
        std::fs::write(&file, svc_yaml("web", "10.96.0.1") + "---\nkind: [Serv").unwrap();
        assert!(dir.update([file.clone()]).is_empty());
        // Written out: read as usual.
        std::fs::write(&file, svc_yaml("web", "10.96.0.9")).unwrap();
        assert_eq!(
            applied_ips(&dir.update([file.clone()])),
            ["delete Service default/db", "10.96.0.9"]
        );
        // A schema error in one document is that document's problem only.
        std::fs::write(
            &file,
            svc_yaml("web", "10.96.0.9")
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n",
        )
        .unwrap();
        assert_eq!(
            applied_ips(&dir.update([file.clone()])),
            ["10.96.0.9"],
            "web read again, x skipped"
        );
    }

    #[test]
    fn a_configmap_volume_update_is_read_at_once() {
        // The kubelet's atomic writer: files are symlinks through `..data`, which is swapped.
        let root = tempfile::tempdir().unwrap();
        let version = |n: u32, ip: &str| {
            let dir = root.path().join(format!("..2026_11_27_{n}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("web.yaml"), svc_yaml("web", ip)).unwrap();
            dir
        };
        let first = version(1, "10.96.0.1");
        std::os::unix::fs::symlink(&first, root.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", root.path().join("web.yaml")).unwrap();
        let mut dir = ManifestDir::new(root.path());
        assert_eq!(applied_ips(&dir.rescan().unwrap()), ["10.96.0.1"]);
        let second = version(2, "10.96.0.2");
        std::os::unix::fs::symlink(&second, root.path().join("..data_tmp")).unwrap();
        std::fs::rename(root.path().join("..data_tmp"), root.path().join("..data")).unwrap();
        // What the watcher reports: the swap, naming no manifest file.
        let deltas = dir.update([root.path().join("..data_tmp"), root.path().join("..data")]);
        assert_eq!(applied_ips(&deltas), ["10.96.0.2"]);
    }

    #[test]
    fn problems_with_endpoint_slices_name_the_slices_file_and_their_service() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("web.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{name: http, port: 80}]}\n",
        )
        .unwrap();
        let slices = root.path().join("slices.yaml");
        std::fs::write(
            &slices,
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [not-an-ip]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.9]}]
",
        )
        .unwrap();
        let mut dir = ManifestDir::new(root.path());
        let (objects, _) = dir.load("node-a").unwrap();
        let plan = crate::plan::compute(&objects, &crate::plan::NodeContext::named("node-a"));
        assert_eq!(plan.problems.len(), 2, "{:?}", plan.problems);
        for problem in &plan.problems {
            assert_eq!(
                problem.object.kind,
                crate::source::objects::Kind::EndpointSlice
            );
            assert_eq!(problem.service, "default/web");
            assert_eq!(
                dir.origin(&problem.object),
                Some(slices.as_path()),
                "{problem}"
            );
        }
    }

    #[test]
    fn skipped_documents_are_counted_once() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("bad.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n",
        )
        .unwrap();
        let mut dir = ManifestDir::new(root.path());
        dir.rescan().unwrap();
        assert_eq!(dir.take_skipped(), 1);
        dir.rescan().unwrap();
        assert_eq!(dir.take_skipped(), 0, "an unchanged file is not read again");
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
