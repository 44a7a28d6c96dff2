//! The socket server binary as users run it: a real child process on port
//! 0, alone and with gRPC beside it.

use chat_conformance::process::ServerProcess;
use chat_conformance::{expect_goodbye, next_message};
use chat_core::ErrorCode;
use chat_core::client::ChatClient;
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;

const SERVER: &str = env!("CARGO_BIN_EXE_chat-socket-server");

#[tokio::test]
async fn prints_its_address_serves_and_stops_on_sigterm() {
    let server =
        ServerProcess::start(SERVER, &["--listen", "127.0.0.1:0", "--store", "memory"], 1).await;
    let mut alice = SocketClient::connect(&server.addrs[0]).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    assert_eq!(alice.list("", 0).await.unwrap().len(), 1);
    server.terminate().await;
    expect_goodbye(&mut alice, ErrorCode::ShuttingDown).await;
}

#[tokio::test]
async fn serves_grpc_too_on_the_same_engine() {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--data",
        ":memory:",
    ];
    let server = ServerProcess::start(SERVER, &args, 2).await;
    let mut alice = SocketClient::connect(&server.addrs[0]).await.unwrap();
    let mut bob = GrpcClient::connect(&server.addrs[1]).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    alice.send("bob", "from the socket side").await.unwrap();
    assert_eq!(
        next_message(&mut bob).await.body.as_str(),
        "from the socket side"
    );
    server.terminate().await;
    expect_goodbye(&mut alice, ErrorCode::ShuttingDown).await;
    expect_goodbye(&mut bob, ErrorCode::ShuttingDown).await;
}

/// Plaintext stays on loopback unless the operator says otherwise: binding
/// another address without `--insecure-plaintext` fails at start, saying
/// why; with it, the server runs.
#[tokio::test]
async fn plaintext_off_loopback_needs_an_explicit_flag() {
    let refused = tokio::process::Command::new(SERVER)
        .args(["--listen", "0.0.0.0:0", "--store", "memory"])
        .output()
        .await
        .expect("run the server");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext on 0.0.0.0:0")
            && stderr.contains("--insecure-plaintext"),
        "{stderr}"
    );
    assert!(refused.stdout.is_empty(), "nothing was bound or announced");
    let server = ServerProcess::start(
        SERVER,
        &[
            "--listen",
            "0.0.0.0:0",
            "--store",
            "memory",
            "--insecure-plaintext",
        ],
        1,
    )
    .await;
    let port = server.addrs[0].rsplit(':').next().unwrap().to_string();
    let mut alice = SocketClient::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    alice.create("alice", "password1").await.unwrap();
    server.terminate().await;
}

/// With a certificate the server may listen beyond loopback without
/// `--insecure-plaintext`; SIGHUP makes it serve a renewed certificate to
/// new connections while open sessions carry on.
#[tokio::test]
async fn tls_serves_beyond_loopback_and_reloads_on_sighup() {
    let mut pki = chat_conformance::pki::TestPki::new();
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let args = [
        "--listen",
        "0.0.0.0:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--store",
        "memory",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let server = ServerProcess::start(SERVER, &args, 2).await;
    let port = server.addrs[0].rsplit(':').next().unwrap().to_string();
    let socket_addr = format!("127.0.0.1:{port}");
    let mut alice = SocketClient::connect_tls(socket_addr.as_str(), pki.client())
        .await
        .unwrap();
    let mut bob = GrpcClient::connect_tls(&server.addrs[1], pki.client())
        .await
        .unwrap();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();

    pki.renew();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    // The reload happens when the server handles the signal: try new
    // connections until one is served the renewed certificate.
    let deadline = tokio::time::Instant::now() + chat_conformance::PATIENCE;
    loop {
        match SocketClient::connect_tls(socket_addr.as_str(), pki.client()).await {
            Ok(_) => break,
            Err(err) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the renewed certificate was not served: {err}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    GrpcClient::connect_tls(&server.addrs[1], pki.client())
        .await
        .expect("gRPC serves the renewed certificate too");
    alice.send("bob", "across the reload").await.unwrap();
    assert_eq!(
        next_message(&mut bob).await.body.as_str(),
        "across the reload"
    );
    server.terminate().await;
}
