//! ZeroDrop's control policy: a pure function from a window of signals to
//! decisions, each with the reason, the figure and the threshold behind it.
//!
//! Two causes get two cures. A shard that cannot keep up (kernel
//! receive-buffer drops on its sockets, workers busy near 100%) gets more
//! replicas; a network path that loses more than repair recovers, while its
//! shard is healthy, gets its stream stepped down the bitrate ladder. Adding
//! replicas never cures path loss and stepping down never cures a full socket,
//! so neither cure is applied to the other cause.
//!
//! The crate holds no Kubernetes types, no clock and no I/O: the caller
//! collects [`Signals`], keeps a [`PolicyState`] between calls and acts on the
//! [`Verdict`] that [`decide`] returns. Stabilization follows the HPA's:
//! a tolerance band, scale-up and scale-down windows, a cooldown after every
//! change, and report-only outcomes repeated at most once per interval.
//!
//! - [`signals`]: the samples the caller collects, and how a window of them is read;
//! - [`settings`]: the operator-wide tuning ([`Settings`], with defaults) and the
//!   per-pipeline rules from the spec ([`ScalingBounds`], [`BitrateLadder`]);
//! - [`decision`]: what comes out ([`Decision`], [`Action`], [`Reason`], [`Degraded`]);
//! - [`state`]: what the policy remembers between calls;
//! - `capacity` and `bitrate`: the two cures; `decide`: the function that joins them.

mod bitrate;
mod capacity;
mod decide;
pub mod decision;
pub mod settings;
pub mod signals;
pub mod state;

pub use decide::{Verdict, decide};
pub use decision::{Action, Decision, Degraded, DegradedReason, Reason};
pub use settings::{
    BitrateLadder, Pipeline, ReplicasOwner, ScalingBounds, Settings, SettingsError,
};
pub use signals::{ShardSample, ShardSignals, Signals, StreamSample, StreamSignals, Timestamp};
pub use state::PolicyState;
