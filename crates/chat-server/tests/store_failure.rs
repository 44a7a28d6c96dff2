//! A store that can no longer write makes the gRPC server unhealthy, so
//! that load balancers and orchestrators stop sending it users, and the
//! writes that reach it fail with `store_unavailable` naming why.

use std::sync::Arc;

use chat_core::client::ChatClient;
use chat_core::{Chat, Config, ErrorCode};
use chat_grpc::{GrpcClient, GrpcConfig};
use chat_store_sql::{SqliteOptions, SqliteStore};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn a_dead_store_writer_turns_health_to_not_serving() {
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(data.path(), SqliteOptions::default())
            .await
            .unwrap(),
    );
    let chat = Chat::new(store.clone(), Config::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(chat_grpc::serve(
        listener,
        chat,
        GrpcConfig::default(),
        std::future::pending(),
    ));
    let mut client = GrpcClient::connect(&addr.to_string()).await.unwrap();
    client.create("alice", "password1").await.unwrap();

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "chat.v1.Chat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = |r: Option<tonic_health::pb::HealthCheckResponse>| r.unwrap().status;
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::Serving as i32
    );

    store.crash_writer_for_tests().await;
    // The health service announces the change on its own: no polling.
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::NotServing as i32
    );
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        overall.status,
        ServingStatus::NotServing as i32,
        "the server as a whole, which default probes ask about"
    );
    let err = client.send("alice", "to myself").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::StoreUnavailable), "{err}");
    assert!(err.to_string().contains("writer"), "says why: {err}");
}
