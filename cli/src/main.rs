use clap::{Parser, Subcommand};

/// ZeroDrop: live video pipelines that do not drop frames.
#[derive(Parser)]
#[command(name = "zerodrop", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every source of the StreamPipeline manifests in FILE on this machine.
    Run(zerodrop_dataplane::runner::RunArgs),
    /// Data-plane pod: run this pod's shard of the operator-rendered pipeline.
    Pod(zerodrop_dataplane::pod::PodArgs),
    /// Test source: encode with GStreamer and send RTP, answering NACKs with RTX.
    Send(zerodrop_testbench::sender::SendArgs),
    /// Seeded lossy relay between any RTP sender and receiver, passing RTCP back.
    Relay(zerodrop_testbench::relay::RelayArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(zerodrop_dataplane::table::LogWriter::new)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Run(args) => zerodrop_dataplane::runner::run(args),
        Command::Pod(args) => zerodrop_dataplane::pod::run(args),
        Command::Send(args) => zerodrop_testbench::sender::run(args),
        Command::Relay(args) => zerodrop_testbench::relay::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zerodrop: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
