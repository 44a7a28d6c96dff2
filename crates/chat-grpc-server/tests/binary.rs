//! The gRPC server binary as users run it: a real child process on port 0,
//! with the socket protocol beside it.

use chat_conformance::process::ServerProcess;
use chat_core::client::ChatClient;
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;

const SERVER: &str = env!("CARGO_BIN_EXE_chat-grpc-server");

#[tokio::test]
async fn serves_grpc_and_the_socket_protocol_then_stops_on_sigterm() {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--socket-listen",
        "127.0.0.1:0",
        "--data",
        ":memory:",
    ];
    let server = ServerProcess::start(SERVER, &args, 2).await;
    let mut alice = GrpcClient::connect(&server.addrs[0]).await.unwrap();
    let mut bob = SocketClient::connect(&server.addrs[1]).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    bob.send("alice", "from the socket side").await.unwrap();
    assert_eq!(
        chat_conformance::next_message(&mut alice)
            .await
            .body
            .as_str(),
        "from the socket side"
    );
    server.terminate().await;
}
