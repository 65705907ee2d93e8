//! `zerodrop-agent`: the node agent. Counts kernel UDP receive drops (eBPF,
//! or /proc/net/udp when eBPF cannot load) and serves them on /metrics.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use zerodrop_ebpf::{KernelDropCollector, KernelDropMonitor, Mode};
use zerodrop_telemetry::Reply;

#[derive(Debug, Parser)]
#[command(name = "zerodrop-agent", about = "Exports the UDP packets the kernel drops, by local address, port and reason")]
struct Args {
    /// Address to serve /metrics and /healthz on.
    #[arg(long, env = "ZERODROP_AGENT_LISTEN", default_value = "0.0.0.0:9410")]
    listen: String,
    /// auto (eBPF, else /proc/net/udp), ebpf (fail without it) or procfs.
    #[arg(long, env = "ZERODROP_AGENT_MODE", default_value = "auto")]
    mode: Mode,
    /// Print the metrics once and exit instead of serving them.
    #[arg(long)]
    once: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let monitor = KernelDropMonitor::start(args.mode).context("starting the kernel drop monitor")?;
    let source = monitor.source();
    let registry = KernelDropCollector::registry(Arc::new(Mutex::new(monitor)));

    let encode = || -> anyhow::Result<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).context("encoding metrics")?;
        Ok(text)
    };
    if args.once {
        print!("{}", encode()?);
        return Ok(());
    }

    let server = zerodrop_telemetry::Server::bind(&args.listen)?;
    tracing::info!(listen = %server.addr(), %source, "serving /metrics and /healthz");
    server.run(|path| match path {
        "/metrics" => match encode() {
            Ok(text) => Reply::Metrics(text),
            Err(err) => Reply::Text(500, format!("{err:#}\n")),
        },
        "/healthz" => Reply::ok(format!("ok ({source})\n")),
        _ => Reply::not_found("try /metrics or /healthz"),
    });
    Ok(())
}
