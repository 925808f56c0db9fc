//! The one HTTP/1.1 server the agent's endpoints share (health on the healthz address and each
//! health check node port, metrics and /proxyMode on the metrics address): an accept loop that
//! survives transient errors, hyper for each connection. Tests share one raw client.
use std::{
    convert::Infallible,
    future::{Future, poll_fn},
    io,
    sync::{Arc, Mutex, PoisonError},
    task::Poll,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{debug, warn};

/// Every response body: small and complete.
pub type Body = Full<Bytes>;

/// A listening socket whose accept loop runs in a task, and that [`SharedListener::close`]
/// closes at once (dropping the socket), without waiting for that task to wind down.
#[derive(Clone)]
pub struct SharedListener(Arc<Mutex<Option<TcpListener>>>);

impl SharedListener {
    pub fn new(listener: TcpListener) -> Self {
        SharedListener(Arc::new(Mutex::new(Some(listener))))
    }

    pub fn close(&self) {
        let listener = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(listener);
    }

    /// The next connection; `None` once closed.
    async fn accept(&self) -> Option<io::Result<TcpStream>> {
        poll_fn(|cx| {
            let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref() {
                None => Poll::Ready(None),
                Some(listener) => listener
                    .poll_accept(cx)
                    .map(|accepted| Some(accepted.map(|(stream, _)| stream))),
            }
        })
        .await
    }
}

/// Errors after which the socket cannot accept anymore; the others (out of descriptors or
/// memory, aborted handshakes) pass, as Go's `http.Server` retries them with a backoff.
fn accept_error_is_fatal(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

/// HTTP/1.1 on `listener` with `handler` answering every request, until the listener is
/// closed or the task is aborted; aborting it also ends its open connections. `name` says
/// which server in log lines.
pub async fn serve<H, F>(listener: SharedListener, name: &'static str, handler: H) -> io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                None => return Ok(()),
                Some(Ok(stream)) => {
                    backoff = Duration::ZERO;
                    connections.spawn(serve_connection(stream, name, handler.clone()));
                }
                Some(Err(error)) if accept_error_is_fatal(&error) => return Err(error),
                Some(Err(error)) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    warn!(%error, ?backoff, server = name, "accept failed, retrying");
                    tokio::time::sleep(backoff).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection<H, F>(stream: TcpStream, name: &'static str, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = handler(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // With a timer, hyper drops clients that take longer than 30 s to send a request head.
    builder.timer(TokioTimer::new());
    if let Err(error) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%error, server = name, "connection ended with an error");
    }
}

/// A raw HTTP/1.1 client for the servers' tests: every byte of the response checked.
#[cfg(test)]
pub mod test_client {
    use std::net::Ipv4Addr;

    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One response, read over a fresh connection.
    #[derive(Debug)]
    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            let mut values = self
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name));
            let value = values.next().map(|(_, v)| v.as_str());
            assert!(values.next().is_none(), "header {name} repeated");
            value
        }

        pub fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
        }
    }

    pub fn parse_reply(raw: &[u8]) -> Reply {
        let text = std::str::from_utf8(raw).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.split(' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_string(), value.trim().to_string())
            })
            .collect();
        let reply = Reply {
            status,
            headers,
            body: body.to_string(),
        };
        if let Some(length) = reply.header("content-length") {
            assert_eq!(length.parse::<usize>().unwrap(), reply.body.len());
        }
        reply
    }

    /// `GET path` with `Connection: close`, the whole response read until the server closes.
    pub async fn get(port: u16, path: &str) -> io::Result<Reply> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response"))??;
        Ok(parse_reply(&raw))
    }

    /// One request on a kept-alive connection; reads exactly one response (by Content-Length).
    pub async fn get_keep_alive(stream: &mut TcpStream, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap();
            assert!(
                n > 0,
                "connection closed early: {:?}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("content-length");
                if raw.len() >= end + 4 + length {
                    return parse_reply(&raw);
                }
            }
        }
    }
}
