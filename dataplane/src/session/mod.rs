//! The RTCP session of one received stream, sans-IO: packets and the time go
//! in, the compound to send and where to send it come out (in the manner of
//! gst-plugins-rs' `rtpbin2` session). No sockets, no clocks read here, no
//! metrics: the stream around it does those, so every rule below is unit
//! tested with made-up times.
//!
//! What it keeps:
//! - the sender's last report (LSR/DLSR for our receiver reports, RFC 3550
//!   §6.4.1) and where its RTCP comes from (symmetric RTCP, RFC 4961);
//! - the round-trip time, from retransmissions (with Karn-style care, see
//!   [`rtt_sample`]) and from XR DLRR answers to our reference times
//!   (RFC 3611 §4.4-4.5), smoothed with RFC 6298's gain;
//! - the interarrival jitter (RFC 3550 A.8);
//! - the regular receiver report with its loss fraction per interval;
//! - keyframe requests (PLI, RFC 4585) at most once per max(RTT, 300 ms);
//! - a bit rate asked of the sender (TMMBR, RFC 5104) until its TMMBN
//!   acknowledges it, repeated once per report interval; or, for a sender
//!   that reads REMB instead (browsers, WebRTC gateways), a REMB repeated
//!   once per report interval while a step below the top stands (REMB is
//!   never acknowledged), and [`REMB_TOP_REPEATS`] times back at the top.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use zerodrop_core::BitrateRequest;

use crate::repair::jitter::NackState;
use crate::rtp::{self, RtcpEvent};

/// Regular receiver reports (RFC 3550 leaves the interval to the profile;
/// AVPF sends feedback early, between these).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The round trip assumed before the first measurement.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Keyframe requests go out at most once per this long (or per RTT when
/// longer): a keyframe takes a while to come, and asking again before it
/// could have arrived only makes the sender send several.
pub const MIN_PLI_INTERVAL: Duration = Duration::from_millis(300);
/// A REMB for the top of the ladder is sent this many times, a report
/// interval apart, then no more: one lost on the way does not leave the
/// sender held low, and the sender's own estimate rules again after it.
pub const REMB_TOP_REPEATS: u8 = 3;

/// What a session is told once, at the start.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub our_ssrc: u32,
    pub cname: String,
    /// The media's RTP clock rate (90 kHz for video).
    pub clock_rate: u32,
    /// RTCP has a port of its own (not muxed on the RTP port): without a
    /// sender report to show its RTCP address, feedback goes to the
    /// sender's RTP port + 1.
    pub separate_rtcp_port: bool,
    /// How the sender is asked for a bit rate (`bitrateRequest`).
    pub bitrate_request: BitrateRequest,
}

/// What a sender's RTCP compound told us.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RtcpNews {
    /// A sender report came, with the sender's packet count.
    pub sender_report: Option<u32>,
    /// The round trip was measured (DLRR).
    pub rtt: Option<Duration>,
    /// The sender acknowledged (TMMBN) the bit rate we asked for with TMMBR.
    pub bitrate_acknowledged: Option<u64>,
    /// The media sender's report mapped its wallclock (NTP) to RTP time:
    /// `(ntp, rtp_timestamp)`.
    pub sender_clock: Option<(u64, u32)>,
    /// The media sender said goodbye (RTCP BYE, RFC 3550 6.6): no more
    /// packets or retransmissions will come from it.
    pub bye: bool,
}

/// What the receiver knows about reception, for the regular report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceptionCounts {
    /// First extended sequence number of the current sender (RFC 3550 A.3).
    pub base_seq: u64,
    /// Highest extended sequence number received.
    pub highest_seq: u64,
    /// Packets received (duplicates not counted).
    pub received: u64,
}

/// The feedback the stream wants sent now.
#[derive(Debug, Clone, Copy)]
pub struct FeedbackRequest<'a> {
    /// Extended sequence numbers to ask for (NACK).
    pub nacks: &'a [u64],
    /// A keyframe is needed (PLI, paced by the session).
    pub keyframe_wanted: bool,
    /// For the regular report; `None` before the first packet.
    pub reception: Option<ReceptionCounts>,
}

/// A compound to send, and what it carries.
#[derive(Debug)]
pub struct Transmit<'a> {
    pub data: &'a [u8],
    pub to: SocketAddr,
    pub nacks: usize,
    pub pli: bool,
    pub tmmbr_bps: Option<u64>,
    pub remb_bps: Option<u64>,
    pub report: bool,
}

pub struct RtcpSession {
    settings: SessionSettings,
    media_ssrc: Option<u32>,
    /// Where RTCP goes: the sender's RTCP source address once seen, else
    /// derived from its RTP address.
    rtcp_peer: Option<SocketAddr>,
    rtp_peer: Option<SocketAddr>,
    last_sr: Option<(u32, Instant)>,
    rtt: Option<Duration>,
    jitter: JitterEstimate,
    epoch: Instant,
    report_prior: (u64, u64),
    next_report: Instant,
    last_pli: Option<Instant>,
    bitrate_request: Option<u64>,
    /// TMMBR: the sender's TMMBN came for `bitrate_request`.
    bitrate_acknowledged: bool,
    /// When the bit rate request goes out (again).
    next_bitrate_request: Instant,
    /// REMB: how many more times the request goes out; `None` while a step
    /// below the top stands (until it changes).
    remb_left: Option<u8>,
    /// The last XR reference times sent (middle 32 bits of NTP, when).
    rrtr_sent: [Option<(u32, Instant)>; 4],
    rrtr_next: usize,
    events: Vec<RtcpEvent>,
    nack_seqs: Vec<u16>,
    buf: Vec<u8>,
}

impl RtcpSession {
    pub fn new(settings: SessionSettings, now: Instant) -> Self {
        Self {
            settings,
            media_ssrc: None,
            rtcp_peer: None,
            rtp_peer: None,
            last_sr: None,
            rtt: None,
            jitter: JitterEstimate::default(),
            epoch: now,
            report_prior: (0, 0),
            next_report: now + REPORT_INTERVAL,
            last_pli: None,
            bitrate_request: None,
            bitrate_acknowledged: false,
            next_bitrate_request: now,
            remb_left: None,
            rrtr_sent: [None; 4],
            rrtr_next: 0,
            events: Vec::with_capacity(8),
            nack_seqs: Vec::with_capacity(64),
            buf: Vec::with_capacity(1500),
        }
    }

    pub fn our_ssrc(&self) -> u32 {
        self.settings.our_ssrc
    }

    /// The sender's SSRC, once its first media packet came.
    pub fn media_ssrc(&self) -> Option<u32> {
        self.media_ssrc
    }

    pub fn set_media_ssrc(&mut self, ssrc: u32) {
        self.media_ssrc = Some(ssrc);
    }

    /// The smoothed round trip, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The round trip, or [`DEFAULT_RTT`] before it is measured.
    pub fn rtt_or_default(&self) -> Duration {
        self.rtt.unwrap_or(DEFAULT_RTT)
    }

    /// Interarrival jitter in seconds.
    pub fn jitter_seconds(&self) -> f64 {
        self.jitter.jitter / self.settings.clock_rate as f64
    }

    /// When the next regular report is due.
    pub fn next_report(&self) -> Instant {
        self.next_report
    }

    /// A media packet (original or retransmission) from `from` at `now`.
    /// Retransmissions do not count for jitter: they were sent late.
    pub fn on_media(&mut self, from: Option<SocketAddr>, now: Instant, rtp_timestamp: u32, retransmitted: bool) {
        self.rtp_peer = from;
        if !retransmitted {
            let ticks = now.saturating_duration_since(self.epoch).as_nanos() as i64 * self.settings.clock_rate as i64
                / 1_000_000_000;
            self.jitter.update(ticks, rtp_timestamp);
        }
    }

    /// A retransmission answered the requests `state` describes: a round-trip
    /// sample when it is not ambiguous. Returns the new estimate.
    pub fn on_retransmission(&mut self, state: NackState, now: Instant) -> Option<Duration> {
        let sample = rtt_sample(state, now, self.rtt)?;
        Some(self.observe_rtt(sample))
    }

    /// A sender's RTCP compound from `from`. `Err` when it does not parse
    /// (the caller counts it); nothing changes then.
    pub fn handle_rtcp(&mut self, data: &[u8], from: Option<SocketAddr>, now: Instant) -> Result<RtcpNews, rtp::RtcpError> {
        self.events.clear();
        rtp::parse_rtcp(data, &mut self.events)?;
        let mut news = RtcpNews::default();
        for i in 0..self.events.len() {
            match self.events[i] {
                RtcpEvent::SenderReport { ssrc, ntp, ntp_middle, rtp_timestamp, packet_count } => {
                    self.last_sr = Some((ntp_middle, now));
                    self.rtcp_peer = from;
                    news.sender_report = Some(packet_count);
                    if self.media_ssrc == Some(ssrc) {
                        news.sender_clock = Some((ntp, rtp_timestamp));
                    }
                }
                RtcpEvent::Bye { ref ssrcs } if self.media_ssrc.is_some_and(|m| ssrcs.contains(&m)) => {
                    news.bye = true;
                }
                RtcpEvent::Tmmbn { ssrc, bitrate_bps, .. }
                    if ssrc == self.settings.our_ssrc && self.settings.bitrate_request == BitrateRequest::Tmmbr =>
                {
                    let asked = self.bitrate_request.map(rtp::tmmb_representable);
                    if asked == Some(bitrate_bps) && !self.bitrate_acknowledged {
                        self.bitrate_acknowledged = true;
                        news.bitrate_acknowledged = Some(bitrate_bps);
                    }
                }
                // The sender's echo of our reference time: RTT = now - sent - held.
                RtcpEvent::Dlrr { ssrc, lrr, dlrr } if ssrc == self.settings.our_ssrc => {
                    let sent = self.rrtr_sent.iter().flatten().find(|(mid, _)| *mid == lrr).map(|(_, at)| *at);
                    let held = Duration::from_secs_f64(dlrr as f64 / 65_536.0);
                    if let Some(sample) = sent.and_then(|at| now.saturating_duration_since(at).checked_sub(held)) {
                        news.rtt = Some(self.observe_rtt(sample));
                    }
                }
                _ => {}
            }
        }
        Ok(news)
    }

    /// Asks the sender to send at most `bitrate_bps` (`ladder_top`: the top
    /// of its ladder), from the next feedback on. TMMBR goes again each
    /// report interval until acknowledged; REMB each report interval while
    /// below the top, [`REMB_TOP_REPEATS`] times at the top. Returns false
    /// when that is already what is asked.
    pub fn request_bitrate(&mut self, bitrate_bps: u64, ladder_top: bool, now: Instant) -> bool {
        if self.bitrate_request == Some(bitrate_bps) {
            return false;
        }
        self.bitrate_request = Some(bitrate_bps);
        self.bitrate_acknowledged = false;
        self.next_bitrate_request = now;
        self.remb_left = ladder_top.then_some(REMB_TOP_REPEATS);
        true
    }

    /// How the sender is asked for a bit rate.
    pub fn bitrate_request_kind(&self) -> BitrateRequest {
        self.settings.bitrate_request
    }

    /// Lets the next keyframe request go out at once (the sender can hear
    /// us now; one held back while it could not is due).
    pub fn allow_keyframe_request(&mut self) {
        self.last_pli = None;
    }

    /// The compound due now, if any: NACKs for `request.nacks`, a PLI when a
    /// keyframe is wanted and the last request is old enough, the regular
    /// report when due (with an XR reference time), a TMMBR while one is
    /// unacknowledged or a REMB while one is due. `wall` is the wallclock for the XR reference time.
    pub fn poll_feedback(&mut self, now: Instant, wall: SystemTime, request: FeedbackRequest<'_>) -> Option<Transmit<'_>> {
        let pli_interval = self.rtt_or_default().max(MIN_PLI_INTERVAL);
        let pli = request.keyframe_wanted
            && self.media_ssrc.is_some()
            && self.last_pli.is_none_or(|t| now.saturating_duration_since(t) >= pli_interval);
        let report_due = now >= self.next_report;
        let still_asking = match self.settings.bitrate_request {
            BitrateRequest::Tmmbr => !self.bitrate_acknowledged,
            BitrateRequest::Remb => self.remb_left != Some(0),
        };
        let bitrate_bps = self
            .bitrate_request
            .filter(|_| still_asking && now >= self.next_bitrate_request && self.media_ssrc.is_some());
        if request.nacks.is_empty() && !pli && !report_due && bitrate_bps.is_none() {
            return None;
        }
        if report_due {
            // Even with nobody to report to: a report left due would make
            // the loop wake at once, forever.
            self.next_report = now + REPORT_INTERVAL;
        }
        let peer = self.feedback_peer()?;
        if bitrate_bps.is_some() {
            self.next_bitrate_request = now + REPORT_INTERVAL;
            if let Some(left) = &mut self.remb_left {
                *left = left.saturating_sub(1);
            }
        }
        let (tmmbr_bps, remb_bps) = match self.settings.bitrate_request {
            BitrateRequest::Tmmbr => (bitrate_bps, None),
            BitrateRequest::Remb => (None, bitrate_bps),
        };
        let media_ssrc = self.media_ssrc.unwrap_or(0);
        self.nack_seqs.clear();
        self.nack_seqs.extend(request.nacks.iter().map(|&s| s as u16));
        let report = match (report_due, request.reception) {
            (true, Some(counts)) => Some(self.reception_report(now, media_ssrc, counts)),
            _ => None,
        };
        // A reference time with every regular report: a sender that answers
        // with DLRR (ours does; GStreamer's does not) times the round trip
        // without waiting for a loss.
        let rrtr_ntp = report_due.then(|| {
            let ntp = rtp::ntp_timestamp(wall);
            let slot = self.rrtr_next % self.rrtr_sent.len();
            self.rrtr_sent[slot] = Some(((ntp >> 16) as u32, now));
            self.rrtr_next += 1;
            ntp
        });
        let fb = rtp::ReceiverFeedback { report, nacks: &self.nack_seqs, pli, media_ssrc, rrtr_ntp, tmmbr_bps, remb_bps };
        if rtp::write_receiver_rtcp(self.settings.our_ssrc, &self.settings.cname, &fb, &mut self.buf).is_err() {
            return None;
        }
        if pli {
            self.last_pli = Some(now);
        }
        Some(Transmit { data: &self.buf, to: peer, nacks: request.nacks.len(), pli, tmmbr_bps, remb_bps, report: report_due })
    }

    /// A new sender took over the stream (new SSRC): everything learned of
    /// the old one is forgotten. Feedback goes to the new sender's RTP
    /// address's RTCP neighbour until its first report; its round trip is
    /// measured anew.
    pub fn reset(&mut self) {
        self.media_ssrc = None;
        self.rtcp_peer = None;
        self.last_sr = None;
        self.rtt = None;
        self.report_prior = (0, 0);
        self.jitter = JitterEstimate::default();
    }

    fn feedback_peer(&self) -> Option<SocketAddr> {
        if let Some(p) = self.rtcp_peer {
            return Some(p);
        }
        let mut p = self.rtp_peer?;
        if self.settings.separate_rtcp_port {
            p.set_port(p.port().wrapping_add(1));
        }
        Some(p)
    }

    /// Folds a round-trip sample into the smoothed estimate (RFC 6298 gain).
    fn observe_rtt(&mut self, sample: Duration) -> Duration {
        let rtt = match self.rtt {
            Some(old) => old.mul_f64(0.875) + sample.mul_f64(0.125),
            None => sample,
        };
        self.rtt = Some(rtt);
        rtt
    }

    fn reception_report(&mut self, now: Instant, media_ssrc: u32, c: ReceptionCounts) -> rtp::ReceptionReport {
        let expected = c.highest_seq.saturating_sub(c.base_seq).saturating_add(1);
        let (prior_expected, prior_received) = self.report_prior;
        let expected_interval = expected.saturating_sub(prior_expected);
        let received_interval = c.received.saturating_sub(prior_received);
        let lost_interval = expected_interval.saturating_sub(received_interval);
        self.report_prior = (expected, c.received);
        let fraction = (lost_interval << 8).checked_div(expected_interval).map_or(0, |f| f.min(255) as u8);
        let (lsr, dlsr) = match self.last_sr {
            Some((lsr, at)) => (lsr, (now.saturating_duration_since(at).as_secs_f64() * 65536.0) as u32),
            None => (0, 0),
        };
        rtp::ReceptionReport {
            media_ssrc,
            fraction_lost: fraction,
            cumulative_lost: expected.saturating_sub(c.received) as u32,
            extended_highest_seq: c.highest_seq as u32,
            jitter: self.jitter.jitter as u32,
            lsr,
            dlsr,
        }
    }
}

/// A round-trip sample from a retransmission that arrived for a packet
/// asked for `state.sent` times. Answering a single request, it is exact.
/// After several, which request it answers is ambiguous (Karn); with `e` the
/// estimate (30 ms before any):
/// - with no estimate yet, an answer sooner than e/2 after the last request
///   answers that request: the time since the last (the first figure; later
///   ones correct it);
/// - an answer e/2 or more after the last request most likely answers an
///   earlier one, and the estimate is too low (retries fired before answers
///   could come): the time since the first, an upper bound, taken only up to
///   2e, so one sample at most doubles the estimate;
/// - else the time since the last, a lower bound, when it exceeds e; else
///   nothing (an answer soon after a retry may be an earlier request's, and
///   taking it would pull the estimate down and the retries with it).
///
/// The bound matters under bursty loss, where the first retransmissions are
/// lost too: the time since the first request then measures the retries,
/// not the path, and fed itself unbounded (bench-repair, bursts of 20 at 5%:
/// 13 ms on a 0.1 ms loopback path, packets given up with budget left). On a
/// slow path (60 ms) before any measurement, the first answers come after
/// the first retry, and the upper bound finds the round trip at once.
pub fn rtt_sample(state: NackState, now: Instant, estimate: Option<Duration>) -> Option<Duration> {
    let (first, last) = (state.first?, state.last?);
    let since_last = now.saturating_duration_since(last);
    let since_first = now.saturating_duration_since(first);
    let e = estimate.unwrap_or(DEFAULT_RTT);
    match state.sent {
        0 => None,
        1 => Some(since_last),
        _ if estimate.is_none() && since_last < e / 2 => Some(since_last),
        _ if since_last >= e / 2 && since_first <= e * 2 => Some(since_first),
        _ => (since_last > e).then_some(since_last),
    }
}

/// RFC 3550 §6.4.1 / A.8 interarrival jitter, in RTP clock units.
#[derive(Debug, Default)]
struct JitterEstimate {
    last_transit: Option<i64>,
    jitter: f64,
}

impl JitterEstimate {
    fn update(&mut self, arrival_ticks: i64, rtp_timestamp: u32) -> f64 {
        let transit = arrival_ticks.wrapping_sub(rtp_timestamp as i64);
        if let Some(last) = self.last_transit {
            let d = (transit - last).unsigned_abs() as f64;
            // Sender clocks wrap at 2^32: a jump that large is a wrap, not jitter.
            if d < (1u64 << 31) as f64 {
                self.jitter += (d - self.jitter) / 16.0;
            }
        }
        self.last_transit = Some(transit);
        self.jitter
    }
}

pub mod clock;
#[cfg(test)]
mod tests;
