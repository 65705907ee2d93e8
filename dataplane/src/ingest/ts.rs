//! An MPEG-TS demultiplexer for one video elementary stream (H.264 stream
//! type 0x1B, H.265 0x24), as SRT carries it: PAT → PMT → the video PID's
//! PES packets, one access unit each, with their PTS.
//!
//! It keeps what the accounting needs: a PES that lost a TS packet (a gap in
//! the continuity counter, or the transport error flag) is marked damaged,
//! and the frames missing entirely between two PES are counted from the gap
//! in their timestamps. Nothing in the input can make it panic; what does
//! not parse is counted and skipped.

/// One access unit from the video PES.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsUnit {
    /// 90 kHz presentation timestamp (33 bits).
    pub pts: u64,
    /// Decode timestamp when the PES carries one, else the PTS.
    pub dts: u64,
    /// The elementary stream bytes (Annex B).
    pub data: Vec<u8>,
    /// A TS packet of this unit was lost or flagged in error.
    pub damaged: bool,
}

const PACKET: usize = 188;
const SYNC: u8 = 0x47;

/// Streaming demultiplexer state.
#[derive(Debug, Default)]
pub struct TsDemux {
    /// Bytes of a TS packet split across two reads.
    carry: Vec<u8>,
    pmt_pid: Option<u16>,
    video_pid: Option<u16>,
    /// Stream types accepted for the video PID.
    stream_types: Vec<u8>,
    last_cc: Option<u8>,
    current: Option<TsUnit>,
    /// TS packets skipped: bad sync, malformed headers or PES.
    pub malformed: u64,
    /// Gaps in the video PID's continuity counter.
    pub discontinuities: u64,
}

impl TsDemux {
    /// A demultiplexer for the first video stream of one of `stream_types`.
    pub fn new(stream_types: &[u8]) -> Self {
        TsDemux { stream_types: stream_types.to_vec(), ..Default::default() }
    }

    /// Stream types for a codec: H.264 0x1B, H.265 0x24.
    pub fn for_codec(codec: zerodrop_crds::Codec) -> Self {
        match codec {
            zerodrop_crds::Codec::H264 => Self::new(&[0x1b]),
            zerodrop_crds::Codec::H265 => Self::new(&[0x24]),
        }
    }

    /// Feeds bytes; calls `out` for each access unit completed.
    pub fn push(&mut self, mut data: &[u8], out: &mut impl FnMut(TsUnit)) {
        if !self.carry.is_empty() {
            let need = PACKET - self.carry.len();
            let take = need.min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < PACKET {
                return;
            }
            let packet = std::mem::take(&mut self.carry);
            self.packet(&packet, out);
        }
        while !data.is_empty() {
            if data[0] != SYNC {
                // Resynchronise on the next sync byte.
                self.malformed += 1;
                match data.iter().position(|&b| b == SYNC) {
                    Some(i) => data = &data[i..],
                    None => return,
                }
                continue;
            }
            if data.len() < PACKET {
                self.carry.extend_from_slice(data);
                return;
            }
            self.packet(&data[..PACKET], out);
            data = &data[PACKET..];
        }
    }

    /// Hands on the unit in progress (at the end of the stream).
    pub fn flush(&mut self, out: &mut impl FnMut(TsUnit)) {
        if let Some(u) = self.current.take() {
            out(u);
        }
        self.last_cc = None;
        self.carry.clear();
    }

    fn packet(&mut self, p: &[u8], out: &mut impl FnMut(TsUnit)) {
        let error = p[1] & 0x80 != 0;
        let start = p[1] & 0x40 != 0;
        let pid = u16::from(p[1] & 0x1f) << 8 | u16::from(p[2]);
        let afc = (p[3] >> 4) & 0x3;
        let cc = p[3] & 0x0f;
        let mut offset = 4;
        if afc & 0x2 != 0 {
            offset += 1 + usize::from(p[4]);
        }
        let has_payload = afc & 0x1 != 0;
        if offset > PACKET {
            self.malformed += 1;
            return;
        }
        let payload = &p[offset..];
        if pid == 0 && has_payload && start {
            self.parse_pat(payload);
            return;
        }
        if Some(pid) == self.pmt_pid && has_payload && start {
            self.parse_pmt(payload);
            return;
        }
        if Some(pid) != self.video_pid {
            return;
        }
        if has_payload {
            if let Some(last) = self.last_cc {
                let expected = (last + 1) & 0x0f;
                // A repeated counter is a duplicate packet (allowed once).
                if cc != expected && cc != last {
                    self.discontinuities += 1;
                    if let Some(u) = &mut self.current {
                        u.damaged = true;
                    }
                }
            }
            self.last_cc = Some(cc);
        }
        if error && let Some(u) = &mut self.current {
            u.damaged = true;
        }
        if !has_payload {
            return;
        }
        if start {
            if let Some(u) = self.current.take() {
                out(u);
            }
            match parse_pes_header(payload) {
                Some((pts, dts, header_len)) => {
                    let mut data = Vec::with_capacity(64 * 1024);
                    data.extend_from_slice(&payload[header_len..]);
                    self.current = Some(TsUnit { pts, dts, data, damaged: error });
                }
                None => self.malformed += 1,
            }
        } else if let Some(u) = &mut self.current {
            u.data.extend_from_slice(payload);
        }
    }

    fn parse_pat(&mut self, payload: &[u8]) {
        let Some(section) = section(payload) else { return self.malformed += 1 };
        // table_id 0, then entries of 4 bytes after the 8-byte header, before the CRC.
        if section.first() != Some(&0x00) || section.len() < 12 {
            return self.malformed += 1;
        }
        for entry in section[8..section.len() - 4].chunks_exact(4) {
            let program = u16::from_be_bytes([entry[0], entry[1]]);
            if program != 0 {
                self.pmt_pid = Some(u16::from(entry[2] & 0x1f) << 8 | u16::from(entry[3]));
                return;
            }
        }
    }

    fn parse_pmt(&mut self, payload: &[u8]) {
        let Some(section) = section(payload) else { return self.malformed += 1 };
        if section.first() != Some(&0x02) || section.len() < 16 {
            return self.malformed += 1;
        }
        let program_info = usize::from(section[10] & 0x0f) << 8 | usize::from(section[11]);
        let mut i = 12 + program_info;
        let end = section.len() - 4;
        while i + 5 <= end {
            let stream_type = section[i];
            let pid = u16::from(section[i + 1] & 0x1f) << 8 | u16::from(section[i + 2]);
            let info = usize::from(section[i + 3] & 0x0f) << 8 | usize::from(section[i + 4]);
            if self.stream_types.contains(&stream_type) {
                if self.video_pid != Some(pid) {
                    self.video_pid = Some(pid);
                    self.last_cc = None;
                }
                return;
            }
            i += 5 + info;
        }
    }

    /// Whether the PMT named a video stream of the wanted type yet.
    pub fn has_video(&self) -> bool {
        self.video_pid.is_some()
    }
}

/// A PSI section from a payload that starts one (pointer field first),
/// bounded by its section_length.
fn section(payload: &[u8]) -> Option<&[u8]> {
    let pointer = usize::from(*payload.first()?);
    let s = payload.get(1 + pointer..)?;
    let len = usize::from(*s.get(1)? & 0x0f) << 8 | usize::from(*s.get(2)?);
    s.get(..3 + len)
}

/// (PTS, DTS, header length) of a PES packet header.
fn parse_pes_header(p: &[u8]) -> Option<(u64, u64, usize)> {
    if p.get(..3)? != [0, 0, 1] {
        return None;
    }
    let flags = *p.get(7)?;
    let header_len = 9 + usize::from(*p.get(8)?);
    if p.len() < header_len {
        return None;
    }
    let timestamp = |b: &[u8]| -> Option<u64> {
        let b = b.get(..5)?;
        Some(
            (u64::from(b[0] >> 1) & 0x07) << 30
                | u64::from(b[1]) << 22
                | u64::from(b[2] >> 1) << 15
                | u64::from(b[3]) << 7
                | u64::from(b[4] >> 1),
        )
    };
    let pts = if flags & 0x80 != 0 { timestamp(p.get(9..)?)? } else { return None };
    let dts = if flags & 0x40 != 0 { timestamp(p.get(14..)?)? } else { pts };
    Some((pts, dts, header_len))
}

/// Counts the frames missing between units from their decode timestamps:
/// a gap of k frame durations means k - 1 frames never arrived.
#[derive(Debug, Default)]
pub struct FrameGaps {
    last_dts: Option<u64>,
    /// The frame duration in 90 kHz ticks: the smallest positive step seen.
    duration: Option<u64>,
}

/// Gaps larger than this many frames are a restart, not loss.
const MAX_GAP_FRAMES: u64 = 300;

impl FrameGaps {
    /// The frames missing before a unit decoded at `dts`.
    pub fn missing_before(&mut self, dts: u64) -> u64 {
        let Some(last) = self.last_dts.replace(dts) else { return 0 };
        let step = dts.wrapping_sub(last) & ((1 << 33) - 1);
        if step == 0 || step > (1 << 32) {
            return 0;
        }
        let duration = match self.duration {
            Some(d) if d <= step => d,
            _ => {
                self.duration = Some(step);
                return 0;
            }
        };
        let frames = (step + duration / 2) / duration;
        if frames > MAX_GAP_FRAMES { 0 } else { frames.saturating_sub(1) }
    }

    pub fn reset(&mut self) {
        self.last_dts = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TS stream of `frames` PES (one TS packet each), PAT and PMT first.
    fn stream(frames: &[(u64, &[u8])], video_pid: u16) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let psi = |pid: u16, section: &[u8]| {
            let mut p = vec![SYNC, 0x40 | (pid >> 8) as u8, pid as u8, 0x10, 0x00];
            p.extend_from_slice(section);
            p.resize(PACKET, 0xff);
            p
        };
        // PAT: program 1 → PMT PID 0x100.
        packets.push(psi(0, &[0x00, 0xb0, 0x0d, 0, 1, 0xc1, 0, 0, 0, 1, 0xe1, 0x00, 0, 0, 0, 0]));
        // PMT: PCR PID, no program info, stream type 0x1b on video_pid.
        packets.push(psi(
            0x100,
            &[0x02, 0xb0, 0x12, 0, 1, 0xc1, 0, 0, 0xe1, 0x00, 0xf0, 0x00, 0x1b, 0xe0 | (video_pid >> 8) as u8, video_pid as u8, 0xf0, 0x00, 0, 0, 0, 0],
        ));
        for (cc, (pts, body)) in frames.iter().enumerate() {
            let mut p = vec![SYNC, 0x40 | (video_pid >> 8) as u8, video_pid as u8, 0x10 | (cc as u8 & 0x0f)];
            p.extend_from_slice(&[0, 0, 1, 0xe0, 0, 0, 0x80, 0x80, 5]);
            let t = *pts;
            p.extend_from_slice(&[
                0x21 | ((t >> 29) & 0x0e) as u8,
                (t >> 22) as u8,
                0x01 | ((t >> 14) & 0xfe) as u8,
                (t >> 7) as u8,
                0x01 | ((t << 1) & 0xfe) as u8,
            ]);
            p.extend_from_slice(body);
            p.resize(PACKET, 0xff);
            packets.push(p);
        }
        packets
    }

    fn units(demux: &mut TsDemux, bytes: &[u8]) -> Vec<TsUnit> {
        let mut out = Vec::new();
        demux.push(bytes, &mut |u| out.push(u));
        demux.flush(&mut |u| out.push(u));
        out
    }

    #[test]
    fn units_come_out_whole_with_their_timestamps_across_split_reads() {
        let packets = stream(&[(3000, b"\0\0\0\x01\x65a"), (6000, b"\0\0\0\x01\x41b")], 0x101);
        let all: Vec<u8> = packets.concat();
        let mut demux = TsDemux::new(&[0x1b]);
        let mut out = Vec::new();
        // Fed in odd-sized pieces, as a socket delivers them.
        for chunk in all.chunks(100) {
            demux.push(chunk, &mut |u| out.push(u));
        }
        demux.flush(&mut |u| out.push(u));
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].pts, out[1].pts), (3000, 6000));
        assert!(out[0].data.starts_with(b"\0\0\0\x01\x65a") && !out[0].damaged && !out[1].damaged);
    }

    #[test]
    fn a_lost_ts_packet_marks_the_unit_damaged_and_garbage_is_skipped() {
        let mut packets = stream(&[(3000, b"\0\0\0\x01\x65a"), (6000, b"\0\0\0\x01\x41b"), (9000, b"\0\0\0\x01\x41c")], 0x101);
        // A continuation of the second unit whose predecessor went missing:
        // counter 3 after 1 (2 lost).
        let mut cont = vec![SYNC, 0x01, 0x01, 0x13];
        cont.resize(PACKET, 0xaa);
        packets.insert(4, cont);
        packets[5][3] = 0x14;
        let mut bytes = vec![0x00, 0x12];
        bytes.extend(packets.concat());
        let mut demux = TsDemux::new(&[0x1b]);
        let out = units(&mut demux, &bytes);
        assert_eq!(out.len(), 3);
        assert!(!out[0].damaged && out[1].damaged && !out[2].damaged, "{out:?}");
        assert_eq!(demux.discontinuities, 1);
        assert!(demux.malformed >= 1);
    }

    #[test]
    fn frames_missing_between_units_are_counted_from_the_timestamps() {
        let mut gaps = FrameGaps::default();
        assert_eq!(gaps.missing_before(0), 0);
        assert_eq!(gaps.missing_before(3000), 0);
        assert_eq!(gaps.missing_before(6000), 0);
        assert_eq!(gaps.missing_before(15000), 2);
        // Wrapping at 2^33.
        let mut gaps = FrameGaps::default();
        gaps.missing_before((1 << 33) - 3000);
        gaps.missing_before(0);
        assert_eq!(gaps.missing_before(6000), 1);
        // A jump of minutes is a restart, not loss.
        assert_eq!(gaps.missing_before(6000 + 90_000 * 600), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut demux = TsDemux::new(&[0x1b, 0x24]);
        let mut n = 0u32;
        let mut x: u32 = 12345;
        let mut bytes = Vec::new();
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Mostly sync bytes at packet starts, to reach the parsers.
            bytes.push(if bytes.len() % PACKET == 0 { SYNC } else { x as u8 });
        }
        demux.push(&bytes, &mut |_| n += 1);
        demux.flush(&mut |_| n += 1);
    }
}
