//! The receive path allocates nothing per packet once a stream runs.
//!
//! A counting global allocator counts the allocations made on the receive
//! thread alone. The thread serves a live H.264 stream (keyframes fragmented
//! in FU-A, a datagram lost now and then and answered by RFC 4588 RTX, a
//! reordered pair, RTCP sender reports), so the measured window covers
//! reordering, loss detection, NACKs going out, retransmissions coming in,
//! depacketisation and receiver reports. It must see no allocation at all.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use zerodrop_crds::{Codec, DecoderChoice};
use zerodrop_dataplane::config::SourceConfig;
use zerodrop_dataplane::repair::jitter::JitterSettings;
use zerodrop_dataplane::metrics::Metrics;
use zerodrop_dataplane::ingest::rtp_udp::UdpSource;
use zerodrop_dataplane::stream::StreamOptions;
use zerodrop_dataplane::rtp::RtpPacketBuilder;
use zerodrop_dataplane::ingest::worker::Worker;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RECEIVE_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if COUNTING.load(Ordering::Relaxed) && RECEIVE_THREAD.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PT: u8 = 96;
const RTX_PT: u8 = 97;
const SSRC: u32 = 0x5eed_0001;
const FRAGMENTS: usize = 8;

/// The datagrams of one H.264 access unit: SPS, PPS, then an IDR slice in
/// FU-A fragments, the last one carrying the marker.
fn access_unit(frame: u32, seq: &mut u16, out: &mut Vec<Vec<u8>>) {
    let ts = frame.wrapping_mul(3000);
    let mut payloads: Vec<Vec<u8>> = vec![vec![0x67, 0x42, 0xc0, 0x1f, 0xda], vec![0x68, 0xce, 0x3c, 0x80]];
    for i in 0..FRAGMENTS {
        let mut fu = vec![0x7c, 0x05 | if i == 0 { 0x80 } else { 0 } | if i == FRAGMENTS - 1 { 0x40 } else { 0 }];
        fu.extend((0..1100).map(|b| (b as u32 ^ frame ^ i as u32) as u8));
        payloads.push(fu);
    }
    let last = payloads.len() - 1;
    for (i, p) in payloads.iter().enumerate() {
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(PT)
            .ssrc(SSRC)
            .sequence_number(*seq)
            .timestamp(ts)
            .marker_bit(i == last)
            .payload(p.as_slice())
            .write_vec()
            .unwrap();
        out.push(packet);
        *seq = seq.wrapping_add(1);
    }
}

fn rtx_of(original: &[u8], rtx_seq: u16) -> Vec<u8> {
    let p = zerodrop_dataplane::rtp::RtpPacket::parse(original).unwrap();
    let mut out = Vec::new();
    zerodrop_dataplane::rtp::write_rtx(&p, RTX_PT, SSRC + 1, rtx_seq, &mut out).unwrap();
    out
}

/// A minimal RTCP sender report (RFC 3550 §6.4.1) with no report blocks.
fn sender_report() -> Vec<u8> {
    let mut sr = vec![0x80, 200, 0, 6];
    sr.extend(SSRC.to_be_bytes());
    sr.extend([0u8; 20]);
    sr
}

#[test]
fn the_receive_thread_allocates_nothing_per_packet_in_steady_state() {
    let metrics = Metrics::new();
    let stream = metrics.stream("alloc", "cam");
    let cfg = SourceConfig {
        pipeline: "alloc".into(),
        name: "cam".into(),
        codec: Codec::H264,
        payload_type: PT,
        clock_rate: 90_000,
        rtx_payload_type: Some(RTX_PT),
        rtp_bind: "127.0.0.1:0".parse().unwrap(),
        rtcp_bind: None,
        receive_buffer: 8 << 20,
        // A second for repair: every loss here is answered about a millisecond
        // later, so only a receive thread stalled that long could drop a
        // frame; the claim under test is about allocations, not scheduling.
        jitter: JitterSettings { latency: Duration::from_millis(1000), ..JitterSettings::default() },
        decoder: DecoderChoice::Software,
        fec: None,
        parameter_sets: Vec::new(),
        hls: None,
        restream: None,
        rtsp: None,
        srt: None,
        rendition_of: None,
        bitrate_request: Default::default(),
        frames: None,
    };
    let options = StreamOptions { no_decode: true, ..StreamOptions::default() };
    let receiver = UdpSource::open(cfg, stream.clone(), &options).unwrap();
    let to: SocketAddr = receiver.local_rtp_addr().unwrap();

    // Every datagram is built before the clock starts.
    let frames = 6000u32;
    let mut seq = 1000u16;
    let mut media = Vec::new();
    for f in 0..frames {
        access_unit(f, &mut seq, &mut media);
    }
    // The schedule: every 97th packet lost and retransmitted 20 packets
    // later, every 89th swapped with its successor, a sender report every
    // 500 packets.
    let mut schedule: Vec<Vec<u8>> = Vec::with_capacity(media.len() * 2);
    let mut pending_rtx: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut rtx_seq = 0u16;
    let mut i = 0;
    while i < media.len() {
        if i % 500 == 0 {
            schedule.push(sender_report());
        }
        if i % 97 == 50 {
            pending_rtx.push((i + 20, rtx_of(&media[i], rtx_seq)));
            rtx_seq = rtx_seq.wrapping_add(1);
        } else if i % 89 == 40 && i + 1 < media.len() {
            schedule.push(media[i + 1].clone());
            schedule.push(media[i].clone());
            i += 1;
        } else {
            schedule.push(media[i].clone());
        }
        while pending_rtx.first().is_some_and(|(at, _)| *at <= i) {
            schedule.push(pending_rtx.remove(0).1);
        }
        i += 1;
    }
    schedule.extend(pending_rtx.drain(..).map(|(_, p)| p));
    let total = schedule.len();

    let stop = Arc::new(AtomicBool::new(false));
    let receive = std::thread::spawn({
        let stop = stop.clone();
        move || {
            RECEIVE_THREAD.with(|c| c.set(true));
            let mut worker = Worker::new().unwrap();
            worker.add(receiver, "alloc/cam".into(), 0).unwrap();
            while !stop.load(Ordering::Relaxed) {
                worker.turn(Duration::from_millis(20)).unwrap();
            }
            worker.take_all()
        }
    });

    // Paced at about 20k packets/s: the first quarter warms up (buffers
    // grow to their working sizes), the middle half is measured.
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let per_packet = Duration::from_micros(50);
    let (warm_end, measure_end) = (total / 4, total * 3 / 4);
    let mut window = (0, 0, 0, 0);
    for (n, d) in schedule.iter().enumerate() {
        if n == warm_end {
            wait_until_consumed(&stream, &start, n);
            window = (stream.packets_received.get(), stream.nacks_sent.get(), stream.frames_assembled.get(), stream.retransmissions_received.get());
            COUNTING.store(true, Ordering::SeqCst);
        }
        if n == measure_end {
            wait_until_consumed(&stream, &start, n);
            COUNTING.store(false, Ordering::SeqCst);
            window = (
                stream.packets_received.get() - window.0,
                stream.nacks_sent.get() - window.1,
                stream.frames_assembled.get() - window.2,
                stream.retransmissions_received.get() - window.3,
            );
        }
        let due = start + per_packet * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // pacing, not synchronisation
        }
        sender.send_to(d, to).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let finished = receive.join().unwrap();
    let report = finished.into_iter().next().unwrap().2.complete();

    let (packets, nacks, frames, rtx) = window;
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    println!(
        "measured window: {packets} packets, {frames} frames, {nacks} NACKs sent, {rtx} retransmissions; \
         {allocations} allocations ({} bytes) on the receive thread",
        ALLOCATED_BYTES.load(Ordering::SeqCst)
    );
    // The window did real work, repair included.
    assert!(packets as usize > (measure_end - warm_end) * 9 / 10, "only {packets} packets in the window");
    assert!(frames > 1000, "only {frames} frames in the window");
    assert!(nacks > 50 && rtx > 50, "repair did not run in the window: {nacks} NACKs, {rtx} RTX");
    assert_eq!(report.frames_dropped, 0, "{report:?}");
    assert_eq!(allocations, 0, "the receive thread allocated {allocations} times in steady state");
}

/// Waits (bounded) until the receiver has taken what was sent, so the
/// counting window starts and ends on the receive thread's work, not on
/// packets still queued in the socket.
fn wait_until_consumed(stream: &zerodrop_dataplane::metrics::StreamMetrics, start: &Instant, sent: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let handled = || stream.packets_received.get() + stream.packets_duplicate.get() + stream.packets_late.get();
    while (handled() as usize) + stream.retransmissions_received.get() as usize / 1000 < sent * 95 / 100 {
        assert!(Instant::now() < deadline, "receiver stuck at {} of {sent} after {:?}", handled(), start.elapsed());
        std::thread::park_timeout(Duration::from_millis(1));
    }
}
