//! Stream-health metrics (prometheus-client, OpenMetrics text) and the HTTP
//! endpoint that serves them with a health check.
//!
//! The counters here are the one record of what happened to a stream: the live
//! table, the run report and `/metrics` all read the same handles.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub pipeline: String,
    pub stream: String,
}

/// How a missing packet came back: the `method` label of
/// `zerodrop_rtp_packets_recovered_total`, written lowercase as the README
/// documents (`nack`, `reorder`, `fec`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RepairMethod {
    Nack,
    Reorder,
    Fec,
}

impl RepairMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairMethod::Nack => "nack",
            RepairMethod::Reorder => "reorder",
            RepairMethod::Fec => "fec",
        }
    }
}

impl EncodeLabelValue for RepairMethod {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveredLabels {
    pub pipeline: String,
    pub stream: String,
    pub method: RepairMethod,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub pipeline: String,
    pub stream: String,
    pub reason: String,
}

/// `zerodrop_bitrate_requests_sent_total`'s labels: `method` is the RTCP
/// message, `tmmbr` or `remb` (the source's `bitrateRequest`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BitrateRequestLabels {
    pub pipeline: String,
    pub stream: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelDropLabels {
    pub pipeline: String,
    pub stream: String,
    pub reason: String,
    /// `ebpf` or `procfs`: which counter saw the drops.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecoderLabels {
    pub pipeline: String,
    pub stream: String,
    pub decoder: String,
}

pub type F64Gauge = Gauge<f64, AtomicU64>;
/// Seconds, counted in fractions.
pub type SecondsCounter = Counter<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

/// 1 µs .. ~16 ms: work done on the receive thread per frame.
fn short_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-6, 2.0, 15))
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~8 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 14,
    ))
}

/// Every metric family the data plane exports.
pub struct Metrics {
    registry: Registry,
    packets_received: Family<StreamLabels, Counter>,
    packets_lost: Family<StreamLabels, Counter>,
    packets_recovered: Family<RecoveredLabels, Counter>,
    packets_unrecovered: Family<StreamLabels, Counter>,
    packets_duplicate: Family<StreamLabels, Counter>,
    packets_late: Family<StreamLabels, Counter>,
    packets_discarded: Family<ReasonLabels, Counter>,
    bytes_received: Family<StreamLabels, Counter>,
    nacks_sent: Family<StreamLabels, Counter>,
    retransmissions_received: Family<StreamLabels, Counter>,
    fec_packets_received: Family<StreamLabels, Counter>,
    nacks_refused: Family<StreamLabels, Counter>,
    nacks_avoided: Family<StreamLabels, Counter>,
    keyframe_requests: Family<StreamLabels, Counter>,
    frames_expected: Family<StreamLabels, Counter>,
    frames_assembled: Family<StreamLabels, Counter>,
    frames_decoded: Family<StreamLabels, Counter>,
    frames_dropped: Family<ReasonLabels, Counter>,
    frames_skipped: Family<StreamLabels, Counter>,
    frames_skipped_by_reason: Family<ReasonLabels, Counter>,
    rendition_decoding: Family<StreamLabels, Gauge>,
    hls_segments: Family<StreamLabels, Counter>,
    hls_segment_delay: Family<StreamLabels, Histogram, fn() -> Histogram>,
    restream_send: Family<StreamLabels, Histogram, fn() -> Histogram>,
    frames_feed_dropped: Family<StreamLabels, Counter>,
    frames_feed_clients: Family<StreamLabels, Gauge>,
    sender_clock_offset: Family<StreamLabels, F64Gauge>,
    sender_clock_drift: Family<StreamLabels, F64Gauge>,
    restream_packets_sent: Family<StreamLabels, Counter>,
    restream_keyframe_requests: Family<StreamLabels, Counter>,
    restream_keyframe_delay: Family<StreamLabels, Histogram, fn() -> Histogram>,
    restream_send_errors: Family<StreamLabels, Counter>,
    ingest_connected: Family<StreamLabels, Gauge>,
    ingest_reconnects: Family<StreamLabels, Counter>,
    ingest_errors: Family<ReasonLabels, Counter>,
    ingest_last_frame: Family<StreamLabels, F64Gauge>,
    ingest_disconnected: Family<StreamLabels, SecondsCounter>,
    gop_interval: Family<StreamLabels, F64Gauge>,
    join_to_first_frame: Family<StreamLabels, F64Gauge>,
    bitrate_requested: Family<StreamLabels, Gauge>,
    bitrate_acknowledged: Family<StreamLabels, Gauge>,
    bitrate_requests_sent: Family<BitrateRequestLabels, Counter>,
    jitter: Family<StreamLabels, F64Gauge>,
    rtt: Family<StreamLabels, F64Gauge>,
    assembly_latency: Family<StreamLabels, Histogram, fn() -> Histogram>,
    decode_latency: Family<StreamLabels, Histogram, fn() -> Histogram>,
    decoder_info: Family<DecoderLabels, Gauge>,
    stream_up: Family<StreamLabels, Gauge>,
    receive_buffer: Family<StreamLabels, Gauge>,
    /// Dropped frames summed over reasons (not exported: the sum of the
    /// exported family), for the live table and the report.
    frames_dropped_sum: Family<StreamLabels, Counter>,
    kernel_drops: Family<KernelDropLabels, Counter>,
    kernel_drops_sum: Family<StreamLabels, Counter>,
    decoder_names: Arc<Mutex<std::collections::HashMap<StreamLabels, String>>>,
    worker_busy: Family<WorkerLabels, SecondsCounter>,
    policy_decisions: Family<DecisionLabels, Counter>,
    rendition: Family<StreamLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub pipeline: String,
    pub action: String,
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zerodrop");
        let m = Metrics {
            worker_busy: Family::default(),
            policy_decisions: Family::default(),
            rendition: Family::default(),
            packets_received: Family::default(),
            packets_lost: Family::default(),
            packets_recovered: Family::default(),
            packets_unrecovered: Family::default(),
            packets_duplicate: Family::default(),
            packets_late: Family::default(),
            packets_discarded: Family::default(),
            bytes_received: Family::default(),
            nacks_sent: Family::default(),
            retransmissions_received: Family::default(),
            fec_packets_received: Family::default(),
            nacks_refused: Family::default(),
            nacks_avoided: Family::default(),
            keyframe_requests: Family::default(),
            frames_expected: Family::default(),
            frames_assembled: Family::default(),
            frames_decoded: Family::default(),
            frames_dropped: Family::default(),
            frames_skipped: Family::default(),
            frames_skipped_by_reason: Family::default(),
            rendition_decoding: Family::default(),
            hls_segments: Family::default(),
            hls_segment_delay: Family::new_with_constructor(latency_histogram),
            restream_send: Family::new_with_constructor(short_histogram),
            frames_feed_dropped: Family::default(),
            frames_feed_clients: Family::default(),
            sender_clock_offset: Family::default(),
            sender_clock_drift: Family::default(),
            restream_packets_sent: Family::default(),
            restream_keyframe_requests: Family::default(),
            restream_keyframe_delay: Family::new_with_constructor(latency_histogram),
            restream_send_errors: Family::default(),
            ingest_connected: Family::default(),
            ingest_reconnects: Family::default(),
            ingest_errors: Family::default(),
            ingest_last_frame: Family::default(),
            ingest_disconnected: Family::default(),
            gop_interval: Family::default(),
            join_to_first_frame: Family::default(),
            bitrate_requested: Family::default(),
            bitrate_acknowledged: Family::default(),
            bitrate_requests_sent: Family::default(),
            jitter: Family::default(),
            rtt: Family::default(),
            assembly_latency: Family::new_with_constructor(latency_histogram),
            decode_latency: Family::new_with_constructor(latency_histogram),
            decoder_info: Family::default(),
            stream_up: Family::default(),
            receive_buffer: Family::default(),
            frames_dropped_sum: Family::default(),
            kernel_drops: Family::default(),
            kernel_drops_sum: Family::default(),
            decoder_names: Arc::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rtp_packets_received",
            "Media packets accepted, originals and repairs",
            m.packets_received.clone(),
        );
        r.register(
            "rtp_packets_lost",
            "Media packets that went missing on the network (gaps seen)",
            m.packets_lost.clone(),
        );
        r.register(
            "rtp_packets_recovered",
            "Missing media packets that arrived in time, by method",
            m.packets_recovered.clone(),
        );
        r.register(
            "rtp_packets_unrecovered",
            "Media packets declared lost at their deadline",
            m.packets_unrecovered.clone(),
        );
        r.register(
            "rtp_packets_duplicate",
            "Media packets received twice",
            m.packets_duplicate.clone(),
        );
        r.register(
            "rtp_packets_late",
            "Media packets that arrived after being declared lost",
            m.packets_late.clone(),
        );
        r.register(
            "rtp_packets_discarded",
            "Datagrams discarded unparsed or unusable, by reason",
            m.packets_discarded.clone(),
        );
        r.register_with_unit(
            "rtp_received",
            "Datagram bytes received on the RTP socket",
            Unit::Bytes,
            m.bytes_received.clone(),
        );
        r.register(
            "nacks_sent",
            "Sequence numbers requested by generic NACK (RFC 4585)",
            m.nacks_sent.clone(),
        );
        r.register(
            "retransmissions_received",
            "RTX packets received (RFC 4588)",
            m.retransmissions_received.clone(),
        );
        r.register(
            "fec_packets_received",
            "FEC packets received (ST 2022-1 or ULPFEC)",
            m.fec_packets_received.clone(),
        );
        r.register(
            "nacks_refused",
            "Retransmission requests withheld by the retransmission budget (a share of the received packet rate)",
            m.nacks_refused.clone(),
        );
        r.register(
            "nacks_avoided",
            "Missing packets FEC recovered before any retransmission was requested",
            m.nacks_avoided.clone(),
        );
        r.register(
            "keyframe_requests",
            "Picture loss indications sent",
            m.keyframe_requests.clone(),
        );
        r.register(
            "frames_expected",
            "Frames the source sent, as far as the receiver can tell",
            m.frames_expected.clone(),
        );
        r.register(
            "frames_assembled",
            "Whole access units handed to the decoder",
            m.frames_assembled.clone(),
        );
        r.register(
            "frames_decoded",
            "Frames the decoder produced",
            m.frames_decoded.clone(),
        );
        r.register(
            "frames_dropped",
            "Frames not delivered whole, by reason",
            m.frames_dropped.clone(),
        );
        r.register(
            "frames_skipped_before_keyframe",
            "Frames before the stream's first keyframe",
            m.frames_skipped.clone(),
        );
        r.register(
            "frames_skipped",
            "Frames received whole but deliberately not decoded, by reason (inactive_rendition: a rendition of a camera whose other rendition is decoded)",
            m.frames_skipped_by_reason.clone(),
        );
        r.register(
            "rendition_decoding",
            "1 while a source is decoded, 0 while it is a rendition group member received and repaired only",
            m.rendition_decoding.clone(),
        );
        r.register(
            "hls_segments",
            "HLS segments published (each starts at a keyframe)",
            m.hls_segments.clone(),
        );
        r.register_with_unit(
            "sender_clock_offset",
            "The sender's wallclock (from its RTCP sender reports) minus ours when a report arrives, one-way delay included",
            Unit::Seconds,
            m.sender_clock_offset.clone(),
        );
        r.register(
            "sender_clock_drift_ppm",
            "How fast the sender's clock runs against ours, parts per million (positive: fast), fitted over the last minute of reports",
            m.sender_clock_drift.clone(),
        );
        r.register_with_unit(
            "hls_segment_delay",
            "From the arrival of a segment's first packet to the segment's publication: how far behind the live edge the newest segment starts",
            Unit::Seconds,
            m.hls_segment_delay.clone(),
        );
        r.register_with_unit(
            "restream_send",
            "Time to packetise one frame and send it to every restream destination",
            Unit::Seconds,
            m.restream_send.clone(),
        );
        r.register(
            "frames_feed_dropped",
            "Decoded frames a raw-frame socket client missed because it read too slowly",
            m.frames_feed_dropped.clone(),
        );
        r.register(
            "frames_feed_clients",
            "Programs connected to the stream's raw-frame socket",
            m.frames_feed_clients.clone(),
        );
        r.register(
            "restream_packets_sent",
            "RTP packets of the restream sent, summed over destinations",
            m.restream_packets_sent.clone(),
        );
        r.register(
            "restream_keyframe_requests",
            "Keyframe requests (PLI, FIR) from the restream's receivers, each passed on to the source at once",
            m.restream_keyframe_requests.clone(),
        );
        r.register_with_unit(
            "restream_keyframe_delay",
            "From a restream receiver's keyframe request to the first keyframe sent after it (a joining receiver's wait for its first picture, on our side)",
            Unit::Seconds,
            m.restream_keyframe_delay.clone(),
        );
        r.register(
            "restream_send_errors",
            "Restream RTP and RTCP packets the kernel did not take (buffer full, no route)",
            m.restream_send_errors.clone(),
        );
        r.register(
            "ingest_connected",
            "1 while a pulled source (RTSP) has a playing session with its server, 0 while it dials or waits to dial again",
            m.ingest_connected.clone(),
        );
        r.register(
            "ingest_reconnects",
            "Times a pulled source dialled its server again after losing or failing to get a session",
            m.ingest_reconnects.clone(),
        );
        r.register(
            "ingest_errors",
            "Why a pulled source's session failed or ended, by reason (unauthorized, not_found, refused, timeout, no_stream, credentials, ended, protocol, network)",
            m.ingest_errors.clone(),
        );
        r.register_with_unit(
            "ingest_last_frame_timestamp",
            "Unix time at which the last frame's final packet (RTP marker) of a pulled source arrived: now minus this is the time since the last frame",
            Unit::Seconds,
            m.ingest_last_frame.clone(),
        );
        r.register_with_unit(
            "ingest_disconnected",
            "Time a pulled source spent without a playing session (dialling, backing off, or failing to get one), the first dial included: the gaps in its stream",
            Unit::Seconds,
            m.ingest_disconnected.clone(),
        );
        r.register_with_unit(
            "gop_interval",
            "Time between the last two keyframes",
            Unit::Seconds,
            m.gop_interval.clone(),
        );
        r.register_with_unit(
            "join_to_first_frame",
            "From a stream's first packet (or a sender's restart) to its first frame handed to the decoder",
            Unit::Seconds,
            m.join_to_first_frame.clone(),
        );
        r.register_with_unit(
            "worker_busy",
            "Time each receive worker thread spent on packets and timers rather than waiting for them",
            Unit::Seconds,
            m.worker_busy.clone(),
        );
        r.register(
            "policy_decisions",
            "Decisions of the control policy, by action and reason",
            m.policy_decisions.clone(),
        );
        r.register(
            "rendition_index",
            "Position on its ladder of the rendition a stream's sender is asked for (0 = the highest), or for a rendition group member the position of the group's decoded source",
            m.rendition.clone(),
        );
        r.register(
            "bitrate_requested_bits_per_second",
            "Bit rate asked of the sender with RTCP TMMBR (RFC 5104) or REMB, as the source's bitrateRequest says, 0 when none was asked",
            m.bitrate_requested.clone(),
        );
        r.register(
            "bitrate_request_acknowledged",
            "1 once the sender acknowledged the bit rate asked for with TMMBR (by TMMBN), 0 until then, -1 when it was asked with REMB, which has no acknowledgement",
            m.bitrate_acknowledged.clone(),
        );
        r.register(
            "bitrate_requests_sent",
            "RTCP bit rate requests sent to a stream's sender, repeats included, by method (tmmbr or remb)",
            m.bitrate_requests_sent.clone(),
        );
        r.register_with_unit(
            "interarrival_jitter",
            "RFC 3550 inter-arrival jitter",
            Unit::Seconds,
            m.jitter.clone(),
        );
        r.register_with_unit(
            "round_trip_time",
            "Smoothed NACK-to-retransmission round trip",
            Unit::Seconds,
            m.rtt.clone(),
        );
        r.register_with_unit(
            "assembly_latency",
            "Time from a frame's first packet arriving to its access unit leaving the jitter buffer",
            Unit::Seconds,
            m.assembly_latency.clone(),
        );
        r.register_with_unit(
            "frame_latency",
            "Time from a frame's first packet arriving to the decoded frame",
            Unit::Seconds,
            m.decode_latency.clone(),
        );
        r.register(
            "decoder_info",
            "Decoder element in use (value 1)",
            m.decoder_info.clone(),
        );
        r.register(
            "stream_up",
            "1 while packets arrive, 0 when the source went silent",
            m.stream_up.clone(),
        );
        r.register(
            "kernel_udp_drops",
            "UDP packets for the stream's sockets the kernel dropped, by drop reason and counter source",
            m.kernel_drops.clone(),
        );
        r.register_with_unit(
            "socket_receive_buffer",
            "Receive buffer the kernel granted the RTP socket",
            Unit::Bytes,
            m.receive_buffer.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Handles for one stream; cheap clones of the shared atomics.
    /// The busy-time counter of receive worker `worker` (its index).
    pub fn worker_busy(&self, worker: usize) -> SecondsCounter {
        self.worker_busy.get_or_create(&WorkerLabels { worker: worker.to_string() }).clone()
    }

    /// Counts one policy decision of `pipeline`.
    pub fn policy_decision(&self, pipeline: &str, action: &str, reason: &str) {
        let l = DecisionLabels { pipeline: pipeline.into(), action: action.into(), reason: reason.into() };
        self.policy_decisions.get_or_create(&l).inc();
    }

    /// The rendition a stream's sender is asked for, by ladder position.
    pub fn set_rendition(&self, pipeline: &str, stream: &str, index: usize) {
        let l = StreamLabels { pipeline: pipeline.into(), stream: stream.into() };
        self.rendition.get_or_create(&l).set(index as i64);
    }

    pub fn stream(&self, pipeline: &str, stream: &str) -> StreamMetrics {
        let l = StreamLabels {
            pipeline: pipeline.into(),
            stream: stream.into(),
        };
        let method = |method| RecoveredLabels {
            pipeline: pipeline.into(),
            stream: stream.into(),
            method,
        };
        StreamMetrics {
            labels: l.clone(),
            packets_received: handle(&self.packets_received, &l),
            packets_lost: handle(&self.packets_lost, &l),
            recovered_nack: handle(&self.packets_recovered, &method(RepairMethod::Nack)),
            recovered_reorder: handle(&self.packets_recovered, &method(RepairMethod::Reorder)),
            packets_unrecovered: handle(&self.packets_unrecovered, &l),
            packets_duplicate: handle(&self.packets_duplicate, &l),
            packets_late: handle(&self.packets_late, &l),
            packets_discarded: self.packets_discarded.clone(),
            bytes_received: handle(&self.bytes_received, &l),
            nacks_sent: handle(&self.nacks_sent, &l),
            retransmissions_received: handle(&self.retransmissions_received, &l),
            recovered_fec: handle(&self.packets_recovered, &method(RepairMethod::Fec)),
            fec_packets_received: handle(&self.fec_packets_received, &l),
            nacks_refused: handle(&self.nacks_refused, &l),
            nacks_avoided: handle(&self.nacks_avoided, &l),
            keyframe_requests: handle(&self.keyframe_requests, &l),
            frames_expected: handle(&self.frames_expected, &l),
            frames_assembled: handle(&self.frames_assembled, &l),
            frames_decoded: handle(&self.frames_decoded, &l),
            frames_dropped: self.frames_dropped.clone(),
            frames_dropped_total: handle(&self.frames_dropped_sum, &l),
            kernel_drops: self.kernel_drops.clone(),
            kernel_drops_total: handle(&self.kernel_drops_sum, &l),
            frames_skipped: handle(&self.frames_skipped, &l),
            // Known in advance: a dashboard reads 0, not "no data".
            frames_skipped_inactive: handle(
                &self.frames_skipped_by_reason,
                &ReasonLabels { pipeline: pipeline.into(), stream: stream.into(), reason: "inactive_rendition".into() },
            ),
            rendition_decoding: handle(&self.rendition_decoding, &l),
            hls_segments: handle(&self.hls_segments, &l),
            hls_segment_delay: handle(&self.hls_segment_delay, &l),
            restream_send: handle(&self.restream_send, &l),
            frames: crate::output::frames::FrameCounters {
                feed_dropped: handle(&self.frames_feed_dropped, &l),
                feed_clients: handle(&self.frames_feed_clients, &l),
            },
            sender_clock_offset: handle(&self.sender_clock_offset, &l),
            sender_clock_drift: handle(&self.sender_clock_drift, &l),
            restream: crate::output::restream::RestreamCounters {
                packets_sent: handle(&self.restream_packets_sent, &l),
                send_errors: handle(&self.restream_send_errors, &l),
                keyframe_requests: handle(&self.restream_keyframe_requests, &l),
                keyframe_delay: handle(&self.restream_keyframe_delay, &l),
            },
            ingest: IngestFamilies {
                connected: self.ingest_connected.clone(),
                reconnects: self.ingest_reconnects.clone(),
                errors: self.ingest_errors.clone(),
                last_frame: self.ingest_last_frame.clone(),
                disconnected: self.ingest_disconnected.clone(),
            },
            gop_interval: handle(&self.gop_interval, &l),
            join_to_first_frame: handle(&self.join_to_first_frame, &l),
            bitrate_requested: handle(&self.bitrate_requested, &l),
            bitrate_acknowledged: handle(&self.bitrate_acknowledged, &l),
            bitrate_requests_sent: self.bitrate_requests_sent.clone(),
            jitter: handle(&self.jitter, &l),
            rtt: handle(&self.rtt, &l),
            assembly_latency: handle(&self.assembly_latency, &l),
            decode_latency: handle(&self.decode_latency, &l),
            decoder_info: self.decoder_info.clone(),
            decoder_names: self.decoder_names.clone(),
            stream_up: handle(&self.stream_up, &l),
            receive_buffer: handle(&self.receive_buffer, &l),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A family member's handle. The family's read guard must be dropped before
/// the next `get_or_create` on it, or a write (new label set) deadlocks.
fn handle<S, M, C>(family: &Family<S, M, C>, labels: &S) -> M
where
    S: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

/// One stream's metric handles.
#[derive(Clone)]
pub struct StreamMetrics {
    pub labels: StreamLabels,
    pub packets_received: Counter,
    pub packets_lost: Counter,
    pub recovered_nack: Counter,
    pub recovered_reorder: Counter,
    pub packets_unrecovered: Counter,
    pub packets_duplicate: Counter,
    pub packets_late: Counter,
    packets_discarded: Family<ReasonLabels, Counter>,
    pub bytes_received: Counter,
    pub nacks_sent: Counter,
    pub retransmissions_received: Counter,
    pub recovered_fec: Counter,
    pub fec_packets_received: Counter,
    pub nacks_refused: Counter,
    pub nacks_avoided: Counter,
    pub keyframe_requests: Counter,
    pub frames_expected: Counter,
    pub frames_assembled: Counter,
    pub frames_decoded: Counter,
    frames_dropped: Family<ReasonLabels, Counter>,
    /// Sum over reasons, for the live table and the report.
    pub frames_dropped_total: Counter,
    kernel_drops: Family<KernelDropLabels, Counter>,
    /// Kernel drops summed over reasons, for the live table and the report.
    pub kernel_drops_total: Counter,
    pub frames_skipped: Counter,
    /// Frames of a rendition group member while another member is decoded
    /// (`zerodrop_frames_skipped_total{reason="inactive_rendition"}`).
    pub frames_skipped_inactive: Counter,
    /// 1 while the stream is decoded, 0 while it is an inactive rendition.
    pub rendition_decoding: Gauge,
    pub hls_segments: Counter,
    pub hls_segment_delay: Histogram,
    pub restream_send: Histogram,
    pub frames: crate::output::frames::FrameCounters,
    pub sender_clock_offset: F64Gauge,
    pub sender_clock_drift: F64Gauge,
    pub restream: crate::output::restream::RestreamCounters,
    /// A pulled source's connection metrics, made only for pulled sources
    /// (see [`StreamMetrics::ingest`]).
    ingest: IngestFamilies,
    pub gop_interval: F64Gauge,
    pub join_to_first_frame: F64Gauge,
    pub bitrate_requested: Gauge,
    pub bitrate_acknowledged: Gauge,
    /// Made on a stream's first bit rate request (see
    /// [`StreamMetrics::bitrate_requests_sent`]).
    bitrate_requests_sent: Family<BitrateRequestLabels, Counter>,
    pub jitter: F64Gauge,
    pub rtt: F64Gauge,
    pub assembly_latency: Histogram,
    pub decode_latency: Histogram,
    decoder_info: Family<DecoderLabels, Gauge>,
    decoder_names: Arc<Mutex<std::collections::HashMap<StreamLabels, String>>>,
    pub stream_up: Gauge,
    pub receive_buffer: Gauge,
}

/// The families of a pulled source's connection metrics.
#[derive(Clone)]
struct IngestFamilies {
    connected: Family<StreamLabels, Gauge>,
    reconnects: Family<StreamLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    last_frame: Family<StreamLabels, F64Gauge>,
    disconnected: Family<StreamLabels, SecondsCounter>,
}

/// A pulled source's connection metrics.
#[derive(Clone)]
pub struct IngestCounters {
    pub connected: Gauge,
    pub reconnects: Counter,
    pub(crate) errors: Family<ReasonLabels, Counter>,
    pub last_frame: F64Gauge,
    pub disconnected: SecondsCounter,
    pub(crate) labels: StreamLabels,
}

impl IngestCounters {
    /// Counts one failed or ended session under `reason`.
    pub fn error(&self, reason: &str) {
        let l = ReasonLabels { pipeline: self.labels.pipeline.clone(), stream: self.labels.stream.clone(), reason: reason.into() };
        self.errors.get_or_create(&l).inc();
    }

    /// Sessions that failed or ended for `reason` so far.
    pub fn errors(&self, reason: &str) -> u64 {
        let l = ReasonLabels { pipeline: self.labels.pipeline.clone(), stream: self.labels.stream.clone(), reason: reason.into() };
        self.errors.get(&l).map_or(0, |c| c.get())
    }
}

impl StreamMetrics {
    /// The connection metrics of a pulled source (RTSP, SRT), created on
    /// first use so that pushed sources export none.
    pub fn ingest(&self) -> IngestCounters {
        let f = &self.ingest;
        let l = &self.labels;
        IngestCounters {
            connected: handle(&f.connected, l),
            reconnects: handle(&f.reconnects, l),
            errors: f.errors.clone(),
            last_frame: handle(&f.last_frame, l),
            disconnected: handle(&f.disconnected, l),
            labels: l.clone(),
        }
    }

    /// The count of bit rate requests sent by `method`, created on first
    /// use so that streams never asked for a bit rate export none.
    pub fn bitrate_requests_sent(&self, method: zerodrop_core::BitrateRequest) -> Counter {
        let l = BitrateRequestLabels {
            pipeline: self.labels.pipeline.clone(),
            stream: self.labels.stream.clone(),
            method: method.as_str().into(),
        };
        handle(&self.bitrate_requests_sent, &l)
    }

    fn reason(&self, reason: &str) -> ReasonLabels {
        ReasonLabels {
            pipeline: self.labels.pipeline.clone(),
            stream: self.labels.stream.clone(),
            reason: reason.into(),
        }
    }

    pub fn discarded(&self, reason: &str) {
        self.packets_discarded
            .get_or_create(&self.reason(reason))
            .inc();
    }

    pub fn discarded_total(&self) -> u64 {
        [
            "rtp_header",
            "rtx_header",
            "payload_type",
            "ssrc",
            "rtcp",
            "depacketize",
            "unsupported",
            "local_socket",
        ]
        .iter()
        .map(|r| {
            self.packets_discarded
                .get(&self.reason(r))
                .map_or(0, |c| c.get())
        })
        .sum()
    }

    pub fn frames_dropped(&self, reason: &str, n: u64) {
        self.frames_dropped
            .get_or_create(&self.reason(reason))
            .inc_by(n);
        self.frames_dropped_total.inc_by(n);
        self.frames_expected.inc_by(n);
    }

    /// Frames handed to the decoder (so already expected) that it gave no
    /// picture for: reason `decode_error`.
    pub fn frames_dropped_by_decoder(&self, n: u64) {
        self.frames_dropped
            .get_or_create(&self.reason("decode_error"))
            .inc_by(n);
        self.frames_dropped_total.inc_by(n);
    }

    pub fn kernel_drops(&self, reason: &str, source: &str, n: u64) {
        let l = KernelDropLabels {
            pipeline: self.labels.pipeline.clone(),
            stream: self.labels.stream.clone(),
            reason: reason.into(),
            source: source.into(),
        };
        self.kernel_drops.get_or_create(&l).inc_by(n);
        self.kernel_drops_total.inc_by(n);
    }

    pub fn set_decoder(&self, name: &str) {
        let mut names = self.decoder_names.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |d: &str| DecoderLabels {
            pipeline: self.labels.pipeline.clone(),
            stream: self.labels.stream.clone(),
            decoder: d.into(),
        };
        if let Some(old) = names.insert(self.labels.clone(), name.to_string())
            && old != name
        {
            self.decoder_info.get_or_create(&labels(&old)).set(0);
        }
        self.decoder_info.get_or_create(&labels(name)).set(1);
    }

    pub fn decoder(&self) -> String {
        self.decoder_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.labels)
            .cloned()
            .unwrap_or_default()
    }

    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }
}

/// Sources that have bound their sockets and started their decoder, out of
/// those the process should run: `/readyz` answers 200 only when all are.
#[derive(Debug, Default)]
pub struct Readiness {
    state: Mutex<(
        std::collections::BTreeSet<String>,
        std::collections::BTreeSet<String>,
    )>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sources that should be running.
    pub fn set_expected(&self, ids: impl IntoIterator<Item = String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = ids.into_iter().collect();
    }

    pub fn mark_ready(&self, id: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .insert(id.to_string());
    }

    pub fn mark_gone(&self, id: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(id);
    }

    /// (ready, expected)
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.0.iter().filter(|id| s.1.contains(*id)).count(), s.0.len())
    }

    pub fn is_ready(&self) -> bool {
        let (ready, expected) = self.counts();
        ready == expected
    }

    /// The sources (`pipeline/stream`) that should run and have bound their
    /// sockets, one per line: `/readyz/streams`, which the operator reads to
    /// switch a moving stream's Service only once its new owner receives.
    pub fn ready_list(&self) -> String {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0.iter().filter(|id| s.1.contains(*id)).map(|id| format!("{id}\n")).collect()
    }
}

/// Serves `/metrics` (OpenMetrics), `/healthz` (the process is alive) and
/// `/readyz` (every source is receiving) on `addr` from a thread. Returns the
/// bound address (useful with port 0).
/// Serves `/metrics`, `/healthz`, `/readyz`, and what the outputs publish:
/// HLS (`/hls/<pipeline>/<stream>/...`) and thumbnails
/// (`/frames/<pipeline>/<stream>/latest.jpg`).
pub fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    published: Arc<crate::output::Published>,
) -> anyhow::Result<std::net::SocketAddr> {
    use crate::output::frames::FramesReply;
    use crate::output::hls::{HlsReply, PLAYLIST_CONTENT_TYPE, SEGMENT_CONTENT_TYPE};
    use zerodrop_telemetry::{Reply, Server};
    let server = Server::bind(addr).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    server.spawn("metrics-http", move |path| match path {
        _ if path.starts_with("/frames/") => match published.frames.serve(path) {
            // The latest frame changes all the time.
            Some(FramesReply::Jpeg(t)) => Reply::Body { content_type: "image/jpeg", cache_control: "no-store", body: t.jpeg },
            Some(FramesReply::NotFound(why)) => Reply::not_found(&why),
            Some(FramesReply::Error(why)) => Reply::Text(500, format!("{why}\n")),
            None => Reply::not_found("try /frames/<pipeline>/<stream>/latest.jpg"),
        },
        _ if path.starts_with("/hls/") => match published.hls.serve(path) {
            // A live playlist changes with every segment: never cached.
            Some(HlsReply::Playlist(text)) => {
                Reply::Body { content_type: PLAYLIST_CONTENT_TYPE, cache_control: "no-store", body: Arc::from(text.into_bytes()) }
            }
            // A segment never changes once published.
            Some(HlsReply::Segment(body)) => {
                Reply::Body { content_type: SEGMENT_CONTENT_TYPE, cache_control: "public, max-age=3600, immutable", body }
            }
            Some(HlsReply::NotFound(why)) => Reply::not_found(&why),
            None => Reply::not_found("try /hls/<pipeline>/<stream>/index.m3u8"),
        },
        "/metrics" => Reply::Metrics(metrics.encode()),
        "/healthz" => Reply::ok("ok\n"),
        "/readyz/streams" => Reply::Text(200, readiness.ready_list()),
        "/readyz" if readiness.is_ready() => Reply::ok("ready\n"),
        "/readyz" => {
            let (ready, expected) = readiness.counts();
            Reply::Text(503, format!("not ready: {ready}/{expected} sources receiving\n"))
        }
        _ => Reply::not_found("try /metrics or /healthz"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pulled_sources_export_connection_metrics() {
        let m = Metrics::new();
        let pushed = m.stream("p", "pushed");
        pushed.packets_received.inc();
        assert!(!m.encode().contains("zerodrop_ingest_connected"), "a pushed source has no connection to report");
        let pulled = m.stream("p", "pulled").ingest();
        pulled.connected.set(1);
        pulled.error("unauthorized");
        let text = m.encode();
        assert!(text.contains("zerodrop_ingest_connected{pipeline=\"p\",stream=\"pulled\"} 1"), "{text}");
        assert!(!text.contains("zerodrop_ingest_connected{pipeline=\"p\",stream=\"pushed\"}"), "{text}");
        assert_eq!(pulled.errors("unauthorized"), 1);
    }

    #[test]
    fn stream_handles_share_the_registry_counters() {
        let m = Metrics::new();
        let s = m.stream("demo", "cam1");
        s.packets_received.inc_by(5);
        s.frames_dropped("incomplete", 2);
        s.set_decoder("avdec_h264");
        let text = m.encode();
        assert!(
            text.contains(
                r#"zerodrop_rtp_packets_received_total{pipeline="demo",stream="cam1"} 5"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"zerodrop_frames_dropped_total{pipeline="demo",stream="cam1",reason="incomplete"} 2"#
        ));
        assert!(text.contains(
            r#"zerodrop_decoder_info{pipeline="demo",stream="cam1",decoder="avdec_h264"} 1"#
        ));
        assert!(text.contains("# TYPE zerodrop_frame_latency_seconds histogram"));
        assert!(text.trim_end().ends_with("# EOF"));
        assert_eq!(s.frames_dropped_total.get(), 2);
    }

    #[test]
    fn repair_methods_are_written_lowercase_as_documented() {
        let m = Metrics::new();
        let s = m.stream("p", "s");
        s.recovered_nack.inc();
        s.recovered_reorder.inc_by(2);
        s.recovered_fec.inc_by(3);
        let text = m.encode();
        for (method, n) in [("nack", 1), ("reorder", 2), ("fec", 3)] {
            let line = format!(r#"zerodrop_rtp_packets_recovered_total{{pipeline="p",stream="s",method="{method}"}} {n}"#);
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
        assert!(!text.contains(r#"method="N"#) && !text.contains(r#"method="F"#) && !text.contains(r#"method="R"#), "{text}");
    }

    #[test]
    fn http_endpoint_serves_metrics_and_health() {
        let m = Arc::new(Metrics::new());
        m.stream("p", "s").packets_received.inc();
        let readiness = Arc::new(Readiness::new());
        readiness.set_expected(["p/s".to_string()]);
        let addr = serve("127.0.0.1:0", m, readiness.clone(), Default::default()).unwrap();
        let get = |path: &str| zerodrop_telemetry::get(addr, path).unwrap();
        let metrics = get("/metrics");
        assert_eq!(metrics.content_type.as_deref(), Some(zerodrop_telemetry::OPENMETRICS));
        assert!(metrics.body.contains("zerodrop_rtp_packets_received_total"));
        assert_eq!(get("/healthz").status, 200);
        assert_eq!(get("/readyz").status, 503);
        assert_eq!(get("/readyz/streams").body, "", "nothing bound yet");
        readiness.mark_ready("p/s");
        assert_eq!(get("/readyz").status, 200);
        assert_eq!(get("/readyz/streams").body, "p/s\n");
        readiness.mark_gone("p/s");
        assert_eq!(get("/readyz/streams").body, "", "a stream let go is no longer listed");
        assert_eq!(get("/nope").status, 404);
    }
}
