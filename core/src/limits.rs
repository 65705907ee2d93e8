//! Defaults and limits of the API that code relies on. The CRD's schema
//! takes its ranges from here, the data plane its defaults, the operator its
//! caps: one number, one place.

/// Default `repair.latencyMs`: how long a packet may wait for a missing one.
pub const DEFAULT_LATENCY_MS: u32 = 200;
/// Range of `repair.latencyMs`.
pub const MIN_LATENCY_MS: u32 = 20;
pub const MAX_LATENCY_MS: u32 = 10_000;

/// Default `repair.nack.maxRetries`: requests for one lost packet.
pub const DEFAULT_NACK_RETRIES: u32 = 5;
/// Most `repair.nack.maxRetries` the API accepts.
pub const MAX_NACK_RETRIES: u32 = 64;

/// Socket receive buffer a source gets when its spec names none: about 1 s
/// of a 30 Mbit/s stream, so a scheduling hiccup does not overflow it.
pub const DEFAULT_RECEIVE_BUFFER_BYTES: usize = 4 << 20;

/// RTP clock rate of H.264 (RFC 6184) and H.265 (RFC 7798).
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// Per-stream entries kept in a pipeline's status; larger pipelines are
/// truncated (and say so in `status.streamsTruncated`) so one object stays
/// well under etcd's size limit.
pub const MAX_STREAM_STATUSES: usize = 256;

/// Most replicas (`scaling.minReplicas`/`maxReplicas`) a pipeline may ask for.
pub const MAX_REPLICAS: i32 = 1000;

/// Default `outputs.hls.segmentSeconds`: the duration a segment aims for. A
/// segment can only start at a keyframe, so it lasts at least one GOP.
pub const DEFAULT_HLS_SEGMENT_SECONDS: u32 = 2;
/// Range of `outputs.hls.segmentSeconds`.
pub const MIN_HLS_SEGMENT_SECONDS: u32 = 1;
pub const MAX_HLS_SEGMENT_SECONDS: u32 = 10;
/// Default `outputs.hls.windowSegments`: segments the live playlist names.
pub const DEFAULT_HLS_WINDOW_SEGMENTS: u32 = 6;
/// Range of `outputs.hls.windowSegments`: at least the three a player wants
/// behind the live edge, at most what keeps a stream's memory bounded.
pub const MIN_HLS_WINDOW_SEGMENTS: u32 = 3;
pub const MAX_HLS_WINDOW_SEGMENTS: u32 = 60;
