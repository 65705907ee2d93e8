//! The objects a `StreamPipeline` should have, built as a pure function of
//! the pipeline and the replica count: no client, no clock. The reconcile
//! applies them with server-side apply; tests check them as plain structs.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
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

/// Settings of the operator that shape the objects, separate from the spec.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub dataplane_image: String,
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

/// The replica count to run: what `kubectl scale` / an HPA set through the
/// scale subresource (`spec.scaling.replicas`); else what the control policy
/// chose (`status.policyReplicas`) within minReplicas..maxReplicas; else the
/// floor, minReplicas.
pub fn replicas(sp: &StreamPipeline) -> i32 {
    let s = &sp.spec.scaling;
    let chosen = sp.status.as_ref().and_then(|st| st.policy_replicas);
    zerodrop_core::scaling::replicas(s.replicas, chosen, s.min_replicas, s.max_replicas)
}

pub fn build(sp: &StreamPipeline, settings: &BuildSettings) -> Result<Desired, BuildError> {
    let name = sp.metadata.name.clone().ok_or(BuildError::Unnamed)?;
    let namespace = sp.metadata.namespace.clone().ok_or(BuildError::Unnamed)?;
    let replicas = replicas(sp);
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

    let config = ConfigMap {
        metadata: meta(format!("{name}-config"), &[]),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), render_config(sp, replicas)?)])),
        ..ConfigMap::default()
    };

    let sts_name = statefulset_name(&name);
    let pod_labels = labels.clone();
    let statefulset = StatefulSet {
        metadata: meta(sts_name.clone(), &[]),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
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
    for (index, source) in sp.spec.sources.iter().enumerate() {
        let rtp = source.transport.rtp.as_ref().ok_or(BuildError::NoTransport { index })?;
        let owner_pod = format!("{sts_name}-{}", shard::owner(&source.name, replicas));
        let ports = rtp.ports().roles().into_iter().map(|(role, port)| udp_port(&role.name(), port)).collect();
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
    // A restream's fixed port, on which its receivers' RTCP comes back.
    for port in sp.spec.sources.iter().filter_map(|s| s.outputs.as_ref()?.restream_local_port) {
        ports.push(ContainerPort { container_port: i32::from(port), protocol: Some("UDP".into()), ..Default::default() });
    }
    let resources = sp.spec.resources.as_ref().map(|r| ResourceRequirements {
        requests: quantities(&r.requests),
        limits: quantities(&r.limits),
        ..ResourceRequirements::default()
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
            ]),
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
        ]),
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
        BuildSettings { dataplane_image: "ghcr.io/zerodrop/dataplane:test".into() }
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
}
