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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    pipeline: String,
    action: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DegradedLabels {
    pipeline: String,
    reason: String,
}

pub struct OperatorMetrics {
    registry: Registry,
    /// The control policy's series, named as the data plane names its own
    /// (`zerodrop_policy_*`), so one dashboard reads both.
    policy_registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    degraded: Family<DegradedLabels, Gauge>,
    degraded_now: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Time one control round took: scraping every pod and deciding.
    pub control_round: Histogram,
    /// Per pipeline and round, the age of the newest reading its decision used.
    pub signal_age: Histogram,
    scrape_targets: Gauge,
    scrape_failures: Counter,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    objects: Family<PipelineLabels, Gauge>,
    drift: Family<KindLabels, Counter>,
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
        let drift = Family::<KindLabels, Counter>::default();
        let leader = Gauge::default();
        let writes = Counter::default();
        registry.register("api_writes", "Write requests sent to the apiserver: applies, deletes, status patches", writes.clone());
        registry.register("reconciles", "Reconciles by result (ok, error)", reconciles.clone());
        registry.register_with_unit("reconcile_duration", "Time one reconcile took", Unit::Seconds, duration.clone());
        registry.register("objects_managed", "Kubernetes objects owned, per pipeline", objects.clone());
        registry.register("drift_corrections", "Owned objects found edited by hand on a field the operator sets and put back, by kind", drift.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let control_round = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let signal_age = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let scrape_targets = Gauge::default();
        let scrape_failures = Counter::default();
        registry.register_with_unit("control_round", "Time one control round took: scraping every data-plane pod and deciding", Unit::Seconds, control_round.clone());
        registry.register_with_unit(
            "signal_age",
            "Per pipeline and control round, the age of the newest reading of its pods the decision used (a round with no reading observes nothing)",
            Unit::Seconds,
            signal_age.clone(),
        );
        registry.register("scrape_targets", "Data-plane pods scraped in the last control round", scrape_targets.clone());
        registry.register("scrape_failures", "Data-plane pod scrapes that failed or timed out (their figures count as missing, never as no loss)", scrape_failures.clone());
        let mut policy_registry = Registry::with_prefix("zerodrop");
        let decisions = Family::<DecisionLabels, Counter>::default();
        let degraded = Family::<DegradedLabels, Gauge>::default();
        policy_registry.register("policy_decisions", "Control policy decisions by pipeline (namespace/name), action and reason", decisions.clone());
        policy_registry.register("policy_degraded", "1 for the reason a pipeline is Degraded now (at_max_replicas, kernel_drops, shard_saturated, network_loss, signals_stale: the condition's reason in lowercase); 0 once it is not", degraded.clone());
        Self {
            registry,
            policy_registry,
            decisions,
            degraded,
            degraded_now: std::sync::Mutex::default(),
            control_round,
            signal_age,
            scrape_targets,
            scrape_failures,
            reconciles,
            duration,
            objects,
            drift,
            writes,
            leader,
        }
    }

    pub fn policy_decision(&self, pipeline: &str, action: &str, reason: &str) {
        self.decisions
            .get_or_create(&DecisionLabels { pipeline: pipeline.into(), action: action.into(), reason: reason.into() })
            .inc();
    }

    /// Sets the pipeline's Degraded reason (`None`: not degraded).
    pub fn degraded(&self, pipeline: &str, reason: Option<&str>) {
        let mut now = self.degraded_now.lock().unwrap_or_else(|e| e.into_inner());
        let previous = now.get(pipeline).cloned();
        if previous.as_deref() == reason {
            return;
        }
        if let Some(old) = previous {
            self.degraded.get_or_create(&DegradedLabels { pipeline: pipeline.into(), reason: old }).set(0);
        }
        match reason {
            Some(r) => {
                self.degraded.get_or_create(&DegradedLabels { pipeline: pipeline.into(), reason: r.into() }).set(1);
                now.insert(pipeline.to_string(), r.to_string());
            }
            None => {
                now.remove(pipeline);
            }
        }
    }

    pub fn observe_scrape_round(&self, targets: u64, failures: u64) {
        self.scrape_targets.set(targets as i64);
        self.scrape_failures.inc_by(failures);
    }

    pub fn observe_reconcile(&self, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ResultLabels { result: result.into() }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts one owned object of `kind` put back after a hand edit.
    pub fn drift_corrected(&self, kind: &str) {
        self.drift.get_or_create(&KindLabels { kind: kind.to_lowercase() }).inc();
    }

    pub fn objects_managed(&self, pipeline: &str, n: i64) {
        self.objects.get_or_create(&PipelineLabels { pipeline: pipeline.into() }).set(n);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.policy_registry);
        // One exposition: the first registry's end marker goes.
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves /metrics, /healthz (alive) and /readyz (leader or standby, ready
/// either way) from a thread.
pub fn serve(addr: &str, metrics: Arc<OperatorMetrics>) -> anyhow::Result<std::net::SocketAddr> {
    use zerodrop_telemetry::{Reply, Server};
    Server::bind(addr)?.spawn("operator-http", move |path| match path {
        "/metrics" => Reply::Metrics(metrics.encode()),
        "/healthz" | "/readyz" => Reply::ok("ok\n"),
        _ => Reply::not_found("try /metrics or /healthz"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_series_carry_the_documented_names_in_one_exposition() {
        let m = OperatorMetrics::new();
        m.policy_decision("video/fleet", "scale_to", "kernel_drops");
        m.degraded("video/fleet", Some("kernel_drops"));
        m.degraded("video/fleet", None);
        let text = m.encode();
        assert!(text.contains(r#"zerodrop_policy_decisions_total{pipeline="video/fleet",action="scale_to",reason="kernel_drops"} 1"#), "{text}");
        assert!(text.contains(r#"zerodrop_policy_degraded{pipeline="video/fleet",reason="kernel_drops"} 0"#), "{text}");
        assert!(text.contains("zerodrop_operator_reconciles_total") || text.contains("zerodrop_operator_api_writes_total"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }
}
