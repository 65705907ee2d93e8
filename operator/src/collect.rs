//! From scraped `/metrics` to the policy's [`Signals`]: per shard, the
//! busiest receive worker's share of the interval and the kernel's
//! receive-buffer drops on the shard's sockets; per stream, packets received,
//! lost and left unrecovered and frames dropped, each as the delta since the
//! previous scrape.
//!
//! A pod that did not answer gives samples with every figure `None` for its
//! shard and the streams it owns, so the policy sees missing data, never
//! "no loss". Counters that went down (the pod restarted) count from zero. A
//! stream seen first, or seen on another shard than before (it moved on a
//! rescale), gives no figures for that round: there is no earlier reading on
//! that pod to subtract.
//!
//! The samples live in the [`Signals`] the policy reads, trimmed to the
//! history the policy's windows need, so a round copies nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use zerodrop_policy::{ShardSample, ShardSignals, Signals, StreamSample, StreamSignals, Timestamp};

use crate::scrape::MetricSample;

/// Kernel drop reasons that mean "the socket's receive buffer was full": the
/// eBPF reasons `SOCKET_RCVBUFF` and `PROTO_MEM`, and the procfs count
/// (`SOCKET_OVERFLOW`, the socket's own drop counter). Checksum, netfilter or
/// no-socket drops are not the shard's capacity.
pub const CAPACITY_DROP_REASONS: [&str; 3] = ["SOCKET_RCVBUFF", "PROTO_MEM", "SOCKET_OVERFLOW"];

/// Cumulative counters of one stream as its pod exports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamCounters {
    /// `zerodrop_rtp_packets_received_total`: originals and repairs.
    pub received: u64,
    /// `zerodrop_rtp_packets_recovered_total`, every method.
    pub recovered: u64,
    pub lost: u64,
    pub unrecovered: u64,
    pub frames_decoded: u64,
    pub frames_dropped: u64,
    /// Kernel drops on the stream's sockets with a capacity reason.
    pub kernel_drops_capacity: u64,
    /// Kernel drops on the stream's sockets, every reason.
    pub kernel_drops: u64,
    /// `zerodrop_rendition_index`, when the pod runs a bitrate ladder.
    pub rendition: Option<usize>,
    /// `zerodrop_decoder_info{decoder}`.
    pub decoder: Option<String>,
    /// The node agents' drops for the stream's sockets by reason (cumulative
    /// since each agent started); `None` when not every agent answered.
    pub agent_drops: Option<BTreeMap<String, u64>>,
    /// A pulled source (RTSP, SRT): `zerodrop_ingest_connected`.
    pub ingest_connected: Option<bool>,
    /// `zerodrop_ingest_reconnects_total`.
    pub ingest_reconnects: u64,
    /// `zerodrop_ingest_errors_total` by reason.
    pub ingest_errors: BTreeMap<String, u64>,
    /// The reason of the latest failure seen: the one whose count grew
    /// between two readings (at the first reading, the most frequent).
    pub ingest_last_error: Option<String>,
    /// `zerodrop_ingest_last_frame_timestamp_seconds` (Unix time).
    pub ingest_last_frame: Option<f64>,
}

impl StreamCounters {
    /// Sets `ingest_last_error` from what grew since `before` (None: the
    /// first reading).
    fn note_last_error(&mut self, before: Option<&StreamCounters>) {
        let grown = self
            .ingest_errors
            .iter()
            .map(|(r, &n)| (r, n.saturating_sub(before.and_then(|b| b.ingest_errors.get(r).copied()).unwrap_or(0))))
            .filter(|(_, d)| *d > 0)
            .max_by_key(|(_, d)| *d)
            .map(|(r, _)| r.clone());
        self.ingest_last_error = grown.or_else(|| before.and_then(|b| b.ingest_last_error.clone()));
    }
}

/// What one pod's `/metrics` says about one pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodFigures {
    /// `zerodrop_worker_busy_seconds_total` per worker.
    pub busy_seconds: BTreeMap<String, f64>,
    pub streams: BTreeMap<String, StreamCounters>,
}

/// Picks the series of `pipeline` out of a pod's samples.
pub fn pod_figures(samples: &[MetricSample], pipeline: &str) -> PodFigures {
    let mut out = PodFigures::default();
    for s in samples {
        if s.name == "zerodrop_worker_busy_seconds_total" {
            if let Some(worker) = s.label("worker") {
                out.busy_seconds.insert(worker.to_string(), s.value);
            }
            continue;
        }
        if s.label("pipeline") != Some(pipeline) {
            continue;
        }
        let Some(stream) = s.label("stream") else { continue };
        let c = out.streams.entry(stream.to_string()).or_default();
        let n = if s.value.is_finite() && s.value >= 0.0 { s.value as u64 } else { 0 };
        match s.name.as_str() {
            "zerodrop_rtp_packets_received_total" => c.received += n,
            "zerodrop_rtp_packets_recovered_total" => c.recovered += n,
            "zerodrop_rtp_packets_lost_total" => c.lost += n,
            "zerodrop_rtp_packets_unrecovered_total" => c.unrecovered += n,
            "zerodrop_frames_decoded_total" => c.frames_decoded += n,
            "zerodrop_frames_dropped_total" => c.frames_dropped += n,
            "zerodrop_kernel_udp_drops_total" => {
                c.kernel_drops += n;
                if s.label("reason").is_some_and(|r| CAPACITY_DROP_REASONS.contains(&r)) {
                    c.kernel_drops_capacity += n;
                }
            }
            "zerodrop_rendition_index" => c.rendition = Some(n as usize),
            "zerodrop_ingest_connected" => c.ingest_connected = Some(n > 0),
            "zerodrop_ingest_reconnects_total" => c.ingest_reconnects += n,
            "zerodrop_ingest_errors_total" => {
                if let Some(r) = s.label("reason") {
                    *c.ingest_errors.entry(r.to_string()).or_default() += n;
                }
            }
            "zerodrop_ingest_last_frame_timestamp_seconds" if s.value > 0.0 && s.value.is_finite() => c.ingest_last_frame = Some(s.value),
            "zerodrop_decoder_info" if s.value > 0.0 => c.decoder = s.label("decoder").map(str::to_string),
            _ => {}
        }
    }
    out
}

/// Kernel drops the node agents counted, by the socket the packets were
/// headed for: the packet's destination address (in a cluster, the pod's IP)
/// and port, then the kernel's reason, with cumulative counts. Each node's
/// agent counts its own pods' packets, so the sum over agents covers a pod
/// on any node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentDrops {
    by_socket: HashMap<(IpAddr, u16), BTreeMap<String, u64>>,
    /// Agents asked, and those that answered this round.
    pub expected: usize,
    pub answered: usize,
}

impl AgentDrops {
    pub fn new(expected: usize) -> Self {
        Self { expected, ..Self::default() }
    }

    /// Adds one agent's answer: `zerodrop_kernel_udp_drops_total{address,
    /// port,reason}`. A data-plane pod exports the same family with
    /// `pipeline` and `stream` labels; those series are not an agent's.
    pub fn add(&mut self, samples: &[MetricSample]) {
        self.answered += 1;
        self.add_series(samples);
    }

    /// Adds agents' series without counting an answer (the Prometheus
    /// source reads every agent's series in one answer).
    pub fn add_series(&mut self, samples: &[MetricSample]) {
        for s in samples.iter().filter(|s| s.name == "zerodrop_kernel_udp_drops_total" && s.label("pipeline").is_none()) {
            let (Some(address), Some(port), Some(reason)) = (s.label("address"), s.label("port"), s.label("reason")) else {
                continue;
            };
            let (Ok(address), Ok(port)) = (address.parse::<IpAddr>(), port.parse::<u16>()) else { continue };
            // The agent writes IPv4 addresses as such; an IPv4-mapped IPv6
            // address is the same socket.
            let address = match address {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
                v4 => v4,
            };
            let n = if s.value.is_finite() && s.value >= 0.0 { s.value as u64 } else { 0 };
            *self.by_socket.entry((address, port)).or_default().entry(reason.to_string()).or_default() += n;
        }
    }

    /// The drops for `ports` on `ip`, summed by reason; `None` unless every
    /// agent answered (a missing agent may be the one on the pod's node:
    /// its silence is not "no drops").
    pub fn for_sockets(&self, ip: IpAddr, ports: &[u16]) -> Option<BTreeMap<String, u64>> {
        if self.expected == 0 || self.answered < self.expected {
            return None;
        }
        let mut out = BTreeMap::new();
        for port in ports {
            for (reason, n) in self.by_socket.get(&(ip, *port)).into_iter().flatten() {
                *out.entry(reason.clone()).or_default() += n;
            }
        }
        Some(out)
    }
}

/// Drops with a capacity reason in an agent's by-reason counts.
fn capacity_drops(by_reason: &BTreeMap<String, u64>) -> u64 {
    by_reason.iter().filter(|(r, _)| CAPACITY_DROP_REASONS.contains(&r.as_str())).map(|(_, n)| n).sum()
}

/// The capacity drops between two readings of a stream: the pod's own count,
/// or the agents' where both readings have it and it is higher (the same
/// drops, counted in the kernel; the pod's per-socket count can miss a
/// socket it has just closed).
fn capacity_delta(before: &StreamCounters, now: &StreamCounters) -> u64 {
    let pod = delta(before.kernel_drops_capacity, now.kernel_drops_capacity);
    match (&before.agent_drops, &now.agent_drops) {
        (Some(b), Some(n)) => pod.max(delta(capacity_drops(b), capacity_drops(n))),
        _ => pod,
    }
}

/// A counter's increase from `before` to `now`; a decrease is a restart, and
/// the new value is the increase since it.
fn delta(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// What one shard's pod answered in a round, and when. A shard that did not
/// answer (or has no IP yet) has no entry.
#[derive(Clone, Debug)]
pub struct ShardScrape {
    pub at: Timestamp,
    pub figures: PodFigures,
}

/// One pipeline's signal history and the previous readings to subtract.
#[derive(Debug, Default)]
pub struct Collector {
    pub signals: Signals,
    /// Per shard: when it was last read and its workers' busy seconds then.
    busy_before: HashMap<u32, (Timestamp, BTreeMap<String, f64>)>,
    /// Per stream: the shard it was last read on and its counters there.
    counters_before: HashMap<String, (u32, StreamCounters)>,
    /// The newest counters of every stream that answered, for status.
    pub latest: BTreeMap<String, StreamCounters>,
}

impl Collector {
    /// Adds one round at `now`: `replicas` shards are running, `owners` gives
    /// each stream (in spec order) its shard, and `scrapes` what each shard's
    /// pod answered (a shard without an entry failed). Samples older than
    /// `history` are dropped.
    pub fn record(
        &mut self,
        now: Timestamp,
        replicas: u32,
        owners: &[(String, u32)],
        scrapes: &HashMap<u32, ShardScrape>,
        history: Duration,
    ) {
        self.signals.replicas = replicas;
        // Shards.
        self.signals.shards.retain(|s| s.shard < replicas);
        self.busy_before.retain(|&shard, _| shard < replicas);
        for shard in 0..replicas {
            let sample = match scrapes.get(&shard) {
                Some(ShardScrape { at, figures }) => {
                    let busy = match self.busy_before.get(&shard) {
                        Some((then, before)) if *at > *then => {
                            let wall = (*at - *then).as_secs_f64();
                            Some(
                                figures
                                    .busy_seconds
                                    .iter()
                                    .map(|(w, &b)| {
                                        let a = before.get(w).copied().unwrap_or(0.0);
                                        let d = if b >= a { b - a } else { b };
                                        (d / wall).clamp(0.0, 1.0)
                                    })
                                    .fold(0.0, f64::max),
                            )
                        }
                        _ => None,
                    };
                    self.busy_before.insert(shard, (*at, figures.busy_seconds.clone()));
                    // Kernel drops on every socket of the shard's streams.
                    let mut drops = Some(0u64);
                    for (stream, counters) in &figures.streams {
                        match self.counters_before.get(stream) {
                            Some((was, before)) if *was == shard => {
                                drops = drops.map(|d| d + capacity_delta(before, counters));
                            }
                            // First reading of this stream on this shard:
                            // its drops so far happened since it started
                            // here, within about one round.
                            _ => drops = drops.map(|d| d + counters.kernel_drops_capacity),
                        }
                    }
                    ShardSample { at: *at, kernel_drops: drops, busy }
                }
                _ => ShardSample { at: now, kernel_drops: None, busy: None },
            };
            push(shard_entry(&mut self.signals.shards, shard), sample, now, history);
        }
        // Streams.
        self.signals.streams.retain(|s| owners.iter().any(|(name, _)| name == &s.stream));
        self.counters_before.retain(|name, _| owners.iter().any(|(n, _)| n == name));
        self.latest.retain(|name, _| owners.iter().any(|(n, _)| n == name));
        for (name, shard) in owners {
            let answered = match scrapes.get(shard) {
                Some(ShardScrape { at, figures }) => figures.streams.get(name).map(|c| (*at, c)),
                _ => None,
            };
            let sample = match answered {
                Some((at, counters)) => {
                    let mut counters = counters.clone();
                    counters.note_last_error(match self.counters_before.get(name) {
                        Some((was, before)) if was == shard => Some(before),
                        _ => None,
                    });
                    let counters = &counters;
                    let sample = match self.counters_before.get(name) {
                        Some((was, before)) if was == shard => {
                            let received = delta(before.received, counters.received);
                            let recovered = delta(before.recovered, counters.recovered);
                            StreamSample {
                                at,
                                // The policy counts packets that arrived in
                                // order; repairs are part of `received`.
                                packets_received: Some(received.saturating_sub(recovered)),
                                packets_lost: Some(delta(before.lost, counters.lost)),
                                packets_unrecovered: Some(delta(before.unrecovered, counters.unrecovered)),
                                frames_dropped: Some(delta(before.frames_dropped, counters.frames_dropped)),
                            }
                        }
                        _ => StreamSample { at, ..StreamSample::default() },
                    };
                    self.counters_before.insert(name.clone(), (*shard, counters.clone()));
                    self.latest.insert(name.clone(), counters.clone());
                    sample
                }
                None => StreamSample { at: now, ..StreamSample::default() },
            };
            let rendition = answered.and_then(|(_, c)| c.rendition);
            let entry = stream_entry(&mut self.signals.streams, name);
            entry.shard = *shard;
            if let Some(r) = rendition {
                entry.rendition = r;
            }
            push_stream(entry, sample, now, history);
        }
    }
}

fn shard_entry(shards: &mut Vec<ShardSignals>, shard: u32) -> &mut ShardSignals {
    let at = match shards.iter().position(|s| s.shard == shard) {
        Some(i) => i,
        None => {
            shards.push(ShardSignals { shard, samples: Vec::new() });
            shards.len() - 1
        }
    };
    &mut shards[at]
}

fn stream_entry<'a>(streams: &'a mut Vec<StreamSignals>, name: &str) -> &'a mut StreamSignals {
    let at = match streams.iter().position(|s| s.stream == name) {
        Some(i) => i,
        None => {
            streams.push(StreamSignals { stream: name.to_string(), ..StreamSignals::default() });
            streams.len() - 1
        }
    };
    &mut streams[at]
}

/// Appends in time order (a sample older than the newest is dropped: the
/// policy refuses windows out of order) and trims to `history`.
fn push_sample<S>(samples: &mut Vec<S>, sample: S, at: fn(&S) -> Timestamp, now: Timestamp, history: Duration) {
    if samples.last().is_some_and(|last| at(last) > at(&sample)) {
        return;
    }
    samples.push(sample);
    let cut = now.saturating_sub(history);
    let old = samples.iter().take_while(|s| at(s) < cut).count();
    samples.drain(..old);
}

fn push(shard: &mut ShardSignals, sample: ShardSample, now: Timestamp, history: Duration) {
    push_sample(&mut shard.samples, sample, |s| s.at, now, history);
}

fn push_stream(stream: &mut StreamSignals, sample: StreamSample, now: Timestamp, history: Duration) {
    push_sample(&mut stream.samples, sample, |s| s.at, now, history);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse_text;

    fn pod(busy: f64, lost: u64, unrecovered: u64, dropped: u64, kernel: u64) -> PodFigures {
        let text = format!(
            "zerodrop_worker_busy_seconds_total{{worker=\"0\"}} {busy}\n\
             zerodrop_worker_busy_seconds_total{{worker=\"1\"}} 0.1\n\
             zerodrop_rtp_packets_received_total{{pipeline=\"p\",stream=\"a\"}} {received}\n\
             zerodrop_rtp_packets_recovered_total{{pipeline=\"p\",stream=\"a\",method=\"nack\"}} {recovered}\n\
             zerodrop_rtp_packets_recovered_total{{pipeline=\"p\",stream=\"a\",method=\"fec\"}} 0\n\
             zerodrop_rtp_packets_lost_total{{pipeline=\"p\",stream=\"a\"}} {lost}\n\
             zerodrop_rtp_packets_unrecovered_total{{pipeline=\"p\",stream=\"a\"}} {unrecovered}\n\
             zerodrop_frames_dropped_total{{pipeline=\"p\",stream=\"a\",reason=\"incomplete\"}} {dropped}\n\
             zerodrop_frames_decoded_total{{pipeline=\"p\",stream=\"a\"}} 100\n\
             zerodrop_kernel_udp_drops_total{{pipeline=\"p\",stream=\"a\",reason=\"SOCKET_OVERFLOW\",source=\"procfs\"}} {kernel}\n\
             zerodrop_kernel_udp_drops_total{{pipeline=\"p\",stream=\"a\",reason=\"UDP_CSUM\",source=\"ebpf\"}} 9\n\
             zerodrop_decoder_info{{pipeline=\"p\",stream=\"a\",decoder=\"avdec_h264\"}} 1\n\
             zerodrop_rtp_packets_lost_total{{pipeline=\"other\",stream=\"a\"}} 999\n",
            received = 1000 + lost * 10,
            recovered = lost - unrecovered,
        );
        pod_figures(&parse_text(&text).0, "p")
    }

    fn secs(s: u64) -> Timestamp {
        Duration::from_secs(s)
    }

    #[test]
    fn a_pulled_sources_connection_is_read_and_its_latest_failure_is_the_reason_that_grew() {
        let text = |unauthorized: u64, timeout: u64, connected: u8| {
            format!(
                "zerodrop_ingest_connected{{pipeline=\"p\",stream=\"door\"}} {connected}\n\
                 zerodrop_ingest_reconnects_total{{pipeline=\"p\",stream=\"door\"}} {}\n\
                 zerodrop_ingest_errors_total{{pipeline=\"p\",stream=\"door\",reason=\"unauthorized\"}} {unauthorized}\n\
                 zerodrop_ingest_errors_total{{pipeline=\"p\",stream=\"door\",reason=\"timeout\"}} {timeout}\n\
                 zerodrop_ingest_last_frame_timestamp_seconds{{pipeline=\"p\",stream=\"door\"}} 1796550179.5\n",
                unauthorized + timeout
            )
        };
        let read = |t: String| pod_figures(&parse_text(&t).0, "p").streams["door"].clone();
        let mut first = read(text(5, 1, 0));
        assert_eq!((first.ingest_connected, first.ingest_reconnects, first.ingest_last_frame), (Some(false), 6, Some(1796550179.5)));
        first.note_last_error(None);
        assert_eq!(first.ingest_last_error.as_deref(), Some("unauthorized"));
        let mut second = read(text(5, 2, 1));
        second.note_last_error(Some(&first));
        assert_eq!(second.ingest_last_error.as_deref(), Some("timeout"));
        let mut third = read(text(5, 2, 1));
        third.note_last_error(Some(&second));
        assert_eq!(third.ingest_last_error.as_deref(), Some("timeout"), "kept while nothing grows");
        // A pushed source has no connection to report.
        assert_eq!(pod(2.0, 10, 2, 1, 7).streams["a"].ingest_connected, None);
    }

    #[test]
    fn figures_of_the_pipeline_are_picked_and_capacity_drops_told_apart() {
        let f = pod(2.0, 10, 2, 1, 7);
        let a = &f.streams["a"];
        assert_eq!((a.lost, a.unrecovered, a.recovered, a.frames_dropped), (10, 2, 8, 1));
        assert_eq!((a.kernel_drops_capacity, a.kernel_drops), (7, 16));
        assert_eq!(a.decoder.as_deref(), Some("avdec_h264"));
        assert_eq!(f.busy_seconds["0"], 2.0);
        assert_eq!(f.streams.len(), 1, "the other pipeline's series are left out");
    }

    #[test]
    fn deltas_busy_share_and_restarts() {
        let mut c = Collector::default();
        let owners = vec![("a".to_string(), 0)];
        let history = Duration::from_secs(60);
        let round = |c: &mut Collector, t: u64, figures: Option<PodFigures>| {
            let scrapes: HashMap<u32, ShardScrape> =
                figures.map(|f| (0, ShardScrape { at: secs(t), figures: f })).into_iter().collect();
            c.record(secs(t), 1, &owners, &scrapes, history);
        };
        round(&mut c, 1, Some(pod(1.0, 10, 2, 1, 0)));
        // The first reading has nothing to subtract.
        assert_eq!(c.signals.shards[0].samples[0].busy, None);
        assert_eq!(c.signals.streams[0].samples[0].packets_lost, None);
        round(&mut c, 2, Some(pod(1.5, 15, 3, 2, 4)));
        let shard = c.signals.shards[0].samples[1];
        assert_eq!(shard.busy, Some(0.5), "0.5 s busy in a 1 s interval");
        assert_eq!(shard.kernel_drops, Some(4), "capacity reasons only");
        let s = c.signals.streams[0].samples[1];
        assert_eq!((s.packets_lost, s.packets_unrecovered, s.frames_dropped), (Some(5), Some(1), Some(1)));
        // received grew by 50, 4 of them repairs: 46 arrived in order.
        assert_eq!(s.packets_received, Some(46));
        // A failed scrape is missing data for the shard and its streams.
        round(&mut c, 3, None);
        assert_eq!(c.signals.shards[0].samples[2], ShardSample { at: secs(3), kernel_drops: None, busy: None });
        assert_eq!(c.signals.streams[0].samples[2].packets_lost, None);
        // The pod restarted: counters fell, the new values are the increase.
        round(&mut c, 4, Some(pod(0.25, 1, 0, 0, 0)));
        let s = c.signals.streams[0].samples[3];
        assert_eq!(s.packets_lost, Some(1));
        assert_eq!(c.signals.shards[0].samples[3].busy, Some(0.125), "0.25 s over the 2 s since the last answer");
    }

    #[test]
    fn a_stream_that_moved_shards_gives_no_figures_for_its_first_round_there() {
        let mut c = Collector::default();
        let history = Duration::from_secs(60);
        let answered = |t: u64, shard: u32| -> HashMap<u32, ShardScrape> {
            HashMap::from([(shard, ShardScrape { at: secs(t), figures: pod(1.0, 10, 0, 0, 0) })])
        };
        c.record(secs(1), 1, &[("a".into(), 0)], &answered(1, 0), history);
        c.record(secs(2), 1, &[("a".into(), 0)], &answered(2, 0), history);
        assert_eq!(c.signals.streams[0].samples[1].packets_lost, Some(0));
        // Rescaled to 2: "a" now on shard 1, whose counters are not shard 0's.
        c.record(secs(3), 2, &[("a".into(), 1)], &answered(3, 1), history);
        assert_eq!(c.signals.streams[0].shard, 1);
        assert_eq!(c.signals.streams[0].samples[2].packets_lost, None);
        assert_eq!(c.signals.shards.len(), 2);
        assert_eq!(c.signals.shards.iter().find(|s| s.shard == 0).unwrap().samples.last().unwrap().busy, None, "shard 0 did not answer");
    }

    fn agent(text: &str) -> Vec<MetricSample> {
        parse_text(text).0
    }

    #[test]
    fn agent_drops_are_joined_by_pod_ip_and_every_port_of_the_stream() {
        let mut drops = AgentDrops::new(2);
        drops.add(&agent(
            "zerodrop_kernel_udp_drops_total{address=\"10.1.0.7\",port=\"5000\",reason=\"SOCKET_RCVBUFF\",source=\"ebpf\"} 40\n\
             zerodrop_kernel_udp_drops_total{address=\"10.1.0.7\",port=\"5002\",reason=\"SOCKET_RCVBUFF\",source=\"ebpf\"} 2\n\
             zerodrop_kernel_udp_drops_total{address=\"10.1.0.7\",port=\"5002\",reason=\"NO_SOCKET\",source=\"ebpf\"} 3\n\
             zerodrop_kernel_udp_drops_total{address=\"10.1.0.8\",port=\"5000\",reason=\"SOCKET_RCVBUFF\",source=\"ebpf\"} 900\n\
             zerodrop_kernel_udp_drops_total{pipeline=\"p\",stream=\"a\",reason=\"SOCKET_OVERFLOW\",source=\"procfs\"} 77\n",
        ));
        assert_eq!(drops.for_sockets("10.1.0.7".parse().unwrap(), &[5000, 5002]), None, "one of two agents answered");
        drops.add(&agent("zerodrop_kernel_udp_drops_total{address=\"::ffff:10.1.0.7\",port=\"5001\",reason=\"UDP_CSUM\",source=\"ebpf\"} 1\n"));
        let a = drops.for_sockets("10.1.0.7".parse().unwrap(), &[5000, 5001, 5002]).unwrap();
        assert_eq!(a, BTreeMap::from([("NO_SOCKET".into(), 3), ("SOCKET_RCVBUFF".into(), 42), ("UDP_CSUM".into(), 1)]));
        assert_eq!(capacity_drops(&a), 42, "NO_SOCKET and UDP_CSUM are not the shard's capacity");
        assert_eq!(drops.for_sockets("10.1.0.9".parse().unwrap(), &[5000]), Some(BTreeMap::new()), "every agent answered: none");
        assert_eq!(AgentDrops::new(0).for_sockets("10.1.0.7".parse().unwrap(), &[5000]), None, "no agents: no figure");
    }

    #[test]
    fn a_shards_capacity_drops_take_the_agents_count_when_it_is_higher() {
        let with_agent = |kernel: u64, agent: Option<u64>| {
            let mut f = pod(1.0, 0, 0, 0, kernel);
            f.streams.get_mut("a").unwrap().agent_drops = agent.map(|n| BTreeMap::from([("SOCKET_RCVBUFF".to_string(), n)]));
            f
        };
        let mut c = Collector::default();
        let owners = vec![("a".to_string(), 0)];
        let history = Duration::from_secs(60);
        for (t, f) in [(1, with_agent(0, Some(100))), (2, with_agent(5, Some(130))), (3, with_agent(9, None)), (4, with_agent(9, Some(140)))] {
            c.record(secs(t), 1, &owners, &HashMap::from([(0, ShardScrape { at: secs(t), figures: f })]), history);
        }
        let drops: Vec<Option<u64>> = c.signals.shards[0].samples.iter().map(|s| s.kernel_drops).collect();
        // 1: first reading, the pod's own 0; 2: agent +30 over the pod's +5;
        // 3: no agent figure, the pod's +4; 4: the agent's previous reading is
        // missing, so the pod's +0.
        assert_eq!(drops, [Some(0), Some(30), Some(4), Some(0)]);
    }

    #[test]
    fn history_is_trimmed_and_streams_that_left_the_spec_forgotten() {
        let mut c = Collector::default();
        let history = Duration::from_secs(5);
        for t in 1..=20 {
            let scrapes = HashMap::from([(0, ShardScrape { at: secs(t), figures: pod(t as f64, 10, 0, 0, 0) })]);
            c.record(secs(t), 1, &[("a".into(), 0)], &scrapes, history);
        }
        assert!(c.signals.shards[0].samples.len() <= 6, "{} samples kept", c.signals.shards[0].samples.len());
        assert!(c.signals.shards[0].samples.iter().all(|s| s.at >= secs(15)));
        c.record(secs(21), 1, &[], &HashMap::new(), history);
        assert!(c.signals.streams.is_empty());
        assert!(c.latest.is_empty());
    }
}
