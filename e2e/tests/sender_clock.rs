//! Timestamps from the sender's clock: a sender whose clock runs 100 ppm
//! fast sends for 20 s, says goodbye, and a new one (a new SSRC, a clock of
//! its own) takes over. Every frame handed on carries the sender's wallclock
//! (from its RTCP sender reports), which must stay monotonic across the
//! restart and track what the sender's clock said when the frame went out;
//! the drift metric must find the 100 ppm.

use std::path::Path;
use std::process::{Command, Stdio};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};

/// Per line of an AU log or the sender's hashes file: (digest, sender
/// wallclock in ns, when given).
fn timed_digests(path: &Path) -> Vec<(String, Option<i128>)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].to_string(), f.get(4).and_then(|t| t.parse().ok()))
        })
        .collect()
}

fn send(port: u16, frames: u32, seed: u64, hashes: &Path) {
    let status = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", "h264", "--clock-ppm", "100"])
        .args(["--width", "320", "--height", "180", "--fps", "30", "--key-int", "30", "--bitrate", "500"])
        .args(["--frames", &frames.to_string(), "--loss", "uniform:0.02", "--seed", &seed.to_string(), "--quiet"])
        .args(["--linger-ms", "500", "--hashes"])
        .arg(hashes)
        .stdin(Stdio::null())
        .status()
        .expect("zerodrop send runs");
    assert!(status.success(), "zerodrop send failed: {status}");
}

#[test]
fn frames_carry_the_senders_wallclock_monotonic_across_a_restart_and_the_drift_is_measured() {
    let port = 25604;
    let runner = RunnerProcess::start(&zerodrop_e2e::single_source_manifest("clock", "h264", port, 300, 10), 25690, &[])
        .expect("runner starts");
    let first = runner.dir.path().join("first.au");
    send(port, 600, 1, &first);
    let metrics = runner.metrics().unwrap();
    let drift = metric_value(&metrics, "zerodrop_sender_clock_drift_ppm", &["stream=\"cam\""]).expect("drift measured");
    let offset = metric_value(&metrics, "zerodrop_sender_clock_offset_seconds", &["stream=\"cam\""]).expect("offset measured");
    let second = runner.dir.path().join("second.au");
    send(port, 150, 2, &second);
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("sender restarted with a new SSRC"), "{}", outcome.stderr);
    let stream = outcome.stream("cam");
    assert_eq!(stream["frames_dropped"], 0, "{stream:#}");

    let sent: Vec<(String, Option<i128>)> = timed_digests(&first).into_iter().chain(timed_digests(&second)).collect();
    let got = timed_digests(&outcome.au_log("clock", "cam"));
    assert_eq!(got.len(), sent.len(), "every frame handed on");
    let untimed = got.iter().take_while(|(_, t)| t.is_none()).count();
    assert!(got[untimed..].iter().all(|(_, t)| t.is_some()), "once timed, every frame is timed");
    assert!(untimed <= 40, "frames before the first sender report: {untimed}");
    let times: Vec<i128> = got.iter().filter_map(|(_, t)| *t).collect();
    assert!(times.windows(2).all(|w| w[1] > w[0]), "sender times strictly increase, across the restart too");
    let mut errors_ms: Vec<f64> = Vec::new();
    for ((digest, ours), (sent_digest, theirs)) in got.iter().zip(&sent) {
        assert_eq!(digest, sent_digest, "the same frames in the same order");
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            errors_ms.push((ours - theirs) as f64 / 1e6);
        }
    }
    errors_ms.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    let p99 = errors_ms[errors_ms.len() * 99 / 100].abs();
    let worst = errors_ms.last().unwrap().abs();
    eprintln!("drift {drift:.1} ppm, offset {:.3} ms; {} frames timed, |error| p50 {:.2} ms, p99 {p99:.2} ms, max {worst:.2} ms",
        offset * 1e3, errors_ms.len(), errors_ms[errors_ms.len() / 2].abs());
    assert!((drift - 100.0).abs() < 40.0, "a clock 100 ppm fast measured at {drift:.1} ppm");
    assert!(p99 < 10.0 && worst < 40.0, "frame times track the sender's clock: p99 {p99:.2} ms, max {worst:.2} ms");
}
