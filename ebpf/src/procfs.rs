//! What procfs says about UDP drops, without eBPF:
//! - the per-socket `drops` column of `/proc/net/udp` and `/proc/net/udp6`
//!   (the socket's `sk_drops`: exact per socket, no reason);
//! - the network namespace's `Udp` counters in `/proc/net/snmp` and the
//!   `Udp6` ones in `/proc/net/snmp6`.
//!
//! Paths go through `/proc/thread-self/net`, so a thread that has entered
//! another network namespace with `setns` reads that namespace.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// One UDP socket's line in /proc/net/udp{,6}.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSocketDrops {
    pub local: SocketAddr,
    pub inode: u64,
    pub drops: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} line {line}: {what}")]
    Parse { path: String, line: usize, what: String },
}

/// The `/proc/.../net` directory of the calling thread's network namespace.
pub fn net_dir() -> PathBuf {
    let thread_self = PathBuf::from("/proc/thread-self/net");
    if thread_self.exists() { thread_self } else { PathBuf::from("/proc/net") }
}

fn read(name: &str) -> Result<(String, String), ProcfsError> {
    let path = net_dir().join(name);
    let display = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| ProcfsError::Read { path: display.clone(), source })?;
    Ok((display, text))
}

/// Every UDP socket (IPv4 and IPv6) of the calling thread's namespace.
pub fn read_udp_sockets() -> Result<Vec<UdpSocketDrops>, ProcfsError> {
    let mut sockets = Vec::new();
    for name in ["udp", "udp6"] {
        match read(name) {
            Ok((path, text)) => sockets.extend(parse_udp_table(&path, &text)?),
            // A kernel without IPv6 has no udp6 table.
            Err(ProcfsError::Read { source, .. }) if name == "udp6" && source.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(sockets)
}

/// Parses the text of /proc/net/udp or /proc/net/udp6.
pub fn parse_udp_table(path: &str, text: &str) -> Result<Vec<UdpSocketDrops>, ProcfsError> {
    let mut sockets = Vec::new();
    for (index, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let parse_err = |what: &str| ProcfsError::Parse { path: path.to_owned(), line: index + 1, what: what.to_owned() };
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
        if fields.len() < 13 {
            return Err(parse_err(&format!("expected 13 columns, found {}", fields.len())));
        }
        let local = parse_hex_socket_addr(fields[1]).ok_or_else(|| parse_err("bad local_address"))?;
        let inode = fields[9].parse().map_err(|_| parse_err("bad inode"))?;
        let drops = fields[12].parse().map_err(|_| parse_err("bad drops"))?;
        sockets.push(UdpSocketDrops { local, inode, drops });
    }
    Ok(sockets)
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints each 32-bit word of
/// the address as a host-order integer.
fn parse_hex_socket_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// UDP counters of one network namespace, by name as procfs spells them
/// (`RcvbufErrors`, `InErrors`, ...), for IPv4 (`/proc/net/snmp`, `Udp:`) and
/// IPv6 (`/proc/net/snmp6`, `Udp6...`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpSnmp {
    pub ipv4: BTreeMap<String, u64>,
    pub ipv6: BTreeMap<String, u64>,
}

impl UdpSnmp {
    pub fn read() -> Result<Self, ProcfsError> {
        let (path, text) = read("snmp")?;
        let ipv4 = parse_snmp_udp(&path, &text)?;
        let ipv6 = match read("snmp6") {
            Ok((_, text)) => parse_snmp6_udp(&text),
            Err(_) => BTreeMap::new(),
        };
        Ok(Self { ipv4, ipv6 })
    }

    pub fn rcvbuf_errors(&self) -> u64 {
        self.ipv4.get("RcvbufErrors").copied().unwrap_or(0)
    }
}

/// The `Udp:` header/value line pair of /proc/net/snmp.
pub fn parse_snmp_udp(path: &str, text: &str) -> Result<BTreeMap<String, u64>, ProcfsError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| l.starts_with("Udp: "));
    let (Some((_, header)), Some((line, values))) = (lines.next(), lines.next()) else {
        return Err(ProcfsError::Parse { path: path.to_owned(), line: 0, what: "no Udp: lines".to_owned() });
    };
    let mut counters = BTreeMap::new();
    for (name, value) in header.split_whitespace().skip(1).zip(values.split_whitespace().skip(1)) {
        let value = value.parse().map_err(|_| ProcfsError::Parse {
            path: path.to_owned(),
            line: line + 1,
            what: format!("{name} is not a number"),
        })?;
        counters.insert(name.to_owned(), value);
    }
    Ok(counters)
}

/// `Udp6RcvbufErrors 0` lines of /proc/net/snmp6, keyed without `Udp6`.
pub fn parse_snmp6_udp(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(char::is_whitespace)?;
            Some((name.strip_prefix("Udp6")?.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  118: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 40219 2 0000000000000000 17
  530: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 15021 2 0000000000000000 0
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  530: 00000000000000000000000001000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 15022 2 0000000000000000 3
";

    #[test]
    fn ipv4_lines_give_address_port_and_drops() {
        let sockets = parse_udp_table("udp", UDP).expect("parses");
        assert_eq!(sockets.len(), 2);
        assert_eq!(sockets[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(sockets[0].drops, 17);
        assert_eq!(sockets[0].inode, 40219);
        assert_eq!(sockets[1].local, "0.0.0.0:5353".parse().unwrap());
    }

    #[test]
    fn ipv6_lines_give_address_port_and_drops() {
        let sockets = parse_udp_table("udp6", UDP6).expect("parses");
        assert_eq!(sockets[0].local, "[::1]:5353".parse().unwrap());
        assert_eq!(sockets[0].drops, 3);
    }

    #[test]
    fn short_lines_are_an_error_naming_the_line() {
        let err = parse_udp_table("udp", "header\n 1: 0100007F:1F90\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn snmp_udp_counters_are_read_by_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\nUdp: 10 1 5 7 4 0 1 0 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let counters = parse_snmp_udp("snmp", text).expect("parses");
        assert_eq!(counters["RcvbufErrors"], 4);
        assert_eq!(counters["InErrors"], 5);
        assert_eq!(counters.len(), 9);
    }

    #[test]
    fn snmp6_udp_counters_drop_the_prefix() {
        let counters = parse_snmp6_udp("Ip6InReceives 5\nUdp6InDatagrams                 \t12\nUdp6RcvbufErrors 2\nUdpLite6InErrors 0\n");
        assert_eq!(counters["RcvbufErrors"], 2);
        assert_eq!(counters["InDatagrams"], 12);
        assert_eq!(counters.len(), 2);
    }
}
