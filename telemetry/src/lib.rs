//! The one HTTP server behind `/metrics`, `/healthz` and `/readyz` of every
//! ZeroDrop process (the data plane, the operator, the node agent), and the
//! blocking HTTP GET that tests and tools read them with.
//!
//! `/metrics` is always served as OpenMetrics ([`OPENMETRICS`]): the text
//! `prometheus-client` writes ends with `# EOF`, which only that format
//! allows, so a scraper must not be told it is the classic text format.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
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
    /// Any body with its content type and `Cache-Control`, 200 (HLS
    /// playlists and segments).
    Body { content_type: &'static str, cache_control: &'static str, body: Arc<[u8]> },
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

    /// Serves from [`SERVING_THREADS`] threads named `name`, so that one
    /// slow reader (a player fetching a segment) does not hold up a scrape;
    /// `handler` gets the path without its query.
    pub fn spawn(self, name: &str, handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> anyhow::Result<SocketAddr> {
        let addr = self.addr;
        let server = Arc::new(self.inner);
        let handler = Arc::new(handler);
        for _ in 0..SERVING_THREADS {
            let (server, handler) = (server.clone(), handler.clone());
            std::thread::Builder::new().name(name.into()).spawn(move || serve(&server, &*handler))?;
        }
        Ok(addr)
    }

    /// Serves on the calling thread, for ever.
    pub fn run(self, handler: impl Fn(&str) -> Reply) {
        serve(&self.inner, &handler)
    }
}

/// Threads [`Server::spawn`] serves from.
pub const SERVING_THREADS: usize = 4;

fn serve(server: &tiny_http::Server, handler: &dyn Fn(&str) -> Reply) {
    let header = |name: &str, value: &str| tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static headers are valid");
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("").to_owned();
        let written = match handler(&path) {
            Reply::Metrics(text) => request.respond(tiny_http::Response::from_string(text).with_header(header("Content-Type", OPENMETRICS))),
            Reply::Text(status, text) => request.respond(tiny_http::Response::from_string(text).with_status_code(status)),
            Reply::Body { content_type, cache_control, body } => {
                let len = body.len();
                let response = tiny_http::Response::new(
                    tiny_http::StatusCode(200),
                    // Media for players: a web page on another origin
                    // (hls.js, a dashboard's thumbnails) may fetch it.
                    vec![
                        header("Content-Type", content_type),
                        header("Cache-Control", cache_control),
                        header("Access-Control-Allow-Origin", "*"),
                    ],
                    std::io::Cursor::new(body),
                    Some(len),
                    None,
                );
                request.respond(response)
            }
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "writing an HTTP response");
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

/// A response as [`fetch`] reads it: every header, the body as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.0 GET of `path` on `addr` (2 s to connect, 5 s to read),
/// for tests and tools reading `/metrics`, `/healthz`, `/readyz`, etcd's
/// `/health` or Prometheus' API.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let raw = fetch(addr, path)?;
    Ok(Response {
        status: raw.status,
        content_type: raw.header("content-type").map(str::to_owned),
        body: String::from_utf8_lossy(&raw.body).into_owned(),
    })
}

/// [`get`] for any body (HLS segments), with every header.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    parse(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {:.80?}", String::from_utf8_lossy(&raw)))
    })
}

fn parse(raw: &[u8]) -> Option<RawResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Some(RawResponse { status, headers, body: raw[split + 4..].to_vec() })
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
                "/body" => Reply::Body { content_type: "video/mp2t", cache_control: "max-age=60", body: Arc::from(&[0x47u8, 0, 0xFF][..]) },
                _ => Reply::not_found("try /metrics"),
            })
            .unwrap();
        let m = get(addr, "/metrics?x=1").unwrap();
        assert_eq!((m.status, m.content_type.as_deref(), m.body.as_str()), (200, Some(OPENMETRICS), "a_total 1\n# EOF\n"));
        assert_eq!(get(addr, "/healthz").unwrap().status, 200);
        assert_eq!(get(addr, "/readyz").unwrap().status, 503);
        let missing = get(addr, "/nope").unwrap();
        let body = fetch(addr, "/body").unwrap();
        assert_eq!((body.status, body.header("content-type"), body.header("cache-control")), (200, Some("video/mp2t"), Some("max-age=60")));
        assert_eq!(body.body, vec![0x47, 0, 0xFF]);
        assert_eq!(body.header("access-control-allow-origin"), Some("*"), "players on other origins may fetch media");
        assert_eq!((missing.status, missing.body.as_str()), (404, "not found: try /metrics\n"));
    }

    #[test]
    fn a_response_without_a_head_is_an_error() {
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(b"HTTP/1.1 abc\r\n\r\n"), None);
    }
}
