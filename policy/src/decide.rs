//! The policy's one entry point: [`decide`] joins the capacity and path cures,
//! applies the stabilization rules (cooldown, one owner of replicas,
//! report-only outcomes at most once per interval), marks stale data, and
//! summarises the pipeline's health for its `Degraded` condition.

use std::time::Duration;

use crate::bitrate;
use crate::capacity::{self, Proposal};
use crate::decision::{Action, Decision, Degraded, DegradedReason, Reason};
use crate::settings::{Pipeline, ReplicasOwner, Settings};
use crate::signals::{self, Signals, Timestamp};
use crate::state::{PolicyState, StreamMemory};

/// What one evaluation yields: the decisions (changes to carry out and
/// outcomes to report, in that order), the pipeline's health now, and the
/// state to pass to the next call.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub decisions: Vec<Decision>,
    pub degraded: Degraded,
    pub state: PolicyState,
}

/// Evaluates one pipeline at `now`: a pure function of the settings, the
/// pipeline's spec, the signal window and the previous state.
///
/// Call it on every collection round (every 1-2 s for a 5 s reaction) with
/// the state the previous call returned (or `PolicyState::default()` the first
/// time), carry out the changes (`ScaleTo`, `StepDown`, `StepUp`), report every
/// decision (Event, metric), and set `Degraded` from [`Verdict::degraded`].
pub fn decide(
    settings: &Settings,
    pipeline: &Pipeline,
    signals: &Signals,
    state: &PolicyState,
    now: Timestamp,
) -> Verdict {
    let mut next = state.clone();
    let started = *next.started.get_or_insert(now);
    if next.replicas.is_some_and(|seen| seen != signals.replicas) {
        next.replicas_changed = Some(now);
    }
    next.replicas = Some(signals.replicas);
    next.streams
        .retain(|name, _| signals.streams.iter().any(|s| &s.stream == name));
    for stream in &signals.streams {
        next.streams
            .entry(stream.stream.clone())
            .or_insert(StreamMemory {
                first_seen: now,
                last_step: None,
            });
    }

    let mut decisions = Vec::new();
    let mut reports = Vec::new();
    let mut degraded = Degraded::default();

    current_health(settings, signals, now, &mut degraded);
    capacity_decision(
        settings,
        pipeline,
        signals,
        &mut next,
        now,
        &mut decisions,
        &mut reports,
        &mut degraded,
    );
    if let Some(ladder) = &pipeline.bitrate {
        for stream in &signals.streams {
            let last_step = next.last_step(&stream.stream);
            let shard = signals.shard(stream.shard);
            if let Some(step) = bitrate::propose(settings, ladder, stream, shard, last_step, now) {
                let name = stream.stream.clone();
                let action = if step.down {
                    Action::StepDown {
                        stream: name.clone(),
                        to_rendition: step.to_rendition,
                    }
                } else {
                    Action::StepUp {
                        stream: name.clone(),
                        to_rendition: step.to_rendition,
                    }
                };
                decisions.push(Decision {
                    action,
                    reason: step.reason,
                    figure: step.figure,
                    threshold: step.threshold,
                });
                if let Some(memory) = next.streams.get_mut(&name) {
                    memory.last_step = Some(now);
                }
            }
        }
    }
    stale_signals(
        settings,
        signals,
        &next,
        started,
        now,
        &mut reports,
        &mut degraded,
    );

    // Report-only outcomes repeat at most once per interval while they persist.
    for report in reports {
        let key = report.action.as_str();
        if next.report_due(key, now, settings.report_interval) {
            next.reported.insert(key.to_string(), now);
            decisions.push(report);
        }
    }
    Verdict {
        decisions,
        degraded,
        state: next,
    }
}

/// Degraded reasons from the newest fresh sample of each shard and stream.
/// Loss on a stream whose shard overflows or saturates is that shard's
/// problem (a full socket shows as loss); otherwise it is the path's.
fn current_health(settings: &Settings, signals: &Signals, now: Timestamp, degraded: &mut Degraded) {
    let shard_overload = |k: u32| {
        signals
            .shard(k)
            .and_then(|s| signals::fresh(&s.samples, now, settings.stale_after))
            .map(|r| capacity::overload(settings, &r))
    };
    for k in 0..signals.replicas {
        match shard_overload(k) {
            Some(Some(Reason::KernelDrops)) => degraded.add(DegradedReason::KernelDrops),
            Some(Some(_)) => degraded.add(DegradedReason::ShardSaturated),
            _ => {}
        }
    }
    for stream in &signals.streams {
        let Some(r) = signals::fresh(&stream.samples, now, settings.stale_after) else {
            continue;
        };
        if (r.unrecovered > 0 || r.frames_dropped > 0) && shard_overload(stream.shard) == Some(None)
        {
            degraded.add(DegradedReason::NetworkLoss);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn capacity_decision(
    settings: &Settings,
    pipeline: &Pipeline,
    signals: &Signals,
    state: &mut PolicyState,
    now: Timestamp,
    decisions: &mut Vec<Decision>,
    reports: &mut Vec<Decision>,
    degraded: &mut Degraded,
) {
    let Some(proposal) = capacity::propose(settings, signals, state.replicas_changed, now) else {
        return;
    };
    let bounds = &pipeline.scaling;
    let n = signals.replicas;
    let (target, reason, figure, threshold) = match proposal {
        Proposal::Up {
            wanted,
            reason,
            figure,
            threshold,
        } => {
            if n >= bounds.max() {
                degraded.add(DegradedReason::AtMaxReplicas);
                if !cooling_down(settings, state, now) {
                    reports.push(Decision {
                        action: Action::AtMaxReplicas {
                            replicas: n,
                            wanted,
                            cause: reason,
                        },
                        reason: Reason::AtMaxReplicas,
                        figure: f64::from(wanted),
                        threshold: f64::from(bounds.max()),
                    });
                }
                return;
            }
            (bounds.clamp(wanted), reason, figure, threshold)
        }
        Proposal::Down {
            wanted,
            figure,
            threshold,
        } => (bounds.clamp(wanted), Reason::Headroom, figure, threshold),
    };
    // Bounds may leave nothing to do (down at minReplicas, up while above max).
    let up = matches!(proposal, Proposal::Up { .. });
    if target == n
        || (up && target < n)
        || (!up && target > n)
        || cooling_down(settings, state, now)
    {
        return;
    }
    match bounds.owner {
        ReplicasOwner::Policy => {
            decisions.push(Decision {
                action: Action::ScaleTo {
                    from: n,
                    replicas: target,
                },
                reason,
                figure,
                threshold,
            });
            state.replicas_changed = Some(now);
        }
        ReplicasOwner::External => reports.push(Decision {
            action: Action::WouldScaleTo {
                from: n,
                replicas: target,
            },
            reason,
            figure,
            threshold,
        }),
    }
}

fn cooling_down(settings: &Settings, state: &PolicyState, now: Timestamp) -> bool {
    state
        .replicas_changed
        .is_some_and(|at| now < at + settings.cooldown)
}

/// Shards `0..replicas` and streams whose newest complete sample is older than
/// the staleness limit. Data never received counts from when it was first
/// expected (the policy's start, the last replica change, the stream's first
/// appearance), so a pod that is still starting is not yet stale.
fn stale_signals(
    settings: &Settings,
    signals: &Signals,
    state: &PolicyState,
    started: Timestamp,
    now: Timestamp,
    reports: &mut Vec<Decision>,
    degraded: &mut Degraded,
) {
    let expected_since = state.replicas_changed.unwrap_or(started);
    let stale = |age: Option<Duration>, since: Timestamp| match age {
        Some(age) => (age > settings.stale_after).then_some(age.as_secs_f64()),
        None => (now.saturating_sub(since) > settings.stale_after).then_some(f64::INFINITY),
    };
    let mut worst: f64 = 0.0;
    let mut shards = Vec::new();
    for k in 0..signals.replicas {
        let age = signals.shard(k).and_then(|s| signals::age(&s.samples, now));
        if let Some(a) = stale(age, expected_since) {
            shards.push(k);
            worst = worst.max(a);
        }
    }
    let mut streams = Vec::new();
    for stream in &signals.streams {
        let since = state
            .streams
            .get(&stream.stream)
            .map_or(now, |m| m.first_seen)
            .max(expected_since);
        if let Some(a) = stale(signals::age(&stream.samples, now), since) {
            streams.push(stream.stream.clone());
            worst = worst.max(a);
        }
    }
    if shards.is_empty() && streams.is_empty() {
        return;
    }
    degraded.add(DegradedReason::SignalsStale);
    reports.push(Decision {
        action: Action::SignalsStale { shards, streams },
        reason: Reason::SignalsStale,
        figure: worst,
        threshold: settings.stale_after.as_secs_f64(),
    });
}
