//! The operator's own metrics and its health endpoints.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: String,
}

pub struct OperatorMetrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    objects: Family<PipelineLabels, Gauge>,
    /// Write requests sent to the apiserver (applies, deletes, status patches).
    pub writes: Counter,
    pub leader: Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zerodrop_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let objects = Family::<PipelineLabels, Gauge>::default();
        let leader = Gauge::default();
        let writes = Counter::default();
        registry.register("api_writes", "Write requests sent to the apiserver: applies, deletes, status patches", writes.clone());
        registry.register("reconciles", "Reconciles by result (ok, error)", reconciles.clone());
        registry.register_with_unit("reconcile_duration", "Time one reconcile took", Unit::Seconds, duration.clone());
        registry.register("objects_managed", "Kubernetes objects owned, per pipeline", objects.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Self { registry, reconciles, duration, objects, writes, leader }
    }

    pub fn observe_reconcile(&self, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ResultLabels { result: result.into() }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn objects_managed(&self, pipeline: &str, n: i64) {
        self.objects.get_or_create(&PipelineLabels { pipeline: pipeline.into() }).set(n);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves /metrics, /healthz (alive) and /readyz (leader or standby, ready
/// either way) from a thread.
pub fn serve(addr: &str, metrics: Arc<OperatorMetrics>) -> anyhow::Result<std::net::SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = server.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("{addr} is not an IP socket"))?;
    std::thread::Builder::new().name("operator-http".into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = match request.url() {
                "/metrics" => tiny_http::Response::from_string(metrics.encode()),
                "/healthz" | "/readyz" => tiny_http::Response::from_string("ok\n"),
                _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
            };
            let _ = request.respond(response);
        }
    })?;
    Ok(bound)
}
