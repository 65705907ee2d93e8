//! Every query of the Grafana dashboard and every alert expression of the
//! Helm chart, run against a real Prometheus (Debian's package) that scrapes
//! real processes while the conditions the panels are about happen:
//!
//! - `zerodrop run` with two pipelines fed by our sender (`zerodrop send`)
//!   through the seeded lossy relay: `repaired/nack` (NACK/RTX repairs 5%
//!   loss), `repaired/fec` (ST 2022-1 5x5 FEC, NACK over a 60 ms round trip),
//!   `unrepaired/lossy` (no repair: packets declared lost, frames dropped,
//!   keyframe requests) and `unrepaired/flooded`, a source that never sends
//!   media (stream down) whose 64 KiB socket is flooded every 2 s while the
//!   runner is stopped (SIGSTOP), so the kernel drops what does not fit;
//! - the node agent (`zerodrop-agent --mode ebpf`, root), which sees the same
//!   drops by address and port; its eBPF map is then filled with 20,000
//!   drops to closed ports (NO_SOCKET), so that `uncounted` rises;
//! - the operator on the real control plane of `zerodrop_e2e::cluster`: it
//!   starts while another identity holds its leader Lease (no leader), takes
//!   over when that expires, reconciles a pipeline edited every 3 s, and
//!   fails to reconcile one whose ConfigMap is immutable and stale.
//!
//! The local runner and the agent have no Kubernetes labels: the scrape
//! configuration adds `namespace` and `pod` (and the agent's `node`) as
//! static target labels, as the chart's PodMonitor and ServiceMonitors
//! would. The dashboard's variables are checked as Grafana evaluates them
//! (`label_values`), then set to "All" (`.*`, their `allValue`), and
//! `$__rate_interval` is 30s.
//!
//! Each panel query must return a series with a value > 0 (two exceptions,
//! explained below); each alert expression must return a series, i.e. its
//! condition is true, produced for real. Queries are polled until they hold
//! or a deadline passes; the failures are listed together.
//!
//! `ZERODROP_DASHBOARD_DUMP=DIR` also writes each panel's last 2 minutes
//! (`query_range`) to `DIR/dashboard-data.json`; `scripts/dashboard-png.py`
//! plots that into `docs/dashboard.png`.
//!
//! Needs root (the agent's eBPF programs), `prometheus`
//! (scripts/install-deps.sh), the control-plane binaries
//! (scripts/controlplane.sh build) and the workspace's binaries
//! (`cargo build -p zerodrop -p zerodrop-ebpf -p zerodrop-operator`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value as Json, json};
use serde_yaml::Value as Yaml;
use zerodrop_testbench::loss::LossSpec;
use zerodrop_testbench::relay::{Relay, RelayAddrs, RelayConfig, RelayHandle};
use zerodrop_e2e::cluster::TestCluster;
use zerodrop_e2e::operator::{OperatorProcess, install_crd};
use zerodrop_e2e::prometheus::{
    PanelQuery, Prometheus, Sample, dashboard_queries, dashboard_variables, free_port, grafana_expr, render_prometheus_rule,
    repo, require_tool, skip, unix_now,
};
use zerodrop_e2e::runner::{RunnerProcess, zerodrop_bin};
use zerodrop_telemetry::get as http_get;

const RATE_INTERVAL: &str = "30s";
/// The namespace the data plane's series get (a PodMonitor's `namespace`).
const NAMESPACE: &str = "zerodrop-e2e";
/// RTP ports: nack, fec (+2, +4 FEC), lossy, flooded; RTCP on port + 1.
const NACK_PORT: u16 = 28004;
const FEC_PORT: u16 = 28014;
const LOSSY_PORT: u16 = 28024;
const FLOODED_PORT: u16 = 28034;
/// Destination port of the datagrams that fill the eBPF map (nothing listens).
const CLOSED_PORT: u16 = 28099;

fn manifest() -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: repaired
spec:
  sources:
    - name: nack
      codec: h264
      payloadType: 96
      rtxPayloadType: 97
      transport:
        rtp: {{listenAddress: 127.0.0.1, port: {NACK_PORT}, rtcpPort: {nack_rtcp}}}
    - name: fec
      codec: h264
      payloadType: 96
      rtxPayloadType: 97
      transport:
        rtp:
          listenAddress: 127.0.0.1
          port: {FEC_PORT}
          rtcpPort: {fec_rtcp}
          fec: {{scheme: st2022-1, ports: [{fec_col}, {fec_row}]}}
  repair:
    latencyMs: 400
    nack: {{enabled: true, maxRetries: 10}}
    fec: {{enabled: true}}
  decode: {{decoder: software}}
---
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: unrepaired
spec:
  sources:
    - name: lossy
      codec: h264
      payloadType: 96
      transport:
        rtp: {{listenAddress: 127.0.0.1, port: {LOSSY_PORT}, rtcpPort: {lossy_rtcp}}}
    - name: flooded
      codec: h264
      payloadType: 96
      transport:
        rtp: {{listenAddress: 127.0.0.1, port: {FLOODED_PORT}, rtcpPort: {flooded_rtcp}, receiveBufferBytes: 65536}}
  repair:
    latencyMs: 200
    nack: {{enabled: false}}
  decode: {{decoder: software}}
"#,
        nack_rtcp = NACK_PORT + 1,
        fec_rtcp = FEC_PORT + 1,
        fec_col = FEC_PORT + 2,
        fec_row = FEC_PORT + 4,
        lossy_rtcp = LOSSY_PORT + 1,
        flooded_rtcp = FLOODED_PORT + 1,
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Child processes, killed and reaped on drop.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `f` run every `period` on a thread of its own, until dropped.
struct Every {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Every {
    fn start(name: &str, period: Duration, mut f: impl FnMut() + Send + 'static) -> Every {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    f();
                    let until = Instant::now() + period;
                    while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                        // The period of a periodic action; unparked at drop.
                        std::thread::park_timeout(until - Instant::now());
                    }
                }
            })
            .expect("a thread");
        Every { stop, thread: Some(thread) }
    }
}

impl Drop for Every {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Our sender into `relay`, streaming until killed.
fn sender(relay: &RelayAddrs, seed: u64, pattern: &str, extra: &[String], log: &Path) -> Child {
    Command::new(zerodrop_bin())
        .args(["send", "--dest", &relay.rtp.to_string(), "--rtcp-dest", &relay.rtcp.to_string(), "--codec", "h264"])
        .args(["--width", "320", "--height", "180", "--fps", "30", "--key-int", "30", "--bitrate", "600"])
        .args(["--duration", "600", "--quiet", "--seed", &seed.to_string(), "--pattern", pattern])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"))
        .spawn()
        .expect("zerodrop send starts")
}

fn relay(port: u16, loss: &str, seed: u64, configure: impl FnOnce(RelayConfig) -> RelayConfig) -> RelayHandle {
    Relay::start(configure(RelayConfig {
        loss: LossSpec::parse(loss).expect("a loss spec"),
        seed,
        ..RelayConfig::new(loopback(0), loopback(port))
    }))
    .expect("relay starts")
}

/// Whether every thread of `pid` is stopped (state T).
fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('T')))
            .unwrap_or(true)
    })
}

/// Stops the runner so that nothing reads the flooded socket, fills it past
/// its receive buffer (the kernel drops the rest), and lets it go on.
fn flood(runner_pid: u32, socket: &UdpSocket) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(runner_pid as libc::pid_t, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_millis(500);
    while !stopped(runner_pid) && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let datagram: Vec<u8> = [0x80u8, 33, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1].into_iter().chain(std::iter::repeat_n(0u8, 1188)).collect();
    for _ in 0..400 {
        let _ = socket.send_to(&datagram, loopback(FLOODED_PORT));
    }
    // SAFETY: as above.
    unsafe { libc::kill(runner_pid as libc::pid_t, libc::SIGCONT) };
}

/// One datagram to each of `n` loopback addresses nobody listens on: each is
/// a NO_SOCKET drop under a key of its own in the eBPF maps.
fn drops_to_closed_ports(n: u32) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..n {
        let to = SocketAddr::from(([127, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8], CLOSED_PORT));
        let _ = socket.send_to(b"zerodrop e2e: fill the eBPF map", to);
    }
}

/// `date -u` in the apiserver's MicroTime format.
fn micro_time_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]).output().expect("date runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
}

// ------------------------------------------------------------ checks ----

type Accept = Box<dyn Fn(&[Sample]) -> Result<(), String>>;

struct Check {
    what: String,
    expr: String,
    /// Evaluated over [since, now] (any point counts) instead of at now.
    since: Option<f64>,
    accept: Accept,
    last: String,
}

fn show(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "no series".into();
    }
    samples.iter().take(6).map(|s| format!("{:?} {}", s.labels, s.value)).collect::<Vec<_>>().join("; ")
}

fn any_series() -> Accept {
    Box::new(|s: &[Sample]| if s.is_empty() { Err("no series: the condition is not true".into()) } else { Ok(()) })
}

fn any_finite() -> Accept {
    Box::new(|s: &[Sample]| if s.iter().any(|x| x.value.is_finite()) { Ok(()) } else { Err(format!("no finite value: {}", show(s))) })
}

fn any_positive() -> Accept {
    Box::new(|s: &[Sample]| {
        if s.iter().any(|x| x.value.is_finite() && x.value > 0.0) { Ok(()) } else { Err(format!("no value > 0: {}", show(s))) }
    })
}

/// The labels a query aggregates `by`, over all its `by (...)` clauses.
fn by_labels(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .filter_map(|rest| rest.split_once(')'))
        .flat_map(|(list, _)| list.split(',').map(|l| l.trim().to_owned()).collect::<Vec<_>>())
        .collect()
}

/// What a panel query must return under the conditions of this test.
fn panel_check(q: &PanelQuery, dashboard: &Json) -> Check {
    let expr = grafana_expr(&q.expr, dashboard, RATE_INTERVAL);
    assert!(!expr.contains('$'), "panel {:?} {}: a variable is left: {expr}", q.title, q.ref_id);
    let base = if q.expr.contains("method=\"reorder\"") {
        // The relay drops packets but never reorders them, so nothing is
        // recovered by reordering here: the series must exist (the data
        // plane creates it with each stream), its value is 0.
        any_finite()
    } else if q.expr.contains("zerodrop_interarrival_jitter_seconds") {
        // Jitter on loopback can round to 0 s: the series must exist.
        any_finite()
    } else {
        any_positive()
    };
    let per_stream = by_labels(&expr).iter().any(|l| l == "stream");
    let accept: Accept = Box::new(move |s: &[Sample]| {
        base(s)?;
        if per_stream && let Some(bad) = s.iter().find(|x| x.labels.get("stream").is_none_or(|v| v.is_empty())) {
            // A per-stream panel showing a series of no stream: another
            // exporter's series leaking in (the agent's kernel drops).
            return Err(format!("a series without a stream: {:?}", bad.labels));
        }
        Ok(())
    });
    Check { what: format!("panel {} {:?} ({})", q.panel_id, q.title, q.ref_id), expr, since: None, accept, last: String::new() }
}

/// The chart's alert rules: (alert, expr).
fn alert_rules() -> Vec<(String, String)> {
    let rendered = render_prometheus_rule(&[]).expect("helm renders the PrometheusRule");
    let docs: Vec<Yaml> =
        serde_yaml::Deserializer::from_str(&rendered).map(|d| Yaml::deserialize(d).unwrap()).filter(|d| !d.is_null()).collect();
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    rule["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| (r["alert"].as_str().unwrap().to_owned(), r["expr"].as_str().unwrap().trim().to_owned()))
        .collect()
}

fn alert_check(alert: &str, expr: &str, operator_started: f64) -> Check {
    let accept: Accept = match alert {
        // Both exporters' series alert: the data plane's per stream, the
        // agent's per address and port.
        "ZeroDropKernelUDPDrops" => Box::new(|s: &[Sample]| {
            let stream = s.iter().any(|x| x.labels.get("stream").is_some_and(|v| v == "flooded"));
            let agent = s.iter().any(|x| x.labels.get("port").is_some_and(|v| *v == FLOODED_PORT.to_string()));
            if stream && agent { Ok(()) } else { Err(format!("want the flooded stream's and the agent's series: {}", show(s))) }
        }) as Accept,
        "ZeroDropStreamDown" => Box::new(|s: &[Sample]| {
            if s.iter().any(|x| x.labels.get("stream").is_some_and(|v| v == "flooded")) {
                Ok(())
            } else {
                Err(format!("the flooded stream is not down: {}", show(s)))
            }
        }) as Accept,
        _ => any_series(),
    };
    // ZeroDropOperatorNoLeader is true only while the foreign Lease was
    // held, before the operator took over: it is evaluated over the time
    // since the operator started (a point at any step counts).
    let since = (alert == "ZeroDropOperatorNoLeader").then_some(operator_started - 2.0);
    Check { what: format!("alert {alert}"), expr: expr.to_owned(), since, accept, last: String::new() }
}

fn evaluate(prometheus: &Prometheus, check: &Check, now: f64) -> Result<(), String> {
    let samples: Vec<Sample> = match check.since {
        None => prometheus.query(&check.expr, Some(now)).map_err(|e| e.to_string())?,
        Some(since) => prometheus
            .query_range(&check.expr, since, now, 1.0)
            .map_err(|e| e.to_string())?
            .into_iter()
            .flat_map(|r| r.values.into_iter().map(move |(_, value)| Sample { labels: r.labels.clone(), value }))
            .collect(),
    };
    (check.accept)(&samples)
}

/// Each panel's last two minutes, for scripts/dashboard-png.py.
fn dump(prometheus: &Prometheus, dashboard: &Json, dir: &Path, since: f64) {
    let end = unix_now();
    let start = since.max(end - 120.0);
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets: Vec<Json> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let expr = grafana_expr(t["expr"].as_str()?, dashboard, RATE_INTERVAL);
                let series = prometheus.query_range(&expr, start, end, 1.0).unwrap_or_default();
                Some(json!({"refId": t["refId"], "legendFormat": t["legendFormat"], "expr": expr, "series": series}))
            })
            .collect();
        panels.push(json!({
            "id": panel["id"], "type": panel["type"], "title": panel["title"], "gridPos": panel["gridPos"],
            "unit": panel["fieldConfig"]["defaults"]["unit"], "targets": targets,
        }));
    }
    let out = json!({
        "dashboard": dashboard["title"], "start": start, "end": end, "rate_interval": RATE_INTERVAL,
        "made_by": "e2e/tests/prometheus_dashboards.rs (ZERODROP_DASHBOARD_DUMP): the dashboard's queries, all variables at All, through a real Prometheus",
        "panels": panels,
    });
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("dashboard-data.json");
    std::fs::write(&file, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    eprintln!("dashboard data written to {}", file.display());
}

// -------------------------------------------------------------- test ----

#[test]
fn every_dashboard_panel_and_alert_expression_returns_data_from_a_real_prometheus() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("prometheus_dashboards needs root: the node agent loads eBPF programs");
        return;
    }
    let Some(prometheus_bin) = require_tool("prometheus") else { return };
    let agent_bin: PathBuf = zerodrop_bin().with_file_name("zerodrop-agent");
    assert!(agent_bin.is_file(), "{} is missing: cargo build -p zerodrop-ebpf --bin zerodrop-agent", agent_bin.display());
    let dashboard: Json =
        serde_json::from_str(&std::fs::read_to_string(repo().join("charts/zerodrop/dashboards/zerodrop.json")).unwrap()).unwrap();
    let alerts = alert_rules();
    let started = unix_now();

    // The control plane takes a while: it starts while the rest is set up.
    let cluster_start = std::thread::spawn(TestCluster::start);

    // The data plane, and the streams through the seeded relay.
    let runner = RunnerProcess::start_with(&manifest(), free_port(), &[], false).expect("zerodrop run starts");
    let logs = runner.dir.path().to_path_buf();
    let nack_relay = relay(NACK_PORT, "uniform:0.05", 7, |c| RelayConfig { rtx_payload_type: Some(97), ..c });
    let fec_relay = relay(FEC_PORT, "uniform:0.04", 11, |c| RelayConfig {
        rtx_payload_type: Some(97),
        fec_forward: vec![loopback(FEC_PORT + 2), loopback(FEC_PORT + 4)],
        feedback_delay: Duration::from_millis(60),
        ..c
    });
    let lossy_relay = relay(LOSSY_PORT, "uniform:0.05", 13, |c| c);
    let mut senders = Children::default();
    senders.0.push(sender(&nack_relay.addrs(), 1, "ball", &[], &logs.join("send-nack.log")));
    let fec = fec_relay.addrs();
    let fec_args = ["--fec".to_owned(), "st2022-1:5x5".to_owned(), "--fec-dest".to_owned(), format!("{},{}", fec.fec[0], fec.fec[1])];
    senders.0.push(sender(&fec, 2, "smpte", &fec_args, &logs.join("send-fec.log")));
    senders.0.push(sender(&lossy_relay.addrs(), 3, "ball", &[], &logs.join("send-lossy.log")));

    // The node agent, with eBPF.
    let agent_port = free_port();
    let mut agent = Children::default();
    agent.0.push(
        Command::new(&agent_bin)
            .args(["--mode", "ebpf", "--listen", &format!("127.0.0.1:{agent_port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join("agent.log")).unwrap())
            .spawn()
            .expect("zerodrop-agent starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = agent.0[0].try_wait() {
            skip(&format!(
                "zerodrop-agent --mode ebpf exited ({status}): eBPF is not available here: {}",
                std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default()
            ));
            return;
        }
        if http_get(loopback(agent_port), "/healthz").is_ok_and(|r| r.body.contains("ok (ebpf)")) {
            break;
        }
        assert!(Instant::now() < deadline, "the agent does not serve /healthz");
        // Poll interval while waiting for the agent, not a synchronisation guess.
        std::thread::park_timeout(Duration::from_millis(100));
    }

    // Prometheus, scraping all three every second. Static labels stand in
    // for what the chart's PodMonitor/ServiceMonitors add in a cluster.
    let operator_port = free_port();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: zerodrop-dataplane
    static_configs:
      - targets: ["{runner}"]
        labels: {{namespace: "{NAMESPACE}", pod: "zerodrop-run-0"}}
  - job_name: zerodrop-agent
    static_configs:
      - targets: ["127.0.0.1:{agent_port}"]
        labels: {{namespace: "zerodrop-system", pod: "zerodrop-agent-e2e", node: "{node}"}}
  - job_name: zerodrop-operator
    static_configs:
      - targets: ["127.0.0.1:{operator_port}"]
        labels: {{namespace: "zerodrop-system", pod: "zerodrop-operator-e2e"}}
"#,
        runner = runner.metrics_addr,
        node = hostname(),
    );
    let prometheus = Prometheus::start(&prometheus_bin, &config).expect("prometheus starts");

    // Kernel drops on the flooded stream's socket, every 2 s.
    let runner_pid = runner.pid();
    let flood_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _flooding = Every::start("flood", Duration::from_secs(2), move || flood(runner_pid, &flood_socket));

    // Once Prometheus has the agent's uncounted counter at 0, fill the map.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.query("zerodrop_kernel_udp_drops_uncounted_total", None).map_or(true, |s| s.is_empty()) {
        assert!(Instant::now() < deadline, "prometheus never scraped the agent: {}", prometheus.log());
        std::thread::park_timeout(Duration::from_millis(500)); // poll interval
    }
    drops_to_closed_ports(20_000);

    // The operator: a standby while another identity's Lease runs (15 s),
    // then the leader.
    let cluster = Arc::new(cluster_start.join().expect("the cluster thread").expect("the control plane starts"));
    install_crd(&cluster).expect("the CRD installs");
    let now = micro_time_now();
    cluster
        .apply_yaml(&format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: zerodrop-operator, namespace: default}}\n\
             spec: {{holderIdentity: another-operator-replica, leaseDurationSeconds: 15, acquireTime: \"{now}\", renewTime: \"{now}\"}}\n"
        ))
        .expect("the foreign Lease applies");
    let operator_started = unix_now();
    let operator = OperatorProcess::start(&cluster, operator_port, "operator.log", &[]);
    let pipeline = |name: &str, port: u16| {
        format!(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             decode: {{decoder: software}}\n  sources:\n    \
             - {{name: cam-0, codec: h264, rtxPayloadType: 97, transport: {{rtp: {{port: {port}}}}}}}\n"
        )
    };
    // One pipeline after the other: as of this writing the operator can
    // leave one of two pipelines that arrive together at its start
    // unreconciled (its first reconciles wait on the caches concurrently).
    cluster.apply_yaml(&pipeline("observed", 26900)).expect("the pipeline applies");
    let deadline = Instant::now() + Duration::from_secs(90);
    while operator.metric("zerodrop_operator_objects_managed", &[]).unwrap_or(0.0) <= 0.0 {
        assert!(Instant::now() < deadline, "the operator never reconciled the pipeline: {}", zerodrop_e2e::cluster::tail(&cluster.dir().join("operator.log"), 20));
        std::thread::park_timeout(Duration::from_millis(250)); // poll interval
    }
    // A ConfigMap left over under the name the operator renders, immutable
    // and stale: applying the pipeline's config to it fails, every retry.
    cluster
        .apply_yaml(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stuck-config, namespace: default}\nimmutable: true\n\
             data: {pipeline.yaml: \"left over from an earlier deployment\"}\n",
        )
        .expect("the stale ConfigMap applies");
    cluster.apply_yaml(&pipeline("stuck", 26910)).expect("the pipeline applies");
    // An edit every 3 s keeps reconciles (and their durations) coming.
    let editor = cluster.clone();
    let mut edit = 0u32;
    let _editing = Every::start("edit", Duration::from_secs(3), move || {
        edit += 1;
        let patch = format!("{{\"spec\":{{\"repair\":{{\"latencyMs\":{}}}}}}}", 300 + edit % 50);
        let _ = editor.kubectl(["patch", "streampipeline", "observed", "--type", "merge", "-p", patch.as_str()]);
    });

    // The checks: the variables, every panel query, every alert.
    for (name, selector, label) in dashboard_variables(&dashboard) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let values = loop {
            let values = prometheus.label_values(&selector, &label).unwrap_or_default();
            if !values.is_empty() || Instant::now() > deadline {
                break values;
            }
            std::thread::park_timeout(Duration::from_millis(500)); // poll interval
        };
        assert!(!values.is_empty(), "dashboard variable ${name} (label_values({selector}, {label})) lists nothing");
        if name == "namespace" {
            assert!(values.contains(NAMESPACE), "${name}: {values:?}");
        }
    }
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 30, "the dashboard's queries: {}", queries.len());
    let mut checks: Vec<Check> = queries.iter().map(|q| panel_check(q, &dashboard)).collect();
    // The per-stream kernel drops are the data plane's alone, though the
    // agent counts the same drops: the stat equals the data plane job's sum.
    let stat = queries.iter().find(|q| q.title == "Kernel UDP drops/s (streams)").expect("the kernel drops stat");
    checks.push(Check {
        what: "the streams' kernel drops count each drop once".into(),
        expr: format!(
            "abs(({}) - sum(rate(zerodrop_kernel_udp_drops_total{{job=\"zerodrop-dataplane\"}}[{RATE_INTERVAL}]))) \
             and on() (sum(rate(zerodrop_kernel_udp_drops_total{{job=\"zerodrop-agent\", port=\"{FLOODED_PORT}\"}}[{RATE_INTERVAL}])) > 0)",
            grafana_expr(&stat.expr, &dashboard, RATE_INTERVAL)
        ),
        since: None,
        accept: Box::new(|s: &[Sample]| match s.first() {
            Some(x) if x.value.abs() < 1e-6 => Ok(()),
            _ => Err(format!("differs from the data plane's own sum, or the agent saw none: {}", show(s))),
        }),
        last: String::new(),
    });
    assert_eq!(alerts.len(), 7, "the chart's alerts: {alerts:?}");
    checks.extend(alerts.iter().map(|(alert, expr)| alert_check(alert, expr, operator_started)));

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut pending: Vec<Check> = checks;
    loop {
        let now = unix_now();
        let mut still = Vec::new();
        for mut check in pending {
            match evaluate(&prometheus, &check, now) {
                Ok(()) => {}
                Err(why) => {
                    check.last = why;
                    still.push(check);
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        eprintln!(
            "{:.0} s: {} checks pending, e.g. {}: {}",
            unix_now() - started,
            pending.len(),
            pending[0].what,
            pending[0].last
        );
        std::thread::park_timeout(Duration::from_secs(1)); // poll interval
    }

    if let Some(dir) = std::env::var_os("ZERODROP_DASHBOARD_DUMP") {
        // For the picture only: a minute and a half of history to plot.
        while pending.is_empty() && unix_now() - started < 90.0 {
            std::thread::park_timeout(Duration::from_secs(1));
        }
        dump(&prometheus, &dashboard, Path::new(&dir), started);
    }
    let failures: Vec<String> = pending.iter().map(|c| format!("- {}: {}\n    {}", c.what, c.last, c.expr)).collect();
    let mut diagnostics = BTreeMap::new();
    if !failures.is_empty() {
        diagnostics.insert("jobs up", format!("{:?}", prometheus.jobs_up()));
        diagnostics.insert("operator log", zerodrop_e2e::cluster::tail(&cluster.dir().join("operator.log"), 20));
        diagnostics.insert("runner log", runner.stderr().lines().rev().take(20).collect::<Vec<_>>().join("\n"));
        diagnostics.insert("prometheus log", prometheus.log());
        diagnostics.insert("agent log", std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default());
        let out = cluster.kubectl(["get", "streampipelines,configmaps,events", "-o", "yaml"]);
        diagnostics.insert("objects", String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert!(
        failures.is_empty(),
        "{} of the dashboard's queries and alert expressions returned no data under their conditions:\n{}\n{diagnostics:#?}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("all {} dashboard queries and {} alert expressions returned data in {:.0} s", queries.len(), alerts.len(), unix_now() - started);
}
