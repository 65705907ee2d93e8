//! A real Prometheus for the e2e tests (Debian's `prometheus` package, which
//! `scripts/install-deps.sh` installs): started on a free port with its
//! configuration and TSDB in a temporary directory, queried through its HTTP
//! API. Also what the chart tests need around it: finding `promtool`,
//! `prometheus` and `helm`, rendering the chart, and the PromQL of the
//! Grafana dashboard with its variables filled in as Grafana fills them.
//!
//! A missing tool skips a test with a stated reason, except under `CI=true`,
//! where a skip is a failure (as in the eBPF tests).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use serde_json::Value as Json;

use zerodrop_telemetry::get as http_get;

/// Whether this is CI (`CI=true`), where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says why a test is skipped (past the harness's output capture), or
/// panics with it under `CI=true`.
pub fn skip(why: &str) {
    if ci() {
        panic!("CI=true forbids skipping: {why}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// `name` on PATH, else in /usr/bin (where Debian puts prometheus/promtool).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `name`, or `None` after [`skip`] (a panic under `CI=true`).
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        skip(&format!(
            "{name} is not installed: it comes with Debian's prometheus package (scripts/install-deps.sh installs it)"
        ));
    }
    found
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e has a parent").to_path_buf()
}

/// `helm` from the control-plane cache (`scripts/controlplane.sh build`
/// puts it there), else from PATH.
pub fn helm_bin() -> Option<PathBuf> {
    if let Ok(dir) = crate::cluster::controlplane_bin() {
        let helm = dir.join("helm");
        if helm.is_file() {
            return Some(helm);
        }
    }
    find_tool("helm")
}

/// `helm template zd charts/zerodrop --namespace zerodrop-system` with the
/// PrometheusRule enabled and its API declared (as on a cluster running the
/// prometheus-operator), `extra` appended: the rendered text.
pub fn render_prometheus_rule(extra: &[&str]) -> anyhow::Result<String> {
    let helm = helm_bin().ok_or_else(|| anyhow!("helm is not installed: run scripts/controlplane.sh build"))?;
    let home = tempfile::tempdir()?;
    let out = Command::new(&helm)
        .args(["template", "zd", "charts/zerodrop", "--namespace", "zerodrop-system"])
        .args(["--set", "monitoring.rules.enabled=true"])
        .args(["--api-versions", "monitoring.coreos.com/v1/PrometheusRule"])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .args(extra)
        .current_dir(repo())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!("helm template failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A free TCP port on loopback (bound, read and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Seconds since the epoch, as Prometheus' API takes times.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One series of an instant query's result.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One series of a range query's result: (time, value) points.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RangeSeries {
    pub labels: BTreeMap<String, String>,
    pub values: Vec<(f64, f64)>,
}

fn labels_of(metric: &Json) -> BTreeMap<String, String> {
    metric
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
        .unwrap_or_default()
}

/// A point `[time, "value"]`; "NaN", "+Inf" and "-Inf" parse too.
fn point(p: &Json) -> Option<(f64, f64)> {
    Some((p.get(0)?.as_f64()?, p.get(1)?.as_str()?.parse().ok()?))
}

/// A Prometheus server, killed on drop. Its log is `prometheus.log` in
/// `dir`, kept with the directory when `ZERODROP_KEEP_PROMETHEUS=1`.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` with `config` (a prometheus.yml) on a free port and
    /// waits until it is ready.
    pub fn start(bin: &Path, config: &str) -> anyhow::Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("zerodrop-prometheus-").tempdir()?;
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited ({status}) before it was ready: {}", prometheus.log());
            }
            if http_get(addr, "/-/ready").is_ok_and(|r| r.status == 200) {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s: {}", prometheus.log());
            }
            // Poll interval while waiting for readiness, not a synchronisation guess.
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path_and_query` of the API; the `data` of a successful answer.
    pub fn api(&self, path_and_query: &str) -> anyhow::Result<Json> {
        let response = http_get(self.addr, path_and_query)?;
        let json: Json = serde_json::from_str(&response.body)
            .with_context(|| format!("GET {path_and_query}: not JSON ({}): {}", response.status, response.body))?;
        if json["status"] != "success" {
            bail!("GET {path_and_query}: {} {}", json["errorType"], json["error"]);
        }
        Ok(json["data"].clone())
    }

    /// An instant query at `time` (seconds since the epoch; `None`: now).
    pub fn query(&self, expr: &str, time: Option<f64>) -> anyhow::Result<Vec<Sample>> {
        let mut q = format!("/api/v1/query?query={}", url_encode(expr));
        if let Some(t) = time {
            q.push_str(&format!("&time={t:.3}"));
        }
        let data = self.api(&q)?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| Some(Sample { labels: labels_of(&r["metric"]), value: point(&r["value"])?.1 }))
                .collect()),
            Some("scalar") => Ok(point(&data["result"]).map(|(_, value)| Sample { labels: BTreeMap::new(), value }).into_iter().collect()),
            other => bail!("{expr}: unexpected result type {other:?}"),
        }
    }

    /// A range query from `start` to `end` every `step` seconds.
    pub fn query_range(&self, expr: &str, start: f64, end: f64, step: f64) -> anyhow::Result<Vec<RangeSeries>> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(expr)
        ))?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| RangeSeries {
                labels: labels_of(&r["metric"]),
                values: r["values"].as_array().into_iter().flatten().filter_map(point).collect(),
            })
            .collect())
    }

    /// The values of `label` over the series `selector` matches (what
    /// Grafana's `label_values(selector, label)` lists).
    pub fn label_values(&self, selector: &str, label: &str) -> anyhow::Result<BTreeSet<String>> {
        let end = unix_now();
        let data = self.api(&format!(
            "/api/v1/series?match[]={}&start={:.3}&end={end:.3}",
            url_encode(selector),
            end - 600.0
        ))?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label].as_str().map(str::to_owned))
            .filter(|v| !v.is_empty())
            .collect())
    }

    /// The scrape jobs whose every target is up (`up == 1`).
    pub fn jobs_up(&self) -> anyhow::Result<BTreeSet<String>> {
        let all = self.query("up", None)?;
        let down: BTreeSet<String> = all.iter().filter(|s| s.value != 1.0).map(|s| s.labels["job"].clone()).collect();
        Ok(all.iter().map(|s| s.labels["job"].clone()).filter(|j| !down.contains(j)).collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var("ZERODROP_KEEP_PROMETHEUS").is_ok_and(|v| v == "1") {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temporary directory"));
            eprintln!("prometheus directory kept: {}", dir.keep().display());
        }
    }
}

/// One query of a Grafana dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub panel_id: i64,
    pub title: String,
    pub kind: String,
    pub ref_id: String,
    pub legend: String,
    /// As written in the dashboard, Grafana variables and all.
    pub expr: String,
}

/// Every target `expr` of every panel (rows' nested panels too).
pub fn dashboard_queries(dashboard: &Json) -> Vec<PanelQuery> {
    fn walk(panels: &Json, out: &mut Vec<PanelQuery>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(PanelQuery {
                        panel_id: panel["id"].as_i64().unwrap_or(-1),
                        title: panel["title"].as_str().unwrap_or_default().to_owned(),
                        kind: panel["type"].as_str().unwrap_or_default().to_owned(),
                        ref_id: target["refId"].as_str().unwrap_or_default().to_owned(),
                        legend: target["legendFormat"].as_str().unwrap_or_default().to_owned(),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `expr` as Grafana sends it with every variable at "All" (its
/// `allValue`, `.*`) and `$__rate_interval` at `rate_interval`.
pub fn grafana_expr(expr: &str, dashboard: &Json, rate_interval: &str) -> String {
    let mut out = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval);
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let (Some(name), Some(all)) = (var["name"].as_str(), var["allValue"].as_str()) else { continue };
        out = out.replace(&format!("${{{name}}}"), all).replace(&format!("${name}"), all);
    }
    out
}

/// The dashboard's query variables as (name, selector, label) from
/// `label_values(selector, label)`, the selector with variables filled in.
pub fn dashboard_variables(dashboard: &Json) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).or(v["definition"].as_str())?;
            let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
            let (selector, label) = inner.rsplit_once(',')?;
            Some((
                v["name"].as_str()?.to_owned(),
                grafana_expr(selector.trim(), dashboard, "1m"),
                label.trim().to_owned(),
            ))
        })
        .collect()
}
