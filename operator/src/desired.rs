//! The objects a `StreamPipeline` should have, built as a pure function of
//! the pipeline and the replica count: no client, no clock. The reconcile
//! applies them with server-side apply; tests check them as plain structs.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use zerodrop_crds::{ResourceAmounts, ServiceType, StreamPipeline, shard};

/// The label every object of a pipeline carries.
pub const PIPELINE_LABEL: &str = "zerodrop.dev/pipeline";
/// The label of a per-source Service.
pub const SOURCE_LABEL: &str = "zerodrop.dev/source";
pub const MANAGED_BY: &str = "zerodrop-operator";
pub const CONFIG_KEY: &str = "pipeline.yaml";
pub const CONFIG_MOUNT: &str = "/etc/zerodrop";
pub const METRICS_PORT: i32 = 9464;
/// Where the pod finds the credentials Secret of an RTSP source: Secret
/// `name` is mounted at `{CREDENTIALS_MOUNT}/{name}`. The data plane reads
/// the same path, `zerodrop_dataplane::ingest::rtsp::mounted_secret_dir`
/// (not called from here: the operator does not link the data plane).
pub const CREDENTIALS_MOUNT: &str = "/var/run/zerodrop/credentials";

/// Settings of the operator that shape the objects, separate from the spec.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub dataplane_image: String,
    /// The port of the data-plane pods' /metrics and /readyz (the control
    /// loop reads it; a handover reads `/readyz/streams` there).
    pub pod_metrics_port: u16,
    /// How long a handover waits for the new owners to bind the moving
    /// streams before switching anyway (`handover::PREPARE_TIMEOUT`).
    pub handover_timeout: std::time::Duration,
}

/// Everything one pipeline should own.
#[derive(Debug, Clone)]
pub struct Desired {
    pub config: ConfigMap,
    pub statefulset: StatefulSet,
    pub headless: Service,
    pub source_services: Vec<Service>,
    pub pdb: PodDisruptionBudget,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the pipeline has no metadata.name or metadata.namespace")]
    Unnamed,
    #[error("spec.sources[{index}].transport: no transport member set")]
    NoTransport { index: usize },
    #[error("spec.sources[{index}].transport: set exactly one of rtp, rtsp and srt")]
    TwoTransports { index: usize },
    #[error("spec.sources[{index}].transport: the credentials or passphrase Secret {name:?} is not a Secret name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)")]
    SecretName { index: usize, name: String },
    #[error("cannot render the pipeline config: {0}")]
    Render(#[from] serde_yaml::Error),
}

pub fn statefulset_name(pipeline: &str) -> String {
    format!("{pipeline}-dataplane")
}

/// The HLS playlist of `source` on shard `shard`'s pod, by the pod's DNS
/// name under the pipeline's headless Service.
pub fn hls_url(namespace: &str, pipeline: &str, source: &str, shard: u32) -> String {
    let sts = statefulset_name(pipeline);
    format!("http://{sts}-{shard}.{sts}.{namespace}.svc:{METRICS_PORT}/hls/{pipeline}/{source}/index.m3u8")
}

pub fn source_service_name(pipeline: &str, source: &str) -> String {
    format!("{pipeline}-{source}")
}

/// Where the pod mounts Secret `secret` (an RTSP source's credentials).
pub fn credentials_mount_path(secret: &str) -> String {
    format!("{CREDENTIALS_MOUNT}/{secret}")
}

/// The pod volume of Secret `secret`: a DNS label of at most 63 characters,
/// `cred-<name>` where that is one, else a cut of the name (dots made '-')
/// and a hash of the whole, so that two Secrets never share a volume.
pub fn credentials_volume_name(secret: &str) -> String {
    const MAX: usize = 63;
    let plain = format!("cred-{secret}");
    if plain.len() <= MAX && !secret.contains('.') {
        return plain;
    }
    let hash = crate::drift::stable_hash(secret.as_bytes());
    // "cred-" + cut + "-" + 16 hex digits
    let room = MAX - "cred-".len() - 1 - hash.len();
    let cut: String = secret.chars().take(room).map(|c| if c == '.' { '-' } else { c }).collect();
    let cut = cut.trim_end_matches('-');
    format!("cred-{cut}-{hash}")
}

/// Whether `name` can name a Secret (a DNS-1123 subdomain). A name that
/// cannot is refused before it becomes a mount path.
fn is_secret_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// The Secret a source names for its credentials: an RTSP source's user
/// name and password, or an SRT source's passphrase.
pub fn source_secret(source: &zerodrop_crds::Source) -> Option<&str> {
    let t = &source.transport;
    t.rtsp
        .as_ref()
        .and_then(|r| r.credentials_secret.as_ref().map(|c| c.name.as_str()))
        .or_else(|| t.srt.as_ref().and_then(|s| s.passphrase_secret.as_ref().map(|p| p.name.as_str())))
}

/// The UDP port an SRT listener listens on (in the pod, and on its Service).
fn srt_listener_port(source: &zerodrop_crds::Source) -> Option<u16> {
    let srt = source.transport.srt.as_ref()?;
    (srt.mode == zerodrop_crds::SrtMode::Listener).then_some(srt.port)
}

/// The distinct credentials Secrets the pipeline's pulled sources (RTSP,
/// SRT) name, in the order of their first source, each with that source's
/// name.
pub fn credentials_secrets(sp: &StreamPipeline) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for source in &sp.spec.sources {
        let Some(secret) = source_secret(source) else { continue };
        if !out.iter().any(|(name, _)| name == secret) {
            out.push((secret.to_string(), source.name.clone()));
        }
    }
    out
}

/// The replica count to run: what `kubectl scale` / an HPA set through the
/// scale subresource (`spec.scaling.replicas`); else what the control policy
/// chose (`status.policyReplicas`) within minReplicas..maxReplicas; else the
/// floor, minReplicas.
pub fn replicas(sp: &StreamPipeline) -> i32 {
    let s = &sp.spec.scaling;
    let chosen = sp.status.as_ref().and_then(|st| st.policy_replicas);
    zerodrop_core::scaling::replicas(s.replicas, chosen, s.min_replicas, s.max_replicas)
}

/// The objects with no replica change in progress.
pub fn build(sp: &StreamPipeline, settings: &BuildSettings) -> Result<Desired, BuildError> {
    build_with(sp, settings, crate::handover::Layout::settled(replicas(sp)))
}

/// The objects with the replica counts of `layout` (a handover in progress
/// gives the StatefulSet, the rendered pipeline and the Services different
/// counts, `handover.rs`).
pub fn build_with(sp: &StreamPipeline, settings: &BuildSettings, layout: crate::handover::Layout) -> Result<Desired, BuildError> {
    let name = sp.metadata.name.clone().ok_or(BuildError::Unnamed)?;
    let namespace = sp.metadata.namespace.clone().ok_or(BuildError::Unnamed)?;
    let owner = owner_reference(sp).ok_or(BuildError::Unnamed)?;
    let labels = pipeline_labels(&name);
    let meta = |obj_name: String, extra: &[(&str, &str)]| {
        let mut l = labels.clone();
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        ObjectMeta {
            name: Some(obj_name),
            namespace: Some(namespace.clone()),
            labels: Some(l),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        }
    };

    for (index, source) in sp.spec.sources.iter().enumerate() {
        let t = &source.transport;
        match [t.rtp.is_some(), t.rtsp.is_some(), t.srt.is_some()].iter().filter(|set| **set).count() {
            0 => return Err(BuildError::NoTransport { index }),
            1 => {}
            _ => return Err(BuildError::TwoTransports { index }),
        }
        if let Some(secret) = source_secret(source)
            && !is_secret_name(secret)
        {
            return Err(BuildError::SecretName { index, name: secret.to_string() });
        }
    }

    let config = ConfigMap {
        metadata: meta(format!("{name}-config"), &[]),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), render_config_during(sp, layout.assign, layout.also_from)?)])),
        ..ConfigMap::default()
    };

    let sts_name = statefulset_name(&name);
    let pod_labels = labels.clone();
    let statefulset = StatefulSet {
        metadata: meta(sts_name.clone(), &[]),
        spec: Some(StatefulSetSpec {
            replicas: Some(layout.pods),
            service_name: Some(sts_name.clone()),
            // Shards are independent: start and replace them all at once.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels), ..ObjectMeta::default() }),
                spec: Some(pod_spec(sp, &name, settings)),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };

    let headless = Service {
        metadata: meta(sts_name.clone(), &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels.clone()),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: METRICS_PORT,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String("metrics".into())),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let mut source_services = Vec::new();
    // A pushed source (RTP, or an SRT listener) gets a Service towards its
    // owning pod; a pulled one (RTSP, an SRT caller: the pod dials out)
    // needs none.
    for source in &sp.spec.sources {
        let ports: Vec<ServicePort> = match (&source.transport.rtp, srt_listener_port(source)) {
            (Some(rtp), _) => rtp.ports().roles().into_iter().map(|(role, port)| udp_port(&role.name(), port)).collect(),
            (None, Some(port)) => vec![udp_port("srt", port)],
            (None, None) => continue,
        };
        let owner_pod = format!("{sts_name}-{}", shard::owner(source.shard_key(), layout.route));
        let service_type = sp.spec.exposure.service_type;
        let mut selector = labels.clone();
        selector.insert("statefulset.kubernetes.io/pod-name".into(), owner_pod);
        source_services.push(Service {
            metadata: meta(source_service_name(&name, &source.name), &[(SOURCE_LABEL, &source.name)]),
            spec: Some(ServiceSpec {
                type_: Some(service_type.as_str().into()),
                selector: Some(selector),
                ports: Some(ports),
                // The pod must see the sender's own address so that RTCP
                // (NACK, PLI) goes back to it.
                external_traffic_policy: (service_type != ServiceType::ClusterIP).then(|| "Local".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        });
    }

    let pdb = PodDisruptionBudget {
        metadata: meta(sts_name, &[]),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(labels), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };

    Ok(Desired { config, statefulset, headless, source_services, pdb })
}

pub fn pipeline_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (PIPELINE_LABEL.to_string(), name.to_string()),
        ("app.kubernetes.io/name".to_string(), "zerodrop-dataplane".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
    ])
}

/// The label selector string of a pipeline's pods (status.selector, used by
/// the scale subresource).
pub fn selector_string(name: &str) -> String {
    pipeline_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn owner_reference(sp: &StreamPipeline) -> Option<OwnerReference> {
    let mut r = sp.controller_owner_ref(&())?;
    r.block_owner_deletion = Some(true);
    Some(r)
}

fn udp_port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: port as i32,
        protocol: Some("UDP".into()),
        target_port: Some(IntOrString::Int(port as i32)),
        ..ServicePort::default()
    }
}

/// The pipeline as the pods read it: the user's spec with every listen
/// address set to all interfaces (the pod's IP is not known in advance) and
/// the replica count the shards hash against.
pub fn render_config(sp: &StreamPipeline, replicas: i32) -> Result<String, serde_yaml::Error> {
    render_config_during(sp, replicas, None)
}

/// [`render_config`] during a handover from `from` replicas: annotated so
/// that each shard also runs what it owned under `from`.
pub fn render_config_during(sp: &StreamPipeline, replicas: i32, from: Option<i32>) -> Result<String, serde_yaml::Error> {
    let mut spec = sp.spec.clone();
    spec.scaling.replicas = Some(replicas);
    for s in &mut spec.sources {
        if let Some(rtp) = s.transport.rtp.as_mut() {
            rtp.listen_address = "0.0.0.0".into();
        }
    }
    let doc = serde_json::json!({
        "apiVersion": zerodrop_crds::API_VERSION,
        "kind": zerodrop_crds::KIND,
        "metadata": {"name": sp.metadata.name, "namespace": sp.metadata.namespace},
        "spec": spec,
    });
    let mut doc = doc;
    if let Some(from) = from {
        doc["metadata"]["annotations"] = serde_json::json!({ shard::HANDOVER_FROM_ANNOTATION: from.to_string() });
    }
    serde_yaml::to_string(&doc)
}

fn quantities(a: &Option<ResourceAmounts>) -> Option<BTreeMap<String, Quantity>> {
    let a = a.as_ref()?;
    let mut m = BTreeMap::new();
    if let Some(cpu) = &a.cpu {
        m.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(mem) = &a.memory {
        m.insert("memory".to_string(), Quantity(mem.clone()));
    }
    (!m.is_empty()).then_some(m)
}

fn pod_spec(sp: &StreamPipeline, name: &str, settings: &BuildSettings) -> PodSpec {
    let mut ports = vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: METRICS_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }];
    // Every socket of every source, FEC included: what the pod listens on is
    // what it declares.
    for rtp in sp.spec.sources.iter().filter_map(|s| s.transport.rtp.as_ref()) {
        for port in rtp.socket_ports() {
            ports.push(ContainerPort { container_port: port as i32, protocol: Some("UDP".into()), ..Default::default() });
        }
    }
    for port in sp.spec.sources.iter().filter_map(srt_listener_port) {
        ports.push(ContainerPort { container_port: i32::from(port), protocol: Some("UDP".into()), ..Default::default() });
    }
    // A restream's fixed port, on which its receivers' RTCP comes back.
    for port in sp.spec.sources.iter().filter_map(|s| s.outputs.as_ref()?.restream_local_port) {
        ports.push(ContainerPort { container_port: i32::from(port), protocol: Some("UDP".into()), ..Default::default() });
    }
    let resources = sp.spec.resources.as_ref().map(|r| ResourceRequirements {
        requests: quantities(&r.requests),
        limits: quantities(&r.limits),
        ..ResourceRequirements::default()
    });
    // Each RTSP source's credentials Secret, mounted once however many
    // sources share it, where the data plane reads it at each dial. The pod
    // waits in ContainerCreating while one is missing (the reconcile says so
    // in the Ready condition); the operator never reads the values.
    let secrets = credentials_secrets(sp);
    let secret_mounts = secrets.iter().map(|(secret, _)| VolumeMount {
        name: credentials_volume_name(secret),
        mount_path: credentials_mount_path(secret),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    let secret_volumes = secrets.iter().map(|(secret, _)| Volume {
        name: credentials_volume_name(secret),
        secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..SecretVolumeSource::default() }),
        ..Volume::default()
    });
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    PodSpec {
        containers: vec![Container {
            name: "dataplane".into(),
            image: Some(settings.dataplane_image.clone()),
            args: Some(vec!["pod".into(), "--config".into(), format!("{CONFIG_MOUNT}/{CONFIG_KEY}")]),
            env: Some(vec![EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                    ..Default::default()
                }),
                ..EnvVar::default()
            }]),
            ports: Some(ports),
            resources,
            readiness_probe: Some(probe("/readyz")),
            liveness_probe: Some(probe("/healthz")),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "config".into(),
                    mount_path: CONFIG_MOUNT.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                // The root filesystem is read-only; GStreamer writes its
                // plugin registry to /tmp.
                VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
            ]
            .into_iter()
            .chain(secret_mounts)
            .collect()),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        }],
        // The ConfigMap is mounted, not baked into the template: a changed
        // source reaches the pods without restarting them (`zerodrop pod`
        // follows the file and restarts only the receivers that changed).
        volumes: Some(vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource { name: format!("{name}-config"), ..Default::default() }),
                ..Volume::default()
            },
            Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
        ]
        .into_iter()
        .chain(secret_volumes)
        .collect()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(replicas: Option<i32>, service_type: &str) -> StreamPipeline {
        let yaml = format!(
            r#"
apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {{name: fleet, namespace: video, uid: 1234-abcd}}
spec:
  exposure: {{type: {service_type}}}
  scaling: {{minReplicas: 2, maxReplicas: 4{}}}
  resources: {{requests: {{cpu: 500m, memory: 256Mi}}}}
  sources:
    - {{name: a, codec: h264, rtxPayloadType: 97, transport: {{rtp: {{listenAddress: 127.0.0.1, port: 5000}}}}}}
    - {{name: b, codec: h265, transport: {{rtp: {{port: 5002, rtcpMux: true}}}}}}
"#,
            replicas.map(|r| format!(", replicas: {r}")).unwrap_or_default()
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn settings() -> BuildSettings {
        BuildSettings { dataplane_image: "ghcr.io/zerodrop/dataplane:test".into(), pod_metrics_port: METRICS_PORT as u16, handover_timeout: crate::handover::PREPARE_TIMEOUT }
    }

    #[test]
    fn statefulset_runs_the_scaled_replicas_as_non_root_with_a_read_only_root() {
        let d = build(&pipeline(Some(3), "ClusterIP"), &settings()).unwrap();
        let spec = d.statefulset.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"], Quantity("500m".into()));
        assert_eq!(c.args.as_ref().unwrap()[0], "pod");
        let owner = &d.statefulset.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("StreamPipeline", Some(true)));
    }

    #[test]
    fn replicas_default_to_the_policy_floor() {
        let d = build(&pipeline(None, "ClusterIP"), &settings()).unwrap();
        assert_eq!(d.statefulset.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn the_policys_choice_counts_only_while_nobody_set_replicas_and_within_bounds() {
        let with_policy = |spec: Option<i32>, chosen: i32| {
            let mut sp = pipeline(spec, "ClusterIP");
            sp.status = Some(zerodrop_crds::StreamPipelineStatus { policy_replicas: Some(chosen), ..Default::default() });
            replicas(&sp)
        };
        assert_eq!(with_policy(None, 3), 3);
        assert_eq!(with_policy(None, 9), 4, "clamped to maxReplicas");
        assert_eq!(with_policy(None, 1), 2, "clamped to minReplicas");
        assert_eq!(with_policy(Some(1), 3), 1, "spec.scaling.replicas (an HPA, kubectl scale) wins");
        let d = build(&pipeline(None, "ClusterIP"), &settings()).unwrap();
        assert_eq!(d.statefulset.spec.unwrap().replicas, Some(2), "no choice yet: the floor");
    }

    #[test]
    fn each_push_source_gets_a_service_selecting_its_owning_pod() {
        let sp = pipeline(Some(3), "NodePort");
        let d = build(&sp, &settings()).unwrap();
        assert_eq!(d.source_services.len(), 2);
        for (svc, source) in d.source_services.iter().zip(["a", "b"]) {
            let spec = svc.spec.as_ref().unwrap();
            let pod = &spec.selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"];
            assert_eq!(pod, &format!("fleet-dataplane-{}", shard::owner(source, 3)));
            assert_eq!(spec.type_.as_deref(), Some("NodePort"));
            assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        }
        let a_ports: Vec<i32> = d.source_services[0].spec.as_ref().unwrap().ports.as_ref().unwrap().iter().map(|p| p.port).collect();
        assert_eq!(a_ports, vec![5000, 5001], "RTP and RTCP");
        let b_ports = d.source_services[1].spec.as_ref().unwrap().ports.as_ref().unwrap().len();
        assert_eq!(b_ports, 1, "rtcp-mux needs one port");
    }

    #[test]
    fn a_rendition_groups_services_select_the_pod_that_owns_its_main_source() {
        // Names whose own hashes fall on different shards: only the group's
        // key keeps them together.
        let main = "a";
        let sub = (0..100).map(|i| format!("a-sub-{i}")).find(|n| shard::owner(n, 4) != shard::owner(main, 4)).unwrap();
        let mut sp = pipeline(Some(4), "ClusterIP");
        sp.spec.sources[1].name = sub.clone();
        sp.spec.sources[1].rendition_of = Some(main.into());
        let d = build(&sp, &settings()).unwrap();
        let pods: Vec<String> = d
            .source_services
            .iter()
            .map(|svc| svc.spec.as_ref().unwrap().selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"].clone())
            .collect();
        assert_eq!(pods, vec![format!("fleet-dataplane-{}", shard::owner(main, 4)); 2], "{sub} goes with {main}");
        let moving = crate::handover::moving(&sp, 4, 3);
        assert!(moving.is_empty() || moving.len() == 2, "a group moves whole: {moving:?}");
    }

    #[test]
    fn during_a_handover_the_statefulset_the_rendered_pipeline_and_the_services_follow_their_own_counts() {
        use crate::handover::Layout;
        let sp = pipeline(None, "ClusterIP");
        let layout = Layout { pods: 3, assign: 3, also_from: Some(1), route: 1 };
        let d = build_with(&sp, &settings(), layout).unwrap();
        assert_eq!(d.statefulset.spec.as_ref().unwrap().replicas, Some(3), "the new pods start");
        for svc in &d.source_services {
            let pod = &svc.spec.as_ref().unwrap().selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"];
            assert_eq!(pod, "fleet-dataplane-0", "every Service still routes by 1 replica");
        }
        let text = &d.config.data.as_ref().unwrap()[CONFIG_KEY];
        let rendered = zerodrop_crds::parse_manifests(text).unwrap().remove(0);
        assert_eq!(rendered.spec.scaling.replicas, Some(3));
        assert_eq!(rendered.metadata.annotations.unwrap()[shard::HANDOVER_FROM_ANNOTATION], "1");
        let settled = build_with(&sp, &settings(), Layout::settled(3)).unwrap();
        let text = &settled.config.data.as_ref().unwrap()[CONFIG_KEY];
        assert!(!text.contains(shard::HANDOVER_FROM_ANNOTATION), "no annotation once settled:\n{text}");
    }

    #[test]
    fn cluster_ip_services_keep_the_default_traffic_policy() {
        let d = build(&pipeline(Some(1), "ClusterIP"), &settings()).unwrap();
        assert_eq!(d.source_services[0].spec.as_ref().unwrap().external_traffic_policy, None);
    }

    #[test]
    fn rendered_config_listens_everywhere_and_carries_the_replica_count() {
        let sp = pipeline(None, "ClusterIP");
        let text = render_config(&sp, 4).unwrap();
        let parsed = zerodrop_crds::parse_manifests(&text).expect("the pods accept what the operator renders");
        assert_eq!(parsed[0].spec.scaling.replicas, Some(4));
        assert_eq!(parsed[0].spec.sources[0].transport.rtp.as_ref().unwrap().listen_address, "0.0.0.0");
    }

    #[test]
    fn the_same_pipeline_builds_the_same_objects() {
        let a = build(&pipeline(Some(2), "ClusterIP"), &settings()).unwrap();
        let b = build(&pipeline(Some(2), "ClusterIP"), &settings()).unwrap();
        assert_eq!(serde_json::to_value(&a.statefulset).unwrap(), serde_json::to_value(&b.statefulset).unwrap());
        assert_eq!(serde_json::to_value(&a.config).unwrap(), serde_json::to_value(&b.config).unwrap());
    }

    /// The pod declares every port its sources listen on, FEC included, and
    /// each source's Service forwards them, named by what they carry.
    #[test]
    fn fec_ports_are_declared_on_the_pod_and_forwarded_by_the_service() {
        let sp: StreamPipeline = serde_yaml::from_str(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: contribution, namespace: video, uid: 1}\n\
             spec:\n  sources:\n    - {name: studio, codec: h264, transport: {rtp: {port: 5004, fec: {scheme: st2022-1, ports: [5006, 5008]}}}}\n",
        )
        .unwrap();
        let d = build(&sp, &settings()).unwrap();
        let pod = d.statefulset.spec.unwrap().template.spec.unwrap();
        let udp: Vec<i32> = pod.containers[0]
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref() == Some("UDP"))
            .map(|p| p.container_port)
            .collect();
        assert_eq!(udp, [5004, 5005, 5006, 5008]);
        let service: Vec<(String, i32)> = d.source_services[0].spec.as_ref().unwrap().ports.iter().flatten()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect();
        assert_eq!(service, [("rtp".into(), 5004), ("rtcp".into(), 5005), ("fec-0".into(), 5006), ("fec-1".into(), 5008)]);
    }

    #[test]
    fn a_restreams_fixed_port_is_declared_on_the_pod() {
        let sp: StreamPipeline = serde_yaml::from_str(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {name: relay, namespace: video, uid: 1}\n\
             spec:\n  sources:\n    - {name: studio, codec: h264, transport: {rtp: {port: 5004}}, outputs: {restream: [{address: 10.0.0.7, port: 6004}], restreamLocalPort: 7004}}\n",
        )
        .unwrap();
        let d = build(&sp, &settings()).unwrap();
        let pod = d.statefulset.spec.unwrap().template.spec.unwrap();
        let udp: Vec<i32> =
            pod.containers[0].ports.iter().flatten().filter(|p| p.protocol.as_deref() == Some("UDP")).map(|p| p.container_port).collect();
        assert_eq!(udp, [5004, 5005, 7004]);
    }

    fn rtsp_pipeline(sources: &str) -> StreamPipeline {
        serde_yaml::from_str(&format!(
            "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: cams, namespace: video, uid: 1}}\n\
             spec:\n  sources:\n{sources}"
        ))
        .unwrap()
    }

    fn secret_volumes(d: &Desired) -> (Vec<Volume>, Vec<VolumeMount>) {
        let pod = d.statefulset.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let volumes = pod.volumes.unwrap().into_iter().filter(|v| v.secret.is_some()).collect();
        let mounts = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_path.starts_with(CREDENTIALS_MOUNT))
            .collect();
        (volumes, mounts)
    }

    /// A pulled source needs no Service and no port on the pod; its Secret is
    /// mounted read-only where the data plane reads it
    /// (`zerodrop_dataplane::ingest::rtsp::mounted_secret_dir`).
    #[test]
    fn an_rtsp_source_gets_no_service_port_and_its_secret_mounted_where_the_dataplane_reads_it() {
        let sp = rtsp_pipeline(
            "    - {name: door, codec: h264, transport: {rtsp: {url: \"rtsp://10.1.2.3:554/stream1\", credentialsSecret: {name: door-creds}}}}\n\
             \x20   - {name: yard, codec: h264, transport: {rtp: {port: 5004}}}\n",
        );
        let d = build(&sp, &settings()).unwrap();
        assert_eq!(d.source_services.len(), 1, "only the pushed source has a Service");
        assert_eq!(d.source_services[0].metadata.name.as_deref(), Some("cams-yard"));
        let pod = d.statefulset.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let udp: Vec<i32> =
            pod.containers[0].ports.iter().flatten().filter(|p| p.protocol.as_deref() == Some("UDP")).map(|p| p.container_port).collect();
        assert_eq!(udp, [5004, 5005], "the RTSP source declares no port");

        let (volumes, mounts) = secret_volumes(&d);
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].secret.as_ref().unwrap().secret_name.as_deref(), Some("door-creds"));
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].name, volumes[0].name);
        assert_eq!(mounts[0].mount_path, "/var/run/zerodrop/credentials/door-creds");
        assert_eq!(mounts[0].read_only, Some(true));
        // The config the pod reads still names the Secret, not its contents.
        let text = render_config(&sp, 1).unwrap();
        let parsed = zerodrop_crds::parse_manifests(&text).unwrap();
        assert_eq!(parsed[0].spec.sources[0].transport.rtsp.as_ref().unwrap().credentials_secret.as_ref().unwrap().name, "door-creds");

        let without = rtsp_pipeline("    - {name: door, codec: h264, transport: {rtsp: {url: \"rtsp://10.1.2.3/s\"}}}\n");
        let d = build(&without, &settings()).unwrap();
        assert!(d.source_services.is_empty());
        assert!(secret_volumes(&d).0.is_empty(), "no credentials, no volume");
    }

    #[test]
    fn an_srt_listener_gets_its_port_and_service_a_caller_none_and_both_mount_their_passphrase_secret() {
        let sp = rtsp_pipeline(
            "    - {name: studio, codec: h264, transport: {srt: {mode: listener, port: 9000, passphraseSecret: {name: srt-pass}}}}\n\
             \x20   - {name: remote, codec: h265, transport: {srt: {mode: caller, address: encoder.example, port: 9001, passphraseSecret: {name: srt-pass, key: remote}}}}\n",
        );
        let d = build(&sp, &settings()).unwrap();
        let services: Vec<_> = d.source_services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(services.len(), 1, "only the listener is reached from outside: {services:?}");
        let ports = d.source_services[0].spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!((ports[0].name.as_deref(), ports[0].port, ports[0].protocol.as_deref()), (Some("srt"), 9000, Some("UDP")));
        let pod = d.statefulset.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let container_ports: Vec<i32> = pod.containers[0].ports.iter().flatten().map(|p| p.container_port).collect();
        assert!(container_ports.contains(&9000) && !container_ports.contains(&9001), "{container_ports:?}");
        assert_eq!(credentials_secrets(&sp), [("srt-pass".to_string(), "studio".to_string())]);
        let mounts: Vec<_> = pod.containers[0].volume_mounts.iter().flatten().filter(|m| m.mount_path.starts_with(CREDENTIALS_MOUNT)).collect();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_path, "/var/run/zerodrop/credentials/srt-pass");
    }

    #[test]
    fn sources_sharing_a_secret_mount_it_once() {
        let sp = rtsp_pipeline(
            "    - {name: a, codec: h264, transport: {rtsp: {url: \"rtsp://10.0.0.1/a\", credentialsSecret: {name: nvr}}}}\n\
             \x20   - {name: b, codec: h265, transport: {rtsp: {url: \"rtsp://10.0.0.1/b\", credentialsSecret: {name: nvr, usernameKey: user-b, passwordKey: pass-b}}}}\n\
             \x20   - {name: c, codec: h264, transport: {rtsp: {url: \"rtsp://10.0.0.2/c\", credentialsSecret: {name: other.creds}}}}\n",
        );
        let d = build(&sp, &settings()).unwrap();
        let (volumes, mounts) = secret_volumes(&d);
        let secrets: Vec<&str> = volumes.iter().map(|v| v.secret.as_ref().unwrap().secret_name.as_deref().unwrap()).collect();
        assert_eq!(secrets, ["nvr", "other.creds"]);
        let paths: Vec<&str> = mounts.iter().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(paths, ["/var/run/zerodrop/credentials/nvr", "/var/run/zerodrop/credentials/other.creds"]);
        assert_eq!(credentials_secrets(&sp), [("nvr".to_string(), "a".to_string()), ("other.creds".to_string(), "c".to_string())]);
        let pod = d.statefulset.spec.unwrap().template.spec.unwrap();
        let mut names: Vec<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), pod.volumes.as_ref().unwrap().len(), "volume names are unique: {names:?}");
    }

    #[test]
    fn credentials_volume_names_are_unique_dns_labels() {
        let is_label = |n: &str| {
            n.len() <= 63
                && n.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !n.starts_with('-')
                && !n.ends_with('-')
        };
        // Short and plain, dotted, long ones sharing a prefix, and both sides
        // of the length where `cred-<name>` stops fitting.
        let names = ["nvr".to_string(), "my.secret".into(), "my-secret".into(), "a".repeat(200), format!("{}b", "a".repeat(199)), "x".repeat(58), "x".repeat(59)];
        let volumes: Vec<String> = names.iter().map(|n| credentials_volume_name(n)).collect();
        for v in &volumes {
            assert!(is_label(v), "{v:?} is a DNS label");
        }
        assert_eq!(volumes[0], "cred-nvr");
        let mut distinct = volumes.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), volumes.len(), "{volumes:?}");
    }

    #[test]
    fn a_source_without_a_transport_or_with_a_bad_secret_name_is_refused() {
        let none = rtsp_pipeline("    - {name: a, codec: h264, transport: {}}\n");
        assert!(matches!(build(&none, &settings()), Err(BuildError::NoTransport { index: 0 })));
        let both = rtsp_pipeline("    - {name: a, codec: h264, transport: {rtp: {port: 5004}, rtsp: {url: \"rtsp://10.0.0.1/a\"}}}\n");
        assert!(matches!(build(&both, &settings()), Err(BuildError::TwoTransports { index: 0 })));
        for bad in ["../../etc", "Caps", "a/b", "-a", "a..b"] {
            let sp = rtsp_pipeline(&format!(
                "    - {{name: a, codec: h264, transport: {{rtsp: {{url: \"rtsp://10.0.0.1/a\", credentialsSecret: {{name: \"{bad}\"}}}}}}}}\n"
            ));
            assert!(matches!(build(&sp, &settings()), Err(BuildError::SecretName { index: 0, .. })), "{bad:?} refused");
        }
    }
}
