//! HLS in a browser: Debian's Chromium (headless) plays the served playlist
//! with hls.js through Media Source Extensions, and the page reports what it
//! played, with a picture of the last frame, which is kept as a screenshot
//! (`target/hls-browser.png`). Chromium and hls.js come from
//! `scripts/install-deps.sh` (Debian's `chromium`, npm's `hls.js`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zerodrop_e2e::runner::{RunnerProcess, zerodrop_bin};

const FRAMES: u64 = 300;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn hlsjs() -> PathBuf {
    let path = std::env::var_os("ZERODROP_HLSJS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/web/node_modules/hls.js/dist/hls.min.js"));
    assert!(path.exists(), "{} is missing: run scripts/install-deps.sh (it installs hls.js from npm there)", path.display());
    path
}

/// The body of the first POST to `listener`, answered with 204.
fn one_report(listener: TcpListener) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut length = 0usize;
            let mut post = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                post |= line.starts_with("POST ");
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 0\r\n\r\n");
            if post {
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                return;
            }
        }
    });
    rx
}

#[test]
fn chromium_plays_the_hls_stream_with_hlsjs_to_the_end() {
    let hlsjs = hlsjs();
    let port = 25804;
    let manifest = zerodrop_e2e::single_source_manifest("web", "h264", port, 400, 15)
        + "  outputs:\n    hls:\n      segmentSeconds: 1\n      windowSegments: 30\n";
    let runner = RunnerProcess::start(&manifest, 25890, &[]).expect("runner starts");
    let status = Command::new(zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--codec", "h264"])
        .args(["--width", "640", "--height", "360", "--fps", "30", "--key-int", "30", "--bitrate", "1500"])
        .args(["--frames", &FRAMES.to_string(), "--loss", "uniform:0.03", "--seed", "21", "--quiet", "--linger-ms", "1000"])
        .stdin(Stdio::null())
        .status()
        .expect("zerodrop send runs");
    assert!(status.success());
    // The sender's BYE closes the playlist: the browser plays it whole.
    let playlist = format!("http://{}/hls/web/cam/index.m3u8", runner.metrics_addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zerodrop_telemetry::get(runner.metrics_addr, "/hls/web/cam/index.m3u8").is_ok_and(|r| r.body.contains("#EXT-X-ENDLIST")) {
        assert!(Instant::now() < deadline, "the playlist never ended");
        std::thread::park_timeout(Duration::from_millis(50));
    }

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let report_url = format!("http://{}/report", listener.local_addr().unwrap());
    let reports = one_report(listener);
    let page = workspace().join("e2e/web/hls-player.html");
    let url = format!("file://{}?hlsjs=file://{}&src={playlist}&report={report_url}", page.display(), hlsjs.display());
    let profile = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(runner.dir.path().join("chromium.log")).unwrap();
    let mut chromium = Command::new("chromium")
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required", "--mute-audio"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("chromium runs (Debian's chromium package: scripts/install-deps.sh)");
    let report = reports.recv_timeout(Duration::from_secs(60));
    let _ = chromium.kill();
    let _ = chromium.wait();
    let report: serde_json::Value = serde_json::from_str(&report.expect("the page reported within 60 s")).expect("the report is JSON");
    let png = report["screenshot"].as_str().unwrap_or("").strip_prefix("data:image/png;base64,").expect("a PNG picture");
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(png).expect("base64");
    let shot = workspace().join("target/hls-browser.png");
    std::fs::write(&shot, &png).unwrap();
    let mut summary = report.clone();
    summary["screenshot"] = format!("{} bytes, kept in {}", png.len(), shot.display()).into();
    eprintln!("hls.js in Chromium: {summary:#}");
    assert_eq!(report["why"], "ended", "played to the end: {summary:#}");
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(0), "hls.js reported no error: {summary:#}");
    assert_eq!((report["width"].as_u64(), report["height"].as_u64()), (Some(640), Some(360)));
    let duration = report["duration"].as_f64().unwrap();
    assert!((duration - FRAMES as f64 / 30.0).abs() < 0.2, "the playlist's duration is the stream's: {duration}");
    let frames = report["totalVideoFrames"].as_u64().unwrap_or(0);
    assert!(frames + 5 >= FRAMES, "the browser decoded about every frame: {frames} of {FRAMES}");
    assert!(report["lumaStdDev"].as_f64().unwrap() > 20.0, "the last frame is a picture, not a blank: {summary:#}");
    assert_eq!(&png[1..4], b"PNG");
    drop(runner);
}
