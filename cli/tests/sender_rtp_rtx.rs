//! The test sender end to end into plain UDP sockets: one RTP timestamp per
//! encoded frame, NACK answered by RTX with the original payload, PLI answered
//! by a keyframe, malformed RTCP survived.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use zerodrop_dataplane::ingest::udp::{bind_rtp_rtcp_pair, with_port_offset};
use zerodrop_dataplane::rtp::{self, ReceiverFeedback, RtcpEvent, RtpPacket};
use zerodrop_testbench::sender::{SendArgs, Sender};

const SSRC: u32 = 0x1234_5678;
const RTX_SSRC: u32 = 0x0bad_cafe;

fn receiver_pair() -> (UdpSocket, UdpSocket) {
    let (rtp, rtcp) = bind_rtp_rtcp_pair("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    for s in [&rtp, &rtcp] {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    }
    (rtp, rtcp)
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("zerodrop-{}-{name}", std::process::id()))
}

fn send_args(dest: SocketAddr, extra: &[&str]) -> SendArgs {
    let dest = dest.to_string();
    let ssrc = SSRC.to_string();
    let rtx_ssrc = format!("{RTX_SSRC:#x}");
    let mut argv = vec![
        "send", "--dest", &dest, "--width", "320", "--height", "240", "--fps", "30", "--bitrate", "300",
        "--ssrc", &ssrc, "--rtx-ssrc", &rtx_ssrc, "--loss", "none", "--quiet", "--linger-ms", "10000",
        "--sr-interval-ms", "200",
    ];
    argv.extend_from_slice(extra);
    SendArgs::try_parse_from(argv).unwrap()
}

fn feedback(nacks: &[u16], pli: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let fb = ReceiverFeedback { nacks, pli, media_ssrc: SSRC, ..Default::default() };
    rtp::write_receiver_rtcp(0x4242, "test-receiver", &fb, &mut out).unwrap();
    out
}

#[test]
fn sender_sends_one_rtp_timestamp_per_frame_and_answers_nack_with_original_payload() {
    let (rcv_rtp, rcv_rtcp) = receiver_pair();
    let hashes = temp_path("hashes.txt");
    let hashes_arg = hashes.to_str().unwrap().to_string();
    let sender = Sender::start(send_args(rcv_rtp.local_addr().unwrap(), &["--frames", "60", "--hashes", &hashes_arg]))
        .unwrap();

    let mut timestamps = BTreeSet::new();
    let mut media: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut media_packets = 0u64;
    let mut nacked: Option<u16> = None;
    let mut rtx_checked = false;
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "sender did not finish: {:?}", sender.stats());
        let received = rcv_rtp.recv_from(&mut buf);
        let Ok((n, src)) = received else {
            // Quiet socket after EOS: every packet has been delivered.
            if sender.stats().eos && rtx_checked {
                break;
            }
            continue;
        };
        let packet = RtpPacket::parse(&buf[..n]).expect("valid RTP");
        match packet.payload_type() {
            96 => {
                assert_eq!(packet.ssrc(), SSRC);
                media_packets += 1;
                timestamps.insert(packet.timestamp());
                media.insert(packet.sequence_number(), packet.payload().to_vec());
                if nacked.is_none() && media.len() >= 10 {
                    // The receiver answers RTCP to the RTP source port + 1.
                    assert_eq!(src.port() + 1, sender.addrs().rtcp.port());
                    let seq = packet.sequence_number().wrapping_sub(5);
                    assert!(media.contains_key(&seq));
                    rcv_rtcp.send_to(&feedback(&[seq], false), with_port_offset(src, 1)).unwrap();
                    nacked = Some(seq);
                }
            }
            97 => {
                assert_eq!(packet.ssrc(), RTX_SSRC);
                let rtx = rtp::parse_rtx(packet.payload()).expect("RTX payload");
                assert_eq!(Some(rtx.original_seq), nacked, "RTX answers the NACKed sequence number");
                assert_eq!(rtx.payload, &media[&rtx.original_seq][..], "RTX carries the original payload");
                rtx_checked = true;
            }
            pt => panic!("unexpected payload type {pt}"),
        }
    }
    let summary = sender.stop().unwrap();
    let s = summary.stats;
    assert_eq!(s.frames_encoded, 60);
    assert_eq!(s.frames_sent, 60);
    assert_eq!(timestamps.len() as u64, s.frames_sent, "one RTP timestamp per frame");
    assert_eq!(media_packets, s.packets_sent);
    assert_eq!((s.packets_dropped, s.nacks_received, s.rtx_sent, s.rtx_dropped), (0, 1, 1, 0));
    assert_eq!((summary.ssrc, summary.rtx_ssrc), (SSRC, RTX_SSRC));

    // Sender reports arrived at the receiver's RTCP port.
    let mut srs = 0;
    let mut events = Vec::new();
    while let Ok(n) = rcv_rtcp.recv(&mut buf) {
        events.clear();
        if rtp::parse_rtcp(&buf[..n], &mut events).is_ok() {
            srs += events.iter().filter(|e| matches!(e, RtcpEvent::SenderReport { ssrc: SSRC, .. })).count();
        }
    }
    assert!(srs >= 1, "no sender report received");

    // One digest line per frame, keyed by the frame's RTP timestamp, with
    // the sender's clock when it went out.
    let text = std::fs::read_to_string(&hashes).unwrap();
    std::fs::remove_file(&hashes).ok();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 60);
    for (i, fields) in lines.iter().enumerate() {
        assert_eq!(fields.len(), 5, "{fields:?}");
        let sent_ns: u128 = fields[4].parse().unwrap();
        let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        assert!(sent_ns <= now_ns && now_ns - sent_ns < 60_000_000_000, "sent within the last minute: {sent_ns}");
        assert_eq!(fields[0], i.to_string());
        assert!(timestamps.contains(&fields[1].parse::<u32>().unwrap()));
        assert_eq!(fields[2].len(), 16);
    }
    assert_eq!(lines[0][3], "1", "the first frame is a keyframe");
}

#[test]
fn sender_forces_keyframe_on_pli_and_survives_malformed_rtcp() {
    let (rcv_rtp, rcv_rtcp) = receiver_pair();
    let sender =
        Sender::start(send_args(rcv_rtp.local_addr().unwrap(), &["--frames", "40", "--key-int", "1000"])).unwrap();
    let rtcp_addr = sender.addrs().rtcp;
    let mut timestamps = BTreeSet::new();
    let mut pli_sent = false;
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "sender did not finish: {:?}", sender.stats());
        match rcv_rtp.recv(&mut buf) {
            Ok(n) => {
                timestamps.insert(RtpPacket::parse(&buf[..n]).unwrap().timestamp());
            }
            Err(_) if sender.stats().eos => break,
            Err(_) => {}
        }
        if !pli_sent && timestamps.len() >= 5 {
            for garbage in [&[0x80u8, 200, 0, 50, 1, 2, 3][..], &[0x81, 205], &[0x80, 201, 0xff, 0xff]] {
                rcv_rtcp.send_to(garbage, rtcp_addr).unwrap();
            }
            rcv_rtcp.send_to(&feedback(&[], true), rtcp_addr).unwrap();
            pli_sent = true;
        }
    }
    let s = sender.stop().unwrap().stats;
    assert_eq!(s.frames_sent, 40);
    assert!(s.rtcp_malformed >= 1, "{s:?}");
    assert_eq!((s.plis_received, s.keyframes_forced), (1, 1), "{s:?}");
    assert!(s.keyframes_sent >= 2, "the PLI produced a second keyframe: {s:?}");
}

#[test]
fn sender_cli_writes_summary_json() {
    let (rcv_rtp, _rcv_rtcp) = receiver_pair();
    let summary = temp_path("summary.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_zerodrop"))
        .args(["send", "--frames", "10", "--width", "160", "--height", "120", "--quiet", "--linger-ms", "0"])
        .args(["--loss", "uniform:0.5", "--seed", "3", "--dest", &rcv_rtp.local_addr().unwrap().to_string()])
        .arg("--summary-json")
        .arg(&summary)
        .status()
        .unwrap();
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    std::fs::remove_file(&summary).ok();
    assert_eq!(json["frames_sent"], 10);
    assert_eq!(json["loss"], "uniform:0.5");
    assert!(json["packets_dropped"].as_u64().unwrap() > 0);
}

/// TMMBR (RFC 5104) lowers the encoder's bit rate live and is acknowledged
/// with TMMBN; a later TMMBR above the configured rate restores that rate.
#[test]
fn sender_honours_tmmbr_by_lowering_its_encoder_bitrate_and_answers_tmmbn() {
    let (rcv_rtp, rcv_rtcp) = receiver_pair();
    // Noise does not compress: the encoder sends what its bit rate allows.
    let mut args = send_args(rcv_rtp.local_addr().unwrap(), &["--frames", "300", "--pattern", "snow", "--mtu", "1200"]);
    args.bitrate = 2000;
    let sender = Sender::start(args).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut first: Option<Instant> = None;
    let mut sender_rtcp: Option<SocketAddr> = None;
    let before = media_rate(&rcv_rtp, &mut buf, &mut first, &mut sender_rtcp, 1000, 3000);

    let mut tmmbr = Vec::new();
    let fb = ReceiverFeedback { media_ssrc: SSRC, tmmbr_bps: Some(400_000), ..Default::default() };
    rtp::write_receiver_rtcp(0x4242, "test-receiver", &fb, &mut tmmbr).unwrap();
    rcv_rtcp.send_to(&tmmbr, sender_rtcp.unwrap()).unwrap();
    let mut acknowledged = None;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while acknowledged.is_none() {
        assert!(Instant::now() < deadline, "no TMMBN came back: {:?}", sender.stats());
        let Ok(n) = rcv_rtcp.recv(&mut buf) else { continue };
        events.clear();
        if rtp::parse_rtcp(&buf[..n], &mut events).is_ok() {
            acknowledged = events.iter().find_map(|e| match e {
                RtcpEvent::Tmmbn { ssrc: 0x4242, bitrate_bps, .. } => Some(*bitrate_bps),
                _ => None,
            });
        }
    }
    assert_eq!(acknowledged, Some(rtp::tmmb_representable(400_000)));
    let stats = sender.stats();
    assert_eq!(stats.tmmbrs_received, 1);
    // 400 kbit/s with 40 of every 1240 bytes overhead: 387 kbit/s of media.
    assert_eq!(stats.bitrate_kbps, 387);
    // The rate controller needs a moment; then the stream is well below.
    let after = media_rate(&rcv_rtp, &mut buf, &mut first, &mut sender_rtcp, 5000, 7000);
    eprintln!("media rate before {before:.0} bit/s, after TMMBR {after:.0} bit/s");
    assert!(before > 1_200_000.0, "the sender used its 2 Mbit/s: {before:.0}");
    assert!(after < 700_000.0, "the sender stepped down: {after:.0}");

    // A limit above the configured rate restores it, and no more.
    let fb = ReceiverFeedback { media_ssrc: SSRC, tmmbr_bps: Some(10_000_000), ..Default::default() };
    rtp::write_receiver_rtcp(0x4242, "test-receiver", &fb, &mut tmmbr).unwrap();
    rcv_rtcp.send_to(&tmmbr, sender_rtcp.unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sender.stats().bitrate_kbps != 2000 {
        assert!(Instant::now() < deadline, "bit rate not restored: {:?}", sender.stats());
        std::thread::park_timeout(Duration::from_millis(10));
    }
    sender.stop().unwrap();
}

/// REMB (draft-alvestrand-rmcat-remb) sets the encoder's bit rate to its
/// figure (no overhead to take off), as a WebRTC sender caps its target by
/// it; a REMB for other SSRCs is not ours, and a repeat changes nothing.
#[test]
fn sender_follows_remb_naming_its_ssrc_and_ignores_remb_for_others() {
    let (rcv_rtp, rcv_rtcp) = receiver_pair();
    let mut args = send_args(rcv_rtp.local_addr().unwrap(), &["--frames", "300", "--pattern", "snow", "--mtu", "1200"]);
    args.bitrate = 2000;
    let sender = Sender::start(args).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut first: Option<Instant> = None;
    let mut sender_rtcp: Option<SocketAddr> = None;
    let before = media_rate(&rcv_rtp, &mut buf, &mut first, &mut sender_rtcp, 1000, 3000);

    let mut remb = Vec::new();
    let others = ReceiverFeedback { media_ssrc: SSRC ^ 1, remb_bps: Some(100_000), ..Default::default() };
    rtp::write_receiver_rtcp(0x4242, "test-receiver", &others, &mut remb).unwrap();
    rcv_rtcp.send_to(&remb, sender_rtcp.unwrap()).unwrap();
    let fb = ReceiverFeedback { media_ssrc: SSRC, remb_bps: Some(400_000), ..Default::default() };
    rtp::write_receiver_rtcp(0x4242, "test-receiver", &fb, &mut remb).unwrap();
    rcv_rtcp.send_to(&remb, sender_rtcp.unwrap()).unwrap();
    rcv_rtcp.send_to(&remb, sender_rtcp.unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sender.stats().rembs_received < 2 {
        assert!(Instant::now() < deadline, "the REMBs were not read: {:?}", sender.stats());
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let stats = sender.stats();
    assert_eq!((stats.rembs_received, stats.tmmbrs_received), (2, 0), "the REMB for another SSRC is not counted");
    assert_eq!(stats.bitrate_kbps, 400);
    let after = media_rate(&rcv_rtp, &mut buf, &mut first, &mut sender_rtcp, 5000, 7000);
    eprintln!("media rate before {before:.0} bit/s, after REMB {after:.0} bit/s");
    assert!(before > 1_200_000.0, "the sender used its 2 Mbit/s: {before:.0}");
    assert!(after < 700_000.0, "the sender stepped down: {after:.0}");
    sender.stop().unwrap();
}

/// Media bit rate received between `from_ms` and `to_ms` after the first
/// packet; notes where the sender's RTCP socket is (RTP source port + 1).
fn media_rate(
    sock: &UdpSocket,
    buf: &mut [u8],
    first: &mut Option<Instant>,
    sender_rtcp: &mut Option<SocketAddr>,
    from_ms: u64,
    to_ms: u64,
) -> f64 {
    let (from, to) = (Duration::from_millis(from_ms), Duration::from_millis(to_ms));
    let mut bytes = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no media");
        let Ok((n, src)) = sock.recv_from(buf) else { continue };
        let t0 = *first.get_or_insert_with(Instant::now);
        sender_rtcp.get_or_insert(with_port_offset(src, 1));
        let at = t0.elapsed();
        if at >= to {
            return bytes as f64 * 8.0 / (to - from).as_secs_f64();
        }
        if at >= from {
            bytes += n as u64;
        }
    }
}
