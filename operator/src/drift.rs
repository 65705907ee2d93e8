//! Is what the cluster holds still what the operator applied? A pure
//! comparison of a desired object with the live one, on the fields the
//! desired object sets (the fields the operator manages with server-side
//! apply). Fields the apiserver or other controllers add (defaults, status,
//! `clusterIP`, other managers' labels) are not the operator's and are
//! ignored; a field the operator sets that is missing or different is drift.
//!
//! The apiserver writes some values in a canonical form of its own: resource
//! quantities (`0.5` → `500m`, `1024Mi` → `1Gi`). Two strings that are the
//! same quantity compare equal.

use serde_json::Value;

/// The first field where the live object differs from the desired one.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// JSON path, e.g. `spec.replicas` or `spec.template.spec.containers[0].image`.
    pub path: String,
    /// The live value (`None`: absent).
    pub live: Option<Value>,
    pub desired: Value,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.live {
            Some(live) => write!(f, "{} was {}, want {}", self.path, short(live), short(&self.desired)),
            None => write!(f, "{} was missing, want {}", self.path, short(&self.desired)),
        }
    }
}

/// A value for a message: compact JSON, cut at 80 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 { format!("{}…", s.chars().take(80).collect::<String>()) } else { s }
}

/// Where `live` lacks or contradicts a field `desired` sets, if anywhere.
pub fn first_difference(desired: &Value, live: &Value) -> Option<Difference> {
    walk(desired, Some(live), &mut String::new())
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn walk(desired: &Value, live: Option<&Value>, path: &mut String) -> Option<Difference> {
    let live = live.filter(|l| !l.is_null());
    let differ = |path: &str| Some(Difference { path: path.to_string(), live: live.cloned(), desired: desired.clone() });
    match (desired, live) {
        // Unset in the desired object: not the operator's field.
        (Value::Null, _) => None,
        // The apiserver drops empty lists and maps; an empty desired value is met by absence.
        (d, None) if is_empty(d) => None,
        (_, None) => differ(path),
        (Value::Object(d), Some(Value::Object(l))) => {
            for (k, dv) in d {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                let found = walk(dv, l.get(k), path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::Array(d), Some(Value::Array(l))) => {
            if d.len() != l.len() {
                return differ(path);
            }
            for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(dv, Some(lv), path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::String(d), Some(Value::String(l))) => {
            (d != l && !same_quantity(d, l)).then(|| differ(path)).flatten()
        }
        (Value::Number(d), Some(Value::Number(l))) => (d.as_f64() != l.as_f64()).then(|| differ(path)).flatten(),
        (d, Some(l)) => (d != l).then(|| differ(path)).flatten(),
    }
}

/// Both strings are Kubernetes resource quantities of the same amount.
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

/// A resource quantity's amount: a decimal number with an optional binary
/// (`Ki`…`Ei`), decimal (`m`, `k`, `M`…`E`) or exponent (`e3`) suffix.
fn quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    if number.is_empty() || !number.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * scale)
}

/// FNV-1a, 64 bits: a hash of what the operator applied that stays the same
/// across Rust releases and platforms (`DefaultHasher` promises neither).
pub fn stable_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_the_server_adds_are_not_drift() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "dp", "image": "zd:1"}]}}}});
        let live = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "dp", "image": "zd:1", "imagePullPolicy": "IfNotPresent"}], "dnsPolicy": "ClusterFirst"}}},
            "status": {"replicas": 2}});
        assert_eq!(first_difference(&desired, &live), None);
    }

    #[test]
    fn a_changed_or_missing_managed_field_is_named_with_both_values() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "dp", "image": "zd:1"}]}}}});
        let d = first_difference(&desired, &json!({"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "dp", "image": "zd:1"}]}}}})).unwrap();
        assert_eq!(d.to_string(), "spec.replicas was 5, want 2");
        let d = first_difference(&desired, &json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "dp", "image": "evil:2"}]}}}})).unwrap();
        assert_eq!(d.path, "spec.template.spec.containers[0].image");
        let d = first_difference(&json!({"metadata": {"labels": {"a": "1", "b": "2"}}}), &json!({"metadata": {"labels": {"a": "1"}}})).unwrap();
        assert_eq!(d.to_string(), "metadata.labels.b was missing, want \"2\"");
        let d = first_difference(&json!({"spec": {"selector": {"pod": "x-3"}}}), &json!({"spec": {"selector": {"pod": "x-1"}}})).unwrap();
        assert_eq!(d.to_string(), "spec.selector.pod was \"x-1\", want \"x-3\"");
    }

    #[test]
    fn lists_compare_element_by_element_and_by_length() {
        let desired = json!({"ports": [{"port": 5000, "protocol": "UDP"}, {"port": 5001, "protocol": "UDP"}]});
        assert!(first_difference(&desired, &json!({"ports": [{"port": 5000, "protocol": "UDP"}]})).is_some());
        let d = first_difference(&desired, &json!({"ports": [{"port": 5000, "protocol": "UDP"}, {"port": 5009, "protocol": "UDP"}]})).unwrap();
        assert_eq!(d.path, "ports[1].port");
    }

    #[test]
    fn empty_desired_values_are_met_by_absence_and_quantities_by_their_amount() {
        assert_eq!(first_difference(&json!({"args": [], "securityContext": {}, "x": null}), &json!({})), None);
        assert_eq!(first_difference(&json!({"cpu": "0.5", "memory": "1024Mi"}), &json!({"cpu": "500m", "memory": "1Gi"})), None);
        assert_eq!(first_difference(&json!({"cpu": "1e3"}), &json!({"cpu": "1k"})), None);
        assert!(first_difference(&json!({"cpu": "500m"}), &json!({"cpu": "501m"})).is_some());
        // Strings that are not quantities compare exactly.
        assert!(first_difference(&json!({"image": "zd:1"}), &json!({"image": "zd:1.0"})).is_some());
        assert!(first_difference(&json!({"n": "1"}), &json!({"n": 1})).is_some(), "a type change is drift");
    }

    #[test]
    fn quantities_parse_every_suffix_and_refuse_words() {
        assert_eq!(quantity("250m"), Some(0.25));
        assert_eq!(quantity("2Ki"), Some(2048.0));
        assert_eq!(quantity("3G"), Some(3e9));
        assert_eq!(quantity("1.5"), Some(1.5));
        assert_eq!(quantity("UDP"), None);
        assert_eq!(quantity("5x"), None);
        assert_eq!(quantity(""), None);
    }

    #[test]
    fn the_hash_is_fnv1a_and_fixed() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(stable_hash(b""), "cbf29ce484222325");
        assert_eq!(stable_hash(b"a"), "af63dc4c8601ec8c");
        assert_eq!(stable_hash(b"foobar"), "85944171f73967e8");
    }
}
