//! The e2e harness's Service data plane, with real parts only: the real
//! kube-proxy (nftables mode) programs this host, kube-controller-manager
//! turns a Service and two kwok pods into EndpointSlices, and host sockets
//! bound to the pods' IPs play the pods. A sender streams sequence-numbered
//! datagrams to the Service's ClusterIP every millisecond from one socket
//! (one 5-tuple, as an RTP sender does); the Service's selector moves from
//! pod A to pod B and back, as the operator moves a push stream to another
//! shard. Pinned down: nothing arrives before the Service exists (kube-proxy
//! drops traffic to unallocated ClusterIPs, then rejects it while the
//! Service has no endpoint: sendto() fails with EPERM here); the stream then
//! reaches A; after each selector change it reaches the other pod within a
//! bound, with the datagrams lost on the way counted, and the old pod gets
//! nothing once the new one has the stream (kube-proxy writes the new rules,
//! then deletes the flow's conntrack entry, which held it on the old pod
//! until then); replies from either pod's socket (RTCP's way back) reach the
//! sender from the ClusterIP. The first move comes soon after kube-proxy's
//! last sync, which its minimum sync period (1 s) holds back; the second
//! after a second without a sync.
//!
//! Needs root, `nft`, `ip`, and the control plane with kube-proxy:
//! `scripts/controlplane.sh build`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use zerodrop_e2e::cluster::{ClusterOptions, TestCluster, udp_conntrack_entries};

/// The Service's ClusterIP, fixed so the sender can address it before the
/// Service exists (inside the default service CIDR 10.96.0.0/16).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 77);
const PORT: u16 = 5004;
/// Datagrams sent before the Service is created, to nobody.
const BEFORE_SERVICE: u64 = 300;
/// Datagrams each pod must receive in a row before the next step.
const STEADY: u64 = 500;
/// How long a selector change may take to reach the new pod: the
/// EndpointSlice controller, then kube-proxy's next sync (at most one a
/// second by default).
const SWITCH_BOUND: Duration = Duration::from_secs(10);

/// One datagram as a socket received it.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    seq: u64,
    at: Instant,
    from: SocketAddr,
}

/// A socket on a thread that records what it receives until stopped.
struct Recorder {
    socket: UdpSocket,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    fn bind(addr: SocketAddr, stop: Arc<AtomicBool>) -> Result<Recorder> {
        let socket = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        // Room for several seconds of the stream, so a busy test thread loses
        // nothing here: losses counted are the data plane's. As root,
        // SO_RCVBUFFORCE passes net.core.rmem_max.
        let size: libc::c_int = 4 << 20;
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // The thread wakes every 20 ms to see the stop flag.
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (sock, log) = (socket.try_clone()?, arrivals.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let seq = buf[..n].get(..8).map_or(u64::MAX, |b| u64::from_be_bytes(b.try_into().unwrap_or([0xff; 8])));
                    log.lock().unwrap().push(Arrival { seq, at: Instant::now(), from });
                }
            }
        });
        Ok(Recorder { socket, arrivals, thread: Some(thread) })
    }

    fn snapshot(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn last_at(&self) -> Option<Instant> {
        self.arrivals.lock().unwrap().last().map(|a| a.at)
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stream: one socket sends `seq` (8 bytes, big endian, then 4 bytes of
/// padding: an RTP header's size) to the ClusterIP every millisecond.
struct Sender {
    sent: Arc<AtomicU64>,
    /// Runs of datagrams whose sendto() failed: first seq, last seq, error.
    errors: Arc<Mutex<Vec<(u64, u64, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    fn start(socket: UdpSocket, to: SocketAddr, stop: Arc<AtomicBool>) -> Sender {
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (count, errs) = (sent.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Pacing, 1 ms per datagram like a real-time sender; not
                // synchronisation.
                let due = start + Duration::from_millis(seq);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut datagram = [0u8; 12];
                datagram[..8].copy_from_slice(&seq.to_be_bytes());
                if let Err(e) = socket.send_to(&datagram, to) {
                    let mut errs = errs.lock().unwrap();
                    let e = e.to_string();
                    match errs.last_mut() {
                        Some((_, last, what)) if *last + 1 == seq && *what == e => *last = seq,
                        _ => errs.push((seq, seq, e)),
                    }
                }
                seq += 1;
                count.store(seq, Ordering::Release);
            }
        });
        Sender { sent, errors, thread: Some(thread) }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pod_manifest(name: &str, shard: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: zd-proxy, shard: {shard}}}\nspec:\n  \
         nodeSelector: {{type: kwok}}\n  containers:\n  - {{name: ingest, image: zerodrop.dev/fake-ingest}}\n"
    )
}

fn service_manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: cam\nspec:\n  clusterIP: {CLUSTER_IP}\n  \
         selector: {{app: zd-proxy, shard: a}}\n  ports:\n  - {{name: rtp, protocol: UDP, port: {PORT}, targetPort: {PORT}}}\n"
    )
}

/// The pod's IP once kwok has made it Ready.
fn ready_pod_ip(cluster: &TestCluster, name: &str) -> Result<Ipv4Addr> {
    let ip = cluster.wait_for(&format!("pod {name} Ready with an IP (kwok)"), Duration::from_secs(60), || {
        let out = cluster.kubectl([
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(match text.split_whitespace().collect::<Vec<_>>()[..] {
            [ip, "True"] => Some(ip.to_string()),
            _ => None,
        })
    })?;
    ip.parse().with_context(|| format!("pod {name}'s IP {ip:?}"))
}

/// What the data plane looks like now, for a failure message.
fn data_plane_state(cluster: &TestCluster) -> String {
    let slices = cluster
        .kubectl_ok(["get", "endpointslices", "-l", "kubernetes.io/service-name=cam", "-o", "wide"])
        .unwrap_or_else(|e| e.to_string());
    let conntrack = udp_conntrack_entries(CLUSTER_IP).map(|v| v.join("\n")).unwrap_or_else(|e| e.to_string());
    let rules = cluster.service_proxy_rules().unwrap_or_else(|e| e.to_string());
    format!(
        "EndpointSlices of cam:\n{slices}\nconntrack entries to {CLUSTER_IP}:\n{conntrack}\nnft list table ip kube-proxy:\n{rules}\n{}",
        cluster.diagnostics()
    )
}

/// Polls every millisecond (the stream's own period) until `cond` holds;
/// the time it first held.
fn wait_for_stream(cluster: &TestCluster, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}\n{}", data_plane_state(cluster));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `payload` from a pod's socket to the address it received the
/// stream from; returns where the sender saw it come from.
fn reply_reaches_sender(
    cluster: &TestCluster,
    pod: &Recorder,
    to: SocketAddr,
    payload: &[u8],
    replies: &Recorder,
) -> Result<SocketAddr> {
    let before = replies.count();
    pod.socket.send_to(payload, to).with_context(|| format!("replying to {to}"))?;
    let what = format!("the reply {:?} sent to {to} to reach the sender", String::from_utf8_lossy(payload));
    wait_for_stream(cluster, &what, Duration::from_secs(5), || replies.count() > before)?;
    Ok(replies.snapshot()[before].from)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One change of the Service's selector, as the test made it.
struct Move {
    from: &'static str,
    to: &'static str,
    /// Just before `kubectl patch` started, and when it returned.
    patch_at: Instant,
    patched_at: Instant,
    /// The first datagram sent after `patch_at`.
    seq_at_patch: u64,
    /// How long kube-proxy had not synced when the patch started.
    since_sync: Duration,
}

/// What one move cost the stream, from the arrivals at both pods within the
/// move's window of sequence numbers `[seq_at_patch, end)`.
struct MoveFigures {
    switch: Duration,
    to_first_seq: u64,
    from_last_seq: Option<u64>,
    from_kept: Duration,
    from_after_patch: usize,
    gap: Duration,
    /// Sent after the patch, before `to`'s first, received nowhere.
    lost_in_switch: Vec<u64>,
    /// Sent after `to`'s first, before the window's end, received nowhere.
    lost_after: Vec<u64>,
    from_after_to: usize,
    both: usize,
}

fn figures(m: &Move, from: &[Arrival], to: &[Arrival], end: u64) -> Result<MoveFigures> {
    let window = |a: &&Arrival| a.seq >= m.seq_at_patch && a.seq < end;
    let from_w: Vec<&Arrival> = from.iter().filter(window).collect();
    let to_w: Vec<&Arrival> = to.iter().filter(window).collect();
    let to_first = to_w
        .iter()
        .min_by_key(|a| a.seq)
        .ok_or_else(|| anyhow!("pod {} received nothing after the move {} → {}", m.to, m.from, m.to))?;
    let from_last = from_w.iter().max_by_key(|a| a.seq);
    let from_seqs: BTreeSet<u64> = from_w.iter().map(|a| a.seq).collect();
    let to_seqs: BTreeSet<u64> = to_w.iter().map(|a| a.seq).collect();
    let last_from_at = from_w.iter().map(|a| a.at).max();
    let (lost_in_switch, lost_after): (Vec<u64>, Vec<u64>) = (m.seq_at_patch..end)
        .filter(|s| !from_seqs.contains(s) && !to_seqs.contains(s))
        .partition(|&s| s < to_first.seq);
    Ok(MoveFigures {
        switch: to_first.at - m.patch_at,
        to_first_seq: to_first.seq,
        from_last_seq: from_last.map(|a| a.seq),
        from_kept: last_from_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(m.patch_at)),
        from_after_patch: from_w.len(),
        gap: last_from_at.map_or(Duration::ZERO, |at| to_first.at.saturating_duration_since(at)),
        lost_in_switch,
        lost_after,
        from_after_to: from_w.iter().filter(|a| a.seq > to_first.seq || a.at > to_first.at).count(),
        both: from_seqs.intersection(&to_seqs).count(),
    })
}

/// kube-proxy's last sync of its IPv4 rules (unix time, from its metrics).
fn last_sync(cluster: &TestCluster) -> Result<SystemTime> {
    let metrics = cluster.kube_proxy_metrics()?;
    let secs: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds{") && l.contains("IPv4"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("kube-proxy exports no kubeproxy_sync_proxy_rules_last_timestamp_seconds for IPv4"))?;
    Ok(UNIX_EPOCH + Duration::from_secs_f64(secs))
}

fn since_last_sync(cluster: &TestCluster) -> Result<Duration> {
    Ok(SystemTime::now().duration_since(last_sync(cluster)?).unwrap_or(Duration::ZERO))
}

/// Patches the Service's selector to `to`'s shard and waits for the stream
/// to reach `to`.
fn move_stream(
    cluster: &TestCluster,
    sender: &Sender,
    from: &'static str,
    (to, to_pod): (&'static str, &Recorder),
) -> Result<Move> {
    let since_sync = since_last_sync(cluster)?;
    let to_before = to_pod.count();
    let patch_at = Instant::now();
    let seq_at_patch = sender.sent();
    cluster.kubectl_ok([
        "patch".to_string(),
        "service".into(),
        "cam".into(),
        "--type=merge".into(),
        "-p".into(),
        format!(r#"{{"spec":{{"selector":{{"app":"zd-proxy","shard":"{}"}}}}}}"#, to.to_lowercase()),
    ])?;
    let patched_at = Instant::now();
    wait_for_stream(cluster, &format!("the stream to reach pod {to} after the selector change"), SWITCH_BOUND, || {
        to_pod.count() > to_before
    })?;
    Ok(Move { from, to, patch_at, patched_at, seq_at_patch, since_sync })
}

#[test]
fn a_udp_stream_to_a_cluster_ip_follows_the_service_selector_between_pods() -> Result<()> {
    let cluster = TestCluster::start_with(ClusterOptions {
        service_proxy: true,
        service_cidr: "10.96.0.0/16".into(),
        ..ClusterOptions::default()
    })?;
    cluster.apply_yaml(&(pod_manifest("ingest-a", "a") + "---\n" + &pod_manifest("ingest-b", "b")))?;
    let ip_a = ready_pod_ip(&cluster, "ingest-a")?;
    let ip_b = ready_pod_ip(&cluster, "ingest-b")?;
    ensure!(ip_a != ip_b, "kwok gave both pods {ip_a}");
    eprintln!("[service-proxy] pod A {ip_a}, pod B {ip_b}, Service cam will be {CLUSTER_IP}:{PORT}/UDP");

    let stop_receivers = Arc::new(AtomicBool::new(false));
    let stop_sender = Arc::new(AtomicBool::new(false));
    let mut pod_a = Recorder::bind(SocketAddrV4::new(ip_a, PORT).into(), stop_receivers.clone())?;
    let mut pod_b = Recorder::bind(SocketAddrV4::new(ip_b, PORT).into(), stop_receivers.clone())?;
    // The sender's one socket: the stream goes out of it, replies come back
    // to it (recorded by `replies`).
    let mut replies = Recorder::bind("0.0.0.0:0".parse()?, stop_receivers.clone())?;
    let service: SocketAddr = SocketAddrV4::new(CLUSTER_IP, PORT).into();
    let mut sender = Sender::start(replies.socket.try_clone()?, service, stop_sender.clone());

    // 1. No Service yet: the datagrams reach no pod.
    wait_for_stream(&cluster, "the sender to send before the Service exists", Duration::from_secs(10), || {
        sender.sent() >= BEFORE_SERVICE
    })?;
    let sent_before_service = sender.sent();
    let created_at = Instant::now();
    cluster.apply_yaml(&service_manifest())?;

    // 2. The stream reaches A, steadily; A's reply reaches the sender.
    let first_at_a = wait_for_stream(&cluster, "the stream to reach pod A", Duration::from_secs(30), || pod_a.count() > 0)?;
    let entries_on_a = udp_conntrack_entries(CLUSTER_IP)?;
    let a_first_seq = pod_a.snapshot()[0].seq;
    wait_for_stream(&cluster, "pod A to receive a steady stream", Duration::from_secs(30), || {
        pod_a.count() as u64 >= STEADY
    })?;
    let a_seen_from = pod_a.snapshot()[0].from;
    let a_reply_from = reply_reaches_sender(&cluster, &pod_a, a_seen_from, b"reply from A", &replies)?;

    // 3. A → B, soon after kube-proxy's last sync (the one that gave the
    // Service its endpoint): its minimum sync period (1 s) holds it back.
    let to_b = move_stream(&cluster, &sender, "A", ("B", &pod_b))?;
    let entries_on_b = udp_conntrack_entries(CLUSTER_IP)?;
    let b_before = pod_b.count();
    wait_for_stream(&cluster, "pod B to receive a steady stream", Duration::from_secs(30), || {
        (pod_b.count() - b_before) as u64 >= STEADY
    })?;
    let b_seen_from = pod_b
        .snapshot()
        .iter()
        .find(|a| a.seq >= to_b.seq_at_patch)
        .map(|a| a.from)
        .ok_or_else(|| anyhow!("pod B has no arrivals"))?;
    let b_reply_from = reply_reaches_sender(&cluster, &pod_b, b_seen_from, b"reply from B", &replies)?;

    // 4. B → A once kube-proxy has not synced for a second (polled every
    // 50 ms), so nothing holds the next sync back.
    cluster.wait_for("kube-proxy idle for 1 s", Duration::from_secs(40), || {
        Ok((since_last_sync(&cluster)? >= Duration::from_millis(1100)).then_some(()))
    })?;
    let to_a = move_stream(&cluster, &sender, "B", ("A", &pod_a))?;
    let a_before = pod_a.count();
    wait_for_stream(&cluster, "pod A to receive a steady stream again", Duration::from_secs(30), || {
        (pod_a.count() - a_before) as u64 >= STEADY
    })?;

    // 5. Stop, and let the receivers drain what is in flight: the last
    // arrival anywhere is 100 ms old (polled every millisecond).
    stop_sender.store(true, Ordering::Relaxed);
    sender.join();
    wait_for_stream(&cluster, "the receivers to drain", Duration::from_secs(5), || {
        [&pod_a, &pod_b]
            .iter()
            .filter_map(|r| r.last_at())
            .all(|at| at.elapsed() >= Duration::from_millis(100))
    })?;
    stop_receivers.store(true, Ordering::Relaxed);
    for r in [&mut pod_a, &mut pod_b, &mut replies] {
        r.join();
    }
    let sent = sender.sent();
    let send_errors = sender.errors.lock().unwrap().clone();
    let (at_a, at_b) = (pod_a.snapshot(), pod_b.snapshot());
    let metrics = cluster.kube_proxy_metrics()?;

    // The figures.
    let early: Vec<u64> = at_a.iter().chain(&at_b).map(|a| a.seq).filter(|&s| s < sent_before_service).collect();
    let steady_a: BTreeSet<u64> = at_a.iter().map(|a| a.seq).filter(|&s| s < to_b.seq_at_patch).collect();
    let missing_before_move: Vec<u64> = (a_first_seq..to_b.seq_at_patch).filter(|s| !steady_a.contains(s)).collect();
    let ab = figures(&to_b, &at_a, &at_b, to_a.seq_at_patch)?;
    let ba = figures(&to_a, &at_b, &at_a, sent)?;
    let deleted = metrics
        .lines()
        .find(|l| l.starts_with("kubeproxy_conntrack_reconciler_deleted_entries_total{") && l.contains("IPv4"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?");

    eprintln!(
        "[service-proxy] sent {sent} datagrams, one every 1 ms, from {} to {service}",
        replies.socket.local_addr()?
    );
    eprintln!("[service-proxy] before the Service: {sent_before_service} sent, {} reached a pod", early.len());
    for (first, last, e) in &send_errors {
        eprintln!("[service-proxy] sendto() failed for seqs {first}..={last}: {e}");
    }
    eprintln!(
        "[service-proxy] Service created → first datagram at A (seq {a_first_seq}): {:.1} ms; A saw the sender as {a_seen_from}",
        ms(first_at_a - created_at)
    );
    eprintln!("[service-proxy] conntrack to {CLUSTER_IP} with A:\n  {}", entries_on_a.join("\n  "));
    for (m, f) in [(&to_b, &ab), (&to_a, &ba)] {
        let from_last = f.from_last_seq.map_or("none".to_string(), |s| s.to_string());
        eprintln!(
            "[service-proxy] move {} → {} (kube-proxy last synced {:.0} ms before): patch (kubectl {:.1} ms) → first \
             datagram at {} (seq {}) {:.1} ms; {} kept the stream {:.1} ms ({} datagrams, last seq {}); gap {:.2} ms; \
             lost in the switch {} {:?}, after it {}; at {} after {}'s first: {}; at both: {}",
            m.from,
            m.to,
            ms(m.since_sync),
            ms(m.patched_at - m.patch_at),
            m.to,
            f.to_first_seq,
            ms(f.switch),
            m.from,
            ms(f.from_kept),
            f.from_after_patch,
            from_last,
            ms(f.gap),
            f.lost_in_switch.len(),
            &f.lost_in_switch[..f.lost_in_switch.len().min(20)],
            f.lost_after.len(),
            m.from,
            m.to,
            f.from_after_to,
            f.both
        );
    }
    eprintln!("[service-proxy] conntrack to {CLUSTER_IP} with B:\n  {}", entries_on_b.join("\n  "));
    eprintln!("[service-proxy] replies: A → {a_seen_from} came back from {a_reply_from}, B → {b_seen_from} from {b_reply_from}");
    eprintln!("[service-proxy] kube-proxy deleted {deleted} conntrack entries (kubeproxy_conntrack_reconciler_deleted_entries_total)");

    ensure!(early.is_empty(), "datagrams sent before the Service existed reached a pod: seqs {early:?}");
    ensure!(
        missing_before_move.is_empty(),
        "pod A missed {} datagrams of the steady stream before the first move (first {:?})",
        missing_before_move.len(),
        &missing_before_move[..missing_before_move.len().min(20)]
    );
    for (m, f) in [(&to_b, &ab), (&to_a, &ba)] {
        ensure!(f.switch <= SWITCH_BOUND, "the move {} → {} took {:?}", m.from, m.to, f.switch);
        ensure!(
            f.from_after_to == 0,
            "pod {} received {} datagrams after {}'s first in the move {} → {}",
            m.from,
            f.from_after_to,
            m.to,
            m.from,
            m.to
        );
        ensure!(f.both == 0, "{} datagrams reached both pods in the move {} → {}", f.both, m.from, m.to);
        ensure!(
            f.lost_after.is_empty(),
            "{} datagrams of the steady stream after the move {} → {} were lost (first {:?})",
            f.lost_after.len(),
            m.from,
            m.to,
            &f.lost_after[..f.lost_after.len().min(20)]
        );
    }
    ensure!(a_reply_from == service, "A's reply reached the sender from {a_reply_from}, not {service}");
    ensure!(b_reply_from == service, "B's reply reached the sender from {b_reply_from}, not {service}");
    Ok(())
}
