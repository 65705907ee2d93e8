//! Outputs: where a stream's access units go besides the decoder. An output
//! takes each access unit as the depacketiser hands it on, whole and in
//! order, after the frame accounting.
//!
//! Today these are the logs the tests judge the receive path by, compared
//! with what the sender encoded: [`AuLog`], one line per access unit, and
//! [`RecoveredLog`], one line per packet FEC rebuilt. For players, [`hls`]
//! (MPEG-TS segments muxed by [`ts`], served from memory) and [`restream`]
//! (RTP to other receivers), and [`frames`] (decoded frames for analytics:
//! thumbnails over HTTP, raw frames through a Unix socket).

pub mod frames;
pub mod hls;
pub mod restream;
pub mod ts;

/// What one output publishes per stream, by pipeline and stream name,
/// shared between the streams' threads and the HTTP server's.
pub struct StreamMap<T> {
    streams: RwLock<HashMap<(String, String), Arc<T>>>,
}

impl<T> Default for StreamMap<T> {
    fn default() -> Self {
        Self { streams: RwLock::default() }
    }
}

impl<T> std::fmt::Debug for StreamMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMap").field("streams", &self.streams.read().map_or(0, |s| s.len())).finish()
    }
}

impl<T> StreamMap<T> {
    fn key(pipeline: &str, stream: &str) -> (String, String) {
        (pipeline.to_owned(), stream.to_owned())
    }

    pub fn get(&self, pipeline: &str, stream: &str) -> Option<Arc<T>> {
        self.streams.read().unwrap_or_else(|e| e.into_inner()).get(&Self::key(pipeline, stream)).cloned()
    }

    /// The entry of `pipeline`/`stream`, made by `make` on first use.
    pub fn get_or_insert_with(&self, pipeline: &str, stream: &str, make: impl FnOnce() -> T) -> Arc<T> {
        if let Some(v) = self.get(pipeline, stream) {
            return v;
        }
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        streams.entry(Self::key(pipeline, stream)).or_insert_with(|| Arc::new(make())).clone()
    }

    pub fn insert(&self, pipeline: &str, stream: &str, value: Arc<T>) {
        self.streams.write().unwrap_or_else(|e| e.into_inner()).insert(Self::key(pipeline, stream), value);
    }

    /// Removes `value`, unless another has taken its place since.
    pub fn remove(&self, pipeline: &str, stream: &str, value: &Arc<T>) {
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(pipeline, stream);
        if streams.get(&key).is_some_and(|v| Arc::ptr_eq(v, value)) {
            streams.remove(&key);
        }
    }
}

/// `<prefix><pipeline>/<stream>/<file>` split in three: `None` when `path`
/// does not start with `prefix`, `Some(None)` when it does but lacks a part.
pub fn stream_path<'a>(path: &'a str, prefix: &str) -> Option<Option<(&'a str, &'a str, &'a str)>> {
    let mut parts = path.strip_prefix(prefix)?.splitn(3, '/');
    Some(match (parts.next(), parts.next(), parts.next()) {
        (Some(p), Some(s), Some(f)) if !p.is_empty() && !s.is_empty() => Some((p, s, f)),
        _ => None,
    })
}

/// What this process's outputs publish over HTTP, per stream: HLS
/// playlists and segments, thumbnails.
#[derive(Debug, Default)]
pub struct Published {
    pub hls: hls::HlsCatalog,
    pub frames: frames::FrameCatalog,
}

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::depay::AccessUnit;

/// `index rtp_timestamp content-digest keyframe sender-time`, one line per
/// access unit handed on (the test sender writes the same for what it
/// encoded). `sender-time` is the sender's wallclock of the unit in
/// nanoseconds since the UNIX epoch, from its sender reports (`-` before the
/// first).
pub struct AuLog {
    out: BufWriter<File>,
    index: u64,
}

impl AuLog {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self { out: BufWriter::new(File::create(path)?), index: 0 })
    }

    pub fn write(&mut self, au: &AccessUnit, sender_time: Option<f64>) {
        // A full disk costs the log, not the stream.
        let (index, ts, digest, key) = (self.index, au.rtp_timestamp, au.content_digest(), au.keyframe as u8);
        let _ = match sender_time {
            Some(t) => writeln!(self.out, "{index} {ts} {digest:016x} {key} {}", crate::session::clock::unix_nanos(t)),
            None => writeln!(self.out, "{index} {ts} {digest:016x} {key} -"),
        };
        self.index += 1;
    }

    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

/// `seq xxh3-digest-of-datagram`, one line per media packet FEC rebuilt, to
/// compare byte for byte with what was sent.
pub struct RecoveredLog {
    out: BufWriter<File>,
}

impl RecoveredLog {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self { out: BufWriter::new(File::create(path)?) })
    }

    pub fn write(&mut self, seq: u16, datagram: &[u8]) {
        let _ = writeln!(self.out, "{seq} {:016x}", xxhash_rust::xxh3::xxh3_64(datagram));
    }

    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}
