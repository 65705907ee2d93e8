//! The policy's tuning, kept apart from its state: [`Settings`] are the
//! operator-wide knobs (flags or chart values) with HPA-like defaults;
//! [`Pipeline`] carries what one pipeline's spec says (replica bounds, who owns
//! replicas, the bitrate ladder), converted by the caller from the CRD.

use std::fmt;
use std::time::Duration;

/// Operator-wide tuning of the policy. [`Settings::default`] documents each
/// default and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Relative band around a target inside which the policy changes nothing.
    /// Default 0.1, the HPA's `--horizontal-pod-autoscaler-tolerance`.
    pub tolerance: f64,
    /// Busy ratio a shard is sized for: scaling aims for this. Default 0.6,
    /// which leaves room for keyframe bursts and for the streams that move in
    /// on a rescale.
    pub busy_target: f64,
    /// Busy ratio at or above which a shard counts as saturated. Default 0.9:
    /// past it a burst fills the socket buffers before the workers drain them.
    pub busy_saturated: f64,
    /// Kernel receive-buffer drops per sample a shard may show before it
    /// counts as overloaded. Default 0: every such drop is a packet the
    /// pipeline never saw.
    pub kernel_drops_allowed: u64,
    /// How long a shard must look overloaded before replicas go up. Default
    /// 0 s, as the HPA's scale-up: the drops are already lost packets, and the
    /// cooldown keeps one burst from causing a second change.
    pub scale_up_window: Duration,
    /// How long every shard must have headroom before replicas go down.
    /// Default 300 s, as the HPA's scale-down stabilization: moving streams
    /// costs frames, so the policy removes a shard only when load has been low
    /// for a long while.
    pub scale_down_window: Duration,
    /// After a replica change (the policy's or anyone's), how long the policy
    /// makes no further replica change. Default 30 s: a new pod starts, streams
    /// move to it and the kernel queues drain; figures taken meanwhile describe
    /// the layout being left.
    pub cooldown: Duration,
    /// Loss before repair, as a share of the packets expected, past which a
    /// stream is stepped down even though repair still recovers it. Default
    /// 0.1: near there NACK budgets and single-parity FEC run out.
    pub network_loss_ceiling: f64,
    /// A shard or stream whose newest complete sample is older than this is
    /// stale. Default 10 s: several missed scrapes at the 1-2 s interval the
    /// 5 s reaction needs, not one slow one. Also the longest gap allowed
    /// between samples inside a window.
    pub stale_after: Duration,
    /// Report-only outcomes (at max replicas, would scale, signals stale) are
    /// repeated at most once per this interval while they persist. Default
    /// 60 s: an Event a minute says "still so" without flooding.
    pub report_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tolerance: 0.1,
            busy_target: 0.6,
            busy_saturated: 0.9,
            kernel_drops_allowed: 0,
            scale_up_window: Duration::ZERO,
            scale_down_window: Duration::from_secs(300),
            cooldown: Duration::from_secs(30),
            network_loss_ceiling: 0.1,
            stale_after: Duration::from_secs(10),
            report_interval: Duration::from_secs(60),
        }
    }
}

impl Settings {
    /// Checks the ratios are in range and ordered.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let ratio = |name: &'static str, value: f64, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(SettingsError {
                    name,
                    value,
                    expected: "a ratio in range",
                })
            }
        };
        ratio(
            "tolerance",
            self.tolerance,
            (0.0..1.0).contains(&self.tolerance),
        )?;
        ratio(
            "busy_target",
            self.busy_target,
            self.busy_target > 0.0 && self.busy_target <= 1.0,
        )?;
        if !(self.busy_saturated >= self.busy_target && self.busy_saturated <= 1.0) {
            return Err(SettingsError {
                name: "busy_saturated",
                value: self.busy_saturated,
                expected: "at least busy_target and at most 1",
            });
        }
        ratio(
            "network_loss_ceiling",
            self.network_loss_ceiling,
            self.network_loss_ceiling > 0.0 && self.network_loss_ceiling <= 1.0,
        )
    }

    /// How much history the caller must keep per shard and stream for these
    /// settings and this pipeline: the longest window in use plus one gap.
    pub fn history(&self, pipeline: &Pipeline) -> Duration {
        let bitrate = pipeline
            .bitrate
            .as_ref()
            .map_or(Duration::ZERO, |l| l.downgrade_window.max(l.upgrade_after));
        self.scale_down_window
            .max(self.scale_up_window)
            .max(bitrate)
            + self.stale_after
    }
}

/// A setting out of range.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsError {
    pub name: &'static str,
    pub value: f64,
    pub expected: &'static str,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy setting {} is {}, expected {}",
            self.name, self.value, self.expected
        )
    }
}

impl std::error::Error for SettingsError {}

/// What one pipeline's spec says that the policy needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub scaling: ScalingBounds,
    /// The bitrate ladder; `None` when the spec sets no bitrate policy, and
    /// then no stream is ever stepped.
    pub bitrate: Option<BitrateLadder>,
}

/// Replica bounds from `spec.scaling`, and who owns the replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingBounds {
    /// `spec.scaling.minReplicas`.
    pub min_replicas: u32,
    /// `spec.scaling.maxReplicas`; a value below `min_replicas` reads as `min_replicas`.
    pub max_replicas: u32,
    pub owner: ReplicasOwner,
}

impl ScalingBounds {
    pub(crate) fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas.max(1), self.max())
    }

    pub(crate) fn max(&self) -> u32 {
        self.max_replicas.max(self.min_replicas).max(1)
    }
}

/// Who writes the replica count: exactly one writer, never two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicasOwner {
    /// `spec.scaling.replicas` is unset: the policy decides ([`crate::Action::ScaleTo`]).
    Policy,
    /// `spec.scaling.replicas` is set (kubectl scale, an HPA or KEDA through the
    /// scale subresource): the policy only reports ([`crate::Action::WouldScaleTo`]).
    External,
}

/// The bitrate ladder and when to move on it, from `spec.bitratePolicy`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BitrateLadder {
    /// How many renditions the ladder has (`renditions.len()`); index 0 is the highest.
    pub renditions: usize,
    /// Unrecovered packets, as a share of those expected, above which a stream
    /// is stepped down: `downgradeLossPercent / 100`.
    pub downgrade_unrecovered: f64,
    /// How long loss must stay beyond repair before a step down: `downgradeWindowSeconds`.
    pub downgrade_window: Duration,
    /// How long a stream must stay healthy before a step up: `upgradeAfterSeconds`.
    pub upgrade_after: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Settings::default().validate(), Ok(()));
    }

    #[test]
    fn a_saturation_level_below_the_target_is_rejected() {
        let settings = Settings {
            busy_saturated: 0.5,
            ..Settings::default()
        };
        assert_eq!(settings.validate().unwrap_err().name, "busy_saturated");
    }

    #[test]
    fn history_covers_the_longest_window() {
        let ladder = BitrateLadder {
            renditions: 3,
            downgrade_unrecovered: 0.01,
            downgrade_window: Duration::from_secs(10),
            upgrade_after: Duration::from_secs(600),
        };
        let pipeline = Pipeline {
            scaling: ScalingBounds {
                min_replicas: 1,
                max_replicas: 3,
                owner: ReplicasOwner::Policy,
            },
            bitrate: Some(ladder),
        };
        assert_eq!(
            Settings::default().history(&pipeline),
            Duration::from_secs(610)
        );
    }
}
