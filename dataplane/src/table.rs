//! The runner's live per-stream table: redrawn in place on a terminal, or
//! logged as lines every few seconds when output goes to a file.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::metrics::StreamMetrics;

const LOG_EVERY: Duration = Duration::from_secs(10);
const RECENT_EVENTS: usize = 6;

/// While the live table owns the terminal, log lines go under it instead of
/// scrolling it away.
static CAPTURE_LOGS: AtomicBool = AtomicBool::new(false);
static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// A `tracing` writer: standard error, or the live table's event list.
pub struct LogWriter {
    buf: Vec<u8>,
    capture: bool,
}

impl LogWriter {
    pub fn new() -> Self {
        Self { buf: Vec::new(), capture: CAPTURE_LOGS.load(Ordering::Relaxed) }
    }
}

impl Default for LogWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.capture {
            self.buf.extend_from_slice(data);
            Ok(data.len())
        } else {
            std::io::stderr().write(data)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.capture {
            return std::io::stderr().flush();
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(line.to_string());
        }
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

pub struct LiveTable {
    live: bool,
    streams: Vec<StreamMetrics>,
    drawn_lines: usize,
    last_log: Duration,
}

impl LiveTable {
    pub fn new(live: bool, streams: &[StreamMetrics]) -> Self {
        CAPTURE_LOGS.store(live, Ordering::Relaxed);
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
            CAPTURE_LOGS.store(false, Ordering::Relaxed);
        } else {
            eprint!("{}", self.render(elapsed));
        }
    }

    pub fn render(&self, elapsed: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "zerodrop  {:>7.1}s", elapsed.as_secs_f64());
        let _ = writeln!(
            out,
            "{:<24} {:<7} {:<11} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>9} {:>7}",
            "STREAM", "STATE", "DECODER", "FRAMES", "DROPPED", "LOST", "REPAIRED", "UNREPAIR", "NACKS", "KDROPS", "JITTER", "RTT"
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
                "{:<24} {:<7} {:<11} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7.2}ms {:>5.1}ms",
                truncate(&name, 24),
                state,
                truncate(if decoder.is_empty() { "-" } else { &decoder }, 11),
                s.frames_decoded.get(),
                s.frames_dropped_total.get(),
                s.packets_lost.get(),
                s.recovered_nack.get() + s.recovered_reorder.get(),
                s.packets_unrecovered.get(),
                s.nacks_sent.get(),
                s.kernel_drops_total.get(),
                s.jitter.get() * 1000.0,
                s.rtt.get() * 1000.0,
            );
        }
        if self.live {
            let recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "recent events:");
            for i in 0..RECENT_EVENTS {
                let _ = writeln!(out, "  {}", recent.get(i).map_or("", |l| truncate(l, 150)));
            }
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
