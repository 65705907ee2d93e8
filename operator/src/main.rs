use std::sync::Arc;

use clap::Parser;
use kube_lease_manager::LeaseManagerBuilder;
use zerodrop_operator::controller::{self, Context};
use zerodrop_operator::desired::BuildSettings;
use zerodrop_operator::metrics::{self, OperatorMetrics};

/// Reconciles StreamPipeline objects into data-plane pods.
#[derive(Parser)]
#[command(name = "zerodrop-operator", version)]
struct Args {
    /// Watch one namespace only (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Image of the data-plane pods.
    #[arg(long, env = "ZERODROP_DATAPLANE_IMAGE", default_value = "ghcr.io/zerodrop-dev/zerodrop:latest")]
    dataplane_image: String,
    #[arg(long, env = "ZERODROP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Take part in leader election through a Lease, so that several
    /// replicas can run and one reconciles.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(OperatorMetrics::new());
    let bound = metrics::serve(&args.metrics_addr, metrics.clone())?;
    tracing::info!(metrics = %bound, namespace = ?args.namespace, "zerodrop-operator starting");

    let _lease = if args.leader_election {
        let identity = args.identity.clone().unwrap_or_else(|| format!("zerodrop-operator-{}", std::process::id()));
        let manager = LeaseManagerBuilder::new(client.clone(), "zerodrop-operator")
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await?;
        let (mut leader, task) = manager.watch().await;
        tracing::info!(%identity, "waiting for the leader lease");
        while !*leader.borrow_and_update() {
            leader.changed().await?;
        }
        metrics.leader.set(1);
        tracing::info!(%identity, "acquired the leader lease");
        // Losing the lease ends the process: a standby takes over and this
        // replica restarts as a standby.
        let mut watch = leader.clone();
        tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                if !*watch.borrow() {
                    tracing::error!("lost the leader lease; exiting");
                    std::process::exit(1);
                }
            }
        });
        Some(task)
    } else {
        metrics.leader.set(1);
        None
    };

    let ctx = Arc::new(Context::new(client, BuildSettings { dataplane_image: args.dataplane_image }, metrics));
    controller::run(ctx, args.namespace).await;
    tracing::info!("zerodrop-operator stopped");
    Ok(())
}
