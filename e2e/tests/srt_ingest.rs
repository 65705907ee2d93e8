//! SRT ingest against `srt-live-transmit` (Debian's srt-tools: libsrt's own
//! tool, a peer nobody here wrote) carrying `ffmpeg`'s MPEG-TS, with the
//! pipeline as listener and as caller, encrypted with a passphrase read from
//! a Secret-like directory, and with loss injected on the SRT path: frames
//! ffmpeg sent = frames decoded + frames counted as dropped, exactly, and
//! libsrt's loss and NAK figures show in /metrics under the names that mean
//! the same for RTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::bench::{free_rtp_port, free_tcp_port};
use zerodrop_e2e::netloss::UdpLoss;
use zerodrop_e2e::runner::{RunnerProcess, frames_accounted, metric_sum};

const FRAMES: u64 = 600;
const PASSPHRASE: &str = "contribution-link-7";

/// `srt-live-transmit` relaying UDP (from ffmpeg) onto SRT.
struct Relay {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Relay {
    fn start(udp_port: u16, srt_uri: &str) -> Relay {
        let mut child = Command::new("srt-live-transmit")
            .args(["-v", &format!("udp://:{udp_port}"), srt_uri])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("srt-live-transmit runs (scripts/install-deps.sh installs srt-tools)");
        // It reports on standard error.
        let out = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Relay { child, lines }
    }

    /// Waits for the relay to say its SRT side is connected.
    fn wait_connected(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("SRT target connected") || l.contains("Accepted SRT target connection") => return,
                Ok(_) => {}
                Err(_) => panic!("srt-live-transmit did not connect within {timeout:?}"),
            }
        }
    }

    /// Closes the SRT connection as the tool does on an interrupt.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manifest(srt: &str, latency_ms: u32) -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: contrib
spec:
  sources:
    - name: feed
      codec: h264
      transport:
        srt:
{srt}
          passphraseSecret:
            name: feed-srt
  repair:
    latencyMs: {latency_ms}
  decode:
    decoder: software
"#
    )
}

/// ffmpeg encodes FRAMES frames of 720p30 H.264 as MPEG-TS to the relay.
fn ffmpeg_send(udp_port: u16) {
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30", "-frames:v", &FRAMES.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "30", "-bf", "0", "-b:v", "3M"])
        .args(["-f", "mpegts", &format!("udp://127.0.0.1:{udp_port}?pkt_size=1316")])
        .stdin(Stdio::null())
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg failed: {status}");
}

/// Loss on the SRT path: none, random, or deterministic bursts.
enum PathLoss {
    None,
    Percent(u32),
    /// Outages: every packet dropped from A to B seconds after the sender
    /// starts, for each (A, B).
    Outages(&'static [(u64, u64)]),
}

/// Runs one transfer; returns the runner's metrics at the end and its report.
fn transfer(listener: bool, loss_percent: u32) -> (String, serde_json::Value, u64) {
    let loss = if loss_percent > 0 { PathLoss::Percent(loss_percent) } else { PathLoss::None };
    transfer_with(listener, loss, 300)
}

fn transfer_with(listener: bool, path_loss: PathLoss, latency_ms: u32) -> (String, serde_json::Value, u64) {
    let srt_port = free_rtp_port().unwrap();
    let udp_port = free_rtp_port().unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("passphrase"), format!("{PASSPHRASE}\n")).unwrap();
    let flag = format!("contrib/feed={}", secret.path().display());
    let (srt_spec, relay_uri, data_match) = if listener {
        (
            format!("          mode: listener\n          address: 127.0.0.1\n          port: {srt_port}"),
            format!("srt://127.0.0.1:{srt_port}?mode=caller&latency=300&passphrase={PASSPHRASE}"),
            format!("udp dport {srt_port}"),
        )
    } else {
        (
            format!("          mode: caller\n          address: 127.0.0.1\n          port: {srt_port}"),
            format!("srt://:{srt_port}?mode=listener&latency={latency_ms}&passphrase={PASSPHRASE}"),
            format!("udp sport {srt_port}"),
        )
    };
    // The listening side first.
    let (runner, relay) = if listener {
        let runner = RunnerProcess::start(&manifest(&srt_spec, latency_ms), free_tcp_port().unwrap(), &["--credentials", &flag]).expect("runner starts");
        (runner, Relay::start(udp_port, &relay_uri))
    } else {
        let relay = Relay::start(udp_port, &relay_uri);
        (RunnerProcess::start(&manifest(&srt_spec, latency_ms), free_tcp_port().unwrap(), &["--credentials", &flag]).expect("runner starts"), relay)
    };
    relay.wait_connected(Duration::from_secs(20));
    let loss = match path_loss {
        PathLoss::None => None,
        PathLoss::Percent(p) => Some(UdpLoss::start(&data_match, p)),
        PathLoss::Outages(windows) => Some(UdpLoss::start_exprs(
            &windows.iter().map(|(a, b)| format!("{data_match} {}", UdpLoss::hour_range(*a, *b))).collect::<Vec<_>>(),
        )),
    };
    ffmpeg_send(udp_port);
    // Everything but the last unit (the demultiplexer knows a unit is whole
    // when the next one starts) is accounted for; then the sender leaves and
    // the last one is handed on too.
    runner.poll_metrics(Duration::from_secs(15), |m| frames_accounted(m, "feed") + 1 >= FRAMES);
    let dropped_on_path = loss.as_ref().map_or(0, UdpLoss::dropped);
    drop(loss);
    relay.stop();
    runner.poll_metrics(Duration::from_secs(15), |m| frames_accounted(m, "feed") >= FRAMES);
    let metrics = runner.metrics().unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert!(!outcome.stderr.contains(PASSPHRASE), "the passphrase reached the log");
    (metrics, outcome.stream("feed").clone(), dropped_on_path)
}

fn check_accounting(report: &serde_json::Value) {
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} in {report}"));
    assert_eq!(
        n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"),
        FRAMES,
        "frames sent = decoded + dropped + skipped: {report}"
    );
}

#[test]
fn srt_listener_encrypted_every_frame_decoded() {
    let (_, report, _) = transfer(true, 0);
    check_accounting(&report);
    assert_eq!(report["frames_decoded"], FRAMES, "{report}");
}

#[test]
fn srt_caller_encrypted_every_frame_decoded() {
    let (_, report, _) = transfer(false, 0);
    check_accounting(&report);
    assert_eq!(report["frames_decoded"], FRAMES, "{report}");
}

#[test]
fn srt_listener_with_5_percent_loss_repairs_and_accounts_for_every_frame() {
    let (metrics, report, dropped) = transfer(true, 5);
    assert!(dropped > 0, "the loss rule dropped nothing");
    check_accounting(&report);
    // libsrt's own figures, under the RTP names that mean the same.
    let lost = metric_sum(&metrics, "zerodrop_rtp_packets_lost_total", "stream=\"feed\"");
    let naks = metric_sum(&metrics, "zerodrop_nacks_sent_total", "stream=\"feed\"");
    assert!(lost > 0.0 && naks > 0.0, "SRT lost {lost} packets and sent {naks} NAKs for {dropped} dropped on the path\n{metrics}");
}

#[test]
fn srt_caller_with_5_percent_loss_repairs_and_accounts_for_every_frame() {
    let (metrics, report, dropped) = transfer(false, 5);
    assert!(dropped > 0, "the loss rule dropped nothing");
    check_accounting(&report);
    let lost = metric_sum(&metrics, "zerodrop_rtp_packets_lost_total", "stream=\"feed\"");
    assert!(lost > 0.0, "SRT lost {lost} packets for {dropped} dropped on the path");
}

/// Outages longer than SRT's latency (two of a second or so, against
/// 120 ms), well inside the stream (a receiver cannot know of frames lost
/// after the last one it gets): what SRT gives up on arrives as TS gaps,
/// and every frame they cost is dropped and counted, none handed on damaged.
#[test]
fn srt_outages_beyond_its_latency_cost_frames_that_are_all_counted() {
    let (metrics, report, dropped) = transfer_with(true, PathLoss::Outages(&[(6, 7), (12, 13)]), 120);
    assert!(dropped > 0, "the loss rule dropped nothing");
    check_accounting(&report);
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} in {report}"));
    assert!(n("frames_dropped") > 0, "SRT cannot repair half-second outages within 120 ms: {report}");
    let transport = metric_sum(&metrics, "zerodrop_frames_dropped_total", "reason=\"transport\"");
    let decode_errors = metric_sum(&metrics, "zerodrop_frames_dropped_total", "reason=\"decode_error\"");
    assert!(transport > 0.0, "counted at the TS level: {report}");
    assert_eq!(decode_errors, 0.0, "no damaged frame reached the decoder");
}
