//! The local runner as a user meets it: `zerodrop run` and `zerodrop send` as
//! real processes, with heavy loss, bad input, silence and signals.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};
use zerodrop_e2e::{compare_digests, read_digests};

fn manifest(name: &str, codec: &str, port: u16, latency_ms: u32) -> String {
    zerodrop_e2e::single_source_manifest(name, codec, port, latency_ms, 15)
}

/// Runs `zerodrop send` to completion and returns its per-AU digests.
fn send(port: u16, codec: &str, frames: u32, loss: &str, seed: u64, dir: &std::path::Path) -> (Vec<u64>, serde_json::Value) {
    let hashes = dir.join("sent.au");
    let summary = dir.join("sent.json");
    let status = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", codec])
        .args(["--width", "640", "--height", "360", "--fps", "30", "--key-int", "30", "--bitrate", "1500"])
        .args(["--frames", &frames.to_string(), "--loss", loss, "--seed", &seed.to_string(), "--quiet"])
        .args(["--linger-ms", "1500"])
        .arg("--hashes")
        .arg(&hashes)
        .arg("--summary-json")
        .arg(&summary)
        .stdin(Stdio::null())
        .status()
        .expect("zerodrop send runs");
    assert!(status.success(), "zerodrop send failed: {status}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    (read_digests(&hashes).unwrap(), summary)
}

fn assert_every_frame_delivered_intact(
    port: u16,
    metrics_port: u16,
    codec: &str,
    frames: u32,
    loss: &str,
) -> serde_json::Value {
    let runner = RunnerProcess::start(&manifest("local", codec, port, 500), metrics_port, &[]).expect("runner starts");
    let (sent, summary) = send(port, codec, frames, loss, 7, runner.dir.path());
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("cam").clone();
    eprintln!("sender: {summary:#}\nreceiver: {stream:#}");
    assert_eq!(sent.len(), frames as usize, "sender encoded every frame");
    assert_eq!(stream["frames_dropped"], 0, "no frame dropped");
    assert_eq!(stream["frames_decoded"].as_u64().unwrap(), frames as u64, "decoder produced every frame");
    let received = read_digests(&outcome.au_log("local", "cam")).unwrap();
    if let Some(diff) = compare_digests(&sent, &received) {
        panic!("decoder input differs from the encoder output: {diff}");
    }
    stream
}

#[test]
fn own_sender_at_10_percent_loss_plus_bursts_delivers_every_frame_intact() {
    let stream = assert_every_frame_delivered_intact(22004, 22090, "h264", 300, "uniform:0.10+ge:loss=0.03,burst=6");
    assert!(stream["packets_lost"].as_u64().unwrap() > 50, "loss really happened");
    assert!(stream["packets_recovered_nack"].as_u64().unwrap() > 50, "and was repaired by retransmission");
}

#[test]
fn h265_stream_with_loss_delivers_every_frame_intact() {
    let stream = assert_every_frame_delivered_intact(22104, 22190, "h265", 150, "uniform:0.05");
    assert!(stream["packets_recovered_nack"].as_u64().unwrap() > 0);
}

#[test]
fn malformed_datagrams_are_counted_and_do_not_disturb_the_stream() {
    let port = 22204;
    let runner = RunnerProcess::start(&manifest("bad", "h264", port, 300), 22290, &[]).expect("runner starts");
    let garbage = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{port}");
    let junk: Vec<Vec<u8>> = vec![
        vec![],                                  // empty
        vec![0x80, 96, 0],                       // truncated header
        vec![0x8f, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1], // 15 CSRCs announced, none present
        vec![0xa0, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 2, 3, 200], // padding longer than the packet
        vec![0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0xbe, 0xde, 0, 9], // extension past the end
        vec![0x40, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0x65], // RTP version 1
        vec![0x80, 33, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0x65], // unknown payload type
        vec![0x80, 97, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0x01], // RTX shorter than its OSN
    ];
    for j in &junk {
        garbage.send_to(j, &to).unwrap();
    }
    // A real stream afterwards is received whole.
    let (sent, _) = send(port, "h264", 60, "none", 1, runner.dir.path());
    let metrics = runner.metrics().unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "{}", outcome.stderr);
    let discarded: f64 = ["rtp_header", "payload_type", "rtx_header"]
        .iter()
        .map(|r| metric_value(&metrics, "zerodrop_rtp_packets_discarded_total", &[&format!("reason=\"{r}\"")]).unwrap_or(0.0))
        .sum();
    assert_eq!(discarded as usize, junk.len(), "every malformed datagram counted:\n{metrics}");
    assert_eq!(outcome.stream("cam")["frames_dropped"], 0);
    assert_eq!(outcome.stream("cam")["frames_decoded"].as_u64().unwrap(), sent.len() as u64);
}

#[test]
fn sigterm_flushes_writes_the_report_and_exits_zero_and_silence_is_reported() {
    let port = 22304;
    let runner = RunnerProcess::start(&manifest("quiet", "h264", port, 300), 22390, &[]).expect("runner starts");
    let (sent, _) = send(port, "h264", 45, "uniform:0.05", 3, runner.dir.path());
    // The sender has stopped: the source must be reported silent, not crash.
    let deadline = Instant::now() + Duration::from_secs(10);
    let silent = loop {
        let m = runner.metrics().unwrap_or_default();
        if metric_value(&m, "zerodrop_stream_up", &["stream=\"cam\""]) == Some(0.0) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    };
    assert!(silent, "stream_up should drop to 0 after the source goes silent");
    let outcome = runner.stop_with(libc::SIGTERM, Duration::from_secs(20)).expect("runner stops");
    assert!(outcome.status.success(), "exit status {} after SIGTERM: {}", outcome.status, outcome.stderr);
    assert!(outcome.stderr.contains("source went silent"), "{}", outcome.stderr);
    assert_eq!(outcome.stream("cam")["frames_decoded"].as_u64().unwrap(), sent.len() as u64, "report written after flush");
}

#[test]
fn invalid_manifest_is_rejected_naming_document_field_and_expectation_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    let bad = manifest("bad-one", "h264", 22404, 300).replace("rtxPayloadType: 97", "rtxPayloadType: 96")
        + "---\n"
        + &manifest("bad-two", "vp9", 22504, 300);
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(zerodrop_bin())
        .args(["run"])
        .arg(&file)
        .args(["--metrics-addr", "127.0.0.1:22490"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "invalid input exits 2: {stderr}");
    assert!(stderr.contains("document 1 (bad-one)") && stderr.contains("rtxPayloadType"), "{stderr}");
    assert!(stderr.contains("document 2 (bad-two)") && stderr.contains("codec"), "{stderr}");
    // Nothing started: the metrics port was never bound.
    assert!(std::net::TcpStream::connect("127.0.0.1:22490").is_err());
}

#[test]
fn kernel_drops_of_a_too_small_receive_buffer_are_shown_per_stream() {
    let port = 22604;
    let yaml = manifest("kdrop", "h264", port, 300).replace(
        "          rtcpPort:",
        "          receiveBufferBytes: 65536\n          rtcpPort:",
    );
    let runner = RunnerProcess::start(&yaml, 22690, &[]).expect("runner starts");
    // Freeze the runner so that nothing reads the socket: everything beyond
    // the receive buffer is dropped by the kernel, deterministically.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(runner.pid() as libc::pid_t, libc::SIGSTOP) };
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sent = 3000usize;
    let datagram = [0x80u8, 33, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0u8, 1188))
        .collect::<Vec<u8>>();
    for _ in 0..sent {
        tx.send_to(&datagram, format!("127.0.0.1:{port}")).unwrap();
    }
    unsafe { libc::kill(runner.pid() as libc::pid_t, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (kernel, read) = loop {
        let m = runner.metrics().unwrap_or_default();
        let kernel: f64 = m
            .lines()
            .filter(|l| l.starts_with("zerodrop_kernel_udp_drops_total") && l.contains("stream=\"cam\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let read = metric_value(&m, "zerodrop_rtp_packets_discarded_total", &["reason=\"payload_type\""]).unwrap_or(0.0);
        if kernel as usize + read as usize == sent || Instant::now() > deadline {
            break (kernel as usize, read as usize);
        }
        std::thread::park_timeout(Duration::from_millis(100));
    };
    let table_metrics = runner.metrics().unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(kernel > 0, "the kernel dropped packets: {table_metrics}");
    assert_eq!(kernel + read, sent, "every datagram is either read or counted as a kernel drop");
    assert_eq!(outcome.stream("cam")["kernel_udp_drops"].as_u64().unwrap() as usize, kernel);
}

#[test]
fn a_sender_restarting_with_a_new_ssrc_is_picked_up_after_silence_without_drops() {
    let port = 22704;
    let runner = RunnerProcess::start(&manifest("restart", "h264", port, 300), 22790, &[]).expect("runner starts");
    let first_dir = runner.dir.path().join("first");
    let second_dir = runner.dir.path().join("second");
    std::fs::create_dir_all(&first_dir).unwrap();
    std::fs::create_dir_all(&second_dir).unwrap();
    let (first, _) = send(port, "h264", 45, "uniform:0.05", 11, &first_dir);
    // A new SSRC is accepted once the old source has gone silent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(&runner.metrics().unwrap_or_default(), "zerodrop_stream_up", &["stream=\"cam\""]) != Some(0.0) {
        assert!(Instant::now() < deadline, "the first source never went silent");
        std::thread::park_timeout(Duration::from_millis(100));
    }
    let (second, _) = send(port, "h264", 45, "uniform:0.05", 12, &second_dir);
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("sender restarted with a new SSRC"), "{}", outcome.stderr);
    let stream = outcome.stream("cam");
    assert_eq!(stream["frames_dropped"], 0, "{stream:#}");
    assert_eq!(stream["frames_decoded"].as_u64().unwrap(), 90, "{stream:#}");
    let sent: Vec<u64> = first.into_iter().chain(second).collect();
    let received = read_digests(&outcome.au_log("restart", "cam")).unwrap();
    if let Some(diff) = compare_digests(&sent, &received) {
        panic!("content differs across the restart: {diff}");
    }
}

/// User plus system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / hz
}

#[test]
fn a_source_that_never_sends_leaves_the_receiver_idle() {
    // A regression: a receiver with nobody to send reports to woke up at once,
    // forever, and burnt a core.
    let runner = RunnerProcess::start(&manifest("idle", "h264", 22804, 300), 22890, &[]).expect("runner starts");
    let before = cpu_seconds(runner.pid());
    let window = Duration::from_secs(3);
    let start = Instant::now();
    while start.elapsed() < window {
        std::thread::park_timeout(window - start.elapsed()); // observing an idle process for a while is the test
    }
    let used = cpu_seconds(runner.pid()) - before;
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success());
    assert!(used < 0.3, "an idle receiver used {used:.2} CPU-seconds in {window:?}");
}

/// `scripts/demo.sh` as a test: the very manifest (`examples/local-demo.yaml`,
/// 300 ms budget, 8 retries), both of its sources with the demo's loss
/// profile (12% random plus Gilbert–Elliott bursts), 720p30, side by side.
/// Every frame each sender encoded is decoded, byte-identical, and the books
/// balance exactly: encoded = decoded + dropped + skipped.
#[test]
fn the_demo_loss_profile_drops_no_frame_and_every_frame_is_accounted_for() {
    const LOSS: &str = "uniform:0.12+ge:loss=0.03,burst=8";
    const FRAMES: u32 = 450;
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local-demo.yaml")).unwrap();
    let runner = RunnerProcess::start(&manifest, 9464, &[]).expect("runner starts on the demo manifest");
    let senders: Vec<_> = [(5004, 1, "smpte", "cam-1"), (5104, 2, "ball", "cam-2")]
        .into_iter()
        .map(|(port, seed, pattern, name)| {
            let dir = runner.dir.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new(zerodrop_bin())
                .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--frames", &FRAMES.to_string()])
                .args(["--loss", LOSS, "--seed", &seed.to_string(), "--pattern", pattern, "--quiet"])
                .arg("--hashes")
                .arg(dir.join("sent.au"))
                .stdin(Stdio::null())
                .spawn()
                .expect("zerodrop send starts");
            (name, dir, child)
        })
        .collect();
    let mut sent = Vec::new();
    for (name, dir, mut child) in senders {
        assert!(child.wait().unwrap().success(), "zerodrop send for {name} failed");
        sent.push((name, read_digests(&dir.join("sent.au")).unwrap()));
    }
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    for (name, digests) in sent {
        let stream = outcome.stream(name);
        eprintln!("{name}: {stream:#}");
        let n = |k: &str| stream[k].as_u64().unwrap();
        assert_eq!(digests.len(), FRAMES as usize, "{name}: the sender encoded every frame");
        assert!(n("packets_lost") > 0, "{name}: the loss profile took packets");
        assert_eq!(n("frames_dropped"), 0, "{name}: no frame dropped");
        assert_eq!(n("frames_skipped_before_keyframe"), 0, "{name}: nothing skipped at the start");
        assert_eq!(n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"), FRAMES as u64, "{name}: the books balance");
        assert_eq!(n("frames_decoded"), FRAMES as u64, "{name}: every frame decoded");
        let received = read_digests(&outcome.au_log("demo", name)).unwrap();
        if let Some(diff) = compare_digests(&digests, &received) {
            panic!("{name}: decoder input differs from the encoder output: {diff}");
        }
    }
}

/// A receiver that starts while a stream is mid-GOP (a 5 s GOP, joined
/// about a second in) asks for a keyframe at once and again until one comes,
/// instead of waiting for the sender's next periodic keyframe; the time it
/// took shows as `zerodrop_join_to_first_frame_seconds` and in the report.
#[test]
fn a_receiver_joining_mid_gop_gets_its_first_frame_in_well_under_a_gop() {
    use zerodrop_testbench::loss::LossSpec;
    use zerodrop_testbench::relay::{Relay, RelayConfig};
    let port = 25004;
    // The relay forwards to a port nobody listens on yet, as a sender would
    // stream to a receiver that is not up.
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse("none").unwrap(),
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{port}").parse().unwrap())
    })
    .expect("relay starts");
    let mut sender = Command::new(zerodrop_bin())
        .args(["send", "--dest", &relay.addrs().rtp.to_string(), "--frames", "300"])
        .args(["--width", "640", "--height", "360", "--key-int", "150", "--bitrate", "1500", "--quiet"])
        .stdin(Stdio::null())
        .spawn()
        .expect("zerodrop send starts");
    // About a second into the GOP: 30 frames' worth of packets went nowhere.
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.stats().forwarded + relay.stats().send_errors < 100 {
        assert!(Instant::now() < deadline, "the sender never started: {:?}", relay.stats());
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let runner = RunnerProcess::start(&manifest("join", "h264", port, 300), 25090, &[]).expect("runner starts");
    assert!(sender.wait().unwrap().success());
    relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("cam");
    eprintln!("receiver: {stream:#}");
    let join_ms = stream["join_to_first_frame_ms"].as_f64().expect("join-to-first-frame reported");
    assert!(stream["keyframe_requests"].as_u64().unwrap() >= 1, "a keyframe was asked for");
    assert!(join_ms < 1000.0, "first frame {join_ms} ms after joining, the next periodic keyframe was seconds away");
    assert_eq!(stream["frames_dropped"], 0);
    assert!(stream["frames_skipped_before_keyframe"].as_u64().unwrap() < 30, "{stream:#}");
}
