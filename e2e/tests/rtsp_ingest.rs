//! RTSP pull against GStreamer's gst-rtsp-server (a peer nobody here wrote),
//! through retina: every frame the server's encoder made reaches the decoder,
//! compared by content, over TCP and over UDP, H.264 and H.265; over UDP with
//! loss on the path, what is lost is counted and frames that cannot be
//! repaired are dropped and counted, never handed on damaged; wrong
//! credentials give a clear error and a backoff, not a retry storm; a server
//! that dies and comes back is dialled again and its frames resume.

use std::time::Duration;

use zerodrop_e2e::bench::free_tcp_port;
use zerodrop_e2e::netloss::UdpLoss;
use zerodrop_e2e::runner::{RunnerProcess, frames_accounted, metric_sum, metric_value};
use zerodrop_testbench::rtsp_server::{RtspServer, RtspServerArgs};

const FRAMES: u64 = 600;


/// Pulls one whole session of `FRAMES` frames; returns (sent digests,
/// received digests, report entry).
fn pull(codec: &'static str, transport: &'static str, server_args: impl FnOnce(&mut RtspServerArgs)) -> (Vec<(u64, u64)>, Vec<u64>, serde_json::Value, String) {
    let mut args = RtspServerArgs::new(free_tcp_port().unwrap(), codec, FRAMES);
    server_args(&mut args);
    let mut server = RtspServer::start(&args).expect("gst-rtsp-server starts");
    let metrics_port = free_tcp_port().unwrap();
    let runner = RunnerProcess::start(&zerodrop_e2e::rtsp_manifest(&server.url(), codec, transport, 30), metrics_port, &[]).expect("runner starts");
    let (session, sent_frames) = server.wait_session_end(Duration::from_secs(FRAMES / 30 + 40)).expect("the server's media ends");
    // One client session; the server's preroll flush swallows at most the
    // first raw frame, which is never encoded for the wire.
    assert_eq!(session, 0);
    assert!(sent_frames + 1 >= FRAMES && sent_frames <= FRAMES, "the server sent {sent_frames} of {FRAMES} frames");
    // The last frames are still on their way (jitter buffer, decoder); the
    // comparison below says what is missing if they never come.
    runner.poll_metrics(Duration::from_secs(10), |m| frames_accounted(m, "door") >= sent_frames);
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let sent = server.session_digest_pairs(0).unwrap();
    let received = zerodrop_e2e::read_digests(&outcome.au_log("cams", "door")).unwrap();
    (sent, received, outcome.stream("door").clone(), outcome.stderr.clone())
}

fn every_frame_by_content(codec: &'static str, transport: &'static str) {
    let (pairs, received, report, stderr) = pull(codec, transport, |_| {});
    let sent: Vec<u64> = pairs.iter().map(|(whole, _)| *whole).collect();
    assert!(sent.len() as u64 + 1 >= FRAMES, "the server's dump holds {} frames", sent.len());
    if let Some(problem) = zerodrop_e2e::compare_digests(&sent, &received) {
        panic!("{codec} over RTSP/{transport}: {problem}\nreport: {report}\n{stderr}");
    }
    assert_eq!(report["frames_decoded"], sent.len() as u64, "{report}");
    assert_eq!(report["frames_dropped"], 0, "{report}");
    assert_eq!(report["packets_lost"], 0, "{report}");
}

#[test]
fn rtsp_tcp_h264_every_frame_by_content() {
    every_frame_by_content("h264", "tcp");
}

#[test]
fn rtsp_tcp_h265_every_frame_by_content() {
    every_frame_by_content("h265", "tcp");
}

#[test]
fn rtsp_udp_h264_every_frame_by_content() {
    every_frame_by_content("h264", "udp");
}

#[test]
fn rtsp_udp_h265_every_frame_by_content() {
    every_frame_by_content("h265", "udp");
}

#[test]
fn rtsp_udp_with_3_percent_loss_counts_every_frame_and_hands_on_none_damaged() {
    let ports = (47_000, 47_099);
    let loss = UdpLoss::start(&format!("udp sport {}-{}", ports.0, ports.1), 3);
    let (server_pairs, received, report, stderr) = pull("h264", "udp", |a| a.udp_ports = Some(ports));
    let sent = &server_pairs;
    let dropped_on_path = loss.dropped();
    drop(loss);
    assert!(dropped_on_path > 0, "the loss rule dropped nothing");
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} in {report}"));
    // Frames sent = decoded + dropped + skipped, exactly.
    assert_eq!(
        n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"),
        sent.len() as u64,
        "{report}\n{stderr}"
    );
    assert!(n("frames_dropped") > 0, "3% loss without NACK must cost frames: {report}");
    // At least what the rule dropped (retina's own socket may lose more
    // under load: the kernel drops on it are not ours to see).
    assert!(n("packets_lost") > 0, "lost {} of {dropped_on_path} dropped: {report}", n("packets_lost"));
    // Every frame handed on is one the server sent, whole, in order.
    // A frame whose access unit delimiter was lost (it travels in a packet
    // of its own, with no picture data) is whole but for it.
    let pairs = &server_pairs;
    let mut next = 0;
    let mut without_delimiter = 0;
    for (i, d) in received.iter().enumerate() {
        match pairs[next..].iter().position(|(whole, without_aud)| whole == d || without_aud == d) {
            Some(k) => {
                without_delimiter += usize::from(pairs[next + k].0 != *d);
                next += k + 1;
            }
            None => panic!(
                "decoded frame {i} ({d:016x}) is not one the server sent after the one before it (sent frame {:?} has it; {} sent, {} decoded)\n{report}\n{stderr}",
                sent.iter().position(|(whole, without_aud)| whole == d || without_aud == d),
                sent.len(),
                received.len()
            ),
        }
    }
    assert_eq!(received.len() as u64, n("frames_decoded"));
    eprintln!("{} frames decoded, {without_delimiter} of them whole but for a lost access unit delimiter", received.len());
}

#[test]
fn rtsp_wrong_credentials_back_off_and_name_the_servers_answer() {
    let mut args = RtspServerArgs::new(free_tcp_port().unwrap(), "h264", 300);
    args.credentials = Some(("operator".into(), "right-horse-battery".into()));
    let mut server = RtspServer::start(&args).expect("gst-rtsp-server starts");
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("username"), "operator\n").unwrap();
    std::fs::write(creds.path().join("password"), "wrong-staple\n").unwrap();
    let flag = format!("cams/door={}", creds.path().display());
    let runner = RunnerProcess::start(
        &zerodrop_e2e::rtsp_manifest(&server.url(), "h264", "tcp", 5),
        free_tcp_port().unwrap(),
        &["--credentials", &flag],
    )
    .expect("runner starts");
    runner.wait_metrics(Duration::from_secs(20), "four refused attempts", |m| {
        metric_sum(m, "zerodrop_ingest_errors_total", "reason=\"unauthorized\"") >= 4.0
    });
    let outcome = runner.stop().unwrap();
    let log = &outcome.stderr;
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("RTSP session failed")).collect();
    assert!(failures.len() >= 4, "{log}");
    // The error names the source and the server's answer; never the password.
    assert!(failures[0].contains("cams/door") && failures[0].contains("401"), "{}", failures[0]);
    assert!(!log.contains("wrong-staple") && !log.contains("right-horse-battery"), "a password reached the log");
    // Backoff, visible in the attempts' timestamps: each wait at least half
    // of a ceiling that doubles from 0.5 s.
    let times: Vec<f64> = failures.iter().map(|l| log_time(l)).collect();
    for (k, w) in times.windows(2).enumerate() {
        let floor = 0.25 * 2f64.powi(k as i32) * 0.9;
        assert!(w[1] - w[0] >= floor, "attempt {} came {:.3} s after the one before, expected at least {floor:.3} s:\n{}", k + 2, w[1] - w[0], failures.join("\n"));
    }
    assert!(times[3] - times[0] >= 1.5, "three backoffs took {:.3} s", times[3] - times[0]);
    // The right credentials then work.
    std::fs::write(creds.path().join("password"), "right-horse-battery\n").unwrap();
    let runner = RunnerProcess::start(
        &zerodrop_e2e::rtsp_manifest(&server.url(), "h264", "tcp", 30),
        free_tcp_port().unwrap(),
        &["--credentials", &flag],
    )
    .expect("runner starts");
    let (_, frames) = server.wait_session_end(Duration::from_secs(40)).expect("an authorised session plays to its end");
    runner.wait_metrics(Duration::from_secs(15), "every frame accounted for", |m| frames_accounted(m, "door") >= frames);
    let outcome = runner.stop().unwrap();
    assert_eq!(outcome.stream("door")["frames_decoded"], frames, "{}", outcome.stderr);
}

/// Seconds of the day of a log line's RFC 3339 timestamp.
fn log_time(line: &str) -> f64 {
    let t = line.split_whitespace().next().unwrap_or_default();
    let clock = t.split('T').nth(1).unwrap_or_default().trim_end_matches('Z');
    let mut parts = clock.split(':');
    let h: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let m: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let s: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    h * 3600.0 + m * 60.0 + s
}

#[test]
fn rtsp_server_killed_and_restarted_is_dialled_again_and_frames_resume() {
    let port = free_tcp_port().unwrap();
    let mut server = RtspServer::start(&RtspServerArgs::new(port, "h264", 3000)).expect("gst-rtsp-server starts");
    let runner = RunnerProcess::start(&zerodrop_e2e::rtsp_manifest(&server.url(), "h264", "tcp", 30), free_tcp_port().unwrap(), &[]).expect("runner starts");
    runner.wait_metrics(Duration::from_secs(20), "frames before the kill", |m| {
        metric_value(m, "zerodrop_frames_decoded_total", &["stream=\"door\""]).unwrap_or(0.0) >= 60.0
    });
    server.kill();
    let before = server.session_digests(0).unwrap();
    runner.wait_metrics(Duration::from_secs(10), "the source notices", |m| {
        metric_value(m, "zerodrop_ingest_connected", &["stream=\"door\""]) == Some(0.0)
    });
    // The end of the session handed on what it left: nothing more of it comes.
    let decoded_at_kill = runner.metrics().map(|m| metric_sum(&m, "zerodrop_frames_decoded_total", "door")).unwrap_or(0.0) as u64;
    // Back on the same port, with a short media this time.
    let mut server = RtspServer::start(&RtspServerArgs::new(port, "h264", 150)).expect("gst-rtsp-server restarts");
    let (session, frames) = server.wait_session_end(Duration::from_secs(60)).expect("the source dials again and plays");
    assert_eq!(session, 0);
    runner.wait_metrics(Duration::from_secs(15), "the new session's frames", |m| {
        metric_sum(m, "zerodrop_frames_decoded_total", "door") as u64 >= decoded_at_kill + frames
    });
    let m = runner.metrics().unwrap();
    assert!(metric_sum(&m, "zerodrop_ingest_reconnects_total", "door") >= 1.0, "{m}");
    let outage = metric_sum(&m, "zerodrop_ingest_disconnected_seconds_total", "door");
    assert!(outage > 0.0, "the gap is counted: {outage}");
    let outcome = runner.stop().unwrap();
    let received = zerodrop_e2e::read_digests(&outcome.au_log("cams", "door")).unwrap();
    let after = server.session_digests(0).unwrap();
    // The pattern and the encoder are deterministic: both servers' sessions
    // begin with the same frames. What was decoded is a prefix of the first
    // session, then every frame of the new one, by content.
    let k = (1..received.len()).find(|&i| received[i] == after[0]).expect("the new session's first frame was decoded");
    assert!(received.len() >= k + after.len(), "{} frames decoded after the reconnect, the new session sent {}", received.len() - k, after.len());
    assert_eq!(zerodrop_e2e::compare_digests(&after, &received[k..k + after.len()]), None, "{}", outcome.stderr);
    let head = &received[..k];
    assert!(head.len() >= 60 && head.iter().zip(&before).all(|(a, b)| a == b), "the first session's frames, in order");
}
