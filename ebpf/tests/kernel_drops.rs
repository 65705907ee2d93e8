//! Kernel drop attribution, end to end: real sockets in a network namespace
//! of their own, real drops, the real eBPF programs. Needs root; skips with a
//! reason elsewhere, fails under `CI=true`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use zerodrop_ebpf::procfs::{self, UdpSnmp};
use zerodrop_ebpf::testenv::{self, Netns};
use zerodrop_ebpf::{DropCount, KernelDropMonitor, Mode, PROCFS_REASON, Source};

const DEADLINE: Duration = Duration::from_secs(10);
const PAYLOAD: [u8; 1000] = [0x5a; 1000];

/// A UDP receiver bound to `addr` (port 0 picks one) with the smallest
/// receive buffer the kernel allows, so a flood overflows it.
fn tiny_receiver(addr: SocketAddr) -> UdpSocket {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    socket.set_recv_buffer_size(1).expect("SO_RCVBUF");
    socket.bind(&addr.into()).expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

fn sender() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("sender socket")
}

fn sender_for(target: SocketAddr) -> UdpSocket {
    if target.is_ipv6() { UdpSocket::bind("[::1]:0").expect("IPv6 sender socket") } else { sender() }
}

/// Reads everything queued; returns how many datagrams it read.
fn drain(socket: &UdpSocket) -> u64 {
    let mut buf = [0u8; 2048];
    let mut read = 0;
    while socket.recv(&mut buf).is_ok() {
        read += 1;
    }
    read
}

fn socket_drops(local: SocketAddr) -> u64 {
    procfs::read_udp_sockets()
        .expect("/proc/thread-self/net/udp")
        .iter()
        .filter(|s| s.local == local)
        .map(|s| s.drops)
        .sum()
}

fn count_for(drops: &[DropCount], addr: SocketAddr, reason: &str) -> u64 {
    drops.iter().filter(|d| d.addr == addr && d.reason == reason).map(|d| d.count).sum()
}

fn reasons_for(drops: &[DropCount], addr: SocketAddr) -> Vec<String> {
    drops.iter().filter(|d| d.addr == addr).map(|d| format!("{}={}", d.reason, d.count)).collect()
}

/// Polls `probe` until it returns Some or the deadline passes.
fn poll_until<T>(what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if start.elapsed() > DEADLINE => panic!("{what}: not reached within {DEADLINE:?}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)), // poll interval, not a wait for an event
        }
    }
}

fn start_ebpf() -> KernelDropMonitor {
    let monitor = KernelDropMonitor::start(Mode::Ebpf).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(monitor.source(), Source::Ebpf);
    monitor
}

/// Floods `receiver` with `packets` datagrams without reading it, then waits
/// until every datagram is either queued or dropped. Returns the socket's
/// drop count.
fn flood_and_settle(receiver: &UdpSocket, packets: u64) -> u64 {
    let target = receiver.local_addr().expect("local addr");
    let tx = sender_for(target);
    for _ in 0..packets {
        tx.send_to(&PAYLOAD, target).expect("send");
    }
    let mut received = 0;
    poll_until("every datagram queued or dropped", || {
        received += drain(receiver);
        let dropped = socket_drops(target);
        if received + dropped == packets {
            Ok(dropped)
        } else {
            Err(format!("sent {packets}, received {received}, dropped {dropped}"))
        }
    })
}

#[test]
fn receive_buffer_drops_match_the_socket_and_rcvbuf_errors_exactly_per_port() {
    if !testenv::require_root("receive_buffer_drops_match_the_socket_and_rcvbuf_errors_exactly_per_port") {
        return;
    }
    let netns = Netns::create("rcvbuf").expect("ip netns add");
    let ip = testenv::unique_loopback();
    netns.run(|| {
        let mut monitor = start_ebpf();
        let a = tiny_receiver(SocketAddr::new(ip.into(), 0));
        let b = tiny_receiver(SocketAddr::new(ip.into(), 0));
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());

        let snmp_before = UdpSnmp::read().expect("snmp").rcvbuf_errors();
        let drops_a = flood_and_settle(&a, 3000);
        let drops_b = flood_and_settle(&b, 1500);
        let rcvbuf_delta = UdpSnmp::read().expect("snmp").rcvbuf_errors() - snmp_before;

        assert!(drops_a > 0 && drops_b > 0, "the flood overflowed nothing: {drops_a} {drops_b}");
        assert_ne!(drops_a, drops_b, "the two ports must be told apart by their counts");
        assert_eq!(drops_a + drops_b, rcvbuf_delta, "socket drops vs the namespace's RcvbufErrors delta");

        let drops = poll_until("the agent to count every drop", || {
            let drops = monitor.poll().map_err(|e| e.to_string())?;
            let (got_a, got_b) = (count_for(&drops, addr_a, "SOCKET_RCVBUFF"), count_for(&drops, addr_b, "SOCKET_RCVBUFF"));
            if got_a >= drops_a && got_b >= drops_b {
                Ok(drops)
            } else {
                Err(format!("{addr_a}: {got_a}/{drops_a}, {addr_b}: {got_b}/{drops_b}"))
            }
        });
        assert_eq!(count_for(&drops, addr_a, "SOCKET_RCVBUFF"), drops_a, "{addr_a}: {:?}", reasons_for(&drops, addr_a));
        assert_eq!(count_for(&drops, addr_b, "SOCKET_RCVBUFF"), drops_b, "{addr_b}: {:?}", reasons_for(&drops, addr_b));
        assert_eq!(
            count_for(&drops, addr_a, "SOCKET_RCVBUFF") + count_for(&drops, addr_b, "SOCKET_RCVBUFF"),
            rcvbuf_delta
        );
        // Counted once: no second row from kfree_skb, nor any other reason.
        assert_eq!(reasons_for(&drops, addr_a), vec![format!("SOCKET_RCVBUFF={drops_a}")]);
        assert_eq!(reasons_for(&drops, addr_b), vec![format!("SOCKET_RCVBUFF={drops_b}")]);
    });
}

#[test]
fn ipv6_receive_buffer_drops_are_counted_per_socket() {
    if !testenv::require_root("ipv6_receive_buffer_drops_are_counted_per_socket") {
        return;
    }
    let netns = Netns::create("rcvbuf6").expect("ip netns add");
    let v4 = testenv::unique_loopback().octets();
    let ip: std::net::Ipv6Addr = format!("fd00:5a::{:x}:{:x}", u16::from_be_bytes([v4[1], v4[2]]), v4[3]).parse().unwrap();
    let status = std::process::Command::new("ip")
        .args(["-n", &netns.name, "-6", "addr", "add", &format!("{ip}/128"), "dev", "lo", "nodad"])
        .status()
        .expect("ip addr add");
    assert!(status.success(), "adding {ip} to lo");
    netns.run(|| {
        let mut monitor = start_ebpf();
        let rx = tiny_receiver(SocketAddr::new(ip.into(), 0));
        let addr = rx.local_addr().unwrap();
        let snmp6_before = UdpSnmp::read().expect("snmp").ipv6["RcvbufErrors"];
        let dropped = flood_and_settle(&rx, 2000);
        let rcvbuf_delta = UdpSnmp::read().expect("snmp").ipv6["RcvbufErrors"] - snmp6_before;
        assert!(dropped > 0);
        assert_eq!(dropped, rcvbuf_delta, "socket drops vs Udp6RcvbufErrors delta");
        poll_until("the agent to count the IPv6 drops", || {
            let drops = monitor.poll().map_err(|e| e.to_string())?;
            let reasons = reasons_for(&drops, addr);
            if reasons == vec![format!("SOCKET_RCVBUFF={dropped}")] { Ok(()) } else { Err(format!("{addr}: {reasons:?}, socket {dropped}")) }
        });
    });
}

#[test]
fn nftables_drops_are_attributed_to_the_netfilter_reason() {
    if !testenv::require_root("nftables_drops_are_attributed_to_the_netfilter_reason") {
        return;
    }
    let netns = Netns::create("nft").expect("ip netns add");
    let ip = testenv::unique_loopback();
    let rx = netns.run(|| {
        let rx = UdpSocket::bind(SocketAddr::new(ip.into(), 0)).expect("bind");
        rx.set_nonblocking(true).expect("nonblocking");
        rx
    });
    let target = rx.local_addr().unwrap();
    netns
        .nft(&format!(
            "table inet zerodrop_test {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             udp dport {} numgen random mod 100 < 5 drop\n }}\n}}\n",
            target.port()
        ))
        .expect("nft ruleset");

    netns.run(|| {
        let mut monitor = start_ebpf();
        let tx = sender();
        let sent: u64 = 5000;
        let mut received = 0;
        for batch in 0..sent / 50 {
            for _ in 0..50 {
                tx.send_to(&PAYLOAD[..100], target).expect("send");
            }
            received += drain(&rx);
            assert_eq!(socket_drops(target), 0, "batch {batch} overflowed the receive buffer");
        }
        let dropped = poll_until("the agent to count the netfilter drops", || {
            received += drain(&rx);
            let drops = monitor.poll().map_err(|e| e.to_string())?;
            let counted = count_for(&drops, target, "NETFILTER_DROP");
            if counted + received == sent {
                Ok(counted)
            } else {
                Err(format!("sent {sent}, received {received}, NETFILTER_DROP {counted}: {:?}", reasons_for(&drops, target)))
            }
        });
        assert!(dropped > 0, "the 5% rule dropped nothing out of {sent}");
        assert!(dropped < sent / 5, "{dropped} of {sent} is far above 5%");
        let drops = monitor.poll().expect("poll");
        assert_eq!(reasons_for(&drops, target), vec![format!("NETFILTER_DROP={dropped}")]);
    });
}

#[test]
fn datagrams_to_a_closed_port_are_attributed_to_no_socket() {
    if !testenv::require_root("datagrams_to_a_closed_port_are_attributed_to_no_socket") {
        return;
    }
    let netns = Netns::create("noport").expect("ip netns add");
    let ip = testenv::unique_loopback();
    netns.run(|| {
        let mut monitor = start_ebpf();
        // Bind and close to find a port nobody listens on.
        let target = UdpSocket::bind(SocketAddr::new(ip.into(), 0)).unwrap().local_addr().unwrap();
        let no_ports_before = UdpSnmp::read().expect("snmp").ipv4["NoPorts"];
        let tx = sender();
        for _ in 0..200 {
            tx.send_to(&PAYLOAD[..100], target).expect("send");
        }
        let counted = poll_until("NoPorts and NO_SOCKET to agree", || {
            let no_ports = UdpSnmp::read().map_err(|e| e.to_string())?.ipv4["NoPorts"] - no_ports_before;
            let drops = monitor.poll().map_err(|e| e.to_string())?;
            let counted = count_for(&drops, target, "NO_SOCKET");
            if counted == 200 && no_ports == 200 { Ok(counted) } else { Err(format!("NoPorts {no_ports}, NO_SOCKET {counted}")) }
        });
        assert_eq!(counted, 200);
    });
}

#[test]
fn procfs_fallback_gives_the_same_per_socket_numbers_as_ebpf() {
    if !testenv::require_root("procfs_fallback_gives_the_same_per_socket_numbers_as_ebpf") {
        return;
    }
    let netns = Netns::create("procfs").expect("ip netns add");
    let ip = testenv::unique_loopback();
    netns.run(|| {
        let mut ebpf = start_ebpf();
        let mut fallback = KernelDropMonitor::start(Mode::Procfs).expect("procfs monitor");
        assert_eq!(fallback.source(), Source::Procfs);
        assert_eq!(fallback.fallback_reason(), None, "procfs was asked for, not fallen back to");

        let a = tiny_receiver(SocketAddr::new(ip.into(), 0));
        let b = tiny_receiver(SocketAddr::new(ip.into(), 0));
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let drops_a = flood_and_settle(&a, 2500);
        let drops_b = flood_and_settle(&b, 1200);

        let from_procfs = fallback.poll().expect("procfs poll");
        assert_eq!(count_for(&from_procfs, addr_a, PROCFS_REASON), drops_a);
        assert_eq!(count_for(&from_procfs, addr_b, PROCFS_REASON), drops_b);

        poll_until("eBPF and procfs to agree per socket", || {
            let from_ebpf = ebpf.poll().map_err(|e| e.to_string())?;
            let got = (count_for(&from_ebpf, addr_a, "SOCKET_RCVBUFF"), count_for(&from_ebpf, addr_b, "SOCKET_RCVBUFF"));
            if got == (drops_a, drops_b) { Ok(()) } else { Err(format!("eBPF {got:?}, procfs ({drops_a}, {drops_b})")) }
        });
    });
}

#[test]
fn auto_mode_uses_ebpf_when_it_loads() {
    if !testenv::require_root("auto_mode_uses_ebpf_when_it_loads") {
        return;
    }
    let monitor = KernelDropMonitor::start(Mode::Auto).expect("auto start");
    assert_eq!(monitor.source(), Source::Ebpf, "fell back: {:?}", monitor.fallback_reason());
    assert_eq!(monitor.source().as_str(), "ebpf");
}
