//! Make-before-break replica changes, on a real Service data plane (the real
//! kube-proxy, nftables mode; `ClusterOptions::service_proxy`): the real
//! operator, a `zerodrop pod` process per shard on its pod's IP, decoding,
//! and our test senders aimed at each source's Service ClusterIP.
//!
//! A scale-up and a scale-down, each with streams flowing: every moving
//! stream's Service switches only once its new owner lists it bound, the
//! streams that stay lose nothing, and a moving stream loses at most the
//! frames between the switch and the keyframe its new owner asks for.
//! The figures are printed; `bench-handover` measures them over many trials.

use std::time::Duration;

use zerodrop_e2e::cluster::{ClusterOptions, TestCluster};
use zerodrop_e2e::operator::{OperatorProcess, install_crd};
use zerodrop_e2e::rescale::{self, Rescale, RescaleOutcome};

/// At most this many frames lost per moved stream (a third of a second at
/// 30 fps): a handover here costs 0 or 1 frame (the new owner joins between
/// keyframes and asks for one, answered within a round trip); the margin is
/// for a loaded machine. A sender whose address kube-proxy masquerades
/// (outside the pod range) loses about 25-30 instead, the new owner waiting
/// for its next sender report to learn where RTCP goes (`rescale.rs`).
const MAX_LOST_PER_MOVED_STREAM: u64 = 10;

fn report(what: &str, o: &RescaleOutcome) {
    eprintln!("{what}: switch after {:?} s, done after {:?} s", o.to_switch_s, o.to_done_s);
    for s in &o.streams {
        eprintln!(
            "  {} {} → {}{}: sent {}, decoded {:?}, accounted {:?}, lost {}, keyframe requests {}, PLIs at the sender {}, keyframes forced {}, send errors {}",
            s.name,
            s.old_owner,
            s.new_owner,
            if s.moved { " (moved)" } else { "" },
            s.frames_sent,
            s.decoded_by_shard,
            s.accounted_by_shard,
            s.frames_lost,
            s.keyframe_requests,
            s.plis_received,
            s.keyframes_forced,
            s.send_errors
        );
    }
    for e in &o.events {
        eprintln!("  event {e}");
    }
}

fn check(what: &str, o: &RescaleOutcome) {
    report(what, o);
    assert!(o.moved().count() > 0, "{what}: some stream moves (the sources are chosen so)");
    assert!(o.switched_before_bound.is_empty(), "{what}: Services selected a new owner before it listed the stream: {:?}", o.switched_before_bound);
    assert!(o.to_switch_s.is_some(), "{what}: the handover switched (status.handover phase Switched seen)");
    assert!(o.events.iter().any(|e| e.starts_with("HandoverSwitched")), "{what}: a HandoverSwitched Event: {:?}", o.events);
    assert!(!o.events.iter().any(|e| e.starts_with("HandoverTimedOut")), "{what}: the new owners were ready in time: {:?}", o.events);
    for s in o.stayed() {
        assert_eq!(s.frames_lost, 0, "{what}: {} did not move and lost nothing: {s:?}", s.name);
    }
    for s in o.moved() {
        assert!(s.frames_lost <= MAX_LOST_PER_MOVED_STREAM, "{what}: {} lost {} frames moving: {s:?}", s.name, s.frames_lost);
        assert_eq!(s.decoded_by_shard.len(), 2, "{what}: {} was decoded by its old and its new owner: {s:?}", s.name);
    }
}

#[test]
fn moving_streams_switch_only_once_their_new_owner_listens_and_lose_at_most_a_keyframe_wait() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(ClusterOptions { service_proxy: true, ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    // The reconcile alone scales here (replicas set by hand, as `kubectl
    // scale` does); the control loop is tested in control_loop.rs.
    let _operator = OperatorProcess::start(&cluster, 27290, "operator.log", &["--control", "false"]);

    let up = Rescale {
        pipeline: "up".into(),
        sources: 6,
        from: 1,
        to: 2,
        send_seconds: 14,
        before: Duration::from_secs(3),
        first_port: 5004,
    };
    let o = rescale::run(&cluster, &up)?;
    check("scale 1 → 2", &o);

    let down = Rescale { pipeline: "down".into(), from: 2, to: 1, ..up };
    let o = rescale::run(&cluster, &down)?;
    check("scale 2 → 1", &o);
    Ok(())
}
