//! What the policy outputs: decisions that change something (scale, step a
//! stream), report-only outcomes (at max replicas, would scale, signals
//! stale), each with its [`Reason`], figure and threshold; and the
//! [`Degraded`] summary for the pipeline's condition.
//!
//! The string forms are contracts: [`Reason::as_str`] and [`Action::as_str`]
//! are metric label values (`zerodrop_policy_decisions_total{action,reason}`),
//! [`DegradedReason::as_str`] is the `Degraded` condition's reason.

use std::fmt;

/// One outcome of the policy, with what triggered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
    /// The figure that triggered it, in the unit [`Reason`] documents.
    pub figure: f64,
    /// The threshold the figure crossed (for `headroom` and `recovered`: the
    /// level it stayed at or below).
    pub threshold: f64,
}

impl Decision {
    /// Whether the caller must act (write replicas, ask a sender for another
    /// bitrate); the others are only reported.
    pub fn is_change(&self) -> bool {
        matches!(
            self.action,
            Action::ScaleTo { .. } | Action::StepDown { .. } | Action::StepUp { .. }
        )
    }
}

/// What the policy decided or reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Set the replica count (the policy owns replicas).
    ScaleTo { from: u32, replicas: u32 },
    /// Report only: the policy would set this replica count, but another
    /// owner (kubectl scale, an HPA, KEDA) holds `spec.scaling.replicas`.
    WouldScaleTo { from: u32, replicas: u32 },
    /// Ask the stream's sender for a lower rendition (a higher ladder index).
    StepDown { stream: String, to_rendition: usize },
    /// Ask the stream's sender for the next higher rendition.
    StepUp { stream: String, to_rendition: usize },
    /// Report only: shards are overloaded and the pipeline already runs
    /// `maxReplicas`; `wanted` is the count the policy would have chosen and
    /// `cause` what overloads it (`kernel_drops` or `shard_saturated`).
    AtMaxReplicas {
        replicas: u32,
        wanted: u32,
        cause: Reason,
    },
    /// Report only: these shards and streams have no fresh data, so the policy
    /// takes no action that depends on them.
    SignalsStale {
        shards: Vec<u32>,
        streams: Vec<String>,
    },
}

impl Action {
    /// The `action` label value: `scale_to`, `would_scale_to`, `step_down`,
    /// `step_up`, `at_max_replicas` or `signals_stale`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::ScaleTo { .. } => "scale_to",
            Action::WouldScaleTo { .. } => "would_scale_to",
            Action::StepDown { .. } => "step_down",
            Action::StepUp { .. } => "step_up",
            Action::AtMaxReplicas { .. } => "at_max_replicas",
            Action::SignalsStale { .. } => "signals_stale",
        }
    }
}

/// Why the policy decided something. The figure and threshold of a
/// [`Decision`] are in the unit given here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// `kernel_drops`: a shard's sockets overflowed. Figure: kernel
    /// receive-buffer drops in the worst shard's newest sample; threshold:
    /// drops allowed per sample.
    KernelDrops,
    /// `shard_saturated`: a shard's busiest worker is near 100%. Figure: its
    /// busy ratio (0-1); threshold: the saturation level.
    ShardSaturated,
    /// `network_loss`: the path loses more than repair recovers. Figure: the
    /// unrecovered share of packets expected over the window (or, when repair
    /// kept up, the loss share before repair); threshold: the matching limit.
    NetworkLoss,
    /// `recovered`: a stream stayed healthy for `upgradeAfterSeconds`. Figure:
    /// its unrecovered share over that time; threshold: the level it stayed under.
    Recovered,
    /// `headroom`: every shard stayed well below the target for the whole
    /// scale-down window. Figure: the highest busy ratio seen; threshold: the
    /// level it stayed under.
    Headroom,
    /// `at_max_replicas`: more replicas are needed than `maxReplicas` allows.
    /// Figure: replicas wanted; threshold: `maxReplicas`.
    AtMaxReplicas,
    /// `signals_stale`: data is missing or old. Figure: age in seconds of the
    /// stalest signal (infinite when one never arrived); threshold: the
    /// staleness limit in seconds.
    SignalsStale,
}

impl Reason {
    /// The `reason` label value, lowercase: `kernel_drops`, `shard_saturated`,
    /// `network_loss`, `recovered`, `headroom`, `at_max_replicas`, `signals_stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KernelDrops => "kernel_drops",
            Reason::ShardSaturated => "shard_saturated",
            Reason::NetworkLoss => "network_loss",
            Reason::Recovered => "recovered",
            Reason::Headroom => "headroom",
            Reason::AtMaxReplicas => "at_max_replicas",
            Reason::SignalsStale => "signals_stale",
        }
    }

    /// Every reason, for creating label sets at zero.
    pub const ALL: [Reason; 7] = [
        Reason::KernelDrops,
        Reason::ShardSaturated,
        Reason::NetworkLoss,
        Reason::Recovered,
        Reason::Headroom,
        Reason::AtMaxReplicas,
        Reason::SignalsStale,
    ];
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Decision {
    /// A sentence for an Event message, e.g.
    /// `scale from 2 to 3 replicas: kernel_drops 120 above 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            Action::ScaleTo { from, replicas } => {
                write!(f, "scale from {from} to {replicas} replicas")?
            }
            Action::WouldScaleTo { from, replicas } => write!(
                f,
                "would scale from {from} to {replicas} replicas (replicas are set by another owner)"
            )?,
            Action::StepDown {
                stream,
                to_rendition,
            } => write!(f, "step stream {stream} down to rendition {to_rendition}")?,
            Action::StepUp {
                stream,
                to_rendition,
            } => write!(f, "step stream {stream} up to rendition {to_rendition}")?,
            Action::AtMaxReplicas {
                replicas, cause, ..
            } => write!(f, "overloaded ({cause}) at maxReplicas {replicas}")?,
            Action::SignalsStale { shards, streams } => write!(
                f,
                "no fresh signals from shards {shards:?} and streams {streams:?}"
            )?,
        }
        let relation = match self.reason {
            Reason::Headroom | Reason::Recovered => "at most",
            _ => "above",
        };
        write!(
            f,
            ": {} {} {relation} {}",
            self.reason, self.figure, self.threshold
        )
    }
}

/// Why the pipeline is degraded, as the `Degraded` condition's reason. The
/// order is the order of priority when several hold: the most actionable for
/// a person first (raise `maxReplicas`), then the causes the policy is curing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DegradedReason {
    /// Shards are overloaded and the pipeline runs `maxReplicas`.
    AtMaxReplicas,
    /// A shard's sockets overflow: the kernel drops packets before the pod reads them.
    KernelDrops,
    /// A shard's workers are busy near 100%.
    ShardSaturated,
    /// A stream has unrecovered loss or dropped frames while its shard is healthy.
    NetworkLoss,
    /// Some shards or streams have no fresh data.
    SignalsStale,
}

impl DegradedReason {
    /// The condition reason: `AtMaxReplicas`, `KernelDrops`, `ShardSaturated`,
    /// `NetworkLoss` or `SignalsStale`.
    pub fn as_str(self) -> &'static str {
        match self {
            DegradedReason::AtMaxReplicas => "AtMaxReplicas",
            DegradedReason::KernelDrops => "KernelDrops",
            DegradedReason::ShardSaturated => "ShardSaturated",
            DegradedReason::NetworkLoss => "NetworkLoss",
            DegradedReason::SignalsStale => "SignalsStale",
        }
    }

    /// The same reason as a metric label value, lowercase like every label
    /// value the project exports: `at_max_replicas`, `kernel_drops`,
    /// `shard_saturated`, `network_loss`, `signals_stale`.
    pub fn label(self) -> &'static str {
        match self {
            DegradedReason::AtMaxReplicas => "at_max_replicas",
            DegradedReason::KernelDrops => "kernel_drops",
            DegradedReason::ShardSaturated => "shard_saturated",
            DegradedReason::NetworkLoss => "network_loss",
            DegradedReason::SignalsStale => "signals_stale",
        }
    }
}

/// The pipeline's health now, from the newest fresh samples: every reason that
/// holds, in priority order. Empty means not degraded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Degraded {
    pub reasons: Vec<DegradedReason>,
}

impl Degraded {
    pub fn is_degraded(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// The reason to put on the condition.
    pub fn primary(&self) -> Option<DegradedReason> {
        self.reasons.first().copied()
    }

    pub(crate) fn add(&mut self, reason: DegradedReason) {
        if let Err(at) = self.reasons.binary_search(&reason) {
            self.reasons.insert(at, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_the_documented_lowercase_strings() {
        let labels: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "kernel_drops",
                "shard_saturated",
                "network_loss",
                "recovered",
                "headroom",
                "at_max_replicas",
                "signals_stale"
            ]
        );
    }

    #[test]
    fn degraded_lists_each_reason_once_in_priority_order() {
        let mut d = Degraded::default();
        d.add(DegradedReason::SignalsStale);
        d.add(DegradedReason::KernelDrops);
        d.add(DegradedReason::SignalsStale);
        d.add(DegradedReason::AtMaxReplicas);
        assert_eq!(
            d.reasons,
            [
                DegradedReason::AtMaxReplicas,
                DegradedReason::KernelDrops,
                DegradedReason::SignalsStale
            ]
        );
        assert_eq!(
            d.primary().map(DegradedReason::as_str),
            Some("AtMaxReplicas")
        );
    }

    #[test]
    fn a_decision_reads_as_a_sentence() {
        let d = Decision {
            action: Action::ScaleTo {
                from: 2,
                replicas: 3,
            },
            reason: Reason::KernelDrops,
            figure: 120.0,
            threshold: 0.0,
        };
        assert_eq!(
            d.to_string(),
            "scale from 2 to 3 replicas: kernel_drops 120 above 0"
        );
    }
}
