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

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;
    use crate::metrics::Metrics;

    /// A source's FEC sockets are its own: packets the kernel drops on them
    /// (here a full receive buffer nobody reads) count for the stream, as
    /// drops on its RTP socket do.
    #[test]
    fn drops_on_a_fec_socket_count_for_the_stream() {
        let fec = UdpSocket::bind("127.0.0.1:0").unwrap();
        let row = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&fec).set_recv_buffer_size(1).unwrap();
        let (fec_port, row_port) = (fec.local_addr().unwrap().port(), row.local_addr().unwrap().port());
        let manifest = format!(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: contribution}}\n\
             spec:\n  repair: {{fec: {{enabled: true}}}}\n  sources:\n\
             \x20   - {{name: studio, codec: h264, transport: {{rtp: {{listenAddress: 127.0.0.1, port: 1, rtcpMux: true, \
             fec: {{scheme: st2022-1, ports: [{fec_port}, {row_port}]}}}}}}}}\n"
        );
        let pipeline = zerodrop_crds::parse_manifests(&manifest).unwrap().remove(0);
        let cfg = crate::config::sources(&pipeline).unwrap().remove(0);
        assert!(cfg.sockets().contains(&fec.local_addr().unwrap()), "{:?}", cfg.sockets());

        let metrics = Metrics::new();
        let stream = metrics.stream(&cfg.pipeline, &cfg.name);
        let mut drops = KernelDrops::start(KernelDropMode::Procfs);
        drops.update(&[(stream.clone(), cfg.sockets())]);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..64 {
            sender.send_to(&[0u8; 1200], fec.local_addr().unwrap()).unwrap();
        }
        drops.update(&[(stream, cfg.sockets())]);
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("zerodrop_kernel_udp_drops_total{") && l.contains("stream=\"studio\""))
            .unwrap_or_else(|| panic!("no kernel drops counted for the stream:\n{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 32.0, "64 datagrams into a full FEC socket, {n} counted: {line}");
    }
}
