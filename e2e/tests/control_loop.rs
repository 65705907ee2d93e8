//! The control loop end to end on the real apiserver: the operator scrapes
//! real `zerodrop pod` processes (one per shard, run on this machine from the
//! ConfigMap the operator rendered), the policy sees the kernel drop packets
//! on a stalled shard's socket, and the pipeline scales up, with the reason in
//! an Event, in status and in a metric. A pipeline whose replicas another
//! owner sets (spec.scaling.replicas, as `kubectl scale` or an HPA write it
//! through the scale subresource) is only reported on: nothing writes its
//! replica count.
//!
//! kwok hands out pod IPs from 127.1.0.0/16 here, so a `zerodrop pod` process
//! serving its metrics on a pod's IP is that pod to the operator, which reads
//! `podIP:9464` exactly as in a cluster.
//!
//! Needs the control-plane binaries: `scripts/controlplane.sh build`.

use std::time::{Duration, Instant};

use serde_json::Value;
use zerodrop_e2e::cluster::{ClusterOptions, TestCluster};
use zerodrop_e2e::operator::{OperatorProcess, PodProcess, install_crd};

fn pipeline(name: &str, port: u16, replicas: Option<i32>) -> String {
    zerodrop_e2e::operator::stall_prone_pipeline(name, port, 3, replicas)
}

fn json(cluster: &TestCluster, args: &[&str]) -> Value {
    zerodrop_e2e::operator::kubectl_json(cluster, args)
}

fn events(cluster: &TestCluster, object: &str) -> Vec<(String, String)> {
    let list = json(cluster, &["get", "events", "--field-selector", &format!("involvedObject.name={object}")]);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["reason"].as_str().unwrap_or("").to_string(), e["message"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn degraded(sp: &Value) -> Option<(String, String)> {
    sp["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Degraded").map(|c| {
        (c["status"].as_str().unwrap_or("").to_string(), c["reason"].as_str().unwrap_or("").to_string())
    })
}

#[test]
fn kernel_drops_scale_a_policy_owned_pipeline_within_5_s_and_an_hpa_owned_one_is_only_reported_on() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let operator = OperatorProcess::start(&cluster, 27180, "operator.log", &[]);
    cluster.apply_yaml(&pipeline("auto", 28000, None))?;
    cluster.apply_yaml(&pipeline("hpa", 28010, Some(1)))?;
    let auto = PodProcess::start(&cluster, "auto")?;
    let hpa = PodProcess::start(&cluster, "hpa")?;

    // Healthy first: the loop reads both pods, owns auto's replicas (1, the
    // floor), leaves hpa's alone, and neither is degraded.
    cluster.wait_for("both pipelines read and healthy", Duration::from_secs(60), || {
        let a = json(&cluster, &["get", "sp", "auto"]);
        let h = json(&cluster, &["get", "sp", "hpa"]);
        let healthy = |sp: &Value| degraded(sp) == Some(("False".into(), "AsExpected".into())) && sp["status"]["streams"][0]["framesDecoded"].is_u64();
        Ok((healthy(&a) && healthy(&h) && a["status"]["policyReplicas"] == 1).then_some(()))
    })?;
    assert!(json(&cluster, &["get", "sp", "hpa"])["status"].get("policyReplicas").is_none(), "another owner's replicas are not the policy's");
    assert_eq!(operator.metric("zerodrop_operator_scrape_targets", &[]), Some(2.0));

    // Capacity: the shard stalls and its socket overflows. Replicas go up
    // within 5 s of the drops.
    auto.stall_and_flood(28000);
    let flooded = Instant::now();
    cluster.wait_for("auto's StatefulSet at 2 replicas", Duration::from_secs(20), || {
        let sts = json(&cluster, &["get", "statefulset", "auto-dataplane"]);
        Ok((sts["spec"]["replicas"] == 2).then_some(()))
    })?;
    let reaction = flooded.elapsed();
    eprintln!("kernel drops → StatefulSet at 2 replicas: {:.2} s", reaction.as_secs_f64());
    assert!(reaction < Duration::from_secs(5), "replicas went up {reaction:?} after the drops, beyond 5 s");
    let sp = json(&cluster, &["get", "sp", "auto"]);
    assert_eq!(sp["status"]["policyReplicas"], 2);
    assert!(sp["spec"]["scaling"].get("replicas").is_none(), "the policy writes status, never spec");
    let decision = sp["status"]["lastDecision"].as_str().unwrap_or_default();
    assert!(decision.starts_with("scale from 1 to 2 replicas: kernel_drops"), "{decision}");
    assert!(sp["status"]["streams"][0]["kernelDrops"].as_u64().unwrap_or(0) > 0, "{}", sp["status"]);
    let ev = events(&cluster, "auto");
    assert!(ev.iter().any(|(r, m)| r == "KernelDrops" && m.contains("scale from 1 to 2")), "{ev:?}");
    assert_eq!(
        operator.metric("zerodrop_policy_decisions_total", &["pipeline=\"default/auto\"", "action=\"scale_to\"", "reason=\"kernel_drops\""]),
        Some(1.0)
    );

    // An HPA-style owner: the same overload is reported, nothing is written.
    hpa.stall_and_flood(28010);
    let reported = cluster.wait_for("a would-scale Event on hpa", Duration::from_secs(20), || {
        Ok(events(&cluster, "hpa").into_iter().find(|(r, m)| r == "KernelDrops" && m.contains("would scale from 1 to 2")))
    })?;
    eprintln!("hpa: {reported:?}");
    let sp = json(&cluster, &["get", "sp", "hpa"]);
    assert_eq!(sp["spec"]["scaling"]["replicas"], 1);
    assert!(sp["status"].get("policyReplicas").is_none());
    assert_eq!(json(&cluster, &["get", "statefulset", "hpa-dataplane"])["spec"]["replicas"], 1);
    assert_eq!(
        operator.metric("zerodrop_policy_decisions_total", &["pipeline=\"default/hpa\"", "action=\"would_scale_to\"", "reason=\"kernel_drops\""]),
        Some(1.0)
    );
    assert_eq!(
        operator.metric("zerodrop_policy_decisions_total", &["pipeline=\"default/hpa\"", "action=\"scale_to\""]),
        None,
        "never a scale_to for a pipeline another owner scales"
    );
    drop((auto, hpa));
    Ok(())
}
