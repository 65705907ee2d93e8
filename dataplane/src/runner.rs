//! `zerodrop run pipeline.yaml`: every source of every pipeline in the file,
//! on this machine, with metrics, a live table and a final report.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::{self, SourceConfig};
use crate::metrics::Metrics;
use crate::stream::StreamReport;
use crate::supervisor::{Supervisor, SupervisorOptions};
use crate::table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableMode {
    /// A live table when standard error is a terminal, else periodic log lines.
    Auto,
    Always,
    Never,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// File holding one or more StreamPipeline documents (the YAML you would
    /// `kubectl apply`).
    pub file: PathBuf,
    /// Where to serve /metrics (OpenMetrics) and /healthz.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Write a JSON report of every stream's final figures here on exit.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write per-access-unit content digests, one file per stream, here.
    #[arg(long)]
    pub au_log_dir: Option<PathBuf>,
    /// Receive and repair only; no decoding.
    #[arg(long)]
    pub no_decode: bool,
    /// Receive threads, each serving many sources (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Validate the file and exit.
    #[arg(long)]
    pub check: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub table: TableMode,
    /// Where kernel UDP drops per stream come from.
    #[arg(long, value_enum, default_value = "auto")]
    pub kernel_drops: crate::kernel_drops::KernelDropMode,
    /// Secrets of a pulled source, `PIPELINE/SOURCE=WHERE` (repeatable): an
    /// RTSP source's user name and password, an SRT source's passphrase.
    /// WHERE is a directory laid out like a mounted Secret (files
    /// `username` and `password`, or `passphrase`; other names when the
    /// spec's secret reference names other keys), or `env:PREFIX` for the
    /// environment variables PREFIX_USERNAME and PREFIX_PASSWORD, or
    /// PREFIX_PASSPHRASE. Read at each dial; never printed.
    #[arg(long = "credentials", value_name = "PIPELINE/SOURCE=WHERE")]
    pub credentials: Vec<String>,
}

/// Applies `--credentials` to the pulled sources it names.
fn apply_credentials(sources: &mut [SourceConfig], flags: &[String]) -> anyhow::Result<()> {
    for flag in flags {
        let (id, where_) = flag
            .split_once('=')
            .with_context(|| format!("--credentials {flag:?}: expected PIPELINE/SOURCE=DIRECTORY or PIPELINE/SOURCE=env:PREFIX"))?;
        let known: Vec<String> = sources.iter().map(SourceConfig::id).collect();
        let source = sources
            .iter_mut()
            .find(|s| s.id() == id)
            .with_context(|| format!("--credentials: no source {id:?} in the manifest (sources: {})", known.join(", ")))?;
        let secret = crate::ingest::pulled::SecretSource::parse(where_);
        match (&mut source.rtsp, &mut source.srt) {
            (Some(rtsp), _) => rtsp.credentials = Some(secret),
            (None, Some(srt)) => srt.passphrase = Some(secret),
            (None, None) => anyhow::bail!("--credentials: source {id} is pushed RTP: it has no credentials"),
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub file: String,
    pub duration_s: f64,
    pub streams: Vec<StreamReport>,
}

/// Exit status for input that was rejected before anything started.
pub const EXIT_INVALID_INPUT: i32 = 2;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read manifest file {}", args.file.display()))?;
    let pipelines = match zerodrop_crds::parse_manifests(&text) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            std::process::exit(EXIT_INVALID_INPUT);
        }
    };
    let mut sources: Vec<SourceConfig> = Vec::new();
    for p in &pipelines {
        match config::sources(p) {
            Ok(s) => sources.extend(s),
            Err(e) => {
                eprintln!("{}: {e:#}", args.file.display());
                std::process::exit(EXIT_INVALID_INPUT);
            }
        }
    }
    if let Err(e) = apply_credentials(&mut sources, &args.credentials) {
        eprintln!("{e:#}");
        std::process::exit(EXIT_INVALID_INPUT);
    }
    if let Err(e) = check_port_clashes(&sources) {
        eprintln!("{}: {e}", args.file.display());
        std::process::exit(EXIT_INVALID_INPUT);
    }
    for s in &sources {
        if let Err(e) = crate::decode::check(s.codec, s.decoder)
            && !args.no_decode {
                eprintln!("{}: pipeline {} source {}: {e:#}", args.file.display(), s.pipeline, s.name);
                std::process::exit(EXIT_INVALID_INPUT);
            }
    }
    if args.check {
        println!("{}: {} pipeline(s), {} source(s): valid", args.file.display(), pipelines.len(), sources.len());
        return Ok(());
    }
    if let Some(dir) = &args.au_log_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let stop = crate::shutdown::on_signal()?;

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(crate::metrics::Readiness::new());
    readiness.set_expected(sources.iter().map(SourceConfig::id));
    let published = Arc::new(crate::output::Published::default());
    let bound = crate::metrics::serve(&args.metrics_addr, metrics.clone(), readiness.clone(), published.clone())?;
    eprintln!("zerodrop: {} source(s) from {}; metrics at http://{bound}/metrics", sources.len(), args.file.display());
    for s in sources.iter() {
        if let Some(r) = &s.rtsp {
            eprintln!("zerodrop: {}: pulling {} over {:?}", s.id(), r.url, r.transport);
        }
        if let Some(srt) = &s.srt {
            eprintln!("zerodrop: {}: SRT {}", s.id(), srt.uri());
        }
    }
    for s in sources.iter().filter(|s| s.hls.is_some()) {
        eprintln!("zerodrop: {}: HLS at http://{bound}/hls/{}/{}/index.m3u8", s.id(), s.pipeline, s.name);
    }
    for s in sources.iter().filter(|s| s.frames.is_some()) {
        eprintln!("zerodrop: {}: latest frame at http://{bound}/frames/{}/{}/latest.jpg", s.id(), s.pipeline, s.name);
    }

    let mut kernel_drops = crate::kernel_drops::KernelDrops::start(args.kernel_drops);
    let mut supervisor = Supervisor::new(
        metrics,
        readiness,
        SupervisorOptions { au_log_dir: args.au_log_dir.clone(), no_decode: args.no_decode, workers: args.workers, published: Some(published) },
    );
    supervisor.apply(&sources);
    let mut path_policy = crate::path_policy::PathPolicy::new(&pipelines);

    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs_f64(s));
    let live = match args.table {
        TableMode::Always => true,
        TableMode::Never => false,
        TableMode::Auto => std::io::stderr().is_terminal(),
    };
    let mut view = table::LiveTable::new(live, &supervisor.streams());
    let mut results = Vec::new();
    // A source that cannot run stops the whole local run.
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        if let Some(ended) = supervisor.wait_ended(Duration::from_millis(500)) {
            results.push(ended);
            break;
        }
        kernel_drops.update(&supervisor.sockets());
        if let Some(p) = &mut path_policy {
            p.tick(&mut supervisor, Instant::now());
        }
        view.refresh(started.elapsed());
    }
    kernel_drops.update(&supervisor.sockets());
    results.extend(supervisor.stop_all());
    view.finish(started.elapsed());

    let mut reports = Vec::new();
    let mut first_error = None;
    for (id, r) in results {
        match r {
            Ok(report) => reports.push(report),
            Err(e) => {
                eprintln!("zerodrop: {id}: {e:#}");
                first_error.get_or_insert(e);
            }
        }
    }
    let report = RunReport { file: args.file.display().to_string(), duration_s: started.elapsed().as_secs_f64(), streams: reports };
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Two sources of the file bound to one UDP port would steal each other's
/// packets; the CRD rules catch it within a pipeline, this across pipelines.
fn check_port_clashes(sources: &[SourceConfig]) -> anyhow::Result<()> {
    let mut seen: std::collections::HashMap<u16, String> = std::collections::HashMap::new();
    for s in sources {
        for port in s.sockets().iter().map(SocketAddr::port) {
            if let Some(other) = seen.insert(port, s.id())
                && other != s.id() {
                    anyhow::bail!("UDP port {port} is used by both {other} and {}: give each source its own ports", s.id());
                }
        }
    }
    Ok(())
}
