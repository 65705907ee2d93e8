//! The path cure: when to step one stream down its bitrate ladder and when
//! back up. Down when, for the whole downgrade window, the stream loses more
//! than repair recovers while its shard is healthy (a full socket also shows
//! as loss, and a lower bitrate would not empty it); up after
//! `upgrade_after` of health. Both windows count only samples after the
//! stream's last step, so a stream changes at most once per window.

use crate::capacity::overload;
use crate::decision::Reason;
use crate::settings::{BitrateLadder, Settings};
use crate::signals::{self, ShardSignals, StreamReading, StreamSignals, Timestamp};

/// A step on the ladder, with its trigger.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Step {
    pub to_rendition: usize,
    pub down: bool,
    pub reason: Reason,
    pub figure: f64,
    pub threshold: f64,
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Loss beyond repair: unrecovered packets above the ladder's limit, or loss
/// before repair so high that repair is about to give out.
fn beyond_repair(settings: &Settings, ladder: &BitrateLadder, r: &StreamReading) -> bool {
    r.expected() > 0
        && (ratio(r.unrecovered, r.expected()) > ladder.downgrade_unrecovered
            || ratio(r.lost, r.expected()) > settings.network_loss_ceiling)
}

/// Healthy: packets flowing, no frame dropped, and both loss figures below
/// their limits by the tolerance, so that loss hovering at a limit neither
/// steps down nor up.
fn healthy(settings: &Settings, ladder: &BitrateLadder, r: &StreamReading) -> bool {
    let keep = 1.0 - settings.tolerance;
    r.expected() > 0
        && r.frames_dropped == 0
        && ratio(r.unrecovered, r.expected()) <= ladder.downgrade_unrecovered * keep
        && ratio(r.lost, r.expected()) <= settings.network_loss_ceiling * keep
}

fn totals(readings: &[StreamReading]) -> (u64, u64, u64) {
    readings.iter().fold((0, 0, 0), |(e, l, u), r| {
        (e + r.expected(), l + r.lost, u + r.unrecovered)
    })
}

pub(crate) fn propose(
    settings: &Settings,
    ladder: &BitrateLadder,
    stream: &StreamSignals,
    shard: Option<&ShardSignals>,
    last_step: Option<Timestamp>,
    now: Timestamp,
) -> Option<Step> {
    // A rendition group steps between its sources; every other stream along
    // the pipeline's ladder. The thresholds and windows are the same.
    let ladder = &BitrateLadder { renditions: stream.ladder_steps.unwrap_or(ladder.renditions), ..*ladder };
    if ladder.renditions < 2 {
        return None;
    }
    // A rendition past the ladder's end (the ladder was shortened) reads as the lowest.
    let current = stream.rendition.min(ladder.renditions - 1);
    step_down(settings, ladder, stream, shard, current, last_step, now)
        .or_else(|| step_up(settings, ladder, stream, current, last_step, now))
}

fn step_down(
    settings: &Settings,
    ladder: &BitrateLadder,
    stream: &StreamSignals,
    shard: Option<&ShardSignals>,
    current: usize,
    last_step: Option<Timestamp>,
    now: Timestamp,
) -> Option<Step> {
    if current + 1 >= ladder.renditions {
        return None;
    }
    let readings = signals::window(
        &stream.samples,
        now,
        ladder.downgrade_window,
        settings.stale_after,
        last_step,
    )?;
    if !readings.iter().all(|r| beyond_repair(settings, ladder, r)) {
        return None;
    }
    // The shard must be known healthy over the same window: no data is no proof.
    let shard_readings = signals::window(
        &shard?.samples,
        now,
        ladder.downgrade_window,
        settings.stale_after,
        None,
    )?;
    if shard_readings
        .iter()
        .any(|r| overload(settings, r).is_some())
    {
        return None;
    }
    let (expected, lost, unrecovered) = totals(&readings);
    let unrecovered_share = ratio(unrecovered, expected);
    let (figure, threshold) = if unrecovered_share > ladder.downgrade_unrecovered {
        (unrecovered_share, ladder.downgrade_unrecovered)
    } else {
        (ratio(lost, expected), settings.network_loss_ceiling)
    };
    Some(Step {
        to_rendition: current + 1,
        down: true,
        reason: Reason::NetworkLoss,
        figure,
        threshold,
    })
}

fn step_up(
    settings: &Settings,
    ladder: &BitrateLadder,
    stream: &StreamSignals,
    current: usize,
    last_step: Option<Timestamp>,
    now: Timestamp,
) -> Option<Step> {
    if current == 0 {
        return None;
    }
    let readings = signals::window(
        &stream.samples,
        now,
        ladder.upgrade_after,
        settings.stale_after,
        last_step,
    )?;
    if !readings.iter().all(|r| healthy(settings, ladder, r)) {
        return None;
    }
    if !stream.upper_samples.is_empty() {
        let upper = signals::window(
            &stream.upper_samples,
            now,
            ladder.upgrade_after,
            settings.stale_after,
            last_step,
        )?;
        if !upper.iter().all(|r| healthy(settings, ladder, r)) {
            return None;
        }
    }
    let (expected, _, unrecovered) = totals(&readings);
    Some(Step {
        to_rendition: current - 1,
        down: false,
        reason: Reason::Recovered,
        figure: ratio(unrecovered, expected),
        threshold: ladder.downgrade_unrecovered * (1.0 - settings.tolerance),
    })
}
