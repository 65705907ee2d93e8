//! The signals the policy reads: timestamped samples per shard and per stream,
//! as the operator collects them from the node agents and the data-plane pods,
//! and how a window of them is read.
//!
//! Every count is a delta over the interval that ends at the sample's `at`.
//! A figure the caller could not get (a scrape failed, an agent did not answer)
//! is `None`, and a sample that is too old is stale: neither is ever read as
//! "no loss". A window is only used when samples cover all of it.

use std::time::Duration;

/// Time since an origin the caller fixes (the operator's start, say). All
/// timestamps of one pipeline, and `now`, use the same origin.
pub type Timestamp = Duration;

/// What the caller observed of one pipeline: the replica count running now and
/// recent samples of each shard and stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// Replicas (shards) running now: the StatefulSet's `spec.replicas`.
    pub replicas: u32,
    /// Samples per shard. Shards `0..replicas` are expected; one without an
    /// entry is missing data. Entries for ordinals at or above `replicas`
    /// (pods still draining after a scale-down) are ignored.
    pub shards: Vec<ShardSignals>,
    /// Samples per stream of the pipeline.
    pub streams: Vec<StreamSignals>,
}

impl Signals {
    pub(crate) fn shard(&self, shard: u32) -> Option<&ShardSignals> {
        self.shards.iter().find(|s| s.shard == shard)
    }
}

/// The samples of one shard (data-plane pod), oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardSignals {
    /// The shard's ordinal (the StatefulSet pod's index).
    pub shard: u32,
    /// Samples in time order, oldest first, covering at least the longest
    /// window in use ([`crate::Settings::history`]).
    pub samples: Vec<ShardSample>,
}

/// One shard's load over the interval ending at `at`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardSample {
    /// When the figures were measured (not when a cache was read), the older
    /// of the agent's and the pod's when they differ.
    pub at: Timestamp,
    /// Packets the kernel dropped because a socket's receive buffer of this
    /// shard was full (drop reason `SOCKET_RCVBUFF`, or the `/proc/net/udp`
    /// drops column), summed over the shard's sockets, FEC ports included.
    /// `None` when the node agent did not answer.
    pub kernel_drops: Option<u64>,
    /// How busy the shard's busiest worker thread was: time spent on packets
    /// over time spent, 0 to 1. `None` when the pod did not answer.
    pub busy: Option<f64>,
}

/// A shard sample with every figure present.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ShardReading {
    pub kernel_drops: u64,
    pub busy: f64,
}

impl ShardSample {
    /// The figures, when all are present; a busy ratio that is not a number
    /// counts as missing, one past 1 (timer jitter) as 1.
    pub(crate) fn reading(&self) -> Option<ShardReading> {
        let busy = self.busy.filter(|b| !b.is_nan())?.clamp(0.0, 1.0);
        Some(ShardReading {
            kernel_drops: self.kernel_drops?,
            busy,
        })
    }
}

/// The samples of one stream, and where it stands now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamSignals {
    /// The source's name in the spec.
    pub stream: String,
    /// The shard that owns the stream now.
    pub shard: u32,
    /// The rendition the stream is asked to send now: an index into the
    /// ladder, 0 being the highest bitrate (where every stream starts).
    pub rendition: usize,
    /// How many steps this stream's own ladder has, when it is not the
    /// pipeline's bitrate ladder: a rendition group (`renditionOf`), whose
    /// steps are its sources, main first. The caller then gives the group as
    /// one stream named after its main source, with the active rendition's
    /// samples. `None`: the pipeline's ladder (`BitrateLadder::renditions`).
    pub ladder_steps: Option<usize>,
    /// For a rendition group below its top: the samples of the rendition one
    /// step up, which is received and repaired while not decoded. A step up
    /// then also needs them healthy for the whole upgrade window, so a group
    /// never goes back to a stream whose path still loses. Empty otherwise.
    pub upper_samples: Vec<StreamSample>,
    /// Samples in time order, oldest first.
    pub samples: Vec<StreamSample>,
}

/// One stream's loss and repair over the interval ending at `at`, as the
/// owning pod counts them. `None` where the pod did not answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamSample {
    /// When the figures were measured.
    pub at: Timestamp,
    /// RTP packets received (retransmissions and FEC-recovered packets not
    /// included).
    pub packets_received: Option<u64>,
    /// RTP packets lost on the network, before repair.
    pub packets_lost: Option<u64>,
    /// Lost packets that neither NACK/RTX nor FEC recovered in time.
    pub packets_unrecovered: Option<u64>,
    /// Frames that could not be decoded whole and in order.
    pub frames_dropped: Option<u64>,
}

/// A stream sample with every figure present.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StreamReading {
    pub received: u64,
    pub lost: u64,
    pub unrecovered: u64,
    pub frames_dropped: u64,
}

impl StreamSample {
    pub(crate) fn reading(&self) -> Option<StreamReading> {
        Some(StreamReading {
            received: self.packets_received?,
            lost: self.packets_lost?,
            unrecovered: self.packets_unrecovered?,
            frames_dropped: self.frames_dropped?,
        })
    }
}

impl StreamReading {
    /// Packets the sender sent: those received plus those the network lost.
    pub fn expected(&self) -> u64 {
        self.received.saturating_add(self.lost)
    }
}

/// Anything with a timestamp and a set of figures that may be incomplete.
pub(crate) trait Sample {
    type Reading: Copy;
    fn at(&self) -> Timestamp;
    fn reading(&self) -> Option<Self::Reading>;
}

impl Sample for ShardSample {
    type Reading = ShardReading;
    fn at(&self) -> Timestamp {
        self.at
    }
    fn reading(&self) -> Option<ShardReading> {
        ShardSample::reading(self)
    }
}

impl Sample for StreamSample {
    type Reading = StreamReading;
    fn at(&self) -> Timestamp {
        self.at
    }
    fn reading(&self) -> Option<StreamReading> {
        StreamSample::reading(self)
    }
}

/// The newest complete reading, if it is no older than `stale_after`.
pub(crate) fn fresh<S: Sample>(
    samples: &[S],
    now: Timestamp,
    stale_after: Duration,
) -> Option<S::Reading> {
    let last = samples.last()?;
    let reading = last.reading()?;
    (now.saturating_sub(last.at()) <= stale_after).then_some(reading)
}

/// How old the newest complete reading is; `None` when there is none at all.
/// A newest sample with a missing figure makes the data as old as the last
/// complete one: a failed scrape is not fresh data.
pub(crate) fn age<S: Sample>(samples: &[S], now: Timestamp) -> Option<Duration> {
    samples
        .iter()
        .rev()
        .find(|s| s.reading().is_some())
        .map(|s| now.saturating_sub(s.at()))
}

/// The complete readings covering `(now - length, now]`, or `None` when the
/// samples do not cover all of it: a gap longer than `max_gap` (between the
/// window's start, the samples and `now`), a missing figure, samples out of
/// order, or a window reaching back before `not_before` (a change whose
/// effect the older samples do not show). A zero-length window is the newest
/// reading, if fresh.
pub(crate) fn window<S: Sample>(
    samples: &[S],
    now: Timestamp,
    length: Duration,
    max_gap: Duration,
    not_before: Option<Timestamp>,
) -> Option<Vec<S::Reading>> {
    if length.is_zero() {
        return fresh(samples, now, max_gap).map(|r| vec![r]);
    }
    let start = now.checked_sub(length)?;
    if not_before.is_some_and(|t| t > start) {
        return None;
    }
    let inside: Vec<&S> = samples
        .iter()
        .filter(|s| s.at() > start && s.at() <= now)
        .collect();
    let mut previous = start;
    let mut readings = Vec::with_capacity(inside.len());
    for s in &inside {
        if s.at() < previous || s.at() - previous > max_gap {
            return None;
        }
        readings.push(s.reading()?);
        previous = s.at();
    }
    if now - previous > max_gap || readings.is_empty() {
        return None;
    }
    Some(readings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: u64, drops: Option<u64>) -> ShardSample {
        ShardSample {
            at: Duration::from_secs(at),
            kernel_drops: drops,
            busy: Some(0.5),
        }
    }
    const GAP: Duration = Duration::from_secs(2);

    #[test]
    fn a_covered_window_yields_every_reading_in_it() {
        let samples: Vec<_> = (0..=10).map(|t| s(t, Some(t))).collect();
        let w = window(
            &samples,
            Duration::from_secs(10),
            Duration::from_secs(5),
            GAP,
            None,
        )
        .unwrap();
        assert_eq!(
            w.iter().map(|r| r.kernel_drops).collect::<Vec<_>>(),
            vec![6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn a_window_with_a_missing_figure_is_not_covered() {
        let mut samples: Vec<_> = (0..=10).map(|t| s(t, Some(0))).collect();
        samples[8].kernel_drops = None;
        assert_eq!(
            window(
                &samples,
                Duration::from_secs(10),
                Duration::from_secs(5),
                GAP,
                None
            ),
            None
        );
    }

    #[test]
    fn a_window_with_a_gap_or_older_than_the_history_is_not_covered() {
        let samples = vec![s(4, Some(0)), s(10, Some(0))];
        assert_eq!(
            window(
                &samples,
                Duration::from_secs(10),
                Duration::from_secs(8),
                GAP,
                None
            ),
            None
        );
        let recent: Vec<_> = (8..=10).map(|t| s(t, Some(0))).collect();
        assert_eq!(
            window(
                &recent,
                Duration::from_secs(10),
                Duration::from_secs(8),
                GAP,
                None
            ),
            None
        );
    }

    #[test]
    fn a_window_reaching_back_before_a_change_is_not_used() {
        let samples: Vec<_> = (0..=10).map(|t| s(t, Some(0))).collect();
        let now = Duration::from_secs(10);
        assert_eq!(
            window(
                &samples,
                now,
                Duration::from_secs(5),
                GAP,
                Some(Duration::from_secs(7))
            ),
            None
        );
        assert!(
            window(
                &samples,
                now,
                Duration::from_secs(5),
                GAP,
                Some(Duration::from_secs(5))
            )
            .is_some()
        );
    }

    #[test]
    fn a_zero_window_is_the_newest_reading_only_while_fresh() {
        let samples = vec![s(1, Some(3)), s(2, Some(7))];
        assert_eq!(
            window(&samples, Duration::from_secs(3), Duration::ZERO, GAP, None).unwrap()[0]
                .kernel_drops,
            7
        );
        assert_eq!(
            window(&samples, Duration::from_secs(5), Duration::ZERO, GAP, None),
            None
        );
    }

    #[test]
    fn a_busy_ratio_that_is_not_a_number_is_missing() {
        let sample = ShardSample {
            at: Duration::ZERO,
            kernel_drops: Some(0),
            busy: Some(f64::NAN),
        };
        assert_eq!(sample.reading(), None);
        let over = ShardSample {
            busy: Some(1.02),
            ..sample
        };
        assert_eq!(over.reading().unwrap().busy, 1.0);
    }
}
