//! What each ingest transport costs us, and how many RTSP cameras one core
//! takes in.
//!
//! **The input.** One clip, encoded once per run with ffmpeg into a temporary
//! directory: 1280×720 at 30 frames/s, x264 (`ultrafast`) at 4 Mbit/s
//! (`-b:v 4M -maxrate 4M -bufsize 1M`; the test pattern carries noise so the
//! encoder really spends the 4 Mbit/s), a keyframe every 30 frames, no
//! B-frames, parameter sets in band (`repeat-headers=1`), as MPEG-TS, long
//! enough for the slowest start-up allowed (30 s), 2 s of settling, the
//! window and 5 s more. Every sender copies it without encoding again, so
//! every transport carries the same frames at the same rate and the senders'
//! CPU is small:
//!
//! - *RTP push*: `ffmpeg -re -stream_loop -1 -i clip.ts -c copy -f rtp
//!   rtp://127.0.0.1:P?pkt_size=1200` per stream into a `transport.rtp`
//!   source (payload type 96, no RTX: nothing is lost on loopback);
//! - *SRT*: the same ffmpeg with `-f mpegts
//!   srt://127.0.0.1:P?mode=caller&latency=200000` (ffmpeg's SRT latency is
//!   in microseconds: 200 ms, as our `repair.latencyMs`) into a
//!   `transport.srt` listener source per stream;
//! - *RTSP/TCP* and *RTSP/UDP*: GStreamer's gst-rtsp-server (Debian's Python
//!   bindings; the small server script is in this file and written to the
//!   temporary directory) serving the clip file as `filesrc ! tsdemux !
//!   h264parse ! rtph264pay mtu=1200`, each client in a session and media of
//!   its own (`set_shared(False)`: its own file reader, from the start of
//!   the clip), as N cameras would be. The server paces a file by its clock
//!   (each stream's rate is measured and a stream short of 30 frames/s is
//!   reported), and ends a session at the clip's end, so every window must
//!   end before the clip does (checked).
//!
//! **The receiver.** `zerodrop run --no-decode --workers 1` (receive,
//! reassemble and account; decoding costs the same whatever the transport),
//! pinned to core 1 (`taskset -c 1`); the senders, the servers and this
//! program run on core 0. The receiver's CPU over the window is the run
//! time of its threads (`/proc/PID/task/*/schedstat`, nanoseconds);
//! utime + stime (`/proc/PID/stat`) is recorded beside it, but counts 10 ms
//! ticks, too coarse for a stream's fraction of a percent over the window.
//! The window starts 2 s after every stream has handed on its first frame.
//! Each stream's frames (`zerodrop_frames_assembled_total`), bytes
//! (`zerodrop_rtp_received_bytes_total`: what reaches the RTP path; for RTSP
//! and SRT, what the ingest writes into its local socket) and packets are
//! read from /metrics at both ends of the window, with the receive worker's
//! busy time (`zerodrop_worker_busy_seconds_total`) and both cores' busy
//! share (/proc/stat); drops, losses and kernel drops are counted from the
//! start to the window's end. The senders' and servers' CPU is measured the
//! same way and reported apart: it is not charged to us.
//!
//! **Per-stream CPU.** `--streams` (4) streams per transport, each transport
//! in a run of its own with the same window, `--rounds` (3) times,
//! interleaved (RTP push, RTSP/TCP, RTSP/UDP, SRT, RTP push, ...). Per
//! stream: the receiver's CPU over the window / streams, as a share of one
//! core, the median over rounds (one round can land far from the others:
//! a few streams' wake-ups depend on how the sender happens to batch its
//! writes); the ratio of each transport to RTP push is taken between
//! medians of the same run. The process with the same number of
//! RTP sources and no traffic is measured once (its fixed cost, which the
//! per-stream figures include).
//!
//! **Capacity, one core.** Concurrent 4 Mbit/s RTSP/TCP streams into the
//! receiver, ramped up (each step a fresh server and receiver) until a step
//! does not pass. A step *passes* when every stream came up, no frame was
//! dropped, no packet lost, no kernel drop counted and no session dialled
//! again (start to window end), and every stream handed on 30 frames/s
//! ± 5% over the window: fewer, it fell behind; more, it was behind at the
//! window's start and caught up (what an overloaded receiver shows: TCP
//! holds the stream back, then it comes in a rush). RTSP/TCP does not lose on loopback: a
//! receiver that falls behind slows its server down (TCP back-pressure), and
//! a server that falls behind sends less, so a step that does not pass is
//! blamed on the core that was full: core 1 (ours, ≥ 90% busy, whatever
//! core 0 was) makes it a *failure* of ours (steps between it and the last
//! pass are then tried, up to three); otherwise it is *inconclusive*: the
//! server fell short first, and the result is a lower bound. Two servers:
//! - *gst-rtsp-server*, a session and a file reader per stream (as above):
//!   N independent cameras; it costs more per stream on core 0 than the
//!   receiver does on core 1, and builds each client's pipeline in turn, so
//!   it runs out first;
//! - *MediaMTX* (`zerodrop_testbench::mediamtx`, built by
//!   `scripts/mediamtx.sh build`; left out with a note when not built), a
//!   relay: one ffmpeg publishes the clip to it (`-re -stream_loop -1 -c copy
//!   -f rtsp`) and N sessions read that path; each reader joins mid-GOP (its
//!   frames before the first keyframe are counted apart, as skipped). It
//!   costs less per reader, so it shows where our core runs out. MediaMTX
//!   repacketises (payloads up to its own size, not 1200 bytes), so its
//!   packets per stream differ: the table says how many.
//!
//! ```text
//! cargo build --release -p zerodrop --bin zerodrop && cargo build --release -p zerodrop-e2e --bin bench-ingest
//! cargo run --release -p zerodrop-e2e --bin bench-ingest -- [--streams 4] [--seconds 15] [--rounds 3] [--max-streams 256] [--max-streams-relay 1024] [--allow-dirty]
//! ```
//! Results: `results/ingest-benchmark.json` and a section in BENCHMARKS.md
//! (`--no-write`: neither; `--output PATH`: the JSON there and BENCHMARKS.md
//! untouched, for trials).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use zerodrop_e2e::bench::{ensure_zerodrop_built, free_rtp_ports, free_tcp_port, process_cpu};
use zerodrop_e2e::results::{self, ResultsMeta};
use zerodrop_e2e::runner::{RunnerProcess, metric_sum};
use zerodrop_testbench::mediamtx::{self, MediaMtx};

const MARK_BEGIN: &str = "<!-- bench-ingest:begin (generated by bench-ingest; edit outside the markers) -->";
const MARK_END: &str = "<!-- bench-ingest:end -->";
/// The receiver's core and everyone else's.
const RECEIVER_CORE: usize = 1;
const PEER_CORE: usize = 0;
const FPS: f64 = 30.0;
const BITRATE: &str = "4M";
/// SRT latency and repair budget, milliseconds.
const LATENCY_MS: u64 = 200;
/// From every stream's first frame to the window's start.
const SETTLE_S: f64 = 2.0;
/// How long all streams may take to hand on their first frame.
const UP_TIMEOUT_S: f64 = 30.0;
/// The clip outlasts the slowest start-up, the settling and the window by
/// this much.
const CLIP_MARGIN_S: f64 = 5.0;
/// A stream keeps real time when it hands on 30 frames/s within this share.
const REAL_TIME_TOLERANCE: f64 = 0.05;
/// A core this busy over the window is full.
const CORE_FULL: f64 = 0.90;
/// Steps tried between the last pass and a failure of ours.
const BISECT_STEPS: usize = 3;

#[derive(Parser)]
#[command(name = "bench-ingest", about = "Per-stream CPU of RTSP/TCP, RTSP/UDP and SRT ingest against RTP push, and RTSP streams per core")]
struct Args {
    /// Streams per transport in the per-stream CPU runs.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Seconds of the measurement window of every run.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Times each transport is measured (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Upper bound of the capacity search against gst-rtsp-server.
    #[arg(long, default_value_t = 256)]
    max_streams: usize,
    /// Upper bound of the capacity search against MediaMTX (0: leave it out).
    #[arg(long, default_value_t = 1024)]
    max_streams_relay: usize,
    /// The gst-rtsp-server search's steps, comma-separated (default 4, 8,
    /// 16, 32, 64, 96, 128, then +32 up to --max-streams).
    #[arg(long, value_delimiter = ',')]
    steps: Vec<usize>,
    /// The MediaMTX search's steps (default 64, 128, then +128 up to
    /// --max-streams-relay).
    #[arg(long, value_delimiter = ',')]
    steps_relay: Vec<usize>,
    /// Leave out the capacity searches.
    #[arg(long)]
    skip_capacity: bool,
    /// Leave out the per-stream CPU runs.
    #[arg(long)]
    skip_per_stream: bool,
    /// Do not write the results file or BENCHMARKS.md.
    #[arg(long)]
    no_write: bool,
    /// Write the results JSON here instead, and leave BENCHMARKS.md alone.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write results even from a dirty tree (marked so).
    #[arg(long)]
    allow_dirty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    RtpPush,
    RtspTcp,
    RtspUdp,
    Srt,
}

impl Transport {
    const ALL: [Transport; 4] = [Transport::RtpPush, Transport::RtspTcp, Transport::RtspUdp, Transport::Srt];

    fn name(self) -> &'static str {
        match self {
            Transport::RtpPush => "rtp-push",
            Transport::RtspTcp => "rtsp-tcp",
            Transport::RtspUdp => "rtsp-udp",
            Transport::Srt => "srt",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Transport::RtpPush => "RTP push (UDP)",
            Transport::RtspTcp => "RTSP/TCP (interleaved)",
            Transport::RtspUdp => "RTSP/UDP",
            Transport::Srt => "SRT (MPEG-TS, listener)",
        }
    }

    fn rtsp(self) -> Option<&'static str> {
        match self {
            Transport::RtspTcp => Some("tcp"),
            Transport::RtspUdp => Some("udp"),
            _ => None,
        }
    }
}

/// Which RTSP server a run pulls from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// gst-rtsp-server, a session and a file reader per client.
    Gst,
    /// MediaMTX relaying one published stream to every reader.
    MediaMtx,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Gst => "gst-rtsp-server",
            Server::MediaMtx => "mediamtx",
        }
    }
}

/// gst-rtsp-server serving one file; each client in a session and media of
/// its own. Prints `READY port`, then `CLIENT n` as media are made.
const RTSP_SERVER_PY: &str = r#"import signal, sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer
Gst.init(None)
clip, port = sys.argv[1], int(sys.argv[2])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(str(port))
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={clip} ! tsdemux ! h264parse ! rtph264pay name=pay0 pt=96 mtu=1200 )")
factory.set_shared(False)
factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP)
clients = {"n": 0}
def configured(_factory, _media):
    print(f"CLIENT {clients['n']}", flush=True)
    clients["n"] += 1
factory.connect("media-configure", configured)
server.get_mount_points().add_factory("/clip", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print(f"READY {server.get_bound_port()}", flush=True)
loop = GLib.MainLoop()
signal.signal(signal.SIGTERM, lambda *_: loop.quit())
signal.signal(signal.SIGINT, lambda *_: loop.quit())
GLib.timeout_add(200, lambda: True)
loop.run()
"#;

/// The clip every sender copies.
struct Clip {
    path: PathBuf,
    seconds: f64,
    bytes: u64,
    encode_s: f64,
}

impl Clip {
    fn encode(dir: &Path, seconds: f64) -> anyhow::Result<Clip> {
        let path = dir.join("clip.ts");
        let started = Instant::now();
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
            .args(["-f", "lavfi", "-i", &format!("testsrc2=size=1280x720:rate={FPS},noise=alls=12:allf=t")])
            .args(["-t", &format!("{seconds}")])
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-b:v", BITRATE, "-maxrate", BITRATE, "-bufsize", "1M"])
            .args(["-g", "30", "-bf", "0", "-x264-params", "repeat-headers=1:scenecut=0"])
            .args(["-f", "mpegts"])
            .arg(&path)
            .stdin(Stdio::null())
            .status()
            .context("running ffmpeg (scripts/install-deps.sh installs it)")?;
        anyhow::ensure!(status.success(), "ffmpeg could not encode the clip: {status}");
        let bytes = std::fs::metadata(&path)?.len();
        Ok(Clip { path, seconds, bytes, encode_s: started.elapsed().as_secs_f64() })
    }

    /// The whole MPEG-TS rate, bits per second.
    fn ts_bitrate(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds
    }
}

/// A child process pinned to the peers' core (`taskset` execs it: the same
/// pid), stopped when dropped.
struct Peer {
    child: Child,
}

impl Peer {
    fn spawn(program: &str, args: &[String], stdout: Stdio) -> anyhow::Result<Peer> {
        let child = Command::new("taskset")
            .args(["-c", &PEER_CORE.to_string(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting taskset -c {PEER_CORE} {program}"))?;
        Ok(Peer { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            // Poll interval while it exits.
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The RTSP server of a run, listening (and for MediaMTX, published to).
enum RtspPeer {
    Gst {
        peer: Peer,
        port: u16,
        /// Its output after `READY`: a `CLIENT n` line per media made.
        lines: mpsc::Receiver<String>,
        sessions: std::cell::Cell<usize>,
    },
    MediaMtx {
        server: MediaMtx,
        pid: u32,
        publisher: Peer,
    },
}

impl RtspPeer {
    fn start(server: Server, script: &Path, clip: &Clip) -> anyhow::Result<RtspPeer> {
        match server {
            Server::Gst => {
                let port = free_tcp_port()?;
                // Debian's python3: the GObject bindings are a Debian package.
                let args = [script.display().to_string(), clip.path.display().to_string(), port.to_string()];
                let mut peer = Peer::spawn("/usr/bin/python3", &args, Stdio::piped())?;
                let stdout = peer.child.stdout.take().context("server stdout")?;
                let (tx, lines) = mpsc::channel();
                std::thread::spawn(move || {
                    for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                });
                match lines.recv_timeout(Duration::from_secs(20)) {
                    Ok(l) if l.starts_with("READY") => {}
                    other => bail!("gst-rtsp-server did not start ({other:?}; python3-gi and gir1.2-gst-rtsp-server-1.0 are needed)"),
                }
                Ok(RtspPeer::Gst { peer, port, lines, sessions: std::cell::Cell::new(0) })
            }
            Server::MediaMtx => {
                // This program runs on the peers' core: MediaMTX inherits it.
                let server = MediaMtx::start()?;
                let pid = child_named("mediamtx").context("MediaMTX's pid among this program's children")?;
                let mut args: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i"].map(String::from).to_vec();
                args.push(clip.path.display().to_string());
                args.extend(["-map", "0:v", "-c", "copy", "-f", "rtsp", "-rtsp_transport", "tcp"].map(String::from));
                args.push(server.url("clip"));
                let publisher = Peer::spawn("ffmpeg", &args, Stdio::null())?;
                let deadline = Instant::now() + Duration::from_secs(15);
                while !server.log().contains("is publishing to path 'clip'") {
                    anyhow::ensure!(Instant::now() < deadline, "ffmpeg did not publish to MediaMTX within 15 s:\n{}", server.log());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(RtspPeer::MediaMtx { server, pid, publisher })
            }
        }
    }

    fn url(&self) -> String {
        match self {
            RtspPeer::Gst { port, .. } => format!("rtsp://127.0.0.1:{port}/clip"),
            RtspPeer::MediaMtx { server, .. } => server.url("clip"),
        }
    }

    /// The processes whose CPU is the server's.
    fn pids(&self) -> Vec<u32> {
        match self {
            RtspPeer::Gst { peer, .. } => vec![peer.pid()],
            RtspPeer::MediaMtx { pid, publisher, .. } => vec![*pid, publisher.pid()],
        }
    }

    /// gst-rtsp-server's media made so far.
    fn sessions(&self) -> Option<usize> {
        match self {
            RtspPeer::Gst { lines, sessions, .. } => {
                let new = lines.try_iter().filter(|l| l.starts_with("CLIENT")).count();
                sessions.set(sessions.get() + new);
                Some(sessions.get())
            }
            RtspPeer::MediaMtx { .. } => None,
        }
    }
}

/// The pid of this program's child process named `comm`.
fn child_named(comm: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
        let ppid: u32 = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && name == comm).then_some(pid)
    })
}

/// Pins the calling thread (and so every thread and child started after it)
/// to `core`.
fn pin_self(core: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it
    // for core < CPU_SETSIZE; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        anyhow::ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity to core {core}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sources per pipeline (the schema allows 128).
const SOURCES_PER_PIPELINE: usize = 100;

/// `n` sources `s0`, `s1`, ... in pipelines `ingest0`, `ingest1`, ... of at
/// most [`SOURCES_PER_PIPELINE`] each, one YAML document per pipeline.
fn manifest(transport: Transport, n: usize, ports: &[u16], rtsp_url: Option<&str>) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i % SOURCES_PER_PIPELINE == 0 {
            if i > 0 {
                let _ = write!(s, "  repair:\n    latencyMs: {LATENCY_MS}\n  decode:\n    decoder: software\n---\n");
            }
            let _ = write!(s, "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata:\n  name: ingest{}\nspec:\n  sources:\n", i / SOURCES_PER_PIPELINE);
        }
        let _ = writeln!(s, "    - name: s{i}\n      codec: h264\n      transport:");
        // Pushed and SRT sources: their own port; RTSP sources: none.
        let port = ports.get(i).copied().unwrap_or(0);
        match transport {
            Transport::RtpPush => {
                let _ = writeln!(
                    s,
                    "        rtp: {{listenAddress: 127.0.0.1, port: {p}, rtcpPort: {rtcp}}}\n      payloadType: 96",
                    p = port,
                    rtcp = port + 1
                );
            }
            Transport::RtspTcp | Transport::RtspUdp => {
                let _ = writeln!(
                    s,
                    "        rtsp: {{url: \"{}\", lowerTransport: {}, timeoutSeconds: 10}}",
                    rtsp_url.expect("an RTSP server"),
                    transport.rtsp().expect("RTSP")
                );
            }
            Transport::Srt => {
                let _ = writeln!(s, "        srt: {{mode: listener, address: 127.0.0.1, port: {port}}}");
            }
        }
    }
    let _ = write!(s, "  repair:\n    latencyMs: {LATENCY_MS}\n  decode:\n    decoder: software\n");
    s
}

fn ffmpeg_sender(transport: Transport, clip: &Clip, port: u16) -> anyhow::Result<Peer> {
    let mut args: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i"].map(String::from).to_vec();
    args.push(clip.path.display().to_string());
    args.extend(["-map", "0:v", "-c", "copy"].map(String::from));
    match transport {
        Transport::RtpPush => {
            args.extend(["-payload_type", "96", "-f", "rtp"].map(String::from));
            args.push(format!("rtp://127.0.0.1:{port}?pkt_size=1200"));
        }
        Transport::Srt => {
            args.extend(["-f", "mpegts"].map(String::from));
            args.push(format!("srt://127.0.0.1:{port}?mode=caller&latency={}&pkt_size=1316", LATENCY_MS * 1000));
        }
        _ => bail!("{} has no pushing sender", transport.name()),
    }
    Peer::spawn("ffmpeg", &args, Stdio::null())
}

/// Busy and total jiffies of each CPU, from /proc/stat.
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// One end of a window.
struct Sample {
    at: Instant,
    /// The receiver: (utime + stime, its threads' schedstat run time), s.
    receiver: (f64, f64),
    /// The senders or the server, summed, the same two ways.
    peers: (f64, f64),
    cores: Vec<(u64, u64)>,
    metrics: String,
}

fn sample(runner: &RunnerProcess, peer_pids: &[u32]) -> anyhow::Result<Sample> {
    let at = Instant::now();
    let cores = cpu_jiffies();
    let receiver = process_cpu(runner.pid())?;
    let mut peers = (0.0, 0.0);
    for p in peer_pids {
        let c = process_cpu(*p).unwrap_or((0.0, 0.0));
        peers = (peers.0 + c.0, peers.1 + c.1);
    }
    let metrics = runner.metrics()?;
    Ok(Sample { at, receiver, peers, cores, metrics })
}

fn stream_metric(metrics: &str, name: &str, i: usize) -> f64 {
    metric_sum(metrics, name, &format!("stream=\"s{i}\""))
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// One run: `n` streams over `transport` into one pinned receiver.
fn run_once(transport: Transport, n: usize, server: Server, args: &Args, clip: &Clip, script: &Path) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let ports = if transport.rtsp().is_none() { free_rtp_ports(n)? } else { Vec::new() };
    let mut rtsp = match transport.rtsp() {
        Some(_) => Some(RtspPeer::start(server, script, clip)?),
        None => None,
    };
    let text = manifest(transport, n, &ports, rtsp.as_ref().map(RtspPeer::url).as_deref());
    let runner = RunnerProcess::start_with(&text, free_tcp_port()?, &["--no-decode", "--workers", "1"], false)
        .with_context(|| format!("starting zerodrop run for {} × {n}", transport.name()))?;
    eprintln!("bench-ingest:   receiver ready after {:.1} s", started.elapsed().as_secs_f64());
    // The receiver listens first; the senders call it or send to it.
    let mut senders = Vec::new();
    for port in ports.iter().filter(|_| rtsp.is_none()) {
        senders.push(ffmpeg_sender(transport, clip, *port)?);
    }
    // gst-rtsp-server starts the clip for each client as it plays; the
    // pushing senders and MediaMTX's publisher loop it.
    let media_start = Instant::now();
    let clip_bounded = matches!(rtsp, Some(RtspPeer::Gst { .. }));
    let peer_pids: Vec<u32> = rtsp.as_ref().map(RtspPeer::pids).unwrap_or_default().into_iter().chain(senders.iter().map(Peer::pid)).collect();
    let streams_up = |m: &str| (0..n).filter(|&i| stream_metric(m, "zerodrop_frames_assembled_total", i) > 0.0).count();
    let said = std::cell::Cell::new(Instant::now());
    let last_up = std::cell::Cell::new(0);
    let up = runner.poll_metrics(Duration::from_secs_f64(UP_TIMEOUT_S), |m| {
        let k = streams_up(m);
        last_up.set(k);
        if said.get().elapsed() >= Duration::from_secs(5) {
            eprintln!("bench-ingest:   {k} of {n} stream(s) up after {:.0} s", media_start.elapsed().as_secs_f64());
            said.set(Instant::now());
        }
        k == n
    });
    let up_s = media_start.elapsed().as_secs_f64();
    let head = serde_json::json!({
        "transport": transport.name(),
        "server": rtsp.as_ref().map(|_| server.name()),
        "streams": n,
        "all_up": up,
        "up_s": up_s,
    });
    if !up {
        let up_count = last_up.get();
        let mut result = head;
        result["streams_up"] = up_count.into();
        result["streams_up_after_timeout"] = streams_up(&runner.metrics().unwrap_or_default()).into();
        result["server_sessions"] = rtsp.as_ref().and_then(RtspPeer::sessions).into();
        result["core_busy_at_timeout"] = serde_json::Value::Null;
        eprintln!("bench-ingest:   {} × {n}: only {up_count} stream(s) handed on a frame within {UP_TIMEOUT_S} s", transport.name());
        drop(senders);
        let _ = runner.stop();
        return Ok(result);
    }
    std::thread::sleep(Duration::from_secs_f64(SETTLE_S));
    let a = sample(&runner, &peer_pids)?;
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let b = sample(&runner, &peer_pids)?;
    let window_end_in_clip = b.at.duration_since(media_start).as_secs_f64();
    let mut alive = true;
    for s in senders.iter_mut() {
        alive &= s.alive();
    }
    if let Some(RtspPeer::MediaMtx { publisher, .. }) = rtsp.as_mut() {
        alive &= publisher.alive();
    }
    let sessions = rtsp.as_ref().and_then(RtspPeer::sessions);
    drop(senders);
    drop(rtsp);
    let outcome = runner.stop()?;
    anyhow::ensure!(outcome.status.success(), "{} × {n}: zerodrop run exited with {}: {}", transport.name(), outcome.status, outcome.stderr);

    let dt = b.at.duration_since(a.at).as_secs_f64();
    let receiver_share = (b.receiver.1 - a.receiver.1) / dt;
    let receiver_share_ticks = (b.receiver.0 - a.receiver.0) / dt;
    let peers_share = (b.peers.1 - a.peers.1) / dt;
    let peers_share_ticks = (b.peers.0 - a.peers.0) / dt;
    let core_busy: Vec<f64> = a
        .cores
        .iter()
        .zip(&b.cores)
        .map(|(x, y)| if y.1 > x.1 { (y.0 - x.0) as f64 / (y.1 - x.1) as f64 } else { f64::NAN })
        .collect();
    let delta = |name: &str, i: usize| stream_metric(&b.metrics, name, i) - stream_metric(&a.metrics, name, i);
    let fps: Vec<f64> = (0..n).map(|i| delta("zerodrop_frames_assembled_total", i) / dt).collect();
    let mbps: Vec<f64> = (0..n).map(|i| delta("zerodrop_rtp_received_bytes_total", i) * 8.0 / dt / 1e6).collect();
    let pps: Vec<f64> = (0..n).map(|i| delta("zerodrop_rtp_packets_received_total", i) / dt).collect();
    let total = |m: &str, name: &str| metric_sum(m, name, "");
    let count = |m: &str, name: &str| total(m, name).round() as u64;
    let worker_busy = (total(&b.metrics, "zerodrop_worker_busy_seconds_total") - total(&a.metrics, "zerodrop_worker_busy_seconds_total")) / dt;
    let window_mean = |name: &str| {
        let d = |suffix: &str| total(&b.metrics, &format!("{name}_{suffix}")) - total(&a.metrics, &format!("{name}_{suffix}"));
        let n = d("count");
        if n > 0.0 { d("sum") / n } else { f64::NAN }
    };
    let assembly_ms = window_mean("zerodrop_assembly_latency_seconds") * 1e3;
    let report_sum = |k: &str| outcome.report["streams"].as_array().map_or(0, |a| a.iter().map(|s| s[k].as_u64().unwrap_or(0)).sum::<u64>());
    let mut result = head;
    let extra = serde_json::json!({
        "window_s": dt,
        "window_end_s_after_media_start": window_end_in_clip,
        "clip_s": clip.seconds,
        "clip_bounded": clip_bounded,
        "within_clip": !clip_bounded || window_end_in_clip + 1.0 < clip.seconds,
        "senders_alive_at_end": alive,
        "server_sessions": sessions,
        "receiver_cpu_core_share": receiver_share,
        "receiver_cpu_per_stream_core_share": receiver_share / n as f64,
        "receiver_cpu_core_share_utime_stime": receiver_share_ticks,
        "receiver_cpu_per_stream_core_share_utime_stime": receiver_share_ticks / n as f64,
        "worker_busy_share": worker_busy,
        "peers_cpu_core_share": peers_share,
        "peers_cpu_per_stream_core_share": peers_share / n as f64,
        "peers_cpu_core_share_utime_stime": peers_share_ticks,
        "core_busy": core_busy,
        "fps_per_stream": fps,
        "fps_min": min(&fps),
        "fps_max": fps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "fps_mean": mean(&fps),
        "mbps_per_stream": mbps,
        "mbps_min": min(&mbps),
        "mbps_mean": mean(&mbps),
        "packets_per_s_per_stream_mean": mean(&pps),
        "assembly_latency_mean_ms": if assembly_ms.is_finite() { serde_json::json!(assembly_ms) } else { serde_json::Value::Null },
        "window": {
            "frames_assembled": count(&b.metrics, "zerodrop_frames_assembled_total") - count(&a.metrics, "zerodrop_frames_assembled_total"),
            "frames_dropped": count(&b.metrics, "zerodrop_frames_dropped_total") - count(&a.metrics, "zerodrop_frames_dropped_total"),
            "packets_received": count(&b.metrics, "zerodrop_rtp_packets_received_total") - count(&a.metrics, "zerodrop_rtp_packets_received_total"),
        },
        "to_window_end": {
            "frames_assembled": count(&b.metrics, "zerodrop_frames_assembled_total"),
            "frames_dropped": count(&b.metrics, "zerodrop_frames_dropped_total"),
            "frames_skipped_before_keyframe": count(&b.metrics, "zerodrop_frames_skipped_before_keyframe_total"),
            "frames_expected": count(&b.metrics, "zerodrop_frames_expected_total"),
            "packets_received": count(&b.metrics, "zerodrop_rtp_packets_received_total"),
            "packets_lost": count(&b.metrics, "zerodrop_rtp_packets_lost_total"),
            "kernel_udp_drops": count(&b.metrics, "zerodrop_kernel_udp_drops_total"),
            "ingest_reconnects": count(&b.metrics, "zerodrop_ingest_reconnects_total"),
        },
        "at_exit_report": {
            "frames_assembled": report_sum("frames_assembled"),
            "frames_dropped": report_sum("frames_dropped"),
            "frames_skipped_before_keyframe": report_sum("frames_skipped_before_keyframe"),
            "packets_lost": report_sum("packets_lost"),
        },
        "wall_s": started.elapsed().as_secs_f64(),
    });
    for (k, v) in extra.as_object().expect("an object") {
        result[k] = v.clone();
    }
    eprintln!(
        "bench-ingest:   {:<8} × {n:>4}: receiver {:5.1}% of core {RECEIVER_CORE} ({:.3}% per stream, utime+stime {:.3}%; worker busy {:.1}%), peers {:5.1}%; cores busy {}; {:.1}–{:.1} fps, {:.2} Mbit/s, {:.0} pkt/s per stream; assembly {:.1} ms; dropped {}, lost {}, reconnects {}",
        transport.name(),
        receiver_share * 100.0,
        receiver_share * 100.0 / n as f64,
        receiver_share_ticks * 100.0 / n as f64,
        worker_busy * 100.0,
        peers_share * 100.0,
        core_busy.iter().map(|c| format!("{:.0}%", c * 100.0)).collect::<Vec<_>>().join("/"),
        min(&fps),
        fps.iter().copied().fold(0.0, f64::max),
        mean(&mbps),
        mean(&pps),
        assembly_ms,
        result["to_window_end"]["frames_dropped"],
        result["to_window_end"]["packets_lost"],
        result["to_window_end"]["ingest_reconnects"],
    );
    Ok(result)
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A capacity step's verdict (`pass`, `fail`: ours, `inconclusive`: not
/// ours to answer for), and why.
fn judge(r: &serde_json::Value) -> (&'static str, String) {
    let n = r["streams"].as_u64().unwrap_or(0);
    if r["all_up"] != true {
        return (
            "inconclusive",
            format!(
                "only {} of {n} streams handed on a frame within {UP_TIMEOUT_S} s ({} a moment later)",
                r["streams_up"], r["streams_up_after_timeout"]
            ),
        );
    }
    if r["within_clip"] != true {
        return ("inconclusive", "the window did not end before the clip did".into());
    }
    if r["senders_alive_at_end"] != true {
        return ("inconclusive", "the publisher exited".into());
    }
    let end = &r["to_window_end"];
    let mut faults = Vec::new();
    for (k, what) in [
        ("frames_dropped", "frame(s) dropped"),
        ("packets_lost", "packet(s) lost"),
        ("kernel_udp_drops", "kernel drop(s)"),
        ("ingest_reconnects", "session(s) dialled again"),
    ] {
        if f(&end[k]) > 0.0 {
            faults.push(format!("{} {what}", end[k]));
        }
    }
    let (slowest, fastest) = (f(&r["fps_min"]), f(&r["fps_max"]));
    let short = slowest < (1.0 - REAL_TIME_TOLERANCE) * FPS;
    let rushed = fastest > (1.0 + REAL_TIME_TOLERANCE) * FPS;
    if short {
        faults.push(format!("slowest stream {slowest:.1} frames/s"));
    }
    if rushed {
        faults.push(format!("fastest stream {fastest:.1} frames/s (behind, catching up)"));
    }
    if faults.is_empty() {
        return ("pass", String::new());
    }
    let busy = |i: usize| f(&r["core_busy"][i]);
    let cores = format!("core {RECEIVER_CORE} (ours) {:.0}% busy, core {PEER_CORE} (server) {:.0}%", busy(RECEIVER_CORE) * 100.0, busy(PEER_CORE) * 100.0);
    let verdict = if busy(RECEIVER_CORE) >= CORE_FULL {
        "fail"
    } else if busy(PEER_CORE) >= CORE_FULL {
        "inconclusive"
    } else if faults.len() == usize::from(short) + usize::from(rushed) {
        // Only off real time, and no core full: not ours to answer for.
        "inconclusive"
    } else {
        "fail"
    };
    (verdict, format!("{}; {cores}", faults.join(", ")))
}

fn default_steps(server: Server, max: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = match server {
        Server::Gst => {
            let mut v = vec![4, 8, 16, 32, 64, 96, 128];
            let mut s = 160;
            while s <= max {
                v.push(s);
                s += 32;
            }
            v
        }
        Server::MediaMtx => {
            let mut v = vec![64, 128, 256, 384, 512];
            let mut s = 640;
            while s <= max {
                v.push(s);
                s += 128;
            }
            v
        }
    };
    steps.retain(|&s| s <= max);
    if steps.last().is_none_or(|&l| l < max) {
        steps.push(max);
    }
    steps
}

/// Ramps RTSP/TCP streams from `server` until a step does not pass; after a
/// failure of ours, tries the steps between.
fn capacity_search(server: Server, steps: &[usize], args: &Args, clip: &Clip, script: &Path) -> anyhow::Result<serde_json::Value> {
    let mut runs: Vec<serde_json::Value> = Vec::new();
    let mut best: Option<serde_json::Value> = None;
    let mut stopped: Option<serde_json::Value> = None;
    let step = |n: usize, runs: &mut Vec<serde_json::Value>| -> anyhow::Result<serde_json::Value> {
        eprintln!("bench-ingest: capacity ({}): {n} RTSP/TCP stream(s) into one core", server.name());
        let mut r = run_once(Transport::RtspTcp, n, server, args, clip, script)?;
        let (verdict, why) = judge(&r);
        eprintln!("bench-ingest:   → {verdict}{}", if why.is_empty() { String::new() } else { format!(": {why}") });
        r["verdict"] = verdict.into();
        r["why"] = why.into();
        runs.push(r.clone());
        Ok(r)
    };
    for &n in steps {
        let r = step(n, &mut runs)?;
        if r["verdict"] == "pass" {
            best = Some(r);
        } else {
            stopped = Some(r);
            break;
        }
    }
    // Narrow a failure of ours down.
    for _ in 0..BISECT_STEPS {
        let (Some(s), lo) = (&stopped, best.as_ref().map_or(0, |b| b["streams"].as_u64().unwrap_or(0) as usize)) else { break };
        if s["verdict"] != "fail" {
            break;
        }
        let hi = s["streams"].as_u64().unwrap_or(0) as usize;
        let grain = (lo / 16).max(4);
        if hi <= lo + grain {
            break;
        }
        let mid = (lo + hi) / 2 / grain * grain;
        if mid <= lo || mid >= hi {
            break;
        }
        let r = step(mid, &mut runs)?;
        if r["verdict"] == "pass" {
            best = Some(r);
        } else if r["verdict"] == "fail" {
            stopped = Some(r);
        } else {
            // Not ours: stop narrowing.
            break;
        }
    }
    let n = best.as_ref().map_or(0, |b| b["streams"].as_u64().unwrap_or(0));
    let max = steps.iter().copied().max().unwrap_or(0);
    let (limit, statement) = match &stopped {
        None => ("search bound", format!("at least {n} (the largest number tried)")),
        Some(r) if r["verdict"] == "fail" => ("ours", format!("{n}; at {} streams: {}", r["streams"], r["why"].as_str().unwrap_or(""))),
        Some(r) => (
            "server",
            format!(
                "at least {n}; at {} streams the server on core {PEER_CORE}, not the receiver, fell short first ({})",
                r["streams"],
                r["why"].as_str().unwrap_or("")
            ),
        ),
    };
    eprintln!("bench-ingest: capacity ({}): {statement}", server.name());
    Ok(serde_json::json!({
        "server": server.name(),
        "transport": Transport::RtspTcp.name(),
        "steps_planned": steps,
        "max_streams": max,
        "largest_n_without_drop": n,
        "limited_by": limit,
        "statement": statement,
        "at_n": best,
        "stopped_at": stopped,
        "runs": runs,
    }))
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn capacity_table(c: &serde_json::Value) -> String {
    let mut md = String::from(
        "| streams | result | receiver CPU (core 1) | per stream | worker busy | server CPU | core 0 / core 1 busy | frames/s per stream (slowest–fastest) | Mbit/s per stream | packets/s per stream | assembly latency (mean) | frames assembled | skipped before keyframe | dropped |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut runs: Vec<&serde_json::Value> = c["runs"].as_array().into_iter().flatten().collect();
    runs.sort_by_key(|r| r["streams"].as_u64().unwrap_or(0));
    for r in runs {
        let verdict = match r["why"].as_str() {
            Some(w) if !w.is_empty() => format!("{}: {w}", r["verdict"].as_str().unwrap_or("")),
            _ => r["verdict"].as_str().unwrap_or("").to_string(),
        };
        if r["all_up"] != true {
            let _ = writeln!(md, "| {} | {verdict} | | | | | | | | | | | | |", r["streams"]);
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | {verdict} | {} | {:.3}% | {} | {} | {} / {} | {:.1} ({:.1}–{:.1}) | {:.2} | {:.0} | {:.1} ms | {} | {} | {} |",
            r["streams"],
            pct(f(&r["receiver_cpu_core_share"])),
            f(&r["receiver_cpu_per_stream_core_share"]) * 100.0,
            pct(f(&r["worker_busy_share"])),
            pct(f(&r["peers_cpu_core_share"])),
            pct(f(&r["core_busy"][PEER_CORE])),
            pct(f(&r["core_busy"][RECEIVER_CORE])),
            f(&r["fps_mean"]),
            f(&r["fps_min"]),
            f(&r["fps_max"]),
            f(&r["mbps_mean"]),
            f(&r["packets_per_s_per_stream_mean"]),
            f(&r["assembly_latency_mean_ms"]),
            r["to_window_end"]["frames_assembled"],
            r["to_window_end"]["frames_skipped_before_keyframe"],
            r["to_window_end"]["frames_dropped"],
        );
    }
    let at_n = &c["at_n"];
    let _ = writeln!(
        md,
        "\n**Result ({}):** {}{}.",
        c["server"].as_str().unwrap_or(""),
        c["statement"].as_str().unwrap_or(""),
        if at_n.is_null() {
            String::new()
        } else {
            format!(
                " — at {} streams the receiver used {} of its core ({:.3}% per stream; worker thread busy {}), the server {} of core {PEER_CORE}",
                at_n["streams"],
                pct(f(&at_n["receiver_cpu_core_share"])),
                f(&at_n["receiver_cpu_per_stream_core_share"]) * 100.0,
                pct(f(&at_n["worker_busy_share"])),
                pct(f(&at_n["peers_cpu_core_share"])),
            )
        }
    );
    md
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.streams > 0 && args.rounds > 0 && args.seconds > 0.0, "--streams, --rounds and --seconds must be positive");
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(nproc >= 2, "two cores are needed (the receiver on core {RECEIVER_CORE}, the rest on core {PEER_CORE}); this machine has {nproc}");
    let root = results::workspace_root();
    let writes = !args.no_write;
    let meta = ResultsMeta::start("bench-ingest", &root, writes && args.output.is_none(), args.allow_dirty)?;
    let bin = ensure_zerodrop_built()?;
    // This program, and every process it starts but the receiver, on the
    // peers' core.
    pin_self(PEER_CORE)?;
    let tmp = tempfile::tempdir()?;
    // The receiver pinned to its core: `exec` keeps the pid, so the runner
    // signals and measures zerodrop itself.
    let wrapper = tmp.path().join("zerodrop-pinned");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec taskset -c {RECEIVER_CORE} '{}' \"$@\"\n", bin.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    // SAFETY: set before any thread is started; the e2e helpers read it.
    unsafe { std::env::set_var("ZERODROP_BIN", &wrapper) };
    let script = tmp.path().join("rtsp_clip_server.py");
    std::fs::write(&script, RTSP_SERVER_PY)?;

    let clip_s = (UP_TIMEOUT_S + SETTLE_S + args.seconds + CLIP_MARGIN_S).ceil();
    eprintln!("bench-ingest: encoding the clip (1280x720p30 H.264 {BITRATE}bit/s, GOP 30, no B-frames, {clip_s} s, MPEG-TS)");
    let clip = Clip::encode(tmp.path(), clip_s)?;
    eprintln!("bench-ingest: clip {} bytes, {:.2} Mbit/s as TS, encoded in {:.1} s", clip.bytes, clip.ts_bitrate() / 1e6, clip.encode_s);

    // Per-stream CPU.
    let mut per_stream_runs: Vec<serde_json::Value> = Vec::new();
    let mut idle = serde_json::Value::Null;
    let mut per_stream_summary = Vec::new();
    if !args.skip_per_stream {
        eprintln!("bench-ingest: baseline: {} RTP sources, no traffic, {} s", args.streams, args.seconds);
        idle = {
            let ports = free_rtp_ports(args.streams)?;
            let runner = RunnerProcess::start_with(&manifest(Transport::RtpPush, args.streams, &ports, None), free_tcp_port()?, &["--no-decode", "--workers", "1"], false)?;
            std::thread::sleep(Duration::from_secs_f64(SETTLE_S));
            let a = (Instant::now(), process_cpu(runner.pid())?);
            std::thread::sleep(Duration::from_secs_f64(args.seconds));
            let b = (Instant::now(), process_cpu(runner.pid())?);
            runner.stop()?;
            let dt = b.0.duration_since(a.0).as_secs_f64();
            let share = (b.1.1 - a.1.1) / dt;
            eprintln!("bench-ingest:   idle receiver {:.3}% of a core", share * 100.0);
            serde_json::json!({ "streams": args.streams, "window_s": dt, "receiver_cpu_core_share": share, "receiver_cpu_core_share_utime_stime": (b.1.0 - a.1.0) / dt })
        };
        for round in 1..=args.rounds {
            for t in Transport::ALL {
                eprintln!("bench-ingest: per-stream CPU, round {round}/{}: {} × {}", args.rounds, t.label(), args.streams);
                let mut r = run_once(t, args.streams, Server::Gst, &args, &clip, &script)?;
                anyhow::ensure!(r["all_up"] == true, "{} × {}: not every stream came up: {r}", t.name(), args.streams);
                anyhow::ensure!(r["within_clip"] == true, "{} × {}: the window outlasted the clip: {r}", t.name(), args.streams);
                r["round"] = round.into();
                per_stream_runs.push(r);
            }
        }
        let of = |t: Transport| per_stream_runs.iter().filter(move |r| r["transport"] == t.name());
        let mean_of = |t: Transport, key: &str| mean(&of(t).map(|r| f(&r[key])).collect::<Vec<_>>());
        let median_of = |t: Transport, key: &str| median(of(t).map(|r| f(&r[key])).collect());
        let rtp_per_stream = median_of(Transport::RtpPush, "receiver_cpu_per_stream_core_share");
        for t in Transport::ALL {
            let cpu = median_of(t, "receiver_cpu_per_stream_core_share");
            let sum = |k: &str| -> u64 { of(t).map(|r| r["to_window_end"][k].as_u64().unwrap_or(0)).sum() };
            per_stream_summary.push(serde_json::json!({
                "transport": t.name(),
                "label": t.label(),
                "receiver_cpu_per_stream_core_share_median": cpu,
                "receiver_cpu_per_stream_core_share_mean": mean_of(t, "receiver_cpu_per_stream_core_share"),
                "receiver_cpu_per_stream_core_share_rounds": of(t).map(|r| f(&r["receiver_cpu_per_stream_core_share"])).collect::<Vec<_>>(),
                "ratio_to_rtp_push": cpu / rtp_per_stream,
                "utime_stime_per_stream_core_share_median": median_of(t, "receiver_cpu_per_stream_core_share_utime_stime"),
                "worker_busy_per_stream_share_median": median_of(t, "worker_busy_share") / args.streams as f64,
                "peers_cpu_per_stream_core_share_median": median_of(t, "peers_cpu_per_stream_core_share"),
                "mbps_per_stream_mean": mean_of(t, "mbps_mean"),
                "packets_per_s_per_stream_mean": mean_of(t, "packets_per_s_per_stream_mean"),
                "fps_per_stream_mean": mean_of(t, "fps_mean"),
                "fps_min": of(t).map(|r| f(&r["fps_min"])).fold(f64::INFINITY, f64::min),
                "fps_max": of(t).map(|r| f(&r["fps_max"])).fold(f64::NEG_INFINITY, f64::max),
                "frames_dropped": sum("frames_dropped"),
                "packets_lost": sum("packets_lost"),
                "frames_skipped_before_keyframe": sum("frames_skipped_before_keyframe"),
            }));
        }
    }

    // Capacity.
    let mut capacity = Vec::new();
    let mut relay_note = None;
    if !args.skip_capacity {
        let steps = if args.steps.is_empty() { default_steps(Server::Gst, args.max_streams) } else { args.steps.clone() };
        capacity.push(capacity_search(Server::Gst, &steps, &args, &clip, &script)?);
        if args.max_streams_relay > 0 {
            match mediamtx::binary() {
                Ok(_) => {
                    let steps = if args.steps_relay.is_empty() { default_steps(Server::MediaMtx, args.max_streams_relay) } else { args.steps_relay.clone() };
                    capacity.push(capacity_search(Server::MediaMtx, &steps, &args, &clip, &script)?);
                }
                Err(e) => {
                    eprintln!("bench-ingest: the MediaMTX search is left out: {e:#}");
                    relay_note = Some(format!("{e:#}"));
                }
            }
        }
    }

    // The report.
    let mut md = String::new();
    if !args.skip_per_stream {
        let _ = writeln!(
            md,
            "**Per-stream CPU**, {} streams per transport, each transport alone, {} round(s) interleaved, {} s window each; receiver `zerodrop run --no-decode --workers 1` on core {RECEIVER_CORE}, senders and server on core {PEER_CORE}. Receiver CPU per stream = its threads' run time over the window / window / streams, as a share of one core (median over rounds; each round in brackets); ratio = the transport's median / RTP push's median, same run; utime + stime, the worker thread's busy time and the senders' CPU: medians too. The same process with {} RTP sources and no traffic: {:.3}% of a core (included above).\n",
            args.streams,
            args.rounds,
            args.seconds,
            args.streams,
            f(&idle["receiver_cpu_core_share"]) * 100.0
        );
        md.push_str("| transport | receiver CPU per stream | ratio to RTP push | utime + stime per stream | worker thread busy per stream | sender/server CPU per stream (not ours) | Mbit/s per stream | packets/s per stream | frames/s per stream (slowest–fastest) | frames dropped | packets lost |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &per_stream_summary {
            let rounds: Vec<String> = s["receiver_cpu_per_stream_core_share_rounds"].as_array().into_iter().flatten().map(|v| format!("{:.3}", f(v) * 100.0)).collect();
            let _ = writeln!(
                md,
                "| {} | {:.3}% ({}) | {:.2} | {:.3}% | {:.3}% | {:.3}% | {:.2} | {:.0} | {:.1} ({:.1}–{:.1}) | {} | {} |",
                s["label"].as_str().unwrap_or(""),
                f(&s["receiver_cpu_per_stream_core_share_median"]) * 100.0,
                rounds.join(", "),
                f(&s["ratio_to_rtp_push"]),
                f(&s["utime_stime_per_stream_core_share_median"]) * 100.0,
                f(&s["worker_busy_per_stream_share_median"]) * 100.0,
                f(&s["peers_cpu_per_stream_core_share_median"]) * 100.0,
                f(&s["mbps_per_stream_mean"]),
                f(&s["packets_per_s_per_stream_mean"]),
                f(&s["fps_per_stream_mean"]),
                f(&s["fps_min"]),
                f(&s["fps_max"]),
                s["frames_dropped"],
                s["packets_lost"],
            );
        }
        md.push('\n');
    }
    if !args.skip_capacity {
        let _ = writeln!(
            md,
            "**Capacity, one core**: concurrent 4 Mbit/s RTSP/TCP streams into one receiver on core {RECEIVER_CORE} (`--workers 1`), the server on core {PEER_CORE}. A step passes with every stream up, no frame dropped, no packet lost, no kernel drop, no session dialled again, and every stream at {FPS} frames/s ± {:.0}% over the window (more means it was behind and caught up); a step that does not is ours (*fail*) when core {RECEIVER_CORE} was ≥ {:.0}% busy, else the server's (*inconclusive*). Frames before a reader's first keyframe are skipped, not dropped.\n",
            REAL_TIME_TOLERANCE * 100.0,
            CORE_FULL * 100.0
        );
        for c in &capacity {
            let what = match c["server"].as_str() {
                Some("mediamtx") => "*MediaMTX*: one ffmpeg publishes the clip, looping; every stream is a reader of that path",
                _ => "*gst-rtsp-server*: every stream its own session and file reader, from the clip's start",
            };
            let _ = writeln!(md, "{what}.\n\n{}", capacity_table(c));
        }
        if let Some(note) = &relay_note {
            let _ = writeln!(md, "The MediaMTX search was left out: {note}\n");
        }
    }
    print!("{md}");
    if !writes {
        return Ok(());
    }
    let json = serde_json::json!({
        "benchmark": "bench-ingest",
        "meta": meta.to_json(),
        "settings": {
            "streams": args.streams, "seconds": args.seconds, "rounds": args.rounds,
            "max_streams": args.max_streams, "max_streams_relay": args.max_streams_relay,
            "receiver_core": RECEIVER_CORE, "peer_core": PEER_CORE,
            "receiver_flags": ["--no-decode", "--workers", "1"],
            "latency_ms": LATENCY_MS, "settle_s": SETTLE_S, "real_time_tolerance": REAL_TIME_TOLERANCE, "core_full_share": CORE_FULL,
            "per_stream_statistic": "median over rounds",
            "receiver_cpu": "threads' run time from /proc/PID/task/*/schedstat; utime + stime beside it",
            "clip": {
                "video": format!("1280x720p30 H.264 (x264 ultrafast, testsrc2 with noise), -b:v {BITRATE} -maxrate {BITRATE} -bufsize 1M, GOP 30, no B-frames, repeat-headers"),
                "seconds": clip.seconds, "bytes": clip.bytes, "ts_bitrate_bps": clip.ts_bitrate(), "encode_s": clip.encode_s,
            },
            "senders": {
                "rtp-push": "ffmpeg -re -stream_loop -1 -i clip.ts -map 0:v -c copy -payload_type 96 -f rtp rtp://127.0.0.1:P?pkt_size=1200",
                "srt": format!("ffmpeg -re -stream_loop -1 -i clip.ts -map 0:v -c copy -f mpegts srt://127.0.0.1:P?mode=caller&latency={}&pkt_size=1316", LATENCY_MS * 1000),
                "rtsp (gst-rtsp-server)": "filesrc location=clip.ts ! tsdemux ! h264parse ! rtph264pay pt=96 mtu=1200, a media per client (set_shared(False))",
                "rtsp (mediamtx)": "MediaMTX (testbench::mediamtx), ffmpeg -re -stream_loop -1 -i clip.ts -map 0:v -c copy -f rtsp -rtsp_transport tcp rtsp://127.0.0.1:P/clip; every stream reads that path",
            },
        },
        "idle": idle,
        "per_stream": per_stream_summary,
        "per_stream_runs": per_stream_runs,
        "capacity": capacity,
        "capacity_relay_left_out": relay_note,
    });
    if let Some(path) = &args.output {
        results::write_json(path, &json)?;
        eprintln!("bench-ingest: wrote {}", path.display());
        return Ok(());
    }
    results::write_json(&root.join("results/ingest-benchmark.json"), &json)?;
    let section = format!(
        "## Ingest transports: CPU per stream, and RTSP cameras per core\n\nGenerated by `e2e/src/bin/bench_ingest.rs` (the file's header says how it measures); raw figures in `results/ingest-benchmark.json`. One clip (1280×720p30 H.264 at 4 Mbit/s, GOP 30, parameter sets in band; {:.2} Mbit/s as MPEG-TS) copied by every sender without encoding again: ffmpeg for RTP push and SRT, gst-rtsp-server or MediaMTX for RTSP.\n\nCommand: `{}`  \n{}\n{md}",
        clip.ts_bitrate() / 1e6,
        results::invocation(),
        meta.markdown_lines(),
    );
    results::update_markdown(&root.join("BENCHMARKS.md"), MARK_BEGIN, MARK_END, &section)?;
    eprintln!("bench-ingest: wrote results/ingest-benchmark.json and BENCHMARKS.md");
    Ok(())
}
