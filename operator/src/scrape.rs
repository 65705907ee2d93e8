//! Reading the data-plane pods' `/metrics` directly, without a Prometheus
//! server: a plain HTTP/1.0 GET with a deadline, a parser for the text
//! exposition format (the subset prometheus-client writes: counters, gauges,
//! histograms; no exemplars read), and a bounded-concurrency fan-out so one
//! round over a fleet costs at most `concurrency` open connections and ends by
//! `timeout × ⌈targets / concurrency⌉` however many pods hang.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response read from a pod: a pod with a thousand streams writes
/// about 2 MB; anything bigger is not a data-plane pod.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl MetricSample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a target gave no figures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Io(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("malformed HTTP response: {0}")]
    Http(&'static str),
    #[error("response larger than 16 MiB")]
    TooLarge,
    /// From the Prometheus source: no sample newer than the last round's.
    #[error("no sample newer than the last round's")]
    NotNew,
}

/// Parses the text exposition format. Comment and `# EOF` lines are skipped;
/// a line that does not parse is counted in the second value and skipped (a
/// pod from another version may write something new; its known series still
/// count).
pub fn parse_text(text: &str) -> (Vec<MetricSample>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (out, bad)
}

fn parse_line(line: &str) -> Option<MetricSample> {
    let bytes = line.as_bytes();
    let name_end = line.find(|c: char| c == '{' || c == ' ' || c == '\t')?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut i = name_end;
    let mut labels = Vec::new();
    if bytes[i] == b'{' {
        i += 1;
        loop {
            while matches!(bytes.get(i), Some(b',' | b' ')) {
                i += 1;
            }
            if *bytes.get(i)? == b'}' {
                i += 1;
                break;
            }
            let eq = i + line[i..].find('=')?;
            let key = line[i..eq].trim().to_string();
            i = eq + 1;
            if *bytes.get(i)? != b'"' {
                return None;
            }
            i += 1;
            let mut value = String::new();
            loop {
                let c = line[i..].chars().next()?;
                i += c.len_utf8();
                match c {
                    '\\' => {
                        let e = line[i..].chars().next()?;
                        i += e.len_utf8();
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
    }
    let value = match line[i..].split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(MetricSample { name: name.to_string(), labels, value })
}

/// GETs `path` from `addr` with HTTP/1.0 (no keep-alive, no chunking from a
/// conforming server; chunked bodies are decoded anyway), all within `timeout`.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ScrapeError> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| ScrapeError::Io(e.to_string()))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| ScrapeError::Io(e.to_string()))?;
        let mut buf = Vec::with_capacity(64 << 10);
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| ScrapeError::Io(e.to_string()))?;
            if n == 0 {
                break;
            }
            if buf.len() + n > MAX_RESPONSE_BYTES {
                return Err(ScrapeError::TooLarge);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        parse_response(&buf)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

/// The body of a whole HTTP/1.x response, when its status is 200.
pub fn parse_response(raw: &[u8]) -> Result<String, ScrapeError> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(ScrapeError::Http("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| ScrapeError::Http("headers are not UTF-8"))?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(ScrapeError::Http("no status line"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ScrapeError::Http("no status code"))?;
    if status != 200 {
        return Err(ScrapeError::Status(status));
    }
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    String::from_utf8(body).map_err(|_| ScrapeError::Http("body is not UTF-8"))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, ScrapeError> {
    let mut out = Vec::with_capacity(body.len());
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or(ScrapeError::Http("chunk size line"))?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| ScrapeError::Http("chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ScrapeError::Http("chunk size"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err(ScrapeError::Http("chunk shorter than announced"));
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).ok_or(ScrapeError::Http("chunk without CRLF"))?;
    }
}

/// What one scrape of one target gave (its samples, or what `scrape_all_map`
/// made of them), and when it was answered.
#[derive(Debug)]
pub struct Scrape<T, R = Vec<MetricSample>> {
    pub target: T,
    pub at: Instant,
    pub result: Result<R, ScrapeError>,
    /// Lines of the response that did not parse.
    pub bad_lines: usize,
}

/// Scrapes every `(target, address)` with at most `concurrency` requests in
/// flight, each within `timeout`. Results come back in completion order.
pub async fn scrape_all<T: Send + 'static>(
    targets: Vec<(T, SocketAddr)>,
    path: &'static str,
    concurrency: usize,
    timeout: Duration,
) -> Vec<Scrape<T>> {
    scrape_all_map(targets, path, concurrency, timeout, |_, samples| samples).await
}

/// [`scrape_all`], with each answer's samples turned by `map` into what the
/// caller keeps as soon as it is parsed: a round over a fleet then holds one
/// page's samples per request in flight, not every page's.
pub async fn scrape_all_map<T: Send + 'static, R>(
    targets: Vec<(T, SocketAddr)>,
    path: &'static str,
    concurrency: usize,
    timeout: Duration,
    map: impl Fn(&T, Vec<MetricSample>) -> R,
) -> Vec<Scrape<T, R>> {
    let map = &map;
    futures::stream::iter(targets)
        .map(|(target, addr)| async move {
            let result = http_get(addr, path, timeout).await;
            let at = Instant::now();
            match result {
                Ok(text) => {
                    let (samples, bad_lines) = parse_text(&text);
                    drop(text);
                    let kept = map(&target, samples);
                    Scrape { target, at, result: Ok(kept), bad_lines }
                }
                Err(e) => Scrape { target, at, result: Err(e), bad_lines: 0 },
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_client_text_parses_with_labels_escapes_and_specials() {
        let text = "# HELP zerodrop_rtp_packets_lost Packets lost.\n\
                    # TYPE zerodrop_rtp_packets_lost counter\n\
                    zerodrop_rtp_packets_lost_total{pipeline=\"demo\",stream=\"cam-1\"} 12\n\
                    zerodrop_worker_busy_seconds_total{worker=\"0\"} 3.25\n\
                    zerodrop_odd{a=\"x,y}\",b=\"q\\\"uote\\\\\"} 1e3\n\
                    zerodrop_bucket{le=\"+Inf\"} +Inf\n\
                    zerodrop_plain 7\n\
                    this is not a sample\n\
                    # EOF\n";
        let (samples, bad) = parse_text(text);
        assert_eq!(bad, 1);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].name, "zerodrop_rtp_packets_lost_total");
        assert_eq!(samples[0].label("stream"), Some("cam-1"));
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(samples[1].value, 3.25);
        assert_eq!(samples[2].label("a"), Some("x,y}"));
        assert_eq!(samples[2].label("b"), Some("q\"uote\\"));
        assert_eq!(samples[2].value, 1000.0);
        assert!(samples[3].value.is_infinite());
        assert_eq!(samples[4], MetricSample { name: "zerodrop_plain".into(), labels: vec![], value: 7.0 });
    }

    #[test]
    fn responses_plain_chunked_and_failed() {
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\na 1\n").unwrap(), "a 1\n");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na 1\n\r\n4\r\nb 2\n\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), "a 1\nb 2\n");
        assert_eq!(parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope"), Err(ScrapeError::Status(404)));
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n"), Err(ScrapeError::Http("no end of headers")));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nshort"),
            Err(ScrapeError::Http("chunk shorter than announced"))
        );
    }

    #[tokio::test]
    async fn a_target_that_never_answers_times_out_and_the_others_still_count() {
        // One real server answering, one listener that accepts and says nothing.
        let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good_addr = good.local_addr().unwrap();
        let silent_addr = silent_listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for conn in good.incoming().take(1) {
                let mut conn = conn.unwrap();
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nzerodrop_x_total{stream=\"a\"} 5\n");
            }
        });
        let started = Instant::now();
        let results = scrape_all(vec![("good", good_addr), ("silent", silent_addr)], "/metrics", 4, Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2), "bounded by the timeout");
        let good = results.iter().find(|s| s.target == "good").unwrap();
        assert_eq!(good.result.as_ref().unwrap()[0].value, 5.0);
        let silent = results.iter().find(|s| s.target == "silent").unwrap();
        assert_eq!(silent.result, Err(ScrapeError::Timeout(Duration::from_millis(300))));
        drop(silent_listener);
    }
}
