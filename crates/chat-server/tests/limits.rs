//! Limits that span the whole process: the connection limit counts both
//! transports together.

use std::time::Duration;

use chat_core::client::ChatClient;
use chat_core::{Chat, ErrorCode};
use chat_grpc::GrpcClient;
use chat_server::{Listen, Tuning};
use chat_socket::SocketClient;

const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_counts_both_transports() {
    // 16 in all, and one address may hold them all: only the total can
    // refuse a connection here.
    let tuning = Tuning {
        max_connections: 16,
        max_connections_per_address: Some(16),
        ..Tuning::default()
    };
    let addrs = chat_server::spawn_with(&both(), Chat::in_memory(), tuning)
        .await
        .unwrap();
    let (socket, grpc) = (addrs[0], addrs[1]);

    // One connection per transport from 127.0.0.1 ...
    let mut over_socket = SocketClient::connect(socket).await.unwrap();
    over_socket.create("alice", "password1").await.unwrap();
    let mut over_grpc = GrpcClient::connect(&grpc.to_string()).await.unwrap();
    over_grpc.create("bob", "password1").await.unwrap();
    // ... and 14 more socket connections fill the 16.
    let mut held = Vec::new();
    for _ in 0..14 {
        held.push(SocketClient::connect(socket).await.unwrap());
    }
    // Full, counting both transports: a 17th is refused on either.
    let refused = SocketClient::connect(socket).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ServerFull), "{refused}");
    assert!(refused.to_string().contains("full"), "{refused}");
    let grpc_refused = match GrpcClient::connect(&grpc.to_string()).await {
        Err(err) => err,
        Ok(mut third) => third.list("", 0).await.unwrap_err(),
    };
    assert!(
        matches!(grpc_refused, chat_core::client::ClientError::Connection(_)),
        "{grpc_refused}"
    );

    // A connection that ends gives its slot back.
    over_socket.close().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut again = loop {
        match SocketClient::connect(socket).await {
            Ok(client) => break client,
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::ServerFull), "{err}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never came back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    again.login("alice", "password1").await.unwrap();
    over_grpc.send("alice", "still here").await.unwrap();
    drop(held);
}

/// One address cannot take every connection: past its share, it is
/// refused on either transport, and the connections it has keep working
/// (that other addresses are still served is tested on the limit itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_its_share_of_connections() {
    let tuning = Tuning {
        max_connections_per_address: Some(1),
        ..Tuning::default()
    };
    let addrs = chat_server::spawn_with(&both(), Chat::in_memory(), tuning)
        .await
        .unwrap();
    let (socket, grpc) = (addrs[0], addrs[1]);
    let mut first = SocketClient::connect(socket).await.unwrap();
    first.create("alice", "password1").await.unwrap();
    let refused = SocketClient::connect(socket).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ServerFull), "{refused}");
    assert!(refused.to_string().contains("your address"), "{refused}");
    let grpc_refused = match GrpcClient::connect(&grpc.to_string()).await {
        Err(err) => err,
        Ok(mut other) => other.list("", 0).await.unwrap_err(),
    };
    assert!(
        matches!(grpc_refused, chat_core::client::ClientError::Connection(_)),
        "{grpc_refused}"
    );
    first
        .send("alice", "the first connection is unaffected")
        .await
        .unwrap();
}

/// The server raises its file-descriptor limit and never promises more
/// connections than it can open.
#[test]
fn the_connection_budget_fits_the_file_descriptor_limit() {
    let chosen = chat_server::connection_budget(usize::MAX);
    let (soft, _hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(chosen as u64 + chat_server::RESERVED_FDS <= soft.max(chat_server::RESERVED_FDS + 1));
    assert_eq!(chat_server::connection_budget(10), 10);
    assert_eq!(chat_server::per_address_share(896, None), 112);
    assert_eq!(chat_server::per_address_share(50_000, None), 1_000);
    assert_eq!(chat_server::per_address_share(4, None), 1);
    assert_eq!(
        chat_server::per_address_share(896, Some(500)),
        500,
        "as asked"
    );
}

/// The server's per-user send rate and per-address create rate reach the
/// client as `rate_limited` on both transports, and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_are_enforced_on_both_transports() {
    let tuning = Tuning {
        send_rate: 1,
        send_burst: 2,
        creates_per_minute: 1,
        create_burst: 3,
        ..Tuning::default()
    };
    let chat = Chat::new(
        std::sync::Arc::new(chat_core::MemoryStore::default()),
        tuning.engine(),
    );
    let addrs = chat_server::spawn_with(&both(), chat, tuning)
        .await
        .unwrap();
    let (socket, grpc) = (addrs[0], addrs[1]);

    let mut alice = SocketClient::connect(socket).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = GrpcClient::connect(&grpc.to_string()).await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    let mut carol = SocketClient::connect(socket).await.unwrap();
    carol.create("carol", "password1").await.unwrap();
    // The address's three creates are spent, on both transports.
    let mut dave = GrpcClient::connect(&grpc.to_string()).await.unwrap();
    let err = dave.create("dave", "password1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");

    carol.logout().await.unwrap();
    burst_of_three(&mut alice).await;
    burst_of_three(&mut bob).await;
    carol.login("carol", "password1").await.unwrap();
    let queued = carol.fetch(0).await.unwrap();
    assert_eq!(
        queued.len(),
        4,
        "two from each sender; the refused ones were not stored"
    );
}

/// Two sends within the burst, then one refused.
async fn burst_of_three<C: ChatClient>(client: &mut C) {
    client.send("carol", "one").await.unwrap();
    client.send("carol", "two").await.unwrap();
    let err = client.send("carol", "three").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
}

/// Both transports on free loopback ports.
fn both() -> [Listen; 2] {
    let any = "127.0.0.1:0".parse().unwrap();
    [Listen::Socket(any), Listen::Grpc(any)]
}
