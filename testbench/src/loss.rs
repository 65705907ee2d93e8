//! Seeded packet-loss models shared by the lossy relay and the test sender.
//!
//! A [`LossSpec`] is what the user wrote (`uniform:0.03`, `ge:loss=0.05,burst=5`,
//! `trace:drops.txt`, or several joined with `+`); [`LossSpec::model`] turns it
//! into a running [`LossModel`] for one packet stream. The model decides per
//! packet, in the order packets are offered, and draws from a ChaCha stream
//! seeded by a `u64`: the same spec, seed and packet order always drop the same
//! packets, which is what lets two receivers be judged on identical loss.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A parsed loss specification: the configuration, without running state.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LossSpec {
    /// Never drops.
    #[default]
    None,
    /// Drops each packet independently with probability `p`.
    Uniform { p: f64 },
    /// Two-state Gilbert–Elliott channel.
    GilbertElliott(GilbertElliott),
    /// Replays a recorded drop pattern.
    Trace(LossTrace),
    /// Drops a packet when any of the parts drops it. Every part sees every
    /// packet, so each part's pattern does not depend on the others.
    Any(Vec<LossSpec>),
}

/// Gilbert–Elliott parameters. Per packet the channel first decides loss in its
/// current state, then moves: good→bad with probability `p`, bad→good with
/// probability `r`. In netem's `gemodel p r 1-h 1-k` terms, `bad_loss` is
/// `1-h` and `good_loss` is `1-k`; the names here say what they are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// P(good → bad) per packet.
    pub p: f64,
    /// P(bad → good) per packet; the mean time in the bad state is `1/r` packets.
    pub r: f64,
    /// Loss probability in the bad state (classic Gilbert: 1.0).
    pub bad_loss: f64,
    /// Loss probability in the good state (classic Gilbert: 0.0).
    pub good_loss: f64,
}

impl GilbertElliott {
    /// Parameters giving a mean loss rate `loss` with bad-state sojourns of
    /// `burst` packets on average (with the default `bad_loss` 1 and
    /// `good_loss` 0 that is the mean length of a run of consecutive drops).
    pub fn from_loss_and_burst(loss: f64, burst: f64) -> Result<Self, LossSpecError> {
        Self::from_loss_and_burst_with(loss, burst, 1.0, 0.0)
    }

    /// As [`Self::from_loss_and_burst`] with explicit per-state loss
    /// probabilities: the stationary bad-state share is chosen so that
    /// `share * bad_loss + (1 - share) * good_loss == loss`.
    pub fn from_loss_and_burst_with(loss: f64, burst: f64, bad_loss: f64, good_loss: f64) -> Result<Self, LossSpecError> {
        check_probability("bad_loss", bad_loss)?;
        check_probability("good_loss", good_loss)?;
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(LossSpecError::new(format!("ge burst must be a mean burst length >= 1 packet, got {burst}")));
        }
        if !(loss.is_finite() && loss >= good_loss && loss < bad_loss) {
            return Err(LossSpecError::new(format!(
                "ge loss must lie in [good_loss, bad_loss) = [{good_loss}, {bad_loss}), got {loss}"
            )));
        }
        let bad_share = (loss - good_loss) / (bad_loss - good_loss);
        let r = 1.0 / burst;
        let p = bad_share * r / (1.0 - bad_share);
        if p > 1.0 {
            return Err(LossSpecError::new(format!(
                "ge loss={loss} with burst={burst} needs P(good→bad)={p:.3} > 1; use a longer burst or a lower loss"
            )));
        }
        Ok(Self { p, r, bad_loss, good_loss })
    }

    /// Long-run share of packets lost.
    pub fn mean_loss(&self) -> f64 {
        let bad_share = self.bad_share();
        bad_share * self.bad_loss + (1.0 - bad_share) * self.good_loss
    }

    fn bad_share(&self) -> f64 {
        if self.p + self.r == 0.0 { 0.0 } else { self.p / (self.p + self.r) }
    }

    fn validate(&self) -> Result<(), LossSpecError> {
        check_probability("p", self.p)?;
        check_probability("r", self.r)?;
        check_probability("bad_loss", self.bad_loss)?;
        check_probability("good_loss", self.good_loss)?;
        if self.r == 0.0 && self.p > 0.0 {
            return Err(LossSpecError::new("ge r must be > 0 (with r=0 the channel never leaves the bad state)"));
        }
        Ok(())
    }
}

/// What a trace does after its last entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceEnd {
    /// Starts again from the first entry.
    Cycle,
    /// Drops nothing more.
    Stop,
}

/// A recorded drop pattern: `pattern[i]` says whether packet `i` is dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct LossTrace {
    pub path: PathBuf,
    pub pattern: Arc<[bool]>,
    pub end: TraceEnd,
}

impl LossTrace {
    /// Reads a trace file. Two formats, told apart by content:
    /// - bits: only `0` and `1` characters (whitespace and `#` comments
    ///   ignored), one per packet, e.g. `0001100` or one digit per line;
    /// - indices: 0-based packet indices to drop, separated by whitespace or
    ///   commas (a file starting with a `#!indices` line is always read as
    ///   indices, so `0 1` can mean "drop the first two packets").
    ///
    /// `end` defaults to cycling for bits and stopping for indices.
    pub fn load(path: &Path, end: Option<TraceEnd>) -> Result<Self, LossSpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LossSpecError::new(format!("cannot read loss trace {}: {e}", path.display())))?;
        let forced_indices = text.lines().next().is_some_and(|l| l.trim() == "#!indices");
        let tokens: Vec<&str> = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""))
            .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ','))
            .filter(|t| !t.is_empty())
            .collect();
        let is_bits = !forced_indices && tokens.iter().all(|t| t.bytes().all(|b| b == b'0' || b == b'1'));
        let (pattern, default_end) = if is_bits {
            (tokens.iter().flat_map(|t| t.bytes().map(|b| b == b'1')).collect::<Vec<_>>(), TraceEnd::Cycle)
        } else {
            let mut indices = Vec::with_capacity(tokens.len());
            for (n, t) in tokens.iter().enumerate() {
                let i: usize = t.parse().map_err(|_| {
                    LossSpecError::new(format!(
                        "loss trace {}: token {} is {t:?}; expected only 0/1 digits (one per packet) or non-negative packet indices",
                        path.display(),
                        n + 1
                    ))
                })?;
                if i > 100_000_000 {
                    return Err(LossSpecError::new(format!(
                        "loss trace {}: packet index {i} is larger than the supported 100000000",
                        path.display()
                    )));
                }
                indices.push(i);
            }
            let len = indices.iter().max().map_or(0, |m| m + 1);
            let mut pattern = vec![false; len];
            for i in indices {
                pattern[i] = true;
            }
            (pattern, TraceEnd::Stop)
        };
        Ok(Self { path: path.to_path_buf(), pattern: pattern.into(), end: end.unwrap_or(default_end) })
    }
}

/// A user-facing error in a loss specification: says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LossSpecError(String);

impl LossSpecError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

const SYNTAX: &str = "expected `none`, `uniform:P`, `ge:loss=L,burst=B[,bad_loss=H][,good_loss=K]`, \
`ge:p=P,r=R[,bad_loss=H][,good_loss=K]`, `trace:PATH[,end=cycle|stop]`, or several joined with `+`";

fn check_probability(name: &str, v: f64) -> Result<(), LossSpecError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(LossSpecError::new(format!("{name} must be a probability in [0, 1], got {v}")))
    }
}

fn parse_number(model: &str, key: &str, value: &str) -> Result<f64, LossSpecError> {
    value
        .trim()
        .parse::<f64>()
        .map_err(|_| LossSpecError::new(format!("{model}: {key} must be a number, got {value:?}")))
}

impl LossSpec {
    /// Parses a loss specification; see [`SYNTAX`](Self::SYNTAX).
    pub fn parse(spec: &str) -> Result<Self, LossSpecError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(LossSpecError::new(format!("empty loss specification; {SYNTAX}")));
        }
        let parts: Vec<&str> = spec.split('+').map(str::trim).collect();
        if parts.len() > 1 {
            let parts = parts.into_iter().map(Self::parse_one).collect::<Result<Vec<_>, _>>()?;
            return Ok(LossSpec::Any(parts));
        }
        Self::parse_one(spec)
    }

    /// The accepted syntax, for help texts.
    pub const SYNTAX: &'static str = SYNTAX;

    fn parse_one(part: &str) -> Result<Self, LossSpecError> {
        let (kind, rest) = match part.split_once(':') {
            Some((k, r)) => (k.trim(), Some(r.trim())),
            None => (part, None),
        };
        match (kind.to_ascii_lowercase().as_str(), rest) {
            ("none" | "off" | "0", None) => Ok(LossSpec::None),
            ("uniform", Some(p)) => {
                let p = parse_number("uniform", "P", p)?;
                check_probability("uniform P", p)?;
                Ok(LossSpec::Uniform { p })
            }
            ("ge" | "gilbert" | "gilbert-elliott", Some(params)) => Self::parse_ge(params).map(LossSpec::GilbertElliott),
            ("trace", Some(rest)) => {
                let (path, end) = match rest.rsplit_once(",end=") {
                    Some((path, "cycle")) => (path, Some(TraceEnd::Cycle)),
                    Some((path, "stop")) => (path, Some(TraceEnd::Stop)),
                    Some((_, other)) => {
                        return Err(LossSpecError::new(format!("trace end must be `cycle` or `stop`, got {other:?}")));
                    }
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(LossSpecError::new("trace: expected a file path after `trace:`"));
                }
                LossTrace::load(Path::new(path), end).map(LossSpec::Trace)
            }
            _ => Err(LossSpecError::new(format!("unknown loss model {part:?}; {SYNTAX}"))),
        }
    }

    fn parse_ge(params: &str) -> Result<GilbertElliott, LossSpecError> {
        let (mut loss, mut burst, mut p, mut r) = (None, None, None, None);
        let (mut bad_loss, mut good_loss) = (1.0, 0.0);
        for kv in params.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = kv.split_once('=') else {
                return Err(LossSpecError::new(format!("ge: expected key=value, got {kv:?}; {SYNTAX}")));
            };
            let v = parse_number("ge", key.trim(), value)?;
            match key.trim() {
                "loss" => loss = Some(v),
                "burst" => burst = Some(v),
                "p" => p = Some(v),
                "r" => r = Some(v),
                "bad_loss" => bad_loss = v,
                "good_loss" => good_loss = v,
                other => {
                    return Err(LossSpecError::new(format!(
                        "ge: unknown parameter {other:?}; expected loss, burst, p, r, bad_loss or good_loss"
                    )));
                }
            }
        }
        let ge = match (loss, burst, p, r) {
            (Some(loss), Some(burst), None, None) => {
                GilbertElliott::from_loss_and_burst_with(loss, burst, bad_loss, good_loss)?
            }
            (None, None, Some(p), Some(r)) => GilbertElliott { p, r, bad_loss, good_loss },
            _ => {
                return Err(LossSpecError::new(format!(
                    "ge: give either loss= and burst= or p= and r= (not a mix); got {params:?}"
                )));
            }
        };
        ge.validate()?;
        Ok(ge)
    }

    /// The running model for one packet stream, seeded by `seed`.
    pub fn model(&self, seed: u64) -> LossModel {
        self.model_part(seed, 0)
    }

    fn model_part(&self, seed: u64, part: u64) -> LossModel {
        // Each part of a composite draws from its own stream, so adding a part
        // does not shift the draws of the others.
        let rng = || ChaCha8Rng::seed_from_u64(seed ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match self {
            LossSpec::None => LossModel { state: ModelState::None },
            LossSpec::Uniform { p } => LossModel { state: ModelState::Uniform { p: *p, rng: rng() } },
            LossSpec::GilbertElliott(ge) => {
                let mut rng = rng();
                // Start from the stationary distribution so short runs already
                // see the configured mean rate.
                let bad = rng.random::<f64>() < ge.bad_share();
                LossModel { state: ModelState::GilbertElliott { ge: *ge, bad, rng } }
            }
            LossSpec::Trace(trace) => LossModel { state: ModelState::Trace { trace: trace.clone(), next: 0 } },
            LossSpec::Any(parts) => LossModel {
                state: ModelState::Any(
                    parts.iter().enumerate().map(|(i, p)| p.model_part(seed, part * 64 + i as u64 + 1)).collect(),
                ),
            },
        }
    }

    pub fn is_none(&self) -> bool {
        match self {
            LossSpec::None => true,
            LossSpec::Any(parts) => parts.iter().all(LossSpec::is_none),
            _ => false,
        }
    }
}

impl FromStr for LossSpec {
    type Err = LossSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for LossSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossSpec::None => write!(f, "none"),
            LossSpec::Uniform { p } => write!(f, "uniform:{p}"),
            LossSpec::GilbertElliott(ge) => {
                write!(f, "ge:p={},r={}", ge.p, ge.r)?;
                if ge.bad_loss != 1.0 {
                    write!(f, ",bad_loss={}", ge.bad_loss)?;
                }
                if ge.good_loss != 0.0 {
                    write!(f, ",good_loss={}", ge.good_loss)?;
                }
                Ok(())
            }
            LossSpec::Trace(t) => {
                let end = match t.end {
                    TraceEnd::Cycle => "cycle",
                    TraceEnd::Stop => "stop",
                };
                write!(f, "trace:{},end={end}", t.path.display())
            }
            LossSpec::Any(parts) => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        write!(f, "+")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// A loss model with its running state: call [`should_drop`](Self::should_drop)
/// once per packet, in packet order.
#[derive(Debug, Clone)]
pub struct LossModel {
    state: ModelState,
}

#[derive(Debug, Clone)]
enum ModelState {
    None,
    Uniform { p: f64, rng: ChaCha8Rng },
    GilbertElliott { ge: GilbertElliott, bad: bool, rng: ChaCha8Rng },
    Trace { trace: LossTrace, next: usize },
    Any(Vec<LossModel>),
}

impl LossModel {
    /// A model that never drops.
    pub fn none() -> Self {
        LossModel { state: ModelState::None }
    }

    /// Decides the fate of the next packet.
    pub fn should_drop(&mut self) -> bool {
        match &mut self.state {
            ModelState::None => false,
            ModelState::Uniform { p, rng } => rng.random::<f64>() < *p,
            ModelState::GilbertElliott { ge, bad, rng } => {
                let loss = if *bad { ge.bad_loss } else { ge.good_loss };
                let drop = loss > 0.0 && rng.random::<f64>() < loss;
                let leave = if *bad { ge.r } else { ge.p };
                if rng.random::<f64>() < leave {
                    *bad = !*bad;
                }
                drop
            }
            ModelState::Trace { trace, next } => {
                let len = trace.pattern.len();
                if len == 0 {
                    return false;
                }
                let i = match trace.end {
                    TraceEnd::Cycle => *next % len,
                    TraceEnd::Stop if *next >= len => return false,
                    TraceEnd::Stop => *next,
                };
                *next += 1;
                trace.pattern[i]
            }
            ModelState::Any(parts) => {
                // No short-circuit: every part must advance on every packet.
                parts.iter_mut().fold(false, |any, part| part.should_drop() | any)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(spec: &str, seed: u64, n: usize) -> Vec<bool> {
        let mut m = LossSpec::parse(spec).unwrap().model(seed);
        (0..n).map(|_| m.should_drop()).collect()
    }

    fn rate(drops: &[bool]) -> f64 {
        drops.iter().filter(|&&d| d).count() as f64 / drops.len() as f64
    }

    /// Mean length of runs of consecutive drops.
    fn mean_burst(drops: &[bool]) -> f64 {
        let (mut runs, mut dropped, mut prev) = (0usize, 0usize, false);
        for &d in drops {
            if d {
                dropped += 1;
                if !prev {
                    runs += 1;
                }
            }
            prev = d;
        }
        dropped as f64 / runs as f64
    }

    #[test]
    fn same_seed_gives_identical_drop_pattern() {
        for spec in ["uniform:0.1", "ge:loss=0.05,burst=5", "uniform:0.1+ge:loss=0.02,burst=8"] {
            assert_eq!(pattern(spec, 7, 10_000), pattern(spec, 7, 10_000), "{spec}");
            assert_ne!(pattern(spec, 7, 10_000), pattern(spec, 8, 10_000), "{spec}: seed must matter");
        }
    }

    #[test]
    fn uniform_rate_is_within_tolerance_over_200k_packets() {
        let r = rate(&pattern("uniform:0.03", 1, 200_000));
        assert!((r - 0.03).abs() < 0.002, "measured {r}");
    }

    #[test]
    fn gilbert_elliott_rate_and_mean_burst_are_within_tolerance() {
        let drops = pattern("ge:loss=0.05,burst=5", 3, 200_000);
        let (r, b) = (rate(&drops), mean_burst(&drops));
        assert!((r - 0.05).abs() < 0.006, "rate {r}");
        assert!((b - 5.0).abs() < 0.4, "mean burst {b}");
    }

    #[test]
    fn gilbert_elliott_from_p_and_r_matches_theory() {
        let spec = LossSpec::parse("ge:p=0.01,r=0.25").unwrap();
        let LossSpec::GilbertElliott(ge) = &spec else { panic!("{spec:?}") };
        let drops = pattern("ge:p=0.01,r=0.25", 11, 200_000);
        assert!((rate(&drops) - ge.mean_loss()).abs() < 0.005, "rate {} vs {}", rate(&drops), ge.mean_loss());
        assert!((mean_burst(&drops) - 4.0).abs() < 0.4, "burst {}", mean_burst(&drops));
    }

    #[test]
    fn composite_drops_when_any_part_drops_and_parts_keep_their_own_streams() {
        let n = 50_000;
        let both = pattern("uniform:0.1+uniform:0.2", 5, n);
        let r = rate(&both);
        let want = 1.0 - 0.9 * 0.8;
        assert!((r - want).abs() < 0.01, "measured {r}, want {want}");
    }

    #[test]
    fn none_and_zero_never_drop_and_one_always_drops() {
        assert!(!pattern("none", 1, 1000).contains(&true));
        assert!(!pattern("uniform:0", 1, 1000).contains(&true));
        assert!(!pattern("uniform:1", 1, 1000).contains(&false));
        assert!(LossSpec::parse("none").unwrap().is_none());
    }

    #[test]
    fn bit_trace_cycles_and_index_trace_stops() {
        let dir = std::env::temp_dir().join(format!("zerodrop-loss-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bits = dir.join("bits.txt");
        std::fs::write(&bits, "# comment\n0 1\n1\n").unwrap();
        let got = pattern(&format!("trace:{}", bits.display()), 0, 7);
        assert_eq!(got, [false, true, true, false, true, true, false]);
        let got = pattern(&format!("trace:{},end=stop", bits.display()), 0, 5);
        assert_eq!(got, [false, true, true, false, false]);

        let idx = dir.join("idx.txt");
        std::fs::write(&idx, "2, 4\n7\n").unwrap();
        let got = pattern(&format!("trace:{}", idx.display()), 0, 10);
        let want: Vec<bool> = (0..10).map(|i| [2, 4, 7].contains(&i)).collect();
        assert_eq!(got, want);

        let forced = dir.join("forced.txt");
        std::fs::write(&forced, "#!indices\n1\n").unwrap();
        assert_eq!(pattern(&format!("trace:{},end=cycle", forced.display()), 0, 4), [false, true, false, true]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_specs_are_rejected_with_what_was_expected() {
        let err = |s: &str| LossSpec::parse(s).unwrap_err().to_string();
        assert!(err("uniform:1.5").contains("[0, 1]"));
        assert!(err("uniform:abc").contains("must be a number"));
        assert!(err("bogus").contains("expected `none`"));
        assert!(err("ge:loss=0.05").contains("either loss= and burst="));
        assert!(err("ge:loss=0.05,burst=0.5").contains("burst"));
        assert!(err("ge:p=0.1,r=0.2,q=3").contains("unknown parameter"));
        assert!(err("trace:/nonexistent/zerodrop/trace").contains("cannot read loss trace"));
        assert!(err("").contains("empty"));
    }

    #[test]
    fn display_round_trips_through_parse() {
        for spec in ["none", "uniform:0.03", "ge:p=0.01,r=0.2,bad_loss=0.5", "uniform:0.1+ge:p=0.1,r=0.5"] {
            let parsed = LossSpec::parse(spec).unwrap();
            assert_eq!(LossSpec::parse(&parsed.to_string()).unwrap(), parsed, "{spec}");
        }
    }
}
