//! The reconcile of one `StreamPipeline`, as a pipeline of small steps:
//! read → validate → build desired objects (pure, `desired.rs`) → apply the
//! ones that changed with server-side apply → prune → write status.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zerodrop_crds::{ConditionType, StreamPipeline, StreamPipelineStatus, StreamStatus, shard};

use crate::desired::{self, BuildSettings, Desired, PIPELINE_LABEL, SOURCE_LABEL};
use crate::metrics::OperatorMetrics;

pub const FIELD_MANAGER: &str = "zerodrop-operator";
/// Annotation holding the hash of what the operator last applied to an
/// object: an unchanged object is not written again.
pub const APPLIED_HASH: &str = "zerodrop.dev/applied-hash";
/// Stream ownership entries kept in status; larger pipelines are truncated.
pub const MAX_STATUS_STREAMS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid pipeline: {0}")]
    Build(#[from] desired::BuildError),
    #[error("serializing {0}")]
    Json(#[from] serde_json::Error),
}

pub struct Context {
    pub client: Client,
    pub settings: BuildSettings,
    pub metrics: Arc<OperatorMetrics>,
    pub recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: BuildSettings, metrics: Arc<OperatorMetrics>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
        Self { client, settings, metrics, recorder, failures: Mutex::default() }
    }
}

/// Runs the controller until the stream of reconciles ends (shutdown).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, control: Option<crate::control::ControlOptions>) {
    let client = ctx.client.clone();
    let api: Api<StreamPipeline> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let owned = |c: &Client| -> (Api<StatefulSet>, Api<Service>, Api<ConfigMap>, Api<PodDisruptionBudget>) {
        match &namespace {
            Some(ns) => (Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns)),
            None => (Api::all(c.clone()), Api::all(c.clone()), Api::all(c.clone()), Api::all(c.clone())),
        }
    };
    let (sts, svc, cm, pdb) = owned(&client);
    let labelled = watcher::Config::default().labels(PIPELINE_LABEL);
    let controller = Controller::new(api, watcher::Config::default())
        .owns(sts, labelled.clone())
        .owns(svc, labelled.clone())
        .owns(cm, labelled.clone())
        .owns(pdb, labelled.clone());
    if let Some(opts) = control {
        // The data-plane pods, for their IPs: one watch, shared by every round.
        let pods: Api<Pod> = match &namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (pod_store, writer) = reflector::store();
        let pod_watch = watcher::watcher(pods, labelled).default_backoff().reflect(writer).for_each(|_| async {});
        tokio::spawn(pod_watch);
        tokio::spawn(crate::control::run(ctx.clone(), controller.store(), pod_store, opts));
    }
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}

pub async fn reconcile(sp: Arc<StreamPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&sp, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&key(&sp));
    }
    result
}

fn key(sp: &StreamPipeline) -> String {
    format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any())
}

async fn reconcile_inner(sp: &StreamPipeline, ctx: &Context) -> Result<Action, Error> {
    if sp.meta().deletion_timestamp.is_some() {
        // Owner references hand the owned objects to the garbage collector.
        return Ok(Action::await_change());
    }
    let ns = sp.namespace().unwrap_or_else(|| "default".into());
    let name = sp.name_any();

    // build
    let desired = match desired::build(sp, &ctx.settings) {
        Ok(d) => d,
        Err(e) => {
            // An invalid spec waits for a change instead of hot-looping.
            publish(ctx, sp, EventType::Warning, "InvalidSpec", &e.to_string()).await;
            write_status(ctx, sp, invalid_status(sp, &e.to_string())).await?;
            return Ok(Action::await_change());
        }
    };

    // apply
    let client = &ctx.client;
    let mut writes = 0;
    writes += apply(client, &ns, &desired.config).await? as u32;
    writes += apply(client, &ns, &desired.headless).await? as u32;
    let previous_replicas = current_replicas(client, &ns, &desired::statefulset_name(&name)).await?;
    writes += apply(client, &ns, &desired.statefulset).await? as u32;
    for s in &desired.source_services {
        writes += apply(client, &ns, s).await? as u32;
    }
    writes += apply(client, &ns, &desired.pdb).await? as u32;
    writes += prune_source_services(client, &ns, &name, &desired).await?;
    ctx.metrics.writes.inc_by(writes as u64);
    ctx.metrics.objects_managed(&key(sp), 4 + desired.source_services.len() as i64);

    let replicas = desired::replicas(sp);
    if let Some(prev) = previous_replicas
        && prev != replicas {
            let note = format!("data-plane replicas {prev} → {replicas}; streams re-assigned by rendezvous hashing");
            publish(ctx, sp, EventType::Normal, "Scaling", &note).await;
        }

    // status
    let observed = Api::<StatefulSet>::namespaced(client.clone(), &ns).get_opt(&desired::statefulset_name(&name)).await?;
    let status = observed_status(sp, observed.as_ref());
    write_status(ctx, sp, status).await?;
    if writes > 0 {
        tracing::info!(pipeline = %key(sp), writes, "reconciled");
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn error_policy(sp: Arc<StreamPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(key(&sp)).or_insert(0);
    *n += 1;
    // Per-object exponential backoff: 1 s, 2 s, 4 s … up to 5 minutes.
    let delay = Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300));
    tracing::warn!(pipeline = %key(&sp), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

fn object_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let text = serde_json::to_string(obj)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

/// Server-side applies `obj` unless the live object already carries the hash
/// of this exact desired state. Returns whether it wrote.
async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let hash = object_hash(obj)?;
    if let Some(live) = api.get_opt(&name).await?
        && live.meta().annotations.as_ref().and_then(|a| a.get(APPLIED_HASH)) == Some(&hash) {
            return Ok(false);
        }
    let mut obj = obj.clone();
    obj.meta_mut().annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH.into(), hash);
    let mut value = serde_json::to_value(&obj)?;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    Ok(true)
}

async fn current_replicas(client: &Client, ns: &str, name: &str) -> Result<Option<i32>, Error> {
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns).get_opt(name).await?;
    Ok(sts.and_then(|s| s.spec).and_then(|s| s.replicas))
}

/// Deletes per-source Services of sources that left the spec.
async fn prune_source_services(client: &Client, ns: &str, pipeline: &str, desired: &Desired) -> Result<u32, Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let wanted: Vec<String> = desired.source_services.iter().filter_map(|s| s.metadata.name.clone()).collect();
    let lp = ListParams::default().labels(&format!("{PIPELINE_LABEL}={pipeline},{SOURCE_LABEL}"));
    let mut deleted = 0;
    for svc in api.list(&lp).await? {
        let n = svc.name_any();
        if !wanted.contains(&n) {
            api.delete(&n, &DeleteParams::default()).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Status from what the cluster shows: replicas, readiness, stream owners.
pub fn observed_status(sp: &StreamPipeline, sts: Option<&StatefulSet>) -> StreamPipelineStatus {
    let name = sp.name_any();
    let replicas = desired::replicas(sp);
    let st = sts.and_then(|s| s.status.as_ref());
    let ready = st.and_then(|s| s.ready_replicas).unwrap_or(0);
    let current = st.map(|s| s.replicas).unwrap_or(0);
    let generation = sp.metadata.generation;
    let old = sp.status.as_ref();
    let streams: Vec<StreamStatus> = sp
        .spec
        .sources
        .iter()
        .take(MAX_STATUS_STREAMS)
        .map(|s| StreamStatus { name: s.name.clone(), shard: shard::owner(&s.name, replicas) as i32, ..Default::default() })
        .collect();
    let all_ready = ready >= replicas && replicas > 0;
    let scaling = current != replicas;
    let conditions = vec![
        condition(old, ConditionType::Ready, all_ready, if all_ready { "AllShardsReady" } else { "ShardsStarting" },
            &format!("{ready}/{replicas} data-plane pods ready"), generation),
        condition(old, ConditionType::Scaling, scaling, if scaling { "ReplicasChanging" } else { "Stable" },
            &format!("{current} running, {replicas} wanted"), generation),
    ];
    StreamPipelineStatus {
        observed_generation: generation,
        conditions,
        replicas: current,
        selector: desired::selector_string(&name),
        stream_count: sp.spec.sources.len() as i32,
        streams_truncated: sp.spec.sources.len() > MAX_STATUS_STREAMS,
        streams,
        ..StreamPipelineStatus::default()
    }
}

/// The status fields the reconcile owns, as its server-side apply patch:
/// `Ready` and `Scaling`, the running replicas, the selector, the stream count
/// and each stream's shard. The control loop (`control.rs`) owns `Degraded`,
/// `policyReplicas`, `lastDecision` and the streams' figures under a field
/// manager of its own, so neither writer resets the other's fields.
pub fn reconcile_fields(status: &StreamPipelineStatus) -> serde_json::Value {
    let conditions: Vec<&Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ == ConditionType::Ready.as_str() || c.type_ == ConditionType::Scaling.as_str())
        .collect();
    let streams: Vec<serde_json::Value> =
        status.streams.iter().map(|s| serde_json::json!({"name": s.name, "shard": s.shard})).collect();
    let mut fields = serde_json::json!({
        "conditions": conditions,
        "replicas": status.replicas,
        "selector": status.selector,
        "streamCount": status.stream_count,
        "streamsTruncated": status.streams_truncated,
        "streams": streams,
    });
    if let Some(g) = status.observed_generation {
        fields["observedGeneration"] = g.into();
    }
    fields
}

fn invalid_status(sp: &StreamPipeline, message: &str) -> StreamPipelineStatus {
    let mut s = observed_status(sp, None);
    s.conditions[0] = condition(sp.status.as_ref(), ConditionType::Ready, false, "InvalidSpec", message, sp.metadata.generation);
    s
}

/// A condition that keeps its last transition time while its status holds.
pub(crate) fn condition(old: Option<&StreamPipelineStatus>, kind: ConditionType, status: bool, reason: &str, message: &str, generation: Option<i64>) -> Condition {
    let status = if status { "True" } else { "False" };
    let previous = old.and_then(|o| o.condition(kind));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    Condition {
        type_: kind.as_str().into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Writes the reconcile's status fields only when they differ from what the
/// object has.
async fn write_status(ctx: &Context, sp: &StreamPipeline, status: StreamPipelineStatus) -> Result<(), Error> {
    let fields = reconcile_fields(&status);
    if sp.status.as_ref().map(reconcile_fields).as_ref() == Some(&fields) {
        return Ok(());
    }
    let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &sp.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": zerodrop_crds::API_VERSION,
        "kind": zerodrop_crds::KIND,
        "status": fields,
    });
    api.patch_status(&sp.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    ctx.metrics.writes.inc();
    Ok(())
}

pub(crate) async fn publish(ctx: &Context, sp: &StreamPipeline, type_: EventType, reason: &str, note: &str) {
    let event = Event { type_, reason: reason.into(), note: Some(note.into()), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &sp.object_ref(&())).await {
        tracing::debug!(error = %e, "event not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;

    fn pipeline() -> StreamPipeline {
        let mut sp: StreamPipeline = serde_yaml::from_str(
            r#"
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {name: fleet, namespace: video, generation: 4}
spec:
  scaling: {minReplicas: 1, maxReplicas: 4, replicas: 2}
  sources:
    - {name: a, codec: h264, transport: {rtp: {port: 5000}}}
    - {name: b, codec: h264, transport: {rtp: {port: 5002}}}
"#,
        )
        .unwrap();
        sp.status = None;
        sp
    }

    fn sts(replicas: i32, ready: i32) -> StatefulSet {
        StatefulSet {
            status: Some(StatefulSetStatus { replicas, ready_replicas: Some(ready), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_only_when_every_shard_is_ready_with_the_observed_generation() {
        let sp = pipeline();
        let s = observed_status(&sp, Some(&sts(2, 1)));
        assert_eq!(s.condition(ConditionType::Ready).unwrap().status, "False");
        assert_eq!(s.observed_generation, Some(4));
        let s = observed_status(&sp, Some(&sts(2, 2)));
        assert_eq!(s.condition(ConditionType::Ready).unwrap().status, "True");
        assert_eq!(s.condition(ConditionType::Scaling).unwrap().status, "False");
        assert_eq!(s.selector, desired::selector_string("fleet"));
        assert_eq!(s.streams.len(), 2);
    }

    #[test]
    fn unchanged_observations_give_an_identical_status_so_nothing_is_written() {
        let mut sp = pipeline();
        let first = observed_status(&sp, Some(&sts(2, 2)));
        sp.status = Some(first.clone());
        let second = observed_status(&sp, Some(&sts(2, 2)));
        assert_eq!(first, second, "same observation, same status: write_status skips it");
    }

    #[test]
    fn the_reconcile_leaves_the_policys_status_fields_alone() {
        let mut sp = pipeline();
        let mut status = observed_status(&sp, Some(&sts(2, 2)));
        assert!(status.condition(ConditionType::Degraded).is_none(), "Degraded is the control loop's");
        let fields = reconcile_fields(&status);
        assert!(fields.get("policyReplicas").is_none() && fields.get("lastDecision").is_none());
        assert_eq!(fields["streams"][0].as_object().unwrap().len(), 2, "name and shard only: {fields}");
        // What the control loop wrote does not make the reconcile write again.
        status.policy_replicas = Some(3);
        status.last_decision = Some("scale from 2 to 3 replicas: kernel_drops 5 above 0".into());
        status.streams[0].frames_decoded = 1234;
        sp.status = Some(status);
        let again = observed_status(&sp, Some(&sts(2, 2)));
        assert_eq!(reconcile_fields(&again), reconcile_fields(sp.status.as_ref().unwrap()));
    }

    #[test]
    fn scaling_condition_shows_a_replica_change_in_progress() {
        let sp = pipeline();
        let s = observed_status(&sp, Some(&sts(1, 1)));
        assert_eq!(s.condition(ConditionType::Scaling).unwrap().status, "True");
        assert_eq!(s.condition(ConditionType::Ready).unwrap().status, "False");
    }
}
