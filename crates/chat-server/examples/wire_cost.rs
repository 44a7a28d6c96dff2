//! Bytes on the wire per operation, socket protocol vs gRPC, counted at the
//! TCP layer through a forwarding proxy (so HTTP/2 framing, headers and
//! protobuf are all included).
//!
//! Run it with `cargo run -p chat-server --example wire_cost`.

use chat_conformance::wire::{BODY, Cost, RECIPIENT, measure};
use chat_core::Chat;
use chat_grpc::GrpcClient;
use chat_server::Listen;
use chat_socket::SocketClient;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One engine per transport, so both measurements start from scratch.
    let socket_addr = start(Listen::Socket("127.0.0.1:0".parse().unwrap())).await;
    let grpc_addr = start(Listen::Grpc("127.0.0.1:0".parse().unwrap())).await;

    let socket = measure(socket_addr, |addr| async move {
        SocketClient::connect(addr).await.expect("socket")
    })
    .await;
    let grpc = measure(grpc_addr, |addr| async move {
        GrpcClient::connect(&addr.to_string()).await.expect("grpc")
    })
    .await;

    println!(
        "Sends carry a {}-byte recipient and a {}-byte body.\n",
        RECIPIENT.len(),
        BODY.len()
    );
    println!("| operation | socket up | socket down | gRPC up | gRPC down | gRPC/socket (total) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (s, g) in socket.iter().zip(&grpc) {
        assert_eq!(s.operation, g.operation);
        let total = |c: &Cost| c.up + c.down;
        println!(
            "| {} | {} | {} | {} | {} | {:.1}× |",
            s.operation,
            s.up,
            s.down,
            g.up,
            g.down,
            total(g) as f64 / total(s).max(1) as f64
        );
    }
    Ok(())
}

async fn start(listen: Listen) -> std::net::SocketAddr {
    chat_server::spawn(&[listen], Chat::in_memory())
        .await
        .expect("start a server")[0]
}
