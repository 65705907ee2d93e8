//! `bench-throughput`: how much one core of ours takes, against the machine's
//! limit and GStreamer, and how many live streams it repairs at once.
//!
//! Receivers, each pinned to core 1 (`taskset -c 1`), each asking for the
//! same 4 MiB socket receive buffer:
//! - `bare-loop`: a child that only counts what `recvmmsg` (our `RecvBatch`,
//!   32 datagrams a call) returns: the machine's limit for one socket;
//! - `zerodrop`: `zerodrop run --no-decode` on one source (reorder, NACK
//!   bookkeeping, depacketise), its counts scraped from `/metrics`;
//! - `gstreamer`: a child running `udpsrc ! rtpjitterbuffer latency=200 !
//!   fakesink`, counting buffers with pad probes on udpsrc's and fakesink's pads.
//!
//! The sender ([`zerodrop_testbench::replay`]) replays H.264 encoded once, from one
//! thread pinned to core 0 (this process and every thread it starts stay on
//! core 0), with `sendmmsg` and UDP GSO.
//!
//! Throughput, per receiver, two runs on fresh processes:
//! - *overload run*: a fixed rate every receiver takes (`--rate`, 100k
//!   packets/s) for CPU per packet; a high rate (`--high-rate`, 400k) for the
//!   same near the ceilings; as fast as the sender can (max rate); the same
//!   while two threads spin on the receiver's core (the overload: one core
//!   sending over loopback costs about as much per packet as one core
//!   receiving, so without co-tenants the sender cannot outrun ours or the
//!   bare loop; with them the receiver's socket overflows, it never waits for
//!   packets, and delivered / CPU is what a whole core of it takes); then the
//!   fixed rate again, to see how soon each receiver delivers it in full;
//! - *staircase*: rates rising by 25% a step until two steps in a row lose
//!   packets: the highest rate taken without loss.
//!
//! One core and two ([`cores`]): the receiver's sockets filled while it is
//! stopped, then timed as it drains them on core 1 alone and on both cores
//! (ours with `--workers 2`, the bare loop as a child per core): its
//! throughput on whole cores, with no sender on the CPU.
//!
//! Concurrency: one `zerodrop run --no-decode` with N sources (one manifest,
//! N port pairs) against N streams at 4 Mbit/s each with seeded 3% loss on
//! first transmissions and on retransmissions, NACKs answered with RTX; N
//! doubles, then bisects, until a frame is dropped or a loss goes unrepaired.
//!
//! ```text
//! cargo run --release -p zerodrop-e2e --bin bench-throughput -- [--quick]
//! ```
//!
//! Results: `results/throughput-benchmark.json` and the section between the
//! markers in `BENCHMARKS.md` (neither with `--quick` unless `--out`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use gstreamer as gst;
use gstreamer::prelude::*;
use serde::Serialize;
use zerodrop_testbench::loss::LossSpec;
use zerodrop_dataplane::ingest::udp::{self, RecvBatch};
use zerodrop_testbench::replay::{
    self, Clip, ClipSettings, ClipSummary, GsoSupport, OfferedCounts, PacedSettings, PhaseOffered, RatePhase,
    ReplaySender, monotonic_ns,
};
use zerodrop_e2e::bench::{ensure_zerodrop_built, free_rtp_port, free_rtp_ports, free_tcp_port, process_cpu, udp_socket_drops};
use zerodrop_e2e::results::{self, ResultsMeta, workspace_root};
use zerodrop_e2e::runner::RunnerProcess;
use zerodrop_testbench::gst_receiver::{self, GstReceiverConfig, GstReceiversProcess};

pub(crate) const SENDER_CORE: usize = 0;
pub(crate) const RECEIVER_CORE: usize = 1;
/// The receive buffer every receiver asks for (ours' default).
pub(crate) const RECEIVE_BUFFER: usize = 4 << 20;
/// Repair budget: our `repair.latencyMs`, rtpjitterbuffer's `latency`.
pub(crate) const LATENCY_MS: u32 = 200;
pub(crate) const MAX_NACK_RETRIES: u32 = 10;
/// Datagrams per `recvmmsg` in the bare loop: our receiver's batch.
pub(crate) const BARE_BATCH: usize = 32;
/// How often the parent samples CPU, socket counters and our /metrics.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How often the child receivers print their counts.
pub(crate) const CHILD_REPORT_NS: u64 = 20_000_000;
/// The phase in which spinning threads share the receiver's core.
pub(crate) const OVERLOAD: &str = "overload";
/// Spinning threads on the receiver's core in the overload: the scheduler
/// leaves a receiver that is always busy about a third of the core.
pub(crate) const COTENANTS: usize = 2;
/// Left out at the end of every measured phase.
pub(crate) const END_TRIM_NS: u64 = 100_000_000;
/// Analysis windows of the timelines.
pub(crate) const WINDOW_NS: u64 = 100_000_000;
pub(crate) const STREAM_BITRATE_BPS: f64 = 4e6;
pub(crate) const CONCURRENCY_LOSS: &str = "uniform:0.03";
/// Sources per StreamPipeline document (the API allows 128).
pub(crate) const SOURCES_PER_PIPELINE: usize = 100;
pub(crate) const BARE_CHILD: &str = "__bare-recv-loop";
pub(crate) const GST_CHILD: &str = "__gst-jitterbuffer";
pub(crate) const MARK_BEGIN: &str = "<!-- bench-throughput:begin (generated by bench-throughput; edit outside the markers) -->";
pub(crate) const MARK_END: &str = "<!-- bench-throughput:end -->";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    Throughput,
    /// The drain runs: one core against two, ours against the bare loop.
    Cores,
    Concurrency,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench-throughput",
    about = "Receive throughput per core (ours vs a bare recvmmsg loop vs GStreamer's rtpjitterbuffer), overload and recovery, and concurrent 4 Mbit/s streams repaired per core"
)]
pub(crate) struct Args {
    /// A smoke run (about a minute); writes no result files unless --out.
    #[arg(long)]
    pub(crate) quick: bool,
    /// The fixed rate (packets/s) for CPU per packet and around the overload;
    /// every receiver must take it without loss.
    #[arg(long, default_value_t = 100_000.0)]
    pub(crate) rate: f64,
    /// A high fixed rate (packets/s) that the sender sustains and the bare
    /// loop and ours take: cost per packet near their ceilings.
    #[arg(long, default_value_t = 400_000.0)]
    pub(crate) high_rate: f64,
    /// Only one part.
    #[arg(long, value_enum)]
    pub(crate) only: Option<Part>,
    /// First N of the concurrency search (default 32; 512 with --quick).
    #[arg(long)]
    pub(crate) start_streams: Option<usize>,
    /// Only these throughput receivers (bare-loop, zerodrop, gstreamer).
    #[arg(long, value_delimiter = ',')]
    pub(crate) receivers: Vec<String>,
    /// Keep the receivers' logs here (default: a temporary directory).
    #[arg(long)]
    pub(crate) log_dir: Option<PathBuf>,
    /// Send one datagram per message (no UDP GSO).
    #[arg(long)]
    pub(crate) no_gso: bool,
    /// Largest N tried.
    #[arg(long, default_value_t = 4096)]
    pub(crate) max_streams: usize,
    /// Seed of the concurrency loss models (stream i: seed + i).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Drain runs: sockets per core.
    #[arg(long, default_value_t = 4)]
    pub(crate) drain_sockets_per_core: usize,
    /// Drain runs: packets queued per core (default 500,000; 200,000 with --quick).
    #[arg(long)]
    pub(crate) drain_packets: Option<u64>,
    /// Drain runs: runs of each receiver in each placement (default 5; 1 with --quick).
    #[arg(long)]
    pub(crate) drain_reps: Option<usize>,
    /// Where the JSON goes (default results/throughput-benchmark.json; none with --quick).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Do not rewrite the section in BENCHMARKS.md.
    #[arg(long)]
    pub(crate) no_markdown: bool,
    /// Write results even though the working tree has uncommitted changes
    /// (the results record what was dirty).
    #[arg(long)]
    pub(crate) allow_dirty: bool,
}

impl Args {
    pub(crate) fn clip_frames(&self) -> u32 {
        if self.quick { 120 } else { 300 }
    }
    /// Fixed-rate, high-rate, max-rate, overload and recovery phase lengths.
    pub(crate) fn overload_phases(&self) -> [f64; 5] {
        if self.quick { [1.5, 1.5, 1.0, 2.0, 2.5] } else { [3.0, 3.0, 3.0, 3.0, 6.0] }
    }
    /// Start of a phase left out of its steady-state figures.
    pub(crate) fn steady_trim_s(&self) -> f64 {
        if self.quick { 0.5 } else { 1.0 }
    }
    pub(crate) fn start_streams(&self) -> usize {
        self.start_streams.unwrap_or(if self.quick { 512 } else { 32 })
    }
    /// Overloads of the bare loop and ours beyond the overload run's.
    pub(crate) fn extra_overloads(&self) -> usize {
        if self.quick { 1 } else { 2 }
    }
    pub(crate) fn drain_packets_per_core(&self) -> u64 {
        self.drain_packets.unwrap_or(if self.quick { 200_000 } else { 500_000 })
    }
    pub(crate) fn drain_reps(&self) -> usize {
        self.drain_reps.unwrap_or(if self.quick { 1 } else { 5 }).max(1)
    }
    pub(crate) fn step_s(&self) -> f64 {
        if self.quick { 0.4 } else { 1.0 }
    }
    pub(crate) fn trial(&self) -> (f64, f64, f64) {
        // (stagger, duration, linger): the stagger is one GOP at 30 fps.
        if self.quick { (1.0, 4.0, 0.7) } else { (2.0, 10.0, 1.0) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RxKind {
    BareLoop,
    Zerodrop,
    Gstreamer,
}

impl RxKind {
    pub(crate) const ALL: [RxKind; 3] = [RxKind::BareLoop, RxKind::Zerodrop, RxKind::Gstreamer];

    pub(crate) fn name(self) -> &'static str {
        match self {
            RxKind::BareLoop => "bare-loop",
            RxKind::Zerodrop => "zerodrop",
            RxKind::Gstreamer => "gstreamer",
        }
    }

    /// Whether the receiver hands on frames (the bare loop only counts).
    pub(crate) fn has_frames(self) -> bool {
        self != RxKind::BareLoop
    }
}

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    match raw.get(1).map(String::as_str) {
        Some(BARE_CHILD) => return bare_child_main(&raw[2..]),
        Some(GST_CHILD) => return gst_child_main(&raw[2..]),
        Some(gst_receiver::MANY_SUBCOMMAND) => return gst_receiver::many_child_main(&raw[2..]),
        _ => {}
    }
    let args = Args::parse();
    let started = Instant::now();
    let root = workspace_root();
    let out = match (&args.out, args.quick) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(root.join("results/throughput-benchmark.json")),
        (None, true) => None,
    };
    // Refuses a dirty tree before the runs, not after.
    let meta = ResultsMeta::start("bench-throughput", &root, out.is_some(), args.allow_dirty)?;
    let tmp = tempfile::tempdir()?;
    let work = match &args.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
        bail!("needs two cores (sender on core {SENDER_CORE}, receiver on core {RECEIVER_CORE})");
    }
    let zerodrop = ensure_zerodrop_built()?;
    let pinned = pinned_wrapper(&zerodrop, &work)?;
    // SAFETY: set before any thread is started; RunnerProcess reads it.
    unsafe { std::env::set_var("ZERODROP_BIN", &pinned) };
    eprintln!(
        "bench-throughput: {}; commit {}; load average at start {}",
        meta.machine_summary(),
        meta.git().describe(),
        meta.loadavg_at_start()
    );

    eprintln!("bench-throughput: encoding the clip ({} frames 1280x720@30, x264 4000 kbit/s, rtph264pay mtu 1200) …", args.clip_frames());
    let (clip, encode_s) = Clip::encode(ClipSettings { frames: args.clip_frames(), ..ClipSettings::default() })?;
    let clip = Arc::new(clip);
    let clip_summary = clip.summary(encode_s);
    eprintln!(
        "bench-throughput: clip: {} frames ({} keyframes), {} packets, {:.1} packets/frame (max {}), {:.2} Mbit/s at 30 fps, encoded in {:.1} s",
        clip_summary.frames,
        clip_summary.keyframes,
        clip_summary.packets,
        clip_summary.mean_packets_per_frame,
        clip_summary.max_packets_per_frame,
        clip_summary.bitrate_bps_at_fps / 1e6,
        encode_s
    );
    // From here on this process and every thread it starts run on core 0.
    replay::pin_current_thread(SENDER_CORE).context("pinning the benchmark to core 0")?;

    let mut throughput = None;
    if args.only.is_none_or(|p| p == Part::Throughput) {
        throughput = Some(run_throughput(&args, &clip, &work)?);
    }
    let mut cores = None;
    if args.only.is_none_or(|p| p == Part::Cores) {
        cores = Some(run_cores(&args, &clip, &work)?);
    }
    let (mut concurrency, mut concurrency_gst) = (None, None);
    if args.only.is_none_or(|p| p == Part::Concurrency) {
        concurrency = Some(run_concurrency(&args, &clip, ConcurrencyRx::Zerodrop, &work)?);
        concurrency_gst = Some(run_concurrency(&args, &clip, ConcurrencyRx::Gstreamer, &work)?);
    }

    let gso = throughput
        .as_ref()
        .and_then(|t| t.runs.first().map(|r| r.sender.gso.clone()))
        .or_else(|| concurrency.as_ref().and_then(|c| c.trials.first().map(|t| t.sender_gso.clone())));
    let section = markdown_section(
        &args,
        &meta,
        &clip_summary,
        gso.as_ref(),
        throughput.as_ref(),
        cores.as_ref(),
        concurrency.as_ref(),
        concurrency_gst.as_ref(),
    );
    println!("\n{section}");
    let wall_s = started.elapsed().as_secs_f64();
    eprintln!("bench-throughput: done in {wall_s:.0} s");

    if let Some(out) = out {
        let json = serde_json::json!({
            "command": command_line(&args),
            "settings": {
                "rate_pps": args.rate, "high_rate_pps": args.high_rate, "receive_buffer_bytes": RECEIVE_BUFFER, "latency_ms": LATENCY_MS,
                "max_nack_retries": MAX_NACK_RETRIES, "bare_loop_batch": BARE_BATCH, "sender_core": SENDER_CORE,
                "receiver_core": RECEIVER_CORE, "stream_bitrate_bps": STREAM_BITRATE_BPS, "concurrency_loss": CONCURRENCY_LOSS,
                "seed": args.seed, "quick": args.quick,
            },
            "provenance": meta.to_json(),
            "clip": clip_summary,
            "wall_s": wall_s,
            "throughput": throughput,
            "cores": cores,
            "concurrency": concurrency,
            "concurrency_gstreamer": concurrency_gst,
        });
        results::write_json(&out, &json)?;
        eprintln!("bench-throughput: wrote {}", out.display());
        if !args.no_markdown && args.only.is_none() {
            let md = root.join("BENCHMARKS.md");
            results::update_markdown(&md, MARK_BEGIN, MARK_END, &section)?;
            eprintln!("bench-throughput: updated the section in {}", md.display());
        }
    }
    Ok(())
}

mod throughput;
mod timelines;
mod receivers;
mod concurrency;
mod cores;
mod report;
use throughput::*;
use timelines::*;
use receivers::*;
use concurrency::*;
use cores::*;
use report::*;
