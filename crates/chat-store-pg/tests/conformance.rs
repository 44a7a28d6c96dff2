//! The conformance suite over both transports on the PostgreSQL store (a
//! fresh schema per test on `CHAT_TEST_DATABASE_URL`; skipped, loudly,
//! without it, and a failure under `CI`).

use std::net::SocketAddr;
use std::sync::Arc;

use chat_conformance::postgres::TestDatabase;
use chat_conformance::{Connector, conformance_tests};
use chat_core::Chat;
use chat_grpc::GrpcClient;
use chat_server::Listen;
use chat_socket::SocketClient;
use chat_store_pg::{PgOptions, PgStore};

/// A server on its own schema; the schema lives as long as this.
struct OnPostgres<C> {
    addr: SocketAddr,
    _db: TestDatabase,
    _client: std::marker::PhantomData<fn() -> C>,
}

async fn start<C>(test: &str, listen: fn(SocketAddr) -> Listen) -> Option<OnPostgres<C>> {
    let db = TestDatabase::create(test).await?;
    let store = PgStore::connect(&db.url, PgOptions::default())
        .await
        .expect("connect and migrate");
    let chat = Chat::new(Arc::new(store), chat_core::Config::default());
    let addr = chat_server::spawn(&[listen("127.0.0.1:0".parse().unwrap())], chat)
        .await
        .expect("start")[0];
    Some(OnPostgres {
        addr,
        _db: db,
        _client: std::marker::PhantomData,
    })
}

impl Connector for OnPostgres<SocketClient> {
    type Client = SocketClient;
    async fn connect(&self) -> SocketClient {
        SocketClient::connect(self.addr).await.expect("connect")
    }
}

impl Connector for OnPostgres<GrpcClient> {
    type Client = GrpcClient;
    async fn connect(&self) -> GrpcClient {
        GrpcClient::connect(&self.addr.to_string())
            .await
            .expect("connect")
    }
}

mod socket {
    use super::*;

    async fn start(test: &str) -> Option<OnPostgres<SocketClient>> {
        super::start(test, Listen::Socket).await
    }

    conformance_tests!(optional start);
}

mod grpc {
    use super::*;

    async fn start(test: &str) -> Option<OnPostgres<GrpcClient>> {
        super::start(test, Listen::Grpc).await
    }

    conformance_tests!(optional start);
}
