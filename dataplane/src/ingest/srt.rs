//! SRT ingest through GStreamer's `srtsrc` (libsrt): listener or caller,
//! passphrase from a Secret, SRT's latency from `repair.latencyMs`. SRT
//! carries MPEG-TS; a thread per source reads it from `srtsrc`, takes the
//! video stream's access units out of it ([`ts`](super::ts)), and packetises
//! them as RTP into the same local socket pair an RTSP pull writes into, so
//! the stream (depacketisation, decode, outputs, metrics) is the one every
//! transport shares.
//!
//! Repair is SRT's: it retransmits what it can within its latency. What it
//! could not repair arrives as a TS gap: the access unit that lost a TS
//! packet, the units missing entirely (counted from the gap in decode
//! timestamps), and every unit after them until the next keyframe (their
//! references are gone, and an SRT sender cannot be asked for a keyframe)
//! are dropped and counted (`zerodrop_frames_dropped_total{reason="transport"}`),
//! never handed on damaged. libsrt's own figures map onto the metric names
//! that mean the same thing: packets it found missing
//! (`zerodrop_rtp_packets_lost_total`), NAKs it sent (`zerodrop_nacks_sent_total`)
//! and its round-trip time (`zerodrop_round_trip_time_seconds`).

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use zerodrop_crds::{Codec, SrtMode};

use super::pulled::{Backoff, MARK_END, SecretSource, SessionDescription, encode_description};
use super::ts::{FrameGaps, TsDemux, TsUnit};
use super::IngestCounters;
use crate::metrics::StreamMetrics;

/// RTP payload bytes per packet on the local socket.
const MAX_PAYLOAD: usize = 1400;
/// How often libsrt's statistics are read.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How long one wait for data lasts (the stop flag is checked in between).
const PULL_TIMEOUT: Duration = Duration::from_millis(100);

/// An SRT source, as its spec says (the passphrase: only where it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtSettings {
    pub mode: SrtMode,
    /// Listener: where to listen (None: every address). Caller: whom to call.
    pub address: Option<String>,
    pub port: u16,
    pub stream_id: Option<String>,
    pub passphrase: Option<SecretSource>,
    pub passphrase_key: String,
    /// SRT's latency: how long it may spend retransmitting.
    pub latency: Duration,
}

impl SrtSettings {
    /// The `srt://` URI for `srtsrc` (no passphrase in it: that is a property,
    /// so the URI can be logged).
    pub fn uri(&self) -> String {
        let (host, mode) = match self.mode {
            SrtMode::Listener => (self.address.as_deref().unwrap_or("0.0.0.0"), "listener"),
            SrtMode::Caller => (self.address.as_deref().unwrap_or("127.0.0.1"), "caller"),
        };
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        format!("srt://{host}:{}?mode={mode}", self.port)
    }

    fn load_passphrase(&self) -> anyhow::Result<Option<String>> {
        let Some(source) = &self.passphrase else { return Ok(None) };
        let p = source.read(&self.passphrase_key)?;
        anyhow::ensure!(
            (10..=79).contains(&p.len()),
            "the passphrase ({}) must be 10 to 79 characters long, as libsrt requires",
            source.describe(&[&self.passphrase_key])
        );
        Ok(Some(p))
    }
}

/// A running SRT ingest; dropping it stops the thread.
pub struct SrtPull {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SrtPull {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SrtPull {
    pub fn start(
        id: String,
        settings: SrtSettings,
        codec: Codec,
        payload_type: u8,
        metrics: StreamMetrics,
        socket: UnixDatagram,
    ) -> anyhow::Result<Self> {
        gst::init().context("GStreamer")?;
        anyhow::ensure!(
            gst::ElementFactory::find("srtsrc").is_some(),
            "{id}: GStreamer has no srtsrc element (install gstreamer1.0-plugins-bad, built with libsrt)"
        );
        socket.set_nonblocking(false).context("local socket")?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("srt-{}", settings.port))
            .spawn({
                let stop = stop.clone();
                move || run(id, settings, codec, payload_type, metrics, socket, stop)
            })
            .context("cannot start the SRT thread")?;
        Ok(SrtPull { stop, thread: Some(thread) })
    }
}

fn run(id: String, settings: SrtSettings, codec: Codec, payload_type: u8, metrics: StreamMetrics, socket: UnixDatagram, stop: Arc<AtomicBool>) {
    let ingest = metrics.ingest();
    let mut backoff = Backoff::default();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut seq: u16 = rand::Rng::random(&mut rng);
    let mut down_since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut session = Session::new(codec, payload_type, seq, rand::Rng::random(&mut rng));
        let outcome = connect_and_read(&settings, &metrics, &ingest, &socket, &stop, &mut session, &mut down_since);
        seq = session.packetizer.next_seq();
        let played = session.connected;
        if played {
            session.finish(&socket, &metrics, &ingest);
            let _ = socket.send(MARK_END);
            down_since = Instant::now();
        }
        ingest.connected.set(0);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (reason, error) = match outcome {
            Ok(()) => ("ended", "the sender closed the connection".to_string()),
            Err(e) => (classify(&format!("{e:#}")), format!("{e:#}")),
        };
        ingest.error(reason);
        // A listener that had a caller listens again at once; failures back off.
        let wait = if played && settings.mode == SrtMode::Listener {
            backoff.reset();
            Duration::ZERO
        } else {
            backoff.next(&mut rng)
        };
        tracing::warn!(
            stream = %id, uri = %settings.uri(), reason, error = %error, retry_in_ms = wait.as_millis() as u64,
            "SRT connection ended; listening or calling again"
        );
        let until = Instant::now() + wait;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(PULL_TIMEOUT.min(until.saturating_duration_since(Instant::now())));
        }
        ingest.reconnects.inc();
    }
}

fn classify(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("passphrase") || e.contains("secret") {
        "credentials"
    } else if e.contains("refused") || e.contains("rejected") {
        "refused"
    } else if e.contains("timeout") || e.contains("timed out") {
        "timeout"
    } else if e.contains("no video") {
        "no_stream"
    } else {
        "network"
    }
}

/// One connection's state: the TS demultiplexer, the frame gaps, the RTP
/// packetiser, and whether a gap left the stream waiting for a keyframe.
struct Session {
    codec: Codec,
    payload_type: u8,
    demux: TsDemux,
    gaps: FrameGaps,
    packetizer: crate::output::restream::Packetizer,
    broken: bool,
    connected: bool,
    /// libsrt's counters at the last reading (they count from the connection).
    srt_lost: i64,
    srt_nacks: i64,
}

impl Session {
    fn new(codec: Codec, payload_type: u8, first_seq: u16, ssrc: u32) -> Self {
        Session {
            codec,
            payload_type,
            demux: TsDemux::for_codec(codec),
            gaps: FrameGaps::default(),
            packetizer: crate::output::restream::Packetizer::new(codec, payload_type, ssrc, first_seq, MAX_PAYLOAD),
            broken: false,
            connected: false,
            srt_lost: 0,
            srt_nacks: 0,
        }
    }

    fn push(&mut self, bytes: &[u8], socket: &UnixDatagram, metrics: &StreamMetrics, ingest: &IngestCounters) {
        let mut units = Vec::new();
        self.demux.push(bytes, &mut |u| units.push(u));
        for u in units {
            self.unit(u, socket, metrics, ingest);
        }
    }

    fn finish(&mut self, socket: &UnixDatagram, metrics: &StreamMetrics, ingest: &IngestCounters) {
        let mut units = Vec::new();
        self.demux.flush(&mut |u| units.push(u));
        for u in units {
            self.unit(u, socket, metrics, ingest);
        }
    }

    fn unit(&mut self, u: TsUnit, socket: &UnixDatagram, metrics: &StreamMetrics, ingest: &IngestCounters) {
        let missing = self.gaps.missing_before(u.dts);
        if missing > 0 {
            metrics.frames_dropped("transport", missing);
            self.broken = true;
        }
        if u.damaged || (self.broken && !is_keyframe(self.codec, &u.data)) {
            metrics.frames_dropped("transport", 1);
            self.broken = true;
            return;
        }
        self.broken = false;
        let mut failed = false;
        self.packetizer.packetize(&u.data, u.pts as u32, |packet| {
            if !failed && socket.send(packet).is_err() {
                failed = true;
            }
        });
        if failed {
            metrics.discarded("local_socket");
        }
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        ingest.last_frame.set(unix.as_secs_f64());
    }

    /// Adds what libsrt counted since the last reading to the stream's
    /// metrics of the same meaning.
    fn read_stats(&mut self, stats: &gst::StructureRef, metrics: &StreamMetrics) {
        let mut lost = 0i64;
        let mut nacks = 0i64;
        let mut rtt_ms = None;
        let mut add = |s: &gst::StructureRef| {
            lost += int_field(s, "packets-received-lost");
            nacks += int_field(s, "packet-nack-sent");
            if let Ok(r) = s.get::<f64>("rtt-ms") {
                rtt_ms = Some(r);
            }
        };
        // A listener reports per caller, a caller at the top level.
        match stats.get::<glib::ValueArray>("callers") {
            Ok(callers) => {
                for v in callers.iter() {
                    if let Ok(s) = v.get::<gst::Structure>() {
                        add(&s);
                    }
                }
            }
            Err(_) => add(stats),
        }
        if lost > self.srt_lost {
            metrics.packets_lost.inc_by((lost - self.srt_lost) as u64);
            self.srt_lost = lost;
        }
        if nacks > self.srt_nacks {
            metrics.nacks_sent.inc_by((nacks - self.srt_nacks) as u64);
            self.srt_nacks = nacks;
        }
        if let Some(r) = rtt_ms {
            metrics.rtt.set(r / 1000.0);
        }
    }
}

use gstreamer::glib;

fn int_field(s: &gst::StructureRef, name: &str) -> i64 {
    s.get::<i64>(name).or_else(|_| s.get::<i32>(name).map(i64::from)).unwrap_or(0)
}

/// Whether an Annex B access unit holds a keyframe (H.264 IDR, H.265 IRAP).
pub fn is_keyframe(codec: Codec, annexb: &[u8]) -> bool {
    crate::depay::au::annexb_nal_units(annexb).any(|n| match (codec, n.first()) {
        (Codec::H264, Some(h)) => h & 0x1f == 5,
        (Codec::H265, Some(h)) => (16..=21).contains(&((h >> 1) & 0x3f)),
        _ => false,
    })
}

/// Runs one connection: builds `srtsrc ! appsink`, waits for the sender,
/// reads until the connection ends, an error, or `stop`.
fn connect_and_read(
    settings: &SrtSettings,
    metrics: &StreamMetrics,
    ingest: &IngestCounters,
    socket: &UnixDatagram,
    stop: &AtomicBool,
    session: &mut Session,
    down_since: &mut Instant,
) -> anyhow::Result<()> {
    let passphrase = settings.load_passphrase().context("passphrase")?;
    let src = gst::ElementFactory::make("srtsrc")
        .property("uri", settings.uri())
        .property("latency", settings.latency.as_millis().min(i32::MAX as u128) as i32)
        .property("poll-timeout", PULL_TIMEOUT.as_millis() as i32)
        // Reconnecting is ours: with backoff, and the end of the old
        // connection handed on and counted.
        .property("auto-reconnect", false)
        .build()
        .context("srtsrc")?;
    if let Some(p) = &passphrase {
        src.set_property("passphrase", p);
    }
    if let Some(sid) = &settings.stream_id {
        src.set_property("streamid", sid);
    }
    let sink = gst_app::AppSink::builder().sync(false).max_buffers(64).build();
    let pipeline = gst::Pipeline::new();
    pipeline.add_many([&src, sink.upcast_ref()]).context("pipeline")?;
    src.link(&sink).context("srtsrc ! appsink")?;
    let _guard = StateGuard(pipeline.clone());
    pipeline.set_state(gst::State::Playing).map_err(|_| anyhow::anyhow!("srtsrc cannot start on {}", settings.uri()))?;
    let bus = pipeline.bus().context("bus")?;
    let mut next_stats = Instant::now() + STATS_INTERVAL;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos]) {
            match msg.view() {
                gst::MessageView::Eos(_) => return Ok(()),
                gst::MessageView::Error(e) => {
                    anyhow::bail!("{} ({})", e.error(), e.debug().map(|d| d.to_string()).unwrap_or_default())
                }
                _ => {}
            }
        }
        if let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(PULL_TIMEOUT.as_millis() as u64)) {
            if !session.connected {
                session.connected = true;
                let d = SessionDescription { payload_type: session.payload_type, parameter_sets: Vec::new() };
                socket.send(&encode_description(&d)).context("local socket")?;
                ingest.connected.set(1);
                ingest.disconnected.inc_by(down_since.elapsed().as_secs_f64());
            }
            if let Some(buffer) = sample.buffer()
                && let Ok(map) = buffer.map_readable()
            {
                session.push(map.as_slice(), socket, metrics, ingest);
            }
        } else if sink.is_eos() {
            return Ok(());
        }
        if Instant::now() >= next_stats {
            next_stats += STATS_INTERVAL;
            if let Ok(stats) = src.property_value("stats").get::<gst::Structure>() {
                tracing::debug!(stats = %stats, "libsrt statistics");
                session.read_stats(&stats, metrics);
            }
        }
    }
}

/// Sets the pipeline to NULL when dropped.
struct StateGuard(gst::Pipeline);

impl Drop for StateGuard {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_names_mode_address_and_port_but_never_the_passphrase() {
        let s = SrtSettings {
            mode: SrtMode::Caller,
            address: Some("10.0.0.9".into()),
            port: 9000,
            stream_id: Some("cam1".into()),
            passphrase: Some(SecretSource::Environment("X".into())),
            passphrase_key: "passphrase".into(),
            latency: Duration::from_millis(200),
        };
        assert_eq!(s.uri(), "srt://10.0.0.9:9000?mode=caller");
        let l = SrtSettings { mode: SrtMode::Listener, address: None, ..s };
        assert_eq!(l.uri(), "srt://0.0.0.0:9000?mode=listener");
    }

    #[test]
    fn keyframes_are_recognised_by_nal_type() {
        assert!(is_keyframe(Codec::H264, b"\0\0\0\x01\x09\x10\0\0\0\x01\x67\x42\0\0\x01\x65\x88"));
        assert!(!is_keyframe(Codec::H264, b"\0\0\0\x01\x09\x30\0\0\x01\x41\x9a"));
        assert!(is_keyframe(Codec::H265, b"\0\0\0\x01\x26\x01\xaf"));
        assert!(!is_keyframe(Codec::H265, b"\0\0\0\x01\x02\x01\xd0"));
    }
}
