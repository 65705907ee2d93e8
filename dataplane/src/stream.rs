//! One received stream, from datagrams to decoded frames, without sockets:
//! the ingest hands it datagrams (with where they came from and when they
//! arrived) and the time; it hands back the RTCP compound to send, and where.
//! In between, the stages in order:
//!
//! RTP parse, payload-type and SSRC demux (media, RTX, in-band FEC; a new
//! SSRC after silence is a restarted sender) → [`RtcpSession`] (reports,
//! round trip, jitter, feedback) and [`Repair`] (jitter buffer, NACK, FEC)
//! → [`Depacketizer`] (access units, frame accounting) → [`Decoder`] and
//! the [`output`](crate::output)s.
//!
//! Every datagram is accounted for in the stream's metrics: received,
//! duplicate, late, or discarded with a reason; every frame expected is
//! decoded, dropped with a reason, or skipped while waiting for a keyframe.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;

use crate::config::SourceConfig;
use crate::decode::Decoder;
use crate::depay::{Depacketizer, DepayEvent};
use crate::ingest::udp::RecvBatch;
use crate::metrics::StreamMetrics;
use crate::output::Published;
use crate::output::frames::FrameTap;
use crate::output::hls::HlsWriter;
use crate::output::restream::Restream;
use crate::session::clock::SenderClock;
use crate::output::{AuLog, RecoveredLog};
use crate::repair::fec::FecScheme;
use crate::repair::jitter::{Output, PushOutcome, StoredPacket};
use crate::repair::{FecPush, Repair, Stored};
use crate::rtp::{self, RtpPacket};
use crate::session::{FeedbackRequest, ReceptionCounts, RtcpSession, SessionSettings, Transmit};

/// A source is reported silent after this long without a media packet.
const SILENCE: Duration = Duration::from_secs(2);
/// How long an unfinished access unit waits for its next packet before the
/// receiver suspects tail loss (at least; twice the RTT when known).
const TAIL_PROBE_MIN: Duration = Duration::from_millis(40);
/// Packets asked for before a stream's first packet when that packet does not
/// begin an access unit (its parameter sets were lost).
const HEAD_PROBE_PACKETS: u64 = 4;
/// Packets before the first one received asked for at most when a sender
/// report shows they were sent (a keyframe's worth at a few Mbit/s).
const HEAD_RECOVERY_MAX: u64 = 256;
/// How long losses are held at the start of a stream at most, waiting for
/// the sender to show it hears us (its first RTCP report or a
/// retransmission). RFC 3550 senders report within a few seconds at most
/// (GStreamer's rtpbin within about a second); past this the stream goes on
/// without.
const JOIN_HOLD_MAX: Duration = Duration::from_secs(3);
/// Probes per unfinished access unit: a tail longer than this is given up.
const MAX_TAIL_PROBES: u32 = 8;
/// Datagrams read per `recvmmsg` call, and the buffers kept for them.
pub const BATCH: usize = 32;

#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Write one line per access unit handed to the decoder:
    /// `index rtp_timestamp digest keyframe`.
    pub au_log: Option<PathBuf>,
    /// Skip decoding (benchmarks that measure the receive path alone).
    pub no_decode: bool,
    /// Told once the sockets are bound and the decoder runs.
    pub readiness: Option<Arc<crate::metrics::Readiness>>,
    /// Write one line per packet FEC rebuilt: `seq xxh3-digest-of-datagram`.
    pub recovered_log: Option<PathBuf>,
    /// Where outputs publish what the HTTP server serves (HLS playlists,
    /// thumbnails), for sources that ask for them.
    pub published: Option<Arc<Published>>,
    /// Start as an inactive rendition: received and repaired, its frames
    /// counted as skipped (`inactive_rendition`) instead of decoded, until
    /// [`Stream::set_decoding`] turns it on (a rendition group member that
    /// another member's decoding stands for).
    pub inactive_rendition: bool,
}

/// Final figures for one stream, written to the run report.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub pipeline: String,
    pub stream: String,
    pub decoder: String,
    pub frames_expected: u64,
    pub frames_assembled: u64,
    pub frames_decoded: u64,
    pub frames_dropped: u64,
    pub frames_skipped_before_keyframe: u64,
    /// Whole frames of an inactive rendition, not decoded (frames sent =
    /// decoded + dropped + skipped before a keyframe + these).
    pub frames_skipped_inactive_rendition: u64,
    pub packets_received: u64,
    pub packets_lost: u64,
    pub packets_recovered_nack: u64,
    pub packets_recovered_fec: u64,
    pub packets_recovered_reorder: u64,
    pub packets_unrecovered: u64,
    pub packets_discarded: u64,
    pub nacks_sent: u64,
    pub retransmissions_received: u64,
    pub fec_packets_received: u64,
    /// Missing packets FEC rebuilt before any NACK asked for them.
    pub nacks_avoided: u64,
    /// Requests withheld by the retransmission budget.
    pub nacks_refused: u64,
    pub keyframe_requests: u64,
    /// Keyframes handed on with the source's out-of-band `parameterSets`
    /// put in front (they came without parameter sets of their own).
    pub parameter_sets_inserted: u64,
    /// From the stream's first packet to its first frame handed on, in ms
    /// (after a sender restart, from the new sender's first packet).
    pub join_to_first_frame_ms: Option<f64>,
    /// Packets for this stream's sockets the kernel dropped (see
    /// `zerodrop_kernel_udp_drops_total` for reasons).
    pub kernel_udp_drops: u64,
    pub receive_buffer_bytes: i64,
    /// Arrival of a frame's first packet to its access unit leaving the
    /// jitter buffer, over all frames.
    pub assembly_latency_ms: LatencySummary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    fn from_samples(samples: &mut [f32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable_by(|a, b| a.total_cmp(b));
        let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize] as f64;
        LatencySummary {
            count: samples.len() as u64,
            mean: samples.iter().map(|&s| s as f64).sum::<f64>() / samples.len() as f64,
            p50: q(0.5),
            p99: q(0.99),
            max: q(1.0),
        }
    }
}

fn new_depacketizer(cfg: &SourceConfig) -> Depacketizer {
    let mut depay = Depacketizer::new(cfg.codec);
    depay.set_out_of_band_parameter_sets(&cfg.parameter_sets);
    depay.tolerate_loss_between_units(cfg.fec.as_ref().is_some_and(|f| f.scheme == FecScheme::Ulpfec));
    depay
}

/// One stream's receive path, sans sockets.
pub struct Stream {
    cfg: SourceConfig,
    metrics: StreamMetrics,
    session: RtcpSession,
    /// `zerodrop_bitrate_requests_sent_total` for the source's method, from
    /// its first bit rate request on.
    bitrate_requests_sent: Option<prometheus_client::metrics::counter::Counter>,
    repair: Repair,
    depay: Depacketizer,
    decoder: Option<Decoder>,
    au_log: Option<AuLog>,
    recovered_log: Option<RecoveredLog>,
    hls: Option<HlsWriter>,
    restream: Option<Restream>,
    /// The sender's wallclock, from its reports.
    clock: SenderClock,
    /// The frames output, and where it is published.
    frames: Option<(Arc<FrameTap>, Option<Arc<Published>>)>,
    /// When the media sender said goodbye (RTCP BYE), until what it sent
    /// before is handed on.
    bye_at: Option<Instant>,
    /// The media sender said goodbye: a new SSRC may take over at once.
    sender_left: bool,
    last_packet: Option<Instant>,
    silent: bool,
    keyframe_wanted: bool,
    /// Whether frames go on to the decoder and the outputs; false for a
    /// rendition group member while another member is decoded.
    decoding: bool,
    /// Decoding was just switched on: frames before the next keyframe are
    /// skipped (a decoder cannot start from a delta frame).
    decode_from_keyframe: bool,
    /// The sender has shown that it hears us: its report told us where its
    /// RTCP comes from, or a retransmission answered a request. Until then
    /// losses are held (`JitterBuffer::hold_losses_until`).
    sender_hears_us: bool,
    /// When this stream's first packet came (join-to-first-frame starts).
    joined_at: Option<Instant>,
    /// How long the first frame took after `joined_at`, once it came.
    join_to_first_frame: Option<Duration>,
    awaiting_first_frame: bool,
    rtp_ts_ext: Option<(u32, i64)>,
    /// Set when a sender restart broke the timestamp sequence.
    timestamps_restarted: bool,
    last_keyframe: Option<i64>,
    /// Tail probes for the open access unit: (its timestamp, probes, last).
    tail_probe: Option<(u32, u32, Instant)>,
    latency: LatencySamples,
    outputs: Vec<Output>,
    events: Vec<DepayEvent>,
    nacks: Vec<u64>,
    /// Bytes of the batch being read, added to the metric once per batch.
    batch_bytes: u64,
    /// Packet counts of the batch being read, likewise.
    counts: StoreCounts,
}

impl Stream {
    /// A stream for `cfg`, with its decoder started unless `options` say not.
    /// `receive_buffer` is what the kernel granted the ingest's socket.
    pub fn new(cfg: SourceConfig, metrics: StreamMetrics, options: &StreamOptions, now: Instant) -> anyhow::Result<Stream> {
        let id = cfg.id();
        let recovered_log = match &options.recovered_log {
            Some(path) => Some(
                RecoveredLog::create(path).with_context(|| format!("{id}: cannot create recovered-packet log {}", path.display()))?,
            ),
            None => None,
        };
        let frames = match (&cfg.frames, options.no_decode) {
            (Some(settings), false) => Some(
                FrameTap::start(&cfg.pipeline, &cfg.name, settings.clone(), metrics.frames.clone())
                    .with_context(|| format!("{id}: cannot start the frames output"))?,
            ),
            (Some(_), true) => {
                tracing::warn!(stream = %id, "outputs.frames needs decoding, which --no-decode turns off: no frames output");
                None
            }
            (None, _) => None,
        };
        if let (Some(tap), Some(published)) = (&frames, &options.published) {
            published.frames.insert(&cfg.pipeline, &cfg.name, tap.clone());
        }
        let decoder = if options.no_decode { None } else { Some(Decoder::start(cfg.codec, cfg.decoder, metrics.clone(), frames.clone())?) };
        let au_log = match &options.au_log {
            Some(path) => Some(AuLog::create(path).with_context(|| format!("{id}: cannot create AU log {}", path.display()))?),
            None => None,
        };
        let hls = match (cfg.hls, &options.published) {
            (Some(settings), Some(published)) => Some(HlsWriter::new(
                published.hls.playlist(&cfg.pipeline, &cfg.name, settings),
                cfg.codec,
                cfg.clock_rate,
                settings,
                metrics.hls_segments.clone(),
            )
            .with_delay_histogram(metrics.hls_segment_delay.clone())),
            _ => None,
        };
        let restream = match &cfg.restream {
            Some(settings) => Some(
                Restream::open(settings, cfg.codec, cfg.clock_rate, format!("zerodrop-{}-restream@{}", cfg.name, std::process::id()), metrics.restream.clone(), now)
                    .with_context(|| format!("{id}: cannot open the restream's UDP socket"))?,
            ),
            None => None,
        };
        metrics.rendition_decoding.set(i64::from(!options.inactive_rendition));
        let session = RtcpSession::new(
            SessionSettings {
                our_ssrc: rand::random(),
                cname: format!("zerodrop-{}@{}", cfg.name, std::process::id()),
                clock_rate: cfg.clock_rate,
                separate_rtcp_port: cfg.rtcp_bind.is_some(),
                bitrate_request: cfg.bitrate_request,
            },
            now,
        );
        Ok(Stream {
            repair: Repair::new(cfg.jitter.clone(), cfg.fec.as_ref(), now),
            depay: new_depacketizer(&cfg),
            session,
            bitrate_requests_sent: None,
            decoder,
            au_log,
            recovered_log,
            hls,
            restream,
            clock: SenderClock::new(cfg.clock_rate),
            frames: frames.map(|tap| (tap, options.published.clone())),
            bye_at: None,
            sender_left: false,
            last_packet: None,
            silent: false,
            keyframe_wanted: false,
            decoding: !options.inactive_rendition,
            decode_from_keyframe: false,
            sender_hears_us: false,
            joined_at: None,
            join_to_first_frame: None,
            awaiting_first_frame: false,
            rtp_ts_ext: None,
            timestamps_restarted: false,
            last_keyframe: None,
            tail_probe: None,
            latency: LatencySamples::default(),
            outputs: Vec::with_capacity(BATCH * 4),
            events: Vec::with_capacity(16),
            nacks: Vec::with_capacity(64),
            batch_bytes: 0,
            counts: StoreCounts::default(),
            metrics,
            cfg,
        })
    }

    pub fn config(&self) -> &SourceConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    /// The decoder element in use, if any.
    pub fn decoder_name(&self) -> Option<&str> {
        self.decoder.as_ref().map(|d| d.name())
    }

    /// The first `n` datagrams of `batch`, read from the RTP socket at `now`.
    /// Buffers of packets kept are swapped out of the batch, not copied.
    pub fn handle_rtp_batch(&mut self, batch: &mut RecvBatch, n: usize, now: Instant) {
        for i in 0..n {
            self.on_datagram(batch, i, now);
        }
        self.metrics.bytes_received.inc_by(std::mem::take(&mut self.batch_bytes));
        self.coordinate_fec(now);
        self.counts.flush(&self.metrics);
        self.release(now);
    }

    /// A datagram from one of the source's FEC sockets (ST 2022-1).
    pub fn handle_fec(&mut self, datagram: &[u8]) {
        self.metrics.fec_packets_received.inc();
        self.push_fec(datagram);
    }

    /// After FEC datagrams: rebuild what they allow, hand on what is ready.
    pub fn after_fec(&mut self, now: Instant) {
        self.coordinate_fec(now);
        self.counts.flush(&self.metrics);
        self.release(now);
    }

    /// An RTCP compound from the sender, from `from`.
    pub fn handle_rtcp(&mut self, data: &[u8], from: Option<SocketAddr>, now: Instant) {
        let news = match self.session.handle_rtcp(data, from, now) {
            Ok(news) => news,
            Err(_) => {
                self.metrics.discarded("rtcp");
                return;
            }
        };
        if let Some(rtt) = news.rtt {
            self.metrics.rtt.set(rtt.as_secs_f64());
        }
        if let Some(bitrate_bps) = news.bitrate_acknowledged {
            self.metrics.bitrate_acknowledged.set(1);
            tracing::info!(stream = %self.cfg.id(), bitrate_bps, "the sender acknowledged the bit rate asked for");
        }
        if let Some(packet_count) = news.sender_report
            && !self.sender_hears_us
        {
            self.on_sender_found(Some(packet_count), now);
        }
        // A report maps the sender's wallclock to RTP time, extended as the
        // access units are (not across a restart before its first unit).
        if let Some((ntp, rtp_ts)) = news.sender_clock
            && !self.timestamps_restarted
            && let Some((last, ext)) = self.rtp_ts_ext
        {
            self.clock.on_sender_report(ntp, ext + i64::from(rtp_ts.wrapping_sub(last) as i32), SystemTime::now());
            if let Some(offset) = self.clock.offset() {
                self.metrics.sender_clock_offset.set(offset);
            }
            if let Some(ppm) = self.clock.drift_ppm() {
                self.metrics.sender_clock_drift.set(ppm);
            }
        }
        if news.bye && self.bye_at.is_none() {
            tracing::info!(stream = %self.cfg.id(), "the sender said goodbye (RTCP BYE)");
            self.bye_at = Some(now);
            self.sender_left = true;
        }
    }

    /// Timers: release packets whose deadline passed, probe for a lost tail,
    /// notice silence, and the RTCP compound due now (NACKs, keyframe
    /// request, the regular report, a bit rate request), if any. `wall` is
    /// the wallclock for the report's reference time.
    pub fn on_timers(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit<'_>> {
        self.metrics.jitter.set(self.session.jitter_seconds());
        self.release(now);
        self.probe_tail_loss(now);
        self.watch_silence(now);
        self.after_bye(now);
        if let Some(r) = &mut self.restream {
            r.on_timers(now, wall);
        }
        self.feedback(now, wall)
    }

    /// When `on_timers` next has work (at the latest in 100 ms, for silence).
    pub fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = (now + Duration::from_millis(100)).min(self.session.next_report());
        if let Some(t) = self.repair.jitter().next_deadline() {
            wake = wake.min(t);
        }
        wake
    }

    /// The restream's socket, if the source is restreamed: its receivers'
    /// RTCP comes in on it.
    pub fn restream_socket(&self) -> Option<&std::net::UdpSocket> {
        self.restream.as_ref().map(Restream::socket)
    }

    /// The restream's socket is readable: a receiver that asks for a
    /// keyframe (one that joined mid-GOP) gets the source asked at once,
    /// not after the usual pacing of our own requests.
    pub fn on_restream_readable(&mut self) {
        if let Some(r) = &mut self.restream
            && r.read_feedback()
        {
            self.keyframe_wanted = true;
            self.session.allow_keyframe_request();
        }
    }

    /// Switches whether this stream's frames are decoded and fed to the
    /// outputs (a rendition group's path policy turns one member on and the
    /// others off). Turned on, decoding starts at the next keyframe, asked
    /// for at once (PLI); the frames before it count as skipped before a
    /// keyframe. Turned off, the open HLS segment is published and later
    /// frames count as skipped (`inactive_rendition`). Reception, repair and
    /// RTCP go on either way.
    pub fn set_decoding(&mut self, on: bool) {
        if on == self.decoding {
            return;
        }
        self.decoding = on;
        self.metrics.rendition_decoding.set(i64::from(on));
        if on {
            self.decode_from_keyframe = true;
            self.keyframe_wanted = true;
            self.session.allow_keyframe_request();
            // What follows a gap of this source's own timeline.
            if let Some(hls) = &mut self.hls {
                hls.discontinuity();
            }
        } else {
            self.decode_from_keyframe = false;
            if let Some(hls) = &mut self.hls {
                hls.cut();
            }
        }
        tracing::info!(stream = %self.cfg.id(), decoding = on, "rendition switched");
    }

    /// Asks the sender to send at most `bitrate_bps` (`ladder_top`: the top
    /// of its ladder) as the source's `bitrateRequest` says: TMMBR (RFC
    /// 5104) again every second until its TMMBN acknowledges it, or REMB
    /// every second while below the top (see [`RtcpSession::request_bitrate`]).
    pub fn request_bitrate(&mut self, bitrate_bps: u64, ladder_top: bool, now: Instant) {
        if self.session.request_bitrate(bitrate_bps, ladder_top, now) {
            self.metrics.bitrate_requested.set(bitrate_bps as i64);
            // REMB is never acknowledged: -1 says so, where 0 would read as
            // "not yet".
            let method = self.session.bitrate_request_kind();
            self.metrics.bitrate_acknowledged.set(match method {
                zerodrop_core::BitrateRequest::Tmmbr => 0,
                zerodrop_core::BitrateRequest::Remb => -1,
            });
            if self.bitrate_requests_sent.is_none() {
                self.bitrate_requests_sent = Some(self.metrics.bitrate_requests_sent(method));
            }
        }
    }

    /// Whether RTCP comes on the RTP port (rtcp-mux, RFC 5761).
    fn rtcp_muxed(&self) -> bool {
        self.cfg.rtcp_bind.is_none()
    }

    fn on_datagram(&mut self, batch: &mut RecvBatch, i: usize, now: Instant) {
        let datagram = batch.datagram(i);
        // Counted per batch (see `handle_rtp_batch`): an atomic add per packet shows.
        self.batch_bytes += datagram.len() as u64;
        if batch.truncated[i] {
            self.metrics.discarded("rtp_header");
            return;
        }
        if self.cfg.pulled()
            && let Some(control) = crate::ingest::pulled::control_message(datagram)
        {
            self.on_pull_control(control, now);
            return;
        }
        if self.rtcp_muxed() && rtp::is_rtcp(datagram) {
            let from = batch.sources[i];
            self.handle_rtcp(batch.datagram(i), from, now);
            return;
        }
        // Parsed once: the fields below, and the FEC decoder's copy, come
        // from this.
        let packet = match RtpPacket::parse(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.metrics.discarded("rtp_header");
                return;
            }
        };
        let (pt, ssrc, seq, ts, marker, offset, len) = (
            packet.payload_type(),
            packet.ssrc(),
            packet.sequence_number(),
            packet.timestamp(),
            packet.marker_bit(),
            packet.payload_offset(),
            packet.payload_len(),
        );
        let (seq, offset, len, retransmitted) = if pt == self.cfg.payload_type {
            match self.session.media_ssrc() {
                Some(current) if current != ssrc => {
                    // Another sender's packets while ours sends are foreign;
                    // once ours went silent or said goodbye, a new one took over.
                    if self.last_packet.is_some_and(|t| now - t < SILENCE) && !self.sender_left {
                        self.metrics.discarded("ssrc");
                        return;
                    }
                    tracing::info!(stream = %self.cfg.id(), old = current, new = ssrc, "sender restarted with a new SSRC");
                    self.restart(now);
                    self.session.set_media_ssrc(ssrc);
                }
                None => self.session.set_media_ssrc(ssrc),
                _ => {}
            }
            (seq, offset, len, false)
        } else if self.repair.is_fec_payload_type(pt) && self.session.media_ssrc().is_none_or(|s| s == ssrc) {
            // ULPFEC: in the media's sequence space. It fills its number in
            // the jitter buffer (not handed on) and goes to the FEC decoder.
            self.metrics.fec_packets_received.inc();
            let ext = self.repair.extend_fec(seq);
            self.push_fec(datagram);
            let data = batch.take(i, self.repair.jitter_mut().take_spare());
            let filler = StoredPacket {
                data,
                payload_offset: 0,
                payload_len: 0,
                timestamp: ts,
                marker: false,
                arrival: now,
                retransmitted: false,
                fec: true,
            };
            self.store(ext, filler, now);
            return;
        } else if Some(pt) == self.cfg.rtx_payload_type {
            match rtp::parse_rtx(&datagram[offset..offset + len]) {
                Ok(rtx) => {
                    self.metrics.retransmissions_received.inc();
                    (rtx.original_seq, offset + 2, rtx.payload.len(), true)
                }
                Err(_) => {
                    self.metrics.discarded("rtx_header");
                    return;
                }
            }
        } else {
            self.metrics.discarded("payload_type");
            return;
        };
        self.session.on_media(batch.sources[i], now, ts, retransmitted);
        self.last_packet = Some(now);
        if self.silent {
            self.silent = false;
            self.metrics.stream_up.set(1);
            tracing::info!(stream = %self.cfg.id(), "source resumed");
        } else if self.metrics.stream_up.get() == 0 {
            self.metrics.stream_up.set(1);
        }
        let ext = self.repair.extend_media(seq);
        if retransmitted
            && let Some(state) = self.repair.jitter().nack_state(ext)
            && let Some(rtt) = self.session.on_retransmission(state, now)
        {
            self.metrics.rtt.set(rtt.as_secs_f64());
        }
        // A retransmission proves the sender hears us; after its round-trip
        // sample, since the held requests start afresh then.
        if retransmitted && !self.sender_hears_us && self.session.media_ssrc().is_some() {
            self.on_sender_found(None, now);
        }
        // The first packet of a stream that does not begin an access unit
        // means its head was lost, and nothing earlier will reveal the gap.
        let head_probe = self.repair.base_seq() == Some(ext)
            && self.repair.jitter().end().is_none()
            && !retransmitted
            && !self.depay.leads_access_unit(&datagram[offset..offset + len]);
        if !retransmitted {
            self.repair.remember_for_fec(ext, &packet, datagram);
        }
        let data = batch.take(i, self.repair.jitter_mut().take_spare());
        let packet = StoredPacket {
            data,
            payload_offset: offset,
            payload_len: len,
            timestamp: ts,
            marker,
            arrival: now,
            retransmitted,
            fec: false,
        };
        self.store(ext, packet, now);
        if self.joined_at.is_none() {
            self.joined_at = Some(now);
            self.awaiting_first_frame = true;
            // Only where a retransmission could come at all.
            if !self.sender_hears_us && self.cfg.jitter.nack && self.cfg.rtx_payload_type.is_some() {
                self.repair.jitter_mut().hold_losses_until(now + JOIN_HOLD_MAX);
            }
        }
        if head_probe && self.cfg.jitter.nack {
            let n = self.repair.jitter_mut().expect_before(HEAD_PROBE_PACKETS, now);
            tracing::debug!(stream = %self.cfg.id(), n, "stream starts mid access unit; probing for its head");
        }
    }

    fn push_fec(&mut self, datagram: &[u8]) {
        match self.repair.push_fec(datagram) {
            FecPush::Used | FecPush::NotDecoded => {}
            FecPush::NoMediaYet => self.metrics.discarded("fec"),
            FecPush::Unusable(e) => {
                self.metrics.discarded("fec");
                tracing::debug!(stream = %self.cfg.id(), error = %e, "FEC packet not used");
            }
        }
    }

    /// Puts a packet into the jitter buffer and counts what that changed.
    fn store(&mut self, ext: u64, packet: StoredPacket, now: Instant) {
        let stored = self.repair.store(ext, packet, now, false);
        self.counts.add(stored);
    }

    fn coordinate_fec(&mut self, now: Instant) {
        let rtt = self.session.rtt_or_default();
        let counts = &mut self.counts;
        let log = &mut self.recovered_log;
        let round = self.repair.coordinate_fec(
            now,
            rtt,
            &mut |seq, datagram| {
                if let Some(log) = log {
                    log.write(seq, datagram);
                }
            },
            &mut |stored| counts.add(stored),
        );
        for _ in 0..round.malformed {
            self.metrics.discarded("fec");
        }
        if round.nacks_avoided > 0 {
            self.metrics.nacks_avoided.inc_by(round.nacks_avoided);
        }
    }

    /// The sender can hear us now (`sender_hears_us`). Everything still
    /// missing is asked for afresh, a keyframe request that was due goes out
    /// at once, and a sender report's packet count reveals packets sent
    /// before the first one we saw: if nothing was handed on yet, they are
    /// asked for too (on suspicion: the count is the sender's, taken a
    /// moment before the highest packet we hold).
    fn on_sender_found(&mut self, packet_count: Option<u32>, now: Instant) {
        self.sender_hears_us = true;
        if let (Some(count), Some(base), Some(highest)) = (packet_count, self.repair.base_seq(), self.repair.highest_seq()) {
            let received_span = highest - base + 1;
            let before = (count as u64).saturating_sub(received_span).min(HEAD_RECOVERY_MAX);
            if before > 0 && self.cfg.jitter.nack {
                let n = self.repair.jitter_mut().expect_before(before, now);
                if n > 0 {
                    tracing::debug!(stream = %self.cfg.id(), n, "the sender's report shows packets before the first one received; asking for them");
                }
            }
        }
        let jb = self.repair.jitter_mut();
        let held = jb.holding_losses();
        jb.end_hold(now);
        self.session.allow_keyframe_request();
        if let Some(joined) = self.joined_at {
            tracing::info!(
                stream = %self.cfg.id(),
                after_ms = (now - joined).as_millis() as u64,
                by = if packet_count.is_some() { "sender report" } else { "retransmission" },
                losses_held = held,
                "the sender hears us"
            );
        }
    }

    /// A pulled source's session started (its payload type and SDP
    /// parameter sets) or ended (what the old session sent is handed on and
    /// the next packets start afresh, whatever their SSRC).
    fn on_pull_control(&mut self, control: crate::ingest::pulled::Control, now: Instant) {
        use crate::ingest::pulled::Control;
        match control {
            Control::Started(d) => {
                tracing::info!(
                    stream = %self.cfg.id(), payload_type = d.payload_type, sdp_parameter_sets = d.parameter_sets.len(),
                    "pulled source's session started"
                );
                self.cfg.payload_type = d.payload_type;
                if !d.parameter_sets.is_empty() {
                    self.depay.set_out_of_band_parameter_sets(&d.parameter_sets);
                    self.cfg.parameter_sets = d.parameter_sets;
                }
            }
            Control::Ended => {
                if self.session.media_ssrc().is_some() {
                    self.restart(now);
                }
            }
            Control::Malformed => self.metrics.discarded("rtp_header"),
        }
    }

    /// A new sender took over: hand on what the old one sent, then start
    /// afresh.
    fn restart(&mut self, now: Instant) {
        let mut out = std::mem::take(&mut self.outputs);
        self.repair.drain(&mut out);
        self.outputs = out;
        self.deliver(now);
        self.flush_depay(now);
        self.repair.reset();
        // The new stream starts afresh: it must begin with a keyframe, and its
        // timestamps have nothing to do with the old ones.
        self.depay = new_depacketizer(&self.cfg);
        self.timestamps_restarted = true;
        self.clock.restart();
        self.bye_at = None;
        self.sender_left = false;
        if let Some(hls) = &mut self.hls {
            hls.discontinuity();
        }
        self.session.reset();
        self.sender_hears_us = false;
        self.joined_at = None;
        self.awaiting_first_frame = false;
        self.last_keyframe = None;
        self.tail_probe = None;
    }

    /// Moves what the jitter buffer releases through the depacketiser.
    fn release(&mut self, now: Instant) {
        self.repair.pop_ready(now, &mut self.outputs);
        self.deliver(now);
    }

    fn deliver(&mut self, now: Instant) {
        let mut outputs = std::mem::take(&mut self.outputs);
        for o in outputs.drain(..) {
            match o {
                Output::Packet { packet, .. } if packet.fec => self.repair.jitter_mut().recycle(packet.data),
                Output::Packet { packet, .. } => {
                    self.depay.push_packet(packet.payload(), packet.timestamp, packet.marker, packet.arrival, &mut self.events);
                    self.repair.jitter_mut().recycle(packet.data);
                }
                Output::Lost { count, .. } => {
                    self.metrics.packets_unrecovered.inc_by(count);
                    self.depay.push_loss(count);
                }
            }
            self.handle_depay_events(now);
        }
        self.outputs = outputs;
    }

    fn flush_depay(&mut self, now: Instant) {
        self.depay.flush(&mut self.events);
        self.handle_depay_events(now);
    }

    fn handle_depay_events(&mut self, now: Instant) {
        let before = self.depay.counters();
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            match event {
                DepayEvent::Frame(au) => {
                    if !self.decoding {
                        // An inactive rendition: received whole, not decoded.
                        // Its timeline still advances (a wrap may pass while
                        // it waits), and a keyframe answers any request.
                        self.extend_timestamp(au.rtp_timestamp);
                        if au.keyframe {
                            self.keyframe_wanted = false;
                        }
                        self.depay.recycle(au.data);
                        self.metrics.frames_skipped_inactive.inc();
                        // Sent and received whole: dropped / expected stays
                        // this stream's path figure while it is not decoded.
                        self.metrics.frames_expected.inc();
                        continue;
                    }
                    if self.decode_from_keyframe {
                        if !au.keyframe {
                            // Switched on mid-GOP: the decoder starts at a keyframe.
                            self.extend_timestamp(au.rtp_timestamp);
                            self.depay.recycle(au.data);
                            self.metrics.frames_skipped.inc();
                            continue;
                        }
                        self.decode_from_keyframe = false;
                    }
                    if std::mem::take(&mut self.awaiting_first_frame)
                        && let Some(joined) = self.joined_at
                    {
                        let took = now - joined;
                        self.join_to_first_frame = Some(took);
                        self.metrics.join_to_first_frame.set(took.as_secs_f64());
                    }
                    let ts = self.extend_timestamp(au.rtp_timestamp);
                    if au.keyframe {
                        if let Some(last) = self.last_keyframe {
                            self.metrics.gop_interval.set((ts - last) as f64 / self.cfg.clock_rate as f64);
                        }
                        self.last_keyframe = Some(ts);
                        self.keyframe_wanted = false;
                    }
                    let latency = now - au.first_arrival;
                    StreamMetrics::observe(&self.metrics.assembly_latency, latency);
                    self.latency.record(latency.as_secs_f32() * 1000.0);
                    let arrival = SystemTime::now() - now.saturating_duration_since(au.first_arrival);
                    let sender_time = self.clock.sender_time(ts, arrival);
                    if let Some(log) = &mut self.au_log {
                        log.write(&au, sender_time);
                    }
                    if let Some(hls) = &mut self.hls {
                        hls.push(&au.data, ts, au.keyframe, sender_time, au.first_arrival);
                    }
                    if let Some(r) = &mut self.restream {
                        let started = Instant::now();
                        r.push(&au.data, ts, au.keyframe, now);
                        StreamMetrics::observe(&self.metrics.restream_send, started.elapsed());
                    }
                    let pts_ns = (ts.max(0) as u128 * 1_000_000_000 / self.cfg.clock_rate as u128) as u64;
                    let queued = match &mut self.decoder {
                        Some(d) => d.push(au.data, pts_ns, au.first_arrival, au.keyframe, sender_time),
                        None => {
                            // Nobody takes the buffer: the depacketiser reuses it.
                            self.depay.recycle(au.data);
                            true
                        }
                    };
                    if queued {
                        self.metrics.frames_assembled.inc();
                        self.metrics.frames_expected.inc();
                    } else {
                        self.metrics.frames_dropped("decoder_backlog", 1);
                        self.keyframe_wanted = true;
                    }
                }
                DepayEvent::Dropped { reason, frames, .. } => {
                    self.metrics.frames_dropped(reason.as_str(), frames);
                }
                DepayEvent::SkippedBeforeKeyframe { .. } => {
                    self.metrics.frames_skipped.inc();
                }
                DepayEvent::KeyframeNeeded => self.keyframe_wanted = true,
            }
        }
        self.events = events;
        let after = self.depay.counters();
        for _ in before.malformed_packets..after.malformed_packets {
            self.metrics.discarded("depacketize");
        }
        for _ in before.unsupported_packets..after.unsupported_packets {
            self.metrics.discarded("unsupported");
        }
    }

    /// RTP timestamp extended past its 32-bit wrap, relative to the first one.
    fn extend_timestamp(&mut self, ts: u32) -> i64 {
        let ext = match self.rtp_ts_ext {
            None => 0,
            // After a sender restart, continue one frame later so that the
            // decoder's timestamps keep increasing.
            Some((_, ext)) if std::mem::take(&mut self.timestamps_restarted) => ext + self.cfg.clock_rate as i64 / 30,
            Some((last, ext)) => ext + ts.wrapping_sub(last) as i32 as i64,
        };
        self.rtp_ts_ext = Some((ts, ext));
        ext
    }

    /// An access unit still open well after the last packet arrived lost its
    /// tail, and no later packet will reveal the gap: ask for the next packet.
    fn probe_tail_loss(&mut self, now: Instant) {
        let Some(unit) = self.depay.open_unit() else { return };
        if !self.cfg.jitter.nack || self.repair.jitter().held() > 0 {
            return;
        }
        let Some(last) = self.last_packet else { return };
        let (probed_unit, probes, last_probe) = self.tail_probe.unwrap_or((unit, 0, last));
        let (probes, last_probe) = if probed_unit == unit { (probes, last_probe.max(last)) } else { (0, last) };
        let wait = self.session.rtt_or_default().mul_f32(2.0).max(TAIL_PROBE_MIN);
        if probes < MAX_TAIL_PROBES
            && now - last_probe >= wait
            && let Some(seq) = self.repair.jitter_mut().expect_next(now)
        {
            self.metrics.packets_lost.inc();
            self.tail_probe = Some((unit, probes + 1, now));
            tracing::debug!(stream = %self.cfg.id(), seq, "probing for a lost tail");
        }
    }

    /// NACKs due now, keyframe requests, and the regular receiver report.
    fn feedback(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit<'_>> {
        self.nacks.clear();
        let rtt = self.session.rtt_or_default();
        let refused = self.repair.due_nacks(now, rtt, &mut self.nacks);
        if refused > 0 {
            self.metrics.nacks_refused.inc_by(refused);
            tracing::debug!(stream = %self.cfg.id(), refused, asked = self.nacks.len(), packet_rate = self.repair.packet_rate(), budget = ?self.repair.budget(), "retransmission requests refused by the budget");
        }
        let reception = match (self.repair.base_seq(), self.repair.highest_seq()) {
            (Some(base_seq), Some(highest_seq)) => {
                Some(ReceptionCounts { base_seq, highest_seq, received: self.repair.jitter().counters().received })
            }
            _ => None,
        };
        let request = FeedbackRequest { nacks: &self.nacks, keyframe_wanted: self.keyframe_wanted, reception };
        let transmit = self.session.poll_feedback(now, wall, request)?;
        self.metrics.nacks_sent.inc_by(transmit.nacks as u64);
        if transmit.pli {
            self.metrics.keyframe_requests.inc();
        }
        if (transmit.tmmbr_bps.is_some() || transmit.remb_bps.is_some())
            && let Some(sent) = &self.bitrate_requests_sent
        {
            sent.inc();
        }
        Some(transmit)
    }

    fn watch_silence(&mut self, now: Instant) {
        if let Some(last) = self.last_packet
            && !self.silent
            && now - last >= SILENCE
        {
            self.silent = true;
            self.metrics.stream_up.set(0);
            // Viewers get what came before the silence now, not when the
            // next keyframe closes the segment.
            if let Some(hls) = &mut self.hls {
                hls.cut();
            }
            tracing::warn!(stream = %self.cfg.id(), silent_for_s = (now - last).as_secs_f32(), "source went silent");
        }
    }

    /// Once the sender said goodbye and what it sent before has left the
    /// jitter buffer (or waited its latency out), the open access unit is
    /// handed on as it is and the HLS playlist is closed: nothing more comes.
    fn after_bye(&mut self, now: Instant) {
        let Some(at) = self.bye_at else { return };
        if self.repair.jitter().held() > 0 && now - at < self.cfg.jitter.latency {
            return;
        }
        self.bye_at = None;
        self.flush_depay(now);
        if let Some(hls) = &mut self.hls {
            hls.end();
        }
    }

    /// Stops: hands on what the jitter buffer holds and flushes the
    /// depacketiser. The decoder drains in `Finishing::complete`, which may
    /// block and so runs off the receive thread when others share it.
    pub fn finish(mut self, now: Instant) -> Finishing {
        let mut out = std::mem::take(&mut self.outputs);
        self.repair.drain(&mut out);
        self.outputs = out;
        self.deliver(now);
        self.flush_depay(now);
        if let Some(hls) = &mut self.hls {
            hls.end();
        }
        if let Some(r) = &mut self.restream {
            r.end(now, SystemTime::now());
        }
        if let Some((tap, Some(published))) = &self.frames {
            published.frames.remove(&self.cfg.pipeline, &self.cfg.name, tap);
        }
        if let Some(log) = &mut self.au_log {
            log.flush();
        }
        if let Some(log) = &mut self.recovered_log {
            log.flush();
        }
        if let Some(fec) = self.repair.fec() {
            let c = fec.counters();
            tracing::info!(
                stream = %self.cfg.id(), received = c.fec_received, malformed = c.fec_malformed, unusable = c.fec_unusable,
                expired = c.fec_expired, recovered = c.recovered, row = c.recovered_row, column = c.recovered_column,
                media_ignored = c.media_ignored, "FEC decoder"
            );
        }
        Finishing { decoder: self.decoder.take(), stream: self }
    }

    fn report(mut self) -> StreamReport {
        let m = &self.metrics;
        StreamReport {
            pipeline: self.cfg.pipeline.clone(),
            stream: self.cfg.name.clone(),
            decoder: m.decoder(),
            frames_expected: m.frames_expected.get(),
            frames_assembled: m.frames_assembled.get(),
            frames_decoded: m.frames_decoded.get(),
            frames_dropped: m.frames_dropped_total.get(),
            frames_skipped_before_keyframe: m.frames_skipped.get(),
            frames_skipped_inactive_rendition: m.frames_skipped_inactive.get(),
            packets_received: m.packets_received.get(),
            packets_lost: m.packets_lost.get(),
            packets_recovered_nack: m.recovered_nack.get(),
            packets_recovered_fec: m.recovered_fec.get(),
            packets_recovered_reorder: m.recovered_reorder.get(),
            packets_unrecovered: m.packets_unrecovered.get(),
            packets_discarded: m.discarded_total(),
            nacks_sent: m.nacks_sent.get(),
            retransmissions_received: m.retransmissions_received.get(),
            fec_packets_received: m.fec_packets_received.get(),
            nacks_avoided: m.nacks_avoided.get(),
            nacks_refused: m.nacks_refused.get(),
            keyframe_requests: m.keyframe_requests.get(),
            parameter_sets_inserted: self.depay.counters().parameter_sets_inserted,
            join_to_first_frame_ms: self.join_to_first_frame.map(|d| d.as_secs_f64() * 1000.0),
            kernel_udp_drops: m.kernel_drops_total.get(),
            receive_buffer_bytes: m.receive_buffer.get(),
            assembly_latency_ms: LatencySummary { count: self.latency.seen, ..LatencySummary::from_samples(self.latency.samples_mut()) },
        }
    }
}

/// What storing packets changed, summed over a batch and added to the
/// stream's metrics once per batch: an atomic add per packet shows at a
/// million packets a second.
#[derive(Debug, Default, Clone, Copy)]
struct StoreCounts {
    received: u64,
    duplicate: u64,
    late: u64,
    went_missing: u64,
    recovered_fec: u64,
    recovered_nack: u64,
    recovered_reorder: u64,
}

impl StoreCounts {
    fn add(&mut self, s: Stored) {
        match s.outcome {
            PushOutcome::Duplicate => self.duplicate += 1,
            PushOutcome::TooLate => self.late += 1,
            PushOutcome::Stored | PushOutcome::Resynced { .. } => self.received += 1,
        }
        self.went_missing += s.went_missing;
        self.recovered_fec += s.recovered_fec;
        self.recovered_nack += s.recovered_nack;
        self.recovered_reorder += s.recovered_reorder;
    }

    /// Adds the sums to `metrics` and starts again from zero.
    fn flush(&mut self, metrics: &StreamMetrics) {
        let c = std::mem::take(self);
        // The common case is mostly zeros: no atomic adds of zero.
        for (counter, n) in [
            (&metrics.packets_received, c.received),
            (&metrics.packets_duplicate, c.duplicate),
            (&metrics.packets_late, c.late),
            (&metrics.packets_lost, c.went_missing),
            (&metrics.recovered_fec, c.recovered_fec),
            (&metrics.recovered_nack, c.recovered_nack),
            (&metrics.recovered_reorder, c.recovered_reorder),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}

/// A stopped stream whose decoder may still be draining.
pub struct Finishing {
    decoder: Option<Decoder>,
    stream: Stream,
}

impl Finishing {
    /// Whether `complete` may block (a decoder is draining).
    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    /// Waits for the decoder to drain (at most 5 s) and writes the report.
    pub fn complete(mut self) -> StreamReport {
        if let Some(d) = self.decoder.take() {
            d.finish(Duration::from_secs(5));
        }
        self.stream.report()
    }
}

/// Arrival-to-AU-out latencies kept for the report: every sample up to a
/// fixed capacity, then a uniform reservoir sample, so memory stays bounded
/// and nothing allocates once the stream runs.
struct LatencySamples {
    samples: Vec<f32>,
    seen: u64,
    rng: u64,
}

impl Default for LatencySamples {
    fn default() -> Self {
        Self { samples: Vec::with_capacity(Self::CAPACITY), seen: 0, rng: 0x9e37_79b9_7f4a_7c15 }
    }
}

impl LatencySamples {
    const CAPACITY: usize = 1 << 16;

    fn record(&mut self, ms: f32) {
        self.seen += 1;
        if self.samples.len() < Self::CAPACITY {
            self.samples.push(ms);
            return;
        }
        // xorshift64: cheap, and good enough to pick reservoir slots.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let slot = self.rng % self.seen;
        if (slot as usize) < Self::CAPACITY {
            self.samples[slot as usize] = ms;
        }
    }

    fn samples_mut(&mut self) -> &mut [f32] {
        &mut self.samples
    }
}
