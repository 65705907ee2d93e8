//! The committed CRD YAML is what the Rust types generate.

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("streampipeline.crd.yaml");
    let generated = zerodrop_crds::crd_yaml().expect("the CRD serializes");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one file is a prefix of the other".to_owned(),
                |i| format!("first difference at line {}", i + 1),
            );
        panic!(
            "{} is out of date with the types in crds/src ({first_difference}).\n\
             Regenerate it with `cargo run -p zerodrop-crds --bin crdgen` and commit the result.",
            path.display()
        );
    }
}

use kube::CustomResourceExt;
use serde_json::Value;
use zerodrop_crds::StreamPipeline;

fn crd_json() -> Value {
    serde_json::to_value(StreamPipeline::crd()).expect("the CRD serializes")
}

#[test]
fn crd_declares_names_subresources_and_printer_columns() {
    let crd = crd_json();
    assert_eq!(crd["metadata"]["name"], "streampipelines.zerodrop.dev");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["sp"])
    );
    assert_eq!(
        crd["spec"]["names"]["categories"],
        serde_json::json!(["zerodrop"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    assert_eq!(
        version["subresources"]["scale"],
        serde_json::json!({
            "specReplicasPath": ".spec.scaling.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        })
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Replicas", "Ready", "Streams", "Decoder", "Age"]);
}

#[test]
fn status_stream_list_is_capped_and_counted() {
    let crd = crd_json();
    let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["streams"]["maxItems"], 256);
    assert_eq!(status["streamCount"]["type"], "integer");
    assert_eq!(status["streamsTruncated"]["type"], "boolean");
    assert_eq!(
        status["conditions"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    assert_eq!(status["observedGeneration"]["format"], "int64");
}

/// The apiserver estimates a CEL rule's cost from the sizes of the lists and
/// strings it can reach; an unbounded one makes the estimate exceed the budget
/// and the CRD is refused. Every list in the spec needs maxItems, and every
/// string maxLength or an enum.
#[test]
fn every_spec_list_and_string_is_bounded_for_cel_cost() {
    fn walk(schema: &Value, path: &str, unbounded: &mut Vec<String>) {
        match schema["type"].as_str() {
            Some("array") if schema.get("maxItems").is_none() => {
                unbounded.push(format!("{path} (maxItems)"))
            }
            Some("string") if schema.get("maxLength").is_none() && schema.get("enum").is_none() => {
                unbounded.push(format!("{path} (maxLength)"))
            }
            _ => {}
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, child) in properties {
                walk(child, &format!("{path}.{name}"), unbounded);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[*]"), unbounded);
        }
    }
    let crd = crd_json();
    let mut unbounded = Vec::new();
    walk(
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
        "spec",
        &mut unbounded,
    );
    assert!(
        unbounded.is_empty(),
        "unbounded in the spec schema: {unbounded:?}"
    );
}
