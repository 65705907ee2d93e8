//! RTP restream: the repaired stream sent on as RTP, to one or more
//! destinations: a contribution feed cleaned by our repair.
//!
//! Only whole access units go out (the depacketiser hands on nothing
//! damaged), packetised afresh (RFC 6184 single NAL unit and FU-A for H.264,
//! RFC 7798 single NAL unit and FU for H.265) under our own SSRC, with our
//! own sequence numbers, continuous whatever repair did upstream, and
//! timestamps from the stream's extended RTP timestamps, so they keep
//! increasing across a sender's restart. An RTCP sender report goes to each
//! destination's RTCP port every second (and a BYE at the end), mapping the
//! RTP timestamps to our wallclock at the time of sending.
//!
//! The restream owns a UDP socket, as the decoder owns its GStreamer
//! pipeline: sending is one non-blocking `send_to` per packet and
//! destination from the receive thread; a packet the kernel will not take is
//! counted (`zerodrop_restream_send_errors_total`), never waited for.
//!
//! Not yet: answering the destinations' NACKs from a buffer of our own.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rtp_types::RtpPacketBuilder;
use zerodrop_core::Codec;

use crate::rtp::{self, SenderReportInfo};

/// Largest RTP payload sent: with the 12-byte RTP header, IP and UDP, a
/// packet fits a 1500-byte MTU.
pub const MAX_PAYLOAD: usize = 1200;
/// Sender report interval.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// One destination: RTP to `rtp` with `payload_type`, sender reports to
/// `rtcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestreamDestination {
    pub rtp: SocketAddr,
    pub rtcp: SocketAddr,
    pub payload_type: u8,
}

/// Where a source is restreamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestreamSettings {
    pub destinations: Vec<RestreamDestination>,
    /// The port the restream sends from and hears RTCP on (any when unset).
    pub local_port: Option<u16>,
}

/// Cuts access units into RTP packets of one SSRC.
pub struct Packetizer {
    codec: Codec,
    payload_type: u8,
    ssrc: u32,
    seq: u16,
    max_payload: usize,
    payload: Vec<u8>,
    packet: Vec<u8>,
    /// The NAL units of the unit being packetised, as ranges (reused: no
    /// allocation per frame).
    nals: Vec<std::ops::Range<usize>>,
}

impl Packetizer {
    pub fn new(codec: Codec, payload_type: u8, ssrc: u32, first_seq: u16, max_payload: usize) -> Self {
        Self {
            codec,
            payload_type,
            ssrc,
            seq: first_seq,
            max_payload: max_payload.max(16),
            payload: Vec::with_capacity(max_payload),
            packet: Vec::with_capacity(max_payload + 12),
            nals: Vec::with_capacity(16),
        }
    }

    /// The sequence number the next packet gets.
    pub fn next_seq(&self) -> u16 {
        self.seq
    }

    /// Hands each RTP packet of the access unit (Annex B) to `emit`, in
    /// order; the last carries the marker bit.
    pub fn packetize(&mut self, annexb: &[u8], timestamp: u32, mut emit: impl FnMut(&[u8])) {
        let h = self.header_len();
        let mut nals = std::mem::take(&mut self.nals);
        nals.clear();
        let base = annexb.as_ptr() as usize;
        nals.extend(crate::depay::au::annexb_nal_units(annexb).filter(|n| n.len() > h).map(|n| {
            let start = n.as_ptr() as usize - base;
            start..start + n.len()
        }));
        for (i, range) in nals.iter().enumerate() {
            let nal = &annexb[range.clone()];
            let last_nal = i + 1 == nals.len();
            if nal.len() <= self.max_payload {
                self.payload.clear();
                self.payload.extend_from_slice(nal);
                self.send(timestamp, last_nal, &mut emit);
                continue;
            }
            // A fragmentation unit per piece: the NAL header is replaced by
            // the FU indicator/payload header and the FU header.
            let (indicator, nal_type): (&[u8], u8) = match self.codec {
                Codec::H264 => (&[(nal[0] & 0xE0) | 28], nal[0] & 0x1F),
                Codec::H265 => (&[(nal[0] & 0x81) | (49 << 1), nal[1]], (nal[0] >> 1) & 0x3F),
            };
            let room = self.max_payload - indicator.len() - 1;
            let body = &nal[h..];
            let pieces = body.len().div_ceil(room);
            for (k, piece) in body.chunks(room).enumerate() {
                let (start, end) = (k == 0, k + 1 == pieces);
                self.payload.clear();
                self.payload.extend_from_slice(indicator);
                self.payload.push(((start as u8) << 7) | ((end as u8) << 6) | nal_type);
                self.payload.extend_from_slice(piece);
                self.send(timestamp, last_nal && end, &mut emit);
            }
        }
        self.nals = nals;
    }

    fn header_len(&self) -> usize {
        match self.codec {
            Codec::H264 => 1,
            Codec::H265 => 2,
        }
    }

    fn send(&mut self, timestamp: u32, marker: bool, emit: &mut impl FnMut(&[u8])) {
        self.packet.clear();
        let written = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(self.payload_type)
            .ssrc(self.ssrc)
            .sequence_number(self.seq)
            .timestamp(timestamp)
            .marker_bit(marker)
            .payload(&self.payload[..])
            .write_into_vec(&mut self.packet);
        self.seq = self.seq.wrapping_add(1);
        match written {
            Ok(()) => emit(&self.packet),
            Err(e) => tracing::error!(error = ?e, "restream: cannot write an RTP packet"),
        }
    }
}

/// Counters a restream reports into.
#[derive(Clone)]
pub struct RestreamCounters {
    pub packets_sent: Counter,
    pub send_errors: Counter,
    /// Keyframe requests (PLI, FIR) from the restream's receivers.
    pub keyframe_requests: Counter,
    /// From a receiver's keyframe request to the first keyframe sent after
    /// it: the restream's part of a joining receiver's wait for its first
    /// picture.
    pub keyframe_delay: Histogram,
}

impl Default for RestreamCounters {
    /// Counters of their own (tests); the data plane hands out the
    /// registry's.
    fn default() -> Self {
        Self {
            packets_sent: Counter::default(),
            send_errors: Counter::default(),
            keyframe_requests: Counter::default(),
            keyframe_delay: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14)),
        }
    }
}

/// One source's restream.
pub struct Restream {
    socket: UdpSocket,
    destinations: Vec<RestreamDestination>,
    packetizer: Packetizer,
    ssrc: u32,
    cname: String,
    clock_rate: u32,
    timestamp_offset: u32,
    /// The last access unit's RTP timestamp and when it was sent, for the
    /// sender report's RTP time.
    last: Option<(u32, Instant)>,
    packets: u32,
    octets: u32,
    next_report: Instant,
    rtcp: Vec<u8>,
    counters: RestreamCounters,
    /// The first keyframe request not yet answered by a keyframe.
    keyframe_asked: Option<Instant>,
}

impl Restream {
    /// Binds a UDP socket of its own (any port) for `settings`.
    pub fn open(settings: &RestreamSettings, codec: Codec, clock_rate: u32, cname: String, counters: RestreamCounters, now: Instant) -> std::io::Result<Self> {
        let port = settings.local_port.unwrap_or(0);
        let any: SocketAddr = match settings.destinations.first() {
            Some(d) if d.rtp.is_ipv6() => SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
            _ => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        };
        let socket = UdpSocket::bind(any)?;
        socket.set_nonblocking(true)?;
        let ssrc: u32 = rand::random();
        Ok(Self {
            socket,
            destinations: settings.destinations.clone(),
            packetizer: Packetizer::new(codec, settings.destinations.first().map_or(96, |d| d.payload_type), ssrc, rand::random(), MAX_PAYLOAD),
            ssrc,
            cname,
            clock_rate,
            timestamp_offset: rand::random(),
            last: None,
            packets: 0,
            octets: 0,
            next_report: now,
            rtcp: Vec::with_capacity(256),
            counters,
            keyframe_asked: None,
        })
    }

    /// The address the restream sends from.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The socket, for the ingest's poll set: its receivers' RTCP comes in
    /// on it.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Reads the receivers' RTCP queued on the socket. True when one asked
    /// for a keyframe (PLI or FIR: a receiver that joined mid-GOP, or lost
    /// one): the caller asks the source for one at once, so the receiver
    /// need not wait for the next periodic keyframe. Malformed compounds
    /// are ignored.
    pub fn read_feedback(&mut self) -> bool {
        let mut buf = [0u8; 1500];
        let mut events = Vec::new();
        let mut wanted = false;
        for _ in 0..64 {
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else { break };
            events.clear();
            if rtp::parse_rtcp(&buf[..n], &mut events).is_err() {
                continue;
            }
            for e in &events {
                if let rtp::RtcpEvent::Pli { media_ssrc } | rtp::RtcpEvent::Fir { media_ssrc } = e
                    && (*media_ssrc == self.ssrc || *media_ssrc == 0)
                {
                    self.counters.keyframe_requests.inc();
                    self.keyframe_asked.get_or_insert_with(Instant::now);
                    wanted = true;
                }
            }
        }
        wanted
    }

    /// Sends one whole access unit; `ts` is the stream's extended RTP
    /// timestamp.
    pub fn push(&mut self, annexb: &[u8], ts: i64, keyframe: bool, now: Instant) {
        if keyframe && let Some(asked) = self.keyframe_asked.take() {
            self.counters.keyframe_delay.observe(now.saturating_duration_since(asked).as_secs_f64());
        }
        let timestamp = self.timestamp_offset.wrapping_add(ts as u32);
        let Self { packetizer, socket, destinations, counters, packets, octets, .. } = self;
        packetizer.packetize(annexb, timestamp, |packet| {
            for d in destinations.iter() {
                // The packetizer writes the first destination's payload
                // type; another's is set in the copy sent to it.
                let mut other = [0u8; MAX_PAYLOAD + 12];
                let packet: &[u8] = if packet[1] & 0x7F == d.payload_type {
                    packet
                } else {
                    other[..packet.len()].copy_from_slice(packet);
                    other[1] = (packet[1] & 0x80) | d.payload_type;
                    &other[..packet.len()]
                };
                match socket.send_to(packet, d.rtp) {
                    Ok(_) => counters.packets_sent.inc(),
                    Err(_) => counters.send_errors.inc(),
                };
            }
            *packets = packets.wrapping_add(1);
            *octets = octets.wrapping_add((packet.len() - 12) as u32);
        });
        self.last = Some((timestamp, now));
    }

    /// A sender report to every destination when one is due.
    pub fn on_timers(&mut self, now: Instant, wall: SystemTime) {
        if now < self.next_report || self.last.is_none() {
            return;
        }
        self.next_report = now + REPORT_INTERVAL;
        self.report(now, wall, false);
    }

    /// The next time [`on_timers`](Self::on_timers) has work.
    pub fn next_wake(&self) -> Instant {
        self.next_report
    }

    /// A last report and a BYE: the restream ends.
    pub fn end(&mut self, now: Instant, wall: SystemTime) {
        if self.last.is_some() {
            self.report(now, wall, true);
        }
    }

    fn report(&mut self, now: Instant, wall: SystemTime, bye: bool) {
        let Some((ts, at)) = self.last else { return };
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        let info = SenderReportInfo {
            ntp_timestamp: rtp::ntp_timestamp(wall),
            rtp_timestamp: ts.wrapping_add((elapsed * f64::from(self.clock_rate)) as u32),
            packet_count: self.packets,
            octet_count: self.octets,
            dlrr: None,
        };
        self.rtcp.clear();
        if rtp::write_sender_rtcp(self.ssrc, &self.cname, &info, &mut self.rtcp).is_err() {
            return;
        }
        if bye {
            rtp::append_bye(&mut self.rtcp, self.ssrc);
        }
        for d in &self.destinations {
            if self.socket.send_to(&self.rtcp, d.rtcp).is_err() {
                self.counters.send_errors.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::RtpPacket;

    fn packets(codec: Codec, au: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
        let mut p = Packetizer::new(codec, 96, 7, 65_534, max_payload);
        let mut out = Vec::new();
        p.packetize(au, 1000, |pkt| out.push(pkt.to_vec()));
        out
    }

    /// Rebuilds the NAL units from the packets, the way RFC 6184/7798
    /// receivers do.
    fn reassemble(codec: Codec, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut nals: Vec<Vec<u8>> = Vec::new();
        for raw in pkts {
            let p = RtpPacket::parse(raw).unwrap();
            let pl = p.payload();
            let (fu, hdr) = match codec {
                Codec::H264 => (pl[0] & 0x1F == 28, 1),
                Codec::H265 => ((pl[0] >> 1) & 0x3F == 49, 2),
            };
            if !fu {
                nals.push(pl.to_vec());
                continue;
            }
            let fu_header = pl[hdr];
            if fu_header & 0x80 != 0 {
                let header = match codec {
                    Codec::H264 => vec![(pl[0] & 0xE0) | (fu_header & 0x1F)],
                    Codec::H265 => vec![(pl[0] & 0x81) | ((fu_header & 0x3F) << 1), pl[1]],
                };
                nals.push(header);
            }
            nals.last_mut().unwrap().extend_from_slice(&pl[hdr + 1..]);
        }
        nals
    }

    #[test]
    fn small_nal_units_go_whole_and_large_ones_in_fragments_and_the_marker_ends_the_unit() {
        let sps = vec![0x67, 1, 2, 3];
        let idr: Vec<u8> = [&[0x65u8][..], &(0..3000).map(|i| i as u8).collect::<Vec<_>>()].concat();
        let au = [&[0, 0, 0, 1][..], &sps, &[0, 0, 0, 1], &idr].concat();
        let pkts = packets(Codec::H264, &au, 1200);
        assert_eq!(pkts.len(), 1 + 3000usize.div_ceil(1198));
        let parsed: Vec<RtpPacket> = pkts.iter().map(|p| RtpPacket::parse(p).unwrap()).collect();
        let seqs: Vec<u16> = parsed.iter().map(|p| p.sequence_number()).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 0, 1], "consecutive across the wrap");
        assert!(parsed.iter().all(|p| p.timestamp() == 1000 && p.payload_type() == 96 && p.ssrc() == 7));
        assert_eq!(parsed.iter().map(|p| p.marker_bit()).collect::<Vec<_>>(), vec![false, false, false, true]);
        assert!(pkts.iter().all(|p| p.len() <= 12 + 1200));
        assert_eq!(reassemble(Codec::H264, &pkts), vec![sps, idr]);
    }

    #[test]
    fn h265_fragments_carry_the_two_byte_header_and_come_back_whole() {
        let vps = vec![0x40, 0x01, 9, 9];
        let idr: Vec<u8> = [&[0x26u8, 0x01][..], &vec![0x5A; 2500]].concat();
        let au = [&[0, 0, 1][..], &vps, &[0, 0, 0, 1], &idr].concat();
        let pkts = packets(Codec::H265, &au, 1000);
        assert_eq!(reassemble(Codec::H265, &pkts), vec![vps, idr]);
        let fu = RtpPacket::parse(&pkts[1]).unwrap();
        assert_eq!((fu.payload()[0] >> 1) & 0x3F, 49, "an H.265 FU");
        assert_eq!(fu.payload()[2], 0x80 | 19, "start bit and the IDR_W_RADL type");
    }

    #[test]
    fn a_restream_sends_every_packet_to_every_destination_and_reports() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rtcp = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&a, &b, &rtcp] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let settings = RestreamSettings {
            destinations: vec![
                RestreamDestination { rtp: a.local_addr().unwrap(), rtcp: rtcp.local_addr().unwrap(), payload_type: 100 },
                RestreamDestination { rtp: b.local_addr().unwrap(), rtcp: rtcp.local_addr().unwrap(), payload_type: 101 },
            ],
            local_port: None,
        };
        let t0 = Instant::now();
        let counters = RestreamCounters::default();
        let mut r = Restream::open(&settings, Codec::H264, 90_000, "test".into(), counters.clone(), t0).unwrap();
        r.push(&[0, 0, 0, 1, 0x65, 1, 2, 3], 0, true, t0);
        r.push(&[0, 0, 0, 1, 0x41, 4, 5], 3000, false, t0);
        let mut buf = [0u8; 2000];
        for (s, pt) in [(&a, 100), (&b, 101)] {
            let n = s.recv(&mut buf).unwrap();
            let p = RtpPacket::parse(&buf[..n]).unwrap();
            let (first, marker) = (p.sequence_number(), p.marker_bit());
            let n = s.recv(&mut buf).unwrap();
            let p = RtpPacket::parse(&buf[..n]).unwrap();
            assert_eq!((p.sequence_number(), p.payload_type(), p.payload()), (first.wrapping_add(1), pt, &[0x41u8, 4, 5][..]));
            assert!(marker && p.marker_bit(), "each unit's last packet keeps its marker whatever the payload type");
        }
        assert_eq!(counters.packets_sent.get(), 4);
        r.on_timers(t0, SystemTime::now());
        let mut events = Vec::new();
        for _ in 0..2 {
            let n = rtcp.recv(&mut buf).unwrap();
            rtp::parse_rtcp(&buf[..n], &mut events).unwrap();
        }
        let reports: Vec<_> =
            events.iter().filter_map(|e| match e { rtp::RtcpEvent::SenderReport { packet_count, .. } => Some(*packet_count), _ => None }).collect();
        assert_eq!(reports, vec![2, 2], "one report per destination, counting the packets of the stream");

        // A receiver's picture loss indication about our SSRC asks for a
        // keyframe; one about another SSRC, or garbage, does not.
        let to = SocketAddr::from(([127, 0, 0, 1], r.local_addr().unwrap().port()));
        let pli = |ssrc: u32| {
            let mut out = Vec::new();
            let fb = rtp::ReceiverFeedback { report: None, nacks: &[], pli: true, media_ssrc: ssrc, rrtr_ntp: None, tmmbr_bps: None, remb_bps: None };
            rtp::write_receiver_rtcp(0x1111, "viewer", &fb, &mut out).unwrap();
            out
        };
        rtcp.send_to(&pli(r.ssrc ^ 1), to).unwrap();
        rtcp.send_to(b"garbage", to).unwrap();
        assert!(!wait_feedback(&mut r, Duration::from_millis(200)), "not about our stream");
        rtcp.send_to(&pli(r.ssrc), to).unwrap();
        assert!(wait_feedback(&mut r, Duration::from_secs(2)), "a keyframe is wanted");
        assert_eq!(counters.keyframe_requests.get(), 1);
        r.push(&[0, 0, 0, 1, 0x41, 6], 6000, false, Instant::now());
        r.push(&[0, 0, 0, 1, 0x65, 7], 9000, true, Instant::now());
        r.push(&[0, 0, 0, 1, 0x65, 8], 12000, true, Instant::now());
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("delay", "d", counters.keyframe_delay.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("delay_count 1\n"), "one request, answered by the first keyframe after it: {text}");
    }

    /// Whether feedback asking for a keyframe is read within `within`.
    fn wait_feedback(r: &mut Restream, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if r.read_feedback() {
                return true;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
        false
    }
}
