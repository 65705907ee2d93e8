//! Drain runs: what the receive path takes on one core and on two, with no
//! sender on the CPU while it is measured.
//!
//! This machine has two cores. Sending over loopback costs a core about as
//! much per packet as receiving, so a live sender cannot keep two receiving
//! cores saturated from a third. The drain runs take the sender off the CPU
//! instead: the receiver is started (its sockets bound, each with a receive
//! buffer large enough for everything sent to it), stopped with `SIGSTOP`,
//! its sockets are filled, each from the core that will read it (as a NIC
//! queue steered to its reader's core would: the kernel frees each packet
//! on the core that allocated it), then it is let go with `SIGCONT` and timed until
//! the last socket is empty (`rx_queue` in `/proc/net/udp`, read every
//! [`POLL_EVERY`]). Every socket has packets waiting for the whole drain, so
//! the receiver never waits for one: the rate is what its cores take,
//! measured on whole cores, not extrapolated from a share of one.
//!
//! - one core: the receiver pinned to core 1 (`taskset -c 1`), S sockets;
//!   then the same on core 0, each core measured alone (the benchmark's own
//!   thread, which looks for the drain's end, polls from the other core);
//! - two cores: the receiver on cores 0 and 1 (`taskset -a -p -c 0,1`), 2·S
//!   sockets; ours with `--workers 2` (its supervisor places the sources on
//!   the workers in turn; worker k is pinned to core k), the bare loop as
//!   one child per core, each with every other socket; the benchmark polls
//!   from core 0.
//!
//! Afterwards each receiver must have counted every packet sent (ours: and
//! assembled every frame), and no socket may have dropped one; a run that
//! fails either is an error, not a figure.

#[allow(unused_imports)]
use super::*;
use zerodrop_e2e::bench::{UdpSocketState, udp_socket_states};
use zerodrop_e2e::runner::metric_sum;

/// How often, at most and at least, the drain's end is looked for (one
/// read of /proc/net/udp): often only near the end (see `fill_and_drain`).
pub(crate) const POLL_MIN: Duration = Duration::from_millis(1);
pub(crate) const POLL_MAX: Duration = Duration::from_millis(50);
/// Kernel memory one 1,200-byte datagram takes in a loopback socket's
/// queue (its skb truesize, measured here: 2,304 bytes); the receive
/// buffers are sized from it with a quarter to spare. (Sent with UDP GSO,
/// as the fill does, a datagram takes about 1,850.)
pub(crate) const TRUESIZE: u64 = 2304;
/// The largest `receiveBufferBytes` the API allows.
const MAX_RECEIVE_BUFFER: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainRun {
    pub(crate) receiver: RxKind,
    /// The cores it ran on, and where its sockets were filled from.
    pub(crate) placement: Placement,
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
    pub(crate) placement: Placement,
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
    /// Ours / bare loop, medians: core 1 alone, core 0 alone, both cores.
    pub(crate) ratio_core1: f64,
    pub(crate) ratio_core0: f64,
    pub(crate) ratio_two_cores: f64,
    /// Both cores / core 1 alone, medians.
    pub(crate) scaling_zerodrop: f64,
    pub(crate) scaling_bare_loop: f64,
    /// Both cores / (core 0 alone + core 1 alone), medians.
    pub(crate) two_cores_of_sum_zerodrop: f64,
    pub(crate) two_cores_of_sum_bare_loop: f64,
}

/// Where a drain run puts the receiver, and where its sockets are filled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Placement {
    pub(crate) cpus: &'static [usize],
    /// Every socket filled from core 0 (else each from the core that reads
    /// it): the kernel then frees on one core what another allocated.
    pub(crate) filled_from_core0: bool,
}

/// Core 1 alone, core 0 alone, both; both again with every packet
/// allocated on core 0.
pub(crate) const PLACEMENTS: [Placement; 4] = [
    Placement { cpus: &[RECEIVER_CORE], filled_from_core0: false },
    Placement { cpus: &[SENDER_CORE], filled_from_core0: false },
    Placement { cpus: &[0, 1], filled_from_core0: false },
    Placement { cpus: &[0, 1], filled_from_core0: true },
];

impl CoresResult {
    pub(crate) fn summary(&self, kind: RxKind, p: Placement) -> Option<&DrainSummary> {
        self.summaries.iter().find(|s| s.receiver == kind && s.placement == p)
    }

    fn median(&self, kind: RxKind, p: Placement) -> f64 {
        self.summary(kind, p).map_or(f64::NAN, |s| s.median_pps)
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
        for p in PLACEMENTS {
            for kind in [RxKind::BareLoop, RxKind::Zerodrop] {
                let run = drain_run(kind, p, sockets_per_core, frames_per_stream, clip, work, rep)
                    .with_context(|| format!("drain run {} of {} on cores {:?}", rep + 1, kind.name(), p.cpus))?;
                eprintln!(
                    "bench-throughput: drain {}/{reps} {:<9} cores {:<6}{}: {} packets in {:.3} s = {:.0} packets/s ({:.2} cores busy; filled in {:.1} s)",
                    rep + 1,
                    kind.name(),
                    format!("{:?}", p.cpus),
                    if p.filled_from_core0 { " (filled from core 0)" } else { "" },
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
    for p in PLACEMENTS {
        for kind in [RxKind::BareLoop, RxKind::Zerodrop] {
            let mut pps: Vec<f64> = runs.iter().filter(|r| r.receiver == kind && r.placement == p).map(|r| r.packets_per_s).collect();
            pps.sort_by(f64::total_cmp);
            summaries.push(DrainSummary {
                receiver: kind,
                placement: p,
                median_pps: median(&pps),
                min_pps: pps[0],
                max_pps: pps[pps.len() - 1],
                runs: pps.len(),
            });
        }
    }
    let mut result = CoresResult {
        sockets_per_core,
        packets_per_core,
        reps,
        udp_mem,
        runs,
        summaries,
        ratio_core1: 0.0,
        ratio_core0: 0.0,
        ratio_two_cores: 0.0,
        scaling_zerodrop: 0.0,
        scaling_bare_loop: 0.0,
        two_cores_of_sum_zerodrop: 0.0,
        two_cores_of_sum_bare_loop: 0.0,
    };
    let [c1, c0, both, _] = PLACEMENTS;
    let (z, b) = (RxKind::Zerodrop, RxKind::BareLoop);
    result.ratio_core1 = result.median(z, c1) / result.median(b, c1);
    result.ratio_core0 = result.median(z, c0) / result.median(b, c0);
    result.ratio_two_cores = result.median(z, both) / result.median(b, both);
    result.scaling_zerodrop = result.median(z, both) / result.median(z, c1);
    result.scaling_bare_loop = result.median(b, both) / result.median(b, c1);
    result.two_cores_of_sum_zerodrop = result.median(z, both) / (result.median(z, c0) + result.median(z, c1));
    result.two_cores_of_sum_bare_loop = result.median(b, both) / (result.median(b, c0) + result.median(b, c1));
    Ok(result)
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

/// Pins the thread of process `pid` named `name` to `core`.
fn pin_thread_named(pid: u32, name: &str, core: usize) -> anyhow::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let tid: libc::pid_t = task.file_name().to_string_lossy().parse()?;
            // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays
            // inside it for a core below CPU_SETSIZE.
            let rc = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if rc != 0 {
                bail!("pinning {name} ({tid}) to core {core}: {}", std::io::Error::last_os_error());
            }
            return Ok(());
        }
    }
    bail!("process {pid} has no thread named {name}")
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
    placement: Placement,
    sockets_per_core: usize,
    frames_per_stream: u64,
    clip: &Arc<Clip>,
    work: &Path,
    rep: usize,
) -> anyhow::Result<DrainRun> {
    let cpus = placement.cpus;
    let cores = cpus.len();
    let sockets = cores * sockets_per_core;
    let ports = free_rtp_ports(sockets)?;
    let packets_per_stream = (frames_per_stream as f64 * clip.mean_packets_per_frame()) as u64;
    let buffer = (packets_per_stream * TRUESIZE * 5 / 4).clamp(65_536, MAX_RECEIVE_BUFFER);
    let cpu_list = cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let rx = match kind {
        RxKind::Zerodrop => {
            let manifest = drain_manifest(&ports, buffer);
            let workers = cores.to_string();
            let runner = RunnerProcess::start_with(&manifest, free_tcp_port()?, &["--no-decode", "--workers", &workers], false)?;
            // The wrapper pinned it to core 1; every thread of it goes where it is asked.
            if cpus != [RECEIVER_CORE] {
                let status = Command::new("taskset")
                    .args(["-a", "-p", "-c", &cpu_list, &runner.pid().to_string()])
                    .stdout(Stdio::null())
                    .status()
                    .context("taskset -a -p")?;
                if !status.success() {
                    bail!("taskset -a -p -c {cpu_list} {} failed", runner.pid());
                }
            }
            if cores > 1 {
                for (k, &core) in cpus.iter().enumerate() {
                    pin_thread_named(runner.pid(), &format!("rx-worker-{k}"), core)?;
                }
            }
            Drained::Zerodrop(runner)
        }
        RxKind::BareLoop => {
            let mut children = Vec::new();
            for (k, &core_id) in cpus.iter().enumerate() {
                let mine: Vec<String> = ports.iter().skip(k).step_by(cores).map(u16::to_string).collect();
                let log = work.join(format!("drain-bare-{rep}-{cpu_list}-{core_id}.log"));
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
        // Polling /proc/net/udp for the receiver's sockets to appear.
        std::thread::sleep(POLL_MIN);
    }
    let pids = rx.pids();
    signal(&pids, libc::SIGSTOP)?;
    let result = fill_and_drain(kind, placement, &ports, frames_per_stream, clip, &rx, &pids, rep);
    // Never leave a stopped receiver behind.
    let _ = signal(&pids, libc::SIGCONT);
    let run = result?;
    rx.stop()?;
    Ok(run)
}

#[allow(clippy::too_many_arguments)]
fn fill_and_drain(
    kind: RxKind,
    placement: Placement,
    ports: &[u16],
    frames_per_stream: u64,
    clip: &Arc<Clip>,
    rx: &Drained,
    pids: &[u32],
    rep: usize,
) -> anyhow::Result<DrainRun> {
    // Socket i is read on cpus[i % n] (ours: source i on worker i % n).
    let cpus = placement.cpus;
    let fill_start = Instant::now();
    let (mut packets_sent, mut frames_sent) = (0, 0);
    for (k, &core) in cpus.iter().enumerate() {
        let dests: Vec<SocketAddr> = ports.iter().skip(k).step_by(cpus.len()).map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
        replay::pin_current_thread(if placement.filled_from_core0 { 0 } else { core }).context("pinning the filling thread")?;
        let mut sender = ReplaySender::new(clip.clone(), &dests, 0, &LossSpec::None, 1 + k as u64)?;
        let counts = sender.send_frames(frames_per_stream);
        packets_sent += counts.iter().map(|c| c.packets_sent).sum::<u64>();
        frames_sent += counts.iter().map(|c| c.frames_sent).sum::<u64>();
    }
    replay::pin_current_thread(SENDER_CORE).context("pinning the benchmark's thread back")?;
    let fill_s = fill_start.elapsed().as_secs_f64();
    let states = udp_socket_states(ports);
    let queued_bytes: u64 = states.iter().map(|s| s.rx_queue).sum();
    let drops: u64 = states.iter().map(|s| s.drops).sum();
    if drops > 0 {
        bail!("the sockets dropped {drops} of {packets_sent} packets during the fill: their receive buffers or udp_mem are too small");
    }
    // Looking for the drain's end from a core the receiver does not use,
    // where there is one.
    let poll_core = if cpus.len() == 1 { 1 - cpus[0].min(1) } else { SENDER_CORE };
    replay::pin_current_thread(poll_core).context("pinning the benchmark's thread")?;
    let cpu_before: f64 = pids.iter().map(|p| process_cpu(*p).map_or(0.0, |c| c.1)).sum();
    let t0 = monotonic_ns();
    signal(pids, libc::SIGCONT)?;
    let mut empty_at: HashMap<u16, u64> = HashMap::new();
    let mut polls = 0u64;
    let start: HashMap<u16, u64> = states.iter().map(|s| (s.port, s.rx_queue)).collect();
    let mut last: Vec<UdpSocketState> = states;
    let mut wait = POLL_MIN;
    while empty_at.len() < ports.len() {
        // The sampling period of the drain's end, not a wait for an event:
        // half the time the fastest socket still needs at its rate so far,
        // so the poller rarely wakes on the receiver's cores (each wake-up
        // costs the core it lands on) and looks often only near the end.
        std::thread::sleep(wait);
        let now = monotonic_ns();
        last = udp_socket_states(ports);
        polls += 1;
        let elapsed = (now - t0) as f64;
        let mut soonest = f64::INFINITY;
        for s in &last {
            if s.rx_queue == 0 {
                empty_at.entry(s.port).or_insert(now);
            } else {
                let drained = start[&s.port].saturating_sub(s.rx_queue) as f64;
                if drained > 0.0 {
                    soonest = soonest.min(s.rx_queue as f64 * elapsed / drained);
                }
            }
        }
        wait = Duration::from_nanos((soonest / 2.0).min(u64::MAX as f64) as u64).clamp(POLL_MIN, POLL_MAX);
        if now - t0 > 120_000_000_000 {
            bail!("{} had not emptied its sockets after 120 s: {last:?}", kind.name());
        }
    }
    let t_end = empty_at.values().copied().max().unwrap_or(t0);
    let cpu_after: f64 = pids.iter().map(|p| process_cpu(*p).map_or(0.0, |c| c.1)).sum();
    replay::pin_current_thread(SENDER_CORE).context("pinning the benchmark's thread back")?;
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
        placement,
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
