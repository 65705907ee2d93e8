//! The reconcile of one `StreamPipeline`, as a pipeline of small steps:
//! read → validate → build desired objects (pure, `desired.rs`) → compare
//! them with what the watch caches hold (`drift.rs`) → apply the ones that
//! changed or drifted with server-side apply → prune → write status.
//!
//! The owned objects are read from the reflector stores of the controller's
//! own watches, never with a GET per object: a steady pipeline costs no
//! request at all, and a restarted operator's first reconciles write nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zerodrop_crds::{ConditionType, StreamPipeline, StreamPipelineStatus, StreamStatus, shard};

use crate::desired::{self, BuildSettings, PIPELINE_LABEL};
use crate::handover;
use crate::drift;
use crate::metrics::OperatorMetrics;

pub const FIELD_MANAGER: &str = "zerodrop-operator";
/// Annotation holding the hash of what the operator last applied to an
/// object (FNV-1a of its JSON, `drift::stable_hash`): a change of the desired
/// object is seen even where it only removes a field.
pub const APPLIED_HASH: &str = "zerodrop.dev/applied-hash";
/// How long a write the watch has not shown yet holds back another write of
/// the same object (the watch normally shows it within milliseconds).
const WRITE_SETTLE: Duration = Duration::from_secs(10);
/// How soon a pipeline whose credentials Secret is missing looks again (the
/// operator does not watch Secrets: it may only `get` them).
const SECRET_RECHECK: Duration = Duration::from_secs(10);
/// The Ready condition's reason, and the Event's, while a Secret an RTSP
/// source names does not exist.
pub const SECRET_MISSING: &str = "SecretMissing";
/// Stream ownership entries kept in status; larger pipelines are truncated.
pub use zerodrop_core::limits::MAX_STREAM_STATUSES as MAX_STATUS_STREAMS;

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
    /// What the controller's watches of the owned kinds hold.
    pub caches: Caches,
    /// Set once every cache has its first full list.
    caches_ready: std::sync::atomic::AtomicBool,
    writers: Mutex<Option<Writers>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Objects written and not yet seen back through the watch: kind/ns/name
    /// → the resourceVersion the write replaced, and when.
    in_flight: Mutex<HashMap<String, (Option<String>, Instant)>>,
    /// Where each pipeline's streams are routed and its handover in
    /// progress (`handover.rs`): the operator's own last step, which a cache
    /// read may not show yet; persisted in status.handover.
    routings: Mutex<HashMap<String, crate::handover::Routing>>,
}

/// The reflector stores of the kinds a pipeline owns.
#[derive(Clone)]
pub struct Caches {
    pub statefulsets: Store<StatefulSet>,
    pub services: Store<Service>,
    pub configmaps: Store<ConfigMap>,
    pub pdbs: Store<PodDisruptionBudget>,
    /// The data-plane pods, for their IPs (the control loop's scrapes, a
    /// handover's look at the new owners).
    pub pods: Store<Pod>,
}

struct Writers {
    statefulsets: reflector::store::Writer<StatefulSet>,
    services: reflector::store::Writer<Service>,
    configmaps: reflector::store::Writer<ConfigMap>,
    pdbs: reflector::store::Writer<PodDisruptionBudget>,
    pods: reflector::store::Writer<Pod>,
}

impl Caches {
    /// Waits until every store has its first full list: before that an
    /// object missing from a store may exist in the cluster. One task waits
    /// (`run`); reconciles read the flag it sets.
    async fn ready(&self) {
        // A dropped writer means the controller is shutting down.
        let _ = self.statefulsets.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.configmaps.wait_until_ready().await;
        let _ = self.pdbs.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

impl Context {
    pub fn new(client: Client, settings: BuildSettings, metrics: Arc<OperatorMetrics>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
        let (statefulsets, sts_w) = reflector::store();
        let (services, svc_w) = reflector::store();
        let (configmaps, cm_w) = reflector::store();
        let (pdbs, pdb_w) = reflector::store();
        let (pods, pod_w) = reflector::store();
        Self {
            client,
            settings,
            metrics,
            recorder,
            caches: Caches { statefulsets, services, configmaps, pdbs, pods },
            caches_ready: std::sync::atomic::AtomicBool::new(false),
            writers: Mutex::new(Some(Writers { statefulsets: sts_w, services: svc_w, configmaps: cm_w, pdbs: pdb_w, pods: pod_w })),
            failures: Mutex::default(),
            in_flight: Mutex::default(),
            routings: Mutex::default(),
        }
    }

    /// The replica count a pipeline's Services route by now (its handover's
    /// old count until the switch), if this operator has reconciled it.
    pub fn route_replicas(&self, key: &str) -> Option<i32> {
        self.routings.lock().unwrap_or_else(|e| e.into_inner()).get(key).map(|r| r.layout().route)
    }

    /// Whether the cache still shows the version `key` had when this
    /// operator last wrote it (the write has not come back yet).
    fn awaiting_watch(&self, key: &str, live_version: Option<&str>) -> bool {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.get(key) {
            Some((version, at)) if version.as_deref() == live_version && at.elapsed() < WRITE_SETTLE => true,
            Some(_) => {
                in_flight.remove(key);
                false
            }
            None => false,
        }
    }

    fn wrote(&self, key: String, replaced_version: Option<String>) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (replaced_version, Instant::now()));
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
    let writers = ctx.writers.lock().unwrap_or_else(|e| e.into_inner()).take().expect("controller::run runs once per Context");
    // One watch per owned kind: it fills the store the reconcile reads and
    // triggers the owner's reconcile on every change, deletions included.
    // Managed fields are dropped from the cached copies: the reconcile never
    // reads them and they are most of an object's size.
    fn watch_into<K>(api: Api<K>, config: watcher::Config, writer: reflector::store::Writer<K>) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        watcher::watcher(api, config)
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .reflect(writer)
            .touched_objects()
    }
    // The pipelines' own watch, managed fields dropped from the cached
    // copies too (three field managers' worth per pipeline, never read).
    let (pipelines, pipeline_writer) = reflector::store();
    let pipeline_watch = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|sp: &mut StreamPipeline| sp.meta_mut().managed_fields = None)
        .reflect(pipeline_writer)
        .applied_objects();
    let controller = Controller::for_stream(pipeline_watch, pipelines)
        .owns_stream(watch_into(sts, labelled.clone(), writers.statefulsets))
        .owns_stream(watch_into(svc, labelled.clone(), writers.services))
        .owns_stream(watch_into(cm, labelled.clone(), writers.configmaps))
        .owns_stream(watch_into(pdb, labelled.clone(), writers.pdbs));
    // The data-plane pods, for their IPs: one watch, shared by the control
    // loop's rounds and the handovers; it triggers no reconcile.
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    tokio::spawn(watch_into(pods, labelled.clone(), writers.pods).for_each(|_| async {}));
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.caches.ready().await;
            ctx.caches_ready.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!("caches of owned objects filled");
        });
    }
    if let Some(opts) = control {
        let pod_store = ctx.caches.pods.clone();
        // The node agents, when found by label: their own watch, in every
        // namespace (the chart puts them in its release namespace).
        let agent_store = match &opts.agents {
            crate::control::Agents::Pods { selector, .. } => {
                let (store, writer) = reflector::store();
                let config = watcher::Config::default().labels(selector);
                let watch = watcher::watcher(Api::<Pod>::all(client.clone()), config)
                    .default_backoff()
                    .modify(|p: &mut Pod| p.meta_mut().managed_fields = None)
                    .reflect(writer)
                    .for_each(|_| async {});
                tokio::spawn(watch);
                Some(store)
            }
            _ => None,
        };
        tokio::spawn(crate::control::run(ctx.clone(), controller.store(), pod_store, agent_store, opts));
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

    // apply what changed or drifted, reading the live objects from the caches
    if !ctx.caches_ready.load(std::sync::atomic::Ordering::Acquire) {
        // Until the caches hold the cluster's objects, a missing one may
        // exist: compare nothing, write nothing, come back shortly.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let caches = &ctx.caches;
    let sts_name = desired::statefulset_name(&name);
    let previous_replicas = cached(&caches.statefulsets, &ns, &sts_name).and_then(|s| s.spec.as_ref()?.replicas);

    // replicas: a change hands the moving streams over before it breaks (handover.rs)
    let target = desired::replicas(sp);
    let now = Instant::now();
    let current = ctx
        .routings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key(sp))
        .cloned()
        .unwrap_or_else(|| handover::Routing::resume(sp, previous_replicas, target, now));
    let bound = match &current.handover {
        Some(p) if !p.switched && p.to == target => Some(bound_at_new_owners(ctx, sp, &ns, p.from, p.to).await),
        _ => None,
    };
    let wall = k8s_openapi::jiff::Timestamp::now().to_string();
    let tick = handover::Tick { now, wall: &wall, bound, prepare_timeout: ctx.settings.handover_timeout };
    let (routing, change) = handover::step(&current, sp, target, tick);
    ctx.routings.lock().unwrap_or_else(|e| e.into_inner()).insert(key(sp), routing.clone());
    let layout = routing.layout();
    let desired = if layout == handover::Layout::settled(target) { desired } else { desired::build_with(sp, &ctx.settings, layout)? };
    if let Some(change) = &change {
        let (reason, note) = change.event();
        tracing::info!(pipeline = %key(sp), reason, "{note}");
        let type_ = if change.is_warning() { EventType::Warning } else { EventType::Normal };
        publish(ctx, sp, type_, reason, &note).await;
    }

    let mut outcomes = vec![
        apply(ctx, sp, &caches.configmaps, &ns, &desired.config).await?,
        apply(ctx, sp, &caches.services, &ns, &desired.headless).await?,
        apply(ctx, sp, &caches.statefulsets, &ns, &desired.statefulset).await?,
    ];
    for s in &desired.source_services {
        outcomes.push(apply(ctx, sp, &caches.services, &ns, s).await?);
    }
    outcomes.push(apply(ctx, sp, &caches.pdbs, &ns, &desired.pdb).await?);
    let mut writes = outcomes.iter().filter(|o| **o == Outcome::Wrote).count() as u32;
    // An object whose last write the watch has not shown yet is compared
    // again soon (normally its watch event brings the next reconcile first).
    let pending = outcomes.contains(&Outcome::AwaitingWatch);
    let services: Vec<&ObjectMeta> =
        std::iter::once(&desired.headless.metadata).chain(desired.source_services.iter().map(|s| &s.metadata)).collect();
    writes += prune(ctx, sp, &caches.services, &ns, &services).await?;
    writes += prune(ctx, sp, &caches.configmaps, &ns, &[&desired.config.metadata]).await?;
    writes += prune(ctx, sp, &caches.statefulsets, &ns, &[&desired.statefulset.metadata]).await?;
    writes += prune(ctx, sp, &caches.pdbs, &ns, &[&desired.pdb.metadata]).await?;
    ctx.metrics.writes.inc_by(writes as u64);
    ctx.metrics.objects_managed(&key(sp), 4 + desired.source_services.len() as i64);

    if change.is_none()
        && let Some(prev) = previous_replicas
        && prev != layout.pods
        && routing.handover.is_none()
    {
        // Nothing to hand over (to or from zero replicas, or the StatefulSet
        // settling after a handover).
        let note = format!("data-plane replicas {prev} → {}", layout.pods);
        publish(ctx, sp, EventType::Normal, "Scaling", &note).await;
    }

    // credentials: the objects above are applied all the same (the pods
    // wait for a missing Secret in ContainerCreating and start once it
    // appears); the Ready condition and an Event say which one is missing.
    let missing = missing_secrets(ctx, sp, &ns).await?;
    for m in &missing {
        if !status_names_missing(sp.status.as_ref(), &m.secret) {
            let related = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                namespace: Some(ns.clone()),
                name: Some(m.secret.clone()),
                ..ObjectReference::default()
            };
            publish_related(ctx, sp, EventType::Warning, SECRET_MISSING, &m.message(&ns), related).await;
        }
    }

    // status, from the cached StatefulSet (its status changes trigger a reconcile)
    let observed = cached(&caches.statefulsets, &ns, &sts_name);
    let status = with_missing_secrets(sp, observed_status_during(sp, observed.as_deref(), &routing), &missing, &ns);
    write_status(ctx, sp, status).await?;
    if writes > 0 {
        tracing::info!(pipeline = %key(sp), writes, "reconciled");
    }
    let next = if let Some(soon) = handover::requeue(&routing) {
        soon
    } else if pending {
        WRITE_SETTLE
    } else if !missing.is_empty() {
        SECRET_RECHECK
    } else {
        Duration::from_secs(300)
    };
    Ok(Action::requeue(next))
}

/// A credentials Secret an RTSP source names that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingSecret {
    /// The first source that names it.
    pub source: String,
    pub secret: String,
}

impl MissingSecret {
    /// The Ready condition's message and the Event's note: names, never
    /// anything of the Secret's contents.
    pub fn message(&self, namespace: &str) -> String {
        format!(
            "source {}: Secret {} (its credentials) not found in namespace {namespace}; \
             the data-plane pods mount it and stay in ContainerCreating until it exists",
            self.source, self.secret
        )
    }
}

/// The credentials Secrets of the pipeline's RTSP sources that do not exist,
/// each asked for with one GET of its metadata only: the operator neither
/// lists nor watches Secrets, and their values never reach it. Where it may
/// not `get` them, none is reported missing.
async fn missing_secrets(ctx: &Context, sp: &StreamPipeline, ns: &str) -> Result<Vec<MissingSecret>, Error> {
    let wanted = desired::credentials_secrets(sp);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut missing = Vec::new();
    for (secret, source) in wanted {
        match api.get_metadata_opt(&secret).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!(pipeline = %key(sp), source = %source, secret = %secret, "credentials Secret not found");
                missing.push(MissingSecret { source, secret });
            }
            // Not allowed to look (RBAC without `get` on secrets): the pods
            // mount the Secret all the same; only this early report is lost,
            // and the rest of the reconcile and the status go on.
            Err(kube::Error::Api(e)) if e.code == 403 => {
                tracing::warn!(pipeline = %key(sp), source = %source, secret = %secret,
                    "cannot check whether the credentials Secret exists (forbidden): grant `get` on secrets to report a missing one");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(missing)
}

/// `status` with Ready False while a credentials Secret is missing, its
/// message naming each missing one.
pub fn with_missing_secrets(sp: &StreamPipeline, mut status: StreamPipelineStatus, missing: &[MissingSecret], ns: &str) -> StreamPipelineStatus {
    if !missing.is_empty() {
        let message = missing.iter().map(|m| m.message(ns)).collect::<Vec<_>>().join("; ");
        status.conditions[0] = condition(sp.status.as_ref(), ConditionType::Ready, false, SECRET_MISSING, &message, sp.metadata.generation);
    }
    status
}

/// Whether the pipeline's status already reports Secret `secret` missing
/// (then its Event was published: a requeue or a restarted operator does
/// not publish it again).
fn status_names_missing(status: Option<&StreamPipelineStatus>, secret: &str) -> bool {
    status.and_then(|s| s.condition(ConditionType::Ready)).is_some_and(|c| {
        c.status == "False" && c.reason == SECRET_MISSING && c.message.contains(&format!("Secret {secret} "))
    })
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
    Ok(drift::stable_hash(serde_json::to_string(obj)?.as_bytes()))
}

/// The cached copy of `ns/name`.
fn cached<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(name).within(ns))
}

/// What [`apply`] did with one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Wrote,
    Unchanged,
    /// Not compared: the cache does not show this operator's last write yet.
    AwaitingWatch,
}

/// Server-side applies `obj` when the cached live object is missing, carries
/// the hash of another desired state, or has drifted from it on a field the
/// operator sets (someone edited it: put back, with a Warning Event naming
/// the field).
async fn apply<K>(ctx: &Context, sp: &StreamPipeline, store: &Store<K>, ns: &str, obj: &K) -> Result<Outcome, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&());
    let key = format!("{kind}/{ns}/{name}");
    let live = cached(store, ns, &name);
    let live_version = live.as_ref().and_then(|l| l.meta().resource_version.clone());
    if ctx.awaiting_watch(&key, live_version.as_deref()) {
        return Ok(Outcome::AwaitingWatch);
    }
    let hash = object_hash(obj)?;
    let mut drifted = None;
    if let Some(live) = &live {
        let applied = live.meta().annotations.as_ref().and_then(|a| a.get(APPLIED_HASH)) == Some(&hash);
        if applied {
            match drift::first_difference(&serde_json::to_value(obj)?, &serde_json::to_value(live.as_ref())?) {
                None => return Ok(Outcome::Unchanged),
                Some(d) => drifted = Some(d),
            }
        }
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let mut obj = obj.clone();
    obj.meta_mut().annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH.into(), hash);
    let mut value = serde_json::to_value(&obj)?;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = kind.clone().into();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    ctx.wrote(key, live_version);
    if let Some(d) = drifted {
        tracing::warn!(pipeline = %format!("{ns}/{}", sp.name_any()), object = %format!("{kind}/{name}"), drift = %d, "put back a hand edit");
        ctx.metrics.drift_corrected(&kind);
        let note = format!("{kind} {name}: {d}; put back");
        let related = live.as_ref().map(|l| l.object_ref(&()));
        publish_unique(ctx, sp, EventType::Warning, "DriftCorrected", &note, related).await;
    }
    Ok(Outcome::Wrote)
}

/// Deletes the objects of one kind that this pipeline owns (its label and
/// its owner reference) and no longer wants: a per-source Service whose
/// source left the spec, an object of an older layout.
async fn prune<K>(ctx: &Context, sp: &StreamPipeline, store: &Store<K>, ns: &str, wanted: &[&ObjectMeta]) -> Result<u32, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let pipeline = sp.name_any();
    let uid = sp.meta().uid.clone();
    let wanted: Vec<&str> = wanted.iter().filter_map(|m| m.name.as_deref()).collect();
    let stale: Vec<String> = store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns) && o.meta().deletion_timestamp.is_none())
        .filter(|o| o.labels().get(PIPELINE_LABEL) == Some(&pipeline))
        .filter(|o| o.owner_references().iter().any(|r| Some(&r.uid) == uid.as_ref() && r.controller == Some(true)))
        .map(|o| o.name_any())
        .filter(|n| !wanted.contains(&n.as_str()))
        .collect();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let mut deleted = 0;
    for n in stale {
        let key = format!("{}/{ns}/{n}/delete", K::kind(&()));
        if ctx.awaiting_watch(&key, None) {
            continue;
        }
        match api.delete(&n, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.wrote(key, None);
        tracing::info!(object = %format!("{}/{n}", K::kind(&())), "pruned");
        deleted += 1;
    }
    Ok(deleted)
}

/// How many of the streams moving from `from` to `to` replicas their new
/// owners list as bound (`/readyz/streams` of each new owner's pod; a pod
/// without an IP yet or that does not answer counts none).
async fn bound_at_new_owners(ctx: &Context, sp: &StreamPipeline, ns: &str, from: i32, to: i32) -> i32 {
    let name = sp.name_any();
    let sts = desired::statefulset_name(&name);
    let mut by_owner: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (stream, owner) in handover::moving(sp, from, to) {
        by_owner.entry(owner).or_default().push(stream);
    }
    let looks = by_owner.into_iter().map(|(ordinal, streams)| {
        let pod = cached(&ctx.caches.pods, ns, &format!("{sts}-{ordinal}"));
        let ip = pod.and_then(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse::<std::net::IpAddr>().ok());
        let port = ctx.settings.pod_metrics_port;
        let name = name.clone();
        async move {
            let Some(ip) = ip else { return 0 };
            let addr = std::net::SocketAddr::new(ip, port);
            match crate::scrape::http_get(addr, "/readyz/streams", Duration::from_secs(1)).await {
                Ok(body) => {
                    let listed: std::collections::HashSet<&str> = body.lines().collect();
                    streams.iter().filter(|s| listed.contains(format!("{name}/{s}").as_str())).count() as i32
                }
                Err(e) => {
                    tracing::debug!(pod = %addr, error = %e, "new owner not answering yet");
                    0
                }
            }
        }
    });
    futures::future::join_all(looks).await.into_iter().sum()
}

/// Status from what the cluster shows: replicas, readiness, stream owners.
pub fn observed_status(sp: &StreamPipeline, sts: Option<&StatefulSet>) -> StreamPipelineStatus {
    let routing = handover::Routing { handover: None, settled: desired::replicas(sp) };
    observed_status_during(sp, sts, &routing)
}

/// [`observed_status`] with the streams' owners and the Scaling condition
/// as `routing` has them (a handover in progress).
pub fn observed_status_during(sp: &StreamPipeline, sts: Option<&StatefulSet>, routing: &handover::Routing) -> StreamPipelineStatus {
    let name = sp.name_any();
    let namespace = sp.namespace().unwrap_or_else(|| "default".into());
    let layout = routing.layout();
    let replicas = layout.assign;
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
        .map(|s| {
            let shard = shard::owner(s.shard_key(), layout.route);
            let hls = sp.spec.outputs.hls.as_ref().map(|_| desired::hls_url(&namespace, &name, &s.name, shard));
            StreamStatus { name: s.name.clone(), shard: shard as i32, hls, ..Default::default() }
        })
        .collect();
    let all_ready = ready >= replicas && replicas > 0;
    let handover = routing.status();
    let scaling = current != layout.pods || handover.is_some();
    let (scaling_reason, scaling_message) = match &handover {
        Some(h) if h.phase == zerodrop_crds::HandoverPhase::Preparing => (
            "HandingOver",
            format!("{} → {} replicas: {}/{} moving streams bound by their new owners; Services still route by {}", h.from_replicas, h.to_replicas, h.bound, h.moving, h.from_replicas),
        ),
        Some(h) => ("Draining", format!("{} → {} replicas: Services route by {}; the old owners drain", h.from_replicas, h.to_replicas, h.to_replicas)),
        None if scaling => ("ReplicasChanging", format!("{current} running, {replicas} wanted")),
        None => ("Stable", format!("{current} running, {replicas} wanted")),
    };
    let conditions = vec![
        condition(old, ConditionType::Ready, all_ready, if all_ready { "AllShardsReady" } else { "ShardsStarting" },
            &format!("{ready}/{replicas} data-plane pods ready"), generation),
        condition(old, ConditionType::Scaling, scaling, scaling_reason, &scaling_message, generation),
    ];
    StreamPipelineStatus {
        observed_generation: generation,
        conditions,
        replicas: current,
        selector: desired::selector_string(&name),
        stream_count: sp.spec.sources.len() as i32,
        streams_truncated: sp.spec.sources.len() > MAX_STATUS_STREAMS,
        streams,
        handover,
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
        status
            .streams
            .iter()
            .map(|s| {
                let mut v = serde_json::json!({"name": s.name, "shard": s.shard});
                if let Some(url) = &s.hls {
                    v["hls"] = url.as_str().into();
                }
                v
            })
            .collect();
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
    if let Some(h) = &status.handover {
        fields["handover"] = serde_json::to_value(h).unwrap_or_default();
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

/// An Event never folded into an earlier one. The shared recorder folds a
/// repeat of the same reason about the same object into the first Event (a
/// count), keeping the first message; hand edits are rare and each one's
/// message names its own field, so each gets an Event of its own.
async fn publish_unique(ctx: &Context, sp: &StreamPipeline, type_: EventType, reason: &str, note: &str, related: Option<k8s_openapi::api::core::v1::ObjectReference>) {
    let recorder = Recorder::new(ctx.client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
    let event = Event { type_, reason: reason.into(), note: Some(note.into()), action: "Reconcile".into(), secondary: related };
    if let Err(e) = recorder.publish(&event, &sp.object_ref(&())).await {
        tracing::debug!(error = %e, "event not published");
    }
}

/// An Event about the pipeline and a related object (a Secret): the shared
/// recorder folds repeats per related object, not across them.
async fn publish_related(ctx: &Context, sp: &StreamPipeline, type_: EventType, reason: &str, note: &str, related: ObjectReference) {
    let event = Event { type_, reason: reason.into(), note: Some(note.into()), action: "Reconcile".into(), secondary: Some(related) };
    if let Err(e) = ctx.recorder.publish(&event, &sp.object_ref(&())).await {
        tracing::debug!(error = %e, "event not published");
    }
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
    fn with_hls_each_stream_names_its_playlist_on_the_pod_that_owns_it() {
        let mut sp = pipeline();
        assert!(observed_status(&sp, Some(&sts(2, 2))).streams.iter().all(|s| s.hls.is_none()), "no HLS asked for");
        sp.spec.outputs.hls = Some(Default::default());
        let s = observed_status(&sp, Some(&sts(2, 2)));
        for st in &s.streams {
            let url = format!(
                "http://fleet-dataplane-{0}.fleet-dataplane.video.svc:9464/hls/fleet/{1}/index.m3u8",
                st.shard, st.name
            );
            assert_eq!(st.hls.as_deref(), Some(url.as_str()));
        }
        assert_eq!(reconcile_fields(&s)["streams"][0]["hls"], s.streams[0].hls.clone().unwrap().as_str(), "the reconcile owns it");
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
    fn a_missing_secret_makes_ready_false_naming_it_until_it_exists() {
        let mut sp = pipeline();
        let missing = [MissingSecret { source: "a".into(), secret: "cam-creds".into() }];
        let s = with_missing_secrets(&sp, observed_status(&sp, Some(&sts(2, 2))), &missing, "video");
        let ready = s.condition(ConditionType::Ready).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", SECRET_MISSING));
        assert!(ready.message.contains("source a: Secret cam-creds ") && ready.message.contains("namespace video"), "{}", ready.message);
        assert!(ready.message.contains("ContainerCreating"), "{}", ready.message);
        assert_eq!(ready.observed_generation, Some(4));
        assert_eq!(s.condition(ConditionType::Scaling).unwrap().status, "False", "Scaling is left as observed");
        sp.status = Some(s.clone());
        assert!(status_names_missing(sp.status.as_ref(), "cam-creds"), "reported: no second Event");
        assert!(!status_names_missing(sp.status.as_ref(), "cam"), "another Secret's name is not a match");
        // Once the Secret exists, the observed readiness is back.
        let cleared = with_missing_secrets(&sp, observed_status(&sp, Some(&sts(2, 2))), &[], "video");
        let ready = cleared.condition(ConditionType::Ready).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "AllShardsReady"));
        assert!(!status_names_missing(Some(&cleared), "cam-creds"));
        // Steady while missing: the same status again, so nothing is written.
        let again = with_missing_secrets(&sp, observed_status(&sp, Some(&sts(2, 2))), &missing, "video");
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
