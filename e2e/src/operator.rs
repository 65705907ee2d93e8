//! A real `zerodrop-operator` process against a [`crate::cluster::TestCluster`],
//! with its `/metrics` at hand.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::cluster::TestCluster;
use crate::runner::{http_get, metric_value, zerodrop_bin};

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
        let log = std::fs::File::create(cluster.dir().join(log)).unwrap();
        let child = Command::new(operator_bin())
            .env("KUBECONFIG", cluster.kubeconfig())
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

    /// The operator's `/metrics` text, if it answers.
    pub fn metrics_text(&self) -> Option<String> {
        http_get(self.metrics.parse().unwrap(), "/metrics").ok()
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
