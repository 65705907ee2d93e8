//! A camera's two renditions as two sources (`renditionOf`) on one machine:
//! `zerodrop run` receives a main stream (640x360, 1500 kbit/s) and its sub
//! stream (320x180, 300 kbit/s) from two real `zerodrop send` processes and
//! decodes the main one. One packet in four of the main stream is lost for
//! about its first 2500 packets (loss before repair above the policy's 10%
//! ceiling): within the downgrade window decoding switches to the sub
//! stream, which keeps being decoded while the main stream is still received
//! and repaired. Once the main stream's loss is over and
//! `upgradeAfterSeconds` of health have passed on both, decoding switches
//! back. One switch each way, never two within a window, no TMMBR, and every
//! stream's frames are decoded, dropped or skipped, exactly.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};

const MAIN_PORT: u16 = 26404;
const SUB_PORT: u16 = 26406;
const METRICS_PORT: u16 = 26490;
const FRAMES: u64 = 1050;
const DOWNGRADE_WINDOW_S: u64 = 2;
const UPGRADE_AFTER_S: u64 = 4;

fn manifest() -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {{name: cams}}
spec:
  sources:
    - name: door
      codec: h264
      rtxPayloadType: 97
      transport: {{rtp: {{listenAddress: 127.0.0.1, port: {MAIN_PORT}, rtcpPort: {main_rtcp}}}}}
    - name: door-sub
      renditionOf: door
      codec: h264
      rtxPayloadType: 97
      transport: {{rtp: {{listenAddress: 127.0.0.1, port: {SUB_PORT}, rtcpPort: {sub_rtcp}}}}}
  repair: {{latencyMs: 300, nack: {{enabled: true, maxRetries: 8}}}}
  decode: {{decoder: software}}
  bitratePolicy:
    downgradeLossPercent: 0.5
    downgradeWindowSeconds: {DOWNGRADE_WINDOW_S}
    upgradeAfterSeconds: {UPGRADE_AFTER_S}
"#,
        main_rtcp = MAIN_PORT + 1,
        sub_rtcp = SUB_PORT + 1,
    )
}

fn send(runner: &RunnerProcess, port: u16, size: (u32, u32), kbps: u32, loss: Option<&str>, summary: &std::path::Path) -> Child {
    Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--pattern", "snow", "--quiet"])
        .args(["--width", &size.0.to_string(), "--height", &size.1.to_string()])
        .args(["--bitrate", &kbps.to_string(), "--frames", &FRAMES.to_string()])
        .args(loss.map(|l| ["--loss", l]).into_iter().flatten())
        .arg("--summary-json")
        .arg(summary)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(runner.dir.path().join(format!("send-{port}.log"))).expect("sender log"))
        .spawn()
        .expect("zerodrop send starts")
}

fn gauge(text: &str, name: &str, stream: &str) -> Option<f64> {
    metric_value(text, name, &[&format!("stream=\"{stream}\"")])
}

fn decoded(text: &str, stream: &str) -> f64 {
    gauge(text, "zerodrop_frames_decoded_total", stream).unwrap_or(0.0)
}

/// Which source is decoded, as the metrics say: (door, door-sub).
fn decoding(text: &str) -> (Option<f64>, Option<f64>) {
    (gauge(text, "zerodrop_rendition_decoding", "door"), gauge(text, "zerodrop_rendition_decoding", "door-sub"))
}

#[test]
fn loss_on_the_main_streams_path_switches_decoding_to_the_sub_stream_and_back_once_it_heals() {
    let runner = RunnerProcess::start(&manifest(), METRICS_PORT, &[]).expect("runner starts");
    let start = runner.metrics().unwrap();
    assert_eq!(decoding(&start), (Some(1.0), Some(0.0)), "the main stream is decoded first");
    // The path policy's first round (within a second) exports each member's position.
    runner.wait_metrics(Duration::from_secs(5), "the group's rendition index", |t| {
        gauge(t, "zerodrop_rendition_index", "door") == Some(0.0) && gauge(t, "zerodrop_rendition_index", "door-sub") == Some(0.0)
    });

    // One packet in four of the main stream lost for its first 2500 packets
    // (about 16 s at 1.5 Mbit/s), then none.
    let trace = runner.dir.path().join("loss.txt");
    let pattern: String = (0..2500).map(|i| if i % 4 == 1 { '1' } else { '0' }).collect();
    std::fs::write(&trace, pattern).unwrap();
    let loss = format!("trace:{},end=stop", trace.display());
    let (main_summary, sub_summary) = (runner.dir.path().join("main.json"), runner.dir.path().join("sub.json"));
    let started = Instant::now();
    let mut main = send(&runner, MAIN_PORT, (640, 360), 1500, Some(&loss), &main_summary);
    let mut sub = send(&runner, SUB_PORT, (320, 180), 300, None, &sub_summary);

    // Every 100 ms until decoding is back on the main stream: the switches,
    // when they came, and how decoding went in between.
    let mut switches: Vec<(Duration, (Option<f64>, Option<f64>))> = Vec::new();
    let mut last = (Some(1.0), Some(0.0));
    let mut sub_decoded_at_switch = None;
    let mut sub_decoded_before_up = 0.0;
    let mut main_decoded_at_down = 0.0;
    let mut main_decoded_before_up = 0.0;
    // When the main stream's loss counter last moved: the end of its loss.
    let (mut lost, mut last_loss_at) = (0.0, Duration::ZERO);
    let deadline = started + Duration::from_secs(45);
    let text = loop {
        let text = runner.metrics().unwrap_or_default();
        let now = decoding(&text);
        let lost_now = gauge(&text, "zerodrop_rtp_packets_lost_total", "door").unwrap_or(0.0);
        if lost_now > lost {
            (lost, last_loss_at) = (lost_now, started.elapsed());
        }
        if now != last && now.0.is_some() {
            switches.push((started.elapsed(), now));
            last = now;
            if now == (Some(0.0), Some(1.0)) {
                sub_decoded_at_switch = Some(decoded(&text, "door-sub"));
                main_decoded_at_down = decoded(&text, "door");
            }
        }
        if last == (Some(0.0), Some(1.0)) {
            sub_decoded_before_up = decoded(&text, "door-sub");
            main_decoded_before_up = decoded(&text, "door");
        }
        if switches.len() >= 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "switches so far {switches:?}, not back on the main stream within 45 s:\n{}", runner.stderr());
        // Poll interval of a metrics check, not a synchronisation guess.
        std::thread::park_timeout(Duration::from_millis(100));
    };
    eprintln!("switches (since the senders started): {switches:?}; the main stream's last loss seen at {last_loss_at:?} ({lost} packets)");
    let (down_at, up_at) = (switches[0].0, switches[1].0);
    assert_eq!(switches[0].1, (Some(0.0), Some(1.0)), "first: down to the sub stream");
    assert_eq!(switches[1].1, (Some(1.0), Some(0.0)), "then: back to the main stream");
    // The loss starts with the first packet: the switch follows one
    // downgrade window of it, plus the stream's join and a 1 s sample.
    assert!(down_at <= Duration::from_secs(DOWNGRADE_WINDOW_S + 4), "switched down after {down_at:?}");
    // The sub stream was decoded in between (it starts at a keyframe asked for at once).
    let sub_at_switch = sub_decoded_at_switch.expect("seen switching");
    assert!(
        sub_decoded_before_up >= sub_at_switch + 60.0,
        "the sub stream kept being decoded: {sub_at_switch} → {sub_decoded_before_up} frames"
    );
    // The main stream is received, not decoded, while the sub stream is: at
    // most what its decoder still held at the switch.
    assert!(
        main_decoded_before_up <= main_decoded_at_down + 10.0,
        "the main stream stopped decoding: {main_decoded_at_down} → {main_decoded_before_up}"
    );
    // Back up only after the main stream's loss ended and
    // upgradeAfterSeconds passed (its last lossy 1 s sample may end up to a
    // second after the last loss this poll saw): never within a window of
    // the step down, and never to a stream that still loses.
    assert!(up_at - down_at >= Duration::from_secs(UPGRADE_AFTER_S), "{down_at:?} → {up_at:?}");
    assert!(
        up_at >= last_loss_at + Duration::from_secs(UPGRADE_AFTER_S - 1),
        "back up at {up_at:?}, the main stream's last loss at {last_loss_at:?}"
    );
    let count = |action: &str, reason: &str| {
        metric_value(&text, "zerodrop_policy_decisions_total", &[&format!("action=\"{action}\""), &format!("reason=\"{reason}\"")])
    };
    assert_eq!(count("step_down", "network_loss"), Some(1.0));
    assert_eq!(count("step_up", "recovered"), Some(1.0));
    assert_eq!(gauge(&text, "zerodrop_rendition_index", "door"), Some(0.0));
    assert_eq!(gauge(&text, "zerodrop_rendition_index", "door-sub"), Some(0.0));
    assert!(
        metric_value(&text, "zerodrop_frames_skipped_total", &["stream=\"door\"", "reason=\"inactive_rendition\""]).unwrap_or(0.0) > 30.0,
        "the main stream's frames were skipped while the sub stream was decoded"
    );
    // The main stream decodes again after the switch back.
    let main_at_up = decoded(&text, "door");
    runner.wait_metrics(Duration::from_secs(10), "the main stream decoding again", |t| decoded(t, "door") >= main_at_up + 30.0);
    let stderr = runner.stderr();
    assert!(stderr.contains("decoding rendition door-sub instead of door"), "the runner says so:\n{stderr}");
    assert!(stderr.contains("decoding rendition door instead of door-sub"), "the runner says so:\n{stderr}");

    assert!(main.wait().unwrap().success());
    assert!(sub.wait().unwrap().success());
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let final_switches = outcome.stderr.matches("decoding rendition").count();
    assert_eq!(final_switches, 2, "one switch each way:\n{}", outcome.stderr);
    for (stream, summary) in [("door", &main_summary), ("door-sub", &sub_summary)] {
        let sent: serde_json::Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
        assert_eq!(sent["tmmbrs_received"].as_u64(), Some(0), "{stream}: a grouped source is never sent TMMBR");
        let s = outcome.stream(stream);
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{stream}: {k} in the report: {s}"));
        eprintln!(
            "{stream}: sent {} frames, decoded {}, dropped {}, skipped before a keyframe {}, skipped as the inactive rendition {}; PLIs received {}",
            sent["frames_sent"], n("frames_decoded"), n("frames_dropped"), n("frames_skipped_before_keyframe"),
            n("frames_skipped_inactive_rendition"), sent["plis_received"]
        );
        assert_eq!(
            n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe") + n("frames_skipped_inactive_rendition"),
            sent["frames_sent"].as_u64().unwrap(),
            "{stream}: the books balance"
        );
        // An inactive rendition's whole frames count as expected: dropped /
        // expected stays the stream's own path figure.
        assert!(
            n("frames_expected") >= n("frames_assembled") + n("frames_skipped_inactive_rendition"),
            "{stream}: expected {} < assembled {} + inactive {}",
            n("frames_expected"), n("frames_assembled"), n("frames_skipped_inactive_rendition")
        );
    }
}
