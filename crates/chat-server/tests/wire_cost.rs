//! The byte counts docs/PROTOCOL.md reports are what the transports really
//! send: the socket protocol's sizes are exact, so they are asserted to the
//! byte; gRPC's must at least be measurable and larger.

use chat_conformance::wire::{BODY, RECIPIENT, measure};
use chat_core::Chat;
use chat_grpc::GrpcClient;
use chat_server::Listen;
use chat_socket::SocketClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_costs_are_as_specified_and_grpc_costs_more() {
    // One engine per transport, so both measurements start from scratch.
    let socket_addr = start(Listen::Socket("127.0.0.1:0".parse().unwrap())).await;
    let grpc_addr = start(Listen::Grpc("127.0.0.1:0".parse().unwrap())).await;

    let socket = measure(socket_addr, |addr| async move {
        SocketClient::connect(addr).await.unwrap()
    })
    .await;
    let grpc = measure(grpc_addr, |addr| async move {
        GrpcClient::connect(&addr.to_string()).await.unwrap()
    })
    .await;
    let cost = |costs: &[chat_conformance::wire::Cost], op: &str| {
        costs
            .iter()
            .find(|c| c.operation == op)
            .map(|c| (c.up, c.down))
            .unwrap()
    };
    let payload = (RECIPIENT.len() + BODY.len()) as u64;
    // HELLO: 4+1+4 (magic)+2+2 (versions)+4 (features)+(1+1+12) (the send
    // key property) = 31; WELCOME: 4+1+2+6*4 (features and limits)+the
    // server's name as a text.
    let name = chat_socket::ServerConfig::default().server_name.len() as u64;
    assert_eq!(cost(&socket, "connect"), (31, 32 + name));
    // SEND ONCE: 11 bytes beyond recipient and body for a body under 128
    // bytes (length 4, tag 1, request id 4, one length byte each for the
    // recipient and the body: the send key went once, in the hello);
    // SENT: 4+1+4+1+(1+5)+8+8.
    assert_eq!(cost(&socket, "send"), (11 + payload, 32));
    // PUSH MESSAGE: 4+1+8+8+(1+5)+1 beyond the body.
    assert_eq!(
        cost(&socket, "live push (recipient side)"),
        (0, 28 + BODY.len() as u64)
    );
    for op in [
        "send",
        "live push (recipient side)",
        "create",
        "list (2 names)",
        "fetch (1 message)",
    ] {
        let (s, g) = (cost(&socket, op), cost(&grpc, op));
        assert!(g.0 + g.1 > s.0 + s.1, "{op}: gRPC {g:?} vs socket {s:?}");
    }
}

async fn start(listen: Listen) -> std::net::SocketAddr {
    chat_server::spawn(&[listen], Chat::in_memory())
        .await
        .expect("start a server")[0]
}
