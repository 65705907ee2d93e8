//! H.264 (RFC 6184) and H.265 (RFC 7798) depacketisation into access units,
//! with the frame accounting that defines "zero drop".
//!
//! Input is the jitter buffer's in-order output: packets, and declared losses.
//! An access unit that lost a packet is never handed on: it is counted as
//! dropped, and every following frame is dropped too until a keyframe arrives
//! (its references are gone), with one keyframe request. Supported: H.264
//! single NAL unit, STAP-A and FU-A (packetization-mode 0 and 1); H.265 single
//! NAL unit, AP and FU without DONL (sprop-max-don-diff = 0). STAP-B, MTAP,
//! FU-B and PACI are counted as unsupported and drop their frame.

pub mod au;
pub mod sprop;

use std::time::Instant;

use zerodrop_crds::Codec;

use crate::depay::au::au_digest;

const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// One whole access unit in Annex B form, ready for a byte-stream parser.
#[derive(Debug)]
pub struct AccessUnit {
    pub data: Vec<u8>,
    pub rtp_timestamp: u32,
    pub keyframe: bool,
    /// Arrival of the access unit's first packet.
    pub first_arrival: Instant,
}

impl AccessUnit {
    /// Digest of the NAL units (`au::au_digest`), what the sender logs for
    /// the same access unit. Computed on demand: hashing every frame costs a
    /// receiver that logs nothing a tenth of its time at high packet rates.
    pub fn content_digest(&self) -> u64 {
        au_digest(self.nal_units())
    }

    pub fn nal_units(&self) -> impl Iterator<Item = &[u8]> {
        crate::depay::au::annexb_nal_units(&self.data)
    }
}

/// Why frames were not handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A packet of the frame was lost.
    Incomplete,
    /// The frame arrived whole but a frame it depends on was dropped.
    ReferenceLost,
    /// No packet of the frame arrived (inferred from the timestamp step).
    Missing,
    /// A packet used a packetisation this depacketiser does not support, or
    /// was malformed.
    Malformed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Incomplete => "incomplete",
            DropReason::ReferenceLost => "reference_lost",
            DropReason::Missing => "missing",
            DropReason::Malformed => "malformed",
        }
    }
}

#[derive(Debug)]
pub enum DepayEvent {
    Frame(AccessUnit),
    Dropped {
        reason: DropReason,
        frames: u64,
        rtp_timestamp: Option<u32>,
    },
    /// Frames before the first keyframe of the stream: not decodable, not
    /// counted as dropped (they were sent before we could have them).
    SkippedBeforeKeyframe {
        rtp_timestamp: u32,
    },
    /// Ask the sender for a keyframe (PLI).
    KeyframeNeeded,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DepayCounters {
    pub malformed_packets: u64,
    pub unsupported_packets: u64,
    /// Parameter sets left out of an access unit because an identical one
    /// was already in it (see `Building::push_nal`).
    pub repeated_parameter_sets: u64,
    /// Keyframes that arrived without parameter sets and were handed on with
    /// the out-of-band ones put in front (`set_out_of_band_parameter_sets`).
    pub parameter_sets_inserted: u64,
    /// Marker bits on a packet before any slice of its access unit (ignored:
    /// the unit goes on until a slice has come).
    pub early_markers: u64,
}

/// Distinct parameter sets an access unit remembers to spot repeats.
const PARAMETER_SETS_KEPT: usize = 8;

struct Building {
    data: Vec<u8>,
    timestamp: u32,
    first_arrival: Instant,
    damaged: bool,
    malformed: bool,
    keyframe: bool,
    /// Inside an FU: the reconstructed NAL's start offset in `data`.
    in_fu: bool,
    /// Where the parameter sets already in `data` lie (offset, length).
    parameter_sets: [(u32, u32); PARAMETER_SETS_KEPT],
    parameter_set_count: usize,
    /// A slice of the picture is in `data` already.
    vcl_seen: bool,
}

impl Building {
    /// Appends one whole NAL unit, leaving out a parameter set that comes
    /// after a slice of the picture and is identical to one already in this
    /// access unit. Payloaders that repeat parameter sets before every IDR
    /// slice (`rtph264pay config-interval=-1` with a multi-slice encoder) put
    /// SPS/PPS between the slices of one picture; H.264 §7.4.1.2.3 (and
    /// H.265 §7.4.2.4.4) read a parameter set after a slice as the start of a
    /// new access unit, so every decoder would split the picture in two and
    /// show one frame too many per keyframe. Repeats before the first slice
    /// are legal and kept. Returns whether the unit was left out.
    fn push_nal(&mut self, nal: &[u8], parameter_set: bool, vcl: bool) -> bool {
        self.vcl_seen |= vcl;
        if parameter_set {
            let data = &self.data;
            let seen = self.parameter_sets[..self.parameter_set_count]
                .iter()
                .any(|&(at, len)| data.get(at as usize..(at + len) as usize) == Some(nal));
            if seen && self.vcl_seen {
                return true;
            }
            if self.parameter_set_count < PARAMETER_SETS_KEPT {
                let at = self.data.len() + START_CODE.len();
                self.parameter_sets[self.parameter_set_count] = (at as u32, nal.len() as u32);
                self.parameter_set_count += 1;
            }
        }
        push_nal(&mut self.data, nal);
        false
    }
}

pub struct Depacketizer {
    codec: Codec,
    building: Option<Building>,
    /// A loss was declared since the last packet.
    loss_pending: bool,
    /// ... and every lost packet came while no unit was open (after a
    /// marker packet).
    loss_between_units: bool,
    /// Take a loss between units followed by an inter picture's first slice
    /// for a lost in-band FEC packet (see `tolerate_loss_between_units`).
    tolerate_loss_between_units: bool,
    /// Drop everything until a keyframe (references lost, or start of stream).
    waiting_for_keyframe: bool,
    started: bool,
    initial_keyframe_requested: bool,
    last_timestamp: Option<u32>,
    /// Smallest positive timestamp step seen: the frame duration.
    frame_step: Option<u32>,
    counters: DepayCounters,
    /// Access-unit buffers handed back (`recycle`) or left by dropped units.
    spare: Vec<Vec<u8>>,
    /// The sender's out-of-band parameter sets in Annex B form; empty when
    /// they come in band.
    out_of_band_parameter_sets: Vec<u8>,
    /// What a marked packet before any slice of the unit carried (see
    /// `push_packet`), for the picture that follows with the same timestamp.
    early_parameter_sets: Vec<u8>,
}

impl Depacketizer {
    pub fn new(codec: Codec) -> Self {
        Self {
            codec,
            building: None,
            loss_pending: false,
            loss_between_units: false,
            tolerate_loss_between_units: false,
            waiting_for_keyframe: true,
            started: false,
            initial_keyframe_requested: false,
            last_timestamp: None,
            frame_step: None,
            counters: DepayCounters::default(),
            spare: Vec::new(),
            out_of_band_parameter_sets: Vec::new(),
            early_parameter_sets: Vec::new(),
        }
    }

    /// The sender gives its parameter sets out of band (SDP
    /// `sprop-parameter-sets`), NAL units without start codes. A keyframe that
    /// arrives without parameter sets of its own is handed on with these in
    /// front, so a decoder can start on it; and after a loss, a picture whose
    /// first NAL unit is the first slice of a keyframe provably starts an
    /// access unit (no parameter set or delimiter will lead it).
    pub fn set_out_of_band_parameter_sets(&mut self, nal_units: &[Vec<u8>]) {
        self.out_of_band_parameter_sets.clear();
        for nal in nal_units {
            push_nal(&mut self.out_of_band_parameter_sets, nal);
        }
    }

    pub fn counters(&self) -> DepayCounters {
        self.counters
    }

    /// Gives an access unit's buffer back for the next one (when nobody
    /// downstream keeps it), so a running stream does not allocate per frame.
    pub fn recycle(&mut self, mut data: Vec<u8>) {
        if self.spare.len() < 4 {
            data.clear();
            self.spare.push(data);
        }
    }

    /// The RTP timestamp of an access unit being built that has not seen its
    /// marker: its last packets may have been lost.
    pub fn open_unit(&self) -> Option<u32> {
        self.building.as_ref().map(|b| b.timestamp)
    }

    /// The frame duration in RTP clock ticks, once seen.
    pub fn frame_step(&self) -> Option<u32> {
        self.frame_step
    }

    /// Packets `count` in sequence were lost.
    pub fn push_loss(&mut self, _count: u64) {
        self.loss_between_units = if self.loss_pending {
            self.loss_between_units
        } else {
            true
        } && self.building.is_none();
        self.loss_pending = true;
    }

    pub fn push_packet(
        &mut self,
        payload: &[u8],
        timestamp: u32,
        marker: bool,
        arrival: Instant,
        out: &mut Vec<DepayEvent>,
    ) {
        let new_au = self
            .building
            .as_ref()
            .is_none_or(|b| b.timestamp != timestamp);
        if new_au {
            if let Some(mut b) = self.building.take() {
                // It never saw its marker: lost packets may have been its tail.
                if self.loss_pending {
                    b.damaged = true;
                }
                self.finish(b, out);
            }
            let lost_before = self.loss_pending && self.started;
            if lost_before {
                self.count_missing_frames(timestamp, out);
            }
            // After a loss, only a unit that provably starts here (delimiter or
            // parameter set first: nothing but a delimiter may precede those)
            // can be whole; a lost SEI or parameter set would otherwise go
            // unnoticed.
            let damaged = if lost_before {
                // In-band FEC (ULPFEC) follows a frame's marker packet: a
                // loss there, before a picture that starts with its first
                // inter slice, is most likely FEC, and nothing the picture
                // needs (parameter sets come with IDR pictures) lies there.
                let benign = self.tolerate_loss_between_units
                    && self.loss_between_units
                    && self.starts_inter_picture(payload);
                !(benign || self.leads_access_unit(payload))
            } else {
                !self.starts_access_unit(payload)
            };
            let mut data = self.spare.pop().unwrap_or_default();
            data.reserve(payload.len() * 8);
            self.building = Some(Building {
                data,
                timestamp,
                first_arrival: arrival,
                damaged,
                malformed: false,
                keyframe: false,
                in_fu: false,
                parameter_sets: [(0, 0); PARAMETER_SETS_KEPT],
                parameter_set_count: 0,
                vcl_seen: false,
            });
        } else if self.loss_pending
            && let Some(b) = self.building.as_mut()
        {
            b.damaged = true;
        }
        self.loss_pending = false;
        // Built in place: moving the unit out and back per packet showed in
        // profiles (its parameter-set table makes it a few cache lines).
        if let Some(b) = self.building.as_mut() {
            append(self.codec, &mut self.counters, b, payload);
            // The marker ends the access unit (RFC 6184 §5.1, RFC 7798
            // §4.1), but only once a slice is in it: GStreamer's rtph264pay
            // marks the packet of parameter sets it sends ahead of a forced
            // keyframe (after a PLI), and the picture follows with the same
            // timestamp. Finishing there would count one frame twice and hand
            // on the keyframe without its parameter sets.
            if marker && !b.vcl_seen && !b.malformed && !b.damaged && !b.in_fu {
                // Kept for the picture, whose unit goes on: put in front of
                // it if it comes without parameter sets of its own.
                self.counters.early_markers += 1;
                self.early_parameter_sets.clear();
                self.early_parameter_sets.extend_from_slice(&b.data);
                b.data.clear();
                b.parameter_set_count = 0;
            } else if marker
                && let Some(b) = self.building.take()
            {
                self.finish(b, out);
            }
        }
    }

    /// End of stream (or of a sender, or of a pulled session): what is being
    /// built never got its marker packet (the last of an access unit, RFC
    /// 6184/7798), so its end may be missing: it is dropped and counted as
    /// incomplete, never handed on. (A server that closed an RTSP session
    /// between the two slices of a frame left exactly this.)
    pub fn flush(&mut self, out: &mut Vec<DepayEvent>) {
        if let Some(mut b) = self.building.take() {
            b.damaged = true;
            self.finish(b, out);
        }
    }

    fn count_missing_frames(&mut self, timestamp: u32, out: &mut Vec<DepayEvent>) {
        let (Some(last), Some(step)) = (self.last_timestamp, self.frame_step) else {
            return;
        };
        let delta = timestamp.wrapping_sub(last);
        if delta == 0 || delta > step.saturating_mul(1000) {
            return;
        }
        // Round to whole frames; a step of 2.4 frames means 1 frame missing.
        let frames = ((delta as u64 + step as u64 / 2) / step as u64).saturating_sub(1);
        if frames > 0 {
            out.push(DepayEvent::Dropped {
                reason: DropReason::Missing,
                frames,
                rtp_timestamp: None,
            });
            self.enter_keyframe_wait(out);
        }
    }

    fn enter_keyframe_wait(&mut self, out: &mut Vec<DepayEvent>) {
        if !self.waiting_for_keyframe {
            self.waiting_for_keyframe = true;
            out.push(DepayEvent::KeyframeNeeded);
        }
    }

    fn finish(&mut self, b: Building, out: &mut Vec<DepayEvent>) {
        // Parameter sets of an early marker belong to this unit only.
        let early = std::mem::take(&mut self.early_parameter_sets);
        if let Some(last) = self.last_timestamp {
            let step = b.timestamp.wrapping_sub(last);
            if step > 0 && step < u32::MAX / 2 {
                self.frame_step = Some(self.frame_step.map_or(step, |s| s.min(step)));
            }
        }
        self.last_timestamp = Some(b.timestamp);
        let ts = Some(b.timestamp);
        if b.damaged || b.malformed || b.in_fu || b.data.is_empty() {
            let reason = if b.malformed {
                DropReason::Malformed
            } else {
                DropReason::Incomplete
            };
            self.recycle(b.data);
            if self.started {
                out.push(DepayEvent::Dropped {
                    reason,
                    frames: 1,
                    rtp_timestamp: ts,
                });
                self.enter_keyframe_wait(out);
            } else {
                out.push(DepayEvent::SkippedBeforeKeyframe {
                    rtp_timestamp: b.timestamp,
                });
            }
            return;
        }
        if self.waiting_for_keyframe && !b.keyframe {
            self.recycle(b.data);
            if self.started {
                out.push(DepayEvent::Dropped {
                    reason: DropReason::ReferenceLost,
                    frames: 1,
                    rtp_timestamp: ts,
                });
            } else {
                if !self.initial_keyframe_requested {
                    self.initial_keyframe_requested = true;
                    out.push(DepayEvent::KeyframeNeeded);
                }
                out.push(DepayEvent::SkippedBeforeKeyframe {
                    rtp_timestamp: b.timestamp,
                });
            }
            return;
        }
        self.waiting_for_keyframe = false;
        self.started = true;
        let mut data = b.data;
        if b.keyframe && b.parameter_set_count == 0 {
            if !early.is_empty() {
                data.splice(0..0, early.iter().copied());
            } else if !self.out_of_band_parameter_sets.is_empty() {
                data.splice(0..0, self.out_of_band_parameter_sets.iter().copied());
                self.counters.parameter_sets_inserted += 1;
            }
        }

        out.push(DepayEvent::Frame(AccessUnit {
            data,
            rtp_timestamp: b.timestamp,
            keyframe: b.keyframe,
            first_arrival: b.first_arrival,
        }));
    }

    /// Whether a packet begins with a NAL unit that only ever leads an access
    /// unit: an access unit delimiter, or the SPS (H.264) / VPS (H.265); with
    /// out-of-band parameter sets, also the first slice of a keyframe (IDR,
    /// IRAP), which nothing but an SEI or delimiter would then precede.
    pub fn leads_access_unit(&self, payload: &[u8]) -> bool {
        match self.codec {
            Codec::H264 => {
                let first = match payload.first().map(|h| h & 0x1f) {
                    Some(24) => payload.get(3).map(|h| h & 0x1f),
                    Some(28) => payload
                        .get(1)
                        .filter(|fu| *fu & 0x80 != 0)
                        .map(|fu| fu & 0x1f),
                    t => t,
                };
                matches!(first, Some(7 | 9)) || (!self.out_of_band_parameter_sets.is_empty() && first == Some(5) && self.starts_access_unit(payload))
            }
            Codec::H265 => {
                let first = match payload.first().map(|h| (h >> 1) & 0x3f) {
                    Some(48) => payload.get(4).map(|h| (h >> 1) & 0x3f),
                    Some(49) => payload
                        .get(2)
                        .filter(|fu| *fu & 0x80 != 0)
                        .map(|fu| fu & 0x3f),
                    t => t,
                };
                matches!(first, Some(32 | 35))
                    || (!self.out_of_band_parameter_sets.is_empty()
                        && first.is_some_and(|t| (16..=23).contains(&t))
                        && self.starts_access_unit(payload))
            }
        }
    }

    /// Whether a packet begins an access unit: a parameter set, delimiter or
    /// SEI, or the first slice of a picture (first_mb_in_slice == 0 in H.264,
    /// first_slice_segment_in_pic_flag in H.265).
    /// Takes a loss between access units, followed by a picture that starts
    /// with its first inter (non-IDR) slice, for a lost in-band FEC packet
    /// rather than damage. For streams with ULPFEC, whose FEC packets sit
    /// between frames in the media's sequence numbers: otherwise each lost
    /// FEC packet would cost the frames up to the next keyframe.
    pub fn tolerate_loss_between_units(&mut self, on: bool) {
        self.tolerate_loss_between_units = on;
    }

    /// Whether the payload starts the first slice of a non-IDR picture.
    fn starts_inter_picture(&self, payload: &[u8]) -> bool {
        let first_slice = |b: Option<&u8>, mask: u8| b.is_some_and(|b| b & mask != 0);
        match self.codec {
            Codec::H264 => match payload.first().map(|h| h & 0x1f) {
                Some(1) => first_slice(payload.get(1), 0x80),
                Some(28) => {
                    payload
                        .get(1)
                        .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == 1)
                        && first_slice(payload.get(2), 0x80)
                }
                _ => false,
            },
            Codec::H265 => match payload.first().map(|h| (h >> 1) & 0x3f) {
                Some(0..=9) => first_slice(payload.get(2), 0x80),
                Some(49) => {
                    payload
                        .get(2)
                        .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x3f <= 9)
                        && first_slice(payload.get(3), 0x80)
                }
                _ => false,
            },
        }
    }

    fn starts_access_unit(&self, payload: &[u8]) -> bool {
        match self.codec {
            Codec::H264 => {
                let Some(&h) = payload.first() else {
                    return false;
                };
                let (nal_type, slice_byte) = match h & 0x1f {
                    24 => (payload.get(3).map_or(0, |b| b & 0x1f), payload.get(4)),
                    28 => {
                        let Some(&fu) = payload.get(1) else {
                            return false;
                        };
                        if fu & 0x80 == 0 {
                            return false;
                        }
                        (fu & 0x1f, payload.get(2))
                    }
                    t => (t, payload.get(1)),
                };
                match nal_type {
                    1 | 5 => slice_byte.is_some_and(|b| b & 0x80 != 0),
                    6..=9 | 13..=18 => true,
                    _ => false,
                }
            }
            Codec::H265 => {
                if payload.len() < 2 {
                    return false;
                }
                let (nal_type, slice_byte) = match (payload[0] >> 1) & 0x3f {
                    48 => (
                        payload.get(4).map_or(0, |b| (b >> 1) & 0x3f),
                        payload.get(6),
                    ),
                    49 => {
                        let Some(&fu) = payload.get(2) else {
                            return false;
                        };
                        if fu & 0x80 == 0 {
                            return false;
                        }
                        (fu & 0x3f, payload.get(3))
                    }
                    t => (t, payload.get(2)),
                };
                match nal_type {
                    0..=31 => slice_byte.is_some_and(|b| b & 0x80 != 0),
                    32..=40 => true,
                    _ => false,
                }
            }
        }
    }
}

/// Appends one packet's payload to the unit being built; a packet that
/// breaks the payload format marks the unit malformed and is counted.
fn append(codec: Codec, counters: &mut DepayCounters, b: &mut Building, payload: &[u8]) {
    let ok = match codec {
        Codec::H264 => append_h264(counters, b, payload),
        Codec::H265 => append_h265(counters, b, payload),
    };
    if let Err(kind) = ok {
        b.malformed = true;
        match kind {
            PacketError::Malformed => counters.malformed_packets += 1,
            PacketError::Unsupported => counters.unsupported_packets += 1,
        }
    }
}

fn append_h264(counters: &mut DepayCounters, b: &mut Building, payload: &[u8]) -> Result<(), PacketError> {
    let &header = payload.first().ok_or(PacketError::Malformed)?;
    if header & 0x80 != 0 {
        return Err(PacketError::Malformed); // forbidden_zero_bit
    }
    match header & 0x1f {
        0 => Err(PacketError::Malformed),
        t @ 1..=23 => {
            if b.in_fu {
                return Err(PacketError::Malformed);
            }
            b.keyframe |= t == 5;
            counters.repeated_parameter_sets +=
                b.push_nal(payload, matches!(t, 7 | 8), (1..=5).contains(&t)) as u64;
            Ok(())
        }
        24 => {
            if b.in_fu {
                return Err(PacketError::Malformed);
            }
            for nal in aggregation_units(&payload[1..])? {
                let t = nal.first().ok_or(PacketError::Malformed)? & 0x1f;
                b.keyframe |= t == 5;
                counters.repeated_parameter_sets +=
                    b.push_nal(nal, matches!(t, 7 | 8), (1..=5).contains(&t)) as u64;
            }
            Ok(())
        }
        28 => {
            let &fu = payload.get(1).ok_or(PacketError::Malformed)?;
            let (start, end, t) = (fu & 0x80 != 0, fu & 0x40 != 0, fu & 0x1f);
            if start && end || (start == b.in_fu) || payload.len() < 3 || t == 0 {
                // Start inside an FU, continuation without a start, or an
                // FU that claims to be whole: RFC 6184 §5.8 forbids all three.
                b.in_fu = false;
                return Err(PacketError::Malformed);
            }
            if start {
                b.keyframe |= t == 5;
                b.vcl_seen |= (1..=5).contains(&t);
                b.data.extend_from_slice(&START_CODE);
                b.data.push((header & 0xe0) | t);
                b.in_fu = true;
            }
            b.data.extend_from_slice(&payload[2..]);
            if end {
                b.in_fu = false;
            }
            Ok(())
        }
        _ => Err(PacketError::Unsupported),
    }
}

fn append_h265(counters: &mut DepayCounters, b: &mut Building, payload: &[u8]) -> Result<(), PacketError> {
    if payload.len() < 3 || payload[0] & 0x80 != 0 {
        return Err(PacketError::Malformed);
    }
    let is_irap = |t: u8| (16..=23).contains(&t);
    match (payload[0] >> 1) & 0x3f {
        t @ 0..=47 => {
            if b.in_fu {
                return Err(PacketError::Malformed);
            }
            b.keyframe |= is_irap(t);
            counters.repeated_parameter_sets +=
                b.push_nal(payload, matches!(t, 32..=34), t <= 31) as u64;
            Ok(())
        }
        48 => {
            if b.in_fu {
                return Err(PacketError::Malformed);
            }
            for nal in aggregation_units(&payload[2..])? {
                if nal.len() < 2 {
                    return Err(PacketError::Malformed);
                }
                let t = (nal[0] >> 1) & 0x3f;
                b.keyframe |= is_irap(t);
                counters.repeated_parameter_sets +=
                    b.push_nal(nal, matches!(t, 32..=34), t <= 31) as u64;
            }
            Ok(())
        }
        49 => {
            let fu = payload[2];
            let (start, end, t) = (fu & 0x80 != 0, fu & 0x40 != 0, fu & 0x3f);
            if start && end || (start == b.in_fu) || payload.len() < 4 {
                b.in_fu = false;
                return Err(PacketError::Malformed);
            }
            if start {
                b.keyframe |= is_irap(t);
                b.vcl_seen |= t <= 31;
                b.data.extend_from_slice(&START_CODE);
                b.data.push((payload[0] & 0x81) | (t << 1));
                b.data.push(payload[1]);
                b.in_fu = true;
            }
            b.data.extend_from_slice(&payload[3..]);
            if end {
                b.in_fu = false;
            }
            Ok(())
        }
        _ => Err(PacketError::Unsupported),
    }
}

#[derive(Debug, Clone, Copy)]
enum PacketError {
    Malformed,
    Unsupported,
}

fn push_nal(data: &mut Vec<u8>, nal: &[u8]) {
    data.extend_from_slice(&START_CODE);
    data.extend_from_slice(nal);
}

/// The NAL units of an aggregation packet body: 16-bit size, then the unit.
fn aggregation_units(mut body: &[u8]) -> Result<Vec<&[u8]>, PacketError> {
    let mut units = Vec::new();
    while !body.is_empty() {
        if body.len() < 2 {
            return Err(PacketError::Malformed);
        }
        let size = u16::from_be_bytes([body[0], body[1]]) as usize;
        if size == 0 || body.len() < 2 + size {
            return Err(PacketError::Malformed);
        }
        units.push(&body[2..2 + size]);
        body = &body[2 + size..];
    }
    if units.is_empty() {
        return Err(PacketError::Malformed);
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDR: &[u8] = &[0x65, 0x88, 1, 2, 3, 4];
    const SPS: &[u8] = &[0x67, 0x42, 0, 0x1f];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];
    const P: &[u8] = &[0x41, 0x9a, 5, 6, 7];

    fn frames(out: &[DepayEvent]) -> Vec<(u32, bool)> {
        out.iter()
            .filter_map(|e| match e {
                DepayEvent::Frame(au) => Some((au.rtp_timestamp, au.keyframe)),
                _ => None,
            })
            .collect()
    }

    fn dropped(out: &[DepayEvent]) -> u64 {
        out.iter()
            .map(|e| {
                if let DepayEvent::Dropped { frames, .. } = e {
                    *frames
                } else {
                    0
                }
            })
            .sum()
    }

    fn fu_a(nal: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let header = nal[0];
        let body = &nal[1..];
        let parts: Vec<&[u8]> = body.chunks(chunk).collect();
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let mut fu = (header & 0x1f) | if i == 0 { 0x80 } else { 0 };
                if i == parts.len() - 1 {
                    fu |= 0x40;
                }
                let mut p = vec![(header & 0xe0) | 28, fu];
                p.extend_from_slice(part);
                p
            })
            .collect()
    }

    fn stap_a(nals: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![24];
        for n in nals {
            p.extend_from_slice(&(n.len() as u16).to_be_bytes());
            p.extend_from_slice(n);
        }
        p
    }

    #[test]
    fn stap_a_and_fu_a_rebuild_the_exact_nal_units() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(&stap_a(&[SPS, PPS]), 0, false, t, &mut out);
        let big_idr: Vec<u8> = [0x65u8, 0x88]
            .iter()
            .copied()
            .chain((0..3000).map(|i| (i % 251) as u8))
            .collect();
        let parts = fu_a(&big_idr, 1000);
        for (i, p) in parts.iter().enumerate() {
            d.push_packet(p, 0, i == parts.len() - 1, t, &mut out);
        }
        assert_eq!(frames(&out), vec![(0, true)]);
        let DepayEvent::Frame(au) = &out[0] else {
            panic!()
        };
        let nals: Vec<&[u8]> = au.nal_units().collect();
        assert_eq!(nals, vec![SPS, PPS, &big_idr[..]]);
        assert_eq!(au.content_digest(), au_digest([SPS, PPS, &big_idr[..]]));
    }

    #[test]
    fn parameter_sets_repeated_between_the_slices_of_a_picture_are_left_out() {
        // What rtph264pay config-interval=-1 sends for a two-slice IDR picture
        // from x264enc: AUD, SPS, PPS, SEI, then SPS/PPS again before each slice.
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        let (aud, sei): (&[u8], &[u8]) = (&[0x09, 0x10], &[0x06, 0x05, 0x01, 0x80]);
        let (idr1, idr2): (&[u8], &[u8]) = (&[0x65, 0x88, 1, 2], &[0x65, 0x01, 3, 4]);
        for p in [aud, SPS, PPS, sei, SPS, PPS, idr1, SPS] {
            d.push_packet(p, 0, false, t, &mut out);
        }
        d.push_packet(&stap_a(&[PPS, idr2]), 0, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true)]);
        let DepayEvent::Frame(au) = &out[0] else {
            panic!()
        };
        // The copies before the first slice are legal and stay; the ones
        // between the slices, which split the picture for a decoder, go.
        assert_eq!(
            au.nal_units().collect::<Vec<_>>(),
            vec![aud, SPS, PPS, sei, SPS, PPS, idr1, idr2]
        );
        assert_eq!(d.counters().repeated_parameter_sets, 2);
        assert_eq!(au.content_digest(), crate::depay::au::au_digest([aud, SPS, PPS, sei, idr1, idr2]), "copies count once");
        // A parameter set that changed is not a repeat.
        let sps2: &[u8] = &[0x67, 0x42, 0, 0x20];
        for p in [SPS, PPS, idr1, sps2] {
            d.push_packet(p, 3000, false, t, &mut out);
        }
        d.push_packet(idr2, 3000, true, t, &mut out);
        let DepayEvent::Frame(au) = out.last().unwrap() else {
            panic!()
        };
        assert_eq!(
            au.nal_units().collect::<Vec<_>>(),
            vec![SPS, PPS, idr1, sps2, idr2]
        );
    }

    #[test]
    fn out_of_band_parameter_sets_lead_keyframes_that_come_without_their_own() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        d.set_out_of_band_parameter_sets(&[SPS.to_vec(), PPS.to_vec()]);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_packet(P, 3000, true, t, &mut out);
        // A keyframe with parameter sets of its own keeps them, alone.
        d.push_packet(&stap_a(&[SPS, PPS]), 6000, false, t, &mut out);
        d.push_packet(IDR, 6000, true, t, &mut out);
        // A loss between units, then an IDR whose first NAL unit is its first
        // slice: with the parameter sets out of band nothing else would lead
        // it, so it is whole (in band, a lost SPS could have been there).
        d.push_packet(P, 9000, true, t, &mut out);
        d.push_loss(1);
        d.push_packet(P, 12000, true, t, &mut out);
        d.push_packet(IDR, 15000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true), (3000, false), (6000, true), (9000, false), (15000, true)]);
        let units = |i: usize| match &out.iter().filter(|e| matches!(e, DepayEvent::Frame(_))).nth(i) {
            Some(DepayEvent::Frame(au)) => au.nal_units().map(<[u8]>::to_vec).collect::<Vec<_>>(),
            _ => panic!("no frame {i}"),
        };
        assert_eq!(units(0), vec![SPS, PPS, IDR]);
        assert_eq!(units(1), vec![P]);
        assert_eq!(units(2), vec![SPS, PPS, IDR]);
        assert_eq!(units(4), vec![SPS, PPS, IDR]);
        assert_eq!(d.counters().parameter_sets_inserted, 2);
        assert_eq!(dropped(&out), 1, "the P frame after the loss");

        // Without them, the same IDR after a loss cannot be told whole.
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_loss(1);
        d.push_packet(IDR, 3000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true)]);
        assert_eq!(d.counters().parameter_sets_inserted, 0);
    }

    #[test]
    fn a_marker_on_the_parameter_sets_ahead_of_a_keyframe_does_not_end_it() {
        // rtph264pay after a forced keyframe: a STAP-A of SPS and PPS with
        // the marker set, then the IDR picture with the same timestamp.
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_packet(P, 3000, true, t, &mut out);
        d.push_packet(&stap_a(&[SPS, PPS]), 6000, true, t, &mut out);
        let big_idr: Vec<u8> = [0x65u8, 0x88].iter().copied().chain((0..2000).map(|i| (i % 251) as u8)).collect();
        let parts = fu_a(&big_idr, 900);
        for (i, p) in parts.iter().enumerate() {
            d.push_packet(p, 6000, i == parts.len() - 1, t, &mut out);
        }
        d.push_packet(P, 9000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true), (3000, false), (6000, true), (9000, false)], "one frame per timestamp");
        assert_eq!(dropped(&out), 0);
        let DepayEvent::Frame(au) = &out[2] else { panic!("{:?}", out[2]) };
        assert_eq!(au.nal_units().collect::<Vec<_>>(), vec![SPS, PPS, &big_idr[..]], "the keyframe keeps its parameter sets");
        assert_eq!(d.counters().early_markers, 1);
    }

    #[test]
    fn loss_inside_a_frame_drops_it_and_waits_for_keyframe() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_packet(P, 3000, true, t, &mut out);
        // Frame at 6000 loses its second packet.
        let p_big: Vec<u8> = [0x41u8, 0x9a].iter().copied().chain(0..200).collect();
        let parts = fu_a(&p_big, 60);
        d.push_packet(&parts[0], 6000, false, t, &mut out);
        d.push_loss(1);
        d.push_packet(&parts[2], 6000, false, t, &mut out);
        d.push_packet(&parts[3], 6000, true, t, &mut out);
        d.push_packet(P, 9000, true, t, &mut out); // refs broken
        d.push_packet(IDR, 12000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true), (3000, false), (12000, true)]);
        assert_eq!(dropped(&out), 2);
        assert_eq!(
            out.iter()
                .filter(|e| matches!(e, DepayEvent::KeyframeNeeded))
                .count(),
            1
        );
    }

    #[test]
    fn with_in_band_fec_a_loss_between_frames_before_an_inter_picture_is_benign() {
        let t = Instant::now();
        let run = |tolerate: bool| {
            let mut d = Depacketizer::new(Codec::H264);
            d.tolerate_loss_between_units(tolerate);
            let mut out = Vec::new();
            d.push_packet(IDR, 0, true, t, &mut out);
            d.push_loss(1); // after a marker: an FEC packet, most likely
            d.push_packet(P, 3000, true, t, &mut out);
            d.push_packet(P, 6000, true, t, &mut out);
            // Inside a frame it is damage all the same.
            let parts = fu_a(&[0x41, 0x9a, 1, 2, 3, 4, 5, 6], 3);
            d.push_packet(&parts[0], 9000, false, t, &mut out);
            d.push_loss(1);
            d.push_packet(&parts[2], 9000, true, t, &mut out);
            d.push_packet(IDR, 12000, true, t, &mut out);
            (frames(&out), dropped(&out))
        };
        assert_eq!(
            run(true),
            (
                vec![(0, true), (3000, false), (6000, false), (12000, true)],
                1
            )
        );
        // Without in-band FEC the same loss may have been a slice or SEI of
        // the next picture: it and what depends on it are dropped.
        assert_eq!(run(false), (vec![(0, true), (12000, true)], 3));
    }

    #[test]
    fn whole_missing_frames_are_counted_from_the_timestamp_step() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_packet(P, 3000, true, t, &mut out);
        d.push_loss(4);
        // Two whole frames (6000, 9000) vanished; 12000 arrives whole but refs are gone.
        d.push_packet(P, 12000, true, t, &mut out);
        assert_eq!(dropped(&out), 3);
    }

    #[test]
    fn lost_marker_packet_damages_the_frame_it_ended() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        let parts = fu_a(&[0x41, 0x9a, 1, 2, 3, 4, 5, 6], 3);
        d.push_packet(&parts[0], 3000, false, t, &mut out);
        d.push_packet(&parts[1], 3000, false, t, &mut out);
        d.push_loss(1); // the last FU with the marker
        d.push_packet(&stap_a(&[SPS, PPS]), 6000, false, t, &mut out);
        d.push_packet(IDR, 6000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true), (6000, true)]);
        assert_eq!(dropped(&out), 1);
    }

    #[test]
    fn after_a_loss_a_frame_without_its_leading_nal_is_not_trusted() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        d.push_loss(1); // could have been the SPS/PPS of the next keyframe
        d.push_packet(IDR, 3000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true)]);
        assert_eq!(dropped(&out), 1);
    }

    #[test]
    fn frames_before_the_first_keyframe_are_skipped_not_dropped() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(P, 0, true, t, &mut out);
        d.push_packet(P, 3000, true, t, &mut out);
        d.push_packet(IDR, 6000, true, t, &mut out);
        assert_eq!(frames(&out), vec![(6000, true)]);
        assert_eq!(dropped(&out), 0);
        assert_eq!(
            out.iter()
                .filter(|e| matches!(e, DepayEvent::SkippedBeforeKeyframe { .. }))
                .count(),
            2
        );
        assert!(out.iter().any(|e| matches!(e, DepayEvent::KeyframeNeeded)));
    }

    #[test]
    fn garbage_fu_sequences_are_counted_not_panicked_on() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        d.push_packet(IDR, 0, true, t, &mut out);
        // Continuation without start, then start+end in one, then truncated STAP-A.
        d.push_packet(&[0x7c, 0x01, 9, 9], 3000, false, t, &mut out);
        d.push_packet(&[0x7c, 0xc1, 9, 9], 3000, false, t, &mut out);
        d.push_packet(&[24, 0, 50, 1], 3000, true, t, &mut out);
        d.push_packet(&[], 6000, true, t, &mut out);
        d.push_packet(&[0x80], 9000, true, t, &mut out);
        d.push_packet(&[25, 1, 2], 12000, true, t, &mut out);
        assert!(d.counters().malformed_packets >= 4);
        assert_eq!(d.counters().unsupported_packets, 1);
        assert_eq!(frames(&out), vec![(0, true)]);
    }

    #[test]
    fn h265_fu_and_aggregation_rebuild_nal_units() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H265);
        let mut out = Vec::new();
        let vps: &[u8] = &[0x40, 0x01, 0x0c];
        let sps: &[u8] = &[0x42, 0x01, 0x01];
        let idr: Vec<u8> = [0x26u8, 0x01, 0xaf].iter().copied().chain(0..100).collect(); // IDR_W_RADL
        let mut ap = vec![48 << 1, 1];
        for n in [vps, sps] {
            ap.extend_from_slice(&(n.len() as u16).to_be_bytes());
            ap.extend_from_slice(n);
        }
        d.push_packet(&ap, 0, false, t, &mut out);
        let fu_type = (idr[0] >> 1) & 0x3f;
        let body = &idr[2..];
        let mut p1 = vec![49 << 1, 1, 0x80 | fu_type];
        p1.extend_from_slice(&body[..50]);
        let mut p2 = vec![49 << 1, 1, 0x40 | fu_type];
        p2.extend_from_slice(&body[50..]);
        d.push_packet(&p1, 0, false, t, &mut out);
        d.push_packet(&p2, 0, true, t, &mut out);
        assert_eq!(frames(&out), vec![(0, true)]);
        let DepayEvent::Frame(au) = &out[0] else {
            panic!()
        };
        let nals: Vec<&[u8]> = au.nal_units().collect();
        assert_eq!(nals, vec![vps, sps, &idr[..]]);
    }

    #[test]
    fn a_unit_whose_marker_never_came_is_dropped_at_the_end_not_handed_on() {
        let t = Instant::now();
        let mut d = Depacketizer::new(Codec::H264);
        let mut out = Vec::new();
        // A whole keyframe (marker set), then the first slice of the next
        // frame; the session ends before its second slice and marker.
        d.push_packet(&[0x67, 0x42, 0, 0x1e], 0, false, t, &mut out);
        d.push_packet(&[0x68, 0xce, 0x3c, 0x80], 0, false, t, &mut out);
        d.push_packet(&[0x65, 0x88, 0x84, 0x00], 0, true, t, &mut out);
        d.push_packet(&[0x41, 0x9a, 0x02, 0x00], 3000, false, t, &mut out);
        d.flush(&mut out);
        let frames = out.iter().filter(|e| matches!(e, DepayEvent::Frame(_))).count();
        let dropped: u64 = out
            .iter()
            .filter_map(|e| match e {
                DepayEvent::Dropped { reason: DropReason::Incomplete, frames, .. } => Some(*frames),
                _ => None,
            })
            .sum();
        assert_eq!((frames, dropped), (1, 1), "{out:?}");
    }

    proptest::proptest! {
        #[test]
        fn random_payloads_never_panic(packets in proptest::collection::vec(
            (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0u32..4, proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>()), 0..40)) {
            for codec in [Codec::H264, Codec::H265] {
                let t = Instant::now();
                let mut d = Depacketizer::new(codec);
                let mut out = Vec::new();
                for (payload, ts, marker, loss) in &packets {
                    if *loss { d.push_loss(1); }
                    d.push_packet(payload, ts * 3000, *marker, t, &mut out);
                }
                d.flush(&mut out);
            }
        }
    }
}
