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

/// What this process's outputs publish over HTTP, per stream: HLS
/// playlists and segments, thumbnails.
#[derive(Debug, Default)]
pub struct Published {
    pub hls: hls::HlsCatalog,
    pub frames: frames::FrameCatalog,
}

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

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
