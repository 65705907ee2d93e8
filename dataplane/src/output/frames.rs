//! Decoded frames for analytics: the latest frame of each stream as a JPEG
//! thumbnail over HTTP, and every decoded frame, raw, to local programs
//! through a Unix socket.
//!
//! - **Thumbnails**: the decoder keeps its latest picture, replaced at most
//!   once per `thumbnailIntervalMs`; `GET /frames/<pipeline>/<stream>/latest.jpg`
//!   encodes it (GStreamer's `gst_video_convert_sample`, so only pictures
//!   somebody asks for are encoded, each once).
//! - **Raw frames**: with `socketDirectory`, each stream listens on
//!   `<dir>/<pipeline>.<stream>.sock`. Every client that connects gets every
//!   decoded frame from then on, as a 48-byte header and the picture's planes
//!   packed without padding ([`write_header`]). A Unix socket rather than
//!   `shmsink`: any language reads it with the standard library (Python:
//!   `socket` and `numpy.frombuffer`), the header carries the sender's
//!   timestamp with each frame, and a slow reader costs only itself: each
//!   client has a queue of [`CLIENT_QUEUE`] frames; what does not fit is
//!   counted (`zerodrop_frames_feed_dropped_total`) and skipped, never waited
//!   for by the decoder.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer_video as gst_video;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Frames queued for one socket client before its frames are skipped.
pub const CLIENT_QUEUE: usize = 8;
/// `ZDF1`: the first bytes of every frame header.
pub const MAGIC: [u8; 4] = *b"ZDF1";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 48;

/// What a source's frames output does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSettings {
    /// The latest picture kept for thumbnails is replaced at most this often.
    pub thumbnail_interval: Duration,
    /// Where the raw frame sockets are made, if anywhere.
    pub socket_directory: Option<PathBuf>,
}

/// Counters the frames output reports into.
#[derive(Clone, Default)]
pub struct FrameCounters {
    /// Frames a socket client missed because it read too slowly.
    pub feed_dropped: Counter,
    /// Socket clients connected.
    pub feed_clients: Gauge,
}

struct Client {
    tx: crossbeam_channel::Sender<Arc<RawFrame>>,
}

/// A decoded picture packed for the socket feed.
pub struct RawFrame {
    pub index: u64,
    pub width: u32,
    pub height: u32,
    pub format: [u8; 4],
    /// The sender's wallclock of the frame, ns since the UNIX epoch.
    pub sender_time_ns: Option<i64>,
    pub pts_ns: u64,
    pub data: Vec<u8>,
}

/// One stream's frames: fed by its decoder, read by the HTTP server and the
/// socket clients.
pub struct FrameTap {
    settings: FrameSettings,
    latest: Mutex<Option<Latest>>,
    jpeg: Mutex<Option<(u64, Arc<[u8]>)>>,
    clients: Mutex<Vec<Client>>,
    frames: AtomicU64,
    counters: FrameCounters,
    socket_path: Option<PathBuf>,
}

struct Latest {
    index: u64,
    sample: gst::Sample,
    sender_time: Option<f64>,
    at: Instant,
}

/// A thumbnail as served.
pub struct Thumbnail {
    pub jpeg: Arc<[u8]>,
    /// The sender's wallclock of the frame, seconds since the UNIX epoch.
    pub sender_time: Option<f64>,
}

impl FrameTap {
    /// A tap for `pipeline`/`stream`; with a socket directory, its socket
    /// is made and clients are accepted from a thread of its own.
    pub fn start(pipeline: &str, stream: &str, settings: FrameSettings, counters: FrameCounters) -> anyhow::Result<Arc<Self>> {
        let socket_path = settings.socket_directory.as_ref().map(|d| d.join(format!("{pipeline}.{stream}.sock")));
        let tap = Arc::new(Self {
            settings,
            latest: Mutex::new(None),
            jpeg: Mutex::new(None),
            clients: Mutex::new(Vec::new()),
            frames: AtomicU64::new(0),
            counters,
            socket_path: socket_path.clone(),
        });
        if let Some(path) = socket_path {
            let listener = bind_socket(&path)?;
            let weak = Arc::downgrade(&tap);
            std::thread::Builder::new().name(format!("frames-{stream}")).spawn(move || {
                for conn in listener.incoming() {
                    let Some(tap) = weak.upgrade() else { break };
                    match conn {
                        Ok(conn) => tap.add_client(conn),
                        Err(e) => tracing::warn!(error = %e, "frames socket: accept failed"),
                    }
                }
            })?;
        }
        Ok(tap)
    }

    /// The socket raw frames are served on, if any.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    fn add_client(self: &Arc<Self>, mut conn: UnixStream) {
        let (tx, rx) = crossbeam_channel::bounded::<Arc<RawFrame>>(CLIENT_QUEUE);
        self.lock_clients().push(Client { tx });
        self.counters.feed_clients.inc();
        let counters = self.counters.clone();
        let spawned = std::thread::Builder::new().name("frames-client".into()).spawn(move || {
            for frame in rx {
                let mut header = [0u8; HEADER_LEN];
                write_header(&frame, &mut header);
                if conn.write_all(&header).and_then(|()| conn.write_all(&frame.data)).is_err() {
                    break;
                }
            }
            counters.feed_clients.dec();
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "frames socket: cannot start a client thread");
        }
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A decoded picture, in output order, with the sender's time of it.
    pub fn offer(&self, sample: &gst::Sample, sender_time: Option<f64>) {
        let index = self.frames.fetch_add(1, Ordering::Relaxed);
        {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            if latest.as_ref().is_none_or(|l| l.at.elapsed() >= self.settings.thumbnail_interval) {
                *latest = Some(Latest { index, sample: sample.clone(), sender_time, at: Instant::now() });
            }
        }
        let mut clients = self.lock_clients();
        if clients.is_empty() {
            return;
        }
        let Some(frame) = pack(index, sample, sender_time) else { return };
        let frame = Arc::new(frame);
        clients.retain(|c| match c.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                self.counters.feed_dropped.inc();
                true
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        });
    }

    /// The latest picture as JPEG, encoded once per picture; `None` before
    /// the first.
    pub fn thumbnail(&self) -> anyhow::Result<Option<Thumbnail>> {
        let (index, sample, sender_time) = match &*self.latest.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(l) => (l.index, l.sample.clone(), l.sender_time),
            None => return Ok(None),
        };
        let mut cache = self.jpeg.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, jpeg)) = &*cache
            && *i == index
        {
            return Ok(Some(Thumbnail { jpeg: jpeg.clone(), sender_time }));
        }
        let caps = gst::Caps::builder("image/jpeg").build();
        let converted = gst_video::convert_sample(&sample, &caps, Some(gst::ClockTime::from_seconds(2)))?;
        let buffer = converted.buffer().ok_or_else(|| anyhow::anyhow!("the JPEG encoder gave no buffer"))?;
        let jpeg: Arc<[u8]> = Arc::from(buffer.map_readable()?.as_slice());
        *cache = Some((index, jpeg.clone()));
        Ok(Some(Thumbnail { jpeg, sender_time }))
    }
}

impl Drop for FrameTap {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds `path`, replacing a socket a previous run left behind.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the frames socket directory {}", dir.display()))?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on the frames socket {}", path.display()))
}

/// The picture's planes packed without row padding, with its description.
fn pack(index: u64, sample: &gst::Sample, sender_time: Option<f64>) -> Option<RawFrame> {
    let info = gst_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    let buffer = sample.buffer()?;
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).ok()?;
    let mut data = Vec::with_capacity(info.size());
    for plane in 0..info.n_planes() {
        let stride = info.stride()[plane as usize] as usize;
        let row = info.comp_width(plane as u8) as usize * info.comp_pstride(plane as u8) as usize;
        let rows = info.comp_height(plane as u8) as usize;
        let bytes = frame.plane_data(plane).ok()?;
        for r in 0..rows {
            data.extend_from_slice(bytes.get(r * stride..r * stride + row)?);
        }
    }
    let mut format = *b"    ";
    for (d, s) in format.iter_mut().zip(info.format().to_str().as_bytes()) {
        *d = *s;
    }
    Some(RawFrame {
        index,
        width: info.width(),
        height: info.height(),
        format,
        sender_time_ns: sender_time.map(crate::session::clock::unix_nanos),
        pts_ns: buffer.pts().map_or(0, |p| p.nseconds()),
        data,
    })
}

/// The 48-byte frame header, little-endian: `ZDF1`, header length (u32,
/// 48), width, height (u32), pixel format (4 ASCII bytes, GStreamer's name:
/// `I420`, `NV12`), frame index (u64, from 0 for the stream), the sender's
/// wallclock of the frame in ns since the UNIX epoch (i64, -1 when not
/// known yet), the decoder's presentation time in ns (u64), and the length
/// of the picture that follows (u32).
pub fn write_header(f: &RawFrame, out: &mut [u8; HEADER_LEN]) {
    out[0..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out[8..12].copy_from_slice(&f.width.to_le_bytes());
    out[12..16].copy_from_slice(&f.height.to_le_bytes());
    out[16..20].copy_from_slice(&f.format);
    out[20..28].copy_from_slice(&f.index.to_le_bytes());
    out[28..36].copy_from_slice(&f.sender_time_ns.unwrap_or(-1).to_le_bytes());
    out[36..44].copy_from_slice(&f.pts_ns.to_le_bytes());
    out[44..48].copy_from_slice(&(f.data.len() as u32).to_le_bytes());
}

/// Every stream's frame tap in this process, for the HTTP server.
#[derive(Debug, Default)]
pub struct FrameCatalog {
    streams: super::StreamMap<FrameTap>,
}

/// What the server sends for a frames path.
pub enum FramesReply {
    Jpeg(Thumbnail),
    NotFound(String),
    Error(String),
}

impl FrameCatalog {
    pub fn insert(&self, pipeline: &str, stream: &str, tap: Arc<FrameTap>) {
        self.streams.insert(pipeline, stream, tap);
    }

    /// Removes `tap`, unless a restarted stream's has taken its place.
    pub fn remove(&self, pipeline: &str, stream: &str, tap: &Arc<FrameTap>) {
        self.streams.remove(pipeline, stream, tap);
    }

    /// Answers `/frames/<pipeline>/<stream>/latest.jpg`; `None` for other
    /// paths.
    pub fn serve(&self, path: &str) -> Option<FramesReply> {
        let Some((pipeline, stream, "latest.jpg")) = super::stream_path(path, "/frames/")? else {
            return Some(FramesReply::NotFound(format!("{path}: expected /frames/<pipeline>/<stream>/latest.jpg")));
        };
        let Some(tap) = self.streams.get(pipeline, stream) else {
            return Some(FramesReply::NotFound(format!("no frames output for stream {pipeline}/{stream}")));
        };
        Some(match tap.thumbnail() {
            Ok(Some(t)) => FramesReply::Jpeg(t),
            Ok(None) => FramesReply::NotFound(format!("{pipeline}/{stream}: no frame decoded yet")),
            Err(e) => FramesReply::Error(format!("{pipeline}/{stream}: cannot encode the thumbnail: {e:#}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(width: u32, height: u32, fill: u8) -> gst::Sample {
        gst::init().unwrap();
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, width, height).build().unwrap();
        let mut buffer = gst::Buffer::with_size(info.size()).unwrap();
        buffer.get_mut().unwrap().map_writable().unwrap().as_mut_slice().fill(fill);
        gst::Sample::builder().buffer(&buffer).caps(&info.to_caps().unwrap()).build()
    }

    fn read_frame(conn: &mut UnixStream) -> ([u8; HEADER_LEN], Vec<u8>) {
        use std::io::Read;
        let mut header = [0u8; HEADER_LEN];
        conn.read_exact(&mut header).unwrap();
        let len = u32::from_le_bytes(header[44..48].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        conn.read_exact(&mut data).unwrap();
        (header, data)
    }

    #[test]
    fn a_socket_client_gets_every_frame_packed_with_its_header_and_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let settings = FrameSettings { thumbnail_interval: Duration::ZERO, socket_directory: Some(dir.path().into()) };
        let counters = FrameCounters::default();
        let tap = FrameTap::start("p", "cam", settings, counters.clone()).unwrap();
        let path = tap.socket_path().unwrap().to_owned();
        assert_eq!(path, dir.path().join("p.cam.sock"));
        let mut conn = UnixStream::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The accept thread registers the client; frames offered before
        // that reach nobody.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.feed_clients.get() == 0 {
            assert!(Instant::now() < deadline, "the client was never accepted");
            std::thread::park_timeout(Duration::from_millis(5));
        }
        // 34x18: rows of 34 and 17 bytes, padded in GStreamer's buffers.
        tap.offer(&sample(34, 18, 7), Some(1_800_000_000.25));
        tap.offer(&sample(34, 18, 9), None);
        let (h, data) = read_frame(&mut conn);
        assert_eq!(&h[0..4], b"ZDF1");
        assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()), 34);
        assert_eq!(u32::from_le_bytes(h[12..16].try_into().unwrap()), 18);
        assert_eq!(&h[16..20], b"I420");
        assert_eq!(i64::from_le_bytes(h[28..36].try_into().unwrap()), 1_800_000_000_250_000_000);
        assert_eq!(data.len(), 34 * 18 + 2 * 17 * 9, "planes packed without padding");
        assert!(data.iter().all(|&b| b == 7));
        let (h, data) = read_frame(&mut conn);
        assert_eq!(u64::from_le_bytes(h[20..28].try_into().unwrap()), 1, "the second frame");
        assert_eq!(i64::from_le_bytes(h[28..36].try_into().unwrap()), -1, "no sender time yet");
        assert!(data.iter().all(|&b| b == 9));
    }

    #[test]
    fn a_client_that_does_not_read_costs_only_its_own_frames() {
        let dir = tempfile::tempdir().unwrap();
        let settings = FrameSettings { thumbnail_interval: Duration::ZERO, socket_directory: Some(dir.path().into()) };
        let counters = FrameCounters::default();
        let tap = FrameTap::start("p", "cam", settings, counters.clone()).unwrap();
        let _idle = UnixStream::connect(tap.socket_path().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.feed_clients.get() == 0 {
            assert!(Instant::now() < deadline, "the client was never accepted");
            std::thread::park_timeout(Duration::from_millis(5));
        }
        // 1280x720 frames fill the socket buffer and then the queue.
        let frame = sample(1280, 720, 1);
        let started = Instant::now();
        for _ in 0..100 {
            tap.offer(&frame, None);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "offering never waits for the client");
        assert!(counters.feed_dropped.get() >= 80, "frames the client could not take are counted: {}", counters.feed_dropped.get());
    }

    #[test]
    fn the_latest_frame_is_served_as_jpeg_and_encoded_once() {
        let catalog = FrameCatalog::default();
        let settings = FrameSettings { thumbnail_interval: Duration::from_secs(3600), socket_directory: None };
        let tap = FrameTap::start("p", "cam", settings, FrameCounters::default()).unwrap();
        catalog.insert("p", "cam", tap.clone());
        assert!(matches!(catalog.serve("/frames/p/cam/latest.jpg"), Some(FramesReply::NotFound(w)) if w.contains("no frame decoded yet")));
        tap.offer(&sample(64, 48, 128), Some(5.0));
        tap.offer(&sample(64, 48, 0), None);
        let Some(FramesReply::Jpeg(t)) = catalog.serve("/frames/p/cam/latest.jpg") else { panic!("a JPEG") };
        assert_eq!(&t.jpeg[..2], &[0xFF, 0xD8], "a JPEG start of image");
        assert_eq!(t.sender_time, Some(5.0), "the first frame is kept for the whole interval");
        let Some(FramesReply::Jpeg(again)) = catalog.serve("/frames/p/cam/latest.jpg") else { panic!("a JPEG") };
        assert!(Arc::ptr_eq(&t.jpeg, &again.jpeg), "encoded once");
        assert!(matches!(catalog.serve("/frames/p/other/latest.jpg"), Some(FramesReply::NotFound(_))));
        assert!(matches!(catalog.serve("/frames/p/cam/x.png"), Some(FramesReply::NotFound(_))));
        assert!(catalog.serve("/metrics").is_none());
    }
}
