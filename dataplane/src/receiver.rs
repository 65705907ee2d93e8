//! The receive path of one source: UDP in batches → RTP parse → jitter buffer
//! with NACK/RTX repair → depacketiser → decoder, with RTCP receiver reports,
//! NACKs and keyframe requests going back to the sender.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::SourceConfig;
use crate::decode::Decoder;
use crate::depay::{Depacketizer, DepayEvent};
use crate::repair::fec::{FecDecoder, FecScheme, Outlook};
use crate::repair::jitter::{JitterBuffer, NackBudget, Output, PushOutcome, StoredPacket};
use crate::metrics::StreamMetrics;
use crate::rtp::{self, RtcpEvent, RtpPacket, SeqExtender};
use crate::ingest::udp::{self, RecvBatch};

/// A source is reported silent after this long without a media packet.
const SILENCE: Duration = Duration::from_secs(2);
/// Regular receiver reports (RFC 3550 leaves the interval to the profile;
/// AVPF sends feedback early, between these).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
pub const BATCH: usize = 32;
/// How long an unfinished access unit waits for its next packet before the
/// receiver suspects tail loss (at least; twice the RTT when known).
const TAIL_PROBE_MIN: Duration = Duration::from_millis(40);
/// Packets asked for before a stream's first packet when that packet does not
/// begin an access unit (its parameter sets were lost).
const HEAD_PROBE_PACKETS: u64 = 4;
/// Packets before the first one received asked for at most when a sender
/// report shows they were sent (a keyframe's worth at a few Mbit/s).
const HEAD_RECOVERY_MAX: u64 = 256;
/// The round trip assumed before the first retransmission measures it.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Quarter-second windows the packet rate is measured over (one second).
const RATE_WINDOWS: usize = 4;
/// How long losses are held at the start of a stream at most, waiting for
/// the sender to show it hears us (its first RTCP report or a
/// retransmission). RFC 3550 senders report within a few seconds at most
/// (GStreamer's rtpbin within about a second); past this the stream goes on
/// without.
const JOIN_HOLD_MAX: Duration = Duration::from_secs(3);
/// Media packets the FEC decoder keeps: room for a 2-D ST 2022-1 matrix of
/// 20×20 with column FEC arriving after the next matrix (2·L·D + L).
const FEC_WINDOW: usize = 1024;
/// Probes per unfinished access unit: a tail longer than this is given up.
const MAX_TAIL_PROBES: u32 = 8;

#[derive(Debug, Clone, Default)]
pub struct ReceiverOptions {
    /// Write one line per access unit handed to the decoder:
    /// `index rtp_timestamp digest keyframe`.
    pub au_log: Option<PathBuf>,
    /// Skip decoding (benchmarks that measure the receive path alone).
    pub no_decode: bool,
    /// Told once the sockets are bound and the decoder runs.
    pub readiness: Option<Arc<crate::metrics::Readiness>>,
    /// Write one line per packet FEC rebuilt: `seq xxh3-digest-of-datagram`.
    pub recovered_log: Option<PathBuf>,
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

/// A round-trip sample from a retransmission that arrived for a packet
/// asked for `state.sent` times. Answering a single request, it is exact.
/// After several, which request it answers is ambiguous (Karn); with `e` the
/// estimate (30 ms before any):
/// - with no estimate yet, an answer sooner than e/2 after the last request
///   answers that request: the time since the last (the first figure; later
///   ones correct it);
/// - an answer e/2 or more after the last request most likely answers an
///   earlier one, and the estimate is too low (retries fired before answers
///   could come): the time since the first, an upper bound, taken only up to
///   2e, so one sample at most doubles the estimate;
/// - else the time since the last, a lower bound, when it exceeds e; else
///   nothing (an answer soon after a retry may be an earlier request's, and
///   taking it would pull the estimate down and the retries with it).
///
/// The bound matters under bursty loss, where the first retransmissions are
/// lost too: the time since the first request then measures the retries,
/// not the path, and fed itself unbounded (bench-repair, bursts of 20 at 5%:
/// 13 ms on a 0.1 ms loopback path, packets given up with budget left). On a
/// slow path (60 ms) before any measurement, the first answers come after
/// the first retry, and the upper bound finds the round trip at once.
fn rtt_sample(
    state: crate::repair::jitter::NackState,
    now: Instant,
    estimate: Option<Duration>,
) -> Option<Duration> {
    let (first, last) = (state.first?, state.last?);
    let since_last = now.saturating_duration_since(last);
    let since_first = now.saturating_duration_since(first);
    let e = estimate.unwrap_or(DEFAULT_RTT);
    match state.sent {
        0 => None,
        1 => Some(since_last),
        _ if estimate.is_none() && since_last < e / 2 => Some(since_last),
        _ if since_last >= e / 2 && since_first <= e * 2 => Some(since_first),
        _ => (since_last > e).then_some(since_last),
    }
}

/// RFC 3550 §6.4.1 / A.8 interarrival jitter, in RTP clock units.
#[derive(Debug, Default)]
struct JitterEstimate {
    last_transit: Option<i64>,
    jitter: f64,
}

impl JitterEstimate {
    fn update(&mut self, arrival_ticks: i64, rtp_timestamp: u32) -> f64 {
        let transit = arrival_ticks.wrapping_sub(rtp_timestamp as i64);
        if let Some(last) = self.last_transit {
            let d = (transit - last).unsigned_abs() as f64;
            // Sender clocks wrap at 2^32: a jump that large is a wrap, not jitter.
            if d < (1u64 << 31) as f64 {
                self.jitter += (d - self.jitter) / 16.0;
            }
        }
        self.last_transit = Some(transit);
        self.jitter
    }
}

pub struct Receiver {
    cfg: SourceConfig,
    metrics: StreamMetrics,
    jb: JitterBuffer,
    depay: Depacketizer,
    decoder: Option<Decoder>,
    rtp_socket: UdpSocket,
    rtcp_socket: Option<UdpSocket>,
    media_ssrc: Option<u32>,
    our_ssrc: u32,
    cname: String,
    /// Where RTCP goes: the sender's RTCP source address once seen
    /// (symmetric RTCP, RFC 4961), else derived from its RTP address.
    rtcp_peer: Option<SocketAddr>,
    rtp_peer: Option<SocketAddr>,
    last_sr: Option<(u32, Instant)>,
    rtt: Option<Duration>,
    jitter: JitterEstimate,
    seq: SeqExtender,
    /// First extended sequence number of the current SSRC (RFC 3550 A.3 base).
    base_seq: Option<u64>,
    epoch: Instant,
    last_packet: Option<Instant>,
    silent: bool,
    keyframe_wanted: bool,
    last_pli: Option<Instant>,
    /// The sender has shown that it hears us: its report told us where its
    /// RTCP comes from, or a retransmission answered a request. Until then
    /// losses are held (`JitterBuffer::hold_losses_until`).
    sender_hears_us: bool,
    /// When this stream's first packet came (join-to-first-frame starts).
    joined_at: Option<Instant>,
    /// The bit rate asked of the sender with TMMBR (RFC 5104), whether its
    /// TMMBN acknowledged it, and when to ask again until it does.
    bitrate_request: Option<u64>,
    bitrate_acknowledged: bool,
    next_tmmbr: Instant,
    /// How long the first frame took after `joined_at`, once it came.
    join_to_first_frame: Option<Duration>,
    awaiting_first_frame: bool,
    next_report: Instant,
    report_prior: (u64, u64),
    rtp_ts_ext: Option<(u32, i64)>,
    /// Set when a sender restart broke the timestamp sequence.
    timestamps_restarted: bool,
    last_keyframe: Option<i64>,
    /// Tail probes for the open access unit: (its timestamp, probes, last).
    tail_probe: Option<(u32, u32, Instant)>,
    au_log: Option<BufWriter<File>>,
    au_index: u64,
    latency: LatencySamples,
    rtcp_buf: Vec<u8>,
    outputs: Vec<Output>,
    events: Vec<DepayEvent>,
    nacks: Vec<u64>,
    nack_seqs: Vec<u16>,
    rtcp_events: Vec<RtcpEvent>,
    nack_budget: NackBudget,
    /// Packets received at the start of each of the last rate windows (a
    /// quarter second each), and when: the rate is taken over the oldest, a
    /// second ago, so one quiet quarter between keyframes does not shrink
    /// the retransmission budget just before the next keyframe needs it.
    rate_windows: [(Instant, u64); RATE_WINDOWS],
    rate_window_next: usize,
    /// Media packets per second, measured over the last second.
    packet_rate: f64,
    fec: Option<FecDecoder>,
    /// ST 2022-1 column and row sockets.
    fec_sockets: Vec<UdpSocket>,
    /// ULPFEC: the payload type of FEC packets in the media stream.
    fec_payload_type: Option<u8>,
    /// Recovered datagrams (`seq digest` lines), for checking them.
    recovered_log: Option<BufWriter<File>>,
    /// Bytes of the batch being read, added to the metric once per batch.
    batch_bytes: u64,
    /// The last XR reference times sent (middle 32 bits of NTP, when).
    rrtr_sent: [Option<(u32, Instant)>; 4],
    rrtr_next: usize,
}

fn new_depacketizer(cfg: &SourceConfig) -> Depacketizer {
    let mut depay = Depacketizer::new(cfg.codec);
    depay.set_out_of_band_parameter_sets(&cfg.parameter_sets);
    depay.tolerate_loss_between_units(
        cfg.fec
            .as_ref()
            .is_some_and(|f| f.scheme == FecScheme::Ulpfec),
    );
    depay
}

/// Which of a source's sockets became readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketRole {
    Rtp,
    Rtcp,
    /// The n-th FEC socket (ST 2022-1: 0 = column, 1 = row).
    Fec(u8),
}

/// Runs one source on the calling thread until `stop` is set; returns its
/// final report. (Many sources share a thread through `worker::Worker`.)
pub fn run(
    cfg: SourceConfig,
    metrics: StreamMetrics,
    stop: Arc<AtomicBool>,
    options: ReceiverOptions,
) -> anyhow::Result<StreamReport> {
    let mut worker = crate::ingest::worker::Worker::new()?;
    let id = cfg.id();
    worker.add(Receiver::open(cfg, metrics, &options)?, id, 0)?;
    while !stop.load(Ordering::Relaxed) {
        worker.turn(Duration::from_millis(100))?;
    }
    Ok(worker
        .take_all()
        .pop()
        .map(|(_, _, f)| f.complete())
        .expect("one receiver was added"))
}

impl Receiver {
    /// Binds the source's sockets and starts its decoder.
    pub fn open(
        cfg: SourceConfig,
        metrics: StreamMetrics,
        options: &ReceiverOptions,
    ) -> anyhow::Result<Receiver> {
        let id = cfg.id();
        let (rtp_socket, granted) = udp::bind(cfg.rtp_bind, cfg.receive_buffer)
            .with_context(|| format!("{id}: cannot bind RTP socket {}", cfg.rtp_bind))?;
        let rtcp_socket = match cfg.rtcp_bind {
            Some(addr) => Some(
                udp::bind(addr, 256 << 10)
                    .with_context(|| format!("{id}: cannot bind RTCP socket {addr}"))?
                    .0,
            ),
            None => None,
        };
        let mut fec_sockets = Vec::new();
        if let Some(fec) = &cfg.fec {
            for addr in &fec.binds {
                fec_sockets.push(
                    udp::bind(*addr, cfg.receive_buffer / 4)
                        .with_context(|| format!("{id}: cannot bind FEC socket {addr}"))?
                        .0,
                );
            }
        }
        let recovered_log = match &options.recovered_log {
            Some(path) => Some(BufWriter::new(File::create(path).with_context(|| {
                format!(
                    "{id}: cannot create recovered-packet log {}",
                    path.display()
                )
            })?)),
            None => None,
        };
        metrics.receive_buffer.set(granted as i64);
        if granted < cfg.receive_buffer {
            tracing::warn!(
                stream = %id, requested = cfg.receive_buffer, granted,
                "kernel granted a smaller receive buffer than requested (raise net.core.rmem_max or run with CAP_NET_ADMIN)"
            );
        }
        let decoder = if options.no_decode {
            None
        } else {
            Some(Decoder::start(cfg.codec, cfg.decoder, metrics.clone())?)
        };
        let au_log = match &options.au_log {
            Some(path) => Some(BufWriter::new(File::create(path).with_context(|| {
                format!("{id}: cannot create AU log {}", path.display())
            })?)),
            None => None,
        };
        tracing::info!(
            stream = %id, rtp = %cfg.rtp_bind, rtcp = ?cfg.rtcp_bind, receive_buffer = granted,
            decoder = decoder.as_ref().map_or("none", |d| d.name()), latency_ms = cfg.jitter.latency.as_millis() as u64,
            "receiving"
        );
        if let Some(r) = &options.readiness {
            r.mark_ready(&id);
        }
        let now = Instant::now();
        Ok(Receiver {
            jb: JitterBuffer::new(cfg.jitter.clone()),
            depay: new_depacketizer(&cfg),
            decoder,
            rtp_socket,
            rtcp_socket,
            media_ssrc: None,
            our_ssrc: rand::random(),
            cname: format!("zerodrop-{}@{}", cfg.name, std::process::id()),
            rtcp_peer: None,
            rtp_peer: None,
            last_sr: None,
            rtt: None,
            jitter: JitterEstimate::default(),
            seq: SeqExtender::default(),
            base_seq: None,
            epoch: now,
            last_packet: None,
            silent: false,
            keyframe_wanted: false,
            last_pli: None,
            sender_hears_us: false,
            joined_at: None,
            join_to_first_frame: None,
            bitrate_request: None,
            bitrate_acknowledged: false,
            next_tmmbr: now,
            awaiting_first_frame: false,
            next_report: now + REPORT_INTERVAL,
            report_prior: (0, 0),
            rtp_ts_ext: None,
            timestamps_restarted: false,
            last_keyframe: None,
            tail_probe: None,
            au_log,
            au_index: 0,
            latency: LatencySamples::default(),
            rtcp_buf: Vec::with_capacity(1500),
            outputs: Vec::with_capacity(BATCH * 4),
            events: Vec::with_capacity(16),
            nacks: Vec::with_capacity(64),
            nack_seqs: Vec::with_capacity(64),
            rtcp_events: Vec::with_capacity(8),
            nack_budget: NackBudget::new(cfg.jitter.latency),
            rate_windows: [(now, 0); RATE_WINDOWS],
            rate_window_next: 0,
            packet_rate: 0.0,
            fec: cfg
                .fec
                .as_ref()
                .map(|f| FecDecoder::new(f.scheme, FEC_WINDOW)),
            fec_sockets,
            fec_payload_type: cfg.fec.as_ref().and_then(|f| {
                (f.scheme == FecScheme::Ulpfec)
                    .then_some(f.payload_type)
                    .flatten()
            }),
            recovered_log,
            batch_bytes: 0,
            rrtr_sent: [None; 4],
            rrtr_next: 0,
            metrics,
            cfg,
        })
    }

    /// Where the RTP socket is bound (its port when bound to port 0).
    pub fn local_rtp_addr(&self) -> std::io::Result<SocketAddr> {
        self.rtp_socket.local_addr()
    }

    /// The sockets to watch, with their roles.
    pub fn sockets(&self) -> impl Iterator<Item = (std::os::fd::RawFd, SocketRole)> + '_ {
        use std::os::fd::AsRawFd;
        std::iter::once((self.rtp_socket.as_raw_fd(), SocketRole::Rtp))
            .chain(
                self.rtcp_socket
                    .as_ref()
                    .map(|s| (s.as_raw_fd(), SocketRole::Rtcp)),
            )
            .chain(
                self.fec_sockets
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.as_raw_fd(), SocketRole::Fec(i as u8))),
            )
    }

    /// Reads what is queued on one socket, at most `max_batches` batches (the
    /// rest waits for the next turn, so one busy source cannot starve the
    /// others sharing the thread). Returns whether more may be queued.
    pub fn on_readable(
        &mut self,
        role: SocketRole,
        batch: &mut RecvBatch,
        max_batches: usize,
    ) -> std::io::Result<bool> {
        match role {
            SocketRole::Rtp => {
                for _ in 0..max_batches {
                    let n = batch.recv(&self.rtp_socket)?;
                    if n == 0 {
                        return Ok(false);
                    }
                    let now = Instant::now();
                    for i in 0..n {
                        self.on_datagram(batch, i, now);
                    }
                    self.metrics
                        .bytes_received
                        .inc_by(std::mem::take(&mut self.batch_bytes));
                    self.coordinate_fec(now);
                    self.release(now);
                    if n < batch.capacity() {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            SocketRole::Fec(index) => {
                let sockets = std::mem::take(&mut self.fec_sockets);
                let mut result = Ok(true);
                if let Some(socket) = sockets.get(index as usize) {
                    for _ in 0..max_batches {
                        let n = match batch.recv(socket) {
                            Ok(n) => n,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        };
                        for i in 0..n {
                            self.on_fec_datagram(batch.datagram(i));
                        }
                        if n < batch.capacity() {
                            result = Ok(false);
                            break;
                        }
                    }
                }
                self.fec_sockets = sockets;
                let now = Instant::now();
                self.coordinate_fec(now);
                self.release(now);
                result
            }
            SocketRole::Rtcp => {
                let Some(socket) = self.rtcp_socket.take() else {
                    return Ok(false);
                };
                let mut result = Ok(false);
                for _ in 0..max_batches {
                    let n = match batch.recv(&socket) {
                        Ok(n) => n,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    let now = Instant::now();
                    for i in 0..n {
                        self.on_rtcp(batch.datagram(i), batch.sources[i], now);
                    }
                    if n < batch.capacity() {
                        break;
                    }
                }
                self.rtcp_socket = Some(socket);
                result
            }
        }
    }

    /// Timers: release packets whose deadline passed, probe for a lost tail,
    /// send due feedback, notice silence.
    pub fn on_timers(&mut self, now: Instant) {
        self.metrics
            .jitter
            .set(self.jitter.jitter / self.cfg.clock_rate as f64);
        self.release(now);
        self.probe_tail_loss(now);
        self.feedback(now);
        self.watch_silence(now);
    }

    /// When `on_timers` next has work (at the latest in 100 ms, for silence).
    pub fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = (now + Duration::from_millis(100)).min(self.next_report);
        if let Some(t) = self.jb.next_deadline() {
            wake = wake.min(t);
        }
        wake
    }

    fn on_datagram(&mut self, batch: &mut RecvBatch, i: usize, now: Instant) {
        let datagram = batch.datagram(i);
        // Counted per batch (see `on_readable`): an atomic add per packet shows.
        self.batch_bytes += datagram.len() as u64;
        if batch.truncated[i] {
            self.metrics.discarded("rtp_header");
            return;
        }
        if self.rtcp_socket.is_none() && rtp::is_rtcp(datagram) {
            self.on_rtcp(datagram, batch.sources[i], now);
            return;
        }
        let (pt, ssrc, seq, ts, marker, offset, len) = match RtpPacket::parse(datagram) {
            Ok(p) => (
                p.payload_type(),
                p.ssrc(),
                p.sequence_number(),
                p.timestamp(),
                p.marker_bit(),
                p.payload_offset(),
                p.payload_len(),
            ),
            Err(_) => {
                self.metrics.discarded("rtp_header");
                return;
            }
        };
        let (seq, offset, len, retransmitted) = if pt == self.cfg.payload_type {
            match self.media_ssrc {
                Some(current) if current != ssrc => {
                    if self.last_packet.is_some_and(|t| now - t < SILENCE) {
                        self.metrics.discarded("ssrc");
                        return;
                    }
                    tracing::info!(stream = %self.cfg.id(), old = current, new = ssrc, "sender restarted with a new SSRC");
                    self.restart();
                    self.media_ssrc = Some(ssrc);
                }
                None => self.media_ssrc = Some(ssrc),
                _ => {}
            }
            (seq, offset, len, false)
        } else if pt == self.fec_payload_type.unwrap_or(u8::MAX)
            && self.media_ssrc.is_none_or(|s| s == ssrc)
        {
            // ULPFEC: in the media's sequence space. It fills its number in
            // the jitter buffer (not handed on) and goes to the FEC decoder.
            self.metrics.fec_packets_received.inc();
            let ext = self.seq.extend(seq);
            if let Some(fec) = &mut self.fec {
                let highest = self.seq.highest().unwrap_or(ext);
                if let Err(e) = fec.push_fec(datagram, highest) {
                    self.metrics.discarded("fec");
                    tracing::debug!(stream = %self.cfg.id(), error = %e, "FEC packet not used");
                }
            }
            let data = batch.take(i, self.jb.take_spare());
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
            self.store(ext, filler, now, false);
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
        self.rtp_peer = batch.sources[i];
        self.last_packet = Some(now);
        if self.silent {
            self.silent = false;
            self.metrics.stream_up.set(1);
            tracing::info!(stream = %self.cfg.id(), "source resumed");
        } else if self.metrics.stream_up.get() == 0 {
            self.metrics.stream_up.set(1);
        }
        if !retransmitted {
            let ticks =
                (now - self.epoch).as_nanos() as i64 * self.cfg.clock_rate as i64 / 1_000_000_000;
            // Exported with the timers, not per packet.
            self.jitter.update(ticks, ts);
        }
        let ext = self.seq.extend(seq);
        self.base_seq = Some(self.base_seq.map_or(ext, |b| b.min(ext)));
        if retransmitted
            && let Some(state) = self.jb.nack_state(ext)
            && let Some(sample) = rtt_sample(state, now, self.rtt)
        {
            self.observe_rtt(sample);
        }
        // A retransmission proves the sender hears us; after its round-trip
        // sample, since the held requests start afresh then.
        if retransmitted && !self.sender_hears_us && self.media_ssrc.is_some() {
            self.on_sender_found(None, now);
        }
        // The first packet of a stream that does not begin an access unit
        // means its head was lost, and nothing earlier will reveal the gap.
        let head_probe = self.base_seq == Some(ext)
            && self.jb.end().is_none()
            && !retransmitted
            && !self
                .depay
                .leads_access_unit(&batch.datagram(i)[offset..offset + len]);
        if !retransmitted && let Some(fec) = &mut self.fec {
            fec.push_media(ext, batch.datagram(i));
        }
        let data = batch.take(i, self.jb.take_spare());
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
        self.store(ext, packet, now, false);
        if self.joined_at.is_none() {
            self.joined_at = Some(now);
            self.awaiting_first_frame = true;
            // Only where a retransmission could come at all.
            if !self.sender_hears_us && self.cfg.jitter.nack && self.cfg.rtx_payload_type.is_some() {
                self.jb.hold_losses_until(now + JOIN_HOLD_MAX);
            }
        }
        if head_probe && self.cfg.jitter.nack {
            let n = self.jb.expect_before(HEAD_PROBE_PACKETS, now);
            tracing::debug!(stream = %self.cfg.id(), n, "stream starts mid access unit; probing for its head");
        }
    }

    /// Puts a packet into the jitter buffer and counts what that changed:
    /// packets found missing, and missing ones now here, by how they came.
    fn store(&mut self, ext: u64, packet: StoredPacket, now: Instant, by_fec: bool) -> PushOutcome {
        let before = self.jb.counters();
        let outcome = self.jb.push(ext, packet, now);
        match outcome {
            PushOutcome::Duplicate => self.metrics.packets_duplicate.inc(),
            PushOutcome::TooLate => self.metrics.packets_late.inc(),
            PushOutcome::Stored | PushOutcome::Resynced { .. } => {
                self.metrics.packets_received.inc()
            }
        };
        let after = self.jb.counters();
        if after == before {
            return outcome; // the common case: no atomic adds of zero
        }
        let missing = after.went_missing - before.went_missing;
        if missing > 0 {
            self.metrics.packets_lost.inc_by(missing);
        }
        let recovered = after.recovered - before.recovered;
        if by_fec {
            self.metrics.recovered_fec.inc_by(recovered);
        } else if recovered > 0 {
            let by_nack = after.recovered_by_nack - before.recovered_by_nack;
            if by_nack > 0 {
                self.metrics.recovered_nack.inc_by(by_nack);
            }
            if recovered > by_nack {
                self.metrics.recovered_reorder.inc_by(recovered - by_nack);
            }
        }
        outcome
    }

    /// A datagram on an ST 2022-1 FEC socket.
    fn on_fec_datagram(&mut self, datagram: &[u8]) {
        self.metrics.fec_packets_received.inc();
        let Some(fec) = &mut self.fec else { return };
        let Some(highest) = self.seq.highest() else {
            // Nothing to place it against yet: the media's first packet.
            self.metrics.discarded("fec");
            return;
        };
        if let Err(e) = fec.push_fec(datagram, highest) {
            self.metrics.discarded("fec");
            tracing::debug!(stream = %self.cfg.id(), error = %e, "FEC packet not used");
        }
    }

    /// Lets FEC and NACK work together on what is missing: rebuilds what FEC
    /// can, holds back the request for a packet whose FEC is still to come
    /// (until shortly after it is due), and asks at once for a packet FEC
    /// cannot rebuild.
    fn coordinate_fec(&mut self, now: Instant) {
        let Some(mut fec) = self.fec.take() else {
            return;
        };
        if self.jb.held() > 0 {
            self.recover_from_fec(&mut fec, now);
            let highest = self.seq.highest().unwrap_or(0);
            // Time per media packet, to turn "due after packet N" into a time.
            let per_packet = Duration::from_secs_f64(1.0 / self.packet_rate.max(100.0));
            let rtt = self.rtt.unwrap_or(DEFAULT_RTT);
            let missing_now = std::mem::take(&mut self.nacks);
            let mut missing = missing_now;
            missing.clear();
            missing.extend(self.jb.missing());
            for &seq in &missing {
                let outlook = fec.outlook(seq, highest);
                tracing::trace!(stream = %self.cfg.id(), seq = seq as u16, highest = highest as u16, ?outlook, "FEC outlook");
                match outlook {
                    Outlook::Present | Outlook::Recoverable => {}
                    Outlook::Waiting { fec_due_after } => {
                        // FEC "in time" is FEC no later than a retransmission:
                        // hold the request only while the FEC is due sooner
                        // than an answer to a NACK sent now could come.
                        // Due with media packet `fec_due_after`; a little
                        // slack for pacing, none for the reordering grace
                        // (that is for calling it lost, later).
                        let packets =
                            fec_due_after.saturating_sub(highest).min(u32::MAX as u64) as u32 + 1;
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
            self.nacks = missing;
        }
        self.fec = Some(fec);
    }

    fn recover_from_fec(&mut self, fec: &mut FecDecoder, now: Instant) {
        let Some(limit) = self.jb.end() else { return };
        fec.recover_below(limit, &mut |seq, datagram| {
            self.on_recovered(seq, datagram, now)
        });
    }

    /// A media packet FEC rebuilt: into the jitter buffer like any other.
    fn on_recovered(&mut self, seq: u64, datagram: &[u8], now: Instant) {
        let Ok(p) = RtpPacket::parse(datagram) else {
            self.metrics.discarded("fec");
            return;
        };
        let (offset, len, ts, marker) = (
            p.payload_offset(),
            p.payload_len(),
            p.timestamp(),
            p.marker_bit(),
        );
        // Only what is still missing: `recover_below` rebuilds nothing past
        // the end, but a packet may have been released or given up on since.
        let Some(asked) = self.jb.nack_state(seq).map(|n| n.sent) else {
            return;
        };
        if let Some(log) = &mut self.recovered_log {
            let _ = writeln!(
                log,
                "{} {:016x}",
                seq as u16,
                xxhash_rust::xxh3::xxh3_64(datagram)
            );
        }
        let mut data = self.jb.take_spare();
        data.clear();
        data.extend_from_slice(datagram);
        let packet = StoredPacket {
            data,
            payload_offset: offset,
            payload_len: len,
            timestamp: ts,
            marker,
            arrival: now,
            retransmitted: false,
            fec: false,
        };
        if self.store(seq, packet, now, true) == PushOutcome::Stored && asked == 0 {
            self.metrics.nacks_avoided.inc();
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
        if let (Some(count), Some(base), Some(highest)) =
            (packet_count, self.base_seq, self.seq.highest())
        {
            let received_span = highest - base + 1;
            let before = (count as u64)
                .saturating_sub(received_span)
                .min(HEAD_RECOVERY_MAX);
            if before > 0 && self.cfg.jitter.nack {
                let n = self.jb.expect_before(before, now);
                if n > 0 {
                    tracing::debug!(stream = %self.cfg.id(), n, "the sender's report shows packets before the first one received; asking for them");
                }
            }
        }
        let held = self.jb.holding_losses();
        self.jb.end_hold(now);
        self.last_pli = None;
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

    /// Asks the sender to send at most `bitrate_bps` (TMMBR, RFC 5104),
    /// again every second until its TMMBN acknowledges it.
    pub fn request_bitrate(&mut self, bitrate_bps: u64) {
        if self.bitrate_request == Some(bitrate_bps) {
            return;
        }
        self.bitrate_request = Some(bitrate_bps);
        self.bitrate_acknowledged = false;
        self.next_tmmbr = Instant::now();
        self.metrics.bitrate_requested.set(bitrate_bps as i64);
        self.metrics.bitrate_acknowledged.set(0);
    }

    /// Folds a round-trip sample into the smoothed estimate (RFC 6298 gain).
    fn observe_rtt(&mut self, sample: Duration) {
        let rtt = match self.rtt {
            Some(old) => old.mul_f64(0.875) + sample.mul_f64(0.125),
            None => sample,
        };
        self.rtt = Some(rtt);
        self.metrics.rtt.set(rtt.as_secs_f64());
    }

    fn restart(&mut self) {
        let mut out = std::mem::take(&mut self.outputs);
        self.jb.drain(&mut out);
        self.outputs = out;
        let now = Instant::now();
        self.deliver(now);
        self.flush_depay(now);
        self.jb.reset();
        // The new stream starts afresh: it must begin with a keyframe, and its
        // timestamps have nothing to do with the old ones.
        self.depay = new_depacketizer(&self.cfg);
        self.timestamps_restarted = true;
        // Feedback goes to the new sender: until its first sender report,
        // to its RTP address's RTCP neighbour; its RTT is measured anew.
        self.rtcp_peer = None;
        self.sender_hears_us = false;
        self.joined_at = None;
        self.awaiting_first_frame = false;
        self.last_sr = None;
        self.rtt = None;
        self.last_keyframe = None;
        self.tail_probe = None;
        self.seq = SeqExtender::default();
        self.base_seq = None;
        self.report_prior = (0, 0);
        self.jitter = JitterEstimate::default();
    }

    fn on_rtcp(&mut self, data: &[u8], from: Option<SocketAddr>, now: Instant) {
        self.rtcp_events.clear();
        if rtp::parse_rtcp(data, &mut self.rtcp_events).is_err() {
            self.metrics.discarded("rtcp");
            return;
        }
        for i in 0..self.rtcp_events.len() {
            match self.rtcp_events[i] {
                RtcpEvent::SenderReport {
                    ntp_middle,
                    packet_count,
                    ..
                } => {
                    self.last_sr = Some((ntp_middle, now));
                    self.rtcp_peer = from;
                    if !self.sender_hears_us {
                        self.on_sender_found(Some(packet_count), now);
                    }
                }
                // The sender's echo of our reference time: RTT = now - sent - held.
                RtcpEvent::Tmmbn { ssrc, bitrate_bps, .. } if ssrc == self.our_ssrc => {
                    let asked = self.bitrate_request.map(rtp::tmmb_representable);
                    if asked == Some(bitrate_bps) && !self.bitrate_acknowledged {
                        self.bitrate_acknowledged = true;
                        self.metrics.bitrate_acknowledged.set(1);
                        tracing::info!(stream = %self.cfg.id(), bitrate_bps, "the sender acknowledged the bit rate asked for");
                    }
                }
                RtcpEvent::Dlrr { ssrc, lrr, dlrr } if ssrc == self.our_ssrc => {
                    let sent = self
                        .rrtr_sent
                        .iter()
                        .flatten()
                        .find(|(mid, _)| *mid == lrr)
                        .map(|(_, at)| *at);
                    let held = Duration::from_secs_f64(dlrr as f64 / 65_536.0);
                    if let Some(sample) = sent.and_then(|at| (now - at).checked_sub(held)) {
                        self.observe_rtt(sample);
                    }
                }
                _ => {}
            }
        }
    }

    /// Moves what the jitter buffer releases through the depacketiser.
    fn release(&mut self, now: Instant) {
        self.jb.pop_ready(now, &mut self.outputs);
        self.deliver(now);
    }

    fn deliver(&mut self, now: Instant) {
        let mut outputs = std::mem::take(&mut self.outputs);
        for o in outputs.drain(..) {
            match o {
                Output::Packet { packet, .. } if packet.fec => self.jb.recycle(packet.data),
                Output::Packet { packet, .. } => {
                    self.depay.push_packet(
                        packet.payload(),
                        packet.timestamp,
                        packet.marker,
                        packet.arrival,
                        &mut self.events,
                    );
                    self.jb.recycle(packet.data);
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
                            self.metrics
                                .gop_interval
                                .set((ts - last) as f64 / self.cfg.clock_rate as f64);
                        }
                        self.last_keyframe = Some(ts);
                        self.keyframe_wanted = false;
                    }
                    let latency = now - au.first_arrival;
                    StreamMetrics::observe(&self.metrics.assembly_latency, latency);
                    self.latency.record(latency.as_secs_f32() * 1000.0);
                    if let Some(log) = &mut self.au_log {
                        let _ = writeln!(
                            log,
                            "{} {} {:016x} {}",
                            self.au_index,
                            au.rtp_timestamp,
                            au.content_digest(),
                            au.keyframe as u8
                        );
                    }
                    self.au_index += 1;
                    let pts_ns =
                        (ts.max(0) as u128 * 1_000_000_000 / self.cfg.clock_rate as u128) as u64;
                    let queued = match &mut self.decoder {
                        Some(d) => d.push(au.data, pts_ns, au.first_arrival, au.keyframe),
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
            Some((_, ext)) if std::mem::take(&mut self.timestamps_restarted) => {
                ext + self.cfg.clock_rate as i64 / 30
            }
            Some((last, ext)) => ext + ts.wrapping_sub(last) as i32 as i64,
        };
        self.rtp_ts_ext = Some((ts, ext));
        ext
    }

    /// An access unit still open well after the last packet arrived lost its
    /// tail, and no later packet will reveal the gap: ask for the next packet.
    fn probe_tail_loss(&mut self, now: Instant) {
        let Some(unit) = self.depay.open_unit() else {
            return;
        };
        if !self.cfg.jitter.nack || self.jb.held() > 0 {
            return;
        }
        let Some(last) = self.last_packet else { return };
        let (probed_unit, probes, last_probe) = self.tail_probe.unwrap_or((unit, 0, last));
        let (probes, last_probe) = if probed_unit == unit {
            (probes, last_probe.max(last))
        } else {
            (0, last)
        };
        let wait = self
            .rtt
            .unwrap_or(DEFAULT_RTT)
            .mul_f32(2.0)
            .max(TAIL_PROBE_MIN);
        if probes < MAX_TAIL_PROBES
            && now - last_probe >= wait
            && let Some(seq) = self.jb.expect_next(now)
        {
            self.metrics.packets_lost.inc();
            self.tail_probe = Some((unit, probes + 1, now));
            tracing::debug!(stream = %self.cfg.id(), seq, "probing for a lost tail");
        }
    }

    /// NACKs due now, keyframe requests, and the regular receiver report.
    fn feedback(&mut self, now: Instant) {
        self.nacks.clear();
        let rtt = self.rtt.unwrap_or(DEFAULT_RTT);
        let newest = self.rate_windows[(self.rate_window_next + RATE_WINDOWS - 1) % RATE_WINDOWS];
        if now - newest.0 >= Duration::from_millis(250) {
            let received = self.jb.counters().received;
            let oldest = self.rate_windows[self.rate_window_next];
            let window = now - oldest.0;
            self.packet_rate =
                received.saturating_sub(oldest.1) as f64 / window.as_secs_f64().max(0.25);
            self.nack_budget.set_packet_rate(self.packet_rate);
            self.rate_windows[self.rate_window_next] = (now, received);
            self.rate_window_next = (self.rate_window_next + 1) % RATE_WINDOWS;
        }
        let refused = self.nack_budget.refused;
        self.jb
            .due_nacks(now, rtt, &mut self.nack_budget, &mut self.nacks);
        self.metrics
            .nacks_refused
            .inc_by(self.nack_budget.refused - refused);
        if self.nack_budget.refused > refused {
            tracing::debug!(stream = %self.cfg.id(), refused = self.nack_budget.refused - refused, asked = self.nacks.len(), packet_rate = self.packet_rate, budget = ?self.nack_budget, "retransmission requests refused by the budget");
        }
        let pli_interval = rtt.max(Duration::from_millis(300));
        let pli = self.keyframe_wanted
            && self.media_ssrc.is_some()
            && self.last_pli.is_none_or(|t| now - t >= pli_interval);
        let report_due = now >= self.next_report;
        // A TMMBR goes out at once, then once a second until acknowledged.
        let tmmbr_bps = self.bitrate_request.filter(|_| !self.bitrate_acknowledged && now >= self.next_tmmbr && self.media_ssrc.is_some());
        if tmmbr_bps.is_some() {
            self.next_tmmbr = now + REPORT_INTERVAL;
        }
        if self.nacks.is_empty() && !pli && !report_due && tmmbr_bps.is_none() {
            return;
        }
        if report_due {
            // Even with nobody to report to: a report left due would make
            // the loop wake at once, forever.
            self.next_report = now + REPORT_INTERVAL;
        }
        let Some(peer) = self.feedback_peer() else {
            return;
        };
        let media_ssrc = self.media_ssrc.unwrap_or(0);
        self.nack_seqs.clear();
        self.nack_seqs.extend(self.nacks.iter().map(|&s| s as u16));
        let report = if report_due {
            self.reception_report(now, media_ssrc)
        } else {
            None
        };
        // A reference time with every regular report: a sender that answers
        // with DLRR (ours does; GStreamer's does not) times the round trip
        // without waiting for a loss.
        let rrtr_ntp = report_due.then(|| {
            let ntp = rtp::ntp_timestamp(std::time::SystemTime::now());
            self.rrtr_sent[self.rrtr_next % self.rrtr_sent.len()] = Some(((ntp >> 16) as u32, now));
            self.rrtr_next += 1;
            ntp
        });
        let fb = rtp::ReceiverFeedback {
            report,
            nacks: &self.nack_seqs,
            pli,
            media_ssrc,
            rrtr_ntp,
            tmmbr_bps,
        };
        if rtp::write_receiver_rtcp(self.our_ssrc, &self.cname, &fb, &mut self.rtcp_buf).is_ok() {
            let socket = self.rtcp_socket.as_ref().unwrap_or(&self.rtp_socket);
            if let Err(e) = socket.send_to(&self.rtcp_buf, peer) {
                tracing::debug!(stream = %self.cfg.id(), %peer, error = %e, "RTCP send failed");
            }
        }
        self.metrics.nacks_sent.inc_by(self.nacks.len() as u64);
        if pli {
            self.metrics.keyframe_requests.inc();
            self.last_pli = Some(now);
        }
    }

    fn feedback_peer(&self) -> Option<SocketAddr> {
        if let Some(p) = self.rtcp_peer {
            return Some(p);
        }
        let mut p = self.rtp_peer?;
        if self.rtcp_socket.is_some() {
            p.set_port(p.port().wrapping_add(1));
        }
        Some(p)
    }

    fn reception_report(&mut self, now: Instant, media_ssrc: u32) -> Option<rtp::ReceptionReport> {
        let highest = self.seq.highest()?;
        let c = self.jb.counters();
        let base = self.base_seq?;
        let expected = highest.saturating_sub(base).saturating_add(1);
        let (prior_expected, prior_received) = self.report_prior;
        let expected_interval = expected.saturating_sub(prior_expected);
        let received_interval = c.received.saturating_sub(prior_received);
        let lost_interval = expected_interval.saturating_sub(received_interval);
        self.report_prior = (expected, c.received);
        let fraction = (lost_interval << 8)
            .checked_div(expected_interval)
            .map_or(0, |f| f.min(255) as u8);
        let (lsr, dlsr) = match self.last_sr {
            Some((lsr, at)) => (lsr, ((now - at).as_secs_f64() * 65536.0) as u32),
            None => (0, 0),
        };
        Some(rtp::ReceptionReport {
            media_ssrc,
            fraction_lost: fraction,
            cumulative_lost: expected.saturating_sub(c.received) as u32,
            extended_highest_seq: highest as u32,
            jitter: self.jitter.jitter as u32,
            lsr,
            dlsr,
        })
    }

    fn watch_silence(&mut self, now: Instant) {
        if let Some(last) = self.last_packet
            && !self.silent
            && now - last >= SILENCE
        {
            self.silent = true;
            self.metrics.stream_up.set(0);
            tracing::warn!(stream = %self.cfg.id(), silent_for_s = (now - last).as_secs_f32(), "source went silent");
        }
    }

    /// Stops receiving: hands on what the jitter buffer holds and flushes
    /// the depacketiser. The decoder drains in `Finishing::complete`, which
    /// may block and so runs off the receive thread when others share it.
    pub fn finish(mut self) -> Finishing {
        let now = Instant::now();
        let mut out = std::mem::take(&mut self.outputs);
        self.jb.drain(&mut out);
        self.outputs = out;
        self.deliver(now);
        self.flush_depay(now);
        if let Some(log) = &mut self.au_log {
            let _ = log.flush();
        }
        if let Some(log) = &mut self.recovered_log {
            let _ = log.flush();
        }
        if let Some(fec) = &self.fec {
            let c = fec.counters();
            tracing::info!(
                stream = %self.cfg.id(), received = c.fec_received, malformed = c.fec_malformed, unusable = c.fec_unusable,
                expired = c.fec_expired, recovered = c.recovered, row = c.recovered_row, column = c.recovered_column,
                media_ignored = c.media_ignored, "FEC decoder"
            );
        }
        Finishing {
            decoder: self.decoder.take(),
            receiver: self,
        }
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
            assembly_latency_ms: LatencySummary {
                count: self.latency.seen,
                ..LatencySummary::from_samples(self.latency.samples_mut())
            },
        }
    }
}

/// A stopped receiver whose decoder may still be draining.
pub struct Finishing {
    decoder: Option<Decoder>,
    receiver: Receiver,
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
        self.receiver.report()
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
        Self {
            samples: Vec::with_capacity(Self::CAPACITY),
            seen: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repair::jitter::NackState;

    #[test]
    fn rtt_samples_take_exact_answers_and_bounded_upper_bounds() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let state = |sent, first: u64, last: u64| NackState { sent, first: Some(t0 + ms(first)), last: Some(t0 + ms(last)) };
        // One request: exact.
        assert_eq!(rtt_sample(state(1, 0, 0), t0 + ms(7), Some(ms(30))), Some(ms(7)));
        assert_eq!(rtt_sample(NackState { sent: 0, first: None, last: None }, t0, Some(ms(30))), None);
        // A burst took the first retransmissions: the sixth request was
        // answered 1 ms later on a 1 ms path. Not the 60 ms since the first.
        assert_eq!(rtt_sample(state(6, 0, 59), t0 + ms(60), Some(ms(30))), None);
        assert_eq!(rtt_sample(state(6, 0, 59), t0 + ms(60), None), Some(ms(1)), "the first figure");
        // A 60 ms path, no estimate yet (30 ms): retried at 37.5 ms, the
        // first request's answer comes 22.5 ms later: the round trip is found.
        let t = |us: u64| t0 + Duration::from_micros(us);
        let s = NackState { sent: 2, first: Some(t0), last: Some(t(37_500)) };
        assert_eq!(rtt_sample(s, t(60_000), None), Some(ms(60)));
        // ... but an upper bound never more than doubles the estimate.
        assert_eq!(rtt_sample(s, t(60_000), Some(ms(20))), Some(Duration::from_micros(22_500)));
        assert_eq!(rtt_sample(state(3, 0, 90), t0 + ms(100), Some(ms(8))), Some(ms(10)), "lower bound above the estimate");
        assert_eq!(rtt_sample(state(3, 0, 90), t0 + ms(100), Some(ms(12))), None);
    }

    #[test]
    fn ambiguous_answers_do_not_inflate_a_loopback_estimate() {
        // 200 packets, each answered 0.1 ms after its last request, after 1
        // to 8 requests (a burst takes the earlier retransmissions), retries
        // 5 ms apart: the estimate stays near the path's round trip.
        let t0 = Instant::now();
        let rtt = Duration::from_micros(100);
        // As `observe_rtt`: none until the first sample, which is taken whole.
        let mut estimate: Option<Duration> = None;
        for i in 0..200u32 {
            // Most packets need several requests, as in a long burst.
            let sent = 8 - i % 8;
            let first = t0 + Duration::from_millis(u64::from(i) * 100);
            let last = first + Duration::from_millis(5) * (sent - 1);
            let state = NackState { sent, first: Some(first), last: Some(last) };
            if let Some(sample) = rtt_sample(state, last + rtt, estimate) {
                estimate = Some(estimate.map_or(sample, |e| e.mul_f64(0.875) + sample.mul_f64(0.125)));
            }
        }
        let estimate = estimate.unwrap();
        assert!(estimate < Duration::from_millis(1), "estimate {estimate:?} for a 0.1 ms path");
    }
}
