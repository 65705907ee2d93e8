//! Forward error correction: SMPTE ST 2022-1 (2-D row/column XOR over an L×D
//! matrix, [`st2022_1`]) and RFC 5109 ULPFEC ([`ulpfec`]), wire-compatible
//! with GStreamer's `rtpst2022-1-fecenc`/`-fecdec` and
//! `rtpulpfecenc`/`rtpulpfecdec`. Each submodule's docs draw its wire format
//! and list what GStreamer does that a receiver must know.
//!
//! [`FecDecoder`] is the receive side of both, shaped for a receive loop:
//!
//! ```text
//!  media datagram ──push_media(ext_seq, d)──┐
//!  FEC datagram ────push_fec(d, highest)────┤  FecDecoder: ring of the last `window`
//!                                           │  media packets + pool of FEC packets
//!  when a loss is worth repairing ─recover(out)─> out(ext_seq, rebuilt datagram)
//!  NACK scheduler ──outlook(seq, highest)──> Present / Recoverable / Waiting{..} / Hopeless
//!  jitter buffer released up to s ─forget_before(s)
//! ```
//!
//! The decoder copies what it is given into preallocated buffers (a ring of
//! `window` media slots and `window / 2` FEC slots, each sized for a
//! 1500-byte datagram), so memory is bounded and nothing is allocated per
//! packet once a buffer has seen the largest datagram. Malformed or absurd FEC
//! packets are errors that name the field; nothing panics on wire input.
//!
//! What the receive loop must do per scheme (for both: extended sequence
//! numbers as [`SeqExtender`](crate::rtp::SeqExtender) makes them, whose low
//! 16 bits are the RTP sequence number, because FEC names packets by those):
//!
//! - **ST 2022-1:** media and the two FEC streams arrive on three ports (media,
//!   column FEC on +2, row FEC on +4 in the usual layout). FEC packets carry
//!   SSRC 0 and their own sequence numbers; the decoder rebuilds packets with
//!   the SSRC of the media it has seen. A row FEC packet may arrive just
//!   *before* the last media packet of its row, and column FEC arrives up to
//!   about 2·L·D media packets after the first packet it protects: keep
//!   `window` ≥ 2·L·D + L, and call [`FecDecoder::recover_below`] with the
//!   next expected sequence number, or it will rebuild packets that are
//!   merely late and that nothing has shown missing yet.
//! - **ULPFEC:** FEC shares the media's SSRC *and sequence numbers*,
//!   distinguished by payload type. Feed the sequence extender with both, give
//!   the decoder media with [`FecDecoder::push_media`] and FEC with
//!   [`FecDecoder::push_fec`], and do not NACK sequence numbers that carried
//!   FEC; a lost FEC packet is a gap indistinguishable from lost media (its
//!   [`Outlook`] ends up [`Outlook::Hopeless`] and a NACK for it goes
//!   unanswered).

pub mod st2022_1;
pub mod ulpfec;

use rtp_types::{RtpPacket, RtpParseError};

use st2022_1::{Direction, FecPacket, St2022Error};
use ulpfec::{UlpfecError, UlpfecPacket};

/// Buffer size each media and FEC slot is allocated with up front.
const SLOT_BYTES: usize = 1500;
/// Packets of reordering [`FecDecoder::outlook`] allows between an FEC
/// packet's due point and declaring it lost.
pub const REORDER_GRACE: u64 = 8;
/// Bounds of the decoder window (the 16-bit sequence space must stay
/// unambiguous within it).
const MIN_WINDOW: usize = 16;
const MAX_WINDOW: usize = 1 << 15;
const EMPTY: u64 = u64::MAX;
/// Extended sequence numbers at or above this are ignored, which keeps all
/// window arithmetic far from overflow (a real stream would need 2^46 wraps).
pub const MAX_EXT_SEQ: u64 = 1 << 62;

/// XORs `src` into `dst`, first zero-extending `dst` to `src`'s length: the
/// protection operation of both schemes on payloads of unequal length.
pub(crate) fn xor_into(dst: &mut Vec<u8>, src: &[u8]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Why a datagram is not an RTP packet (`rtp-types`' error, made comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotRtp {
    #[error("RTP version {0}, expected 2")]
    Version(u8),
    #[error("{len}-byte datagram ends inside its RTP header, CSRC list, extension or padding ({needed} bytes needed)")]
    Truncated { needed: usize, len: usize },
    #[error("RTP padding length {0}, expected at least 1")]
    Padding(u8),
}

impl From<RtpParseError> for NotRtp {
    fn from(e: RtpParseError) -> Self {
        match e {
            RtpParseError::UnsupportedVersion(v) => Self::Version(v),
            RtpParseError::Truncated { expected, actual } => Self::Truncated { needed: expected, len: actual },
            RtpParseError::PaddingInvalid(p) => Self::Padding(p),
        }
    }
}

pub(crate) fn parse_rtp(datagram: &[u8]) -> Result<RtpPacket<'_>, NotRtp> {
    Ok(RtpPacket::parse(datagram)?)
}

pub use zerodrop_core::FecScheme;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecCounters {
    /// Every datagram given to [`FecDecoder::push_fec`].
    pub fec_received: u64,
    /// FEC datagrams whose headers did not parse.
    pub fec_malformed: u64,
    /// FEC packets that parsed but could not be used: outside the window,
    /// spanning more than it, or inconsistent with the media (the rebuilt
    /// packet's length, payload type, padding or extension did not hold up).
    pub fec_unusable: u64,
    /// FEC packets dropped while still lacking two or more packets: aged out
    /// of the window, forgotten, or pushed out of a full pool.
    pub fec_expired: u64,
    /// Media packets rebuilt and handed to `recover`'s caller.
    pub recovered: u64,
    /// Of those, by ST 2022-1 row and column FEC (ULPFEC counts in neither).
    pub recovered_row: u64,
    pub recovered_column: u64,
    /// Datagrams given to [`FecDecoder::push_media`] that were not RTP, had
    /// a sequence number other than `ext_seq`'s low 16 bits, or were older
    /// than the window.
    pub media_ignored: u64,
}

/// What FEC can still do for a missing media packet, for NACK coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outlook {
    /// The packet is here (received or recovered).
    Present,
    /// An FEC packet that arrived lacks only this packet, directly or once
    /// another packet it lacks is rebuilt: [`FecDecoder::recover`] restores it.
    Recoverable,
    /// FEC that could restore it has not arrived yet; it is sent alongside
    /// media sequence number `fec_due_after` (ST 2022-1) or right after it
    /// (ULPFEC: the frame's marker packet), so it is late once media well past
    /// that number has arrived.
    Waiting { fec_due_after: u64 },
    /// No FEC will restore it: everything that could protect it arrived
    /// lacking other packets too, or is overdue, or the packet is outside the
    /// window. Ask for a retransmission.
    Hopeless,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    #[error("malformed ST 2022-1 FEC packet: {0}")]
    St2022(#[from] St2022Error),
    #[error("malformed ULPFEC packet: {0}")]
    Ulpfec(#[from] UlpfecError),
    #[error("FEC SN base {sn_base} lies before the first sequence number of the stream (highest media {highest})")]
    BeforeStream { sn_base: u16, highest: u64 },
    #[error("FEC packet protects {span} sequence numbers from {first}, more than the decoder window of {window}")]
    SpanExceedsWindow { first: u64, span: u64, window: u64 },
    #[error(
        "FEC packet protects {first}..={last}, older than the decoder keeps (highest media {highest}, window {window}, forgotten before {floor})"
    )]
    Stale { first: u64, last: u64, highest: u64, window: u64, floor: u64 },
    #[error("FEC packet protects up to {last}, more than {limit} past the highest media sequence number {highest}")]
    AheadOfMedia { last: u64, highest: u64, limit: u64 },
}

/// The media packets one FEC packet protects, by extended sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protection {
    /// `count` packets `step` apart from `first` (ST 2022-1 rows and columns).
    Stride { first: u64, step: u64, count: u64 },
    /// Bit *i* of `mask` protects `first + i` (ULPFEC).
    Mask { first: u64, mask: u64 },
}

impl Protection {
    fn first(&self) -> u64 {
        match *self {
            Self::Stride { first, .. } | Self::Mask { first, .. } => first,
        }
    }

    fn last(&self) -> u64 {
        match *self {
            Self::Stride { first, step, count } => first + step * (count - 1),
            Self::Mask { first, mask } => first + u64::from(63 - mask.leading_zeros()),
        }
    }

    fn contains(&self, seq: u64) -> bool {
        let Some(d) = seq.checked_sub(self.first()) else { return false };
        match *self {
            Self::Stride { step, count, .. } => d % step == 0 && d / step < count,
            Self::Mask { mask, .. } => d < 64 && mask >> d & 1 != 0,
        }
    }

    fn iter(self) -> impl Iterator<Item = u64> {
        let n = match self {
            Self::Stride { count, .. } => count,
            Self::Mask { .. } => 64,
        };
        (0..n).filter_map(move |i| match self {
            Self::Stride { first, step, .. } => Some(first + i * step),
            Self::Mask { first, mask } => (mask >> i & 1 != 0).then_some(first + i),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FecKind {
    Row,
    Column,
    Ulpfec,
}

#[derive(Debug)]
struct MediaSlot {
    seq: u64,
    data: Vec<u8>,
    timestamp: u32,
    marker: bool,
}

#[derive(Debug)]
struct FecEntry {
    protection: Protection,
    kind: FecKind,
    datagram: Vec<u8>,
}

/// What one stored FEC packet lacks right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lack {
    missing: u64,
    /// One of the missing packets (the only one when `missing == 1`).
    some_missing: Option<u64>,
    /// A missing packet can no longer be stored (older than the window), so
    /// the FEC packet is of no further use.
    dead: bool,
}

/// Where the last ST 2022-1 FEC packets put the matrix (L, D and alignment).
#[derive(Debug, Clone, Copy, Default)]
struct Geometry {
    /// First sequence number and L of the last row FEC packet.
    row: Option<(u64, u64)>,
    /// First sequence number, L and D of the last column FEC packet.
    column: Option<(u64, u64, u64)>,
}

/// Recovers lost media from ST 2022-1 or ULPFEC packets; see the module docs.
#[derive(Debug)]
pub struct FecDecoder {
    scheme: FecScheme,
    window: u64,
    slots: Vec<MediaSlot>,
    /// Highest extended sequence number stored in `slots`.
    highest: Option<u64>,
    entries: Vec<FecEntry>,
    /// Indices of stored FEC packets in `entries`, oldest first.
    live: Vec<usize>,
    free: Vec<usize>,
    /// Packets before this are not reported any more (`forget_before`).
    floor: u64,
    media_ssrc: Option<u32>,
    fec_ssrc: Option<u32>,
    /// Payload types seen on media, most recent first.
    media_pts: [Option<u8>; 4],
    geometry: Geometry,
    st_parity: st2022_1::Parity,
    ulp_parity: ulpfec::Parity,
    rebuilt: Vec<u8>,
    counters: FecCounters,
}

impl FecDecoder {
    /// `window`: media packets kept for recovery (rounded up to a power of
    /// two, 16..=32768); the decoder also keeps up to `window / 2` FEC packets.
    pub fn new(scheme: FecScheme, window: usize) -> Self {
        let window = window.clamp(MIN_WINDOW, MAX_WINDOW).next_power_of_two();
        let fec_slots = window / 2;
        Self {
            scheme,
            window: window as u64,
            slots: (0..window)
                .map(|_| MediaSlot { seq: EMPTY, data: Vec::with_capacity(SLOT_BYTES), timestamp: 0, marker: false })
                .collect(),
            highest: None,
            entries: (0..fec_slots)
                .map(|_| FecEntry {
                    protection: Protection::Stride { first: 0, step: 1, count: 1 },
                    kind: FecKind::Ulpfec,
                    datagram: Vec::with_capacity(SLOT_BYTES),
                })
                .collect(),
            live: Vec::with_capacity(fec_slots),
            free: (0..fec_slots).rev().collect(),
            floor: 0,
            media_ssrc: None,
            fec_ssrc: None,
            media_pts: [None; 4],
            geometry: Geometry::default(),
            st_parity: st2022_1::Parity::with_capacity(SLOT_BYTES),
            ulp_parity: ulpfec::Parity::with_capacity(SLOT_BYTES),
            rebuilt: Vec::with_capacity(SLOT_BYTES),
            counters: FecCounters::default(),
        }
    }

    pub fn scheme(&self) -> FecScheme {
        self.scheme
    }

    /// Media packets kept (after rounding).
    pub fn window(&self) -> usize {
        self.window as usize
    }

    pub fn counters(&self) -> FecCounters {
        self.counters
    }

    fn slot(&self, seq: u64) -> usize {
        (seq & (self.window - 1)) as usize
    }

    fn present(&self, seq: u64) -> bool {
        self.slots[self.slot(seq)].seq == seq
    }

    /// Whether `seq` is recent enough to be (or become) held in the ring.
    fn retained(&self, seq: u64) -> bool {
        self.highest.is_none_or(|h| seq + self.window > h)
    }

    /// A media packet (whole RTP datagram) that arrived, was retransmitted or
    /// was recovered elsewhere; `ext_seq` is its extended sequence number,
    /// whose low 16 bits must be the packet's RTP sequence number (as
    /// [`SeqExtender`](crate::rtp::SeqExtender) makes it: FEC names packets by
    /// those bits). Packets that are not RTP, disagree, or are older than the
    /// window are ignored and counted.
    pub fn push_media(&mut self, ext_seq: u64, datagram: &[u8]) {
        let Ok(packet) = RtpPacket::parse(datagram) else {
            self.counters.media_ignored += 1;
            return;
        };
        self.push_parsed_media(ext_seq, &packet, datagram);
    }

    /// [`push_media`](Self::push_media) for a packet the caller has parsed
    /// already (`packet` is `datagram` parsed): the receive path parses each
    /// packet once.
    pub fn push_parsed_media(&mut self, ext_seq: u64, packet: &RtpPacket<'_>, datagram: &[u8]) {
        if ext_seq >= MAX_EXT_SEQ || ext_seq as u16 != packet.sequence_number() || !self.retained(ext_seq) {
            self.counters.media_ignored += 1;
            return;
        }
        self.media_ssrc = Some(packet.ssrc());
        let pt = packet.payload_type();
        // Keep the most recent distinct payload types, newest first.
        if self.media_pts[0] != Some(pt) {
            let keep = self.media_pts.iter().position(|p| *p == Some(pt)).unwrap_or(self.media_pts.len() - 1);
            self.media_pts[..=keep].rotate_right(1);
            self.media_pts[0] = Some(pt);
        }
        let i = self.slot(ext_seq);
        let slot = &mut self.slots[i];
        slot.seq = ext_seq;
        slot.data.clear();
        slot.data.extend_from_slice(datagram);
        slot.timestamp = packet.timestamp();
        slot.marker = packet.marker_bit();
        self.highest = Some(self.highest.map_or(ext_seq, |h| h.max(ext_seq)));
    }

    /// An FEC packet (whole RTP datagram). `highest_media` is the highest
    /// extended media sequence number seen (for ULPFEC, of the shared
    /// sequence space), used to extend the 16-bit SN base. FEC whose packets
    /// are all here already is dropped at once; the rest is kept until it is
    /// used, ages out of the window or is pushed out by newer FEC.
    pub fn push_fec(&mut self, datagram: &[u8], highest_media: u64) -> Result<(), FecError> {
        self.counters.fec_received += 1;
        let parsed = self.parse_fec(datagram);
        let (sn_base, protection, kind) = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.counters.fec_malformed += 1;
                return Err(e);
            }
        };
        let reference = highest_media.min(MAX_EXT_SEQ).max(self.highest.unwrap_or(0));
        let checked = self.check_protection(sn_base, protection, reference);
        let protection = match checked {
            Ok(p) => p,
            Err(e) => {
                self.counters.fec_unusable += 1;
                return Err(e);
            }
        };
        match (kind, protection) {
            (FecKind::Row, Protection::Stride { first, count, .. }) => self.geometry.row = Some((first, count)),
            (FecKind::Column, Protection::Stride { first, step, count }) => {
                self.geometry.column = Some((first, step, count));
            }
            _ => {}
        }
        if protection.iter().all(|s| self.present(s)) {
            return Ok(());
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                // Full: the oldest FEC packet makes room.
                let oldest = self.live.remove(0);
                self.counters.fec_expired += 1;
                oldest
            }
        };
        let entry = &mut self.entries[index];
        entry.protection = protection;
        entry.kind = kind;
        entry.datagram.clear();
        entry.datagram.extend_from_slice(datagram);
        self.live.push(index);
        Ok(())
    }

    /// Parses an FEC datagram into its 16-bit SN base and what it protects
    /// (with a placeholder base that `check_protection` extends).
    fn parse_fec(&mut self, datagram: &[u8]) -> Result<(u16, Protection, FecKind), FecError> {
        Ok(match self.scheme {
            FecScheme::St2022_1 => {
                let fec = FecPacket::parse(datagram)?;
                let (step, kind) = match fec.direction() {
                    Direction::Row => (1, FecKind::Row),
                    Direction::Column => (u64::from(fec.offset()), FecKind::Column),
                };
                (fec.sn_base_low(), Protection::Stride { first: 0, step, count: u64::from(fec.na()) }, kind)
            }
            FecScheme::Ulpfec => {
                let fec = UlpfecPacket::parse(datagram)?;
                self.fec_ssrc = Some(fec.rtp().ssrc());
                (fec.sn_base(), Protection::Mask { first: 0, mask: fec.mask() }, FecKind::Ulpfec)
            }
        })
    }

    /// Extends the SN base next to `reference` and checks that the protected
    /// packets fit the window around it.
    fn check_protection(&self, sn_base: u16, protection: Protection, reference: u64) -> Result<Protection, FecError> {
        let delta = i64::from(sn_base.wrapping_sub(reference as u16) as i16);
        let first = u64::try_from(reference as i64 + delta)
            .map_err(|_| FecError::BeforeStream { sn_base, highest: reference })?;
        let protection = match protection {
            Protection::Stride { step, count, .. } => Protection::Stride { first, step, count },
            Protection::Mask { mask, .. } => Protection::Mask { first, mask },
        };
        let last = protection.last();
        let span = last - first + 1;
        if span > self.window {
            return Err(FecError::SpanExceedsWindow { first, span, window: self.window });
        }
        if first + self.window <= reference || last < self.floor {
            return Err(FecError::Stale { first, last, highest: reference, window: self.window, floor: self.floor });
        }
        let limit = self.window / 2;
        if last > reference + limit {
            return Err(FecError::AheadOfMedia { last, highest: reference, limit });
        }
        Ok(protection)
    }

    /// What `protection` lacks, not counting `except`.
    fn lack(&self, protection: Protection, except: Option<u64>) -> Lack {
        let mut lack = Lack { missing: 0, some_missing: None, dead: false };
        for seq in protection.iter() {
            if Some(seq) == except || self.present(seq) {
                continue;
            }
            lack.missing += 1;
            lack.some_missing = Some(seq);
            lack.dead |= !self.retained(seq);
        }
        lack
    }

    /// Recovers everything now recoverable, iterating until no FEC packet
    /// lacks exactly one packet (a row recovery can enable a column one and
    /// the other way round). Each rebuilt packet is kept and handed to `out`
    /// with its extended sequence number, unless it lies before
    /// [`forget_before`](Self::forget_before). The rebuilt RTP header carries
    /// the SSRC of the media pushed (for ULPFEC, failing that, the FEC's).
    pub fn recover(&mut self, out: &mut dyn FnMut(u64, &[u8])) {
        self.recover_below(u64::MAX, out);
    }

    /// [`recover`](Self::recover), rebuilding only packets before `limit`
    /// (the receiver's next expected sequence number). A packet at or past
    /// it is not known to be lost yet: the row FEC that would rebuild it can
    /// overtake it between sockets, and a rebuilt packet the jitter buffer
    /// has no gap for would be thrown away while the decoder took it for
    /// present. The FEC is kept until the gap shows.
    pub fn recover_below(&mut self, limit: u64, out: &mut dyn FnMut(u64, &[u8])) {
        loop {
            let mut progress = false;
            let mut kept = 0;
            for r in 0..self.live.len() {
                let index = self.live[r];
                let protection = self.entries[index].protection;
                let lack = self.lack(protection, None);
                let keep = if lack.dead || protection.last() < self.floor {
                    self.counters.fec_expired += u64::from(lack.missing > 1);
                    false
                } else if lack.missing == 0 {
                    false
                } else if let (1, Some(seq)) = (lack.missing, lack.some_missing)
                    && seq < limit
                {
                    match self.rebuild(index, seq) {
                        Ok(()) => {
                            self.store_rebuilt(seq, index, out);
                            progress = true;
                        }
                        Err(_) => self.counters.fec_unusable += 1,
                    }
                    false
                } else {
                    true
                };
                if keep {
                    self.live[kept] = index;
                    kept += 1;
                } else {
                    self.free.push(index);
                }
            }
            self.live.truncate(kept);
            if !progress {
                break;
            }
        }
    }

    /// Rebuilds `seq` from FEC entry `index` and the other packets it
    /// protects into `self.rebuilt`.
    fn rebuild(&mut self, index: usize, seq: u64) -> Result<(), st2022_1::RecoveryError> {
        use st2022_1::RecoveryError;
        let ssrc = self.media_ssrc.or(self.fec_ssrc).unwrap_or(0);
        let scheme = self.scheme;
        let Self { slots, entries, st_parity, ulp_parity, rebuilt, window, .. } = self;
        let entry = &entries[index];
        let others = entry.protection.iter().filter(|&s| s != seq).map(|s| &slots[(s & (*window - 1)) as usize].data);
        match scheme {
            FecScheme::St2022_1 => {
                let fec = FecPacket::parse(&entry.datagram).map_err(|_| RecoveryError::Invalid)?;
                st_parity.load(&fec);
                for datagram in others {
                    st_parity.add(&RtpPacket::parse(datagram).map_err(|_| RecoveryError::Invalid)?);
                }
                st_parity.write_recovered(seq as u16, ssrc, rebuilt)?;
            }
            FecScheme::Ulpfec => {
                let fec = UlpfecPacket::parse(&entry.datagram).map_err(|_| RecoveryError::Invalid)?;
                ulp_parity.load(&fec);
                for datagram in others {
                    ulp_parity.add(datagram);
                }
                ulp_parity
                    .write_recovered(seq as u16, ssrc, rebuilt)
                    .map_err(|_| RecoveryError::LengthBeyondPayload)?;
            }
        }
        // A wrong rebuild (inconsistent FEC) must not reach the depacketiser.
        let packet = RtpPacket::parse(rebuilt).map_err(|_| RecoveryError::Invalid)?;
        let pt = packet.payload_type();
        if self.media_pts.iter().any(Option::is_some) && !self.media_pts.contains(&Some(pt)) {
            return Err(RecoveryError::Invalid);
        }
        Ok(())
    }

    /// Stores the packet `rebuild` wrote, counts it and hands it on.
    fn store_rebuilt(&mut self, seq: u64, index: usize, out: &mut dyn FnMut(u64, &[u8])) {
        let i = self.slot(seq);
        let slot = &mut self.slots[i];
        slot.seq = seq;
        slot.data.clear();
        slot.data.extend_from_slice(&self.rebuilt);
        slot.timestamp = u32::from_be_bytes([self.rebuilt[4], self.rebuilt[5], self.rebuilt[6], self.rebuilt[7]]);
        slot.marker = self.rebuilt[1] & 0x80 != 0;
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        if seq < self.floor {
            return;
        }
        self.counters.recovered += 1;
        match self.entries[index].kind {
            FecKind::Row => self.counters.recovered_row += 1,
            FecKind::Column => self.counters.recovered_column += 1,
            FecKind::Ulpfec => {}
        }
        out(seq, &self.slots[i].data);
    }

    /// What FEC can still do for `ext_seq` (call after [`recover`](Self::recover)
    /// for an answer about what is left). `highest_media` is the highest
    /// extended sequence number seen, as for [`push_fec`](Self::push_fec).
    pub fn outlook(&self, ext_seq: u64, highest_media: u64) -> Outlook {
        if self.present(ext_seq) {
            return Outlook::Present;
        }
        let reference = highest_media.min(MAX_EXT_SEQ).max(self.highest.unwrap_or(0));
        if ext_seq >= MAX_EXT_SEQ || ext_seq < self.floor || ext_seq + self.window <= reference {
            return Outlook::Hopeless;
        }
        let mut due: Option<u64> = None;
        let mut wait_for = |d: u64| due = Some(due.map_or(d, |x| x.min(d)));
        for &index in &self.live {
            let protection = self.entries[index].protection;
            if !protection.contains(ext_seq) {
                continue;
            }
            let lack = self.lack(protection, Some(ext_seq));
            if lack.dead {
                continue;
            }
            if lack.missing == 0 {
                return Outlook::Recoverable;
            }
            // Lacking one other packet: rebuilding that one first would do.
            if let (1, Some(other)) = (lack.missing, lack.some_missing) {
                if self.live.iter().any(|&j| {
                    j != index
                        && self.entries[j].protection.contains(other)
                        && !self.entries[j].protection.contains(ext_seq)
                        && self.lack(self.entries[j].protection, Some(other)).missing == 0
                }) {
                    return Outlook::Recoverable;
                }
                for d in self.expected(other, reference).into_iter().flatten() {
                    wait_for(d);
                }
            }
        }
        for d in self.expected(ext_seq, reference).into_iter().flatten() {
            wait_for(d);
        }
        match due {
            Some(fec_due_after) => Outlook::Waiting { fec_due_after },
            None => Outlook::Hopeless,
        }
    }

    /// Due points of the FEC packets that would protect `seq` by the sender's
    /// schedule, have not arrived and are not overdue.
    fn expected(&self, seq: u64, reference: u64) -> [Option<u64>; 2] {
        let arrived = |kind: FecKind, first: Option<u64>| {
            self.live.iter().any(|&i| {
                let e = &self.entries[i];
                e.kind == kind && e.protection.contains(seq) && first.is_none_or(|f| e.protection.first() == f)
            })
        };
        let pending = |due: u64, kind, first| {
            let overdue = match self.scheme {
                FecScheme::St2022_1 => reference > due + REORDER_GRACE,
                // FEC follows the frame's marker packet and precedes the next
                // frame, so media past it means the FEC is late.
                FecScheme::Ulpfec => self.highest.is_some_and(|h| h > due + REORDER_GRACE),
            };
            (!overdue && !arrived(kind, first)).then_some(due)
        };
        match self.scheme {
            FecScheme::St2022_1 => {
                let Geometry { row, column } = self.geometry;
                let row_due = row.and_then(|(origin, l)| {
                    let start = align_down(seq, origin, l);
                    pending(start + l - 1, FecKind::Row, Some(start))
                });
                let column_due = column.and_then(|(column_first, l, d)| {
                    // The matrix origin is known when rows give the alignment.
                    match row {
                        Some((row_origin, row_l)) if row_l == l => {
                            let origin = align_down(column_first, row_origin, l);
                            let matrix = align_down(seq, origin, l * d);
                            let c = (seq - matrix) % l;
                            pending(matrix + l * d + d * c, FecKind::Column, Some(matrix + c))
                        }
                        // Otherwise the latest GStreamer would send it.
                        _ => pending(seq + l * d + (d - 1) * (l - 1), FecKind::Column, None),
                    }
                });
                [row_due, column_due]
            }
            FecScheme::Ulpfec => [self.frame_end(seq).and_then(|end| pending(end, FecKind::Ulpfec, None)), None],
        }
    }

    /// The sequence number after which the FEC for the frame holding missing
    /// packet `seq` is sent: the frame's marker packet, as far as the packets
    /// around it tell. Unknown frame ends give the latest known bound.
    fn frame_end(&self, seq: u64) -> Option<u64> {
        let highest = self.highest?;
        let before = (1..self.window).map_while(|d| seq.checked_sub(d)).find(|&s| self.present(s));
        let Some(next) = (seq + 1..=highest).find(|&s| self.present(s)) else {
            return Some(seq.max(highest));
        };
        let slot = |s: u64| &self.slots[self.slot(s)];
        if let Some(prev) = before
            && !slot(prev).marker
            && slot(prev).timestamp != slot(next).timestamp
        {
            // The frame `prev` started ended on a lost packet before `next`.
            return Some(next - 1);
        }
        let frame_ts = slot(next).timestamp;
        let end = (next..=highest)
            .filter(|&s| self.present(s))
            .take_while(|&s| slot(s).timestamp == frame_ts)
            .find(|&s| slot(s).marker);
        Some(end.unwrap_or(highest))
    }

    /// Stops reporting packets before `ext_seq` (released or given up on)
    /// and drops FEC that protects only such packets. Their data stays in
    /// the ring as XOR material until overwritten, so FEC spanning the
    /// boundary still restores the packets after it.
    pub fn forget_before(&mut self, ext_seq: u64) {
        self.floor = self.floor.max(ext_seq);
        let mut kept = 0;
        for r in 0..self.live.len() {
            let index = self.live[r];
            let protection = self.entries[index].protection;
            if protection.last() < self.floor {
                self.counters.fec_expired += u64::from(self.lack(protection, None).missing > 1);
                self.free.push(index);
            } else {
                self.live[kept] = index;
                kept += 1;
            }
        }
        self.live.truncate(kept);
    }
}

/// The largest number ≤ `seq` that is `origin` plus a multiple of `period`.
fn align_down(seq: u64, origin: u64, period: u64) -> u64 {
    let offset = (i128::from(seq) - i128::from(origin)).rem_euclid(i128::from(period.max(1)));
    seq - offset as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::st2022_1::{FecHeader, St2022Encoder};
    use super::ulpfec::{UlpfecEncoder, UlpfecOutput, UlpfecSettings};
    use super::*;
    use crate::rtp::{RtpPacketBuilder, SeqExtender};

    const SSRC: u32 = 0x5eed_0001;

    /// Media as a payloader sends it: frames of 1–7 packets of varied length,
    /// the marker on each frame's last packet, sequence numbers wrapping.
    fn media(n: usize, ssrc: u32) -> Vec<Vec<u8>> {
        let (mut frame, mut left) = (0u32, 0usize);
        (0..n)
            .map(|i| {
                if left == 0 {
                    frame += 1;
                    left = 1 + (frame as usize * 5) % 7;
                }
                left -= 1;
                let payload: Vec<u8> = (0..40 + (i * 37) % 300).map(|b| (b * 7 + i) as u8).collect();
                RtpPacketBuilder::<&[u8], &[u8]>::new()
                    .payload_type(96)
                    .sequence_number(65_500u16.wrapping_add(i as u16))
                    .timestamp(frame * 3000)
                    .ssrc(ssrc)
                    .marker_bit(left == 0)
                    .payload(&payload[..])
                    .write_vec()
                    .unwrap()
            })
            .collect()
    }

    /// A media packet numbered `ext_seq`.
    fn at(ext_seq: u64) -> Vec<u8> {
        let mut packet = media(1, SSRC).remove(0);
        packet[2..4].copy_from_slice(&(ext_seq as u16).to_be_bytes());
        packet
    }

    /// One datagram as the receiver sees it, in send order.
    #[derive(Debug, Clone)]
    enum Wire {
        Media { ext_seq: u64, datagram: Vec<u8> },
        Fec(Vec<u8>),
    }

    fn st2022_wire(l: u8, d: u8, media: &[Vec<u8>]) -> Vec<Wire> {
        let mut enc = St2022Encoder::new(l, d, 97);
        let mut seqs = SeqExtender::default();
        let mut wire = Vec::new();
        for m in media {
            let ext_seq = seqs.extend(u16::from_be_bytes([m[2], m[3]]));
            wire.push(Wire::Media { ext_seq, datagram: m.clone() });
            enc.push(m, &mut |_, fec| wire.push(Wire::Fec(fec.to_vec()))).unwrap();
        }
        wire
    }

    fn ulpfec_wire(settings: UlpfecSettings, media: &[Vec<u8>]) -> Vec<Wire> {
        let mut enc = UlpfecEncoder::new(settings);
        let mut seqs = SeqExtender::default();
        let mut wire = Vec::new();
        for m in media {
            enc.push(m, &mut |kind, d| {
                let ext_seq = seqs.extend(u16::from_be_bytes([d[2], d[3]]));
                wire.push(match kind {
                    UlpfecOutput::Media => Wire::Media { ext_seq, datagram: d.to_vec() },
                    UlpfecOutput::Fec => Wire::Fec(d.to_vec()),
                });
            })
            .unwrap();
        }
        wire
    }

    /// Feeds everything but the `lost` media packets, then recovers.
    fn receive(scheme: FecScheme, wire: &[Wire], lost: &[u64]) -> (FecDecoder, BTreeMap<u64, Vec<u8>>) {
        let mut dec = FecDecoder::new(scheme, 512);
        let mut highest = 0;
        for w in wire {
            match w {
                Wire::Media { ext_seq, datagram } => {
                    highest = highest.max(*ext_seq);
                    if !lost.contains(ext_seq) {
                        dec.push_media(*ext_seq, datagram);
                    }
                }
                Wire::Fec(d) => dec.push_fec(d, highest).unwrap(),
            }
        }
        let mut recovered = BTreeMap::new();
        dec.recover(&mut |seq, d| assert!(recovered.insert(seq, d.to_vec()).is_none(), "{seq} recovered twice"));
        (dec, recovered)
    }

    fn media_of(wire: &[Wire]) -> BTreeMap<u64, Vec<u8>> {
        wire.iter()
            .filter_map(|w| match w {
                Wire::Media { ext_seq, datagram } => Some((*ext_seq, datagram.clone())),
                Wire::Fec(_) => None,
            })
            .collect()
    }

    #[test]
    fn st2022_recovers_each_single_loss_byte_for_byte() {
        let (l, d) = (4, 3);
        let wire = st2022_wire(l, d, &media(5 * 12, SSRC));
        let sent = media_of(&wire);
        let first = *sent.keys().next().unwrap();
        for (&seq, original) in &sent {
            let (dec, recovered) = receive(FecScheme::St2022_1, &wire, &[seq]);
            assert_eq!(recovered.get(&seq), Some(original), "seq {} (wraps at 36)", seq - first);
            assert_eq!(recovered.len(), 1);
            let c = dec.counters();
            assert_eq!((c.recovered, c.recovered_row + c.recovered_column), (1, 1));
            assert_eq!(c.fec_malformed + c.fec_unusable, 0);
        }
    }

    #[test]
    fn st2022_rebuilds_with_the_media_ssrc_not_the_fec_streams_zero() {
        let wire = st2022_wire(4, 3, &media(24, SSRC));
        let Wire::Fec(fec) = wire.iter().find(|w| matches!(w, Wire::Fec(_))).unwrap() else { unreachable!() };
        assert_eq!(FecPacket::parse(fec).unwrap().ssrc(), 0);
        let sent = media_of(&wire);
        let seq = *sent.keys().nth(5).unwrap();
        let (_, recovered) = receive(FecScheme::St2022_1, &wire, &[seq]);
        assert_eq!(RtpPacket::parse(&recovered[&seq]).unwrap().ssrc(), SSRC);
        assert_eq!(recovered[&seq], sent[&seq]);
    }

    /// Extended sequence numbers of matrix cells (row, column) of the second matrix.
    fn cells(wire: &[Wire], l: u64, d: u64, cells: &[(u64, u64)]) -> Vec<u64> {
        let first = *media_of(wire).keys().next().unwrap() + l * d;
        cells.iter().map(|&(r, c)| first + r * l + c).collect()
    }

    #[test]
    fn st2022_l_shape_recovers_by_iterating_rows_and_columns() {
        let (l, d) = (5, 4);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 20, SSRC));
        let sent = media_of(&wire);
        // Row 2 and column 1 each lack two; row 1 and column 2 one each.
        let lost = cells(&wire, l, d, &[(1, 1), (2, 1), (2, 2)]);
        let (dec, recovered) = receive(FecScheme::St2022_1, &wire, &lost);
        let mut want = lost.clone();
        want.sort_unstable();
        assert_eq!(recovered.keys().copied().collect::<Vec<_>>(), want);
        for seq in &lost {
            assert_eq!(recovered[seq], sent[seq]);
        }
        let c = dec.counters();
        assert_eq!(c.recovered_row + c.recovered_column, 3);
        assert!(c.recovered_row > 0 && c.recovered_column > 0, "{c:?}");
    }

    #[test]
    fn st2022_two_by_two_square_is_unrecoverable_and_hopeless() {
        let (l, d) = (5, 4);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 20, SSRC));
        let lost = cells(&wire, l, d, &[(1, 1), (1, 2), (2, 1), (2, 2)]);
        let (dec, recovered) = receive(FecScheme::St2022_1, &wire, &lost);
        assert!(recovered.is_empty(), "{:?}", recovered.keys());
        let highest = *media_of(&wire).keys().last().unwrap();
        for &seq in &lost {
            assert_eq!(dec.outlook(seq, highest), Outlook::Hopeless, "{seq}");
        }
        assert_eq!(dec.outlook(lost[0] - 1, highest), Outlook::Present);
    }

    #[test]
    fn st2022_whole_row_or_whole_column_comes_back() {
        let (l, d) = (5, 4);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 20, SSRC));
        let sent = media_of(&wire);
        let row = cells(&wire, l, d, &[(2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]);
        let column = cells(&wire, l, d, &[(0, 3), (1, 3), (2, 3), (3, 3)]);
        for lost in [row, column] {
            let (_, recovered) = receive(FecScheme::St2022_1, &wire, &lost);
            assert_eq!(recovered.len(), lost.len());
            assert!(lost.iter().all(|s| recovered[s] == sent[s]));
        }
    }

    #[test]
    fn a_packet_past_the_receivers_limit_is_not_rebuilt_until_its_gap_shows() {
        // Row FEC overtakes the row's last packet (another socket, read
        // first): the packet is not known lost, so nothing is rebuilt and the
        // row FEC is kept; once later media shows the gap, it is rebuilt.
        let (l, d) = (4u64, 3u64);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 12, SSRC));
        let sent = media_of(&wire);
        let first = *sent.keys().next().unwrap();
        let last_of_row = first + l - 1;
        let mut dec = FecDecoder::new(FecScheme::St2022_1, 512);
        for seq in first..last_of_row {
            dec.push_media(seq, &sent[&seq]);
        }
        let row_fec = wire
            .iter()
            .find_map(|w| match w {
                Wire::Fec(f) if FecPacket::parse(f).unwrap().direction() == Direction::Row => Some(f.clone()),
                _ => None,
            })
            .unwrap();
        dec.push_fec(&row_fec, last_of_row - 1).unwrap();
        dec.recover_below(last_of_row, &mut |seq, _| panic!("{seq} is not known to be missing"));
        assert_ne!(dec.outlook(last_of_row, last_of_row - 1), Outlook::Present);
        dec.push_media(last_of_row + 1, &sent[&(last_of_row + 1)]);
        let mut got = Vec::new();
        dec.recover_below(last_of_row + 2, &mut |seq, datagram| got.push((seq, datagram.to_vec())));
        assert_eq!(got, vec![(last_of_row, sent[&last_of_row].clone())]);
    }

    #[test]
    fn st2022_outlook_waits_for_fec_that_is_still_to_come() {
        let (l, d) = (4u64, 3u64);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 12, SSRC));
        let first = *media_of(&wire).keys().next().unwrap();
        // Lose two packets of row 1 of matrix 1: the row FEC cannot help, the
        // columns (sent during matrix 2) can.
        let lost = [first + 12 + 4, first + 12 + 5];
        let mut dec = FecDecoder::new(FecScheme::St2022_1, 512);
        let mut highest = 0;
        let mut outlooks = Vec::new();
        for w in &wire {
            match w {
                Wire::Media { ext_seq, datagram } => {
                    highest = *ext_seq;
                    if !lost.contains(ext_seq) {
                        dec.push_media(*ext_seq, datagram);
                    }
                }
                Wire::Fec(f) => dec.push_fec(f, highest).unwrap(),
            }
            if highest == first + 12 + 8 {
                dec.recover(&mut |_, _| panic!("nothing is recoverable yet"));
                outlooks.push(dec.outlook(lost[0], highest));
            }
        }
        // Column 0 of matrix 1 (starting at first + 12) goes out with
        // media first + 24 + 3·0.
        assert!(outlooks.iter().all(|o| *o == Outlook::Waiting { fec_due_after: first + 24 }), "{outlooks:?}");
        assert_eq!(dec.outlook(lost[0], highest), Outlook::Recoverable);
        let mut got = Vec::new();
        dec.recover(&mut |seq, _| got.push(seq));
        assert_eq!(got, lost);
        assert_eq!(dec.outlook(lost[1], highest), Outlook::Present);
    }

    #[test]
    fn st2022_refuses_to_rebuild_what_it_does_not_protect() {
        // A lost packet with a header extension: the X bit comes back but its
        // bytes do not, so the decoder must not invent a packet.
        let mut stream = media(12, SSRC);
        let with_ext = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(u16::from_be_bytes([stream[5][2], stream[5][3]]))
            .ssrc(SSRC)
            .extension(0xbede, &[1, 2, 3, 4][..])
            .payload(&b"payload"[..])
            .write_vec()
            .unwrap();
        stream[5] = with_ext;
        let wire = st2022_wire(4, 3, &stream);
        let seq = *media_of(&wire).keys().nth(5).unwrap();
        let (dec, recovered) = receive(FecScheme::St2022_1, &wire, &[seq]);
        assert!(recovered.is_empty());
        assert_eq!(dec.counters().fec_unusable, 1);
    }

    #[test]
    fn ulpfec_recovers_every_protected_packet_byte_for_byte() {
        for (percentage, multipacket) in [(100, true), (50, true), (20, true), (34, false)] {
            let settings = UlpfecSettings { payload_type: 122, percentage, multipacket };
            let wire = ulpfec_wire(settings, &media(90, SSRC));
            let sent = media_of(&wire);
            let mut protected = std::collections::BTreeSet::<u64>::new();
            for w in &wire {
                if let Wire::Fec(f) = w {
                    let fec = UlpfecPacket::parse(f).unwrap();
                    assert_eq!(fec.rtp().ssrc(), SSRC, "FEC shares the media SSRC");
                    protected.extend(sent.keys().copied().filter(|&s| fec.protected().any(|p| p == s as u16)));
                }
            }
            assert!(!protected.is_empty());
            for (&seq, original) in &sent {
                let (_, recovered) = receive(FecScheme::Ulpfec, &wire, &[seq]);
                if protected.contains(&seq) {
                    assert_eq!(recovered.get(&seq), Some(original), "{percentage}% seq {seq}");
                } else {
                    assert!(recovered.is_empty(), "{percentage}%: {seq} was not protected");
                }
            }
        }
    }

    #[test]
    fn ulpfec_outlook_follows_the_frame_structure() {
        let settings = UlpfecSettings { payload_type: 122, percentage: 50, multipacket: true };
        let wire = ulpfec_wire(settings, &media(40, SSRC));
        let sent = media_of(&wire);
        // The third packet of the first 5-packet frame (frames have 1 + (5k mod 7) packets).
        let mut frames: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (&seq, d) in &sent {
            frames.entry(RtpPacket::parse(d).unwrap().timestamp()).or_default().push(seq);
        }
        let lost = frames.values().find(|f| f.len() == 5).unwrap()[2];
        let mut dec = FecDecoder::new(FecScheme::Ulpfec, 256);
        let mut highest = 0;
        let mut before_fec = None;
        for w in &wire {
            match w {
                Wire::Media { ext_seq, datagram } => {
                    highest = *ext_seq;
                    if *ext_seq != lost {
                        dec.push_media(*ext_seq, datagram);
                    }
                }
                Wire::Fec(f) => {
                    if highest > lost && before_fec.is_none() {
                        before_fec = Some((dec.outlook(lost, highest), highest));
                    }
                    dec.push_fec(f, highest).unwrap();
                }
            }
        }
        let (outlook, marker) = before_fec.unwrap();
        assert_eq!(outlook, Outlook::Waiting { fec_due_after: marker }, "FEC follows the marker packet");
        assert_eq!(dec.outlook(lost, highest), Outlook::Recoverable);
        let mut got = Vec::new();
        dec.recover(&mut |seq, d| got.push((seq, d.to_vec())));
        assert_eq!(got, [(lost, sent[&lost].clone())]);
    }

    #[test]
    fn malformed_and_absurd_fec_are_errors_and_counted() {
        let mut dec = FecDecoder::new(FecScheme::St2022_1, 64);
        dec.push_media(1000, &at(1000));
        assert_eq!(dec.push_fec(&[0x80; 20], 1000), Err(FecError::St2022(St2022Error::Truncated { len: 20 })));
        let mut fec = Vec::new();
        let column =
            FecHeader { direction: Direction::Column, sn_base_low: 1000, offset: 255, na: 255, ..Default::default() };
        column.write(&[0; 4], &mut fec);
        let err = dec.push_fec(&fec, 1000).unwrap_err();
        assert_eq!(err, FecError::SpanExceedsWindow { first: 1000, span: 254 * 255 + 1, window: 64 });
        assert!(err.to_string().contains("window of 64"));
        FecHeader { offset: 1, na: 4, sn_base_low: 900, ..column }.write(&[0; 4], &mut fec);
        assert!(matches!(dec.push_fec(&fec, 1000), Err(FecError::Stale { first: 900, .. })));
        FecHeader { offset: 1, na: 4, sn_base_low: 1100, ..column }.write(&[0; 4], &mut fec);
        assert!(matches!(dec.push_fec(&fec, 1000), Err(FecError::AheadOfMedia { last: 1103, .. })));
        let mut young = FecDecoder::new(FecScheme::St2022_1, 64);
        FecHeader { offset: 1, na: 4, sn_base_low: 65530, ..column }.write(&[0; 4], &mut fec);
        assert_eq!(young.push_fec(&fec, 3), Err(FecError::BeforeStream { sn_base: 65530, highest: 3 }));
        let c = dec.counters();
        assert_eq!((c.fec_received, c.fec_malformed, c.fec_unusable), (4, 1, 3));

        let mut ulp = FecDecoder::new(FecScheme::Ulpfec, 64);
        let err = ulp.push_fec(&[0x80, 122, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0], 5).unwrap_err();
        assert_eq!(
            err,
            FecError::Ulpfec(UlpfecError::Truncated { field: "FEC and level 0 header", needed: 14, len: 4 })
        );
        assert!(err.to_string().contains("FEC and level 0 header"));
        assert_eq!(ulp.counters().fec_malformed, 1);
    }

    #[test]
    fn forgotten_packets_are_not_reported_but_still_help() {
        let (l, d) = (4u64, 3u64);
        let wire = st2022_wire(l as u8, d as u8, &media(4 * 12, SSRC));
        let first = *media_of(&wire).keys().next().unwrap();
        // Column 1 of matrix 1 lacks an early and a late packet; the early
        // one is rebuilt from its row but no longer wanted.
        let (early, late) = (first + 12 + 1, first + 12 + 4 + 1);
        let mut dec = FecDecoder::new(FecScheme::St2022_1, 512);
        let mut highest = 0;
        for w in &wire {
            match w {
                Wire::Media { ext_seq, datagram } => {
                    highest = *ext_seq;
                    if *ext_seq != early && *ext_seq != late {
                        dec.push_media(*ext_seq, datagram);
                    }
                }
                Wire::Fec(f) => dec.push_fec(f, highest).unwrap(),
            }
        }
        dec.forget_before(early + 1);
        let mut got = Vec::new();
        dec.recover(&mut |seq, _| got.push(seq));
        assert_eq!(got, [late]);
        assert_eq!(dec.counters().recovered, 1);
        assert_eq!(dec.outlook(early, highest), Outlook::Present, "kept as XOR material");
    }

    #[test]
    fn media_outside_the_window_is_ignored() {
        let mut dec = FecDecoder::new(FecScheme::Ulpfec, 20);
        assert_eq!(dec.window(), 32);
        dec.push_media(1000, &at(1000));
        dec.push_media(968, &at(968));
        dec.push_media(969, &at(969));
        dec.push_media(5, b"not rtp");
        dec.push_media(970, &at(971));
        dec.push_media(u64::MAX, &at(u64::MAX));
        assert_eq!(dec.counters().media_ignored, 4, "too old, not RTP, numbered otherwise, too large");
        assert_eq!(dec.outlook(970, 1000), Outlook::Waiting { fec_due_after: 1000 }, "its frame is not over");
        assert_eq!(dec.outlook(969, 1000), Outlook::Present);
        assert_eq!(dec.outlook(960, 1000), Outlook::Hopeless);
    }

    #[test]
    fn a_full_fec_pool_drops_the_oldest() {
        let mut dec = FecDecoder::new(FecScheme::St2022_1, 64);
        let mut fec = Vec::new();
        for i in 0..40u16 {
            FecHeader { direction: Direction::Row, offset: 1, na: 2, sn_base_low: 100 + i, ..Default::default() }
                .write(&[0; 8], &mut fec);
            dec.push_fec(&fec, 140).unwrap();
        }
        assert_eq!(dec.counters().fec_expired, 8, "32 FEC slots for a window of 64");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_the_decoder(
            ulpfec in proptest::prelude::any::<bool>(),
            ops in proptest::collection::vec(
                (proptest::prelude::any::<u8>(), 0u64..70_000, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)),
                0..60,
            ),
        ) {
            let scheme = if ulpfec { FecScheme::Ulpfec } else { FecScheme::St2022_1 };
            let mut dec = FecDecoder::new(scheme, 64);
            for (op, seq, mut data) in ops {
                if data.len() >= 2 {
                    data[0] = 0x80 | data[0] & 0x3f;
                }
                if op % 5 < 2 && data.len() >= 4 {
                    data[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
                }
                match op % 5 {
                    0 | 1 => dec.push_media(seq, &data),
                    2 => { let _ = dec.push_fec(&data, seq); }
                    3 => dec.recover(&mut |s, d| assert!(RtpPacket::parse(d).is_ok() && s < MAX_EXT_SEQ)),
                    _ => { let _ = dec.outlook(seq, seq / 2); dec.forget_before(seq / 3); }
                }
            }
            let c = dec.counters();
            proptest::prop_assert!(c.fec_malformed + c.fec_unusable <= c.fec_received);
        }
    }
}
