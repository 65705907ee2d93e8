//! SMPTE ST 2022-1 FEC packets (RFC 2733 header plus the 2022-1 extension),
//! as GStreamer's `rtpst2022-1-fecenc` / `rtpst2022-1-fecdec` (gst-plugins-good
//! 1.20+, rtpmanager) write and read them.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |V=2|P|X|  CC=0 |M|     PT      |       sequence number         |  RTP header: P, X and M
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  are *recovery* bits (the
//! |                           timestamp                           |  XOR of the media packets'
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  bits), not this packet's
//! |                         SSRC (0)                              |  own padding/extension
//! +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
//! |      SNBase low bits          |        Length recovery        |  FEC header (RFC 2733)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |E|  PT recovery |               Mask (0)                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          TS recovery                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |X|D|type |index|    Offset     |       NA      | SNBase ext    |  2022-1 extension (E=1)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |            XOR of the media payloads, zero-padded ...         |
//! ```
//!
//! A column FEC packet (D=0) protects `NA` = D packets `SNBase + i·Offset`
//! (Offset = L); a row FEC packet (D=1) protects `NA` = L consecutive packets
//! (Offset = 1). The packets form an L×D matrix filled row by row:
//!
//! ```text
//!            column 0   column 1   ...  column L-1
//!   row 0    s          s+1             s+L-1        -> row FEC (SNBase s,   NA L, Offset 1)
//!   row 1    s+L        s+L+1           s+2L-1       -> row FEC (SNBase s+L, ...)
//!   ...
//!   row D-1  s+(D-1)L   ...             s+DL-1
//!            |
//!            v column FEC (SNBase s, NA D, Offset L), ... (SNBase s+L-1, ...)
//! ```
//!
//! # What GStreamer 1.22 does, and a decoder must assume
//!
//! Read in `gstrtpst2022-1-fecenc.c` / `-fecdec.c` and checked against the
//! element's output (`dataplane/tests/fec_gst_interop.rs`):
//!
//! - **What is XORed.** Only the RTP *payload* as `gst_rtp_buffer_get_payload`
//!   sees it: after the CSRC list and header extension, without padding. RFC
//!   2733 instead protects everything after the 12-byte fixed header; the two
//!   agree for packets without CSRCs, extension and padding, which is what
//!   GStreamer's payloaders send. Length recovery is the XOR of those payload
//!   lengths; shorter payloads count as zero-padded to the longest, and the FEC
//!   payload is as long as the longest. PT, timestamp and the M, P and X bits
//!   are XORed too (M, P, X land in the FEC packet's own RTP header); CC is not,
//!   and neither is the SSRC. A decoder can therefore only rebuild packets
//!   without CSRCs, extension or padding: [`FecDecoder`](super::FecDecoder)
//!   refuses a recovery whose P or X bit comes out set.
//! - **SSRC.** The encoder refuses media whose SSRC is not 0 ("Chained buffer
//!   must have SSRC == 0"): nothing in the FEC packet recovers the SSRC, and
//!   GStreamer's decoder rebuilds packets with SSRC 0 (they must equal the
//!   originals). FEC packets carry SSRC 0 as well. A decoder must take the
//!   media SSRC from the media packets it has seen, not from the FEC stream.
//! - **Numbering and timing.** Column FEC goes out on pad `fec_0` (D=0) and row
//!   FEC on `fec_1` (D=1), each with its own sequence numbers counting from 0,
//!   payload type `pt` (default 96), marker/padding/extension bits as above.
//!   Matrices start at the first media packet. A row FEC packet is pushed as
//!   soon as its row is complete, *before* the media packet that completed it,
//!   with that packet's timestamp; a receiver can see it before the row's last
//!   packet. Column FEC for column c of the matrix starting at s is held back
//!   and sent alongside media packet `s + L·D + D·c` (spreading a matrix's
//!   columns over the next matrix, against burst loss), with that packet's
//!   timestamp. At EOS the held-back columns go out at once (the partial
//!   matrix and row at the end get no FEC), then EOS on both FEC pads. NA is the
//!   number of packets protected (L for rows, D for columns), Offset is 1 for
//!   rows and L for columns, Mask, N/X, type, index and SNBase ext are 0, E is 1.
//! - **Decoder.** `rtpst2022-1-fecdec` takes L and D from the first row and
//!   column FEC packets and drops FEC whose dimensions differ later; ours reads
//!   each packet's own SNBase/Offset/NA instead, so it needs no such state.
//!
//! References: RFC 2733 §§5–7 (header, protection operation, recovery);
//! SMPTE ST 2022-1:2007 §8 (the extension, L and D, Offset and NA).

use rtp_types::RtpPacket;

use super::{NotRtp, parse_rtp, xor_into};

/// Length of the RTP fixed header that precedes the FEC header (the FEC
/// packet's CC is 0 as GStreamer writes it; see [`FecPacket::parse`]).
pub const RTP_HEADER_LEN: usize = 12;
/// Length of the RTP 2733 FEC header with the 2022-1 extension.
pub const FEC_HEADER_LEN: usize = 16;

/// Which dimension of the L×D matrix an FEC packet protects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// D=0: D packets `L` apart (GStreamer pad `fec_0`).
    #[default]
    Column,
    /// D=1: L consecutive packets (GStreamer pad `fec_1`).
    Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum St2022Error {
    #[error("{len}-byte datagram is shorter than the 12-byte RTP header plus the 16-byte ST 2022-1 FEC header")]
    Truncated { len: usize },
    #[error("RTP version {0} in the FEC packet, expected 2")]
    Version(u8),
    #[error("FEC header E bit is 0, expected 1 (ST 2022-1 always carries the extended header)")]
    ExtensionBit,
    #[error("FEC header type {0}, expected 0 (XOR); ST 2022-1 defines no other")]
    FecType(u8),
    #[error("row FEC (D=1) with Offset {0}, expected 1")]
    RowOffset(u8),
    #[error("column FEC (D=0) with Offset 0, expected L >= 1")]
    ColumnOffset,
    #[error("FEC header NA is 0, expected the number of protected packets (>= 1)")]
    NoPackets,
}

/// A borrowed view of one ST 2022-1 FEC datagram; fields are read on access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FecPacket<'a> {
    data: &'a [u8],
}

impl<'a> FecPacket<'a> {
    /// Checks the version, length and the fields that decide which packets
    /// are protected. The FEC header is read right after the 12-byte fixed
    /// header: the P, X (and in RFC 2733, CC) bits of an FEC packet's RTP
    /// header are recovery bits, not a description of this packet.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, St2022Error> {
        if datagram.len() < RTP_HEADER_LEN + FEC_HEADER_LEN {
            return Err(St2022Error::Truncated { len: datagram.len() });
        }
        let packet = Self { data: datagram };
        let version = datagram[0] >> 6;
        if version != 2 {
            return Err(St2022Error::Version(version));
        }
        if !packet.e() {
            return Err(St2022Error::ExtensionBit);
        }
        if packet.fec_type() != 0 {
            return Err(St2022Error::FecType(packet.fec_type()));
        }
        match packet.direction() {
            Direction::Row if packet.offset() != 1 => return Err(St2022Error::RowOffset(packet.offset())),
            Direction::Column if packet.offset() == 0 => return Err(St2022Error::ColumnOffset),
            _ => {}
        }
        if packet.na() == 0 {
            return Err(St2022Error::NoPackets);
        }
        Ok(packet)
    }

    fn fec(&self, i: usize) -> u8 {
        self.data[RTP_HEADER_LEN + i]
    }

    fn be16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.data[at], self.data[at + 1]])
    }

    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.data[at], self.data[at + 1], self.data[at + 2], self.data[at + 3]])
    }

    pub fn payload_type(&self) -> u8 {
        self.data[1] & 0x7f
    }

    pub fn sequence_number(&self) -> u16 {
        self.be16(2)
    }

    pub fn timestamp(&self) -> u32 {
        self.be32(4)
    }

    pub fn ssrc(&self) -> u32 {
        self.be32(8)
    }

    /// XOR of the protected packets' marker bits (the FEC packet's M bit).
    pub fn marker_recovery(&self) -> bool {
        self.data[1] & 0x80 != 0
    }

    /// XOR of the protected packets' padding bits (the FEC packet's P bit).
    pub fn padding_recovery(&self) -> bool {
        self.data[0] & 0x20 != 0
    }

    /// XOR of the protected packets' extension bits (the FEC packet's X bit).
    pub fn extension_recovery(&self) -> bool {
        self.data[0] & 0x10 != 0
    }

    /// Low 16 bits of the first protected sequence number.
    pub fn sn_base_low(&self) -> u16 {
        self.be16(RTP_HEADER_LEN)
    }

    pub fn length_recovery(&self) -> u16 {
        self.be16(RTP_HEADER_LEN + 2)
    }

    /// The E bit: 1 when the 2022-1 extension follows (always, once parsed).
    pub fn e(&self) -> bool {
        self.fec(4) & 0x80 != 0
    }

    pub fn pt_recovery(&self) -> u8 {
        self.fec(4) & 0x7f
    }

    /// The 24-bit RFC 2733 mask; 0 in ST 2022-1, which uses Offset and NA.
    pub fn mask(&self) -> u32 {
        u32::from_be_bytes([0, self.fec(5), self.fec(6), self.fec(7)])
    }

    pub fn ts_recovery(&self) -> u32 {
        self.be32(RTP_HEADER_LEN + 8)
    }

    /// The extension's X bit (GStreamer calls it N); reserved, 0.
    pub fn x(&self) -> bool {
        self.fec(12) & 0x80 != 0
    }

    pub fn direction(&self) -> Direction {
        if self.fec(12) & 0x40 != 0 { Direction::Row } else { Direction::Column }
    }

    pub fn fec_type(&self) -> u8 {
        (self.fec(12) >> 3) & 0x7
    }

    pub fn index(&self) -> u8 {
        self.fec(12) & 0x7
    }

    /// Distance between protected packets: 1 for rows, L for columns.
    pub fn offset(&self) -> u8 {
        self.fec(13)
    }

    /// Number of protected packets: L for rows, D for columns.
    pub fn na(&self) -> u8 {
        self.fec(14)
    }

    pub fn sn_base_ext(&self) -> u8 {
        self.fec(15)
    }

    /// The XOR of the protected payloads (as long as the longest of them).
    pub fn payload(&self) -> &'a [u8] {
        &self.data[RTP_HEADER_LEN + FEC_HEADER_LEN..]
    }

    /// The 16-bit sequence numbers this packet protects, in order.
    pub fn protected(&self) -> impl Iterator<Item = u16> + use<> {
        let (base, offset) = (self.sn_base_low(), u16::from(self.offset()));
        (0..u16::from(self.na())).map(move |i| base.wrapping_add(i.wrapping_mul(offset)))
    }

    /// Every header field as plain values, e.g. to write the packet again.
    pub fn header(&self) -> FecHeader {
        FecHeader {
            payload_type: self.payload_type(),
            sequence_number: self.sequence_number(),
            timestamp: self.timestamp(),
            ssrc: self.ssrc(),
            marker_recovery: self.marker_recovery(),
            padding_recovery: self.padding_recovery(),
            extension_recovery: self.extension_recovery(),
            sn_base_low: self.sn_base_low(),
            length_recovery: self.length_recovery(),
            pt_recovery: self.pt_recovery(),
            mask: self.mask(),
            ts_recovery: self.ts_recovery(),
            x: self.x(),
            direction: self.direction(),
            fec_type: self.fec_type(),
            index: self.index(),
            offset: self.offset(),
            na: self.na(),
            sn_base_ext: self.sn_base_ext(),
        }
    }
}

/// The RTP and FEC header of an ST 2022-1 FEC packet, as plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecHeader {
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub marker_recovery: bool,
    pub padding_recovery: bool,
    pub extension_recovery: bool,
    pub sn_base_low: u16,
    pub length_recovery: u16,
    pub pt_recovery: u8,
    /// 24 bits.
    pub mask: u32,
    pub ts_recovery: u32,
    pub x: bool,
    pub direction: Direction,
    /// 3 bits.
    pub fec_type: u8,
    /// 3 bits.
    pub index: u8,
    pub offset: u8,
    pub na: u8,
    pub sn_base_ext: u8,
}

impl FecHeader {
    /// Writes the FEC datagram (headers, E=1, CC=0, then `payload`) into
    /// `out`, replacing its contents. Fields wider than their wire width are
    /// cut to it.
    pub fn write(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.push(0x80 | u8::from(self.padding_recovery) << 5 | u8::from(self.extension_recovery) << 4);
        out.push(u8::from(self.marker_recovery) << 7 | self.payload_type & 0x7f);
        out.extend_from_slice(&self.sequence_number.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(&self.sn_base_low.to_be_bytes());
        out.extend_from_slice(&self.length_recovery.to_be_bytes());
        out.push(0x80 | self.pt_recovery & 0x7f);
        out.extend_from_slice(&self.mask.to_be_bytes()[1..]);
        out.extend_from_slice(&self.ts_recovery.to_be_bytes());
        out.push(
            u8::from(self.x) << 7
                | u8::from(self.direction == Direction::Row) << 6
                | (self.fec_type & 0x7) << 3
                | self.index & 0x7,
        );
        out.extend_from_slice(&[self.offset, self.na, self.sn_base_ext]);
        out.extend_from_slice(payload);
    }
}

/// The XOR sum of a group of media packets in GStreamer's convention (see the
/// module docs): what the encoder accumulates, and what the decoder starts
/// from an FEC packet and reduces to the one missing packet.
#[derive(Debug, Default)]
pub(crate) struct Parity {
    pub(crate) payload: Vec<u8>,
    pub(crate) length: u16,
    pub(crate) payload_type: u8,
    pub(crate) timestamp: u32,
    pub(crate) marker: bool,
    pub(crate) padding: bool,
    pub(crate) extension: bool,
    /// Media packets added since `clear` (the encoder's NA).
    pub(crate) packets: usize,
    /// Sequence number of the first packet added (the encoder's SNBase).
    pub(crate) first_seq: u16,
}

impl Parity {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self { payload: Vec::with_capacity(bytes), ..Self::default() }
    }

    pub(crate) fn clear(&mut self) {
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        *self = Self { payload, ..Self::default() };
    }

    pub(crate) fn add(&mut self, media: &RtpPacket<'_>) {
        if self.packets == 0 {
            self.first_seq = media.sequence_number();
        }
        let payload = media.payload();
        xor_into(&mut self.payload, payload);
        self.length ^= payload.len() as u16;
        self.payload_type ^= media.payload_type();
        self.timestamp ^= media.timestamp();
        self.marker ^= media.marker_bit();
        self.padding ^= media.padding_bit();
        self.extension ^= media.extension_bit();
        self.packets += 1;
    }

    /// Starts from what an FEC packet says about its group.
    pub(crate) fn load(&mut self, fec: &FecPacket<'_>) {
        self.clear();
        self.payload.extend_from_slice(fec.payload());
        self.length = fec.length_recovery();
        self.payload_type = fec.pt_recovery();
        self.timestamp = fec.ts_recovery();
        self.marker = fec.marker_recovery();
        self.padding = fec.padding_recovery();
        self.extension = fec.extension_recovery();
    }

    /// Writes the packet an FEC group lacked once every other member was
    /// `add`ed to the `load`ed FEC packet.
    pub(crate) fn write_recovered(&self, seq: u16, ssrc: u32, out: &mut Vec<u8>) -> Result<(), RecoveryError> {
        let len = usize::from(self.length);
        if len > self.payload.len() {
            return Err(RecoveryError::LengthBeyondPayload);
        }
        if self.padding || self.extension {
            // GStreamer would set the bit without the bytes it describes.
            return Err(RecoveryError::PaddingOrExtension);
        }
        out.clear();
        out.push(0x80);
        out.push(u8::from(self.marker) << 7 | self.payload_type & 0x7f);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&ssrc.to_be_bytes());
        out.extend_from_slice(&self.payload[..len]);
        Ok(())
    }
}

/// Why an FEC group that lacked exactly one packet still could not rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecoveryError {
    /// The recovered length exceeds the protected bytes (inconsistent group).
    LengthBeyondPayload,
    /// The lost packet had padding or a header extension, which ST 2022-1 as
    /// GStreamer writes it does not protect.
    PaddingOrExtension,
    /// The rebuilt packet does not parse as RTP or has an unknown payload type.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum St2022EncodeError {
    #[error("media datagram is not RTP: {0}")]
    NotRtp(NotRtp),
    #[error("media sequence number {got} after {previous}: the ST 2022-1 matrix needs consecutive numbers")]
    NotConsecutive { previous: u16, got: u16 },
}

/// A column FEC packet waiting for the media packet it is sent alongside.
#[derive(Debug)]
struct QueuedColumn {
    target_seq: u16,
    datagram: Vec<u8>,
}

/// Computes ST 2022-1 row and column FEC for consecutive media packets exactly
/// as `rtpst2022-1-fecenc columns=L rows=D` does: same bytes, sequence
/// numbers, timestamps and send schedule (see the module docs). Nothing is
/// allocated per packet once every buffer has been used once.
#[derive(Debug)]
pub struct St2022Encoder {
    columns: usize,
    rows: usize,
    payload_type: u8,
    row: Parity,
    column_parities: Vec<Parity>,
    current_column: usize,
    row_seq: u16,
    column_seq: u16,
    last_seq: Option<u16>,
    last_timestamp: u32,
    queued: std::collections::VecDeque<QueuedColumn>,
    spare: Vec<Vec<u8>>,
    scratch: Vec<u8>,
}

impl St2022Encoder {
    /// `columns` = L (row FEC off when 0, and then column FEC too, as in
    /// GStreamer), `rows` = D (column FEC off when 0), `payload_type` of the
    /// FEC packets.
    pub fn new(columns: u8, rows: u8, payload_type: u8) -> Self {
        let (l, d) = (usize::from(columns), usize::from(rows));
        const MTU: usize = 1500;
        Self {
            columns: l,
            rows: d,
            payload_type,
            row: Parity::with_capacity(MTU),
            column_parities: (0..l).map(|_| Parity::with_capacity(MTU)).collect(),
            current_column: 0,
            row_seq: 0,
            column_seq: 0,
            last_seq: None,
            last_timestamp: 0,
            queued: std::collections::VecDeque::with_capacity(2 * l + 1),
            spare: (0..2 * l + 1).map(|_| Vec::with_capacity(MTU + 28)).collect(),
            scratch: Vec::with_capacity(MTU + 28),
        }
    }

    /// Takes the next media datagram (call it as the packet is sent) and hands
    /// `out` the FEC packets due now, with the stream they belong to
    /// (GStreamer pushes them just before the media packet).
    pub fn push(&mut self, media: &[u8], out: &mut dyn FnMut(Direction, &[u8])) -> Result<(), St2022EncodeError> {
        let packet = parse_rtp(media).map_err(St2022EncodeError::NotRtp)?;
        let seq = packet.sequence_number();
        if let Some(previous) = self.last_seq
            && previous.wrapping_add(1) != seq
        {
            return Err(St2022EncodeError::NotConsecutive { previous, got: seq });
        }
        self.last_seq = Some(seq);
        let timestamp = packet.timestamp();
        self.last_timestamp = timestamp;

        if self.columns > 0 {
            self.row.add(&packet);
            if self.row.packets == self.columns {
                self.write_fec(Direction::Row, None, timestamp);
                out(Direction::Row, &self.scratch);
                self.row.clear();
            }
        }
        if self.columns > 0 && self.rows > 0 {
            let column = self.current_column;
            self.column_parities[column].add(&packet);
            if self.column_parities[column].packets == self.rows {
                // GStreamer's schedule ("let's get cute and linearize"):
                // column c of the matrix at s goes out with media s + L·D + D·c.
                let target_seq = (seq as usize + self.columns - column + self.rows * column) as u16;
                self.write_fec(Direction::Column, Some(column), timestamp);
                let mut datagram = self.spare.pop().unwrap_or_default();
                datagram.clear();
                datagram.extend_from_slice(&self.scratch);
                self.queued.push_back(QueuedColumn { target_seq, datagram });
                self.column_parities[column].clear();
            }
            self.current_column = (column + 1) % self.columns;
        }

        if self.queued.front().is_some_and(|q| q.target_seq == seq)
            && let Some(mut queued) = self.queued.pop_front()
        {
            queued.datagram[4..8].copy_from_slice(&timestamp.to_be_bytes());
            out(Direction::Column, &queued.datagram);
            self.spare.push(queued.datagram);
        }
        Ok(())
    }

    /// At end of stream, hands `out` the column FEC packets still held back
    /// (GStreamer flushes them on EOS, stamped with the last media timestamp).
    /// The partial matrix and row at the end get no FEC.
    pub fn finish(&mut self, out: &mut dyn FnMut(Direction, &[u8])) {
        while let Some(queued) = self.queued.pop_front() {
            let mut datagram = queued.datagram;
            datagram[4..8].copy_from_slice(&self.last_timestamp.to_be_bytes());
            out(Direction::Column, &datagram);
            self.spare.push(datagram);
        }
    }

    /// Writes the finished row (or `column`) parity into `scratch`.
    fn write_fec(&mut self, direction: Direction, column: Option<usize>, timestamp: u32) {
        let (parity, offset, sequence_number) = match column {
            None => {
                self.row_seq = self.row_seq.wrapping_add(1);
                (&self.row, 1, self.row_seq.wrapping_sub(1))
            }
            Some(c) => {
                self.column_seq = self.column_seq.wrapping_add(1);
                (&self.column_parities[c], self.columns as u8, self.column_seq.wrapping_sub(1))
            }
        };
        let header = FecHeader {
            payload_type: self.payload_type,
            sequence_number,
            // A column packet's timestamp is set when it is sent.
            timestamp: if column.is_none() { timestamp } else { 0 },
            ssrc: 0,
            marker_recovery: parity.marker,
            padding_recovery: parity.padding,
            extension_recovery: parity.extension,
            sn_base_low: parity.first_seq,
            length_recovery: parity.length,
            pt_recovery: parity.payload_type,
            mask: 0,
            ts_recovery: parity.timestamp,
            x: false,
            direction,
            fec_type: 0,
            index: 0,
            offset,
            na: parity.packets as u8,
            sn_base_ext: 0,
        };
        header.write(&parity.payload, &mut self.scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtp_types::RtpPacketBuilder;

    fn media(seq: u16, ts: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
        RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(seq)
            .timestamp(ts)
            .ssrc(0)
            .marker_bit(marker)
            .payload(payload)
            .write_vec()
            .unwrap()
    }

    #[test]
    fn header_round_trips_every_field() {
        let header = FecHeader {
            payload_type: 101,
            sequence_number: 0xfffe,
            timestamp: 0x1234_5678,
            ssrc: 0,
            marker_recovery: true,
            padding_recovery: true,
            extension_recovery: false,
            sn_base_low: 0xabcd,
            length_recovery: 0x0102,
            pt_recovery: 0x55,
            mask: 0x00ab_cdef,
            ts_recovery: 0xdead_beef,
            x: true,
            direction: Direction::Column,
            fec_type: 0,
            index: 5,
            offset: 20,
            na: 5,
            sn_base_ext: 7,
        };
        let mut out = Vec::new();
        header.write(b"xor bytes", &mut out);
        assert_eq!(out.len(), RTP_HEADER_LEN + FEC_HEADER_LEN + 9);
        let parsed = FecPacket::parse(&out).unwrap();
        assert_eq!(parsed.header(), header);
        assert_eq!(parsed.payload(), b"xor bytes");
        assert!(parsed.e());
        let row = FecHeader { direction: Direction::Row, offset: 1, ..header };
        row.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out).unwrap().header(), row);
    }

    #[test]
    fn protected_sequence_numbers_wrap() {
        let mut out = Vec::new();
        FecHeader { sn_base_low: 65530, offset: 4, na: 3, ..Default::default() }.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out).unwrap().protected().collect::<Vec<_>>(), [65530, 65534, 2]);
    }

    #[test]
    fn bad_headers_are_errors_naming_the_field() {
        let mut out = Vec::new();
        let good = FecHeader { direction: Direction::Row, offset: 1, na: 4, ..Default::default() };
        good.write(&[], &mut out);
        assert!(FecPacket::parse(&out).is_ok());
        assert_eq!(FecPacket::parse(&out[..27]), Err(St2022Error::Truncated { len: 27 }));

        let mut bad = out.clone();
        bad[0] = 0x40;
        assert_eq!(FecPacket::parse(&bad), Err(St2022Error::Version(1)));
        let mut bad = out.clone();
        bad[16] &= 0x7f;
        assert_eq!(FecPacket::parse(&bad), Err(St2022Error::ExtensionBit));
        assert!(St2022Error::ExtensionBit.to_string().contains("E bit"));

        FecHeader { fec_type: 2, ..good }.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out), Err(St2022Error::FecType(2)));
        FecHeader { offset: 3, ..good }.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out), Err(St2022Error::RowOffset(3)));
        FecHeader { direction: Direction::Column, offset: 0, ..good }.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out), Err(St2022Error::ColumnOffset));
        FecHeader { na: 0, ..good }.write(&[], &mut out);
        assert_eq!(FecPacket::parse(&out), Err(St2022Error::NoPackets));
        assert!(St2022Error::NoPackets.to_string().contains("NA"));
    }

    #[test]
    fn parity_of_unequal_packets_rebuilds_each_one() {
        let packets = [
            media(10, 3000, false, b"a longer first payload"),
            media(11, 3000, false, b"short"),
            media(12, 6000, true, b"middle length"),
        ];
        let mut parity = Parity::default();
        for p in &packets {
            parity.add(&RtpPacket::parse(p).unwrap());
        }
        let header = FecHeader {
            direction: Direction::Row,
            offset: 1,
            na: 3,
            sn_base_low: parity.first_seq,
            length_recovery: parity.length,
            pt_recovery: parity.payload_type,
            ts_recovery: parity.timestamp,
            marker_recovery: parity.marker,
            ..Default::default()
        };
        let mut fec = Vec::new();
        header.write(&parity.payload, &mut fec);
        let fec = FecPacket::parse(&fec).unwrap();
        assert_eq!(fec.payload().len(), 22, "padded to the longest payload");
        for lost in 0..packets.len() {
            let mut rebuild = Parity::default();
            rebuild.load(&fec);
            for (i, p) in packets.iter().enumerate() {
                if i != lost {
                    rebuild.add(&RtpPacket::parse(p).unwrap());
                }
            }
            let mut out = Vec::new();
            rebuild.write_recovered(10 + lost as u16, 0, &mut out).unwrap();
            assert_eq!(out, packets[lost], "packet {lost}");
        }
    }

    #[test]
    fn encoder_schedules_rows_at_once_and_columns_one_matrix_later() {
        let (l, d) = (4u16, 3u16);
        let mut enc = St2022Encoder::new(l as u8, d as u8, 100);
        let mut sent = Vec::new();
        for seq in 0..(3 * l * d) {
            let m = media(1000 + seq, u32::from(seq) * 10, false, &[seq as u8; 7]);
            enc.push(&m, &mut |dir, fec| sent.push((seq, dir, fec.to_vec()))).unwrap();
        }
        let rows: Vec<_> = sent.iter().filter(|s| s.1 == Direction::Row).collect();
        assert_eq!(rows.len(), 9);
        for (i, (at, _, fec)) in rows.iter().enumerate() {
            let fec = FecPacket::parse(fec).unwrap();
            assert_eq!((fec.sequence_number(), fec.ssrc(), fec.payload_type()), (i as u16, 0, 100));
            assert_eq!(fec.sn_base_low(), 1000 + i as u16 * l);
            assert_eq!((fec.offset(), fec.na()), (1, l as u8));
            assert_eq!(*at, i as u16 * l + l - 1, "sent with the row's last packet");
            assert_eq!(fec.timestamp(), u32::from(*at) * 10);
        }
        let held = sent.len();
        enc.finish(&mut |dir, fec| sent.push((3 * l * d, dir, fec.to_vec())));
        assert_eq!(sent.len() - held, 4, "the last matrix's columns go out at the end");
        assert!(
            sent[held..].iter().all(|s| FecPacket::parse(&s.2).unwrap().timestamp() == u32::from(3 * l * d - 1) * 10)
        );
        let columns: Vec<_> = sent[..held].iter().filter(|s| s.1 == Direction::Column).collect();
        assert_eq!(columns.len(), 8, "until the end, the last matrix's columns are held back");
        for (i, (at, _, fec)) in columns.iter().enumerate() {
            let fec = FecPacket::parse(fec).unwrap();
            let (matrix, c) = (i as u16 / l, i as u16 % l);
            assert_eq!(fec.sequence_number(), i as u16);
            assert_eq!(fec.sn_base_low(), 1000 + matrix * l * d + c);
            assert_eq!((fec.offset(), fec.na()), (l as u8, d as u8));
            assert_eq!(*at, (matrix + 1) * l * d + d * c);
            assert_eq!(fec.timestamp(), u32::from(*at) * 10);
        }
    }

    #[test]
    fn encoder_refuses_gaps_and_non_rtp() {
        let mut enc = St2022Encoder::new(2, 2, 96);
        enc.push(&media(5, 0, false, b"x"), &mut |_, _| {}).unwrap();
        assert_eq!(
            enc.push(&media(7, 0, false, b"x"), &mut |_, _| {}),
            Err(St2022EncodeError::NotConsecutive { previous: 5, got: 7 })
        );
        assert!(matches!(enc.push(&[0x80, 1], &mut |_, _| {}), Err(St2022EncodeError::NotRtp(_))));
    }
}
