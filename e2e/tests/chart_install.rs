//! The Helm chart installed for real on the e2e harness's apiserver, and the
//! operator running with the chart's ServiceAccount credentials (a token of
//! that ServiceAccount in its kubeconfig), so the chart's ClusterRole is what
//! it can do:
//!
//! - `helm install` of the previous chart version, then `helm upgrade` to this
//!   one: the CRD change reaches the cluster;
//! - the operator reconciles a pipeline to Ready as the ServiceAccount;
//! - hand edits of owned objects (a StatefulSet's replicas and image, a
//!   Service's selector, a ConfigMap's label) are put back within one
//!   reconcile, with a `DriftCorrected` Event; owned objects of every kind
//!   that the pipeline no longer wants are pruned;
//! - steady state and a restart write nothing, counted from the apiserver's
//!   audit log (every request of the ServiceAccount), not from the
//!   operator's own metric;
//! - what the ServiceAccount did equals what the ClusterRole grants: a
//!   missing permission shows as a 403, an excess one as a grant never used.
//!
//! Needs the control-plane binaries and helm: `scripts/controlplane.sh build`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use zerodrop_e2e::cluster::{AuditEvent, ClusterOptions, TestCluster};
use zerodrop_e2e::operator::{OperatorProcess, PodProcess, helm, kubectl_json, repo, service_account_kubeconfig};

const NS: &str = "zerodrop-system";
const RELEASE: &str = "zerodrop";
/// `<fullname>-operator`; the fullname is the release name when it contains the chart's.
const SERVICE_ACCOUNT: &str = "zerodrop-operator";
const USER: &str = "system:serviceaccount:zerodrop-system:zerodrop-operator";

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The chart as its previous version shipped it: version 0.0.9, and a CRD
/// without `spec.sources[].parameterSets` (added since).
fn previous_chart(dir: &Path) -> Result<PathBuf> {
    let chart = dir.join("zerodrop-0.0.9");
    copy_dir(&repo("charts/zerodrop"), &chart)?;
    let meta = std::fs::read_to_string(chart.join("Chart.yaml"))?;
    let meta: String = meta
        .lines()
        .map(|l| if l.starts_with("version:") { "version: 0.0.9".to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(chart.join("Chart.yaml"), meta + "\n")?;
    let file = chart.join("files/streampipeline.crd.yaml");
    let mut crd: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&file)?)?;
    let source = crd
        .get_mut("spec")
        .and_then(|v| v.get_mut("versions"))
        .and_then(|v| v.get_mut(0))
        .and_then(|v| v.get_mut("schema"))
        .and_then(|v| v.get_mut("openAPIV3Schema"))
        .and_then(|v| v.get_mut("properties"))
        .and_then(|v| v.get_mut("spec"))
        .and_then(|v| v.get_mut("properties"))
        .and_then(|v| v.get_mut("sources"))
        .and_then(|v| v.get_mut("items"))
        .and_then(|v| v.get_mut("properties"))
        .and_then(|v| v.as_mapping_mut())
        .context("the CRD's spec.sources.items.properties")?;
    source.remove("parameterSets").context("the CRD has parameterSets")?;
    // Keep the `metadata:\n  name:` shape the template rewrites.
    std::fs::write(&file, serde_yaml::to_string(&crd)?)?;
    Ok(chart)
}

fn crd_has_parameter_sets(cluster: &TestCluster) -> bool {
    let crd = kubectl_json(cluster, &["get", "crd", "streampipelines.zerodrop.dev"]);
    !crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sources"]["items"]
        ["properties"]["parameterSets"]
        .is_null()
}

fn pipeline() -> String {
    "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: cams}\nspec:\n  \
     scaling: {minReplicas: 1, maxReplicas: 2}\n  decode: {decoder: software}\n  sources:\n    \
     - {name: cam-0, codec: h264, transport: {rtp: {listenAddress: 127.0.0.1, port: 27400}}}\n    \
     - {name: cam-1, codec: h264, transport: {rtp: {listenAddress: 127.0.0.1, port: 27402}}}\n"
        .to_string()
}

fn ready(cluster: &TestCluster, name: &str) -> bool {
    let sp = kubectl_json(cluster, &["get", "sp", name]);
    sp["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The ServiceAccount's requests that changed something, Lease renewals
/// (leader election) aside.
fn writes(cluster: &TestCluster) -> Result<Vec<AuditEvent>> {
    Ok(cluster
        .audit_events(USER)?
        .into_iter()
        .filter(|e| e.is_write() && e.resource() != "coordination.k8s.io/leases")
        .collect())
}

/// (resource, verb) of every request: a server-side apply that created its
/// object (201) was authorized as a create as well as a patch.
fn used_grants(events: &[AuditEvent]) -> BTreeSet<(String, String)> {
    let mut used = BTreeSet::new();
    for e in events {
        used.insert((e.resource(), e.verb.clone()));
        if e.verb == "patch" && e.code() == 201 {
            used.insert((e.resource(), "create".to_string()));
        }
    }
    used
}

fn describe(events: &[AuditEvent]) -> String {
    events.iter().map(|e| format!("{} {} {}", e.verb, e.resource(), e.uri)).collect::<Vec<_>>().join("\n")
}

/// Events of `reason` about object `name`'s pipeline whose message mentions `needle`.
fn event_count(cluster: &TestCluster, reason: &str, needle: &str) -> usize {
    let events = kubectl_json(cluster, &["get", "events", "--field-selector", &format!("reason={reason}")]);
    events["items"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["message"].as_str().is_some_and(|m| m.contains(needle))).count())
        .unwrap_or(0)
}

/// An object the pipeline owns (its label, a controller owner reference to
/// it) but no longer wants: what an older operator layout would leave.
fn stale_owned(kind: &str, name: &str, owner_uid: &str) -> String {
    let meta = format!(
        "metadata:\n  name: {name}\n  labels: {{zerodrop.dev/pipeline: cams}}\n  ownerReferences:\n  \
         - {{apiVersion: zerodrop.dev/v1alpha1, kind: StreamPipeline, name: cams, uid: {owner_uid}, controller: true}}\n"
    );
    match kind {
        "ConfigMap" => format!("apiVersion: v1\nkind: ConfigMap\n{meta}data: {{old: \"1\"}}\n"),
        "Service" => format!("apiVersion: v1\nkind: Service\n{meta}spec:\n  ports: [{{port: 9, protocol: UDP}}]\n"),
        "PodDisruptionBudget" => format!(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget\n{meta}spec:\n  maxUnavailable: 1\n  selector: {{matchLabels: {{old: x}}}}\n"
        ),
        "StatefulSet" => format!(
            "apiVersion: apps/v1\nkind: StatefulSet\n{meta}spec:\n  replicas: 0\n  serviceName: old\n  selector: {{matchLabels: {{old: x}}}}\n  \
             template:\n    metadata: {{labels: {{old: x}}}}\n    spec: {{containers: [{{name: old, image: old:1}}]}}\n"
        ),
        _ => unreachable!(),
    }
}

fn exists(cluster: &TestCluster, obj: &str) -> bool {
    cluster.kubectl(["get", obj]).status.success()
}

#[test]
fn the_chart_installs_upgrades_its_crd_and_its_service_account_reconciles_corrects_drift_and_stays_quiet() -> Result<()> {
    // Loopback pod IPs, so the control loop's scrapes reach a pod process.
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;

    // 0. prometheus-operator's CRDs (from its Go module), so the chart's
    // monitoring objects are installed and validated against their real schemas.
    let monitoring_crds = cluster.bin_dir().join("../monitoring-crds");
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let file = monitoring_crds.join(format!("monitoring.coreos.com_{kind}.yaml"));
        anyhow::ensure!(file.exists(), "{} is missing: run scripts/controlplane.sh build", file.display());
        cluster.kubectl_ok(["apply", "--server-side", "-f", file.to_str().unwrap()])?;
        cluster.kubectl_ok(["wait", "--for=condition=Established", &format!("crd/{kind}.monitoring.coreos.com"), "--timeout=60s"])?;
    }
    let monitoring = "monitoring.serviceMonitor.enabled=true,monitoring.rules.enabled=true,monitoring.dashboards.enabled=true";

    // 1. The previous chart, then an upgrade to this one: the CRD follows.
    let previous = previous_chart(cluster.dir())?;
    helm(&cluster, &["install", RELEASE, previous.to_str().unwrap(), "--namespace", NS, "--create-namespace", "--set", monitoring])?;
    cluster.kubectl_ok(["wait", "--for=condition=Established", "crd/streampipelines.zerodrop.dev", "--timeout=60s"])?;
    assert!(!crd_has_parameter_sets(&cluster), "the previous chart's CRD has no parameterSets");
    helm(&cluster, &["upgrade", RELEASE, "charts/zerodrop", "--namespace", NS, "--set", monitoring])?;
    cluster.wait_for("the upgraded CRD", Duration::from_secs(30), || Ok(crd_has_parameter_sets(&cluster).then_some(())))?;
    let crd = kubectl_json(&cluster, &["get", "crd", "streampipelines.zerodrop.dev"]);
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep", "uninstall keeps the CRD and the pipelines");
    for obj in [
        format!("deployment/{RELEASE}-operator"),
        format!("daemonset/{RELEASE}-agent"),
        format!("serviceaccount/{SERVICE_ACCOUNT}"),
    ] {
        cluster.kubectl_ok(["get", "-n", NS, &obj]).with_context(|| format!("the chart installed {obj}"))?;
    }
    cluster.kubectl_ok(["get", &format!("clusterrole/{RELEASE}-operator"), &format!("clusterrolebinding/{RELEASE}-operator")])?;
    let count = |kind: &str| kubectl_json(&cluster, &["get", kind, "-n", NS])["items"].as_array().map(|a| a.len()).unwrap_or(0);
    assert_eq!(count("servicemonitors.monitoring.coreos.com"), 2, "ServiceMonitors for the operator and the agent");
    assert_eq!(count("podmonitors.monitoring.coreos.com"), 1, "a PodMonitor for the data-plane pods");
    assert_eq!(count("prometheusrules.monitoring.coreos.com"), 1, "the alert rules");
    let dashboards = kubectl_json(&cluster, &["get", "configmaps", "-n", NS, "-l", "grafana_dashboard=1"]);
    assert_eq!(dashboards["items"].as_array().map(|a| a.len()), Some(1), "the dashboard ConfigMap");

    // 2. The operator as the chart's ServiceAccount.
    let kubeconfig = service_account_kubeconfig(&cluster, NS, SERVICE_ACCOUNT, "operator-sa.kubeconfig")?;
    // No data-plane process runs here: a replica change's handover switches
    // after 1 s instead of waiting 120 for new owners that never bind.
    let flags = ["--status-interval-s", "2", "--handover-timeout-s", "1"];
    let operator = OperatorProcess::start_as(&cluster, &kubeconfig, 27180, "operator-sa-1.log", &flags);
    cluster.apply_yaml(&pipeline())?;
    cluster.wait_for("Ready=True", Duration::from_secs(120), || Ok(ready(&cluster, "cams").then_some(())))?;
    // Two replica changes: two Scaling Events, the second folded into the
    // first (the recorder patches it with a count).
    cluster.kubectl_ok(["scale", "sp/cams", "--replicas=2"])?;
    cluster.wait_for("2 replicas, the handover done", Duration::from_secs(30), || {
        let done = kubectl_json(&cluster, &["get", "sp", "cams"])["status"].get("handover").is_none();
        Ok((done && kubectl_json(&cluster, &["get", "statefulset", "cams-dataplane"])["spec"]["replicas"] == 2).then_some(()))
    })?;
    cluster.kubectl_ok(["scale", "sp/cams", "--replicas=1"])?;
    cluster.wait_for("1 replica, Ready", Duration::from_secs(60), || {
        let sts = kubectl_json(&cluster, &["get", "statefulset", "cams-dataplane"]);
        Ok((sts["spec"]["replicas"] == 1 && ready(&cluster, "cams")).then_some(()))
    })?;
    cluster.wait_for("the Scaling Event counted twice", Duration::from_secs(15), || {
        let events = kubectl_json(&cluster, &["get", "events.v1.events.k8s.io"]);
        let folded = events["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["reason"] == "Scaling" && e["series"]["count"].as_i64() >= Some(2)));
        Ok(folded.then_some(()))
    })?;
    // An RTSP source naming a Secret that does not exist: the operator asks
    // for it (get secrets) and says so in Ready; the pipeline then goes.
    cluster.apply_yaml(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: doors}\nspec:\n  \
         scaling: {minReplicas: 1, maxReplicas: 1}\n  decode: {decoder: software}\n  sources:\n    \
         - {name: door, codec: h264, transport: {rtsp: {url: \"rtsp://127.0.0.1:8554/cam\", credentialsSecret: {name: door-creds}}}}\n",
    )?;
    cluster.wait_for("Ready=False naming the missing Secret", Duration::from_secs(60), || {
        let sp = kubectl_json(&cluster, &["get", "sp", "doors"]);
        let missing = sp["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| c["type"] == "Ready" && c["reason"] == "SecretMissing" && c["message"].as_str().is_some_and(|m| m.contains("door-creds")))
        });
        Ok(missing.then_some(()))
    })?;
    cluster.kubectl_ok(["delete", "sp/doors", "--wait=true"])?;
    let denied: Vec<AuditEvent> = cluster.audit_events(USER)?.into_iter().filter(|e| e.code() == 403).collect();
    assert!(denied.is_empty(), "the ServiceAccount was refused:\n{}", describe(&denied));

    // 3. Hand edits of owned objects are put back within one reconcile, with an Event.
    let uid = kubectl_json(&cluster, &["get", "sp", "cams"])["metadata"]["uid"].as_str().unwrap().to_string();
    for round in 0..2 {
        // Twice the same edit, each put back with an Event of its own.
        cluster.kubectl_ok(["scale", "statefulset/cams-dataplane", "--replicas=3"])?;
        cluster.wait_for("replicas put back", Duration::from_secs(15), || {
            let sts = kubectl_json(&cluster, &["get", "statefulset", "cams-dataplane"]);
            Ok((sts["spec"]["replicas"] == 1).then_some(()))
        })?;
        cluster.wait_for("a DriftCorrected Event for the replicas", Duration::from_secs(15), || {
            Ok((event_count(&cluster, "DriftCorrected", "spec.replicas was 3, want 1") > 0).then_some(()))
        })?;
        let _ = round;
    }
    cluster.kubectl_ok(["set", "image", "statefulset/cams-dataplane", "dataplane=someone/else:1"])?;
    cluster.kubectl_ok(["patch", "service", "cams-cam-0", "-p", r#"{"spec":{"selector":{"statefulset.kubernetes.io/pod-name":"cams-dataplane-7"}}}"#])?;
    cluster.kubectl_ok(["label", "configmap", "cams-config", "app.kubernetes.io/managed-by=someone", "--overwrite"])?;
    cluster.wait_for("image, selector and label put back", Duration::from_secs(15), || {
        let sts = kubectl_json(&cluster, &["get", "statefulset", "cams-dataplane"]);
        let svc = kubectl_json(&cluster, &["get", "service", "cams-cam-0"]);
        let cm = kubectl_json(&cluster, &["get", "configmap", "cams-config"]);
        Ok((sts["spec"]["template"]["spec"]["containers"][0]["image"] == "zerodrop:e2e"
            && svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "cams-dataplane-0"
            && cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "zerodrop-operator")
            .then_some(()))
    })?;
    for needle in ["image was \"someone/else:1\"", "statefulset.kubernetes.io/pod-name was \"cams-dataplane-7\"", "managed-by was \"someone\""] {
        cluster.wait_for(&format!("a DriftCorrected Event: {needle}"), Duration::from_secs(15), || {
            Ok((event_count(&cluster, "DriftCorrected", needle) > 0).then_some(()))
        })?;
    }
    assert!(
        operator.metric("zerodrop_operator_drift_corrections_total", &["kind=\"statefulset\""]).unwrap_or(0.0) >= 3.0,
        "drift corrections counted by kind"
    );

    // 4. Owned objects of every kind the pipeline no longer wants are pruned;
    // so is the Service of a source that left the spec.
    for (kind, name) in [("ConfigMap", "cams-old"), ("Service", "cams-old"), ("PodDisruptionBudget", "cams-old"), ("StatefulSet", "cams-old")] {
        cluster.apply_yaml(&stale_owned(kind, name, &uid))?;
    }
    cluster.apply_yaml(&pipeline().replace(
        "    - {name: cam-1, codec: h264, transport: {rtp: {listenAddress: 127.0.0.1, port: 27402}}}\n",
        "",
    ))?;
    cluster.wait_for("stale objects pruned", Duration::from_secs(30), || {
        let left: Vec<&str> = ["configmap/cams-old", "service/cams-old", "poddisruptionbudget/cams-old", "statefulset/cams-old", "service/cams-cam-1"]
            .into_iter()
            .filter(|o| exists(&cluster, o))
            .collect();
        Ok(left.is_empty().then_some(()))
    })?;
    assert!(exists(&cluster, "service/cams-cam-0") && exists(&cluster, "configmap/cams-config"), "wanted objects stay");
    cluster.wait_for("status with one stream", Duration::from_secs(30), || {
        let sp = kubectl_json(&cluster, &["get", "sp", "cams"]);
        Ok((sp["status"]["streamCount"] == 1 && ready(&cluster, "cams")).then_some(()))
    })?;

    // The image edit rolled the pod (kwok gives the new one another IP):
    // once the rollout is done, the shard as a real process on its pod's IP,
    // which the control loop reads.
    cluster.kubectl_ok(["rollout", "status", "statefulset/cams-dataplane", "--timeout=60s"])?;
    let _pod = PodProcess::start(&cluster, "cams")?;
    cluster.wait_for("the control loop's figures in status", Duration::from_secs(60), || {
        let sp = kubectl_json(&cluster, &["get", "sp", "cams"]);
        let degraded = sp["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Degraded").cloned());
        Ok(degraded.filter(|d| d["status"] == "False").map(|_| ()))
    })?;

    // 5. Steady state: a reconcile (an annotation is an event, not a change)
    // and control rounds write nothing.
    cluster.wait_for("the writes of the change to settle", Duration::from_secs(30), || {
        let sp = kubectl_json(&cluster, &["get", "sp", "cams"]);
        let streams = sp["status"]["streams"].as_array().map(|a| a.len()).unwrap_or(0);
        Ok((streams == 1 && sp["status"]["observedGeneration"] == sp["metadata"]["generation"]).then_some(()))
    })?;
    let rounds = |op: &OperatorProcess| op.metric("zerodrop_operator_control_round_seconds_count", &[]).unwrap_or(0.0);
    // Wait out one status interval (2 s) of control rounds so the last figures are written.
    let r0 = rounds(&operator);
    cluster.wait_for("three control rounds", Duration::from_secs(30), || Ok((rounds(&operator) >= r0 + 3.0).then_some(())))?;
    let quiet = writes(&cluster)?.len();
    let reconciled = operator.reconciles();
    cluster.kubectl_ok(["annotate", "sp/cams", "e2e/poke=1"])?;
    cluster.wait_for("another reconcile", Duration::from_secs(60), || Ok((operator.reconciles() > reconciled).then_some(())))?;
    let r1 = rounds(&operator);
    cluster.wait_for("five more control rounds", Duration::from_secs(30), || Ok((rounds(&operator) >= r1 + 5.0).then_some(())))?;
    let after = writes(&cluster)?;
    assert_eq!(after.len(), quiet, "steady state must not write:\n{}", describe(&after[quiet..]));

    // 6. A restart finds nothing to write.
    drop(operator);
    let operator = OperatorProcess::start_as(&cluster, &kubeconfig, 27181, "operator-sa-2.log", &flags);
    cluster.wait_for("the restarted operator to reconcile and run control rounds", Duration::from_secs(90), || {
        Ok((operator.reconciles() >= 1.0 && rounds(&operator) >= 5.0).then_some(()))
    })?;
    let after = writes(&cluster)?;
    assert_eq!(after.len(), quiet, "a restarted operator must not write:\n{}", describe(&after[quiet..]));

    // 7. What the ServiceAccount did is exactly what the ClusterRole grants.
    drop(operator);
    let events = cluster.audit_events(USER)?;
    let denied: Vec<&AuditEvent> = events.iter().filter(|e| e.code() == 403).collect();
    assert!(denied.is_empty(), "refused requests: {denied:#?}");
    let role = kubectl_json(&cluster, &["get", "clusterrole", &format!("{RELEASE}-operator")]);
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let list = |k: &str| rule[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    granted.insert((format!("{group}/{resource}"), verb));
                }
            }
        }
    }
    // A watch is logged when it ends: poll until the ended process's watches are in.
    let used = cluster
        .wait_for("the audit log to show every grant used", Duration::from_secs(15), || {
            let used = used_grants(&cluster.audit_events(USER)?);
            Ok((used == granted).then_some(used))
        })
        .or_else(|_| -> Result<BTreeSet<(String, String)>> {
            Ok(used_grants(&cluster.audit_events(USER)?))
        })?;
    let unused: Vec<_> = granted.difference(&used).collect();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(
        unused.is_empty() && ungranted.is_empty(),
        "the ClusterRole must grant exactly what the operator does;\ngranted, never used: {unused:?}\nused, not granted: {ungranted:?}"
    );
    Ok(())
}
