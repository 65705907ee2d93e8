//! Repair: the jitter buffer that waits for missing packets, the NACK
//! schedule and its budget, FEC recovery, and their coordination. Sans-IO:
//! packets and the time go in; what changed (for the metrics), packets to
//! release and sequence numbers to ask for come out.
//!
//! - [`jitter`]: the reorder/jitter buffer, its NACK schedule and the
//!   [`jitter::NackBudget`] that bounds retransmission requests;
//! - [`fec`]: SMPTE ST 2022-1 and RFC 5109 ULPFEC decoding (and the
//!   formats' writers);
//! - [`Repair`]: the three working together for one stream: FEC rebuilds
//!   what it can, a request for a packet whose FEC is due sooner than a
//!   retransmission could come is held back, one that FEC cannot rebuild is
//!   asked for at once, and the budget follows the stream's packet rate.

pub mod fec;
pub mod jitter;

use std::time::{Duration, Instant};

use crate::config::FecSource;
use crate::rtp::{RtpPacket, SeqExtender};
use fec::{FecDecoder, FecError, FecScheme, Outlook};
use jitter::{JitterBuffer, JitterSettings, NackBudget, Output, PushOutcome, StoredPacket};

/// Media packets the FEC decoder keeps: room for a 2-D ST 2022-1 matrix of
/// 20×20 with column FEC arriving after the next matrix (2·L·D + L).
pub const FEC_WINDOW: usize = 1024;
/// Quarter-second windows the packet rate is measured over (one second).
const RATE_WINDOWS: usize = 4;
/// The budget's packet rate is measured at least this long apart.
const RATE_STEP: Duration = Duration::from_millis(250);

/// What storing one packet changed: each figure is a count to add to the
/// stream's metric of the same meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub outcome: PushOutcome,
    /// Packets found missing by this one (a gap opened).
    pub went_missing: u64,
    /// Missing packets now here, by how they came.
    pub recovered_nack: u64,
    pub recovered_fec: u64,
    pub recovered_reorder: u64,
}

/// What became of an FEC packet.
#[derive(Debug)]
pub enum FecPush {
    /// FEC is not decoded for this stream (not enabled in `repair.fec`).
    NotDecoded,
    /// Kept for recovery.
    Used,
    /// It came before any media packet, with nothing to place it against.
    NoMediaYet,
    /// It cannot be used: malformed, or outside the decoder's window.
    Unusable(FecError),
}

/// What a round of FEC coordination did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecRound {
    /// Packets FEC rebuilt into the buffer.
    pub recovered: u64,
    /// Of those, packets no NACK had asked for yet.
    pub nacks_avoided: u64,
    /// Rebuilt datagrams that did not parse as RTP (not stored).
    pub malformed: u64,
}

/// Repair of one stream: the jitter buffer, the NACK budget and the FEC
/// decoder, with the sequence numbers extended once for all three.
pub struct Repair {
    jb: JitterBuffer,
    budget: NackBudget,
    fec: Option<FecDecoder>,
    /// ULPFEC: the payload type of FEC packets in the media stream.
    fec_payload_type: Option<u8>,
    seq: SeqExtender,
    /// First extended sequence number of the current sender (RFC 3550 A.3).
    base_seq: Option<u64>,
    /// Packets received at the start of each of the last rate windows (a
    /// quarter second each), and when: the rate is taken over the oldest, a
    /// second ago, so one quiet quarter between keyframes does not shrink
    /// the retransmission budget just before the next keyframe needs it.
    rate_windows: [(Instant, u64); RATE_WINDOWS],
    rate_window_next: usize,
    packet_rate: f64,
    scratch: Vec<u64>,
}

impl Repair {
    pub fn new(settings: JitterSettings, fec: Option<&FecSource>, now: Instant) -> Self {
        Self {
            budget: NackBudget::new(settings.latency),
            jb: JitterBuffer::new(settings),
            fec: fec.map(|f| FecDecoder::new(f.scheme, FEC_WINDOW)),
            fec_payload_type: fec.and_then(|f| (f.scheme == FecScheme::Ulpfec).then_some(f.payload_type).flatten()),
            seq: SeqExtender::default(),
            base_seq: None,
            rate_windows: [(now, 0); RATE_WINDOWS],
            rate_window_next: 0,
            packet_rate: 0.0,
            scratch: Vec::with_capacity(64),
        }
    }

    /// The jitter buffer, for what it answers by itself (held packets,
    /// deadlines, NACK states, probes for lost heads and tails).
    pub fn jitter(&self) -> &JitterBuffer {
        &self.jb
    }

    pub fn jitter_mut(&mut self) -> &mut JitterBuffer {
        &mut self.jb
    }

    pub fn budget(&self) -> &NackBudget {
        &self.budget
    }

    /// Media packets per second over the last second (0 until measured).
    pub fn packet_rate(&self) -> f64 {
        self.packet_rate
    }

    pub fn fec(&self) -> Option<&FecDecoder> {
        self.fec.as_ref()
    }

    /// Whether `payload_type` marks in-band (ULPFEC) FEC packets.
    pub fn is_fec_payload_type(&self, payload_type: u8) -> bool {
        self.fec_payload_type == Some(payload_type)
    }

    /// Extends a 16-bit sequence number; the first one of a sender becomes
    /// the base of its reception report.
    pub fn extend_media(&mut self, seq: u16) -> u64 {
        let ext = self.seq.extend(seq);
        self.base_seq = Some(self.base_seq.map_or(ext, |b| b.min(ext)));
        ext
    }

    /// Extends the sequence number of an in-band FEC packet (in the media's
    /// sequence space, but not a media packet: not a base).
    pub fn extend_fec(&mut self, seq: u16) -> u64 {
        self.seq.extend(seq)
    }

    pub fn base_seq(&self) -> Option<u64> {
        self.base_seq
    }

    pub fn highest_seq(&self) -> Option<u64> {
        self.seq.highest()
    }

    /// A received media packet (`packet` is `datagram` parsed), for the FEC
    /// decoder to rebuild others with. It keeps a copy: it needs the packet
    /// after the jitter buffer has handed it on.
    pub fn remember_for_fec(&mut self, ext: u64, packet: &RtpPacket<'_>, datagram: &[u8]) {
        if let Some(fec) = &mut self.fec {
            fec.push_parsed_media(ext, packet, datagram);
        }
    }

    /// An FEC packet, from an FEC socket or in-band under the FEC payload
    /// type (an in-band one's own sequence number extended first).
    pub fn push_fec(&mut self, datagram: &[u8]) -> FecPush {
        let Some(fec) = &mut self.fec else { return FecPush::NotDecoded };
        // Nothing to place it against before the media's first packet.
        let Some(highest) = self.seq.highest() else { return FecPush::NoMediaYet };
        match fec.push_fec(datagram, highest) {
            Ok(()) => FecPush::Used,
            Err(e) => FecPush::Unusable(e),
        }
    }

    /// Puts a packet into the jitter buffer and says what that changed.
    pub fn store(&mut self, ext: u64, packet: StoredPacket, now: Instant, by_fec: bool) -> Stored {
        let before = self.jb.counters();
        let outcome = self.jb.push(ext, packet, now);
        let after = self.jb.counters();
        let recovered = after.recovered - before.recovered;
        let by_nack = after.recovered_by_nack - before.recovered_by_nack;
        let (recovered_fec, recovered_nack, recovered_reorder) =
            if by_fec { (recovered, 0, 0) } else { (0, by_nack, recovered - by_nack) };
        Stored { outcome, went_missing: after.went_missing - before.went_missing, recovered_nack, recovered_fec, recovered_reorder }
    }

    /// Lets FEC and NACK work together on what is missing: rebuilds what FEC
    /// can (each rebuilt packet goes to `on_recovered` with its sequence
    /// number, then into the buffer), holds back the request for a packet
    /// whose FEC is due sooner than an answer to a NACK sent now could come,
    /// and asks at once for a packet FEC cannot rebuild. `stored` hears of
    /// each rebuilt packet stored, for the metrics.
    pub fn coordinate_fec(
        &mut self,
        now: Instant,
        rtt: Duration,
        on_recovered: &mut dyn FnMut(u16, &[u8]),
        stored: &mut dyn FnMut(Stored),
    ) -> FecRound {
        let mut round = FecRound::default();
        let Some(mut fec) = self.fec.take() else { return round };
        if self.jb.held() > 0 {
            if let Some(limit) = self.jb.end() {
                fec.recover_below(limit, &mut |seq, datagram| {
                    self.store_recovered(seq, datagram, now, &mut round, on_recovered, stored)
                });
            }
            let highest = self.seq.highest().unwrap_or(0);
            // Time per media packet, to turn "due after packet N" into a time.
            let per_packet = Duration::from_secs_f64(1.0 / self.packet_rate.max(100.0));
            let mut missing = std::mem::take(&mut self.scratch);
            missing.clear();
            missing.extend(self.jb.missing());
            for &seq in &missing {
                match fec.outlook(seq, highest) {
                    Outlook::Present | Outlook::Recoverable => {}
                    Outlook::Waiting { fec_due_after } => {
                        // FEC "in time" is FEC no later than a retransmission.
                        // Due with media packet `fec_due_after`; a little
                        // slack for pacing, none for the reordering grace
                        // (that is for calling it lost, later).
                        let packets = fec_due_after.saturating_sub(highest).min(u32::MAX as u64) as u32 + 1;
                        let fec_eta = per_packet * packets + Duration::from_millis(2);
                        if fec_eta <= rtt {
                            self.jb.defer_nack(seq, now + fec_eta);
                        } else {
                            self.jb.nack_now(seq, now);
                        }
                    }
                    Outlook::Hopeless => self.jb.nack_now(seq, now),
                }
            }
            self.scratch = missing;
        }
        self.fec = Some(fec);
        round
    }

    /// A media packet FEC rebuilt: into the jitter buffer like any other,
    /// if it is still missing (it may have been released or given up on).
    fn store_recovered(
        &mut self,
        seq: u64,
        datagram: &[u8],
        now: Instant,
        round: &mut FecRound,
        on_recovered: &mut dyn FnMut(u16, &[u8]),
        stored: &mut dyn FnMut(Stored),
    ) {
        let Ok(p) = RtpPacket::parse(datagram) else {
            round.malformed += 1;
            return;
        };
        let (payload_offset, payload_len, timestamp, marker) = (p.payload_offset(), p.payload_len(), p.timestamp(), p.marker_bit());
        let Some(asked) = self.jb.nack_state(seq).map(|n| n.sent) else { return };
        on_recovered(seq as u16, datagram);
        let mut data = self.jb.take_spare();
        data.clear();
        data.extend_from_slice(datagram);
        let packet = StoredPacket {
            data,
            payload_offset,
            payload_len,
            timestamp,
            marker,
            arrival: now,
            retransmitted: false,
            fec: false,
        };
        let s = self.store(seq, packet, now, true);
        if s.outcome == PushOutcome::Stored {
            round.recovered += 1;
            if asked == 0 {
                round.nacks_avoided += 1;
            }
        }
        stored(s);
    }

    /// The requests due now, into `out` (extended sequence numbers), as the
    /// budget allows. Measures the packet rate the budget follows once per
    /// quarter second. Returns the requests the budget refused this round.
    pub fn due_nacks(&mut self, now: Instant, rtt: Duration, out: &mut Vec<u64>) -> u64 {
        let newest = self.rate_windows[(self.rate_window_next + RATE_WINDOWS - 1) % RATE_WINDOWS];
        if now.saturating_duration_since(newest.0) >= RATE_STEP {
            let received = self.jb.counters().received;
            let oldest = self.rate_windows[self.rate_window_next];
            let window = now.saturating_duration_since(oldest.0);
            self.packet_rate = received.saturating_sub(oldest.1) as f64 / window.as_secs_f64().max(0.25);
            self.budget.set_packet_rate(self.packet_rate);
            self.rate_windows[self.rate_window_next] = (now, received);
            self.rate_window_next = (self.rate_window_next + 1) % RATE_WINDOWS;
        }
        let refused = self.budget.refused;
        self.jb.due_nacks(now, rtt, &mut self.budget, out);
        self.budget.refused - refused
    }

    /// Packets whose wait is over, in order, and losses declared.
    pub fn pop_ready(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.jb.pop_ready(now, out);
    }

    /// Everything held, at once (stop, or a sender restart).
    pub fn drain(&mut self, out: &mut Vec<Output>) {
        self.jb.drain(out);
    }

    /// A new sender: sequence numbers start afresh. The FEC decoder keeps
    /// its window (it forgets by sequence number).
    pub fn reset(&mut self) {
        self.jb.reset();
        self.seq = SeqExtender::default();
        self.base_seq = None;
    }
}

#[cfg(test)]
mod tests;
