//! The conformance suite over gRPC, against a real server on an ephemeral
//! loopback port.

use std::net::SocketAddr;

use chat_conformance::{Connector, conformance_tests};
use chat_core::Chat;
use chat_grpc::{GrpcClient, GrpcConfig, serve};
use tokio::net::TcpListener;

struct Grpc {
    addr: SocketAddr,
}

impl Connector for Grpc {
    type Client = GrpcClient;

    async fn connect(&self) -> GrpcClient {
        GrpcClient::connect(&self.addr.to_string())
            .await
            .expect("connect to the test server")
    }
}

async fn start() -> Grpc {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(
        listener,
        Chat::in_memory(),
        GrpcConfig::default(),
        std::future::pending(),
    ));
    Grpc { addr }
}

conformance_tests!(start);
