//! The `StreamPipeline` status: what the operator observed. Written by the
//! operator only, through the status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules;

/// What the operator last observed of the pipeline.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::kubernetes_openapi)]
pub struct StreamPipelineStatus {
    /// The metadata.generation of the spec this status describes. When it is lower than
    /// metadata.generation, the operator has not acted on the latest change yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (every stream is being decoded), Degraded (the pipeline runs but loses frames, or
    /// runs without something it asked for, such as NVDEC) and Scaling (replicas are being
    /// added or removed). At most one condition per type.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Data-plane replicas (shards) currently running; the scale subresource's status.replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the data-plane pods, as a string (the scale subresource's selector,
    /// used by an HPA).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub selector: String,
    /// How many streams the pipeline runs, including those left out of streams.
    #[serde(default)]
    pub stream_count: i32,
    /// True when streams lists only the first 256 of streamCount streams.
    #[serde(default)]
    pub streams_truncated: bool,
    /// Per-stream summary, at most 256 entries (see streamsTruncated).
    #[serde(default)]
    #[schemars(length(max = rules::MAX_STREAM_STATUSES))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub streams: Vec<StreamStatus>,
    /// The replica count the operator's control policy chose, when it owns replicas
    /// (spec.scaling.replicas unset); the StatefulSet follows it. Unset while another owner (kubectl
    /// scale, an HPA, KEDA) sets spec.scaling.replicas: the policy then only reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_replicas: Option<i32>,
    /// The control policy's last decision, with its trigger, figure and threshold, e.g. "scale
    /// from 1 to 2 replicas: kernel_drops 120 above 0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_decision: Option<String>,
    /// A replica change in progress, made before it breaks: the streams that move to another
    /// shard are received by their new owner before their Service leaves the old one. Unset
    /// when no change is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// A replica change moving streams between shards (make-before-break). While `Preparing`,
/// the StatefulSet runs the larger of the two counts, every shard runs the streams it owns
/// under either count, and each moving stream's Service still routes to its old owner; once
/// every moving stream's new owner has its sockets bound (or `Preparing` times out), the
/// Services switch to the new owners (`Switched`); after a short drain the old owners let the
/// streams go and the StatefulSet settles on `toReplicas`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    /// The replica count the streams were assigned by before the change.
    #[schemars(range(min = 0))]
    pub from_replicas: i32,
    /// The replica count being moved to.
    #[schemars(range(min = 0))]
    pub to_replicas: i32,
    /// Preparing or Switched.
    pub phase: HandoverPhase,
    /// Streams whose owner differs between the two counts.
    #[serde(default)]
    pub moving: i32,
    /// Moving streams whose new owner reported them bound, at the last look.
    #[serde(default)]
    pub bound: i32,
    /// When the phase began (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub since: Option<String>,
}

/// The phase of a [`Handover`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HandoverPhase {
    /// New owners start the moving streams; the Services still route to the old owners.
    #[default]
    Preparing,
    /// The Services route to the new owners; the old owners drain.
    Switched,
}

/// The condition types a StreamPipeline reports in status.conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// Every stream is received and decoded.
    Ready,
    /// The pipeline runs but drops frames, or runs without something the spec asked for.
    Degraded,
    /// Replicas are being added or removed and streams are moving between shards.
    Scaling,
}

impl ConditionType {
    /// The `type` string of the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Degraded => "Degraded",
            ConditionType::Scaling => "Scaling",
        }
    }
}

impl StreamPipelineStatus {
    /// The condition of the given type, if the operator has set it.
    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == kind.as_str())
    }
}

/// How one stream is doing. Counters count since the owning shard started.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// Name of the source in spec.sources.
    #[schemars(length(max = rules::MAX_NAME_LENGTH))]
    pub name: String,
    /// Ordinal of the replica (shard) that owns the stream.
    #[serde(default)]
    pub shard: i32,
    /// The GStreamer decoder element in use, such as nvh264dec or avdec_h264.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub decoder: Option<String>,
    /// Frames decoded.
    #[serde(default)]
    pub frames_decoded: u64,
    /// Frames that could not be decoded whole and in order (each one triggered a keyframe
    /// request).
    #[serde(default)]
    pub frames_dropped: u64,
    /// RTP packets lost on the network, before repair.
    #[serde(default)]
    pub packets_lost: u64,
    /// Lost RTP packets that repair (NACK/RTX or FEC) recovered.
    #[serde(default)]
    pub packets_recovered: u64,
    /// Lost RTP packets that repair did not recover in time.
    #[serde(default)]
    pub packets_unrecovered: u64,
    /// UDP packets for the stream's sockets (FEC sockets included) that the kernel dropped
    /// before the data plane could read them, every reason.
    #[serde(default)]
    pub kernel_drops: u64,
    /// The node agents' count of kernel drops for the stream's sockets (the pod's IP and the
    /// stream's ports, FEC ports included), by the kernel's drop reason (`SOCKET_RCVBUFF`,
    /// `NO_SOCKET`, `UDP_CSUM`, ...), since each agent started. Empty without agents.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kernel_drops_by_reason: std::collections::BTreeMap<String, u64>,
    /// The rendition the bitrate policy currently asks the sender for, when a policy is set; for
    /// a source in a rendition group (renditionOf), the name of the group's source being decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = rules::MAX_NAME_LENGTH))]
    pub rendition: Option<String>,
    /// Where a player fetches the stream as HLS, when `spec.outputs.hls` is set: the playlist
    /// on the data-plane pod that owns the stream, through the pipeline's headless Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub hls: Option<String>,
    /// A pulled source's connection (RTSP, SRT), as its pod last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestStatus>,
}

/// A pulled source's connection to its server or sender.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestStatus {
    /// Whether a session is playing now.
    pub connected: bool,
    /// Times the source dialled again after losing or failing to get a session.
    #[serde(default)]
    pub reconnects: u64,
    /// Why the latest session failed or ended: unauthorized, not_found, refused, timeout,
    /// no_stream, credentials, ended, protocol or network (the pod's log has the server's
    /// words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub last_error: Option<String>,
    /// When the last frame arrived (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub last_frame_time: Option<String>,
}
