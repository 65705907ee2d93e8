//! RTSP pull with retina: one task per source on a small tokio runtime
//! shared by every pulled source of the process. The task dials the server
//! (DESCRIBE, SETUP of one video stream over TCP or UDP, PLAY), writes every
//! RTP and RTCP packet the server sends into its end of a local datagram
//! socket pair, and dials again after a failure or an end with capped
//! exponential backoff and jitter. The worker reads the other end as it reads
//! a UDP socket (see the module documentation of `ingest`), with the marks of
//! [`pulled`](super::pulled) in order with the packets: a session's start
//! (its payload type and the parameter sets its SDP announced, for cameras
//! that never repeat them in band) and its end.
//!
//! Credentials are read at each dial from where the source's settings say
//! (a mounted Secret's directory, or environment variables), so a rotated
//! Secret is used at the next dial; they never appear in errors or logs.

use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures::StreamExt;
use zerodrop_crds::{Codec, RtspLowerTransport};

use super::IngestCounters;
use super::pulled::{Backoff, MARK_END, SecretSource, SessionDescription, encode_description};

/// How long DESCRIBE, SETUP and PLAY may take together.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that played this long was healthy: the next failure starts the
/// backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// A pulled RTSP source, as its spec says (credentials: only where they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtspSettings {
    pub url: String,
    pub transport: RtspLowerTransport,
    /// Index among the server's video streams; None: the first in the codec.
    pub video_stream: Option<u8>,
    /// Silence after which the session is given up.
    pub timeout: Duration,
    /// Where the user name and password are read from, and under which keys.
    pub credentials: Option<SecretSource>,
    pub username_key: String,
    pub password_key: String,
}

impl RtspSettings {
    /// The credentials, read now.
    fn load_credentials(&self) -> anyhow::Result<Option<retina::client::Credentials>> {
        let Some(source) = &self.credentials else { return Ok(None) };
        let username = source.read(&self.username_key)?;
        let password = source.read(&self.password_key)?;
        anyhow::ensure!(!username.is_empty(), "the user name is empty ({})", source.describe(&[&self.username_key]));
        Ok(Some(retina::client::Credentials { username, password }))
    }

    /// Where the credentials come from, for messages.
    pub fn describe_credentials(&self) -> String {
        self.credentials.as_ref().map_or_else(|| "none".into(), |c| c.describe(&[&self.username_key, &self.password_key]))
    }
}

/// The runtime every pulled source's task runs on: one thread is plenty for
/// hundreds of sessions (it only moves packets from a socket to a socket).
fn runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("rtsp-client")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("cannot start the RTSP client runtime: {e}"))
}

/// A running pull; dropping it stops the task (the session is torn down).
pub struct RtspPull {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for RtspPull {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl RtspPull {
    /// Starts pulling into `socket` (the task's end of the pair).
    pub fn start(id: String, settings: RtspSettings, codec: Codec, counters: IngestCounters, socket: UnixDatagram) -> anyhow::Result<Self> {
        let rt = runtime()?;
        socket.set_nonblocking(true).context("local socket")?;
        let socket = {
            let _guard = rt.enter();
            tokio::net::UnixDatagram::from_std(socket).context("local socket")?
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        rt.spawn(run(id, settings, codec, counters, socket, stop_rx));
        Ok(RtspPull { stop: Some(stop_tx) })
    }
}

/// Why a session failed or ended, as a metric label.
pub fn classify(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("credentials") {
        "credentials"
    } else if e.contains("401") || e.contains("unauthorized") {
        "unauthorized"
    } else if e.contains(" 404") || e.contains("not found") {
        "not_found"
    } else if e.contains("refused") {
        "refused"
    } else if e.contains("no packet for") || e.contains("timed out") || e.contains("timeout") {
        "timeout"
    } else if e.contains("no video stream") || e.contains("video stream") && e.contains("codec") {
        "no_stream"
    } else if e.contains("ended the session") || e.contains("eof") {
        "ended"
    } else if e.contains("connection") || e.contains("network") || e.contains("unreachable") || e.contains("reset") {
        "network"
    } else {
        "protocol"
    }
}

async fn run(
    id: String,
    settings: RtspSettings,
    codec: Codec,
    counters: IngestCounters,
    socket: tokio::net::UnixDatagram,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut backoff = Backoff::default();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let group = std::sync::Arc::new(retina::client::SessionGroup::default());
    let url = settings.url.clone();
    let mut down_since = Instant::now();
    loop {
        let started = Instant::now();
        let mut played = false;
        let outcome = tokio::select! {
            r = session(&settings, codec, &counters, &socket, group.clone(), &mut played, down_since) => r,
            _ = &mut stop => {
                counters.connected.set(0);
                return;
            }
        };
        counters.connected.set(0);
        if played {
            down_since = Instant::now();
            // The stream must not wait for a sender that is gone.
            let _ = socket.send(MARK_END).await;
        }
        let error = match outcome {
            Ok(()) => "the server ended the session".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let reason = classify(&error);
        counters.error(reason);
        if played && started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let wait = backoff.next(&mut rng);
        tracing::warn!(
            stream = %id, %url, reason, error = %error, retry_in_ms = wait.as_millis() as u64,
            "RTSP session failed; dialling again after the backoff"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return,
        }
        counters.reconnects.inc();
    }
}

/// One session: dial, play, forward until it fails or ends.
async fn session(
    settings: &RtspSettings,
    codec: Codec,
    counters: &IngestCounters,
    socket: &tokio::net::UnixDatagram,
    group: std::sync::Arc<retina::client::SessionGroup>,
    played: &mut bool,
    down_since: Instant,
) -> anyhow::Result<()> {
    use retina::client::{PacketItem, PlayOptions, Session, SessionOptions, SetupOptions, Transport};
    let creds = settings.load_credentials().context("credentials")?;
    let url = url::Url::parse(&settings.url).with_context(|| format!("url {:?} is not a URL", settings.url))?;
    let options = SessionOptions::default()
        .creds(creds)
        .user_agent(format!("zerodrop/{}", env!("CARGO_PKG_VERSION")))
        .session_group(group);
    let dial = async {
        let mut described = Session::describe(url, options).await?;
        let index = pick_stream(described.streams(), settings.video_stream, codec)?;
        let payload_type = described.streams()[index].rtp_payload_type();
        let parameter_sets = sdp_parameter_sets(described.sdp(), index, codec);
        let transport = match settings.transport {
            RtspLowerTransport::Tcp => Transport::Tcp(Default::default()),
            RtspLowerTransport::Udp => Transport::Udp(Default::default()),
        };
        described.setup(index, SetupOptions::default().transport(transport)).await?;
        let playing = described.play(PlayOptions::default()).await?;
        anyhow::Ok((playing, SessionDescription { payload_type, parameter_sets }))
    };
    let (playing, description) = tokio::time::timeout(DIAL_TIMEOUT, dial)
        .await
        .map_err(|_| anyhow::anyhow!("timed out: the server did not answer DESCRIBE, SETUP and PLAY within {DIAL_TIMEOUT:?}"))??;
    socket.send(&encode_description(&description)).await.context("local socket")?;
    *played = true;
    counters.connected.set(1);
    counters.disconnected.inc_by(down_since.elapsed().as_secs_f64());
    let mut playing = std::pin::pin!(playing);
    loop {
        let item = match tokio::time::timeout(settings.timeout, playing.next()).await {
            Err(_) => anyhow::bail!("no packet for {} s", settings.timeout.as_secs()),
            Ok(None) => return Ok(()),
            Ok(Some(item)) => item?,
        };
        match item {
            PacketItem::Rtp(p) => {
                if p.mark() {
                    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    counters.last_frame.set(unix.as_secs_f64());
                }
                socket.send(p.raw()).await.context("local socket")?;
            }
            PacketItem::Rtcp(c) => {
                socket.send(c.raw()).await.context("local socket")?;
            }
            _ => {}
        }
    }
}

/// The stream to set up: the `wanted`-th video stream, or the first video
/// stream in `codec`.
fn pick_stream(streams: &[retina::client::Stream], wanted: Option<u8>, codec: Codec) -> anyhow::Result<usize> {
    let name = codec_name(codec);
    let videos: Vec<(usize, &retina::client::Stream)> = streams.iter().enumerate().filter(|(_, s)| s.media() == "video").collect();
    let offered = || {
        videos.iter().map(|(_, s)| s.encoding_name().to_ascii_uppercase()).collect::<Vec<_>>().join(", ")
    };
    match wanted {
        Some(n) => {
            let (i, s) = videos.get(n as usize).ok_or_else(|| {
                anyhow::anyhow!("no video stream {n}: the server offers {} video stream(s) [{}]", videos.len(), offered())
            })?;
            anyhow::ensure!(
                s.encoding_name().eq_ignore_ascii_case(name),
                "video stream {n} is {} but the source's codec is {name}",
                s.encoding_name().to_ascii_uppercase()
            );
            Ok(*i)
        }
        None => videos.iter().find(|(_, s)| s.encoding_name().eq_ignore_ascii_case(name)).map(|(i, _)| *i).ok_or_else(|| {
            anyhow::anyhow!("no video stream in {name}: the server offers [{}]", offered())
        }),
    }
}

fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::H264 => "h264",
        Codec::H265 => "h265",
    }
}

/// The parameter sets the SDP's `index`-th media section announces, as NAL
/// units; empty when it announces none (or ones that do not parse: then they
/// must come in band, and a stream without them is reported as it is for
/// pushed RTP).
pub fn sdp_parameter_sets(sdp: &[u8], index: usize, codec: Codec) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(sdp);
    let Some(section) = text.split("\nm=").nth(index + 1) else { return Vec::new() };
    let Some(fmtp) = section.lines().find_map(|l| l.trim().strip_prefix("a=fmtp:")) else { return Vec::new() };
    let params = fmtp.split_once(' ').map_or("", |(_, p)| p);
    let value = |key: &str| {
        params.split(';').map(str::trim).find_map(|p| p.strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::to_string)
    };
    let joined = match codec {
        Codec::H264 => value("sprop-parameter-sets"),
        Codec::H265 => match (value("sprop-vps"), value("sprop-sps"), value("sprop-pps")) {
            (Some(v), Some(s), Some(p)) => Some(format!("{v},{s},{p}")),
            _ => None,
        },
    };
    joined.and_then(|j| crate::depay::sprop::parse_parameter_sets(&j, codec).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_parameter_sets_are_read_per_media_section() {
        let sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=x\r\nt=0 0\r\n\
m=audio 0 RTP/AVP 0\r\na=control:stream=0\r\n\
m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n\
a=fmtp:96 packetization-mode=1;sprop-parameter-sets=Z0LADdoFB+wEQAAAAwBAAAAPI8UKqA==,aM4PyA==;profile-level-id=42c00d\r\n";
        let sets = sdp_parameter_sets(sdp, 1, Codec::H264);
        assert_eq!(sets.len(), 2);
        assert_eq!((sets[0][0] & 0x1f, sets[1][0] & 0x1f), (7, 8));
        assert!(sdp_parameter_sets(sdp, 0, Codec::H264).is_empty());
        assert!(sdp_parameter_sets(sdp, 5, Codec::H264).is_empty());
    }

    #[test]
    fn failures_are_classified_for_the_metric() {
        assert_eq!(classify("credentials: cannot read the credentials file /x/username"), "credentials");
        assert_eq!(classify("[127.0.0.1:1->127.0.0.1:2] DESCRIBE response: 401 Unauthorized"), "unauthorized");
        assert_eq!(classify("Connection refused (os error 111)"), "refused");
        assert_eq!(classify("no packet for 5 s"), "timeout");
        assert_eq!(classify("no video stream in h265: the server offers [H264]"), "no_stream");
        assert_eq!(classify("the server ended the session"), "ended");
    }

}
