//! The operator against a real control plane (kube-apiserver, controller-
//! manager, scheduler and kwok built from Go modules): apply → objects, pods
//! Running, Ready status; scale; steady state without writes; restart
//! without churn; delete → garbage collected. And the data plane in pod mode
//! for real: the ConfigMap the operator rendered, read back from the
//! apiserver, drives a `zerodrop pod` process that decodes a live stream.
//!
//! Needs the control-plane binaries: `scripts/controlplane.sh build`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use zerodrop_e2e::cluster::TestCluster;
use zerodrop_e2e::operator::{OperatorProcess as Operator, install_crd};
use zerodrop_e2e::runner::{metric_value, zerodrop_bin};
use zerodrop_telemetry::get as http_get;

fn json(cluster: &TestCluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cluster.kubectl_ok(all).unwrap()).unwrap()
}

/// A pipeline of `n` sources on distinct ports.
fn fleet(n: usize, replicas: i32) -> String {
    let mut s = format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: fleet}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 8, replicas: {replicas}}}\n  decode: {{decoder: software}}\n  sources:\n"
    );
    for i in 0..n {
        s += &format!(
            "    - {{name: cam-{i}, codec: h264, rtxPayloadType: 97, transport: {{rtp: {{port: {}}}}}}}\n",
            26000 + 2 * i
        );
    }
    s
}

fn owners(sp: &Value) -> BTreeMap<String, i64> {
    sp["status"]["streams"]
        .as_array()
        .map(|a| a.iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["shard"].as_i64().unwrap())).collect())
        .unwrap_or_default()
}

/// For each owned object: the last time the operator's field manager wrote
/// it (managedFields), and its generation. Status updates by the StatefulSet
/// controller change the resourceVersion but not these, so they measure the
/// operator's own writes.
fn operator_writes(cluster: &TestCluster) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for kind in ["statefulset", "service", "configmap", "poddisruptionbudget"] {
        let list = json(cluster, &["get", kind, "-l", "zerodrop.dev/pipeline=fleet", "--show-managed-fields"]);
        for item in list["items"].as_array().unwrap() {
            let ours: Vec<String> = item["metadata"]["managedFields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["manager"] == "zerodrop-operator")
                .map(|m| format!("{}@{}", m["operation"], m["time"]))
                .collect();
            // Nobody but the operator writes Services and ConfigMaps: for
            // them any write shows in the resourceVersion too.
            let rv = match kind {
                "service" | "configmap" => item["metadata"]["resourceVersion"].to_string(),
                _ => String::new(),
            };
            out.insert(
                format!("{kind}/{}", item["metadata"]["name"].as_str().unwrap()),
                format!("gen={} {} {rv}", item["metadata"]["generation"], ours.join(",")),
            );
        }
    }
    out
}

#[test]
fn operator_reconciles_scales_stays_quiet_restarts_cleanly_and_garbage_collects() -> anyhow::Result<()> {
    let cluster = TestCluster::start()?;
    install_crd(&cluster)?;
    // The reconcile alone: the control loop writes status figures by design
    // (at most every --status-interval-s; e2e/tests/control_loop.rs).
    // No data-plane process runs here, so a replica change's new owners never
    // report the moving streams bound: the handover switches after 1 s (with
    // a Warning Event) instead of 120 (e2e/tests/handover.rs runs the pods).
    let operator = Operator::start(&cluster, 27080, "operator-1.log", &["--control", "false", "--handover-timeout-s", "1"]);

    // Apply: every object appears, pods run, the pipeline becomes Ready.
    cluster.apply_yaml(&fleet(40, 3))?;
    cluster.wait_for("the StatefulSet", Duration::from_secs(60), || {
        Ok(cluster.kubectl(["get", "statefulset", "fleet-dataplane"]).status.success().then_some(()))
    })?;
    // One reconcile applies them in turn: wait for each rather than assume an order.
    for obj in ["service/fleet-dataplane", "configmap/fleet-config", "poddisruptionbudget/fleet-dataplane", "service/fleet-cam-0", "service/fleet-cam-39"] {
        cluster
            .wait_for(obj, Duration::from_secs(60), || Ok(cluster.kubectl(["get", obj]).status.success().then_some(())))
            .with_context(|| format!("{obj} exists"))?;
    }
    let sp = cluster.wait_for("Ready=True", Duration::from_secs(120), || {
        let sp = json(&cluster, &["get", "sp", "fleet"]);
        let ready = sp["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        Ok(ready.then_some(sp))
    })?;
    assert_eq!(sp["status"]["observedGeneration"], sp["metadata"]["generation"]);
    let pods = json(&cluster, &["get", "pods", "-l", "zerodrop.dev/pipeline=fleet"]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 3);
    for p in pods["items"].as_array().unwrap() {
        assert_eq!(p["status"]["phase"], "Running", "kwok runs the pods");
    }
    let table = cluster.kubectl_ok(["get", "sp"])?;
    for column in ["REPLICAS", "READY", "STREAMS", "DECODER", "AGE"] {
        assert!(table.contains(column), "printer column {column} in:\n{table}");
    }
    assert!(table.lines().nth(1).is_some_and(|l| l.contains("fleet") && l.contains("40")), "{table}");

    // Scale 3 → 4: moved streams go to the new shard only, about 1/4 of them,
    // after a handover (status.handover while it lasts).
    let before = owners(&sp);
    cluster.kubectl_ok(["scale", "sp/fleet", "--replicas=4"])?;
    let preparing = cluster.wait_for("the handover", Duration::from_secs(30), || {
        let sp = json(&cluster, &["get", "sp", "fleet"]);
        Ok(sp["status"].get("handover").cloned())
    })?;
    assert_eq!((preparing["fromReplicas"].as_i64(), preparing["toReplicas"].as_i64()), (Some(3), Some(4)), "{preparing}");
    let sp = cluster.wait_for("status with 4 replicas and the handover done", Duration::from_secs(120), || {
        let sp = json(&cluster, &["get", "sp", "fleet"]);
        let done = sp["status"].get("handover").is_none();
        Ok((done && sp["status"]["replicas"] == 4 && owners(&sp).values().any(|&s| s == 3)).then_some(sp))
    })?;
    let sts = json(&cluster, &["get", "statefulset", "fleet-dataplane"]);
    assert_eq!(sts["spec"]["replicas"], 4);
    let after = owners(&sp);
    let moved: Vec<_> = before.iter().filter(|(k, v)| after[*k] != **v).collect();
    assert!(moved.iter().all(|(k, _)| after[*k] == 3), "every moved stream goes to shard 3: {moved:?}");
    assert!((4..=18).contains(&moved.len()), "about 40/4 streams move, {} did", moved.len());
    let svc = json(&cluster, &["get", "service", &format!("fleet-{}", moved[0].0)]);
    assert_eq!(svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"], "fleet-dataplane-3");
    let events = cluster.kubectl_ok(["get", "events", "--field-selector", "involvedObject.name=fleet"])?;
    assert!(events.contains("Scaling"), "a Scaling event: {events}");
    assert!(events.contains("HandoverTimedOut") && events.contains("HandoverDone"), "the handover's Events: {events}");

    // Steady state: reconciles happen (requeue, pod status events) but write nothing.
    cluster.wait_for("Ready with 4 shards", Duration::from_secs(60), || {
        let sp = json(&cluster, &["get", "sp", "fleet"]);
        let ready = sp["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        Ok(ready.then_some(()))
    })?;
    let quiet_from = operator_writes(&cluster);
    let writes = operator.writes();
    let reconciled = operator.reconciles();
    cluster.kubectl_ok(["annotate", "sp/fleet", "e2e/poke=1"])?; // an event, not a change
    cluster.wait_for("another reconcile", Duration::from_secs(60), || Ok((operator.reconciles() > reconciled).then_some(())))?;
    assert_eq!(operator_writes(&cluster), quiet_from, "steady state must not write");
    assert_eq!(operator.writes(), writes, "no write requests at all in steady state");

    // Restart: a new operator converges on the same objects without writing.
    drop(operator);
    let operator = Operator::start(&cluster, 27081, "operator-2.log", &["--control", "false"]);
    cluster.wait_for("the restarted operator to reconcile", Duration::from_secs(90), || {
        Ok((operator.reconciles() >= 1.0).then_some(()))
    })?;
    assert_eq!(operator_writes(&cluster), quiet_from, "a restart must not churn objects");
    assert_eq!(operator.writes(), 0.0, "a restarted operator finds nothing to write");

    // Delete: owner references hand everything to the garbage collector.
    cluster.kubectl_ok(["delete", "sp/fleet", "--wait=true"])?;
    cluster.wait_for("garbage collection", Duration::from_secs(120), || {
        Ok(operator_writes(&cluster).is_empty().then_some(()))
    })?;
    Ok(())
}

#[test]
fn dataplane_pod_mode_runs_its_shard_from_the_rendered_config_and_decodes() -> anyhow::Result<()> {
    let cluster = TestCluster::start()?;
    install_crd(&cluster)?;
    let _operator = Operator::start(&cluster, 27082, "operator.log", &[]);
    // With HLS: the pod serves it, and status says where.
    cluster.apply_yaml(&fleet(6, 2).replace("  decode: {decoder: software}\n", "  decode: {decoder: software}\n  outputs: {hls: {segmentSeconds: 1}}\n"))?;
    let config = cluster.wait_for("the rendered ConfigMap", Duration::from_secs(60), || {
        let out = cluster.kubectl(["get", "configmap", "fleet-config", "-o", "jsonpath={.data.pipeline\\.yaml}"]);
        Ok((out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    })?;
    assert!(config.contains("hls:"), "the rendered pipeline carries the outputs: {config}");
    let sp = cluster.wait_for("stream owners in status", Duration::from_secs(60), || {
        let sp = json(&cluster, &["get", "sp", "fleet"]);
        Ok((owners(&sp).len() == 6).then_some(sp))
    })?;
    let (stream, shard) = owners(&sp).into_iter().next().unwrap();
    let namespace = sp["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let listed = sp["status"]["streams"].as_array().unwrap().iter().find(|s| s["name"] == stream.as_str()).unwrap()["hls"].clone();
    assert_eq!(
        listed.as_str(),
        Some(format!("http://fleet-dataplane-{shard}.fleet-dataplane.{namespace}.svc:9464/hls/fleet/{stream}/index.m3u8").as_str()),
        "status names the playlist on the pod that owns the stream"
    );
    let port = 26000 + 2 * stream.trim_start_matches("cam-").parse::<u16>()?;

    // The pod, as a host process: its name gives the shard, the file the pipeline.
    let file = cluster.dir().join("pipeline.yaml");
    std::fs::write(&file, &config)?;
    let log = std::fs::File::create(cluster.dir().join("pod.log"))?;
    let mut pod = Command::new(zerodrop_bin())
        .args(["pod", "--config"])
        .arg(&file)
        .args(["--pod-name", &format!("fleet-dataplane-{shard}"), "--metrics-addr", "127.0.0.1:27090"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let metrics_addr = "127.0.0.1:27090".parse()?;
    let result = (|| -> anyhow::Result<()> {
        cluster.wait_for("the pod to be ready", Duration::from_secs(30), || {
            Ok(http_get(metrics_addr, "/readyz").is_ok_and(|r| r.status == 200).then_some(()))
        })?;
        let metrics = http_get(metrics_addr, "/metrics")?.body;
        assert!(metrics.contains(&format!("stream=\"{stream}\"")), "the pod runs {stream}");
        let status = Command::new(zerodrop_bin())
            .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--frames", "90", "--width", "640", "--height", "360"])
            .args(["--loss", "uniform:0.05", "--seed", "5", "--quiet"])
            .status()?;
        assert!(status.success());
        let decoded = cluster.wait_for("90 decoded frames", Duration::from_secs(20), || {
            let m = http_get(metrics_addr, "/metrics")?.body;
            let d = metric_value(&m, "zerodrop_frames_decoded_total", &[&format!("stream=\"{stream}\"")]).unwrap_or(0.0);
            Ok((d >= 90.0).then_some(d))
        })?;
        assert_eq!(decoded, 90.0);
        let m = http_get(metrics_addr, "/metrics")?.body;
        let dropped: f64 = m
            .lines()
            .filter(|l| l.starts_with("zerodrop_frames_dropped_total") && l.contains(&format!("stream=\"{stream}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(dropped, 0.0);
        // The playlist status names, served by the pod (its path; the pod
        // here is a host process, not behind the Service's DNS name), closed
        // by the sender's BYE, and every frame in it for ffprobe.
        let path = format!("/hls/fleet/{stream}/index.m3u8");
        cluster.wait_for("the pod's HLS playlist to end", Duration::from_secs(10), || {
            Ok(http_get(metrics_addr, &path).is_ok_and(|r| r.status == 200 && r.body.contains("#EXT-X-ENDLIST")).then_some(()))
        })?;
        let probe = Command::new("ffprobe")
            .args(["-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
            .arg(format!("http://{metrics_addr}{path}"))
            .output()?;
        assert_eq!(String::from_utf8_lossy(&probe.stdout).lines().next(), Some("90"), "ffprobe reads every frame from the pod's HLS");
        Ok(())
    })();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pod.id() as libc::pid_t, libc::SIGTERM) };
    let status = pod.wait()?;
    result?;
    assert!(status.success(), "pod exits 0 on SIGTERM");
    Ok(())
}

fn is_leader(op: &Operator) -> Option<bool> {
    op.metric("zerodrop_operator_leader", &[]).map(|v| v == 1.0)
}

#[test]
fn two_operator_replicas_elect_one_leader_and_the_standby_takes_over() -> anyhow::Result<()> {
    let cluster = TestCluster::start()?;
    install_crd(&cluster)?;
    let a = Operator::start(&cluster, 27083, "operator-a.log", &[]);
    let b = Operator::start(&cluster, 27084, "operator-b.log", &[]);
    let (leader, standby) = cluster.wait_for("exactly one leader", Duration::from_secs(60), || {
        Ok(match (is_leader(&a), is_leader(&b)) {
            (Some(true), Some(false)) => Some((a_or_b(true), a_or_b(false))),
            (Some(false), Some(true)) => Some((a_or_b(false), a_or_b(true))),
            _ => None,
        })
    })?;
    fn a_or_b(first: bool) -> usize {
        if first { 0 } else { 1 }
    }
    let mut ops = [Some(a), Some(b)];
    cluster.apply_yaml(&fleet(2, 1))?;
    cluster.wait_for("the leader to reconcile", Duration::from_secs(60), || {
        Ok(cluster.kubectl(["get", "statefulset", "fleet-dataplane"]).status.success().then_some(()))
    })?;
    assert_eq!(ops[standby].as_ref().unwrap().reconciles(), 0.0, "the standby does not reconcile");

    // The leader dies without releasing the lease: the standby takes over
    // when the lease expires and reconciles a change.
    drop(ops[leader].take());
    cluster.wait_for("the standby to lead", Duration::from_secs(60), || {
        Ok((is_leader(ops[standby].as_ref().unwrap()) == Some(true)).then_some(()))
    })?;
    cluster.kubectl_ok(["scale", "sp/fleet", "--replicas=2"])?;
    cluster.wait_for("the new leader to scale", Duration::from_secs(60), || {
        let sts = json(&cluster, &["get", "statefulset", "fleet-dataplane"]);
        Ok((sts["spec"]["replicas"] == 2).then_some(()))
    })?;
    Ok(())
}

/// Two RTSP sources sharing one credentials Secret, and a pushed one.
fn rtsp_pipeline() -> String {
    "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: doors}\nspec:\n  \
     scaling: {minReplicas: 1, maxReplicas: 2, replicas: 1}\n  decode: {decoder: software}\n  sources:\n    \
     - {name: door, codec: h264, transport: {rtsp: {url: \"rtsp://127.0.0.1:8554/cam\", credentialsSecret: {name: door-creds}}}}\n    \
     - {name: door-2, codec: h264, transport: {rtsp: {url: \"rtsp://127.0.0.1:8554/cam2\", lowerTransport: udp, credentialsSecret: {name: door-creds}}}}\n    \
     - {name: yard, codec: h264, transport: {rtp: {port: 26100}}}\n"
        .to_string()
}

fn ready_condition(cluster: &TestCluster, name: &str) -> Option<Value> {
    let sp = json(cluster, &["get", "sp", name]);
    sp["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready").cloned()
}

/// An RTSP source is pulled by the pod: no Service, its credentials Secret
/// mounted where the data plane reads it. While the Secret does not exist,
/// a Warning Event and the Ready condition name it, and the rest is
/// reconciled as usual; once it is created the next reconcile clears it.
#[test]
fn an_rtsp_sources_missing_credentials_secret_is_reported_until_it_exists_and_mounted_in_the_pods() -> anyhow::Result<()> {
    let cluster = TestCluster::start()?;
    install_crd(&cluster)?;
    let _operator = Operator::start(&cluster, 27085, "operator-rtsp.log", &["--control", "false"]);
    cluster.apply_yaml(&rtsp_pipeline())?;

    let ready = cluster.wait_for("Ready=False naming the missing Secret", Duration::from_secs(60), || {
        Ok(ready_condition(&cluster, "doors").filter(|c| c["status"] == "False" && c["reason"] == "SecretMissing"))
    })?;
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(message.contains("source door: Secret door-creds "), "names the source and the Secret: {message}");
    assert!(message.contains("ContainerCreating"), "says what the pods do meanwhile: {message}");
    let events = cluster.wait_for("the SecretMissing Event", Duration::from_secs(30), || {
        let list = json(&cluster, &["get", "events", "--field-selector", "reason=SecretMissing,involvedObject.name=doors"]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        Ok((!items.is_empty()).then_some(items))
    })?;
    assert_eq!(events.len(), 1, "one Event for the one Secret, repeats folded into it: {events:?}");
    assert_eq!(events[0]["type"], "Warning");
    assert!(events[0]["message"].as_str().is_some_and(|m| m.contains("Secret door-creds ")), "{:?}", events[0]);

    // The rest is reconciled all the same (the status comes after every
    // apply of the reconcile): the StatefulSet, and a Service for the
    // pushed source only.
    let sts = json(&cluster, &["get", "statefulset", "doors-dataplane"]);
    let pod = &sts["spec"]["template"]["spec"];
    let secret_volumes: Vec<&Value> =
        pod["volumes"].as_array().unwrap().iter().filter(|v| !v["secret"].is_null()).collect();
    assert_eq!(secret_volumes.len(), 1, "two sources share one Secret, mounted once: {pod}");
    assert_eq!(secret_volumes[0]["secret"]["secretName"], "door-creds");
    let volume = secret_volumes[0]["name"].as_str().unwrap();
    let mount = pod["containers"][0]["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume).cloned();
    let mount = mount.with_context(|| format!("volume {volume} mounted: {pod}"))?;
    assert_eq!(mount["mountPath"], "/var/run/zerodrop/credentials/door-creds", "where the data plane reads it");
    assert_eq!(mount["readOnly"], true);
    let services = json(&cluster, &["get", "services", "-l", "zerodrop.dev/pipeline=doors"]);
    let mut names: Vec<&str> = services["items"].as_array().unwrap().iter().filter_map(|s| s["metadata"]["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["doors-dataplane", "doors-yard"], "pulled sources get no Service");

    // The Secret appears: the next reconcile (a periodic recheck, the
    // operator does not watch Secrets) clears the condition.
    cluster.kubectl_ok(["create", "secret", "generic", "door-creds", "--from-literal=username=viewer", "--from-literal=password=e2e-not-logged"])?;
    let ready = cluster.wait_for("Ready no longer naming the Secret", Duration::from_secs(60), || {
        Ok(ready_condition(&cluster, "doors").filter(|c| c["reason"] != "SecretMissing"))
    })?;
    assert!(!ready["message"].as_str().unwrap_or_default().contains("door-creds"), "{ready}");
    cluster.wait_for("Ready=True (kwok runs the pod)", Duration::from_secs(120), || {
        Ok(ready_condition(&cluster, "doors").filter(|c| c["status"] == "True"))
    })?;
    let log = std::fs::read_to_string(cluster.dir().join("operator-rtsp.log"))?;
    assert!(!log.contains("e2e-not-logged"), "the operator never reads the Secret's values");
    Ok(())
}
