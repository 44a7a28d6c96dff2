//! `chat-socket-server`: serves the chat engine over the socket protocol,
//! and over gRPC too when `--grpc-listen` is given.
//!
//! Prints one line per listener, `listening on <address>`, to stdout once
//! bound (the socket listener first); logs go to stderr through `tracing`
//! (filter with `RUST_LOG`). Ctrl-C or SIGTERM shuts it down cleanly:
//! clients get a goodbye and their users are logged out.

use std::net::SocketAddr;

use chat_server::{Listen, Storage, Tuning};
use clap::Parser;

/// Chat server speaking the compact binary socket protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address for the socket protocol; port 0 picks a free port.
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Also serve gRPC on this address, on the same engine.
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    storage: Storage,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_server::init_logging();
    let args = Args::parse();
    let mut listen = vec![Listen::Socket(args.listen)];
    listen.extend(args.grpc_listen.map(Listen::Grpc));
    chat_server::run(&listen, &args.tuning, &args.storage).await
}
