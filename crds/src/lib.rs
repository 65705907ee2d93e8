//! The `StreamPipeline` API, `zerodrop.dev/v1alpha1`.
//!
//! These types are the contract between the user's manifest, the operator and
//! the data plane. They hold no Kubernetes client code.
//!
//! - [`StreamPipeline`] and its spec types ([`pipeline`]), its status
//!   ([`status`]);
//! - [`rules`]: the CEL validation rules of the CRD;
//! - [`parse_manifests`]: reads a manifest file and validates it locally with
//!   the CRD's own schema and CEL rules, for `zerodrop run`;
//! - [`crd_yaml`]: the CRD as YAML, as committed in
//!   `crds/streampipeline.crd.yaml` (written by `cargo run -p zerodrop-crds --bin crdgen`).

pub mod manifest;
pub mod pipeline;
pub mod rules;
mod schema_check;
pub use zerodrop_core::shard;
pub mod status;

pub use manifest::{API_VERSION, KIND, ManifestError, ManifestProblem, parse_manifests};
pub use pipeline::{
    BitratePolicy, BitrateRequest, Codec, DecodeSpec, DecoderChoice, ExposureSpec, FecScheme, FecSpec, FecTransport,
    FramesOutput, HlsOutput, NackSpec, OutputsSpec, RestreamTarget, SourceOutputs, PodResources, Rendition, RepairSpec, ResourceAmounts, ServiceType, RtpTransport, RtspTransport, RtspLowerTransport, CredentialsSecret, SrtTransport, SrtMode, PassphraseSecret, ScalingSpec, Source, StreamPipeline, StreamPipelineSpec,
    Transport, rendition_groups,
};
pub use status::{ConditionType, Handover, HandoverPhase, StreamPipelineStatus, StreamStatus};

/// First line of the generated CRD file.
pub const CRD_YAML_HEADER: &str = "# Generated from crds/src by `cargo run -p zerodrop-crds --bin crdgen`; do not edit by hand.\n";

/// The `StreamPipeline` CustomResourceDefinition as YAML, header included:
/// exactly what `crds/streampipeline.crd.yaml` must contain.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    Ok(format!(
        "{CRD_YAML_HEADER}{}",
        serde_yaml::to_string(&StreamPipeline::crd())?
    ))
}
