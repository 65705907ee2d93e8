//! The RTCP session without sockets: compounds are written with the wire
//! code the test sender uses, read back with the parser the sender uses, and
//! the time is whatever the test says.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::rtp::{RtcpEvent, SenderReportInfo};

const OURS: u32 = 0x0abc_def0;
const SENDER: u32 = 0x1234_5678;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn session(t0: Instant, separate_rtcp_port: bool) -> RtcpSession {
    session_asking_by(t0, separate_rtcp_port, BitrateRequest::Tmmbr)
}

fn session_asking_by(t0: Instant, separate_rtcp_port: bool, bitrate_request: BitrateRequest) -> RtcpSession {
    RtcpSession::new(
        SessionSettings { our_ssrc: OURS, cname: "test@zerodrop".into(), clock_rate: 90_000, separate_rtcp_port, bitrate_request },
        t0,
    )
}

fn sender_at() -> SocketAddr {
    "10.0.0.9:5000".parse().unwrap()
}

/// A session that has seen one media packet from the sender.
fn joined(t0: Instant) -> RtcpSession {
    let mut s = session(t0, true);
    s.set_media_ssrc(SENDER);
    s.on_media(Some(sender_at()), t0, 0, false);
    s
}

fn sender_report(ntp: u64, packet_count: u32, dlrr: Option<(u32, u32, u32)>) -> Vec<u8> {
    let mut out = Vec::new();
    let info = SenderReportInfo { ntp_timestamp: ntp, rtp_timestamp: 0, packet_count, octet_count: 0, dlrr };
    crate::rtp::write_sender_rtcp(SENDER, "sender", &info, &mut out).unwrap();
    out
}

fn events(data: &[u8]) -> Vec<RtcpEvent> {
    let mut ev = Vec::new();
    crate::rtp::parse_rtcp(data, &mut ev).unwrap();
    ev
}

fn counts(base: u64, highest: u64, received: u64) -> Option<ReceptionCounts> {
    Some(ReceptionCounts { base_seq: base, highest_seq: highest, received })
}

fn request<'a>(nacks: &'a [u64], keyframe_wanted: bool, reception: Option<ReceptionCounts>) -> FeedbackRequest<'a> {
    FeedbackRequest { nacks, keyframe_wanted, reception }
}

#[test]
fn nothing_is_sent_before_anything_is_due() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    assert!(s.poll_feedback(t0 + ms(10), SystemTime::now(), request(&[], false, counts(0, 9, 10))).is_none());
}

#[test]
fn the_receiver_report_echoes_the_last_sender_report_and_its_age() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let ntp = 0x1122_3344_5566_7788u64;
    let news = s.handle_rtcp(&sender_report(ntp, 50, None), Some("10.0.0.9:6001".parse().unwrap()), t0).unwrap();
    assert_eq!(news.sender_report, Some(50));
    let t = s.poll_feedback(t0 + ms(1000), SystemTime::now(), request(&[], false, counts(0, 99, 100))).unwrap();
    assert!(t.report);
    assert_eq!(t.to, "10.0.0.9:6001".parse::<SocketAddr>().unwrap(), "symmetric RTCP: to where its report came from");
    let block = events(t.data)
        .into_iter()
        .find_map(|e| match e {
            RtcpEvent::ReportBlock { media_ssrc, lsr, dlsr, fraction_lost, .. } => Some((media_ssrc, lsr, dlsr, fraction_lost)),
            _ => None,
        })
        .expect("a report block");
    assert_eq!(block.0, SENDER);
    assert_eq!(block.1, 0x3344_5566, "LSR: the middle 32 bits of the report's NTP time");
    assert_eq!(block.2, 65_536, "DLSR: one second, in 1/65536 s");
    assert_eq!(block.3, 0);
}

#[test]
fn the_loss_fraction_is_per_report_interval() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let fraction = |s: &mut RtcpSession, at: u64, c| {
        let t = s.poll_feedback(t0 + ms(at), SystemTime::now(), request(&[], false, c)).unwrap();
        events(t.data)
            .into_iter()
            .find_map(|e| match e {
                RtcpEvent::ReportBlock { fraction_lost, cumulative_lost, .. } => Some((fraction_lost, cumulative_lost)),
                _ => None,
            })
            .unwrap()
    };
    // First second: 100 expected, 75 received: a quarter lost (64/256).
    assert_eq!(fraction(&mut s, 1000, counts(0, 99, 75)), (64, 25));
    // Second second: 100 more expected, all received: nothing lost in it,
    // though 25 stay lost overall.
    assert_eq!(fraction(&mut s, 2000, counts(0, 199, 175)), (0, 25));
}

#[test]
fn without_a_sender_report_feedback_goes_to_the_rtp_port_plus_one_unless_muxed() {
    let t0 = Instant::now();
    let mut separate = joined(t0);
    let t = separate.poll_feedback(t0, SystemTime::now(), request(&[7], false, counts(0, 9, 9))).unwrap();
    assert_eq!(t.to, "10.0.0.9:5001".parse::<SocketAddr>().unwrap());
    let mut muxed = session(t0, false);
    muxed.set_media_ssrc(SENDER);
    muxed.on_media(Some(sender_at()), t0, 0, false);
    let t = muxed.poll_feedback(t0, SystemTime::now(), request(&[7], false, counts(0, 9, 9))).unwrap();
    assert_eq!(t.to, sender_at());
    // Nobody to send to yet: nothing, but a due report is not left due.
    let mut alone = session(t0, true);
    assert!(alone.poll_feedback(t0 + ms(1000), SystemTime::now(), request(&[], false, None)).is_none());
    assert_eq!(alone.next_report(), t0 + ms(2000));
}

#[test]
fn nacks_carry_the_low_16_bits_of_the_extended_numbers() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let t = s.poll_feedback(t0, SystemTime::now(), request(&[65_535, 65_536, 65_540], false, counts(0, 9, 9))).unwrap();
    assert_eq!(t.nacks, 3);
    let seqs = events(t.data).into_iter().find_map(|e| match e {
        RtcpEvent::Nack { media_ssrc, seqs } => Some((media_ssrc, seqs)),
        _ => None,
    });
    assert_eq!(seqs, Some((SENDER, vec![65_535, 0, 4])));
}

#[test]
fn keyframe_requests_are_paced_by_the_round_trip_and_at_least_300_ms() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let pli = |s: &mut RtcpSession, at| {
        s.poll_feedback(t0 + ms(at), SystemTime::now(), request(&[], true, counts(0, 9, 9))).is_some_and(|t| t.pli)
    };
    assert!(pli(&mut s, 0));
    assert!(!pli(&mut s, 299));
    assert!(pli(&mut s, 300));
    // With a 500 ms round trip, the next one waits 500 ms.
    s.on_retransmission(NackState { sent: 1, first: Some(t0), last: Some(t0) }, t0 + ms(500));
    assert!(!pli(&mut s, 700));
    assert!(pli(&mut s, 800));
    // The sender can hear us now: a request held back goes out at once.
    s.allow_keyframe_request();
    assert!(pli(&mut s, 801));
    // No keyframe request before the sender's SSRC is known.
    let mut fresh = session(t0, true);
    fresh.on_media(Some(sender_at()), t0, 0, false);
    assert!(!pli(&mut fresh, 0));
}

#[test]
fn the_round_trip_comes_from_the_dlrr_echo_of_our_reference_time() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t = s.poll_feedback(t0 + ms(1000), wall, request(&[], false, counts(0, 9, 9))).unwrap();
    let ntp = events(t.data)
        .into_iter()
        .find_map(|e| match e {
            RtcpEvent::ReceiverReferenceTime { ssrc, ntp } if ssrc == OURS => Some(ntp),
            _ => None,
        })
        .expect("an XR reference time with the report");
    assert_eq!(ntp, crate::rtp::ntp_timestamp(wall));
    // The sender held it 10 ms (655 units of 1/65536 s, 9.99 ms) and its
    // answer came 50 ms after we sent: 40 ms.
    let lrr = (ntp >> 16) as u32;
    let news = s.handle_rtcp(&sender_report(1, 1, Some((OURS, lrr, 655))), None, t0 + ms(1050)).unwrap();
    let rtt = news.rtt.expect("measured");
    assert!(rtt > ms(39) && rtt < ms(41), "{rtt:?}");
    assert_eq!(s.rtt(), Some(rtt));
    // An echo of a time we never sent, or for another receiver, measures nothing.
    assert_eq!(s.handle_rtcp(&sender_report(1, 1, Some((OURS, lrr ^ 1, 0))), None, t0 + ms(1060)).unwrap().rtt, None);
    assert_eq!(s.handle_rtcp(&sender_report(1, 1, Some((OURS ^ 1, lrr, 0))), None, t0 + ms(1060)).unwrap().rtt, None);
}

#[test]
fn round_trip_samples_are_smoothed_with_rfc_6298_gain() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let once = |at| NackState { sent: 1, first: Some(at), last: Some(at) };
    assert_eq!(s.on_retransmission(once(t0), t0 + ms(80)), Some(ms(80)), "the first sample is taken whole");
    assert_eq!(s.on_retransmission(once(t0), t0 + ms(160)), Some(ms(90)), "7/8 of 80 + 1/8 of 160");
    assert_eq!(s.rtt_or_default(), ms(90));
    s.reset();
    assert_eq!((s.rtt(), s.rtt_or_default()), (None, DEFAULT_RTT), "a new sender is measured anew");
}

#[test]
fn a_bit_rate_is_asked_at_once_then_each_second_until_acknowledged() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    assert!(s.request_bitrate(1_500_000, false, t0));
    assert!(!s.request_bitrate(1_500_000, false, t0), "asking the same again changes nothing");
    let tmmbr = |s: &mut RtcpSession, at| {
        s.poll_feedback(t0 + ms(at), SystemTime::now(), request(&[], false, counts(0, 9, 9))).and_then(|t| t.tmmbr_bps)
    };
    assert_eq!(tmmbr(&mut s, 0), Some(1_500_000));
    assert_eq!(tmmbr(&mut s, 500), None);
    assert_eq!(tmmbr(&mut s, 1000), Some(1_500_000));
    // The sender's TMMBN for another receiver, or for another figure, is not ours.
    let mut ack = sender_report(1, 1, None);
    crate::rtp::append_tmmbn(&mut ack, SENDER, Some((OURS ^ 1, 1_500_000, 40)));
    assert_eq!(s.handle_rtcp(&ack, None, t0 + ms(1100)).unwrap().bitrate_acknowledged, None);
    let mut ack = sender_report(1, 1, None);
    crate::rtp::append_tmmbn(&mut ack, SENDER, Some((OURS, crate::rtp::tmmb_representable(1_500_000), 40)));
    assert_eq!(s.handle_rtcp(&ack, None, t0 + ms(1200)).unwrap().bitrate_acknowledged, Some(crate::rtp::tmmb_representable(1_500_000)));
    assert_eq!(tmmbr(&mut s, 2000), None, "acknowledged: no more requests");
}

#[test]
fn remb_is_repeated_each_second_below_the_top_and_three_times_back_at_the_top() {
    let t0 = Instant::now();
    let mut s = session_asking_by(t0, true, BitrateRequest::Remb);
    s.set_media_ssrc(SENDER);
    s.on_media(Some(sender_at()), t0, 0, false);
    let poll = |s: &mut RtcpSession, at: u64, sent: &mut Vec<(u64, u64)>| {
        let Some(t) = s.poll_feedback(t0 + ms(at), SystemTime::now(), request(&[], false, counts(0, 9, 9))) else { return };
        assert_eq!(t.tmmbr_bps, None, "a REMB sender is never sent TMMBR");
        let Some(bps) = t.remb_bps else { return };
        let mut events = Vec::new();
        crate::rtp::parse_rtcp(t.data, &mut events).unwrap();
        assert!(events.contains(&RtcpEvent::Remb { sender_ssrc: OURS, bitrate_bps: bps, ssrcs: vec![SENDER] }), "{events:?}");
        sent.push((at, bps));
    };
    let mut sent = Vec::new();
    assert!(s.request_bitrate(300_000, false, t0));
    for at in (0..=4000).step_by(250) {
        poll(&mut s, at, &mut sent);
    }
    // A TMMBN-like answer changes nothing: REMB has none, and goes on.
    let mut ack = sender_report(1, 1, None);
    crate::rtp::append_tmmbn(&mut ack, SENDER, Some((OURS, 300_000, 40)));
    assert_eq!(s.handle_rtcp(&ack, None, t0 + ms(4100)).unwrap().bitrate_acknowledged, None);
    poll(&mut s, 5000, &mut sent);
    assert_eq!(sent, [0, 1000, 2000, 3000, 4000, 5000].map(|at| (at, 300_000)));
    sent.clear();
    assert!(s.request_bitrate(1_500_000, true, t0 + ms(5500)));
    for at in (5500..=12_000).step_by(250) {
        poll(&mut s, at, &mut sent);
    }
    assert_eq!(sent, [5500, 6500, 7500].map(|at| (at, 1_500_000)), "the top three times, then no more");
}

#[test]
fn jitter_follows_rfc_3550_and_ignores_retransmissions() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    // Packets 3000 ticks (33.3 ms) apart arriving 40 ms apart: each transit
    // differs by 600 ticks; J += (600 - J) / 16 from J = 0.
    let mut expected = 0.0;
    for i in 1..=20u32 {
        s.on_media(Some(sender_at()), t0 + ms(40 * u64::from(i)), 3000 * i, false);
        expected += (600.0 - expected) / 16.0;
    }
    assert!((s.jitter_seconds() - expected / 90_000.0).abs() < 1e-6, "{} vs {}", s.jitter_seconds(), expected / 90_000.0);
    let before = s.jitter_seconds();
    s.on_media(Some(sender_at()), t0 + ms(5000), 3000, true);
    assert_eq!(s.jitter_seconds(), before, "a retransmission is late by design");
}

#[test]
fn malformed_rtcp_is_an_error_and_changes_nothing() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    assert!(s.handle_rtcp(&[0x80, 200, 0, 9, 1, 2], None, t0).is_err());
    let t = s.poll_feedback(t0, SystemTime::now(), request(&[1], false, counts(0, 9, 9))).unwrap();
    assert_eq!(t.to, "10.0.0.9:5001".parse::<SocketAddr>().unwrap(), "no peer learned from it");
}

#[test]
fn rtt_samples_take_exact_answers_and_bounded_upper_bounds() {
    let t0 = Instant::now();
    let state = |sent, first: u64, last: u64| NackState { sent, first: Some(t0 + ms(first)), last: Some(t0 + ms(last)) };
    // One request: exact.
    assert_eq!(rtt_sample(state(1, 0, 0), t0 + ms(7), Some(ms(30))), Some(ms(7)));
    assert_eq!(rtt_sample(NackState { sent: 0, first: None, last: None }, t0, Some(ms(30))), None);
    // A burst took the first retransmissions: the sixth request was
    // answered 1 ms later on a 1 ms path. Not the 60 ms since the first.
    assert_eq!(rtt_sample(state(6, 0, 59), t0 + ms(60), Some(ms(30))), None);
    assert_eq!(rtt_sample(state(6, 0, 59), t0 + ms(60), None), Some(ms(1)), "the first figure");
    // A 60 ms path, no estimate yet (30 ms): retried at 37.5 ms, the
    // first request's answer comes 22.5 ms later: the round trip is found.
    let t = |us: u64| t0 + Duration::from_micros(us);
    let s = NackState { sent: 2, first: Some(t0), last: Some(t(37_500)) };
    assert_eq!(rtt_sample(s, t(60_000), None), Some(ms(60)));
    // ... but an upper bound never more than doubles the estimate.
    assert_eq!(rtt_sample(s, t(60_000), Some(ms(20))), Some(Duration::from_micros(22_500)));
    assert_eq!(rtt_sample(state(3, 0, 90), t0 + ms(100), Some(ms(8))), Some(ms(10)), "lower bound above the estimate");
    assert_eq!(rtt_sample(state(3, 0, 90), t0 + ms(100), Some(ms(12))), None);
}

#[test]
fn ambiguous_answers_do_not_inflate_a_loopback_estimate() {
    // 200 packets, each answered 0.1 ms after its last request, after 1
    // to 8 requests (a burst takes the earlier retransmissions), retries
    // 5 ms apart: the estimate stays near the path's round trip.
    let t0 = Instant::now();
    let mut s = joined(t0);
    for i in 0..200u32 {
        let sent = 8 - i % 8;
        let first = t0 + Duration::from_millis(u64::from(i) * 100);
        let last = first + Duration::from_millis(5) * (sent - 1);
        s.on_retransmission(NackState { sent, first: Some(first), last: Some(last) }, last + Duration::from_micros(100));
    }
    let estimate = s.rtt().unwrap();
    assert!(estimate < Duration::from_millis(1), "estimate {estimate:?} for a 0.1 ms path");
}

#[test]
fn a_bye_from_the_media_sender_is_news_and_one_from_another_is_not() {
    let t0 = Instant::now();
    let mut s = joined(t0);
    let mut other = sender_report(1 << 32, 10, None);
    crate::rtp::append_bye(&mut other, SENDER ^ 1);
    assert!(!s.handle_rtcp(&other, Some(sender_at()), t0).unwrap().bye, "someone else's goodbye");
    let mut bye = sender_report(2 << 32, 20, None);
    crate::rtp::append_bye(&mut bye, SENDER);
    let news = s.handle_rtcp(&bye, Some(sender_at()), t0 + ms(10)).unwrap();
    assert!(news.bye, "the media sender leaves");
    assert_eq!(news.sender_report, Some(20), "the report before the BYE is read too");
}
