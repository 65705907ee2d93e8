//! The runner's live per-stream table: redrawn in place on a terminal, or
//! logged as lines every few seconds when output goes to a file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use crate::metrics::StreamMetrics;

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct LiveTable {
    live: bool,
    streams: Vec<StreamMetrics>,
    drawn_lines: usize,
    last_log: Duration,
}

impl LiveTable {
    pub fn new(live: bool, streams: &[StreamMetrics]) -> Self {
        Self { live, streams: streams.to_vec(), drawn_lines: 0, last_log: Duration::ZERO }
    }

    pub fn refresh(&mut self, elapsed: Duration) {
        if self.live {
            let text = self.render(elapsed);
            let mut err = std::io::stderr().lock();
            if self.drawn_lines > 0 {
                // Back to the table's first line, then overwrite it.
                let _ = write!(err, "\x1b[{}A", self.drawn_lines);
            }
            for line in text.lines() {
                let _ = writeln!(err, "\x1b[2K{line}");
            }
            self.drawn_lines = text.lines().count();
        } else if elapsed >= self.last_log + LOG_EVERY {
            self.last_log = elapsed;
            for s in &self.streams {
                tracing::info!(
                    stream = %format!("{}/{}", s.labels.pipeline, s.labels.stream),
                    frames_decoded = s.frames_decoded.get(),
                    frames_dropped = s.frames_dropped_total.get(),
                    packets_lost = s.packets_lost.get(),
                    repaired = s.recovered_nack.get() + s.recovered_reorder.get(),
                    unrepaired = s.packets_unrecovered.get(),
                    "progress"
                );
            }
        }
    }

    /// The final table, printed once whatever the mode.
    pub fn finish(&mut self, elapsed: Duration) {
        if self.live {
            self.refresh(elapsed);
        } else {
            eprint!("{}", self.render(elapsed));
        }
    }

    pub fn render(&self, elapsed: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "zerodrop  {:>7.1}s", elapsed.as_secs_f64());
        let _ = writeln!(
            out,
            "{:<24} {:<7} {:<11} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>9} {:>7}",
            "STREAM", "STATE", "DECODER", "FRAMES", "DROPPED", "LOST", "REPAIRED", "UNREPAIR", "NACKS", "JITTER", "RTT"
        );
        for s in &self.streams {
            let name = format!("{}/{}", s.labels.pipeline, s.labels.stream);
            let state = match (s.stream_up.get(), s.packets_received.get()) {
                (_, 0) => "waiting",
                (1, _) => "up",
                _ => "silent",
            };
            let decoder = s.decoder();
            let _ = writeln!(
                out,
                "{:<24} {:<7} {:<11} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7.2}ms {:>5.1}ms",
                truncate(&name, 24),
                state,
                truncate(if decoder.is_empty() { "-" } else { &decoder }, 11),
                s.frames_decoded.get(),
                s.frames_dropped_total.get(),
                s.packets_lost.get(),
                s.recovered_nack.get() + s.recovered_reorder.get(),
                s.packets_unrecovered.get(),
                s.nacks_sent.get(),
                s.jitter.get() * 1000.0,
                s.rtt.get() * 1000.0,
            );
        }
        out
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
