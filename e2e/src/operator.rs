//! A real `zerodrop-operator` process against a [`crate::cluster::TestCluster`],
//! with its `/metrics` at hand.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use crate::cluster::TestCluster;
use crate::runner::{metric_value, zerodrop_bin};
use zerodrop_telemetry::get as http_get;

/// The repository's file at `path`.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

pub fn operator_bin() -> PathBuf {
    zerodrop_bin().with_file_name("zerodrop-operator")
}

/// Applies the StreamPipeline CRD and waits until the apiserver serves it.
pub fn install_crd(cluster: &TestCluster) -> anyhow::Result<()> {
    cluster.kubectl_ok(["apply", "-f", repo("crds/streampipeline.crd.yaml").to_str().unwrap()])?;
    cluster.kubectl_ok(["wait", "--for=condition=Established", "crd/streampipelines.zerodrop.dev", "--timeout=60s"])?;
    Ok(())
}

/// The operator, killed on drop; it logs to `log` in the cluster's directory.
pub struct OperatorProcess {
    child: Child,
    pub metrics: String,
}

impl OperatorProcess {
    /// Starts it with leader election, serving metrics on 127.0.0.1:`port`,
    /// with `extra` flags.
    pub fn start(cluster: &TestCluster, port: u16, log: &str, extra: &[&str]) -> OperatorProcess {
        Self::start_as(cluster, cluster.kubeconfig(), port, log, extra)
    }

    /// Like [`OperatorProcess::start`], authenticating with `kubeconfig`
    /// (e.g. a ServiceAccount token's, [`TestCluster::token_kubeconfig`]).
    pub fn start_as(cluster: &TestCluster, kubeconfig: &std::path::Path, port: u16, log: &str, extra: &[&str]) -> OperatorProcess {
        let log = std::fs::File::create(cluster.dir().join(log)).unwrap();
        let child = Command::new(operator_bin())
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--dataplane-image", "zerodrop:e2e"])
            .args(["--leader-election", "--lease-namespace", "default"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("zerodrop-operator starts (cargo build --workspace first)");
        OperatorProcess { child, metrics: format!("127.0.0.1:{port}") }
    }

    /// The process id, e.g. for its memory in `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The operator's `/metrics` text, if it answers.
    pub fn metrics_text(&self) -> Option<String> {
        http_get(self.metrics.parse().unwrap(), "/metrics").ok().map(|r| r.body)
    }

    /// A series' value (`needles`: label pairs it must contain).
    pub fn metric(&self, name: &str, needles: &[&str]) -> Option<f64> {
        self.metrics_text().and_then(|m| metric_value(&m, name, needles))
    }

    pub fn writes(&self) -> f64 {
        self.metric("zerodrop_operator_api_writes_total", &[]).unwrap_or(-1.0)
    }

    pub fn reconciles(&self) -> f64 {
        self.metric("zerodrop_operator_reconciles_total", &["result=\"ok\""]).unwrap_or(0.0)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the control-plane cache's `helm` against `cluster`, from the
/// repository root, with its state in the cluster's directory.
pub fn helm(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<String> {
    let home = cluster.dir().join("helm");
    let out = Command::new(cluster.bin_dir().join("helm"))
        .args(args)
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(repo(""))
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "helm {args:?} failed:\n{text}");
    Ok(text)
}

/// A kubeconfig holding a token of ServiceAccount `namespace/name` (as the
/// chart creates it), written as `file` in the cluster's directory.
pub fn service_account_kubeconfig(cluster: &TestCluster, namespace: &str, name: &str, file: &str) -> anyhow::Result<PathBuf> {
    let token = cluster.kubectl_ok(["create", "token", name, "-n", namespace, "--duration=4h"])?;
    cluster.token_kubeconfig(file, token.trim())
}

/// `kubectl get … -o json`, parsed.
pub fn kubectl_json(cluster: &TestCluster, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cluster.kubectl_ok(all).unwrap()).unwrap()
}

/// A one-stream pipeline with the smallest receive buffer the API allows, so
/// that a shard that stalls for a moment overflows it. `replicas`: a fixed
/// count (another owner), or `None` for the policy's.
pub fn stall_prone_pipeline(name: &str, port: u16, max_replicas: u32, replicas: Option<i32>) -> String {
    let fixed = replicas.map(|r| format!(", replicas: {r}")).unwrap_or_default();
    format!(
        "apiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: {name}}}\nspec:\n  \
         scaling: {{minReplicas: 1, maxReplicas: {max_replicas}{fixed}}}\n  decode: {{decoder: software}}\n  sources:\n    \
         - {{name: cam-0, codec: h264, transport: {{rtp: {{listenAddress: 127.0.0.1, port: {port}, receiveBufferBytes: 65536}}}}}}\n"
    )
}

/// A data-plane pod (shard 0) as a host process bound to the pod's IP:
/// kwok must hand out loopback pod IPs (`ClusterOptions::pod_cidr` in
/// 127.0.0.0/8), so that the operator, which scrapes `podIP:9464`, reads it.
pub struct PodProcess {
    child: Child,
}

impl PodProcess {
    /// Waits for the pod's IP and the rendered ConfigMap, then runs shard 0.
    pub fn start(cluster: &TestCluster, pipeline: &str) -> anyhow::Result<PodProcess> {
        let pod = format!("{pipeline}-dataplane-0");
        let ip = cluster.wait_for(&format!("{pod} to have an IP"), Duration::from_secs(60), || {
            let out = cluster.kubectl(["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]);
            Ok((out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })?;
        assert!(ip.starts_with("127.1."), "kwok gives loopback pod IPs here: {ip}");
        let config = cluster.wait_for("the rendered ConfigMap", Duration::from_secs(60), || {
            let out = cluster.kubectl(["get", "configmap", &format!("{pipeline}-config"), "-o", "jsonpath={.data.pipeline\\.yaml}"]);
            Ok((out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })?;
        let file = cluster.dir().join(format!("{pipeline}.yaml"));
        std::fs::write(&file, config)?;
        let log = std::fs::File::create(cluster.dir().join(format!("{pod}.log")))?;
        let metrics = format!("{ip}:9464");
        let child = Command::new(zerodrop_bin())
            .args(["pod", "--config"])
            .arg(&file)
            .args(["--pod-name", &pod, "--metrics-addr", &metrics, "--kernel-drops", "procfs", "--no-decode"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let process = PodProcess { child };
        cluster.wait_for(&format!("{pod} ready"), Duration::from_secs(30), || {
            Ok(http_get(metrics.parse()?, "/readyz").is_ok_and(|r| r.status == 200).then_some(()))
        })?;
        Ok(process)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Stalls the process, fills its socket past the receive buffer, and
    /// lets it go on: the kernel drops what did not fit.
    pub fn stall_and_flood(&self, port: u16) {
        self.stall_and_flood_to(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }

    /// [`PodProcess::stall_and_flood`] towards `dest` (e.g. the pod's IP,
    /// as a sender in a cluster would reach it).
    pub fn stall_and_flood_to(&self, dest: std::net::SocketAddr) {
        self.signal(libc::SIGSTOP);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let datagram = [0u8; 1200];
        for _ in 0..2000 {
            let _ = socket.send_to(&datagram, dest);
        }
        self.signal(libc::SIGCONT);
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `n` StreamPipelines `cam-0000`.. in namespace `fleet`, one source each
/// (RTP on port 5004), as one multi-document YAML: the fleet benchmarks'
/// input.
pub fn fleet_yaml(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s += &format!(
            "---\napiVersion: zerodrop.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: cam-{i:04}, namespace: fleet}}\nspec:\n  \
             scaling: {{minReplicas: 1, maxReplicas: 4}}\n  decode: {{decoder: software}}\n  sources:\n    \
             - {{name: cam, codec: h264, transport: {{rtp: {{port: 5004}}}}}}\n"
        );
    }
    s
}

/// For a benchmark binary: the operator and `zerodrop` it runs are the ones
/// built beside it (a release build), not the debug ones the tests use.
/// Call before any thread is started.
pub fn use_release_binaries_beside_this_one() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench binary has no directory")?;
    anyhow::ensure!(
        dir.join("zerodrop-operator").exists(),
        "{} not found: cargo build --release -p zerodrop -p zerodrop-operator first",
        dir.join("zerodrop-operator").display()
    );
    if std::env::var_os("ZERODROP_BIN").is_none() {
        // SAFETY: the caller starts no thread before this; the e2e helpers read it.
        unsafe { std::env::set_var("ZERODROP_BIN", dir.join("zerodrop")) };
    }
    Ok(())
}

/// The chart installed in `namespace` with no in-cluster operator and no
/// agents (the benchmark runs the operator itself), its CRD established, and
/// the namespace `fleet` for [`fleet_yaml`]'s pipelines.
pub fn install_chart_for_a_fleet(cluster: &TestCluster, namespace: &str) -> anyhow::Result<()> {
    helm(
        cluster,
        &["install", "zerodrop", "charts/zerodrop", "--namespace", namespace, "--create-namespace", "--set", "operator.replicas=0,agent.enabled=false"],
    )?;
    cluster.kubectl_ok(["wait", "--for=condition=Established", "crd/streampipelines.zerodrop.dev", "--timeout=60s"])?;
    cluster.kubectl_ok(["create", "namespace", "fleet"])?;
    Ok(())
}
