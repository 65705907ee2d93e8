//! Repair: the jitter buffer that waits for missing packets, the NACK
//! schedule and its budget, FEC recovery, and their coordination. Sans-IO:
//! packets and the time go in, packets to release and requests to send come
//! out.

pub mod fec;
pub mod jitter;
