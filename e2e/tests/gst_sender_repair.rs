//! A GStreamer sender (rtpbin + rtprtxsend + x264enc, 720p30) streams through
//! the seeded lossy relay to a real `zerodrop run` process. Every frame must
//! reach the decoder, byte-identical to what the encoder produced.

use zerodrop_dataplane::loss::LossSpec;
use zerodrop_dataplane::relay::{Relay, RelayConfig};
use zerodrop_e2e::gst_sender::{self, GstSenderConfig};
use zerodrop_e2e::runner::RunnerProcess;
use zerodrop_e2e::{compare_digests, read_digests};

fn manifest(port: u16) -> String {
    zerodrop_e2e::single_source_manifest("e2e", "h264", port, 400, 10).replace("name: cam", "name: gst")
}

#[test]
fn gstreamer_sender_720p30_through_3_percent_loss_delivers_every_frame_byte_identical() {
    let runner = RunnerProcess::start(&manifest(21004), 21090, &[]).expect("runner starts");
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse("uniform:0.03").unwrap(),
        seed: 42,
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), "127.0.0.1:21004".parse().unwrap())
    })
    .expect("relay starts");
    let addrs = relay.addrs();
    let sent = gst_sender::run(&GstSenderConfig {
        rtp_dest: addrs.rtp,
        rtcp_dest: addrs.rtcp,
        frames: 600,
        ..GstSenderConfig::default()
    })
    .expect("GStreamer sender runs");
    let relay_stats = relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);

    let stream = outcome.stream("gst");
    eprintln!("relay: {relay_stats:?}\nsender: {} frames, {} RTX\nreceiver: {stream:#}", sent.frames_sent, sent.rtx_packets_sent);
    assert_eq!(sent.frames_sent, 600);
    assert!(relay_stats.dropped > 0, "the relay must actually drop packets");
    assert!(stream["packets_recovered_nack"].as_u64().unwrap() > 0, "losses were repaired by NACK/RTX");
    assert_eq!(stream["frames_dropped"], 0, "no frame may be dropped");
    assert_eq!(stream["frames_decoded"].as_u64().unwrap(), sent.frames_sent as u64, "every sent frame decoded");

    let received = read_digests(&outcome.au_log("e2e", "gst")).unwrap();
    if let Some(diff) = compare_digests(&sent.digests, &received) {
        panic!("content differs from what the encoder produced: {diff}");
    }
}
