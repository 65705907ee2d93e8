//! `zerodrop pod`: the data plane inside a StatefulSet pod. It reads the
//! pipeline the operator rendered into a mounted ConfigMap, takes the streams
//! that rendezvous hashing gives its ordinal, and follows changes to that file
//! without restarting: sources whose settings did not change keep running.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{self, SourceConfig};
use crate::metrics::{Metrics, Readiness};
use crate::supervisor::{Supervisor, SupervisorOptions};

/// How often the mounted config is checked. The kubelet itself refreshes
/// ConfigMap volumes on its sync period (about a minute), so this only
/// bounds the extra delay.
const CONFIG_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct PodArgs {
    /// The rendered pipeline (one StreamPipeline document; `spec.scaling.replicas`
    /// says how many shards there are).
    #[arg(long, env = "ZERODROP_CONFIG", default_value = "/etc/zerodrop/pipeline.yaml")]
    pub config: PathBuf,
    /// This pod's name; its StatefulSet ordinal is the shard.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,
    #[arg(long, env = "ZERODROP_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,
    /// Receive and repair only; no decoding.
    #[arg(long)]
    pub no_decode: bool,
    /// Receive threads, each serving many sources (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Where kernel UDP drops per stream come from (pods are unprivileged).
    #[arg(long, value_enum, default_value = "procfs")]
    pub kernel_drops: crate::kernel_drops::KernelDropMode,
    /// Bind pushed sources' sockets to this address instead of all
    /// interfaces (as rendered): for pods that share one host's network,
    /// such as the e2e harness's pod processes, each on its pod IP.
    #[arg(long)]
    pub listen_address: Option<std::net::IpAddr>,
}

/// Every pushed socket of `sources` bound to `ip` instead of the rendered
/// address.
fn bind_to(sources: &mut [SourceConfig], ip: std::net::IpAddr) {
    for s in sources {
        s.rtp_bind.set_ip(ip);
        if let Some(rtcp) = s.rtcp_bind.as_mut() {
            rtcp.set_ip(ip);
        }
        if let Some(fec) = s.fec.as_mut() {
            fec.binds.iter_mut().for_each(|b| b.set_ip(ip));
        }
    }
}

/// The shard count of a pipeline as the operator rendered it: it writes the
/// count it runs into `spec.scaling.replicas` of the mounted copy, so both
/// sides split the streams over the same number of shards.
fn rendered_replicas(p: &zerodrop_crds::StreamPipeline) -> i32 {
    let s = &p.spec.scaling;
    zerodrop_core::scaling::replicas(s.replicas, None, s.min_replicas, s.max_replicas)
}

/// The replica count a replica change still in progress started from, as
/// the operator annotates the rendered pipeline (a handover): the shard then
/// also runs the streams it owned under that count, so that a moving stream
/// is received by its new owner before its old owner lets it go.
fn handover_from(p: &zerodrop_crds::StreamPipeline) -> Option<i32> {
    let value = p.metadata.annotations.as_ref()?.get(zerodrop_crds::shard::HANDOVER_FROM_ANNOTATION)?;
    match value.parse() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::warn!(annotation = zerodrop_crds::shard::HANDOVER_FROM_ANNOTATION, %value, "not a replica count; ignored");
            None
        }
    }
}

/// Whether shard `ordinal` runs the sources sharded by `key` (a source's
/// `shard_key`: its rendition group's main source, else its name) of the
/// rendered pipeline `p`.
fn runs(p: &zerodrop_crds::StreamPipeline, key: &str, ordinal: u32) -> bool {
    zerodrop_crds::shard::runs(key, ordinal, rendered_replicas(p), handover_from(p))
}

/// The pipelines of `text` cut down to the sources shard `ordinal` runs: what
/// the pod's bitrate policy steps.
pub fn owned_pipelines(text: &str, ordinal: u32) -> anyhow::Result<Vec<zerodrop_crds::StreamPipeline>> {
    let mut pipelines = zerodrop_crds::parse_manifests(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in &mut pipelines {
        let keep: Vec<bool> = p.spec.sources.iter().map(|s| runs(p, s.shard_key(), ordinal)).collect();
        let mut keep = keep.into_iter();
        p.spec.sources.retain(|_| keep.next().unwrap_or(false));
    }
    Ok(pipelines)
}

/// The sources of `text` that shard `ordinal` runs: those it owns, and during
/// a handover those it owned before the replica change.
pub fn owned_sources(text: &str, ordinal: u32) -> anyhow::Result<Vec<SourceConfig>> {
    let pipelines = zerodrop_crds::parse_manifests(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = Vec::new();
    for p in &pipelines {
        out.extend(config::sources(p)?.into_iter().filter(|s| runs(p, s.shard_key(), ordinal)));
    }
    Ok(out)
}

pub fn run(args: PodArgs) -> anyhow::Result<()> {
    let ordinal = zerodrop_crds::shard::ordinal_from_pod_name(&args.pod_name).with_context(|| {
        format!("--pod-name {:?}: expected a StatefulSet pod name ending in -<ordinal>", args.pod_name)
    })?;
    let stop = crate::shutdown::on_signal()?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    let published = Arc::new(crate::output::Published::default());
    let bound = crate::metrics::serve(&args.metrics_addr, metrics.clone(), readiness.clone(), published.clone())?;
    tracing::info!(pod = %args.pod_name, shard = ordinal, config = %args.config.display(), metrics = %bound, "data plane pod starting");

    let mut supervisor = Supervisor::new(metrics, readiness, SupervisorOptions { au_log_dir: None, no_decode: args.no_decode, workers: args.workers, published: Some(published) });
    // A pod sees its own sockets in its network namespace's /proc/net/udp;
    // the node agent counts with eBPF and by reason.
    let mut kernel_drops = crate::kernel_drops::KernelDrops::start(args.kernel_drops);
    let mut applied: Option<String> = None;
    // The bitrate half of the control policy, for the streams this shard
    // owns: the pod holds their RTCP sessions, so it steps them (TMMBR) and
    // exports the rendition; the operator reads it into status. Rebuilt (and
    // its memory reset) when the config changes.
    let mut path_policy: Option<crate::path_policy::PathPolicy> = None;
    let mut next_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_check {
            next_check = Instant::now() + CONFIG_POLL;
            match std::fs::read_to_string(&args.config) {
                Ok(text) if applied.as_deref() != Some(text.as_str()) => match owned_sources(&text, ordinal) {
                    Ok(mut sources) => {
                        if let Some(ip) = args.listen_address {
                            bind_to(&mut sources, ip);
                        }
                        let (change, ended) = supervisor.apply(&sources);
                        tracing::info!(
                            shard = ordinal,
                            started = ?change.started, restarted = ?change.restarted,
                            stopped = ?change.stopped, unchanged = change.unchanged.len(),
                            "applied pipeline config"
                        );
                        for (id, r) in ended {
                            if let Err(e) = r {
                                tracing::warn!(stream = %id, error = %format!("{e:#}"), "receiver ended with an error");
                            }
                        }
                        path_policy = owned_pipelines(&text, ordinal)
                            .ok()
                            .and_then(|p| crate::path_policy::PathPolicy::new(&p));
                        applied = Some(text);
                    }
                    // Keep running the last good config; the operator reports
                    // invalid specs, this only guards against a torn write.
                    Err(e) => tracing::error!(config = %args.config.display(), error = %format!("{e:#}"), "config rejected"),
                },
                Ok(_) => {}
                Err(e) if applied.is_none() => {
                    return Err(e).with_context(|| format!("cannot read {}", args.config.display()));
                }
                Err(e) => tracing::warn!(config = %args.config.display(), error = %e, "config unreadable; keeping the last one"),
            }
        }
        kernel_drops.update(&supervisor.sockets());
        if let Some(p) = &mut path_policy {
            p.tick(&mut supervisor, Instant::now());
        }
        if let Some((id, result)) = supervisor.wait_ended(Duration::from_millis(500)) {
            // A receiver that died is retried on the next config check.
            tracing::error!(stream = %id, error = ?result.err(), "receiver stopped; retrying");
            applied = None;
        }
    }
    for (id, r) in supervisor.stop_all() {
        match r {
            Ok(report) => tracing::info!(stream = %id, frames_decoded = report.frames_decoded, frames_dropped = report.frames_dropped, "stopped"),
            Err(e) => tracing::warn!(stream = %id, error = %format!("{e:#}"), "stopped with an error"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {name: fleet}
spec:
  scaling: {minReplicas: 1, maxReplicas: 4, replicas: 3}
  sources:
    - {name: a, codec: h264, transport: {rtp: {port: 5000}}}
    - {name: b, codec: h264, transport: {rtp: {port: 5002}}}
    - {name: c, codec: h264, transport: {rtp: {port: 5004}}}
    - {name: d, codec: h264, transport: {rtp: {port: 5006}}}
    - {name: e, codec: h264, transport: {rtp: {port: 5008}}}
"#;

    #[test]
    fn shards_together_own_every_source_exactly_once() {
        let mut all: Vec<String> = (0..3)
            .flat_map(|o| owned_sources(PIPELINE, o).unwrap().into_iter().map(|s| s.name))
            .collect();
        all.sort();
        assert_eq!(all, vec!["a", "b", "c", "d", "e"]);
        assert!(owned_sources(PIPELINE, 3).unwrap().is_empty(), "no shard beyond replicas");
    }

    #[test]
    fn during_a_handover_a_shard_runs_what_it_owns_under_either_count() {
        let handover = PIPELINE.replace("metadata: {name: fleet}", "metadata: {name: fleet, annotations: {zerodrop.dev/handover-from: \"2\"}}");
        assert_ne!(handover, PIPELINE);
        let two = PIPELINE.replace("replicas: 3", "replicas: 2");
        for o in 0..3 {
            let names = |text: &str| -> Vec<String> { owned_sources(text, o).unwrap().into_iter().map(|s| s.name).collect() };
            let mut union: Vec<String> = names(PIPELINE).into_iter().chain(names(&two)).collect();
            union.sort();
            union.dedup();
            let mut during = names(&handover);
            during.sort();
            assert_eq!(during, union, "shard {o}");
            let mut policy: Vec<String> = owned_pipelines(&handover, o).unwrap()[0].spec.sources.iter().map(|s| s.name.clone()).collect();
            policy.sort();
            assert_eq!(policy, during, "shard {o}: the bitrate policy follows what runs");
        }
    }

    #[test]
    fn the_bitrate_policy_sees_the_same_streams_the_shard_runs() {
        for o in 0..3 {
            let runs: Vec<String> = owned_sources(PIPELINE, o).unwrap().into_iter().map(|s| s.name).collect();
            let policy: Vec<String> =
                owned_pipelines(PIPELINE, o).unwrap()[0].spec.sources.iter().map(|s| s.name.clone()).collect();
            assert_eq!(runs, policy, "shard {o}");
        }
    }
}
