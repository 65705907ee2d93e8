//! The `zerodrop-agent` binary: which capabilities it needs, how it falls
//! back and says why, and that it serves /metrics and /healthz.
//! Capabilities are dropped with `setpriv` (util-linux), which needs root.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use zerodrop_ebpf::testenv;

const AGENT: &str = env!("CARGO_BIN_EXE_zerodrop-agent");

/// Runs `zerodrop-agent --once` as root limited to `caps` (setpriv syntax,
/// e.g. "+bpf,+perfmon"; empty for none).
fn agent_once_with_caps(caps: &str, mode: &str) -> Output {
    let bounding = if caps.is_empty() { "-all".to_owned() } else { format!("-all,{caps}") };
    Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--inh-caps=-all", AGENT, "--once", "--mode", mode])
        .env("RUST_LOG", "info")
        .output()
        .expect("running setpriv (util-linux)")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn without_privilege_the_agent_falls_back_to_procfs_and_says_why_once() {
    if !testenv::require_root("without_privilege_the_agent_falls_back_to_procfs_and_says_why_once") {
        return;
    }
    let out = agent_once_with_caps("", "auto");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("zerodrop_kernel_udp_drop_source_info{source=\"procfs\",fallback_reason=\""), "{stdout}");
    assert!(stdout.contains("CAP_BPF and CAP_PERFMON"), "the metric names the missing capabilities: {stdout}");
    assert_eq!(stderr.matches("falls back to /proc/net/udp").count(), 1, "said once: {stderr}");
    assert!(stdout.contains("zerodrop_node_udp_rcvbuf_errors_total{family=\"ipv4\"}"), "{stdout}");
}

#[test]
fn cap_bpf_and_cap_perfmon_are_enough_for_ebpf() {
    if !testenv::require_root("cap_bpf_and_cap_perfmon_are_enough_for_ebpf") {
        return;
    }
    let out = agent_once_with_caps("+bpf,+perfmon", "ebpf");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("source_info{source=\"ebpf\",fallback_reason=\"\"} 1"), "{}", text(&out.stdout));
}

#[test]
fn ebpf_mode_without_privilege_is_an_error_not_a_fallback() {
    if !testenv::require_root("ebpf_mode_without_privilege_is_an_error_not_a_fallback") {
        return;
    }
    let out = agent_once_with_caps("+bpf", "ebpf");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("eBPF requested but unavailable"), "{}", text(&out.stderr));
}

fn http_get(port: u16, path: &str) -> std::io::Result<zerodrop_telemetry::Response> {
    zerodrop_telemetry::get(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

#[test]
fn the_agent_serves_metrics_and_healthz() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(AGENT)
        .args(["--mode", "procfs", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        match http_get(port, "/healthz") {
            Ok(response) => break response,
            Err(err) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("agent not serving on {port}: {err}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)), // poll interval, not a wait for an event
        }
    };
    let metrics = http_get(port, "/metrics");
    let _ = child.kill();
    let _ = child.wait();
    assert!(health.status == 200 && health.body.contains("ok (procfs)"), "{health:?}");
    let metrics = metrics.expect("GET /metrics");
    assert_eq!(metrics.content_type.as_deref(), Some(zerodrop_telemetry::OPENMETRICS));
    let metrics = metrics.body;
    assert!(metrics.contains("# TYPE zerodrop_kernel_udp_drops counter"), "{metrics}");
    assert!(metrics.contains("source=\"procfs\""), "{metrics}");
}
