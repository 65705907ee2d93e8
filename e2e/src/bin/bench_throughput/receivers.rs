//! The receivers under test (ours, the bare `recvmmsg` loop, GStreamer's
//! jitterbuffer) as child processes, and the children's own entry points.

#[allow(unused_imports)]
use super::*;
use zerodrop_e2e::runner::metric_sum;

/// Counts a receiver reports about itself, cumulative.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RxSample {
    pub(crate) t_ns: u64,
    pub(crate) read: f64,
    pub(crate) delivered: f64,
    pub(crate) frames: f64,
}

/// What the parent reads about a receiver from /proc, cumulative.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SysSample {
    pub(crate) t_ns: u64,
    pub(crate) cpu_stat_s: f64,
    pub(crate) cpu_sched_s: f64,
    pub(crate) socket_drops: f64,
    /// Ours: its own `zerodrop_kernel_udp_drops_total`.
    pub(crate) reported_kernel_drops: Option<f64>,
}

pub(crate) fn sample_sys(pid: u32, port: u16, rx: &mut RxProcess) -> SysSample {
    rx.poll();
    let t_ns = monotonic_ns();
    let (cpu_stat_s, cpu_sched_s) = process_cpu(pid).unwrap_or((f64::NAN, f64::NAN));
    let socket_drops = udp_socket_drops(port).unwrap_or(0) as f64;
    SysSample { t_ns, cpu_stat_s, cpu_sched_s, socket_drops, reported_kernel_drops: rx.reported_kernel_drops }
}

pub(crate) struct ChildRx {
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) samples: Arc<Mutex<Vec<RxSample>>>,
    pub(crate) last_line: Arc<Mutex<String>>,
    pub(crate) reader: Option<JoinHandle<()>>,
    pub(crate) log: PathBuf,
}

pub(crate) enum RxInner {
    Zerodrop(RunnerProcess),
    Child(ChildRx),
}

pub(crate) struct RxProcess {
    pub(crate) kind: RxKind,
    pub(crate) inner: RxInner,
    /// Ours: scraped samples (children's arrive on their own).
    pub(crate) scraped: Vec<RxSample>,
    pub(crate) reported_kernel_drops: Option<f64>,
}

impl RxProcess {
    pub(crate) fn start(kind: RxKind, port: u16, work: &Path) -> anyhow::Result<Self> {
        let inner = match kind {
            RxKind::Zerodrop => {
                let manifest = zerodrop_e2e::single_source_manifest("bench", "h264", port, LATENCY_MS, MAX_NACK_RETRIES);
                RxInner::Zerodrop(RunnerProcess::start_with(&manifest, free_tcp_port()?, &["--no-decode"], false)?)
            }
            RxKind::BareLoop | RxKind::Gstreamer => {
                let sub = if kind == RxKind::BareLoop { BARE_CHILD } else { GST_CHILD };
                let log = work.join(format!("{}-{port}.log", kind.name()));
                RxInner::Child(ChildRx::spawn(sub, port, &log)?)
            }
        };
        Ok(Self { kind, inner, scraped: Vec::new(), reported_kernel_drops: None })
    }

    pub(crate) fn pid(&self) -> u32 {
        match &self.inner {
            RxInner::Zerodrop(r) => r.pid(),
            RxInner::Child(c) => c.child.id(),
        }
    }

    /// Ours: one scrape of /metrics into the samples.
    pub(crate) fn poll(&mut self) {
        if let RxInner::Zerodrop(r) = &self.inner {
            let t_before = monotonic_ns();
            if let Ok(text) = r.metrics() {
                let t_ns = (t_before + monotonic_ns()) / 2;
                let sum = |name: &str| metric_sum(&text, name, "stream=\"cam\"");
                let delivered = sum("zerodrop_rtp_packets_received_total");
                let read = delivered
                    + sum("zerodrop_rtp_packets_duplicate_total")
                    + sum("zerodrop_rtp_packets_late_total")
                    + sum("zerodrop_rtp_packets_discarded_total");
                let frames = sum("zerodrop_frames_assembled_total");
                self.scraped.push(RxSample { t_ns, read, delivered, frames });
                self.reported_kernel_drops = Some(sum("zerodrop_kernel_udp_drops_total"));
            }
        }
    }

    pub(crate) fn latest(&self) -> Option<RxSample> {
        match &self.inner {
            RxInner::Zerodrop(_) => self.scraped.last().copied(),
            RxInner::Child(c) => c.samples.lock().unwrap_or_else(|e| e.into_inner()).last().copied(),
        }
    }

    /// Stops the receiver; returns its samples and its own final report.
    pub(crate) fn stop(self) -> anyhow::Result<(Vec<RxSample>, serde_json::Value)> {
        match self.inner {
            RxInner::Zerodrop(r) => {
                let outcome = r.stop()?;
                if !outcome.status.success() {
                    bail!("zerodrop run exited with {}: {}", outcome.status, outcome.stderr);
                }
                Ok((self.scraped, outcome.stream("cam").clone()))
            }
            RxInner::Child(c) => c.stop(self.kind),
        }
    }
}

impl ChildRx {
    /// `taskset -c 1 <this binary> <sub> --port=P`, ready once it says so.
    pub(crate) fn spawn(sub: &str, port: u16, log: &Path) -> anyhow::Result<Self> {
        let args = [format!("--port={port}"), format!("--buffer={RECEIVE_BUFFER}"), format!("--latency-ms={LATENCY_MS}")];
        Self::spawn_on(sub, &RECEIVER_CORE.to_string(), &args, log)
    }

    /// `taskset -c <cores> <this binary> <sub> <args>`, ready once it says so.
    pub(crate) fn spawn_on(sub: &str, cores: &str, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new("taskset")
            .args(["-c", cores])
            .arg(&exe)
            .arg(sub)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting taskset -c {cores} {} {sub}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        let samples: Arc<Mutex<Vec<RxSample>>> = Arc::default();
        let last_line: Arc<Mutex<String>> = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
        let reader = {
            let samples = samples.clone();
            let last_line = last_line.clone();
            std::thread::Builder::new().name("child-reader".into()).spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let f: Vec<u64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
                    if f.len() == 4 && !line.starts_with("end") {
                        let s = RxSample { t_ns: f[0], read: f[1] as f64, delivered: f[2] as f64, frames: f[3] as f64 };
                        samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                    } else {
                        let _ = ready_tx.send(line.clone());
                        *last_line.lock().unwrap_or_else(|e| e.into_inner()) = line;
                    }
                }
            })?
        };
        let mut rx = Self { child, stdin, samples, last_line, reader: Some(reader), log: log.to_path_buf() };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("ready") => Ok(rx),
            other => {
                let _ = rx.child.kill();
                let _ = rx.child.wait();
                bail!("{sub} did not start (said {other:?}): {}", std::fs::read_to_string(log).unwrap_or_default())
            }
        }
    }

    pub(crate) fn stop(mut self, kind: RxKind) -> anyhow::Result<(Vec<RxSample>, serde_json::Value)> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{} did not exit after its stdin closed", kind.name());
            }
            std::thread::park_timeout(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if !status.success() {
            bail!("{} exited with {status}: {}", kind.name(), std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        let last = self.last_line.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let report = last.strip_prefix("end ").and_then(|j| serde_json::from_str(j).ok()).unwrap_or(serde_json::Value::Null);
        Ok((samples, report))
    }
}

impl Drop for ChildRx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parsed `--name=value` arguments of a child.
pub(crate) fn child_args(args: &[String]) -> anyhow::Result<HashMap<String, String>> {
    args.iter()
        .map(|a| {
            let (k, v) = a.strip_prefix("--").and_then(|kv| kv.split_once('=')).with_context(|| format!("expected --name=value, got {a:?}"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

pub(crate) fn child_arg<T: std::str::FromStr>(args: &HashMap<String, String>, name: &str) -> anyhow::Result<T> {
    args.get(name)
        .with_context(|| format!("missing --{name}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("--{name}: not a valid value"))
}

/// Sets the flag once stdin closes: the parent's stop request.
pub(crate) fn stop_on_stdin_close() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        flag.store(true, Ordering::Relaxed);
    });
    stop
}

/// The bare loop: `recvmmsg` (our `RecvBatch`) into counting, nothing else;
/// with several sockets (`--ports=a,b,…`), one call on each in turn.
/// Prints `t_ns read read 0` every 20 ms.
pub(crate) fn bare_child_main(raw: &[String]) -> anyhow::Result<()> {
    let args = child_args(raw)?;
    let ports: Vec<u16> = match args.get("ports") {
        Some(list) => list.split(',').map(|p| p.parse().with_context(|| format!("--ports: {p:?} is not a port"))).collect::<anyhow::Result<_>>()?,
        None => vec![child_arg(&args, "port")?],
    };
    let buffer: usize = child_arg(&args, "buffer")?;
    let mut sockets = Vec::with_capacity(ports.len());
    let mut granted = usize::MAX;
    for port in &ports {
        let (socket, g) = udp::bind(format!("127.0.0.1:{port}").parse()?, buffer)?;
        granted = granted.min(g);
        sockets.push(socket);
    }
    let stop = stop_on_stdin_close();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {granted}")?;
    out.flush()?;
    let mut batch = RecvBatch::new(BARE_BATCH);
    let mut count: u64 = 0;
    let mut calls: u64 = 0;
    let mut next_report = monotonic_ns();
    let waiting: Vec<&std::net::UdpSocket> = sockets.iter().collect();
    while !stop.load(Ordering::Relaxed) {
        let mut turn = 0;
        for socket in &sockets {
            let n = batch.recv(socket)?;
            calls += 1;
            turn += n;
        }
        count += turn as u64;
        if turn == 0 {
            udp::wait_readable(&waiting, Duration::from_millis(20))?;
        }
        let now = monotonic_ns();
        if now >= next_report {
            writeln!(out, "{now} {count} {count} 0")?;
            out.flush()?;
            next_report = now + CHILD_REPORT_NS;
        }
    }
    writeln!(out, "{} {count} {count} 0", monotonic_ns())?;
    writeln!(out, "end {}", serde_json::json!({ "packets": count, "recvmmsg_calls": calls, "receive_buffer_bytes": granted }))?;
    out.flush()?;
    Ok(())
}

/// GStreamer's jitterbuffer: `udpsrc ! rtpjitterbuffer ! fakesink`, counting
/// buffers leaving udpsrc and reaching fakesink (and, there, frame ends).
/// Prints `t_ns read delivered frames` every 20 ms.
pub(crate) fn gst_child_main(raw: &[String]) -> anyhow::Result<()> {
    let args = child_args(raw)?;
    let port: u16 = child_arg(&args, "port")?;
    let buffer: i32 = child_arg(&args, "buffer")?;
    let latency: u32 = child_arg(&args, "latency-ms")?;
    gst::init()?;
    let desc = format!(
        "udpsrc name=src address=127.0.0.1 port={port} buffer-size={buffer} \
         ! rtpjitterbuffer name=jb latency={latency} ! fakesink name=sink sync=false async=false"
    );
    let pipeline = gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let src = pipeline.by_name("src").context("udpsrc")?;
    src.set_property(
        "caps",
        gst::Caps::builder("application/x-rtp")
            .field("media", "video")
            .field("clock-rate", 90_000i32)
            .field("encoding-name", "H264")
            .field("payload", 96i32)
            .build(),
    );
    let read = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(AtomicU64::new(0));
    {
        let read = read.clone();
        src.static_pad("src").context("udpsrc src pad")?.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, move |_, info| {
            let n = match &info.data {
                Some(gst::PadProbeData::BufferList(l)) => l.len() as u64,
                _ => 1,
            };
            read.fetch_add(n, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    }
    {
        let (delivered, frames) = (delivered.clone(), frames.clone());
        let sink = pipeline.by_name("sink").context("fakesink")?;
        sink.static_pad("sink").context("fakesink sink pad")?.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, move |_, info| {
            let mut count = |b: &gst::BufferRef| {
                delivered.fetch_add(1, Ordering::Relaxed);
                let marker = b.map_readable().is_ok_and(|m| m.as_slice().get(1).is_some_and(|x| x & 0x80 != 0));
                if marker {
                    frames.fetch_add(1, Ordering::Relaxed);
                }
            };
            match &info.data {
                Some(gst::PadProbeData::Buffer(b)) => count(b),
                Some(gst::PadProbeData::BufferList(l)) => l.iter().for_each(&mut count),
                _ => {}
            }
            gst::PadProbeReturn::Ok
        });
    }
    pipeline.set_state(gst::State::Playing)?;
    let (result, _, _) = pipeline.state(gst::ClockTime::from_seconds(10));
    result.context("the GStreamer receiver did not reach PLAYING")?;
    let stop = stop_on_stdin_close();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let bus = pipeline.bus().context("bus")?;
    let line = |out: &mut std::io::StdoutLock| {
        writeln!(
            out,
            "{} {} {} {}",
            monotonic_ns(),
            read.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed),
            frames.load(Ordering::Relaxed)
        )
        .and_then(|_| out.flush())
    };
    while !stop.load(Ordering::Relaxed) {
        if let Some(msg) = bus.timed_pop_filtered(gst::ClockTime::from_nseconds(CHILD_REPORT_NS), &[gst::MessageType::Error])
            && let gst::MessageView::Error(e) = msg.view()
        {
            bail!("GStreamer receiver: {} ({:?})", e.error(), e.debug());
        }
        line(&mut out)?;
    }
    line(&mut out)?;
    let jb = pipeline.by_name("jb").context("rtpjitterbuffer")?;
    let stats = jb.property::<gst::Structure>("stats");
    let mut report = serde_json::Map::new();
    for (k, v) in stats.iter() {
        let value = v
            .get::<u64>()
            .map(serde_json::Value::from)
            .or_else(|_| v.get::<u32>().map(serde_json::Value::from))
            .or_else(|_| v.get::<i64>().map(serde_json::Value::from))
            .unwrap_or_else(|_| serde_json::Value::from(format!("{v:?}")));
        report.insert(k.to_string(), value);
    }
    report.insert("udpsrc_buffers".into(), read.load(Ordering::Relaxed).into());
    report.insert("fakesink_buffers".into(), delivered.load(Ordering::Relaxed).into());
    pipeline.set_state(gst::State::Null)?;
    writeln!(out, "end {}", serde_json::Value::Object(report))?;
    out.flush()?;
    Ok(())
}

/// A script that runs `zerodrop` pinned to the receiver core; `exec` keeps
/// the pid, so RunnerProcess signals and reads the receiver itself.
pub(crate) fn pinned_wrapper(zerodrop: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let status = Command::new("taskset").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !status.is_ok_and(|s| s.success()) {
        bail!("taskset (util-linux) is needed to pin the receivers to core {RECEIVER_CORE}");
    }
    let path = dir.join("zerodrop-pinned");
    std::fs::write(&path, format!("#!/bin/sh\nexec taskset -c {RECEIVER_CORE} '{}' \"$@\"\n", zerodrop.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
