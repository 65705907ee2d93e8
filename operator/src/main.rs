use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube_lease_manager::LeaseManagerBuilder;
use zerodrop_operator::control::{Agents, ControlOptions, SignalSource};
use zerodrop_operator::promsource::PrometheusSource;
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
    /// Run the control loop: scrape the data-plane pods, decide with the
    /// control policy, scale, and report in status, Events and metrics.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    control: bool,
    /// Time between control rounds, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    control_interval_ms: u64,
    /// Deadline of one pod's scrape, in milliseconds.
    #[arg(long, default_value_t = 800)]
    scrape_timeout_ms: u64,
    /// Pod scrapes in flight at once.
    #[arg(long, default_value_t = 64)]
    scrape_concurrency: usize,
    /// Port of the data-plane pods' /metrics (the pod template's `metrics` port).
    #[arg(long, default_value_t = zerodrop_operator::desired::METRICS_PORT as u16)]
    pod_metrics_port: u16,
    /// On a replica change, how long the moving streams' new owners may take
    /// to bind them before their Services switch anyway, in seconds
    /// (make-before-break; a Warning Event says when it ran out).
    #[arg(long, default_value_t = zerodrop_operator::handover::PREPARE_TIMEOUT.as_secs_f64())]
    handover_timeout_s: f64,
    /// After a replica change, seconds without another (the policy's cooldown).
    #[arg(long, default_value_t = 30)]
    scale_cooldown_s: u64,
    /// Seconds every shard must have headroom before replicas go down.
    #[arg(long, default_value_t = 300)]
    scale_down_window_s: u64,
    /// Per-stream figures in status are written at most this often, in seconds.
    #[arg(long, default_value_t = 10)]
    status_interval_s: u64,
    /// Status writes that only refresh figures, across all pipelines, at most
    /// this many a second (pipelines take turns beyond it); condition,
    /// decision and replica changes are written at once.
    #[arg(long, default_value_t = 10.0)]
    status_refreshes_per_second: f64,
    /// Label selector of the node agents' pods (zerodrop-agent, host network),
    /// whose kernel drops by socket and reason join the pods' own figures.
    /// The chart sets it to its agent DaemonSet's labels.
    #[arg(long)]
    agent_selector: Option<String>,
    /// Port of the agents' /metrics.
    #[arg(long, default_value_t = 9410)]
    agent_port: u16,
    /// Fixed agent addresses (host:port, comma-separated) instead of
    /// `--agent-selector`.
    #[arg(long, value_delimiter = ',')]
    agent_endpoints: Vec<std::net::SocketAddr>,
    /// Where the control loop's figures come from: `pods` (each pod's
    /// /metrics, read directly every round) or `prometheus` (one query per
    /// round to --prometheus-url; set --signal-max-age-s above its scrape
    /// interval).
    #[arg(long, default_value = "pods", value_parser = ["pods", "prometheus"])]
    signal_source: String,
    /// The Prometheus server of `--signal-source prometheus`: http://host[:port][/prefix].
    #[arg(long)]
    prometheus_url: Option<String>,
    /// A figure older than this is stale, never "no loss" (the policy's
    /// `stale_after`; also the longest gap allowed inside a window).
    #[arg(long, default_value_t = 10)]
    signal_max_age_s: u64,
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

    let control = if args.control {
        let settings = zerodrop_policy::Settings {
            cooldown: Duration::from_secs(args.scale_cooldown_s),
            scale_down_window: Duration::from_secs(args.scale_down_window_s),
            stale_after: Duration::from_secs(args.signal_max_age_s.max(1)),
            ..zerodrop_policy::Settings::default()
        };
        settings.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Some(ControlOptions {
            interval: Duration::from_millis(args.control_interval_ms.max(100)),
            scrape_timeout: Duration::from_millis(args.scrape_timeout_ms.max(10)),
            concurrency: args.scrape_concurrency.max(1),
            status_interval: Duration::from_secs(args.status_interval_s),
            status_refreshes_per_second: args.status_refreshes_per_second,
            metrics_port: args.pod_metrics_port,
            source: match (args.signal_source.as_str(), &args.prometheus_url) {
                ("prometheus", Some(url)) => SignalSource::Prometheus(PrometheusSource::parse(url).map_err(|e| anyhow::anyhow!(e))?),
                ("prometheus", None) => anyhow::bail!("--signal-source prometheus needs --prometheus-url http://host:port"),
                _ => SignalSource::Pods,
            },
            agents: match (&args.agent_selector, args.agent_endpoints.is_empty()) {
                (_, false) => Agents::Static(args.agent_endpoints.clone()),
                (Some(selector), true) => Agents::Pods { selector: selector.clone(), port: args.agent_port },
                (None, true) => Agents::None,
            },
            settings,
        })
    } else {
        None
    };
    let ctx = Arc::new(Context::new(client, BuildSettings {
        dataplane_image: args.dataplane_image,
        pod_metrics_port: args.pod_metrics_port,
        handover_timeout: Duration::from_secs_f64(args.handover_timeout_s.max(0.0)),
    }, metrics));
    controller::run(ctx, args.namespace, control).await;
    tracing::info!("zerodrop-operator stopped");
    Ok(())
}
