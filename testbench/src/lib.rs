//! ZeroDrop's test bench: everything that makes traffic for the data plane
//! to receive, and the reference peers it is compared with. Not part of the
//! product's receive path: the data plane never imports it, and it uses the
//! data plane's wire code (RTP/RTCP, FEC formats, UDP batches) rather than
//! copying it.
//!
//! - [`sender`]: the test source (`zerodrop send`): GStreamer encoder, RTP
//!   with RTX answers to NACKs, FEC, keyframes on PLI/FIR, bitrate on TMMBR;
//! - [`relay`]: the seeded lossy relay (`zerodrop relay`), RTCP passed back;
//! - [`loss`]: the seeded loss models both use (uniform, Gilbert–Elliott);
//! - [`replay`]: replay of a captured stream at a set rate, for throughput runs;
//! - [`gst_sender`], [`gst_fec_sender`], [`gst_receiver`]: GStreamer's own
//!   sender and repairing receiver, the opponents of the benchmarks.

pub mod gst_fec_sender;
pub mod gst_receiver;
pub mod gst_sender;
pub mod loss;
pub mod mediamtx;
pub mod relay;
pub mod replay;
pub mod rtsp_server;
pub mod sender;
