//! `zerodrop-agent`: the node agent. Counts kernel UDP receive drops (eBPF,
//! or /proc/net/udp when eBPF cannot load) and serves them on /metrics.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use zerodrop_ebpf::{KernelDropCollector, KernelDropMonitor, Mode};

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

    let server = tiny_http::Server::http(&args.listen)
        .map_err(|err| anyhow::anyhow!("listening on {}: {err}", args.listen))?;
    tracing::info!(listen = %args.listen, %source, "serving /metrics and /healthz");
    let content_type = tiny_http::Header::from_bytes(
        &b"Content-Type"[..],
        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
    )
    .map_err(|()| anyhow::anyhow!("bad content-type header"))?;
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("").to_owned();
        let response = match path.as_str() {
            "/metrics" => match encode() {
                Ok(text) => tiny_http::Response::from_string(text).with_header(content_type.clone()),
                Err(err) => tiny_http::Response::from_string(format!("{err:#}\n")).with_status_code(500),
            },
            "/healthz" => tiny_http::Response::from_string(format!("ok ({source})\n")),
            _ => tiny_http::Response::from_string("not found: try /metrics or /healthz\n").with_status_code(404),
        };
        if let Err(err) = request.respond(response) {
            tracing::debug!("writing a response: {err}");
        }
    }
    Ok(())
}
