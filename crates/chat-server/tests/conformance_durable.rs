//! The conformance suite over both transports on both durable stores (a
//! fresh data directory per test): the log store, as the servers run by
//! default, and SQLite.

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

async fn start<C>(listen: fn(SocketAddr) -> Listen, storage: fn(String) -> Storage) -> Durable<C> {
    let data = tempfile::tempdir().expect("temporary directory");
    let chat = storage(data.path().to_string_lossy().to_string())
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

mod socket_log {
    use super::*;

    async fn start() -> Durable<SocketClient> {
        super::start(Listen::Socket, Storage::durable).await
    }

    conformance_tests!(start);
}

mod grpc_log {
    use super::*;

    async fn start() -> Durable<GrpcClient> {
        super::start(Listen::Grpc, Storage::durable).await
    }

    conformance_tests!(start);
}

mod socket_sqlite {
    use super::*;

    async fn start() -> Durable<SocketClient> {
        super::start(Listen::Socket, Storage::sqlite).await
    }

    conformance_tests!(start);
}

mod grpc_sqlite {
    use super::*;

    async fn start() -> Durable<GrpcClient> {
        super::start(Listen::Grpc, Storage::sqlite).await
    }

    conformance_tests!(start);
}
