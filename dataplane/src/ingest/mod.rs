//! Ingest: how a source's packets arrive. Today RTP pushed over UDP: each
//! source's sockets ([`rtp_udp`]) are read in batches ([`udp`]) by worker
//! threads that serve many sources each ([`worker`]). Whatever the transport, an ingest hands the
//! stream the same thing: an RTP or RTCP datagram, where it came from, and
//! when it arrived; and it carries the stream's RTCP back.

pub mod rtp_udp;
pub mod udp;
pub mod worker;
