//! The Helm chart (`charts/zerodrop`): `helm lint --strict`, `helm template`
//! with the defaults and with all monitoring on, and checks on what it
//! renders: the CRD is the generated one, the agent is not privileged and adds
//! exactly CAP_BPF and CAP_PERFMON, the operator's RBAC covers what it calls,
//! and every metric the dashboard and the alert rules query is one the code
//! registers (so renaming a metric without updating the chart fails here).
//!
//! Needs `helm`: from the control-plane cache (`scripts/controlplane.sh
//! build` puts it there), else from PATH.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const CHART: &str = "charts/zerodrop";
const NAMESPACE: &str = "zerodrop-system";
const MONITORING_APIS: [&str; 3] =
    ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule"];
const ALL_MONITORING: &str = "monitoring.serviceMonitor.enabled=true,monitoring.rules.enabled=true,monitoring.dashboards.enabled=true";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e has a parent").to_path_buf()
}

// ---------------------------------------------------------------- helm ----

/// `helm` from the control-plane cache, else from PATH.
fn helm_bin() -> PathBuf {
    if let Ok(dir) = zerodrop_e2e::cluster::controlplane_bin() {
        let helm = dir.join("helm");
        if helm.is_file() {
            return helm;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let helm = dir.join("helm");
            if helm.is_file() {
                return helm;
            }
        }
    }
    panic!(
        "helm is not installed: it is neither in the control-plane cache ({}) nor on PATH.\n\
         Run `scripts/controlplane.sh build` first (it fetches kubectl and helm into the cache).",
        zerodrop_e2e::cluster::controlplane_bin().map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string())
    );
}

/// Runs helm in the repository root with its caches in a temporary
/// directory; returns stdout, panics with stderr on failure.
fn helm(args: &[&str]) -> String {
    let home = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(helm_bin())
        .args(args)
        .current_dir(repo())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("helm runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every YAML document of `text`, nulls (empty documents) left out. Fails on
/// duplicate keys, as the apiserver's strict decoding would warn.
fn yaml_docs(text: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template` of the chart with `extra` arguments, parsed.
fn render(extra: &[&str]) -> Vec<Yaml> {
    let mut args = vec!["template", "zd", CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    yaml_docs(&helm(&args))
}

fn render_all_monitoring() -> Vec<Yaml> {
    let mut args = vec!["--set", ALL_MONITORING];
    for api in MONITORING_APIS {
        args.extend(["--api-versions", api]);
    }
    render(&args)
}

fn kind(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn of_kind<'a>(docs: &'a [Yaml], k: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn one<'a>(docs: &'a [Yaml], k: &str) -> &'a Yaml {
    let found = of_kind(docs, k);
    assert_eq!(found.len(), 1, "expected exactly one {k}, found {}", found.len());
    found[0]
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn containers(workload: &Yaml) -> &[Yaml] {
    workload["spec"]["template"]["spec"]["containers"].as_sequence().map(Vec::as_slice).expect("a pod template with containers")
}

fn env_var<'a>(container: &'a Yaml, name: &str) -> &'a Yaml {
    container["env"]
        .as_sequence()
        .and_then(|env| env.iter().find(|e| e["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("container {} has no env {name}", container["name"].as_str().unwrap_or("?")))
}

/// Whether a ClusterRole grants `verb` on `resource` of API group `group`.
fn grants(role: &Yaml, group: &str, resource: &str, verb: &str) -> bool {
    role["rules"].as_sequence().into_iter().flatten().any(|rule| {
        strings(&rule["apiGroups"]).iter().any(|g| g == group)
            && strings(&rule["resources"]).iter().any(|r| r == resource)
            && strings(&rule["verbs"]).iter().any(|v| v == verb)
    })
}

// ------------------------------------------------------------- metrics ----

/// A string literal starting at `s[0] == '"'`: its value and the rest after it.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &body[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// The first string literal argument of every call `marker("…"` in `src`
/// (whitespace allowed before the literal), with the text of the call up to
/// its terminating `;`.
fn call_literals<'a>(src: &'a str, marker: &str) -> Vec<(String, &'a str)> {
    let mut found = Vec::new();
    for (at, _) in src.match_indices(marker) {
        let rest = &src[at + marker.len()..];
        if let Some((name, _)) = string_literal(rest.trim_start()) {
            let end = rest.find(';').unwrap_or(rest.len());
            found.push((name, &rest[..end]));
        }
    }
    found
}

/// The suffix prometheus-client appends for `Unit::X`.
fn unit_suffix(call: &str) -> Option<&'static str> {
    let unit = call.split("Unit::").nth(1)?;
    let name: String = unit.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
    Some(match name.as_str() {
        "Amperes" => "amperes",
        "Bytes" => "bytes",
        "Celsius" => "celsius",
        "Grams" => "grams",
        "Joules" => "joules",
        "Meters" => "meters",
        "Ratios" => "ratios",
        "Seconds" => "seconds",
        "Volts" => "volts",
        other => panic!("the test does not know prometheus-client's Unit::{other}; add it to unit_suffix"),
    })
}

/// Metric names registered through a prometheus-client `Registry`:
/// `<prefix>_<name>[_<unit>]` for each `register`/`register_with_unit` call.
fn registry_metrics(file: &str) -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"));
    let prefix = call_literals(&src, "Registry::with_prefix(").first().map(|(p, _)| format!("{p}_")).unwrap_or_default();
    let mut names = BTreeSet::new();
    for (name, _) in call_literals(&src, ".register(") {
        names.insert(format!("{prefix}{name}"));
    }
    for (name, call) in call_literals(&src, ".register_with_unit(") {
        let unit = unit_suffix(call).unwrap_or_else(|| panic!("{file}: register_with_unit(\"{name}\") without a Unit::"));
        names.insert(format!("{prefix}{name}_{unit}"));
    }
    assert!(!names.is_empty(), "{file}: found no register/register_with_unit calls; has the metrics code moved?");
    names
}

/// Metric names a `Collector` encodes: `encode_descriptor("…"` literals, and
/// `format!("zerodrop_…{stem}")` names expanded over the `(procfs, stem)`
/// pairs of the const array the loop `for (_, stem) in ARRAY` iterates.
fn collector_metrics(file: &str) -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"));
    let mut names: BTreeSet<String> = call_literals(&src, "encode_descriptor(").into_iter().map(|(n, _)| n).collect();
    for (template, _) in call_literals(&src, "format!(") {
        let Some(open) = template.find('{') else { continue };
        if !template.starts_with("zerodrop_") {
            continue;
        }
        let close = template[open..].find('}').map(|c| open + c).expect("a closed placeholder");
        let var = &template[open + 1..close];
        // `for (<a>, <var>) in <ARRAY>` → the array's tuples' second literals.
        let array = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix("for ("))
            .find_map(|l| {
                let (pattern, rest) = l.split_once(')')?;
                if pattern.split(',').nth(1)?.trim() != var {
                    return None;
                }
                Some(rest.trim().strip_prefix("in ")?.trim_end_matches('{').trim().to_owned())
            })
            .unwrap_or_else(|| panic!("{file}: cannot find the loop that fills {{{var}}} in {template:?}; update collector_metrics"));
        let decl = src.find(&format!("const {array}")).unwrap_or_else(|| panic!("{file}: no const {array}"));
        let body = &src[decl..decl + src[decl..].find("];").expect("the array ends")];
        let mut stems = 0;
        for tuple in body.split('(').skip(1) {
            let literals: Vec<String> =
                tuple.split(',').filter_map(|part| string_literal(part.trim()).map(|(s, _)| s)).collect();
            if let [_, stem] = literals.as_slice() {
                names.insert(format!("{}{}{}", &template[..open], stem, &template[close + 1..]));
                stems += 1;
            }
        }
        assert!(stems > 0, "{file}: const {array} has no (\"…\", \"…\") pairs");
    }
    assert!(!names.is_empty(), "{file}: found no encode_descriptor calls; has the metrics code moved?");
    names
}

/// Every metric family name the code exports, without the `_total`,
/// `_bucket`, … series suffixes.
fn exported_metrics() -> BTreeSet<String> {
    let mut all = registry_metrics("dataplane/src/metrics.rs");
    all.extend(registry_metrics("operator/src/metrics.rs"));
    all.extend(collector_metrics("ebpf/src/metrics.rs"));
    all
}

/// Whether `series` (a name as a query uses it) belongs to an exported family.
fn is_exported(series: &str, families: &BTreeSet<String>) -> bool {
    const SUFFIXES: [&str; 7] = ["", "_total", "_bucket", "_sum", "_count", "_created", "_info"];
    families.iter().any(|f| SUFFIXES.iter().any(|s| series.strip_prefix(f.as_str()) == Some(s)))
}

/// The `zerodrop_…` metric names a PromQL expression mentions.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in expr.match_indices("zerodrop_") {
        let before = expr[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let name: String = expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        names.insert(name);
    }
    names
}

/// Every PromQL string of a Grafana dashboard: panel `expr`s and the
/// templating variables' `query`/`definition`.
fn dashboard_queries(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Json::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

fn assert_all_exported(what: &str, queries: &[String]) {
    let families = exported_metrics();
    let used: BTreeSet<String> = queries.iter().flat_map(|q| promql_metrics(q)).collect();
    assert!(!used.is_empty(), "{what} queries no zerodrop_ metric");
    let unknown: Vec<&String> = used.iter().filter(|m| !is_exported(m, &families)).collect();
    assert!(
        unknown.is_empty(),
        "{what} queries metrics the code does not export: {unknown:?}\nexported families: {families:?}"
    );
}

// --------------------------------------------------------------- tests ----

#[test]
fn chart_lints_strictly() {
    helm(&["lint", CHART, "--strict"]);
    helm(&["lint", CHART, "--strict", "--set", ALL_MONITORING]);
}

#[test]
fn chart_app_version_is_the_workspace_version() {
    let chart: Yaml = serde_yaml::from_str(&std::fs::read_to_string(repo().join(CHART).join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")), "Chart.yaml appVersion must follow the workspace version");
}

#[test]
fn chart_crd_is_the_generated_crd_kept_on_uninstall() {
    let source = std::fs::read_to_string(repo().join("crds/streampipeline.crd.yaml")).unwrap();
    let copy = std::fs::read_to_string(repo().join(CHART).join("files/streampipeline.crd.yaml")).unwrap();
    assert!(
        source == copy,
        "charts/zerodrop/files/streampipeline.crd.yaml differs from crds/streampipeline.crd.yaml; \
         copy it: cp crds/streampipeline.crd.yaml charts/zerodrop/files/"
    );
    // And helm installs exactly that, as a template (upgraded with the
    // release), with the chart's labels and the keep policy.
    let docs = render(&[]);
    let rendered = one(&docs, "CustomResourceDefinition");
    let expected: Yaml = serde_yaml::from_str(&source).unwrap();
    assert_eq!(rendered["spec"], expected["spec"], "the CRD helm renders is not crds/streampipeline.crd.yaml");
    assert_eq!(rendered["metadata"]["name"], expected["metadata"]["name"]);
    assert_eq!(rendered["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(), Some("keep"));
    assert_eq!(rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"].as_str(), Some("Helm"));
    // Where the CRD is managed elsewhere, the chart leaves it out.
    let docs = render(&["--set", "crds.install=false"]);
    assert!(of_kind(&docs, "CustomResourceDefinition").is_empty());
}

#[test]
fn bad_values_fail_with_the_field_named() {
    for (set, field) in [
        ("operator.replicas=-1", "/operator/replicas"),
        ("agent.mode=bpf", "/agent/mode"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("monitoring.serviceMonitor.interval=soon", "/monitoring/serviceMonitor/interval"),
        ("operater.replicas=1", "operater"),
    ] {
        let out = Command::new(helm_bin())
            .args(["template", "zd", repo().join(CHART).to_str().unwrap(), "--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} must be refused");
        assert!(stderr.contains(field), "--set {set}: the error names {field}: {stderr}");
    }
}

#[test]
fn defaults_render_operator_agent_and_rbac_only() {
    let docs = render(&[]);
    let mut kinds: Vec<&str> = docs.iter().map(kind).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet", "Deployment", "Service", "Service", "ServiceAccount"],
        "objects rendered with default values"
    );
}

#[test]
fn agent_is_not_privileged_and_adds_exactly_bpf_and_perfmon() {
    let docs = render(&[]);
    let ds = one(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    assert_ne!(pod["hostPID"].as_bool(), Some(true), "the agent needs no hostPID");
    assert!(
        pod["volumes"].as_sequence().into_iter().flatten().all(|v| v["hostPath"].is_null()),
        "no host mounts by default: {:?}",
        pod["volumes"]
    );
    assert!(
        pod["tolerations"].as_sequence().into_iter().flatten().any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null()),
        "the agent must tolerate every taint to run on every node"
    );
    for c in containers(ds).iter().chain(pod["initContainers"].as_sequence().into_iter().flatten()) {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"].as_bool(), Some(true), "agent container {:?} is privileged", c["name"]);
        let add: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().map(|c| c.trim_start_matches("CAP_").to_owned()).collect();
        assert_eq!(add, BTreeSet::from(["BPF".to_owned(), "PERFMON".to_owned()]), "capabilities added to {:?}", c["name"]);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    }
    let agent = &containers(ds)[0];
    assert!(strings(&agent["command"]).iter().any(|c| c.ends_with("zerodrop-agent")), "{:?}", agent["command"]);
    assert!(agent["ports"].as_sequence().unwrap().iter().any(|p| p["containerPort"].as_i64() == Some(9410)));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"].as_str(), Some("/healthz"), "{probe}");
    }

    // The seccomp profile is configurable; disabling removes the DaemonSet.
    let docs = render(&["--set", "agent.seccompProfile.type=Unconfined"]);
    let sc = &containers(one(&docs, "DaemonSet"))[0]["securityContext"];
    assert_eq!(sc["seccompProfile"]["type"].as_str(), Some("Unconfined"));
    let docs = render(&["--set", "agent.enabled=false"]);
    assert!(of_kind(&docs, "DaemonSet").is_empty(), "agent.enabled=false still renders a DaemonSet");
    assert_eq!(of_kind(&docs, "Service").len(), 1, "only the operator's metrics Service without the agent");
}

#[test]
fn operator_deployment_runs_leader_elected_and_locked_down() {
    let docs = render(&[]);
    let deploy = one(&docs, "Deployment");
    assert_eq!(deploy["spec"]["replicas"].as_i64(), Some(2));
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(65532));
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    let c = &containers(deploy)[0];
    let image = format!("ghcr.io/zerodrop-dev/zerodrop:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(c["image"].as_str(), Some(image.as_str()));
    assert!(strings(&c["command"]).iter().any(|s| s.ends_with("zerodrop-operator")), "{:?}", c["command"]);
    assert!(strings(&c["args"]).iter().any(|a| a == "--leader-election"), "{:?}", c["args"]);
    assert_eq!(env_var(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.name"));
    assert_eq!(env_var(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.namespace"));
    assert_eq!(env_var(c, "ZERODROP_DATAPLANE_IMAGE")["value"].as_str(), Some(image.as_str()));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(c["ports"].as_sequence().unwrap().iter().any(|p| p["containerPort"].as_i64() == Some(8080) && p["name"].as_str() == Some("metrics")));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));

    // The binding gives the role to the ServiceAccount the pods run as.
    let binding = one(&docs, "ClusterRoleBinding");
    let role = one(&docs, "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(subject["name"], pod["serviceAccountName"]);
    assert_eq!(subject["namespace"].as_str(), Some(NAMESPACE));
    assert_eq!(one(&docs, "ServiceAccount")["metadata"]["name"], pod["serviceAccountName"]);

    // Two replicas without leader election would both reconcile.
    let out = Command::new(helm_bin())
        .args(["template", "zd", CHART, "--set", "operator.leaderElection=false"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!out.status.success(), "replicas=2 without leader election must not render");
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaderElection"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn operator_cluster_role_grants_what_the_operator_calls_and_no_wildcards() {
    let docs = render(&[]);
    let role = one(&docs, "ClusterRole");
    for rule in role["rules"].as_sequence().unwrap() {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(!strings(&rule[field]).iter().any(|s| s == "*"), "wildcard in {field}: {rule:?}");
        }
    }
    // The e2e test chart_install.rs proves this list on the real apiserver
    // (used == granted, from the audit log); here it is checked at render time.
    let needed: &[(&str, &str, &[&str])] = &[
        // the controller's cache, and status by server-side apply (patch)
        ("zerodrop.dev", "streampipelines", &["list", "watch"]),
        ("zerodrop.dev", "streampipelines/status", &["patch"]),
        // owned objects: caches, server-side apply, prune
        ("apps", "statefulsets", &["list", "watch", "create", "patch", "delete"]),
        ("", "services", &["list", "watch", "create", "patch", "delete"]),
        ("", "configmaps", &["list", "watch", "create", "patch", "delete"]),
        ("policy", "poddisruptionbudgets", &["list", "watch", "create", "patch", "delete"]),
        // the event Recorder
        ("events.k8s.io", "events", &["create", "patch"]),
        // leader election (kube-lease-manager)
        ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
        // the control loop's pod watch (pod IPs to scrape /metrics)
        ("", "pods", &["list", "watch"]),
        // whether an RTSP source's credentials Secret exists (metadata only)
        ("", "secrets", &["get"]),
    ];
    let mut missing = Vec::new();
    for (group, resource, verbs) in needed {
        for verb in *verbs {
            if !grants(role, group, resource, verb) {
                missing.push(format!("{verb} {resource}.{group}"));
            }
        }
    }
    assert!(missing.is_empty(), "the operator's ClusterRole lacks: {missing:?}");
    // It asks for Secrets by name only (never lists or watches them), and only reads Pods.
    for verb in ["list", "watch", "create", "update", "patch", "delete"] {
        assert!(!grants(role, "", "secrets", verb), "{verb} secrets should not be granted");
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(!grants(role, "", "pods", verb), "{verb} pods should not be granted");
    }
}

#[test]
fn monitoring_renders_monitors_rules_and_the_dashboard() {
    let docs = render_all_monitoring();
    assert_eq!(of_kind(&docs, "ServiceMonitor").len(), 2, "ServiceMonitors for the operator and the agent");
    let pm = one(&docs, "PodMonitor");
    assert_eq!(pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str(), Some("zerodrop-dataplane"));
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(), Some("metrics"));

    // The dashboard: in a ConfigMap the Grafana sidecar finds, the same JSON as the file.
    let cm = one(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
    let text = cm["data"]["zerodrop.json"].as_str().expect("the ConfigMap holds zerodrop.json");
    let dashboard: Json = serde_json::from_str(text).unwrap_or_else(|e| panic!("the dashboard JSON does not parse: {e}"));
    let file: Json = serde_json::from_str(&std::fs::read_to_string(repo().join(CHART).join("dashboards/zerodrop.json")).unwrap()).unwrap();
    assert_eq!(dashboard, file, "the ConfigMap's dashboard differs from charts/zerodrop/dashboards/zerodrop.json");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert_all_exported("the Grafana dashboard", &queries);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| promql_metrics(q)).collect();
    for wanted in [
        "zerodrop_frames_decoded_total",
        "zerodrop_frames_dropped_total",
        "zerodrop_frames_expected_total",
        "zerodrop_rtp_packets_lost_total",
        "zerodrop_rtp_packets_recovered_total",
        "zerodrop_rtp_packets_unrecovered_total",
        "zerodrop_nacks_sent_total",
        "zerodrop_interarrival_jitter_seconds",
        "zerodrop_round_trip_time_seconds",
        "zerodrop_frame_latency_seconds_bucket",
        "zerodrop_gop_interval_seconds",
        "zerodrop_decoder_info",
        "zerodrop_kernel_udp_drops_total",
        "zerodrop_operator_reconciles_total",
    ] {
        assert!(used.contains(wanted), "the dashboard has no panel on {wanted}");
    }
    assert!(
        queries.iter().any(|q| q.contains("histogram_quantile(0.99") && q.contains("zerodrop_frame_latency_seconds_bucket")),
        "the dashboard shows no frame latency p99"
    );
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_i64().expect("panel id")), "duplicate panel id {}", panel["id"]);
    }

    // The alert rules.
    let rule = one(&docs, "PrometheusRule");
    let mut exprs = Vec::new();
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().expect("rule groups") {
        for r in group["rules"].as_sequence().expect("rules") {
            exprs.push(r["expr"].as_str().expect("an expr").to_owned());
            alerts.insert(r["alert"].as_str().expect("an alert name").to_owned());
        }
    }
    assert_all_exported("the PrometheusRule", &exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|q| promql_metrics(q)).collect();
    for wanted in ["zerodrop_frames_dropped_total", "zerodrop_frames_expected_total", "zerodrop_stream_up", "zerodrop_kernel_udp_drops_total", "zerodrop_operator_reconciles_total"] {
        assert!(used.contains(wanted), "no alert on {wanted}");
    }
    assert!(alerts.contains("ZeroDropFramesDropped") && alerts.contains("ZeroDropStreamDown"), "{alerts:?}");
}

#[test]
fn monitoring_objects_need_the_prometheus_operator_api() {
    let docs = render(&["--set", ALL_MONITORING]);
    let monitoring: Vec<&str> =
        docs.iter().filter(|d| d["apiVersion"].as_str().is_some_and(|a| a.starts_with("monitoring.coreos.com/"))).map(kind).collect();
    assert!(monitoring.is_empty(), "rendered {monitoring:?} although the cluster serves no monitoring.coreos.com/v1");
    assert_eq!(of_kind(&docs, "ConfigMap").len(), 1, "the dashboard ConfigMap needs no extra API");
}

#[test]
fn metric_scan_finds_the_known_families() {
    // Guards the scanner itself: were it to find nothing, the dashboard check
    // above would be meaningless.
    let families = exported_metrics();
    for known in [
        "zerodrop_frames_dropped",
        "zerodrop_frame_latency_seconds",
        "zerodrop_rtp_received_bytes",
        "zerodrop_stream_up",
        "zerodrop_kernel_udp_drops",
        "zerodrop_kernel_udp_drop_source_info",
        "zerodrop_node_udp_rcvbuf_errors",
        "zerodrop_operator_reconciles",
        "zerodrop_operator_reconcile_duration_seconds",
    ] {
        assert!(families.contains(known), "{known} not found among {families:?}");
    }
    assert!(is_exported("zerodrop_frame_latency_seconds_bucket", &families));
    assert!(!is_exported("zerodrop_frame_latency_bucket", &families));
    assert!(!is_exported("zerodrop_frames_droped_total", &families));
    assert_eq!(
        promql_metrics("sum(rate(zerodrop_a_total{x=\"y\"}[5m])) / rate(foo_zerodrop_b[1m])"),
        BTreeSet::from(["zerodrop_a_total".to_owned()])
    );
}
