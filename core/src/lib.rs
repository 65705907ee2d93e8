//! The vocabulary every part of ZeroDrop shares, written once and free of
//! Kubernetes types (the linkerd policy-controller keeps its `core` crate
//! apart from `k8s` the same way):
//!
//! - [`media`]: codecs, FEC schemes, the decoder choice, the bit rate request;
//! - [`limits`]: defaults and limits of the API that code relies on;
//! - [`ports`]: the UDP ports a source listens on (RTP, RTCP, FEC);
//! - [`scaling`]: how many replicas a spec asks for;
//! - [`shard`]: which replica owns which stream.
//!
//! The API crate (`zerodrop-crds`) builds its schema from these types; the
//! operator, the data-plane pod, the local runner, the kernel-drop
//! attribution and the validator all call the same functions.

pub mod limits;
pub mod media;
pub mod ports;
pub mod scaling;
pub mod shard;

pub use media::{BitrateRequest, Codec, DecoderChoice, FecScheme, UnknownName};
pub use ports::SourcePorts;
