//! What the pulled ingests (RTSP, SRT) share: the local socket's protocol
//! between a pull and the worker, where credentials come from, and the
//! backoff between dials.
//!
//! The local socket carries RTP and RTCP as they arrived, and marks whose
//! first byte is 0 (RTP version 0: never a valid RTP or RTCP packet):
//! - `\0ZDD pt n (len16 nal)*`: a session started; its payload type and the
//!   parameter sets its description announced (for streams that never
//!   repeat them in band).
//! - `\0ZDE`: the session ended; the next packets come from a new one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// The first wait before dialling again; doubled after each failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two dials.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub(crate) const MARK_DESCRIPTION: &[u8; 4] = b"\0ZDD";
pub(crate) const MARK_END: &[u8; 4] = b"\0ZDE";


/// Where a pulled source's secrets (an RTSP user name and password, an SRT
/// passphrase) are read from, at each dial, so a rotated Secret is used at
/// the next one. Errors name where a secret was looked for, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A directory laid out as a mounted Secret: one file per key.
    Directory(PathBuf),
    /// Environment variables `PREFIX_<KEY>` (the key upper-cased).
    Environment(String),
}

/// Where the pod mounts Secret `name` (the operator mounts it there).
pub fn mounted_secret_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/run/zerodrop/credentials").join(name)
}

impl SecretSource {
    /// Parses the local runner's `--credentials` value: `env:PREFIX` or a
    /// directory.
    pub fn parse(value: &str) -> Self {
        match value.strip_prefix("env:") {
            Some(prefix) => SecretSource::Environment(prefix.to_string()),
            None => SecretSource::Directory(PathBuf::from(value)),
        }
    }

    /// The value under `key` (a trailing newline removed).
    pub fn read(&self, key: &str) -> anyhow::Result<String> {
        match self {
            SecretSource::Directory(dir) => {
                let path = dir.join(key);
                std::fs::read_to_string(&path)
                    .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                    .with_context(|| format!("cannot read the secret file {}", path.display()))
            }
            SecretSource::Environment(_) => {
                let var = self.variable(key);
                std::env::var(&var).with_context(|| format!("environment variable {var} is not set (or not UTF-8)"))
            }
        }
    }

    fn variable(&self, key: &str) -> String {
        let prefix = match self {
            SecretSource::Environment(p) => p.as_str(),
            SecretSource::Directory(_) => "",
        };
        let key: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("{prefix}_{key}")
    }

    /// Where the values of `keys` come from, for messages.
    pub fn describe(&self, keys: &[&str]) -> String {
        match self {
            SecretSource::Directory(dir) => format!("{}/{{{}}}", dir.display(), keys.join(",")),
            SecretSource::Environment(_) => keys.iter().map(|k| format!("${}", self.variable(k))).collect::<Vec<_>>().join(", "),
        }
    }
}

/// What a session description message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    pub payload_type: u8,
    pub parameter_sets: Vec<Vec<u8>>,
}

/// A control message on the local socket, if `datagram` is one.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    Started(SessionDescription),
    Ended,
    Malformed,
}

pub fn control_message(datagram: &[u8]) -> Option<Control> {
    if datagram.first() != Some(&0) {
        return None;
    }
    if datagram == MARK_END {
        return Some(Control::Ended);
    }
    let Some(rest) = datagram.strip_prefix(MARK_DESCRIPTION) else { return Some(Control::Malformed) };
    let parse = || -> Option<SessionDescription> {
        let (&payload_type, rest) = rest.split_first()?;
        let (&n, mut rest) = rest.split_first()?;
        let mut parameter_sets = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            parameter_sets.push(rest.get(2..2 + len)?.to_vec());
            rest = &rest[2 + len..];
        }
        rest.is_empty().then_some(SessionDescription { payload_type, parameter_sets })
    };
    Some(parse().map_or(Control::Malformed, Control::Started))
}

pub(crate) fn encode_description(d: &SessionDescription) -> Vec<u8> {
    let mut out = MARK_DESCRIPTION.to_vec();
    out.push(d.payload_type);
    let sets: Vec<&Vec<u8>> = d.parameter_sets.iter().filter(|s| s.len() <= usize::from(u16::MAX)).take(255).collect();
    out.push(sets.len() as u8);
    for s in sets {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }
    out
}

/// Capped exponential backoff with full jitter: each wait is drawn in
/// [ceiling/2, ceiling], and the ceiling doubles up to `BACKOFF_MAX`.
#[derive(Debug)]
pub struct Backoff {
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { ceiling: BACKOFF_FIRST }
    }
}

impl Backoff {
    pub fn next(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let c = self.ceiling;
        self.ceiling = (c * 2).min(BACKOFF_MAX);
        let half = c / 2;
        half + half.mul_f64(rng.random::<f64>())
    }

    pub fn reset(&mut self) {
        self.ceiling = BACKOFF_FIRST;
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_are_never_rtp() {
        let d = SessionDescription { payload_type: 96, parameter_sets: vec![vec![0x67, 1, 2], vec![0x68, 3]] };
        let bytes = encode_description(&d);
        assert_eq!(control_message(&bytes), Some(Control::Started(d)));
        assert_eq!(control_message(MARK_END), Some(Control::Ended));
        assert_eq!(control_message(b"\0ZDD\x60\x02\x00\x05ab"), Some(Control::Malformed));
        // RTP and RTCP (version 2) are not control messages.
        assert_eq!(control_message(&[0x80, 96, 0, 1]), None);
        assert_eq!(control_message(&[0x81, 200, 0, 6]), None);
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_and_resets() {
        let mut rng = rand::rng();
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next(&mut rng)).collect();
        let mut ceiling = BACKOFF_FIRST;
        for w in &waits {
            assert!(*w >= ceiling / 2 && *w <= ceiling, "{w:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
            ceiling = (ceiling * 2).min(BACKOFF_MAX);
        }
        assert!(*waits.last().unwrap() >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next(&mut rng) <= BACKOFF_FIRST);
    }

    #[test]
    fn secrets_are_read_from_a_secret_directory_or_the_environment_and_errors_name_only_where() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("username"), "admin\n").unwrap();
        std::fs::write(dir.path().join("password"), "s3cret").unwrap();
        let source = SecretSource::parse(dir.path().to_str().unwrap());
        assert_eq!(source.read("username").unwrap(), "admin");
        assert_eq!(source.read("password").unwrap(), "s3cret");
        let err = format!("{:#}", source.read("passphrase").unwrap_err());
        assert!(err.contains("passphrase") && !err.contains("admin"), "{err}");
        let err = format!("{:#}", SecretSource::parse("env:ZD_TEST_UNSET").read("password").unwrap_err());
        assert!(err.contains("ZD_TEST_UNSET_PASSWORD"), "{err}");
        assert_eq!(SecretSource::parse("env:CAM").describe(&["username", "password"]), "$CAM_USERNAME, $CAM_PASSWORD");
    }
}
