//! `ebpf-bench`: what the drop-counting programs cost, measured side by side
//! in one run, in a network namespace of its own, over loopback:
//! - receive throughput with and without the programs when nothing is
//!   dropped (alternating rounds; mean and spread);
//! - drop-path throughput (every datagram overflows a tiny receive buffer)
//!   with and without;
//! - ns per program run from the kernel's BPF statistics, taken in a separate
//!   run so the statistics' own cost stays out of the throughput figures.
//!
//! Needs root. Writes JSON to results/ebpf-benchmark.json.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use zerodrop_ebpf::ebpf::{EbpfDropCounter, ProgramStats, enable_bpf_stats};
use zerodrop_ebpf::procfs;
use zerodrop_ebpf::testenv::{self, Netns};

#[derive(Debug, Parser)]
#[command(name = "ebpf-bench", about = "Cost of the kernel drop-counting eBPF programs")]
struct Args {
    /// Rounds per phase; each round measures with and without the programs.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 0.8)]
    seconds: f64,
    /// Where to write the JSON results.
    #[arg(long, default_value_os_t = default_output())]
    out: PathBuf,
}

fn default_output() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../results/ebpf-benchmark.json")
}

const BATCH: usize = 32;
const PAYLOAD: [u8; 200] = [0xa5; 200];

/// Packets per second through send + receive, nothing dropped.
fn receive_rate(duration: Duration) -> anyhow::Result<f64> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let target = rx.local_addr()?;
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let mut packets = 0u64;
    while start.elapsed() < duration {
        for _ in 0..BATCH {
            tx.send_to(&PAYLOAD, target)?;
        }
        // Loopback delivers during send; each recv returns a queued datagram.
        for _ in 0..BATCH {
            rx.recv(&mut buf)?;
        }
        packets += BATCH as u64;
    }
    let rate = packets as f64 / start.elapsed().as_secs_f64();
    let drops = socket_drops(target)?;
    if drops != 0 {
        bail!("the no-drop phase dropped {drops} datagrams");
    }
    Ok(rate)
}

/// Datagrams per second sent into a full receive buffer (all dropped).
fn drop_rate(duration: Duration) -> anyhow::Result<(f64, u64)> {
    let rx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    rx.set_recv_buffer_size(1)?;
    rx.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let rx: UdpSocket = rx.into();
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let target = rx.local_addr()?;
    let start = Instant::now();
    let mut packets = 0u64;
    while start.elapsed() < duration {
        for _ in 0..BATCH {
            tx.send_to(&PAYLOAD, target)?;
        }
        packets += BATCH as u64;
    }
    let rate = packets as f64 / start.elapsed().as_secs_f64();
    Ok((rate, socket_drops(target)?))
}

fn socket_drops(local: SocketAddr) -> anyhow::Result<u64> {
    Ok(procfs::read_udp_sockets()?.iter().filter(|s| s.local == local).map(|s| s.drops).sum())
}

#[derive(Debug, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }
    fn stddev(&self) -> f64 {
        let mean = self.mean();
        let n = self.0.len() as f64;
        (self.0.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt()
    }
    fn json(&self) -> serde_json::Value {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        json!({
            "mean_pps": self.mean().round(),
            "stddev_pps": self.stddev().round(),
            "spread_pct": (100.0 * self.stddev() / self.mean() * 100.0).round() / 100.0,
            "min_pps": min.round(),
            "max_pps": max.round(),
            "samples_pps": self.0.iter().map(|x| x.round()).collect::<Vec<_>>(),
        })
    }
}

fn compare(with: &Samples, without: &Samples) -> serde_json::Value {
    let diff = with.mean() - without.mean();
    let spread = with.stddev() + without.stddev();
    json!({
        "with_programs": with.json(),
        "without_programs": without.json(),
        "difference_pct": (10000.0 * diff / without.mean()).round() / 100.0,
        "within_spread": diff.abs() <= spread,
    })
}

/// Runs `measure` alternately with and without the programs attached,
/// swapping the order every round so drift hits both sides alike.
fn alternate(
    counter: &mut EbpfDropCounter,
    rounds: usize,
    mut measure: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<(Samples, Samples)> {
    let (mut with, mut without) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        for attached in if round % 2 == 0 { [true, false] } else { [false, true] } {
            if attached {
                counter.attach()?;
                with.0.push(measure()?);
            } else {
                counter.detach()?;
                without.0.push(measure()?);
            }
        }
    }
    counter.detach()?;
    Ok((with, without))
}

fn per_run(stats: &[ProgramStats]) -> serde_json::Value {
    stats
        .iter()
        .map(|s| {
            let ns = if s.run_count == 0 { None } else { Some((s.run_time_ns as f64 / s.run_count as f64 * 10.0).round() / 10.0) };
            (s.name.clone(), json!({ "run_count": s.run_count, "run_time_ns": s.run_time_ns, "ns_per_run": ns }))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !testenv::require_root("ebpf-bench") {
        bail!("ebpf-bench needs root (eBPF, network namespaces, BPF statistics)");
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let netns = Netns::create("bench").context("creating the benchmark's network namespace")?;
    let started = Instant::now();

    let results = netns.run(|| -> anyhow::Result<serde_json::Value> {
        let mut counter = EbpfDropCounter::load()?;
        // Warm up caches and the socket path once on each side.
        receive_rate(duration / 4)?;
        drop_rate(duration / 4)?;

        eprintln!("receive path, nothing dropped: {} rounds x 2 x {:?}", args.rounds, duration);
        let (rx_with, rx_without) = alternate(&mut counter, args.rounds, || receive_rate(duration))?;
        eprintln!("drop path: {} rounds x 2 x {:?}", args.rounds, duration);
        let (drop_with, drop_without) = alternate(&mut counter, args.rounds, || Ok(drop_rate(duration)?.0))?;

        eprintln!("ns per program run (BPF statistics on)");
        let stats_fd = enable_bpf_stats().context("enabling BPF run-time statistics")?;
        counter.attach()?;
        counter.set_noop_attached(true)?;
        let before = counter.program_stats();
        let (_, dropped) = drop_rate(duration)?;
        let after = counter.program_stats();
        counter.set_noop_attached(false)?;
        counter.detach()?;
        drop(stats_fd);
        let delta: Vec<ProgramStats> = after
            .iter()
            .map(|a| {
                let b = before.iter().find(|b| b.name == a.name);
                ProgramStats {
                    name: a.name.clone(),
                    run_time_ns: a.run_time_ns - b.map_or(0, |b| b.run_time_ns),
                    run_count: a.run_count - b.map_or(0, |b| b.run_count),
                }
            })
            .collect();
        let counted: u64 = counter.read()?.values().sum();

        Ok(json!({
            "receive_no_drops": compare(&rx_with, &rx_without),
            "drop_path": compare(&drop_with, &drop_without),
            "program_cost": {
                "datagrams_dropped": dropped,
                "programs": per_run(&delta),
                "note": "zd_noop is an empty program on the same tracepoint: its ns_per_run is what the statistics' own clock reads add to every figure here",
            },
            "drops_counted_by_programs_total": counted,
        }))
    })?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let report = json!({
        "benchmark": "zerodrop-ebpf kernel drop counting overhead",
        "method": format!(
            "loopback UDP in a private network namespace, one thread, {BATCH}-datagram batches of {} bytes; \
             {} alternating rounds of {:?} with and without the programs attached; \
             ns per run from BPF_ENABLE_STATS in a separate drop-path run, with an empty program (zd_noop) as the statistics' baseline",
            PAYLOAD.len(), args.rounds, duration
        ),
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "wall_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "results": results,
    });
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, format!("{text}\n")).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
