//! `chat-grpc-server`: serves the chat engine over gRPC (with health and
//! reflection), and over the socket protocol too when `--socket-listen` is
//! given.
//!
//! Prints one line per listener, `listening on <address>`, to stdout once
//! bound (the gRPC listener first); logs go to stderr through `tracing`
//! (filter with `RUST_LOG`). Ctrl-C or SIGTERM shuts it down cleanly.

use std::net::SocketAddr;

use chat_server::{Listen, Storage, Tuning};
use clap::Parser;

/// Chat server speaking gRPC (`chat.v1.Chat`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address for gRPC; port 0 picks a free port.
    #[arg(long, env = "CHAT_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Also serve the socket protocol on this address, on the same engine.
    #[arg(long)]
    socket_listen: Option<SocketAddr>,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    storage: Storage,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_server::init_logging();
    let args = Args::parse();
    let mut listen = vec![Listen::Grpc(args.listen)];
    listen.extend(args.socket_listen.map(Listen::Socket));
    chat_server::run(&listen, &args.tuning, &args.storage).await
}
