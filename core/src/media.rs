//! Codecs, FEC schemes, decoder choices and how a sender is asked for a bit
//! rate, as the manifest spells them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A name that is not one of a closed set: what was given and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub expected: &'static [&'static str],
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown {} {:?}: expected one of {}", self.what, self.given, self.expected.join(", "))
    }
}

impl std::error::Error for UnknownName {}

/// Spelling, parsing and listing of a closed set of names, shared by the
/// manifest (serde), the command line (clap via `FromStr`) and metric labels.
macro_rules! named {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];
            const NAMES: &'static [&'static str] = &[$($name),+];

            /// The name as the manifest, the command line and metric labels write it.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName { what: $what, given: s.to_string(), expected: Self::NAMES }),
                }
            }
        }
    };
}

/// A video codec.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// H.264 / AVC, RTP payload format RFC 6184.
    H264,
    /// H.265 / HEVC, RTP payload format RFC 7798.
    H265,
}
named!(Codec, "codec", { H264 => "h264", H265 => "h265" });

/// A forward error correction scheme.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FecScheme {
    /// SMPTE ST 2022-1: XOR column and row FEC, each on a port of its own.
    #[serde(rename = "st2022-1")]
    St2022_1,
    /// RFC 5109 ULPFEC, in-band with the media under its own payload type.
    Ulpfec,
}
named!(FecScheme, "FEC scheme", { St2022_1 => "st2022-1", Ulpfec => "ulpfec" });

impl FecScheme {
    /// How many UDP ports of its own the scheme's FEC arrives on: ST 2022-1
    /// sends columns and rows on two; ULPFEC rides in the media stream.
    pub fn ports(self) -> usize {
        match self {
            FecScheme::St2022_1 => 2,
            FecScheme::Ulpfec => 0,
        }
    }
}

/// A decoder choice.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DecoderChoice {
    /// NVDEC when the GPU elements load, software otherwise.
    #[default]
    Auto,
    /// Software decoding (libav).
    Software,
    /// NVIDIA NVDEC; the pipeline reports Degraded when it is missing.
    Nvdec,
}
named!(DecoderChoice, "decoder", { Auto => "auto", Software => "software", Nvdec => "nvdec" });

/// How a source's sender is asked for a lower (or back the higher) bit rate
/// when the bitrate policy steps its stream: the RTCP message it understands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BitrateRequest {
    /// RTCP TMMBR (RFC 5104), repeated until the sender's TMMBN acknowledges it.
    #[default]
    Tmmbr,
    /// RTCP REMB (draft-alvestrand-rmcat-remb, SDP `a=rtcp-fb:* goog-remb`), as
    /// browsers and WebRTC gateways understand it. It has no acknowledgement:
    /// it is repeated every second while a step below the top stands.
    Remb,
}
named!(BitrateRequest, "bitrate request", { Tmmbr => "tmmbr", Remb => "remb" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_are_the_manifest_spelling() {
        for c in Codec::ALL {
            assert_eq!(c.as_str().parse::<Codec>(), Ok(*c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        for s in FecScheme::ALL {
            assert_eq!(s.as_str().parse::<FecScheme>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for d in DecoderChoice::ALL {
            assert_eq!(d.as_str().parse::<DecoderChoice>(), Ok(*d));
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        for b in BitrateRequest::ALL {
            assert_eq!(b.as_str().parse::<BitrateRequest>(), Ok(*b));
            assert_eq!(serde_json::to_value(b).unwrap(), b.as_str());
        }
    }

    #[test]
    fn an_unknown_name_says_what_was_given_and_what_is_allowed() {
        let e = "h266".parse::<Codec>().unwrap_err();
        assert_eq!(e.to_string(), "unknown codec \"h266\": expected one of h264, h265");
    }
}
