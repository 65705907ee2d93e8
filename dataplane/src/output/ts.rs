//! MPEG-TS muxing of one video elementary stream, for HLS segments.
//!
//! The packet encoding (PAT, PMT, PES headers, adaptation fields, CRCs) is
//! the `mpeg2ts` crate's; this module decides what goes in which packet: the
//! tables at the start of every segment (so each segment decodes on its own),
//! one PES packet per access unit starting in a fresh TS packet, a PCR on the
//! first packet of every access unit (well inside the 100 ms the standard
//! allows between PCRs at any frame rate above 10/s), and the random access
//! flag on keyframes. Writing is into a `Vec<u8>`: a segment is built in
//! memory and published whole.

use mpeg2ts::es::{StreamId, StreamType};
use mpeg2ts::pes::PesHeader;
use mpeg2ts::time::{ClockReference, Timestamp};
use mpeg2ts::ts::payload::{Bytes, Pat, Pes, Pmt};
use mpeg2ts::ts::{
    AdaptationField, ContinuityCounter, EsInfo, Pid, ProgramAssociation, TransportScramblingControl, TsHeader,
    TsPacket, TsPacketWriter, TsPayload, VersionNumber, WriteTsPacket,
};
use zerodrop_core::Codec;

/// PID of the program map table.
pub const PMT_PID: u16 = 0x1000;
/// PID of the video elementary stream (and of the PCR).
pub const VIDEO_PID: u16 = 0x0100;
/// TS timestamps start here rather than at 0, so that the PCR, which runs a
/// little ahead of the first PTS, never has to be negative.
pub const TIMESTAMP_ORIGIN: u64 = 90_000;
/// How far the PCR runs ahead of an access unit's PTS: the decoder's buffer
/// delay the player is told to allow (100 ms).
const PCR_LEAD_90K: u64 = 9_000;
/// 33-bit PTS wrap.
const PTS_MODULO: u64 = 1 << 33;

/// Bytes a PES header with a PTS and no DTS takes.
const PES_HEADER_WITH_PTS: usize = 14;
/// Bytes an adaptation field carrying only a PCR takes (length, flags, PCR).
const ADAPTATION_WITH_PCR: usize = 8;
const TS_PAYLOAD: usize = TsPacket::SIZE - 4;

/// Access unit delimiters, which Apple's HLS rules ask for at the start of
/// every H.264/H.265 access unit in MPEG-TS.
const AUD_H264: [u8; 6] = [0, 0, 0, 1, 0x09, 0xF0];
const AUD_H265: [u8; 7] = [0, 0, 0, 1, 0x46, 0x01, 0x50];

/// Continuity counters and codec of one TS stream. Errors from the crate can
/// only come from values this module computes, so they are bugs: they are
/// reported, and the access unit is left out of the segment.
pub struct TsMuxer {
    codec: Codec,
    pat_cc: ContinuityCounter,
    pmt_cc: ContinuityCounter,
    video_cc: ContinuityCounter,
}

impl TsMuxer {
    pub fn new(codec: Codec) -> Self {
        Self { codec, pat_cc: ContinuityCounter::new(), pmt_cc: ContinuityCounter::new(), video_cc: ContinuityCounter::new() }
    }

    /// The PAT and PMT, which every segment starts with.
    pub fn write_tables(&mut self, out: &mut Vec<u8>) -> mpeg2ts::Result<()> {
        let pat = TsPayload::Pat(Pat {
            transport_stream_id: 1,
            version_number: VersionNumber::new(),
            table: vec![ProgramAssociation { program_num: 1, program_map_pid: Pid::new(PMT_PID)? }],
        });
        let stream_type = match self.codec {
            Codec::H264 => StreamType::H264,
            Codec::H265 => StreamType::H265,
        };
        let pmt = TsPayload::Pmt(Pmt {
            program_num: 1,
            pcr_pid: Some(Pid::new(VIDEO_PID)?),
            version_number: VersionNumber::new(),
            program_info: vec![],
            es_info: vec![EsInfo { stream_type, elementary_pid: Pid::new(VIDEO_PID)?, descriptors: vec![] }],
        });
        let mut w = TsPacketWriter::new(out);
        w.write_ts_packet(&packet(0, &mut self.pat_cc, None, Some(pat))?)?;
        w.write_ts_packet(&packet(PMT_PID, &mut self.pmt_cc, None, Some(pmt))?)?;
        Ok(())
    }

    /// One access unit (Annex B) presented at `pts_90k` (90 kHz, from
    /// [`TIMESTAMP_ORIGIN`] on, any width: it is wrapped to 33 bits here).
    pub fn write_access_unit(&mut self, out: &mut Vec<u8>, annexb: &[u8], pts_90k: u64, keyframe: bool) -> mpeg2ts::Result<()> {
        let aud: &[u8] = match self.codec {
            Codec::H264 if !starts_with_nal(annexb, |h| h & 0x1F == 9) => &AUD_H264,
            Codec::H265 if !starts_with_nal(annexb, |h| (h >> 1) & 0x3F == 35) => &AUD_H265,
            _ => &[],
        };
        let pts = pts_90k % PTS_MODULO;
        let pcr = (pts_90k.saturating_sub(PCR_LEAD_90K) % PTS_MODULO) * 300;
        let header = PesHeader {
            stream_id: StreamId::new_video(StreamId::VIDEO_MIN)?,
            priority: false,
            data_alignment_indicator: true,
            copyright: false,
            original_or_copy: false,
            pts: Some(Timestamp::new(pts)?),
            dts: None,
            escr: None,
        };
        let adaptation = AdaptationField {
            discontinuity_indicator: false,
            random_access_indicator: keyframe,
            es_priority_indicator: false,
            pcr: Some(ClockReference::new(pcr)?),
            opcr: None,
            splice_countdown: None,
            transport_private_data: vec![],
            extension: None,
        };
        // The elementary stream is the delimiter (when the unit lacks one)
        // followed by the unit; it is cut into TS payloads without copying
        // the unit into one buffer first.
        let total = aud.len() + annexb.len();
        let mut chunk = [0u8; TS_PAYLOAD];
        let mut written = 0;
        let mut w = TsPacketWriter::new(out);
        let first = (TS_PAYLOAD - ADAPTATION_WITH_PCR - PES_HEADER_WITH_PTS).min(total);
        gather(aud, annexb, 0, &mut chunk[..first]);
        let pes = TsPayload::PesStart(Pes { header, pes_packet_len: 0, data: Bytes::new(&chunk[..first])? });
        w.write_ts_packet(&packet(VIDEO_PID, &mut self.video_cc, Some(adaptation), Some(pes))?)?;
        written += first;
        while written < total {
            let n = TS_PAYLOAD.min(total - written);
            gather(aud, annexb, written, &mut chunk[..n]);
            let payload = TsPayload::PesContinuation(Bytes::new(&chunk[..n])?);
            w.write_ts_packet(&packet(VIDEO_PID, &mut self.video_cc, None, Some(payload))?)?;
            written += n;
        }
        Ok(())
    }
}

fn packet(pid: u16, cc: &mut ContinuityCounter, adaptation_field: Option<AdaptationField>, payload: Option<TsPayload>) -> mpeg2ts::Result<TsPacket> {
    let header = TsHeader {
        transport_error_indicator: false,
        transport_priority: false,
        pid: Pid::new(pid)?,
        transport_scrambling_control: TransportScramblingControl::NotScrambled,
        continuity_counter: *cc,
    };
    cc.increment();
    Ok(TsPacket { header, adaptation_field, payload })
}

/// Copies `out.len()` bytes of `a` followed by `b`, from `offset` on.
fn gather(a: &[u8], b: &[u8], offset: usize, out: &mut [u8]) {
    let mut pos = offset;
    for byte in out.iter_mut() {
        *byte = if pos < a.len() { a[pos] } else { b[pos - a.len()] };
        pos += 1;
    }
}

/// Whether the first NAL unit of `annexb` has a header byte `is`.
fn starts_with_nal(annexb: &[u8], is: impl Fn(u8) -> bool) -> bool {
    let start = if annexb.starts_with(&[0, 0, 0, 1]) {
        4
    } else if annexb.starts_with(&[0, 0, 1]) {
        3
    } else {
        return false;
    };
    annexb.get(start).is_some_and(|&h| is(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpeg2ts::ts::{ReadTsPacket, TsPacketReader};

    fn read_all(data: &[u8]) -> Vec<TsPacket> {
        let mut r = TsPacketReader::new(data);
        let mut out = Vec::new();
        while let Some(p) = r.read_ts_packet().expect("our TS parses") {
            out.push(p);
        }
        out
    }

    /// The elementary stream carried by the video PID, PES by PES.
    fn units(packets: &[TsPacket]) -> Vec<(u64, bool, Vec<u8>)> {
        let mut out: Vec<(u64, bool, Vec<u8>)> = Vec::new();
        for p in packets.iter().filter(|p| p.header.pid.as_u16() == VIDEO_PID) {
            match &p.payload {
                Some(TsPayload::PesStart(pes)) => {
                    let rai = p.adaptation_field.as_ref().is_some_and(|a| a.random_access_indicator);
                    out.push((pes.header.pts.unwrap().as_u64(), rai, pes.data.to_vec()));
                }
                Some(TsPayload::PesContinuation(b)) => out.last_mut().unwrap().2.extend_from_slice(b),
                other => panic!("unexpected video payload {other:?}"),
            }
        }
        out
    }

    #[test]
    fn a_segment_is_tables_then_one_pes_per_access_unit_with_continuous_counters() {
        let mut mux = TsMuxer::new(Codec::H264);
        let mut out = Vec::new();
        mux.write_tables(&mut out).unwrap();
        let key: Vec<u8> = [&[0, 0, 0, 1, 0x67, 1, 2][..], &[0, 0, 0, 1, 0x65], &[7u8; 1000]].concat();
        let delta: Vec<u8> = [&[0, 0, 1, 0x41][..], &[9u8; 150]].concat();
        mux.write_access_unit(&mut out, &key, TIMESTAMP_ORIGIN, true).unwrap();
        mux.write_access_unit(&mut out, &delta, TIMESTAMP_ORIGIN + 3000, false).unwrap();
        assert_eq!(out.len() % TsPacket::SIZE, 0);
        let packets = read_all(&out);
        assert!(matches!(packets[0].payload, Some(TsPayload::Pat(_))));
        match &packets[1].payload {
            Some(TsPayload::Pmt(pmt)) => {
                assert_eq!(pmt.es_info[0].stream_type, StreamType::H264);
                assert_eq!(pmt.pcr_pid.map(|p| p.as_u16()), Some(VIDEO_PID));
            }
            other => panic!("PMT expected, got {other:?}"),
        }
        let video: Vec<_> = packets.iter().filter(|p| p.header.pid.as_u16() == VIDEO_PID).collect();
        for (i, p) in video.iter().enumerate() {
            assert_eq!(p.header.continuity_counter.as_u8(), i as u8 & 0x0F, "continuity counter of packet {i}");
        }
        let units = units(&packets);
        assert_eq!(units.len(), 2);
        assert_eq!((units[0].0, units[0].1), (TIMESTAMP_ORIGIN, true));
        assert_eq!((units[1].0, units[1].1), (TIMESTAMP_ORIGIN + 3000, false));
        assert_eq!(units[0].2, [&AUD_H264[..], &key].concat(), "delimiter, then the unit unchanged");
        assert_eq!(units[1].2, [&AUD_H264[..], &delta].concat());
        let pcr = video[0].adaptation_field.as_ref().unwrap().pcr.unwrap().as_u64();
        assert_eq!(pcr, (TIMESTAMP_ORIGIN - PCR_LEAD_90K) * 300, "the PCR runs 100 ms ahead of the PTS");
    }

    #[test]
    fn an_existing_delimiter_is_kept_and_not_doubled_and_h265_gets_its_own() {
        let mut mux = TsMuxer::new(Codec::H265);
        let mut out = Vec::new();
        mux.write_tables(&mut out).unwrap();
        let with_aud: Vec<u8> = [&AUD_H265[..], &[0, 0, 0, 1, 0x26, 0x01, 5, 5]].concat();
        let without: Vec<u8> = vec![0, 0, 0, 1, 0x02, 0x01, 6, 6];
        mux.write_access_unit(&mut out, &with_aud, 1, true).unwrap();
        mux.write_access_unit(&mut out, &without, 2, false).unwrap();
        let units = units(&read_all(&out));
        assert_eq!(units[0].2, with_aud);
        assert_eq!(units[1].2, [&AUD_H265[..], &without].concat());
    }

    #[test]
    fn timestamps_wrap_at_33_bits() {
        let mut mux = TsMuxer::new(Codec::H264);
        let mut out = Vec::new();
        mux.write_tables(&mut out).unwrap();
        mux.write_access_unit(&mut out, &[0, 0, 1, 0x41, 1], PTS_MODULO + 5, false).unwrap();
        assert_eq!(units(&read_all(&out))[0].0, 5);
    }

    #[test]
    fn units_of_every_size_around_packet_boundaries_come_back_whole() {
        let mut mux = TsMuxer::new(Codec::H264);
        for len in [1usize, 150, 155, 156, 157, 340, 341, 342, 5000] {
            let mut out = Vec::new();
            mux.write_tables(&mut out).unwrap();
            let unit: Vec<u8> = [&[0, 0, 0, 1, 0x41][..], &vec![0xAB; len]].concat();
            mux.write_access_unit(&mut out, &unit, 100, false).unwrap();
            assert_eq!(units(&read_all(&out))[0].2, [&AUD_H264[..], &unit].concat(), "unit of {len} bytes");
        }
    }
}
