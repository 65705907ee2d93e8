//! Ingest: how a source's packets arrive. Whatever the transport, an ingest
//! hands the source's [`Stream`](crate::stream::Stream) the same thing: RTP
//! and RTCP datagrams in the order they arrived, read by a worker thread
//! that serves many sources ([`worker`]) in batches ([`udp`]).
//!
//! - RTP pushed over UDP ([`rtp_udp`]): the worker reads the source's own UDP
//!   sockets, and the stream's RTCP (reports, NACKs, keyframe requests) goes
//!   back from them.
//! - RTSP pulled from a server ([`rtsp`]): a session task (retina, on a small
//!   tokio runtime) writes what the server sends, RTP and RTCP alike, into
//!   one end of a local datagram socket pair; the worker reads the other end
//!   exactly as it reads a UDP socket with RTCP muxed (RFC 5761). The task
//!   also writes, in order with the packets, a session description when a
//!   session starts (the payload type and the SDP's parameter sets) and an
//!   RTCP BYE when one ends, so the stream sees a reconnect as a sender that
//!   left and a new one that took over: what the old session left
//!   incomplete is counted, and the new one starts at a keyframe with
//!   timestamps that keep increasing.
//!
//! So repair, depacketisation, decode, the outputs and the policy see the
//! same stream whatever the transport; only what the transport can do
//! differs (an RTSP server is not asked for retransmissions: retina sets up
//! plain RTP/AVP, without feedback).

pub mod rtp_udp;
pub mod pulled;
pub mod rtsp;
pub mod srt;
pub mod ts;
pub mod udp;
pub mod worker;

/// A pulled source's connection metrics (they live with the other metrics).
pub use crate::metrics::IngestCounters;
