//! Both transports on one engine in one process: a socket user and a gRPC
//! user chat live and through the queue, in both directions, and share one
//! account namespace and one login-per-account rule.

use std::time::Duration;

use chat_conformance::next_message;
use chat_core::client::ChatClient;
use chat_core::{Chat, ErrorCode};
use chat_grpc::GrpcClient;
use chat_server::{Bound, Listen, Tuning};
use chat_socket::SocketClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_and_grpc_users_chat_live_and_queued() {
    let any = "127.0.0.1:0".parse().unwrap();
    let bound = Bound::bind(&[Listen::Socket(any), Listen::Grpc(any)])
        .await
        .unwrap();
    let addrs = bound.local_addrs().unwrap();
    let tuning = Tuning::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        bound
            .serve(Chat::in_memory(), &tuning, async {
                let _ = stopped.await;
            })
            .await
    });

    let mut sam = SocketClient::connect(addrs[0]).await.unwrap();
    let mut gina = GrpcClient::connect(&addrs[1].to_string()).await.unwrap();
    sam.create("sam", "password1").await.unwrap();
    gina.create("gina", "password1").await.unwrap();

    // Live, both ways.
    sam.send("gina", "hello over the socket").await.unwrap();
    let m = next_message(&mut gina).await;
    assert_eq!(
        (m.sender.as_str(), m.body.as_str()),
        ("sam", "hello over the socket")
    );
    gina.send("sam", "hello over grpc").await.unwrap();
    let m = next_message(&mut sam).await;
    assert_eq!(
        (m.sender.as_str(), m.body.as_str()),
        ("gina", "hello over grpc")
    );

    // Queued, both ways.
    gina.logout().await.unwrap();
    sam.send("gina", "while you were out").await.unwrap();
    gina.login("gina", "password1").await.unwrap();
    let queued = gina.fetch(0).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].body.as_str(), "while you were out");
    sam.logout().await.unwrap();
    gina.send("sam", "and while you were").await.unwrap();
    sam.login("sam", "password1").await.unwrap();
    assert_eq!(
        sam.fetch(0).await.unwrap()[0].body.as_str(),
        "and while you were"
    );

    // One namespace, one login per account, across transports.
    let mut other_socket = SocketClient::connect(addrs[0]).await.unwrap();
    let err = other_socket.login("gina", "password1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn));
    let mut other_grpc = GrpcClient::connect(&addrs[1].to_string()).await.unwrap();
    assert_eq!(
        other_grpc
            .create("sam", "password1")
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::UsernameTaken)
    );
    let names: Vec<String> = other_grpc
        .list("", 0)
        .await
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["gina", "sam"]);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
