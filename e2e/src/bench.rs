//! What every benchmark needs of this machine: the `zerodrop` binary built
//! from this tree, free ports, a process's CPU time, a socket's drops. (The
//! results files and machine information are in [`crate::results`].)

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use zerodrop_dataplane::ingest::udp::bind_rtp_rtcp_pair;

use crate::results::workspace_root;

/// The `zerodrop` binary of the same profile, built (or found up to date)
/// by cargo so a stale binary is never measured.
pub fn ensure_zerodrop_built() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ZERODROP_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench binary has no directory")?;
    let bin = dir.join("zerodrop");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "zerodrop", "--bin", "zerodrop"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(workspace_root()).status().context("running cargo build for zerodrop")?;
        if !status.success() {
            bail!("cargo build of the zerodrop binary failed");
        }
    }
    if !bin.exists() {
        bail!("{} not found: run through `cargo run` or set ZERODROP_BIN", bin.display());
    }
    Ok(bin)
}

/// A free even RTP port whose RTCP neighbour is free too (closed again for
/// the receiver to bind).
pub fn free_rtp_port() -> anyhow::Result<u16> {
    Ok(free_rtp_ports(1)?[0])
}

/// `n` such ports, distinct: all held until all are found.
pub fn free_rtp_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(bind_rtp_rtcp_pair("127.0.0.1:0".parse()?, 1).context("finding free RTP/RTCP port pairs")?);
    }
    held.iter().map(|(a, _)| Ok(a.local_addr()?.port())).collect()
}

pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU time of process `pid` so far, in seconds: utime + stime from
/// `/proc/PID/stat`, and the run time of all its threads from schedstat.
pub fn process_cpu(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("malformed /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) {
            ns += text.split_whitespace().next().and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok((ticks as f64 / hz, ns as f64 / 1e9))
}

/// The kernel's drop count of the UDP socket bound to 127.0.0.1:`port`
/// (the last column of `/proc/net/udp`).
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    Some(udp_socket_states(&[port]).first()?.drops)
}

/// What `/proc/net/udp` says of a loopback socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpSocketState {
    pub port: u16,
    /// Bytes waiting in its receive queue (each datagram counts its whole
    /// kernel buffer, not only its payload).
    pub rx_queue: u64,
    pub drops: u64,
}

/// The states of the UDP sockets bound to 127.0.0.1 on `ports`, in the
/// order found, from one read of `/proc/net/udp`; a port with no socket
/// is left out.
pub fn udp_socket_states(ports: &[u16]) -> Vec<UdpSocketState> {
    let Ok(text) = std::fs::read_to_string("/proc/net/udp") else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.strip_prefix("0100007F:")?, 16).ok()?;
            if f.len() < 13 || !ports.contains(&port) {
                return None;
            }
            let rx_queue = u64::from_str_radix(f[4].split_once(':')?.1, 16).ok()?;
            Some(UdpSocketState { port, rx_queue, drops: f[12].parse().ok()? })
        })
        .collect()
}
