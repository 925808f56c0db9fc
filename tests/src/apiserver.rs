//! A fake Kubernetes API server for tests: `tests/assets/fake_apiserver.py`, run as a child
//! process on 127.0.0.1. It speaks the API protocol kube-rs and client-go use (discovery, get,
//! list with label/field selectors and consistent paging, watch with bookmarks, resume and
//! "410 Gone", create/update/patch/delete) for Services, Nodes, Events and EndpointSlices, and
//! has a control port through which a test changes objects and injects faults.
//!
//! The control client is plain HTTP/1.1 over a `TcpStream` (one request per connection), so
//! this library needs no HTTP stack of its own.
use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// How long to wait for the server to write its port files.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for one control request (a bulk apply of thousands of objects included).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// The fake API server process; killed (and its temporary directory removed) on drop.
pub struct FakeApiServer {
    child: Child,
    dir: PathBuf,
    port: u16,
    control_port: u16,
    kubeconfig: PathBuf,
    /// The network namespace the server runs in (`None`: this process's).
    netns: Option<PathBuf>,
}

/// Path of the server script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fake_apiserver.py")
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command line arguments, e.g. `["--port", "6443"]` or
    /// `["--bookmark-interval", "0.2"]`.
    pub fn start_with_args(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(None, args)
    }

    /// Starts a server inside a network namespace (e.g. a node's, so that an agent there
    /// reaches it on its loopback); this process still drives it through its control port.
    pub fn start_in_netns(netns: &Path) -> anyhow::Result<Self> {
        Self::start_in(Some(netns.to_path_buf()), &[])
    }

    fn start_in(netns: Option<PathBuf>, args: &[&str]) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fake-apiserver-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let port_file = dir.join("port");
        let control_port_file = dir.join("control-port");
        let log = fs::File::create(dir.join("log")).context("cannot create the server log")?;
        let mut command = match &netns {
            Some(path) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", path.display()))
                    .arg("--")
                    .arg("python3");
                c
            }
            None => Command::new("python3"),
        };
        let child = command
            .arg(script())
            .arg("--port-file")
            .arg(&port_file)
            .arg("--control-port-file")
            .arg(&control_port_file)
            // The server exits when this pipe closes, so it never outlives the test process.
            .arg("--exit-on-stdin-eof")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot run python3 (the fake API server needs it)");
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut server = Self {
            child,
            kubeconfig: dir.join("kubeconfig"),
            dir,
            port: 0,
            control_port: 0,
            netns,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The server writes each file to a temporary name and renames it: no partial reads.
            let port = fs::read_to_string(&port_file).ok();
            let control = fs::read_to_string(&control_port_file).ok();
            if let (Some(port), Some(control)) = (port, control) {
                server.port = port.trim().parse().context("bad port file")?;
                server.control_port = control.trim().parse().context("bad control port file")?;
                break;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the fake API server exited ({status}) before listening:\n{}",
                    server.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the fake API server did not start within {START_TIMEOUT:?}:\n{}",
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fs::write(&server.kubeconfig, server.kubeconfig_yaml())
            .context("cannot write the kubeconfig")?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT` of the API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn control_port(&self) -> u16 {
        self.control_port
    }

    /// A kubeconfig file whose current context points at this server, with no credentials.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
preferences: {{}}
",
            self.url()
        )
    }

    /// What the server logged so far (one line per request).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Creates or replaces one object (it needs `apiVersion`, `kind`, `metadata.name`;
    /// namespaced objects default to namespace "default"). Returns the stored object, with its
    /// new `metadata.resourceVersion`. Watchers see ADDED or MODIFIED.
    pub fn apply(&self, object: &Value) -> anyhow::Result<Value> {
        self.control("PUT", "/objects", Some(object))
    }

    /// Applies many objects in one request, each as its own event. Returns
    /// `{"count": n, "resourceVersion": "..."}`.
    pub fn apply_all(&self, objects: &[Value]) -> anyhow::Result<Value> {
        self.control("PUT", "/objects/bulk", Some(&Value::from(objects.to_vec())))
    }

    /// Deletes an object: `resource` is `services`, `endpointslices`, `nodes` or `events`;
    /// `namespace` is ignored for cluster-scoped resources (pass "").
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> anyhow::Result<Value> {
        let namespace = if namespace.is_empty() { "_" } else { namespace };
        self.control(
            "DELETE",
            &format!("/objects/{resource}/{namespace}/{name}"),
            None,
        )
    }

    /// The stored objects of a resource, sorted by namespace and name.
    pub fn objects(&self, resource: &str) -> anyhow::Result<Vec<Value>> {
        array(self.control("GET", &format!("/objects/{resource}"), None)?)
    }

    /// Abruptly closes every open watch connection; returns how many there were.
    pub fn cut_watches(&self) -> anyhow::Result<u64> {
        let answer = self.control("POST", "/cut-watches", None)?;
        Ok(answer["cut"].as_u64().unwrap_or(0))
    }

    /// Forgets the event history up to the current resourceVersion: watches and continue
    /// tokens from before it get "410 Gone" (reason Expired).
    pub fn compact(&self) -> anyhow::Result<()> {
        self.control("POST", "/compact", None).map(drop)
    }

    /// Holds event delivery to open watches, and new watches before they start, until
    /// [`Self::resume_watches`]: lets a test change objects "while a watcher is away"
    /// deterministically.
    pub fn pause_watches(&self) -> anyhow::Result<()> {
        self.control("POST", "/pause-watches", None).map(drop)
    }

    pub fn resume_watches(&self) -> anyhow::Result<()> {
        self.control("POST", "/resume-watches", None).map(drop)
    }

    /// Closes the API listener and every API connection: clients get "connection refused"
    /// until [`Self::up`]. Objects and history are kept.
    pub fn down(&self) -> anyhow::Result<()> {
        self.control("POST", "/down", None).map(drop)
    }

    /// Listens again, on the same port.
    pub fn up(&self) -> anyhow::Result<()> {
        self.control("POST", "/up", None).map(drop)
    }

    /// Request counts: `{"list": n, "watch": n, "other": n, "resources": {"services":
    /// {"list": n, ...}, ...}, "open_watches": n, "resourceVersion": "...", ...}`.
    pub fn stats(&self) -> anyhow::Result<Value> {
        self.control("GET", "/stats", None)
    }

    pub fn reset_stats(&self) -> anyhow::Result<()> {
        self.control("POST", "/reset-stats", None).map(drop)
    }

    /// The Event objects (core/v1 and events.k8s.io/v1) clients created, oldest first.
    pub fn events(&self) -> anyhow::Result<Vec<Value>> {
        array(self.control("GET", "/events", None)?)
    }

    /// A connection to the control port, made from inside the server's namespace when it
    /// has one (a socket stays in the namespace it was created in).
    fn connect_control(&self) -> std::io::Result<TcpStream> {
        let port = self.control_port;
        let Some(netns) = self.netns.clone() else {
            return TcpStream::connect(("127.0.0.1", port));
        };
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = fs::File::open(&netns)?;
            // SAFETY: moves only this short-lived thread into the namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect(("127.0.0.1", port))
        })
        .join()
        .expect("control connection thread panicked")
    }

    fn control(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let what = format!("fake API server control {method} {path}");
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let mut stream = self
            .connect_control()
            .with_context(|| format!("{what}: cannot connect"))?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.control_port,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .with_context(|| format!("{what}: no answer"))?;
        let (status, body) = parse_response(&response).with_context(|| what.clone())?;
        let text = String::from_utf8_lossy(body);
        if !(200..300).contains(&status) {
            bail!("{what}: HTTP {status}: {}", text.trim());
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: answer is not JSON: {text}"))
    }
}

fn array(value: Value) -> anyhow::Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        other => bail!("expected a JSON array, got {other}"),
    }
}

/// Splits an HTTP/1.1 response (read until the server closed) into status and body.
fn parse_response(response: &[u8]) -> anyhow::Result<(u16, &[u8])> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("incomplete HTTP response")?;
    let head = std::str::from_utf8(&response[..end]).context("HTTP head is not UTF-8")?;
    let mut body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let length: usize = value.trim().parse().context("bad Content-Length")?;
            if body.len() < length {
                bail!("truncated HTTP body: {} of {length} bytes", body.len());
            }
            body = &body[..length];
        }
    }
    Ok((status, body))
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- fake API server log (last {} lines) ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn parses_responses() {
        let (status, body) =
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}trailing")
                .unwrap();
        assert_eq!(status, 404);
        assert_eq!(body, b"{}");
        let (status, body) = parse_response(b"HTTP/1.0 200 OK\r\n\r\n[1]").unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"[1]");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
