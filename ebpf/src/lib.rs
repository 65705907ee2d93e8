//! ZeroDrop's kernel-loss agent: counts the UDP packets the kernel drops on
//! receive, by local address, port and drop reason.
//!
//! Two raw-tracepoint programs (`src/bpf/udp_drops.bpf.c`) count into a
//! per-CPU hash that [`KernelDropMonitor::poll`] reads; without eBPF the
//! monitor falls back to the per-socket `drops` column of `/proc/net/udp{,6}`.
//!
//! ```no_run
//! use zerodrop_ebpf::{KernelDropMonitor, Mode};
//! let mut monitor = KernelDropMonitor::start(Mode::Auto)?;
//! if let Some(why) = monitor.fallback_reason() {
//!     eprintln!("kernel drops from procfs: {why}");
//! }
//! for drop in monitor.poll()? {
//!     println!("{} {} {} ({})", drop.addr, drop.reason, drop.count, monitor.source());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod ebpf;
pub mod layout;
pub mod metrics;
pub mod monitor;
pub mod procfs;
pub mod reasons;
#[doc(hidden)]
pub mod testenv;

pub use metrics::KernelDropCollector;
pub use monitor::{DropCount, KernelDropMonitor, Mode, PROCFS_REASON, PollError, Source, StartError};
