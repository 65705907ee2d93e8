//! Counters sampled over a run, and the per-window series made of them.

#[allow(unused_imports)]
use super::*;

/// A cumulative counter sampled at times (CLOCK_MONOTONIC ns).
#[derive(Default)]
pub(crate) struct Counter(pub(crate) Vec<(u64, f64)>);

impl Counter {
    /// Linear interpolation; clamped to the first and last samples.
    pub(crate) fn at(&self, t: u64) -> f64 {
        let s = &self.0;
        if s.is_empty() {
            return 0.0;
        }
        let i = s.partition_point(|&(ts, _)| ts <= t);
        if i == 0 {
            return s[0].1;
        }
        if i == s.len() {
            return s[s.len() - 1].1;
        }
        let (ta, va) = s[i - 1];
        let (tb, vb) = s[i];
        if tb == ta { vb } else { va + (vb - va) * (t - ta) as f64 / (tb - ta) as f64 }
    }

    pub(crate) fn delta(&self, a: u64, b: u64) -> f64 {
        self.at(b) - self.at(a)
    }
}

pub(crate) struct Series {
    pub(crate) offered: Counter,
    pub(crate) read: Counter,
    pub(crate) delivered: Counter,
    pub(crate) frames: Counter,
    pub(crate) drops: Counter,
    pub(crate) cpu_stat: Counter,
    pub(crate) cpu_sched: Counter,
}

impl Series {
    pub(crate) fn new(offered: &[(u64, u64)], counters: &[RxSample], sys: &[SysSample]) -> Self {
        let c = |f: &dyn Fn(&RxSample) -> f64| Counter(counters.iter().map(|s| (s.t_ns, f(s))).collect());
        let y = |f: &dyn Fn(&SysSample) -> f64| Counter(sys.iter().map(|s| (s.t_ns, f(s))).collect());
        Series {
            offered: Counter(offered.iter().map(|&(t, v)| (t, v as f64)).collect()),
            read: c(&|s| s.read),
            delivered: c(&|s| s.delivered),
            frames: c(&|s| s.frames),
            drops: y(&|s| s.socket_drops),
            cpu_stat: y(&|s| s.cpu_stat_s),
            cpu_sched: y(&|s| s.cpu_sched_s),
        }
    }

    pub(crate) fn phase(&self, p: &PhaseOffered, trim_s: f64, kind: RxKind) -> PhaseResult {
        // The last 100 ms are left out too: counters sampled every 50 ms
        // would smear the next phase into this one.
        let b = p.end_ns.saturating_sub(END_TRIM_NS).max(p.start_ns);
        let a = (p.start_ns + (trim_s * 1e9) as u64).min(b);
        let secs = (b - a) as f64 * 1e-9;
        let rate = |c: &Counter| if secs > 0.0 { c.delta(a, b) / secs } else { 0.0 };
        let read = self.read.delta(a, b);
        let per_packet = |c: &Counter| if read > 0.0 { c.delta(a, b) * 1e9 / read } else { f64::NAN };
        PhaseResult {
            name: p.name.clone(),
            rate_pps: p.rate_pps,
            trim_s,
            sender_cpu_util: p.sender_cpu_util,
            measured_s: secs,
            offered_pps: rate(&self.offered),
            read_pps: rate(&self.read),
            delivered_pps: rate(&self.delivered),
            frames_per_s: kind.has_frames().then(|| rate(&self.frames)),
            socket_drops: self.drops.delta(a, b),
            cpu_util: rate(&self.cpu_sched),
            packets_read: read,
            ns_cpu_per_packet: per_packet(&self.cpu_stat),
            ns_cpu_per_packet_schedstat: per_packet(&self.cpu_sched),
        }
    }

    pub(crate) fn windows(&self, t0: u64, t1: u64, kind: RxKind) -> Vec<Window> {
        let mut out = Vec::new();
        let mut a = t0;
        while a + WINDOW_NS <= t1 {
            let b = a + WINDOW_NS;
            let secs = WINDOW_NS as f64 * 1e-9;
            out.push(Window {
                t_s: (a - t0) as f64 * 1e-9,
                offered_pps: self.offered.delta(a, b) / secs,
                read_pps: self.read.delta(a, b) / secs,
                delivered_pps: self.delivered.delta(a, b) / secs,
                frames_per_s: kind.has_frames().then(|| self.frames.delta(a, b) / secs),
                socket_drops: self.drops.delta(a, b),
                cpu_util: self.cpu_sched.delta(a, b) / secs,
            });
            a = b;
        }
        out
    }
}
