//! `KernelDropMonitor`: the one entry point for the agent binary and for the
//! local runner. It counts with eBPF when it can and falls back to the
//! per-socket drops of `/proc/net/udp{,6}` when it cannot.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::ebpf::{EbpfDropCounter, EbpfUnavailable};
use crate::procfs::{self, ProcfsError};

/// The reason label of procfs counts: the socket's `sk_drops`, which is
/// mostly receive-buffer overflow but also checksum and socket-filter drops.
pub const PROCFS_REASON: &str = "SOCKET_OVERFLOW";

/// Which counter to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// eBPF, else procfs.
    #[default]
    Auto,
    /// eBPF or an error.
    Ebpf,
    /// `/proc/net/udp{,6}` only.
    Procfs,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "ebpf" => Ok(Self::Ebpf),
            "procfs" => Ok(Self::Procfs),
            other => Err(format!("unknown mode {other:?}: expected auto, ebpf or procfs")),
        }
    }
}

/// Which counter is in use; also the `source` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Ebpf,
    Procfs,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Procfs => "procfs",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cumulative kernel drops of one local UDP address and reason.
///
/// With eBPF, `addr` is the packet's destination: for a socket bound to a
/// wildcard address it is the concrete local address the packet arrived on
/// (see [`DropCount::matches_socket`]). With procfs it is the socket's bound
/// address, and `reason` is [`PROCFS_REASON`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DropCount {
    pub addr: SocketAddr,
    pub reason: String,
    pub count: u64,
}

impl DropCount {
    /// Whether these drops belong to a socket bound to `bound`: same port,
    /// and same address unless `bound` is a wildcard (IPv4-mapped IPv6
    /// addresses compare equal to their IPv4 form).
    pub fn matches_socket(&self, bound: SocketAddr) -> bool {
        if self.addr.port() != bound.port() {
            return false;
        }
        let canonical = |ip: IpAddr| ip.to_canonical();
        bound.ip().is_unspecified() || canonical(bound.ip()) == canonical(self.addr.ip())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("eBPF requested but unavailable: {0}")]
    Ebpf(#[from] EbpfUnavailable),
    #[error("procfs fallback unavailable: {0}")]
    Procfs(#[from] ProcfsError),
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("reading the eBPF drop map: {0}")]
    Ebpf(#[from] std::io::Error),
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
}

#[derive(Debug)]
enum Backend {
    Ebpf(Box<EbpfDropCounter>),
    Procfs,
}

/// Counts kernel UDP receive drops by local address, port and reason.
#[derive(Debug)]
pub struct KernelDropMonitor {
    backend: Backend,
    fallback_reason: Option<String>,
}

impl KernelDropMonitor {
    /// Starts counting. In `Auto` mode an eBPF failure is logged once (and
    /// kept in [`fallback_reason`](Self::fallback_reason)) and procfs is used.
    pub fn start(mode: Mode) -> Result<Self, StartError> {
        match mode {
            Mode::Ebpf => Ok(Self::with_ebpf(EbpfDropCounter::start()?)),
            Mode::Procfs => Self::procfs(None),
            Mode::Auto => match EbpfDropCounter::start() {
                Ok(counter) => Ok(Self::with_ebpf(counter)),
                Err(err) => {
                    tracing::warn!(
                        "kernel drop counting falls back to /proc/net/udp (per socket, no reasons): {err}"
                    );
                    Self::procfs(Some(err.0))
                }
            },
        }
    }

    fn with_ebpf(counter: EbpfDropCounter) -> Self {
        tracing::info!("kernel drop counting with eBPF (udp_fail_queue_rcv_skb, kfree_skb)");
        Self { backend: Backend::Ebpf(Box::new(counter)), fallback_reason: None }
    }

    fn procfs(fallback_reason: Option<String>) -> Result<Self, StartError> {
        // Fail now, not at the first poll, when procfs is unreadable.
        procfs::read_udp_sockets()?;
        Ok(Self { backend: Backend::Procfs, fallback_reason })
    }

    /// Cumulative drops per (address, port, reason), sorted. With procfs the
    /// sockets are those of the calling thread's network namespace.
    pub fn poll(&mut self) -> Result<Vec<DropCount>, PollError> {
        match &self.backend {
            Backend::Ebpf(counter) => {
                let reasons = counter.reasons();
                Ok(counter
                    .read()?
                    .into_iter()
                    .map(|((addr, reason), count)| DropCount { addr, reason: reasons.label(reason), count })
                    .collect())
            }
            Backend::Procfs => {
                let mut by_addr: BTreeMap<SocketAddr, u64> = BTreeMap::new();
                for socket in procfs::read_udp_sockets()? {
                    *by_addr.entry(socket.local).or_insert(0) += socket.drops;
                }
                Ok(by_addr
                    .into_iter()
                    .filter(|(_, count)| *count > 0)
                    .map(|(addr, count)| DropCount { addr, reason: PROCFS_REASON.to_owned(), count })
                    .collect())
            }
        }
    }

    pub fn source(&self) -> Source {
        match self.backend {
            Backend::Ebpf(_) => Source::Ebpf,
            Backend::Procfs => Source::Procfs,
        }
    }

    /// Why eBPF is not in use, when `Auto` fell back.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The eBPF counter, for statistics and the benchmark.
    pub fn ebpf(&self) -> Option<&EbpfDropCounter> {
        match &self.backend {
            Backend::Ebpf(counter) => Some(counter),
            Backend::Procfs => None,
        }
    }

    pub fn ebpf_mut(&mut self) -> Option<&mut EbpfDropCounter> {
        match &mut self.backend {
            Backend::Ebpf(counter) => Some(counter),
            Backend::Procfs => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(addr: &str) -> DropCount {
        DropCount { addr: addr.parse().unwrap(), reason: "SOCKET_RCVBUFF".into(), count: 1 }
    }

    #[test]
    fn wildcard_sockets_match_any_local_address_on_their_port() {
        assert!(count("10.1.2.3:5004").matches_socket("0.0.0.0:5004".parse().unwrap()));
        assert!(count("10.1.2.3:5004").matches_socket("[::]:5004".parse().unwrap()));
        assert!(!count("10.1.2.3:5005").matches_socket("0.0.0.0:5004".parse().unwrap()));
    }

    #[test]
    fn bound_sockets_match_their_address_only() {
        assert!(count("127.0.0.1:5004").matches_socket("127.0.0.1:5004".parse().unwrap()));
        assert!(count("127.0.0.1:5004").matches_socket("[::ffff:127.0.0.1]:5004".parse().unwrap()));
        assert!(!count("127.0.0.2:5004").matches_socket("127.0.0.1:5004".parse().unwrap()));
    }

    #[test]
    fn modes_parse_from_their_names() {
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        assert_eq!("procfs".parse::<Mode>(), Ok(Mode::Procfs));
        assert!("bpf".parse::<Mode>().is_err());
    }
}
