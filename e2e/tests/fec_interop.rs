//! FEC from GStreamer's own encoders, through the seeded lossy relay, into a
//! real `zerodrop run` with NACK disabled: FEC alone must repair.
//!
//! - ST 2022-1, 2-D, from `rtpst2022-1-fecenc` (column and row FEC on ports
//!   of their own, media at SSRC 0): at 3% random loss on every stream,
//!   every frame of the measured set reaches the decoder byte-identical to
//!   what x264 produced.
//! - ULPFEC from `rtpulpfecenc`: at 2% random loss, at least 90% of the lost
//!   media packets are rebuilt, each byte-identical to the dropped original.
//!
//! The sender streams 30 frames past the measured set so that the end of the
//! stream (a last FEC matrix never completed) is not what is judged.

use std::collections::HashMap;
use std::net::SocketAddr;

use zerodrop_testbench::loss::LossSpec;
use zerodrop_testbench::relay::{Relay, RelayConfig};
use zerodrop_testbench::gst_fec_sender::{self, GstFec, GstFecSenderConfig};
use zerodrop_e2e::read_digests;
use zerodrop_e2e::runner::RunnerProcess;

const MEASURED: usize = 300;
const TAIL: u32 = 30;

fn manifest(port: u16, fec: &str) -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata:
  name: fec
spec:
  sources:
    - name: gst
      codec: h264
      payloadType: 96
      transport:
        rtp:
          listenAddress: 127.0.0.1
          port: {port}
          rtcpPort: {rtcp}
          fec: {fec}
  repair:
    latencyMs: 400
    nack:
      enabled: false
    fec:
      enabled: true
  decode:
    decoder: software
"#,
        rtcp = port + 1
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `seq digest` lines, as the relay's drop log and the receiver's recovered
/// log write them.
fn read_packet_log(path: &std::path::Path) -> HashMap<u16, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, u64::from_str_radix(f.next()?, 16).ok()?))
        })
        .collect()
}

#[test]
fn st2022_1_2d_fec_from_gstreamer_repairs_3_percent_loss_without_nack() {
    let (columns, rows) = (5, 5);
    let port = 21204;
    let runner = RunnerProcess::start(
        &manifest(port, &format!("{{scheme: st2022-1, ports: [{}, {}]}}", port + 2, port + 4)),
        21290,
        &[],
    )
    .expect("runner starts");
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse("uniform:0.03").unwrap(),
        seed: 7,
        fec_forward: vec![loopback(port + 2), loopback(port + 4)],
        ..RelayConfig::new(loopback(0), loopback(port))
    })
    .expect("relay starts");
    let addrs = relay.addrs();
    let sent = gst_fec_sender::run(&GstFecSenderConfig {
        frames: MEASURED as u32 + TAIL,
        ..GstFecSenderConfig::new(
            addrs.rtp,
            GstFec::St2022_1 { columns, rows, column_dest: addrs.fec[0], row_dest: addrs.fec[1] },
        )
    })
    .expect("GStreamer FEC sender runs");
    let relay_stats = relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("gst");
    eprintln!("{columns}x{rows} ST 2022-1 at 3%: relay {relay_stats:?}\nreceiver: {stream:#}");

    assert!(relay_stats.dropped > 20 && relay_stats.fec_dropped > 5, "the relay must drop media and FEC: {relay_stats:?}");
    assert!(relay_stats.fec_forwarded > 0, "column and row FEC reached the receiver");
    assert_eq!(stream["nacks_sent"], 0, "NACK is disabled");
    assert!(stream["packets_recovered_fec"].as_u64().unwrap() > 20, "FEC rebuilt the losses");
    let received = read_digests(&outcome.au_log("fec", "gst")).unwrap();
    assert!(received.len() >= MEASURED, "only {} frames reached the decoder", received.len());
    let damaged: Vec<usize> = (0..MEASURED).filter(|&i| sent.digests[i] != received[i]).collect();
    assert!(damaged.is_empty(), "frames missing or differing from the encoder's output, first at {:?}", &damaged[..damaged.len().min(10)]);
}

#[test]
fn ulpfec_from_gstreamer_rebuilds_90_percent_of_lost_media_byte_identical() {
    let port = 21304;
    let fec_pt = 122;
    let runner = RunnerProcess::start(&manifest(port, &format!("{{scheme: ulpfec, payloadType: {fec_pt}}}")), 21390, &[])
        .expect("runner starts");
    let drop_log = runner.dir.path().join("relay-drops.log");
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse("uniform:0.02").unwrap(),
        seed: 11,
        fec_payload_type: Some(fec_pt),
        drop_log: Some(drop_log.clone()),
        ..RelayConfig::new(loopback(0), loopback(port))
    })
    .expect("relay starts");
    let sent = gst_fec_sender::run(&GstFecSenderConfig {
        frames: MEASURED as u32 + TAIL,
        ..GstFecSenderConfig::new(relay.addrs().rtp, GstFec::Ulpfec { percentage: 50, payload_type: fec_pt })
    })
    .expect("GStreamer FEC sender runs");
    let relay_stats = relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("gst");
    eprintln!("ULPFEC 50% at 2%: {} frames sent; relay {relay_stats:?}\nreceiver: {stream:#}", sent.frames_sent);

    let dropped = read_packet_log(&drop_log);
    let rebuilt = read_packet_log(&outcome.recovered_log("fec", "gst"));
    assert!(dropped.len() > 20, "the relay must drop media packets: {}", dropped.len());
    let wrong: Vec<u16> = rebuilt.iter().filter(|(seq, d)| dropped.get(seq) != Some(d)).map(|(s, _)| *s).collect();
    assert!(wrong.is_empty(), "rebuilt packets that differ from (or were never) a dropped original: {wrong:?}");
    let mut missed: Vec<u16> = dropped.keys().filter(|s| !rebuilt.contains_key(s)).copied().collect();
    missed.sort();
    let mut all: Vec<u16> = dropped.keys().copied().collect();
    all.sort();
    eprintln!("dropped {all:?}\nnot rebuilt {missed:?}");
    let share = rebuilt.len() as f64 / dropped.len() as f64;
    eprintln!("{}", outcome.stderr.lines().filter(|l| l.contains("FEC")).collect::<Vec<_>>().join("\n"));
    eprintln!("rebuilt {} of {} lost media packets ({:.1}%)", rebuilt.len(), dropped.len(), share * 100.0);
    assert!(share >= 0.9, "only {:.1}% of lost media packets were rebuilt", share * 100.0);
    assert_eq!(stream["packets_recovered_fec"].as_u64().unwrap(), rebuilt.len() as u64);
}

/// Our own sender's ST 2022-1 FEC (the same wire format as GStreamer's) with
/// NACK on, over a 60 ms round trip (the relay holds NACKs on their way up):
/// row FEC comes sooner than a retransmission could, so a loss it will
/// rebuild is not asked for; a loss only column FEC (a matrix later) or
/// nothing could rebuild is asked for at once.
#[test]
fn fec_and_nack_together_nack_only_what_fec_cannot_rebuild_in_time() {
    let port = 21404;
    let manifest = manifest(port, &format!("{{scheme: st2022-1, ports: [{}, {}]}}", port + 2, port + 4))
        .replace("      payloadType: 96\n", "      payloadType: 96\n      rtxPayloadType: 97\n")
        .replace("nack:\n      enabled: false", "nack:\n      enabled: true");
    let runner = RunnerProcess::start(&manifest, 21490, &[]).expect("runner starts");
    let relay = Relay::start(RelayConfig {
        feedback_delay: std::time::Duration::from_millis(60),
        rtx_payload_type: Some(97),
        fec_forward: vec![loopback(port + 2), loopback(port + 4)],
        ..RelayConfig::new(loopback(0), loopback(port))
    })
    .expect("relay starts");
    let addrs = relay.addrs();
    let hashes = runner.dir.path().join("sent.au");
    let summary = runner.dir.path().join("sent.json");
    let fec_dest = format!("{},{}", addrs.fec[0], addrs.fec[1]);
    let status = std::process::Command::new(zerodrop_e2e::runner::zerodrop_bin())
        .args(["send", "--dest", &addrs.rtp.to_string(), "--rtcp-dest", &addrs.rtcp.to_string(), "--codec", "h264"])
        .args(["--fec-dest", &fec_dest])
        .args(["--width", "640", "--height", "360", "--fps", "30", "--key-int", "30", "--bitrate", "1500"])
        .args(["--frames", "300", "--loss", "uniform:0.08", "--seed", "3", "--quiet", "--linger-ms", "1500"])
        .args(["--fec", "st2022-1:10x4"])
        .arg("--hashes")
        .arg(&hashes)
        .arg("--summary-json")
        .arg(&summary)
        .status()
        .expect("zerodrop send runs");
    assert!(status.success());
    relay.stop().expect("relay stops");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("gst");
    let sent_summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    eprintln!("sender: {sent_summary:#}\nreceiver: {stream:#}");

    let n = |k: &str| stream[k].as_u64().unwrap();
    assert_eq!(n("frames_dropped"), 0);
    assert_eq!(n("packets_unrecovered"), 0);
    assert!(n("packets_recovered_fec") > 0 && n("packets_recovered_nack") > 0, "both repaired");
    // Row FEC (due within a row, sooner than the 60 ms round trip) rebuilt
    // packets nobody asked for; losses only column FEC could rebuild (a
    // matrix later) were asked for at once, and FEC or the retransmission,
    // whichever came first, filled them.
    assert!(n("nacks_avoided") > n("packets_lost") / 5, "FEC rebuilt packets before any request");
    // Over this 60 ms round trip a packet NACK repairs costs about two
    // retransmissions (the first retry often leaves before the first answer
    // is back: 168-179 retransmissions for the ~80 NACK repaired in runs of
    // this test), so without FEC the 170 losses would cost about 340. With
    // FEC rebuilding about half before anyone asks, the total stays near the
    // loss count; the bound leaves room for run-to-run spread, not for FEC
    // doing nothing.
    let rtx_sent = sent_summary["rtx_sent"].as_u64().unwrap();
    let lost = n("packets_lost");
    assert!(rtx_sent < lost + lost / 5, "FEC spared retransmissions: {rtx_sent} for {lost} lost");
    let sent = read_digests(&hashes).unwrap();
    let received = read_digests(&outcome.au_log("fec", "gst")).unwrap();
    assert_eq!(zerodrop_e2e::compare_digests(&sent, &received), None);
}
