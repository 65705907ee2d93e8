#![no_main]
//! RTCP parsing on arbitrary datagrams (every packet type we read: SR, RR,
//! NACK, PLI, FIR, TMMBR/TMMBN, REMB, BYE, XR); and the NACK list read from
//! the same bytes (big-endian u16s) written as a receiver compound must parse
//! back to the same set of sequence numbers, and a REMB written with it to
//! the bit rate it can carry.

use libfuzzer_sys::fuzz_target;
use zerodrop_dataplane::rtp::{
    MAX_NACKS_PER_COMPOUND, ReceiverFeedback, ReceptionReport, RtcpEvent, parse_rtcp, remb_representable, write_receiver_rtcp,
};

const MEDIA_SSRC: u32 = 0x1234_5678;

fuzz_target!(|data: &[u8]| {
    let mut events = Vec::new();
    let _ = parse_rtcp(data, &mut events);

    // The jitter buffer never asks for more than this in one compound.
    let nacks: Vec<u16> =
        data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).take(MAX_NACKS_PER_COMPOUND).collect();
    let report = data.first().map(|&b| ReceptionReport {
        media_ssrc: MEDIA_SSRC,
        fraction_lost: b,
        cumulative_lost: u32::from(b) << 16,
        extended_highest_seq: nacks.last().copied().map_or(0, u32::from),
        ..Default::default()
    });
    let pli = data.len() % 3 == 0;
    let rrtr_ntp = (data.len() % 5 == 0).then_some(u64::from(data.len() as u32) << 32);
    let tmmbr_bps = (data.len() % 7 == 0).then(|| u64::from(data.first().copied().unwrap_or(0)) << (data.len() % 40));
    let remb_bps = (data.len() % 11 == 0).then(|| u64::from(data.last().copied().unwrap_or(0)) << (data.len() % 50));
    let feedback = ReceiverFeedback { report, nacks: &nacks, pli, media_ssrc: MEDIA_SSRC, rrtr_ntp, tmmbr_bps, remb_bps };
    let mut out = Vec::new();
    write_receiver_rtcp(0xfeed, "zerodrop@fuzz", &feedback, &mut out).expect("receiver RTCP can be written");

    events.clear();
    parse_rtcp(&out, &mut events).expect("our own receiver RTCP parses");
    let mut got: Vec<u16> = Vec::new();
    for event in &events {
        if let RtcpEvent::Nack { media_ssrc, seqs } = event {
            assert_eq!(*media_ssrc, MEDIA_SSRC);
            got.extend(seqs);
        }
    }
    let mut want = nacks;
    got.sort_unstable();
    got.dedup();
    want.sort_unstable();
    want.dedup();
    assert_eq!(got, want, "NACKed sequence numbers changed in the round trip");
    assert_eq!(events.contains(&RtcpEvent::Pli { media_ssrc: MEDIA_SSRC }), pli);
    if let Some(bps) = remb_bps {
        let remb = RtcpEvent::Remb { sender_ssrc: 0xfeed, bitrate_bps: remb_representable(bps), ssrcs: vec![MEDIA_SSRC] };
        assert!(events.contains(&remb), "our REMB did not parse back: {events:?}");
    }
    if let Some(ntp) = rrtr_ntp {
        assert!(events.contains(&RtcpEvent::ReceiverReferenceTime { ssrc: 0xfeed, ntp }));
    }
});
