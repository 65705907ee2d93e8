//! Reorder buffer with loss detection and NACK scheduling.
//!
//! Packets leave in sequence order as soon as they are contiguous: the buffer
//! adds no delay to a clean stream. A gap holds later packets back until the
//! missing packet arrives (original or retransmission) or its deadline passes
//! (`latency` after the gap was seen), when it is declared lost. While a packet
//! is missing, `NackScheduler` logic here asks for it again every RTT, as long
//! as an answer could still arrive before the deadline.
//!
//! The buffer is pure: time is passed in, so tests drive it without sleeping.

use std::time::{Duration, Instant};

/// Receive buffers made when a buffer is created: enough for a batch in
/// flight plus the packets held behind a gap at moderate loss, so a running
/// stream takes every buffer from the pool (256 KiB per stream).
pub const PREALLOCATED_BUFFERS: usize = 128;
/// Buffers kept for reuse at most: the pool grows to a stream's working set
/// (more packets held behind long gaps) up to this, and never shrinks below it.
const MAX_SPARE_BUFFERS: usize = 1024;

/// Settings, separate from running state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitterSettings {
    /// How long after a gap is seen a missing packet may still be repaired.
    pub latency: Duration,
    /// Ask for retransmissions at all.
    pub nack: bool,
    /// NACKs per missing packet, at most.
    pub max_nack_retries: u32,
    /// Packets the ring holds; a power of two.
    pub capacity: usize,
}

impl Default for JitterSettings {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(zerodrop_core::limits::DEFAULT_LATENCY_MS as u64),
            nack: true,
            max_nack_retries: zerodrop_core::limits::DEFAULT_NACK_RETRIES,
            capacity: 4096,
        }
    }
}

/// A packet kept by the buffer: the datagram and where its RTP payload lies.
#[derive(Debug)]
pub struct StoredPacket {
    pub data: Vec<u8>,
    pub payload_offset: usize,
    pub payload_len: usize,
    pub timestamp: u32,
    pub marker: bool,
    pub arrival: Instant,
    /// Whether this copy came from a retransmission.
    pub retransmitted: bool,
    /// An in-band FEC packet (ULPFEC shares the media's sequence numbers):
    /// it fills its number so the media around it is contiguous, and is not
    /// handed to the depacketiser.
    pub fec: bool,
}

impl StoredPacket {
    pub fn payload(&self) -> &[u8] {
        &self.data[self.payload_offset..self.payload_offset + self.payload_len]
    }
}

/// What the buffer hands on, in sequence order.
#[derive(Debug)]
pub enum Output {
    Packet {
        seq: u64,
        packet: StoredPacket,
    },
    /// `count` consecutive packets starting at `first` will never arrive.
    Lost {
        first: u64,
        count: u64,
    },
}

/// What became of one pushed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// A packet already held or already released.
    Duplicate,
    /// Arrived after it was declared lost: counted, not used.
    TooLate,
    /// The sequence jumped further than the ring holds: the buffer restarted
    /// at this packet and declared everything in between lost.
    Resynced {
        lost: u64,
    },
}

#[derive(Debug)]
enum Slot {
    Empty,
    Missing(Gap),
    Present(StoredPacket),
}

/// A missing packet's repair state.
#[derive(Debug, Clone, Copy)]
struct Gap {
    /// When it is declared lost: `seen + latency`, or sooner once nothing
    /// can bring it any more (retries spent and unanswered, FEC hopeless).
    deadline: Instant,
    nacks_sent: u32,
    /// When to ask (again); later than now while FEC may still recover it.
    next_nack: Instant,
    first_nack: Option<Instant>,
    last_nack: Option<Instant>,
    /// Asked for on suspicion (a tail or head probe), not proven to exist;
    /// one that never arrives is passed over silently.
    speculative: bool,
    /// A request was refused by the budget (counted once per packet).
    refused: bool,
}

impl Gap {
    fn new(now: Instant, latency: Duration, speculative: bool) -> Self {
        Gap {
            deadline: now + latency,
            nacks_sent: 0,
            next_nack: now,
            first_nack: None,
            last_nack: None,
            speculative,
            refused: false,
        }
    }
}

/// The requests made for a missing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackState {
    pub sent: u32,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

/// Bounds retransmission requests, and with them the retransmission
/// bandwidth a sender spends on us: a token bucket refilled at a share of
/// the received packet rate (plus a floor), so heavy loss cannot turn into a
/// NACK storm. A refused packet is asked for as soon as a token comes, if
/// that is still in time; else it is lost and a keyframe request repairs the
/// picture.
///
/// The bound: in the long run at most `FLOOR + SHARE × packet rate`
/// requests per second (so retransmissions stay under about a quarter of the
/// media's bandwidth, plus 50 packets a second), and over any interval `τ` at
/// most `rate × (τ + depth)`, where the depth is `max(4 s, 2 × latency)`.
/// The bucket is that deep because loss comes in bursts: a keyframe of a
/// hundred packets that meets a burst of loss needs dozens of requests at
/// once, and the requests of one latency window must all fit in it (a
/// shallower bucket refused requests in the demo while the average request
/// rate was a third of the refill). An outage is the extreme case: every
/// packet it took shows missing at once when the stream comes back, each
/// with a full latency window left. At 720p30 (about 250 packets a second,
/// 112 tokens a second) a bucket of 1 s held 112 requests and an outage of
/// 299 packets (1.2 s) was left two-thirds unrepaired where GStreamer's
/// receiver, which has no bound, asked for all of it (`bench-repair`, burst
/// 50 at 300 ms, seed 2: 184 against 294 of 299 recovered); 4 s holds 450,
/// enough for about 1.8 s of such a stream, and the long-run bound is the
/// same.
#[derive(Debug, Clone)]
pub struct NackBudget {
    tokens: f64,
    /// Tokens per second.
    rate: f64,
    /// Seconds of refill the bucket holds.
    depth: f64,
    last: Option<Instant>,
    /// Packets whose request was refused for want of tokens (each once).
    pub refused: u64,
}

impl NackBudget {
    /// Share of the received packet rate that may be asked for again.
    pub const SHARE: f64 = 0.25;
    /// Requests per second allowed whatever the rate.
    pub const FLOOR: f64 = 50.0;
    /// The bucket holds at least this much refill.
    pub const MIN_DEPTH: Duration = Duration::from_secs(4);

    /// A budget for a stream whose gaps may wait `latency` for repair; it
    /// starts full at the floor rate.
    pub fn new(latency: Duration) -> Self {
        let depth = Self::MIN_DEPTH.max(latency * 2).as_secs_f64();
        Self {
            tokens: Self::FLOOR * depth,
            rate: Self::FLOOR,
            depth,
            last: None,
            refused: 0,
        }
    }

    /// No limit (tests of the retry schedule alone).
    pub fn unlimited() -> Self {
        Self {
            tokens: f64::INFINITY,
            rate: f64::INFINITY,
            depth: 1.0,
            last: None,
            refused: 0,
        }
    }

    /// Sets the refill from the received packet rate (packets per second).
    pub fn set_packet_rate(&mut self, packets_per_second: f64) {
        self.rate = Self::FLOOR + Self::SHARE * packets_per_second.max(0.0);
    }

    /// Tokens the bucket holds at most.
    pub fn capacity(&self) -> f64 {
        (self.rate * self.depth).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            self.tokens =
                (self.tokens + (now - last).as_secs_f64() * self.rate).min(self.capacity());
        }
        self.last = Some(now);
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next token.
    fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / self.rate).max(0.001))
    }
}

impl Default for NackBudget {
    fn default() -> Self {
        Self::new(JitterSettings::default().latency)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterCounters {
    pub received: u64,
    pub duplicates: u64,
    pub too_late: u64,
    /// Packets that went missing at some point (gaps seen).
    pub went_missing: u64,
    /// Missing packets that arrived in time (retransmitted or reordered).
    pub recovered: u64,
    pub recovered_by_nack: u64,
    pub lost: u64,
}

pub struct JitterBuffer {
    settings: JitterSettings,
    slots: Vec<Slot>,
    mask: u64,
    /// Next sequence number to release; `None` before the first packet.
    next_out: Option<u64>,
    /// One past the highest sequence number seen.
    end: u64,
    counters: JitterCounters,
    spare: Vec<Vec<u8>>,
    /// Loss declared by a resync, handed on by the next `pop_ready`.
    resync_loss: Option<(u64, u64)>,
    /// The first packet of the stream; head probes lie below it.
    first_real: Option<u64>,
    /// Whether anything was released yet (head probes only before that).
    released_any: bool,
    /// While set, nothing is declared lost before this instant (see
    /// `hold_losses_until`).
    hold_until: Option<Instant>,
}

impl JitterBuffer {
    pub fn new(settings: JitterSettings) -> Self {
        let capacity = settings.capacity.next_power_of_two().max(64);
        Self {
            slots: (0..capacity).map(|_| Slot::Empty).collect(),
            mask: capacity as u64 - 1,
            settings,
            next_out: None,
            end: 0,
            counters: JitterCounters::default(),
            spare: {
                let mut spare = Vec::with_capacity(MAX_SPARE_BUFFERS);
                spare.extend((0..PREALLOCATED_BUFFERS).map(|_| vec![0; crate::ingest::udp::MAX_DATAGRAM]));
                spare
            },
            resync_loss: None,
            first_real: None,
            released_any: false,
            hold_until: None,
        }
    }

    pub fn settings(&self) -> &JitterSettings {
        &self.settings
    }

    pub fn counters(&self) -> JitterCounters {
        self.counters
    }

    /// A buffer to receive the next datagram into, reused from released packets.
    pub fn take_spare(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Gives a released packet's buffer back for reuse, as it is: whoever
    /// takes it overwrites what it needs.
    pub fn recycle(&mut self, data: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS {
            self.spare.push(data);
        }
    }

    fn slot(&mut self, seq: u64) -> &mut Slot {
        &mut self.slots[(seq & self.mask) as usize]
    }

    /// Forgets all state, as when the sender restarts with a new SSRC.
    pub fn reset(&mut self) {
        for s in &mut self.slots {
            *s = Slot::Empty;
        }
        self.next_out = None;
        self.end = 0;
        self.resync_loss = None;
        self.first_real = None;
        self.released_any = false;
        self.hold_until = None;
    }

    /// Declares nothing lost before `until`: contiguous packets still leave
    /// at once, but a gap holds what follows it. For the start of a stream
    /// whose sender cannot hear us yet (its RTCP address is learnt from its
    /// first report): requests sent before then are lost in the void, and
    /// giving up on their packets would cost the first keyframe.
    pub fn hold_losses_until(&mut self, until: Instant) {
        self.hold_until = Some(until);
    }

    /// Whether losses are being held (`hold_losses_until`).
    pub fn holding_losses(&self) -> bool {
        self.hold_until.is_some()
    }

    /// Ends the hold: the sender can hear us now. Every packet still missing
    /// gets a fresh start, as if its gap were seen now: requests from the
    /// first again, and a full latency window for the answers.
    pub fn end_hold(&mut self, now: Instant) {
        if self.hold_until.take().is_none() {
            return;
        }
        let Some(start) = self.next_out else { return };
        let latency = self.settings.latency;
        for seq in start..self.end {
            if let Slot::Missing(gap) = &mut self.slots[(seq & self.mask) as usize] {
                gap.deadline = gap.deadline.max(now + latency);
                gap.nacks_sent = 0;
                gap.next_nack = now;
                gap.refused = false;
            }
        }
    }

    pub fn push(&mut self, seq: u64, packet: StoredPacket, now: Instant) -> PushOutcome {
        let capacity = self.slots.len() as u64;
        let Some(next_out) = self.next_out else {
            self.first_real = Some(seq);
            self.next_out = Some(seq);
            self.end = seq + 1;
            self.counters.received += 1;
            *self.slot(seq) = Slot::Present(packet);
            return PushOutcome::Stored;
        };
        if seq < next_out {
            self.counters.too_late += 1;
            self.recycle(packet.data);
            return PushOutcome::TooLate;
        }
        let mut outcome = PushOutcome::Stored;
        if seq >= next_out + capacity {
            // Too far ahead to keep the gap: everything before the packet is lost.
            let lost = seq - next_out;
            for s in next_out..self.end.min(next_out + capacity) {
                if let Slot::Present(p) = std::mem::replace(self.slot(s), Slot::Empty) {
                    self.recycle(p.data);
                }
            }
            self.counters.lost += lost;
            self.counters.went_missing += lost;
            self.next_out = Some(seq);
            self.end = seq;
            // Two jumps before a release make one lost range, from where the
            // first one started.
            self.resync_loss = Some(match self.resync_loss.take() {
                Some((first, _)) => (first, seq - first),
                None => (next_out, lost),
            });
            outcome = PushOutcome::Resynced { lost };
        }
        if seq >= self.end {
            // A later packet proves that tail-probed numbers exist.
            let first_real = self.first_real.unwrap_or(seq);
            let mut s = self.end;
            while s > first_real && s > next_out {
                s -= 1;
                let idx = (s & self.mask) as usize;
                match &mut self.slots[idx] {
                    Slot::Missing(gap) if gap.speculative => {
                        gap.speculative = false;
                        self.counters.went_missing += 1;
                    }
                    _ => break,
                }
            }
            // New packets beyond the highest: every skipped number is missing now.
            let latency = self.settings.latency;
            for s in self.end..seq {
                *self.slot(s) = Slot::Missing(Gap::new(now, latency, false));
                self.counters.went_missing += 1;
            }
            self.end = seq + 1;
            *self.slot(seq) = Slot::Present(packet);
            self.counters.received += 1;
            return outcome;
        }
        match self.slot(seq) {
            Slot::Present(_) => {
                self.counters.duplicates += 1;
                self.recycle(packet.data);
                PushOutcome::Duplicate
            }
            Slot::Missing(gap) => {
                let by_nack = gap.nacks_sent > 0 && packet.retransmitted;
                if gap.speculative {
                    // It existed after all.
                    self.counters.went_missing += 1;
                }
                *self.slot(seq) = Slot::Present(packet);
                self.counters.received += 1;
                self.counters.recovered += 1;
                if by_nack {
                    self.counters.recovered_by_nack += 1;
                }
                PushOutcome::Stored
            }
            Slot::Empty => {
                // Cannot happen for next_out <= seq < end; store it anyway.
                *self.slot(seq) = Slot::Present(packet);
                self.counters.received += 1;
                PushOutcome::Stored
            }
        }
    }

    /// Releases what is ready, in order, into `out`: contiguous packets, and
    /// missing packets whose deadline has passed (as `Output::Lost`).
    pub fn pop_ready(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(mut next) = self.next_out else {
            return;
        };
        if let Some(until) = self.hold_until {
            if now < until {
                // Contiguous packets leave; every gap waits.
                while next < self.end {
                    let idx = (next & self.mask) as usize;
                    if !matches!(self.slots[idx], Slot::Present(_)) {
                        break;
                    }
                    let Slot::Present(packet) = std::mem::replace(&mut self.slots[idx], Slot::Empty) else {
                        unreachable!()
                    };
                    out.push(Output::Packet { seq: next, packet });
                    self.released_any = true;
                    next += 1;
                }
                self.next_out = Some(next);
                // Half the ring held behind a gap is as long as a hold may
                // last: the rest is room for the latency window that follows.
                if self.end - next < self.slots.len() as u64 / 2 {
                    return;
                }
            }
            // Held as long as allowed: the gaps get their fresh start.
            self.end_hold(now);
        }
        if let Some((first, count)) = self.resync_loss.take() {
            out.push(Output::Lost { first, count });
        }
        while next < self.end {
            let idx = (next & self.mask) as usize;
            match &self.slots[idx] {
                Slot::Present(_) => {
                    let Slot::Present(packet) =
                        std::mem::replace(&mut self.slots[idx], Slot::Empty)
                    else {
                        unreachable!()
                    };
                    out.push(Output::Packet { seq: next, packet });
                    self.released_any = true;
                    next += 1;
                }
                Slot::Missing(gap) if gap.speculative && now >= gap.deadline => {
                    // Probed on suspicion and never seen: it did not exist.
                    self.slots[idx] = Slot::Empty;
                    next += 1;
                }
                Slot::Missing(gap) if now >= gap.deadline => {
                    let first = next;
                    while next < self.end {
                        let idx = (next & self.mask) as usize;
                        match &self.slots[idx] {
                            Slot::Missing(gap) if !gap.speculative && now >= gap.deadline => {
                                self.slots[idx] = Slot::Empty;
                                next += 1;
                            }
                            _ => break,
                        }
                    }
                    self.counters.lost += next - first;
                    out.push(Output::Lost {
                        first,
                        count: next - first,
                    });
                }
                _ => break,
            }
        }
        self.next_out = Some(next);
    }

    /// Asks for the packet after the highest one, on suspicion: when the
    /// last packets of a burst are lost nothing after them shows the gap, but
    /// an access unit left without its marker suggests one. The probe counts
    /// as a loss only once a later packet proves the number exists. Returns
    /// the sequence number now awaited, or None before the first packet.
    pub fn expect_next(&mut self, now: Instant) -> Option<u64> {
        let next = self.next_out?;
        if self.end - next + 1 >= self.slots.len() as u64 {
            return None; // the ring is full
        }
        let seq = self.end;
        *self.slot(seq) = Slot::Missing(Gap::new(now, self.settings.latency, true));
        self.end = seq + 1;
        Some(seq)
    }

    /// Awaits up to `count` packets before the first one received (counting
    /// those already awaited), on suspicion: a stream whose first packet is
    /// not the start of an access unit lost its head, and no earlier packet
    /// can reveal the gap; a sender report's packet count can. Only before
    /// anything was released. Returns how many were added.
    pub fn expect_before(&mut self, count: u64, now: Instant) -> u64 {
        let (Some(next), Some(first)) = (self.next_out, self.first_real) else {
            return 0;
        };
        let awaited = first.saturating_sub(next);
        if self.released_any || count <= awaited {
            return 0;
        }
        let room = (self.slots.len() as u64).saturating_sub(self.end - next + 1);
        let n = (count - awaited).min(room).min(next);
        for i in 1..=n {
            *self.slot(next - i) = Slot::Missing(Gap::new(now, self.settings.latency, true));
        }
        self.next_out = Some(next - n);
        n
    }

    /// One past the highest sequence number seen or awaited.
    pub fn end(&self) -> Option<u64> {
        self.next_out.map(|_| self.end)
    }

    /// Collects the sequence numbers to NACK now, given the current RTT
    /// estimate, and schedules their next retry. A packet is asked for again
    /// while its deadline has not passed, up to the retry limit, and only as
    /// far as `budget` allows; it is declared lost at its deadline and not
    /// before, because an answer may still arrive whatever the RTT estimate
    /// says (a sender that answers late, a receive thread that stalled, an
    /// RTT measured near zero on a fast path).
    pub fn due_nacks(
        &mut self,
        now: Instant,
        rtt: Duration,
        budget: &mut NackBudget,
        out: &mut Vec<u64>,
    ) {
        if !self.settings.nack {
            return;
        }
        budget.refill(now);
        let Some(start) = self.next_out else { return };
        let max = self.settings.max_nack_retries;
        // The first retry one RTT (plus margin) after the first request, then
        // exponential backoff: a single lost retransmission costs little, and
        // retries still spread out over a burst of loss instead of all
        // falling into it. The backoff is capped so that the retries left
        // still fit before the deadline (evenly spread over what remains of
        // it, leaving the last answer time to come back): an uncapped
        // doubling spends the budget's second half on one or two requests,
        // and a long burst that also takes the retransmissions outlasts them.
        let base = rtt.mul_f32(1.25).max(Duration::from_millis(5));
        for seq in start..self.end {
            if out.len() >= crate::rtp::MAX_NACKS_PER_COMPOUND {
                break; // the rest stay due: next round
            }
            let idx = (seq & self.mask) as usize;
            let Slot::Missing(gap) = &mut self.slots[idx] else {
                continue;
            };
            if gap.nacks_sent >= max || now < gap.next_nack {
                continue;
            }
            if now >= gap.deadline {
                // Too late for an answer to help: stop asking (and stop
                // `next_deadline` from waking the loop for this packet).
                gap.nacks_sent = max;
            } else if !budget.take() {
                if !gap.refused {
                    gap.refused = true;
                    budget.refused += 1;
                }
                gap.next_nack = now + budget.wait();
            } else {
                gap.nacks_sent += 1;
                let backoff = base * (1u32 << (gap.nacks_sent - 1).min(10));
                // Intervals left: one per retry left, and one for the last
                // answer to come back.
                let intervals = max.saturating_sub(gap.nacks_sent) + 1;
                let spread = gap.deadline.saturating_duration_since(now + rtt) / intervals;
                gap.next_nack = now + backoff.min(spread.max(base));
                gap.last_nack = Some(now);
                gap.first_nack.get_or_insert(now);
                out.push(seq);
            }
        }
    }

    /// Holds back the first request for a missing packet until `until`
    /// (FEC is expected to recover it by then). No effect once asked for.
    pub fn defer_nack(&mut self, seq: u64, until: Instant) {
        if let Some(Slot::Missing(gap)) = self.missing_slot(seq)
            && gap.nacks_sent == 0
        {
            gap.next_nack = gap.next_nack.max(until);
        }
    }

    /// Asks for a missing packet at the next `due_nacks` if it was not asked
    /// for yet (FEC cannot recover it). Without NACK it waits for its deadline all the same:
    /// FEC's verdict may come before all of its FEC has (a frame's FEC
    /// follows its marker packet), and a late original still counts.
    pub fn nack_now(&mut self, seq: u64, now: Instant) {
        if !self.settings.nack {
            return;
        }
        // Only the first request: retries keep their own schedule.
        if let Some(Slot::Missing(gap)) = self.missing_slot(seq)
            && gap.nacks_sent == 0
        {
            gap.next_nack = gap.next_nack.min(now);
        }
    }

    /// Sequence numbers missing now (not yet declared lost), in order.
    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        let start = self.next_out.unwrap_or(self.end);
        (start..self.end).filter(|&s| matches!(&self.slots[(s & self.mask) as usize], Slot::Missing(g) if !g.speculative))
    }

    fn missing_slot(&mut self, seq: u64) -> Option<&mut Slot> {
        let start = self.next_out?;
        if seq < start || seq >= self.end {
            return None;
        }
        Some(self.slot(seq))
    }

    /// The earliest instant at which `pop_ready` or `due_nacks` has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let start = self.next_out?;
        let mut earliest: Option<Instant> = None;
        for seq in start..self.end {
            if let Slot::Missing(gap) = &self.slots[(seq & self.mask) as usize] {
                let mut t = self
                    .hold_until
                    .map_or(gap.deadline, |h| gap.deadline.max(h));
                if self.settings.nack && gap.nacks_sent < self.settings.max_nack_retries {
                    t = t.min(gap.next_nack);
                }
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
        }
        earliest
    }

    /// Packets held waiting for a gap to close.
    pub fn held(&self) -> u64 {
        self.next_out.map_or(0, |n| self.end - n)
    }

    /// For a missing packet: how many NACKs asked for it, and when the first
    /// and the last went out (the receiver times the round trip from them).
    pub fn nack_state(&self, seq: u64) -> Option<NackState> {
        let start = self.next_out?;
        if seq < start || seq >= self.end {
            return None;
        }
        match &self.slots[(seq & self.mask) as usize] {
            Slot::Missing(gap) => Some(NackState {
                sent: gap.nacks_sent,
                first: gap.first_nack,
                last: gap.last_nack,
            }),
            _ => None,
        }
    }

    /// Releases everything held, declaring the gaps lost: for shutdown.
    pub fn drain(&mut self, out: &mut Vec<Output>) {
        let Some(start) = self.next_out else { return };
        let far_future = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Missing(gap) => Some(gap.deadline),
                _ => None,
            })
            .max();
        if let Some(t) = far_future {
            self.pop_ready(t, out);
        } else {
            self.pop_ready(Instant::now(), out);
        }
        debug_assert!(self.next_out.is_none_or(|n| n >= start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(now: Instant, ts: u32) -> StoredPacket {
        StoredPacket {
            data: vec![0; 12],
            payload_offset: 12,
            payload_len: 0,
            timestamp: ts,
            marker: false,
            arrival: now,
            retransmitted: false,
            fec: false,
        }
    }

    fn released(out: &[Output]) -> Vec<i64> {
        // Packets as their seq, losses as negative seqs.
        let mut v = Vec::new();
        for o in out {
            match o {
                Output::Packet { seq, .. } => v.push(*seq as i64),
                Output::Lost { first, count } => {
                    v.extend((*first..first + count).map(|s| -(s as i64)))
                }
            }
        }
        v
    }

    #[test]
    fn the_budget_bounds_requests_under_heavy_loss() {
        // 1000 packets/s received, half of them lost: without a bound that is
        // 1000 requests a second (and as many retransmissions).
        let t0 = Instant::now();
        let settings = JitterSettings {
            max_nack_retries: 1,
            ..JitterSettings::default()
        };
        let mut jb = JitterBuffer::new(settings);
        let mut budget = NackBudget::new(Duration::from_millis(200));
        let initial = budget.tokens;
        budget.set_packet_rate(1000.0);
        let mut out = Vec::new();
        let mut asked = 0;
        for ms in 0..2000u64 {
            let t = t0 + Duration::from_millis(ms);
            jb.push(ms * 2, pkt(t, 0), t);
            let mut nacks = Vec::new();
            jb.due_nacks(t, Duration::from_millis(20), &mut budget, &mut nacks);
            asked += nacks.len();
            jb.pop_ready(t, &mut out);
        }
        // 2 s at 50 + 25% of 1000 per second, plus what the bucket held.
        let limit = 2.0 * (NackBudget::FLOOR + NackBudget::SHARE * 1000.0) + initial;
        assert!(
            asked as f64 <= limit + 1.0,
            "{asked} requests, limit {limit}"
        );
        assert!(
            asked as f64 >= limit * 0.9,
            "the budget was not used: {asked} of {limit}"
        );
        assert!(
            budget.refused as usize >= 1999 - asked,
            "{} refused, {asked} asked of 1999",
            budget.refused
        );
    }

    #[test]
    fn a_burst_of_loss_in_a_keyframe_is_asked_for_in_full_at_once() {
        // 250 packets/s (720p30 at about 2.5 Mbit/s): refill 112/s, and the
        // bucket holds a second of it. A keyframe loses 40 packets, and 2 ms
        // later 60 more to a burst: every one is asked for as it shows.
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(300),
            max_nack_retries: 8,
            ..JitterSettings::default()
        });
        let mut budget = NackBudget::new(Duration::from_millis(300));
        budget.set_packet_rate(250.0);
        let t1 = t0 + Duration::from_secs(2); // the bucket has filled
        let mut nacks = Vec::new();
        jb.due_nacks(t0, Duration::from_millis(1), &mut budget, &mut nacks); // starts the clock
        jb.push(0, pkt(t1, 0), t1);
        jb.push(41, pkt(t1, 0), t1);
        jb.due_nacks(t1, Duration::from_millis(1), &mut budget, &mut nacks);
        assert_eq!(nacks.len(), 40);
        let t2 = t1 + Duration::from_millis(2);
        jb.push(102, pkt(t2, 0), t2);
        nacks.clear();
        jb.due_nacks(t2, Duration::from_millis(1), &mut budget, &mut nacks);
        assert_eq!(nacks, (42..102).collect::<Vec<u64>>());
        assert_eq!(budget.refused, 0);
    }

    #[test]
    fn every_packet_of_a_second_long_outage_is_asked_for_at_once() {
        // 250 packets/s (720p30): an outage takes 300 packets (1.2 s). When
        // the stream comes back all 300 show missing, each with the whole
        // latency left: all are asked for in the first rounds, none refused
        // (a bucket of 1 s of refill, 112 tokens, refused 188 of them).
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(300),
            max_nack_retries: 8,
            ..JitterSettings::default()
        });
        let mut budget = NackBudget::new(Duration::from_millis(300));
        budget.set_packet_rate(250.0);
        let mut nacks = Vec::new();
        jb.due_nacks(t0, Duration::from_millis(1), &mut budget, &mut nacks); // starts the clock
        let t1 = t0 + Duration::from_secs(5); // the bucket has filled
        jb.push(0, pkt(t1, 0), t1);
        jb.push(301, pkt(t1, 0), t1);
        jb.due_nacks(t1, Duration::from_millis(1), &mut budget, &mut nacks);
        jb.due_nacks(t1, Duration::from_millis(1), &mut budget, &mut nacks);
        assert_eq!(nacks, (1..=300).collect::<Vec<u64>>());
        assert_eq!(budget.refused, 0);
    }

    #[test]
    fn a_refused_request_goes_out_as_soon_as_a_token_comes() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        let mut budget = NackBudget::new(Duration::from_millis(200));
        budget.set_packet_rate(0.0); // 50 tokens a second
        budget.tokens = 0.0;
        let mut nacks = Vec::new();
        jb.due_nacks(t0, Duration::from_millis(1), &mut budget, &mut nacks);
        jb.push(0, pkt(t0, 0), t0);
        jb.push(2, pkt(t0, 0), t0);
        jb.due_nacks(t0, Duration::from_millis(1), &mut budget, &mut nacks);
        assert!(nacks.is_empty());
        assert_eq!(budget.refused, 1);
        // The next token comes 20 ms later, and the loop is woken for it.
        let wake = jb.next_deadline().unwrap();
        assert_eq!(wake - t0, Duration::from_millis(20));
        jb.due_nacks(wake, Duration::from_millis(1), &mut budget, &mut nacks);
        assert_eq!(nacks, vec![1]);
    }

    #[test]
    fn a_packet_whose_retries_are_spent_waits_for_its_deadline_for_a_late_answer() {
        let t0 = Instant::now();
        let settings = JitterSettings {
            latency: Duration::from_millis(1000),
            max_nack_retries: 2,
            ..JitterSettings::default()
        };
        let mut jb = JitterBuffer::new(settings);
        // The RTT estimate says answers come within 2 ms; this one takes 700.
        let rtt = Duration::from_millis(2);
        let mut budget = NackBudget::unlimited();
        let mut out = Vec::new();
        jb.push(1, pkt(t0, 0), t0);
        jb.push(3, pkt(t0, 0), t0);
        let mut asked = Vec::new();
        for ms in 0..=700u64 {
            let t = t0 + Duration::from_millis(ms);
            let mut nacks = Vec::new();
            jb.due_nacks(t, rtt, &mut budget, &mut nacks);
            if !nacks.is_empty() {
                asked.push(ms);
            }
            jb.pop_ready(t, &mut out);
        }
        assert_eq!(asked, vec![0, 5], "two requests, then none");
        let t = t0 + Duration::from_millis(700);
        let mut late = pkt(t, 0);
        late.retransmitted = true;
        assert_eq!(jb.push(2, late, t), PushOutcome::Stored);
        jb.pop_ready(t, &mut out);
        assert_eq!(released(&out), vec![1, 2, 3]);
        // Without an answer it is lost at the deadline, not before.
        jb.push(4, pkt(t, 0), t);
        jb.push(6, pkt(t, 0), t);
        for ms in 700..1701u64 {
            let t = t0 + Duration::from_millis(ms);
            let mut nacks = Vec::new();
            jb.due_nacks(t, rtt, &mut budget, &mut nacks);
            out.clear();
            jb.pop_ready(t, &mut out);
            if released(&out).contains(&-5) {
                assert_eq!(ms, 1700);
            }
        }
    }

    #[test]
    fn while_losses_are_held_a_gap_outlives_its_deadline_and_is_asked_for_afresh_when_the_sender_hears_us()
     {
        let t0 = Instant::now();
        let latency = Duration::from_millis(300);
        let mut jb = JitterBuffer::new(JitterSettings {
            latency,
            max_nack_retries: 2,
            ..JitterSettings::default()
        });
        let mut budget = NackBudget::unlimited();
        let rtt = Duration::from_millis(1);
        let mut out = Vec::new();
        jb.hold_losses_until(t0 + Duration::from_secs(3));
        jb.push(10, pkt(t0, 0), t0);
        jb.push(12, pkt(t0, 0), t0);
        // Requests go out (into the void), the retries are spent, and the
        // deadline passes: 11 is still awaited, 10 left at once.
        for ms in 0..800u64 {
            let t = t0 + Duration::from_millis(ms);
            let mut nacks = Vec::new();
            jb.due_nacks(t, rtt, &mut budget, &mut nacks);
            jb.pop_ready(t, &mut out);
        }
        assert_eq!(released(&out), vec![10]);
        // The wake-up is the end of the hold, not the passed deadline.
        assert_eq!(jb.next_deadline(), Some(t0 + Duration::from_secs(3)));
        // The sender's first report: 11 is asked for again at once, and has
        // a full latency window from now.
        let found = t0 + Duration::from_millis(800);
        jb.end_hold(found);
        let mut nacks = Vec::new();
        jb.due_nacks(found, rtt, &mut budget, &mut nacks);
        assert_eq!(nacks, vec![11]);
        jb.pop_ready(found + latency - Duration::from_millis(1), &mut out);
        assert_eq!(released(&out), vec![10]);
        jb.pop_ready(found + latency, &mut out);
        assert_eq!(released(&out), vec![10, -11, 12]);
    }

    #[test]
    fn a_hold_ends_once_half_the_ring_waits_behind_a_gap() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings { capacity: 64, ..JitterSettings::default() });
        let mut out = Vec::new();
        jb.hold_losses_until(t0 + Duration::from_secs(3));
        jb.push(0, pkt(t0, 0), t0);
        for seq in 2..32 {
            jb.push(seq, pkt(t0, 0), t0);
        }
        jb.pop_ready(t0, &mut out);
        assert!(jb.holding_losses(), "31 of 64 held");
        jb.push(32, pkt(t0, 0), t0);
        jb.pop_ready(t0, &mut out);
        assert!(!jb.holding_losses(), "32 of 64 held: the hold gives way");
        assert_eq!(released(&out), vec![0], "and the gap gets its latency window from now");
    }

    #[test]
    fn a_hold_that_runs_out_gives_the_gaps_a_fresh_start() {
        let t0 = Instant::now();
        let latency = Duration::from_millis(300);
        let mut jb = JitterBuffer::new(JitterSettings {
            latency,
            ..JitterSettings::default()
        });
        let mut out = Vec::new();
        jb.hold_losses_until(t0 + Duration::from_secs(1));
        jb.push(1, pkt(t0, 0), t0);
        jb.push(3, pkt(t0, 0), t0);
        jb.pop_ready(t0 + Duration::from_secs(1), &mut out);
        assert!(!jb.holding_losses());
        assert_eq!(released(&out), vec![1]);
        jb.pop_ready(t0 + Duration::from_secs(1) + latency, &mut out);
        assert_eq!(released(&out), vec![1, -2, 3]);
    }

    #[test]
    fn a_sender_report_can_extend_head_probes_before_anything_is_released() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        jb.push(100, pkt(t0, 0), t0);
        assert_eq!(jb.expect_before(4, t0), 4);
        assert_eq!(jb.expect_before(10, t0), 6, "10 awaited in all");
        assert_eq!(jb.expect_before(3, t0), 0);
        assert_eq!(jb.missing().count(), 0, "awaited on suspicion, not missing");
        jb.push(90, pkt(t0, 0), t0);
        assert_eq!(jb.missing().collect::<Vec<_>>(), Vec::<u64>::new());
    }

    #[test]
    fn one_round_asks_for_no_more_than_one_compound_holds_and_the_rest_next_round() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        jb.push(0, pkt(t0, 0), t0);
        jb.push(1000, pkt(t0, 0), t0);
        let mut budget = NackBudget::unlimited();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        jb.due_nacks(t0, Duration::from_millis(20), &mut budget, &mut first);
        jb.due_nacks(t0, Duration::from_millis(20), &mut budget, &mut second);
        assert_eq!(first, (1..=300).collect::<Vec<u64>>());
        assert_eq!(second, (301..=600).collect::<Vec<u64>>());
    }

    #[test]
    fn in_order_packets_leave_without_delay() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        let mut out = Vec::new();
        for s in 100..110 {
            jb.push(s, pkt(t0, 0), t0);
            jb.pop_ready(t0, &mut out);
        }
        assert_eq!(released(&out), (100..110).collect::<Vec<_>>());
        assert_eq!(jb.held(), 0);
    }

    #[test]
    fn gap_is_nacked_at_once_and_filled_by_retransmission() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        let mut out = Vec::new();
        jb.push(10, pkt(t0, 0), t0);
        jb.push(13, pkt(t0, 0), t0);
        let mut nacks = Vec::new();
        jb.due_nacks(
            t0,
            Duration::from_millis(20),
            &mut NackBudget::unlimited(),
            &mut nacks,
        );
        assert_eq!(nacks, vec![11, 12]);
        jb.pop_ready(t0, &mut out);
        assert_eq!(released(&out), vec![10]);
        let t1 = t0 + Duration::from_millis(20);
        let mut rtx = pkt(t1, 0);
        rtx.retransmitted = true;
        jb.push(11, rtx, t1);
        let mut rtx = pkt(t1, 0);
        rtx.retransmitted = true;
        jb.push(12, rtx, t1);
        jb.pop_ready(t1, &mut out);
        assert_eq!(released(&out), vec![10, 11, 12, 13]);
        let c = jb.counters();
        assert_eq!(
            (c.went_missing, c.recovered, c.recovered_by_nack, c.lost),
            (2, 2, 2, 0)
        );
    }

    /// When requests went out (since `t0`), polling every millisecond for
    /// `span`, nothing answered and no budget.
    fn request_times(
        jb: &mut JitterBuffer,
        t0: Instant,
        rtt: Duration,
        span: Duration,
    ) -> Vec<Duration> {
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + span {
            let mut n = Vec::new();
            jb.due_nacks(t, rtt, &mut NackBudget::unlimited(), &mut n);
            if !n.is_empty() {
                sent.push(t - t0);
            }
            t += Duration::from_millis(1);
        }
        sent
    }

    #[test]
    fn nack_retries_follow_rtt_and_stop_at_limit_or_deadline() {
        let t0 = Instant::now();
        let settings = JitterSettings {
            latency: Duration::from_millis(100),
            max_nack_retries: 3,
            ..Default::default()
        };
        let mut jb = JitterBuffer::new(settings);
        jb.push(1, pkt(t0, 0), t0);
        jb.push(3, pkt(t0, 0), t0);
        let rtt = Duration::from_millis(10);
        let sent = request_times(&mut jb, t0, rtt, Duration::from_millis(200));
        assert_eq!(
            sent.len(),
            3,
            "retries capped at max_nack_retries: {sent:?}"
        );
        assert!(sent[1] - sent[0] >= rtt, "retry not before one RTT");
        assert!(
            sent[2] - sent[1] >= rtt.mul_f32(1.25) * 2,
            "retries back off exponentially: {sent:?}"
        );
    }

    #[test]
    fn retries_back_off_but_all_of_them_fit_before_the_deadline() {
        // 300 ms budget, 10 retries, a short round trip, nothing answered: a
        // plain doubling from 5 ms would fit 6 requests (0, 5, 15, 35, 75,
        // 155 ms); capped, all 10 go out, spaced no closer than the first
        // interval, the last within the budget.
        let t0 = Instant::now();
        let latency = Duration::from_millis(300);
        let settings = JitterSettings {
            latency,
            max_nack_retries: 10,
            ..Default::default()
        };
        let mut jb = JitterBuffer::new(settings);
        jb.push(1, pkt(t0, 0), t0);
        jb.push(3, pkt(t0, 0), t0);
        let rtt = Duration::from_micros(300);
        let sent = request_times(&mut jb, t0, rtt, latency);
        assert_eq!(
            sent.len(),
            10,
            "every retry used before the deadline: {sent:?}"
        );
        assert!(
            sent.windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(5)),
            "{sent:?}"
        );
        assert!(
            sent[3] - sent[2] >= Duration::from_millis(20),
            "early retries still back off: {sent:?}"
        );
        assert!(*sent.last().unwrap() < latency - rtt / 2, "{sent:?}");
    }

    #[test]
    fn missing_packet_is_declared_lost_at_its_deadline() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(50),
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(1, pkt(t0, 0), t0);
        jb.push(4, pkt(t0, 0), t0);
        jb.pop_ready(t0 + Duration::from_millis(49), &mut out);
        assert_eq!(released(&out), vec![1]);
        assert_eq!(jb.next_deadline(), Some(t0));
        jb.pop_ready(t0 + Duration::from_millis(50), &mut out);
        assert_eq!(released(&out), vec![1, -2, -3, 4]);
        assert_eq!(jb.counters().lost, 2);
        // The original turning up afterwards is too late, and counted.
        assert_eq!(
            jb.push(2, pkt(t0, 0), t0 + Duration::from_millis(60)),
            PushOutcome::TooLate
        );
    }

    #[test]
    fn reordered_packet_fills_gap_without_loss() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        let mut out = Vec::new();
        for s in [1, 3, 2, 4] {
            jb.push(s, pkt(t0, 0), t0);
            jb.pop_ready(t0, &mut out);
        }
        assert_eq!(released(&out), vec![1, 2, 3, 4]);
        assert_eq!(jb.counters().lost, 0);
        assert_eq!(jb.counters().recovered_by_nack, 0);
    }

    #[test]
    fn tail_probe_awaits_the_next_packet_and_nacks_it() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        let mut out = Vec::new();
        jb.push(7, pkt(t0, 0), t0);
        jb.pop_ready(t0, &mut out);
        assert_eq!(jb.expect_next(t0), Some(8));
        let mut nacks = Vec::new();
        jb.due_nacks(
            t0,
            Duration::from_millis(10),
            &mut NackBudget::unlimited(),
            &mut nacks,
        );
        assert_eq!(nacks, vec![8]);
        let mut rtx = pkt(t0, 0);
        rtx.retransmitted = true;
        assert_eq!(jb.push(8, rtx, t0), PushOutcome::Stored);
        jb.pop_ready(t0, &mut out);
        assert_eq!(released(&out), vec![7, 8]);
        assert_eq!(jb.counters().recovered_by_nack, 1);
    }

    #[test]
    fn an_unanswered_tail_probe_expires_silently_but_a_later_packet_makes_it_a_loss() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(50),
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(7, pkt(t0, 0), t0);
        jb.expect_next(t0);
        jb.pop_ready(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(
            released(&out),
            vec![7],
            "a probe nobody answered is no loss"
        );
        assert_eq!((jb.counters().went_missing, jb.counters().lost), (0, 0));

        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(50),
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(7, pkt(t0, 0), t0);
        jb.expect_next(t0);
        jb.push(9, pkt(t0, 0), t0); // proves 8 existed
        jb.pop_ready(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(released(&out), vec![7, -8, 9]);
        assert_eq!((jb.counters().went_missing, jb.counters().lost), (1, 1));
    }

    #[test]
    fn head_probe_accepts_packets_before_the_first_one_until_something_is_released() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            latency: Duration::from_millis(50),
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(100, pkt(t0, 0), t0);
        assert_eq!(jb.expect_before(3, t0), 3);
        let mut nacks = Vec::new();
        jb.due_nacks(
            t0,
            Duration::from_millis(1),
            &mut NackBudget::unlimited(),
            &mut nacks,
        );
        assert_eq!(nacks, vec![97, 98, 99]);
        let mut rtx = pkt(t0, 0);
        rtx.retransmitted = true;
        jb.push(99, rtx, t0);
        jb.pop_ready(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(
            released(&out),
            vec![99, 100],
            "97 and 98 never existed: passed over"
        );
        assert_eq!(jb.counters().recovered_by_nack, 1);
        assert_eq!(jb.counters().lost, 0);
        assert_eq!(
            jb.expect_before(3, t0),
            0,
            "not once packets have been released"
        );
    }

    #[test]
    fn two_jumps_before_a_release_lose_one_contiguous_range() {
        // Found by the `jitter` fuzz target.
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            capacity: 64,
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(10, pkt(t0, 0), t0);
        jb.pop_ready(t0, &mut out);
        jb.push(1000, pkt(t0, 0), t0);
        jb.push(5000, pkt(t0, 0), t0);
        jb.pop_ready(t0, &mut out);
        let r = released(&out);
        assert_eq!(r.first(), Some(&10));
        assert_eq!(r.last(), Some(&5000));
        assert_eq!(
            r.len(),
            5000 - 10 + 1,
            "every number released or lost exactly once"
        );
        assert_eq!(jb.counters().lost, 5000 - 11);
    }

    #[test]
    fn duplicates_are_counted_and_dropped() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings::default());
        jb.push(1, pkt(t0, 0), t0);
        jb.push(3, pkt(t0, 0), t0);
        assert_eq!(jb.push(3, pkt(t0, 0), t0), PushOutcome::Duplicate);
        assert_eq!(jb.counters().duplicates, 1);
    }

    #[test]
    fn jump_beyond_capacity_resyncs_and_counts_loss() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterSettings {
            capacity: 64,
            ..Default::default()
        });
        let mut out = Vec::new();
        jb.push(10, pkt(t0, 0), t0);
        jb.pop_ready(t0, &mut out);
        assert_eq!(
            jb.push(1000, pkt(t0, 0), t0),
            PushOutcome::Resynced { lost: 989 }
        );
        jb.pop_ready(t0, &mut out);
        assert_eq!(released(&out).len(), 1 + 989 + 1);
        assert_eq!(released(&out).last(), Some(&1000));
        assert_eq!(jb.counters().lost, 989);
    }
}
