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
//! the reconcile owns `Ready`, `Scaling`, `replicas` and the streams' `shard`
//! and `hls`,
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

use crate::collect::{AgentDrops, Collector, PodFigures, ShardScrape, pod_figures};
use crate::controller::{Context, condition, publish};
use crate::desired::{self, METRICS_PORT, PIPELINE_LABEL};
use crate::promsource::PrometheusSource;
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
    /// Status writes that only refresh figures (no condition, decision or
    /// replica change, which are written at once), across all pipelines, at
    /// most this many a second; beyond it pipelines take turns. Default 10:
    /// at 1,000 pipelines each one's figures are refreshed about every 100 s,
    /// and the apiserver takes 600 such writes a minute whatever the fleet.
    pub status_refreshes_per_second: f64,
    /// Port of the pods' `/metrics` (the pod template's `metrics` port).
    pub metrics_port: u16,
    /// Where the node agents' `/metrics` are (kernel drops by socket and reason).
    pub agents: Agents,
    /// Where the figures come from: the pods themselves, or Prometheus.
    pub source: SignalSource,
    pub settings: Settings,
}

/// Where a round's figures come from.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SignalSource {
    /// Each data-plane pod's `/metrics`, read directly (the default: no
    /// Prometheus needed, and a round sees figures at most one round old).
    #[default]
    Pods,
    /// One instant query to a Prometheus server (`promsource.rs`); the node
    /// agents' series come from it too.
    Prometheus(PrometheusSource),
}

/// How the loop finds the node agents (`zerodrop-agent`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Agents {
    /// No agents: kernel drops come from the pods' own per-socket counts.
    #[default]
    None,
    /// Fixed addresses (`--agent-endpoints`).
    Static(Vec<SocketAddr>),
    /// The pods matching a label selector (`--agent-selector`; the chart's
    /// DaemonSet), on `port`: they run on the host network, so a pod's IP is
    /// its node's.
    Pods { selector: String, port: u16 },
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            scrape_timeout: Duration::from_millis(800),
            concurrency: 64,
            status_interval: Duration::from_secs(10),
            status_refreshes_per_second: 10.0,
            metrics_port: METRICS_PORT as u16,
            agents: Agents::None,
            source: SignalSource::Pods,
            settings: Settings::default(),
        }
    }
}

/// A token bucket for the status writes that only refresh figures: `rate`
/// a second, at most one second's worth saved up.
#[derive(Debug)]
pub struct RefreshBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RefreshBudget {
    pub fn new(rate: f64, now: Instant) -> Self {
        let rate = rate.max(0.0);
        Self { rate, tokens: rate.max(1.0), last: now }
    }

    /// Takes one write if one is left at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
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

/// One round's figures from Prometheus: per target (pipeline, ordinal), its
/// pod's series if Prometheus has a newer sample of them than the last round
/// read, stamped with Prometheus' scrape time; and the node agents' series
/// (those without a `pipeline` label) as the agents' drops. A failed query
/// fails every target: missing data, never "no loss".
async fn from_prometheus(
    p: &PrometheusSource,
    targets: Vec<((String, u32), SocketAddr)>,
    seen: &mut HashMap<(String, u32), f64>,
    opts: &ControlOptions,
) -> (Vec<scrape::Scrape<(String, u32), PodFigures>>, AgentDrops) {
    let answer: Result<HashMap<(String, String), crate::promsource::PodSeries>, String> = async {
        let addr = tokio::net::lookup_host((p.host.as_str(), p.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", p.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", p.host))?;
        let body = scrape::http_get(addr, &p.query_path(), opts.scrape_timeout).await.map_err(|e| e.to_string())?;
        crate::promsource::parse_response(&body)
    }
    .await;
    let now = Instant::now();
    let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut agents = AgentDrops::new(1);
    let pods = match answer {
        Ok(pods) => {
            for series in pods.values() {
                let agent_series: Vec<scrape::MetricSample> =
                    series.samples.iter().filter(|s| s.label("pipeline").is_none()).cloned().collect();
                agents.add_series(&agent_series);
            }
            agents.answered = 1;
            Some(pods)
        }
        Err(e) => {
            tracing::warn!(error = %e, "Prometheus query failed");
            None
        }
    };
    seen.retain(|k, _| targets.iter().any(|(t, _)| t == k));
    let scrapes = targets
        .into_iter()
        .map(|(target, _)| {
            let (pipeline_key, ordinal) = &target;
            let (ns, name) = pipeline_key.split_once('/').unwrap_or(("", pipeline_key));
            let pod = format!("{}-{ordinal}", desired::statefulset_name(name));
            let (result, at) = match pods.as_ref().map(|m| m.get(&(ns.to_string(), pod))) {
                None => (Err(scrape::ScrapeError::Io("the Prometheus query failed".into())), now),
                Some(None) => (Err(scrape::ScrapeError::Io("no series of the pod in Prometheus".into())), now),
                Some(Some(series)) => {
                    let age = (now_unix - series.at_unix).max(0.0);
                    let at = now.checked_sub(Duration::from_secs_f64(age)).unwrap_or(now);
                    if seen.get(&target).is_some_and(|&t| t >= series.at_unix) {
                        (Err(scrape::ScrapeError::NotNew), at)
                    } else {
                        seen.insert(target.clone(), series.at_unix);
                        (Ok(pod_figures(&series.samples, name)), at)
                    }
                }
            };
            scrape::Scrape { target, at, result, bad_lines: 0 }
        })
        .collect();
    (scrapes, agents)
}

/// Puts the node agents' drops for each stream's sockets (the pod's IP and
/// the stream's ports: RTP, RTCP, FEC) into the pod's figures.
fn join_agent_drops(sp: &StreamPipeline, figures: &mut crate::collect::PodFigures, ip: IpAddr, agents: &AgentDrops) {
    for source in &sp.spec.sources {
        let ports = match (&source.transport.rtp, &source.transport.srt) {
            (Some(rtp), _) => rtp.socket_ports(),
            // An SRT listener's socket is the pod's; a caller's port is not known.
            (None, Some(srt)) if srt.mode == zerodrop_crds::SrtMode::Listener => vec![srt.port],
            _ => continue,
        };
        if let Some(counters) = figures.streams.get_mut(&source.name) {
            counters.agent_drops = agents.for_sockets(ip, &ports);
        }
    }
}

/// Runs rounds until the process ends.
pub async fn run(ctx: Arc<Context>, pipelines: Store<StreamPipeline>, pods: Store<Pod>, agent_pods: Option<Store<Pod>>, opts: ControlOptions) {
    let origin = Instant::now();
    let mut tracks: HashMap<String, Track> = HashMap::new();
    // With the Prometheus source: the newest sample time read per shard.
    let mut prometheus_seen: HashMap<(String, u32), f64> = HashMap::new();
    let mut budget = RefreshBudget::new(opts.status_refreshes_per_second, Instant::now());
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
            // Whose figures count for a stream: the pod its Service routes
            // to, which during a handover is its old owner until the switch.
            let route = ctx.route_replicas(&k).map_or(replicas, |r| r.max(0) as u32);
            for (ordinal, addr) in targets(sp, &all_pods, route, opts.metrics_port) {
                scrape_targets.push(((k.clone(), ordinal), addr));
            }
            plan.push((sp.clone(), k, pipeline, replicas, route));
        }
        let pod_ips: HashMap<(String, u32), IpAddr> = scrape_targets.iter().map(|(k, addr)| (k.clone(), addr.ip())).collect();
        let agent_targets: Vec<SocketAddr> = match (&opts.agents, &agent_pods) {
            (Agents::Static(addrs), _) => addrs.clone(),
            (Agents::Pods { port, .. }, Some(store)) => store
                .state()
                .iter()
                .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, *port))
                .collect(),
            _ => Vec::new(),
        };
        let mut failures = 0u64;
        let (target_count, mut agents, scrapes, agent_scrapes) = match &opts.source {
            SignalSource::Pods => {
                let target_count = scrape_targets.len() + agent_targets.len();
                let agents = AgentDrops::new(agent_targets.len());
                let (scrapes, agent_scrapes) = futures::join!(
                    // Each page is cut down to its pipeline's figures as it
                    // arrives (a fleet's pages are never all held at once).
                    scrape::scrape_all_map(scrape_targets, "/metrics", opts.concurrency, opts.scrape_timeout, |(key, _), samples| {
                        pod_figures(&samples, key.split_once('/').map_or(key.as_str(), |(_, name)| name))
                    }),
                    scrape::scrape_all(agent_targets.into_iter().map(|a| (a, a)).collect(), "/metrics", opts.concurrency, opts.scrape_timeout),
                );
                (target_count, agents, scrapes, agent_scrapes)
            }
            SignalSource::Prometheus(p) => {
                let (scrapes, agents) = from_prometheus(p, scrape_targets, &mut prometheus_seen, &opts).await;
                (1, agents, scrapes, Vec::new())
            }
        };
        for s in agent_scrapes {
            match s.result {
                Ok(samples) => agents.add(&samples),
                Err(e) => {
                    failures += 1;
                    tracing::debug!(agent = %s.target, error = %e, "agent scrape failed");
                }
            }
        }
        let mut by_pipeline: HashMap<String, Vec<(u32, Instant, PodFigures)>> = HashMap::new();
        for s in scrapes {
            match s.result {
                Ok(samples) => by_pipeline.entry(s.target.0).or_default().push((s.target.1, s.at, samples)),
                // Prometheus has not scraped the pod again since the last round.
                Err(scrape::ScrapeError::NotNew) => {}
                Err(e) => {
                    failures += 1;
                    tracing::debug!(pipeline = %s.target.0, shard = s.target.1, error = %e, "scrape failed");
                }
            }
        }
        ctx.metrics.observe_scrape_round(target_count as u64, failures);

        let now = origin.elapsed();
        for (sp, k, pipeline, replicas, route) in plan {
            let Some(track) = tracks.get_mut(&k) else { continue };
            let mut shard_scrapes = HashMap::new();
            for (ordinal, at, mut figures) in by_pipeline.remove(&k).unwrap_or_default() {
                let at = at.saturating_duration_since(origin);
                if let Some(ip) = pod_ips.get(&(k.clone(), ordinal)) {
                    join_agent_drops(&sp, &mut figures, *ip, &agents);
                }
                shard_scrapes.insert(ordinal, ShardScrape { at, figures });
            }
            if let Some(newest) = shard_scrapes.values().map(|s| s.at).max() {
                ctx.metrics.signal_age.observe(now.saturating_sub(newest).as_secs_f64());
            }
            let owners: Vec<(String, u32)> =
                sp.spec.sources.iter().map(|s| (s.name.clone(), shard::owner(s.shard_key(), route as i32))).collect();
            let history = opts.settings.history(&pipeline);
            match &opts.source {
                SignalSource::Pods => track.collector.record(now, replicas, &owners, &shard_scrapes, history),
                // Readings carry Prometheus' scrape times, up to an interval
                // old: a shard without a new one is missing data as of the
                // newest reading (not as of now, which would put it after
                // readings still to come and lose them). A round with no new
                // reading records nothing; staleness is judged by age.
                SignalSource::Prometheus(_) => {
                    match shard_scrapes.values().map(|s| s.at).max() {
                        Some(newest) => track.collector.record(newest, replicas, &owners, &shard_scrapes, history),
                        // The running count still holds (a change of it is what the cooldown counts from).
                        None => track.collector.signals.replicas = replicas,
                    }
                }
            }
            let verdict = zerodrop_policy::decide(&opts.settings, &pipeline, &track.collector.signals, &track.state, now);
            track.state = verdict.state.clone();
            act(&ctx, &sp, &k, track, &verdict, &opts, &mut budget).await;
        }
        tracks.retain(|k, _| sps.iter().any(|sp| &key(sp) == k));
        ctx.metrics.control_round.observe(started.elapsed().as_secs_f64());
    }
}

/// Carries out one verdict: replicas, Events, metrics, status.
async fn act(ctx: &Context, sp: &StreamPipeline, k: &str, track: &mut Track, verdict: &Verdict, opts: &ControlOptions, budget: &mut RefreshBudget) {
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
    ctx.metrics.degraded(k, verdict.degraded.primary().map(|r| r.label()));
    let patch = policy_status(sp, track, verdict);
    let due = match &track.written_status {
        // The first round of this process: write unless the object already
        // shows it (an operator restart over a steady pipeline writes nothing).
        None => {
            match crate::drift::first_difference(&patch["status"], &live_projection(sp, &patch["status"])) {
                None => {
                    track.written_status = Some((patch, Instant::now()));
                    return;
                }
                Some(d) => {
                    tracing::info!(pipeline = %k, difference = %d, "status differs from what this loop would write");
                    true
                }
            }
        }
        Some((last, at)) => {
            decided
                || essentials(last) != essentials(&patch)
                || (at.elapsed() >= opts.status_interval && *last != patch && budget.take(Instant::now()))
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

/// The object's status shaped like `patch`: its conditions and streams are
/// lists keyed by `type` and `name` that two field managers share, so only
/// the entries the patch names, in the patch's order, are compared.
fn live_projection(sp: &StreamPipeline, patch: &serde_json::Value) -> serde_json::Value {
    let mut live = serde_json::to_value(&sp.status).unwrap_or_default();
    for (list, key) in [("conditions", "type"), ("streams", "name")] {
        let wanted: Vec<serde_json::Value> = patch[list].as_array().map(|a| a.iter().map(|e| e[key].clone()).collect()).unwrap_or_default();
        let entries: Vec<serde_json::Value> = live[list].as_array().cloned().unwrap_or_default();
        let picked: Vec<serde_json::Value> =
            wanted.iter().filter_map(|k| entries.iter().find(|e| &e[key] == k).cloned()).collect();
        if let Some(obj) = live.as_object_mut() {
            obj.insert(list.to_string(), picked.into());
        }
    }
    live
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
            if let Some(connected) = c.ingest_connected {
                let mut ingest = serde_json::json!({"connected": connected, "reconnects": c.ingest_reconnects});
                if let Some(e) = &c.ingest_last_error {
                    ingest["lastError"] = e.clone().into();
                }
                if let Some(t) = c.ingest_last_frame.and_then(|t| k8s_openapi::jiff::Timestamp::from_millisecond((t * 1000.0) as i64).ok()) {
                    ingest["lastFrameTime"] = format!("{t:.3}").into();
                }
                v["ingest"] = ingest;
            }
            if let Some(by_reason) = c.agent_drops.as_ref().filter(|m| !m.is_empty()) {
                v["kernelDropsByReason"] = serde_json::json!(by_reason);
            }
            if let Some(rendition) = c.rendition.and_then(|r| sp.spec.rendition_name(&s.name, r)) {
                v["rendition"] = rendition.into();
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
    fn figure_refreshes_are_budgeted_across_pipelines() {
        let t0 = Instant::now();
        let mut b = RefreshBudget::new(10.0, t0);
        let burst = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(burst, 10, "one second's worth saved up");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token after 50 ms");
        assert!(b.take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(later)).count(), 10, "never more than a second's worth, however long it waited");
        let mut slow = RefreshBudget::new(0.5, t0);
        assert!(slow.take(t0) && !slow.take(t0), "below one a second: one saved up");
        assert!(slow.take(t0 + Duration::from_secs(2)));
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
