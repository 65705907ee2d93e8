//! The bitrate half of the control policy, run where the streams are: once a
//! second it samples each stream's loss and repair counters and the receive
//! workers' busy time, asks `zerodrop_policy::decide` what to do, and turns a
//! step down or up a pipeline's bitrate ladder (`spec.bitratePolicy`) into an
//! RTCP TMMBR to that stream's sender. Replicas are not this process's to
//! change: the policy sees one shard and reports only (the operator owns
//! replicas on Kubernetes).

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
    pub fn tick(&mut self, supervisor: &Supervisor, now: Instant) {
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
                    .map(|s| StreamSignals { stream: s.name.clone(), shard: 0, rendition: s.rendition, samples: s.samples.clone() })
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
                if !supervisor.request_bitrate(&s.id, *bitrate_bps) {
                    tracing::warn!(stream = %s.id, "the stream is not running: no bit rate request sent");
                }
            }
        }
    }
}
