//! The capacity half of the control loop, closed, on a real Service data
//! plane: a CPU-limited shard cannot keep up with its streams, its sockets
//! overflow, the kernel drops reach the operator, the policy adds a replica,
//! the handover moves half the streams to the new shard, and the drops stop.
//!
//! Real parts: the apiserver, kube-proxy (nftables mode) routing each
//! source's Service, the operator with its control loop on (default flags),
//! decoding `zerodrop pod` processes on their pod IPs, each in a cgroup with
//! a CPU limit as a container's `resources.limits.cpu` would set it (a CFS
//! quota), and our test senders aimed at the ClusterIPs. The limit is set
//! from what the shard was measured to use for its four streams: 70% of it,
//! so one shard running all four falls behind and two running two each do
//! not. The quota's period is 1 s (the kubelet's `--cpu-cfs-quota-period`;
//! 100 ms by default), so that each throttled stretch, about 0.3 s, outlasts
//! what the streams' 64 KiB receive buffers hold: the kernel drops the rest.

use std::time::{Duration, Instant};

use serde_json::Value;
use zerodrop_core::shard;
use zerodrop_e2e::cluster::{ClusterOptions, TestCluster};
use zerodrop_e2e::cpulimit::CpuLimit;
use zerodrop_e2e::operator::{OperatorProcess, PodOptions, PodProcess, install_crd, kubectl_json};
use zerodrop_e2e::procstat::cpu_seconds;
use zerodrop_e2e::rescale::{Sender, SenderSettings};
use zerodrop_e2e::runner::metric_sum;

const PIPELINE: &str = "limited";
const FIRST_PORT: u16 = 6004;
/// The CFS period of the shards' CPU limit (see the file's doc).
const PERIOD: Duration = Duration::from_secs(1);

/// Two sources that stay on shard 0 and two that move to shard 1 when the
/// pipeline grows from 1 to 2 replicas.
fn sources() -> Vec<String> {
    let (mut stay, mut go) = (Vec::new(), Vec::new());
    for i in 0.. {
        let name = format!("cam-{i}");
        let list = if shard::owner(&name, 2) == 0 { &mut stay } else { &mut go };
        if list.len() < 2 {
            list.push(name);
        }
        if stay.len() == 2 && go.len() == 2 {
            break;
        }
    }
    stay.into_iter().chain(go).collect()
}

fn manifest(sources: &[String]) -> String {
    let mut s = format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: {PIPELINE}}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 2}}\n  decode: {{decoder: software}}\n  sources:\n"
    );
    for (i, name) in sources.iter().enumerate() {
        s += &format!(
            "    - {{name: {name}, codec: h264, transport: {{rtp: {{port: {}, receiveBufferBytes: 65536}}}}}}\n",
            FIRST_PORT + 2 * i as u16
        );
    }
    s
}

fn kernel_drops(pod: &PodProcess) -> f64 {
    pod.metrics().map(|m| metric_sum(&m, "zerodrop_kernel_udp_drops_total", "")).unwrap_or(f64::NAN)
}

fn events(cluster: &TestCluster) -> Vec<(String, String)> {
    let v = kubectl_json(cluster, &["get", "events", "--field-selector", &format!("involvedObject.name={PIPELINE}")]);
    v["items"]
        .as_array()
        .map(|a| a.iter().map(|e| (e["reason"].as_str().unwrap_or("").to_string(), e["message"].as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

#[test]
fn a_cpu_limited_shard_that_drops_gets_a_replica_and_its_drops_stop_once_half_its_streams_moved() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(ClusterOptions { service_proxy: true, ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let operator = OperatorProcess::start(&cluster, 27295, "operator.log", &["--status-interval-s", "1"]);
    let sources = sources();
    cluster.apply_yaml(&manifest(&sources))?;
    let opts = |ordinal| PodOptions { ordinal, bind_pod_ip: true, decode: true, follow_config: true };
    let pod0 = PodProcess::start_with(&cluster, PIPELINE, opts(0))?;
    let settings = SenderSettings { width: 640, height: 360, bitrate_kbps: 800, seconds: 60 };
    let mut senders = Vec::new();
    for (i, name) in sources.iter().enumerate() {
        senders.push(Sender::start(&cluster, PIPELINE, name, i, FIRST_PORT + 2 * i as u16, &pod0.ip, settings)?);
    }
    cluster.wait_for("the loop reading the shard healthy", Duration::from_secs(60), || {
        let sp = kubectl_json(&cluster, &["get", "sp", PIPELINE]);
        let decoding = sp["status"]["streams"].as_array().is_some_and(|s| s.len() == 4 && s.iter().all(|s| s["framesDecoded"].as_u64() > Some(30)));
        Ok((decoding && sp["status"]["policyReplicas"] == 1).then_some(()))
    })?;
    assert_eq!(kernel_drops(&pod0), 0.0, "no drops before the limit");

    // What the shard needs for its four streams, unlimited: the lowest of
    // three 2 s windows (measurement windows, not a synchronisation), so a
    // start-up burst (the decoders' first frames) cannot inflate the need
    // and leave a limit the shard keeps up with.
    let window = Duration::from_secs(2);
    let mut used = f64::INFINITY;
    for _ in 0..3 {
        let before = cpu_seconds(pod0.pid()).unwrap_or(0.0);
        std::thread::sleep(window);
        used = used.min((cpu_seconds(pod0.pid()).unwrap_or(0.0) - before) / window.as_secs_f64());
    }
    let limit = used * 0.7;
    eprintln!("shard 0 uses {:.1}% of a core for 4 streams; limiting it and its peers to {:.1}%", used * 100.0, limit * 100.0);
    assert!(used > 0.0, "the shard's CPU time was read");
    let limit0 = CpuLimit::apply(&format!("{PIPELINE}-0"), pod0.pid(), limit, PERIOD)?;

    // The kernel drops what the throttled shard cannot read; the policy adds
    // a replica within 5 s of the first drop the shard counts.
    let first_drop = cluster.wait_for("shard 0's sockets to overflow", Duration::from_secs(30), || {
        Ok((kernel_drops(&pod0) > 0.0).then(Instant::now))
    })?;
    eprintln!("throttled in {} periods before the first drop", limit0.throttled_periods());
    cluster.wait_for("the StatefulSet at 2 replicas", Duration::from_secs(20), || {
        Ok((kubectl_json(&cluster, &["get", "statefulset", &format!("{PIPELINE}-dataplane")])["spec"]["replicas"] == 2).then_some(()))
    })?;
    let reaction = first_drop.elapsed();
    eprintln!("first kernel drop → StatefulSet at 2 replicas: {:.2} s", reaction.as_secs_f64());
    assert!(reaction < Duration::from_secs(5), "replicas went up {reaction:?} after the first drop");

    // The new shard, limited the same way, as soon as it has an IP; the
    // handover moves the two streams it owns.
    let pod1 = PodProcess::start_with(&cluster, PIPELINE, opts(1))?;
    let _limit1 = CpuLimit::apply(&format!("{PIPELINE}-1"), pod1.pid(), limit, PERIOD)?;
    let sp: Value = cluster.wait_for("the handover done", Duration::from_secs(60), || {
        let sp = kubectl_json(&cluster, &["get", "sp", PIPELINE]);
        Ok((sp["status"].get("handover").is_none() && sp["status"]["replicas"] == 2).then_some(sp))
    })?;
    let decision = sp["status"]["lastDecision"].as_str().unwrap_or_default().to_string();
    assert!(decision.starts_with("scale from 1 to 2 replicas: kernel_drops"), "{decision}");
    let ev = events(&cluster);
    assert!(ev.iter().any(|(r, m)| r == "KernelDrops" && m.contains("scale from 1 to 2")), "{ev:?}");
    assert!(ev.iter().any(|(r, _)| r == "HandoverSwitched"), "{ev:?}");
    for name in &sources[2..] {
        let svc = kubectl_json(&cluster, &["get", "service", &format!("{PIPELINE}-{name}")]);
        assert_eq!(svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"], format!("{PIPELINE}-dataplane-1"), "{name} moved");
    }

    // Drops stop: over the next 10 s neither shard's count grows (the old
    // owner's backlog drains first: the window starts once its count has
    // held still for a second).
    cluster.wait_for("shard 0's drops to stop growing", Duration::from_secs(20), || {
        let a = kernel_drops(&pod0);
        std::thread::sleep(Duration::from_secs(1)); // the interval a still count must hold
        Ok((kernel_drops(&pod0) == a).then_some(()))
    })?;
    let (d0, d1) = (kernel_drops(&pod0), kernel_drops(&pod1));
    std::thread::sleep(Duration::from_secs(10)); // the observation window
    let (e0, e1) = (kernel_drops(&pod0), kernel_drops(&pod1));
    eprintln!("kernel drops over 10 s after the move: shard 0 {d0} → {e0}, shard 1 {d1} → {e1}");
    assert_eq!((e0 - d0, e1 - d1), (0.0, 0.0), "the drops stopped once the moved streams ran elsewhere");
    // And the loop does not ask for more: still 2, nothing at max.
    let sp = kubectl_json(&cluster, &["get", "sp", PIPELINE]);
    assert_eq!(sp["status"]["policyReplicas"], 2);
    assert_eq!(operator.metric("zerodrop_policy_decisions_total", &["action=\"at_max_replicas\""]), None, "no overload left to report");
    drop(senders);
    Ok(())
}
