//! Reading `StreamPipeline` manifests from a YAML file, with the checks the
//! apiserver would make, so that `zerodrop run pipeline.yaml` rejects what
//! `kubectl apply -f pipeline.yaml` would reject, with the same messages.
//!
//! Each document goes through the steps the apiserver takes for a custom
//! resource:
//! 1. type meta: `apiVersion: zerodrop.dev/v1alpha1`, `kind: StreamPipeline`;
//!    `metadata.name` present and a DNS-1123 subdomain;
//! 2. the CRD's OpenAPI schema (types, required fields, enums, ranges,
//!    lengths, list sizes and uniqueness, unknown fields), on the schema
//!    generated from the Rust types;
//! 3. the CRD's CEL rules (`x-kubernetes-validations`), evaluated by kube-cel
//!    on that same generated schema, skipped (as the apiserver does) when
//!    step 2 found a wrong type, a missing field, an unsupported value or a
//!    list or string over its limit;
//! 4. deserialization into [`StreamPipeline`], with the field path in errors.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use kube::CustomResourceExt;
use kube::core::cel::{ErrorKind, Validator};
use serde::Deserialize;
use serde_json::Value;

use crate::StreamPipeline;
use crate::schema_check::{self, StructuralProblem};

/// The `apiVersion` every manifest document must carry.
pub const API_VERSION: &str = "zerodrop.dev/v1alpha1";
/// The `kind` every manifest document must carry.
pub const KIND: &str = "StreamPipeline";

/// One thing wrong with one document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    /// Position of the YAML document in the file, counting from 1.
    pub document: usize,
    /// The document's `metadata.name`, when it has one.
    pub name: Option<String>,
    /// Path of the offending field, such as `spec.sources[1].transport.rtp.port`;
    /// empty when the problem is with the document as a whole.
    pub field: String,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a manifest file; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The problems, in file order.
    pub problems: Vec<ManifestProblem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} problem{} in the manifest:",
            if n == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

/// Parses a (multi-document) YAML file of `StreamPipeline` manifests and
/// validates each with the CRD's schema and CEL rules. Returns every pipeline,
/// in file order, or every problem found. Empty documents are skipped; a file
/// without any pipeline is an error, and so are two documents with the same
/// namespace and name.
pub fn parse_manifests(yaml_text: &str) -> Result<Vec<StreamPipeline>, ManifestError> {
    let mut pipelines: Vec<(usize, StreamPipeline)> = Vec::new();
    let mut problems = Vec::new();

    for (index, document) in serde_yaml::Deserializer::from_str(yaml_text).enumerate() {
        let number = index + 1;
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                problems.push(ManifestProblem {
                    document: number,
                    name: None,
                    field: String::new(),
                    message: format!("not valid YAML: {e}"),
                });
                // The YAML reader cannot be trusted to find the next document after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        match validate_document(number, value) {
            Ok(pipeline) => {
                let key = (
                    pipeline.metadata.namespace.clone(),
                    pipeline.metadata.name.clone(),
                );
                if let Some((first, _)) = pipelines
                    .iter()
                    .find(|(_, p)| (p.metadata.namespace.clone(), p.metadata.name.clone()) == key)
                {
                    problems.push(ManifestProblem {
                        document: number,
                        name: pipeline.metadata.name.clone(),
                        field: "metadata.name".into(),
                        message: format!("document {first} already defines a StreamPipeline with this name and namespace"),
                    });
                } else {
                    pipelines.push((number, pipeline));
                }
            }
            Err(mut found) => problems.append(&mut found),
        }
    }

    if problems.is_empty() && pipelines.is_empty() {
        problems.push(ManifestProblem {
            document: 1,
            name: None,
            field: String::new(),
            message: format!("the file holds no {KIND} (apiVersion {API_VERSION})"),
        });
    }
    if problems.is_empty() {
        Ok(pipelines.into_iter().map(|(_, p)| p).collect())
    } else {
        Err(ManifestError { problems })
    }
}

/// Validates one non-empty YAML document as a `StreamPipeline`.
fn validate_document(
    number: usize,
    mut value: Value,
) -> Result<StreamPipeline, Vec<ManifestProblem>> {
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let problem = |field: &str, message: String| ManifestProblem {
        document: number,
        name: name.clone(),
        field: field.to_owned(),
        message,
    };

    let Some(object) = value.as_object_mut() else {
        return Err(vec![problem(
            "",
            format!(
                "expected a {KIND} object (a YAML mapping), found {}",
                describe(&value)
            ),
        )]);
    };
    let mut problems = Vec::new();
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    let kind = object.get("kind").and_then(Value::as_str);
    if kind != Some(KIND) {
        problems.push(problem(
            "kind",
            format!(
                "expected {KIND:?}, found {}",
                describe_opt(object.get("kind"))
            ),
        ));
    }
    if api_version != Some(API_VERSION) {
        problems.push(problem(
            "apiVersion",
            format!(
                "expected {API_VERSION:?}, found {}",
                describe_opt(object.get("apiVersion"))
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    match object.get("metadata").and_then(|m| m.get("name")) {
        None => problems.push(problem("metadata.name", "required field is missing".into())),
        Some(Value::String(n)) => {
            if let Some(why) = dns1123_subdomain_problem(n) {
                problems.push(problem("metadata.name", why));
            }
        }
        Some(other) => problems.push(problem(
            "metadata.name",
            format!("must be a string, got {}", describe(other)),
        )),
    }
    // With the status subresource the apiserver ignores status on create.
    object.remove("status");

    let mut structural: Vec<StructuralProblem> = Vec::new();
    schema_check::check(openapi_schema(), &mut value, "", &mut structural);
    let blocking = structural.iter().any(|p| p.blocking);
    problems.extend(structural.into_iter().map(|p| problem(&p.field, p.message)));

    if !blocking {
        problems.extend(
            cel_problems(&value)
                .into_iter()
                .map(|(field, message)| problem(&field, message)),
        );
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    serde_path_to_error::deserialize::<_, StreamPipeline>(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        vec![problem(&field, e.into_inner().to_string())]
    })
}

/// The `openAPIV3Schema` of the generated CRD, as JSON.
fn openapi_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        StreamPipeline::crd()
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null)
    })
}

/// Evaluates the CRD's CEL rules on a structurally valid object, returning
/// (field path, message) for each failed rule.
fn cel_problems(object: &Value) -> Vec<(String, String)> {
    let schema = openapi_schema();
    // kube-cel is third-party code running on user input: a panic in it must
    // become a reported problem, not a crash of the runner.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        Validator::new().validate(schema, object, None)
    }));
    match outcome {
        Ok(Ok(())) => Vec::new(),
        Ok(Err(errors)) => errors
            .into_vec()
            .into_iter()
            .map(|e| {
                let message = match e.kind {
                    ErrorKind::ValidationFailure => e.message,
                    _ => format!("{} (CEL rule `{}`)", e.message, e.rule),
                };
                (e.field_path, message)
            })
            .collect(),
        Err(_) => vec![(
            String::new(),
            "the CEL rules could not be evaluated on this document (the evaluator panicked)".into(),
        )],
    }
}

/// Why `name` is not a DNS-1123 subdomain (the rule for object names), if it is not.
fn dns1123_subdomain_problem(name: &str) -> Option<String> {
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    if name.is_empty() {
        Some("must not be empty".into())
    } else if name.len() > 253 {
        Some(format!(
            "must be at most 253 characters long, got {}",
            name.len()
        ))
    } else if !name.split('.').all(label_ok) {
        Some(format!(
            "{name:?} is not a DNS-1123 subdomain: use lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        ))
    } else {
        None
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn describe_opt(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing (the field is missing)".into(), describe)
}
