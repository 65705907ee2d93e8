//! The bitrate half of the control policy on one machine: `zerodrop run` on a
//! pipeline with a bitrate ladder, our sender losing a quarter of its packets
//! for a while. Loss before repair above the policy's ceiling steps the stream
//! down its ladder: a TMMBR goes out, the sender lowers its encoder's bit rate
//! and acknowledges with TMMBN. Once the loss is over and `upgradeAfterSeconds`
//! of health have passed, it steps back up, and the sender returns to its rate.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};

const PORT: u16 = 25104;

fn manifest() -> String {
    zerodrop_e2e::single_source_manifest("ladder", "h264", PORT, 300, 8)
        + r#"  bitratePolicy:
    downgradeLossPercent: 0.5
    downgradeWindowSeconds: 2
    upgradeAfterSeconds: 4
    renditions:
      - {name: high, bitrateKbps: 1500}
      - {name: low, bitrateKbps: 300}
"#
}

/// Polls the runner's metrics until `done` holds (bounded).
fn wait_for(runner: &RunnerProcess, what: &str, within: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = runner.metrics().unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}:\n{text}");
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

#[test]
fn loss_beyond_repair_steps_a_stream_down_its_ladder_by_tmmbr_and_health_steps_it_back_up() {
    let runner = RunnerProcess::start(&manifest(), 25190, &[]).expect("runner starts");
    // One packet in four lost for the first 1000 packets (about 6 s at
    // 1.5 Mbit/s), then none.
    let trace = runner.dir.path().join("loss.txt");
    let pattern: String = (0..1000).map(|i| if i % 4 == 1 { '1' } else { '0' }).collect();
    std::fs::write(&trace, pattern).unwrap();
    let summary = runner.dir.path().join("sent.json");
    let mut sender = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{PORT}"), "--width", "320", "--height", "240", "--pattern", "snow"])
        .args(["--bitrate", "1500", "--frames", "900", "--quiet"])
        .arg("--loss")
        .arg(format!("trace:{},end=stop", trace.display()))
        .arg("--summary-json")
        .arg(&summary)
        .stdin(Stdio::null())
        .spawn()
        .expect("zerodrop send starts");
    let rendition = |t: &str| metric_value(t, "zerodrop_rendition_index", &["stream=\"cam\""]);
    let down = wait_for(&runner, "a step down", Duration::from_secs(20), |t| rendition(t) == Some(1.0));
    assert_eq!(metric_value(&down, "zerodrop_policy_decisions_total", &["action=\"step_down\"", "reason=\"network_loss\""]), Some(1.0));
    assert_eq!(metric_value(&down, "zerodrop_bitrate_requested_bits_per_second", &["stream=\"cam\""]), Some(300_000.0));
    wait_for(&runner, "the sender's TMMBN", Duration::from_secs(5), |t| {
        metric_value(t, "zerodrop_bitrate_request_acknowledged", &["stream=\"cam\""]) == Some(1.0)
    });
    let up = wait_for(&runner, "a step back up", Duration::from_secs(30), |t| rendition(t) == Some(0.0));
    assert_eq!(metric_value(&up, "zerodrop_policy_decisions_total", &["action=\"step_up\"", "reason=\"recovered\""]), Some(1.0));
    assert_eq!(metric_value(&up, "zerodrop_bitrate_requested_bits_per_second", &["stream=\"cam\""]), Some(1_500_000.0));
    assert!(sender.wait().unwrap().success());
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let sent: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    eprintln!("sender: {sent:#}");
    assert_eq!(sent["tmmbrs_received"].as_u64(), Some(2), "one TMMBR down, one up, each acknowledged at once");
    // TMMBR counts packet overhead in (RFC 5104): 1500 kbit/s on the wire is
    // 1451 kbit/s of video in 1200-byte packets with 40 bytes of headers each.
    assert_eq!(sent["bitrate_kbps"].as_u64(), Some(1451), "back at the top rendition");
    let stream = outcome.stream("cam");
    let n = |k: &str| stream[k].as_u64().unwrap();
    assert_eq!(n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"), 900, "the books balance");
}
