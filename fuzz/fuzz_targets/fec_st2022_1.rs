#![no_main]
//! ST 2022-1 FEC under arbitrary input. Two runs share the input:
//!
//! - raw: arbitrary datagrams, as media or as FEC, interleaved with recovery,
//!   outlook and forget calls, into a decoder with the input's window. Nothing
//!   panics, every header that parses writes back to the same bytes, and
//!   everything recovered is RTP.
//! - checked: media packets built from the input's payloads go through our
//!   encoder (L×D from the input); the input chooses which media packets are
//!   lost. Every packet the decoder recovers is a lost one, byte for byte, and
//!   at the end no FEC packet lacks exactly one packet.
//!
//! Layout, read front to back so that `seeds.py` can write seeds: L byte
//! (L = 1 + L % 8), D byte (D = D % 9, 0: no column FEC), window byte (raw
//! window 16 << (window % 6)), then records: an op byte and, for ops 0, 1 and 4, a
//! 16-bit big-endian length and that many bytes (cut short at the end).
//! `op % 5`: 0 media datagram, 1 FEC datagram, 2 recover, 3 outlook of
//! `highest - (op >> 3 & 15)`, and forget before it when bit 7 is set,
//! 4 next checked payload (bit 5: marker, bit 6: lost).

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use zerodrop_dataplane::repair::fec::st2022_1::{FecPacket, St2022Encoder};
use zerodrop_dataplane::repair::fec::{FecDecoder, FecScheme};
use zerodrop_dataplane::rtp::{RtpPacket, RtpPacketBuilder, SeqExtender};

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
    encoder: St2022Encoder,
    decoder: FecDecoder,
    next_seq: u16,
    next_ext: u64,
    timestamp: u32,
    sent: BTreeMap<u64, Vec<u8>>,
    lost: BTreeSet<u64>,
    recovered: BTreeSet<u64>,
    fec: Vec<Vec<u8>>,
}

impl Checked {
    /// Holds a column FEC packet's whole span and its lag behind the media
    /// (L·D + (D-1)·c ≤ 120 for L, D ≤ 8) with room to spare.
    const WINDOW: usize = 256;

    fn new(columns: u8, rows: u8) -> Self {
        Self {
            encoder: St2022Encoder::new(columns, rows, 97),
            decoder: FecDecoder::new(FecScheme::St2022_1, Self::WINDOW),
            next_seq: 65_530,
            // As `SeqExtender` numbers it: the low 16 bits are the RTP number.
            next_ext: 1 << 16 | 65_530,
            timestamp: 0,
            sent: BTreeMap::new(),
            lost: BTreeSet::new(),
            recovered: BTreeSet::new(),
            fec: Vec::new(),
        }
    }

    fn send(&mut self, payload: &[u8], marker: bool, lose: bool) {
        // SSRC 0, as GStreamer's encoder demands: with every packet before it
        // lost, the decoder has no SSRC to learn.
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(self.next_seq)
            .timestamp(self.timestamp)
            .ssrc(0)
            .marker_bit(marker)
            .payload(payload)
            .write_vec()
            .expect("a packet with a short payload can be built");
        let ext = self.next_ext;
        (self.next_seq, self.next_ext) = (self.next_seq.wrapping_add(1), ext + 1);
        if marker {
            self.timestamp = self.timestamp.wrapping_add(3000);
        }
        self.sent.insert(ext, packet.clone());
        if lose {
            self.lost.insert(ext);
        } else {
            self.decoder.push_media(ext, &packet);
        }
        let mut fec = Vec::new();
        self.encoder.push(&packet, &mut |_, f| fec.push(f.to_vec())).expect("consecutive RTP");
        self.deliver(fec, ext);
    }

    fn deliver(&mut self, fec: Vec<Vec<u8>>, highest: u64) {
        for f in fec {
            FecPacket::parse(&f).expect("our FEC parses");
            self.decoder.push_fec(&f, highest).expect("our FEC fits the window");
            self.fec.push(f);
        }
        self.recover();
    }

    fn recover(&mut self) {
        let Self { decoder, sent, lost, recovered, .. } = self;
        decoder.recover(&mut |seq, datagram| {
            assert!(lost.contains(&seq), "recovered {seq}, which was not lost");
            assert_eq!(datagram, sent[&seq], "recovered {seq} differs from what was sent");
            assert!(recovered.insert(seq), "recovered {seq} twice");
        });
    }

    fn finish(mut self) {
        let mut fec = Vec::new();
        self.encoder.finish(&mut |_, f| fec.push(f.to_vec()));
        self.deliver(fec, self.next_ext.saturating_sub(1));
        assert_eq!(self.decoder.counters().recovered, self.recovered.len() as u64);
        if self.decoder.counters().fec_expired > 0 || self.sent.len() >= Self::WINDOW {
            return;
        }
        let by_low: BTreeMap<u16, u64> = self.sent.keys().map(|&s| (s as u16, s)).collect();
        for f in &self.fec {
            let missing: Vec<u64> = FecPacket::parse(f)
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
    let [columns, rows, window, rest @ ..] = data else { return };
    let mut raw = FecDecoder::new(FecScheme::St2022_1, 16 << (window % 6));
    let mut raw_seqs = SeqExtender::default();
    let mut highest = 0u64;
    let mut checked = Checked::new(1 + columns % 8, rows % 9);
    let mut written = Vec::new();
    for (op, bytes) in records(rest) {
        match op % 5 {
            0 => {
                let ext = match bytes {
                    [_, _, a, b, ..] => raw_seqs.extend(u16::from_be_bytes([*a, *b])),
                    _ => highest + 1,
                };
                highest = highest.max(ext);
                raw.push_media(ext, bytes);
            }
            1 => {
                if let Ok(fec) = FecPacket::parse(bytes) {
                    fec.header().write(fec.payload(), &mut written);
                    // CC is not kept (the header starts after 12 bytes).
                    assert_eq!((written[0], &written[1..]), (bytes[0] & 0xf0, &bytes[1..]));
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
