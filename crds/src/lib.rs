//! The `StreamPipeline` API, `zerodrop.dev/v1alpha1`.
//!
//! These types are the contract between the user's manifest, the operator and
//! the data plane. They hold no Kubernetes client code.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of live streams that ZeroDrop ingests, repairs, decodes and publishes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "zerodrop.dev",
    version = "v1alpha1",
    kind = "StreamPipeline",
    shortname = "sp",
    namespaced,
    status = "StreamPipelineStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct StreamPipelineSpec {
    pub sources: Vec<Source>,
    #[serde(default)]
    pub repair: RepairSpec,
    #[serde(default)]
    pub decode: DecodeSpec,
    #[serde(default)]
    pub scaling: ScalingSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate_policy: Option<BitratePolicy>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub name: String,
    pub transport: Transport,
    pub codec: Codec,
    #[serde(default = "default_payload_type")]
    pub payload_type: u8,
    #[serde(default = "default_clock_rate")]
    pub clock_rate: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtx_payload_type: Option<u8>,
}

fn default_payload_type() -> u8 { 96 }
fn default_clock_rate() -> u32 { 90_000 }

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtp: Option<RtpTransport>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RtpTransport {
    #[serde(default = "default_listen_address")]
    pub listen_address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtcp_port: Option<u16>,
    #[serde(default)]
    pub rtcp_mux: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_buffer_bytes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fec: Option<FecTransport>,
}

fn default_listen_address() -> String { "0.0.0.0".into() }

impl RtpTransport {
    /// The port RTCP arrives on: the RTP port itself with rtcp-mux, else the
    /// explicit RTCP port, else RTP port + 1 (RFC 3550 §11).
    pub fn effective_rtcp_port(&self) -> u16 {
        if self.rtcp_mux { self.port } else { self.rtcp_port.unwrap_or(self.port.saturating_add(1)) }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FecTransport {
    pub scheme: FecScheme,
    /// ST 2022-1: [column port, row port]; ULPFEC: empty (in-band, by payload type).
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_type: Option<u8>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FecScheme {
    #[serde(rename = "st2022-1")]
    St2022_1,
    Ulpfec,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Codec { H264, H265 }

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepairSpec {
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u32,
    #[serde(default)]
    pub nack: NackSpec,
    #[serde(default)]
    pub fec: FecSpec,
}
fn default_latency_ms() -> u32 { 200 }
impl Default for RepairSpec {
    fn default() -> Self { Self { latency_ms: default_latency_ms(), nack: NackSpec::default(), fec: FecSpec::default() } }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NackSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}
fn default_true() -> bool { true }
fn default_max_retries() -> u32 { 5 }
impl Default for NackSpec {
    fn default() -> Self { Self { enabled: true, max_retries: default_max_retries() } }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FecSpec {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecodeSpec {
    #[serde(default)]
    pub decoder: DecoderChoice,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DecoderChoice { #[default] Auto, Software, Nvdec }

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    #[serde(default = "default_one")]
    pub min_replicas: i32,
    #[serde(default = "default_one")]
    pub max_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}
fn default_one() -> i32 { 1 }
impl Default for ScalingSpec {
    fn default() -> Self { Self { min_replicas: 1, max_replicas: 1, replicas: None } }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BitratePolicy {
    pub downgrade_loss_percent: f64,
    pub upgrade_after_seconds: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamPipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
