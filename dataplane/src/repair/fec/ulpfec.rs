//! RFC 5109 ULPFEC packets, as GStreamer's `rtpulpfecenc` / `rtpulpfecdec`
//! (gst-plugins-good 1.14+, rtp plugin: `gstrtpulpfecenc.c`,
//! `rtpulpfeccommon.c`, `gstrtpulpfecdec.c`) write and read them.
//!
//! The FEC packet is an ordinary RTP packet (it may even carry a header
//! extension: GStreamer adds transport-wide-cc when the media has it); its
//! payload holds the FEC header, one ULP level header and the level-0 data:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |E|L|P|X|  CC   |M| PT recovery |            SN base            |  FEC header
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  (RFC 5109 §7.3)
//! |                          TS recovery                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        length recovery        |       Protection length       |  level 0 header
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  (§7.4)
//! |             mask              |  mask cont. (present if L=1)  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | mask cont.  |  level 0 payload: XOR of the protected packets' |
//! +-+-+-+-+-+-+-+    bytes after their 12-byte fixed header ...   |
//! ```
//!
//! Mask bit *i*, counted from the most significant bit, protects `SN base + i`
//! (16 bits, or 48 with L=1). P, X, CC, M, PT and TS are the XOR of those
//! fields of the protected packets; length recovery is the XOR of their
//! lengths after the fixed header (CSRCs, extension, payload and padding, all
//! of which are protected, so the rebuilt packet is byte-identical).
//!
//! # What GStreamer 1.22 does, and a receiver must know
//!
//! Read in the sources and checked against the element's output
//! (`dataplane/tests/fec_gst_interop.rs`):
//!
//! - **One sequence space.** Unlike RFC 5109's separate stream, FEC packets
//!   share the media's SSRC and sequence numbers (as libwebrtc and Skype for
//!   Business do), under their own payload type (`pt`, which must be set; the
//!   default 255 turns the element into a pass-through). To make room, the
//!   encoder renumbers every media packet after the first FEC packet
//!   (`seq + FEC packets sent so far`). A receiver must therefore: demultiplex
//!   FEC by payload type; count FEC packets in the sequence space when it
//!   looks for gaps (a lost FEC packet is a gap that no retransmission can or
//!   needs to fill, and the receiver cannot tell it from a lost media packet);
//!   and put RTX after the FEC encoder on the sender, or NACKs name the wrong
//!   packets. The SN base names the (renumbered) media packets.
//! - **When and what.** With `multipacket=true` (the default, for video) the
//!   encoder keeps the packets of the current frame (up to 48) and, on the
//!   packet with the marker bit, adds `percentage / 100` per packet to a
//!   budget (a float carried across frames) and sends `floor(budget)` FEC
//!   packets right after the marker packet: sequence numbers `marker + 1 ...`,
//!   the marker packet's timestamp and SSRC, M=0. FEC packet *k* of *n* covers
//!   the frame's packets `k·N/n ..= ceil((k+1)·N/n) - 1` (N packets in the
//!   frame), so neighbouring groups can share a packet, and with
//!   `percentage=100` each FEC packet is a copy of one media packet. Frames
//!   that leave the budget below 1 get no FEC at all: at low percentages,
//!   small frames are unprotected. With `multipacket=false` every
//!   `100 / percentage`-th packet gets one FEC packet protecting it alone.
//!   `percentage-important` applies to buffers flagged NON_DROPPABLE, which
//!   is invisible on the wire; our encoder does not model it.
//! - **Decoder.** `rtpulpfecdec` only acts on packet-lost events from the
//!   jitter buffer, looking the FEC and media up in `rtpstorage`; it refuses
//!   FEC with E=1 or with a protection length that does not fill the payload
//!   exactly, and recovered packets whose payload type is not a media one.
//!   It uses level 0 only, as does everything here.
//!
//! References: RFC 5109 §§7–8 (headers, protection and recovery operations).

use rtp_types::RtpPacket;

use super::{NotRtp, parse_rtp, xor_into};

/// FEC header length (§7.3).
pub const FEC_HEADER_LEN: usize = 10;
/// Level header length with a 16-bit mask (L=0) and a 48-bit mask (L=1).
pub const LEVEL_HEADER_LEN_SHORT: usize = 4;
pub const LEVEL_HEADER_LEN_LONG: usize = 8;
/// Most packets one FEC packet can protect (48-bit mask).
pub const MAX_PROTECTED: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UlpfecError {
    #[error("FEC datagram is not RTP: {0}")]
    Rtp(NotRtp),
    #[error("{len}-byte FEC payload ends inside the {field} ({needed} bytes needed)")]
    Truncated { field: &'static str, needed: usize, len: usize },
    #[error("FEC header E bit is 1, expected 0 (RFC 5109 §7.3 reserves it)")]
    ExtensionBit,
    #[error("level 0 protection length {declared} exceeds the {available} bytes after the headers")]
    ProtectionLength { declared: usize, available: usize },
    #[error("level 0 mask is 0, expected at least one protected packet")]
    EmptyMask,
}

/// A borrowed view of one ULPFEC datagram; fields are read on access.
#[derive(Debug)]
pub struct UlpfecPacket<'a> {
    rtp: RtpPacket<'a>,
    fec: &'a [u8],
}

impl<'a> UlpfecPacket<'a> {
    /// Parses the RTP packet and checks the FEC and level-0 headers. Bytes
    /// after the level-0 data (further ULP levels) are allowed and ignored.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, UlpfecError> {
        let rtp = parse_rtp(datagram).map_err(UlpfecError::Rtp)?;
        let start = rtp.payload_offset();
        let fec = &datagram[start..start + rtp.payload_len()];
        let truncated = |field, needed| UlpfecError::Truncated { field, needed, len: fec.len() };
        if fec.len() < FEC_HEADER_LEN + LEVEL_HEADER_LEN_SHORT {
            return Err(truncated("FEC and level 0 header", FEC_HEADER_LEN + LEVEL_HEADER_LEN_SHORT));
        }
        let packet = Self { rtp, fec };
        if packet.e() {
            return Err(UlpfecError::ExtensionBit);
        }
        let headers = packet.headers_len();
        if fec.len() < headers {
            return Err(truncated("48-bit level 0 mask", headers));
        }
        let declared = usize::from(packet.protection_length());
        if declared > fec.len() - headers {
            return Err(UlpfecError::ProtectionLength { declared, available: fec.len() - headers });
        }
        if packet.mask() == 0 {
            return Err(UlpfecError::EmptyMask);
        }
        Ok(packet)
    }

    /// The FEC packet's own RTP header.
    pub fn rtp(&self) -> &RtpPacket<'a> {
        &self.rtp
    }

    fn be16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.fec[at], self.fec[at + 1]])
    }

    pub fn e(&self) -> bool {
        self.fec[0] & 0x80 != 0
    }

    /// The L bit: a 48-bit mask follows.
    pub fn long_mask(&self) -> bool {
        self.fec[0] & 0x40 != 0
    }

    pub fn padding_recovery(&self) -> bool {
        self.fec[0] & 0x20 != 0
    }

    pub fn extension_recovery(&self) -> bool {
        self.fec[0] & 0x10 != 0
    }

    pub fn cc_recovery(&self) -> u8 {
        self.fec[0] & 0x0f
    }

    pub fn marker_recovery(&self) -> bool {
        self.fec[1] & 0x80 != 0
    }

    pub fn pt_recovery(&self) -> u8 {
        self.fec[1] & 0x7f
    }

    pub fn sn_base(&self) -> u16 {
        self.be16(2)
    }

    pub fn ts_recovery(&self) -> u32 {
        u32::from_be_bytes([self.fec[4], self.fec[5], self.fec[6], self.fec[7]])
    }

    pub fn length_recovery(&self) -> u16 {
        self.be16(8)
    }

    pub fn protection_length(&self) -> u16 {
        self.be16(10)
    }

    /// Bit *i* set: `SN base + i` is protected (bit 0 is the wire mask's most
    /// significant bit).
    pub fn mask(&self) -> u64 {
        let short = u64::from(self.be16(12));
        let wire = if self.long_mask() {
            short << 32 | u64::from(u32::from_be_bytes([self.fec[14], self.fec[15], self.fec[16], self.fec[17]]))
        } else {
            short << 32
        };
        // Reverse the 48 wire bits so that bit i is offset i.
        wire.reverse_bits() >> 16
    }

    /// The level-0 data: XOR of the protected packets after their fixed headers.
    pub fn level0_payload(&self) -> &'a [u8] {
        let start = self.headers_len();
        &self.fec[start..start + usize::from(self.protection_length())]
    }

    fn headers_len(&self) -> usize {
        FEC_HEADER_LEN + if self.long_mask() { LEVEL_HEADER_LEN_LONG } else { LEVEL_HEADER_LEN_SHORT }
    }

    /// The 16-bit sequence numbers this packet protects, in order.
    pub fn protected(&self) -> impl Iterator<Item = u16> + use<> {
        let (base, mask) = (self.sn_base(), self.mask());
        (0..MAX_PROTECTED as u16).filter(move |i| mask >> i & 1 != 0).map(move |i| base.wrapping_add(i))
    }

    /// The FEC and level-0 header fields as plain values.
    pub fn header(&self) -> UlpfecHeader {
        UlpfecHeader {
            padding_recovery: self.padding_recovery(),
            extension_recovery: self.extension_recovery(),
            cc_recovery: self.cc_recovery(),
            marker_recovery: self.marker_recovery(),
            pt_recovery: self.pt_recovery(),
            sn_base: self.sn_base(),
            ts_recovery: self.ts_recovery(),
            length_recovery: self.length_recovery(),
            mask: self.mask(),
        }
    }
}

/// The FEC packet's own RTP header fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecRtpHeader {
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub marker: bool,
}

/// The FEC header and level-0 mask as plain values (E is always written 0,
/// L follows from the mask, the protection length from the payload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UlpfecHeader {
    pub padding_recovery: bool,
    pub extension_recovery: bool,
    /// 4 bits.
    pub cc_recovery: u8,
    pub marker_recovery: bool,
    pub pt_recovery: u8,
    pub sn_base: u16,
    pub ts_recovery: u32,
    pub length_recovery: u16,
    /// Bit *i* protects `sn_base + i`; 48 bits.
    pub mask: u64,
}

impl UlpfecHeader {
    /// Writes the FEC datagram (RTP header, FEC header, level 0 header, then
    /// `level0_payload`) into `out`, replacing its contents. The mask is long
    /// (L=1) when it protects anything past `sn_base + 15`, as in GStreamer.
    pub fn write(&self, rtp: &FecRtpHeader, level0_payload: &[u8], out: &mut Vec<u8>) {
        let long = self.mask >> 16 & 0xffff_ffff != 0;
        let wire = (self.mask & ((1 << MAX_PROTECTED) - 1)).reverse_bits() >> 16;
        out.clear();
        out.push(0x80);
        out.push(u8::from(rtp.marker) << 7 | rtp.payload_type & 0x7f);
        out.extend_from_slice(&rtp.sequence_number.to_be_bytes());
        out.extend_from_slice(&rtp.timestamp.to_be_bytes());
        out.extend_from_slice(&rtp.ssrc.to_be_bytes());
        out.push(
            u8::from(long) << 6
                | u8::from(self.padding_recovery) << 5
                | u8::from(self.extension_recovery) << 4
                | self.cc_recovery & 0x0f,
        );
        out.push(u8::from(self.marker_recovery) << 7 | self.pt_recovery & 0x7f);
        out.extend_from_slice(&self.sn_base.to_be_bytes());
        out.extend_from_slice(&self.ts_recovery.to_be_bytes());
        out.extend_from_slice(&self.length_recovery.to_be_bytes());
        out.extend_from_slice(&(level0_payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&((wire >> 32) as u16).to_be_bytes());
        if long {
            out.extend_from_slice(&(wire as u32).to_be_bytes());
        }
        out.extend_from_slice(level0_payload);
    }
}

/// RFC 5109's bit string (§8.2): the first 8 bytes of the RTP header, the
/// length after the fixed header, and the bytes after it, XORed over a group.
/// The encoder accumulates it; the decoder starts from an FEC packet and
/// reduces it to the one missing packet.
#[derive(Debug, Default)]
pub(crate) struct Parity {
    head: [u8; 8],
    length: u16,
    pub(crate) body: Vec<u8>,
}

impl Parity {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self { body: Vec::with_capacity(bytes), ..Self::default() }
    }

    pub(crate) fn clear(&mut self) {
        self.head = [0; 8];
        self.length = 0;
        self.body.clear();
    }

    /// Adds a whole media datagram (at least the 12-byte fixed header).
    pub(crate) fn add(&mut self, media: &[u8]) {
        if media.len() < 12 {
            return;
        }
        for (h, b) in self.head.iter_mut().zip(media) {
            *h ^= b;
        }
        self.length ^= (media.len() - 12) as u16;
        xor_into(&mut self.body, &media[12..]);
    }

    pub(crate) fn load(&mut self, fec: &UlpfecPacket<'_>) {
        self.head.copy_from_slice(&fec.fec[..8]);
        self.length = fec.length_recovery();
        self.body.clear();
        self.body.extend_from_slice(fec.level0_payload());
    }

    /// The header fields of the FEC packet for the group `add`ed so far.
    fn header(&self, sn_base: u16, mask: u64) -> UlpfecHeader {
        UlpfecHeader {
            padding_recovery: self.head[0] & 0x20 != 0,
            extension_recovery: self.head[0] & 0x10 != 0,
            cc_recovery: self.head[0] & 0x0f,
            marker_recovery: self.head[1] & 0x80 != 0,
            pt_recovery: self.head[1] & 0x7f,
            sn_base,
            ts_recovery: u32::from_be_bytes([self.head[4], self.head[5], self.head[6], self.head[7]]),
            length_recovery: self.length,
            mask,
        }
    }

    /// Writes the packet a `load`ed FEC group lacked once every other member
    /// was `add`ed (§8.2: version 2, the recovered bits, `seq` and `ssrc`).
    pub(crate) fn write_recovered(&self, seq: u16, ssrc: u32, out: &mut Vec<u8>) -> Result<(), LengthBeyondPayload> {
        let len = usize::from(self.length);
        if len > self.body.len() {
            return Err(LengthBeyondPayload);
        }
        out.clear();
        out.push(0x80 | self.head[0] & 0x3f);
        out.push(self.head[1]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.head[4..8]);
        out.extend_from_slice(&ssrc.to_be_bytes());
        out.extend_from_slice(&self.body[..len]);
        Ok(())
    }
}

/// The recovered length exceeds the protected bytes: the group is inconsistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LengthBeyondPayload;

/// `rtpulpfecenc`'s properties that change what goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UlpfecSettings {
    /// Payload type of the FEC packets.
    pub payload_type: u8,
    /// FEC packets per 100 media packets (0..=100; 0 sends none).
    pub percentage: u8,
    /// Protect the packets of a frame together, sending FEC after the marker.
    pub multipacket: bool,
}

/// What [`UlpfecEncoder::push`] hands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UlpfecOutput {
    /// The media packet, renumbered into the shared sequence space.
    Media,
    Fec,
}

/// Renumbers media and inserts ULPFEC packets exactly as `rtpulpfecenc`
/// (same budget arithmetic, grouping, numbering and bytes; see the module
/// docs). Nothing is allocated per packet once every buffer has been used once.
#[derive(Debug)]
pub struct UlpfecEncoder {
    settings: UlpfecSettings,
    budget: f64,
    received: u64,
    seq_offset: u16,
    /// The frame so far, oldest first, renumbered.
    frame: std::collections::VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    parity: Parity,
    scratch: Vec<u8>,
}

impl UlpfecEncoder {
    pub fn new(settings: UlpfecSettings) -> Self {
        const MTU: usize = 1500;
        Self {
            settings,
            budget: 0.0,
            received: 0,
            seq_offset: 0,
            frame: std::collections::VecDeque::with_capacity(MAX_PROTECTED),
            // The frame's 48 packets plus the one arriving.
            spare: (0..=MAX_PROTECTED).map(|_| Vec::with_capacity(MTU)).collect(),
            parity: Parity::with_capacity(MTU),
            scratch: Vec::with_capacity(MTU + 32),
        }
    }

    /// Takes the next media datagram and hands `out` what to send, in order:
    /// the renumbered media packet, then any FEC packets due after it.
    pub fn push(&mut self, media: &[u8], out: &mut dyn FnMut(UlpfecOutput, &[u8])) -> Result<(), NotRtp> {
        let packet = parse_rtp(media)?;
        let (marker, timestamp, ssrc) = (packet.marker_bit(), packet.timestamp(), packet.ssrc());
        let seq = packet.sequence_number().wrapping_add(self.seq_offset);
        self.received += 1;

        let mut current = self.spare.pop().unwrap_or_default();
        current.clear();
        current.extend_from_slice(media);
        current[2..4].copy_from_slice(&seq.to_be_bytes());
        out(UlpfecOutput::Media, &current);

        let pct = self.settings.percentage;
        let fec_packets = if pct == 0 {
            0
        } else if self.settings.multipacket {
            if self.frame.len() == MAX_PROTECTED
                && let Some(oldest) = self.frame.pop_front()
            {
                self.spare.push(oldest);
            }
            self.frame.push_back(current);
            // GStreamer keeps the budget as a double; so do we, to round alike.
            self.budget += f64::from(pct) / 100.0;
            if marker && self.budget > 0.0 { self.budget as usize } else { 0 }
        } else {
            if let Some(previous) = self.frame.pop_front() {
                self.spare.push(previous);
            }
            self.frame.push_back(current);
            let nth = u64::from(100 / pct);
            usize::from(self.received.is_multiple_of(nth))
        };

        for k in 0..fec_packets {
            let rtp = FecRtpHeader {
                payload_type: self.settings.payload_type,
                sequence_number: seq.wrapping_add(1 + k as u16),
                timestamp,
                ssrc,
                marker: false,
            };
            self.write_fec(k, fec_packets, &rtp);
            out(UlpfecOutput::Fec, &self.scratch);
        }
        self.seq_offset = self.seq_offset.wrapping_add(fec_packets as u16);
        if self.settings.multipacket {
            self.budget -= fec_packets as f64;
            if marker {
                self.spare.extend(self.frame.drain(..));
            }
        }
        Ok(())
    }

    /// Writes FEC packet `k` of `n` over the held frame into `scratch`.
    fn write_fec(&mut self, k: usize, n: usize, rtp: &FecRtpHeader) {
        let packets = self.frame.len();
        let start = k * packets / n;
        let end = ((k + 1) * packets).div_ceil(n).saturating_sub(1).max(start);
        let end = end.min(start + MAX_PROTECTED - 1).min(packets.saturating_sub(1));
        let seq_of = |p: &Vec<u8>| u16::from_be_bytes([p[2], p[3]]);
        let Some(sn_base) =
            self.frame.range(start..=end).map(seq_of).min_by_key(|s| s.wrapping_sub(seq_of(&self.frame[start])) as i16)
        else {
            return;
        };
        self.parity.clear();
        let mut mask = 0u64;
        for p in self.frame.range(start..=end) {
            let offset = usize::from(seq_of(p).wrapping_sub(sn_base));
            if offset < MAX_PROTECTED && mask >> offset & 1 == 0 {
                mask |= 1 << offset;
                self.parity.add(p);
            }
        }
        let header = self.parity.header(sn_base, mask);
        header.write(rtp, &self.parity.body, &mut self.scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtp_types::RtpPacketBuilder;

    fn media(seq: u16, marker: bool, payload: &[u8]) -> Vec<u8> {
        RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(seq)
            .timestamp(u32::from(seq) * 100)
            .ssrc(0x1234_5678)
            .marker_bit(marker)
            .payload(payload)
            .write_vec()
            .unwrap()
    }

    fn header() -> UlpfecHeader {
        UlpfecHeader {
            padding_recovery: true,
            extension_recovery: false,
            cc_recovery: 3,
            marker_recovery: true,
            pt_recovery: 96,
            sn_base: 65530,
            ts_recovery: 0xdead_beef,
            length_recovery: 321,
            mask: 0b1011,
        }
    }

    #[test]
    fn header_round_trips_with_short_and_long_masks() {
        let rtp = FecRtpHeader { payload_type: 122, sequence_number: 7, timestamp: 9, ssrc: 1, marker: false };
        let mut out = Vec::new();
        header().write(&rtp, b"level zero", &mut out);
        assert_eq!(out.len(), 12 + FEC_HEADER_LEN + LEVEL_HEADER_LEN_SHORT + 10);
        let parsed = UlpfecPacket::parse(&out).unwrap();
        assert!(!parsed.long_mask());
        assert_eq!(parsed.header(), header());
        assert_eq!(parsed.level0_payload(), b"level zero");
        assert_eq!(parsed.protected().collect::<Vec<_>>(), [65530, 65531, 65533]);
        assert_eq!(out[24..26], [0b1101_0000, 0], "offset 0 is the most significant mask bit");

        let long = UlpfecHeader { mask: 1 | 1 << 47, ..header() };
        long.write(&rtp, b"", &mut out);
        let parsed = UlpfecPacket::parse(&out).unwrap();
        assert!(parsed.long_mask());
        assert_eq!(parsed.header(), long);
        assert_eq!(parsed.protected().collect::<Vec<_>>(), [65530, 65530u16.wrapping_add(47)]);
    }

    #[test]
    fn bad_headers_are_errors_naming_the_field() {
        let rtp = FecRtpHeader { payload_type: 122, ..Default::default() };
        let mut out = Vec::new();
        header().write(&rtp, b"abcd", &mut out);
        assert!(matches!(UlpfecPacket::parse(&out[..5]), Err(UlpfecError::Rtp(_))));
        let e = UlpfecPacket::parse(&out[..20]).unwrap_err();
        assert_eq!(e, UlpfecError::Truncated { field: "FEC and level 0 header", needed: 14, len: 8 });
        assert!(e.to_string().contains("level 0 header"));

        let mut bad = out.clone();
        bad[12] |= 0x80;
        assert_eq!(UlpfecPacket::parse(&bad).unwrap_err(), UlpfecError::ExtensionBit);
        let mut bad = out.clone();
        bad[22..24].copy_from_slice(&3u16.to_be_bytes());
        assert!(UlpfecPacket::parse(&bad).is_ok(), "a shorter level 0 leaves room for more levels");
        bad[22..24].copy_from_slice(&[0, 0]);
        bad[24..26].copy_from_slice(&[0, 0]);
        assert_eq!(UlpfecPacket::parse(&bad).unwrap_err(), UlpfecError::EmptyMask);
        let mut bad = out.clone();
        bad[22..24].copy_from_slice(&500u16.to_be_bytes());
        let e = UlpfecPacket::parse(&bad).unwrap_err();
        assert_eq!(e, UlpfecError::ProtectionLength { declared: 500, available: 4 });
        assert!(e.to_string().contains("protection length 500"));

        UlpfecHeader { mask: 1 << 20, ..header() }.write(&rtp, b"", &mut out);
        out.truncate(12 + 16);
        assert_eq!(
            UlpfecPacket::parse(&out).unwrap_err(),
            UlpfecError::Truncated { field: "48-bit level 0 mask", needed: 18, len: 16 }
        );
    }

    #[test]
    fn parity_rebuilds_each_packet_byte_for_byte() {
        let mut with_padding = media(12, false, b"padded");
        with_padding[0] |= 0x20;
        with_padding.extend_from_slice(&[0, 0, 3]);
        let packets = [media(10, false, b"first payload, longest one"), media(11, false, b"x"), with_padding];
        let mut parity = Parity::default();
        for p in &packets {
            parity.add(p);
        }
        let rtp = FecRtpHeader { payload_type: 122, sequence_number: 13, ..Default::default() };
        let mut fec = Vec::new();
        parity.header(10, 0b111).write(&rtp, &parity.body, &mut fec);
        let fec = UlpfecPacket::parse(&fec).unwrap();
        for lost in 0..3 {
            let mut rebuild = Parity::default();
            rebuild.load(&fec);
            for (i, p) in packets.iter().enumerate() {
                if i != lost {
                    rebuild.add(p);
                }
            }
            let mut out = Vec::new();
            rebuild.write_recovered(10 + lost as u16, 0x1234_5678, &mut out).unwrap();
            assert_eq!(out, packets[lost], "packet {lost}");
        }
    }

    fn encode(settings: UlpfecSettings, frames: &[usize]) -> Vec<(UlpfecOutput, Vec<u8>)> {
        let mut enc = UlpfecEncoder::new(settings);
        let mut sent = Vec::new();
        let mut seq = 100u16;
        for &n in frames {
            for i in 0..n {
                let m = media(seq, i + 1 == n, &[seq as u8; 30]);
                enc.push(&m, &mut |kind, d| sent.push((kind, d.to_vec()))).unwrap();
                seq += 1;
            }
        }
        sent
    }

    #[test]
    fn encoder_shares_the_sequence_space_and_splits_frames_into_groups() {
        let settings = UlpfecSettings { payload_type: 122, percentage: 50, multipacket: true };
        let sent = encode(settings, &[5, 3]);
        let seqs: Vec<u16> = sent.iter().map(|(_, d)| u16::from_be_bytes([d[2], d[3]])).collect();
        assert_eq!(seqs, (100..100 + seqs.len() as u16).collect::<Vec<_>>(), "one gapless sequence space");
        let kinds: Vec<_> = sent.iter().map(|(k, _)| *k == UlpfecOutput::Fec).collect();
        // 5 × 0.5 = 2.5: two FEC packets after the first frame, budget 0.5;
        // 0.5 + 3 × 0.5 = 2: two after the second.
        assert_eq!(kinds, [false, false, false, false, false, true, true, false, false, false, true, true]);
        let groups: Vec<Vec<u16>> = sent
            .iter()
            .filter(|(k, _)| *k == UlpfecOutput::Fec)
            .map(|(_, d)| UlpfecPacket::parse(d).unwrap().protected().collect())
            .collect();
        assert_eq!(groups, [vec![100, 101, 102], vec![102, 103, 104], vec![107, 108], vec![108, 109]]);
        let fec = UlpfecPacket::parse(&sent[5].1).unwrap();
        assert_eq!((fec.rtp().payload_type(), fec.rtp().ssrc(), fec.rtp().timestamp()), (122, 0x1234_5678, 10400));
        assert!(!fec.rtp().marker_bit());
    }

    #[test]
    fn encoder_without_multipacket_protects_every_nth_packet_alone() {
        let settings = UlpfecSettings { payload_type: 122, percentage: 25, multipacket: false };
        let sent = encode(settings, &[10]);
        let protected: Vec<Vec<u16>> = sent
            .iter()
            .filter(|(k, _)| *k == UlpfecOutput::Fec)
            .map(|(_, d)| UlpfecPacket::parse(d).unwrap().protected().collect())
            .collect();
        // Every 4th packet; the media after each FEC packet is renumbered.
        assert_eq!(protected, [vec![103], vec![108]]);
    }

    #[test]
    fn zero_percent_passes_media_through_unchanged() {
        let settings = UlpfecSettings { payload_type: 122, percentage: 0, multipacket: true };
        let sent = encode(settings, &[4, 4]);
        assert!(sent.iter().all(|(k, _)| *k == UlpfecOutput::Media));
        assert_eq!(sent.len(), 8);
    }
}
