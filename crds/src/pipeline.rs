//! The `StreamPipeline` spec: what the user asks for.
//!
//! Doc comments on these types and fields are the CRD's field descriptions
//! (`kubectl explain streampipeline.spec...`), so they speak to the user.
//! Range checks live in the schema (`#[schemars(range/length)]`); checks that
//! relate several fields are CEL rules, kept in [`crate::rules`].

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use zerodrop_core::{SourcePorts, limits};

pub use zerodrop_core::{BitrateRequest, Codec, DecoderChoice, FecScheme};

use crate::rules;
use crate::status::StreamPipelineStatus;

/// A set of live streams that ZeroDrop ingests, repairs, decodes and publishes.
// Clippy reads the repeated `type_ = ...` of the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "zerodrop.dev",
    version = "v1alpha1",
    kind = "StreamPipeline",
    shortname = "sp",
    category = "zerodrop",
    namespaced,
    status = "StreamPipelineStatus",
    derive = "PartialEq",
    doc = "A StreamPipeline runs a set of live video streams without dropping frames: it ingests \
           them (RTP), repairs packet loss (NACK/RTX, FEC), decodes them (NVDEC or software) and \
           publishes the result, sharded over replicas. Status reports readiness and per-stream \
           frame counts.",
    scale(
        spec_replicas_path = ".spec.scaling.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Data-plane replicas (shards) running"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every stream is being decoded"
    ),
    printcolumn(
        name = "Streams",
        type_ = "integer",
        json_path = ".status.streamCount",
        description = "Streams the pipeline runs"
    ),
    printcolumn(
        name = "Decoder",
        type_ = "string",
        json_path = ".spec.decode.decoder",
        description = "Requested decoder"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::kubernetes_openapi)]
#[schemars(extend("x-kubernetes-validations" = rules::spec()))]
pub struct StreamPipelineSpec {
    /// The live streams to ingest, at least 1 and at most 128 (split larger fleets into several
    /// pipelines). Source names are unique, and no two sources may listen on the same UDP port.
    #[schemars(length(min = 1, max = rules::MAX_SOURCES))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = rules::source_list()
    ))]
    pub sources: Vec<Source>,
    /// How packet loss is repaired before decoding: the jitter buffer latency, NACK/RTX
    /// retransmission and FEC.
    #[serde(default)]
    pub repair: RepairSpec,
    /// Which decoder the pipeline uses.
    #[serde(default)]
    pub decode: DecodeSpec,
    /// How many data-plane replicas (shards) run the streams. Each stream belongs to one shard.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// When and how to ask senders for a lower bitrate when the network loses more than repair
    /// can absorb, and when to go back up. Without it the bitrate is never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate_policy: Option<BitratePolicy>,
    /// Where the repaired streams go besides the decoder, for every source of the pipeline.
    /// Today: HLS, served by the data plane over HTTP on its metrics port.
    #[serde(default, skip_serializing_if = "OutputsSpec::is_empty")]
    pub outputs: OutputsSpec,
    /// How senders reach push sources (RTP/UDP): the type of the Service each source gets.
    #[serde(default)]
    pub exposure: ExposureSpec,
    /// CPU and memory for each data-plane pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<PodResources>,
}

/// Where the repaired streams go besides the decoder.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputsSpec {
    /// Serve each stream as HTTP Live Streaming, from the repaired access units without
    /// re-encoding: MPEG-TS segments that start at keyframes and a live playlist at
    /// `/hls/<pipeline>/<source>/index.m3u8` on the data plane's metrics port. Unset: no HLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls: Option<HlsOutput>,
    /// Decoded frames for analytics: the latest frame of each stream as a JPEG at
    /// `/frames/<pipeline>/<source>/latest.jpg` on the metrics port, and, with
    /// `socketDirectory`, every decoded frame raw through a Unix socket. Needs decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<FramesOutput>,
}

impl OutputsSpec {
    pub fn is_empty(&self) -> bool {
        self.hls.is_none() && self.frames.is_none()
    }
}

/// Decoded frames for analytics.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FramesOutput {
    /// How often, in milliseconds, the frame kept for the thumbnail is replaced by a newer
    /// one, 40 to 60000. Defaults to 1000.
    #[serde(default = "default_thumbnail_interval_ms")]
    #[schemars(range(min = 40, max = 60_000))]
    pub thumbnail_interval_ms: u32,
    /// A directory in which each source listens on a Unix socket,
    /// `<pipeline>.<source>.sock`, and sends every decoded frame to each program connected:
    /// a 48-byte header (`ZDF1`, size, pixel format, frame index, the sender's wallclock, the
    /// presentation time, the length) and the picture's planes without padding. Unset: no
    /// socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub socket_directory: Option<String>,
}

fn default_thumbnail_interval_ms() -> u32 {
    1000
}

/// How HLS segments are cut and how many the playlist keeps.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HlsOutput {
    /// The duration, in seconds, a segment aims for, 1 to 10. A segment starts at a keyframe
    /// and closes at the first keyframe after this long, so it lasts at least one GOP of the
    /// source. Defaults to 2.
    #[serde(default = "default_hls_segment_seconds")]
    #[schemars(range(min = limits::MIN_HLS_SEGMENT_SECONDS, max = limits::MAX_HLS_SEGMENT_SECONDS))]
    pub segment_seconds: u32,
    /// How many segments the live playlist names, 3 to 60; a few more stay fetchable a
    /// while after they leave it. Memory per stream is bounded by them. Defaults to 6.
    #[serde(default = "default_hls_window_segments")]
    #[schemars(range(min = limits::MIN_HLS_WINDOW_SEGMENTS, max = limits::MAX_HLS_WINDOW_SEGMENTS))]
    pub window_segments: u32,
}

fn default_hls_segment_seconds() -> u32 {
    limits::DEFAULT_HLS_SEGMENT_SECONDS
}
fn default_hls_window_segments() -> u32 {
    limits::DEFAULT_HLS_WINDOW_SEGMENTS
}

impl Default for HlsOutput {
    fn default() -> Self {
        Self { segment_seconds: default_hls_segment_seconds(), window_segments: default_hls_window_segments() }
    }
}

/// How senders reach push sources.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExposureSpec {
    /// ClusterIP (the default: senders inside the cluster), NodePort or LoadBalancer. NodePort and
    /// LoadBalancer Services use `externalTrafficPolicy: Local`, so the pod sees the sender's real
    /// address and its RTCP (NACKs, keyframe requests) reaches the sender.
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
}

/// A Kubernetes Service type.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Requests and limits of a data-plane pod, as Kubernetes quantities.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodResources {
    /// What the scheduler reserves, e.g. `{cpu: "2", memory: 1Gi}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// The most the pod may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// CPU and memory quantities.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    /// CPU, e.g. `500m` or `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?m?)$"), length(max = 16))]
    pub cpu: Option<String>,
    /// Memory, e.g. `512Mi` or `2Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"), length(max = 16))]
    pub memory: Option<String>,
}

/// One live stream: where it arrives and how it is encoded.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::source()))]
pub struct Source {
    /// Unique name of the source within the pipeline, a DNS-1123 label (lowercase letters,
    /// digits and '-', at most 63 characters). It labels the stream's metrics and names its
    /// Service.
    #[schemars(length(min = 1, max = rules::MAX_NAME_LENGTH))]
    #[schemars(extend("x-kubernetes-validations" = rules::source_name()))]
    pub name: String,
    /// How the stream reaches the pipeline. Set exactly one member: rtp (pushed to the
    /// pipeline), rtsp (pulled from a server) or srt (MPEG-TS over SRT, either direction).
    pub transport: Transport,
    /// The video codec the stream carries: h264 or h265.
    pub codec: Codec,
    /// RTP payload type of the media packets, in the dynamic range 96-127. Defaults to 96.
    #[serde(default = "default_payload_type")]
    #[schemars(range(min = 96, max = 127))]
    pub payload_type: u8,
    /// RTP clock rate in Hz. H.264 and H.265 always use 90000, the default.
    #[serde(default = "default_clock_rate")]
    pub clock_rate: u32,
    /// RTP payload type of RTX retransmissions (RFC 4588), in 96-127 and different from
    /// payloadType. Leave unset when the sender does not send RTX; NACKs are then answered by
    /// plain retransmissions, if at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 96, max = 127))]
    pub rtx_payload_type: Option<u8>,
    /// The stream's parameter sets, for a sender that sends them out of band only (in its SDP)
    /// and never in the RTP stream, such as `ffmpeg -flags +global_header -f rtp`: base64 NAL
    /// units separated by commas, as the SDP's `sprop-parameter-sets` (H.264: SPS and PPS), or
    /// for H.265 the values of `sprop-vps`, `sprop-sps` and `sprop-pps` joined with commas. The
    /// receiver puts them in front of every keyframe that arrives without parameter sets of its
    /// own. Leave unset when the sender repeats them in band (most cameras, `rtph264pay
    /// config-interval=-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9+/]+={0,2}(,[A-Za-z0-9+/]+={0,2})*$"), length(min = 4, max = 4096))]
    pub parameter_sets: Option<String>,
    /// Where this source's repaired stream goes besides the decoder and the pipeline's
    /// `outputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<SourceOutputs>,
    /// The name of the source this one is a lower rendition of: the same camera's sub stream
    /// (lower resolution or bitrate) sent on another port or RTSP path, for a camera that cannot
    /// change its bitrate on request. The named source is the group's main stream; it must
    /// exist, must not itself set renditionOf, and a group holds at most 16 sources. The group's
    /// ladder is the main source followed by the sources naming it, in spec order, highest
    /// first. Every member is received and repaired, on one shard, but only the active
    /// rendition is decoded and fed to the outputs; the others' frames are counted as skipped
    /// (reason inactive_rendition). bitratePolicy (required with this field) decides when the
    /// group switches: down one rendition when the active one loses more than repair recovers
    /// for downgradeWindowSeconds, back up after upgradeAfterSeconds of health, decoding
    /// starting at a keyframe. Grouped sources are never sent TMMBR. Unset: an ungrouped source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = rules::MAX_NAME_LENGTH))]
    pub rendition_of: Option<String>,
    /// How the sender is asked for a bit rate when bitratePolicy steps this stream down its
    /// ladder (and back up): `tmmbr` (the default: RTCP TMMBR, RFC 5104, repeated once a second
    /// until the sender's TMMBN acknowledges it) or `remb` (RTCP REMB, the `goog-remb` feedback
    /// of browsers, WebRTC senders and many gateways, which have no TMMBR: sent at once and
    /// repeated once a second while a step below the top stands, and three times when back at
    /// the top; REMB is never acknowledged). A pushed stream has no SDP to negotiate it: say
    /// what the sender understands, as its `a=rtcp-fb:* goog-remb` would. Only pushed RTP
    /// sources outside a rendition group are ever asked: an RTSP source's RTCP is retina's
    /// (which sends none of ours), SRT has no RTCP, and a rendition group switches sources
    /// instead.
    #[serde(default)]
    pub bitrate_request: BitrateRequest,
}

impl StreamPipelineSpec {
    /// What status shows as the rendition of source `source` at ladder
    /// position `index` (`zerodrop_rendition_index`): for a member of a
    /// rendition group, the name of the group's source at that position (the
    /// one decoded); for any other source, the name of that step of
    /// `bitratePolicy.renditions`. `None` when there is no such step.
    pub fn rendition_name(&self, source: &str, index: usize) -> Option<&str> {
        let position = self.sources.iter().position(|s| s.name == source)?;
        if let Some(group) = rendition_groups(&self.sources).into_iter().find(|g| g.contains(&position)) {
            return group.get(index).map(|&i| self.sources[i].name.as_str());
        }
        self.bitrate_policy.as_ref()?.renditions.get(index).map(|r| r.name.as_str())
    }
}

impl Source {
    /// The name this source is sharded by (see [`zerodrop_core::shard::key`]):
    /// its group's main source, else its own name.
    pub fn shard_key(&self) -> &str {
        zerodrop_core::shard::key(&self.name, self.rendition_of.as_deref())
    }
}

/// The rendition groups of `sources`: each main source (one that others name
/// in `renditionOf`) followed by the sources naming it, in spec order, as
/// indices into `sources`. Sources outside any group do not appear. Names
/// that do not resolve (rejected by validation) are left out, never a panic.
pub fn rendition_groups(sources: &[Source]) -> Vec<Vec<usize>> {
    let mut groups = Vec::new();
    for (main, source) in sources.iter().enumerate() {
        if source.rendition_of.is_some() {
            continue;
        }
        let members: Vec<usize> = std::iter::once(main)
            .chain(
                sources
                    .iter()
                    .enumerate()
                    .filter(|(i, s)| *i != main && s.rendition_of.as_deref() == Some(source.name.as_str()))
                    .map(|(i, _)| i),
            )
            .collect();
        if members.len() > 1 {
            groups.push(members);
        }
    }
    groups
}

/// Outputs of one source.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceOutputs {
    /// Send the repaired stream on as RTP to these destinations, at most 8: whole frames only
    /// (a frame that could not be repaired is left out, as it is for the decoder), packetised
    /// afresh under a new SSRC with sequence numbers of its own, with RTCP sender reports to
    /// each destination's RTCP port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub restream: Vec<RestreamTarget>,
    /// The UDP port the restream sends from, and on which it hears its receivers' RTCP (a
    /// picture loss indication from a receiver that joined mid-GOP asks the source for a
    /// keyframe at once). Defaults to any free port; set it when a firewall must let the
    /// receivers' RTCP back in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub restream_local_port: Option<u16>,
}

/// One destination of a restream.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestreamTarget {
    /// IP address to send to (IPv4 or IPv6).
    #[schemars(length(min = 2, max = 45))]
    #[schemars(extend("x-kubernetes-validations" = rules::restream_address()))]
    pub address: String,
    /// UDP port the RTP goes to, 1-65535.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// UDP port the sender reports go to, 1-65535. Defaults to port + 1 (RFC 3550).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rtcp_port: Option<u16>,
    /// RTP payload type of the restream, 96-127. Defaults to the source's payloadType.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 96, max = 127))]
    pub payload_type: Option<u8>,
}

fn default_payload_type() -> u8 {
    96
}
fn default_clock_rate() -> u32 {
    90_000
}

/// How a source's packets reach the pipeline. Exactly one member is set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::transport()))]
pub struct Transport {
    /// The sender pushes RTP over UDP to a port the pipeline listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtp: Option<RtpTransport>,
    /// The pipeline pulls the stream from an RTSP server: a camera or a media server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtsp: Option<RtspTransport>,
    /// SRT (Secure Reliable Transport) carrying MPEG-TS, as contribution encoders send it:
    /// the pipeline listens for the sender, or calls it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srt: Option<SrtTransport>,
}

/// SRT carrying an MPEG-TS with one H.264 or H.265 video stream. Repair is SRT's own
/// (retransmissions within `repair.latencyMs`, its latency); what it could not repair in
/// time reaches the data plane as damaged or missing frames, which are dropped and counted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::srt_transport()))]
pub struct SrtTransport {
    /// `listener` (the default: the sender calls the pipeline, on `port`) or `caller` (the
    /// pipeline calls a sender that listens at `address`:`port`).
    #[serde(default)]
    pub mode: SrtMode,
    /// Listener: the IP address to listen on (defaults to 0.0.0.0). Caller: the host name
    /// or IP address of the sender (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub address: Option<String>,
    /// Listener: the UDP port to listen on, unique within the pipeline. Caller: the
    /// sender's port. 1-65535.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// The SRT stream ID to ask for (caller) or to accept (listener, when set), at most 512
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub stream_id: Option<String>,
    /// A Secret in the pipeline's namespace holding the passphrase that encrypts the link
    /// (10-79 characters, as libsrt requires). Unset: unencrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_secret: Option<PassphraseSecret>,
}

/// SRT connection mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SrtMode {
    #[default]
    Listener,
    Caller,
}

/// Where an SRT passphrase is kept.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassphraseSecret {
    /// Name of the Secret, in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the passphrase in the Secret. Defaults to `passphrase`.
    #[serde(default = "default_passphrase_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_passphrase_key() -> String {
    "passphrase".into()
}

/// RTSP pull (RFC 2326): the pipeline connects to the server, asks for one video stream and
/// keeps the session up, reconnecting with capped exponential backoff after a teardown, a
/// timeout or a network error.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RtspTransport {
    /// The stream's `rtsp://` URL, such as `rtsp://10.1.2.3:554/stream1`, without a user name
    /// or password (those come from credentialsSecret and never appear in the spec).
    #[schemars(length(min = 8, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = rules::rtsp_url()))]
    pub url: String,
    /// How the media travels: `tcp` (interleaved on the RTSP connection, the default: nothing
    /// is lost on the way, and it passes NAT and firewalls) or `udp` (RTP on UDP ports the
    /// server sends to: lower latency on a clean LAN; loss is counted and repaired as for
    /// pushed RTP, frames that cannot be repaired are dropped and counted).
    #[serde(default)]
    pub lower_transport: RtspLowerTransport,
    /// Which video stream to take when the server offers several: its index among the
    /// server's video streams, in the order of its SDP, counting from 0. Defaults to the
    /// first video stream in the source's codec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 15))]
    pub video_stream: Option<u8>,
    /// Seconds without a packet after which the session is given up and the server dialled
    /// again, 1-60. Defaults to 5.
    #[serde(default = "default_rtsp_timeout")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: u8,
    /// A Secret in the pipeline's namespace with the user name and password the server
    /// asks for (basic or digest authentication). The operator gives them to the data plane
    /// pod from the Secret; a missing Secret is reported as an Event and the Ready condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<CredentialsSecret>,
}

fn default_rtsp_timeout() -> u8 {
    5
}

/// RTSP's lower transport.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RtspLowerTransport {
    #[default]
    Tcp,
    Udp,
}

/// Where a source's credentials are kept: a Secret and the keys of its user name and
/// password.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecret {
    /// Name of the Secret, in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the user name in the Secret. Defaults to `username` (as in a
    /// `kubernetes.io/basic-auth` Secret).
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// Key of the password in the Secret. Defaults to `password`.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// RTP over UDP, pushed by the sender to a port the pipeline listens on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::rtp_transport()))]
pub struct RtpTransport {
    /// IP address to listen on. Defaults to 0.0.0.0 (all IPv4 addresses); use 127.0.0.1 for a
    /// local run that accepts only local senders.
    #[serde(default = "default_listen_address")]
    #[schemars(length(min = 2, max = 45))]
    #[schemars(extend("x-kubernetes-validations" = rules::listen_address()))]
    pub listen_address: String,
    /// UDP port the RTP media arrives on, 1-65535. Unique within the pipeline.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// UDP port RTCP arrives on and is sent from, 1-65535. Defaults to port + 1 (RFC 3550);
    /// not allowed together with rtcpMux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rtcp_port: Option<u16>,
    /// Carry RTCP on the RTP port itself (RFC 5761), as WebRTC senders do. Defaults to false.
    #[serde(default)]
    pub rtcp_mux: bool,
    /// Size of the socket receive buffer (SO_RCVBUF) in bytes, 65536 to 1073741824. Larger
    /// buffers ride out longer stalls before the kernel drops packets. Defaults to the data
    /// plane's own choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 65_536, max = 1_073_741_824))]
    pub receive_buffer_bytes: Option<u32>,
    /// Forward error correction the sender adds to the stream. Repair uses it only when
    /// repair.fec.enabled is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fec: Option<FecTransport>,
}

fn default_listen_address() -> String {
    "0.0.0.0".into()
}

impl RtpTransport {
    /// The source's ports, for every question about them (which RTCP port,
    /// which sockets, which Service ports).
    pub fn ports(&self) -> SourcePorts {
        SourcePorts {
            rtp: self.port,
            rtcp: self.rtcp_port,
            rtcp_mux: self.rtcp_mux,
            fec: self.fec.as_ref().map(|f| f.ports.clone()).unwrap_or_default(),
        }
    }

    /// The port RTCP arrives on: the RTP port itself with rtcp-mux, else the
    /// explicit RTCP port, else RTP port + 1 (RFC 3550 §11).
    pub fn effective_rtcp_port(&self) -> u16 {
        self.ports().rtcp_port()
    }

    /// Every UDP port the source's sockets listen on: RTP, RTCP (unless
    /// muxed), and the FEC ports. Kernel drops on any of them are the
    /// stream's.
    pub fn socket_ports(&self) -> Vec<u16> {
        self.ports().all()
    }
}

/// How the sender's FEC packets arrive.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::fec_transport()))]
pub struct FecTransport {
    /// The FEC scheme: st2022-1 (SMPTE ST 2022-1 column/row FEC on two extra ports) or ulpfec
    /// (RFC 5109, in the RTP stream under its own payload type).
    pub scheme: FecScheme,
    /// ST 2022-1: [column port, row port]; ULPFEC: empty (in-band, by payload type).
    #[serde(default)]
    #[schemars(length(max = 2), inner(range(min = 1)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<u16>,
    /// RTP payload type of ULPFEC packets, in 96-127; required for ulpfec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 96, max = 127))]
    pub payload_type: Option<u8>,
}

/// How packet loss is repaired before decoding.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepairSpec {
    /// How long, in milliseconds, a packet may wait in the jitter buffer for missing packets
    /// before it is decoded anyway, 20 to 10000. Repair must finish within it: allow a few
    /// round trips to the sender for NACK/RTX. Defaults to 200.
    #[serde(default = "default_latency_ms")]
    #[schemars(range(min = limits::MIN_LATENCY_MS, max = limits::MAX_LATENCY_MS))]
    pub latency_ms: u32,
    /// Retransmission requests (RTCP NACK, RFC 4585) for lost packets.
    #[serde(default)]
    pub nack: NackSpec,
    /// Recovery of lost packets from the sender's FEC packets.
    #[serde(default)]
    pub fec: FecSpec,
}

fn default_latency_ms() -> u32 {
    limits::DEFAULT_LATENCY_MS
}

impl Default for RepairSpec {
    fn default() -> Self {
        Self {
            latency_ms: default_latency_ms(),
            nack: NackSpec::default(),
            fec: FecSpec::default(),
        }
    }
}

/// Retransmission requests (RTCP NACK) for lost packets.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NackSpec {
    /// Send NACKs for lost packets. Defaults to true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How many times one lost packet is requested again before it is given up, 0 to 64.
    /// Defaults to 5.
    #[serde(default = "default_max_retries")]
    #[schemars(range(max = limits::MAX_NACK_RETRIES))]
    pub max_retries: u32,
}

fn default_true() -> bool {
    true
}
fn default_max_retries() -> u32 {
    limits::DEFAULT_NACK_RETRIES
}

impl Default for NackSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_retries: default_max_retries(),
        }
    }
}

/// Recovery of lost packets from FEC.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FecSpec {
    /// Recover lost packets from the FEC that sources declare in transport.rtp.fec. Defaults
    /// to false.
    #[serde(default)]
    pub enabled: bool,
}

/// Which decoder the pipeline uses.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecodeSpec {
    /// auto (NVDEC when the node has an NVIDIA GPU, else software; the default), software, or
    /// nvdec (fails when no NVDEC is present).
    #[serde(default)]
    pub decoder: DecoderChoice,
}

/// How many data-plane replicas (shards) run the streams.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::scaling()))]
pub struct ScalingSpec {
    /// Fewest replicas the operator's policy runs, 1 to 1000. Defaults to 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = limits::MAX_REPLICAS))]
    pub min_replicas: i32,
    /// Most replicas the operator's policy scales out to, 1 to 1000 and at least minReplicas.
    /// Defaults to 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = limits::MAX_REPLICAS))]
    pub max_replicas: i32,
    /// A fixed replica count, 0 to 1000. When set, the operator runs exactly this many replicas
    /// and leaves scaling to whoever sets it (kubectl scale, an HPA or KEDA through the scale
    /// subresource); when unset, the operator's policy scales between minReplicas and
    /// maxReplicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = limits::MAX_REPLICAS))]
    pub replicas: Option<i32>,
}

fn default_one() -> i32 {
    1
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 1,
            replicas: None,
        }
    }
}

/// When to ask senders for a lower bitrate and when to go back up. The policy steps down the
/// renditions list, one step at a time, when unrepaired loss stays high, and back up after a
/// stable period. RTP senders are asked through RTCP TMMBR. Sources grouped with renditionOf
/// use the same thresholds to switch which of their renditions is decoded instead.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules::bitrate_policy()))]
pub struct BitratePolicy {
    /// Step down one rendition when the packets that repair could not recover exceed this
    /// percentage of the packets expected, more than 0 and at most 100, for
    /// downgradeWindowSeconds.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub downgrade_loss_percent: f64,
    /// How long, in seconds, unrepaired loss must stay above downgradeLossPercent before the
    /// policy steps down, 1 to 3600. Defaults to 10.
    #[serde(default = "default_downgrade_window_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub downgrade_window_seconds: u32,
    /// How long, in seconds, loss must stay below downgradeLossPercent before the policy steps
    /// up one rendition again, 1 to 86400.
    #[schemars(range(min = 1, max = 86_400))]
    pub upgrade_after_seconds: u32,
    /// The bitrate ladder that ungrouped sources are stepped along with RTCP TMMBR, from the
    /// highest bitrate (where every stream starts) to the lowest, 2 to 16 entries with unique
    /// names and bitrates. It applies only to sources outside a rendition group (renditionOf):
    /// a group steps between its sources and its members are never sent TMMBR. May be left out
    /// when no source is to be sent TMMBR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 2, max = 16))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = rules::renditions()
    ))]
    pub renditions: Vec<Rendition>,
}

fn default_downgrade_window_seconds() -> u32 {
    10
}

/// One step of the bitrate ladder.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rendition {
    /// Name of the rendition, a DNS-1123 label such as "1080p" or "low"; reported in status.
    #[schemars(length(min = 1, max = rules::MAX_NAME_LENGTH))]
    #[schemars(extend("x-kubernetes-validations" = rules::rendition_name()))]
    pub name: String,
    /// Target video bitrate in kilobits per second, 50 to 100000.
    #[schemars(range(min = 50, max = 100_000))]
    pub bitrate_kbps: u32,
}
