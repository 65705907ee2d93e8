//! The sender's clock, from its RTCP sender reports, sans-IO.
//!
//! A sender report pairs the sender's wallclock (NTP) with an RTP timestamp.
//! From the latest pair, every access unit's RTP timestamp maps to the
//! sender's wallclock: the time the sender says the frame was captured or
//! sent, the timestamp a program that lines up cameras, or frames with other
//! data, wants. Mapping from the latest report means a sender clock that runs
//! fast or slow never accumulates error beyond one report interval of
//! extrapolation at the nominal clock rate.
//!
//! The times handed out never go backwards: not across a report that moves
//! the mapping a little, not across a sender restart (a new SSRC, with a
//! clock of its own). Before a restarted sender's first report, a frame's
//! time is its arrival by our clock plus the last offset measured between
//! the senders' clock and ours; if the new sender's clock then turns out to
//! be well behind, a constant is added to all of its times so they continue
//! where the old sender's ended.
//!
//! Each report also samples the offset between the sender's clock and ours
//! (which includes the one-way delay of the report); the drift between the
//! two clocks is the slope of a least-squares line through the last minute
//! of samples.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::rtp::ntp_to_unix_seconds;

/// Offset samples kept for the drift fit: about a minute of reports.
const MAX_SAMPLES: usize = 64;
/// The span of samples a drift estimate needs at least.
const MIN_DRIFT_SPAN_S: f64 = 5.0;

/// What [`SenderClock`] knows of one stream's sender.
#[derive(Debug, Clone)]
pub struct SenderClock {
    clock_rate: f64,
    /// The latest report: the sender's time (seconds since the UNIX epoch)
    /// at extended RTP time.
    anchor: Option<(f64, i64)>,
    /// (our time, sender time - our time) at each report.
    samples: VecDeque<(f64, f64)>,
    /// The last offset measured, kept across a restart.
    last_offset: Option<f64>,
    /// Added to this sender's times so they continue after a restart.
    continuity: f64,
    /// The last time handed out, and its RTP time.
    last: Option<(f64, i64)>,
}

impl SenderClock {
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: f64::from(clock_rate.max(1)),
            anchor: None,
            // Full size at once: no allocation on the receive thread later.
            samples: VecDeque::with_capacity(MAX_SAMPLES),
            last_offset: None,
            continuity: 0.0,
            last: None,
        }
    }

    /// A sender report: the sender's wallclock `ntp` at extended RTP time
    /// `rtp_ext`, received at `ours`.
    pub fn on_sender_report(&mut self, ntp: u64, rtp_ext: i64, ours: SystemTime) {
        let sender = ntp_to_unix_seconds(ntp);
        let ours = ours.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.anchor = Some((sender, rtp_ext));
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((ours, sender - ours));
        self.last_offset = Some(sender - ours);
    }

    /// The sender restarted: its clock is another one.
    pub fn restart(&mut self) {
        self.anchor = None;
        self.samples.clear();
        self.continuity = 0.0;
    }

    /// The sender's wallclock (seconds since the UNIX epoch) of the access
    /// unit at extended RTP time `rtp_ext` whose first packet arrived at
    /// `arrival` by our clock; `None` before any report.
    pub fn sender_time(&mut self, rtp_ext: i64, arrival: SystemTime) -> Option<f64> {
        let mapped = match (self.anchor, self.last_offset) {
            (Some((t, r)), _) => t + (rtp_ext - r) as f64 / self.clock_rate + self.continuity,
            // A restarted sender before its first report.
            (None, Some(offset)) => arrival.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()) + offset,
            (None, None) => return None,
        };
        let tick = 1.0 / self.clock_rate;
        let out = match self.last {
            Some((t, r)) if mapped <= t => {
                // Where the last time says this one belongs.
                let expected = t + (rtp_ext - r).max(1) as f64 / self.clock_rate;
                if self.anchor.is_some() && t - mapped > 0.1 {
                    // A clock well behind the last time handed out (a
                    // restarted sender's): shift all its times.
                    self.continuity += expected - mapped;
                    expected
                } else {
                    // A report that moved the mapping back a little, or
                    // frames out of order: just after the last one.
                    t + tick
                }
            }
            _ => mapped,
        };
        self.last = Some((out, rtp_ext));
        Some(out)
    }

    /// The sender's clock minus ours at the last report (seconds; includes
    /// the report's one-way delay).
    pub fn offset(&self) -> Option<f64> {
        self.samples.back().map(|&(_, o)| o)
    }

    /// How fast the sender's clock runs against ours, in parts per million
    /// (positive: the sender's is fast); `None` until the reports span
    /// [`MIN_DRIFT_SPAN_S`].
    pub fn drift_ppm(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        if last.0 - first.0 < MIN_DRIFT_SPAN_S {
            return None;
        }
        let n = self.samples.len() as f64;
        let x0 = first.0;
        let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
        for &(x, y) in &self.samples {
            let x = x - x0;
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        let denom = n * sxx - sx * sx;
        (denom > 0.0).then(|| (n * sxy - sx * sy) / denom * 1e6)
    }
}

/// Nanoseconds since the UNIX epoch of `unix_seconds`, without the
/// rounding a single multiplication by 1e9 would suffer at today's dates.
pub fn unix_nanos(unix_seconds: f64) -> i64 {
    let whole = unix_seconds.floor();
    whole as i64 * 1_000_000_000 + ((unix_seconds - whole) * 1e9).round() as i64
}

/// `YYYY-MM-DDThh:mm:ss.sssZ` for seconds since the UNIX epoch (HLS
/// `#EXT-X-PROGRAM-DATE-TIME`, RFC 3339).
pub fn rfc3339(unix_seconds: f64) -> String {
    let millis = (unix_seconds * 1000.0).round() as i64;
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RATE: i64 = 90_000;

    fn ntp(unix_seconds: f64) -> u64 {
        crate::rtp::ntp_timestamp(UNIX_EPOCH + Duration::from_secs_f64(unix_seconds))
    }

    fn at(unix_seconds: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(unix_seconds)
    }

    const T0: f64 = 1_800_000_000.0;

    /// A sender whose clock runs `ppm` fast against ours, started at `T0`
    /// (both clocks then agree), its RTP clock driven by its own clock.
    /// Returns its wallclock and RTP time at our time `t` after `T0`.
    fn fast_sender(ppm: f64, t: f64) -> (f64, i64) {
        let theirs = t * (1.0 + ppm / 1e6);
        (T0 + theirs, (theirs * RATE as f64).round() as i64)
    }

    #[test]
    fn frames_map_to_the_senders_wallclock_and_the_drift_of_a_fast_clock_is_measured() {
        let mut c = SenderClock::new(90_000);
        assert_eq!(c.sender_time(0, at(T0)), None, "nothing before the first report");
        let mut worst: f64 = 0.0;
        for s in 0..30 {
            let (wall, rtp) = fast_sender(100.0, s as f64);
            // The report arrives 2 ms after it was sent.
            c.on_sender_report(ntp(wall), rtp, at(T0 + s as f64 + 0.002));
            for f in 0..30 {
                let t = s as f64 + f as f64 / 30.0;
                let (wall, rtp) = fast_sender(100.0, t);
                let got = c.sender_time(rtp, at(T0 + t + 0.002)).unwrap();
                worst = worst.max((got - wall).abs());
            }
        }
        assert!(worst <= 0.5 / RATE as f64 + 1e-6, "every frame within half an RTP tick of the sender's wallclock, worst {worst}");
        let drift = c.drift_ppm().unwrap();
        assert!((drift - 100.0).abs() < 1.0, "drift {drift} ppm");
        let offset = c.offset().unwrap();
        assert!((offset - (29.0 * 100e-6 - 0.002)).abs() < 1e-5, "offset {offset}");
    }

    #[test]
    fn no_drift_estimate_before_five_seconds_of_reports() {
        let mut c = SenderClock::new(90_000);
        for s in 0..5 {
            let (wall, rtp) = fast_sender(100.0, s as f64);
            c.on_sender_report(ntp(wall), rtp, at(T0 + s as f64));
        }
        assert_eq!(c.drift_ppm(), None);
    }

    #[test]
    fn times_never_go_back_across_a_restart_with_a_clock_behind() {
        let mut c = SenderClock::new(90_000);
        // Our clock is 0.5 s behind the first sender's.
        c.on_sender_report(ntp(T0 + 0.5), 0, at(T0));
        let mut out = Vec::new();
        for f in 0..60 {
            out.push(c.sender_time(f * 3000, at(T0 + f as f64 / 30.0)).unwrap());
        }
        // After a second of silence, a new sender: its first frames come
        // before its first report (its RTP time continues one frame on, as
        // the stream extends it) and are timed by their arrival and the last
        // offset; then a report says its clock is 10 s behind.
        c.restart();
        for f in 60..70 {
            let t = c.sender_time(f * 3000, at(T0 + 1.0 + f as f64 / 30.0)).unwrap();
            assert!((t - (T0 + 1.5 + f as f64 / 30.0)).abs() < 1e-6, "arrival plus the last offset");
            out.push(t);
        }
        c.on_sender_report(ntp(T0 - 10.0), 70 * 3000, at(T0 + 2.3));
        for f in 70..100 {
            out.push(c.sender_time(f * 3000, at(T0 + 1.0 + f as f64 / 30.0)).unwrap());
        }
        for w in out.windows(2) {
            assert!(w[1] > w[0], "monotonic: {} then {}", w[0], w[1]);
        }
        let steps: Vec<f64> = out.windows(2).map(|w| w[1] - w[0]).collect();
        assert!((steps[59] - (1.0 + 1.0 / 30.0)).abs() < 1e-6, "the silence shows: {}", steps[59]);
        for (i, s) in steps.iter().enumerate().filter(|&(i, _)| i != 59) {
            assert!((s - 1.0 / 30.0).abs() < 1e-6, "frame spacing kept at {i}: {s}");
        }
    }

    #[test]
    fn a_report_that_moves_the_mapping_back_a_little_does_not_reverse_time() {
        let mut c = SenderClock::new(90_000);
        c.on_sender_report(ntp(T0), 0, at(T0));
        let a = c.sender_time(3000, at(T0)).unwrap();
        c.on_sender_report(ntp(T0 - 0.05), 0, at(T0 + 1.0));
        let b = c.sender_time(3000, at(T0)).unwrap();
        assert!(b > a && b - a < 1e-4, "{a} then {b}");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400.5), "2000-02-29T00:00:00.500Z");
        assert_eq!(rfc3339(1_796_601_599.999), "2026-12-06T23:59:59.999Z");
    }
}
