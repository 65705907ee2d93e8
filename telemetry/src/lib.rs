//! The one HTTP server behind `/metrics`, `/healthz` and `/readyz` of every
//! ZeroDrop process (the data plane, the operator, the node agent), and the
//! blocking HTTP GET that tests and tools read them with.
//!
//! `/metrics` is always served as OpenMetrics ([`OPENMETRICS`]): the text
//! `prometheus-client` writes ends with `# EOF`, which only that format
//! allows, so a scraper must not be told it is the classic text format.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The content type of an OpenMetrics exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a handler answers for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An OpenMetrics exposition, 200.
    Metrics(String),
    /// Plain text with a status.
    Text(u16, String),
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Self {
        Reply::Text(200, text.into())
    }

    pub fn not_found(hint: &str) -> Self {
        Reply::Text(404, format!("not found: {hint}\n"))
    }
}

/// A bound listener, not serving yet.
pub struct Server {
    inner: tiny_http::Server,
    addr: SocketAddr,
}

impl Server {
    /// Listens on `addr` (`host:port`; port 0 picks one).
    pub fn bind(addr: &str) -> anyhow::Result<Server> {
        let inner = tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = inner.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("listener on {addr} is not an IP socket"))?;
        Ok(Server { inner, addr })
    }

    /// The address bound (the port chosen, with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves from a thread named `name`; `handler` gets the path without
    /// its query.
    pub fn spawn(self, name: &str, handler: impl Fn(&str) -> Reply + Send + 'static) -> anyhow::Result<SocketAddr> {
        let addr = self.addr;
        std::thread::Builder::new().name(name.into()).spawn(move || self.run(handler))?;
        Ok(addr)
    }

    /// Serves on the calling thread, for ever.
    pub fn run(self, handler: impl Fn(&str) -> Reply) {
        let content_type =
            tiny_http::Header::from_bytes(&b"Content-Type"[..], OPENMETRICS.as_bytes()).expect("a static header is valid");
        for request in self.inner.incoming_requests() {
            let path = request.url().split('?').next().unwrap_or("").to_owned();
            let response = match handler(&path) {
                Reply::Metrics(text) => tiny_http::Response::from_string(text).with_header(content_type.clone()),
                Reply::Text(status, text) => tiny_http::Response::from_string(text).with_status_code(status),
            };
            if let Err(e) = request.respond(response) {
                tracing::debug!(error = %e, "writing an HTTP response");
            }
        }
    }
}

/// A response as [`get`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    pub body: String,
}

/// A plain HTTP/1.0 GET of `path` on `addr` (2 s to connect, 5 s to read),
/// for tests and tools reading `/metrics`, `/healthz`, `/readyz`, etcd's
/// `/health` or Prometheus' API.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    c.read_to_string(&mut raw)?;
    parse(&raw).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {raw:.80?}")))
}

fn parse(raw: &str) -> Option<Response> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string());
    Some(Response { status, content_type, body: body.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_served_as_openmetrics_and_other_paths_as_text() {
        let addr = Server::bind("127.0.0.1:0")
            .unwrap()
            .spawn("test-http", |path| match path {
                "/metrics" => Reply::Metrics("a_total 1\n# EOF\n".into()),
                "/healthz" => Reply::ok("ok\n"),
                "/readyz" => Reply::Text(503, "not ready\n".into()),
                _ => Reply::not_found("try /metrics"),
            })
            .unwrap();
        let m = get(addr, "/metrics?x=1").unwrap();
        assert_eq!((m.status, m.content_type.as_deref(), m.body.as_str()), (200, Some(OPENMETRICS), "a_total 1\n# EOF\n"));
        assert_eq!(get(addr, "/healthz").unwrap().status, 200);
        assert_eq!(get(addr, "/readyz").unwrap().status, 503);
        let missing = get(addr, "/nope").unwrap();
        assert_eq!((missing.status, missing.body.as_str()), (404, "not found: try /metrics\n"));
    }

    #[test]
    fn a_response_without_a_head_is_an_error() {
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse("HTTP/1.1 abc\r\n\r\n"), None);
    }
}
