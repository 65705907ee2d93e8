//! `ffmpeg -f rtp` as the sender: a peer nobody here wrote, that neither
//! retransmits nor answers keyframe requests. What the network takes cannot
//! be repaired, so frames are dropped; the test is that every one of them is
//! counted: frames ffmpeg encoded = decoded + dropped + skipped, exactly;
//! with the parameter sets in band, and out of band (only in ffmpeg's SDP,
//! given to the receiver as the source's `parameterSets`).

use std::process::{Command, Stdio};

use zerodrop_testbench::loss::LossSpec;
use zerodrop_testbench::relay::{Relay, RelayConfig};
use zerodrop_e2e::runner::RunnerProcess;

const FRAMES: u64 = 300;

/// x264 settings of every run: 720p30, no B-frames, a keyframe every 30 frames.
const X264: [&str; 14] =
    ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "30", "-bf", "0", "-b:v", "2M", "-payload_type", "96"];

/// Streams `frames` frames of 720p30 H.264 to `rtp_port`, in real time (`-re`
/// unless `sdp` asks only for the session description). `out_of_band`: the
/// parameter sets go only into the SDP (`-flags +global_header`), never into
/// the RTP stream. `sdp`: where ffmpeg writes its session description.
fn ffmpeg_send(rtp_port: u16, frames: u64, out_of_band: bool, sdp: Option<&std::path::Path>) {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin"]);
    if sdp.is_none() {
        cmd.arg("-re");
    }
    cmd.args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-frames:v", &frames.to_string()])
        .args(X264);
    if out_of_band {
        cmd.args(["-flags", "+global_header"]);
    }
    cmd.args(["-f", "rtp"]).arg(format!("rtp://127.0.0.1:{rtp_port}?pkt_size=1200"));
    if let Some(sdp) = sdp {
        cmd.arg("-sdp_file").arg(sdp);
    }
    let status = cmd.stdin(Stdio::null()).status().expect("ffmpeg runs (install it with scripts/install-deps.sh)");
    assert!(status.success(), "ffmpeg failed: {status}");
}

/// The `sprop-parameter-sets` ffmpeg announces for these settings with the
/// parameter sets out of band: what a user copies from the SDP into
/// `parameterSets`. Read from a one-frame run to a port nobody listens on
/// (x264's parameter sets depend on the settings, not on the frames).
fn ffmpeg_sprop_parameter_sets() -> String {
    let dir = tempfile::tempdir().unwrap();
    let sdp_path = dir.path().join("session.sdp");
    ffmpeg_send(9, 1, true, Some(&sdp_path));
    let sdp = std::fs::read_to_string(&sdp_path).unwrap();
    let fmtp = sdp.lines().find(|l| l.starts_with("a=fmtp:96")).unwrap_or_else(|| panic!("no fmtp line in {sdp}"));
    let value = fmtp.split(';').map(str::trim).find_map(|p| p.strip_prefix("sprop-parameter-sets=").or_else(|| p.split_once(' ').and_then(|(_, p)| p.strip_prefix("sprop-parameter-sets="))));
    value.unwrap_or_else(|| panic!("no sprop-parameter-sets in {fmtp}")).to_string()
}

fn run(port: u16, metrics_port: u16, loss: &str) -> serde_json::Value {
    run_with(port, metrics_port, loss, None)
}

/// `parameter_sets`: send them out of band only and give the receiver these
/// (the SDP's sprop-parameter-sets) in the source's `parameterSets`.
fn run_with(port: u16, metrics_port: u16, loss: &str, parameter_sets: Option<&str>) -> serde_json::Value {
    let mut manifest = zerodrop_e2e::single_source_manifest("ff", "h264", port, 300, 8).replace("      rtxPayloadType: 97\n", "");
    if let Some(sets) = parameter_sets {
        manifest = manifest.replace("      codec: h264\n", &format!("      codec: h264\n      parameterSets: \"{sets}\"\n"));
        assert!(manifest.contains("parameterSets"), "{manifest}");
    }
    let runner = RunnerProcess::start(&manifest, metrics_port, &[]).expect("runner starts");
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse(loss).unwrap(),
        seed: 3,
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{port}").parse().unwrap())
    })
    .expect("relay starts");
    ffmpeg_send(relay.addrs().rtp.port(), FRAMES, parameter_sets.is_some(), None);
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

#[test]
fn ffmpeg_sender_with_parameter_sets_out_of_band_every_frame_is_decoded() {
    let sets = ffmpeg_sprop_parameter_sets();
    let stream = run_with(23204, 23290, "none", Some(&sets));
    assert_eq!(stream["frames_decoded"].as_u64().unwrap(), FRAMES);
    // Every keyframe (one per 30 frames) came without parameter sets and was
    // handed on with the SDP's in front: proof the stream had none in band.
    assert_eq!(stream["parameter_sets_inserted"].as_u64().unwrap(), FRAMES / 30);
}

#[test]
fn ffmpeg_sender_with_parameter_sets_out_of_band_through_loss_every_frame_is_accounted_for() {
    let sets = ffmpeg_sprop_parameter_sets();
    let stream = run_with(23304, 23390, "uniform:0.02", Some(&sets));
    let n = |k: &str| stream[k].as_u64().unwrap();
    assert!(n("frames_dropped") > 0, "ffmpeg does not retransmit: loss costs frames");
    // At 2% nearly every GOP (about 250 packets) loses a packet; after each
    // loss the next keyframe, led by no parameter set of its own, must still
    // be recognised as whole, get the SDP's parameter sets and be decoded.
    assert!(n("parameter_sets_inserted") >= 3, "keyframes after losses were decoded: {stream:#}");
    assert_eq!(n("frames_decoded"), n("frames_assembled"), "every frame handed on was decoded");
}
