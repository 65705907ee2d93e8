//! The capacity cure: how many replicas the shards' load calls for. Kernel
//! receive-buffer drops or a saturated worker on any shard ask for more;
//! headroom on every shard for the whole scale-down window allows fewer.
//! Stabilization (cooldown, who owns replicas, reporting) is `decide`'s job;
//! this file only proposes.

use crate::decision::Reason;
use crate::settings::Settings;
use crate::signals::{self, ShardReading, Signals, Timestamp};

/// What the shards' load calls for, before bounds, cooldown and ownership.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Proposal {
    /// More replicas: `wanted` is unbounded by `maxReplicas`, so that the
    /// caller can report how far short the bounds fall.
    Up {
        wanted: u32,
        reason: Reason,
        figure: f64,
        threshold: f64,
    },
    /// Fewer replicas, not below 1 (the caller applies `minReplicas`).
    Down {
        wanted: u32,
        figure: f64,
        threshold: f64,
    },
}

/// Why one reading shows an overloaded shard, if it does.
pub(crate) fn overload(settings: &Settings, r: &ShardReading) -> Option<Reason> {
    if r.kernel_drops > settings.kernel_drops_allowed {
        Some(Reason::KernelDrops)
    } else if r.busy >= settings.busy_saturated {
        Some(Reason::ShardSaturated)
    } else {
        None
    }
}

/// `ceil`, forgiving the rounding error of a ratio that should be whole.
fn ceil(x: f64) -> u32 {
    (x - 1e-9).ceil().max(0.0) as u32
}

pub(crate) fn propose(
    settings: &Settings,
    signals: &Signals,
    last_change: Option<Timestamp>,
    now: Timestamp,
) -> Option<Proposal> {
    let n = signals.replicas;
    if n == 0 {
        return None;
    }
    propose_up(settings, signals, last_change, now)
        .or_else(|| propose_down(settings, signals, last_change, now))
}

/// More replicas when any shard is overloaded throughout the scale-up window
/// (with the default zero window: in its newest fresh sample). Shards without
/// fresh data neither add nor veto evidence: drops seen elsewhere are real.
fn propose_up(
    settings: &Settings,
    signals: &Signals,
    last_change: Option<Timestamp>,
    now: Timestamp,
) -> Option<Proposal> {
    let n = signals.replicas;
    let mut drops: Option<u64> = None;
    let mut saturated: Option<f64> = None;
    let (mut busy_sum, mut fresh) = (0.0, 0u32);
    for shard in (0..n).filter_map(|k| signals.shard(k)) {
        let Some(readings) = signals::window(
            &shard.samples,
            now,
            settings.scale_up_window,
            settings.stale_after,
            last_change,
        ) else {
            continue;
        };
        let newest = readings[readings.len() - 1];
        busy_sum += newest.busy;
        fresh += 1;
        if !readings.iter().all(|r| overload(settings, r).is_some()) {
            continue;
        }
        match overload(settings, &newest) {
            Some(Reason::KernelDrops) => drops = drops.max(Some(newest.kernel_drops)),
            _ => saturated = Some(saturated.map_or(newest.busy, |b: f64| b.max(newest.busy))),
        }
    }
    let (reason, figure, threshold) = match (drops, saturated) {
        (Some(d), _) => (
            Reason::KernelDrops,
            d as f64,
            settings.kernel_drops_allowed as f64,
        ),
        (None, Some(b)) => (Reason::ShardSaturated, b, settings.busy_saturated),
        (None, None) => return None,
    };
    // As the HPA: replicas in proportion to the mean load over the target, at
    // least one more, and at most double per change (its default 100% policy).
    let by_load = ceil(f64::from(n) * (busy_sum / f64::from(fresh)) / settings.busy_target);
    let wanted = by_load.max(n + 1).min(n.saturating_mul(2));
    Some(Proposal::Up {
        wanted,
        reason,
        figure,
        threshold,
    })
}

/// Fewer replicas when every shard has samples covering the whole scale-down
/// window since the last change, none shows a kernel drop, and the highest
/// busy ratio stays below the target by the tolerance; as many fewer as
/// keep the busiest shard's load, spread over the rest, at the target.
fn propose_down(
    settings: &Settings,
    signals: &Signals,
    last_change: Option<Timestamp>,
    now: Timestamp,
) -> Option<Proposal> {
    let n = signals.replicas;
    let mut peak: f64 = 0.0;
    for k in 0..n {
        let shard = signals.shard(k)?;
        let readings = signals::window(
            &shard.samples,
            now,
            settings.scale_down_window,
            settings.stale_after,
            last_change,
        )?;
        for r in readings {
            if r.kernel_drops > 0 {
                return None;
            }
            peak = peak.max(r.busy);
        }
    }
    let limit = settings.busy_target * (1.0 - settings.tolerance);
    if peak > limit {
        return None;
    }
    let wanted = ceil(f64::from(n) * peak / settings.busy_target).max(1);
    (wanted < n).then_some(Proposal::Down {
        wanted,
        figure: peak,
        threshold: limit,
    })
}
