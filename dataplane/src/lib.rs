//! ZeroDrop data plane: receive RTP, repair loss, decode, count every frame.

pub mod au;
pub mod rtp;
pub mod fec;
pub mod depay;
pub mod jitter;
pub mod metrics;
pub mod config;
pub mod decode;
pub mod receiver;
pub mod worker;
pub mod udp;
pub mod runner;
pub mod table;
pub mod shutdown;
pub mod supervisor;
pub mod pod;
pub mod kernel_drops;
pub mod path_policy;
