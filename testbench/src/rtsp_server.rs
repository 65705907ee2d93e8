//! GStreamer's gst-rtsp-server as the RTSP camera of the tests and the
//! benchmark: `peers/rtsp_server.py` (Debian's gir1.2-gst-rtsp-server-1.0
//! through Python's GObject bindings) run as a child process. It encodes a
//! live test pattern afresh for each client and writes each client's access
//! units, as the encoder made them, to a dump file, read back here as
//! per-frame digests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::Receiver;
use zerodrop_dataplane::depay::au;

/// How a server is started.
#[derive(Debug, Clone)]
pub struct RtspServerArgs {
    pub port: u16,
    pub codec: &'static str,
    pub frames: u64,
    /// `tcp`, `udp` or `tcp,udp`.
    pub protocols: &'static str,
    pub credentials: Option<(String, String)>,
    /// UDP ports the server sends from (`LOW-HIGH`), for a loss rule.
    pub udp_ports: Option<(u16, u16)>,
    pub bitrate_kbps: u32,
}

impl RtspServerArgs {
    pub fn new(port: u16, codec: &'static str, frames: u64) -> Self {
        RtspServerArgs { port, codec, frames, protocols: "tcp,udp", credentials: None, udp_ports: None, bitrate_kbps: 2000 }
    }
}

pub struct RtspServer {
    child: Child,
    lines: Receiver<String>,
    dump: tempfile::TempDir,
    pub port: u16,
    codec: &'static str,
}

/// The script, beside this crate's sources.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/rtsp_server.py")
}

impl RtspServer {
    /// Starts the server and waits until it listens.
    pub fn start(args: &RtspServerArgs) -> anyhow::Result<Self> {
        let dump = tempfile::tempdir()?;
        // Debian's python3: the GObject bindings are a Debian package.
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script())
            .args(["--port", &args.port.to_string(), "--codec", args.codec, "--frames", &args.frames.to_string()])
            .args(["--protocols", args.protocols, "--bitrate", &args.bitrate_kbps.to_string()])
            .arg("--au-dump")
            .arg(dump.path());
        if let Some((user, password)) = &args.credentials {
            cmd.args(["--user", user, "--password", password]);
        }
        if let Some((low, high)) = args.udp_ports {
            cmd.args(["--udp-ports", &format!("{low}-{high}")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start gst-rtsp-server (scripts/install-deps.sh installs python3-gi and gir1.2-gst-rtsp-server-1.0)")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = RtspServer { child, lines, dump, port: args.port, codec: args.codec };
        server.wait_line("READY", Duration::from_secs(20)).context("gst-rtsp-server did not start")?;
        Ok(server)
    }

    /// The server's URL of the camera.
    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    /// Waits for the next line of the server's output starting with
    /// `prefix` (`CLIENT n`, `SESSION n frames`).
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        bail!("gst-rtsp-server exited ({status}) before printing {prefix}");
                    }
                    bail!("gst-rtsp-server printed no {prefix} line within {timeout:?}");
                }
            }
        }
    }

    /// Waits until client session `n`'s media ended; returns its frames.
    pub fn wait_session_end(&mut self, timeout: Duration) -> anyhow::Result<(u64, u64)> {
        let line = self.wait_line("SESSION", timeout)?;
        let mut parts = line.split_whitespace().skip(1).map(|p| p.parse::<u64>());
        match (parts.next(), parts.next()) {
            (Some(Ok(n)), Some(Ok(frames))) => Ok((n, frames)),
            _ => bail!("unexpected server line {line:?}"),
        }
    }

    /// The content digests ([`au::annexb_digest`]) of the access units the
    /// server's encoder made for client session `n`, in order.
    pub fn session_digests(&self, n: u64) -> anyhow::Result<Vec<u64>> {
        Ok(self.session_digest_pairs(n)?.into_iter().map(|(d, _)| d).collect())
    }

    /// Per access unit: its digest, and its digest without the access unit
    /// delimiter (H.264 NAL type 9, H.265 type 35). A delimiter carries no
    /// picture data and travels in a packet of its own: when that packet is
    /// lost, the unit that follows is whole but for it.
    pub fn session_digest_pairs(&self, n: u64) -> anyhow::Result<Vec<(u64, u64)>> {
        let not_aud = |nal: &&[u8]| match (self.codec, nal.first()) {
            ("h265", Some(h)) => (h >> 1) & 0x3f != 35,
            (_, Some(h)) => h & 0x1f != 9,
            (_, None) => true,
        };
        Ok(self
            .session_units(n)?
            .iter()
            .map(|u| (au::annexb_digest(u), au::au_digest(au::annexb_nal_units(u).filter(not_aud))))
            .collect())
    }

    /// The access units the server's encoder made for client session `n`.
    fn session_units(&self, n: u64) -> anyhow::Result<Vec<Vec<u8>>> {
        let path = self.dump.path().join(format!("session-{n}.aus"));
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut rest = &data[..];
        while rest.len() >= 12 {
            let pts = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
            let Some(unit) = rest.get(12..12 + len) else { bail!("{} ends inside an access unit", path.display()) };
            // A PTS pushed again (the server's preroll flush): the last push
            // is what went out.
            match out.last_mut() {
                Some(last) if last.0 == pts => last.1 = unit.to_vec(),
                _ => out.push((pts, unit.to_vec())),
            }
            rest = &rest[12 + len..];
        }
        Ok(out.into_iter().map(|(_, u)| u).collect())
    }

    /// Kills the server (as a crash would: no TEARDOWN, no BYE).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.kill();
    }
}
