//! `parse_manifests`: each bad spec is rejected, and the error names the
//! document, the field and the rule broken. The schema and CEL rules checked
//! here are the ones in the generated CRD, so these tests also pin down what
//! the apiserver rejects.

use std::path::PathBuf;

use serde_json::{Value, json};
use zerodrop_crds::{Codec, DecoderChoice, ManifestProblem, parse_manifests};

/// A valid two-source pipeline, as JSON so that tests can break one field.
fn demo() -> Value {
    json!({
        "apiVersion": "zerodrop.dev/v1alpha1",
        "kind": "StreamPipeline",
        "metadata": {"name": "demo"},
        "spec": {
            "sources": [
                {"name": "cam-1", "codec": "h264", "payloadType": 96, "rtxPayloadType": 97,
                 "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5004, "rtcpPort": 5005}}},
                {"name": "cam-2", "codec": "h264", "payloadType": 96, "rtxPayloadType": 97,
                 "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5104, "rtcpPort": 5105}}}
            ],
            "repair": {"latencyMs": 300, "nack": {"enabled": true, "maxRetries": 8}}
        }
    })
}

fn to_yaml(documents: &[Value]) -> String {
    documents
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("test value serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The problems `parse_manifests` reports for `demo()` changed by `edit`.
fn problems_after(edit: impl FnOnce(&mut Value)) -> Vec<ManifestProblem> {
    let mut doc = demo();
    edit(&mut doc);
    match parse_manifests(&to_yaml(&[doc])) {
        Ok(_) => panic!("the edited manifest was accepted"),
        Err(e) => e.problems,
    }
}

/// Asserts that one problem is about `field` and its message contains every one of `words`.
fn assert_problem(problems: &[ManifestProblem], field: &str, words: &[&str]) {
    let found = problems
        .iter()
        .any(|p| p.field == field && words.iter().all(|w| p.message.contains(w)));
    assert!(
        found,
        "expected a problem at {field} mentioning {words:?}, got:\n{problems:#?}"
    );
}

fn source(doc: &mut Value, i: usize) -> &mut Value {
    &mut doc["spec"]["sources"][i]
}

fn rtp(doc: &mut Value, i: usize) -> &mut Value {
    &mut doc["spec"]["sources"][i]["transport"]["rtp"]
}

#[test]
fn example_manifests_parse_and_validate_clean() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("readable example");
            if let Err(e) = parse_manifests(&text) {
                panic!("{} is invalid:\n{e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected at least local-demo.yaml and camera-fleet.yaml in {}",
        dir.display()
    );
}

#[test]
fn local_demo_reads_as_documented() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/local-demo.yaml"),
    )
    .unwrap();
    let pipelines = parse_manifests(&text).unwrap();
    assert_eq!(pipelines.len(), 1);
    let p = &pipelines[0];
    assert_eq!(p.metadata.name.as_deref(), Some("demo"));
    assert_eq!(p.spec.sources.len(), 2);
    let ports: Vec<(u16, u16)> = p
        .spec
        .sources
        .iter()
        .map(|s| {
            let rtp = s.transport.rtp.as_ref().unwrap();
            (rtp.port, rtp.effective_rtcp_port())
        })
        .collect();
    assert_eq!(ports, [(5004, 5005), (5104, 5105)]);
    assert!(
        p.spec.sources.iter().all(|s| s.codec == Codec::H264
            && s.payload_type == 96
            && s.rtx_payload_type == Some(97))
    );
    assert_eq!(p.spec.repair.latency_ms, 300);
    assert!(p.spec.repair.nack.enabled);
    assert_eq!(p.spec.repair.nack.max_retries, 8);
    assert_eq!(p.spec.decode.decoder, DecoderChoice::Auto);
}

#[test]
fn omitted_fields_take_the_schema_defaults() {
    let mut doc = demo();
    doc["spec"] = json!({"sources": [{"name": "cam", "codec": "h265", "transport": {"rtp": {"port": 6000}}}]});
    let p = parse_manifests(&to_yaml(&[doc])).unwrap().remove(0);
    let s = &p.spec.sources[0];
    assert_eq!(
        (s.payload_type, s.clock_rate, s.rtx_payload_type),
        (96, 90_000, None)
    );
    let rtp = s.transport.rtp.as_ref().unwrap();
    assert_eq!(rtp.listen_address, "0.0.0.0");
    assert_eq!(rtp.effective_rtcp_port(), 6001);
    assert_eq!(s.bitrate_request, zerodrop_crds::BitrateRequest::Tmmbr);
    assert_eq!(p.spec.repair.latency_ms, 200);
    assert_eq!(
        (
            p.spec.scaling.min_replicas,
            p.spec.scaling.max_replicas,
            p.spec.scaling.replicas
        ),
        (1, 1, None)
    );
}

#[test]
fn duplicate_source_names_are_rejected() {
    let problems = problems_after(|d| source(d, 1)["name"] = json!("cam-1"));
    assert_problem(
        &problems,
        "spec.sources[1]",
        &["\"cam-1\"", "spec.sources[0]", "name must be unique"],
    );
}

#[test]
fn port_zero_is_rejected_by_the_schema() {
    let problems = problems_after(|d| rtp(d, 0)["port"] = json!(0));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.port",
        &["at least 1", "got 0"],
    );
}

#[test]
fn port_above_65535_is_rejected_by_the_schema() {
    let problems = problems_after(|d| rtp(d, 1)["port"] = json!(70000));
    assert_problem(
        &problems,
        "spec.sources[1].transport.rtp.port",
        &["at most 65535", "got 70000"],
    );
}

#[test]
fn two_sources_on_one_port_are_rejected_naming_both() {
    let problems = problems_after(|d| {
        rtp(d, 1)["port"] = json!(5004);
        rtp(d, 1)["rtcpPort"] = json!(5200);
    });
    assert_problem(
        &problems,
        "spec.sources",
        &["sources cam-1 and cam-2 listen on the same UDP port"],
    );
}

#[test]
fn rtp_port_equal_to_another_sources_rtcp_port_is_rejected() {
    let problems = problems_after(|d| rtp(d, 1)["port"] = json!(5005));
    assert_problem(
        &problems,
        "spec.sources",
        &["cam-1 and cam-2", "same UDP port"],
    );
}

#[test]
fn implicit_rtcp_port_counts_as_a_listen_port() {
    // cam-1 has no rtcpPort, so RTCP uses 5004 + 1, which cam-2 wants for RTP.
    let problems = problems_after(|d| {
        rtp(d, 0).as_object_mut().unwrap().remove("rtcpPort");
        rtp(d, 1)["port"] = json!(5005);
        rtp(d, 1)["rtcpPort"] = json!(5200);
    });
    assert_problem(
        &problems,
        "spec.sources",
        &[
            "cam-1 and cam-2",
            "port + 1 unless rtcpPort or rtcpMux is set",
        ],
    );
}

#[test]
fn fec_port_colliding_with_another_source_is_rejected() {
    let problems = problems_after(|d| {
        rtp(d, 1)["fec"] = json!({"scheme": "st2022-1", "ports": [5106, 5004]});
    });
    assert_problem(&problems, "spec.sources", &["cam-1 and cam-2", "FEC ports"]);
}

#[test]
fn rtcp_mux_frees_the_implicit_rtcp_port() {
    let mut doc = demo();
    rtp(&mut doc, 0).as_object_mut().unwrap().remove("rtcpPort");
    rtp(&mut doc, 0)["rtcpMux"] = json!(true);
    rtp(&mut doc, 1)["port"] = json!(5005);
    rtp(&mut doc, 1)["rtcpPort"] = json!(5200);
    parse_manifests(&to_yaml(&[doc])).unwrap();
}

#[test]
fn rtx_payload_type_equal_to_payload_type_is_rejected() {
    let problems = problems_after(|d| source(d, 0)["rtxPayloadType"] = json!(96));
    assert_problem(
        &problems,
        "spec.sources[0].rtxPayloadType",
        &["rtxPayloadType must differ from payloadType"],
    );
}

#[test]
fn payload_type_outside_the_dynamic_range_is_rejected() {
    let problems = problems_after(|d| source(d, 0)["payloadType"] = json!(33));
    assert_problem(&problems, "spec.sources[0].payloadType", &["at least 96"]);
}

#[test]
fn max_replicas_below_min_replicas_is_rejected() {
    let problems =
        problems_after(|d| d["spec"]["scaling"] = json!({"minReplicas": 3, "maxReplicas": 2}));
    assert_problem(
        &problems,
        "spec.scaling.maxReplicas",
        &["maxReplicas must be greater than or equal to scaling.minReplicas"],
    );
}

#[test]
fn zero_min_replicas_is_rejected() {
    let problems = problems_after(|d| d["spec"]["scaling"] = json!({"minReplicas": 0}));
    assert_problem(&problems, "spec.scaling.minReplicas", &["at least 1"]);
}

#[test]
fn unknown_codec_is_rejected_listing_the_supported_ones() {
    let problems = problems_after(|d| source(d, 1)["codec"] = json!("vp8"));
    assert_problem(
        &problems,
        "spec.sources[1].codec",
        &["\"vp8\"", "\"h264\"", "\"h265\""],
    );
}

#[test]
fn unknown_bitrate_request_is_rejected_listing_tmmbr_and_remb() {
    let problems = problems_after(|d| source(d, 0)["bitrateRequest"] = json!("goog-remb"));
    assert_problem(
        &problems,
        "spec.sources[0].bitrateRequest",
        &["\"goog-remb\"", "\"tmmbr\"", "\"remb\""],
    );
    let p = parse_manifests(&to_yaml(&[{
        let mut d = demo();
        source(&mut d, 0)["bitrateRequest"] = json!("remb");
        d
    }]))
    .unwrap()
    .remove(0);
    assert_eq!(p.spec.sources[0].bitrate_request, zerodrop_crds::BitrateRequest::Remb);
}

#[test]
fn missing_transport_is_rejected() {
    let problems = problems_after(|d| {
        source(d, 0).as_object_mut().unwrap().remove("transport");
    });
    assert_problem(&problems, "spec.sources[0].transport", &["required"]);
}

#[test]
fn empty_transport_is_rejected_asking_for_exactly_one_member() {
    let problems = problems_after(|d| source(d, 0)["transport"] = json!({}));
    assert_problem(
        &problems,
        "spec.sources[0].transport",
        &["exactly one", "rtp"],
    );
}

#[test]
fn source_name_that_is_not_a_dns_label_is_rejected() {
    let problems = problems_after(|d| source(d, 0)["name"] = json!("Cam_1"));
    assert_problem(&problems, "spec.sources[0].name", &["DNS-1123 label"]);
}

#[test]
fn source_name_longer_than_63_characters_is_rejected() {
    let problems = problems_after(|d| source(d, 0)["name"] = json!("a".repeat(64)));
    assert_problem(
        &problems,
        "spec.sources[0].name",
        &["at most 63 characters"],
    );
}

#[test]
fn rtcp_mux_with_rtcp_port_is_rejected() {
    let problems = problems_after(|d| rtp(d, 0)["rtcpMux"] = json!(true));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.rtcpPort",
        &["rtcpPort and rtcpMux are mutually exclusive"],
    );
}

#[test]
fn rtcp_port_equal_to_rtp_port_is_rejected() {
    let problems = problems_after(|d| rtp(d, 0)["rtcpPort"] = json!(5004));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.rtcpPort",
        &["rtcpPort must differ from port"],
    );
}

#[test]
fn port_65535_without_room_for_rtcp_is_rejected() {
    let problems = problems_after(|d| {
        rtp(d, 1)["port"] = json!(65535);
        rtp(d, 1).as_object_mut().unwrap().remove("rtcpPort");
    });
    assert_problem(
        &problems,
        "spec.sources[1].transport.rtp.port",
        &["port 65535", "set rtcpPort or rtcpMux"],
    );
}

#[test]
fn null_rtcp_port_reads_as_unset() {
    // As on the apiserver, where has() is false for a null field.
    let problems = problems_after(|d| {
        rtp(d, 1)["port"] = json!(65535);
        rtp(d, 1)["rtcpPort"] = Value::Null;
    });
    assert_problem(
        &problems,
        "spec.sources[1].transport.rtp.port",
        &["port 65535"],
    );
}

#[test]
fn zero_downgrade_loss_percent_is_rejected() {
    let problems = problems_after(|d| {
        d["spec"]["bitratePolicy"] = json!({
            "downgradeLossPercent": 0, "upgradeAfterSeconds": 60,
            "renditions": [{"name": "high", "bitrateKbps": 5000}, {"name": "low", "bitrateKbps": 1000}]
        })
    });
    assert_problem(
        &problems,
        "spec.bitratePolicy.downgradeLossPercent",
        &["greater than 0"],
    );
}

#[test]
fn st2022_1_fec_with_one_port_is_rejected() {
    let problems =
        problems_after(|d| rtp(d, 0)["fec"] = json!({"scheme": "st2022-1", "ports": [5006]}));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.fec.ports",
        &["st2022-1 needs exactly 2 ports"],
    );
}

#[test]
fn ulpfec_without_payload_type_is_rejected() {
    let problems = problems_after(|d| rtp(d, 0)["fec"] = json!({"scheme": "ulpfec"}));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.fec.payloadType",
        &["ulpfec needs payloadType"],
    );
}

#[test]
fn ulpfec_payload_type_equal_to_rtx_payload_type_is_rejected() {
    let problems =
        problems_after(|d| rtp(d, 0)["fec"] = json!({"scheme": "ulpfec", "payloadType": 97}));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.fec.payloadType",
        &["must differ from payloadType and rtxPayloadType"],
    );
}

#[test]
fn latency_outside_20_to_10000_ms_is_rejected() {
    let problems = problems_after(|d| d["spec"]["repair"]["latencyMs"] = json!(5));
    assert_problem(
        &problems,
        "spec.repair.latencyMs",
        &["at least 20", "got 5"],
    );
    let problems = problems_after(|d| d["spec"]["repair"]["latencyMs"] = json!(60000));
    assert_problem(&problems, "spec.repair.latencyMs", &["at most 10000"]);
}

#[test]
fn listen_address_that_is_not_an_ip_is_rejected() {
    let problems = problems_after(|d| rtp(d, 0)["listenAddress"] = json!("localhost"));
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.listenAddress",
        &["listenAddress must be an IPv4 or IPv6 address"],
    );
}

#[test]
fn renditions_out_of_bitrate_order_are_rejected() {
    let problems = problems_after(|d| {
        d["spec"]["bitratePolicy"] = json!({
            "downgradeLossPercent": 2.0, "upgradeAfterSeconds": 60,
            "renditions": [{"name": "low", "bitrateKbps": 1000}, {"name": "high", "bitrateKbps": 5000}]
        })
    });
    assert_problem(
        &problems,
        "spec.bitratePolicy.renditions",
        &["highest to the lowest bitrateKbps"],
    );
}

#[test]
fn misspelled_field_is_rejected_naming_the_known_fields() {
    let problems = problems_after(|d| d["spec"]["repair"]["latencyMS"] = json!(300));
    assert_problem(
        &problems,
        "spec.repair.latencyMS",
        &["unknown field", "latencyMs"],
    );
}

#[test]
fn wrong_type_is_reported_and_rules_are_not_evaluated_on_it() {
    let problems = problems_after(|d| rtp(d, 0)["port"] = json!("5004"));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_problem(
        &problems,
        "spec.sources[0].transport.rtp.port",
        &["must be of type integer, got string"],
    );
}

#[test]
fn wrong_kind_and_api_version_are_rejected() {
    let problems = problems_after(|d| d["kind"] = json!("ConfigMap"));
    assert_problem(
        &problems,
        "kind",
        &["expected \"StreamPipeline\"", "\"ConfigMap\""],
    );
    let problems = problems_after(|d| d["apiVersion"] = json!("zerodrop.dev/v1"));
    assert_problem(&problems, "apiVersion", &["zerodrop.dev/v1alpha1"]);
}

#[test]
fn missing_or_malformed_metadata_name_is_rejected() {
    let problems = problems_after(|d| d["metadata"] = json!({}));
    assert_problem(&problems, "metadata.name", &["required"]);
    let problems = problems_after(|d| d["metadata"]["name"] = json!("Demo_1"));
    assert_problem(&problems, "metadata.name", &["DNS-1123 subdomain"]);
}

#[test]
fn problems_name_the_document_by_position_and_name() {
    let mut second = demo();
    second["metadata"]["name"] = json!("second");
    rtp(&mut second, 0)["port"] = json!(0);
    let err = parse_manifests(&to_yaml(&[demo(), second])).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    let p = &err.problems[0];
    assert_eq!((p.document, p.name.as_deref()), (2, Some("second")));
    assert_eq!(
        p.to_string(),
        "document 2 (second): spec.sources[0].transport.rtp.port: must be at least 1, got 0"
    );
    assert!(
        err.to_string()
            .starts_with("1 problem in the manifest:\n  - document 2 (second): "),
        "{err}"
    );
}

#[test]
fn every_problem_of_every_document_is_reported() {
    let mut first = demo();
    source(&mut first, 0)["rtxPayloadType"] = json!(96);
    let mut second = demo();
    second["metadata"]["name"] = json!("second");
    second["spec"]["repair"]["latencyMs"] = json!(1);
    let err = parse_manifests(&to_yaml(&[first, second])).unwrap_err();
    assert_eq!(
        err.problems.iter().map(|p| p.document).collect::<Vec<_>>(),
        [1, 2],
        "{err}"
    );
}

#[test]
fn two_documents_with_one_name_are_rejected() {
    let err = parse_manifests(&to_yaml(&[demo(), demo()])).unwrap_err();
    assert_problem(
        &err.problems,
        "metadata.name",
        &["document 1 already defines"],
    );
}

#[test]
fn multi_document_file_yields_every_pipeline_in_order() {
    let mut second = demo();
    second["metadata"]["name"] = json!("second");
    let text = format!(
        "---\n# leading empty document\n---\n{}",
        to_yaml(&[demo(), second])
    );
    let names: Vec<_> = parse_manifests(&text)
        .unwrap()
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["demo", "second"]);
}

#[test]
fn status_in_a_manifest_is_ignored() {
    let mut doc = demo();
    doc["status"] = json!({"replicas": "many"});
    let p = parse_manifests(&to_yaml(&[doc])).unwrap().remove(0);
    assert_eq!(p.status, None);
}

#[test]
fn empty_file_and_non_mapping_documents_are_errors() {
    assert!(parse_manifests("").is_err());
    assert!(parse_manifests("# only a comment\n").is_err());
    let err = parse_manifests("- a\n- b\n").unwrap_err();
    assert!(err.problems[0].message.contains("a list"), "{err}");
}

#[test]
fn yaml_syntax_error_is_reported_with_its_location() {
    let err =
        parse_manifests("apiVersion: zerodrop.dev/v1alpha1\nkind: [StreamPipeline\n").unwrap_err();
    assert!(
        err.problems[0].message.contains("not valid YAML")
            && err.problems[0].message.contains("line"),
        "{err}"
    );
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    /// Any scalar or small structure a user might put where a field belongs.
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,8}".prop_map(Value::from),
            Just(json!("st2022-1")),
            Just(json!("h265")),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Every path (as JSON pointer) of the demo manifest.
    fn pointers(value: &Value, prefix: String, out: &mut Vec<String>) {
        out.push(prefix.clone());
        match value {
            Value::Object(m) => m
                .iter()
                .for_each(|(k, v)| pointers(v, format!("{prefix}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| pointers(v, format!("{prefix}/{i}"), out)),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,200}") {
            let _ = parse_manifests(&text);
        }

        #[test]
        fn any_field_replaced_by_any_value_never_panics(index in any::<prop::sample::Index>(), replacement in any_value()) {
            let mut doc = demo();
            let mut paths = Vec::new();
            pointers(&doc, String::new(), &mut paths);
            let path = index.get(&paths).clone();
            if let Some(slot) = doc.pointer_mut(&path) {
                *slot = replacement;
            }
            let _ = parse_manifests(&to_yaml(&[doc]));
        }
    }
}

#[test]
fn an_rtsp_url_carrying_a_password_is_rejected_pointing_at_credentials_secret() {
    let problems = problems_after(|d| {
        source(d, 1)["transport"] = json!({"rtsp": {"url": "rtsp://admin:hunter22@10.1.2.3:554/stream1"}});
    });
    let p = problems.iter().find(|p| p.field.starts_with("spec.sources[1].transport.rtsp.url")).unwrap_or_else(|| panic!("{problems:#?}"));
    assert!(p.message.contains("credentialsSecret"), "{p:?}");
    // The message names the rule, never echoes the password.
    assert!(problems.iter().all(|p| !p.message.contains("hunter22")), "{problems:#?}");
}

#[test]
fn two_transports_on_one_source_are_rejected_naming_the_three() {
    let problems = problems_after(|d| {
        source(d, 1)["transport"]["srt"] = json!({"port": 9000});
    });
    assert_problem(&problems, "spec.sources[1].transport", &["exactly one", "rtp, rtsp or srt"]);
}

#[test]
fn an_srt_caller_without_an_address_is_rejected() {
    let problems = problems_after(|d| {
        source(d, 1)["transport"] = json!({"srt": {"mode": "caller", "port": 9000}});
    });
    assert_problem(&problems, "spec.sources[1].transport.srt.address", &["required in caller mode"]);
}

/// `demo()` with `cam-2` as `cam-1`'s sub stream and the switching thresholds.
fn grouped() -> Value {
    let mut d = demo();
    d["spec"]["sources"][1]["renditionOf"] = json!("cam-1");
    d["spec"]["bitratePolicy"] = json!({"downgradeLossPercent": 1, "downgradeWindowSeconds": 5, "upgradeAfterSeconds": 30});
    d
}

fn grouped_problems(edit: impl FnOnce(&mut Value)) -> Vec<ManifestProblem> {
    let mut doc = grouped();
    edit(&mut doc);
    match parse_manifests(&to_yaml(&[doc])) {
        Ok(_) => panic!("the edited manifest was accepted"),
        Err(e) => e.problems,
    }
}

#[test]
fn a_rendition_group_without_a_tmmbr_ladder_is_accepted_and_reads_as_one_group() {
    let pipelines = parse_manifests(&to_yaml(&[grouped()])).expect("valid");
    let spec = &pipelines[0].spec;
    assert_eq!(spec.sources[1].rendition_of.as_deref(), Some("cam-1"));
    assert!(spec.bitrate_policy.as_ref().unwrap().renditions.is_empty());
    assert_eq!(zerodrop_crds::rendition_groups(&spec.sources), vec![vec![0, 1]]);
    assert_eq!(spec.sources[1].shard_key(), "cam-1");
    assert_eq!(spec.sources[0].shard_key(), "cam-1");
}

#[test]
fn rendition_of_an_unknown_source_is_rejected_naming_the_source() {
    let problems = grouped_problems(|d| source(d, 1)["renditionOf"] = json!("cam-9"));
    assert_problem(&problems, "spec.sources", &["source cam-2", "renditionOf must name another source"]);
}

#[test]
fn rendition_of_itself_is_rejected() {
    let problems = grouped_problems(|d| source(d, 1)["renditionOf"] = json!("cam-2"));
    assert_problem(&problems, "spec.sources[1].renditionOf", &["not the source itself"]);
    assert_eq!(problems.len(), 1, "only that: {problems:#?}");
}

#[test]
fn rendition_of_a_rendition_is_rejected_one_level_only() {
    let problems = grouped_problems(|d| {
        let mut third = d["spec"]["sources"][1].clone();
        third["name"] = json!("cam-3");
        third["renditionOf"] = json!("cam-2");
        third["transport"]["rtp"] = json!({"listenAddress": "127.0.0.1", "port": 5204, "rtcpPort": 5205});
        d["spec"]["sources"].as_array_mut().unwrap().push(third);
    });
    assert_problem(&problems, "spec.sources", &["source cam-3", "one level of renditions"]);
}

#[test]
fn a_rendition_group_of_more_than_16_sources_is_rejected() {
    let build = |members: usize| {
        let mut d = grouped();
        let template = d["spec"]["sources"][1].clone();
        let list = d["spec"]["sources"].as_array_mut().unwrap();
        list.truncate(1);
        for i in 1..members {
            let mut s = template.clone();
            s["name"] = json!(format!("sub-{i}"));
            s["transport"]["rtp"] = json!({"listenAddress": "127.0.0.1", "port": 6000 + 2 * i as u16, "rtcpMux": true});
            list.push(s);
        }
        d
    };
    assert!(parse_manifests(&to_yaml(&[build(16)])).is_ok(), "16 members are allowed");
    let problems = match parse_manifests(&to_yaml(&[build(17)])) {
        Ok(_) => panic!("17 members accepted"),
        Err(e) => e.problems,
    };
    assert_problem(&problems, "spec.sources", &["source cam-1", "at most 16 sources"]);
}

#[test]
fn rendition_of_without_a_bitrate_policy_is_rejected() {
    let problems = grouped_problems(|d| {
        d["spec"].as_object_mut().unwrap().remove("bitratePolicy");
    });
    assert_problem(&problems, "spec.bitratePolicy", &["bitratePolicy is required when a source sets renditionOf"]);
}

#[test]
fn status_names_a_groups_decoded_source_and_an_ungrouped_sources_ladder_step() {
    let mut doc = grouped();
    doc["spec"]["sources"].as_array_mut().unwrap().push(json!(
        {"name": "cam-3", "codec": "h264", "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5204, "rtcpMux": true}}}
    ));
    doc["spec"]["bitratePolicy"]["renditions"] = json!([{"name": "high", "bitrateKbps": 4000}, {"name": "low", "bitrateKbps": 1000}]);
    let spec = parse_manifests(&to_yaml(&[doc])).expect("valid").remove(0).spec;
    // Both members of the group show the decoded one.
    assert_eq!(spec.rendition_name("cam-1", 1), Some("cam-2"));
    assert_eq!(spec.rendition_name("cam-2", 0), Some("cam-1"));
    assert_eq!(spec.rendition_name("cam-3", 1), Some("low"));
    assert_eq!(spec.rendition_name("cam-2", 2), None);
    assert_eq!(spec.rendition_name("nope", 0), None);
}
