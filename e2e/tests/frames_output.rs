//! Frames for analytics as a program meets them: a local program connected
//! to a stream's Unix socket gets every decoded frame with its header and
//! the sender's timestamp, and the latest frame is served as a JPEG that
//! ffprobe reads.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, metric_value, zerodrop_bin};
use zerodrop_telemetry::fetch;

const FRAMES: u64 = 150;

/// (index, width, height, format, sender time ns, picture length)
type Header = (u64, u32, u32, String, i64, usize);

fn read_frame(conn: &mut UnixStream) -> std::io::Result<(Header, Vec<u8>)> {
    let mut h = [0u8; 48];
    conn.read_exact(&mut h)?;
    assert_eq!(&h[0..4], b"ZDF1", "frame header magic");
    assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 48);
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let len = u32_at(44) as usize;
    let mut data = vec![0u8; len];
    conn.read_exact(&mut data)?;
    let header = (
        u64::from_le_bytes(h[20..28].try_into().unwrap()),
        u32_at(8),
        u32_at(12),
        String::from_utf8_lossy(&h[16..20]).into_owned(),
        i64::from_le_bytes(h[28..36].try_into().unwrap()),
        len,
    );
    Ok((header, data))
}

#[test]
fn a_program_on_the_frames_socket_gets_every_decoded_frame_and_the_latest_is_served_as_jpeg() {
    let port = 25704;
    let sockets = tempfile::tempdir().unwrap();
    let manifest = zerodrop_e2e::single_source_manifest("analytics", "h264", port, 300, 10)
        + &format!("  outputs:\n    frames:\n      thumbnailIntervalMs: 200\n      socketDirectory: {}\n", sockets.path().display());
    let runner = RunnerProcess::start(&manifest, 25790, &[]).expect("runner starts");
    let path = sockets.path().join("analytics.cam.sock");
    let mut conn = UnixStream::connect(&path).expect("the stream listens on its frames socket");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(&runner.metrics().unwrap(), "zerodrop_frames_feed_clients", &["stream=\"cam\""]) != Some(1.0) {
        assert!(Instant::now() < deadline, "the program was never counted as connected");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let reader = std::thread::spawn(move || {
        let mut frames = Vec::new();
        while (frames.len() as u64) < FRAMES {
            match read_frame(&mut conn) {
                Ok((h, data)) => frames.push((h, data.iter().map(|&b| u64::from(b)).sum::<u64>())),
                Err(_) => break,
            }
        }
        frames
    });
    let mut sender = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", "h264"])
        .args(["--width", "320", "--height", "180", "--fps", "30", "--key-int", "30", "--bitrate", "500"])
        .args(["--frames", &FRAMES.to_string(), "--loss", "uniform:0.02", "--seed", "4", "--quiet", "--linger-ms", "500"])
        .stdin(Stdio::null())
        .spawn()
        .expect("zerodrop send starts");

    // The latest frame, while the stream runs.
    let jpeg_path = sockets.path().join("latest.jpg");
    let deadline = Instant::now() + Duration::from_secs(10);
    let jpeg = loop {
        let r = fetch(runner.metrics_addr, "/frames/analytics/cam/latest.jpg").unwrap();
        if r.status == 200 {
            assert_eq!(r.header("content-type"), Some("image/jpeg"));
            assert_eq!(r.header("cache-control"), Some("no-store"));
            break r.body;
        }
        assert_eq!(r.status, 404, "before the first frame: {}", String::from_utf8_lossy(&r.body));
        assert!(Instant::now() < deadline, "no thumbnail within 10 s");
        std::thread::park_timeout(Duration::from_millis(50));
    };
    std::fs::write(&jpeg_path, &jpeg).unwrap();
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name,width,height", "-of", "default=nw=1"])
        .arg(&jpeg_path)
        .output()
        .expect("ffprobe runs");
    let probed = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success() && probe.stderr.is_empty(), "{}", String::from_utf8_lossy(&probe.stderr));
    assert_eq!(probed, "codec_name=mjpeg\nwidth=320\nheight=180\n", "ffprobe reads the thumbnail");

    assert!(sender.wait().unwrap().success());
    let frames = reader.join().unwrap();
    let metrics = runner.metrics().unwrap();
    let dropped = metric_value(&metrics, "zerodrop_frames_feed_dropped_total", &["stream=\"cam\""]).unwrap();
    let outcome = runner.stop().expect("runner stops");
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert_eq!(outcome.stream("cam")["frames_decoded"], FRAMES);
    assert_eq!(dropped, 0.0, "a program that keeps up misses nothing");
    assert_eq!(frames.len() as u64, FRAMES, "every decoded frame reached the program");
    for (i, ((index, w, h, format, _, len), _)) in frames.iter().enumerate() {
        assert_eq!((*index, *w, *h, format.as_str(), *len), (i as u64, 320, 180, "I420", 320 * 180 * 3 / 2), "frame {i}");
    }
    let times: Vec<i64> = frames.iter().map(|((_, _, _, _, t, _), _)| *t).filter(|&t| t >= 0).collect();
    assert!(times.len() as u64 >= FRAMES - 40, "frames after the first sender report carry its time");
    assert!(times.windows(2).all(|w| w[1] > w[0]), "sender times increase");
    let distinct: std::collections::HashSet<u64> = frames.iter().map(|(_, sum)| *sum).collect();
    assert!(distinct.len() > 100, "moving pictures, not one frame repeated: {} distinct", distinct.len());
}
