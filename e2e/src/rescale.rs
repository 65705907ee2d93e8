//! A rescale with streams flowing, on a real Service data plane: the frames
//! each stream loses while the operator moves it to another shard. Used by
//! `e2e/tests/handover.rs` (asserts) and `bench-handover` (many trials).
//!
//! The cluster runs kube-proxy ([`ClusterOptions::service_proxy`]); each
//! shard is a `zerodrop pod` process on its pod's IP, decoding, following its
//! ConfigMap as the kubelet does ([`PodOptions::follow_config`]); each source
//! gets our test sender (`zerodrop send`, H.264, answering NACK and PLI)
//! aimed at its Service's ClusterIP, as a camera in a cluster would be. The
//! pod process of a shard that the rescale adds is started when kwok has
//! given the pod its IP: the part of the kubelet starting a container (here
//! in a fraction of a second; on a real node, seconds: pulling and starting
//! an image, which only lengthens the new owners' part of a handover).
//!
//! A stream's frames lost = frames its sender sent − frames decoded by all
//! its owners together. The books of every pod must add up on their own:
//! each pod's decoded + dropped + skipped is what reached it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cluster::TestCluster;
use crate::operator::{PodOptions, PodProcess, kubectl_json};
use crate::runner::{metric_sum, zerodrop_bin};

/// One rescale's setting.
#[derive(Debug, Clone)]
pub struct Rescale {
    pub pipeline: String,
    pub sources: usize,
    pub from: i32,
    pub to: i32,
    /// How long each sender runs (the rescale happens after `before`).
    pub send_seconds: u64,
    /// Streaming time before the rescale.
    pub before: Duration,
    pub first_port: u16,
}

/// What one stream went through.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamOutcome {
    pub name: String,
    pub old_owner: u32,
    pub new_owner: u32,
    pub moved: bool,
    pub frames_sent: u64,
    /// Frames decoded on each shard that ran it.
    pub decoded_by_shard: BTreeMap<u32, u64>,
    /// What each shard accounts for (decoded + dropped + skipped).
    pub accounted_by_shard: BTreeMap<u32, u64>,
    pub frames_lost: u64,
    pub keyframe_requests: u64,
    /// Packets the sender's socket refused to send (sendto errors).
    pub send_errors: u64,
    /// Keyframe requests (PLI) that reached the sender, and the keyframes
    /// it forced for them.
    pub plis_received: u64,
    pub keyframes_forced: u64,
}

/// The whole rescale.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RescaleOutcome {
    pub streams: Vec<StreamOutcome>,
    /// From `kubectl scale` to the handover's switch (status.handover
    /// phase Switched first seen), seconds.
    pub to_switch_s: Option<f64>,
    /// From `kubectl scale` until status.handover is gone, seconds.
    pub to_done_s: Option<f64>,
    /// The handover's Events on the pipeline, by reason.
    pub events: Vec<String>,
    /// Services that selected a new owner before it listed the stream
    /// bound (`/readyz/streams`), as seen polling both: make-before-break
    /// broken if any.
    pub switched_before_bound: Vec<String>,
}

impl RescaleOutcome {
    pub fn moved(&self) -> impl Iterator<Item = &StreamOutcome> {
        self.streams.iter().filter(|s| s.moved)
    }

    pub fn stayed(&self) -> impl Iterator<Item = &StreamOutcome> {
        self.streams.iter().filter(|s| !s.moved)
    }
}

/// The pipeline: `sources` H.264 sources on RTP, each with RTCP on the next
/// port, decoded in software, `from` replicas set by hand
/// (`spec.scaling.replicas`, as `kubectl scale` writes it).
pub fn manifest(r: &Rescale) -> String {
    let mut s = format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: {}}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: 4, replicas: {}}}\n  decode: {{decoder: software}}\n  \
         repair: {{latencyMs: 200}}\n  sources:\n",
        r.pipeline, r.from
    );
    for i in 0..r.sources {
        s += &format!("    - {{name: cam-{i}, codec: h264, transport: {{rtp: {{port: {}}}}}}}\n", r.first_port + 2 * i as u16);
    }
    s
}

/// The senders' address: in the pod range the cluster's service proxy
/// routes to this host (`ClusterOptions::service_proxy`), far above the
/// addresses kwok hands out from its start.
pub const SENDER_IP: &str = "10.244.255.1";
/// Sender `i` binds RTCP here + 2i (odd) and RTP on the port below.
const SENDER_FIRST_RTCP_PORT: u16 = 40001;

/// A running `zerodrop send` for one source, aimed at its Service.
pub struct Sender {
    child: Child,
    summary: PathBuf,
}

/// What a [`Sender`] sends.
#[derive(Debug, Clone, Copy)]
pub struct SenderSettings {
    pub width: u32,
    pub height: u32,
    pub bitrate_kbps: u32,
    pub seconds: u64,
}

impl Sender {
    /// Starts the sender of `source` of `pipeline` (the `index`-th: its
    /// address's port) once kube-proxy routes its Service's RTP `port` to
    /// `pod_ip` (before that, its first keyframe would be rejected on the
    /// way). H.264, 30 fps, a keyframe every 60 frames.
    pub fn start(cluster: &TestCluster, pipeline: &str, source: &str, index: usize, port: u16, pod_ip: &str, s: SenderSettings) -> anyhow::Result<Sender> {
        let service = format!("{pipeline}-{source}");
        let ip = cluster.wait_for(&format!("{service}'s ClusterIP"), Duration::from_secs(30), || {
            let out = cluster.kubectl(["get", "service", &service, "-o", "jsonpath={.spec.clusterIP}"]);
            Ok((out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })?;
        // kube-proxy's endpoint chain for the Service's RTP port on that pod.
        let chain = format!("/{service}/udp/rtp__{pod_ip}/{port}");
        cluster.wait_for(&format!("kube-proxy to route {service} to {pod_ip}"), Duration::from_secs(30), || {
            Ok(cluster.service_proxy_rules()?.contains(&chain).then_some(()))
        })?;
        // The sender sits at an address of the pod range, as a sender pod (or
        // an external camera through a Local-policy Service) would: kube-proxy
        // masquerades traffic to a ClusterIP from outside the cluster's range
        // with a random source port, so a new owner could not answer a sender
        // on this host's own address before its next sender report.
        let rtcp_bind = format!("{SENDER_IP}:{}", SENDER_FIRST_RTCP_PORT + 2 * index as u16);
        let summary = cluster.dir().join(format!("{service}.send.json"));
        let log = std::fs::File::create(cluster.dir().join(format!("{service}.send.log")))?;
        let child = Command::new(zerodrop_bin())
            .args(["send", "--dest", &format!("{ip}:{port}"), "--fps", "30", "--key-int", "60", "--quiet"])
            .args(["--width", &s.width.to_string(), "--height", &s.height.to_string()])
            .args(["--bitrate", &s.bitrate_kbps.to_string(), "--duration", &s.seconds.to_string()])
            .args(["--cname", source, "--rtcp-bind", &rtcp_bind, "--summary-json"])
            .arg(&summary)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("zerodrop send starts")?;
        Ok(Sender { child, summary })
    }

    /// Waits for the sender to end and returns its summary (`--summary-json`).
    pub fn finish(mut self) -> anyhow::Result<serde_json::Value> {
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "a sender failed: {status}");
        Ok(serde_json::from_str(&std::fs::read_to_string(&self.summary)?)?)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn selected_pod(cluster: &TestCluster, service: &str) -> Option<String> {
    let svc = kubectl_json(cluster, &["get", "service", service]);
    svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"].as_str().map(String::from)
}

fn listed_bound(pod: &PodProcess, pipeline: &str, stream: &str) -> bool {
    let Ok(addr) = format!("{}:9464", pod.ip).parse() else { return false };
    zerodrop_telemetry::get(addr, "/readyz/streams").is_ok_and(|r| r.body.lines().any(|l| l == format!("{pipeline}/{stream}")))
}

/// Runs one rescale on `cluster`, whose operator is already running.
pub fn run(cluster: &TestCluster, r: &Rescale) -> anyhow::Result<RescaleOutcome> {
    let sts = format!("{}-dataplane", r.pipeline);
    cluster.apply_yaml(&manifest(r))?;
    let opts = |ordinal| PodOptions { ordinal, bind_pod_ip: true, decode: true, follow_config: true };
    let mut pods: BTreeMap<u32, PodProcess> = BTreeMap::new();
    for o in 0..r.from as u32 {
        pods.insert(o, PodProcess::start_with(cluster, &r.pipeline, opts(o))?);
    }
    let names: Vec<String> = (0..r.sources).map(|i| format!("cam-{i}")).collect();
    // The pipeline's sources are ungrouped (no renditionOf): each is sharded
    // by its own name, as the operator and the pods shard it.
    let key = |n: &str| zerodrop_core::shard::key(n, None).to_string();
    let mut senders = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let owner = &pods[&zerodrop_core::shard::owner(&key(n), r.from)];
        let settings = SenderSettings { width: 320, height: 180, bitrate_kbps: 400, seconds: r.send_seconds };
        senders.push(Sender::start(cluster, &r.pipeline, n, i, r.first_port + 2 * i as u16, &owner.ip, settings)?);
    }
    // Every stream decodes on its owner before the rescale.
    cluster.wait_for("every stream decoding on its first owner", Duration::from_secs(30), || {
        let decoding = names.iter().all(|n| {
            let owner = zerodrop_core::shard::owner(&key(n), r.from);
            pods.get(&owner).and_then(|p| p.metrics().ok()).is_some_and(|m| {
                metric_sum(&m, "zerodrop_frames_decoded_total", &format!("stream=\"{n}\"")) > 0.0
            })
        });
        Ok(decoding.then_some(()))
    })?;
    std::thread::sleep(r.before.saturating_sub(Duration::from_secs(1))); // streaming time before the rescale, not a synchronisation

    let started = Instant::now();
    cluster.kubectl_ok(["scale", &format!("sp/{}", r.pipeline), &format!("--replicas={}", r.to)])?;
    let mut to_switch_s = None;
    let mut switched_before_bound = Vec::new();
    let mut seen_handover = false;
    let deadline = started + Duration::from_secs(60);
    // Until the handover ends: start added shards as kwok gives them IPs;
    // check each moving stream's Service never selects a new owner that
    // does not list the stream bound.
    let to_done_s = loop {
        if Instant::now() > deadline {
            bail!("the handover did not end within 60 s:\n{}", cluster.kubectl_ok(["get", "sp", &r.pipeline, "-o", "yaml"])?);
        }
        for o in r.from.max(0) as u32..r.to.max(r.from) as u32 {
            if !pods.contains_key(&o) {
                let pod = format!("{sts}-{o}");
                let has_ip = cluster.kubectl(["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]).stdout.len() > 0;
                if has_ip {
                    pods.insert(o, PodProcess::start_with(cluster, &r.pipeline, opts(o))?);
                }
            }
        }
        for n in &names {
            if !zerodrop_core::shard::moves(&key(n), r.from, r.to) || switched_before_bound.contains(n) {
                continue;
            }
            let new_owner = zerodrop_core::shard::owner(&key(n), r.to);
            if selected_pod(cluster, &format!("{}-{n}", r.pipeline)) == Some(format!("{sts}-{new_owner}"))
                && !pods.get(&new_owner).is_some_and(|p| listed_bound(p, &r.pipeline, n))
            {
                switched_before_bound.push(n.clone());
            }
        }
        let sp = kubectl_json(cluster, &["get", "sp", &r.pipeline]);
        match sp["status"].get("handover") {
            Some(h) => {
                seen_handover = true;
                if to_switch_s.is_none() && h["phase"] == "Switched" {
                    to_switch_s = Some(started.elapsed().as_secs_f64());
                }
            }
            None if seen_handover || sp["status"]["replicas"] == r.to => break Some(started.elapsed().as_secs_f64()),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    };

    // The senders end by themselves; then every pod's books.
    let mut sent: Vec<serde_json::Value> = Vec::new();
    for s in senders {
        sent.push(s.finish()?);
    }
    // Until each pod's figures stop changing (the last frames decoded).
    let mut last = String::new();
    let texts = cluster.wait_for("the pods' figures to settle", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(500)); // poll interval
        let texts: BTreeMap<u32, String> = pods.iter().filter_map(|(o, p)| Some((*o, p.metrics().ok()?))).collect();
        let key: String = texts
            .iter()
            .map(|(o, t)| format!("{o}:{}", metric_sum(t, "zerodrop_frames_decoded_total", "")))
            .collect();
        let settled = key == last;
        last = key;
        Ok(settled.then_some(texts))
    })?;
    let mut streams = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let needle = format!("stream=\"{n}\"");
        let mut decoded_by_shard = BTreeMap::new();
        let mut accounted_by_shard = BTreeMap::new();
        let mut keyframe_requests = 0;
        for (o, t) in &texts {
            let decoded = metric_sum(t, "zerodrop_frames_decoded_total", &needle) as u64;
            let accounted = crate::runner::frames_accounted(t, n);
            if accounted > 0 {
                decoded_by_shard.insert(*o, decoded);
                accounted_by_shard.insert(*o, accounted);
            }
            keyframe_requests += metric_sum(t, "zerodrop_keyframe_requests_total", &needle) as u64;
        }
        let decoded: u64 = decoded_by_shard.values().sum();
        let frames_sent = sent[i]["frames_sent"].as_u64().context("frames_sent in the sender's summary")?;
        streams.push(StreamOutcome {
            name: n.clone(),
            old_owner: zerodrop_core::shard::owner(&key(n), r.from),
            new_owner: zerodrop_core::shard::owner(&key(n), r.to),
            moved: zerodrop_core::shard::moves(&key(n), r.from, r.to),
            frames_sent,
            decoded_by_shard,
            accounted_by_shard,
            frames_lost: frames_sent.saturating_sub(decoded),
            keyframe_requests,
            send_errors: sent[i]["send_errors"].as_u64().unwrap_or(0),
            plis_received: sent[i]["plis_received"].as_u64().unwrap_or(0),
            keyframes_forced: sent[i]["keyframes_forced"].as_u64().unwrap_or(0),
        });
    }
    let events = kubectl_json(cluster, &["get", "events", "--field-selector", &format!("involvedObject.name={}", r.pipeline)]);
    let events = events["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| Some(format!("{}: {}", e["reason"].as_str()?, e["message"].as_str().unwrap_or("")))).collect())
        .unwrap_or_default();
    drop(pods);
    cluster.kubectl_ok(["delete", "sp", &r.pipeline, "--wait=true"])?;
    Ok(RescaleOutcome { streams, to_switch_s, to_done_s, events, switched_before_bound })
}
