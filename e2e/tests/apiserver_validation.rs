//! The StreamPipeline API against a real kube-apiserver (built from
//! k8s.io/kubernetes v1.35.4 by `scripts/controlplane.sh build`): the CRD is
//! accepted and Established, the examples apply, invalid specs are rejected by
//! `kubectl apply` with a message that names the field or rule, the printer
//! columns and the scale subresource work; and a StatefulSet's pod is
//! scheduled and marked Running by kube-scheduler + kwok, which the operator
//! tests rely on.
//!
//! Needs the control-plane binaries: run `scripts/controlplane.sh build` first.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_e2e::cluster::TestCluster;

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A valid two-source pipeline that each invalid case breaks in one place.
fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "zerodrop.dev/v1alpha1",
        "kind": "StreamPipeline",
        "metadata": {"name": name},
        "spec": {
            "sources": [
                {"name": "cam-1", "codec": "h264", "payloadType": 96, "rtxPayloadType": 97,
                 "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5004, "rtcpPort": 5005}}},
                {"name": "cam-2", "codec": "h264", "payloadType": 96, "rtxPayloadType": 97,
                 "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5104, "rtcpPort": 5105}}}
            ],
            "scaling": {"minReplicas": 1, "maxReplicas": 4}
        }
    })
}

struct Invalid {
    what: &'static str,
    edit: fn(&mut Value),
    /// Every one of these must appear in kubectl's error output.
    expect: &'static [&'static str],
}

/// The switching thresholds a rendition group needs.
fn switching(d: &mut Value) {
    d["spec"]["bitratePolicy"] = json!({"downgradeLossPercent": 1, "upgradeAfterSeconds": 30});
}

/// A third source at ports 5204/5205, a rendition of `of`.
fn third_source(d: &mut Value, name: &str, of: &str) {
    let s = json!({"name": name, "codec": "h264", "renditionOf": of,
                   "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 5204, "rtcpPort": 5205}}});
    d["spec"]["sources"].as_array_mut().unwrap().push(s);
}

const INVALID: &[Invalid] = &[
    Invalid {
        what: "renditionOf without a bitratePolicy",
        edit: |d| d["spec"]["sources"][1]["renditionOf"] = json!("cam-1"),
        expect: &["spec.bitratePolicy", "bitratePolicy is required when a source sets renditionOf"],
    },
    Invalid {
        what: "renditionOf naming no source",
        edit: |d| {
            switching(d);
            d["spec"]["sources"][1]["renditionOf"] = json!("cam-9");
        },
        expect: &["spec.sources", "source cam-2: renditionOf must name another source of this pipeline"],
    },
    Invalid {
        what: "renditionOf naming the source itself",
        edit: |d| {
            switching(d);
            d["spec"]["sources"][1]["renditionOf"] = json!("cam-2");
        },
        expect: &["spec.sources[1].renditionOf", "renditionOf must name another source, not the source itself"],
    },
    Invalid {
        what: "renditionOf naming a rendition (two levels)",
        edit: |d| {
            switching(d);
            d["spec"]["sources"][1]["renditionOf"] = json!("cam-1");
            third_source(d, "cam-3", "cam-2");
        },
        expect: &["spec.sources", "source cam-3: renditionOf must name a main source", "one level of renditions"],
    },
    Invalid {
        what: "a rendition group of 17 sources",
        edit: |d| {
            switching(d);
            let list = d["spec"]["sources"].as_array_mut().unwrap();
            list.truncate(1);
            for i in 1..17u16 {
                list.push(json!({"name": format!("sub-{i}"), "codec": "h264", "renditionOf": "cam-1",
                                 "transport": {"rtp": {"listenAddress": "127.0.0.1", "port": 6000 + 2 * i, "rtcpMux": true}}}));
            }
        },
        expect: &["spec.sources", "source cam-1: a rendition group holds at most 16 sources"],
    },
    Invalid {
        what: "duplicate source names",
        edit: |d| d["spec"]["sources"][1]["name"] = json!("cam-1"),
        expect: &["spec.sources[1]", "Duplicate value", "cam-1"],
    },
    Invalid {
        what: "a port out of range",
        edit: |d| d["spec"]["sources"][0]["transport"]["rtp"]["port"] = json!(70000),
        expect: &["spec.sources[0].transport.rtp.port", "65535"],
    },
    Invalid {
        what: "two sources on one port",
        edit: |d| {
            d["spec"]["sources"][1]["transport"]["rtp"]["port"] = json!(5004);
            d["spec"]["sources"][1]["transport"]["rtp"]["rtcpPort"] = json!(5007);
        },
        expect: &[
            "spec.sources",
            "cam-1 and cam-2 listen on the same UDP port",
        ],
    },
    Invalid {
        what: "an RTX payload type equal to the media payload type",
        edit: |d| d["spec"]["sources"][0]["rtxPayloadType"] = json!(96),
        expect: &[
            "spec.sources[0]",
            "rtxPayloadType must differ from payloadType",
        ],
    },
    Invalid {
        what: "maxReplicas < minReplicas",
        edit: |d| d["spec"]["scaling"] = json!({"minReplicas": 3, "maxReplicas": 2}),
        expect: &[
            "spec.scaling.maxReplicas",
            "scaling.maxReplicas must be greater than or equal to scaling.minReplicas",
        ],
    },
    Invalid {
        what: "an unknown codec",
        edit: |d| d["spec"]["sources"][1]["codec"] = json!("vp8"),
        expect: &[
            "spec.sources[1].codec",
            "Unsupported value",
            "\"vp8\"",
            "h264",
            "h265",
        ],
    },
    Invalid {
        what: "an unknown bitrateRequest",
        edit: |d| d["spec"]["sources"][0]["bitrateRequest"] = json!("goog-remb"),
        expect: &[
            "spec.sources[0].bitrateRequest",
            "Unsupported value",
            "\"goog-remb\"",
            "tmmbr",
            "remb",
        ],
    },
];

#[test]
fn real_apiserver_validates_and_serves_streampipelines() {
    let cluster = TestCluster::start().unwrap_or_else(|e| panic!("{e:#}"));

    // The CRD is accepted (schema, CEL cost estimates) and becomes Established.
    let out = cluster.kubectl(["apply", "-f", &repo("crds/streampipeline.crd.yaml")]);
    assert!(
        out.status.success(),
        "kubectl apply of the CRD failed:\n{}{}",
        stderr(&out),
        stdout(&out)
    );
    let out = cluster.kubectl([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/streampipelines.zerodrop.dev",
    ]);
    assert!(
        out.status.success(),
        "CRD not Established:\n{}\n{}",
        stderr(&out),
        cluster.diagnostics()
    );

    // The examples apply as they are.
    for example in [
        "examples/local-demo.yaml",
        "examples/camera-fleet.yaml",
        "examples/contribution-fec.yaml",
        "examples/camera-substreams.yaml",
    ] {
        let out = cluster.kubectl(["apply", "-f", &repo(example)]);
        assert!(
            out.status.success(),
            "kubectl apply -f {example} failed:\n{}{}",
            stderr(&out),
            stdout(&out)
        );
    }
    let names = cluster
        .kubectl_ok([
            "get",
            "streampipelines",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap();
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        ["camera-fleet", "contribution", "demo", "lobby-cams"]
    );

    // Invalid specs are rejected by the apiserver, naming the field or rule.
    let mut failures = Vec::new();
    for (i, case) in INVALID.iter().enumerate() {
        let mut doc = valid(&format!("invalid-{i}"));
        (case.edit)(&mut doc);
        let out = cluster.kubectl_stdin(["apply", "-f", "-"], &doc.to_string());
        let text = format!("{}{}", stderr(&out), stdout(&out));
        if out.status.success() {
            failures.push(format!("{}: accepted by the apiserver:\n{text}", case.what));
        } else if let Some(missing) = case.expect.iter().find(|w| !text.contains(**w)) {
            failures.push(format!(
                "{}: rejected, but the message lacks {missing:?}:\n{text}",
                case.what
            ));
        } else {
            eprintln!("rejected as expected ({}): {}", case.what, text.trim());
        }
    }
    // The unedited document is fine, so each rejection above is the edit's doing.
    let out = cluster.kubectl_stdin(["apply", "-f", "-"], &valid("valid-control").to_string());
    assert!(
        out.status.success(),
        "the unedited manifest was rejected:\n{}",
        stderr(&out)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // `kubectl get sp` (short name) shows the printer columns.
    let table = cluster.kubectl_ok(["get", "sp"]).unwrap();
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "REPLICAS", "READY", "STREAMS", "DECODER", "AGE"],
        "kubectl get sp:\n{table}"
    );
    let demo_row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        demo_row.contains(&"auto"),
        "the Decoder column of demo should read auto:\n{table}"
    );

    // The scale subresource: kubectl scale writes spec.scaling.replicas.
    let out = cluster.kubectl(["scale", "sp/demo", "--replicas=3"]);
    assert!(
        out.status.success(),
        "kubectl scale failed:\n{}",
        stderr(&out)
    );
    let replicas = cluster
        .kubectl_ok([
            "get",
            "sp",
            "demo",
            "-o",
            "jsonpath={.spec.scaling.replicas}",
        ])
        .unwrap();
    assert_eq!(replicas.trim(), "3");
    let scale: Value = serde_json::from_str(
        &cluster
            .kubectl_ok([
                "get",
                "--raw",
                "/apis/zerodrop.dev/v1alpha1/namespaces/default/streampipelines/demo/scale",
            ])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 3, "{scale:#}");

    // kube-scheduler binds a StatefulSet's pod to the kwok node and kwok marks
    // it Running (no image is pulled: kwok only fakes the pod's status).
    let sts = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "kwok-check"},
        "spec": {
            "replicas": 1,
            "serviceName": "kwok-check",
            "selector": {"matchLabels": {"app": "kwok-check"}},
            "template": {
                "metadata": {"labels": {"app": "kwok-check"}},
                "spec": {"containers": [{"name": "c", "image": "zerodrop.invalid/does-not-exist:0"}]}
            }
        }
    });
    cluster.apply_yaml(&sts.to_string()).unwrap();
    let phase = cluster
        .wait_for("pod kwok-check-0 Running", Duration::from_secs(90), || {
            let out = cluster.kubectl([
                "get",
                "pod",
                "kwok-check-0",
                "-o",
                "jsonpath={.status.phase} {.spec.nodeName}",
            ]);
            let s = stdout(&out);
            Ok(s.starts_with("Running ").then(|| s.trim().to_string()))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(phase, format!("Running {}", cluster.nodes()[0]));
    let ready = cluster.wait_for(
        "StatefulSet kwok-check readyReplicas 1",
        Duration::from_secs(60),
        || {
            let out = cluster.kubectl([
                "get",
                "statefulset",
                "kwok-check",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ]);
            Ok((stdout(&out).trim() == "1").then_some(()))
        },
    );
    ready.unwrap_or_else(|e| panic!("{e:#}"));

    // Owner-reference garbage collection (kube-controller-manager): deleting
    // the StatefulSet removes its pod (kwok finalizes the pod's deletion).
    cluster
        .kubectl_ok(["delete", "statefulset", "kwok-check", "--wait=false"])
        .unwrap();
    cluster
        .wait_for(
            "pod kwok-check-0 garbage-collected",
            Duration::from_secs(90),
            || {
                let out = cluster.kubectl([
                    "get",
                    "pod",
                    "kwok-check-0",
                    "--ignore-not-found",
                    "-o",
                    "name",
                ]);
                Ok((out.status.success() && stdout(&out).trim().is_empty()).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn missing_binaries_name_the_build_command() {
    let dir = tempfile::tempdir().unwrap();
    let err = zerodrop_e2e::cluster::check_binaries(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("scripts/controlplane.sh build"), "{err}");
}
