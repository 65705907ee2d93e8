//! HLS: the repaired access units, without re-encoding, as MPEG-TS segments
//! and a live playlist, served from memory by the process's HTTP server.
//!
//! - A segment starts at a keyframe, begins with the PAT and PMT, and closes
//!   at the first keyframe at least `segmentSeconds` after its start (so it
//!   lasts at least one GOP), when the source goes silent, or at the end.
//! - A segment becomes visible only once it is whole: the writer builds it
//!   in its own buffer and hands it to the [`HlsPlaylist`] in one step, so no
//!   reader ever sees half of one. Segments are immutable from then on and
//!   served with a long max-age; the playlist is served `no-store`.
//! - The playlist names the last `windowSegments` segments; [`GRACE`] more
//!   stay fetchable, for a player that read the playlist just before a
//!   segment left it (RFC 8216, 6.2.2). Memory per stream is bounded by
//!   those segments.
//! - A sender that restarts (new SSRC after silence) starts a new segment
//!   with `#EXT-X-DISCONTINUITY`; timestamps keep increasing across it. A
//!   sender's RTCP BYE, or the stream's end, closes the playlist with
//!   `#EXT-X-ENDLIST`; media after that reopens it with a discontinuity.
//!
//! Not yet: low-latency HLS (partial segments, blocking reload), fMP4, and
//! decode timestamps for streams with B-frames (the PTS is written alone).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use zerodrop_core::Codec;

use super::ts::{TIMESTAMP_ORIGIN, TsMuxer};

/// Segments kept fetchable after they leave the playlist.
pub const GRACE: usize = 3;

/// MPEG-TS timestamps run at 90 kHz.
const TS_CLOCK: i64 = 90_000;

/// How a stream's HLS output is cut and how much of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HlsSettings {
    /// The duration a segment aims for; it closes at the first keyframe
    /// after it.
    pub segment: Duration,
    /// Segments the live playlist names.
    pub window: usize,
}

/// A finished segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Media sequence number: also its name, `<seq>.ts`.
    pub seq: u64,
    pub duration: f64,
    pub frames: u32,
    /// The first segment after a sender restart or a reopened playlist.
    pub discontinuity: bool,
    /// The sender's wallclock of its first frame (seconds since the UNIX
    /// epoch), once the sender's reports give it.
    pub program_date_time: Option<f64>,
    pub data: Arc<[u8]>,
}

/// One stream's published segments and playlist, shared by the stream's
/// writer and the HTTP server's threads.
pub struct HlsPlaylist {
    inner: Mutex<Window>,
}

struct Window {
    window: usize,
    /// The last `window + GRACE` segments, oldest first.
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Discontinuities among segments that left `segments`.
    discontinuities_gone: u64,
    /// `#EXT-X-TARGETDURATION`: the segment target, or the longest segment
    /// so far in whole seconds, whichever is larger.
    target: u64,
    ended: bool,
}

impl HlsPlaylist {
    pub fn new(settings: HlsSettings) -> Self {
        Self {
            inner: Mutex::new(Window {
                window: settings.window.max(1),
                segments: VecDeque::new(),
                next_seq: 0,
                discontinuities_gone: 0,
                target: settings.segment.as_secs_f64().ceil().max(1.0) as u64,
                ended: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The media playlist, or `None` before the first segment.
    pub fn playlist(&self) -> Option<String> {
        let w = self.lock();
        if w.segments.is_empty() {
            return None;
        }
        let skip = w.segments.len().saturating_sub(w.window);
        let listed = w.segments.iter().skip(skip);
        let discontinuity_seq = w.discontinuities_gone + w.segments.iter().take(skip).filter(|s| s.discontinuity).count() as u64;
        let mut out = String::with_capacity(256 + 40 * w.window);
        let first = &w.segments[skip];
        let _ = write!(
            out,
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{}\n#EXT-X-MEDIA-SEQUENCE:{}\n\
             #EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_seq}\n#EXT-X-INDEPENDENT-SEGMENTS\n",
            w.target, first.seq
        );
        for s in listed {
            if s.discontinuity && s.seq != first.seq {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if let Some(t) = s.program_date_time {
                let _ = writeln!(out, "#EXT-X-PROGRAM-DATE-TIME:{}", crate::session::clock::rfc3339(t));
            }
            let _ = write!(out, "#EXTINF:{:.3},\n{}.ts\n", s.duration, s.seq);
        }
        if w.ended {
            out.push_str("#EXT-X-ENDLIST\n");
        }
        Some(out)
    }

    /// Segment `seq`, while it is kept.
    pub fn segment(&self, seq: u64) -> Option<Arc<[u8]>> {
        let w = self.lock();
        let first = w.segments.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        w.segments.get(i).map(|s| s.data.clone())
    }

    /// The segments kept, oldest first (for the report and tests).
    pub fn segments(&self) -> Vec<Segment> {
        self.lock().segments.iter().cloned().collect()
    }

    pub fn has_segments(&self) -> bool {
        !self.lock().segments.is_empty()
    }

    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Publishes a whole segment; returns its sequence number.
    fn publish(&self, duration: f64, frames: u32, discontinuity: bool, program_date_time: Option<f64>, data: Vec<u8>) -> u64 {
        let mut w = self.lock();
        let reopened = std::mem::take(&mut w.ended);
        let seq = w.next_seq;
        w.next_seq += 1;
        w.target = w.target.max(duration.round() as u64);
        w.segments.push_back(Segment { seq, duration, frames, discontinuity: discontinuity || reopened, program_date_time, data: data.into() });
        while w.segments.len() > w.window + GRACE {
            if w.segments.pop_front().is_some_and(|s| s.discontinuity) {
                w.discontinuities_gone += 1;
            }
        }
        seq
    }

    fn end(&self) {
        let mut w = self.lock();
        if !w.segments.is_empty() {
            w.ended = true;
        }
    }
}

/// Every stream's playlist in this process, for the HTTP server. A stream
/// that restarts (a reloaded spec) keeps its playlist and numbering.
#[derive(Debug, Default)]
pub struct HlsCatalog {
    streams: super::StreamMap<HlsPlaylist>,
}

/// What the server sends for an HLS path.
pub enum HlsReply {
    Playlist(String),
    Segment(Arc<[u8]>),
    NotFound(String),
}

/// `Content-Type` of a playlist (RFC 8216, 4).
pub const PLAYLIST_CONTENT_TYPE: &str = "application/vnd.apple.mpegurl";
/// `Content-Type` of an MPEG-TS segment.
pub const SEGMENT_CONTENT_TYPE: &str = "video/mp2t";

impl HlsCatalog {
    /// The playlist of `pipeline`/`stream`, made on first use.
    pub fn playlist(&self, pipeline: &str, stream: &str, settings: HlsSettings) -> Arc<HlsPlaylist> {
        self.streams.get_or_insert_with(pipeline, stream, || HlsPlaylist::new(settings))
    }

    pub fn get(&self, pipeline: &str, stream: &str) -> Option<Arc<HlsPlaylist>> {
        self.streams.get(pipeline, stream)
    }

    /// Answers `/hls/<pipeline>/<stream>/index.m3u8` and
    /// `/hls/<pipeline>/<stream>/<seq>.ts`; `None` for other paths.
    pub fn serve(&self, path: &str) -> Option<HlsReply> {
        let Some((pipeline, stream, file)) = super::stream_path(path, "/hls/")? else {
            return Some(HlsReply::NotFound(format!("{path}: expected /hls/<pipeline>/<stream>/index.m3u8")));
        };
        let Some(playlist) = self.get(pipeline, stream) else {
            return Some(HlsReply::NotFound(format!("no HLS output for stream {pipeline}/{stream}")));
        };
        if file == "index.m3u8" {
            return Some(match playlist.playlist() {
                Some(text) => HlsReply::Playlist(text),
                None => HlsReply::NotFound(format!("{pipeline}/{stream}: no segment yet (waiting for a keyframe)")),
            });
        }
        let seq = file.strip_suffix(".ts").and_then(|n| n.parse::<u64>().ok());
        Some(match seq.and_then(|s| playlist.segment(s)) {
            Some(data) => HlsReply::Segment(data),
            None => HlsReply::NotFound(format!("{pipeline}/{stream}: no segment {file} (segments are named <sequence>.ts and kept a short while)")),
        })
    }
}

/// The segment being written.
struct OpenSegment {
    start: i64,
    /// When the first packet of its first frame arrived.
    first_arrival: Instant,
    program_date_time: Option<f64>,
    last: i64,
    frames: u32,
    discontinuity: bool,
    data: Vec<u8>,
}

/// Cuts one stream's access units into segments, on the stream's thread.
pub struct HlsWriter {
    playlist: Arc<HlsPlaylist>,
    mux: TsMuxer,
    clock_rate: i64,
    segment_ticks: i64,
    open: Option<OpenSegment>,
    /// The last interval between access units, for the duration of a
    /// segment cut without a next keyframe.
    frame_ticks: i64,
    discontinuity_next: bool,
    segments: Counter,
    /// From a segment's first packet to its publication.
    delay: Option<Histogram>,
    frames_skipped: u64,
}

impl HlsWriter {
    /// `segments` counts the segments published
    /// (`zerodrop_hls_segments_total`).
    pub fn new(playlist: Arc<HlsPlaylist>, codec: Codec, clock_rate: u32, settings: HlsSettings, segments: Counter) -> Self {
        let clock_rate = i64::from(clock_rate.max(1));
        let has_segments = playlist.has_segments();
        Self {
            playlist,
            mux: TsMuxer::new(codec),
            clock_rate,
            segment_ticks: (settings.segment.as_secs_f64() * clock_rate as f64) as i64,
            open: None,
            frame_ticks: clock_rate / 30,
            // A restarted stream continues a playlist that has segments.
            discontinuity_next: has_segments,
            segments,
            delay: None,
            frames_skipped: 0,
        }
    }

    /// Observes each segment's delay (`zerodrop_hls_segment_delay_seconds`).
    pub fn with_delay_histogram(mut self, delay: Histogram) -> Self {
        self.delay = Some(delay);
        self
    }

    /// One access unit (Annex B) at `ts`, the stream's extended RTP
    /// timestamp, captured at `sender_time` by the sender's clock (when
    /// known). Units before the first keyframe have nothing to decode from
    /// and are left out.
    pub fn push(&mut self, annexb: &[u8], ts: i64, keyframe: bool, sender_time: Option<f64>, first_arrival: Instant) {
        if let Some(open) = &self.open {
            if ts > open.last {
                self.frame_ticks = ts - open.last;
            }
            if keyframe && ts - open.start >= self.segment_ticks {
                self.close(ts);
            }
        }
        if self.open.is_none() {
            if !keyframe {
                self.frames_skipped += 1;
                return;
            }
            let mut data = Vec::with_capacity(64 * 1024);
            if let Err(e) = self.mux.write_tables(&mut data) {
                tracing::error!(error = %e, "HLS: cannot write the segment's PAT/PMT");
                return;
            }
            let discontinuity = std::mem::take(&mut self.discontinuity_next);
            self.open = Some(OpenSegment { start: ts, first_arrival, program_date_time: sender_time, last: ts, frames: 0, discontinuity, data });
        }
        let pts = TIMESTAMP_ORIGIN + (ts.max(0) as i128 * TS_CLOCK as i128 / self.clock_rate as i128) as u64;
        let Some(open) = &mut self.open else { return };
        match self.mux.write_access_unit(&mut open.data, annexb, pts, keyframe) {
            Ok(()) => {
                open.last = open.last.max(ts);
                open.frames += 1;
            }
            Err(e) => tracing::error!(error = %e, "HLS: cannot mux an access unit"),
        }
    }

    /// Publishes the open segment, if any, as it is (the source went silent
    /// or restarted): its last frame is given the usual frame interval.
    pub fn cut(&mut self) {
        if let Some(open) = &self.open {
            let end = open.last + self.frame_ticks;
            self.close(end);
        }
    }

    /// The sender restarted: what follows is a new segment after a
    /// discontinuity.
    pub fn discontinuity(&mut self) {
        self.cut();
        self.discontinuity_next = true;
    }

    /// The stream ended (the sender's BYE, or the receiver stopping): the
    /// open segment is published and the playlist says no more will come.
    pub fn end(&mut self) {
        self.cut();
        self.playlist.end();
    }

    /// Units left out before the first keyframe.
    pub fn frames_skipped(&self) -> u64 {
        self.frames_skipped
    }

    fn close(&mut self, end: i64) {
        let Some(open) = self.open.take() else { return };
        let duration = (end - open.start).max(0) as f64 / self.clock_rate as f64;
        self.playlist.publish(duration, open.frames, open.discontinuity, open.program_date_time, open.data);
        self.segments.inc();
        if let Some(h) = &self.delay {
            h.observe(open.first_arrival.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: HlsSettings = HlsSettings { segment: Duration::from_secs(1), window: 3 };

    fn writer(settings: HlsSettings) -> (HlsWriter, Arc<HlsPlaylist>) {
        let playlist = Arc::new(HlsPlaylist::new(settings));
        (HlsWriter::new(playlist.clone(), Codec::H264, 90_000, settings, Counter::default()), playlist)
    }

    /// Frames at 30/s from frame `from` (timestamp 3000 each), a keyframe
    /// every `gop` frames.
    fn feed(w: &mut HlsWriter, from: i64, to: i64, gop: i64) {
        for i in from..to {
            let key = i % gop == 0;
            let nal = if key { [0, 0, 0, 1, 0x65, i as u8] } else { [0, 0, 0, 1, 0x41, i as u8] };
            w.push(&nal, i * 3000, key, Some(1_800_000_000.0 + i as f64 / 30.0), Instant::now());
        }
    }

    #[test]
    fn segments_start_at_keyframes_and_last_at_least_the_target() {
        let (mut w, playlist) = writer(HlsSettings { segment: Duration::from_secs(1), window: 10 });
        // GOP of 20 frames (0.67 s): a segment takes two GOPs.
        feed(&mut w, 0, 120, 20);
        let segs = playlist.segments();
        assert_eq!(segs.iter().map(|s| s.frames).collect::<Vec<_>>(), vec![40, 40], "the third segment is still open");
        assert!(segs.iter().all(|s| (s.duration - 40.0 / 30.0).abs() < 1e-9));
        w.end();
        let segs = playlist.segments();
        assert_eq!(segs.iter().map(|s| s.frames).sum::<u32>(), 120, "every frame is in a segment");
        assert!((segs[2].duration - 40.0 / 30.0).abs() < 1e-9, "the last segment's last frame lasts one frame interval");
        let text = playlist.playlist().unwrap();
        assert!(text.ends_with("#EXT-X-PROGRAM-DATE-TIME:2027-01-15T08:00:02.667Z\n#EXTINF:1.333,\n2.ts\n#EXT-X-ENDLIST\n"), "{text}");
        assert!(text.contains("#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n"), "{text}");
    }

    #[test]
    fn frames_before_the_first_keyframe_are_left_out() {
        let (mut w, playlist) = writer(SETTINGS);
        feed(&mut w, 5, 90, 30);
        w.end();
        assert_eq!(w.frames_skipped(), 25);
        assert_eq!(playlist.segments().iter().map(|s| s.frames).sum::<u32>(), 60);
    }

    #[test]
    fn the_window_is_bounded_and_old_segments_stay_fetchable_for_a_grace_period() {
        let (mut w, playlist) = writer(SETTINGS);
        feed(&mut w, 0, 30 * 20 + 1, 30);
        let segs = playlist.segments();
        assert_eq!(segs.len(), SETTINGS.window + GRACE, "memory holds the window and the grace segments");
        assert_eq!(segs.last().unwrap().seq, 19);
        let text = playlist.playlist().unwrap();
        assert!(text.contains("#EXT-X-MEDIA-SEQUENCE:17\n"), "{text}");
        assert_eq!(text.matches("#EXTINF").count(), SETTINGS.window);
        assert!(playlist.segment(14).is_some(), "left the playlist, still fetchable");
        assert!(playlist.segment(13).is_none(), "gone");
        assert!(playlist.segment(20).is_none(), "not yet written");
    }

    #[test]
    fn a_sender_restart_is_a_discontinuity_and_counts_once_it_leaves_the_window() {
        let (mut w, playlist) = writer(SETTINGS);
        feed(&mut w, 0, 60, 30);
        w.discontinuity();
        feed(&mut w, 60, 91, 30);
        let text = playlist.playlist().unwrap();
        assert!(text.contains("#EXT-X-DISCONTINUITY\n#EXT-X-PROGRAM-DATE-TIME:2027-01-15T08:00:02.000Z\n#EXTINF:1.000,\n2.ts\n"), "{text}");
        feed(&mut w, 91, 30 * 12 + 1, 30);
        let text = playlist.playlist().unwrap();
        assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"), "{text}");
        assert!(!text.contains("#EXT-X-DISCONTINUITY\n"), "{text}");
    }

    #[test]
    fn media_after_the_end_reopens_the_playlist_after_a_discontinuity() {
        let (mut w, playlist) = writer(SETTINGS);
        feed(&mut w, 0, 30, 30);
        w.end();
        assert!(playlist.ended());
        feed(&mut w, 30, 61, 30);
        assert!(!playlist.ended());
        let text = playlist.playlist().unwrap();
        assert!(!text.contains("ENDLIST"), "{text}");
        assert!(text.contains("#EXT-X-DISCONTINUITY\n#EXT-X-PROGRAM-DATE-TIME:2027-01-15T08:00:01.000Z\n#EXTINF:1.000,\n1.ts\n"), "{text}");
    }

    #[test]
    fn a_long_gop_raises_the_target_duration() {
        let (mut w, playlist) = writer(SETTINGS);
        feed(&mut w, 0, 91, 90);
        assert!(playlist.playlist().unwrap().contains("#EXT-X-TARGETDURATION:3\n"));
    }

    #[test]
    fn the_catalog_serves_playlists_and_segments_by_path_and_names_what_is_missing() {
        let catalog = HlsCatalog::default();
        let playlist = catalog.playlist("demo", "cam1", SETTINGS);
        match catalog.serve("/hls/demo/cam1/index.m3u8") {
            Some(HlsReply::NotFound(why)) => assert!(why.contains("no segment yet"), "{why}"),
            _ => panic!("no playlist before the first segment"),
        }
        let mut w = HlsWriter::new(playlist, Codec::H264, 90_000, SETTINGS, Counter::default());
        feed(&mut w, 0, 31, 30);
        assert!(matches!(catalog.serve("/hls/demo/cam1/index.m3u8"), Some(HlsReply::Playlist(_))));
        match catalog.serve("/hls/demo/cam1/0.ts") {
            Some(HlsReply::Segment(data)) => assert_eq!(data[0], 0x47, "a TS sync byte"),
            _ => panic!("segment 0 is served"),
        }
        assert!(matches!(catalog.serve("/hls/demo/cam1/7.ts"), Some(HlsReply::NotFound(_))));
        assert!(matches!(catalog.serve("/hls/demo/cam2/index.m3u8"), Some(HlsReply::NotFound(w)) if w.contains("demo/cam2")));
        assert!(catalog.serve("/metrics").is_none());
        assert!(Arc::ptr_eq(&catalog.playlist("demo", "cam1", SETTINGS), &catalog.get("demo", "cam1").unwrap()), "one playlist per stream");
    }
}
