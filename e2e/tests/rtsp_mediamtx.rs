//! RTSP pull from MediaMTX (built from its Go module by
//! `scripts/mediamtx.sh build`), fed by ffmpeg publishing H.264 (libx264) and
//! H.265 (libx265) over RTSP/TCP (ANNOUNCE, RECORD); zerodrop pulls the same
//! path over TCP and over UDP. Every frame ffmpeg sent after zerodrop joined
//! is accounted for, and what zerodrop handed its decoder is, by content,
//! exactly the frames ffmpeg encoded from the first keyframe after the join
//! to the last frame.
//!
//! Knowing exactly which frames went to zerodrop. MediaMTX answers 404 for a
//! path nobody publishes yet, and a reader only gets what arrives after its
//! PLAY, so zerodrop joins a live publication. The test therefore feeds
//! ffmpeg itself: a second ffmpeg renders `testsrc2` (640x360, 30 fps) as raw
//! frames, and the test writes them into the publishing ffmpeg's stdin at
//! 30 fps. It writes the first `JOIN_AFTER` (45) frames, waits until ffmpeg
//! has written all 45 encoded frames to MediaMTX, and only then starts
//! zerodrop and waits until it is playing (`zerodrop_ingest_connected` 1);
//! nothing is written meanwhile, so nothing is in flight. Then it writes the
//! other 555. With `-tune zerolatency` (no lookahead, no B-frames) an
//! encoded frame leaves ffmpeg as soon as its raw frame is in, so frames
//! 45..599 are exactly those sent after the join: zerodrop must account for
//! 555 frames, skip the 15 P-frames before the keyframe at 60 (GOP of 30,
//! `-g 30 -bf 0`, no scene cuts), decode frames 60..599 and drop none.
//!
//! What ffmpeg sent: its tee muxer writes every encoded frame both to the
//! RTSP publication and, as an Annex B byte stream, to its stdout, which the
//! test reads (that is also how it knows when frame 44 has gone out: the
//! tee writes each frame to the RTSP output before the stdout one). Access
//! unit delimiters (`aud=1`) split that stream into frames; parameter sets
//! are repeated in band before every keyframe (`repeat-headers=1`).
//!
//! The publication ends only once zerodrop has accounted for every frame.
//! When its publisher leaves, MediaMTX closes the readers' sessions at once,
//! and what it still held for a reader may never be sent: under load the
//! second of the last H.264 frame's two slices (the packets with the
//! marker) was seen not to reach zerodrop. (zerodrop now drops and counts
//! such a frame as incomplete; it once handed the first slice on alone.)
//! Ending the publication early would make this test about that race
//! rather than about the frames.
//!
//! Normalisation, one: the access unit delimiters are left out of the sent
//! frames' digests. ffmpeg's RTP payloads are up to 1460 bytes, more than
//! MediaMTX's default limit (udpMaxPayloadSize 1452 less the RTP header:
//! 1440), so MediaMTX repacketises the stream (it logs "RTP packets are too
//! big (1460 > 1440), remuxing them into smaller ones", which the test
//! checks): it takes each access unit apart, drops access unit delimiters
//! and the in-band parameter sets, puts the parameter sets it holds (the
//! same bytes, taken from the stream) in front of each keyframe, and
//! packetises again (MediaMTX's internal/stream/unit_remuxer.go). A
//! delimiter carries no picture data; every other NAL unit, SEI included, is
//! compared byte for byte with [`au_digest`], as everywhere in these tests.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use zerodrop_dataplane::depay::au::{annexb_nal_units, au_digest};
use zerodrop_e2e::bench::free_tcp_port;
use zerodrop_e2e::runner::{RunnerProcess, metric_value};
use zerodrop_testbench::mediamtx::{self, MediaMtx};

/// Frames ffmpeg encodes and publishes.
const FRAMES: usize = 600;
/// Frames published before zerodrop dials: one and a half GOPs, so that it
/// joins in the middle of one.
const JOIN_AFTER: usize = 45;
const GOP: usize = 30;
const FPS: u32 = 30;
const WIDTH: usize = 640;
const HEIGHT: usize = 360;
/// One raw yuv420p frame.
const FRAME_BYTES: usize = WIDTH * HEIGHT * 3 / 2;


/// The MediaMTX binary; None (the test is skipped, saying why) when it is
/// not built, except under `CI=true`, where that fails the test.
fn mediamtx_binary() -> Option<std::path::PathBuf> {
    match mediamtx::binary() {
        Ok(bin) => Some(bin),
        Err(e) => {
            zerodrop_e2e::prometheus::skip(&format!("{e:#}"));
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Codec {
    H264,
    H265,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::H264 => "h264",
            Codec::H265 => "h265",
        }
    }

    /// A start code and an access unit delimiter's NAL header.
    fn aud_pattern(self) -> &'static [u8] {
        match self {
            Codec::H264 => &[0, 0, 1, 0x09],
            // nal_unit_type 35, layer 0, temporal id 1
            Codec::H265 => &[0, 0, 1, 0x46, 0x01],
        }
    }

    fn nal_type(self, nal: &[u8]) -> u8 {
        match self {
            Codec::H264 => nal[0] & 0x1f,
            Codec::H265 => (nal[0] >> 1) & 0x3f,
        }
    }

    fn is_aud(self, nal: &[u8]) -> bool {
        self.nal_type(nal) == match self {
            Codec::H264 => 9,
            Codec::H265 => 35,
        }
    }

    fn is_keyframe_slice(self, nal: &[u8]) -> bool {
        let t = self.nal_type(nal);
        match self {
            Codec::H264 => t == 5,
            Codec::H265 => (16..=21).contains(&t),
        }
    }

    /// The publishing ffmpeg's encoder options and the tee's raw format.
    fn encoder(self) -> (&'static [&'static str], &'static str) {
        match self {
            Codec::H264 => (
                &["-c:v", "libx264", "-preset", "veryfast", "-x264-params", "aud=1:repeat-headers=1:scenecut=0"],
                "h264",
            ),
            Codec::H265 => (
                &[
                    "-c:v",
                    "libx265",
                    "-preset",
                    "ultrafast",
                    "-x265-params",
                    "aud=1:repeat-headers=1:scenecut=0:open-gop=0:log-level=error",
                ],
                "hevc",
            ),
        }
    }
}

/// One frame ffmpeg encoded.
#[derive(Debug, Clone, Copy)]
struct SentFrame {
    digest: u64,
    keyframe: bool,
}

/// Splits ffmpeg's Annex B output at its access unit delimiters; digests
/// each frame's NAL units without the delimiter (see the header). What
/// comes before the first delimiter belongs to the first frame: ffmpeg's
/// libx264 wrapper puts x264's SEI (its version and options), which it takes
/// out of the global header, in front of the first packet.
fn split_frames(codec: Codec, stream: &[u8]) -> Vec<SentFrame> {
    let mut frames: Vec<Vec<&[u8]>> = Vec::new();
    let mut delimited = false;
    for nal in annexb_nal_units(stream) {
        if codec.is_aud(nal) {
            // The first delimiter opens the first frame unless NAL units
            // came before it.
            if delimited || frames.is_empty() {
                frames.push(Vec::new());
            }
            delimited = true;
        } else {
            if frames.is_empty() {
                frames.push(Vec::new());
            }
            frames.last_mut().expect("a frame").push(nal);
        }
    }
    frames
        .into_iter()
        .map(|nals| SentFrame {
            keyframe: nals.iter().any(|n| codec.is_keyframe_slice(n)),
            digest: au_digest(nals),
        })
        .collect()
}

/// ffmpeg encoding raw frames the test hands it, publishing them to an RTSP
/// URL and writing them to its stdout.
struct Publisher {
    codec: Codec,
    generator: Child,
    raw: ChildStdout,
    encoder: Child,
    stdin: Option<ChildStdin>,
    /// Access unit delimiters seen on the encoder's stdout so far.
    encoded: Arc<AtomicUsize>,
    output: Option<std::thread::JoinHandle<std::io::Result<Vec<u8>>>>,
    written: usize,
}

impl Publisher {
    fn start(codec: Codec, url: &str) -> Self {
        let size = format!("{WIDTH}x{HEIGHT}");
        let mut generator = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg(format!("testsrc2=size={size}:rate={FPS}"))
            .args(["-frames:v", &FRAMES.to_string(), "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ffmpeg runs (scripts/install-deps.sh installs it)");
        let raw = generator.stdout.take().unwrap();
        let (encoder_args, raw_format) = codec.encoder();
        let mut encoder = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "warning", "-nostats"])
            .args(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", &size, "-framerate", &FPS.to_string(), "-i", "pipe:0"])
            .args(encoder_args)
            .args(["-tune", "zerolatency", "-g", &GOP.to_string(), "-keyint_min", &GOP.to_string(), "-bf", "0"])
            // The tee cannot tell the encoder that the RTSP output wants the
            // parameter sets out of band (for the SDP): say it.
            .args(["-flags", "+global_header", "-map", "0:v", "-f", "tee"])
            .arg(format!("[f=rtsp:rtsp_transport=tcp]{url}|[f={raw_format}]pipe:1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ffmpeg runs");
        let stdin = encoder.stdin.take();
        let mut stdout = encoder.stdout.take().unwrap();
        let encoded = Arc::new(AtomicUsize::new(0));
        let counter = encoded.clone();
        let pattern = codec.aud_pattern();
        let output = std::thread::spawn(move || {
            let mut data = Vec::with_capacity(8 << 20);
            let mut chunk = vec![0u8; 64 << 10];
            let mut scanned = 0;
            loop {
                let n = stdout.read(&mut chunk)?;
                if n == 0 {
                    return Ok(data);
                }
                data.extend_from_slice(&chunk[..n]);
                // A start code never occurs inside a NAL unit (emulation
                // prevention), so this counts delimiters exactly.
                while scanned + pattern.len() <= data.len() {
                    if data[scanned..].starts_with(pattern) {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    scanned += 1;
                }
            }
        });
        Publisher { codec, generator, raw, encoder, stdin, encoded, output: Some(output), written: 0 }
    }

    /// Hands ffmpeg the next `n` raw frames, one every 1/30 s.
    fn send(&mut self, n: usize) {
        let mut frame = vec![0u8; FRAME_BYTES];
        let start = Instant::now();
        let stdin = self.stdin.as_mut().expect("stdin open");
        for i in 0..n {
            self.raw.read_exact(&mut frame).expect("a raw frame from the test pattern");
            // The frame rate of a live source, not a synchronisation guess.
            let due = start + Duration::from_secs(1) * i as u32 / FPS;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            stdin.write_all(&frame).unwrap_or_else(|e| panic!("ffmpeg ({}) took frame {} : {e}", self.codec.name(), self.written));
            self.written += 1;
        }
        stdin.flush().unwrap();
    }

    /// Waits until ffmpeg has written `n` encoded frames (to MediaMTX, then
    /// to its stdout).
    fn wait_encoded(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.encoded.load(Ordering::SeqCst) < n {
            if let Ok(Some(status)) = self.encoder.try_wait() {
                panic!("the publishing ffmpeg exited ({status}) after {} frames", self.encoded.load(Ordering::SeqCst));
            }
            assert!(Instant::now() < deadline, "ffmpeg encoded {} of {n} frames within {timeout:?}", self.encoded.load(Ordering::SeqCst));
            // Poll interval while the encoder works, not a synchronisation guess.
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }

    fn encoded(&self) -> usize {
        self.encoded.load(Ordering::SeqCst)
    }

    /// Ends the input; ffmpeg finishes, tears the publication down and exits.
    /// Returns what it wrote to its stdout.
    fn finish(mut self) -> Vec<u8> {
        drop(self.stdin.take());
        let status = self.encoder.wait().unwrap();
        assert!(status.success(), "the publishing ffmpeg exited with {status}");
        let _ = self.generator.wait();
        self.output.take().unwrap().join().unwrap().expect("ffmpeg's stdout")
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.encoder.kill();
        let _ = self.encoder.wait();
        let _ = self.generator.kill();
        let _ = self.generator.wait();
    }
}

fn every_frame_by_content(codec: Codec, transport: &'static str) {
    let Some(bin) = mediamtx_binary() else { return };
    let server = MediaMtx::start_with(&bin).expect("MediaMTX starts");
    let url = server.url("cam");
    let mut publisher = Publisher::start(codec, &url);

    // Before the join: frames to nobody.
    publisher.send(JOIN_AFTER);
    publisher.wait_encoded(JOIN_AFTER, Duration::from_secs(20));
    let runner = RunnerProcess::start(&zerodrop_e2e::rtsp_manifest(&url, codec.name(), transport, 30), free_tcp_port().unwrap(), &[]).expect("runner starts");
    runner.wait_metrics(Duration::from_secs(20), "zerodrop plays the MediaMTX path", |m| {
        metric_value(m, "zerodrop_ingest_connected", &["stream=\"door\""]) == Some(1.0)
    });
    assert_eq!(publisher.encoded(), JOIN_AFTER, "ffmpeg encoded more than it was given");

    // After the join: the rest of the frames.
    publisher.send(FRAMES - JOIN_AFTER);
    publisher.wait_encoded(FRAMES, Duration::from_secs(20));
    let after_join = (FRAMES - JOIN_AFTER) as u64;
    // The last frames are still on their way (MediaMTX, jitter buffer,
    // decoder): the publication ends once zerodrop has accounted for them
    // (see the header). The comparison below says what is missing if they
    // never come.
    let deadline = Instant::now() + Duration::from_secs(15);
    while runner.frames_accounted("door") < after_join && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let stream = publisher.finish();
    let sent = split_frames(codec, &stream);
    assert_eq!(sent.len(), FRAMES, "ffmpeg's output holds {} frames", sent.len());
    for (i, f) in sent.iter().enumerate() {
        assert_eq!(f.keyframe, i % GOP == 0, "frame {i}: keyframe {}; expected one every {GOP} frames", f.keyframe);
    }
    // The end of the session adds nothing: zerodrop notices it (it dials
    // again and gets MediaMTX's 404) with every frame still as it was.
    runner.wait_metrics(Duration::from_secs(10), "zerodrop notices the end of the publication", |m| {
        metric_value(m, "zerodrop_ingest_connected", &["stream=\"door\""]) == Some(0.0)
    });
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let log = server.log();
    assert!(
        log.contains("remuxing them into smaller ones"),
        "MediaMTX did not repacketise ffmpeg's stream, so the delimiters left out of the comparison may reach zerodrop:\n{log}"
    );
    let received = zerodrop_e2e::read_digests(&outcome.au_log("cams", "door")).unwrap();
    let report = outcome.stream("door").clone();
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} in {report}"));
    let context = || format!("{} over RTSP/{transport} from MediaMTX\nreport: {report}\n{}\nMediaMTX:\n{log}", codec.name(), outcome.stderr);

    // Every frame sent after the join is accounted for, none dropped.
    assert_eq!(n("frames_decoded") + n("frames_dropped") + n("frames_skipped_before_keyframe"), after_join, "{}", context());
    assert_eq!(n("frames_dropped"), 0, "{}", context());
    assert_eq!(n("packets_lost"), 0, "{}", context());
    // Decoding starts at the first keyframe after the join and goes on, by
    // content, to the last frame sent.
    let first_key = (JOIN_AFTER..FRAMES).find(|&i| sent[i].keyframe).unwrap();
    assert_eq!(n("frames_skipped_before_keyframe"), (first_key - JOIN_AFTER) as u64, "{}", context());
    let expected: Vec<u64> = sent[first_key..].iter().map(|f| f.digest).collect();
    if let Some(problem) = zerodrop_e2e::compare_digests(&expected, &received) {
        let at = received.first().and_then(|d| sent.iter().position(|f| f.digest == *d));
        panic!("{problem} (the first frame decoded is sent frame {at:?}, expected {first_key})\n{}", context());
    }
    assert_eq!(n("frames_decoded"), expected.len() as u64, "{}", context());
}

#[test]
fn mediamtx_ffmpeg_h264_rtsp_tcp_every_frame_by_content() {
    every_frame_by_content(Codec::H264, "tcp");
}

#[test]
fn mediamtx_ffmpeg_h264_rtsp_udp_every_frame_by_content() {
    every_frame_by_content(Codec::H264, "udp");
}

#[test]
fn mediamtx_ffmpeg_h265_rtsp_tcp_every_frame_by_content() {
    every_frame_by_content(Codec::H265, "tcp");
}

#[test]
fn mediamtx_ffmpeg_h265_rtsp_udp_every_frame_by_content() {
    every_frame_by_content(Codec::H265, "udp");
}
