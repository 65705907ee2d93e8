#![no_main]
//! RTP parsing on arbitrary datagrams; for every packet that parses, its RTX
//! (RFC 4588) must parse back to the original sequence number and payload.

use libfuzzer_sys::fuzz_target;
use zerodrop_dataplane::rtp::{RtpPacket, parse_rtx, write_rtx};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = RtpPacket::parse(data) else { return };
    let _ = parse_rtx(packet.payload());

    let (rtx_pt, rtx_ssrc, rtx_seq) = (97, packet.ssrc() ^ 0x5a5a_5a5a, packet.sequence_number().wrapping_mul(7));
    let mut out = Vec::new();
    write_rtx(&packet, rtx_pt, rtx_ssrc, rtx_seq, &mut out).expect("the RTX of a parsed packet can be written");
    let rtx = RtpPacket::parse(&out).expect("a written RTX packet parses");
    assert_eq!(
        (rtx.payload_type(), rtx.ssrc(), rtx.sequence_number()),
        (rtx_pt, rtx_ssrc, rtx_seq)
    );
    assert_eq!((rtx.timestamp(), rtx.marker_bit()), (packet.timestamp(), packet.marker_bit()));
    let inner = parse_rtx(rtx.payload()).expect("an RTX payload carries the original sequence number");
    assert_eq!(inner.original_seq, packet.sequence_number());
    assert_eq!(inner.payload, packet.payload());
});
