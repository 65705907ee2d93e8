//! The throughput runs: each receiver alone on the receiver core, through
//! the overload schedule and the staircase; their summaries.

#[allow(unused_imports)]
use super::*;

/// One schedule on one receiver, analysed.
#[derive(Debug, Serialize)]
pub(crate) struct ScheduleRun {
    pub(crate) receiver: RxKind,
    pub(crate) schedule: &'static str,
    pub(crate) sender: SenderSummary,
    pub(crate) phases: Vec<PhaseResult>,
    /// 100 ms windows from the first phase's start (overload runs only).
    pub(crate) windows: Vec<Window>,
    /// Socket drops over the whole run (`/proc/net/udp`).
    pub(crate) socket_drops: u64,
    /// Ours: `zerodrop_kernel_udp_drops_total` at the end of the run.
    pub(crate) reported_kernel_drops: Option<f64>,
    pub(crate) receiver_report: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub(crate) struct SenderSummary {
    pub(crate) phases: Vec<PhaseOffered>,
    pub(crate) offered: OfferedCounts,
    pub(crate) gso: GsoSupport,
    pub(crate) stopped_early: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PhaseResult {
    pub(crate) name: String,
    pub(crate) rate_pps: Option<f64>,
    /// The measured stretch: the phase less its first `trim_s` and last 0.1 s.
    pub(crate) trim_s: f64,
    /// The sending thread's CPU share over the whole phase.
    pub(crate) sender_cpu_util: f64,
    pub(crate) measured_s: f64,
    pub(crate) offered_pps: f64,
    /// Datagrams the receiver took off its socket.
    pub(crate) read_pps: f64,
    /// Ours: packets into the jitter buffer; GStreamer: packets out of
    /// rtpjitterbuffer; bare loop: read.
    pub(crate) delivered_pps: f64,
    /// Ours: whole access units out of the depacketiser; GStreamer: packets
    /// with the marker bit out of rtpjitterbuffer (frame ends).
    pub(crate) frames_per_s: Option<f64>,
    pub(crate) socket_drops: f64,
    pub(crate) cpu_util: f64,
    pub(crate) packets_read: f64,
    pub(crate) ns_cpu_per_packet: f64,
    /// The same from the threads' schedstat run time.
    pub(crate) ns_cpu_per_packet_schedstat: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Window {
    pub(crate) t_s: f64,
    pub(crate) offered_pps: f64,
    pub(crate) read_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) frames_per_s: Option<f64>,
    pub(crate) socket_drops: f64,
    pub(crate) cpu_util: f64,
}

/// A receiver's throughput figures, from its two runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThroughputSummary {
    pub(crate) receiver: RxKind,
    /// During the overload phase (less its first 0.5 s).
    pub(crate) offered_pps: f64,
    pub(crate) accepted_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) frames_per_s: Option<f64>,
    pub(crate) overload_socket_drops: f64,
    /// The receiver's share of its core during the overload, and the sender's.
    pub(crate) overload_cpu_util: f64,
    pub(crate) overload_sender_cpu_util: f64,
    /// In the overload its socket overflowed: it was offered more than it took.
    pub(crate) saturated: bool,
    /// As fast as the sender can, the receiver alone on its core.
    pub(crate) max_rate_offered_pps: f64,
    pub(crate) max_rate_sender_cpu_util: f64,
    pub(crate) max_rate_read_pps: f64,
    pub(crate) max_rate_cpu_util: f64,
    pub(crate) max_rate_socket_drops: f64,
    pub(crate) high_rate_offered_pps: f64,
    pub(crate) high_rate_read_pps: f64,
    pub(crate) high_rate_delivered_pps: f64,
    pub(crate) high_rate_cpu_util: f64,
    pub(crate) high_rate_socket_drops: f64,
    pub(crate) high_rate_ns_cpu_per_packet: f64,
    /// In the overload, delivered packets per second of receiver CPU: with
    /// the receiver saturated (its socket overflowing), what a whole core of
    /// it takes. The median of `per_core_samples`.
    pub(crate) delivered_per_cpu_s: f64,
    /// The same from each overload (the overload run's, then the extra ones).
    pub(crate) per_core_samples: Vec<f64>,
    /// Highest staircase step without loss, and whether a step lost at all.
    pub(crate) loss_free_pps: Option<f64>,
    pub(crate) loss_free_is_lower_bound: bool,
    pub(crate) staircase_max_offered_pps: f64,
    pub(crate) fixed_rate_pps: f64,
    pub(crate) fixed_rate_read_pps: f64,
    pub(crate) fixed_rate_socket_drops: f64,
    pub(crate) ns_cpu_per_packet: f64,
    pub(crate) ns_cpu_per_packet_schedstat: f64,
    /// Seconds from the end of the overload until the full rate is
    /// delivered again (and stays so for 0.5 s); None: not within the phase.
    pub(crate) recovery_s: Option<f64>,
    pub(crate) recovery_phase_s: f64,
    /// Ours only: kernel drops it counted itself over the overload run.
    pub(crate) reported_kernel_drops: Option<f64>,
    pub(crate) overload_run_socket_drops: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ThroughputResult {
    pub(crate) runs: Vec<ScheduleRun>,
    pub(crate) summaries: Vec<ThroughputSummary>,
    pub(crate) mean_packets_per_frame: f64,
}

pub(crate) fn run_throughput(args: &Args, clip: &Arc<Clip>, work: &Path) -> anyhow::Result<ThroughputResult> {
    let [steady, high, max, overload, recovery] = args.overload_phases();
    let overload_phases = vec![
        RatePhase { name: "fixed-rate".into(), duration_s: steady, rate_pps: Some(args.rate) },
        RatePhase { name: "high-rate".into(), duration_s: high, rate_pps: Some(args.high_rate) },
        RatePhase { name: "max-rate".into(), duration_s: max, rate_pps: None },
        RatePhase { name: OVERLOAD.into(), duration_s: overload, rate_pps: None },
        RatePhase { name: "recovery".into(), duration_s: recovery, rate_pps: Some(args.rate) },
    ];
    let mut staircase = Vec::new();
    let mut rate = 50_000.0;
    while rate < 2.5e6 {
        staircase.push(RatePhase { name: format!("{:.0}k", rate / 1000.0), duration_s: args.step_s(), rate_pps: Some(rate) });
        rate *= 1.25;
    }
    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    for kind in RxKind::ALL {
        if !args.receivers.is_empty() && !args.receivers.iter().any(|r| r == kind.name()) {
            continue;
        }
        eprintln!(
            "throughput: {:<9} overload run: {:.0}k pkt/s for {steady} s, {:.0}k pkt/s for {high} s, as fast as possible for {max} s, the same with a co-tenant on the receiver's core for {overload} s, {:.0}k pkt/s for {recovery} s",
            kind.name(),
            args.rate / 1000.0,
            args.high_rate / 1000.0,
            args.rate / 1000.0
        );
        let over = run_schedule(kind, "overload", clip, &overload_phases, args, work, false)?;
        for p in &over.phases {
            eprintln!("  {}", phase_line(p));
        }
        eprintln!("throughput: {:<9} staircase: {} steps of {} s from 50k pkt/s, +25% a step, until two steps lose", kind.name(), staircase.len(), args.step_s());
        let stairs = run_schedule(kind, "staircase", clip, &staircase, args, work, true)?;
        let summary = summarise(kind, &over, &stairs, clip.mean_packets_per_frame());
        eprintln!(
            "  {}: accepted {:.0}k of {:.0}k offered under overload; loss-free up to {}; {:.0} ns CPU/packet at {:.0}k; recovery {}",
            kind.name(),
            summary.accepted_pps / 1000.0,
            summary.offered_pps / 1000.0,
            summary.loss_free_pps.map_or("n/a".into(), |r| format!("{}{:.0}k", if summary.loss_free_is_lower_bound { "≥" } else { "" }, r / 1000.0)),
            summary.ns_cpu_per_packet,
            args.rate / 1000.0,
            summary.recovery_s.map_or(format!("not within {:.0} s", summary.recovery_phase_s), |s| format!("{:.1} s", s)),
        );
        summaries.push(summary);
        runs.push(over);
        runs.push(stairs);
    }
    // The per-core figure moves by tens of percent from one run to the next
    // here (the kernel's cross-core skb freeing, the host): more overloads of
    // the bare loop and ours, interleaved, and the median of all of them.
    let per_core_phases = vec![
        RatePhase { name: "fixed-rate".into(), duration_s: 1.0, rate_pps: Some(args.rate) },
        RatePhase { name: OVERLOAD.into(), duration_s: args.overload_phases()[3], rate_pps: None },
    ];
    for round in 0..args.extra_overloads() {
        for kind in [RxKind::BareLoop, RxKind::Zerodrop] {
            let Some(summary) = summaries.iter_mut().find(|x| x.receiver == kind) else { continue };
            let run = run_schedule(kind, "per-core", clip, &per_core_phases, args, work, false)?;
            let o = run.phases.iter().find(|p| p.name == OVERLOAD).expect("the per-core run has an overload phase");
            let per_core = if o.cpu_util > 0.0 { o.delivered_pps / o.cpu_util.min(1.0) } else { 0.0 };
            eprintln!(
                "throughput: {:<9} overload {} of {}: read {:.0}k at {:.0}% CPU, {:.0} socket drops: {:.0}k per core",
                kind.name(),
                round + 2,
                args.extra_overloads() + 1,
                o.read_pps / 1000.0,
                o.cpu_util * 100.0,
                o.socket_drops,
                per_core / 1000.0
            );
            summary.per_core_samples.push(per_core);
            summary.saturated &= o.socket_drops > 0.0;
            runs.push(run);
        }
    }
    for x in &mut summaries {
        x.delivered_per_cpu_s = median(&x.per_core_samples);
    }
    Ok(ThroughputResult { runs, summaries, mean_packets_per_frame: clip.mean_packets_per_frame() })
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

pub(crate) fn phase_line(p: &PhaseResult) -> String {
    format!(
        "{:<10} offered {:>7.0}k (sender cpu {:>3.0}%) read {:>7.0}k delivered {:>7.0}k frames/s {:>6} socket drops {:>8.0} cpu {:>3.0}% {:>5.0} ns/pkt",
        p.name,
        p.offered_pps / 1000.0,
        p.sender_cpu_util * 100.0,
        p.read_pps / 1000.0,
        p.delivered_pps / 1000.0,
        p.frames_per_s.map_or("-".into(), |f| format!("{f:.0}")),
        p.socket_drops,
        p.cpu_util * 100.0,
        p.ns_cpu_per_packet,
    )
}

/// Runs `phases` against a fresh receiver of `kind`. With `stop_on_loss`,
/// the sender stops after two consecutive phases that lost packets.
pub(crate) fn run_schedule(
    kind: RxKind,
    schedule: &'static str,
    clip: &Arc<Clip>,
    phases: &[RatePhase],
    args: &Args,
    work: &Path,
    stop_on_loss: bool,
) -> anyhow::Result<ScheduleRun> {
    let port = free_rtp_port()?;
    let dest: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut rx = RxProcess::start(kind, port, work)?;
    let pid = rx.pid();
    let mut sender = ReplaySender::new(clip.clone(), &[dest], 0, &LossSpec::None, 0)?;
    if args.no_gso {
        sender.disable_gso("--no-gso");
    }
    let phase = sender.phase.clone();
    let offered_live = sender.offered_live.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let sender_stop = stop.clone();
    let thread_phases = phases.to_vec();
    let handle = std::thread::Builder::new()
        .name("replay".into())
        .spawn(move || sender.run_rates(&thread_phases, &sender_stop))?;
    let cotenant_done = Arc::new(AtomicBool::new(false));
    let mut cotenants = Vec::new();
    if let Some(k) = phases.iter().position(|p| p.name == OVERLOAD) {
        for _ in 0..COTENANTS {
            cotenants.push(spawn_cotenant(phase.clone(), k, cotenant_done.clone())?);
        }
    }

    let mut sys: Vec<SysSample> = Vec::new();
    // Per phase as the sampler sees it: (offered, socket drops, delivered).
    // Rough (a sample period blurs the boundaries), enough to stop a
    // staircase that has clearly been lost; the results use the exact phase
    // times.
    let mut totals: HashMap<usize, (f64, f64, f64)> = HashMap::new();
    let mut last: Option<(usize, f64, f64, f64)> = None;
    loop {
        let s = sample_sys(pid, port, &mut rx);
        let delivered = rx.latest().map_or(0.0, |c| c.delivered);
        let k = phase.load(Ordering::Relaxed);
        let offered = offered_live.load(Ordering::Relaxed) as f64;
        if let Some((pk, po, pdrops, pdel)) = last {
            let e = totals.entry(pk).or_insert((0.0, 0.0, 0.0));
            e.0 += offered - po;
            e.1 += s.socket_drops - pdrops;
            e.2 += delivered - pdel;
            if pk != k {
                // Progress: the phase just left, as the sampler saw it.
                let (off, drops, del) = *e;
                eprintln!(
                    "    {:<10} offered {:>7} delivered {:>7} socket drops {:>8.0}",
                    phases[pk].name,
                    format!("{:.0}k", off / 1000.0 / phases[pk].duration_s),
                    format!("{:.0}k", del / 1000.0 / phases[pk].duration_s),
                    drops
                );
            }
        }
        last = Some((k, offered, s.socket_drops, delivered));
        sys.push(s);
        let lost = |phase: usize| totals.get(&phase).is_some_and(|&(off, drops, del)| drops > 0.0 || del < 0.9 * off);
        if stop_on_loss && k >= 2 && lost(k - 1) && lost(k - 2) {
            stop.store(true, Ordering::Relaxed);
        }
        if handle.is_finished() {
            break;
        }
        std::thread::park_timeout(SAMPLE_EVERY);
    }
    let run = handle.join().map_err(|_| anyhow::anyhow!("the replay sender panicked"))?;
    cotenant_done.store(true, Ordering::Relaxed);
    for c in cotenants {
        c.join().map_err(|_| anyhow::anyhow!("a co-tenant thread panicked"))?;
    }
    // Packets still queued in the socket are read in the next moments; one
    // more sample period takes them into the last window.
    std::thread::park_timeout(SAMPLE_EVERY);
    sys.push(sample_sys(pid, port, &mut rx));
    let reported_kernel_drops = sys.last().and_then(|s| s.reported_kernel_drops);
    let (counters, receiver_report) = rx.stop()?;
    let socket_drops = sys.last().map_or(0.0, |s| s.socket_drops) as u64;
    let series = Series::new(&run.timeline, &counters, &sys);
    let trim = |name: &str| match name {
        "fixed-rate" | "high-rate" => args.steady_trim_s(),
        "max-rate" | OVERLOAD => 0.5,
        "recovery" => 0.0,
        _ => args.step_s() * 0.3,
    };
    let phases: Vec<PhaseResult> = run
        .phases
        .iter()
        .map(|p| {
            let t = trim(&p.name);
            series.phase(p, t, kind)
        })
        .collect();
    let t0 = run.phases.first().map_or(0, |p| p.start_ns);
    let t1 = run.phases.last().map_or(0, |p| p.end_ns);
    // Staircase steps are summed up per phase; timelines only for the overload.
    let windows = if stop_on_loss { Vec::new() } else { series.windows(t0, t1, kind) };
    Ok(ScheduleRun {
        receiver: kind,
        schedule,
        sender: SenderSummary { phases: run.phases, offered: run.offered, gso: run.gso, stopped_early: run.stopped_early },
        phases,
        windows,
        socket_drops,
        reported_kernel_drops,
        receiver_report,
    })
}

/// A thread on the receiver's core that spins while the sender is in phase
/// `k`: a co-tenant taking its share of the core, so that the sender, one
/// core, offers more than the receiver takes.
pub(crate) fn spawn_cotenant(phase: Arc<std::sync::atomic::AtomicUsize>, k: usize, done: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
    Ok(std::thread::Builder::new().name("co-tenant".into()).spawn(move || {
        if replay::pin_current_thread(RECEIVER_CORE).is_err() {
            return;
        }
        while !done.load(Ordering::Relaxed) {
            if phase.load(Ordering::Relaxed) == k {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(1) {
                    std::hint::spin_loop();
                }
            } else {
                // Polling the sender's phase, not waiting on anyone.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })?)
}

pub(crate) fn summarise(kind: RxKind, over: &ScheduleRun, stairs: &ScheduleRun, packets_per_frame: f64) -> ThroughputSummary {
    let phase = |name: &str| over.phases.iter().find(|p| p.name == name).cloned();
    let fixed = phase("fixed-rate").expect("the overload run has a fixed-rate phase");
    let high = phase("high-rate").expect("the overload run has a high-rate phase");
    let max = phase("max-rate").expect("the overload run has a max-rate phase");
    let overload = phase(OVERLOAD).expect("the overload run has an overload phase");
    let per_core = if overload.cpu_util > 0.0 { overload.delivered_pps / overload.cpu_util.min(1.0) } else { 0.0 };
    // The staircase: the first step that lost decides.
    let mut loss_free = None;
    let mut lost_somewhere = false;
    for p in &stairs.phases {
        // Socket drops are exact; the receivers' own counts arrive every
        // 20-50 ms, so a few percent of a short step is sampling, not loss.
        let lossy = p.socket_drops > 0.0 || p.delivered_pps < 0.95 * p.offered_pps;
        if lossy {
            lost_somewhere = true;
            break;
        }
        loss_free = Some(p.offered_pps);
    }
    let recovery_phase = over.sender.phases.iter().find(|p| p.name == "recovery");
    let overload_end = over.sender.phases.iter().find(|p| p.name == OVERLOAD).map_or(0, |p| p.end_ns);
    let t0 = over.sender.phases.first().map_or(0, |p| p.start_ns);
    let recovery_phase_s = recovery_phase.map_or(0.0, |p| (p.end_ns - p.start_ns) as f64 * 1e-9);
    let recovery_s = recovery_time(&over.windows, (overload_end - t0) as f64 * 1e-9, kind, packets_per_frame);
    ThroughputSummary {
        receiver: kind,
        offered_pps: overload.offered_pps,
        accepted_pps: overload.read_pps,
        delivered_pps: overload.delivered_pps,
        frames_per_s: overload.frames_per_s,
        overload_socket_drops: overload.socket_drops,
        overload_cpu_util: overload.cpu_util,
        overload_sender_cpu_util: overload.sender_cpu_util,
        saturated: overload.socket_drops > 0.0,
        max_rate_offered_pps: max.offered_pps,
        max_rate_sender_cpu_util: max.sender_cpu_util,
        max_rate_read_pps: max.read_pps,
        max_rate_cpu_util: max.cpu_util,
        max_rate_socket_drops: max.socket_drops,
        high_rate_offered_pps: high.offered_pps,
        high_rate_read_pps: high.read_pps,
        high_rate_delivered_pps: high.delivered_pps,
        high_rate_cpu_util: high.cpu_util,
        high_rate_socket_drops: high.socket_drops,
        high_rate_ns_cpu_per_packet: high.ns_cpu_per_packet,
        delivered_per_cpu_s: per_core,
        per_core_samples: vec![per_core],
        loss_free_pps: loss_free,
        loss_free_is_lower_bound: !lost_somewhere,
        staircase_max_offered_pps: stairs.phases.iter().map(|p| p.offered_pps).fold(0.0, f64::max),
        fixed_rate_pps: fixed.offered_pps,
        fixed_rate_read_pps: fixed.read_pps,
        fixed_rate_socket_drops: fixed.socket_drops,
        ns_cpu_per_packet: fixed.ns_cpu_per_packet,
        ns_cpu_per_packet_schedstat: fixed.ns_cpu_per_packet_schedstat,
        recovery_s,
        recovery_phase_s,
        reported_kernel_drops: over.reported_kernel_drops,
        overload_run_socket_drops: over.socket_drops,
    }
}

/// The first 100 ms window after the overload from which the receiver reads
/// and delivers at least 95% of what is offered (frames: 90% of the offered
/// packets / the clip's packets per frame, which varies with keyframes) for
/// five windows running; its start, from the overload's end.
pub(crate) fn recovery_time(windows: &[Window], overload_end_s: f64, kind: RxKind, packets_per_frame: f64) -> Option<f64> {
    let half = WINDOW_NS as f64 * 0.5e-9;
    let after: Vec<&Window> = windows.iter().filter(|w| w.t_s >= overload_end_s - half).collect();
    let ok = |w: &Window| {
        w.read_pps >= 0.95 * w.offered_pps
            && w.delivered_pps >= 0.95 * w.offered_pps
            && (!kind.has_frames() || w.frames_per_s.unwrap_or(0.0) >= 0.9 * w.offered_pps / packets_per_frame)
    };
    pub(crate) const SUSTAINED: usize = 5;
    (0..after.len().saturating_sub(SUSTAINED - 1))
        .find(|&k| after[k..k + SUSTAINED].iter().all(|w| ok(w)))
        .map(|k| (after[k].t_s - overload_end_s).max(0.0))
}
