//! The bitrate half of the control policy with a sender that reads REMB
//! instead of TMMBR (`bitrateRequest: remb`, as a browser or a WebRTC gateway
//! would be): `zerodrop run` on a one-source ladder, our sender losing a
//! quarter of its packets for a while. The step down goes out as REMB (never
//! TMMBR), repeated every second while it stands, and the sender sets its
//! encoder to the rendition's bit rate; once the loss is over and
//! `upgradeAfterSeconds` of health have passed, a REMB for the top brings the
//! encoder back, sent three times and then no more. The sender's own
//! per-second progress line says what its encoder runs at and what it heard.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};

const PORT: u16 = 25114;
const METRICS_PORT: u16 = 25192;

fn manifest() -> String {
    zerodrop_e2e::single_source_manifest("ladder", "h264", PORT, 300, 8)
        .replacen("      codec: h264\n", "      codec: h264\n      bitrateRequest: remb\n", 1)
        + r#"  bitratePolicy:
    downgradeLossPercent: 0.5
    downgradeWindowSeconds: 2
    upgradeAfterSeconds: 4
    renditions:
      - {name: high, bitrateKbps: 1500}
      - {name: low, bitrateKbps: 300}
"#
}

/// What one of the sender's progress lines says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SenderProgress {
    bitrate_kbps: u64,
    tmmbrs: u64,
    rembs: u64,
}

/// `send  12.0s: frames ... bitrate 300kbps tmmbrs 0 rembs 9`.
fn parse_progress(line: &str) -> Option<SenderProgress> {
    let rest = line.strip_prefix("send ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    Some(SenderProgress {
        bitrate_kbps: after("bitrate")?.strip_suffix("kbps")?.parse().ok()?,
        tmmbrs: after("tmmbrs")?.parse().ok()?,
        rembs: after("rembs")?.parse().ok()?,
    })
}

/// The sender's progress lines as they come, with when they came.
struct SenderLines {
    rx: mpsc::Receiver<(Instant, SenderProgress)>,
    last: Option<(Instant, SenderProgress)>,
}

impl SenderLines {
    /// Waits (bounded) for a progress line for which `done` holds.
    fn wait_for(&mut self, what: &str, within: Duration, done: impl Fn(&SenderProgress) -> bool) -> (Instant, SenderProgress) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.last = Some(line);
                    if done(&line.1) {
                        return line;
                    }
                }
                Err(_) => panic!("the sender did not report {what} within {within:?}; last progress: {:?}", self.last),
            }
        }
    }
}

/// Polls the runner's metrics until `done` holds (bounded).
fn wait_for(runner: &RunnerProcess, what: &str, within: Duration, done: impl Fn(&str) -> bool) -> (Instant, String) {
    let deadline = Instant::now() + within;
    loop {
        let text = runner.metrics().unwrap_or_default();
        if done(&text) {
            return (Instant::now(), text);
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}:\n{text}");
        // The poll interval, not a wait for anything.
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

fn rembs_sent(text: &str) -> f64 {
    metric_value(text, "zerodrop_bitrate_requests_sent_total", &["stream=\"cam\"", "method=\"remb\""]).unwrap_or(0.0)
}

#[test]
fn loss_beyond_repair_steps_a_remb_sender_down_its_ladder_and_health_brings_it_back_up() {
    let runner = RunnerProcess::start(&manifest(), METRICS_PORT, &[]).expect("runner starts");
    // One packet in four lost for the first 600 packets (about 4 s at
    // 1.5 Mbit/s; longer once the sender is slowed down), then none.
    let trace = runner.dir.path().join("loss.txt");
    let pattern: String = (0..600).map(|i| if i % 4 == 1 { '1' } else { '0' }).collect();
    std::fs::write(&trace, pattern).unwrap();
    let summary = runner.dir.path().join("sent.json");
    let started = Instant::now();
    let mut sender = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{PORT}"), "--width", "320", "--height", "240", "--pattern", "snow"])
        .args(["--bitrate", "1500", "--frames", "900"])
        .arg("--loss")
        .arg(format!("trace:{},end=stop", trace.display()))
        .arg("--summary-json")
        .arg(&summary)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("zerodrop send starts");
    let (tx, rx) = mpsc::channel();
    let stderr = sender.stderr.take().expect("the sender's stderr is piped");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("sender: {line}");
            if let Some(p) = parse_progress(&line) {
                let _ = tx.send((Instant::now(), p));
            }
        }
    });
    let mut lines = SenderLines { rx, last: None };
    let since = |at: Instant| at.duration_since(started).as_secs_f64();

    let rendition = |t: &str| metric_value(t, "zerodrop_rendition_index", &["stream=\"cam\""]);
    let (down_at, down) = wait_for(&runner, "a step down", Duration::from_secs(20), |t| rendition(t) == Some(1.0));
    assert_eq!(metric_value(&down, "zerodrop_policy_decisions_total", &["action=\"step_down\"", "reason=\"network_loss\""]), Some(1.0));
    assert_eq!(metric_value(&down, "zerodrop_bitrate_requested_bits_per_second", &["stream=\"cam\""]), Some(300_000.0));
    assert_eq!(
        metric_value(&down, "zerodrop_bitrate_request_acknowledged", &["stream=\"cam\""]),
        Some(-1.0),
        "REMB has no acknowledgement, and the gauge says so"
    );
    assert_eq!(metric_value(&down, "zerodrop_bitrate_requests_sent_total", &["method=\"tmmbr\""]), None, "no TMMBR is ever sent");

    // REMB carries no packet overhead: the encoder runs at the figure itself.
    let (low_at, low) = lines.wait_for("its encoder at 300 kbit/s", Duration::from_secs(5), |p| p.bitrate_kbps == 300);
    assert_eq!(low.tmmbrs, 0);
    // While the step stands, the REMB is repeated (about once a second).
    let (_, repeated) = lines.wait_for("REMB repeated", Duration::from_secs(5), |p| p.rembs >= low.rembs + 2);
    assert_eq!(repeated.bitrate_kbps, 300, "a repeated REMB keeps the encoder where it is");

    let (up_at, up) = wait_for(&runner, "a step back up", Duration::from_secs(30), |t| rendition(t) == Some(0.0));
    assert_eq!(metric_value(&up, "zerodrop_policy_decisions_total", &["action=\"step_up\"", "reason=\"recovered\""]), Some(1.0));
    assert_eq!(metric_value(&up, "zerodrop_bitrate_requested_bits_per_second", &["stream=\"cam\""]), Some(1_500_000.0));
    assert_eq!(metric_value(&up, "zerodrop_bitrate_request_acknowledged", &["stream=\"cam\""]), Some(-1.0));
    let rembs_at_up = rembs_sent(&up);
    let (high_at, _) = lines.wait_for("its encoder back at 1500 kbit/s", Duration::from_secs(5), |p| p.bitrate_kbps == 1500);

    assert!(sender.wait().unwrap().success());
    reader.join().unwrap();
    let end = runner.metrics().unwrap_or_default();
    let sent: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let n = |k: &str| sent[k].as_u64().unwrap_or_else(|| panic!("{k} in the sender's summary"));
    let rembs_total = rembs_sent(&end);
    eprintln!(
        "step down {:.1} s after the sender started (its encoder at 300 kbit/s by its line at {:.1} s), \
         up at {:.1} s (encoder at 1500 kbit/s by {:.1} s); REMBs: {rembs_at_up} sent before the step up was seen, \
         {rembs_total} in all, {} received; TMMBRs received: {}",
        since(down_at),
        since(low_at),
        since(up_at),
        since(high_at),
        n("rembs_received"),
        n("tmmbrs_received"),
    );
    assert_eq!(n("tmmbrs_received"), 0, "a REMB sender is never sent TMMBR");
    assert_eq!(n("bitrate_kbps"), 1500, "back at the top rendition, overhead not taken off");
    // Every REMB sent reached the sender (loopback, RTCP is never dropped),
    // and the sender had left the top REMBs' time behind before it ended.
    assert_eq!(n("rembs_received") as f64, rembs_total, "REMBs sent and received");
    // One a second while the step stood, then the top three times, no more.
    let down_seconds = (up_at - down_at).as_secs_f64();
    assert!(
        (down_seconds - 1.0..=down_seconds + 2.0).contains(&(rembs_at_up - 1.0).max(0.0))
            && (rembs_total - rembs_at_up) <= 3.0
            && rembs_total >= rembs_at_up + 2.0,
        "{rembs_at_up} REMBs by the step up seen after {down_seconds:.1} s down, {rembs_total} in all"
    );
    let stream = outcome.stream("cam");
    let count = |k: &str| stream[k].as_u64().unwrap();
    assert_eq!(
        count("frames_decoded") + count("frames_dropped") + count("frames_skipped_before_keyframe"),
        900,
        "the books balance"
    );
}

#[test]
fn the_senders_progress_line_parses() {
    let line = "send  12.0s: frames 360 packets 900 dropped 150 nacks 40 rtx 150 plis 1 rtt 0.3ms bitrate 300kbps tmmbrs 0 rembs 9";
    assert_eq!(parse_progress(line), Some(SenderProgress { bitrate_kbps: 300, tmmbrs: 0, rembs: 9 }));
    assert_eq!(parse_progress("sender: something else"), None);
}
