//! The socket shell of one source. For RTP pushed over UDP it binds the RTP,
//! RTCP and FEC sockets; for a pulled source (RTSP) it starts the pull and
//! keeps the local socket the pull writes into. It reads what the worker's
//! epoll says is readable in batches, hands the datagrams to the source's
//! [`Stream`], and sends the RTCP the stream asks to send (pushed sources
//! only). Everything else happens in the stream.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Instant, SystemTime};

use anyhow::Context;

use crate::config::SourceConfig;
use crate::ingest::rtsp::RtspPull;
use crate::ingest::udp::{self, RecvBatch};
use crate::metrics::StreamMetrics;
use crate::stream::{Finishing, Stream, StreamOptions};

/// Which of a source's sockets became readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketRole {
    Rtp,
    Rtcp,
    /// The n-th FEC socket (ST 2022-1: 0 = column, 1 = row).
    Fec(u8),
    /// The restream's socket: RTCP from the restream's receivers.
    Restream,
}

/// RTCP sockets get a small receive buffer: a few compounds a second.
const RTCP_RECEIVE_BUFFER: usize = 256 << 10;

/// Where a source's RTP is read from.
enum RxSocket {
    /// Pushed: the source's own UDP port.
    Udp(UdpSocket),
    /// Pulled: the worker's end of the pair the pull task writes into.
    Local(UnixDatagram),
}

impl AsRawFd for RxSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            RxSocket::Udp(s) => s.as_raw_fd(),
            RxSocket::Local(s) => s.as_raw_fd(),
        }
    }
}

/// What feeds a pulled source's local socket; held for its drop, which
/// ends the session.
#[allow(dead_code, reason = "held only to be dropped with the source")]
enum Pull {
    Rtsp(RtspPull),
    Srt(crate::ingest::srt::SrtPull),
}

/// One source: its sockets and its stream.
pub struct UdpSource {
    stream: Stream,
    rtp_socket: RxSocket,
    /// The pull writing into `rtp_socket`; dropping it ends the session.
    _pull: Option<Pull>,
    rtcp_socket: Option<UdpSocket>,
    /// ST 2022-1 column and row sockets.
    fec_sockets: Vec<UdpSocket>,
}

impl UdpSource {
    /// Binds the source's sockets and starts its stream (and decoder).
    pub fn open(cfg: SourceConfig, metrics: StreamMetrics, options: &StreamOptions) -> anyhow::Result<UdpSource> {
        if cfg.pulled() {
            return Self::open_pulled(cfg, metrics, options);
        }
        let id = cfg.id();
        let (rtp_socket, granted) =
            udp::bind(cfg.rtp_bind, cfg.receive_buffer).with_context(|| format!("{id}: cannot bind RTP socket {}", cfg.rtp_bind))?;
        let rtcp_socket = match cfg.rtcp_bind {
            Some(addr) => Some(udp::bind(addr, RTCP_RECEIVE_BUFFER).with_context(|| format!("{id}: cannot bind RTCP socket {addr}"))?.0),
            None => None,
        };
        let mut fec_sockets = Vec::new();
        for addr in cfg.fec.iter().flat_map(|f| f.binds.iter()) {
            fec_sockets.push(udp::bind(*addr, cfg.receive_buffer / 4).with_context(|| format!("{id}: cannot bind FEC socket {addr}"))?.0);
        }
        metrics.receive_buffer.set(granted as i64);
        if granted < cfg.receive_buffer {
            tracing::warn!(
                stream = %id, requested = cfg.receive_buffer, granted,
                "kernel granted a smaller receive buffer than requested (raise net.core.rmem_max or run with CAP_NET_ADMIN)"
            );
        }
        let stream = Stream::new(cfg, metrics, options, Instant::now())?;
        let cfg = stream.config();
        tracing::info!(
            stream = %id, rtp = %cfg.rtp_bind, rtcp = ?cfg.rtcp_bind, receive_buffer = granted,
            decoder = stream.decoder_name().unwrap_or("none"), latency_ms = cfg.jitter.latency.as_millis() as u64,
            "receiving"
        );
        if let Some(r) = &options.readiness {
            r.mark_ready(&id);
        }
        Ok(UdpSource { stream, rtp_socket: RxSocket::Udp(rtp_socket), _pull: None, rtcp_socket, fec_sockets })
    }

    /// A pulled source: a local socket pair, the pull (RTSP or SRT) writing
    /// into one end.
    fn open_pulled(cfg: SourceConfig, metrics: StreamMetrics, options: &StreamOptions) -> anyhow::Result<UdpSource> {
        let id = cfg.id();
        let (ours, theirs) = UnixDatagram::pair().with_context(|| format!("{id}: cannot make the local socket pair"))?;
        ours.set_nonblocking(true).with_context(|| format!("{id}: local socket"))?;
        // Room for a burst (a keyframe's packets) while the worker is busy;
        // beyond it the pull waits, it does not drop.
        let _ = socket2::SockRef::from(&ours).set_recv_buffer_size(cfg.receive_buffer);
        let stream = Stream::new(cfg.clone(), metrics.clone(), options, Instant::now())?;
        let pull = match (&cfg.rtsp, &cfg.srt) {
            (Some(settings), _) => {
                tracing::info!(
                    stream = %id, url = %settings.url, transport = ?settings.transport, credentials = settings.describe_credentials(),
                    decoder = stream.decoder_name().unwrap_or("none"), latency_ms = cfg.jitter.latency.as_millis() as u64,
                    "pulling over RTSP"
                );
                Pull::Rtsp(RtspPull::start(id.clone(), settings.clone(), cfg.codec, metrics.ingest(), theirs)?)
            }
            (None, Some(settings)) => {
                tracing::info!(
                    stream = %id, uri = %settings.uri(), srt_latency_ms = settings.latency.as_millis() as u64,
                    encrypted = settings.passphrase.is_some(), decoder = stream.decoder_name().unwrap_or("none"),
                    "receiving over SRT"
                );
                Pull::Srt(crate::ingest::srt::SrtPull::start(id.clone(), settings.clone(), cfg.codec, cfg.payload_type, metrics.clone(), theirs)?)
            }
            (None, None) => anyhow::bail!("{id}: not a pulled source"),
        };
        if let Some(r) = &options.readiness {
            r.mark_ready(&id);
        }
        Ok(UdpSource { stream, rtp_socket: RxSocket::Local(ours), _pull: Some(pull), rtcp_socket: None, fec_sockets: Vec::new() })
    }

    /// Where the RTP socket is bound (its port when bound to port 0).
    pub fn local_rtp_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.rtp_socket {
            RxSocket::Udp(s) => s.local_addr(),
            RxSocket::Local(_) => Err(std::io::Error::other("a pulled source has no RTP port")),
        }
    }

    /// The sockets to watch, with their roles.
    pub fn sockets(&self) -> impl Iterator<Item = (std::os::fd::RawFd, SocketRole)> + '_ {
        std::iter::once((self.rtp_socket.as_raw_fd(), SocketRole::Rtp))
            .chain(self.rtcp_socket.as_ref().map(|s| (s.as_raw_fd(), SocketRole::Rtcp)))
            .chain(self.fec_sockets.iter().enumerate().map(|(i, s)| (s.as_raw_fd(), SocketRole::Fec(i as u8))))
            .chain(self.stream.restream_socket().map(|s| (s.as_raw_fd(), SocketRole::Restream)))
    }

    /// Reads what is queued on one socket, at most `max_batches` batches (the
    /// rest waits for the next turn, so one busy source cannot starve the
    /// others sharing the thread). Returns whether more may be queued.
    pub fn on_readable(&mut self, role: SocketRole, batch: &mut RecvBatch, max_batches: usize) -> std::io::Result<bool> {
        let socket = match role {
            SocketRole::Restream => {
                self.stream.on_restream_readable();
                return Ok(false);
            }
            SocketRole::Rtp => self.rtp_socket.as_raw_fd(),
            SocketRole::Rtcp => match &self.rtcp_socket {
                Some(s) => s.as_raw_fd(),
                None => return Ok(false),
            },
            SocketRole::Fec(i) => match self.fec_sockets.get(i as usize) {
                Some(s) => s.as_raw_fd(),
                None => return Ok(false),
            },
        };
        let mut more = true;
        let mut result = Ok(());
        for _ in 0..max_batches {
            let n = match batch.recv(&socket) {
                Ok(n) => n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if n == 0 {
                more = false;
                break;
            }
            let now = Instant::now();
            match role {
                SocketRole::Rtp => self.stream.handle_rtp_batch(batch, n, now),
                SocketRole::Rtcp => {
                    for i in 0..n {
                        self.stream.handle_rtcp(batch.datagram(i), batch.sources[i], now);
                    }
                }
                SocketRole::Fec(_) => {
                    for i in 0..n {
                        self.stream.handle_fec(batch.datagram(i));
                    }
                }
                SocketRole::Restream => {}
            }
            if n < batch.capacity() {
                more = false;
                break;
            }
        }
        if matches!(role, SocketRole::Fec(_)) {
            self.stream.after_fec(Instant::now());
        }
        result.map(|()| more)
    }

    /// The stream's timers, and the RTCP they make due.
    pub fn on_timers(&mut self, now: Instant) {
        let socket = match (&self.rtcp_socket, &self.rtp_socket) {
            (Some(s), _) | (None, RxSocket::Udp(s)) => Some(s),
            // Retina owns the session's sockets and sends no RTCP of ours.
            (None, RxSocket::Local(_)) => None,
        };
        let Some(t) = self.stream.on_timers(now, SystemTime::now()) else { return };
        let Some(socket) = socket else { return };
        if let Err(e) = socket.send_to(t.data, t.to) {
            let peer = t.to;
            tracing::debug!(stream = %self.stream.config().id(), %peer, error = %e, "RTCP send failed");
        }
    }

    /// When `on_timers` next has work.
    pub fn next_wake(&self, now: Instant) -> Instant {
        self.stream.next_wake(now)
    }

    /// Asks the sender for at most `bitrate_bps` (TMMBR or REMB, as the
    /// source says); `ladder_top`: the top of its ladder.
    pub fn request_bitrate(&mut self, bitrate_bps: u64, ladder_top: bool) {
        self.stream.request_bitrate(bitrate_bps, ladder_top, Instant::now());
    }

    /// Turns decoding of this source on or off; see [`Stream::set_decoding`].
    pub fn set_decoding(&mut self, on: bool) {
        self.stream.set_decoding(on);
    }

    /// Stops receiving (the sockets close); see [`Stream::finish`].
    pub fn finish(self) -> Finishing {
        self.stream.finish(Instant::now())
    }
}
