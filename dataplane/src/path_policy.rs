//! The bitrate half of the control policy, run where the streams are: once a
//! second it samples each stream's loss and repair counters and the receive
//! workers' busy time, asks `zerodrop_policy::decide` what to do, and turns a
//! step down or up a pipeline's bitrate ladder (`spec.bitratePolicy`) into an
//! RTCP TMMBR to that stream's sender (or a REMB, for a source whose
//! `bitrateRequest` says so). A rendition group (sources naming a
//! main source in `renditionOf`) is one stream to the policy, whose ladder is
//! its sources and whose signals are its decoded rendition's: a step switches
//! which member is decoded (`Supervisor::set_decoding`), and no TMMBR is
//! sent. Replicas are not this process's to change: the policy sees one shard
//! and reports only (the operator owns replicas on Kubernetes).

use std::time::{Duration, Instant};

use zerodrop_crds::StreamPipeline;
use zerodrop_policy::{
    Action, BitrateLadder, Pipeline, PolicyState, ReplicasOwner, ScalingBounds, Settings, ShardSample, ShardSignals, Signals,
    StreamSample, StreamSignals,
};

use crate::supervisor::Supervisor;

/// How often the counters are sampled and the policy asked.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// One pipeline with a bitrate ladder.
struct LadderPipeline {
    name: String,
    spec: Pipeline,
    /// Rendition names and bit rates, highest first.
    ladder: Vec<(String, u64)>,
    state: PolicyState,
    shard: Vec<ShardSample>,
    kernel_drops_before: Option<u64>,
    streams: Vec<LadderStream>,
    groups: Vec<RenditionGroup>,
}

/// A camera's renditions as separate sources: the main source and those
/// naming it in `renditionOf`, highest first. One member is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RenditionGroup {
    /// Indices into the pipeline's streams, main first.
    members: Vec<usize>,
    /// Position in `members` of the decoded rendition.
    active: usize,
}

impl RenditionGroup {
    /// The group's stream for the policy: named after the main source, on
    /// the group's own ladder, with the decoded rendition's samples (the loss
    /// that steps the group is the active rendition's) and, below the top,
    /// the next higher rendition's (a step up waits for its path to heal).
    fn signals(&self, streams: &[LadderStream]) -> StreamSignals {
        let main = &streams[self.members[0]];
        let active = &streams[self.members[self.active]];
        let upper = self.active.checked_sub(1).map(|i| streams[self.members[i]].samples.clone());
        StreamSignals {
            stream: main.name.clone(),
            shard: 0,
            rendition: self.active,
            ladder_steps: Some(self.members.len()),
            samples: active.samples.clone(),
            upper_samples: upper.unwrap_or_default(),
        }
    }

    /// Moves the decoded rendition to `to` (clamped to the group): the
    /// member switched off and the one switched on, as stream indices, or
    /// `None` when nothing changes.
    fn switch(&mut self, to: usize) -> Option<(usize, usize)> {
        let to = to.min(self.members.len() - 1);
        if to == self.active {
            return None;
        }
        let off = self.members[self.active];
        self.active = to;
        Some((off, self.members[to]))
    }
}

struct LadderStream {
    /// `pipeline/name`, as the supervisor knows it.
    id: String,
    name: String,
    rendition: usize,
    before: Option<Counts>,
    samples: Vec<StreamSample>,
}

/// Counter readings of one stream (cumulative).
#[derive(Clone, Copy)]
struct Counts {
    received_in_order: u64,
    lost: u64,
    unrecovered: u64,
    frames_dropped: u64,
}

/// The local path policy of every pipeline that declares a bitrate ladder.
pub struct PathPolicy {
    settings: Settings,
    origin: Instant,
    next_sample: Instant,
    busy_before: Option<(Instant, Vec<f64>)>,
    pipelines: Vec<LadderPipeline>,
}

impl PathPolicy {
    /// The pipelines of `manifests` that have a `bitratePolicy`; `None` when
    /// none has.
    pub fn new(manifests: &[StreamPipeline]) -> Option<Self> {
        let now = Instant::now();
        let pipelines: Vec<LadderPipeline> = manifests
            .iter()
            .filter_map(|p| {
                let policy = p.spec.bitrate_policy.as_ref()?;
                let name = p.metadata.name.clone().unwrap_or_else(|| "unnamed".into());
                let spec = Pipeline {
                    scaling: ScalingBounds { min_replicas: 1, max_replicas: 1, owner: ReplicasOwner::External },
                    bitrate: Some(BitrateLadder {
                        renditions: policy.renditions.len(),
                        downgrade_unrecovered: policy.downgrade_loss_percent / 100.0,
                        downgrade_window: Duration::from_secs(policy.downgrade_window_seconds.into()),
                        upgrade_after: Duration::from_secs(policy.upgrade_after_seconds.into()),
                    }),
                };
                let groups = zerodrop_crds::rendition_groups(&p.spec.sources)
                    .into_iter()
                    .map(|members| RenditionGroup { members, active: 0 })
                    .collect();
                let streams = p
                    .spec
                    .sources
                    .iter()
                    .map(|s| LadderStream {
                        id: format!("{name}/{}", s.name),
                        name: s.name.clone(),
                        rendition: 0,
                        before: None,
                        samples: Vec::new(),
                    })
                    .collect();
                let ladder = policy.renditions.iter().map(|r| (r.name.clone(), u64::from(r.bitrate_kbps) * 1000)).collect();
                Some(LadderPipeline {
                    name,
                    spec,
                    ladder,
                    state: PolicyState::default(),
                    shard: Vec::new(),
                    kernel_drops_before: None,
                    streams,
                    groups,
                })
            })
            .collect();
        (!pipelines.is_empty()).then(|| Self {
            settings: Settings::default(),
            origin: now,
            next_sample: now,
            busy_before: None,
            pipelines,
        })
    }

    /// Samples and decides when a second has passed since the last time.
    pub fn tick(&mut self, supervisor: &mut Supervisor, now: Instant) {
        if now < self.next_sample {
            return;
        }
        self.next_sample = now + SAMPLE_INTERVAL;
        let at = now - self.origin;
        // The busiest worker's share of the time since the last sample.
        let busy_now = supervisor.busy_seconds();
        let busy = match &self.busy_before {
            Some((then, before)) if now > *then => {
                let wall = (now - *then).as_secs_f64();
                Some(busy_now.iter().zip(before).map(|(b, a)| ((b - a) / wall).clamp(0.0, 1.0)).fold(0.0, f64::max))
            }
            _ => None,
        };
        self.busy_before = Some((now, busy_now));
        let metrics = supervisor.metrics().clone();
        for p in &mut self.pipelines {
            if p.kernel_drops_before.is_none() {
                // The supervisor decodes what this policy starts from (each
                // group's main source), also after the pod made a new policy
                // for a changed config.
                for g in &p.groups {
                    for (position, &m) in g.members.iter().enumerate() {
                        supervisor.set_decoding(&p.streams[m].id, position == g.active);
                    }
                }
            }
            let history = self.settings.history(&p.spec);
            let mut kernel_drops = 0;
            for s in &mut p.streams {
                let m = metrics.stream(&p.name, &s.name);
                kernel_drops += m.kernel_drops_total.get();
                let received = m.packets_received.get();
                let repaired = m.recovered_nack.get() + m.recovered_fec.get() + m.recovered_reorder.get();
                let counts = Counts {
                    received_in_order: received.saturating_sub(repaired),
                    lost: m.packets_lost.get(),
                    unrecovered: m.packets_unrecovered.get(),
                    frames_dropped: m.frames_dropped_total.get(),
                };
                if s.before.is_none() {
                    // Known from the start: a dashboard reads 0, not "no data".
                    metrics.set_rendition(&p.name, &s.name, s.rendition);
                }
                if let Some(b) = s.before {
                    s.samples.push(StreamSample {
                        at,
                        packets_received: Some(counts.received_in_order.saturating_sub(b.received_in_order)),
                        packets_lost: Some(counts.lost.saturating_sub(b.lost)),
                        packets_unrecovered: Some(counts.unrecovered.saturating_sub(b.unrecovered)),
                        frames_dropped: Some(counts.frames_dropped.saturating_sub(b.frames_dropped)),
                    });
                }
                s.before = Some(counts);
                s.samples.retain(|x| at.saturating_sub(x.at) <= history);
            }
            if let Some(before) = p.kernel_drops_before {
                p.shard.push(ShardSample { at, kernel_drops: Some(kernel_drops.saturating_sub(before)), busy });
            }
            p.kernel_drops_before = Some(kernel_drops);
            p.shard.retain(|x| at.saturating_sub(x.at) <= history);

            let signals = Signals {
                replicas: 1,
                shards: vec![ShardSignals { shard: 0, samples: p.shard.clone() }],
                streams: p
                    .streams
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !p.groups.iter().any(|g| g.members.contains(i)))
                    .map(|(_, s)| StreamSignals {
                        stream: s.name.clone(),
                        shard: 0,
                        rendition: s.rendition,
                        ladder_steps: None,
                        upper_samples: Vec::new(),
                        samples: s.samples.clone(),
                    })
                    .chain(p.groups.iter().map(|g| g.signals(&p.streams)))
                    .collect(),
            };
            let verdict = zerodrop_policy::decide(&self.settings, &p.spec, &signals, &p.state, at);
            p.state = verdict.state;
            for d in verdict.decisions {
                metrics.policy_decision(&p.name, d.action.as_str(), d.reason.as_str());
                let (stream, to) = match &d.action {
                    Action::StepDown { stream, to_rendition } | Action::StepUp { stream, to_rendition } => (stream, *to_rendition),
                    _ => {
                        tracing::debug!(pipeline = %p.name, decision = %d, "policy (reported only here)");
                        continue;
                    }
                };
                if let Some(g) = p.groups.iter_mut().find(|g| &p.streams[g.members[0]].name == stream) {
                    let Some((off, on)) = g.switch(to) else { continue };
                    tracing::info!(
                        pipeline = %p.name, group = %stream, from = %p.streams[off].name, to = %p.streams[on].name,
                        reason = d.reason.as_str(), figure = d.figure, threshold = d.threshold,
                        "{d}: decoding rendition {} instead of {}", p.streams[on].name, p.streams[off].name
                    );
                    // The new rendition first: it asks for a keyframe at once.
                    supervisor.set_decoding(&p.streams[on].id, true);
                    supervisor.set_decoding(&p.streams[off].id, false);
                    for &m in &g.members {
                        p.streams[m].rendition = g.active;
                        metrics.set_rendition(&p.name, &p.streams[m].name, g.active);
                    }
                    continue;
                }
                let (Some(s), Some((rendition, bitrate_bps))) = (p.streams.iter_mut().find(|s| &s.name == stream), p.ladder.get(to)) else {
                    continue;
                };
                tracing::info!(
                    pipeline = %p.name, stream = %s.name, rendition = %rendition, bitrate_bps,
                    reason = d.reason.as_str(), figure = d.figure, threshold = d.threshold,
                    "{}", d
                );
                s.rendition = to;
                metrics.set_rendition(&p.name, &s.name, to);
                if !supervisor.request_bitrate(&s.id, *bitrate_bps, to == 0) {
                    tracing::warn!(stream = %s.id, "the stream is not running: no bit rate request sent");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::{Metrics, Readiness};
    use crate::supervisor::SupervisorOptions;

    const MANIFEST: &str = r#"
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {name: cams}
spec:
  sources:
    - {name: door, codec: h264, transport: {rtp: {port: 7000}}}
    - {name: door-sub, codec: h264, renditionOf: door, transport: {rtp: {port: 7002}}}
    - {name: yard, codec: h264, transport: {rtp: {port: 7004}}}
  bitratePolicy:
    downgradeLossPercent: 1
    downgradeWindowSeconds: 2
    upgradeAfterSeconds: 3
    renditions:
      - {name: high, bitrateKbps: 2000}
      - {name: low, bitrateKbps: 500}
"#;

    fn policy() -> (PathPolicy, Supervisor) {
        let manifests = zerodrop_crds::parse_manifests(MANIFEST).expect("valid manifest");
        let supervisor = Supervisor::new(Arc::new(Metrics::new()), Arc::new(Readiness::new()), SupervisorOptions::default());
        (PathPolicy::new(&manifests).expect("a bitrate policy"), supervisor)
    }

    /// One second of a stream's counters: `lost` of 100 packets lost and not repaired.
    fn second(supervisor: &Supervisor, stream: &str, lost: u64) {
        let m = supervisor.metrics().stream("cams", stream);
        m.packets_received.inc_by(100 - lost);
        m.packets_lost.inc_by(lost);
        m.packets_unrecovered.inc_by(lost);
    }

    fn rendition_metric(supervisor: &Supervisor, stream: &str) -> String {
        let text = supervisor.metrics().encode();
        let needle = format!("zerodrop_rendition_index{{pipeline=\"cams\",stream=\"{stream}\"}}");
        text.lines().find(|l| l.starts_with(&needle)).unwrap_or_default().to_string()
    }

    #[test]
    fn a_group_is_one_ladder_of_its_sources_and_the_rest_keep_the_tmmbr_ladder() {
        let (policy, _) = policy();
        let p = &policy.pipelines[0];
        assert_eq!(p.groups, vec![RenditionGroup { members: vec![0, 1], active: 0 }]);
        let signals = p.groups[0].signals(&p.streams);
        assert_eq!((signals.stream.as_str(), signals.rendition, signals.ladder_steps), ("door", 0, Some(2)));
        assert_eq!(p.ladder.len(), 2, "yard keeps the TMMBR ladder");
    }

    #[test]
    fn the_active_renditions_loss_switches_decoding_down_the_group_and_health_switches_it_back() {
        let (mut policy, mut supervisor) = policy();
        let t0 = Instant::now();
        let mut switched = Vec::new();
        let mut last = (Some(true), Some(false));
        for t in 0..20u64 {
            // The main stream's path loses 20% until t=6; the sub stream's never.
            let main_loss = if t < 6 { 20 } else { 0 };
            second(&supervisor, "door", main_loss);
            second(&supervisor, "door-sub", 0);
            second(&supervisor, "yard", 0);
            policy.tick(&mut supervisor, t0 + Duration::from_secs(t));
            let now = (supervisor.told_decoding("cams/door"), supervisor.told_decoding("cams/door-sub"));
            if now != last {
                switched.push((t, now));
                last = now;
            }
            if t == 0 {
                assert_eq!(now, (Some(true), Some(false)), "the main source is decoded first");
            }
        }
        // Down once the main stream's loss filled the 2 s window (samples at
        // 1 and 2 s); up once both the sub stream (decoded) and the main
        // stream (received, not decoded) were healthy for 3 s: the main
        // stream's path is clean from 6 s, so at 8 s, not at 5 s when the sub
        // stream alone had been healthy that long. Nothing else.
        assert_eq!(switched, vec![(2, (Some(false), Some(true))), (8, (Some(true), Some(false)))]);
        assert!(rendition_metric(&supervisor, "door-sub").ends_with(" 0"));
        assert_eq!(supervisor.told_decoding("cams/yard"), None, "an ungrouped source is never switched");
    }
}
