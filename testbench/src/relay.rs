//! Seeded lossy relay between any RTP sender and receiver (`zerodrop relay`).
//!
//! ```text
//! sender ──RTP──► listen      ──(loss model)──► forward        receiver
//! sender ──RTCP─► listen+1    ──(no loss)─────► forward+1      receiver
//! sender ◄─RTCP── listen+1    ◄───────────────  downstream RTCP ◄─ RR/NACK/PLI
//! ```
//!
//! The loss model decides per packet in arrival order on the RTP port, so the
//! same seed drops the same packets of the same input sequence: GStreamer's
//! receiver and ours can be judged on identical loss. Caveat: the decision is
//! by arrival index, not by RTP sequence number, so reordering (or kernel drops)
//! before the relay shifts which packets are dropped.
//!
//! With `rtx_payload_type` set, retransmissions (that payload type) never
//! touch the media model, so the media packets a seed drops are the same
//! whatever retransmissions a receiver provokes; and whether the n-th
//! retransmission of media packet `seq` is dropped is a function of
//! `(seed, seq − first media seq the relay saw, n)` alone ([`rtx_fate`]), not
//! of how many retransmissions came before it or when: every receiver meets
//! the same retransmission loss for the same repair, however it paces or
//! orders its NACKs. (The offset, not the raw sequence number: senders start
//! from a random sequence number, RFC 3550 §5.1, so two runs of the same input
//! number the same packet differently.) Without it, one model
//! decides for every RTP datagram, so the RTX a receiver asks for shifts later
//! media drops.
//!
//! FEC: with `fec_forward` set, the relay also listens on one ephemeral port
//! per FEC stream (ST 2022-1 column and row) and forwards each to its
//! address; with `fec_payload_type`, in-band FEC (ULPFEC) draws from a model
//! of its own like RTX. Either way FEC loss comes from models seeded apart
//! from the media's, so the same media packets are lost whatever FEC (and how
//! much of it) a sender adds. `drop_log` writes one line per media packet the
//! relay dropped (`seq xxh3-digest-of-datagram`), to check what a receiver
//! rebuilt against the original, byte for byte.
//!
//! RTCP from the receiver is recognised by where it comes from: anything that
//! reaches the relay's downstream sockets (the addresses the receiver sees the
//! media come from, so a symmetric receiver answers there), and anything on the
//! listen ports whose source is the forward RTP or RTCP address, or, from an
//! address that is not the sender's, a compound that does not start with a
//! sender report (GStreamer's `udpsink` sends from an ephemeral port). It goes to the
//! address the sender's RTCP came from, or, until the sender has sent RTCP, to
//! the sender's RTP source port + offset (`--sender-rtcp` overrides both).
//!
//! This file also holds the small UDP helpers the test sender shares with the
//! relay: binding an RTP/RTCP port pair, polling sockets, and the stop signal.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::loss::{LossModel, LossSpec};
use zerodrop_dataplane::rtp;
use crate::sender::RTX_SEED_SALT;
use zerodrop_dataplane::ingest::udp::{self, bind_rtp_rtcp_pair, bind_udp, is_transient, send_to_waiting, unspecified, with_port_offset};

/// Command-line arguments of `zerodrop relay`.
#[derive(Debug, Clone, clap::Parser)]
pub struct RelayArgs {
    /// Address to receive the sender's RTP on; its RTCP port is port + rtcp-offset.
    #[arg(long, default_value = "127.0.0.1:6000")]
    pub listen: SocketAddr,
    /// Receiver's RTP address; its RTCP goes to port + rtcp-offset.
    #[arg(long, default_value = "127.0.0.1:5004")]
    pub forward: SocketAddr,
    /// Loss model applied to RTP (media and RTX), e.g. `none`, `uniform:0.03`,
    /// `ge:loss=0.05,burst=5`, `trace:FILE`, `uniform:0.1+ge:p=0.01,r=0.3`.
    #[arg(long, default_value = "none")]
    pub loss: LossSpec,
    /// Seed of the loss model: the same seed drops the same packet indices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// RTX payload type: the n-th retransmission of a media packet is dropped
    /// by a seeded rule of (seed, sequence number, n) alone, so RTX never
    /// shifts which media packets are dropped and every receiver meets the
    /// same retransmission loss.
    #[arg(long = "rtx-pt")]
    pub rtx_payload_type: Option<u8>,
    /// Distance of the RTCP port from the RTP port, on both sides.
    #[arg(long, default_value_t = 1)]
    pub rtcp_offset: u16,
    /// RTP and RTCP share one port on both sides (RFC 5761).
    #[arg(long)]
    pub rtcp_mux: bool,
    /// Where to send the receiver's RTCP (default: where the sender's RTCP
    /// came from, else the sender's RTP source port + rtcp-offset).
    #[arg(long)]
    pub sender_rtcp: Option<SocketAddr>,
    /// Local RTP address for the downstream side (RTCP on port + rtcp-offset);
    /// a receiver with a fixed RTCP destination should send its RTCP to that
    /// RTCP port or to the listen RTCP port. Default: an ephemeral pair.
    #[arg(long)]
    pub downstream_bind: Option<SocketAddr>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Write the final counters as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Forward an FEC stream (ST 2022-1: column, then row) to this address;
    /// the relay listens for it on an ephemeral port it logs. Repeatable.
    #[arg(long)]
    pub fec_forward: Vec<SocketAddr>,
    /// Payload type of in-band FEC (ULPFEC): drawn from its own loss model.
    #[arg(long = "fec-pt")]
    pub fec_payload_type: Option<u8>,
    /// Log each dropped media packet here: `seq xxh3-digest`.
    #[arg(long)]
    pub drop_log: Option<PathBuf>,
    /// Hold the receiver's RTCP (NACKs, reports) this many milliseconds on
    /// its way up: a long round trip for repair, on loopback.
    #[arg(long, default_value_t = 0)]
    pub feedback_delay_ms: u64,
}

/// Configuration of an in-process relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// RTP listen address; port 0 picks an ephemeral RTP/RTCP pair.
    pub listen: SocketAddr,
    pub forward: SocketAddr,
    pub loss: LossSpec,
    pub seed: u64,
    /// Payload type of RTX packets, whose fate is then [`rtx_fate`] of their
    /// original sequence number and retransmission count; `None`: one model
    /// for all RTP.
    pub rtx_payload_type: Option<u8>,
    pub rtcp_offset: u16,
    pub rtcp_mux: bool,
    pub sender_rtcp: Option<SocketAddr>,
    pub downstream_bind: Option<SocketAddr>,
    /// Where each FEC stream goes (listened for on ephemeral ports).
    pub fec_forward: Vec<SocketAddr>,
    /// In-band FEC payload type, drawing from its own loss model.
    pub fec_payload_type: Option<u8>,
    pub drop_log: Option<PathBuf>,
    /// Receiver RTCP is held this long before it goes up to the sender.
    pub feedback_delay: Duration,
}

/// Salt of the FEC loss models' seeds (in-band, and per FEC port).
const FEC_SEED_SALT: u64 = 0x0fec_0fec_5a17_0001;

impl RelayConfig {
    /// A lossless relay from `listen` to `forward` with RTCP on port + 1.
    pub fn new(listen: SocketAddr, forward: SocketAddr) -> Self {
        Self {
            listen,
            forward,
            loss: LossSpec::None,
            seed: 0,
            rtx_payload_type: None,
            rtcp_offset: 1,
            rtcp_mux: false,
            sender_rtcp: None,
            downstream_bind: None,
            fec_forward: Vec::new(),
            fec_payload_type: None,
            drop_log: None,
            feedback_delay: Duration::ZERO,
        }
    }

    fn forward_rtcp(&self) -> SocketAddr {
        if self.rtcp_mux { self.forward } else { with_port_offset(self.forward, self.rtcp_offset) }
    }
}

impl From<&RelayArgs> for RelayConfig {
    fn from(a: &RelayArgs) -> Self {
        Self {
            listen: a.listen,
            forward: a.forward,
            loss: a.loss.clone(),
            seed: a.seed,
            rtx_payload_type: a.rtx_payload_type,
            rtcp_offset: a.rtcp_offset,
            rtcp_mux: a.rtcp_mux,
            sender_rtcp: a.sender_rtcp,
            downstream_bind: a.downstream_bind,
            fec_forward: a.fec_forward.clone(),
            fec_payload_type: a.fec_payload_type,
            drop_log: a.drop_log.clone(),
            feedback_delay: Duration::from_millis(a.feedback_delay_ms),
        }
    }
}

/// Live counters of a running relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// RTP datagrams (media and RTX) forwarded to the receiver.
    pub forwarded: AtomicU64,
    /// RTP datagrams dropped by the loss model.
    pub dropped: AtomicU64,
    /// Receiver RTCP datagrams passed up to the sender.
    pub rtcp_up: AtomicU64,
    /// Sender RTCP datagrams passed down to the receiver.
    pub rtcp_down: AtomicU64,
    /// Receiver RTCP that arrived before any sender address was known.
    pub rtcp_unroutable: AtomicU64,
    /// Non-RTCP datagrams arriving from the receiver side, ignored.
    pub ignored: AtomicU64,
    /// Datagrams the kernel refused to send.
    pub send_errors: AtomicU64,
    /// FEC datagrams on FEC ports forwarded / dropped by their loss models.
    pub fec_forwarded: AtomicU64,
    pub fec_dropped: AtomicU64,
}

/// A snapshot of [`RelayCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    pub forwarded: u64,
    pub dropped: u64,
    pub rtcp_up: u64,
    pub rtcp_down: u64,
    pub rtcp_unroutable: u64,
    pub ignored: u64,
    pub send_errors: u64,
    pub fec_forwarded: u64,
    pub fec_dropped: u64,
}

impl RelayCounters {
    pub fn snapshot(&self) -> RelayStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            forwarded: g(&self.forwarded),
            dropped: g(&self.dropped),
            rtcp_up: g(&self.rtcp_up),
            rtcp_down: g(&self.rtcp_down),
            rtcp_unroutable: g(&self.rtcp_unroutable),
            ignored: g(&self.ignored),
            send_errors: g(&self.send_errors),
            fec_forwarded: g(&self.fec_forwarded),
            fec_dropped: g(&self.fec_dropped),
        }
    }
}

/// The local addresses of a running relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddrs {
    /// Where the sender sends RTP.
    pub rtp: SocketAddr,
    /// Where the sender sends RTCP (equal to `rtp` with rtcp-mux).
    pub rtcp: SocketAddr,
    /// Where the receiver sees RTP come from.
    pub downstream_rtp: SocketAddr,
    /// Where the receiver sees RTCP come from, and may send its RTCP.
    pub downstream_rtcp: SocketAddr,
    /// Where the sender sends each FEC stream (in `fec_forward` order).
    pub fec: Vec<SocketAddr>,
}

/// The seeded lossy relay.
pub struct Relay;

impl Relay {
    /// Binds the sockets and starts the relay thread.
    pub fn start(config: RelayConfig) -> anyhow::Result<RelayHandle> {
        let sockets = RelaySockets::bind(&config)?;
        let addrs = sockets.addrs()?;
        let counters = Arc::new(RelayCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let loss_paused = Arc::new(AtomicBool::new(false));
        let drop_log = match &config.drop_log {
            Some(path) => Some(io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating the drop log {}", path.display()))?,
            )),
            None => None,
        };
        let worker = RelayWorker {
            model: config.loss.model(config.seed),
            rtx_fates: RtxFates::new(&config.loss, config.seed),
            fec_model: config.fec_payload_type.map(|_| config.loss.model(config.seed ^ FEC_SEED_SALT)),
            fec_port_models: (0..config.fec_forward.len() as u64)
                .map(|i| config.loss.model(config.seed ^ FEC_SEED_SALT.wrapping_mul(i + 2)))
                .collect(),
            drop_log,
            delayed_up: std::collections::VecDeque::new(),
            forward_rtcp: config.forward_rtcp(),
            config,
            sockets,
            counters: counters.clone(),
            stop: stop.clone(),
            loss_paused: loss_paused.clone(),
            sender_rtp_src: None,
            sender_rtcp_src: None,
        };
        let thread = std::thread::Builder::new()
            .name("zerodrop-relay".into())
            .spawn(move || worker.run())
            .context("spawning the relay thread")?;
        Ok(RelayHandle { addrs, counters, stop, loss_paused, thread: Some(thread) })
    }
}

/// A running relay; stops on [`stop`](Self::stop) or drop.
pub struct RelayHandle {
    addrs: RelayAddrs,
    counters: Arc<RelayCounters>,
    stop: Arc<AtomicBool>,
    loss_paused: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl RelayHandle {
    pub fn addrs(&self) -> RelayAddrs {
        self.addrs.clone()
    }

    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }

    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }

    /// Pauses the loss (`true`: every datagram is forwarded and the loss
    /// models stand still) or resumes it, from now on: a test switches a
    /// path's loss on and off in time, whatever the packet rate.
    pub fn pause_loss(&self, paused: bool) {
        self.loss_paused.store(paused, Ordering::Relaxed);
    }

    /// True once the relay thread has ended (it only ends on its own after a
    /// socket error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the relay and returns its final counters.
    pub fn stop(mut self) -> anyhow::Result<RelayStats> {
        self.shutdown()?;
        Ok(self.counters.snapshot())
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(result) => result.context("relay socket error")?,
                Err(_) => anyhow::bail!("relay thread panicked"),
            }
        }
        Ok(())
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// `zerodrop relay`: runs until SIGINT/SIGTERM or `--duration`.
pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let stop = zerodrop_dataplane::shutdown::on_signal()?;
    let config = RelayConfig::from(&args);
    let relay = Relay::start(config)
        .with_context(|| format!("starting the relay on {} towards {}", args.listen, args.forward))?;
    let a = relay.addrs();
    tracing::info!(
        rtp = %a.rtp, rtcp = %a.rtcp, downstream_rtp = %a.downstream_rtp, downstream_rtcp = %a.downstream_rtcp,
        forward = %args.forward, loss = %args.loss, seed = args.seed,
        "relay running"
    );
    let deadline = args.duration.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut last_log = Instant::now();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) && !relay.is_finished() {
        // The relay thread does the work; this thread only watches for the end.
        std::thread::sleep(Duration::from_millis(50));
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let s = relay.stats();
            tracing::debug!(forwarded = s.forwarded, dropped = s.dropped, rtcp_up = s.rtcp_up, rtcp_down = s.rtcp_down, "relay");
        }
    }
    let stats = relay.stop()?;
    tracing::info!(
        forwarded = stats.forwarded, dropped = stats.dropped, rtcp_up = stats.rtcp_up, rtcp_down = stats.rtcp_down,
        rtcp_unroutable = stats.rtcp_unroutable, send_errors = stats.send_errors,
        "relay stopped"
    );
    if let Some(path) = &args.stats_json {
        let json = serde_json::json!({
            "loss": args.loss.to_string(),
            "seed": args.seed,
            "listen": a.rtp.to_string(),
            "forward": args.forward.to_string(),
            "stats": stats,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing relay stats to {}", path.display()))?;
    }
    Ok(())
}

struct RelaySockets {
    /// One per FEC stream, listening on an ephemeral port.
    fec: Vec<UdpSocket>,
    up_rtp: UdpSocket,
    /// `None` with rtcp-mux: `up_rtp` carries both.
    up_rtcp: Option<UdpSocket>,
    down_rtp: UdpSocket,
    down_rtcp: Option<UdpSocket>,
}

impl RelaySockets {
    fn bind(config: &RelayConfig) -> anyhow::Result<Self> {
        let down_bind = config.downstream_bind.unwrap_or_else(|| SocketAddr::new(unspecified(config.forward.ip()), 0));
        let fec = (0..config.fec_forward.len())
            .map(|_| bind_udp(SocketAddr::new(config.listen.ip(), 0)))
            .collect::<io::Result<Vec<_>>>()
            .context("binding the FEC listen ports")?;
        if config.rtcp_mux {
            let up = bind_udp(config.listen).with_context(|| format!("binding the listen address {}", config.listen))?;
            let down = bind_udp(down_bind).with_context(|| format!("binding the downstream address {down_bind}"))?;
            Ok(Self { fec, up_rtp: up, up_rtcp: None, down_rtp: down, down_rtcp: None })
        } else {
            let (up_rtp, up_rtcp) = bind_rtp_rtcp_pair(config.listen, config.rtcp_offset)
                .with_context(|| format!("binding the listen RTP/RTCP pair at {}", config.listen))?;
            let (down_rtp, down_rtcp) = bind_rtp_rtcp_pair(down_bind, config.rtcp_offset)
                .with_context(|| format!("binding the downstream RTP/RTCP pair at {down_bind}"))?;
            Ok(Self { fec, up_rtp, up_rtcp: Some(up_rtcp), down_rtp, down_rtcp: Some(down_rtcp) })
        }
    }

    fn addrs(&self) -> io::Result<RelayAddrs> {
        let rtp = self.up_rtp.local_addr()?;
        let downstream_rtp = self.down_rtp.local_addr()?;
        Ok(RelayAddrs {
            rtp,
            rtcp: self.up_rtcp.as_ref().map_or(Ok(rtp), UdpSocket::local_addr)?,
            downstream_rtp,
            downstream_rtcp: self.down_rtcp.as_ref().map_or(Ok(downstream_rtp), UdpSocket::local_addr)?,
            fec: self.fec.iter().map(UdpSocket::local_addr).collect::<io::Result<_>>()?,
        })
    }

    fn up_rtcp(&self) -> &UdpSocket {
        self.up_rtcp.as_ref().unwrap_or(&self.up_rtp)
    }

    fn down_rtcp(&self) -> &UdpSocket {
        self.down_rtcp.as_ref().unwrap_or(&self.down_rtp)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ingress {
    UpRtp,
    UpRtcp,
    Down,
    /// The n-th FEC stream.
    Fec(usize),
}

struct RelayWorker {
    config: RelayConfig,
    forward_rtcp: SocketAddr,
    sockets: RelaySockets,
    model: LossModel,
    /// Fates of RTX packets when `config.rtx_payload_type` is set.
    rtx_fates: RtxFates,
    /// Loss model of in-band FEC when `config.fec_payload_type` is set.
    fec_model: Option<LossModel>,
    /// Loss models of the FEC streams on ports of their own.
    fec_port_models: Vec<LossModel>,
    drop_log: Option<io::BufWriter<std::fs::File>>,
    /// Receiver RTCP held for `feedback_delay`, oldest first.
    delayed_up: std::collections::VecDeque<(Instant, Vec<u8>)>,
    counters: Arc<RelayCounters>,
    stop: Arc<AtomicBool>,
    /// While set, nothing is dropped (`RelayHandle::pause_loss`).
    loss_paused: Arc<AtomicBool>,
    sender_rtp_src: Option<SocketAddr>,
    sender_rtcp_src: Option<SocketAddr>,
}

impl RelayWorker {
    fn run(mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 65_536];
        // Poll order puts the RTP ingress first; the loss decision only ever
        // depends on its own arrival order, which one thread reads in sequence.
        let mut ingress = vec![(Ingress::UpRtp, 0usize), (Ingress::Down, 2)];
        if self.sockets.up_rtcp.is_some() {
            ingress.push((Ingress::UpRtcp, 1));
            ingress.push((Ingress::Down, 3));
        }
        for i in 0..self.sockets.fec.len() {
            ingress.push((Ingress::Fec(i), 4 + i));
        }
        while !self.stop.load(Ordering::Relaxed) {
            let mut sockets = vec![
                Some(&self.sockets.up_rtp),
                self.sockets.up_rtcp.as_ref(),
                Some(&self.sockets.down_rtp),
                self.sockets.down_rtcp.as_ref(),
            ];
            sockets.extend(self.sockets.fec.iter().map(Some));
            let socks: Vec<&UdpSocket> = ingress.iter().filter_map(|&(_, i)| sockets[i]).collect();
            let now = Instant::now();
            while self.delayed_up.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, data)) = self.delayed_up.pop_front() {
                    self.send_up(&data);
                }
            }
            let wait = self.delayed_up.front().map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(now).min(Duration::from_millis(50))
            });
            let ready = udp::wait_readable(&socks, wait)?;
            let ready_ingress: Vec<(Ingress, usize)> =
                ingress.iter().zip(&ready).filter(|(_, r)| **r).map(|(x, _)| *x).collect();
            for (kind, idx) in ready_ingress {
                // Bounded per round so one busy socket cannot starve RTCP.
                for _ in 0..256 {
                    let sock = match idx {
                        0 => &self.sockets.up_rtp,
                        1 => self.sockets.up_rtcp(),
                        2 => &self.sockets.down_rtp,
                        3 => self.sockets.down_rtcp(),
                        n => &self.sockets.fec[n - 4],
                    };
                    match sock.recv_from(&mut buf) {
                        Ok((n, src)) => self.handle(kind, &buf[..n], src),
                        Err(e) if is_transient(&e) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if let Some(log) = &mut self.drop_log {
            io::Write::flush(log)?;
        }
        Ok(())
    }

    /// Tells the receiver's RTCP arriving on a listen port (e.g. from a
    /// `udpsink` with a fixed destination) from the sender's: by address where
    /// the address is known, else by content, since a sender's compound starts
    /// with a sender report and a receiver's with RR or feedback.
    fn is_from_receiver(&self, src: SocketAddr, rtcp: &[u8]) -> bool {
        const RTCP_SR: u8 = 200;
        if src == self.config.forward || src == self.forward_rtcp {
            return true;
        }
        let from_sender = self.sender_rtcp_src == Some(src)
            || self.sender_rtp_src.is_some_and(|a| a == src || with_port_offset(a, self.config.rtcp_offset) == src);
        !from_sender && rtcp[1] != RTCP_SR
    }

    fn handle(&mut self, kind: Ingress, data: &[u8], src: SocketAddr) {
        match kind {
            Ingress::Fec(i) => {
                if !self.loss_paused.load(Ordering::Relaxed) && self.fec_port_models[i].should_drop() {
                    self.counters.fec_dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let sent = send_to_waiting(&self.sockets.down_rtp, data, self.config.fec_forward[i]);
                    self.count_send(sent, &self.counters.fec_forwarded);
                }
            }
            Ingress::Down => {
                if rtp::is_rtcp(data) {
                    self.pass_up(data);
                } else {
                    self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ if rtp::is_rtcp(data) && self.is_from_receiver(src, data) => self.pass_up(data),
            _ if rtp::is_rtcp(data) => {
                self.sender_rtcp_src = Some(src);
                let sent = send_to_waiting(self.sockets.down_rtcp(), data, self.forward_rtcp);
                self.count_send(sent, &self.counters.rtcp_down);
            }
            Ingress::UpRtp => {
                self.sender_rtp_src = Some(src);
                if self.should_drop(data) {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    let pt = data.get(1).map(|b| b & 0x7f);
                    let media = pt.is_some() && pt != self.config.rtx_payload_type && pt != self.config.fec_payload_type;
                    if media && let (Some(log), Some(seq)) = (&mut self.drop_log, data.get(2..4)) {
                        let seq = u16::from_be_bytes([seq[0], seq[1]]);
                        let _ = writeln!(log, "{seq} {:016x}", xxhash_rust::xxh3::xxh3_64(data));
                    }
                } else {
                    let sent = send_to_waiting(&self.sockets.down_rtp, data, self.config.forward);
                    self.count_send(sent, &self.counters.forwarded);
                }
            }
            // Non-RTCP on the RTCP port is not media we were asked to relay.
            Ingress::UpRtcp => {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// RTX (when its payload type is configured) by [`RtxFates`]; in-band FEC
    /// from its own model; anything else (media, or a datagram too short to
    /// carry a payload type) from the media model.
    fn should_drop(&mut self, rtp: &[u8]) -> bool {
        let paused = self.loss_paused.load(Ordering::Relaxed);
        let pt = rtp.get(1).map(|b| b & 0x7f);
        if pt.is_some() && pt == self.config.fec_payload_type && let Some(m) = &mut self.fec_model {
            return !paused && m.should_drop();
        }
        if paused && pt.is_some() && pt == self.config.rtx_payload_type {
            return false;
        }
        if pt.is_some() && pt == self.config.rtx_payload_type {
            // An RTX packet too short to name its original is not a
            // retransmission of anything: forwarded, and no model advances.
            return match rtp::RtpPacket::parse(rtp).ok().and_then(|p| rtp::parse_rtx(p.payload()).ok().map(|r| r.original_seq)) {
                Some(seq) => self.rtx_fates.should_drop(seq, Instant::now()),
                None => false,
            };
        }
        if let Some(seq) = rtp.get(2..4) {
            self.rtx_fates.saw_media(u16::from_be_bytes([seq[0], seq[1]]));
        }
        !paused && self.model.should_drop()
    }

    fn pass_up(&mut self, data: &[u8]) {
        if self.config.feedback_delay.is_zero() {
            self.send_up(data);
        } else {
            self.delayed_up.push_back((Instant::now() + self.config.feedback_delay, data.to_vec()));
        }
    }

    fn send_up(&self, data: &[u8]) {
        let dest = self.config.sender_rtcp.or(self.sender_rtcp_src).or_else(|| {
            self.sender_rtp_src
                .map(|a| if self.config.rtcp_mux { a } else { with_port_offset(a, self.config.rtcp_offset) })
        });
        match dest {
            Some(dest) => {
                let sent = send_to_waiting(self.sockets.up_rtcp(), data, dest);
                self.count_send(sent, &self.counters.rtcp_up);
            }
            None => {
                self.counters.rtcp_unroutable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn count_send(&self, sent: io::Result<usize>, counter: &AtomicU64) {
        match sent {
            Ok(_) => counter.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.send_errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The rule for retransmissions: whether the `n`-th retransmission (1-based,
/// counted at the relay) of the media packet `index` is dropped, from
/// `(seed, index, n)` alone. `index` is the packet's sequence number counted
/// from the first media packet the relay saw (mod 2^16), so the same packet of
/// the same input has the same fates whatever sequence number the sender
/// happened to start from.
///
/// Each original sequence number gets a loss model of its own, seeded by a
/// hash of the seed and the sequence number; its n-th decision is the fate of
/// the n-th retransmission. So the fate does not depend on which receiver asks,
/// when, in what order, or how many retransmissions of other packets came
/// before (a single RTX loss stream would hand the same retransmission a
/// different fate whenever a receiver asked for one more or one fewer packet
/// earlier: receivers would not be judged on the same loss).
///
/// - Uniform loss: independent draws with the configured probability.
/// - Gilbert–Elliott: the packet's own GE chain, started from the stationary
///   distribution and stepped once per retransmission. Every retransmission is
///   lost with the model's mean probability, and the retries of one packet are
///   correlated the way consecutive packets of the channel are (a
///   retransmission lost in a bad period makes the next retry likely lost
///   too), as on a path whose bursts outlast the retry interval. What it does
///   not model: a retransmission is not more likely lost because its original
///   was (a real burst longer than the round trip would take the first
///   retransmission too), and retransmissions of different packets are
///   independent. Tying a retransmission to the media chain's state at the
///   time it passes would model that, but would make its fate depend on when
///   the receiver asked, which is what this rule exists to avoid.
/// - Trace: a recorded pattern is indexed by media packet; retransmissions are
///   dropped uniformly at the trace's share of drops.
/// - Several models joined with `+`: each part by its own rule, dropped when
///   any part drops it.
pub fn rtx_fate(loss: &LossSpec, seed: u64, index: u16, n: u32) -> bool {
    let mut model = rtx_model(loss, seed, index);
    let mut drop = false;
    for _ in 0..n.max(1) {
        drop = model.should_drop();
    }
    drop
}

/// The loss model deciding the retransmissions of one original sequence
/// number, in order.
fn rtx_model(loss: &LossSpec, seed: u64, original_seq: u16) -> LossModel {
    rtx_spec(loss).model(rtx_seed(seed, original_seq))
}

/// `seed` and `seq` mixed into one seed (splitmix64 finaliser), salted apart
/// from the media model's seed.
fn rtx_seed(seed: u64, seq: u16) -> u64 {
    let mut z = (seed ^ RTX_SEED_SALT).wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(u64::from(seq) + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A trace replays media drops by index: for retransmissions it stands for
/// its share of drops.
fn rtx_spec(loss: &LossSpec) -> LossSpec {
    match loss {
        LossSpec::Trace(t) => {
            let p = if t.pattern.is_empty() { 0.0 } else { t.pattern.iter().filter(|&&d| d).count() as f64 / t.pattern.len() as f64 };
            LossSpec::Uniform { p }
        }
        LossSpec::Any(parts) => LossSpec::Any(parts.iter().map(rtx_spec).collect()),
        other => other.clone(),
    }
}

/// The relay's running state of [`rtx_fate`]: per media packet index, how
/// many retransmissions of it have passed and the model for the next.
struct RtxFates {
    loss: LossSpec,
    seed: u64,
    /// Sequence number of the first media packet seen: indices count from it.
    /// A retransmission before any media (none in practice) counts from 0.
    first_media_seq: Option<u16>,
    per_seq: HashMap<u16, (Instant, LossModel)>,
}

impl RtxFates {
    /// A sequence number not retransmitted for this long starts over: it
    /// belongs to a later wrap of the 16-bit space (minutes away at video rates).
    const FORGET_AFTER: Duration = Duration::from_secs(10);

    fn new(loss: &LossSpec, seed: u64) -> Self {
        Self { loss: rtx_spec(loss), seed, first_media_seq: None, per_seq: HashMap::new() }
    }

    /// A media packet passed the relay (dropped or not): the first one fixes
    /// where indices count from.
    fn saw_media(&mut self, seq: u16) {
        self.first_media_seq.get_or_insert(seq);
    }

    fn should_drop(&mut self, original_seq: u16, now: Instant) -> bool {
        let original_seq = original_seq.wrapping_sub(self.first_media_seq.unwrap_or(0));
        let (loss, seed) = (&self.loss, self.seed);
        let entry = self.per_seq.entry(original_seq).or_insert_with(|| (now, loss.model(rtx_seed(seed, original_seq))));
        if now.duration_since(entry.0) > Self::FORGET_AFTER {
            entry.1 = loss.model(rtx_seed(seed, original_seq));
        }
        entry.0 = now;
        entry.1.should_drop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays a request pattern (original sequence numbers in the order their
    /// retransmissions reach the relay) and returns each (seq, n) → fate.
    fn play(fates: &mut RtxFates, pattern: &[u16]) -> HashMap<(u16, u32), bool> {
        let mut count: HashMap<u16, u32> = HashMap::new();
        let now = Instant::now();
        pattern
            .iter()
            .map(|&seq| {
                let n = count.entry(seq).or_default();
                *n += 1;
                ((seq, *n), fates.should_drop(seq, now))
            })
            .collect()
    }

    #[test]
    fn retransmission_fate_depends_on_seq_and_n_only_not_on_the_request_pattern() {
        for spec in ["uniform:0.3", "ge:loss=0.2,burst=5", "uniform:0.1+ge:loss=0.05,burst=20"] {
            let loss = LossSpec::parse(spec).unwrap();
            // A receiver asking early and once per packet, retrying in order…
            let a: Vec<u16> = (100..200).chain(100..200).chain(100..150).collect();
            // …and one asking late, in reverse, for extra packets in between,
            // retrying the same packets a different number of times.
            let mut b: Vec<u16> = Vec::new();
            for seq in (100..200).rev() {
                b.push(seq);
                b.push(seq + 1000);
                if seq % 3 == 0 {
                    b.push(seq);
                    b.push(seq);
                }
            }
            b.extend((100..200).step_by(2));
            let fa = play(&mut RtxFates::new(&loss, 7), &a);
            let fb = play(&mut RtxFates::new(&loss, 7), &b);
            let mut common = 0;
            for (key, fate) in &fa {
                if let Some(other) = fb.get(key) {
                    assert_eq!(fate, other, "{spec}: (seq, n) = {key:?}");
                    common += 1;
                }
                assert_eq!(*fate, rtx_fate(&loss, 7, key.0, key.1), "{spec}: {key:?} against the pure rule");
            }
            assert!(common > 150, "{spec}: only {common} (seq, n) pairs in common");
            assert!(fa.values().any(|&d| d) && fa.values().any(|&d| !d), "{spec}: fates must vary");
            // Another seed decides differently.
            let fc = play(&mut RtxFates::new(&loss, 8), &a);
            assert_ne!(fa, fc, "{spec}: the seed must matter");
        }
    }

    #[test]
    fn retransmission_fate_follows_the_packet_not_the_senders_random_first_seq() {
        // The same input sent twice, numbered from two random starting points
        // (as rtph264pay and our sender do): packet i of one run and packet i
        // of the other meet the same fates, including across the 16-bit wrap.
        let loss = LossSpec::parse("ge:loss=0.05,burst=20").unwrap();
        for (a0, b0) in [(1000u16, 50_000u16), (65_500, 7)] {
            let (mut a, mut b) = (RtxFates::new(&loss, 2), RtxFates::new(&loss, 2));
            a.saw_media(a0);
            b.saw_media(b0);
            // Later media packets do not move the origin.
            a.saw_media(a0.wrapping_add(5));
            let now = Instant::now();
            let mut differs_from_raw = false;
            for i in 0..400u16 {
                for n in 1..=4u32 {
                    let fa = a.should_drop(a0.wrapping_add(i), now);
                    let fb = b.should_drop(b0.wrapping_add(i), now);
                    assert_eq!(fa, fb, "packet {i}, retransmission {n}");
                    assert_eq!(fa, rtx_fate(&loss, 2, i, n), "packet {i}, retransmission {n}: the pure rule");
                    differs_from_raw |= fa != rtx_fate(&loss, 2, a0.wrapping_add(i), n);
                }
            }
            assert!(differs_from_raw, "fates keyed on the raw sequence number would be the same rule");
        }
    }

    #[test]
    fn retransmission_loss_rate_is_the_models_mean() {
        for (spec, want) in [("uniform:0.2", 0.2), ("ge:loss=0.05,burst=20", 0.05)] {
            let loss = LossSpec::parse(spec).unwrap();
            let n = 40_000u32;
            let dropped = (0..n).filter(|&i| rtx_fate(&loss, 3, (i % 65_536) as u16, 1 + i / 65_536)).count();
            let rate = f64::from(dropped as u32) / f64::from(n);
            assert!((rate - want).abs() < 0.01, "{spec}: first-retransmission loss {rate}, want {want}");
        }
    }
}
