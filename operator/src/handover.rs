//! Make-before-break replica changes (a *handover*).
//!
//! A replica change moves the streams whose rendezvous owner differs between
//! the old and the new count. Pointing a moving stream's Service at its new
//! owner at once would send the stream to a pod that has not bound its
//! sockets yet (a new pod still starting, or a remaining pod whose mounted
//! ConfigMap the kubelet has not refreshed), and everything sent meanwhile
//! would be lost. Instead:
//!
//! 1. **Preparing.** The StatefulSet runs the larger of the two counts; the
//!    rendered pipeline carries the new count and the old one
//!    ([`zerodrop_core::shard::HANDOVER_FROM_ANNOTATION`]), so every shard
//!    runs the streams it owns under either count; the Services still route
//!    by the old count. The operator reads each new owner's
//!    `/readyz/streams` until every moving stream is listed there (its
//!    sockets bound), or [`PREPARE_TIMEOUT`] passes.
//! 2. **Switched.** The Services route by the new count: the sender's next
//!    packet reaches the new owner, which is already listening. The old
//!    owners keep their sockets for [`DRAIN`], reading what was already on
//!    its way to them.
//! 3. **Done.** The rendered pipeline drops the old count (the old owners
//!    let the streams go) and the StatefulSet settles on the new count.
//!
//! [`step`] is the state machine, pure (the clock and what the pods report
//! are arguments); [`Layout`] says which count each object follows. The
//! reconcile keeps the current [`Routing`] in memory (a cache read may be
//! older than the operator's own last step) and persists it in
//! `status.handover`, from which a restarted operator resumes.

use std::time::{Duration, Instant};

use zerodrop_crds::shard;
use zerodrop_crds::{Handover, HandoverPhase, StreamPipeline};

/// How long the new owners may take, by default, to bind the moving streams
/// before the Services switch anyway (with a Warning Event): long enough for
/// a new pod to start and for the kubelet to refresh a remaining pod's
/// ConfigMap (its sync period, about a minute). `--handover-timeout-s`.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the old owners keep a moved stream's sockets after the switch,
/// for the packets already on their way (and a UDP flow the service proxy
/// has not re-pointed yet).
pub const DRAIN: Duration = Duration::from_secs(5);
/// How often a handover in progress is looked at again.
pub const POLL: Duration = Duration::from_millis(250);

/// The replica count each object follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The StatefulSet's replicas.
    pub pods: i32,
    /// The count in the rendered pipeline (`spec.scaling.replicas`).
    pub assign: i32,
    /// The handover's old count, annotated on the rendered pipeline.
    pub also_from: Option<i32>,
    /// The count the per-source Services route by.
    pub route: i32,
}

impl Layout {
    /// No change in progress: everything follows `replicas`.
    pub fn settled(replicas: i32) -> Layout {
        Layout { pods: replicas, assign: replicas, also_from: None, route: replicas }
    }
}

/// Where a pipeline's streams are routed, and the handover in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub handover: Option<Phase>,
    /// The count the Services route by when no handover is in progress.
    pub settled: i32,
}

/// A handover in progress, with the instant its phase began.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub from: i32,
    pub to: i32,
    pub switched: bool,
    pub since: Instant,
    /// The wall-clock time the phase began, for status.
    pub since_text: String,
    pub moving: i32,
    pub bound: i32,
}

impl Routing {
    /// The routing a (re)started operator resumes: the handover in status,
    /// else the StatefulSet's replicas, else (a new pipeline) `target`.
    pub fn resume(sp: &StreamPipeline, live_statefulset_replicas: Option<i32>, target: i32, now: Instant) -> Routing {
        match sp.status.as_ref().and_then(|s| s.handover.as_ref()) {
            Some(h) => Routing {
                handover: Some(Phase {
                    from: h.from_replicas,
                    to: h.to_replicas,
                    switched: h.phase == HandoverPhase::Switched,
                    // Timers start again: a restarted operator waits a full phase.
                    since: now,
                    since_text: h.since.clone().unwrap_or_default(),
                    moving: h.moving,
                    bound: h.bound,
                }),
                settled: if h.phase == HandoverPhase::Switched { h.to_replicas } else { h.from_replicas },
            },
            None => Routing { handover: None, settled: live_statefulset_replicas.unwrap_or(target) },
        }
    }

    pub fn layout(&self) -> Layout {
        match &self.handover {
            None => Layout::settled(self.settled),
            Some(p) => Layout {
                pods: p.from.max(p.to),
                assign: p.to,
                also_from: Some(p.from),
                route: if p.switched { p.to } else { p.from },
            },
        }
    }

    /// The status form of the handover in progress.
    pub fn status(&self) -> Option<Handover> {
        self.handover.as_ref().map(|p| Handover {
            from_replicas: p.from,
            to_replicas: p.to,
            phase: if p.switched { HandoverPhase::Switched } else { HandoverPhase::Preparing },
            moving: p.moving,
            bound: p.bound,
            since: (!p.since_text.is_empty()).then(|| p.since_text.clone()),
        })
    }
}

/// The sources whose owner differs between `from` and `to` replicas, with
/// their new owner.
pub fn moving(sp: &StreamPipeline, from: i32, to: i32) -> Vec<(String, u32)> {
    sp.spec
        .sources
        .iter()
        .filter(|s| shard::moves(s.shard_key(), from, to))
        .map(|s| (s.name.clone(), shard::owner(s.shard_key(), to)))
        .collect()
}

/// What happened in one step, for Events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Started { from: i32, to: i32, moving: i32 },
    Switched { to: i32, bound: i32, moving: i32, after: Duration },
    /// The new owners did not report every moving stream in time.
    SwitchedUnready { to: i32, bound: i32, moving: i32, after: Duration },
    Done { to: i32 },
    /// The target changed back before the switch: nothing moved.
    Cancelled { back_to: i32 },
}

impl Change {
    /// The Event's reason and note.
    pub fn event(&self) -> (&'static str, String) {
        match *self {
            Change::Started { from, to, moving } => (
                "Scaling",
                format!("data-plane replicas {from} → {to}: {moving} streams move; their new owners start them before their Services switch"),
            ),
            Change::Switched { to, bound, moving, after } => (
                "HandoverSwitched",
                format!("{bound}/{moving} moving streams bound by their new owners after {:.1} s; Services now route by {to} replicas", after.as_secs_f64()),
            ),
            Change::SwitchedUnready { to, bound, moving, after } => (
                "HandoverTimedOut",
                format!(
                    "only {bound}/{moving} moving streams bound by their new owners after {:.1} s; Services switched to {to} replicas anyway (frames of the others are lost until their owner binds)",
                    after.as_secs_f64()
                ),
            ),
            Change::Done { to } => ("HandoverDone", format!("old owners let the moved streams go; {to} replicas")),
            Change::Cancelled { back_to } => ("HandoverCancelled", format!("replicas back to {back_to} before any stream switched")),
        }
    }

    pub fn is_warning(&self) -> bool {
        matches!(self, Change::SwitchedUnready { .. })
    }
}

/// The clock and what the pods report, for one [`step`].
#[derive(Debug, Clone, Copy)]
pub struct Tick<'a> {
    pub now: Instant,
    /// The wall-clock time, for status.
    pub wall: &'a str,
    /// How many moving streams the new owners report bound (None when not looked at).
    pub bound: Option<i32>,
    /// How long the new owners may take ([`PREPARE_TIMEOUT`] by default).
    pub prepare_timeout: Duration,
}

/// One step of the state machine. `target`: the replica count wanted now.
pub fn step(routing: &Routing, sp: &StreamPipeline, target: i32, tick: Tick) -> (Routing, Option<Change>) {
    let Tick { now, wall, bound, prepare_timeout } = tick;
    let phase = |from: i32, to: i32| Phase {
        from,
        to,
        switched: false,
        since: now,
        since_text: wall.to_string(),
        moving: moving(sp, from, to).len() as i32,
        bound: 0,
    };
    let Some(p) = &routing.handover else {
        if routing.settled == target || target <= 0 || routing.settled <= 0 {
            // Nothing runs yet, or nothing changes (a pipeline scaled to or
            // from zero has no stream to hand over).
            return (Routing { handover: None, settled: target }, None);
        }
        let p = phase(routing.settled, target);
        let change = Change::Started { from: p.from, to: p.to, moving: p.moving };
        return (Routing { handover: Some(p), settled: routing.settled }, Some(change));
    };
    if target != p.to {
        if !p.switched && target == p.from {
            return (Routing { handover: None, settled: p.from }, Some(Change::Cancelled { back_to: p.from }));
        }
        // A new change on top of this one: hand over again from what the
        // Services route by now.
        let from = if p.switched { p.to } else { p.from };
        let settled = Routing { handover: None, settled: from };
        return step(&settled, sp, target, Tick { bound: None, ..tick });
    }
    let elapsed = now.saturating_duration_since(p.since);
    let mut next = p.clone();
    if let Some(b) = bound {
        next.bound = b;
    }
    if !p.switched {
        let ready = next.bound >= next.moving;
        if ready || elapsed >= prepare_timeout {
            let change = if ready {
                Change::Switched { to: p.to, bound: next.bound, moving: next.moving, after: elapsed }
            } else {
                Change::SwitchedUnready { to: p.to, bound: next.bound, moving: next.moving, after: elapsed }
            };
            next.switched = true;
            next.since = now;
            next.since_text = wall.to_string();
            return (Routing { handover: Some(next), settled: routing.settled }, Some(change));
        }
        return (Routing { handover: Some(next), settled: routing.settled }, None);
    }
    if elapsed >= DRAIN {
        return (Routing { handover: None, settled: p.to }, Some(Change::Done { to: p.to }));
    }
    (Routing { handover: Some(next), settled: routing.settled }, None)
}

/// How soon to look again while a handover is in progress.
pub fn requeue(routing: &Routing) -> Option<Duration> {
    routing.handover.as_ref().map(|_| POLL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(sources: usize) -> StreamPipeline {
        let mut text = String::from(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: p, namespace: default}\nspec:\n  scaling: {minReplicas: 1, maxReplicas: 4}\n  sources:\n",
        );
        for i in 0..sources {
            text += &format!("    - {{name: cam-{i}, codec: h264, transport: {{rtp: {{port: {}}}}}}}\n", 5000 + 2 * i);
        }
        zerodrop_crds::parse_manifests(&text).unwrap().remove(0)
    }

    fn settled(n: i32) -> Routing {
        Routing { handover: None, settled: n }
    }

    fn t(bound: Option<i32>, now: Instant, wall: &str) -> Tick<'_> {
        Tick { now, wall, bound, prepare_timeout: PREPARE_TIMEOUT }
    }

    #[test]
    fn a_scale_up_routes_by_the_old_count_until_every_moving_stream_is_bound_then_drains_and_settles() {
        let sp = sp(12);
        let moving = moving(&sp, 1, 2).len() as i32;
        assert!(moving > 0, "some of 12 streams move to a second shard");
        let t0 = Instant::now();
        let (r, change) = step(&settled(1), &sp, 2, t(None, t0, "t0"));
        assert_eq!(change, Some(Change::Started { from: 1, to: 2, moving }));
        assert_eq!(r.layout(), Layout { pods: 2, assign: 2, also_from: Some(1), route: 1 }, "the new pod starts; Services stay");
        // The new owner has bound some of them: no switch.
        let (r, change) = step(&r, &sp, 2, t(Some(moving - 1), t0 + Duration::from_secs(3), "t1"));
        assert_eq!(change, None);
        assert_eq!(r.layout().route, 1);
        assert_eq!(r.status().unwrap().bound, moving - 1);
        let (r, change) = step(&r, &sp, 2, t(Some(moving), t0 + Duration::from_secs(4), "t2"));
        assert_eq!(change, Some(Change::Switched { to: 2, bound: moving, moving, after: Duration::from_secs(4) }));
        assert_eq!(r.layout(), Layout { pods: 2, assign: 2, also_from: Some(1), route: 2 }, "the old owner still runs them");
        assert_eq!(r.status().unwrap().phase, HandoverPhase::Switched);
        let (r, change) = step(&r, &sp, 2, t(None, t0 + Duration::from_secs(4) + DRAIN / 2, "t3"));
        assert_eq!(change, None, "draining");
        let (r, change) = step(&r, &sp, 2, t(None, t0 + Duration::from_secs(4) + DRAIN, "t4"));
        assert_eq!(change, Some(Change::Done { to: 2 }));
        assert_eq!(r.layout(), Layout::settled(2));
        assert_eq!(r.status(), None);
    }

    #[test]
    fn a_scale_down_keeps_the_leaving_pods_until_the_handover_is_done() {
        let sp = sp(12);
        let t0 = Instant::now();
        let (r, _) = step(&settled(3), &sp, 1, t(None, t0, "t0"));
        assert_eq!(r.layout(), Layout { pods: 3, assign: 1, also_from: Some(3), route: 3 });
        let moving = r.status().unwrap().moving;
        let (r, _) = step(&r, &sp, 1, t(Some(moving), t0 + Duration::from_secs(60), "t1"));
        assert_eq!(r.layout(), Layout { pods: 3, assign: 1, also_from: Some(3), route: 1 }, "switched, the old pods drain");
        let (r, change) = step(&r, &sp, 1, t(None, t0 + Duration::from_secs(60) + DRAIN, "t2"));
        assert_eq!(change, Some(Change::Done { to: 1 }));
        assert_eq!(r.layout(), Layout::settled(1), "now the StatefulSet shrinks");
    }

    #[test]
    fn new_owners_that_never_bind_are_switched_to_after_the_timeout_with_a_warning() {
        let sp = sp(12);
        let t0 = Instant::now();
        let (r, _) = step(&settled(1), &sp, 2, t(None, t0, "t0"));
        let (r, change) = step(&r, &sp, 2, t(Some(0), t0 + PREPARE_TIMEOUT - Duration::from_millis(1), "t1"));
        assert_eq!((change, r.layout().route), (None, 1));
        let (r, change) = step(&r, &sp, 2, t(Some(0), t0 + PREPARE_TIMEOUT, "t2"));
        assert!(change.as_ref().is_some_and(Change::is_warning), "{change:?}");
        assert_eq!(r.layout().route, 2);
    }

    #[test]
    fn a_change_taken_back_before_the_switch_cancels_and_one_after_it_hands_over_again() {
        let sp = sp(12);
        let t0 = Instant::now();
        let (r, _) = step(&settled(1), &sp, 2, t(None, t0, "t0"));
        let (back, change) = step(&r, &sp, 1, t(None, t0 + Duration::from_secs(1), "t1"));
        assert_eq!(change, Some(Change::Cancelled { back_to: 1 }));
        assert_eq!(back.layout(), Layout::settled(1));
        let moving = r.status().unwrap().moving;
        let (r, _) = step(&r, &sp, 2, t(Some(moving), t0 + Duration::from_secs(1), "t1"));
        assert_eq!(r.layout().route, 2);
        let (r, change) = step(&r, &sp, 3, t(None, t0 + Duration::from_secs(2), "t2"));
        assert!(matches!(change, Some(Change::Started { from: 2, to: 3, .. })), "{change:?}");
        assert_eq!(r.layout(), Layout { pods: 3, assign: 3, also_from: Some(2), route: 2 });
    }

    #[test]
    fn a_new_or_unchanged_pipeline_has_no_handover() {
        let sp = sp(4);
        let now = Instant::now();
        assert_eq!(step(&settled(2), &sp, 2, t(None, now, "t")), (settled(2), None));
        let r = Routing::resume(&sp, None, 3, now);
        assert_eq!(r, settled(3), "nothing runs yet: start at the target");
        assert_eq!(step(&r, &sp, 3, t(None, now, "t")).1, None);
    }

    #[test]
    fn a_restarted_operator_resumes_the_handover_in_status() {
        let mut sp = sp(12);
        let now = Instant::now();
        let (r, _) = step(&settled(1), &sp, 2, t(None, now, "2026-12-06T14:00:00Z"));
        sp.status = Some(zerodrop_crds::StreamPipelineStatus { handover: r.status(), ..Default::default() });
        let resumed = Routing::resume(&sp, Some(2), 2, now);
        assert_eq!(resumed.layout(), r.layout(), "the Services keep routing by the old count");
        assert_eq!(resumed.status(), r.status());
    }

    #[test]
    fn a_pipeline_with_no_moving_stream_switches_at_once() {
        // One source: growing by one shard moves it only if the new shard
        // wins it (1 in n+1); find a count where it stays.
        let sp = sp(1);
        let from = (1..64).find(|&n| moving(&sp, n, n + 1).is_empty()).expect("some growth keeps cam-0 where it is");
        let to = from + 1;
        let t0 = Instant::now();
        let (r, _) = step(&settled(from), &sp, to, t(None, t0, "t0"));
        let (r, change) = step(&r, &sp, to, t(Some(0), t0, "t0"));
        assert!(matches!(change, Some(Change::Switched { moving: 0, .. })), "{change:?}");
        assert_eq!(r.layout().route, to);
    }
}
