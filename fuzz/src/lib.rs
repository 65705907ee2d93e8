//! Input formats and checks shared by the fuzz targets.
//!
//! The depacketiser input is decoded front to back in a fixed byte layout
//! (not `#[derive(Arbitrary)]`, whose lengths are read from the end of the
//! data) so that `seeds.py` can write seed packets that the fuzzer starts from.

use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use zerodrop_crds::Codec;
use zerodrop_dataplane::depay::au::annexb_digest;
use zerodrop_dataplane::depay::{DepayEvent, Depacketizer};

/// RTP clock ticks per unit of a packet's timestamp step (half a frame at
/// 30 fps and 90 kHz).
pub const TIMESTAMP_STEP_UNIT: u32 = 1500;

/// What the jitter buffer hands the depacketiser: packets in order, some of
/// them preceded by a declared loss.
#[derive(Debug)]
pub struct DepayInput<'a> {
    pub first_timestamp: u32,
    pub packets: Vec<DepayPacket<'a>>,
}

#[derive(Debug)]
pub struct DepayPacket<'a> {
    pub payload: &'a [u8],
    /// Added to the previous packet's timestamp, in `TIMESTAMP_STEP_UNIT`s.
    pub timestamp_step: u32,
    pub marker: bool,
    /// A loss is declared just before this packet.
    pub loss_before: bool,
}

/// Layout: first timestamp (4 bytes, big endian), then per packet a flags
/// byte (bit 0 marker, bit 1 loss before, bits 2-4 timestamp step), the
/// payload length (2 bytes, big endian) and the payload (cut short at the end
/// of the data).
impl<'a> Arbitrary<'a> for DepayInput<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let ts = <[u8; 4]>::arbitrary(u)?;
        let mut packets = Vec::new();
        while !u.is_empty() {
            let flags = u8::arbitrary(u)?;
            let len = u16::from_be_bytes(<[u8; 2]>::arbitrary(u)?) as usize;
            let payload = u.bytes(len.min(u.len()))?;
            packets.push(DepayPacket {
                payload,
                timestamp_step: u32::from((flags >> 2) & 0x7),
                marker: flags & 1 != 0,
                loss_before: flags & 2 != 0,
            });
        }
        Ok(DepayInput { first_timestamp: u32::from_be_bytes(ts), packets })
    }
}

/// Feeds the packets and losses through a depacketiser and checks every frame
/// it hands on.
pub fn check_depacketizer(codec: Codec, input: &DepayInput<'_>) {
    let arrival = Instant::now();
    let mut depay = Depacketizer::new(codec);
    let mut events = Vec::new();
    let mut timestamp = input.first_timestamp;
    for packet in &input.packets {
        timestamp = timestamp.wrapping_add(packet.timestamp_step * TIMESTAMP_STEP_UNIT);
        if packet.loss_before {
            depay.push_loss(1);
        }
        depay.push_packet(packet.payload, timestamp, packet.marker, arrival, &mut events);
        check_frames(&mut events);
    }
    depay.flush(&mut events);
    check_frames(&mut events);
}

fn check_frames(events: &mut Vec<DepayEvent>) {
    for event in events.drain(..) {
        if let DepayEvent::Frame(au) = event {
            assert!(au.data.starts_with(&[0, 0, 0, 1]), "access unit does not start with a start code: {au:?}");
            assert_eq!(au.content_digest, annexb_digest(&au.data), "content digest differs from the Annex B digest");
        }
    }
}
