//! The test source (`zerodrop send`): real H.264/H.265 from GStreamer, sent as
//! RTP over UDP with a seeded loss model, answering NACKs with RTX and PLI/FIR
//! with a keyframe, and writing the digest of every access unit it encoded so a
//! receiver's output can be checked frame by frame.
//!
//! Sockets: RTP leaves from an even port P and RTCP from P+1 (the pair
//! receivers assume); the receiver's RTCP (NACK, PLI, RR) is read on both.
//! Sender reports go to the destination port + 1 every `--sr-interval-ms`.
//!
//! Loss: the `--loss` model decides per first transmission, in payloader
//! order, so a seed reproduces the same drops. Retransmissions draw from a
//! second instance of `--rtx-loss` (default: the same spec) seeded with
//! `seed ^ RTX_SEED_SALT`, so the timing of NACKs never shifts the drops of
//! first transmissions.

mod pipeline;
mod repair;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use gstreamer as gst;
use serde::Serialize;

pub use pipeline::AuRecord;
pub use repair::PacketHistory;

use zerodrop_dataplane::repair::fec::st2022_1::{Direction, St2022Encoder};
use zerodrop_dataplane::repair::fec::ulpfec::{UlpfecEncoder, UlpfecOutput, UlpfecSettings};
use crate::loss::{LossModel, LossSpec};
use zerodrop_dataplane::ingest::udp::{
    bind_rtp_rtcp_pair, bind_udp, send_to_waiting, unspecified, with_port_offset,
};
use zerodrop_dataplane::rtp::RtpPacket;
use repair::{RtcpResponder, SendShared};

/// XORed into `--seed` for the retransmission loss model.
pub const RTX_SEED_SALT: u64 = 0x5254_585f_4c4f_5353; // "RTX_LOSS"

use zerodrop_core::limits::VIDEO_CLOCK_RATE;
pub use zerodrop_core::Codec;

/// The payloader's `aggregate-mode` (STAP/AP packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AggregateMode {
    None,
    ZeroLatency,
    MaxStap,
}

/// FEC the test sender adds (`--fec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FecArg {
    St2022_1 { columns: u8, rows: u8 },
    Ulpfec { percentage: u8 },
}

impl std::fmt::Display for FecArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FecArg::St2022_1 { columns, rows } => write!(f, "st2022-1:{columns}x{rows}"),
            FecArg::Ulpfec { percentage } => write!(f, "ulpfec:{percentage}"),
        }
    }
}

fn parse_fec(s: &str) -> Result<FecArg, String> {
    let bad = || format!("--fec: expected `st2022-1:LxD` (L, D in 1..=255) or `ulpfec:PERCENT` (1..=100), got {s:?}");
    match s.split_once(':') {
        Some(("st2022-1", shape)) => {
            let (l, d) = shape.split_once('x').ok_or_else(bad)?;
            let (columns, rows): (u8, u8) = (l.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
            if columns == 0 || rows == 0 {
                return Err(bad());
            }
            Ok(FecArg::St2022_1 { columns, rows })
        }
        Some(("ulpfec", pct)) => match pct.parse::<u8>() {
            Ok(percentage @ 1..=100) => Ok(FecArg::Ulpfec { percentage }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("expected a 32-bit number (decimal or 0x-hex), got {s:?}"))
}

fn parse_pattern(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(s.to_string())
    } else {
        Err(format!("expected a videotestsrc pattern name such as smpte, ball or snow, got {s:?}"))
    }
}

/// Command-line arguments of `zerodrop send`; also the in-process
/// configuration (`SendArgs::try_parse_from(["send", "--frames", "60"])`).
#[derive(Debug, Clone, clap::Parser)]
pub struct SendArgs {
    /// Receiver's RTP address.
    #[arg(long, default_value = "127.0.0.1:5004")]
    pub dest: SocketAddr,
    /// Where sender reports go (default: dest port + 1, or dest with --rtcp-mux).
    #[arg(long)]
    pub rtcp_dest: Option<SocketAddr>,
    /// Local RTCP address (NACK/PLI arrive here, SR leave from here); RTP is
    /// bound to its port - 1. Default: an ephemeral even/odd pair.
    #[arg(long)]
    pub rtcp_bind: Option<SocketAddr>,
    /// Send RTP and RTCP on one port (RFC 5761).
    #[arg(long)]
    pub rtcp_mux: bool,
    /// h264 or h265.
    #[arg(long, default_value = "h264")]
    pub codec: Codec,
    #[arg(long, default_value_t = 1280)]
    pub width: u32,
    #[arg(long, default_value_t = 720)]
    pub height: u32,
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// videotestsrc pattern (smpte, ball, snow, ...).
    #[arg(long, default_value = "smpte", value_parser = parse_pattern)]
    pub pattern: String,
    /// Number of frames to send, then EOS (default: until --duration or a signal).
    #[arg(long)]
    pub frames: Option<u64>,
    /// Stop capturing after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Encoder bitrate in kbit/s.
    #[arg(long, default_value_t = 2000)]
    pub bitrate: u32,
    /// Keyframe interval in frames.
    #[arg(long, default_value_t = 60)]
    pub key_int: u32,
    #[arg(long, default_value_t = 96)]
    pub pt: u8,
    /// RTX payload type (RFC 4588, SSRC-multiplexed).
    #[arg(long, default_value_t = 97)]
    pub rtx_pt: u8,
    /// Media SSRC (decimal or 0x-hex; default random).
    #[arg(long, value_parser = parse_u32)]
    pub ssrc: Option<u32>,
    /// RTX SSRC (default random, distinct from --ssrc).
    #[arg(long, value_parser = parse_u32)]
    pub rtx_ssrc: Option<u32>,
    #[arg(long, default_value_t = 1200)]
    pub mtu: u32,
    /// Payloader config-interval. 0: parameter sets only where the encoder puts
    /// them (every IDR), so the digests match what a receiver reassembles.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub config_interval: i32,
    #[arg(long, value_enum, default_value = "zero-latency")]
    pub aggregate_mode: AggregateMode,
    /// Loss model for first transmissions (see `zerodrop relay --help`).
    #[arg(long, default_value = "none")]
    pub loss: LossSpec,
    /// Seed of the loss models.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Loss model for retransmissions (default: the --loss spec; `none` to
    /// make every retransmission arrive).
    #[arg(long)]
    pub rtx_loss: Option<LossSpec>,
    /// Sent packets kept for retransmission.
    #[arg(long, default_value_t = 4096)]
    pub history: usize,
    /// FEC to add, as GStreamer's encoders write it: `st2022-1:LxD` (column
    /// FEC over D rows and row FEC over L columns, each to a port of its own,
    /// media at SSRC 0 as rtpst2022-1-fecenc expects) or `ulpfec:PERCENT`
    /// (RFC 5109, in-band under --fec-pt, one frame's packets together).
    #[arg(long, value_parser = parse_fec)]
    pub fec: Option<FecArg>,
    /// Payload type of the FEC packets.
    #[arg(long, default_value_t = 122)]
    pub fec_pt: u8,
    /// ST 2022-1: where column and row FEC go (default: --dest port + 2, + 4).
    #[arg(long, value_delimiter = ',')]
    pub fec_dest: Option<Vec<SocketAddr>>,
    /// After the last frame, keep answering NACKs this long.
    #[arg(long, default_value_t = 1000)]
    pub linger_ms: u64,
    #[arg(long, default_value_t = 1000)]
    pub sr_interval_ms: u64,
    /// Run this sender's clock this many parts per million fast (negative:
    /// slow) against the machine's, from the moment it starts: its RTP
    /// timestamps and its sender reports' wallclock both follow it, as a
    /// sender machine with a drifting clock would send them.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub clock_ppm: f64,
    #[arg(long, default_value = "zerodrop-send")]
    pub cname: String,
    /// Write `<index> <rtp-timestamp> <digest-hex> <keyframe 0|1> <sender-time-ns>`
    /// per access unit (the time by this sender's clock when the unit's
    /// first packet went out, nanoseconds since the UNIX epoch).
    #[arg(long)]
    pub hashes: Option<PathBuf>,
    /// Write the final counters as JSON.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// No per-second progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The sender's own clock: the machine's, running `rate` times as fast from
/// the moment the sender starts.
#[derive(Debug, Clone, Copy)]
pub struct SenderWallclock {
    start_wall: std::time::SystemTime,
    start: Instant,
    pub rate: f64,
}

impl SenderWallclock {
    pub fn start(ppm: f64) -> Self {
        Self { start_wall: std::time::SystemTime::now(), start: Instant::now(), rate: 1.0 + ppm / 1e6 }
    }

    /// The time by this clock at `at`.
    pub fn at(&self, at: Instant) -> std::time::SystemTime {
        self.start_wall + at.saturating_duration_since(self.start).mul_f64(self.rate)
    }

    pub fn now(&self) -> std::time::SystemTime {
        self.at(Instant::now())
    }
}

/// Live counters of a running sender.
#[derive(Debug, Default)]
pub struct SendCounters {
    pub frames_encoded: Arc<AtomicU64>,
    pub frames_sent: AtomicU64,
    pub keyframes_sent: AtomicU64,
    pub packets_sent: AtomicU64,
    pub packets_dropped: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub nacks_received: AtomicU64,
    pub nacked_packets: AtomicU64,
    pub nack_unknown_seq: AtomicU64,
    pub rtx_sent: AtomicU64,
    pub rtx_dropped: AtomicU64,
    pub plis_received: AtomicU64,
    pub firs_received: AtomicU64,
    /// TMMBR entries addressed to us, REMBs naming our SSRC, and the
    /// encoder bit rate now (kbit/s).
    pub tmmbrs_received: AtomicU64,
    pub rembs_received: AtomicU64,
    pub bitrate_kbps: AtomicU64,
    pub keyframes_forced: AtomicU64,
    pub feedback_other_ssrc: AtomicU64,
    pub srs_sent: AtomicU64,
    pub rtcp_received: AtomicU64,
    pub rtcp_malformed: AtomicU64,
    pub datagrams_ignored: AtomicU64,
    /// FEC packets produced / dropped by their loss models.
    pub fec_sent: AtomicU64,
    pub fec_dropped: AtomicU64,
    pub send_errors: AtomicU64,
    pub last_fraction_lost: AtomicU64,
    /// RTT from the receiver's report blocks, microseconds; u64::MAX = unknown.
    pub rtt_us: AtomicU64,
    /// Set once the appsink has delivered EOS (all frames are out).
    pub eos: AtomicBool,
}

/// A snapshot of [`SendCounters`]. `packets_sent` and `rtx_sent` count every
/// packet offered to the loss model; `*_dropped` of them never hit the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SendStats {
    pub frames_encoded: u64,
    pub frames_sent: u64,
    pub keyframes_sent: u64,
    pub packets_sent: u64,
    pub packets_dropped: u64,
    pub bytes_sent: u64,
    pub nacks_received: u64,
    pub nacked_packets: u64,
    pub nack_unknown_seq: u64,
    pub rtx_sent: u64,
    pub rtx_dropped: u64,
    pub plis_received: u64,
    pub firs_received: u64,
    pub tmmbrs_received: u64,
    pub rembs_received: u64,
    pub bitrate_kbps: u64,
    pub keyframes_forced: u64,
    pub feedback_other_ssrc: u64,
    pub srs_sent: u64,
    pub rtcp_received: u64,
    pub rtcp_malformed: u64,
    pub datagrams_ignored: u64,
    pub fec_sent: u64,
    pub fec_dropped: u64,
    pub send_errors: u64,
    pub rtt_us: Option<u64>,
    pub eos: bool,
}

impl SendCounters {
    fn new() -> Self {
        let c = Self::default();
        c.rtt_us.store(u64::MAX, Ordering::Relaxed);
        c
    }

    pub fn snapshot(&self) -> SendStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rtt = g(&self.rtt_us);
        SendStats {
            frames_encoded: g(&self.frames_encoded),
            frames_sent: g(&self.frames_sent),
            keyframes_sent: g(&self.keyframes_sent),
            packets_sent: g(&self.packets_sent),
            packets_dropped: g(&self.packets_dropped),
            bytes_sent: g(&self.bytes_sent),
            nacks_received: g(&self.nacks_received),
            nacked_packets: g(&self.nacked_packets),
            nack_unknown_seq: g(&self.nack_unknown_seq),
            rtx_sent: g(&self.rtx_sent),
            rtx_dropped: g(&self.rtx_dropped),
            plis_received: g(&self.plis_received),
            firs_received: g(&self.firs_received),
            tmmbrs_received: g(&self.tmmbrs_received),
            rembs_received: g(&self.rembs_received),
            bitrate_kbps: g(&self.bitrate_kbps),
            keyframes_forced: g(&self.keyframes_forced),
            feedback_other_ssrc: g(&self.feedback_other_ssrc),
            srs_sent: g(&self.srs_sent),
            rtcp_received: g(&self.rtcp_received),
            rtcp_malformed: g(&self.rtcp_malformed),
            datagrams_ignored: g(&self.datagrams_ignored),
            fec_sent: g(&self.fec_sent),
            fec_dropped: g(&self.fec_dropped),
            send_errors: g(&self.send_errors),
            rtt_us: (rtt != u64::MAX).then_some(rtt),
            eos: self.eos.load(Ordering::Relaxed),
        }
    }
}

/// What `--summary-json` holds: the configuration that matters for judging a
/// run, and the final counters.
#[derive(Debug, Clone, Serialize)]
pub struct SendSummary {
    pub codec: Codec,
    pub ssrc: u32,
    pub rtx_ssrc: u32,
    pub rtx_pt: u8,
    pub pt: u8,
    pub loss: String,
    pub rtx_loss: String,
    pub seed: u64,
    pub dest: SocketAddr,
    pub rtp_local: SocketAddr,
    pub rtcp_local: SocketAddr,
    #[serde(flatten)]
    pub stats: SendStats,
}

/// The local sockets of a running sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderAddrs {
    /// Where RTP (and RTX) leave from.
    pub rtp: SocketAddr,
    /// Where RTCP leaves from and where NACK/PLI are read (equal to `rtp` with rtcp-mux).
    pub rtcp: SocketAddr,
}

/// The test sender.
pub struct Sender;

impl Sender {
    /// Binds the sockets, builds the pipeline and starts sending on a thread.
    pub fn start(args: SendArgs) -> anyhow::Result<SenderHandle> {
        // rtpst2022-1-fecenc's FEC packets carry SSRC 0 and GStreamer's
        // decoder pairs them with media at SSRC 0.
        let st2022 = matches!(args.fec, Some(FecArg::St2022_1 { .. }));
        let ssrc = args.ssrc.unwrap_or_else(|| if st2022 { 0 } else { rand::random() });
        let rtx_ssrc = args.rtx_ssrc.unwrap_or_else(|| loop {
            let s: u32 = rand::random();
            if s != ssrc {
                break s;
            }
        });
        let (rtp_sock, rtcp_sock) = bind_sockets(&args)?;
        let addrs = SenderAddrs { rtp: rtp_sock.local_addr()?, rtcp: rtcp_sock.local_addr()? };
        let counters = Arc::new(SendCounters::new());
        counters.bitrate_kbps.store(u64::from(args.bitrate), Ordering::Relaxed);
        let pipeline = pipeline::EncoderPipeline::build(&args, ssrc, counters.frames_encoded.clone())?;
        let hashes = match &args.hashes {
            Some(path) => Some(BufWriter::new(
                File::create(path).with_context(|| format!("creating the hashes file {}", path.display()))?,
            )),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let rtcp_dest = args.rtcp_dest.unwrap_or(if args.rtcp_mux { args.dest } else { with_port_offset(args.dest, 1) });
        let summary_base = SendSummary {
            codec: args.codec,
            ssrc,
            rtx_ssrc,
            rtx_pt: args.rtx_pt,
            pt: args.pt,
            loss: args.loss.to_string(),
            rtx_loss: args.rtx_loss.as_ref().unwrap_or(&args.loss).to_string(),
            seed: args.seed,
            dest: args.dest,
            rtp_local: addrs.rtp,
            rtcp_local: addrs.rtcp,
            stats: SendStats::default(),
        };
        let shared = Arc::new(Mutex::new(SendShared {
            history: PacketHistory::new(args.history),
            last_frame: None,
            packet_count: 0,
            octet_count: 0,
        }));
        let wallclock = SenderWallclock::start(args.clock_ppm);
        let responder = RtcpResponder {
            rtcp: rtcp_sock,
            rtp: rtp_sock.try_clone().context("cloning the RTP socket")?,
            rtcp_mux: args.rtcp_mux,
            dest: args.dest,
            rtcp_dest,
            ssrc,
            rtx_ssrc,
            rtx_pt: args.rtx_pt,
            rtx_seq: rand::random(),
            clock_rate: VIDEO_CLOCK_RATE,
            cname: args.cname.clone(),
            sr_interval: Duration::from_millis(args.sr_interval_ms.max(10)),
            rtx_loss: args.rtx_loss.as_ref().unwrap_or(&args.loss).model(args.seed ^ RTX_SEED_SALT),
            encoder: pipeline.encoder(),
            shared: shared.clone(),
            counters: counters.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            last_rrtr: None,
            wallclock,
            max_kbps: args.bitrate,
            mtu: args.mtu,
        };
        let fec = match args.fec {
            None => None,
            Some(FecArg::St2022_1 { columns, rows }) => {
                let dests = match args.fec_dest.as_deref() {
                    Some(&[column, row]) => [column, row],
                    Some(other) => anyhow::bail!("--fec-dest: expected two addresses (column, row), got {}", other.len()),
                    None => [with_port_offset(args.dest, 2), with_port_offset(args.dest, 4)],
                };
                Some(FecSend::St2022_1 {
                    encoder: St2022Encoder::new(columns, rows, args.fec_pt),
                    dests,
                    loss: [args.loss.model(args.seed ^ FEC_SEED_SALT), args.loss.model(args.seed ^ FEC_SEED_SALT.rotate_left(17))],
                })
            }
            Some(FecArg::Ulpfec { percentage }) => Some(FecSend::Ulpfec {
                encoder: UlpfecEncoder::new(UlpfecSettings { payload_type: args.fec_pt, percentage, multipacket: true }),
                loss: args.loss.model(args.seed ^ FEC_SEED_SALT),
            }),
        };
        let worker = SendWorker {
            fec,
            loss: args.loss.model(args.seed),
            args,
            pipeline,
            rtp: rtp_sock,
            shared,
            counters: counters.clone(),
            stop: stop.clone(),
            hashes,
            pending_aus: VecDeque::new(),
            last_ts: None,
            wallclock,
            first_ts: None,
            scratch: Vec::with_capacity(2048),
            summary: summary_base,
        };
        let thread = std::thread::Builder::new()
            .name("zerodrop-send".into())
            .spawn(move || worker.run(responder))
            .context("spawning the sender thread")?;
        Ok(SenderHandle { addrs, counters, stop, thread: Some(thread) })
    }
}

/// A running sender. It ends by itself after `--frames`/`--duration` and the
/// linger; [`stop`](Self::stop) ends it early (EOS, drain, no linger).
pub struct SenderHandle {
    addrs: SenderAddrs,
    counters: Arc<SendCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<SendSummary>>>,
}

impl SenderHandle {
    pub fn addrs(&self) -> SenderAddrs {
        self.addrs
    }

    pub fn stats(&self) -> SendStats {
        self.counters.snapshot()
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the sender to end by itself and returns its summary.
    pub fn wait(mut self) -> anyhow::Result<SendSummary> {
        self.join()
    }

    /// Stops the sender and returns its summary.
    pub fn stop(self) -> anyhow::Result<SendSummary> {
        self.request_stop();
        self.wait()
    }

    fn join(&mut self) -> anyhow::Result<SendSummary> {
        let thread = self.thread.take().ok_or_else(|| anyhow!("sender already joined"))?;
        thread.join().map_err(|_| anyhow!("sender thread panicked"))?
    }
}

impl Drop for SenderHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
            let _ = self.join();
        }
    }
}

/// `zerodrop send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    let stop_signal = zerodrop_dataplane::shutdown::on_signal()?;
    let summary_path = args.summary_json.clone();
    let dest = args.dest;
    let handle = Sender::start(args)?;
    let a = handle.addrs();
    tracing::info!(rtp_local = %a.rtp, rtcp_local = %a.rtcp, %dest, "sending; NACK/PLI are read on rtcp_local");
    let mut stop_requested = false;
    while !handle.is_finished() {
        if !stop_requested && stop_signal.load(std::sync::atomic::Ordering::Relaxed) {
            stop_requested = true;
            handle.request_stop();
        }
        // Only watches for a signal; the sender thread does the work.
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = handle.wait()?;
    let s = &summary.stats;
    tracing::info!(
        frames = s.frames_sent, packets = s.packets_sent, dropped = s.packets_dropped, nacks = s.nacks_received,
        rtx = s.rtx_sent, plis = s.plis_received, "sender finished"
    );
    if let Some(path) = summary_path {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing the send summary to {}", path.display()))?;
    }
    Ok(())
}

fn bind_sockets(args: &SendArgs) -> anyhow::Result<(UdpSocket, UdpSocket)> {
    let default_ip: IpAddr = unspecified(args.dest.ip());
    let rtcp_bind = args.rtcp_bind.unwrap_or(SocketAddr::new(default_ip, 0));
    if args.rtcp_mux {
        let sock = bind_udp(rtcp_bind).with_context(|| format!("binding the RTP/RTCP socket at {rtcp_bind}"))?;
        let clone = sock.try_clone()?;
        return Ok((sock, clone));
    }
    let rtp_bind = match rtcp_bind.port() {
        0 => rtcp_bind,
        1 => anyhow::bail!("--rtcp-bind port must be at least 2 (RTP is bound to its port - 1)"),
        p => SocketAddr::new(rtcp_bind.ip(), p - 1),
    };
    bind_rtp_rtcp_pair(rtp_bind, 1).with_context(|| format!("binding the RTP/RTCP socket pair for {rtcp_bind}"))
}

/// XORed into `--seed` for the FEC loss models: FEC loss never shifts which
/// media packets are lost.
pub const FEC_SEED_SALT: u64 = 0x0fec_5eed_0fec_5eed;

/// The FEC encoder of a running sender, with its loss models.
#[allow(clippy::large_enum_variant, reason = "one per sender, never moved on a hot path")]
enum FecSend {
    St2022_1 { encoder: St2022Encoder, dests: [SocketAddr; 2], loss: [LossModel; 2] },
    Ulpfec { encoder: UlpfecEncoder, loss: LossModel },
}

struct SendWorker {
    fec: Option<FecSend>,
    args: SendArgs,
    pipeline: pipeline::EncoderPipeline,
    rtp: UdpSocket,
    loss: LossModel,
    shared: Arc<Mutex<SendShared>>,
    counters: Arc<SendCounters>,
    stop: Arc<AtomicBool>,
    hashes: Option<BufWriter<File>>,
    pending_aus: VecDeque<AuRecord>,
    last_ts: Option<u32>,
    wallclock: SenderWallclock,
    /// The payloader's first RTP timestamp, from which a drifting clock's
    /// timestamps are scaled.
    first_ts: Option<u32>,
    scratch: Vec<u8>,
    summary: SendSummary,
}

impl SendWorker {
    fn run(mut self, responder: RtcpResponder) -> anyhow::Result<SendSummary> {
        let responder_stop = responder.stop.clone();
        let responder = std::thread::Builder::new()
            .name("zerodrop-send-rtcp".into())
            .spawn(move || responder.run())
            .context("spawning the sender RTCP thread")?;
        let result = self.send_until_eos();
        if result.is_ok() {
            self.linger();
        }
        responder_stop.store(true, Ordering::Relaxed);
        let _ = responder.join();
        if let Some(h) = &mut self.hashes {
            h.flush().context("writing the hashes file")?;
        }
        result?;
        self.summary.stats = self.counters.snapshot();
        Ok(self.summary)
    }

    fn send_until_eos(&mut self) -> anyhow::Result<()> {
        self.pipeline.start()?;
        let started = Instant::now();
        let deadline = self.args.duration.map(|s| started + Duration::from_secs_f64(s.max(0.0)));
        let mut eos_sent_at: Option<Instant> = None;
        let mut next_progress = started + Duration::from_secs(1);
        loop {
            let time_up = deadline.is_some_and(|d| Instant::now() >= d);
            if eos_sent_at.is_none() && (self.stop.load(Ordering::Relaxed) || time_up) {
                self.pipeline.send_eos();
                eos_sent_at = Some(Instant::now());
            }
            if let Some(err) = self.pipeline.pop_error() {
                anyhow::bail!("sender pipeline error: {err}");
            }
            match self.pipeline.appsink.try_pull_sample(gst::ClockTime::from_mseconds(50)) {
                Some(sample) => {
                    if let Some(list) = sample.buffer_list() {
                        for buffer in list.iter() {
                            self.send_buffer(buffer);
                        }
                    } else if let Some(buffer) = sample.buffer() {
                        self.send_buffer(buffer);
                    }
                }
                None if self.pipeline.appsink.is_eos() => break,
                None => {}
            }
            // EOS normally drains in a few frame times; never hang on a stuck pipeline.
            if eos_sent_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                tracing::warn!("sender pipeline did not reach EOS within 5 s of the stop request");
                break;
            }
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(1);
                self.progress(started);
            }
        }
        self.counters.eos.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps the RTCP thread answering NACKs for late repairs of the last frames.
    fn linger(&self) {
        let until = Instant::now() + Duration::from_millis(self.args.linger_ms);
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(20)));
        }
    }

    fn progress(&self, started: Instant) {
        if self.args.quiet {
            return;
        }
        let s = self.counters.snapshot();
        let rtt = s.rtt_us.map_or_else(|| "-".into(), |us| format!("{:.1}ms", us as f64 / 1000.0));
        eprintln!(
            "send {:>5.1}s: frames {} packets {} dropped {} nacks {} rtx {} plis {} rtt {} bitrate {}kbps tmmbrs {} rembs {}",
            started.elapsed().as_secs_f64(),
            s.frames_sent,
            s.packets_sent,
            s.packets_dropped,
            s.nacks_received,
            s.rtx_sent,
            s.plis_received,
            rtt,
            s.bitrate_kbps,
            s.tmmbrs_received,
            s.rembs_received
        );
    }

    fn send_buffer(&mut self, buffer: &gst::BufferRef) {
        let Ok(map) = buffer.map_readable() else {
            self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(packet) = RtpPacket::parse(map.as_slice()) else {
            self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // A drifting clock: the payloader's timestamps, scaled from the
        // first one by the clock's rate.
        let mut scratch = std::mem::take(&mut self.scratch);
        let data: &[u8] = if self.wallclock.rate == 1.0 {
            map.as_slice()
        } else {
            let first = *self.first_ts.get_or_insert(packet.timestamp());
            let ts = first.wrapping_add((f64::from(packet.timestamp().wrapping_sub(first)) * self.wallclock.rate).round() as u32);
            scratch.clear();
            scratch.extend_from_slice(map.as_slice());
            scratch[4..8].copy_from_slice(&ts.to_be_bytes());
            &scratch
        };
        self.send_packet(data, buffer.pts());
        self.scratch = scratch;
    }

    fn send_packet(&mut self, data: &[u8], pts: Option<gst::ClockTime>) {
        let Ok(packet) = RtpPacket::parse(data) else { return };
        let ts = packet.timestamp();
        if self.last_ts != Some(ts) {
            self.last_ts = Some(ts);
            self.start_frame(ts, pts);
        }
        match self.fec.take() {
            None => self.send_media(data),
            Some(FecSend::St2022_1 { mut encoder, dests, mut loss }) => {
                // GStreamer sends the FEC that falls due just before the media packet.
                let result = encoder.push(data, &mut |direction, fec| {
                    let i = match direction {
                        Direction::Column => 0,
                        Direction::Row => 1,
                    };
                    self.send_fec(fec, dests[i], &mut loss[i]);
                });
                if let Err(e) = result {
                    tracing::warn!(error = %e, "ST 2022-1 encoder refused a packet");
                }
                self.send_media(data);
                self.fec = Some(FecSend::St2022_1 { encoder, dests, loss });
            }
            Some(FecSend::Ulpfec { mut encoder, mut loss }) => {
                let dest = self.args.dest;
                let result = encoder.push(data, &mut |kind, out| match kind {
                    // Renumbered to make room for the FEC packets.
                    UlpfecOutput::Media => self.send_media(out),
                    UlpfecOutput::Fec => self.send_fec(out, dest, &mut loss),
                });
                if let Err(e) = result {
                    tracing::warn!(error = %e, "ULPFEC encoder refused a packet");
                }
                self.fec = Some(FecSend::Ulpfec { encoder, loss });
            }
        }
    }

    /// A media packet: kept for retransmission, counted, and sent unless
    /// the loss model drops it.
    fn send_media(&mut self, data: &[u8]) {
        let Ok(packet) = RtpPacket::parse(data) else { return };
        let (seq, ts, payload_len) = (packet.sequence_number(), packet.timestamp(), packet.payload().len());
        {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.history.insert(seq, data);
            shared.packet_count = shared.packet_count.wrapping_add(1);
            shared.octet_count = shared.octet_count.wrapping_add(payload_len as u32);
            if shared.last_frame.is_none_or(|(t, _)| t != ts) {
                shared.last_frame = Some((ts, Instant::now()));
            }
        }
        let c = &self.counters;
        c.packets_sent.fetch_add(1, Ordering::Relaxed);
        c.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        if self.loss.should_drop() {
            c.packets_dropped.fetch_add(1, Ordering::Relaxed);
        } else if send_to_waiting(&self.rtp, data, self.args.dest).is_err() {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn send_fec(&self, data: &[u8], dest: SocketAddr, loss: &mut LossModel) {
        let c = &self.counters;
        c.fec_sent.fetch_add(1, Ordering::Relaxed);
        if loss.should_drop() {
            c.fec_dropped.fetch_add(1, Ordering::Relaxed);
        } else if send_to_waiting(&self.rtp, data, dest).is_err() {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The first packet of a new access unit: count it and write its digest
    /// line, matching the encoder's record by PTS (the payloader keeps it).
    fn start_frame(&mut self, rtp_ts: u32, pts: Option<gst::ClockTime>) {
        self.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.pending_aus.extend(self.pipeline.aus.try_iter());
        let record = match pts {
            Some(pts) => {
                // Records before this PTS produced no packets; they cannot be
                // matched to an RTP timestamp and are left out of the file.
                while self.pending_aus.front().is_some_and(|r| r.pts.is_some_and(|p| p < pts)) {
                    self.pending_aus.pop_front();
                }
                match self.pending_aus.front() {
                    Some(r) if r.pts == Some(pts) => self.pending_aus.pop_front(),
                    _ => None,
                }
            }
            None => self.pending_aus.pop_front(),
        };
        let Some(record) = record else {
            tracing::debug!(rtp_ts, "no encoder record for this access unit");
            return;
        };
        if record.keyframe {
            self.counters.keyframes_sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = &mut self.hashes {
            let sent_ns = self.wallclock.now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let line = writeln!(h, "{} {} {:016x} {} {sent_ns}", record.index, rtp_ts, record.digest, u8::from(record.keyframe));
            if line.is_err() {
                self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
