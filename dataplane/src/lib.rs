//! ZeroDrop data plane: receive live video, repair loss, decode, count every
//! frame. The stages, each in a folder of its own:
//!
//! - [`ingest`]: how packets arrive. RTP/UDP push today ([`ingest::udp`]
//!   reads batches with `recvmmsg`, [`ingest::worker`] serves many sources
//!   on one thread); RTSP and SRT will implement the same contract.
//! - [`session`]: the RTCP session (sender and receiver reports, extended
//!   reports, round-trip time, jitter, feedback out), sans-IO.
//! - [`repair`]: the jitter buffer, NACK scheduling and its budget, FEC, and
//!   their coordination, sans-IO.
//! - [`depay`]: RTP payloads to access units (H.264, H.265), frame accounting.
//! - [`decode`]: GStreamer decoding (NVDEC or software).
//! - [`output`]: where access units go besides the decoder.
//!
//! [`stream`] joins them for one source; [`supervisor`], [`runner`] and
//! [`pod`] run many sources locally or as a pod. [`rtp`] is the wire code
//! (RTP/RTCP parsing and writing) that the test bench uses too.

pub mod config;
pub mod decode;
pub mod depay;
pub mod ingest;
pub mod kernel_drops;
pub mod metrics;
pub mod output;
pub mod path_policy;
pub mod pod;
pub mod repair;
pub mod rtp;
pub mod runner;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod supervisor;
pub mod table;
