//! The control loop: every `interval`, scrape every data-plane pod's
//! `/metrics` (bounded concurrency, a deadline per pod), turn the counters
//! into the policy's signals (`collect`), ask `zerodrop_policy::decide` per
//! pipeline, and act:
//!
//! - `ScaleTo` (the policy owns replicas: `spec.scaling.replicas` unset): the
//!   choice goes to `status.policyReplicas`, where a person sees it; the
//!   reconcile reads it from there and the StatefulSet follows. When
//!   `spec.scaling.replicas` is set (kubectl scale, an HPA or KEDA through the
//!   scale subresource), the policy only reports (`WouldScaleTo`) and writes no
//!   replica count anywhere: exactly one writer.
//! - Every decision: an Event on the pipeline (reason `KernelDrops`,
//!   `ShardSaturated`, `NetworkLoss`, `Recovered`, `Headroom`, `AtMaxReplicas`,
//!   `SignalsStale`; the note names the figure and the threshold), a count in
//!   `zerodrop_policy_decisions_total{pipeline,action,reason}` and the last one
//!   in `status.lastDecision`.
//! - The `Degraded` condition from the verdict, and per-stream figures in
//!   `status.streams` (at most every `status_interval`, at once when the
//!   condition or a decision changes).
//!
//! This loop writes status with its own field manager (`zerodrop-policy`):
//! the reconcile owns `Ready`, `Scaling`, `replicas` and the streams' `shard`,
//! this loop owns `Degraded`, `policyReplicas`, `lastDecision` and the streams'
//! figures; server-side apply keeps each writer's fields apart.
//!
//! The bitrate half of the policy is not run here: stepping a stream needs
//! its RTCP session, which lives in the pod that receives it (`zerodrop run`
//! steps streams itself; see `dataplane/src/path_policy.rs`). The operator
//! reads the stream's rendition from the pod's metrics into status.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use zerodrop_crds::{ConditionType, StreamPipeline, shard};
use zerodrop_policy::{Action, Pipeline, PolicyState, Reason, ReplicasOwner, ScalingBounds, Settings, Verdict};

use crate::collect::{Collector, ShardScrape, pod_figures};
use crate::controller::{Context, condition, publish};
use crate::desired::{self, METRICS_PORT, PIPELINE_LABEL};
use crate::scrape;

/// Field manager of the status fields this loop writes.
pub const POLICY_FIELD_MANAGER: &str = "zerodrop-policy";

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// Time between rounds. Default 1 s: a 5 s reaction needs several
    /// samples inside it.
    pub interval: Duration,
    /// Deadline of one pod's scrape. Default 800 ms, under the interval.
    pub scrape_timeout: Duration,
    /// Scrapes in flight at once. Default 64.
    pub concurrency: usize,
    /// Per-stream figures in status are written at most this often.
    /// Default 10 s: status is for people; metrics are for graphs.
    pub status_interval: Duration,
    /// Port of the pods' `/metrics` (the pod template's `metrics` port).
    pub metrics_port: u16,
    pub settings: Settings,
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            scrape_timeout: Duration::from_millis(800),
            concurrency: 64,
            status_interval: Duration::from_secs(10),
            metrics_port: METRICS_PORT as u16,
            settings: Settings::default(),
        }
    }
}

/// What the loop keeps per pipeline between rounds.
#[derive(Default)]
struct Track {
    collector: Collector,
    state: PolicyState,
    /// The replica count this loop last wrote to `status.policyReplicas`,
    /// until the pipeline in the store shows it.
    written_replicas: Option<u32>,
    last_decision: Option<String>,
    /// The policy-owned status last written, and when.
    written_status: Option<(serde_json::Value, Instant)>,
}

/// The policy's view of a pipeline's spec.
pub fn policy_pipeline(sp: &StreamPipeline) -> Pipeline {
    let s = &sp.spec.scaling;
    Pipeline {
        scaling: ScalingBounds {
            min_replicas: s.min_replicas.max(1) as u32,
            max_replicas: s.max_replicas.max(1) as u32,
            owner: if s.replicas.is_some() { ReplicasOwner::External } else { ReplicasOwner::Policy },
        },
        bitrate: None,
    }
}

/// The Event reason of a decision: its trigger, in the condition's CamelCase.
pub fn event_reason(reason: Reason) -> &'static str {
    match reason {
        Reason::KernelDrops => "KernelDrops",
        Reason::ShardSaturated => "ShardSaturated",
        Reason::NetworkLoss => "NetworkLoss",
        Reason::Recovered => "Recovered",
        Reason::Headroom => "Headroom",
        Reason::AtMaxReplicas => "AtMaxReplicas",
        Reason::SignalsStale => "SignalsStale",
    }
}

fn key(sp: &StreamPipeline) -> String {
    format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any())
}

/// Scrape targets of a pipeline: its pods with an IP, by ordinal, below the
/// running replica count (pods still draining after a scale-down are not the
/// policy's to read).
fn targets(sp: &StreamPipeline, pods: &[Arc<Pod>], replicas: u32, port: u16) -> Vec<(u32, SocketAddr)> {
    let name = sp.name_any();
    let ns = sp.namespace();
    let sts = desired::statefulset_name(&name);
    pods.iter()
        .filter(|p| p.namespace() == ns && p.labels().get(PIPELINE_LABEL) == Some(&name))
        .filter_map(|p| {
            let pod_name = p.name_any();
            let ordinal = pod_name.strip_prefix(&sts)?.strip_prefix('-')?.parse::<u32>().ok()?;
            let ip: IpAddr = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
            (ordinal < replicas).then_some((ordinal, SocketAddr::new(ip, port)))
        })
        .collect()
}

/// Runs rounds until the process ends.
pub async fn run(ctx: Arc<Context>, pipelines: Store<StreamPipeline>, pods: Store<Pod>, opts: ControlOptions) {
    let origin = Instant::now();
    let mut tracks: HashMap<String, Track> = HashMap::new();
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tracing::info!(interval_ms = opts.interval.as_millis() as u64, concurrency = opts.concurrency, "control loop starting");
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let sps = pipelines.state();
        let all_pods = pods.state();
        // Who runs what, and what to read.
        let mut plan = Vec::with_capacity(sps.len());
        let mut scrape_targets = Vec::new();
        for sp in &sps {
            if sp.meta().deletion_timestamp.is_some() {
                continue;
            }
            let k = key(sp);
            let track = tracks.entry(k.clone()).or_default();
            let spec_replicas = desired::replicas(sp).max(0) as u32;
            let pipeline = policy_pipeline(sp);
            // What runs: the store's count, or the one this loop just wrote
            // while the store has not caught up (so one overload is not
            // answered twice).
            let replicas = match (pipeline.scaling.owner, track.written_replicas) {
                (ReplicasOwner::Policy, Some(w)) if w != spec_replicas => w,
                _ => {
                    track.written_replicas = None;
                    spec_replicas
                }
            };
            for (ordinal, addr) in targets(sp, &all_pods, replicas, opts.metrics_port) {
                scrape_targets.push(((k.clone(), ordinal), addr));
            }
            plan.push((sp.clone(), k, pipeline, replicas));
        }
        let target_count = scrape_targets.len();
        let scrapes = scrape::scrape_all(scrape_targets, "/metrics", opts.concurrency, opts.scrape_timeout).await;
        let mut failures = 0u64;
        let mut by_pipeline: HashMap<String, Vec<(u32, Instant, Vec<scrape::MetricSample>)>> = HashMap::new();
        for s in scrapes {
            match s.result {
                Ok(samples) => by_pipeline.entry(s.target.0).or_default().push((s.target.1, s.at, samples)),
                Err(e) => {
                    failures += 1;
                    tracing::debug!(pipeline = %s.target.0, shard = s.target.1, error = %e, "scrape failed");
                }
            }
        }
        ctx.metrics.observe_scrape_round(target_count as u64, failures);

        let now = origin.elapsed();
        for (sp, k, pipeline, replicas) in plan {
            let Some(track) = tracks.get_mut(&k) else { continue };
            let name = sp.name_any();
            let mut shard_scrapes = HashMap::new();
            for (ordinal, at, samples) in by_pipeline.remove(&k).unwrap_or_default() {
                let at = at.saturating_duration_since(origin);
                shard_scrapes.insert(ordinal, ShardScrape { at, figures: pod_figures(&samples, &name) });
            }
            let owners: Vec<(String, u32)> =
                sp.spec.sources.iter().map(|s| (s.name.clone(), shard::owner(&s.name, replicas as i32))).collect();
            let history = opts.settings.history(&pipeline);
            track.collector.record(now, replicas, &owners, &shard_scrapes, history);
            let verdict = zerodrop_policy::decide(&opts.settings, &pipeline, &track.collector.signals, &track.state, now);
            track.state = verdict.state.clone();
            act(&ctx, &sp, &k, track, &verdict, &opts).await;
        }
        tracks.retain(|k, _| sps.iter().any(|sp| &key(sp) == k));
        ctx.metrics.control_round.observe(started.elapsed().as_secs_f64());
    }
}

/// Carries out one verdict: replicas, Events, metrics, status.
async fn act(ctx: &Context, sp: &StreamPipeline, k: &str, track: &mut Track, verdict: &Verdict, opts: &ControlOptions) {
    let mut decided = false;
    for d in &verdict.decisions {
        ctx.metrics.policy_decision(k, d.action.as_str(), d.reason.as_str());
        let warning = matches!(d.action, Action::AtMaxReplicas { .. } | Action::SignalsStale { .. });
        let note = d.to_string();
        tracing::info!(pipeline = %k, action = d.action.as_str(), reason = d.reason.as_str(), figure = d.figure, threshold = d.threshold, "{note}");
        publish(ctx, sp, if warning { EventType::Warning } else { EventType::Normal }, event_reason(d.reason), &note).await;
        if let Action::ScaleTo { replicas, .. } = d.action {
            track.written_replicas = Some(replicas);
        }
        track.last_decision = Some(note);
        decided = true;
    }
    ctx.metrics.degraded(k, verdict.degraded.primary().map(|r| r.as_str()));
    let patch = policy_status(sp, track, verdict);
    let due = match &track.written_status {
        None => true,
        Some((last, at)) => {
            decided
                || essentials(last) != essentials(&patch)
                || (at.elapsed() >= opts.status_interval && *last != patch)
        }
    };
    if !due {
        return;
    }
    let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &sp.namespace().unwrap_or_default());
    match api.patch_status(&sp.name_any(), &PatchParams::apply(POLICY_FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            track.written_status = Some((patch, Instant::now()));
        }
        Err(e) => tracing::warn!(pipeline = %k, error = %e, "cannot write the policy's status"),
    }
}

/// The parts of the policy's status that are written as soon as they change:
/// everything but the per-stream figures.
fn essentials(patch: &serde_json::Value) -> serde_json::Value {
    let mut v = patch["status"].clone();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("streams");
        // The condition's message carries figures; its status and reason matter.
        if let Some(conditions) = obj.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in conditions {
                if let Some(c) = c.as_object_mut() {
                    c.remove("message");
                    c.remove("lastTransitionTime");
                }
            }
        }
    }
    v
}

/// The status fields this loop owns, as a server-side apply patch.
fn policy_status(sp: &StreamPipeline, track: &Track, verdict: &Verdict) -> serde_json::Value {
    let degraded = &verdict.degraded;
    let (is_degraded, reason, message) = match degraded.primary() {
        Some(primary) => (
            true,
            primary.as_str(),
            format!(
                "{}{}",
                degraded.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
                track.last_decision.as_deref().map(|d| format!("; last decision: {d}")).unwrap_or_default()
            ),
        ),
        None => (false, "AsExpected", "no shard or stream reports a problem".to_string()),
    };
    let cond = condition(sp.status.as_ref(), ConditionType::Degraded, is_degraded, reason, &message, sp.metadata.generation);
    let streams: Vec<serde_json::Value> = sp
        .spec
        .sources
        .iter()
        .take(crate::controller::MAX_STATUS_STREAMS)
        .filter_map(|s| {
            let c = track.collector.latest.get(&s.name)?;
            let mut v = serde_json::json!({
                "name": s.name,
                "framesDecoded": c.frames_decoded,
                "framesDropped": c.frames_dropped,
                "packetsLost": c.lost,
                "packetsRecovered": c.recovered,
                "packetsUnrecovered": c.unrecovered,
                "kernelDrops": c.kernel_drops,
            });
            if let Some(d) = &c.decoder {
                v["decoder"] = d.clone().into();
            }
            if let (Some(r), Some(policy)) = (c.rendition, &sp.spec.bitrate_policy)
                && let Some(rendition) = policy.renditions.get(r)
            {
                v["rendition"] = rendition.name.clone().into();
            }
            Some(v)
        })
        .collect();
    let mut status = serde_json::json!({
        "conditions": [cond],
        "streams": streams,
    });
    if policy_pipeline(sp).scaling.owner == ReplicasOwner::Policy {
        let replicas = track.written_replicas.map(|r| r as i32).unwrap_or_else(|| desired::replicas(sp));
        status["policyReplicas"] = replicas.into();
    }
    if let Some(d) = &track.last_decision {
        status["lastDecision"] = d.clone().into();
    }
    serde_json::json!({
        "apiVersion": zerodrop_crds::API_VERSION,
        "kind": zerodrop_crds::KIND,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sp(replicas: Option<i32>) -> StreamPipeline {
        serde_yaml::from_str(&format!(
            r#"
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {{name: fleet, namespace: video, generation: 2}}
spec:
  scaling: {{minReplicas: 1, maxReplicas: 4{}}}
  sources:
    - {{name: a, codec: h264, transport: {{rtp: {{port: 5000}}}}}}
"#,
            replicas.map(|r| format!(", replicas: {r}")).unwrap_or_default()
        ))
        .unwrap()
    }

    fn pod(name: &str, pipeline: &str, ip: Option<&str>) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("video".into());
        p.metadata.labels = Some(BTreeMap::from([(PIPELINE_LABEL.to_string(), pipeline.to_string())]));
        p.status = Some(k8s_openapi::api::core::v1::PodStatus { pod_ip: ip.map(str::to_string), ..Default::default() });
        Arc::new(p)
    }

    #[test]
    fn the_policy_owns_replicas_only_while_spec_scaling_replicas_is_unset() {
        assert_eq!(policy_pipeline(&sp(None)).scaling.owner, ReplicasOwner::Policy);
        assert_eq!(policy_pipeline(&sp(Some(2))).scaling.owner, ReplicasOwner::External);
        assert_eq!(policy_pipeline(&sp(None)).scaling.max_replicas, 4);
        assert!(policy_pipeline(&sp(None)).bitrate.is_none());
    }

    #[test]
    fn targets_are_the_pipelines_pods_with_an_ip_below_the_replica_count() {
        let pods = vec![
            pod("fleet-dataplane-0", "fleet", Some("10.0.0.5")),
            pod("fleet-dataplane-1", "fleet", None),
            pod("fleet-dataplane-2", "fleet", Some("10.0.0.7")),
            pod("other-dataplane-0", "other", Some("10.0.0.9")),
            pod("fleet-dataplane-x", "fleet", Some("10.0.0.8")),
        ];
        let t = targets(&sp(None), &pods, 2, 9464);
        assert_eq!(t, vec![(0, "10.0.0.5:9464".parse().unwrap())]);
        let t = targets(&sp(None), &pods, 3, 9464);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn event_reasons_are_the_conditions_camel_case() {
        for r in zerodrop_policy::Reason::ALL {
            let camel = event_reason(r);
            assert_eq!(camel.to_ascii_lowercase(), r.as_str().replace('_', ""), "{r}");
        }
    }

    #[test]
    fn the_policy_status_holds_only_the_policys_fields() {
        let track = Track { last_decision: Some("scale from 1 to 2 replicas: kernel_drops 40 above 0".into()), written_replicas: Some(2), ..Track::default() };
        let verdict = Verdict { decisions: vec![], degraded: zerodrop_policy::Degraded { reasons: vec![zerodrop_policy::DegradedReason::KernelDrops] }, state: PolicyState::default() };
        let patch = policy_status(&sp(None), &track, &verdict);
        let status = &patch["status"];
        assert_eq!(status["policyReplicas"], 2);
        assert_eq!(status["conditions"][0]["type"], "Degraded");
        assert_eq!(status["conditions"][0]["status"], "True");
        assert_eq!(status["conditions"][0]["reason"], "KernelDrops");
        assert!(status["conditions"][0]["message"].as_str().unwrap().contains("kernel_drops 40 above 0"));
        assert!(status.get("replicas").is_none() && status.get("selector").is_none(), "the reconcile's fields are not touched");
        // An HPA owns replicas: no policyReplicas at all.
        let patch = policy_status(&sp(Some(3)), &track, &verdict);
        assert!(patch["status"].get("policyReplicas").is_none());
    }
}
