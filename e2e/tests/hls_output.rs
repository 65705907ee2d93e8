//! HLS output as players read it: `zerodrop run` receives a stream that
//! loses packets on its way, repairs it, and serves it as HLS; ffprobe,
//! ffmpeg and GStreamer's own HLS client (`hlsdemux`) play it, and a reader
//! that fetches the playlist and every segment it names as fast as it can,
//! for the whole run, checks that no segment is ever missing, partial or
//! changed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};
use zerodrop_telemetry::fetch;

const FRAMES: u32 = 300;

fn manifest(port: u16, codec: &str) -> String {
    zerodrop_e2e::single_source_manifest("live", codec, port, 400, 15)
        + "  outputs:\n    hls:\n      segmentSeconds: 1\n      windowSegments: 30\n"
}

/// What the reader saw over the whole run.
#[derive(Debug, Default)]
struct ReaderLog {
    playlists_read: u64,
    segment_reads: u64,
    /// Segment bytes by sequence number, as first read.
    segments: BTreeMap<u64, Vec<u8>>,
    /// Every way a read went wrong, in words.
    problems: Vec<String>,
    ended: bool,
}

/// Reads the playlist and every segment it names, again and again, until
/// the playlist ends or `stop` is set. Every segment named must be served
/// whole: a TS stream (188-byte packets, sync bytes), the same bytes on
/// every read.
fn read_as_fast_as_possible(addr: SocketAddr, path: &str, stop: &AtomicBool) -> ReaderLog {
    let mut log = ReaderLog::default();
    let dir = path.rsplit_once('/').expect("a playlist path has a directory").0;
    while !stop.load(Ordering::Relaxed) {
        let playlist = match fetch(addr, path) {
            Ok(r) if r.status == 200 => r,
            // No segment yet: the stream has not reached its first keyframe.
            Ok(r) if r.status == 404 && log.playlists_read == 0 => continue,
            Ok(r) => {
                log.problems.push(format!("playlist: HTTP {}", r.status));
                continue;
            }
            Err(e) => {
                log.problems.push(format!("playlist: {e}"));
                continue;
            }
        };
        log.playlists_read += 1;
        if playlist.header("cache-control") != Some("no-store") {
            log.problems.push(format!("playlist Cache-Control {:?}", playlist.header("cache-control")));
        }
        let text = String::from_utf8_lossy(&playlist.body).into_owned();
        let ended = text.contains("#EXT-X-ENDLIST");
        for name in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let seq: u64 = match name.strip_suffix(".ts").and_then(|n| n.parse().ok()) {
                Some(s) => s,
                None => {
                    log.problems.push(format!("playlist names {name:?}"));
                    continue;
                }
            };
            log.segment_reads += 1;
            let seg = match fetch(addr, &format!("{dir}/{name}")) {
                Ok(r) if r.status == 200 => r,
                Ok(r) => {
                    log.problems.push(format!("segment {name}: HTTP {} right after the playlist named it", r.status));
                    continue;
                }
                Err(e) => {
                    log.problems.push(format!("segment {name}: {e}"));
                    continue;
                }
            };
            let body = seg.body;
            let whole = !body.is_empty() && body.len() % 188 == 0 && body.chunks(188).all(|p| p[0] == 0x47);
            if !whole {
                log.problems.push(format!("segment {name}: {} bytes, not whole TS packets", body.len()));
            }
            match log.segments.get(&seq) {
                Some(first) if *first != body => log.problems.push(format!("segment {name} changed between reads")),
                Some(_) => {}
                None => {
                    log.segments.insert(seq, body);
                }
            }
        }
        if ended {
            log.ended = true;
            break;
        }
    }
    log
}

/// Frames GStreamer's own HLS client decodes from `url`, to the end.
fn frames_decoded_by_gstreamer_hlsdemux(url: &str, codec: &str) -> u64 {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "souphttpsrc location={url} ! hlsdemux ! tsdemux ! {codec}parse ! avdec_{codec} ! fakesink name=sink sync=false signal-handoffs=true"
    ))
    .expect("GStreamer has souphttpsrc, hlsdemux, tsdemux, the parser and the libav decoder")
    .downcast::<gst::Pipeline>()
    .unwrap();
    let frames = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = pipeline.by_name("sink").unwrap();
    let counter = frames.clone();
    sink.connect("handoff", false, move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        None
    });
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("hlsdemux reaches the end of the playlist within a minute");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("GStreamer could not play the HLS stream: {} ({:?})", e.error(), e.debug());
    }
    frames.load(Ordering::Relaxed)
}

#[test]
fn a_repaired_stream_plays_as_hls_in_ffmpeg_and_gstreamer_with_every_frame_and_no_partial_segment() {
    plays_as_hls("h264", 25304, 25390);
}

#[test]
fn an_h265_stream_plays_as_hls_too() {
    plays_as_hls("h265", 25324, 25391);
}

fn plays_as_hls(codec: &str, port: u16, metrics_port: u16) {
    let runner = RunnerProcess::start(&manifest(port, codec), metrics_port, &[]).expect("runner starts");
    let addr = runner.metrics_addr;
    let path = "/hls/live/cam/index.m3u8";
    let url = format!("http://{addr}{path}");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || read_as_fast_as_possible(addr, path, &stop))
    };

    // 10 s of 640x360 at 30 frames/s, a keyframe each second, 3% of packets
    // lost on the way (repaired by NACK/RTX). The sender ends with an RTCP
    // BYE, which closes the playlist.
    let status = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", codec])
        .args(["--width", "640", "--height", "360", "--fps", "30", "--key-int", "30", "--bitrate", "1500"])
        .args(["--frames", &FRAMES.to_string(), "--loss", "uniform:0.03", "--seed", "11", "--quiet", "--linger-ms", "1000"])
        .stdin(Stdio::null())
        .status()
        .expect("zerodrop send runs");
    assert!(status.success(), "zerodrop send failed: {status}");

    // The reader stops by itself at the playlist's end; the deadline only
    // keeps a broken build from hanging the suite.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let log = reader.join().unwrap();
    eprintln!(
        "reader: {} playlists and {} segment reads, {} segments, ended {}",
        log.playlists_read,
        log.segment_reads,
        log.segments.len(),
        log.ended
    );
    assert!(log.ended, "the sender's BYE closed the playlist with #EXT-X-ENDLIST");
    assert!(log.problems.is_empty(), "reads that went wrong: {:#?}", log.problems);
    let seqs: Vec<u64> = log.segments.keys().copied().collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "every segment was read, none skipped");
    assert!(seqs.len() >= 9, "10 s in segments of about 1 s: {} segments", seqs.len());
    assert!(log.playlists_read > 50, "the reader kept reading for the whole run: {} playlists", log.playlists_read);

    // ffprobe decodes every frame of the playlist.
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames,codec_name,width,height", "-of", "default=nw=1"])
        .arg(&url)
        .output()
        .expect("ffprobe runs");
    let probed = String::from_utf8_lossy(&probe.stdout).into_owned();
    let probe_err = String::from_utf8_lossy(&probe.stderr).into_owned();
    eprintln!("ffprobe:\n{probed}{probe_err}");
    assert!(probe.status.success() && probe_err.trim().is_empty(), "ffprobe reported errors: {probe_err}");
    let ffmpeg_codec = if codec == "h265" { "hevc" } else { "h264" };
    assert!(probed.contains(&format!("codec_name={ffmpeg_codec}\nwidth=640\nheight=360\n")), "{probed}");
    assert!(probed.contains(&format!("nb_read_frames={FRAMES}\n")), "ffprobe decoded every frame sent: {probed}");

    // ffmpeg reads the playlist and every segment without a complaint.
    let ffmpeg = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i", &url, "-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let ffmpeg_err = String::from_utf8_lossy(&ffmpeg.stderr).into_owned();
    assert!(ffmpeg.status.success() && ffmpeg_err.trim().is_empty(), "ffmpeg reported errors: {ffmpeg_err}");

    // GStreamer's own HLS client plays it too.
    assert_eq!(frames_decoded_by_gstreamer_hlsdemux(&url, codec), FRAMES as u64, "hlsdemux decoded every frame sent");

    let metrics = runner.metrics().unwrap();
    let segments = metric_value(&metrics, "zerodrop_hls_segments_total", &["stream=\"cam\""]).unwrap();
    assert_eq!(segments as usize, seqs.len(), "the metric counts the segments published");
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "runner exit {}: {}", outcome.status, outcome.stderr);
    let stream = outcome.stream("cam");
    assert_eq!(stream["frames_dropped"], 0, "{stream:#}");
    assert!(stream["packets_lost"].as_u64().unwrap() > 0, "the path lost packets: {stream:#}");
}
