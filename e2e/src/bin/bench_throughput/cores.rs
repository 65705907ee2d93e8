//! Drain runs: what the receive path takes on one core and on two, with no
//! sender on the CPU while it is measured.
//!
//! This machine has two cores. Sending over loopback costs a core about as
//! much per packet as receiving, so a live sender cannot keep two receiving
//! cores saturated from a third. The drain runs take the sender off the CPU
//! instead: the receiver is started (its sockets bound, each with a receive
//! buffer large enough for everything sent to it), stopped with `SIGSTOP`,
//! its sockets are filled, then it is let go with `SIGCONT` and timed until
//! the last socket is empty (`rx_queue` in `/proc/net/udp`, read every
//! [`POLL_EVERY`]). Every socket has packets waiting for the whole drain, so
//! the receiver never waits for one: the rate is what its cores take,
//! measured on whole cores, not extrapolated from a share of one.
//!
//! - one core: the receiver pinned to core 1 (`taskset -c 1`), S sockets;
//! - two cores: the receiver on cores 0 and 1 (`taskset -a -p -c 0,1`), 2·S
//!   sockets; ours with `--workers 2` (its supervisor places the sources on
//!   the workers in turn), the bare loop as one child per core, each with
//!   every other socket.
//!
//! Afterwards each receiver must have counted every packet sent (ours: and
//! assembled every frame), and no socket may have dropped one; a run that
//! fails either is an error, not a figure.

#[allow(unused_imports)]
use super::*;
use zerodrop_e2e::bench::{UdpSocketState, udp_socket_states};
use zerodrop_e2e::runner::metric_sum;

/// How often the drain's end is looked for (one read of /proc/net/udp).
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(2);
/// Kernel memory one 1,200-byte datagram takes in a loopback socket's
/// queue (its skb truesize, measured here: 2,304 bytes); the receive
/// buffers are sized from it with a quarter to spare.
pub(crate) const TRUESIZE: u64 = 2304;
/// The largest `receiveBufferBytes` the API allows.
const MAX_RECEIVE_BUFFER: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainRun {
    pub(crate) receiver: RxKind,
    pub(crate) cores: usize,
    pub(crate) sockets: usize,
    pub(crate) rep: usize,
    pub(crate) packets_sent: u64,
    pub(crate) frames_sent: u64,
    /// Kernel memory queued in the receiver's sockets when it was let go.
    pub(crate) queued_bytes: u64,
    pub(crate) fill_s: f64,
    /// `SIGCONT` to the last socket found empty.
    pub(crate) drain_s: f64,
    /// Per socket, `SIGCONT` to it found empty.
    pub(crate) socket_empty_s: Vec<f64>,
    pub(crate) packets_per_s: f64,
    /// The receiver's CPU time during the drain / the drain's wall time
    /// (at most the cores it had).
    pub(crate) receiver_cores_busy: f64,
    pub(crate) polls: u64,
    /// Packets the receiver says it read.
    pub(crate) counted: u64,
    /// Ours: frames assembled and dropped.
    pub(crate) frames_assembled: Option<u64>,
    pub(crate) frames_dropped: Option<u64>,
    pub(crate) socket_drops: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainSummary {
    pub(crate) receiver: RxKind,
    pub(crate) cores: usize,
    pub(crate) median_pps: f64,
    pub(crate) min_pps: f64,
    pub(crate) max_pps: f64,
    pub(crate) runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CoresResult {
    pub(crate) sockets_per_core: usize,
    pub(crate) packets_per_core: u64,
    pub(crate) reps: usize,
    pub(crate) udp_mem: UdpMemNote,
    pub(crate) runs: Vec<DrainRun>,
    pub(crate) summaries: Vec<DrainSummary>,
    /// Ours / bare loop, medians, on one core and on two.
    pub(crate) ratio_one_core: f64,
    pub(crate) ratio_two_cores: f64,
    /// Two cores / one core, medians.
    pub(crate) scaling_zerodrop: f64,
    pub(crate) scaling_bare_loop: f64,
}

impl CoresResult {
    pub(crate) fn summary(&self, kind: RxKind, cores: usize) -> Option<&DrainSummary> {
        self.summaries.iter().find(|s| s.receiver == kind && s.cores == cores)
    }
}

/// The kernel's limit on all UDP receive queues together, raised for the
/// drain runs when it is below what they queue (and put back after).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UdpMemNote {
    pub(crate) before_pages: [u64; 3],
    pub(crate) during_pages: [u64; 3],
}

const UDP_MEM: &str = "/proc/sys/net/ipv4/udp_mem";

struct UdpMemGuard {
    before: [u64; 3],
    raised: bool,
}

impl UdpMemGuard {
    fn ensure(bytes: u64) -> anyhow::Result<(Self, UdpMemNote)> {
        let text = std::fs::read_to_string(UDP_MEM).with_context(|| format!("reading {UDP_MEM}"))?;
        let v: Vec<u64> = text.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        let [min, pressure, max] = v[..] else { bail!("{UDP_MEM}: expected three numbers, got {text:?}") };
        let before = [min, pressure, max];
        let pages = bytes.div_ceil(4096) * 3 / 2;
        if pressure >= pages {
            return Ok((Self { before, raised: false }, UdpMemNote { before_pages: before, during_pages: before }));
        }
        let during = [min, pages, pages.max(max)];
        std::fs::write(UDP_MEM, format!("{} {} {}", during[0], during[1], during[2]))
            .with_context(|| format!("raising {UDP_MEM} to {during:?} pages for the drain runs (needs root)"))?;
        eprintln!("bench-throughput: {UDP_MEM} raised from {before:?} to {during:?} pages for the drain runs");
        Ok((Self { before, raised: true }, UdpMemNote { before_pages: before, during_pages: during }))
    }
}

impl Drop for UdpMemGuard {
    fn drop(&mut self) {
        if self.raised {
            let [a, b, c] = self.before;
            if let Err(e) = std::fs::write(UDP_MEM, format!("{a} {b} {c}")) {
                eprintln!("bench-throughput: could not put {UDP_MEM} back to {:?}: {e}", self.before);
            }
        }
    }
}

pub(crate) fn run_cores(args: &Args, clip: &Arc<Clip>, work: &Path) -> anyhow::Result<CoresResult> {
    let sockets_per_core = args.drain_sockets_per_core;
    let packets_per_core = args.drain_packets_per_core();
    let frames_per_stream = (packets_per_core as f64 / sockets_per_core as f64 / clip.mean_packets_per_frame()).ceil() as u64;
    let reps = args.drain_reps();
    // The two-core runs queue twice what one core's do.
    let (_guard, udp_mem) = UdpMemGuard::ensure(2 * packets_per_core * TRUESIZE)?;
    eprintln!(
        "bench-throughput: drain runs: {sockets_per_core} sockets a core, {frames_per_stream} frames a socket (about {packets_per_core} packets a core), {reps} of each"
    );
    let mut runs = Vec::new();
    for rep in 0..reps {
        for cores in [1, 2] {
            for kind in [RxKind::BareLoop, RxKind::Zerodrop] {
                let run = drain_run(kind, cores, sockets_per_core, frames_per_stream, clip, work, rep)
                    .with_context(|| format!("drain run {} of {} on {cores} core(s)", rep + 1, kind.name()))?;
                eprintln!(
                    "bench-throughput: drain {}/{reps} {:<9} {cores} core(s): {} packets in {:.3} s = {:.0} packets/s ({:.2} cores busy; filled in {:.1} s)",
                    rep + 1,
                    kind.name(),
                    run.packets_sent,
                    run.drain_s,
                    run.packets_per_s,
                    run.receiver_cores_busy,
                    run.fill_s
                );
                runs.push(run);
            }
        }
    }
    let mut summaries = Vec::new();
    for cores in [1, 2] {
        for kind in [RxKind::BareLoop, RxKind::Zerodrop] {
            let mut pps: Vec<f64> = runs.iter().filter(|r| r.receiver == kind && r.cores == cores).map(|r| r.packets_per_s).collect();
            pps.sort_by(f64::total_cmp);
            summaries.push(DrainSummary {
                receiver: kind,
                cores,
                median_pps: median(&pps),
                min_pps: pps[0],
                max_pps: pps[pps.len() - 1],
                runs: pps.len(),
            });
        }
    }
    let m = |kind, cores| summaries.iter().find(|s: &&DrainSummary| s.receiver == kind && s.cores == cores).map_or(f64::NAN, |s| s.median_pps);
    Ok(CoresResult {
        sockets_per_core,
        packets_per_core,
        reps,
        udp_mem,
        ratio_one_core: m(RxKind::Zerodrop, 1) / m(RxKind::BareLoop, 1),
        ratio_two_cores: m(RxKind::Zerodrop, 2) / m(RxKind::BareLoop, 2),
        scaling_zerodrop: m(RxKind::Zerodrop, 2) / m(RxKind::Zerodrop, 1),
        scaling_bare_loop: m(RxKind::BareLoop, 2) / m(RxKind::BareLoop, 1),
        runs,
        summaries,
    })
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

/// The receiver of a drain run: ours, or one bare-loop child per core.
enum Drained {
    Zerodrop(RunnerProcess),
    Bare(Vec<ChildRx>),
}

impl Drained {
    fn pids(&self) -> Vec<u32> {
        match self {
            Drained::Zerodrop(r) => vec![r.pid()],
            Drained::Bare(children) => children.iter().map(|c| c.child.id()).collect(),
        }
    }

    /// Packets read so far (and ours: frames assembled, dropped).
    fn counted(&self) -> anyhow::Result<(u64, Option<u64>, Option<u64>)> {
        match self {
            Drained::Zerodrop(r) => {
                let text = r.metrics()?;
                let sum = |name: &str| metric_sum(&text, name, "") as u64;
                let read = sum("zerodrop_rtp_packets_received_total")
                    + sum("zerodrop_rtp_packets_duplicate_total")
                    + sum("zerodrop_rtp_packets_late_total")
                    + sum("zerodrop_rtp_packets_discarded_total");
                Ok((read, Some(sum("zerodrop_frames_assembled_total")), Some(sum("zerodrop_frames_dropped_total"))))
            }
            Drained::Bare(children) => {
                let read = children
                    .iter()
                    .map(|c| c.samples.lock().unwrap_or_else(|e| e.into_inner()).last().map_or(0, |s| s.read as u64))
                    .sum();
                Ok((read, None, None))
            }
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Drained::Zerodrop(r) => {
                let outcome = r.stop()?;
                if !outcome.status.success() {
                    bail!("zerodrop run exited with {}: {}", outcome.status, outcome.stderr);
                }
            }
            Drained::Bare(children) => {
                for c in children {
                    c.stop(RxKind::BareLoop)?;
                }
            }
        }
        Ok(())
    }
}

fn signal(pids: &[u32], sig: libc::c_int) -> anyhow::Result<()> {
    for &pid in pids {
        // SAFETY: kill(2) on a child of ours.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One manifest with a source per port, each asking for `buffer` bytes.
fn drain_manifest(ports: &[u16], buffer: u64) -> String {
    let mut s = String::from("apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata:\n  name: drain\nspec:\n  sources:\n");
    for (i, port) in ports.iter().enumerate() {
        let _ = write!(
            s,
            "    - name: d{i}\n      codec: h264\n      payloadType: 96\n      rtxPayloadType: {rtx}\n      transport:\n        rtp:\n          listenAddress: 127.0.0.1\n          port: {port}\n          rtcpPort: {rtcp}\n          receiveBufferBytes: {buffer}\n",
            rtx = replay::RTX_PAYLOAD_TYPE,
            rtcp = port + 1
        );
    }
    let _ = write!(
        s,
        "  repair:\n    latencyMs: {LATENCY_MS}\n    nack:\n      enabled: true\n      maxRetries: {MAX_NACK_RETRIES}\n  decode:\n    decoder: software\n"
    );
    s
}

fn drain_run(
    kind: RxKind,
    cores: usize,
    sockets_per_core: usize,
    frames_per_stream: u64,
    clip: &Arc<Clip>,
    work: &Path,
    rep: usize,
) -> anyhow::Result<DrainRun> {
    let sockets = cores * sockets_per_core;
    let ports = free_rtp_ports(sockets)?;
    let packets_per_stream = (frames_per_stream as f64 * clip.mean_packets_per_frame()) as u64;
    let buffer = (packets_per_stream * TRUESIZE * 5 / 4).clamp(65_536, MAX_RECEIVE_BUFFER);
    let cpu_list = if cores == 1 { RECEIVER_CORE.to_string() } else { "0,1".to_string() };
    let rx = match kind {
        RxKind::Zerodrop => {
            let manifest = drain_manifest(&ports, buffer);
            let workers = cores.to_string();
            let runner = RunnerProcess::start_with(&manifest, free_tcp_port()?, &["--no-decode", "--workers", &workers], false)?;
            // The wrapper pinned it to core 1; every thread of it may now use both.
            if cores > 1 {
                let status = Command::new("taskset")
                    .args(["-a", "-p", "-c", &cpu_list, &runner.pid().to_string()])
                    .stdout(Stdio::null())
                    .status()
                    .context("taskset -a -p")?;
                if !status.success() {
                    bail!("taskset -a -p -c {cpu_list} {} failed", runner.pid());
                }
            }
            Drained::Zerodrop(runner)
        }
        RxKind::BareLoop => {
            let mut children = Vec::new();
            for core in 0..cores {
                let mine: Vec<String> = ports.iter().skip(core).step_by(cores).map(u16::to_string).collect();
                let core_id = if cores == 1 { RECEIVER_CORE } else { core };
                let log = work.join(format!("drain-bare-{rep}-{cores}-{core}.log"));
                let args = [format!("--ports={}", mine.join(",")), format!("--buffer={buffer}")];
                children.push(ChildRx::spawn_on(BARE_CHILD, &core_id.to_string(), &args, &log)?);
            }
            Drained::Bare(children)
        }
        RxKind::Gstreamer => bail!("the drain runs compare ours with the bare loop only"),
    };
    // Every socket bound before the fill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while udp_socket_states(&ports).len() < sockets {
        if Instant::now() > deadline {
            bail!("{} did not bind its {sockets} sockets within 30 s", kind.name());
        }
        std::thread::sleep(POLL_EVERY);
    }
    let pids = rx.pids();
    signal(&pids, libc::SIGSTOP)?;
    let result = fill_and_drain(kind, cores, &ports, frames_per_stream, clip, &rx, &pids, rep);
    // Never leave a stopped receiver behind.
    let _ = signal(&pids, libc::SIGCONT);
    let run = result?;
    rx.stop()?;
    Ok(run)
}

#[allow(clippy::too_many_arguments)]
fn fill_and_drain(
    kind: RxKind,
    cores: usize,
    ports: &[u16],
    frames_per_stream: u64,
    clip: &Arc<Clip>,
    rx: &Drained,
    pids: &[u32],
    rep: usize,
) -> anyhow::Result<DrainRun> {
    let dests: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
    let mut sender = ReplaySender::new(clip.clone(), &dests, 0, &LossSpec::None, 1)?;
    let fill_start = Instant::now();
    let counts = sender.send_frames(frames_per_stream);
    let fill_s = fill_start.elapsed().as_secs_f64();
    let packets_sent: u64 = counts.iter().map(|c| c.packets_sent).sum();
    let frames_sent: u64 = counts.iter().map(|c| c.frames_sent).sum();
    let states = udp_socket_states(ports);
    let queued_bytes: u64 = states.iter().map(|s| s.rx_queue).sum();
    let drops: u64 = states.iter().map(|s| s.drops).sum();
    if drops > 0 {
        bail!("the sockets dropped {drops} of {packets_sent} packets during the fill: their receive buffers or udp_mem are too small");
    }
    let cpu_before: f64 = pids.iter().map(|p| process_cpu(*p).map_or(0.0, |c| c.1)).sum();
    let t0 = monotonic_ns();
    signal(pids, libc::SIGCONT)?;
    let mut empty_at: HashMap<u16, u64> = HashMap::new();
    let mut polls = 0u64;
    let mut last: Vec<UdpSocketState> = states;
    while empty_at.len() < ports.len() {
        // The sampling period of the drain's end, not a wait for an event.
        std::thread::sleep(POLL_EVERY);
        let now = monotonic_ns();
        last = udp_socket_states(ports);
        polls += 1;
        for s in &last {
            if s.rx_queue == 0 {
                empty_at.entry(s.port).or_insert(now);
            }
        }
        if now - t0 > 120_000_000_000 {
            bail!("{} had not emptied its sockets after 120 s: {last:?}", kind.name());
        }
    }
    let t_end = empty_at.values().copied().max().unwrap_or(t0);
    let cpu_after: f64 = pids.iter().map(|p| process_cpu(*p).map_or(0.0, |c| c.1)).sum();
    let drain_s = (t_end - t0) as f64 * 1e-9;
    let socket_drops: u64 = last.iter().map(|s| s.drops).sum();
    if socket_drops > 0 {
        bail!("the sockets dropped {socket_drops} packets during the drain");
    }
    // The receiver has read everything; wait for it to say so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (counted, frames_assembled, frames_dropped) = loop {
        let c = rx.counted()?;
        let frames_done = c.1.is_none_or(|a| a + c.2.unwrap_or(0) >= frames_sent);
        if c.0 >= packets_sent && frames_done {
            break c;
        }
        if Instant::now() > deadline {
            bail!("{} counted {} of {packets_sent} packets (frames {:?} assembled of {frames_sent}) 20 s after its sockets were empty", kind.name(), c.0, c.1);
        }
        // Polling the receiver's counts (its /metrics, the child's reports).
        std::thread::sleep(Duration::from_millis(50));
    };
    if counted != packets_sent {
        bail!("{} counted {counted} packets, {packets_sent} were sent", kind.name());
    }
    if let (Some(a), Some(d)) = (frames_assembled, frames_dropped)
        && (a != frames_sent || d != 0)
    {
        bail!("{} assembled {a} and dropped {d} of {frames_sent} frames", kind.name());
    }
    Ok(DrainRun {
        receiver: kind,
        cores,
        sockets: ports.len(),
        rep,
        packets_sent,
        frames_sent,
        queued_bytes,
        fill_s,
        drain_s,
        socket_empty_s: ports.iter().map(|p| (empty_at[p] - t0) as f64 * 1e-9).collect(),
        packets_per_s: packets_sent as f64 / drain_s,
        receiver_cores_busy: (cpu_after - cpu_before) / drain_s,
        polls,
        counted,
        frames_assembled,
        frames_dropped,
        socket_drops,
    })
}
