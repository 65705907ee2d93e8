//! The structural half of what the apiserver checks on admission, evaluated
//! locally against the CRD's own OpenAPI schema: types, required fields,
//! enums, numeric ranges, lengths, patterns, list sizes, list-map and list-set
//! uniqueness, and unknown fields. The CEL half is kube-cel's job (see
//! `manifest.rs`).
//!
//! The walk also removes what the apiserver would not see as set: `null`
//! fields (pruned when not nullable, absent to CEL's `has()` when nullable),
//! and unknown fields (which are reported too, as `kubectl apply` does with its
//! default strict field validation).

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// One way the object does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StructuralProblem {
    /// Path of the field, such as `spec.sources[0].transport.rtp.port`.
    pub field: String,
    pub message: String,
    /// The apiserver skips CEL rules when one of these is present (wrong
    /// type, missing required field, unsupported enum value, too long, too
    /// many items), because the rules could not be evaluated meaningfully.
    pub blocking: bool,
}

/// Checks `value` against `schema` (an `openAPIV3Schema`), pruning as the
/// apiserver does. `path` is the field path of `value` (empty at the root).
pub(crate) fn check(
    schema: &Value,
    value: &mut Value,
    path: &str,
    out: &mut Vec<StructuralProblem>,
) {
    let mut found: Vec<(String, bool)> = Vec::new();
    check_node(schema, value, path, &mut found, out);
    out.extend(
        found
            .into_iter()
            .map(|(message, blocking)| StructuralProblem {
                field: path.to_owned(),
                message,
                blocking,
            }),
    );
}

/// Checks one node; problems with the node itself go to `found`, those of its
/// children (with their own paths) to `out`.
fn check_node(
    schema: &Value,
    value: &mut Value,
    path: &str,
    found: &mut Vec<(String, bool)>,
    out: &mut Vec<StructuralProblem>,
) {
    if value.is_null() {
        if !is_nullable(schema) {
            found.push(("must not be null".into(), true));
        }
        return;
    }

    if let Some(expected) = schema.get("type").and_then(Value::as_str)
        && !has_type(value, expected)
    {
        found.push((
            format!("must be of type {expected}, got {}", type_name(value)),
            true,
        ));
        return;
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list = allowed
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        found.push((
            format!("unsupported value {value}: supported values are {list}"),
            true,
        ));
        return;
    }

    match value {
        Value::String(s) => check_string(schema, s, found),
        Value::Number(n) => {
            check_number(schema, n.as_f64().unwrap_or(f64::NAN), n.to_string(), found)
        }
        Value::Array(items) => {
            check_array_size(schema, items.len(), found);
            check_list_type(schema, items, path, out);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(fields) => check_object(schema, fields, path, out),
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_string(schema: &Value, s: &str, found: &mut Vec<(String, bool)>) {
    let mut problem = |message: String, blocking: bool| found.push((message, blocking));
    // The apiserver counts characters (runes), not bytes.
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        let what = if min == 1 {
            "must not be empty".to_owned()
        } else {
            format!("must be at least {min} characters long")
        };
        problem(what, false);
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        problem(
            format!("must be at most {max} characters long, got {chars}"),
            true,
        );
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => problem(
                format!("{s:?} does not match the pattern {pattern:?}"),
                false,
            ),
            Err(e) => problem(
                format!("the schema's pattern {pattern:?} does not compile: {e}"),
                false,
            ),
        }
    }
}

fn check_number(schema: &Value, n: f64, text: String, found: &mut Vec<(String, bool)>) {
    let mut problem = |message: String, blocking: bool| found.push((message, blocking));
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    let flag = |key: &str| schema.get(key).and_then(Value::as_bool).unwrap_or(false);
    if let Some(min) = bound("minimum") {
        if flag("exclusiveMinimum") && n <= min {
            problem(
                format!("must be greater than {}, got {text}", number_text(min)),
                false,
            );
        } else if n < min {
            problem(
                format!("must be at least {}, got {text}", number_text(min)),
                false,
            );
        }
    }
    if let Some(max) = bound("maximum") {
        if flag("exclusiveMaximum") && n >= max {
            problem(
                format!("must be less than {}, got {text}", number_text(max)),
                false,
            );
        } else if n > max {
            problem(
                format!("must be at most {}, got {text}", number_text(max)),
                false,
            );
        }
    }
}

fn check_array_size(schema: &Value, len: usize, found: &mut Vec<(String, bool)>) {
    let mut problem = |message: String, blocking: bool| found.push((message, blocking));
    let len = len as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && len < min
    {
        problem(
            format!("must have at least {min} item{}, got {len}", plural(min)),
            false,
        );
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len > max
    {
        problem(
            format!("must have at most {max} item{}, got {len}", plural(max)),
            true,
        );
    }
}

/// `x-kubernetes-list-type: set` (unique scalars) and `map` (unique keys).
fn check_list_type(schema: &Value, items: &[Value], path: &str, out: &mut Vec<StructuralProblem>) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if let Some(first) = items[..i].iter().position(|earlier| earlier == item) {
                    out.push(StructuralProblem {
                        field: format!("{path}[{i}]"),
                        message: format!("duplicate value {item} (also at {path}[{first}]): the entries must be unique"),
                        blocking: false,
                    });
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key_of = |item: &Value| {
                keys.iter()
                    .map(|k| item.get(*k).cloned().unwrap_or(Value::Null))
                    .collect::<Vec<_>>()
            };
            for (i, item) in items.iter().enumerate() {
                let key = key_of(item);
                if let Some(first) = items[..i].iter().position(|earlier| key_of(earlier) == key) {
                    let mut described = String::new();
                    for (name, value) in keys.iter().zip(&key) {
                        let _ = write!(
                            described,
                            "{}{name} {value}",
                            if described.is_empty() { "" } else { ", " }
                        );
                    }
                    out.push(StructuralProblem {
                        field: format!("{path}[{i}]"),
                        message: format!(
                            "duplicate entry: {described} is already used by {path}[{first}]; {} must be unique",
                            keys.join(" and ")
                        ),
                        blocking: false,
                    });
                }
            }
        }
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    fields: &mut Map<String, Value>,
    path: &str,
    out: &mut Vec<StructuralProblem>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let preserve_unknown = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let is_root = path.is_empty();
    let child_path = |key: &str| {
        if is_root {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };

    let keys: Vec<String> = fields.keys().cloned().collect();
    for key in keys {
        let field_schema = properties.and_then(|p| p.get(&key)).or(additional);
        match field_schema {
            Some(field_schema) => {
                if fields.get(&key).is_some_and(Value::is_null) {
                    // The apiserver drops a null where the schema is not nullable (then
                    // applies the default, if any); where it is nullable, CEL's has() sees
                    // the null as absent. Either way the field reads as not set.
                    fields.remove(&key);
                } else if let Some(child) = fields.get_mut(&key) {
                    check(field_schema, child, &child_path(&key), out);
                }
            }
            // The apiserver handles the type meta and metadata of the root itself.
            None if is_root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") => {}
            None if preserve_unknown || properties.is_none() => {}
            None => {
                let known = properties
                    .map(|p| p.keys().map(String::as_str).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                out.push(StructuralProblem {
                    field: child_path(&key),
                    message: format!("unknown field {key:?}; known fields here: {known}"),
                    blocking: false,
                });
                fields.remove(&key);
            }
        }
    }

    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(name) {
                out.push(StructuralProblem {
                    field: child_path(name),
                    message: "required field is missing".into(),
                    blocking: true,
                });
            }
        }
    }
}

fn is_nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn has_type(value: &Value, expected: &str) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Schema bounds are stored as floats; print `1` rather than `1.0`.
fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(schema: Value, mut value: Value) -> Vec<StructuralProblem> {
        let mut out = Vec::new();
        check(&schema, &mut value, "spec", &mut out);
        out
    }

    #[test]
    fn integer_below_minimum_is_reported_with_bound_and_value() {
        let p = problems(json!({"type": "integer", "minimum": 1.0}), json!(0));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].message, "must be at least 1, got 0");
        assert!(!p[0].blocking);
    }

    #[test]
    fn wrong_type_blocks_and_names_both_types() {
        let p = problems(json!({"type": "integer"}), json!("5004"));
        assert_eq!(p[0].message, "must be of type integer, got string");
        assert!(p[0].blocking);
    }

    #[test]
    fn null_fields_read_as_absent_and_are_not_reported() {
        let mut value = json!({"a": null, "b": null, "c": 1});
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "nullable": true}, "c": {"type": "integer"}}});
        let mut out = Vec::new();
        check(&schema, &mut value, "", &mut out);
        assert!(out.is_empty());
        assert_eq!(value, json!({"c": 1}));
    }

    #[test]
    fn unknown_field_is_reported_and_pruned() {
        let mut value = json!({"latencyMS": 5});
        let schema = json!({"type": "object", "properties": {"latencyMs": {"type": "integer"}}});
        let mut out = Vec::new();
        check(&schema, &mut value, "spec.repair", &mut out);
        assert_eq!(out[0].field, "spec.repair.latencyMS");
        assert!(out[0].message.contains("latencyMs"), "{}", out[0].message);
        assert_eq!(value, json!({}));
    }

    #[test]
    fn list_set_reports_the_duplicate_and_its_first_position() {
        let p = problems(
            json!({"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "integer"}}),
            json!([1, 2, 1]),
        );
        assert_eq!(p[0].field, "spec[2]");
        assert!(p[0].message.contains("spec[0]"), "{}", p[0].message);
    }

    #[test]
    fn string_length_counts_characters_not_bytes() {
        assert!(problems(json!({"type": "string", "maxLength": 2}), json!("éé")).is_empty());
    }
}
