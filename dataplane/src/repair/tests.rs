//! FEC and NACK working together, without sockets: ST 2022-1 media and FEC
//! from the encoder that matches GStreamer's, times made up by the test.

use std::time::{Duration, Instant};

use super::fec::st2022_1::St2022Encoder;
use super::*;
use crate::config::FecSource;
use crate::rtp::RtpPacketBuilder;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `n` media packets, sequence numbers from 0, one frame each.
fn media(n: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let payload = vec![i as u8; 200 + usize::from(i) % 50];
            RtpPacketBuilder::<&[u8], &[u8]>::new()
                .payload_type(96)
                .sequence_number(i)
                .timestamp(u32::from(i) * 3000)
                .ssrc(7)
                .marker_bit(true)
                .payload(&payload[..])
                .write_vec()
                .unwrap()
        })
        .collect()
}

/// Row FEC every `l` packets (ST 2022-1 with one row of `l`, columns off
/// with d = 0), in send order: `(Some(seq), media)` or `(None, fec)`.
fn wire(l: u8, media: &[Vec<u8>]) -> Vec<(Option<u16>, Vec<u8>)> {
    let mut enc = St2022Encoder::new(l, 0, 97);
    let mut out = Vec::new();
    for (i, m) in media.iter().enumerate() {
        out.push((Some(i as u16), m.clone()));
        enc.push(m, &mut |_, fec| out.push((None, fec.to_vec()))).unwrap();
    }
    out
}

/// Sequence numbers as sent (extended ones start past 65535).
fn low16(ext: &[u64]) -> Vec<u16> {
    ext.iter().map(|&s| s as u16).collect()
}

fn repair(now: Instant) -> Repair {
    let fec = FecSource { scheme: FecScheme::St2022_1, binds: Vec::new(), payload_type: None };
    let settings = JitterSettings { latency: ms(200), ..JitterSettings::default() };
    Repair::new(settings, Some(&fec), now)
}

fn packet(datagram: &[u8], now: Instant) -> StoredPacket {
    let p = RtpPacket::parse(datagram).unwrap();
    StoredPacket {
        payload_offset: p.payload_offset(),
        payload_len: p.payload_len(),
        timestamp: p.timestamp(),
        marker: p.marker_bit(),
        data: datagram.to_vec(),
        arrival: now,
        retransmitted: false,
        fec: false,
    }
}

/// Feeds `wire` at `now`, leaving out media packet `lost` (and the FEC
/// packets in `lost_fec`, counted in FEC send order).
fn feed(r: &mut Repair, wire: &[(Option<u16>, Vec<u8>)], lost: u16, lost_fec: &[usize], now: Instant) -> Vec<Stored> {
    let mut stored = Vec::new();
    let mut fec_index = 0;
    for (seq, d) in wire {
        match seq {
            Some(s) if *s == lost => {}
            Some(s) => {
                let ext = r.extend_media(*s);
                r.remember_for_fec(ext, &RtpPacket::parse(d).unwrap(), d);
                stored.push(r.store(ext, packet(d, now), now, false));
            }
            None => {
                if !lost_fec.contains(&fec_index) {
                    assert!(matches!(r.push_fec(d), FecPush::Used));
                }
                fec_index += 1;
            }
        }
    }
    stored
}

#[test]
fn a_packet_fec_can_rebuild_is_rebuilt_and_never_asked_for() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    let stored = feed(&mut r, &wire(5, &media(10)), 2, &[], t0);
    assert_eq!(stored.iter().map(|s| s.went_missing).sum::<u64>(), 1, "packet 3 showed 2 missing");
    let mut rebuilt = Vec::new();
    let mut counted = Vec::new();
    let round = r.coordinate_fec(t0, ms(30), &mut |seq, d| rebuilt.push((seq, d.to_vec())), &mut |s| counted.push(s));
    assert_eq!(round, FecRound { recovered: 1, nacks_avoided: 1, malformed: 0 });
    assert_eq!(rebuilt, [(2, media(10)[2].clone())], "byte for byte the packet that was lost");
    assert_eq!(counted.len(), 1);
    assert_eq!((counted[0].outcome, counted[0].recovered_fec, counted[0].recovered_nack), (PushOutcome::Stored, 1, 0));
    let mut nacks = Vec::new();
    r.due_nacks(t0 + ms(100), ms(30), &mut nacks);
    assert!(nacks.is_empty(), "nothing left to ask for: {nacks:?}");
}

#[test]
fn a_request_waits_for_fec_due_sooner_than_a_retransmission_could_come() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    let all = wire(5, &media(10));
    // The first row whole (its FEC shows the decoder the geometry), then the
    // second row up to packet 8: packet 7 lost, the row's FEC (sent after
    // packet 9) still to come.
    let upto = all.iter().position(|(s, _)| *s == Some(9)).unwrap();
    feed(&mut r, &all[..upto], 7, &[], t0);
    // 100 packets/s (the floor): the FEC is due in two packet times plus
    // 2 ms of slack, 22 ms; a retransmission would take 30.
    r.coordinate_fec(t0, ms(30), &mut |_, _| {}, &mut |_| {});
    let mut nacks = Vec::new();
    r.due_nacks(t0, ms(30), &mut nacks);
    assert!(nacks.is_empty(), "held back for FEC: {nacks:?}");
    r.due_nacks(t0 + ms(23), ms(30), &mut nacks);
    assert_eq!(low16(&nacks), [7], "the FEC did not come in time: asked for");
}

#[test]
fn a_request_goes_out_at_once_when_fec_would_come_later_than_an_answer() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    let all = wire(5, &media(10));
    let upto = all.iter().position(|(s, _)| *s == Some(9)).unwrap();
    feed(&mut r, &all[..upto], 7, &[], t0);
    // A 10 ms round trip beats FEC due in 22 ms.
    r.coordinate_fec(t0, ms(10), &mut |_, _| {}, &mut |_| {});
    let mut nacks = Vec::new();
    r.due_nacks(t0, ms(10), &mut nacks);
    assert_eq!(low16(&nacks), [7]);
}

#[test]
fn a_packet_whose_fec_was_lost_too_is_asked_for_at_once() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    // Packet 2 and the FEC of its row (the first FEC packet) are lost: once
    // four more rows have come, that FEC is overdue and hopeless.
    feed(&mut r, &wire(5, &media(25)), 2, &[0], t0);
    let round = r.coordinate_fec(t0, ms(30), &mut |_, _| {}, &mut |_| {});
    assert_eq!(round.recovered, 0);
    let mut nacks = Vec::new();
    r.due_nacks(t0, ms(30), &mut nacks);
    assert_eq!(low16(&nacks), [2]);
}

#[test]
fn fec_before_any_media_has_nothing_to_be_placed_against() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    let fec = wire(5, &media(5)).into_iter().find(|(s, _)| s.is_none()).unwrap().1;
    assert!(matches!(r.push_fec(&fec), FecPush::NoMediaYet));
    let mut plain = Repair::new(JitterSettings::default(), None, t0);
    assert!(matches!(plain.push_fec(&fec), FecPush::NotDecoded));
}

#[test]
fn the_budget_follows_the_packet_rate_measured_over_the_last_second() {
    let t0 = Instant::now();
    let mut r = repair(t0);
    let all = media(1000);
    // 400 packets a second for a second, in quarter-second steps.
    for step in 0..4u64 {
        let now = t0 + ms(250 * step);
        for i in 0..100u16 {
            let seq = step as u16 * 100 + i;
            let ext = r.extend_media(seq);
            r.store(ext, packet(&all[usize::from(seq)], now), now, false);
        }
        r.due_nacks(now + ms(250), ms(30), &mut Vec::new());
    }
    assert!((r.packet_rate() - 400.0).abs() < 40.0, "{}", r.packet_rate());
    // The refill: the floor plus a quarter of the packet rate (NackBudget).
    let expected = (NackBudget::FLOOR + NackBudget::SHARE * r.packet_rate()) * NackBudget::MIN_DEPTH.as_secs_f64();
    assert!((r.budget().capacity() - expected).abs() < 1.0, "{} vs {expected}", r.budget().capacity());
}
