//! The conformance suite over both transports with the durable SQLite
//! store (a fresh database per test), as the servers run by default.

use std::net::SocketAddr;

use chat_conformance::{Connector, conformance_tests};
use chat_grpc::GrpcClient;
use chat_server::{Listen, Storage};
use chat_socket::SocketClient;

/// A server on a temporary database; the directory lives as long as this.
struct Durable<C> {
    addr: SocketAddr,
    _data: tempfile::TempDir,
    _client: std::marker::PhantomData<fn() -> C>,
}

async fn start<C>(listen: fn(SocketAddr) -> Listen) -> Durable<C> {
    let data = tempfile::tempdir().expect("temporary directory");
    let chat = Storage::sqlite(data.path().to_string_lossy())
        .open()
        .await
        .expect("open the store");
    let addr = chat_server::spawn(&[listen("127.0.0.1:0".parse().unwrap())], chat)
        .await
        .expect("start")[0];
    Durable {
        addr,
        _data: data,
        _client: std::marker::PhantomData,
    }
}

impl Connector for Durable<SocketClient> {
    type Client = SocketClient;
    async fn connect(&self) -> SocketClient {
        SocketClient::connect(self.addr).await.expect("connect")
    }
}

impl Connector for Durable<GrpcClient> {
    type Client = GrpcClient;
    async fn connect(&self) -> GrpcClient {
        GrpcClient::connect(&self.addr.to_string())
            .await
            .expect("connect")
    }
}

mod socket_sqlite {
    use super::*;

    async fn start() -> Durable<SocketClient> {
        super::start(Listen::Socket).await
    }

    conformance_tests!(start);
}

mod grpc_sqlite {
    use super::*;

    async fn start() -> Durable<GrpcClient> {
        super::start(Listen::Grpc).await
    }

    conformance_tests!(start);
}
