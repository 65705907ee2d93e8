//! `ffmpeg -f rtp` as the sender: a peer nobody here wrote, that neither
//! retransmits nor answers keyframe requests. What the network takes cannot
//! be repaired, so frames are dropped; the test is that every one of them is
//! counted: frames ffmpeg encoded = decoded + dropped + skipped, exactly.

use std::process::{Command, Stdio};

use zerodrop_dataplane::loss::LossSpec;
use zerodrop_dataplane::relay::{Relay, RelayConfig};
use zerodrop_e2e::runner::RunnerProcess;

const FRAMES: u64 = 300;

/// Streams `FRAMES` frames of 720p30 H.264 (x264, no B-frames, a keyframe
/// every 30 frames, parameter sets in band) to `rtp_port`, in real time.
fn ffmpeg_send(rtp_port: u16) {
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-frames:v", &FRAMES.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "30", "-bf", "0", "-b:v", "2M"])
        .args(["-payload_type", "96", "-f", "rtp"])
        .arg(format!("rtp://127.0.0.1:{rtp_port}?pkt_size=1200"))
        .stdin(Stdio::null())
        .status()
        .expect("ffmpeg runs (install it with scripts/install-deps.sh)");
    assert!(status.success(), "ffmpeg failed: {status}");
}

fn run(port: u16, metrics_port: u16, loss: &str) -> serde_json::Value {
    let manifest = zerodrop_e2e::single_source_manifest("ff", "h264", port, 300, 8).replace("      rtxPayloadType: 97\n", "");
    let runner = RunnerProcess::start(&manifest, metrics_port, &[]).expect("runner starts");
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse(loss).unwrap(),
        seed: 3,
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{port}").parse().unwrap())
    })
    .expect("relay starts");
    ffmpeg_send(relay.addrs().rtp.port());
    let relay_stats = relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("cam").clone();
    eprintln!("relay: {relay_stats:?}\nreceiver: {stream:#}");
    let n = |k: &str| stream[k].as_u64().unwrap();
    assert_eq!(
        n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"),
        FRAMES,
        "frames ffmpeg encoded = decoded + dropped + skipped"
    );
    assert!(n("frames_decoded") <= n("frames_assembled"), "no more frames decoded than handed to the decoder");
    stream
}

#[test]
fn ffmpeg_sender_without_loss_every_frame_is_decoded() {
    let stream = run(23004, 23090, "none");
    assert_eq!(stream["frames_decoded"].as_u64().unwrap(), FRAMES);
}

#[test]
fn ffmpeg_sender_through_loss_it_cannot_repair_every_frame_is_accounted_for() {
    let stream = run(23104, 23190, "uniform:0.02");
    assert!(stream["packets_unrecovered"].as_u64().unwrap() > 0, "ffmpeg does not retransmit: some loss stays");
    assert!(stream["frames_dropped"].as_u64().unwrap() > 0, "and costs frames, counted as dropped");
}
