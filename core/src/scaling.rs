//! How many replicas (shards) a pipeline runs. The operator sizes the
//! StatefulSet with it and the data-plane pods split the streams with it,
//! so they must agree: both call [`replicas`].

use crate::limits::MAX_REPLICAS;

/// The replica count to run: `explicit` (`spec.scaling.replicas`, written by
/// `kubectl scale`, an HPA or KEDA through the scale subresource) when set;
/// else the policy's `chosen` count (`status.policyReplicas`) within
/// `min..=max`; else the floor, `min`. A floor below 1 counts as 1, and a
/// ceiling below the floor as the floor.
pub fn replicas(explicit: Option<i32>, chosen: Option<i32>, min: i32, max: i32) -> i32 {
    explicit.unwrap_or_else(|| {
        let floor = min.clamp(1, MAX_REPLICAS);
        let ceiling = max.clamp(floor, MAX_REPLICAS);
        chosen.unwrap_or(floor).clamp(floor, ceiling)
    })
}

#[cfg(test)]
mod tests {
    use super::replicas;

    #[test]
    fn an_explicit_count_wins_else_the_policy_within_bounds_else_the_floor() {
        assert_eq!(replicas(Some(7), Some(2), 1, 4), 7, "scale subresource owns it");
        assert_eq!(replicas(None, Some(3), 1, 4), 3);
        assert_eq!(replicas(None, Some(9), 1, 4), 4, "clamped to maxReplicas");
        assert_eq!(replicas(None, Some(1), 2, 4), 2, "clamped to minReplicas");
        assert_eq!(replicas(None, None, 2, 4), 2);
        assert_eq!(replicas(None, None, 0, 0), 1, "never fewer than one");
    }
}
