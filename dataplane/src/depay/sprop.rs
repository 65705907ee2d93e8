//! Parameter sets given out of band, as an SDP carries them
//! (`sprop-parameter-sets`; H.265's `sprop-vps`, `sprop-sps`, `sprop-pps`):
//! read from a manifest's `parameterSets` and from an RTSP server's SDP.

use anyhow::Context;
use zerodrop_core::Codec;

/// Out-of-band parameter sets as the SDP gives them: base64 NAL units
/// separated by commas (`sprop-parameter-sets`; for H.265 `sprop-vps`,
/// `sprop-sps` and `sprop-pps` joined). Every unit must be a parameter set of
/// the stream's codec (H.264 SPS 7 / PPS 8; H.265 VPS 32 / SPS 33 / PPS 34),
/// and the set must hold at least an SPS and a PPS (and a VPS for H.265).
pub fn parse_parameter_sets(text: &str, codec: Codec) -> anyhow::Result<Vec<Vec<u8>>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for (k, item) in text.split(',').map(str::trim).enumerate() {
        let nal = base64::engine::general_purpose::STANDARD
            .decode(item)
            .with_context(|| format!("item {k} ({item:?}) is not base64"))?;
        let kind = match (codec, nal.first()) {
            (_, None) => anyhow::bail!("item {k} is empty: expected a NAL unit"),
            (Codec::H264, Some(h)) => match h & 0x1f {
                7 => "SPS",
                8 => "PPS",
                t => anyhow::bail!("item {k} is an H.264 NAL unit of type {t}: expected an SPS (7) or PPS (8)"),
            },
            (Codec::H265, Some(h)) => match (h >> 1) & 0x3f {
                32 => "VPS",
                33 => "SPS",
                34 => "PPS",
                t => anyhow::bail!("item {k} is an H.265 NAL unit of type {t}: expected a VPS (32), SPS (33) or PPS (34)"),
            },
        };
        if nal[0] & 0x80 != 0 {
            anyhow::bail!("item {k} ({kind}) has the forbidden_zero_bit set: not a NAL unit");
        }
        out.push((kind, nal));
    }
    let needed: &[&str] = match codec {
        Codec::H264 => &["SPS", "PPS"],
        Codec::H265 => &["VPS", "SPS", "PPS"],
    };
    for want in needed {
        anyhow::ensure!(out.iter().any(|(kind, _)| kind == want), "no {want}: a decoder needs {}", needed.join(", "));
    }
    Ok(out.into_iter().map(|(_, nal)| nal).collect())
}
