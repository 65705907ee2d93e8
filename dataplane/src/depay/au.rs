//! Access-unit helpers shared by the sender (which hashes what the encoder
//! produced) and the receiver (which hashes what it hands the decoder), so both
//! sides judge a frame by the same definition of its content.

use xxhash_rust::xxh3::Xxh3;

/// Iterates the NAL units of an Annex B byte stream (start codes `00 00 01` or
/// `00 00 00 01`), without the start codes. Bytes before the first start code
/// are ignored. Trailing zero bytes of a NAL unit belong to the next start code
/// (H.264 §B.2 `trailing_zero_8bits`) and are stripped.
pub fn annexb_nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut pos = find_start_code(data, 0).map(|(_, after)| after);
    std::iter::from_fn(move || {
        let start = pos?;
        match find_start_code(data, start) {
            Some((code_at, after)) => {
                pos = Some(after);
                Some(trim_trailing_zeros(&data[start..code_at]))
            }
            None => {
                pos = None;
                Some(trim_trailing_zeros(&data[start..]))
            }
        }
    })
    .filter(|nal| !nal.is_empty())
}

/// Finds the next `00 00 01` at or after `from`; returns (index of its first
/// zero, index after the `01`).
fn find_start_code(data: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 3 <= data.len() {
        if data[i + 2] > 1 {
            i += 3;
        } else if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            return Some((i, i + 3));
        } else {
            i += 1;
        }
    }
    None
}

fn trim_trailing_zeros(nal: &[u8]) -> &[u8] {
    let end = nal.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    &nal[..end]
}

/// Content digest of one access unit: xxh3 over each NAL unit prefixed by its
/// 32-bit length. Start-code style (3 or 4 bytes) and the RTP packetisation do
/// not change it; any changed, missing or extra byte of a NAL unit does.
///
/// A NAL unit repeated byte for byte within one access unit counts once:
/// payloaders re-send parameter sets (`rtph264pay config-interval=-1` puts
/// SPS/PPS before every IDR slice), encoders repeat headers, and a copy
/// changes nothing a decoder shows. Slices never repeat byte for byte (their
/// headers differ), so a lost or changed picture still changes the digest.
pub fn au_digest<'a>(nal_units: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    const REMEMBERED: usize = 16;
    let mut seen: [&[u8]; REMEMBERED] = [&[]; REMEMBERED];
    let mut n = 0;
    let mut h = Xxh3::new();
    for nal in nal_units {
        if seen[..n.min(REMEMBERED)].contains(&nal) {
            continue;
        }
        if n < REMEMBERED {
            seen[n] = nal;
        }
        n += 1;
        h.update(&(nal.len() as u32).to_be_bytes());
        h.update(nal);
    }
    h.digest()
}

/// NAL unit types that carry no picture data and that payloaders may add or
/// drop (access unit delimiters, SEI, filler) are still part of the digest:
/// a digest mismatch means the bytes the decoder saw differ from the sent ones.
pub fn annexb_digest(data: &[u8]) -> u64 {
    au_digest(annexb_nal_units(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_three_and_four_byte_start_codes() {
        let data = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 9, 9];
        let nals: Vec<&[u8]> = annexb_nal_units(&data).collect();
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 9, 9][..]]);
    }

    #[test]
    fn digest_ignores_start_code_length_but_not_content() {
        let a = [0, 0, 0, 1, 0x65, 1, 2, 3];
        let b = [0, 0, 1, 0x65, 1, 2, 3];
        let c = [0, 0, 1, 0x65, 1, 2, 4];
        assert_eq!(annexb_digest(&a), annexb_digest(&b));
        assert_ne!(annexb_digest(&a), annexb_digest(&c));
        assert_eq!(annexb_digest(&a), au_digest([&[0x65u8, 1, 2, 3][..]]));
    }

    #[test]
    fn a_nal_unit_repeated_within_the_unit_counts_once() {
        let (sps, pps, idr1, idr2): (&[u8], &[u8], &[u8], &[u8]) = (&[0x67, 1], &[0x68, 2], &[0x65, 0x88, 3], &[0x65, 0x01, 3]);
        assert_eq!(au_digest([sps, pps, idr1, sps, pps, idr2]), au_digest([sps, pps, idr1, idr2]));
        assert_ne!(au_digest([sps, pps, idr1]), au_digest([sps, pps, idr1, idr2]));
    }

    #[test]
    fn no_start_code_means_no_nal_units() {
        assert_eq!(annexb_nal_units(&[1, 2, 3]).count(), 0);
        assert_eq!(annexb_nal_units(&[]).count(), 0);
    }
}
