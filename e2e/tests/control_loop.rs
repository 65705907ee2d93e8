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
    // Each decision used a reading from its own round: well under the 1 s interval old.
    let ages = operator.metric("zerodrop_operator_signal_age_seconds_count", &[]).unwrap_or(0.0);
    let age_sum = operator.metric("zerodrop_operator_signal_age_seconds_sum", &[]).unwrap_or(f64::NAN);
    assert!(ages >= 2.0 && age_sum / ages < 1.0, "signal age: {age_sum} s over {ages} decisions");

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

/// The node agent (`zerodrop-agent`, eBPF) counts the kernel's drops by the
/// packet's destination address and port and the kernel's reason; the
/// operator joins them to the stream whose pod has that IP and whose sockets
/// have that port, and shows them by reason in status, beside the pod's own
/// per-socket count of the same drops.
#[test]
fn the_node_agents_drops_join_the_stream_by_pod_ip_and_port_with_the_kernels_reason() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true forbids skipping: the node agent needs root for eBPF");
        eprintln!("SKIPPED: the node agent needs root for eBPF");
        return Ok(());
    }
    let agent_bin = zerodrop_e2e::runner::zerodrop_bin().with_file_name("zerodrop-agent");
    anyhow::ensure!(agent_bin.is_file(), "{} is missing: cargo build --workspace", agent_bin.display());
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let agent_addr = "127.0.0.1:27195";
    let agent_log = std::fs::File::create(cluster.dir().join("agent.log"))?;
    let mut agent = std::process::Command::new(&agent_bin)
        .args(["--mode", "ebpf", "--listen", agent_addr])
        .stdout(agent_log.try_clone()?)
        .stderr(agent_log)
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        cluster.wait_for("the agent counting with eBPF", Duration::from_secs(30), || {
            Ok(zerodrop_telemetry::get(agent_addr.parse()?, "/healthz").is_ok_and(|r| r.body.contains("ok (ebpf)")).then_some(()))
        })?;
        let operator = OperatorProcess::start(&cluster, 27196, "operator.log", &["--agent-endpoints", agent_addr, "--status-interval-s", "1"]);
        // Bound to every address (the default), as in a pod: packets come to the pod's IP.
        cluster.apply_yaml(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: joined}\nspec:\n  \
             scaling: {minReplicas: 1, maxReplicas: 2, replicas: 1}\n  decode: {decoder: software}\n  sources:\n    \
             - {name: cam-0, codec: h264, transport: {rtp: {port: 28030, receiveBufferBytes: 65536}}}\n",
        )?;
        let pod = PodProcess::start(&cluster, "joined")?;
        let ip = cluster.kubectl_ok(["get", "pod", "joined-dataplane-0", "-o", "jsonpath={.status.podIP}"])?;
        cluster.wait_for("the pipeline read and healthy", Duration::from_secs(60), || {
            let sp = json(&cluster, &["get", "sp", "joined"]);
            Ok((degraded(&sp) == Some(("False".into(), "AsExpected".into()))).then_some(()))
        })?;
        pod.stall_and_flood_to(format!("{}:28030", ip.trim()).parse()?);
        let stream = cluster.wait_for("drops by reason in status", Duration::from_secs(20), || {
            let sp = json(&cluster, &["get", "sp", "joined"]);
            let s = sp["status"]["streams"][0].clone();
            Ok((s["kernelDropsByReason"]["SOCKET_RCVBUFF"].as_u64().unwrap_or(0) > 0 && s["kernelDrops"].as_u64().unwrap_or(0) > 0).then_some(s))
        })?;
        let by_agent = stream["kernelDropsByReason"]["SOCKET_RCVBUFF"].as_u64().unwrap();
        let by_pod = stream["kernelDrops"].as_u64().unwrap();
        eprintln!("drops: agent {by_agent} (SOCKET_RCVBUFF), pod {by_pod}: {stream}");
        assert_eq!(by_agent, by_pod, "the same drops, counted by the kernel's tracepoint and by the socket");
        assert!(stream["kernelDropsByReason"].as_object().unwrap().keys().all(|r| r == "SOCKET_RCVBUFF"), "{stream}");
        // The policy saw them: a replica change it may not make (replicas are fixed), reported.
        cluster.wait_for("a would-scale Event", Duration::from_secs(20), || {
            Ok(events(&cluster, "joined").into_iter().find(|(r, m)| r == "KernelDrops" && m.contains("would scale from 1 to 2")))
        })?;
        drop((pod, operator));
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

/// Path loss in the cluster: the pod that receives a stream runs the bitrate
/// half of the policy (its RTCP session is there). Loss beyond repair steps
/// the stream down its ladder by TMMBR to our sender; the operator reads the
/// rendition from the pod and shows it in status; when the loss is over and
/// `upgradeAfterSeconds` of health have passed, the stream steps back up and
/// status follows.
#[test]
fn path_loss_steps_the_stream_down_in_its_pod_and_status_shows_the_rendition_until_it_recovers() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let _operator = OperatorProcess::start(&cluster, 27197, "operator.log", &["--status-interval-s", "1"]);
    let port = 28040;
    cluster.apply_yaml(&format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: ladder}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 2, replicas: 1}}\n  decode: {{decoder: software}}\n  \
         bitratePolicy:\n    downgradeLossPercent: 0.5\n    downgradeWindowSeconds: 2\n    upgradeAfterSeconds: 4\n    \
         renditions:\n      - {{name: high, bitrateKbps: 1500}}\n      - {{name: low, bitrateKbps: 300}}\n  sources:\n    \
         - {{name: cam, codec: h264, rtxPayloadType: 97, transport: {{rtp: {{listenAddress: 127.0.0.1, port: {port}}}}}}}\n"
    ))?;
    let pod = PodProcess::start(&cluster, "ladder")?;
    // One packet in four lost for the first 1000 packets (about 6 s at
    // 1.5 Mbit/s), then none.
    let trace = cluster.dir().join("loss.txt");
    std::fs::write(&trace, (0..1000).map(|i| if i % 4 == 1 { '1' } else { '0' }).collect::<String>())?;
    let summary = cluster.dir().join("sent.json");
    let mut sender = std::process::Command::new(zerodrop_e2e::runner::zerodrop_bin())
        .args(["send", "--dest", &format!("127.0.0.1:{port}"), "--width", "320", "--height", "240", "--pattern", "snow"])
        .args(["--bitrate", "1500", "--frames", "900", "--rtx-pt", "97", "--quiet"])
        .arg("--loss")
        .arg(format!("trace:{},end=stop", trace.display()))
        .arg("--summary-json")
        .arg(&summary)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let rendition = |cluster: &TestCluster| json(cluster, &["get", "sp", "ladder"])["status"]["streams"][0]["rendition"].as_str().map(str::to_string);
    let result = (|| -> anyhow::Result<()> {
        cluster.wait_for("status: rendition low", Duration::from_secs(30), || Ok((rendition(&cluster).as_deref() == Some("low")).then_some(())))?;
        cluster.wait_for("status: rendition high again", Duration::from_secs(40), || Ok((rendition(&cluster).as_deref() == Some("high")).then_some(())))?;
        Ok(())
    })();
    let sent_ok = sender.wait()?.success();
    drop(pod);
    result?;
    assert!(sent_ok, "the sender exits 0");
    let sent: Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
    assert_eq!(sent["tmmbrs_received"].as_u64(), Some(2), "one TMMBR down, one up: {sent}");
    Ok(())
}

/// Loss that comes and goes faster than the policy's windows: spells of 25%
/// loss (beyond repair: above the 10% ceiling of loss before repair) for 3 s,
/// with 2 s clean between them, for about 20 s, switched on and off in time
/// at a seeded relay between our sender and the pod. With a 2 s downgrade
/// window and 5 s of health asked before a step up, the stream steps down
/// (at most once per window, at most to the ladder's end), never steps up
/// while the spells keep coming back, and climbs back one step at a time
/// once they stop. The times are the sender's: it changes its encoder's bit
/// rate on each TMMBR, and the test reads the rate every 20 ms.
#[test]
fn loss_coming_and_going_steps_down_at_most_once_a_window_and_up_only_after_it_stops() -> anyhow::Result<()> {
    use zerodrop_testbench::loss::LossSpec;
    use zerodrop_testbench::relay::{Relay, RelayConfig};
    use zerodrop_testbench::sender::{SendArgs, Sender};
    use clap::Parser as _;

    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let _operator = OperatorProcess::start(&cluster, 27199, "operator.log", &["--status-interval-s", "1"]);
    let port = 28060;
    let (window, upgrade_after) = (Duration::from_secs(2), Duration::from_secs(5));
    cluster.apply_yaml(&format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: flaky}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 2, replicas: 1}}\n  decode: {{decoder: software}}\n  \
         bitratePolicy:\n    downgradeLossPercent: 0.5\n    downgradeWindowSeconds: {}\n    upgradeAfterSeconds: {}\n    \
         renditions:\n      - {{name: high, bitrateKbps: 1500}}\n      - {{name: mid, bitrateKbps: 700}}\n      \
         - {{name: low, bitrateKbps: 300}}\n  sources:\n    \
         - {{name: cam, codec: h264, rtxPayloadType: 97, transport: {{rtp: {{listenAddress: 127.0.0.1, port: {port}}}}}}}\n",
        window.as_secs(),
        upgrade_after.as_secs(),
    ))?;
    let pod = PodProcess::start(&cluster, "flaky")?;
    let relay = Relay::start(RelayConfig {
        loss: LossSpec::parse("uniform:0.25")?,
        seed: 7,
        rtx_payload_type: Some(97),
        ..RelayConfig::new("127.0.0.1:0".parse()?, format!("127.0.0.1:{port}").parse()?)
    })?;
    relay.pause_loss(true);
    let addrs = relay.addrs();
    let sender = Sender::start(SendArgs::try_parse_from([
        "send", "--dest", &addrs.rtp.to_string(), "--rtcp-dest", &addrs.rtcp.to_string(),
        "--width", "320", "--height", "240", "--pattern", "snow", "--bitrate", "1500",
        "--frames", "3000", "--rtx-pt", "97", "--quiet",
    ])?)?;

    // The encoder's bit rate, read every 20 ms, with the time it changed.
    let started = Instant::now();
    let mut changes: Vec<(Duration, u64)> = Vec::new();
    let mut last = sender.stats().bitrate_kbps;
    let watch = |last: &mut u64, changes: &mut Vec<(Duration, u64)>, until: Instant| {
        while Instant::now() < until {
            let now = sender.stats().bitrate_kbps;
            if now != *last {
                changes.push((started.elapsed(), now));
                *last = now;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    };
    let result = (|| -> anyhow::Result<()> {
        // Healthy first: the pod reports on the stream (its receiver reports
        // reach the sender) and status shows it at the top rendition.
        let mut seen = Value::Null;
        cluster
            .wait_for("flaky received at rendition high", Duration::from_secs(60), || {
                seen = json(&cluster, &["get", "sp", "flaky"])["status"].clone();
                let s = &seen["streams"][0];
                Ok((s["rendition"] == "high" && relay.stats().rtcp_up > 0).then_some(()))
            })
            .map_err(|e| e.context(format!("status: {seen}")))?;
        let healthy_at = started.elapsed();
        // Four spells of loss, 3 s on and 2 s off.
        for spell in 0..4 {
            relay.pause_loss(false);
            watch(&mut last, &mut changes, Instant::now() + Duration::from_secs(3));
            relay.pause_loss(true);
            if spell < 3 {
                watch(&mut last, &mut changes, Instant::now() + Duration::from_secs(2));
            }
        }
        let loss_ended = started.elapsed();
        let during: Vec<_> = changes.clone();
        eprintln!("healthy at {healthy_at:?}, loss ended at {loss_ended:?}; bit rate changes while it came and went: {during:?}");
        anyhow::ensure!(!during.is_empty(), "25% loss for 3 s at a time never stepped the stream down");
        let mut rate = 1500;
        for &(at, kbps) in &during {
            anyhow::ensure!(kbps < rate, "stepped up at {at:?} to {kbps} kbit/s while the loss kept coming back: {changes:?}");
            rate = kbps;
        }
        anyhow::ensure!(during.len() <= 2, "more steps down than the ladder has: {changes:?}");
        // Then clean: back up, one step at a time, to the top rendition.
        cluster.wait_for("flaky back at rendition high", Duration::from_secs(40), || {
            watch(&mut last, &mut changes, Instant::now() + Duration::from_millis(200));
            let sp = json(&cluster, &["get", "sp", "flaky"]);
            Ok((sp["status"]["streams"][0]["rendition"] == "high" && changes.len() >= 2 * during.len()).then_some(()))
        })?;
        eprintln!("all changes: {changes:?}");
        for w in changes.windows(2) {
            // The policy decides on whole seconds of samples; a TMMBR reaches
            // the sender within milliseconds.
            anyhow::ensure!(
                w[1].0 - w[0].0 >= window - Duration::from_millis(200),
                "two changes {:?} apart, within one {window:?} window: {changes:?}",
                w[1].0 - w[0].0
            );
        }
        let after: Vec<_> = changes[during.len()..].to_vec();
        anyhow::ensure!(
            after.len() == during.len() && after.windows(2).all(|w| w[1].1 > w[0].1) && after[0].1 > rate,
            "once the loss stopped, one step up per step down: {changes:?}"
        );
        anyhow::ensure!(
            after[0].0 - loss_ended >= upgrade_after - Duration::from_millis(1200),
            "the first step up came {:?} after the loss ended, before {upgrade_after:?} of health: {changes:?}",
            after[0].0 - loss_ended
        );
        Ok(())
    })();
    sender.request_stop();
    let summary = sender.stop()?;
    let relayed = relay.stop()?;
    drop(pod);
    eprintln!("relay: {relayed:?}; sender: {:?}", summary.stats);
    result?;
    assert_eq!(summary.stats.tmmbrs_received as usize, changes.len(), "one TMMBR per change: {changes:?}");
    assert!(relayed.dropped > 0, "the relay dropped nothing");
    Ok(())
}

/// The optional signal source: the operator reads the pods' figures from a
/// real Prometheus (Debian's) that scrapes them, labelled as the chart's
/// PodMonitor labels them, instead of scraping the pods itself. Status gets
/// the figures, and a shard's kernel drops still scale the pipeline.
#[test]
fn with_prometheus_as_the_signal_source_the_loop_reads_the_pods_through_it_and_scales() -> anyhow::Result<()> {
    let Some(prometheus_bin) = zerodrop_e2e::prometheus::require_tool("prometheus") else { return Ok(()) };
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    // Prometheus finds the pod through a file, written once kwok gives the pod its IP
    // (as a PodMonitor would find it, with the same namespace and pod labels).
    let targets = cluster.dir().join("targets.json");
    std::fs::write(&targets, "[]")?;
    let prometheus = zerodrop_e2e::prometheus::Prometheus::start(
        &prometheus_bin,
        &format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 900ms}}\nscrape_configs:\n  - job_name: dataplane\n    \
             file_sd_configs:\n      - files: ['{}']\n",
            targets.display()
        ),
    )?;
    let url = format!("http://{}", prometheus.addr);
    let operator = OperatorProcess::start(
        &cluster,
        27198,
        "operator.log",
        &["--signal-source", "prometheus", "--prometheus-url", &url, "--signal-max-age-s", "5", "--status-interval-s", "1"],
    );
    cluster.apply_yaml(&pipeline("viaprom", 28050, None))?;
    let pod = PodProcess::start(&cluster, "viaprom")?;
    let ip = cluster.kubectl_ok(["get", "pod", "viaprom-dataplane-0", "-o", "jsonpath={.status.podIP}"])?;
    let tmp = cluster.dir().join("targets.json.new");
    std::fs::write(
        &tmp,
        format!(r#"[{{"targets": ["{}:9464"], "labels": {{"namespace": "default", "pod": "viaprom-dataplane-0"}}}}]"#, ip.trim()),
    )?;
    std::fs::rename(&tmp, &targets)?;
    cluster.wait_for("figures through Prometheus, healthy", Duration::from_secs(60), || {
        let sp = json(&cluster, &["get", "sp", "viaprom"]);
        let healthy = degraded(&sp) == Some(("False".into(), "AsExpected".into())) && sp["status"]["streams"][0]["framesDecoded"].is_u64();
        Ok(healthy.then_some(()))
    })?;
    assert_eq!(operator.metric("zerodrop_operator_scrape_targets", &[]), Some(1.0), "one query a round, no pod scraped");
    // Status defaults the figures to 0 before any reading: wait until
    // Prometheus holds the pod's series, then for two rounds of the loop, so
    // that the drops below are a change between two readings.
    cluster.wait_for("the pod's series in Prometheus", Duration::from_secs(30), || {
        Ok((!prometheus.query("zerodrop_rtp_packets_lost_total{pod=\"viaprom-dataplane-0\"}", None)?.is_empty()).then_some(()))
    })?;
    let rounds = |op: &OperatorProcess| op.metric("zerodrop_operator_control_round_seconds_count", &[]).unwrap_or(0.0);
    let r0 = rounds(&operator);
    cluster.wait_for("two control rounds", Duration::from_secs(10), || Ok((rounds(&operator) >= r0 + 2.0).then_some(())))?;
    pod.stall_and_flood(28050);
    cluster.wait_for("viaprom's StatefulSet at 2 replicas", Duration::from_secs(30), || {
        let sts = json(&cluster, &["get", "statefulset", "viaprom-dataplane"]);
        Ok((sts["spec"]["replicas"] == 2).then_some(()))
    })?;
    let sp = json(&cluster, &["get", "sp", "viaprom"]);
    let decision = sp["status"]["lastDecision"].as_str().unwrap_or_default();
    assert!(decision.starts_with("scale from 1 to 2 replicas: kernel_drops"), "{decision}");
    drop((pod, operator, prometheus));
    Ok(())
}

/// A pulled source's connection in status: a `zerodrop pod` pulling from
/// gst-rtsp-server shows `ingest.connected` with the time of its last frame;
/// when the server dies, `connected` goes false with the reason and a
/// reconnect counted.
#[test]
fn an_rtsp_sources_connection_and_its_failures_show_in_status() -> anyhow::Result<()> {
    use zerodrop_testbench::rtsp_server::{RtspServer, RtspServerArgs};
    let cluster = TestCluster::start_with(ClusterOptions { pod_cidr: "127.1.0.1/16".into(), ..ClusterOptions::default() })?;
    install_crd(&cluster)?;
    let _operator = OperatorProcess::start(&cluster, 27201, "operator.log", &["--status-interval-s", "1"]);
    let mut server = RtspServer::start(&RtspServerArgs::new(zerodrop_e2e::bench::free_tcp_port()?, "h264", 3000))?;
    cluster.apply_yaml(&format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: lobby}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 1}}\n  decode: {{decoder: software}}\n  sources:\n    \
         - {{name: door, codec: h264, transport: {{rtsp: {{url: \"{}\", timeoutSeconds: 30}}}}}}\n",
        server.url()
    ))?;
    let _pod = PodProcess::start(&cluster, "lobby")?;
    let ingest = |sp: &Value| sp["status"]["streams"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "door")).map(|s| s["ingest"].clone());
    let up = cluster.wait_for("status: door connected, with its last frame's time", Duration::from_secs(60), || {
        let i = ingest(&json(&cluster, &["get", "sp", "lobby"]));
        Ok(i.filter(|i| i["connected"] == true && i["lastFrameTime"].is_string()))
    })?;
    assert!(up["lastFrameTime"].as_str().is_some_and(|t| t.ends_with('Z')), "RFC 3339 UTC: {up}");
    server.kill();
    let down = cluster.wait_for("status: door disconnected, with why", Duration::from_secs(30), || {
        let i = ingest(&json(&cluster, &["get", "sp", "lobby"]));
        Ok(i.filter(|i| i["connected"] == false && i["lastError"].is_string() && i["reconnects"].as_u64() >= Some(1)))
    })?;
    assert!(["ended", "network", "refused"].contains(&down["lastError"].as_str().unwrap_or("")), "{down}");
    Ok(())
}
