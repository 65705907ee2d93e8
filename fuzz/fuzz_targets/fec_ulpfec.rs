#![no_main]
//! RFC 5109 ULPFEC under arbitrary input. Two runs share the input:
//!
//! - raw: arbitrary datagrams, as media or as FEC, interleaved with recovery,
//!   outlook and forget calls, into a decoder with the input's window. Nothing
//!   panics, every header that parses writes back to itself, and everything
//!   recovered is RTP.
//! - checked: media packets built from the input's payloads go through our
//!   encoder (percentage and multipacket from the input), which renumbers
//!   them around its FEC packets; the input chooses which media packets are
//!   lost. Every packet the decoder recovers is a lost one, byte for byte, and
//!   at the end no FEC packet lacks exactly one packet.
//!
//! Layout, read front to back so that `seeds.py` can write seeds: percentage
//! byte (% 101), flags byte (bit 0: multipacket), window byte (raw window
//! 16 << (window % 6)), then records: an op
//! byte and, for ops 0, 1 and 4, a 16-bit big-endian length and that many
//! bytes (cut short at the end). `op % 5`: 0 media datagram, 1 FEC datagram
//! (both numbered in one sequence space, as ULPFEC shares it), 2 recover,
//! 3 outlook of `highest - (op >> 3 & 15)`, and forget before it when bit 7
//! is set, 4 next checked payload (bit 5: marker, bit 6: lost).

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use zerodrop_dataplane::repair::fec::ulpfec::{FecRtpHeader, UlpfecEncoder, UlpfecOutput, UlpfecPacket, UlpfecSettings};
use zerodrop_dataplane::repair::fec::{FecDecoder, FecScheme};
use zerodrop_dataplane::rtp::{RtpPacket, RtpPacketBuilder, SeqExtender};

const SSRC: u32 = 0x00c0_ffee;

/// Records of the layout above: (op, bytes).
fn records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&op, rest) = data.split_first()?;
        data = rest;
        if matches!(op % 5, 0 | 1 | 4) {
            let [a, b, rest @ ..] = data else { return Some((op, std::mem::take(&mut data))) };
            let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
            let (bytes, rest) = rest.split_at(len);
            data = rest;
            Some((op, bytes))
        } else {
            Some((op, &[][..]))
        }
    })
}

/// Our encoder into a decoder, with the losses the input chooses.
struct Checked {
    encoder: UlpfecEncoder,
    decoder: FecDecoder,
    seqs: SeqExtender,
    next_seq: u16,
    timestamp: u32,
    sent: BTreeMap<u64, Vec<u8>>,
    lost: BTreeSet<u64>,
    recovered: BTreeSet<u64>,
    fec: Vec<Vec<u8>>,
}

impl Checked {
    /// FEC follows its frame (at most 48 packets) at once.
    const WINDOW: usize = 256;

    fn new(settings: UlpfecSettings) -> Self {
        Self {
            encoder: UlpfecEncoder::new(settings),
            decoder: FecDecoder::new(FecScheme::Ulpfec, Self::WINDOW),
            seqs: SeqExtender::default(),
            next_seq: 65_530,
            timestamp: 0,
            sent: BTreeMap::new(),
            lost: BTreeSet::new(),
            recovered: BTreeSet::new(),
            fec: Vec::new(),
        }
    }

    fn send(&mut self, payload: &[u8], marker: bool, lose: bool) {
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(self.next_seq)
            .timestamp(self.timestamp)
            .ssrc(SSRC)
            .marker_bit(marker)
            .payload(payload)
            .write_vec()
            .expect("a packet with a short payload can be built");
        self.next_seq = self.next_seq.wrapping_add(1);
        if marker {
            self.timestamp = self.timestamp.wrapping_add(3000);
        }
        let mut out = Vec::new();
        self.encoder.push(&packet, &mut |kind, d| out.push((kind, d.to_vec()))).expect("valid RTP");
        for (kind, datagram) in out {
            let ext = self.seqs.extend(u16::from_be_bytes([datagram[2], datagram[3]]));
            match kind {
                UlpfecOutput::Media => {
                    self.sent.insert(ext, datagram.clone());
                    if lose {
                        self.lost.insert(ext);
                    } else {
                        self.decoder.push_media(ext, &datagram);
                    }
                }
                UlpfecOutput::Fec => {
                    UlpfecPacket::parse(&datagram).expect("our FEC parses");
                    self.decoder.push_fec(&datagram, ext).expect("our FEC fits the window");
                    self.fec.push(datagram);
                }
            }
            self.recover();
        }
    }

    fn recover(&mut self) {
        let Self { decoder, sent, lost, recovered, .. } = self;
        decoder.recover(&mut |seq, datagram| {
            assert!(lost.contains(&seq), "recovered {seq}, which was not lost");
            assert_eq!(datagram, sent[&seq], "recovered {seq} differs from what was sent");
            assert!(recovered.insert(seq), "recovered {seq} twice");
        });
    }

    fn finish(self) {
        assert_eq!(self.decoder.counters().recovered, self.recovered.len() as u64);
        if self.decoder.counters().fec_expired > 0
            || self.seqs.highest().unwrap_or(0) >= (1 << 16) + Self::WINDOW as u64
        {
            return;
        }
        let by_low: BTreeMap<u16, u64> = self.sent.keys().map(|&s| (s as u16, s)).collect();
        for f in &self.fec {
            let missing: Vec<u64> = UlpfecPacket::parse(f)
                .unwrap()
                .protected()
                .map(|p| by_low[&p])
                .filter(|s| self.lost.contains(s) && !self.recovered.contains(s))
                .collect();
            assert_ne!(missing.len(), 1, "FEC packet lacking only {missing:?} was not used");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [percentage, flags, window, rest @ ..] = data else { return };
    let mut raw = FecDecoder::new(FecScheme::Ulpfec, 16 << (window % 6));
    let mut raw_seqs = SeqExtender::default();
    let mut highest = 0u64;
    let settings = UlpfecSettings { payload_type: 122, percentage: percentage % 101, multipacket: flags & 1 != 0 };
    let mut checked = Checked::new(settings);
    let mut written = Vec::new();
    for (op, bytes) in records(rest) {
        match op % 5 {
            kind @ (0 | 1) => {
                let ext = match bytes {
                    [_, _, a, b, ..] => raw_seqs.extend(u16::from_be_bytes([*a, *b])),
                    _ => highest + 1,
                };
                highest = highest.max(ext);
                if kind == 0 {
                    raw.push_media(ext, bytes);
                    continue;
                }
                if let Ok(fec) = UlpfecPacket::parse(bytes) {
                    let rtp = FecRtpHeader {
                        payload_type: fec.rtp().payload_type(),
                        sequence_number: fec.rtp().sequence_number(),
                        timestamp: fec.rtp().timestamp(),
                        ssrc: fec.rtp().ssrc(),
                        marker: fec.rtp().marker_bit(),
                    };
                    fec.header().write(&rtp, fec.level0_payload(), &mut written);
                    let again = UlpfecPacket::parse(&written).expect("a written FEC packet parses");
                    assert_eq!(again.header(), fec.header());
                    assert_eq!(again.level0_payload(), fec.level0_payload());
                }
                let _ = raw.push_fec(bytes, highest);
            }
            2 => raw.recover(&mut |_, d| assert!(RtpPacket::parse(d).is_ok(), "recovered a non-RTP datagram")),
            3 => {
                let seq = highest.saturating_sub(u64::from(op >> 3 & 15));
                let _ = raw.outlook(seq, highest);
                if op & 0x80 != 0 {
                    raw.forget_before(seq);
                }
            }
            _ => checked.send(bytes, op & 0x20 != 0, op & 0x40 != 0),
        }
    }
    checked.finish();
});
