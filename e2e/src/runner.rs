//! A real `zerodrop run` process: started on a manifest, waited on until
//! `/readyz` says every source receives, stopped with a signal, and read back
//! (exit status, JSON report, access-unit logs, metrics).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `zerodrop` binary built with the workspace.
pub fn zerodrop_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ZERODROP_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> → target/<profile>/zerodrop
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("zerodrop")
}

pub struct RunnerProcess {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub metrics_addr: SocketAddr,
}

pub struct RunnerOutcome {
    pub status: ExitStatus,
    pub report: serde_json::Value,
    pub stderr: String,
    pub dir: tempfile::TempDir,
}

impl RunnerOutcome {
    /// The report entry for one stream.
    pub fn stream(&self, name: &str) -> &serde_json::Value {
        self.report["streams"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["stream"] == name))
            .unwrap_or(&serde_json::Value::Null)
    }

    pub fn au_log(&self, pipeline: &str, stream: &str) -> PathBuf {
        self.dir.path().join("au").join(format!("{pipeline}.{stream}.au"))
    }

    /// Packets FEC rebuilt (`seq digest` lines), when the source has FEC.
    pub fn recovered_log(&self, pipeline: &str, stream: &str) -> PathBuf {
        self.dir.path().join("au").join(format!("{pipeline}.{stream}.recovered"))
    }
}

impl RunnerProcess {
    /// Starts `zerodrop run` on `manifest`, logging every access unit, and
    /// waits until it is ready.
    pub fn start(manifest: &str, metrics_port: u16, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(manifest, metrics_port, extra_args, true)
    }

    /// The same; `au_log` false spares the receiver the per-frame digests
    /// (throughput measurements).
    pub fn start_with(manifest: &str, metrics_port: u16, extra_args: &[&str], au_log: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, manifest)?;
        let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse()?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = Command::new(zerodrop_bin())
            .arg("run")
            .arg(&file)
            .args(["--metrics-addr", &metrics_addr.to_string(), "--table", "never"])
            .arg("--report")
            .arg(dir.path().join("report.json"))
            .args(au_log.then(|| ["--au-log-dir".into(), dir.path().join("au").into_os_string()]).into_iter().flatten())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", zerodrop_bin().display()))?;
        let mut runner = RunnerProcess { child: Some(child), dir, metrics_addr };
        runner.wait_ready(Duration::from_secs(30))?;
        Ok(runner)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.as_mut().expect("child").try_wait() {
                bail!("zerodrop run exited before it was ready ({status}): {}", self.stderr());
            }
            if zerodrop_telemetry::get(self.metrics_addr, "/readyz").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("zerodrop run not ready after {timeout:?}: {}", self.stderr());
            }
            // Poll interval while waiting for readiness, not a synchronisation guess.
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(zerodrop_telemetry::get(self.metrics_addr, "/metrics")?.body)
    }

    /// Frames of stream `stream` accounted for so far: decoded + dropped +
    /// skipped before the first keyframe (0 while /metrics cannot be read).
    pub fn frames_accounted(&self, stream: &str) -> u64 {
        let m = self.metrics().unwrap_or_default();
        frames_accounted(&m, stream)
    }

    /// Polls /metrics until `done` holds; panics naming `what` after `timeout`.
    pub fn wait_metrics(&self, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics().unwrap_or_default();
            if done(&m) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {timeout:?}\n{}", self.stderr());
            // Poll interval of a metrics check, not a synchronisation guess.
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }

    /// Polls /metrics until `done` holds or `timeout` passes; whether it held.
    pub fn poll_metrics(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.metrics().unwrap_or_default()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(mut self, signal: libc::c_int, timeout: Duration) -> anyhow::Result<RunnerOutcome> {
        let mut child = self.child.take().expect("child");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("zerodrop run did not exit within {timeout:?} of signal {signal}: {}", self.stderr());
            }
            std::thread::park_timeout(Duration::from_millis(20));
        };
        let report_path = self.dir.path().join("report.json");
        let report = match std::fs::read(&report_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("report.json is not JSON")?,
            Err(_) => serde_json::Value::Null,
        };
        let stderr = self.stderr();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        Ok(RunnerOutcome { status, report, stderr, dir })
    }

    pub fn stop(self) -> anyhow::Result<RunnerOutcome> {
        self.stop_with(libc::SIGINT, Duration::from_secs(20))
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}


/// Frames of `stream` a /metrics text accounts for: decoded + dropped +
/// skipped before the first keyframe + skipped for a reason (an inactive
/// rendition's frames).
pub fn frames_accounted(metrics: &str, stream: &str) -> u64 {
    let needle = format!("stream=\"{stream}\"");
    let f = |name| metric_sum(metrics, name, &needle) as u64;
    f("zerodrop_frames_decoded_total")
        + f("zerodrop_frames_dropped_total")
        + f("zerodrop_frames_skipped_before_keyframe_total")
        + f("zerodrop_frames_skipped_total")
}

/// Value of a metric sample line `name{labels} value` whose name and labels
/// contain all of `needles`.
/// Sum of the samples of metric `name` whose labels contain `needle` (every
/// series with `""`).
pub fn metric_sum(text: &str, name: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        // The empty sum of floats is -0.
        .fold(0.0, |a, b| a + b)
}

pub fn metric_value(metrics: &str, name: &str, needles: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
