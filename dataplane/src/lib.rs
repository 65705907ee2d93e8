//! ZeroDrop data plane: receive RTP, repair loss, decode, count every frame.

pub mod au;
pub mod loss;
pub mod relay;
pub mod rtp;
pub mod sender;
pub mod depay;
pub mod jitter;
