//! What the policy remembers between calls: when the replica count last
//! changed, when each stream was last stepped, and when each report-only
//! outcome was last reported. [`crate::decide`] takes the state and returns
//! the next one; the caller keeps it per pipeline (in memory; after an
//! operator restart a fresh state only makes the first windows wait).

use std::collections::BTreeMap;

use crate::signals::Timestamp;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    /// When the policy was first called for this pipeline: data it has never
    /// had counts as missing only from then (plus the staleness limit).
    pub(crate) started: Option<Timestamp>,
    /// The replica count last seen.
    pub(crate) replicas: Option<u32>,
    /// When the replica count last changed (the policy's decision or a change
    /// it saw); `None` when it has not changed since the policy started.
    pub(crate) replicas_changed: Option<Timestamp>,
    /// Per stream: when the policy first saw it, and when it last stepped it.
    pub(crate) streams: BTreeMap<String, StreamMemory>,
    /// Per report-only outcome (its key): when it was last reported.
    pub(crate) reported: BTreeMap<String, Timestamp>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StreamMemory {
    pub first_seen: Timestamp,
    pub last_step: Option<Timestamp>,
}

impl PolicyState {
    /// When the replica count last changed (a change the policy made or saw);
    /// `None` when it has not changed since the policy started.
    pub fn replicas_changed(&self) -> Option<Timestamp> {
        self.replicas_changed
    }

    /// When the policy last stepped this stream up or down.
    pub fn last_step(&self, stream: &str) -> Option<Timestamp> {
        self.streams.get(stream).and_then(|m| m.last_step)
    }

    /// Whether a report under `key` is due: never reported, or not within `interval`.
    pub(crate) fn report_due(
        &self,
        key: &str,
        now: Timestamp,
        interval: std::time::Duration,
    ) -> bool {
        self.reported
            .get(key)
            .is_none_or(|&at| now.saturating_sub(at) >= interval)
    }
}
