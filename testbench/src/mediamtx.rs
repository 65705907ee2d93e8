//! MediaMTX (github.com/bluenviron/mediamtx) as an RTSP server of the tests:
//! a relay nobody here wrote, which publishers (ffmpeg) push into with
//! ANNOUNCE/RECORD and readers (zerodrop) pull from. Built from its Go module
//! by `scripts/mediamtx.sh build` into a cache outside the repository; run
//! here as a child process on free loopback ports with a minimal
//! configuration: RTSP only (UDP and TCP), everything else off. Killed when
//! dropped.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The binary: `$ZERODROP_MEDIAMTX_BIN`, else what `scripts/mediamtx.sh path`
/// prints (the version-keyed cache). Fails, naming the command that builds
/// it, when there is nothing there.
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("ZERODROP_MEDIAMTX_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let script = script();
            let out = Command::new("bash")
                .arg(&script)
                .arg("path")
                .output()
                .with_context(|| format!("running {} path", script.display()))?;
            if !out.status.success() {
                bail!("{} path failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
            }
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    if !path.is_file() {
        bail!(
            "MediaMTX is not built: {} does not exist. Run `bash scripts/mediamtx.sh build` first \
             (it builds MediaMTX from its Go module into a cache outside the repository; \
             about 1.5 minutes the first time, instant afterwards), or set ZERODROP_MEDIAMTX_BIN.",
            path.display()
        );
    }
    Ok(path)
}

/// `scripts/mediamtx.sh` of this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mediamtx.sh")
}

/// A running MediaMTX.
pub struct MediaMtx {
    child: Child,
    dir: tempfile::TempDir,
    /// RTSP (TCP) port.
    pub rtsp_port: u16,
    /// UDP port it sends and receives RTP on (RTCP: the next one).
    pub rtp_port: u16,
}

impl MediaMtx {
    /// Starts the binary [`binary`] finds and waits until it listens.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&binary()?)
    }

    /// Starts `bin` and waits until it listens. Free ports are picked here
    /// and released before MediaMTX binds them: if another process takes one
    /// in between, MediaMTX exits and it is started again on others.
    pub fn start_with(bin: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(bin) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn try_start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let rtsp_port = free_tcp_port()?;
        let rtp_port = free_udp_pair()?;
        let config = dir.path().join("mediamtx.yml");
        std::fs::write(&config, config_text(rtsp_port, rtp_port))?;
        let log = std::fs::File::create(dir.path().join("mediamtx.log"))?;
        let child = Command::new(bin)
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = MediaMtx { child, dir, rtsp_port, rtp_port };
        server.wait_listening(Duration::from_secs(15))?;
        Ok(server)
    }

    /// Polls the RTSP port until it accepts a connection.
    fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.rtsp_port));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("MediaMTX exited ({status}) before it listened:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("MediaMTX did not listen on {addr} within {timeout:?}:\n{}", self.log());
            }
            // Poll interval while waiting for the listener, not a synchronisation guess.
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// `rtsp://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("rtsp://127.0.0.1:{}/{path}", self.rtsp_port)
    }

    /// What MediaMTX logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mediamtx.log")).unwrap_or_default()
    }

    /// Kills it (no TEARDOWN to anyone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MediaMtx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The configuration: RTSP on `rtsp_port` with UDP (RTP on `rtp_port`, RTCP
/// on the next, as MediaMTX requires: an even port and its successor) and
/// TCP; every other server off; any path may be published and read by
/// anyone (MediaMTX's default users).
fn config_text(rtsp_port: u16, rtp_port: u16) -> String {
    format!(
        "logLevel: info\n\
         logDestinations: [stdout]\n\
         api: false\n\
         metrics: false\n\
         pprof: false\n\
         playback: false\n\
         rtsp: true\n\
         rtspTransports: [udp, tcp]\n\
         rtspEncryption: \"no\"\n\
         rtspAddress: 127.0.0.1:{rtsp_port}\n\
         rtpAddress: 127.0.0.1:{rtp_port}\n\
         rtcpAddress: 127.0.0.1:{}\n\
         rtmp: false\n\
         hls: false\n\
         webrtc: false\n\
         srt: false\n\
         moq: false\n\
         paths:\n  all_others:\n",
        rtp_port + 1
    )
}

/// A loopback TCP port that was free a moment ago.
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An even loopback UDP port whose successor was free too a moment ago.
fn free_udp_pair() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let a = UdpSocket::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if UdpSocket::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of UDP ports (even, odd) on 127.0.0.1 in 100 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_pair_is_even_and_free() {
        let p = free_udp_pair().unwrap();
        assert_eq!(p % 2, 0);
        UdpSocket::bind(("127.0.0.1", p)).unwrap();
        UdpSocket::bind(("127.0.0.1", p + 1)).unwrap();
    }

    #[test]
    fn config_names_the_ports() {
        let c = config_text(8554, 8000);
        assert!(c.contains("rtspAddress: 127.0.0.1:8554\n") && c.contains("rtpAddress: 127.0.0.1:8000\n"));
        assert!(c.contains("rtcpAddress: 127.0.0.1:8001\n") && c.contains("hls: false\n"));
    }
}
