//! Which shard (StatefulSet ordinal) owns which stream: rendezvous (highest
//! random weight) hashing. Each stream goes to the shard with the highest
//! hash of (stream, shard). Growing from n to n+1 shards moves exactly the
//! streams whose new highest weight is the new shard, about 1/(n+1) of them,
//! and every stream that moves goes to the new shard; nothing else moves.
//!
//! The operator (Service selectors) and the data plane (which sockets to
//! open) both call this, so they agree without talking to each other.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Weight of `stream` on `shard`. Stable across releases: changing it moves
/// every stream of every running pipeline.
fn weight(stream: &str, shard: u32) -> u64 {
    xxh3_64_with_seed(stream.as_bytes(), 0x5a45_524f_4452_4f50 ^ shard as u64)
}

/// The shard in `0..replicas` that owns `stream`; shard 0 when `replicas` is 0
/// or negative (a scaled-to-zero pipeline owns nothing, callers check that).
pub fn owner(stream: &str, replicas: i32) -> u32 {
    let n = replicas.max(1) as u32;
    (0..n).max_by_key(|&s| (weight(stream, s), std::cmp::Reverse(s))).unwrap_or(0)
}

/// The annotation of the pipeline the operator renders for its pods that
/// names the replica count the streams were assigned by before a replica
/// change still in progress (a handover): while it is there, a shard runs
/// the streams it owns under either count, so that a moving stream is
/// received by its new owner before its old owner lets it go.
pub const HANDOVER_FROM_ANNOTATION: &str = "zerodrop.dev/handover-from";

/// Whether shard `ordinal` runs `stream`: it owns it under `replicas`, or,
/// during a handover from `from` replicas, under `from`.
pub fn runs(stream: &str, ordinal: u32, replicas: i32, from: Option<i32>) -> bool {
    owner(stream, replicas) == ordinal || from.is_some_and(|f| f > 0 && owner(stream, f) == ordinal)
}

/// Whether `stream` changes owner between `from` and `to` replicas.
pub fn moves(stream: &str, from: i32, to: i32) -> bool {
    owner(stream, from) != owner(stream, to)
}

/// The name a source is sharded by: the main source of its rendition group
/// (`renditionOf`) when it is a lower rendition of another source, else its
/// own name. Every member of a group hashes to the same shard, so the one
/// process that decodes the group's active rendition also receives the
/// others; an ungrouped source hashes by its name as before.
pub fn key<'a>(name: &'a str, rendition_of: Option<&'a str>) -> &'a str {
    rendition_of.unwrap_or(name)
}

/// The StatefulSet ordinal at the end of a pod name (`demo-dataplane-3` → 3).
pub fn ordinal_from_pod_name(pod: &str) -> Option<u32> {
    pod.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i}")).collect()
    }

    #[test]
    fn growing_by_one_shard_moves_only_to_the_new_shard_and_about_one_in_n_plus_one() {
        let streams = names(4000);
        for n in 1..8 {
            let mut moved = 0;
            for s in &streams {
                let (before, after) = (owner(s, n), owner(s, n + 1));
                if before != after {
                    assert_eq!(after, n as u32, "{s} moved from {before} to {after}, not to the new shard");
                    moved += 1;
                }
            }
            let share = moved as f64 / streams.len() as f64;
            let expected = 1.0 / (n + 1) as f64;
            assert!((share - expected).abs() < 0.03, "n={n}: moved {share:.3}, expected about {expected:.3}");
        }
    }

    #[test]
    fn during_a_handover_each_moving_stream_runs_on_its_old_and_its_new_owner_and_nothing_else_doubles() {
        let streams = names(500);
        for (from, to) in [(1, 2), (2, 3), (3, 1), (4, 2)] {
            for s in &streams {
                let running: Vec<u32> = (0..from.max(to) as u32).filter(|&o| runs(s, o, to, Some(from))).collect();
                let (old, new) = (owner(s, from), owner(s, to));
                if moves(s, from, to) {
                    assert_eq!(running, { let mut v = vec![old, new]; v.sort(); v }, "{s} {from}->{to}");
                } else {
                    assert_eq!(running, vec![new], "{s} {from}->{to}");
                }
                let after: Vec<u32> = (0..from.max(to) as u32).filter(|&o| runs(s, o, to, None)).collect();
                assert_eq!(after, vec![new], "after the handover only the new owner runs {s}");
            }
        }
    }

    #[test]
    fn streams_spread_evenly_over_shards() {
        let streams = names(6000);
        let mut counts = [0usize; 6];
        for s in &streams {
            counts[owner(s, 6) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_rendition_group_shares_one_shard_at_every_count_and_during_a_handover() {
        // Main sources and their sub streams: the group's key is the main name.
        for main in names(300) {
            let sub = format!("{main}-sub");
            let third = format!("{main}-low");
            let members = [key(&main, None), key(&sub, Some(&main)), key(&third, Some(&main))];
            for n in 1..7 {
                let owners: Vec<u32> = members.iter().map(|m| owner(m, n)).collect();
                assert!(owners.iter().all(|&o| o == owners[0]), "{main} at {n}: {owners:?}");
            }
            for (from, to) in [(1, 2), (2, 3), (3, 1), (4, 2)] {
                for ordinal in 0..from.max(to) as u32 {
                    let running: Vec<bool> = members.iter().map(|m| runs(m, ordinal, to, Some(from))).collect();
                    assert!(running.iter().all(|&r| r == running[0]), "{main} {from}->{to} on {ordinal}: {running:?}");
                }
                let moving: Vec<bool> = members.iter().map(|m| moves(m, from, to)).collect();
                assert!(moving.iter().all(|&m| m == moving[0]), "{main} {from}->{to}: {moving:?}");
            }
        }
        // An ungrouped source keeps its own name's hash.
        assert_eq!(key("cam-7", None), "cam-7");
    }

    #[test]
    fn ordinal_comes_from_the_pod_name_suffix() {
        assert_eq!(ordinal_from_pod_name("demo-dataplane-3"), Some(3));
        assert_eq!(ordinal_from_pod_name("demo"), None);
        assert_eq!(ordinal_from_pod_name("demo-x"), None);
        assert_eq!(owner("anything", 0), 0);
    }
}
