//! A real `zerodrop-operator` process against a [`crate::cluster::TestCluster`],
//! with its `/metrics` at hand.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A data-plane pod as a host process serving its metrics on the pod's IP,
/// so that the operator, which reads `podIP:9464`, reads it. kwok hands out
/// the IPs: loopback ones (`ClusterOptions::pod_cidr` in 127.0.0.0/8), or,
/// with the cluster's Service proxy, a range this host treats as local.
pub struct PodProcess {
    child: Child,
    /// The pod's IP.
    pub ip: String,
    /// Stops the config follower.
    following: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// How [`PodProcess::start_with`] runs a pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodOptions {
    /// The StatefulSet ordinal (the shard).
    pub ordinal: u32,
    /// Bind the streams' sockets to the pod's IP (pods sharing this host's
    /// network each on their own IP) instead of all interfaces.
    pub bind_pod_ip: bool,
    /// Decode (software) instead of receiving and repairing only.
    pub decode: bool,
    /// Keep the mounted config in step with the ConfigMap as the kubelet
    /// does, looking once a second (the kubelet's own sync period is about a
    /// minute; only the delay differs).
    pub follow_config: bool,
}

fn rendered_config(cluster: &TestCluster, pipeline: &str) -> Option<String> {
    let out = cluster.kubectl(["get", "configmap", &format!("{pipeline}-config"), "-o", "jsonpath={.data.pipeline\\.yaml}"]);
    (out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `text` to `file` whole (a rename), as the kubelet's atomic writer
/// updates a ConfigMap volume: a reader never sees half of it.
fn write_whole(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)
}

impl PodProcess {
    /// Waits for the pod's IP and the rendered ConfigMap, then runs shard 0
    /// (receive and repair, no decoding).
    pub fn start(cluster: &TestCluster, pipeline: &str) -> anyhow::Result<PodProcess> {
        let p = Self::start_with(cluster, pipeline, PodOptions::default())?;
        assert!(p.ip.starts_with("127.1."), "kwok gives loopback pod IPs here: {}", p.ip);
        Ok(p)
    }

    /// Waits for the pod's IP and the rendered ConfigMap, then runs the pod
    /// as `opts` says, and waits until it is ready.
    pub fn start_with(cluster: &TestCluster, pipeline: &str, opts: PodOptions) -> anyhow::Result<PodProcess> {
        let pod = format!("{pipeline}-dataplane-{}", opts.ordinal);
        let ip = cluster.wait_for(&format!("{pod} to have an IP"), Duration::from_secs(60), || {
            let out = cluster.kubectl(["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]);
            Ok((out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })?;
        let config = cluster.wait_for("the rendered ConfigMap", Duration::from_secs(60), || Ok(rendered_config(cluster, pipeline)))?;
        let file = cluster.dir().join(format!("{pod}.yaml"));
        write_whole(&file, &config)?;
        let log = std::fs::File::create(cluster.dir().join(format!("{pod}.log")))?;
        let metrics = format!("{ip}:9464");
        let mut cmd = Command::new(zerodrop_bin());
        cmd.args(["pod", "--config"])
            .arg(&file)
            .args(["--pod-name", &pod, "--metrics-addr", &metrics, "--kernel-drops", "procfs"]);
        if !opts.decode {
            cmd.arg("--no-decode");
        }
        if opts.bind_pod_ip {
            cmd.args(["--listen-address", &ip]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        let following = opts.follow_config.then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let (kubectl, pipeline, file, flag) = (cluster.kubectl_command(), pipeline.to_string(), file.clone(), stop.clone());
            let handle = std::thread::spawn(move || follow_config(kubectl, &pipeline, &file, config, &flag));
            (stop, handle)
        });
        let process = PodProcess { child, ip: ip.clone(), following };
        cluster.wait_for(&format!("{pod} ready"), Duration::from_secs(30), || {
            Ok(http_get(metrics.parse()?, "/readyz").is_ok_and(|r| r.status == 200).then_some(()))
        })?;
        Ok(process)
    }

    /// The process id (for its CPU time, or a CPU limit).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pod's /metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(format!("{}:9464", self.ip).parse()?, "/metrics")?.body)
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

/// The kubelet's part for a ConfigMap volume: rewrites `file` whenever the
/// ConfigMap's text changes, until `stop`. The period is this loop's poll
/// interval, not a synchronisation.
fn follow_config(mut kubectl: Command, pipeline: &str, file: &std::path::Path, mut last: String, stop: &AtomicBool) {
    kubectl.args(["get", "configmap", &format!("{pipeline}-config"), "-o", "jsonpath={.data.pipeline\\.yaml}"]);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let Ok(out) = kubectl.output() else { continue };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && !text.is_empty() && text != last && write_whole(file, &text).is_ok() {
            last = text;
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.following.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
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
