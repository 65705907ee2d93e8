//! The concurrency search: N live 4 Mbit/s streams with seeded loss into one
//! receiver process pinned to the receiver core, doubling then bisecting
//! until a frame is lost. Two receivers: one `zerodrop run`, and GStreamer's
//! repairing receiver (rtpbin with rtprtxreceive and rtpjitterbuffer, tuned
//! as `bench-repair` tunes it) once per stream in one process, judged on the
//! real-time traffic its jitterbuffer is built for: every stream paced at
//! its frame rate, timestamps advancing with the wall clock.

#[allow(unused_imports)]
use super::*;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Trial {
    pub(crate) streams: usize,
    pub(crate) passed: bool,
    /// The sender fell behind its schedule: the trial says nothing of the receiver.
    pub(crate) sender_limited: bool,
    pub(crate) why: String,
    pub(crate) frames_sent: u64,
    pub(crate) frames_assembled: u64,
    pub(crate) frames_dropped: u64,
    /// Streams that handed on fewer frames than were sent.
    pub(crate) streams_short: u64,
    pub(crate) packets_sent: u64,
    pub(crate) packets_dropped_by_loss: u64,
    pub(crate) packets_lost: u64,
    pub(crate) packets_recovered_nack: u64,
    pub(crate) packets_unrecovered: u64,
    pub(crate) nacks_sent: u64,
    pub(crate) rtx_sent: u64,
    pub(crate) rtx_dropped: u64,
    pub(crate) kernel_udp_drops: u64,
    /// N × packets per frame / frame interval: the full-load rate.
    pub(crate) offered_pps: f64,
    /// Receiver CPU (schedstat) / wall time while every stream sends.
    pub(crate) receiver_cpu_util: f64,
    pub(crate) sender_max_lag_ms: f64,
    pub(crate) sender_frames_late: u64,
    pub(crate) sender_frames_late_20ms: u64,
    pub(crate) sender_cpu_util: f64,
    pub(crate) sender_gso: GsoSupport,
    pub(crate) wall_s: f64,
}

/// Which receiver the search runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ConcurrencyRx {
    Zerodrop,
    Gstreamer,
}

impl ConcurrencyRx {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ConcurrencyRx::Zerodrop => "zerodrop",
            ConcurrencyRx::Gstreamer => "gstreamer",
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ConcurrencyResult {
    pub(crate) receiver: ConcurrencyRx,
    /// Largest N that passed, and the smallest that failed.
    pub(crate) max_streams: Option<usize>,
    pub(crate) first_failed: Option<usize>,
    /// The search stopped at --max-streams, or at the sender's limit.
    pub(crate) bounded_by: Option<String>,
    pub(crate) frame_interval_s: f64,
    pub(crate) stream_bitrate_bps: f64,
    pub(crate) trials: Vec<Trial>,
}

pub(crate) fn run_concurrency(args: &Args, clip: &Arc<Clip>, rx: ConcurrencyRx, work: &Path) -> anyhow::Result<ConcurrencyResult> {
    let (stagger, duration, linger) = args.trial();
    // The clip's frames paced so that each stream carries 4 Mbit/s of RTP.
    let frame_interval_s = clip.datagram_bytes() as f64 * 8.0 / clip.frames().len() as f64 / STREAM_BITRATE_BPS;
    let settings = PacedSettings { frame_interval_s, duration_s: stagger + duration, stagger_s: stagger, linger_s: linger };
    eprintln!(
        "concurrency ({}): N streams of {:.1} Mbit/s (a frame every {:.1} ms, starts spread over {stagger} s, {duration} s at full load), {CONCURRENCY_LOSS} loss, RTX answered; doubling from {} then bisecting",
        rx.name(),
        STREAM_BITRATE_BPS / 1e6,
        frame_interval_s * 1000.0,
        args.start_streams()
    );
    let mut trials = Vec::new();
    let (mut lo, mut hi, mut sender_hi): (Option<usize>, Option<usize>, Option<usize>) = (None, None, None);
    let mut n = args.start_streams().clamp(1, args.max_streams);
    let mut bounded_by = None;
    loop {
        let t = concurrency_trial(rx, n, clip, &settings, args.seed, args.no_gso, work)?;
        eprintln!(
            "  N={:>5}: {} | frames sent {} assembled {} dropped {} | lost {} recovered {} unrecovered {} | kernel drops {} | offered {:.0}k pkt/s | receiver CPU {:.0}% | sender CPU {:.0}%, frames >5/>20 ms late {}/{}, max {:.1} ms{}",
            t.streams,
            if t.passed { "pass" } else { "FAIL" },
            t.frames_sent,
            t.frames_assembled,
            t.frames_dropped,
            t.packets_lost,
            t.packets_recovered_nack,
            t.packets_unrecovered,
            t.kernel_udp_drops,
            t.offered_pps / 1000.0,
            t.receiver_cpu_util * 100.0,
            t.sender_cpu_util * 100.0,
            t.sender_frames_late,
            t.sender_frames_late_20ms,
            t.sender_max_lag_ms,
            if t.why.is_empty() { String::new() } else { format!(" ({})", t.why) }
        );
        let (passed, sender_limited) = (t.passed, t.sender_limited);
        trials.push(t);
        if passed {
            // A late sender makes the load burstier, not lighter: a pass counts.
            lo = Some(n);
        } else if sender_limited {
            // A failure behind a late sender says nothing of the receiver at N
            // or above: search below.
            bounded_by = Some(format!("the sender, which fell behind its schedule at N={n}"));
            sender_hi = Some(sender_hi.map_or(n, |h: usize| h.min(n)));
        } else {
            hi = Some(n);
        }
        let upper = match (hi, sender_hi) {
            (Some(h), Some(s)) => Some(h.min(s)),
            (h, s) => h.or(s),
        };
        let next = match (lo, upper) {
            (Some(l), None) if l >= args.max_streams => {
                bounded_by = Some(format!("--max-streams {}", args.max_streams));
                break;
            }
            (Some(l), None) => (l * 2).min(args.max_streams),
            (None, Some(h)) if h <= 1 => break,
            (None, Some(h)) => h / 2,
            (Some(l), Some(h)) => {
                let resolution = if args.quick { (l / 2).max(4) } else { (l / 16).max(2) };
                if h - l <= resolution {
                    break;
                }
                (l + h) / 2
            }
            (None, None) => unreachable!("a trial either passed, failed or was sender-limited"),
        };
        n = next;
    }
    // A receiver failure below the sender's limit is the answer; the sender's
    // limit bounds it only when no failure was seen below it.
    if hi.is_some_and(|h| sender_hi.is_none_or(|s| h < s)) {
        bounded_by = None;
    }
    Ok(ConcurrencyResult {
        receiver: rx,
        max_streams: lo,
        first_failed: hi,
        bounded_by,
        frame_interval_s,
        stream_bitrate_bps: STREAM_BITRATE_BPS,
        trials,
    })
}

/// N sources in StreamPipeline documents of up to 100 sources each.
pub(crate) fn concurrency_manifest(ports: &[u16]) -> String {
    let mut s = String::new();
    for (p, chunk) in ports.chunks(SOURCES_PER_PIPELINE).enumerate() {
        let _ = write!(
            s,
            "---\napiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata:\n  name: fleet-{p}\nspec:\n  sources:\n"
        );
        for (j, port) in chunk.iter().enumerate() {
            let i = p * SOURCES_PER_PIPELINE + j;
            let _ = write!(
                s,
                "    - name: s{i}\n      codec: h264\n      payloadType: 96\n      rtxPayloadType: {rtx}\n      transport:\n        rtp:\n          listenAddress: 127.0.0.1\n          port: {port}\n          rtcpPort: {rtcp}\n",
                rtx = replay::RTX_PAYLOAD_TYPE,
                rtcp = port + 1
            );
        }
        let _ = write!(
            s,
            "  repair:\n    latencyMs: {LATENCY_MS}\n    nack:\n      enabled: true\n      maxRetries: {MAX_NACK_RETRIES}\n  decode:\n    decoder: software\n"
        );
    }
    s
}

pub(crate) fn concurrency_trial(
    rx: ConcurrencyRx,
    n: usize,
    clip: &Arc<Clip>,
    settings: &PacedSettings,
    seed: u64,
    no_gso: bool,
    work: &Path,
) -> anyhow::Result<Trial> {
    let ports = free_rtp_ports(n)?;
    let dests: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
    let loss = LossSpec::parse(CONCURRENCY_LOSS).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The ports were found free and let go; the sender's own ephemeral pair
    // must not land on one of them before the receiver binds it.
    let taken: std::collections::HashSet<u16> = ports.iter().flat_map(|&p| [p, p + 1]).collect();
    let mut sender = ReplaySender::new(clip.clone(), &dests, 1024, &loss, seed)?;
    for _ in 0..16 {
        let own = sender.local_addr()?.port();
        if !taken.contains(&own) && !taken.contains(&(own + 1)) {
            break;
        }
        sender = ReplaySender::new(clip.clone(), &dests, 1024, &loss, seed)?;
    }
    if no_gso {
        sender.disable_gso("--no-gso");
    }
    let receiver = match rx {
        ConcurrencyRx::Zerodrop => TrialRx::Zerodrop(
            RunnerProcess::start_with(&concurrency_manifest(&ports), free_tcp_port()?, &["--no-decode"], false)
                .with_context(|| format!("starting zerodrop run with {n} sources"))?,
        ),
        ConcurrencyRx::Gstreamer => {
            // NACKs go where the replay sender expects them: its RTP port + 1.
            let mut rtcp_dest = sender.local_addr()?;
            rtcp_dest.set_port(rtcp_dest.port() + 1);
            let cfg = GstReceiverConfig {
                rtp_port: 0,
                rtcp_dest,
                latency_ms: LATENCY_MS,
                payload_type: 96,
                rtx_payload_type: replay::RTX_PAYLOAD_TYPE,
                receive_buffer: RECEIVE_BUFFER as u32,
                rtx_tuned_for_loopback: true,
                nack: true,
                fec_ports: Vec::new(),
                request_keyframe: true,
                wait_for_keyframe: true,
            };
            let prefix = ["taskset".to_string(), "-c".into(), RECEIVER_CORE.to_string()];
            let exe = std::env::current_exe()?;
            TrialRx::Gstreamer(
                GstReceiversProcess::spawn(&prefix, &exe, &cfg, &ports, &work.join(format!("gst-receivers-{n}.log")))
                    .with_context(|| format!("starting {n} GStreamer receivers"))?,
            )
        }
    };
    let pid = receiver.pid();
    let started = Instant::now();
    let thread_settings = settings.clone();
    let handle = std::thread::Builder::new().name("replay".into()).spawn(move || sender.run_paced(&thread_settings))?;
    // Receiver CPU over the stretch at full load: after the staggered starts,
    // before the last frames.
    let full_load = [Duration::from_secs_f64(settings.stagger_s), Duration::from_secs_f64(settings.duration_s)];
    let mut cpu_at: [Option<(Instant, f64)>; 2] = [None, None];
    while !handle.is_finished() {
        let e = started.elapsed();
        for (at, from) in cpu_at.iter_mut().zip(full_load) {
            if at.is_none() && e >= from {
                *at = Some((Instant::now(), process_cpu(pid)?.1));
            }
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let run = handle.join().map_err(|_| anyhow::anyhow!("the replay sender panicked"))??;
    let wall_s = started.elapsed().as_secs_f64();
    let receiver_cpu_util = match cpu_at {
        [Some((ta, ca)), Some((tb, cb))] if tb > ta => (cb - ca) / (tb - ta).as_secs_f64(),
        _ => f64::NAN,
    };
    // Per stream, by the manifest's name: what the receiver handed on.
    let reports: HashMap<String, serde_json::Value> = match receiver {
        TrialRx::Zerodrop(runner) => {
            let outcome = runner.stop()?;
            if !outcome.status.success() {
                bail!("zerodrop run with {n} sources exited with {}: {}", outcome.status, outcome.stderr);
            }
            outcome.report["streams"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| Some((s["stream"].as_str()?.to_string(), s.clone()))).collect())
                .unwrap_or_default()
        }
        TrialRx::Gstreamer(gst) => {
            let summaries = gst.stop()?;
            let index: HashMap<u16, usize> = ports.iter().enumerate().map(|(i, p)| (*p, i)).collect();
            summaries
                .iter()
                .filter_map(|g| {
                    let i = index.get(&g.rtp_port)?;
                    // GStreamer's figures under the names ours' report uses;
                    // what it does not tell stays 0.
                    Some((format!("s{i}"), serde_json::json!({"frames_assembled": g.frames, "packets_unrecovered": g.packets_lost})))
                })
                .collect()
        }
    };
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut t = Trial {
        streams: n,
        passed: true,
        sender_limited: false,
        why: String::new(),
        frames_sent: 0,
        frames_assembled: 0,
        frames_dropped: 0,
        streams_short: 0,
        packets_sent: 0,
        packets_dropped_by_loss: 0,
        packets_lost: 0,
        packets_recovered_nack: 0,
        packets_unrecovered: 0,
        nacks_sent: 0,
        rtx_sent: 0,
        rtx_dropped: 0,
        kernel_udp_drops: 0,
        offered_pps: n as f64 * clip.mean_packets_per_frame() / settings.frame_interval_s,
        receiver_cpu_util,
        sender_max_lag_ms: run.max_lag_ms,
        sender_frames_late: run.frames_late,
        sender_frames_late_20ms: run.frames_late_20ms,
        sender_cpu_util: run.sender_cpu_util,
        sender_gso: run.gso.clone(),
        wall_s,
    };
    let mut missing = 0;
    let mut short = 0;
    for (i, s) in run.streams.iter().enumerate() {
        t.frames_sent += s.frames_sent;
        t.packets_sent += s.packets_sent;
        t.packets_dropped_by_loss += s.packets_dropped;
        t.rtx_sent += s.rtx_sent;
        t.rtx_dropped += s.rtx_dropped;
        let Some(r) = reports.get(&format!("s{i}")) else {
            missing += 1;
            continue;
        };
        let assembled = u(r, "frames_assembled");
        t.frames_assembled += assembled;
        t.frames_dropped += u(r, "frames_dropped");
        // GStreamer does not count what it does not hand on: what it lost.
        if rx == ConcurrencyRx::Gstreamer {
            short += s.frames_sent.saturating_sub(assembled);
        }
        t.packets_lost += u(r, "packets_lost");
        t.packets_recovered_nack += u(r, "packets_recovered_nack");
        t.packets_unrecovered += u(r, "packets_unrecovered");
        t.nacks_sent += u(r, "nacks_sent");
        t.kernel_udp_drops += u(r, "kernel_udp_drops");
        if assembled < s.frames_sent {
            t.streams_short += 1;
        }
    }
    let mut why = Vec::new();
    if missing > 0 {
        why.push(format!("{missing} stream(s) missing from the report"));
    }
    t.frames_dropped += short;
    if t.frames_dropped > 0 {
        why.push(format!("{} frame(s) dropped", t.frames_dropped));
    }
    if t.streams_short > 0 {
        why.push(format!("{} stream(s) handed on fewer frames than sent", t.streams_short));
    }
    if t.packets_unrecovered > 0 {
        why.push(format!("{} packet(s) unrepaired", t.packets_unrecovered));
    }
    t.passed = why.is_empty();
    // Frames started well after they were due: the receiver saw the load of
    // N streams in later, larger bursts.
    if run.frames_late_20ms * 100 > t.frames_sent {
        t.sender_limited = true;
        why.push(format!(
            "sender behind: {} of {} frames over 20 ms late, up to {:.0} ms",
            run.frames_late_20ms, t.frames_sent, run.max_lag_ms
        ));
    }
    t.why = why.join("; ");
    Ok(t)
}

/// The receiver of one trial.
enum TrialRx {
    Zerodrop(RunnerProcess),
    Gstreamer(GstReceiversProcess),
}

impl TrialRx {
    fn pid(&self) -> u32 {
        match self {
            TrialRx::Zerodrop(r) => r.pid(),
            TrialRx::Gstreamer(g) => g.pid(),
        }
    }
}
