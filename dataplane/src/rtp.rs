//! RTP and RTCP wire code shared by the receiver, the test sender and the relay.
//!
//! Parsing borrows the datagram (`rtp-types`, `rtcp-types`) and returns errors
//! as values: nothing here panics on wire input. Builders write into a caller's
//! buffer so the hot path does not allocate.

use rtcp_types::{
    Compound, CompoundBuilder, FciFeedbackPacketType, FciParser, Nack, Packet as RtcpPacket, Pli, ReportBlock,
    RtcpParseError, RtcpPacketWriter, RtcpPacketWriterExt, Sdes, SdesChunk, SdesItem,
};
pub use rtp_types::{RtpPacket, RtpPacketBuilder, RtpParseError};

/// The first byte of RTCP packet types SR..APP (200..=204) and feedback
/// (205, 206) lies in 192..=223 when the version bits are read as RTP: RFC 5761
/// §4 says to demultiplex rtcp-mux on the second byte being 192..=223.
pub fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.len() >= 2 && (192..=223).contains(&datagram[1])
}

/// Original sequence number and original payload of an RTX packet (RFC 4588 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtxPayload<'a> {
    pub original_seq: u16,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtxError {
    #[error("RTX payload of {0} bytes is shorter than the 2-byte original sequence number")]
    Truncated(usize),
}

/// Splits an RTX packet's payload into the original sequence number (OSN) and
/// the original payload.
pub fn parse_rtx(payload: &[u8]) -> Result<RtxPayload<'_>, RtxError> {
    if payload.len() < 2 {
        return Err(RtxError::Truncated(payload.len()));
    }
    Ok(RtxPayload { original_seq: u16::from_be_bytes([payload[0], payload[1]]), payload: &payload[2..] })
}

/// Writes an RTX packet for `original` into `out` (SSRC-multiplexed, as
/// GStreamer's `rtprtxsend` does) and returns its length.
pub fn write_rtx(
    original: &RtpPacket<'_>,
    rtx_pt: u8,
    rtx_ssrc: u32,
    rtx_seq: u16,
    out: &mut Vec<u8>,
) -> Result<(), rtp_types::RtpWriteError> {
    out.clear();
    let osn = original.sequence_number().to_be_bytes();
    let builder = RtpPacketBuilder::<&[u8], &[u8]>::new()
        .payload_type(rtx_pt)
        .ssrc(rtx_ssrc)
        .sequence_number(rtx_seq)
        .timestamp(original.timestamp())
        .marker_bit(original.marker_bit())
        .payload(&osn[..])
        .payload(original.payload());
    builder.write_into_vec(out)
}

/// What a receiver or sender needs from one incoming RTCP compound packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcpEvent {
    /// A sender report: its SSRC and the middle 32 bits of its NTP timestamp
    /// (the LSR a receiver echoes back for RTT measurement, RFC 3550 §6.4.1).
    /// `ntp` is the sender's wallclock at RTP time `rtp_timestamp`.
    SenderReport { ssrc: u32, ntp: u64, ntp_middle: u32, rtp_timestamp: u32, packet_count: u32 },
    /// A report block about `media_ssrc`, from a RR or SR.
    ReportBlock { media_ssrc: u32, fraction_lost: u8, cumulative_lost: u32, jitter: u32, lsr: u32, dlsr: u32 },
    /// Generic NACK (RFC 4585 §6.2.1): sequence numbers the peer is missing.
    Nack { media_ssrc: u32, seqs: Vec<u16> },
    /// Picture loss indication (RFC 4585 §6.3.1).
    Pli { media_ssrc: u32 },
    /// Full intra request (RFC 5104 §4.3.1).
    Fir { media_ssrc: u32 },
    Bye { ssrcs: Vec<u32> },
    /// XR receiver reference time (RFC 3611 §4.4): a receiver's NTP clock,
    /// for the sender to echo in a DLRR.
    ReceiverReferenceTime { ssrc: u32, ntp: u64 },
    /// XR DLRR sub-block (RFC 3611 §4.5): the echo of receiver `ssrc`'s
    /// reference time (middle 32 bits) and how long it was held (1/65536 s).
    Dlrr { ssrc: u32, lrr: u32, dlrr: u32 },
    /// Temporary maximum media stream bit rate request (RFC 5104 §4.2.1),
    /// one per FCI entry: receiver `sender_ssrc` asks media sender
    /// `media_ssrc` to send at most `bitrate_bps` (packet overhead
    /// `overhead` bytes included in its figure).
    Tmmbr { sender_ssrc: u32, media_ssrc: u32, bitrate_bps: u64, overhead: u16 },
    /// Its acknowledgement (RFC 5104 §4.2.2), one per entry of the bounding
    /// set: the request of receiver `ssrc` that the sender now honours.
    Tmmbn { sender_ssrc: u32, ssrc: u32, bitrate_bps: u64, overhead: u16 },
    /// Receiver estimated maximum bit rate (REMB, draft-alvestrand-rmcat-remb
    /// §2.2): receiver `sender_ssrc` asks the senders of `ssrcs` to send at
    /// most `bitrate_bps` in all. Never acknowledged.
    Remb { sender_ssrc: u32, bitrate_bps: u64, ssrcs: Vec<u32> },
}

/// TMMBR (FMT 3) and TMMBN (FMT 4) share one FCI layout: 8-byte entries of
/// SSRC, then a 6-bit exponent, 17-bit mantissa and 9-bit overhead.
struct TmmbFci<'a, const FMT: u8>(&'a [u8]);

impl<'a, const FMT: u8> FciParser<'a> for TmmbFci<'a, FMT> {
    const PACKET_TYPE: FciFeedbackPacketType = FciFeedbackPacketType::TRANSPORT;
    const FCI_FORMAT: u8 = FMT;

    fn parse(data: &'a [u8]) -> Result<Self, RtcpParseError> {
        if data.is_empty() || !data.len().is_multiple_of(TMMB_ENTRY) {
            return Err(RtcpParseError::Truncated { expected: (data.len() / TMMB_ENTRY + 1) * TMMB_ENTRY, actual: data.len() });
        }
        Ok(Self(data))
    }
}

impl<const FMT: u8> TmmbFci<'_, FMT> {
    /// (SSRC, bit rate in bit/s, overhead in bytes) per entry.
    fn entries(&self) -> impl Iterator<Item = (u32, u64, u16)> + '_ {
        self.0.chunks_exact(TMMB_ENTRY).map(|e| {
            let ssrc = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
            let word = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
            (ssrc, tmmb_bitrate(word >> 26, (word >> 9) & 0x1_ffff), (word & 0x1ff) as u16)
        })
    }
}

const TMMB_ENTRY: usize = 8;
const TMMBR_FMT: u8 = 3;
const TMMBN_FMT: u8 = 4;

/// Packet overhead a TMMBR declares: IPv4 (20) + UDP (8) + RTP (12) bytes.
pub const TMMB_OVERHEAD: u16 = 40;

/// mantissa × 2^exp, saturating (an exponent up to 63 would overflow).
fn tmmb_bitrate(exp: u32, mantissa: u32) -> u64 {
    u64::try_from(u128::from(mantissa) << exp).unwrap_or(u64::MAX)
}

/// The (exponent, mantissa) that express `bitrate_bps` without exceeding it:
/// a maximum rounded down stays a maximum.
pub fn tmmb_encode(bitrate_bps: u64) -> (u32, u32) {
    let mut exp = 0;
    while (bitrate_bps >> exp) > 0x1_ffff {
        exp += 1;
    }
    (exp, (bitrate_bps >> exp) as u32)
}

/// The bit rate a TMMBR for `bitrate_bps` actually carries (rounded down
/// to what the 17-bit mantissa can say).
pub fn tmmb_representable(bitrate_bps: u64) -> u64 {
    let (exp, mantissa) = tmmb_encode(bitrate_bps);
    tmmb_bitrate(exp, mantissa)
}

fn write_tmmb_entry(out: &mut Vec<u8>, ssrc: u32, bitrate_bps: u64, overhead: u16) {
    let (exp, mantissa) = tmmb_encode(bitrate_bps);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(&((exp << 26) | (mantissa << 9) | u32::from(overhead & 0x1ff)).to_be_bytes());
}

/// Application layer feedback (PSFB FMT 15, RFC 4585 §6.4): its FCI as it
/// came, for [`parse_remb`] to read (REMB is one application's use of it).
struct AfbFci<'a>(&'a [u8]);

impl<'a> FciParser<'a> for AfbFci<'a> {
    const PACKET_TYPE: FciFeedbackPacketType = FciFeedbackPacketType::PAYLOAD;
    const FCI_FORMAT: u8 = AFB_FMT;

    fn parse(data: &'a [u8]) -> Result<Self, RtcpParseError> {
        Ok(Self(data))
    }
}

const AFB_FMT: u8 = 15;
const REMB_IDENTIFIER: [u8; 4] = *b"REMB";
/// Identifier, SSRC count and bit rate: the FCI before the SSRC list.
const REMB_FIXED: usize = 8;
const REMB_MAX_MANTISSA: u64 = 0x3_ffff;

/// A REMB's FCI, read without copying: the bit rate and the SSRCs it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RembFci<'a> {
    pub bitrate_bps: u64,
    ssrcs: &'a [u8],
}

impl RembFci<'_> {
    /// The media SSRCs the estimate applies to (its SSRC feedback list).
    pub fn ssrcs(&self) -> impl Iterator<Item = u32> + '_ {
        self.ssrcs.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// What is wrong with an application layer feedback FCI read as REMB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RembError {
    #[error("REMB FCI of {0} bytes is shorter than the 8 bytes of its identifier, SSRC count and bit rate")]
    Truncated(usize),
    #[error("application layer feedback identifier {0:?} is not \"REMB\"")]
    NotRemb([u8; 4]),
    #[error("REMB lists {count} SSRCs but its packet has room for {room}")]
    SsrcsBeyondPacket { count: u8, room: usize },
}

/// Reads a REMB FCI (the bytes after the media source SSRC): "REMB", Num
/// SSRC (8 bits), BR Exp (6 bits), BR Mantissa (18 bits), then Num SSRC
/// SSRCs. Bytes after the list (padding) are ignored.
pub fn parse_remb(fci: &[u8]) -> Result<RembFci<'_>, RembError> {
    if fci.len() < 4 {
        return Err(RembError::Truncated(fci.len()));
    }
    let identifier = [fci[0], fci[1], fci[2], fci[3]];
    if identifier != REMB_IDENTIFIER {
        return Err(RembError::NotRemb(identifier));
    }
    if fci.len() < REMB_FIXED {
        return Err(RembError::Truncated(fci.len()));
    }
    let count = fci[4];
    let word = u32::from_be_bytes([0, fci[5], fci[6], fci[7]]);
    let room = (fci.len() - REMB_FIXED) / 4;
    if usize::from(count) > room {
        return Err(RembError::SsrcsBeyondPacket { count, room });
    }
    Ok(RembFci {
        bitrate_bps: tmmb_bitrate(word >> 18, word & REMB_MAX_MANTISSA as u32),
        ssrcs: &fci[REMB_FIXED..REMB_FIXED + 4 * usize::from(count)],
    })
}

/// The (exponent, mantissa) of a REMB for `bitrate_bps`: the smallest
/// exponent whose 18-bit mantissa holds it, the mantissa rounded down, so
/// the estimate sent never exceeds the one meant.
pub fn remb_encode(bitrate_bps: u64) -> (u32, u32) {
    let mut exp = 0;
    while (bitrate_bps >> exp) > REMB_MAX_MANTISSA {
        exp += 1;
    }
    (exp, (bitrate_bps >> exp) as u32)
}

/// The bit rate a REMB for `bitrate_bps` actually carries.
pub fn remb_representable(bitrate_bps: u64) -> u64 {
    let (exp, mantissa) = remb_encode(bitrate_bps);
    tmmb_bitrate(exp, mantissa)
}

/// Appends a REMB (draft-alvestrand-rmcat-remb §2.2) from `sender_ssrc` to
/// a compound in `out`: at most `bitrate_bps` for the media of `ssrcs` (the
/// first 255). Its media source SSRC is 0, as the draft has it.
pub fn append_remb(out: &mut Vec<u8>, sender_ssrc: u32, bitrate_bps: u64, ssrcs: &[u32]) {
    let ssrcs = &ssrcs[..ssrcs.len().min(255)];
    let (exp, mantissa) = remb_encode(bitrate_bps);
    let start = begin_rtcp(out, AFB_FMT, 206);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&REMB_IDENTIFIER);
    out.extend_from_slice(&(((ssrcs.len() as u32) << 24) | (exp << 18) | mantissa).to_be_bytes());
    for ssrc in ssrcs {
        out.extend_from_slice(&ssrc.to_be_bytes());
    }
    end_rtcp(out, start);
}

/// Appends a TMMBN (RFC 5104 §4.2.2) to a compound already in `out`: the
/// sender `sender_ssrc` acknowledges receiver `requester`'s request for
/// `bitrate_bps`. An empty bounding set (no request in force) when
/// `requester` is `None`.
pub fn append_tmmbn(out: &mut Vec<u8>, sender_ssrc: u32, tuple: Option<(u32, u64, u16)>) {
    let start = begin_rtcp(out, TMMBN_FMT, 205);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    // Media source SSRC: not used, set to 0 (RFC 5104 §4.2.2.2).
    out.extend_from_slice(&0u32.to_be_bytes());
    if let Some((requester, bitrate_bps, overhead)) = tuple {
        write_tmmb_entry(out, requester, bitrate_bps, overhead);
    }
    end_rtcp(out, start);
}

/// Appends an RTCP BYE for `ssrc` (RFC 3550 6.6), to follow a report in
/// the compound a sender sends when it leaves.
pub fn append_bye(out: &mut Vec<u8>, ssrc: u32) {
    let start = begin_rtcp(out, 1, 203);
    out.extend_from_slice(&ssrc.to_be_bytes());
    end_rtcp(out, start);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed RTCP ({len} bytes): {reason}")]
pub struct RtcpError {
    pub len: usize,
    pub reason: String,
}

/// Parses one RTCP compound datagram into events, appending to `events`.
/// Unknown packet types are skipped; a malformed compound is an error.
pub fn parse_rtcp(datagram: &[u8], events: &mut Vec<RtcpEvent>) -> Result<(), RtcpError> {
    let err = |reason: String| RtcpError { len: datagram.len(), reason };
    let compound = Compound::parse(datagram).map_err(|e| err(format!("{e:?}")))?;
    for packet in compound {
        let packet = packet.map_err(|e| err(format!("{e:?}")))?;
        match packet {
            RtcpPacket::Sr(sr) => {
                events.push(RtcpEvent::SenderReport {
                    ssrc: sr.ssrc(),
                    ntp: sr.ntp_timestamp(),
                    ntp_middle: (sr.ntp_timestamp() >> 16) as u32,
                    rtp_timestamp: sr.rtp_timestamp(),
                    packet_count: sr.packet_count(),
                });
                for rb in sr.report_blocks() {
                    events.push(report_block_event(&rb));
                }
            }
            RtcpPacket::Rr(rr) => {
                for rb in rr.report_blocks() {
                    events.push(report_block_event(&rb));
                }
            }
            RtcpPacket::TransportFeedback(fb) => {
                if let Ok(nack) = fb.parse_fci::<Nack>() {
                    events.push(RtcpEvent::Nack { media_ssrc: fb.media_ssrc(), seqs: nack.entries().collect() });
                } else if let Ok(tmmbr) = fb.parse_fci::<TmmbFci<TMMBR_FMT>>() {
                    for (media_ssrc, bitrate_bps, overhead) in tmmbr.entries() {
                        events.push(RtcpEvent::Tmmbr { sender_ssrc: fb.sender_ssrc(), media_ssrc, bitrate_bps, overhead });
                    }
                } else if let Ok(tmmbn) = fb.parse_fci::<TmmbFci<TMMBN_FMT>>() {
                    for (ssrc, bitrate_bps, overhead) in tmmbn.entries() {
                        events.push(RtcpEvent::Tmmbn { sender_ssrc: fb.sender_ssrc(), ssrc, bitrate_bps, overhead });
                    }
                }
            }
            RtcpPacket::PayloadFeedback(fb) => {
                if fb.parse_fci::<Pli>().is_ok() {
                    events.push(RtcpEvent::Pli { media_ssrc: fb.media_ssrc() });
                } else if fb.parse_fci::<rtcp_types::Fir>().is_ok() {
                    events.push(RtcpEvent::Fir { media_ssrc: fb.media_ssrc() });
                } else if let Ok(afb) = fb.parse_fci::<AfbFci>() {
                    match parse_remb(afb.0) {
                        Ok(remb) => events.push(RtcpEvent::Remb {
                            sender_ssrc: fb.sender_ssrc(),
                            bitrate_bps: remb.bitrate_bps,
                            ssrcs: remb.ssrcs().collect(),
                        }),
                        // Another application's feedback: not ours to read.
                        Err(RembError::NotRemb(_)) => {}
                        Err(e) => return Err(err(format!("REMB from SSRC {:#010x}: {e}", fb.sender_ssrc()))),
                    }
                }
            }
            RtcpPacket::Bye(bye) => events.push(RtcpEvent::Bye { ssrcs: bye.ssrcs().collect() }),
            RtcpPacket::Xr(xr) => {
                for block in xr.block_iter() {
                    if let Ok(rrtr) = block.parse_into::<rtcp_types::ReceiverReferenceTime>() {
                        events.push(RtcpEvent::ReceiverReferenceTime { ssrc: xr.sender_ssrc(), ntp: rrtr.ntp_timestamp() });
                    } else if let Ok(dlrr) = block.parse_into::<rtcp_types::DelaySinceLastReceiverReport>() {
                        for b in dlrr.block_iter() {
                            events.push(RtcpEvent::Dlrr {
                                ssrc: b.ssrc(),
                                lrr: b.last_receiver_report(),
                                dlrr: b.delay_since_last_receiver_report_timestamp(),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn report_block_event(rb: &ReportBlock<'_>) -> RtcpEvent {
    RtcpEvent::ReportBlock {
        media_ssrc: rb.ssrc(),
        fraction_lost: rb.fraction_lost(),
        cumulative_lost: rb.cumulative_lost(),
        jitter: rb.interarrival_jitter(),
        lsr: rb.last_sender_report_timestamp(),
        dlsr: rb.delay_since_last_sender_report_timestamp(),
    }
}

/// The receiver's view of one media source, written into a report block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceptionReport {
    pub media_ssrc: u32,
    pub fraction_lost: u8,
    pub cumulative_lost: u32,
    pub extended_highest_seq: u32,
    pub jitter: u32,
    pub lsr: u32,
    pub dlsr: u32,
}

/// What one outgoing receiver RTCP compound carries besides the mandatory RR
/// and SDES CNAME (RFC 3550 §6.1 requires both in every compound; GStreamer's
/// rtpsession drops a compound that does not start with SR or RR).
#[derive(Debug, Default)]
pub struct ReceiverFeedback<'a> {
    pub report: Option<ReceptionReport>,
    /// Lost sequence numbers to request, for `report.media_ssrc` / `media_ssrc`.
    pub nacks: &'a [u16],
    pub pli: bool,
    pub media_ssrc: u32,
    /// An XR receiver reference time block (RFC 3611 §4.4) with this NTP
    /// timestamp: a sender that answers with DLRR lets us time the round trip.
    pub rrtr_ntp: Option<u64>,
    /// A TMMBR (RFC 5104 §4.2.1) asking `media_ssrc` to send at most this
    /// many bits per second.
    pub tmmbr_bps: Option<u64>,
    /// A REMB (draft-alvestrand-rmcat-remb) asking `media_ssrc`'s sender
    /// for at most this many bits per second.
    pub remb_bps: Option<u64>,
}

/// Most sequence numbers one receiver compound asks for: at most that many
/// NACK FCI entries (4 bytes each) keep it within one datagram. The jitter
/// buffer hands out no more per round; the writer stops there too.
pub const MAX_NACKS_PER_COMPOUND: usize = 300;

/// Writes a receiver RTCP compound into `out` and returns its length: RR
/// (RFC 3550 §6.4.2), SDES CNAME (§6.5), Generic NACK (RFC 4585 §6.2.1), PLI
/// (§6.3.1), TMMBR (RFC 5104 §4.2.1), REMB, XR RRTR. Written by hand into the caller's buffer: this runs for every
/// loss and must not allocate once `out` has grown to a datagram.
pub fn write_receiver_rtcp(
    sender_ssrc: u32,
    cname: &str,
    feedback: &ReceiverFeedback<'_>,
    out: &mut Vec<u8>,
) -> Result<usize, RtcpError> {
    if cname.len() > 255 {
        return Err(RtcpError { len: 0, reason: format!("CNAME of {} bytes exceeds 255", cname.len()) });
    }
    out.clear();
    // RR with zero or one report block.
    let start = begin_rtcp(out, feedback.report.is_some() as u8, 201);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    if let Some(r) = feedback.report {
        out.extend_from_slice(&r.media_ssrc.to_be_bytes());
        out.push(r.fraction_lost);
        out.extend_from_slice(&r.cumulative_lost.min(0x7f_ffff).to_be_bytes()[1..]);
        out.extend_from_slice(&r.extended_highest_seq.to_be_bytes());
        out.extend_from_slice(&r.jitter.to_be_bytes());
        out.extend_from_slice(&r.lsr.to_be_bytes());
        out.extend_from_slice(&r.dlsr.to_be_bytes());
    }
    end_rtcp(out, start);
    // SDES: one chunk, CNAME, then the null terminator padded to 32 bits.
    let start = begin_rtcp(out, 1, 202);
    out.extend_from_slice(&sender_ssrc.to_be_bytes());
    out.push(1);
    out.push(cname.len() as u8);
    out.extend_from_slice(cname.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    end_rtcp(out, start);
    if !feedback.nacks.is_empty() {
        let start = begin_rtcp(out, 1, 205);
        out.extend_from_slice(&sender_ssrc.to_be_bytes());
        out.extend_from_slice(&feedback.media_ssrc.to_be_bytes());
        // (PID, BLP) pairs: a PID and a bitmask of the 16 numbers after it.
        let mut fci: Option<(u16, u16)> = None;
        let mut entries = 0;
        for &seq in feedback.nacks {
            if let Some((pid, blp)) = &mut fci {
                let d = seq.wrapping_sub(*pid);
                if (1..=16).contains(&d) {
                    *blp |= 1 << (d - 1);
                    continue;
                }
                if d == 0 {
                    continue;
                }
                out.extend_from_slice(&pid.to_be_bytes());
                out.extend_from_slice(&blp.to_be_bytes());
                entries += 1;
                if entries == MAX_NACKS_PER_COMPOUND {
                    fci = None;
                    break;
                }
            }
            fci = Some((seq, 0));
        }
        if let Some((pid, blp)) = fci {
            out.extend_from_slice(&pid.to_be_bytes());
            out.extend_from_slice(&blp.to_be_bytes());
        }
        end_rtcp(out, start);
    }
    if feedback.pli {
        let start = begin_rtcp(out, 1, 206);
        out.extend_from_slice(&sender_ssrc.to_be_bytes());
        out.extend_from_slice(&feedback.media_ssrc.to_be_bytes());
        end_rtcp(out, start);
    }
    if let Some(bitrate_bps) = feedback.tmmbr_bps {
        let start = begin_rtcp(out, TMMBR_FMT, 205);
        out.extend_from_slice(&sender_ssrc.to_be_bytes());
        // Media source SSRC: not used, set to 0 (RFC 5104 §4.2.1.2); the
        // entry names the media sender.
        out.extend_from_slice(&0u32.to_be_bytes());
        write_tmmb_entry(out, feedback.media_ssrc, bitrate_bps, TMMB_OVERHEAD);
        end_rtcp(out, start);
    }
    if let Some(bitrate_bps) = feedback.remb_bps {
        append_remb(out, sender_ssrc, bitrate_bps, &[feedback.media_ssrc]);
    }
    if let Some(ntp) = feedback.rrtr_ntp {
        let start = begin_rtcp(out, 0, 207);
        out.extend_from_slice(&sender_ssrc.to_be_bytes());
        // Block type 4, reserved, block length 2 (words after the header).
        out.extend_from_slice(&[4, 0, 0, 2]);
        out.extend_from_slice(&ntp.to_be_bytes());
        end_rtcp(out, start);
    }
    Ok(out.len())
}

/// Starts an RTCP packet (version 2, no padding, `count` = RC/SC/FMT) and
/// returns where it begins; `end_rtcp` fills in its length.
fn begin_rtcp(out: &mut Vec<u8>, count: u8, packet_type: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0x80 | (count & 0x1f), packet_type, 0, 0]);
    start
}

fn end_rtcp(out: &mut [u8], start: usize) {
    let words = ((out.len() - start) / 4 - 1) as u16;
    out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
}

/// What a sender report says besides who sends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderReportInfo {
    pub ntp_timestamp: u64,
    pub rtp_timestamp: u32,
    pub packet_count: u32,
    pub octet_count: u32,
    /// An XR DLRR sub-block: (receiver SSRC, its last reference time's middle
    /// 32 bits, delay since it came in 1/65536 s).
    pub dlrr: Option<(u32, u32, u32)>,
}

/// Writes a sender report (with SDES CNAME, and XR DLRR when given) into
/// `out`; used by the test sender.
pub fn write_sender_rtcp(ssrc: u32, cname: &str, info: &SenderReportInfo, out: &mut Vec<u8>) -> Result<usize, RtcpError> {
    let SenderReportInfo { ntp_timestamp, rtp_timestamp, packet_count, octet_count, dlrr } = *info;
    let sr = rtcp_types::SenderReport::builder(ssrc)
        .ntp_timestamp(ntp_timestamp)
        .rtp_timestamp(rtp_timestamp)
        .packet_count(packet_count)
        .octet_count(octet_count);
    let sdes = Sdes::builder().add_chunk(SdesChunk::builder(ssrc).add_item(SdesItem::builder(SdesItem::CNAME, cname)));
    let mut compound = CompoundBuilder::default().add_packet(sr).add_packet(sdes);
    // DLRR (RFC 3611 §4.5): the receiver's last reference time, and how long
    // ago it came, so the receiver can time the round trip.
    if let Some((receiver, lrr, delay)) = dlrr {
        compound = compound.add_packet(rtcp_types::Xr::builder().sender_ssrc(ssrc).add_block(
            rtcp_types::DelaySinceLastReceiverReport::builder().add_block(
                rtcp_types::DelaySinceLastReceiverReportBlock::builder()
                    .ssrc(receiver)
                    .last_receiver_report(lrr)
                    .delay_since_last_receiver_report_timestamp(delay),
            ),
        ));
    }
    write_compound(compound, out)
}

fn write_compound(compound: CompoundBuilder<'_>, out: &mut Vec<u8>) -> Result<usize, RtcpError> {
    let size = compound.calculate_size().map_err(|e| RtcpError { len: 0, reason: format!("{e:?}") })?;
    out.clear();
    out.resize(size, 0);
    compound.write_into(out).map_err(|e| RtcpError { len: size, reason: format!("{e:?}") })
}

/// NTP timestamp (RFC 3550 §4: seconds since 1900 in the high 32 bits) for a
/// wall-clock time.
/// Seconds since the UNIX epoch of a 64-bit NTP timestamp (RFC 5905; era
/// 0, until 2036).
pub fn ntp_to_unix_seconds(ntp: u64) -> f64 {
    const UNIX_TO_NTP: f64 = 2_208_988_800.0;
    (ntp >> 32) as f64 - UNIX_TO_NTP + (ntp & 0xFFFF_FFFF) as f64 / 4_294_967_296.0
}

pub fn ntp_timestamp(now: std::time::SystemTime) -> u64 {
    const UNIX_TO_NTP: u64 = 2_208_988_800;
    let d = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + UNIX_TO_NTP;
    let frac = ((d.subsec_nanos() as u64) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Extends 16-bit RTP sequence numbers to a monotonic 64-bit index, tolerating
/// reordering within half the sequence space (RFC 3550 Appendix A.1).
#[derive(Debug, Clone, Default)]
pub struct SeqExtender {
    highest: Option<u64>,
}

impl SeqExtender {
    pub fn extend(&mut self, seq: u16) -> u64 {
        let Some(highest) = self.highest else {
            // Start one cycle up so that packets reordered before the first one
            // still get a positive index.
            let ext = (1u64 << 16) | seq as u64;
            self.highest = Some(ext);
            return ext;
        };
        let delta = seq.wrapping_sub(highest as u16) as i16 as i64;
        let ext = (highest as i64 + delta).max(0) as u64;
        if ext > highest {
            self.highest = Some(ext);
        }
        ext
    }

    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmmbr_and_tmmbn_round_trip_through_our_writer_and_parser() {
        let fb = ReceiverFeedback { media_ssrc: 0xabcd, tmmbr_bps: Some(1_500_000), ..Default::default() };
        let mut out = Vec::new();
        write_receiver_rtcp(7, "rx", &fb, &mut out).unwrap();
        append_tmmbn(&mut out, 0xabcd, Some((7, 1_500_000, TMMB_OVERHEAD)));
        let mut events = Vec::new();
        parse_rtcp(&out, &mut events).unwrap();
        let want = tmmb_representable(1_500_000);
        assert!(want <= 1_500_000 && want > 1_499_000, "{want}");
        assert!(events.contains(&RtcpEvent::Tmmbr { sender_ssrc: 7, media_ssrc: 0xabcd, bitrate_bps: want, overhead: TMMB_OVERHEAD }));
        assert!(events.contains(&RtcpEvent::Tmmbn { sender_ssrc: 0xabcd, ssrc: 7, bitrate_bps: want, overhead: TMMB_OVERHEAD }));
    }

    #[test]
    fn tmmbr_bit_rates_are_rounded_down_and_huge_exponents_saturate() {
        assert_eq!(tmmb_encode(100_000), (0, 100_000));
        assert_eq!(tmmb_encode(0x1_ffff), (0, 0x1_ffff));
        assert_eq!(tmmb_encode(0x2_0001), (1, 0x1_0000));
        assert_eq!(tmmb_representable(0x2_0001), 0x2_0000);
        assert_eq!(tmmb_bitrate(63, 0x1_ffff), u64::MAX);
        let (exp, mantissa) = tmmb_encode(u64::MAX);
        assert_eq!(tmmb_bitrate(exp, mantissa) >> exp, u64::from(mantissa));
    }

    #[test]
    fn an_empty_tmmbn_and_a_truncated_tmmbr_yield_no_entries_and_no_panic() {
        let mut out = Vec::new();
        write_receiver_rtcp(7, "rx", &ReceiverFeedback::default(), &mut out).unwrap();
        append_tmmbn(&mut out, 9, None);
        let mut events = Vec::new();
        parse_rtcp(&out, &mut events).unwrap();
        assert!(!events.iter().any(|e| matches!(e, RtcpEvent::Tmmbn { .. })));
        // A TMMBR whose FCI is 4 bytes, not 8.
        let mut bad = Vec::new();
        write_receiver_rtcp(7, "rx", &ReceiverFeedback::default(), &mut bad).unwrap();
        bad.extend_from_slice(&[0x83, 205, 0, 3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1]);
        events.clear();
        let _ = parse_rtcp(&bad, &mut events);
        assert!(!events.iter().any(|e| matches!(e, RtcpEvent::Tmmbr { .. })));
    }

    /// libwebrtc's REMB test packet (`rtcp_packet/remb_unittest.cc`): sender
    /// 0x12345678, three SSRCs, BR Exp 1 and Mantissa 0x3fb93 (522,022 bit/s).
    const LIBWEBRTC_REMB: [u8; 32] = [
        0x8f, 206, 0x00, 0x07, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, b'R', b'E', b'M', b'B', //
        0x03, 0x07, 0xfb, 0x93, 0x23, 0x45, 0x67, 0x89, 0x23, 0x45, 0x67, 0x8a, 0x23, 0x45, 0x67, 0x8b,
    ];

    #[test]
    fn remb_is_written_and_read_bit_for_bit_as_libwebrtc_does() {
        let mut out = Vec::new();
        append_remb(&mut out, 0x1234_5678, 522_022, &[0x2345_6789, 0x2345_678a, 0x2345_678b]);
        assert_eq!(out, LIBWEBRTC_REMB);
        let mut events = Vec::new();
        parse_rtcp(&LIBWEBRTC_REMB, &mut events).unwrap();
        assert_eq!(
            events,
            [RtcpEvent::Remb { sender_ssrc: 0x1234_5678, bitrate_bps: 522_022, ssrcs: vec![0x2345_6789, 0x2345_678a, 0x2345_678b] }]
        );
        // mediasoup's test packet: two SSRCs, BR Exp 0, Mantissa 122754.
        let mediasoup = [
            0x8f, 0xce, 0x00, 0x06, 0xfa, 0x17, 0xfa, 0x17, 0, 0, 0, 0, 0x52, 0x45, 0x4d, 0x42, //
            0x02, 0x01, 0xdf, 0x82, 0x02, 0xd0, 0x37, 0x02, 0x04, 0xa7, 0x67, 0x47,
        ];
        events.clear();
        parse_rtcp(&mediasoup, &mut events).unwrap();
        assert_eq!(events, [RtcpEvent::Remb { sender_ssrc: 0xfa17_fa17, bitrate_bps: 122_754, ssrcs: vec![0x02d0_3702, 0x04a7_6747] }]);
    }

    #[test]
    fn our_receivers_remb_names_the_media_ssrc_and_carries_no_media_source() {
        let fb = ReceiverFeedback { media_ssrc: 0xabcd, remb_bps: Some(300_000), ..Default::default() };
        let mut out = Vec::new();
        write_receiver_rtcp(7, "rx", &fb, &mut out).unwrap();
        // 300,000 = 150,000 × 2^1: Exp 1 (0x06 holds Exp << 2 and the
        // mantissa's top two bits), Mantissa 0x249f0.
        let remb = [0x8f, 206, 0, 5, 0, 0, 0, 7, 0, 0, 0, 0, b'R', b'E', b'M', b'B', 0x01, 0x06, 0x49, 0xf0, 0, 0, 0xab, 0xcd];
        assert_eq!(out[out.len() - remb.len()..], remb);
        let mut events = Vec::new();
        parse_rtcp(&out, &mut events).unwrap();
        assert!(events.contains(&RtcpEvent::Remb { sender_ssrc: 7, bitrate_bps: 300_000, ssrcs: vec![0xabcd] }));
        assert!(!events.iter().any(|e| matches!(e, RtcpEvent::Tmmbr { .. })));
    }

    #[test]
    fn remb_bit_rates_take_the_smallest_exponent_and_round_down() {
        assert_eq!(remb_encode(0), (0, 0));
        assert_eq!(remb_encode(0x3_ffff), (0, 0x3_ffff), "the largest mantissa at exponent 0");
        assert_eq!(remb_encode(0x4_0000), (1, 0x2_0000));
        assert_eq!(remb_encode(1_500_000), (3, 187_500));
        assert_eq!(remb_representable(1_500_000), 1_500_000);
        // 1,000,003 / 4 = 250,000.75: rounding to nearest would say 1,000,004,
        // above what was meant.
        assert_eq!(remb_encode(1_000_003), (2, 250_000));
        assert_eq!(remb_representable(1_000_003), 1_000_000);
        assert_eq!(remb_encode(u64::MAX), (46, 0x3_ffff));
        assert!(remb_representable(u64::MAX) <= u64::MAX);
    }

    #[test]
    fn malformed_remb_is_an_error_naming_its_fault_and_other_feedback_is_skipped() {
        assert_eq!(parse_remb(b"RE"), Err(RembError::Truncated(2)));
        assert_eq!(parse_remb(b"REMB\x01\x06"), Err(RembError::Truncated(6)));
        assert_eq!(parse_remb(b"ABCD\x00\x00\x00\x00"), Err(RembError::NotRemb(*b"ABCD")));
        assert_eq!(
            parse_remb(b"REMB\x02\x06\x49\xf0\x00\x00\xab\xcd"),
            Err(RembError::SsrcsBeyondPacket { count: 2, room: 1 })
        );
        let remb = parse_remb(b"REMB\x01\x06\x49\xf0\x00\x00\xab\xcd\x00\x00\x00\x00").unwrap();
        assert_eq!((remb.bitrate_bps, remb.ssrcs().collect::<Vec<_>>()), (300_000, vec![0xabcd]), "padding after the list is ignored");

        let mut rr = Vec::new();
        write_receiver_rtcp(7, "rx", &ReceiverFeedback::default(), &mut rr).unwrap();
        // Num SSRC 3, room for 1.
        let mut bad = rr.clone();
        bad.extend_from_slice(&[0x8f, 206, 0, 5, 0, 0, 0, 7, 0, 0, 0, 0, b'R', b'E', b'M', b'B', 3, 0x06, 0x49, 0xf0, 0, 0, 0xab, 0xcd]);
        let mut events = Vec::new();
        let e = parse_rtcp(&bad, &mut events).unwrap_err();
        assert!(e.reason.contains("REMB from SSRC 0x00000007") && e.reason.contains("lists 3 SSRCs"), "{e}");
        // An FCI too short for the bit rate.
        let mut bad = rr.clone();
        bad.extend_from_slice(&[0x8f, 206, 0, 3, 0, 0, 0, 7, 0, 0, 0, 0, b'R', b'E', b'M', b'B']);
        let e = parse_rtcp(&bad, &mut events).unwrap_err();
        assert!(e.reason.contains("REMB FCI of 4 bytes is shorter"), "{e}");
        // Application layer feedback of another kind is not an error.
        let mut other = rr.clone();
        other.extend_from_slice(&[0x8f, 206, 0, 4, 0, 0, 0, 7, 0, 0, 0, 0, b'A', b'B', b'C', b'D', 0, 0, 0, 0]);
        events.clear();
        parse_rtcp(&other, &mut events).unwrap();
        assert!(!events.iter().any(|e| matches!(e, RtcpEvent::Remb { .. })));
    }

    fn rtp(seq: u16, pt: u8, payload: &[u8]) -> Vec<u8> {
        RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(pt)
            .sequence_number(seq)
            .timestamp(1234)
            .ssrc(0xdead_beef)
            .marker_bit(true)
            .payload(payload)
            .write_vec()
            .unwrap()
    }

    #[test]
    fn rtx_round_trip_restores_sequence_and_payload() {
        let original = rtp(4242, 96, b"nal unit bytes");
        let parsed = RtpPacket::parse(&original).unwrap();
        let mut out = Vec::new();
        write_rtx(&parsed, 97, 0x1111, 7, &mut out).unwrap();
        let rtx = RtpPacket::parse(&out).unwrap();
        assert_eq!(rtx.payload_type(), 97);
        assert_eq!(rtx.ssrc(), 0x1111);
        assert_eq!(rtx.timestamp(), 1234);
        let inner = parse_rtx(rtx.payload()).unwrap();
        assert_eq!(inner.original_seq, 4242);
        assert_eq!(inner.payload, b"nal unit bytes");
    }

    #[test]
    fn truncated_rtx_is_an_error() {
        assert_eq!(parse_rtx(&[1]), Err(RtxError::Truncated(1)));
    }

    #[test]
    fn receiver_rtcp_carries_rr_sdes_nack_and_pli() {
        let mut out = Vec::new();
        let nacks = [10u16, 11, 12, 40, 65535, 0];
        let fb = ReceiverFeedback {
            report: Some(ReceptionReport { media_ssrc: 5, extended_highest_seq: 99, jitter: 3, ..Default::default() }),
            nacks: &nacks,
            pli: true,
            media_ssrc: 5,
            rrtr_ntp: Some(0x0102_0304_0506_0708),
            tmmbr_bps: None,
            remb_bps: None,
        };
        write_receiver_rtcp(1, "zerodrop@test", &fb, &mut out).unwrap();
        assert!(is_rtcp(&out));
        let mut events = Vec::new();
        parse_rtcp(&out, &mut events).unwrap();
        let mut seqs: Vec<u16> = events
            .iter()
            .find_map(|e| match e {
                RtcpEvent::Nack { media_ssrc: 5, seqs } => Some(seqs.clone()),
                _ => None,
            })
            .expect("NACK present");
        seqs.sort_unstable();
        let mut want = nacks.to_vec();
        want.sort_unstable();
        assert_eq!(seqs, want);
        assert!(events.contains(&RtcpEvent::Pli { media_ssrc: 5 }));
        assert!(events.contains(&RtcpEvent::ReceiverReferenceTime { ssrc: 1, ntp: 0x0102_0304_0506_0708 }));
        assert!(events.iter().any(|e| matches!(e, RtcpEvent::ReportBlock { media_ssrc: 5, jitter: 3, .. })));
    }

    #[test]
    fn sender_report_exposes_lsr_middle_bits() {
        let mut out = Vec::new();
        write_sender_rtcp(
            9,
            "s",
            &SenderReportInfo {
                ntp_timestamp: 0x0123_4567_89ab_cdef,
                rtp_timestamp: 90_000,
                packet_count: 10,
                octet_count: 1000,
                dlrr: Some((5, 0x1234_5678, 65536)),
            },
            &mut out,
        ).unwrap();
        let mut events = Vec::new();
        parse_rtcp(&out, &mut events).unwrap();
        assert!(events.contains(&RtcpEvent::SenderReport {
            ssrc: 9,
            ntp: 0x0123_4567_89ab_cdef,
            ntp_middle: 0x4567_89ab,
            rtp_timestamp: 90_000,
            packet_count: 10
        }));
        assert!(events.contains(&RtcpEvent::Dlrr { ssrc: 5, lrr: 0x1234_5678, dlrr: 65536 }));
    }

    #[test]
    fn rtp_is_not_mistaken_for_rtcp() {
        assert!(!is_rtcp(&rtp(1, 96, b"x")));
        assert!(!is_rtcp(&rtp(1, 127, b"x")));
    }

    #[test]
    fn sequence_extender_handles_wrap_and_reorder() {
        let mut ext = SeqExtender::default();
        let a = ext.extend(65534);
        let b = ext.extend(65535);
        let c = ext.extend(1);
        let d = ext.extend(0);
        assert_eq!(b, a + 1);
        assert_eq!(c, a + 3);
        assert_eq!(d, a + 2);
        assert_eq!(ext.highest(), Some(c));
    }

    proptest::proptest! {
        #[test]
        fn random_datagrams_never_panic_any_parser(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1500)) {
            let mut events = Vec::new();
            if let Ok(p) = RtpPacket::parse(&data) {
                let _ = parse_rtx(p.payload());
                let mut out = Vec::new();
                let _ = write_rtx(&p, 97, 1, 1, &mut out);
            }
            let _ = parse_rtcp(&data, &mut events);
            let _ = is_rtcp(&data);
            let _ = crate::depay::au::annexb_digest(&data);
        }

        #[test]
        fn remb_round_trips_any_bit_rate_rounded_down(
            bitrate in proptest::prelude::any::<u64>(),
            ssrcs in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..40),
        ) {
            let mut out = Vec::new();
            append_remb(&mut out, 9, bitrate, &ssrcs);
            let mut events = Vec::new();
            parse_rtcp(&out, &mut events).unwrap();
            let sent = remb_representable(bitrate);
            let (exp, _) = remb_encode(bitrate);
            proptest::prop_assert!(sent <= bitrate && bitrate - sent < 1u64 << exp);
            proptest::prop_assert_eq!(events, vec![RtcpEvent::Remb { sender_ssrc: 9, bitrate_bps: sent, ssrcs }]);
        }

        #[test]
        fn rtcp_with_random_nack_lists_round_trips(seqs in proptest::collection::vec(proptest::prelude::any::<u16>(), 1..200)) {
            let mut out = Vec::new();
            let fb = ReceiverFeedback { report: None, nacks: &seqs, pli: false, media_ssrc: 3, rrtr_ntp: None, tmmbr_bps: None, remb_bps: None };
            write_receiver_rtcp(1, "c", &fb, &mut out).unwrap();
            let mut events = Vec::new();
            parse_rtcp(&out, &mut events).unwrap();
            let mut got: Vec<u16> = events.iter().flat_map(|e| match e {
                RtcpEvent::Nack { seqs, .. } => seqs.clone(),
                _ => vec![],
            }).collect();
            let mut want = seqs.clone();
            got.sort_unstable(); got.dedup();
            want.sort_unstable(); want.dedup();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut events = Vec::new();
        for len in 0..64usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = RtpPacket::parse(&data);
            let _ = parse_rtcp(&data, &mut events);
            let _ = parse_rtx(&data);
        }
    }
}
