//! `chat-socket-server`: serves the chat engine over the socket protocol,
//! and over gRPC too when `--grpc-listen` is given.
//!
//! Prints one line per listener, `listening on <address>`, to stdout once
//! bound (the socket listener first), then `metrics on <address>` with
//! `--metrics-listen`; logs go to stderr through `tracing`. Ctrl-C or
//! SIGTERM shuts it down cleanly: clients get a goodbye and their users are
//! logged out. Every option also comes from a `CHAT_*` variable or a TOML
//! file (`--config`); `--print-config` shows the result. `backup DEST`
//! copies the store, while a server runs or not.

use std::net::SocketAddr;
use std::process::ExitCode;

use chat_server::{Admin, ConfigFile, Listen, Operations, Storage, Tuning};
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
    #[command(flatten)]
    operations: Operations,
    #[command(flatten)]
    config: ConfigFile,
    #[command(subcommand)]
    admin: Option<Admin>,
}

fn main() -> ExitCode {
    let args: Args = chat_server::config::parse();
    let mut listen = vec![Listen::Socket(args.listen)];
    listen.extend(args.grpc_listen.map(Listen::Grpc));
    chat_server::main(
        &listen,
        &args.tuning,
        &args.storage,
        &args.operations,
        args.admin.as_ref(),
    )
}
