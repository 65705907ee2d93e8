#![no_main]
//! The jitter buffer under arbitrary pushes, releases, NACK rounds and head
//! and tail probes on a synthetic clock. What it releases must account for
//! every sequence number exactly once, in order: from the first released on,
//! each number is a packet (the one pushed with that number) or inside a
//! declared loss, with nothing skipped but speculative probes that went
//! unanswered (they never existed). Draining releases everything held.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use zerodrop_dataplane::repair::jitter::{JitterBuffer, JitterSettings, Output, StoredPacket};
use zerodrop_dataplane::rtp::SeqExtender;

#[derive(Debug, Arbitrary)]
struct Input {
    latency_ms: u16,
    nack: bool,
    max_nack_retries: u8,
    capacity_shift: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A datagram with this 16-bit RTP sequence number arrives; it is extended
    /// as the receiver extends it.
    Push { seq: u16, retransmitted: bool },
    Pop,
    DueNacks { rtt_ms: u16 },
    /// Tail probe; like the receiver (`probe_tail_loss`), only while nothing
    /// is held, so the probe always fits in the ring.
    ExpectNext,
    /// Head probe.
    ExpectBefore { count: u8 },
    Advance { ms: u16 },
}

/// Follows the released stream.
#[derive(Default)]
struct ReleaseCheck {
    /// The sequence number the next output must start at, once anything was released.
    next: Option<u64>,
    /// Numbers asked for on suspicion, which may be skipped when unanswered.
    probed: BTreeSet<u64>,
}

impl ReleaseCheck {
    fn check(&mut self, outputs: &mut Vec<Output>) {
        for output in outputs.drain(..) {
            let (first, count) = match &output {
                Output::Packet { seq, packet } => {
                    assert_eq!(packet.data[..8], seq.to_le_bytes(), "packet released under another sequence number");
                    (*seq, 1)
                }
                Output::Lost { first, count } => {
                    assert!(*count > 0, "empty loss declared at {first}");
                    (*first, *count)
                }
            };
            if let Some(next) = self.next {
                assert!(first >= next, "released {output:?} again or out of order: {next} was due next");
                assert!(
                    (next..first).all(|s| self.probed.contains(&s)),
                    "released {output:?} but {next} was due next, and not every number between was a speculative probe"
                );
            }
            self.next = Some(first + count);
        }
    }
}

fuzz_target!(|input: Input| {
    let settings = JitterSettings {
        latency: Duration::from_millis(u64::from(input.latency_ms % 2000)),
        nack: input.nack,
        max_nack_retries: u32::from(input.max_nack_retries % 8),
        capacity: 64 << (input.capacity_shift % 4),
    };
    let mut jb = JitterBuffer::new(settings);
    let mut seqs = SeqExtender::default();
    let mut first_pushed = None;
    let mut now = Instant::now();
    let mut outputs = Vec::new();
    let mut check = ReleaseCheck::default();
    let mut nacks = Vec::new();
    let mut budget = zerodrop_dataplane::repair::jitter::NackBudget::new(std::time::Duration::from_millis(200));

    for op in input.ops {
        match op {
            Op::Push { seq, retransmitted } => {
                let seq = seqs.extend(seq);
                first_pushed.get_or_insert(seq);
                let mut data = jb.take_spare();
                data.extend_from_slice(&seq.to_le_bytes());
                let packet = StoredPacket {
                    data,
                    payload_offset: 8,
                    payload_len: 0,
                    timestamp: 0,
                    marker: false,
                    arrival: now,
                    retransmitted,
                    fec: false,
                };
                jb.push(seq, packet, now);
            }
            Op::Pop => {
                jb.pop_ready(now, &mut outputs);
                check.check(&mut outputs);
            }
            Op::DueNacks { rtt_ms } => {
                nacks.clear();
                jb.due_nacks(now, Duration::from_millis(u64::from(rtt_ms % 5000)), &mut budget, &mut nacks);
                let end = jb.end().unwrap_or(0);
                assert!(nacks.iter().all(|&s| s < end), "NACK beyond the highest awaited: {nacks:?}, end {end}");
            }
            Op::ExpectNext => {
                if jb.held() == 0
                    && let Some(seq) = jb.expect_next(now)
                {
                    check.probed.insert(seq);
                }
            }
            Op::ExpectBefore { count } => {
                let added = jb.expect_before(u64::from(count), now);
                if added > 0 {
                    let first = first_pushed.expect("head probes only after the first packet");
                    check.probed.extend(first - added..first);
                }
            }
            Op::Advance { ms } => now += Duration::from_millis(u64::from(ms)),
        }
    }
    jb.drain(&mut outputs);
    check.check(&mut outputs);
    assert_eq!(jb.held(), 0, "drain left packets held");
});
