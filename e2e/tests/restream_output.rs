//! RTP restream as another receiver meets it: a stream loses 5% of its
//! packets on its way to `zerodrop run`, which repairs it and sends it on;
//! GStreamer's own RTP receiver (`rtpbin` ! `rtph264depay`), fed by the
//! restream, gets every frame, byte for byte what the sender's encoder made.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::read_digests;
use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};
use zerodrop_testbench::gst_receiver::{GstReceiver, GstReceiverConfig};

const FRAMES: usize = 300;

#[test]
fn a_stream_repaired_from_5_percent_loss_reaches_a_gstreamer_receiver_through_the_restream_byte_identical() {
    let (port, restream_port) = (25504, 25520);
    let gst = GstReceiver::start(&GstReceiverConfig {
        rtp_port: restream_port,
        // Its receiver reports go nowhere in particular: the restream does
        // not read them.
        rtcp_dest: "127.0.0.1:25530".parse().unwrap(),
        latency_ms: 200,
        payload_type: 96,
        rtx_payload_type: 97,
        receive_buffer: 4 << 20,
        rtx_tuned_for_loopback: false,
        nack: false,
        fec_ports: vec![],
        request_keyframe: false,
        wait_for_keyframe: true,
    })
    .expect("GStreamer receiver starts");
    let manifest = zerodrop_e2e::single_source_manifest("relay", "h264", port, 400, 15)
        .replace("      payloadType: 96\n", &format!("      payloadType: 96\n      outputs:\n        restream:\n          - {{address: 127.0.0.1, port: {restream_port}}}\n"));
    let runner = RunnerProcess::start(&manifest, 25590, &[]).expect("runner starts");

    let dir = tempfile::tempdir().unwrap();
    let hashes = dir.path().join("sent.au");
    let status = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", "h264"])
        .args(["--width", "640", "--height", "360", "--fps", "30", "--key-int", "30", "--bitrate", "1500"])
        .args(["--frames", &FRAMES.to_string(), "--loss", "uniform:0.05", "--seed", "5", "--quiet", "--linger-ms", "1000"])
        .arg("--hashes")
        .arg(&hashes)
        .stdin(Stdio::null())
        .status()
        .expect("zerodrop send runs");
    assert!(status.success(), "zerodrop send failed: {status}");
    let sent = read_digests(&hashes).unwrap();
    assert_eq!(sent.len(), FRAMES);

    // Until GStreamer has them all; the deadline only keeps a broken build
    // from hanging the suite.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gst.access_units() < FRAMES && Instant::now() < deadline {
        gst.check_error().expect("the GStreamer receiver runs");
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let metrics = runner.metrics().unwrap();
    let restreamed = metric_value(&metrics, "zerodrop_restream_packets_sent_total", &["stream=\"cam\""]).unwrap();
    let errors = metric_value(&metrics, "zerodrop_restream_send_errors_total", &["stream=\"cam\""]).unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let report = gst.stop().unwrap();
    let stream = outcome.stream("cam");
    eprintln!(
        "ours: lost {} recovered {} dropped {}; restream {restreamed} packets, {errors} errors; GStreamer: {} packets, {} AUs, jitterbuffer {}",
        stream["packets_lost"], stream["packets_recovered_nack"], stream["frames_dropped"],
        report.packets_received, report.aus.len(), report.jitterbuffer
    );
    assert!(stream["packets_lost"].as_u64().unwrap() > 50, "the path lost packets: {stream:#}");
    assert_eq!(stream["frames_dropped"], 0, "our repair recovered every frame: {stream:#}");
    assert_eq!(errors, 0.0);
    assert_eq!(report.jitterbuffer["num-lost"], 0, "the restream lost nothing on its way: {}", report.jitterbuffer);
    let got: Vec<u64> = report.aus.iter().map(|a| a.digest).collect();
    assert_eq!(got.len(), FRAMES, "GStreamer received every frame");
    if let Some(diff) = zerodrop_e2e::compare_digests(&sent, &got) {
        panic!("what GStreamer received differs from what the encoder made: {diff}");
    }
}
