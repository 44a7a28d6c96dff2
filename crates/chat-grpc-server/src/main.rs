//! `chat-grpc-server`: serves the chat engine over gRPC (with health and
//! reflection), and over the socket protocol too when `--socket-listen` is
//! given.
//!
//! Prints one line per listener, `listening on <address>`, to stdout once
//! bound (the gRPC listener first), then `metrics on <address>` with
//! `--metrics-listen`; logs go to stderr through `tracing`. Ctrl-C or
//! SIGTERM shuts it down cleanly. Every option also comes from a `CHAT_*`
//! variable or a TOML file (`--config`); `--print-config` shows the result.
//! `backup DEST` copies the store, while a server runs or not.

use std::net::SocketAddr;
use std::process::ExitCode;

use chat_server::{Admin, ConfigFile, Listen, Operations, Storage, Tuning};
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
    #[command(flatten)]
    operations: Operations,
    #[command(flatten)]
    config: ConfigFile,
    #[command(subcommand)]
    admin: Option<Admin>,
}

fn main() -> ExitCode {
    let args: Args = chat_server::config::parse();
    let mut listen = vec![Listen::Grpc(args.listen)];
    listen.extend(args.socket_listen.map(Listen::Socket));
    chat_server::main(
        &listen,
        &args.tuning,
        &args.storage,
        &args.operations,
        args.admin.as_ref(),
    )
}
