//! Kernel UDP drops per stream: packets the kernel dropped before our
//! receiver could read them (receive buffer full, checksum, netfilter …),
//! from the eBPF counters when they load, else from the sockets' own drop
//! counts in /proc/net/udp. Attributed to a stream by its bound sockets.

use std::collections::HashMap;
use std::net::SocketAddr;

use zerodrop_ebpf::{KernelDropMonitor, Mode};

use crate::metrics::StreamMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelDropMode {
    /// eBPF when it loads (root or CAP_BPF+CAP_PERFMON), else /proc/net/udp.
    Auto,
    Ebpf,
    Procfs,
    Off,
}

pub struct KernelDrops {
    monitor: Option<KernelDropMonitor>,
    /// Last cumulative count per (stream id, reason), to turn the kernel's
    /// cumulative numbers into counter increments.
    last: HashMap<(String, String), u64>,
}

impl KernelDrops {
    pub fn start(mode: KernelDropMode) -> Self {
        let mode = match mode {
            KernelDropMode::Off => return Self { monitor: None, last: HashMap::new() },
            KernelDropMode::Auto => Mode::Auto,
            KernelDropMode::Ebpf => Mode::Ebpf,
            KernelDropMode::Procfs => Mode::Procfs,
        };
        let monitor = match KernelDropMonitor::start(mode) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "kernel drop counting unavailable");
                None
            }
        };
        Self { monitor, last: HashMap::new() }
    }

    pub fn source(&self) -> Option<&'static str> {
        self.monitor.as_ref().map(|m| m.source().as_str())
    }

    /// Reads the kernel counters and adds what is new to each stream's
    /// `zerodrop_kernel_udp_drops_total`.
    pub fn update(&mut self, streams: &[(StreamMetrics, Vec<SocketAddr>)]) {
        let Some(monitor) = self.monitor.as_mut() else { return };
        let source = monitor.source().as_str();
        let counts = match monitor.poll() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "kernel drop poll failed");
                return;
            }
        };
        for (metrics, sockets) in streams {
            let mut by_reason: HashMap<&str, u64> = HashMap::new();
            for c in counts.iter().filter(|c| sockets.iter().any(|s| c.matches_socket(*s))) {
                *by_reason.entry(c.reason.as_str()).or_insert(0) += c.count;
            }
            let id = format!("{}/{}", metrics.labels.pipeline, metrics.labels.stream);
            for (reason, total) in by_reason {
                let last = self.last.entry((id.clone(), reason.to_string())).or_insert(0);
                // A restarted receiver has a new socket whose count starts at 0.
                let delta = if total >= *last { total - *last } else { total };
                *last = total;
                if delta > 0 {
                    metrics.kernel_drops(reason, source, delta);
                }
            }
        }
    }
}
