//! A replay sender for `bench-throughput`: real H.264 RTP, encoded once by
//! GStreamer ([`Clip::encode`]), then sent again and again as one or many
//! live streams ([`ReplaySender`]), each with its own SSRC, sequence numbers
//! and timestamps continuing across loops of the clip.
//!
//! Encoding live would measure x264, not the receiver: one core encodes a
//! 720p30 stream or two, while a receiver core takes hundreds. Replaying costs
//! the sender only the rewritten 12-byte headers: payloads go to the kernel
//! straight from the clip (scatter-gather), many datagrams per `sendmmsg`,
//! and consecutive equal-sized datagrams to one destination as one UDP GSO
//! send (`UDP_SEGMENT`) when the kernel supports it.
//!
//! Two ways to send:
//! - [`ReplaySender::run_rates`]: packet-rate phases (a given rate, or as fast
//!   as the sender can), for throughput; NACKs are not answered.
//! - [`ReplaySender::run_paced`]: every stream a frame per frame interval
//!   (a constant bitrate, the frame's packets as one burst as an encoder's
//!   payloader sends them), seeded loss on first transmissions (after each
//!   stream's first frame, which arrives whole) and on
//!   retransmissions, and NACKs answered with RFC 4588 RTX
//!   (SSRC-multiplexed) from a per-stream history.
//!
//! Sockets: RTP and RTX leave from an even port P; the receivers' RTCP
//! (reports, NACKs) arrives on P + 1, the address receivers assume until a
//! sender report tells them otherwise (none is sent).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use serde::Serialize;
use crate::loss::{LossModel, LossSpec};
use zerodrop_dataplane::rtp::{self, RtcpEvent, RtpPacket};
use crate::sender::RTX_SEED_SALT;
use zerodrop_dataplane::ingest::udp::{self, RecvBatch};

/// `UDP_SEGMENT` from `<linux/udp.h>` (the libc crate defines it for uclibc
/// and Android only).
const UDP_SEGMENT: libc::c_int = 103;
/// Segments per GSO send: the kernel's `UDP_MAX_SEGMENTS` before 6.9.
const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes per GSO send: an IPv4 datagram's 64 KiB less headers.
const GSO_MAX_BYTES: usize = 65_000;
/// Messages per `sendmmsg` call.
const MESSAGES_PER_CALL: usize = 64;
/// RTP clock ticks per frame at 90 kHz and 30 frames per second.
const TICKS_PER_FRAME_30FPS: u32 = 3000;
/// Offered-packet samples are taken at most this often.
const SAMPLE_INTERVAL_NS: u64 = 5_000_000;

/// CLOCK_MONOTONIC in nanoseconds: the clock every process of the benchmark
/// stamps its samples with, so that their timelines line up.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Pins the calling thread (and the threads it starts afterwards) to one core.
pub fn pin_current_thread(core: usize) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays inside it
    // for any core below CPU_SETSIZE, and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What the clip is encoded from and to.
#[derive(Debug, Clone, Serialize)]
pub struct ClipSettings {
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    pub key_int: u32,
    pub mtu: u32,
    pub payload_type: u8,
}

impl Default for ClipSettings {
    fn default() -> Self {
        Self { frames: 300, width: 1280, height: 720, fps: 30, bitrate_kbps: 4000, key_int: 60, mtu: 1200, payload_type: 96 }
    }
}

impl ClipSettings {
    /// The pipeline, as `gst-launch-1.0` would take it.
    pub fn description(&self) -> String {
        format!(
            "videotestsrc is-live=false pattern=smpte num-buffers={frames} \
             ! video/x-raw,width={w},height={h},framerate={fps}/1 \
             ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={kbps} key-int-max={key} option-string=scenecut=0 \
             ! rtph264pay mtu={mtu} config-interval=-1 pt={pt} \
             ! appsink name=sink sync=false max-buffers=0 drop=false",
            frames = self.frames,
            w = self.width,
            h = self.height,
            fps = self.fps,
            kbps = self.bitrate_kbps,
            key = self.key_int,
            mtu = self.mtu,
            pt = self.payload_type,
        )
    }
}

/// One RTP datagram of the clip.
struct ClipPacket {
    data: Vec<u8>,
    payload_offset: usize,
    /// Index of its frame in the clip.
    frame: u32,
}

/// One frame (access unit) of the clip: a run of packets with one timestamp.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClipFrame {
    pub first: usize,
    pub packets: usize,
    pub bytes: usize,
    pub keyframe: bool,
}

/// The encoded stream: RTP datagrams and their frame boundaries.
pub struct Clip {
    pub settings: ClipSettings,
    packets: Vec<ClipPacket>,
    frames: Vec<ClipFrame>,
}

/// A short description of a clip for results files.
#[derive(Debug, Clone, Serialize)]
pub struct ClipSummary {
    pub settings: ClipSettings,
    pub description: String,
    pub frames: usize,
    pub keyframes: usize,
    pub packets: usize,
    pub datagram_bytes: usize,
    pub mean_packets_per_frame: f64,
    pub max_packets_per_frame: usize,
    /// RTP datagram bytes × 8 per second at the clip's frame rate.
    pub bitrate_bps_at_fps: f64,
    pub encode_s: f64,
}

impl Clip {
    /// Encodes the clip in-process and keeps the payloader's datagrams.
    pub fn encode(settings: ClipSettings) -> anyhow::Result<(Self, f64)> {
        let started = Instant::now();
        gst::init().context("initialising GStreamer")?;
        let desc = settings.description();
        let pipeline = gst::parse::launch(&desc)
            .with_context(|| format!("building `{desc}`"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow::anyhow!("`{desc}` is not a pipeline"))?;
        let sink = pipeline
            .by_name("sink")
            .context("appsink `sink` missing")?
            .downcast::<gst_app::AppSink>()
            .map_err(|_| anyhow::anyhow!("`sink` is not an appsink"))?;
        let bus = pipeline.bus().context("pipeline without a bus")?;
        pipeline.set_state(gst::State::Playing).context("starting the encoder pipeline")?;
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        let result = loop {
            if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error])
                && let gst::MessageView::Error(e) = msg.view()
            {
                break Err(anyhow::anyhow!("encoding the clip: {} ({:?})", e.error(), e.debug()));
            }
            match sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
                Some(sample) => {
                    if let Some(list) = sample.buffer_list() {
                        for b in list.iter() {
                            datagrams.push(b.map_readable().context("mapping an RTP buffer")?.as_slice().to_vec());
                        }
                    } else if let Some(b) = sample.buffer() {
                        datagrams.push(b.map_readable().context("mapping an RTP buffer")?.as_slice().to_vec());
                    }
                }
                None if sink.is_eos() => break Ok(()),
                None if started.elapsed() > Duration::from_secs(120) => {
                    break Err(anyhow::anyhow!("encoding {} frames took over 120 s", settings.frames));
                }
                None => {}
            }
        };
        let _ = pipeline.set_state(gst::State::Null);
        result?;
        let clip = Self::from_datagrams(settings, datagrams)?;
        Ok((clip, started.elapsed().as_secs_f64()))
    }

    /// Groups RTP datagrams into frames by timestamp.
    fn from_datagrams(settings: ClipSettings, datagrams: Vec<Vec<u8>>) -> anyhow::Result<Self> {
        let mut packets = Vec::with_capacity(datagrams.len());
        let mut frames: Vec<ClipFrame> = Vec::new();
        let mut last_ts = None;
        for (i, data) in datagrams.into_iter().enumerate() {
            let (ts, offset, keyframe) = {
                let p = RtpPacket::parse(&data).map_err(|e| anyhow::anyhow!("encoder datagram {i} is not RTP: {e:?}"))?;
                (p.timestamp(), p.payload_offset(), carries_idr(p.payload()))
            };
            if last_ts != Some(ts) {
                frames.push(ClipFrame { first: i, packets: 0, bytes: 0, keyframe: false });
                last_ts = Some(ts);
            }
            let f = frames.last_mut().expect("a frame was just pushed");
            f.packets += 1;
            f.bytes += data.len();
            f.keyframe |= keyframe;
            packets.push(ClipPacket { data, payload_offset: offset, frame: (frames.len() - 1) as u32 });
        }
        if frames.is_empty() {
            bail!("the encoder produced no RTP packets");
        }
        if !frames[0].keyframe {
            bail!("the clip does not start with a keyframe");
        }
        Ok(Self { settings, packets, frames })
    }

    pub fn frames(&self) -> &[ClipFrame] {
        &self.frames
    }

    pub fn packet_count(&self) -> usize {
        self.packets.len()
    }

    pub fn datagram_bytes(&self) -> usize {
        self.packets.iter().map(|p| p.data.len()).sum()
    }

    pub fn mean_packets_per_frame(&self) -> f64 {
        self.packets.len() as f64 / self.frames.len() as f64
    }

    /// Bits per second of RTP datagrams when played at `fps`.
    pub fn bitrate_bps(&self, fps: f64) -> f64 {
        self.datagram_bytes() as f64 * 8.0 * fps / self.frames.len() as f64
    }

    pub fn summary(&self, encode_s: f64) -> ClipSummary {
        ClipSummary {
            settings: self.settings.clone(),
            description: self.settings.description(),
            frames: self.frames.len(),
            keyframes: self.frames.iter().filter(|f| f.keyframe).count(),
            packets: self.packets.len(),
            datagram_bytes: self.datagram_bytes(),
            mean_packets_per_frame: self.mean_packets_per_frame(),
            max_packets_per_frame: self.frames.iter().map(|f| f.packets).max().unwrap_or(0),
            bitrate_bps_at_fps: self.bitrate_bps(self.settings.fps as f64),
            encode_s,
        }
    }
}

/// Whether an RTP/H.264 payload (RFC 6184) carries (the start of) an IDR slice.
fn carries_idr(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    let Some(&first) = payload.first() else { return false };
    match first & 0x1f {
        // STAP-A: 16-bit size, NAL unit, repeated.
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                if size == 0 || rest.len() < 2 + size {
                    return false;
                }
                if rest[2] & 0x1f == IDR {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        // FU-A: the FU header names the fragmented unit's type.
        28 => payload.get(1).is_some_and(|h| h & 0x1f == IDR),
        t => t == IDR,
    }
}

/// Whether this machine's kernel takes UDP GSO, and why not when it does not.
#[derive(Debug, Clone, Serialize)]
pub struct GsoSupport {
    pub enabled: bool,
    pub reason: String,
}

impl GsoSupport {
    /// Asks the kernel: `setsockopt(SOL_UDP, UDP_SEGMENT)` fails where UDP GSO
    /// does not exist (before Linux 4.18).
    fn probe(socket: &UdpSocket) -> Self {
        let size: libc::c_int = 1200;
        // SAFETY: valid fd, an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Self { enabled: false, reason: format!("setsockopt(UDP_SEGMENT) failed: {}", io::Error::last_os_error()) };
        }
        // Back to no segmentation by default; each send asks with a cmsg.
        let zero: libc::c_int = 0;
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&zero as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Self { enabled: true, reason: "setsockopt(UDP_SEGMENT) accepted".into() }
    }
}

/// Where the bytes of one iovec come from.
#[derive(Clone, Copy)]
enum Chunk {
    /// Bytes in the batch's arena (rewritten headers, RTX packets).
    Arena { offset: usize, len: usize },
    /// The payload of a clip packet.
    ClipPayload { packet: usize },
}

/// One message of a `sendmmsg` call: one datagram, or with GSO several of
/// equal size (the last may be shorter) to one destination.
#[derive(Clone, Copy)]
struct Message {
    dest: usize,
    first_chunk: usize,
    first_packet: usize,
    chunks: usize,
    /// Chunks per datagram (2 for media: header and payload; 1 for RTX).
    chunks_per_packet: usize,
    packets: usize,
    segment: usize,
    bytes: usize,
    /// A shorter datagram ended it: nothing more may be appended.
    closed: bool,
}

/// Datagrams collected for the next `sendmmsg`.
#[derive(Default)]
struct SendBatch {
    arena: Vec<u8>,
    chunks: Vec<Chunk>,
    messages: Vec<Message>,
    /// Datagram sizes, in batch order.
    sizes: Vec<usize>,
}

impl SendBatch {
    fn clear(&mut self) {
        self.arena.clear();
        self.chunks.clear();
        self.messages.clear();
        self.sizes.clear();
    }

    /// A media datagram: `header` (rewritten) followed by a clip payload.
    fn push_media(&mut self, dest: usize, header: &[u8], packet: usize, size: usize, gso: bool) {
        let offset = self.arena.len();
        self.arena.extend_from_slice(header);
        let first_chunk = self.chunks.len();
        self.chunks.push(Chunk::Arena { offset, len: header.len() });
        self.chunks.push(Chunk::ClipPayload { packet });
        let first_packet = self.sizes.len();
        self.sizes.push(size);
        if gso && let Some(m) = self.messages.last_mut() {
            let fits = m.dest == dest
                && m.chunks_per_packet == 2
                && !m.closed
                && size <= m.segment
                && m.packets < GSO_MAX_SEGMENTS
                && m.bytes + size <= GSO_MAX_BYTES;
            if fits {
                m.chunks += 2;
                m.packets += 1;
                m.bytes += size;
                m.closed = size < m.segment;
                return;
            }
        }
        self.messages.push(Message {
            dest,
            first_chunk,
            first_packet,
            chunks: 2,
            chunks_per_packet: 2,
            packets: 1,
            segment: size,
            bytes: size,
            closed: false,
        });
    }

    /// A datagram built elsewhere (an RTX packet), sent on its own.
    fn push_datagram(&mut self, dest: usize, data: &[u8]) {
        let offset = self.arena.len();
        self.arena.extend_from_slice(data);
        let first_chunk = self.chunks.len();
        self.chunks.push(Chunk::Arena { offset, len: data.len() });
        let first_packet = self.sizes.len();
        self.sizes.push(data.len());
        self.messages.push(Message {
            dest,
            first_chunk,
            first_packet,
            chunks: 1,
            chunks_per_packet: 1,
            packets: 1,
            segment: data.len(),
            bytes: data.len(),
            closed: true,
        });
    }

    /// The same datagrams, one message each (after the kernel refused GSO).
    fn split_messages(&mut self, from: usize) {
        let tail: Vec<Message> = self.messages.drain(from..).collect();
        for m in tail {
            for k in 0..m.packets {
                let size = self.sizes[m.first_packet + k];
                self.messages.push(Message {
                    first_chunk: m.first_chunk + k * m.chunks_per_packet,
                    first_packet: m.first_packet + k,
                    chunks: m.chunks_per_packet,
                    packets: 1,
                    segment: size,
                    bytes: size,
                    closed: true,
                    ..m
                });
            }
        }
    }
}

/// Live and final counts of what the sender offered to the kernel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OfferedCounts {
    /// Datagrams the kernel accepted from `sendmmsg` (media and RTX).
    pub packets: u64,
    pub bytes: u64,
    pub syscalls: u64,
    /// Messages carrying more than one datagram (UDP GSO sends).
    pub gso_messages: u64,
    pub gso_packets: u64,
    /// Datagrams lost to send errors other than a full buffer.
    pub send_errors: u64,
    /// Times a full send buffer made the sender wait.
    pub send_waits: u64,
}

/// A packet-rate phase of a throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct RatePhase {
    pub name: String,
    pub duration_s: f64,
    /// Packets per second; `None`: as fast as the sender can.
    pub rate_pps: Option<f64>,
}

/// What one phase offered.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseOffered {
    pub name: String,
    pub rate_pps: Option<f64>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub packets: u64,
    pub offered_pps: f64,
    /// The sending thread's CPU time / wall time during the phase.
    pub sender_cpu_util: f64,
}

/// A throughput run's sender side.
#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    pub phases: Vec<PhaseOffered>,
    /// (CLOCK_MONOTONIC ns, datagrams offered so far), every few ms.
    pub timeline: Vec<(u64, u64)>,
    pub offered: OfferedCounts,
    pub gso: GsoSupport,
    /// Phases left out because `stop` was set.
    pub stopped_early: bool,
}

/// Settings of a paced (constant-bitrate, lossy, repairing) run.
#[derive(Debug, Clone, Serialize)]
pub struct PacedSettings {
    /// Time between a stream's frames.
    pub frame_interval_s: f64,
    /// Frames are started until this long after the first stream's start.
    pub duration_s: f64,
    /// Stream starts are spread over this long, so that keyframes do not
    /// coincide.
    pub stagger_s: f64,
    /// After the last frame, NACKs are answered this long.
    pub linger_s: f64,
}

/// One stream's sender-side counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamCounts {
    pub ssrc: u32,
    pub frames_sent: u64,
    /// First transmissions, including those the loss model dropped.
    pub packets_sent: u64,
    pub packets_dropped: u64,
    pub nacked_packets: u64,
    pub rtx_sent: u64,
    pub rtx_dropped: u64,
    /// NACKed packets no longer (or never) in the history.
    pub nack_unknown: u64,
}

/// A paced run's sender side.
#[derive(Debug, Clone, Serialize)]
pub struct PacedRun {
    pub streams: Vec<StreamCounts>,
    pub offered: OfferedCounts,
    pub gso: GsoSupport,
    pub wall_s: f64,
    /// Frames started more than 5 ms / 20 ms after they were due, and the
    /// worst delay.
    pub frames_late: u64,
    pub frames_late_20ms: u64,
    pub max_lag_ms: f64,
    /// The sending thread's CPU time / wall time.
    pub sender_cpu_util: f64,
    pub rtcp_datagrams: u64,
    pub rtcp_malformed: u64,
    pub feedback_unknown_ssrc: u64,
}

/// Sent packets a stream can still retransmit: which clip packet and
/// timestamp each sequence number carried.
struct History {
    slots: Vec<Option<(u16, u32, u32)>>,
}

impl History {
    fn new(capacity: usize) -> Self {
        Self { slots: vec![None; capacity.next_power_of_two()] }
    }

    fn insert(&mut self, seq: u16, packet: usize, ts: u32) {
        let n = self.slots.len();
        self.slots[seq as usize % n] = Some((seq, packet as u32, ts));
    }

    fn get(&self, seq: u16) -> Option<(usize, u32)> {
        match self.slots[seq as usize % self.slots.len()] {
            Some((s, packet, ts)) if s == seq => Some((packet as usize, ts)),
            _ => None,
        }
    }
}

struct Stream {
    ssrc: u32,
    rtx_ssrc: u32,
    seq: u16,
    rtx_seq: u16,
    ts_base: u32,
    /// Next clip packet, and how many times the clip was played through.
    cursor: usize,
    loops: u64,
    history: Option<History>,
    loss: LossModel,
    rtx_loss: LossModel,
    counts: StreamCounts,
}

impl Stream {
    fn at_frame_start(&self, clip: &Clip) -> bool {
        let p = &clip.packets[self.cursor];
        clip.frames[p.frame as usize].first == self.cursor
    }

    /// RTP timestamp of clip frame `frame` in the current loop.
    fn timestamp(&self, frames_per_loop: usize, frame: u32, ticks_per_frame: u32) -> u32 {
        let n = self.loops * frames_per_loop as u64 + frame as u64;
        self.ts_base.wrapping_add((n as u32).wrapping_mul(ticks_per_frame))
    }
}

/// Sends one or many replayed streams from one thread.
pub struct ReplaySender {
    clip: Arc<Clip>,
    rtp: UdpSocket,
    rtcp: UdpSocket,
    dests: Vec<libc::sockaddr_in>,
    streams: Vec<Stream>,
    by_ssrc: HashMap<u32, usize>,
    gso: GsoSupport,
    batch: SendBatch,
    offered: OfferedCounts,
    header: Vec<u8>,
    /// RTP clock per frame: 3000 (30 fps) unless a paced run sets its own.
    ticks_per_frame: u32,
    /// Index of the phase `run_rates` is in (for a watcher on another thread).
    pub phase: Arc<AtomicUsize>,
    /// Datagrams offered so far (for a watcher on another thread).
    pub offered_live: Arc<AtomicU64>,
}

fn sockaddr_in(addr: SocketAddr) -> anyhow::Result<libc::sockaddr_in> {
    let SocketAddr::V4(v4) = addr else { bail!("the replay sender sends to IPv4 only, not {addr}") };
    Ok(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    })
}

impl ReplaySender {
    /// One stream per destination (RTP port; RTCP is expected from port + 1).
    /// `history`: packets kept per stream for retransmission (0: none).
    /// `loss` drops first transmissions and retransmissions (in `run_paced`);
    /// stream i's models are seeded with `seed + i` (RTX: `^ RTX_SEED_SALT`,
    /// as `zerodrop send` does).
    pub fn new(clip: Arc<Clip>, dests: &[SocketAddr], history: usize, loss: &LossSpec, seed: u64) -> anyhow::Result<Self> {
        let (rtp, rtcp) = udp::bind_rtp_rtcp_pair("127.0.0.1:0".parse()?, 1).context("binding the replay sender's sockets")?;
        let gso = GsoSupport::probe(&rtp);
        let mut streams = Vec::with_capacity(dests.len());
        let mut by_ssrc = HashMap::new();
        for i in 0..dests.len() {
            let ssrc = 0x5a00_0000 + i as u32;
            by_ssrc.insert(ssrc, i);
            let stream_seed = seed.wrapping_add(i as u64);
            streams.push(Stream {
                ssrc,
                rtx_ssrc: 0x5b00_0000 + i as u32,
                // Spread over the sequence space; any start must work.
                seq: (i as u16).wrapping_mul(7919),
                rtx_seq: 0,
                ts_base: (i as u32).wrapping_mul(0x9e37_79b9),
                cursor: 0,
                loops: 0,
                history: (history > 0).then(|| History::new(history)),
                loss: loss.model(stream_seed),
                rtx_loss: loss.model(stream_seed ^ RTX_SEED_SALT),
                counts: StreamCounts { ssrc, ..StreamCounts::default() },
            });
        }
        Ok(Self {
            clip,
            rtp,
            rtcp,
            dests: dests.iter().map(|d| sockaddr_in(*d)).collect::<anyhow::Result<_>>()?,
            streams,
            by_ssrc,
            gso,
            batch: SendBatch::default(),
            offered: OfferedCounts::default(),
            header: Vec::with_capacity(64),
            ticks_per_frame: TICKS_PER_FRAME_30FPS,
            phase: Arc::new(AtomicUsize::new(0)),
            offered_live: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn gso(&self) -> &GsoSupport {
        &self.gso
    }

    /// Sends one datagram per message from now on.
    pub fn disable_gso(&mut self, reason: &str) {
        self.gso = GsoSupport { enabled: false, reason: reason.to_string() };
    }

    /// Where the sender's RTP leaves from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.rtp.local_addr()
    }

    /// Appends stream `s`'s next clip packet to the batch (or, when the loss
    /// model drops it, only records it). Returns whether it ended a frame.
    fn push_next(&mut self, s: usize, lossy: bool) -> bool {
        let clip = self.clip.clone();
        let frames_per_loop = clip.frames.len();
        let stream = &mut self.streams[s];
        let p = &clip.packets[stream.cursor];
        let frame = clip.frames[p.frame as usize];
        let ts = stream.timestamp(frames_per_loop, p.frame, self.ticks_per_frame);
        let seq = stream.seq;
        if stream.cursor == frame.first {
            stream.counts.frames_sent += 1;
        }
        self.header.clear();
        self.header.extend_from_slice(&p.data[..p.payload_offset]);
        write_header_fields(&mut self.header, seq, ts, stream.ssrc);
        if let Some(h) = &mut stream.history {
            h.insert(seq, stream.cursor, ts);
        }
        stream.counts.packets_sent += 1;
        // A stream's first frame arrives whole: the concurrency search judges
        // repair at capacity, not whether a receiver finds packets lost
        // before the first one it saw (GStreamer's jitterbuffer cannot).
        let dropped = lossy && stream.counts.frames_sent > 1 && stream.loss.should_drop();
        let packet = stream.cursor;
        stream.seq = seq.wrapping_add(1);
        stream.cursor += 1;
        let frame_end = stream.cursor == frame.first + frame.packets;
        if stream.cursor == clip.packets.len() {
            stream.cursor = 0;
            stream.loops += 1;
        }
        if dropped {
            stream.counts.packets_dropped += 1;
        } else {
            self.batch.push_media(s, &self.header, packet, p.data.len(), self.gso.enabled);
        }
        frame_end
    }

    /// Sends the batch: `sendmmsg` in calls of up to 64 messages, waiting
    /// for buffer space when the kernel asks to.
    fn flush(&mut self) {
        if self.batch.messages.is_empty() {
            return;
        }
        let mut done = 0;
        while done < self.batch.messages.len() {
            match self.send_messages(done) {
                Ok(n) => done += n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS)) => {
                    self.offered.send_waits += 1;
                    let mut fd = libc::pollfd { fd: self.rtp.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut fd, 1, 10) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.batch.messages[done].packets > 1 && self.gso.enabled => {
                    self.gso = GsoSupport { enabled: false, reason: format!("a GSO send failed ({e}); sending without GSO") };
                    self.batch.split_messages(done);
                }
                Err(_) => {
                    self.offered.send_errors += self.batch.messages[done].packets as u64;
                    done += 1;
                }
            }
        }
        self.batch.clear();
        self.offered_live.store(self.offered.packets, Ordering::Relaxed);
    }

    /// One `sendmmsg` of the messages from `from`; returns how many the
    /// kernel took.
    fn send_messages(&mut self, from: usize) -> io::Result<usize> {
        let messages = &self.batch.messages[from..(from + MESSAGES_PER_CALL).min(self.batch.messages.len())];
        let first_chunk = messages[0].first_chunk;
        let last = messages[messages.len() - 1];
        let chunks = &self.batch.chunks[first_chunk..last.first_chunk + last.chunks];
        let mut iovs: Vec<libc::iovec> = chunks
            .iter()
            .map(|c| match *c {
                Chunk::Arena { offset, len } => libc::iovec {
                    iov_base: self.batch.arena[offset..offset + len].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                },
                Chunk::ClipPayload { packet } => {
                    let p = &self.clip.packets[packet];
                    let payload = &p.data[p.payload_offset..];
                    libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() }
                }
            })
            .collect();
        // One cmsg per message: SOL_UDP / UDP_SEGMENT / u16, 8-byte aligned.
        let mut controls: Vec<[u64; 4]> = vec![[0; 4]; messages.len()];
        // SAFETY: all-zero is a valid mmsghdr.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; messages.len()];
        for (i, m) in messages.iter().enumerate() {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&self.dests[m.dest] as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iovs[m.first_chunk - first_chunk..].as_mut_ptr();
            h.msg_iovlen = m.chunks;
            if m.packets > 1 {
                // SAFETY: CMSG_SPACE of a u16 is 24 bytes, within the 32-byte
                // control buffer; CMSG_FIRSTHDR returns its start, and the
                // header and data writes stay inside it.
                unsafe {
                    h.msg_control = controls[i].as_mut_ptr().cast();
                    h.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
                    let cmsg = libc::CMSG_FIRSTHDR(h);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), m.segment as u16);
                }
            }
        }
        // SAFETY: every header points at iovecs, addresses and control
        // buffers that live until the call returns; lengths match.
        let n = unsafe { libc::sendmmsg(self.rtp.as_raw_fd(), hdrs.as_mut_ptr(), hdrs.len() as libc::c_uint, 0) };
        self.offered.syscalls += 1;
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for m in &messages[..n] {
            self.offered.packets += m.packets as u64;
            self.offered.bytes += m.bytes as u64;
            if m.packets > 1 {
                self.offered.gso_messages += 1;
                self.offered.gso_packets += m.packets as u64;
            }
        }
        Ok(n)
    }

    /// Sends `frames` whole frames of every stream, a frame of each in turn,
    /// as fast as the kernel takes them, with no loss: a fill for receivers
    /// that hold everything in their socket buffers. Returns each stream's
    /// counts so far.
    pub fn send_frames(&mut self, frames: u64) -> Vec<StreamCounts> {
        for _ in 0..frames {
            for s in 0..self.streams.len() {
                while !self.push_next(s, false) {}
            }
            if self.batch.sizes.len() >= 512 {
                self.flush();
            }
        }
        self.flush();
        self.streams.iter().map(|s| s.counts.clone()).collect()
    }

    /// Sends the phases one after another, round-robin over the streams.
    /// Sets `stop` to end early (the phases not reached are left out).
    pub fn run_rates(&mut self, phases: &[RatePhase], stop: &AtomicBool) -> RateRun {
        let mut out = Vec::new();
        let mut timeline = vec![(monotonic_ns(), 0)];
        let mut last_sample = timeline[0].0;
        let mut next_stream = 0;
        let mut stopped_early = false;
        precise_sleeps();
        for (k, phase) in phases.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                stopped_early = true;
                break;
            }
            self.phase.store(k, Ordering::Relaxed);
            let start = monotonic_ns();
            let cpu_start = thread_cpu_s();
            let end = start + (phase.duration_s * 1e9) as u64;
            let before = self.offered.packets;
            let mut queued: u64 = 0;
            loop {
                let now = monotonic_ns();
                if now >= end || stop.load(Ordering::Relaxed) {
                    break;
                }
                // Whole frames, as a payloader sends them: a burst of a
                // frame's packets, the bursts paced to the packet rate.
                let want = match phase.rate_pps {
                    None => 512,
                    Some(rate) => {
                        let due = ((now - start) as f64 * 1e-9 * rate) as u64 + 1;
                        if due <= queued {
                            let next = start + ((queued as f64 / rate) * 1e9) as u64;
                            pace_until(next.min(end));
                            continue;
                        }
                        (due - queued).min(512)
                    }
                };
                let mut pushed = 0;
                while pushed < want {
                    pushed += 1;
                    if self.push_next(next_stream, false) {
                        next_stream = (next_stream + 1) % self.streams.len();
                    }
                }
                while !self.streams[next_stream].at_frame_start(&self.clip) {
                    pushed += 1;
                    if self.push_next(next_stream, false) {
                        next_stream = (next_stream + 1) % self.streams.len();
                    }
                }
                queued += pushed;
                self.flush();
                if now - last_sample >= SAMPLE_INTERVAL_NS {
                    last_sample = now;
                    timeline.push((now, self.offered.packets));
                }
            }
            let end_ns = monotonic_ns();
            timeline.push((end_ns, self.offered.packets));
            let packets = self.offered.packets - before;
            out.push(PhaseOffered {
                name: phase.name.clone(),
                rate_pps: phase.rate_pps,
                start_ns: start,
                end_ns,
                packets,
                offered_pps: packets as f64 / ((end_ns - start) as f64 * 1e-9),
                sender_cpu_util: (thread_cpu_s() - cpu_start) / ((end_ns - start) as f64 * 1e-9),
            });
        }
        self.phase.store(phases.len(), Ordering::Relaxed);
        RateRun { phases: out, timeline, offered: self.offered.clone(), gso: self.gso.clone(), stopped_early }
    }

    /// Every stream sends a frame each `frame_interval`, starting staggered;
    /// NACKs are answered with RTX until `linger` after the last frame.
    pub fn run_paced(&mut self, settings: &PacedSettings) -> anyhow::Result<PacedRun> {
        precise_sleeps();
        // RTP time runs with the wall clock, as a live source's does.
        self.ticks_per_frame = (settings.frame_interval_s * 90_000.0).round() as u32;
        let started = Instant::now();
        let cpu_start = thread_cpu_s();
        let interval = Duration::from_secs_f64(settings.frame_interval_s);
        let end = started + Duration::from_secs_f64(settings.duration_s);
        let linger_end = end + Duration::from_secs_f64(settings.linger_s);
        let n = self.streams.len();
        let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..n)
            .map(|i| {
                // Golden-ratio spread: any prefix of the streams is spread evenly.
                let phase = (i as f64 * 0.618_033_988_749_895).fract();
                Reverse((started + Duration::from_secs_f64(settings.stagger_s * phase), i))
            })
            .collect();
        let mut run = PacedRun {
            streams: Vec::new(),
            offered: OfferedCounts::default(),
            gso: self.gso.clone(),
            wall_s: 0.0,
            frames_late: 0,
            frames_late_20ms: 0,
            max_lag_ms: 0.0,
            sender_cpu_util: 0.0,
            rtcp_datagrams: 0,
            rtcp_malformed: 0,
            feedback_unknown_ssrc: 0,
        };
        let mut rx = RecvBatch::new(32);
        let mut events = Vec::new();
        let mut scratch = Vec::with_capacity(2048);
        let mut rtx = Vec::with_capacity(2048);
        loop {
            let now = Instant::now();
            while let Some(&Reverse((t, s))) = due.peek() {
                if t > now || t >= end {
                    break;
                }
                due.pop();
                let lag = now - t;
                if lag > Duration::from_millis(5) {
                    run.frames_late += 1;
                }
                if lag > Duration::from_millis(20) {
                    run.frames_late_20ms += 1;
                }
                run.max_lag_ms = run.max_lag_ms.max(lag.as_secs_f64() * 1000.0);
                while !self.push_next(s, true) {}
                due.push(Reverse((t + interval, s)));
                if self.batch.messages.len() >= MESSAGES_PER_CALL * 4 {
                    self.flush();
                }
            }
            self.flush();
            for socket in 0..2 {
                loop {
                    let got = {
                        let sock = if socket == 0 { &self.rtcp } else { &self.rtp };
                        rx.recv(sock).context("receiving RTCP on the replay sender")?
                    };
                    for i in 0..got {
                        run.rtcp_datagrams += 1;
                        events.clear();
                        if rtp::parse_rtcp(rx.datagram(i), &mut events).is_err() {
                            run.rtcp_malformed += 1;
                        }
                        for e in events.drain(..) {
                            if let RtcpEvent::Nack { media_ssrc, seqs } = e {
                                match self.by_ssrc.get(&media_ssrc) {
                                    Some(&s) => {
                                        for seq in seqs {
                                            self.retransmit(s, seq, &mut scratch, &mut rtx);
                                        }
                                    }
                                    None => run.feedback_unknown_ssrc += 1,
                                }
                            }
                        }
                    }
                    if got < 32 {
                        break;
                    }
                }
            }
            self.flush();
            let now = Instant::now();
            let next = match due.peek() {
                Some(&Reverse((t, _))) if t < end => t,
                _ if now >= linger_end => break,
                _ => linger_end,
            };
            if next > now {
                wait_readable(&[&self.rtcp, &self.rtp], next - now);
            }
        }
        run.wall_s = started.elapsed().as_secs_f64();
        run.sender_cpu_util = (thread_cpu_s() - cpu_start) / run.wall_s;
        run.offered = self.offered.clone();
        run.gso = self.gso.clone();
        run.streams = self.streams.iter().map(|s| s.counts.clone()).collect();
        Ok(run)
    }

    /// Answers one NACKed sequence number of stream `s` with an RTX packet.
    fn retransmit(&mut self, s: usize, seq: u16, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
        let clip = self.clip.clone();
        let stream = &mut self.streams[s];
        stream.counts.nacked_packets += 1;
        let Some((packet, ts)) = stream.history.as_ref().and_then(|h| h.get(seq)) else {
            stream.counts.nack_unknown += 1;
            return;
        };
        let p = &clip.packets[packet];
        scratch.clear();
        scratch.extend_from_slice(&p.data);
        write_header_fields(scratch, seq, ts, stream.ssrc);
        let built = match RtpPacket::parse(scratch) {
            Ok(original) => rtp::write_rtx(&original, RTX_PAYLOAD_TYPE, stream.rtx_ssrc, stream.rtx_seq, out).is_ok(),
            Err(_) => false,
        };
        if !built {
            stream.counts.nack_unknown += 1;
            return;
        }
        stream.rtx_seq = stream.rtx_seq.wrapping_add(1);
        stream.counts.rtx_sent += 1;
        if stream.rtx_loss.should_drop() {
            stream.counts.rtx_dropped += 1;
        } else {
            self.batch.push_datagram(s, out);
        }
    }
}

/// The RTX payload type of the paced runs (the manifests say so too).
pub const RTX_PAYLOAD_TYPE: u8 = 97;

/// Overwrites sequence number, timestamp and SSRC of an RTP header.
fn write_header_fields(header: &mut [u8], seq: u16, ts: u32, ssrc: u32) {
    header[2..4].copy_from_slice(&seq.to_be_bytes());
    header[4..8].copy_from_slice(&ts.to_be_bytes());
    header[8..12].copy_from_slice(&ssrc.to_be_bytes());
}

/// Sleeps of the calling thread overshoot by at most a microsecond instead
/// of the default 50 µs timer slack: the sender paces bursts every ~100 µs.
fn precise_sleeps() {
    // SAFETY: prctl with an integer argument; affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
}

/// Sleeps until `deadline_ns` (CLOCK_MONOTONIC), spinning the last few
/// microseconds. Pacing only: nothing waits on another party.
fn pace_until(deadline_ns: u64) {
    loop {
        let now = monotonic_ns();
        if now >= deadline_ns {
            return;
        }
        let left = deadline_ns - now;
        if left > 20_000 {
            std::thread::sleep(Duration::from_nanos(left - 10_000));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Waits until one of the sockets is readable or `timeout` passes, with
/// nanosecond resolution (`ppoll`), so frame pacing is not rounded to ms.
fn wait_readable(sockets: &[&UdpSocket], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> =
        sockets.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: fds is a valid pollfd array and ts a valid timespec for the call.
    unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp_packet(seq: u16, ts: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
        rtp::RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(96)
            .sequence_number(seq)
            .timestamp(ts)
            .ssrc(1)
            .marker_bit(marker)
            .payload(payload)
            .write_vec()
            .unwrap()
    }

    /// Two frames: an IDR in FU-A fragments (two of 100 bytes, one of 40),
    /// then a single-NAL P slice.
    fn tiny_clip() -> Clip {
        let mut fu_start = vec![0x7c, 0x85];
        fu_start.resize(100 - 12, 0xaa);
        let mut fu_mid = vec![0x7c, 0x05];
        fu_mid.resize(100 - 12, 0xbb);
        let mut fu_end = vec![0x7c, 0x45];
        fu_end.resize(40 - 12, 0xcc);
        let datagrams = vec![
            rtp_packet(10, 0, false, &fu_start),
            rtp_packet(11, 0, false, &fu_mid),
            rtp_packet(12, 0, true, &fu_end),
            rtp_packet(13, 3000, true, &[0x41, 1, 2, 3]),
        ];
        Clip::from_datagrams(ClipSettings::default(), datagrams).unwrap()
    }

    #[test]
    fn clip_groups_packets_into_frames_and_finds_the_keyframe() {
        let clip = tiny_clip();
        assert_eq!(clip.frames().len(), 2);
        assert_eq!((clip.frames()[0].packets, clip.frames()[0].keyframe), (3, true));
        assert_eq!((clip.frames()[1].packets, clip.frames()[1].keyframe), (1, false));
    }

    #[test]
    fn stap_a_with_an_idr_is_a_keyframe() {
        // STAP-A: SPS (type 7, 2 bytes), IDR (type 5, 2 bytes).
        assert!(carries_idr(&[0x78, 0, 2, 0x67, 1, 0, 2, 0x65, 1]));
        assert!(!carries_idr(&[0x78, 0, 2, 0x67, 1, 0, 2, 0x68, 1]));
        assert!(!carries_idr(&[0x78, 0, 200, 0x65]), "a truncated aggregate is not trusted");
    }

    #[test]
    fn replayed_streams_rewrite_headers_continue_across_loops_and_use_gso() {
        let clip = Arc::new(tiny_clip());
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut sender = ReplaySender::new(clip, &[rx.local_addr().unwrap()], 0, &LossSpec::None, 0).unwrap();
        // Two loops of the clip: 8 packets, 4 frames.
        for _ in 0..8 {
            sender.push_next(0, false);
        }
        if sender.gso().enabled {
            // 100+100+40 to one destination go as one GSO message.
            assert_eq!(sender.batch.messages[0].packets, 3);
        }
        sender.flush();
        assert_eq!(sender.offered.packets, 8);
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..8 {
            let n = rx.recv(&mut buf).unwrap();
            let p = RtpPacket::parse(&buf[..n]).unwrap();
            got.push((p.sequence_number(), p.timestamp(), p.ssrc(), n));
        }
        let (seq0, ts0, ssrc, _) = got[0];
        assert_eq!(ssrc, 0x5a00_0000);
        for (k, &(seq, _, s, _)) in got.iter().enumerate() {
            assert_eq!(seq, seq0.wrapping_add(k as u16), "sequence numbers continue across loops");
            assert_eq!(s, ssrc);
        }
        let frame_ts: Vec<u32> = got.iter().map(|g| g.1.wrapping_sub(ts0)).collect();
        assert_eq!(frame_ts, vec![0, 0, 0, 3000, 6000, 6000, 6000, 9000], "timestamps keep rising across loops");
        let sizes: Vec<usize> = got.iter().map(|g| g.3).collect();
        assert_eq!(sizes, vec![100, 100, 40, 16, 100, 100, 40, 16], "datagrams keep their sizes through GSO");
    }

    #[test]
    fn nacked_packets_come_back_as_rtx_with_the_original_sequence_number() {
        let clip = Arc::new(tiny_clip());
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut sender = ReplaySender::new(clip, &[rx.local_addr().unwrap()], 64, &LossSpec::None, 0).unwrap();
        for _ in 0..4 {
            sender.push_next(0, false);
        }
        sender.flush();
        let mut buf = [0u8; 2048];
        let mut originals = Vec::new();
        for _ in 0..4 {
            let n = rx.recv(&mut buf).unwrap();
            originals.push(buf[..n].to_vec());
        }
        let wanted = RtpPacket::parse(&originals[1]).unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        sender.retransmit(0, wanted.sequence_number(), &mut scratch, &mut out);
        sender.retransmit(0, wanted.sequence_number().wrapping_add(100), &mut scratch, &mut out);
        sender.flush();
        let n = rx.recv(&mut buf).unwrap();
        let rtx = RtpPacket::parse(&buf[..n]).unwrap();
        assert_eq!(rtx.payload_type(), RTX_PAYLOAD_TYPE);
        assert_eq!(rtx.ssrc(), 0x5b00_0000);
        let inner = rtp::parse_rtx(rtx.payload()).unwrap();
        assert_eq!(inner.original_seq, wanted.sequence_number());
        assert_eq!(inner.payload, wanted.payload());
        assert_eq!(rtx.timestamp(), wanted.timestamp());
        let c = &sender.streams[0].counts;
        assert_eq!((c.nacked_packets, c.rtx_sent, c.nack_unknown), (2, 1, 1));
    }
}
