//! The relay with plain UDP sockets on both sides: seeded drops are
//! reproducible and RTCP passes in both directions.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use zerodrop_testbench::loss::LossSpec;
use zerodrop_testbench::relay::{Relay, RelayConfig, RelayHandle};
use zerodrop_dataplane::ingest::udp::bind_rtp_rtcp_pair;
use zerodrop_dataplane::rtp::{self, ReceiverFeedback, RtcpEvent, RtpPacket, RtpPacketBuilder};

const DEADLINE: Duration = Duration::from_secs(10);

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn blocking_socket(addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s
}

/// A blocking pair with RTCP = RTP + 1, as RTP peers bind them.
fn blocking_pair() -> (UdpSocket, UdpSocket) {
    let (a, b) = bind_rtp_rtcp_pair(loopback0(), 1).unwrap();
    for s in [&a, &b] {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    (a, b)
}

fn rtp_packet(seq: u16) -> Vec<u8> {
    rtp_packet_pt(96, seq)
}

fn rtp_packet_pt(pt: u8, seq: u16) -> Vec<u8> {
    let payload = [seq as u8; 40];
    RtpPacketBuilder::<&[u8], &[u8]>::new()
        .payload_type(pt)
        .ssrc(0x1234 + pt as u32)
        .sequence_number(seq)
        .timestamp(seq as u32 * 3000)
        .payload(&payload[..])
        .write_vec()
        .unwrap()
}

fn recv_until(sock: &UdpSocket, mut done: impl FnMut(&[u8]) -> bool) -> bool {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf)
            && done(&buf[..n])
        {
            return true;
        }
    }
    false
}

/// Sends `n` RTP packets through a fresh relay and returns the sequence
/// numbers the receiver got, in order.
fn forwarded_sequence(loss: &str, seed: u64, n: u16) -> Vec<u16> {
    let mut config = RelayConfig::new(loopback0(), loopback0());
    config.loss = LossSpec::parse(loss).unwrap();
    config.seed = seed;
    let packets: Vec<Vec<u8>> = (0..n).map(rtp_packet).collect();
    forward_through(config, &packets).into_iter().map(|(_, seq)| seq).collect()
}

/// Sends `packets` in order through a fresh relay (its `forward` is replaced
/// by a local receiver) and returns (payload type, sequence number) of what
/// the receiver got, in order.
fn forward_through(mut config: RelayConfig, packets: &[Vec<u8>]) -> Vec<(u8, u16)> {
    let receiver = blocking_socket(loopback0());
    config.forward = receiver.local_addr().unwrap();
    let relay = Relay::start(config).unwrap();
    let sender = blocking_socket(loopback0());
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut sent = 0u64;
    // Batches small enough that no socket buffer overflows: a kernel drop
    // would change the arrival order the loss model is applied to.
    for batch in packets.chunks(32) {
        for p in batch {
            sender.send_to(p, relay.addrs().rtp).unwrap();
        }
        sent += batch.len() as u64;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = relay.stats();
            if s.forwarded + s.dropped == sent && got.len() as u64 == s.forwarded {
                break;
            }
            assert!(Instant::now() < deadline, "relay stalled: {s:?}, received {}", got.len());
            if let Ok(len) = receiver.recv(&mut buf) {
                let p = RtpPacket::parse(&buf[..len]).unwrap();
                got.push((p.payload_type(), p.sequence_number()));
            }
        }
    }
    let stats = relay.stop().unwrap();
    assert_eq!(stats.forwarded + stats.dropped, packets.len() as u64);
    got
}

#[test]
fn relay_same_seed_forwards_identical_sequence_matching_the_loss_model() {
    let n = 600;
    let a = forwarded_sequence("uniform:0.2", 7, n);
    let b = forwarded_sequence("uniform:0.2", 7, n);
    assert_eq!(a, b, "same seed, same input: same survivors");

    let mut model = LossSpec::parse("uniform:0.2").unwrap().model(7);
    let expected: Vec<u16> = (0..n).filter(|_| !model.should_drop()).collect();
    assert_eq!(a, expected, "drops are the model's decisions by arrival index");
    assert!(a.len() < n as usize && a.len() > n as usize / 2, "about 20% dropped: {} of {n} kept", a.len());

    let c = forwarded_sequence("uniform:0.2", 8, n);
    assert_ne!(a, c, "another seed drops other packets");
}

#[test]
fn relay_gilbert_elliott_composite_is_reproducible() {
    let spec = "uniform:0.05+ge:loss=0.05,burst=4";
    assert_eq!(forwarded_sequence(spec, 3, 400), forwarded_sequence(spec, 3, 400));
}

/// `n` media packets (PT 96) with `rtx_after(i)` RTX packets (PT 97)
/// following media packet `i`, as a receiver's NACKs would provoke them.
fn media_with_rtx(n: u16, rtx_after: impl Fn(u16) -> u16) -> Vec<Vec<u8>> {
    let mut rtx_seq = 0u16;
    let mut out = Vec::new();
    for i in 0..n {
        out.push(rtp_packet_pt(96, i));
        for _ in 0..rtx_after(i) {
            out.push(rtp_packet_pt(97, rtx_seq));
            rtx_seq = rtx_seq.wrapping_add(1);
        }
    }
    out
}

fn surviving_media(seed: u64, packets: &[Vec<u8>]) -> Vec<u16> {
    let mut config = RelayConfig::new(loopback0(), loopback0());
    config.loss = LossSpec::parse("uniform:0.1").unwrap();
    config.seed = seed;
    config.rtx_payload_type = Some(97);
    forward_through(config, packets).into_iter().filter(|&(pt, _)| pt == 96).map(|(_, seq)| seq).collect()
}

#[test]
fn relay_with_rtx_pt_drops_the_same_media_packets_whatever_rtx_is_interleaved() {
    let n = 500;
    let without_rtx = surviving_media(11, &media_with_rtx(n, |_| 0));
    let some_rtx = surviving_media(11, &media_with_rtx(n, |i| u16::from(i % 7 == 3)));
    let bursts_of_rtx = surviving_media(11, &media_with_rtx(n, |i| if i % 50 == 10 { 9 } else { i % 3 }));
    assert_eq!(without_rtx, some_rtx, "one RTX every 7 media packets must not move media drops");
    assert_eq!(without_rtx, bursts_of_rtx, "bursts of RTX must not move media drops");

    let mut model = LossSpec::parse("uniform:0.1").unwrap().model(11);
    let expected: Vec<u16> = (0..n).filter(|_| !model.should_drop()).collect();
    assert_eq!(without_rtx, expected, "media drops are the seed's model by media index");
    assert!(expected.len() < n as usize, "the model drops some media");

    // Without the RTX payload type, the same interleaving does shift them.
    let mut config = RelayConfig::new(loopback0(), loopback0());
    config.loss = LossSpec::parse("uniform:0.1").unwrap();
    config.seed = 11;
    let shared_model: Vec<u16> = forward_through(config, &media_with_rtx(n, |i| u16::from(i % 7 == 3)))
        .into_iter()
        .filter(|&(pt, _)| pt == 96)
        .map(|(_, seq)| seq)
        .collect();
    assert_ne!(shared_model, expected, "one model for all RTP: RTX shifts the media drops");
}

#[test]
fn relay_cli_accepts_rtx_pt() {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_zerodrop"))
        .args(["relay", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--loss", "uniform:0.1"])
        .args(["--seed", "3", "--rtx-pt", "97", "--duration", "0.1"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn start_lossless(receiver_rtp: SocketAddr) -> RelayHandle {
    let mut config = RelayConfig::new(loopback0(), receiver_rtp);
    // Nothing RTCP-related may ever be lost, whatever the RTP loss.
    config.loss = LossSpec::parse("uniform:1").unwrap();
    Relay::start(config).unwrap()
}

fn sender_report() -> Vec<u8> {
    let mut out = Vec::new();
    rtp::write_sender_rtcp(
        0x1234,
        "sender",
        &rtp::SenderReportInfo {
            ntp_timestamp: 0x0102_0304_0506_0708,
            rtp_timestamp: 9000,
            packet_count: 10,
            octet_count: 1000,
            dlrr: None,
        },
        &mut out,
    ).unwrap();
    out
}

fn receiver_nack(seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let nacks = [seq];
    let fb = ReceiverFeedback { nacks: &nacks, media_ssrc: 0x1234, ..Default::default() };
    rtp::write_receiver_rtcp(0x9999, "receiver", &fb, &mut out).unwrap();
    out
}

fn is_nack_for(data: &[u8], seq: u16) -> bool {
    let mut events = Vec::new();
    rtp::parse_rtcp(data, &mut events).is_ok()
        && events.iter().any(|e| matches!(e, RtcpEvent::Nack { seqs, .. } if seqs.contains(&seq)))
}

#[test]
fn relay_passes_sender_rtcp_down_and_receiver_rtcp_back_up() {
    let (snd_rtp, snd_rtcp) = blocking_pair();
    let (rcv_rtp, rcv_rtcp) = blocking_pair();
    let relay = start_lossless(rcv_rtp.local_addr().unwrap());
    let addrs = relay.addrs();

    // Sender → receiver: the SR reaches the receiver's RTCP port unchanged.
    let sr = sender_report();
    snd_rtcp.send_to(&sr, addrs.rtcp).unwrap();
    let mut sr_src = None;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + DEADLINE;
    while sr_src.is_none() && Instant::now() < deadline {
        if let Ok((n, src)) = rcv_rtcp.recv_from(&mut buf) {
            assert_eq!(&buf[..n], &sr[..]);
            sr_src = Some(src);
        }
    }
    let sr_src = sr_src.expect("SR forwarded to the receiver's RTCP port");
    assert_eq!(sr_src.port(), addrs.downstream_rtcp.port());

    // Receiver answers where the SR came from; the relay sends it to the
    // sender's RTCP source.
    rcv_rtcp.send_to(&receiver_nack(17), sr_src).unwrap();
    assert!(recv_until(&snd_rtcp, |d| is_nack_for(d, 17)), "NACK reached the sender via the downstream socket");

    // A receiver with a fixed RTCP destination sends to the listen RTCP port.
    rcv_rtcp.send_to(&receiver_nack(18), addrs.rtcp).unwrap();
    assert!(recv_until(&snd_rtcp, |d| is_nack_for(d, 18)), "NACK reached the sender via the listen port");

    // RTP is all dropped (loss 1) but the RTCP counters saw every message.
    snd_rtp.send_to(&rtp_packet(1), addrs.rtp).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while relay.stats().dropped < 1 {
        assert!(Instant::now() < deadline, "RTP never reached the relay");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = relay.stop().unwrap();
    assert_eq!((stats.rtcp_down, stats.rtcp_up, stats.forwarded, stats.dropped), (1, 2, 0, 1));
}

#[test]
fn relay_sends_receiver_rtcp_to_rtp_source_plus_one_before_sender_rtcp() {
    let (snd_rtp, snd_rtcp) = blocking_pair();
    let (rcv_rtp, rcv_rtcp) = blocking_pair();
    let mut config = RelayConfig::new(loopback0(), rcv_rtp.local_addr().unwrap());
    config.seed = 1;
    let relay = Relay::start(config).unwrap();
    let addrs = relay.addrs();

    snd_rtp.send_to(&rtp_packet(5), addrs.rtp).unwrap();
    assert!(recv_until(&rcv_rtp, |_| true), "RTP forwarded");
    // The receiver's RTCP socket answers the relay's downstream RTCP port.
    rcv_rtcp.send_to(&receiver_nack(5), addrs.downstream_rtcp).unwrap();
    assert!(recv_until(&snd_rtcp, |d| is_nack_for(d, 5)), "NACK reached the sender's RTP port + 1");
    let stats = relay.stop().unwrap();
    assert_eq!((stats.forwarded, stats.rtcp_up, stats.rtcp_unroutable), (1, 1, 0));
}

#[test]
fn relay_cli_stops_after_duration_and_writes_stats_json() {
    let stats = std::env::temp_dir().join(format!("zerodrop-{}-relay-stats.json", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_zerodrop"))
        .args(["relay", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--loss", "ge:loss=0.05,burst=5"])
        .args(["--seed", "7", "--duration", "0.2", "--stats-json"])
        .arg(&stats)
        .status()
        .unwrap();
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    std::fs::remove_file(&stats).ok();
    assert_eq!(json["seed"], 7);
    assert_eq!(json["stats"]["forwarded"], 0);
    assert!(json["loss"].as_str().unwrap().starts_with("ge:p="));
}

#[test]
fn relay_cli_rejects_a_bad_loss_spec_with_what_was_expected() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zerodrop"))
        .args(["relay", "--loss", "uniform:2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("probability in [0, 1]"), "{stderr}");
}
