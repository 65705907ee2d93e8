//! Prometheus metrics of the agent, computed at scrape time:
//! - `zerodrop_kernel_udp_drops_total{address,port,reason,source}`
//! - `zerodrop_node_udp_<counter>_total{family}` from `/proc/net/snmp{,6}`
//! - `zerodrop_kernel_udp_drop_source_info{source,fallback_reason}` (gauge, 1)
//! - `zerodrop_kernel_udp_drops_uncounted_total` (eBPF map full)

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::monitor::KernelDropMonitor;
use crate::procfs::UdpSnmp;

/// Node-wide UDP counters exported, as (procfs name, metric name stem).
const SNMP_COUNTERS: [(&str, &str); 8] = [
    ("InDatagrams", "in_datagrams"),
    ("NoPorts", "no_ports"),
    ("InErrors", "in_errors"),
    ("RcvbufErrors", "rcvbuf_errors"),
    ("SndbufErrors", "sndbuf_errors"),
    ("InCsumErrors", "in_csum_errors"),
    ("MemErrors", "mem_errors"),
    ("OutDatagrams", "out_datagrams"),
];

/// Polls the monitor and procfs on every scrape.
#[derive(Debug)]
pub struct KernelDropCollector {
    monitor: Arc<Mutex<KernelDropMonitor>>,
}

impl KernelDropCollector {
    pub fn new(monitor: Arc<Mutex<KernelDropMonitor>>) -> Self {
        Self { monitor }
    }

    /// A registry holding only this collector.
    pub fn registry(monitor: Arc<Mutex<KernelDropMonitor>>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Self::new(monitor)));
        registry
    }
}

impl Collector for KernelDropCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (drops, source, fallback, uncounted) = {
            let mut monitor = match self.monitor.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let drops = monitor.poll().unwrap_or_else(|err| {
                tracing::warn!("polling kernel drops: {err}");
                Vec::new()
            });
            let uncounted = monitor.ebpf().and_then(|e| e.uncounted_map_full().ok());
            (drops, monitor.source(), label_sized(monitor.fallback_reason().unwrap_or("")), uncounted)
        };

        let info = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "zerodrop_kernel_udp_drop_source_info",
            "Which counter supplies zerodrop_kernel_udp_drops_total (value 1), and why eBPF is not used when it is not",
            None,
            MetricType::Gauge,
        )?;
        info.encode(family.encode_family(&vec![("source", source.as_str().to_owned()), ("fallback_reason", fallback)])?)?;

        let mut family = encoder.encode_descriptor(
            "zerodrop_kernel_udp_drops",
            "UDP packets the kernel dropped on receive, by local address, port and drop reason",
            None,
            MetricType::Counter,
        )?;
        for drop in &drops {
            let labels = vec![
                ("address", drop.addr.ip().to_string()),
                ("port", drop.addr.port().to_string()),
                ("reason", drop.reason.clone()),
                ("source", source.as_str().to_owned()),
            ];
            ConstCounter::new(drop.count).encode(family.encode_family(&labels)?)?;
        }

        if let Some(uncounted) = uncounted {
            let family = encoder.encode_descriptor(
                "zerodrop_kernel_udp_drops_uncounted",
                "Kernel UDP drops the eBPF programs could not count because their map was full",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(uncounted).encode(family)?;
        }

        match UdpSnmp::read() {
            Ok(snmp) => {
                for (procfs_name, stem) in SNMP_COUNTERS {
                    let name = format!("zerodrop_node_udp_{stem}");
                    let help = format!("Node-wide UDP {procfs_name} from /proc/net/snmp (ipv4) and /proc/net/snmp6 (ipv6)");
                    let mut family = encoder.encode_descriptor(
                        &name,
                        &help,
                        None,
                        MetricType::Counter,
                    )?;
                    for (fam, counters) in [("ipv4", &snmp.ipv4), ("ipv6", &snmp.ipv6)] {
                        if let Some(value) = counters.get(procfs_name) {
                            ConstCounter::new(*value).encode(family.encode_family(&vec![("family", fam)])?)?;
                        }
                    }
                }
            }
            Err(err) => tracing::warn!("reading UDP SNMP counters: {err}"),
        }
        Ok(())
    }
}

/// The first line of `text`, at most 240 characters: a verifier log belongs
/// in the agent's log, not in a label.
fn label_sized(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(240) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::Mode;

    #[test]
    fn long_fallback_reasons_are_cut_to_one_short_line() {
        assert_eq!(label_sized("no BTF\nverifier log"), "no BTF");
        assert_eq!(label_sized(&"x".repeat(500)).chars().count(), 241);
    }

    #[test]
    fn procfs_source_exports_the_source_and_node_counters() {
        let monitor = KernelDropMonitor::start(Mode::Procfs).expect("procfs readable");
        let registry = KernelDropCollector::registry(Arc::new(Mutex::new(monitor)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("zerodrop_kernel_udp_drop_source_info{source=\"procfs\",fallback_reason=\"\"} 1"), "{text}");
        assert!(text.contains("zerodrop_node_udp_rcvbuf_errors_total{family=\"ipv4\"}"), "{text}");
        assert!(text.contains("zerodrop_node_udp_in_errors_total{family=\"ipv4\"}"), "{text}");
        assert!(text.contains("# TYPE zerodrop_kernel_udp_drops counter"), "{text}");
    }
}
