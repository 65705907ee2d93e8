//! Simulation tests: traces of load and loss, played one sample a second
//! through `decide`, with the exact decisions each trace must yield. The
//! simulator carries out changes the way the operator will (a new replica
//! count holds from the next round, a step changes the stream's rendition),
//! so a trace can make load or loss answer the policy's cure.

use std::time::Duration;

use zerodrop_policy::*;

const CAM: &str = "cam1";

/// One shard's figures in a round; the simulator stamps the time.
type ShardModel = Box<dyn Fn(u64, u32, u32) -> Option<ShardSample>>;
/// The stream's figures in a round, given its current rendition.
type StreamModel = Box<dyn Fn(u64, usize) -> Option<StreamSample>>;

struct Sim {
    settings: Settings,
    pipeline: Pipeline,
    signals: Signals,
    state: PolicyState,
    /// When each shard ordinal was first expected, so a new pod can take a while to report.
    born: Vec<u64>,
    pod_startup: u64,
    shard_model: ShardModel,
    stream_model: Option<StreamModel>,
    log: Vec<(u64, Decision)>,
    last_degraded: Degraded,
}

impl Sim {
    fn new(
        replicas: u32,
        min: u32,
        max: u32,
        owner: ReplicasOwner,
        shard_model: ShardModel,
    ) -> Self {
        Sim {
            settings: Settings::default(),
            pipeline: Pipeline {
                scaling: ScalingBounds {
                    min_replicas: min,
                    max_replicas: max,
                    owner,
                },
                bitrate: Some(ladder()),
            },
            signals: Signals {
                replicas,
                shards: Vec::new(),
                streams: Vec::new(),
            },
            state: PolicyState::default(),
            born: vec![0; replicas as usize],
            pod_startup: 0,
            shard_model,
            stream_model: None,
            log: Vec::new(),
            last_degraded: Degraded::default(),
        }
    }

    fn with_stream(mut self, model: StreamModel) -> Self {
        self.signals.streams.push(StreamSignals {
            stream: CAM.into(),
            shard: 0,
            rendition: 0,
            ladder_steps: None,
            upper_samples: Vec::new(),
            samples: Vec::new(),
        });
        self.stream_model = Some(model);
        self
    }

    fn round(&mut self, t: u64) {
        let at = Duration::from_secs(t);
        let n = self.signals.replicas;
        for k in 0..n {
            if self.born.len() <= k as usize {
                self.born.push(t);
            }
            if t < self.born[k as usize] + self.pod_startup {
                continue;
            }
            if let Some(sample) = (self.shard_model)(t, k, n) {
                let entry = match self.signals.shards.iter().position(|s| s.shard == k) {
                    Some(i) => &mut self.signals.shards[i],
                    None => {
                        self.signals.shards.push(ShardSignals {
                            shard: k,
                            samples: Vec::new(),
                        });
                        self.signals.shards.last_mut().unwrap()
                    }
                };
                entry.samples.push(ShardSample { at, ..sample });
            }
        }
        if let Some(model) = &self.stream_model {
            let stream = &mut self.signals.streams[0];
            if let Some(sample) = model(t, stream.rendition) {
                stream.samples.push(StreamSample { at, ..sample });
            }
        }
        let verdict = decide(
            &self.settings,
            &self.pipeline,
            &self.signals,
            &self.state,
            at,
        );
        for d in &verdict.decisions {
            match &d.action {
                Action::ScaleTo { replicas, .. } => self.signals.replicas = *replicas,
                Action::StepDown { to_rendition, .. } | Action::StepUp { to_rendition, .. } => {
                    self.signals.streams[0].rendition = *to_rendition
                }
                _ => {}
            }
            self.log.push((t, d.clone()));
        }
        self.state = verdict.state;
        self.last_degraded = verdict.degraded;
    }

    fn run(&mut self, from: u64, to: u64) -> &mut Self {
        for t in from..=to {
            self.round(t);
        }
        self
    }

    /// The log as (time, action) pairs, for exact comparison.
    fn actions(&self) -> Vec<(u64, Action)> {
        self.log
            .iter()
            .map(|(t, d)| (*t, d.action.clone()))
            .collect()
    }

    fn reasons(&self) -> Vec<(u64, Reason)> {
        self.log.iter().map(|(t, d)| (*t, d.reason)).collect()
    }
}

/// Three renditions; step down above 1% unrecovered for 10 s, up after 60 s of health.
fn ladder() -> BitrateLadder {
    BitrateLadder {
        renditions: 3,
        downgrade_unrecovered: 0.01,
        downgrade_window: Duration::from_secs(10),
        upgrade_after: Duration::from_secs(60),
    }
}

fn shard(kernel_drops: u64, busy: f64) -> Option<ShardSample> {
    Some(ShardSample {
        at: Duration::ZERO,
        kernel_drops: Some(kernel_drops),
        busy: Some(busy),
    })
}

/// A shard model for a total load (in busy workers' worth) spread evenly over
/// the replicas: a shard past 90% busy overflows its sockets.
fn spread(load: impl Fn(u64) -> f64 + 'static) -> ShardModel {
    Box::new(move |t, _, n| {
        let per_shard = load(t) / f64::from(n);
        let drops = if per_shard > 0.9 {
            ((per_shard - 0.9) * 1000.0).round() as u64
        } else {
            0
        };
        shard(drops, per_shard.min(1.0))
    })
}

/// 1000 packets a round, `lost` of them lost on the path and `unrecovered` not repaired.
fn stream(lost: u64, unrecovered: u64) -> Option<StreamSample> {
    Some(StreamSample {
        at: Duration::ZERO,
        packets_received: Some(1000 - lost),
        packets_lost: Some(lost),
        packets_unrecovered: Some(unrecovered),
        frames_dropped: Some(if unrecovered > 0 { 1 } else { 0 }),
    })
}

fn healthy_shard() -> ShardModel {
    Box::new(|_, _, _| shard(0, 0.5))
}

fn assert_close(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[test]
fn kernel_drops_raise_replicas_within_five_seconds_of_the_first_drop() {
    // Load jumps at t=100 past what one shard takes; two shards take it.
    let mut sim = Sim::new(
        1,
        1,
        4,
        ReplicasOwner::Policy,
        spread(|t| if t < 100 { 0.5 } else { 1.2 }),
    );
    sim.pod_startup = 5;
    sim.run(1, 800);
    assert_eq!(
        sim.actions(),
        [(
            100,
            Action::ScaleTo {
                from: 1,
                replicas: 2
            }
        )]
    );
    let (t, d) = &sim.log[0];
    assert!(t - 100 <= 5);
    assert_eq!(d.reason, Reason::KernelDrops);
    assert_close(d.figure, 300.0);
    assert_close(d.threshold, 0.0);
    // The new pod took 5 s to report and was never called stale; the pipeline is healthy again.
    assert!(!sim.last_degraded.is_degraded());
}

#[test]
fn saturated_workers_raise_replicas_in_proportion_to_the_load() {
    // Busy workers without socket overflow yet: two shards at 100% want 2 * 1.0 / 0.6 = 4.
    let mut sim = Sim::new(
        2,
        1,
        8,
        ReplicasOwner::Policy,
        Box::new(|t, _, n| shard(0, if n < 4 && t >= 10 { 1.0 } else { 0.5 })),
    );
    sim.run(1, 60);
    assert_eq!(
        sim.actions(),
        [(
            10,
            Action::ScaleTo {
                from: 2,
                replicas: 4
            }
        )]
    );
    assert_eq!(sim.reasons(), [(10, Reason::ShardSaturated)]);
    assert_close(sim.log[0].1.threshold, 0.9);
}

#[test]
fn replicas_go_down_only_after_the_whole_scale_down_window_of_headroom() {
    let mut sim = Sim::new(
        3,
        1,
        4,
        ReplicasOwner::Policy,
        spread(|t| if t < 100 { 1.5 } else { 0.6 }),
    );
    sim.run(1, 398);
    assert_eq!(sim.actions(), []);
    sim.run(399, 1000);
    // Every sample of (99 s, 399 s] shows 0.2 busy per shard: one shard takes it all at 0.6.
    assert_eq!(
        sim.actions(),
        [(
            399,
            Action::ScaleTo {
                from: 3,
                replicas: 1
            }
        )]
    );
    let d = &sim.log[0].1;
    assert_eq!(d.reason, Reason::Headroom);
    assert_close(d.figure, 0.6 / 3.0);
    assert_close(d.threshold, 0.6 * 0.9);
}

#[test]
fn scale_down_stops_at_min_replicas() {
    let mut sim = Sim::new(3, 2, 4, ReplicasOwner::Policy, spread(|_| 0.3));
    sim.run(1, 1000);
    assert_eq!(
        sim.actions(),
        [(
            300,
            Action::ScaleTo {
                from: 3,
                replicas: 2
            }
        )]
    );
}

#[test]
fn kernel_drop_bursts_change_replicas_at_most_once_per_cooldown() {
    // Drops every other second whatever the replica count: the worst case for flapping.
    let mut sim = Sim::new(
        1,
        1,
        10,
        ReplicasOwner::Policy,
        Box::new(|t, _, _| shard(t % 2, 0.5)),
    );
    sim.run(1, 100);
    // Each change holds from the next round; the cooldown counts from there.
    assert_eq!(
        sim.actions(),
        [
            (
                1,
                Action::ScaleTo {
                    from: 1,
                    replicas: 2
                }
            ),
            (
                33,
                Action::ScaleTo {
                    from: 2,
                    replicas: 3
                }
            ),
            (
                65,
                Action::ScaleTo {
                    from: 3,
                    replicas: 4
                }
            ),
            (
                97,
                Action::ScaleTo {
                    from: 4,
                    replicas: 5
                }
            ),
        ]
    );
}

#[test]
fn an_overloaded_pipeline_at_max_replicas_is_reported_once_per_interval_not_rescaled() {
    let mut sim = Sim::new(
        2,
        1,
        2,
        ReplicasOwner::Policy,
        spread(|t| if t < 10 { 1.0 } else { 3.0 }),
    );
    sim.run(1, 200);
    let at_max = Action::AtMaxReplicas {
        replicas: 2,
        wanted: 4,
        cause: Reason::KernelDrops,
    };
    assert_eq!(
        sim.actions(),
        [
            (10, at_max.clone()),
            (70, at_max.clone()),
            (130, at_max.clone()),
            (190, at_max)
        ]
    );
    assert_eq!(sim.log[0].1.reason, Reason::AtMaxReplicas);
    assert_close(sim.log[0].1.figure, 4.0);
    assert_close(sim.log[0].1.threshold, 2.0);
    assert_eq!(
        sim.last_degraded.reasons,
        [DegradedReason::AtMaxReplicas, DegradedReason::KernelDrops]
    );
    assert_eq!(
        sim.last_degraded.primary().map(DegradedReason::as_str),
        Some("AtMaxReplicas")
    );
}

#[test]
fn a_full_socket_never_steps_a_stream_down() {
    // The shard overflows (at max replicas); the stream sees the kernel's drops as loss.
    let mut sim = Sim::new(
        1,
        1,
        1,
        ReplicasOwner::Policy,
        Box::new(|_, _, _| shard(200, 1.0)),
    )
    .with_stream(Box::new(|_, _| stream(200, 200)));
    sim.run(1, 300);
    // Only the shard's overload is reported (at max replicas, once a minute); no step down.
    let at_max = Action::AtMaxReplicas {
        replicas: 1,
        wanted: 2,
        cause: Reason::KernelDrops,
    };
    assert_eq!(
        sim.actions(),
        [1, 61, 121, 181, 241].map(|t| (t, at_max.clone()))
    );
    assert!(
        !sim.last_degraded
            .reasons
            .contains(&DegradedReason::NetworkLoss)
    );
}

#[test]
fn loss_beyond_repair_on_a_healthy_shard_steps_the_stream_down_and_never_scales() {
    // From t=20 the path loses 5% and repair misses 2%; the path carries rendition 1 cleanly.
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(
        |t, rendition| {
            if t >= 20 && rendition == 0 {
                stream(50, 20)
            } else {
                stream(0, 0)
            }
        },
    ));
    sim.run(1, 25);
    assert_eq!(sim.last_degraded.reasons, [DegradedReason::NetworkLoss]);
    sim.run(26, 80);
    assert_eq!(
        sim.actions(),
        [(
            29,
            Action::StepDown {
                stream: CAM.into(),
                to_rendition: 1
            }
        )]
    );
    let d = &sim.log[0].1;
    assert_eq!(d.reason, Reason::NetworkLoss);
    assert_close(d.figure, 0.02);
    assert_close(d.threshold, 0.01);
}

#[test]
fn heavy_loss_that_repair_still_recovers_steps_down_past_the_loss_ceiling() {
    // 15% lost before repair, all recovered: past the 10% ceiling repair is about to give out.
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(
        |_, rendition| {
            if rendition == 0 {
                stream(150, 0)
            } else {
                stream(0, 0)
            }
        },
    ));
    sim.run(1, 30);
    assert_eq!(
        sim.actions(),
        [(
            10,
            Action::StepDown {
                stream: CAM.into(),
                to_rendition: 1
            }
        )]
    );
    assert_close(sim.log[0].1.figure, 0.15);
    assert_close(sim.log[0].1.threshold, 0.1);
}

#[test]
fn a_stream_steps_back_up_after_upgrade_after_of_health() {
    let mut sim =
        Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(|t, _| {
            if (20..=40).contains(&t) {
                stream(50, 20)
            } else {
                stream(0, 0)
            }
        }));
    sim.run(1, 300);
    // The path stays lossy at every rendition until t=40: down after each 10 s of loss; up
    // once (40 s, 100 s] is all healthy, and again only after another 60 s.
    assert_eq!(
        sim.actions(),
        [
            (
                29,
                Action::StepDown {
                    stream: CAM.into(),
                    to_rendition: 1
                }
            ),
            (
                39,
                Action::StepDown {
                    stream: CAM.into(),
                    to_rendition: 2
                }
            ),
            (
                100,
                Action::StepUp {
                    stream: CAM.into(),
                    to_rendition: 1
                }
            ),
            (
                160,
                Action::StepUp {
                    stream: CAM.into(),
                    to_rendition: 0
                }
            ),
        ]
    );
    assert_eq!(sim.log[2].1.reason, Reason::Recovered);
    assert_close(sim.log[2].1.figure, 0.0);
    assert_close(sim.log[2].1.threshold, 0.01 * 0.9);
    assert!(!sim.last_degraded.is_degraded());
}

#[test]
fn loss_oscillating_around_the_threshold_changes_nothing() {
    // Unrecovered loss alternates 1.2% and exactly 1% each second: never above 1% for a whole
    // window, never at or below the 0.9% band for a minute. The stream sits mid-ladder, free
    // to move either way.
    let mut sim =
        Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(|t, _| {
            if t % 2 == 0 {
                stream(30, 12)
            } else {
                stream(30, 10)
            }
        }));
    sim.signals.streams[0].rendition = 1;
    sim.run(1, 600);
    assert_eq!(sim.actions(), []);
}

#[test]
fn loss_switching_on_and_off_steps_at_most_once_per_window() {
    // 15 s of loss beyond repair, 15 s clean, repeated for ten minutes, whatever the rendition.
    let mut sim =
        Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(|t, _| {
            if t >= 20 && (t - 20) % 30 < 15 {
                stream(50, 20)
            } else {
                stream(0, 0)
            }
        }));
    sim.run(1, 600);
    // Down once per lossy spell until the ladder's end; never up, since no minute is clean.
    assert_eq!(
        sim.actions(),
        [
            (
                29,
                Action::StepDown {
                    stream: CAM.into(),
                    to_rendition: 1
                }
            ),
            (
                59,
                Action::StepDown {
                    stream: CAM.into(),
                    to_rendition: 2
                }
            ),
        ]
    );
    let times: Vec<u64> = sim.log.iter().map(|(t, _)| *t).collect();
    assert!(
        times
            .windows(2)
            .all(|w| w[1] - w[0] >= ladder().downgrade_window.as_secs())
    );
}

#[test]
fn stale_data_takes_no_action_and_is_reported() {
    // Both shards report low load until t=50, then nothing: without the gap they would scale
    // down at t=300.
    let mut sim = Sim::new(
        2,
        1,
        4,
        ReplicasOwner::Policy,
        Box::new(|t, _, _| if t <= 50 { shard(0, 0.1) } else { None }),
    );
    sim.run(1, 200);
    let stale = Action::SignalsStale {
        shards: vec![0, 1],
        streams: vec![],
    };
    assert_eq!(
        sim.actions(),
        [(61, stale.clone()), (121, stale.clone()), (181, stale)]
    );
    let d = &sim.log[0].1;
    assert_eq!(d.reason, Reason::SignalsStale);
    assert_close(d.figure, 11.0);
    assert_close(d.threshold, 10.0);
    assert_eq!(sim.last_degraded.reasons, [DegradedReason::SignalsStale]);
    sim.run(201, 1000);
    assert!(sim.log.iter().all(|(_, d)| !d.is_change()));
}

#[test]
fn stale_drops_are_not_acted_on() {
    // The newest reading the caller has shows drops but is 11 s old (the agent fell silent):
    // old drops scale nothing.
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, Box::new(|_, _, _| None));
    sim.signals.shards.push(ShardSignals {
        shard: 0,
        samples: vec![ShardSample {
            at: Duration::ZERO,
            ..shard(500, 1.0).unwrap()
        }],
    });
    sim.run(11, 100);
    let stale = Action::SignalsStale {
        shards: vec![0],
        streams: vec![],
    };
    assert_eq!(sim.actions(), [(11, stale.clone()), (71, stale)]);
    assert_eq!(sim.last_degraded.reasons, [DegradedReason::SignalsStale]);
}

#[test]
fn missing_figures_are_never_read_as_no_loss() {
    // The pod answers but the node agent does not (no kernel drop counts), and the stream's
    // unrecovered count is missing: no scale-down, no step up, and the gap is reported.
    let mut sim = Sim::new(
        2,
        1,
        4,
        ReplicasOwner::Policy,
        Box::new(|_, _, _| {
            Some(ShardSample {
                at: Duration::ZERO,
                kernel_drops: None,
                busy: Some(0.1),
            })
        }),
    )
    .with_stream(Box::new(|_, _| {
        Some(StreamSample {
            packets_unrecovered: None,
            ..stream(0, 0).unwrap()
        })
    }));
    sim.signals.streams[0].rendition = 1;
    sim.run(1, 400);
    let stale = Action::SignalsStale {
        shards: vec![0, 1],
        streams: vec![CAM.into()],
    };
    assert_eq!(
        sim.actions(),
        [
            (12, stale.clone()),
            (72, stale.clone()),
            (132, stale.clone()),
            (192, stale.clone()),
            (252, stale.clone()),
            (312, stale.clone()),
            (372, stale)
        ]
    );
    assert_eq!(sim.last_degraded.reasons, [DegradedReason::SignalsStale]);
}

#[test]
fn hpa_owned_replicas_are_reported_never_written() {
    let mut sim = Sim::new(
        1,
        1,
        4,
        ReplicasOwner::External,
        spread(|t| if t < 100 { 0.5 } else { 1.2 }),
    );
    sim.run(1, 250);
    let would = Action::WouldScaleTo {
        from: 1,
        replicas: 2,
    };
    assert_eq!(
        sim.actions(),
        [(100, would.clone()), (160, would.clone()), (220, would)]
    );
    assert_eq!(sim.log[0].1.reason, Reason::KernelDrops);
    assert_eq!(sim.signals.replicas, 1);
    assert!(sim.log.iter().all(|(_, d)| !d.is_change()));
}

#[test]
fn a_replica_change_by_another_owner_restarts_the_windows() {
    // An HPA scales 3 -> 4 at t=200; headroom must then last a full window on the new layout.
    let mut sim = Sim::new(3, 1, 4, ReplicasOwner::External, spread(|_| 0.3));
    sim.run(1, 199);
    assert_eq!(sim.actions(), []);
    sim.signals.replicas = 4;
    sim.run(200, 600);
    // 0.075 busy per shard: one shard would take it all.
    let would = Action::WouldScaleTo {
        from: 4,
        replicas: 1,
    };
    assert_eq!(sim.actions(), [(500, would.clone()), (560, would)]);
}

#[test]
fn without_a_bitrate_policy_no_stream_is_stepped() {
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard())
        .with_stream(Box::new(|_, _| stream(50, 20)));
    sim.pipeline.bitrate = None;
    sim.run(1, 100);
    assert_eq!(sim.actions(), []);
    assert_eq!(sim.last_degraded.reasons, [DegradedReason::NetworkLoss]);
}

#[test]
fn a_rendition_group_steps_along_its_own_sources_not_the_pipelines_ladder() {
    // A camera's main and sub stream: two steps, whatever the pipeline's
    // TMMBR ladder holds (three renditions here). The sub stream's path is
    // clean, so once it is active the group stays there until upgrade_after
    // of health, then goes back to the main stream.
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard()).with_stream(Box::new(|t, rendition| {
        if rendition == 0 && (20..=60).contains(&t) {
            stream(300, 50)
        } else {
            stream(0, 0)
        }
    }));
    sim.signals.streams[0].ladder_steps = Some(2);
    sim.run(1, 200);
    assert_eq!(
        sim.actions(),
        [
            (29, Action::StepDown { stream: CAM.into(), to_rendition: 1 }),
            // upgrade_after (60 s) of health on the sub stream; the main
            // stream's loss ended at 60, so the group stays up.
            (89, Action::StepUp { stream: CAM.into(), to_rendition: 0 }),
        ]
    );
    // Never past the group's last source, though the pipeline's ladder has three.
    assert!(sim.actions().iter().all(|(_, a)| !matches!(a, Action::StepDown { to_rendition: 2, .. })));
}

#[test]
fn a_rendition_group_goes_back_up_only_once_the_higher_renditions_own_path_is_healthy() {
    // The main stream (rendition 0) loses until t=80; the sub stream never.
    // On the sub stream the group sees the main stream's samples too
    // (received, not decoded): it stays down while they show loss.
    let main = |t: u64| if (20..80).contains(&t) { stream(300, 50) } else { stream(0, 0) };
    let mut sim = Sim::new(1, 1, 4, ReplicasOwner::Policy, healthy_shard())
        .with_stream(Box::new(move |t, rendition| if rendition == 0 { main(t) } else { stream(0, 0) }));
    sim.signals.streams[0].ladder_steps = Some(2);
    for t in 1..=250 {
        let stream = &mut sim.signals.streams[0];
        if stream.rendition == 1 {
            if let Some(sample) = main(t) {
                stream.upper_samples.push(StreamSample { at: Duration::from_secs(t), ..sample });
            }
        } else {
            stream.upper_samples.clear();
        }
        sim.round(t);
    }
    assert_eq!(
        sim.actions(),
        [
            (29, Action::StepDown { stream: CAM.into(), to_rendition: 1 }),
            // The main stream's last lossy second is 79: 60 s of its health
            // (upgrade_after) end at 139, not 89.
            (139, Action::StepUp { stream: CAM.into(), to_rendition: 0 }),
        ]
    );
}
