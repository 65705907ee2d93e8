//! The receive path alone (no decoder), driven by a scripted RTP peer: loss
//! at the very end of a burst, which no later packet reveals, is still found
//! and repaired.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use zerodrop_crds::{Codec, DecoderChoice};
use zerodrop_dataplane::config::SourceConfig;
use zerodrop_dataplane::repair::jitter::JitterSettings;
use zerodrop_dataplane::metrics::Metrics;
use zerodrop_dataplane::ingest::worker;
use zerodrop_dataplane::stream::StreamOptions;
use zerodrop_dataplane::rtp::{self, RtcpEvent, RtpPacket, RtpPacketBuilder};

const SSRC: u32 = 0x1234_5678;

fn rtp(seq: u16, ts: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
    RtpPacketBuilder::<&[u8], &[u8]>::new()
        .payload_type(96)
        .ssrc(SSRC)
        .sequence_number(seq)
        .timestamp(ts)
        .marker_bit(marker)
        .payload(payload)
        .write_vec()
        .unwrap()
}

/// One keyframe: SPS+PPS in a STAP-A, then an IDR slice in three FU-As.
fn keyframe_packets(first_seq: u16, ts: u32) -> Vec<Vec<u8>> {
    let sps: &[u8] = &[0x67, 0x42, 0xc0, 0x1e];
    let pps: &[u8] = &[0x68, 0xce, 0x3c, 0x80];
    let mut stap = vec![24];
    for n in [sps, pps] {
        stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
        stap.extend_from_slice(n);
    }
    let body: Vec<u8> = (0..300).map(|i| (i % 251) as u8 | 1).collect();
    let fu = |flags: u8, part: &[u8]| {
        let mut p = vec![0x7c, flags | 5];
        p.extend_from_slice(part);
        p
    };
    let mut first = vec![0x88];
    first.extend_from_slice(&body[..100]);
    vec![
        rtp(first_seq, ts, false, &stap),
        rtp(first_seq + 1, ts, false, &fu(0x80, &first)),
        rtp(first_seq + 2, ts, false, &fu(0x00, &body[100..200])),
        rtp(first_seq + 3, ts, true, &fu(0x40, &body[200..])),
    ]
}

#[test]
fn lost_last_packet_of_the_stream_is_found_by_a_tail_probe_and_repaired() {
    let rtp_port = 24004;
    let cfg = SourceConfig {
        pipeline: "t".into(),
        name: "tail".into(),
        codec: Codec::H264,
        payload_type: 96,
        clock_rate: 90_000,
        rtx_payload_type: Some(97),
        rtp_bind: format!("127.0.0.1:{rtp_port}").parse().unwrap(),
        rtcp_bind: Some(format!("127.0.0.1:{}", rtp_port + 1).parse().unwrap()),
        receive_buffer: 1 << 20,
        jitter: JitterSettings { latency: Duration::from_millis(500), ..Default::default() },
        decoder: DecoderChoice::Software,
        fec: None,
        parameter_sets: Vec::new(),
        hls: None,
        restream: None,
        rtsp: None,
        srt: None,
        rendition_of: None,
        bitrate_request: Default::default(),
        frames: None,
    };
    let metrics = Metrics::new();
    let stream = metrics.stream("t", "tail");
    let stop = Arc::new(AtomicBool::new(false));
    let readiness = Arc::new(zerodrop_dataplane::metrics::Readiness::new());
    readiness.set_expected(["t/tail".to_string()]);
    let options = StreamOptions { no_decode: true, readiness: Some(readiness.clone()), ..Default::default() };
    let handle = {
        let stop = stop.clone();
        std::thread::spawn(move || worker::run_one(cfg, stream, stop, options))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readiness.is_ready() {
        assert!(Instant::now() < deadline, "receiver did not start");
        std::thread::park_timeout(Duration::from_millis(5));
    }

    // The peer: RTP from one socket, RTCP (SR out, NACK in) on port + 1.
    let peer_rtp = UdpSocket::bind("127.0.0.1:24010").unwrap();
    let peer_rtcp = UdpSocket::bind("127.0.0.1:24011").unwrap();
    peer_rtcp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let to_rtp: SocketAddr = format!("127.0.0.1:{rtp_port}").parse().unwrap();
    let to_rtcp: SocketAddr = format!("127.0.0.1:{}", rtp_port + 1).parse().unwrap();
    let mut sr = Vec::new();
    rtp::write_sender_rtcp(
        SSRC,
        "peer",
        &rtp::SenderReportInfo { ntp_timestamp: rtp::ntp_timestamp(std::time::SystemTime::now()), ..Default::default() },
        &mut sr,
    ).unwrap();
    peer_rtcp.send_to(&sr, to_rtcp).unwrap();

    let packets = keyframe_packets(1000, 9000);
    for p in &packets[..3] {
        peer_rtp.send_to(p, to_rtp).unwrap(); // the marker packet is "lost"
    }
    // Wait for the receiver to ask for seq 1003, then answer with RTX.
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut asked = false;
    while !asked && Instant::now() < deadline {
        if let Ok((n, _)) = peer_rtcp.recv_from(&mut buf) {
            let mut events = Vec::new();
            rtp::parse_rtcp(&buf[..n], &mut events).unwrap();
            asked = events.iter().any(|e| matches!(e, RtcpEvent::Nack { seqs, .. } if seqs.contains(&1003)));
        }
    }
    assert!(asked, "receiver never NACKed the lost tail packet");
    let original = RtpPacket::parse(&packets[3]).unwrap();
    let mut rtx = Vec::new();
    rtp::write_rtx(&original, 97, 0x9999, 1, &mut rtx).unwrap();
    peer_rtp.send_to(&rtx, to_rtp).unwrap();

    let stream = metrics.stream("t", "tail");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stream.frames_assembled.get() < 1 && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let report = handle.join().unwrap().unwrap();
    assert_eq!(report.frames_assembled, 1, "{report:?}");
    assert_eq!(report.frames_dropped, 0, "{report:?}");
    assert_eq!(report.packets_recovered_nack, 1, "{report:?}");
}
