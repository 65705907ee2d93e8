//! The RTCP session.
