//! Support for the end-to-end tests in `tests/` and the benchmarks in
//! `src/bin/`: a handle on a real `zerodrop run` process, a real control
//! plane and operator, a real Prometheus to query, process statistics, and
//! the results files. The traffic (test sender, relay, replay) and the
//! GStreamer reference peers live in the test bench (`zerodrop-testbench`).

pub mod bench;
pub mod cluster;
pub mod cpulimit;
pub mod netloss;
pub mod operator;
pub mod procstat;
pub mod prometheus;
pub mod rescale;
pub mod results;
pub mod runner;

/// A one-source RTP pipeline on loopback (`port`, RTCP on `port + 1`, RTX 97),
/// as the end-to-end tests and the benchmark run it.
pub fn single_source_manifest(pipeline: &str, codec: &str, port: u16, latency_ms: u32, max_retries: u32) -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: {pipeline}
spec:
  sources:
    - name: cam
      codec: {codec}
      payloadType: 96
      rtxPayloadType: 97
      transport:
        rtp:
          listenAddress: 127.0.0.1
          port: {port}
          rtcpPort: {rtcp}
  repair:
    latencyMs: {latency_ms}
    nack:
      enabled: true
      maxRetries: {max_retries}
  decode:
    decoder: software
"#,
        rtcp = port + 1
    )
}

/// A one-source pipeline `cams` pulling source `door` from an RTSP `url`
/// (`transport` tcp or udp), as the RTSP tests run it.
pub fn rtsp_manifest(url: &str, codec: &str, transport: &str, timeout_s: u32) -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: cams
spec:
  sources:
    - name: door
      codec: {codec}
      transport:
        rtsp:
          url: {url}
          lowerTransport: {transport}
          timeoutSeconds: {timeout_s}
  repair:
    latencyMs: 200
  decode:
    decoder: software
"#
    )
}

/// Per-access-unit digests as both sides log them: `index ts digest keyframe`.
pub fn read_digests(path: &std::path::Path) -> anyhow::Result<Vec<u64>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let field = l.split_whitespace().nth(2).ok_or_else(|| anyhow::anyhow!("bad digest line {l:?}"))?;
            Ok(u64::from_str_radix(field.trim_start_matches("0x"), 16)?)
        })
        .collect()
}

/// Compares what was sent with what reached the decoder, frame by frame.
/// Returns a description of the first differences, or None when identical.
pub fn compare_digests(sent: &[u64], received: &[u64]) -> Option<String> {
    let mut problems = Vec::new();
    if sent.len() != received.len() {
        problems.push(format!("sent {} frames, decoder was handed {}", sent.len(), received.len()));
    }
    let mismatched: Vec<usize> = sent.iter().zip(received).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    if !mismatched.is_empty() {
        problems.push(format!(
            "{} frame(s) differ in content, first at index {:?}",
            mismatched.len(),
            &mismatched[..mismatched.len().min(10)]
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}
