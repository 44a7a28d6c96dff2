//! TLS on both transports: the conformance suite over TLS, what a client
//! that does not trust the server (or speaks plaintext to it) is told, a
//! full server saying why over TLS, and a certificate reloaded under live
//! sessions. Certificates are made at test time (rcgen).

use std::net::SocketAddr;

use chat_conformance::pki::TestPki;
use chat_conformance::{Connector, conformance_tests, next_message};
use chat_core::client::ChatClient;
use chat_core::{Chat, ErrorCode};
use chat_grpc::GrpcClient;
use chat_server::{Bound, Listen, Tuning};
use chat_socket::SocketClient;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Serving TLS with `pki`'s certificate, on top of `tuning`.
fn with_tls(pki: &TestPki, tuning: Tuning) -> Tuning {
    Tuning {
        tls_cert: Some(pki.cert_path()),
        tls_key: Some(pki.key_path()),
        ..tuning
    }
}

/// A TLS server on one transport; the certificates live as long as this.
struct Tls<C> {
    addr: SocketAddr,
    pki: TestPki,
    _client: std::marker::PhantomData<fn() -> C>,
}

async fn start<C>(listen: fn(SocketAddr) -> Listen) -> Tls<C> {
    let pki = TestPki::new();
    let tuning = with_tls(&pki, Tuning::default());
    let addr = chat_server::spawn_with(&[listen(any())], Chat::in_memory(), tuning)
        .await
        .expect("start")[0];
    Tls {
        addr,
        pki,
        _client: std::marker::PhantomData,
    }
}

impl Connector for Tls<SocketClient> {
    type Client = SocketClient;
    async fn connect(&self) -> SocketClient {
        SocketClient::connect_tls(self.addr, self.pki.client())
            .await
            .expect("connect over TLS")
    }
}

impl Connector for Tls<GrpcClient> {
    type Client = GrpcClient;
    async fn connect(&self) -> GrpcClient {
        GrpcClient::connect_tls(&self.addr.to_string(), self.pki.client())
            .await
            .expect("connect over TLS")
    }
}

mod socket_tls {
    use super::*;

    async fn start() -> Tls<SocketClient> {
        super::start(Listen::Socket).await
    }

    conformance_tests!(start);
}

mod grpc_tls {
    use super::*;

    async fn start() -> Tls<GrpcClient> {
        super::start(Listen::Grpc).await
    }

    conformance_tests!(start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_trust_the_certificate_are_refused() {
    let socket = start::<SocketClient>(Listen::Socket).await;
    let grpc = start::<GrpcClient>(Listen::Grpc).await;
    let stranger = TestPki::new();

    let err = SocketClient::connect_tls(socket.addr, stranger.client())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let err = GrpcClient::connect_tls(&grpc.addr.to_string(), stranger.client())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // The right CA, the wrong name.
    let wrong_name = socket.pki.client().server_name("chat.example.org").unwrap();
    let err = SocketClient::connect_tls(socket.addr, wrong_name)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // By DNS name as well as by address.
    let port = socket.addr.port();
    let mut by_name = SocketClient::connect_tls(format!("localhost:{port}"), socket.pki.client())
        .await
        .expect("the certificate names localhost");
    by_name.create("by_name", "password1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_of_a_tls_server_fail_at_connect() {
    let socket = start::<SocketClient>(Listen::Socket).await;
    let grpc = start::<GrpcClient>(Listen::Grpc).await;
    let err = SocketClient::connect(socket.addr).await.unwrap_err();
    assert!(err.to_string().contains("connect with TLS"), "{err}");
    let err = GrpcClient::connect(&grpc.addr.to_string())
        .await
        .unwrap_err();
    assert!(
        matches!(err, chat_core::client::ClientError::Connection(_)),
        "{err}"
    );
    // And the server still serves TLS clients.
    socket
        .connect()
        .await
        .create("after", "password1")
        .await
        .unwrap();
    grpc.connect()
        .await
        .create("after", "password1")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tls_server_tells_the_client_why() {
    let pki = TestPki::new();
    let tuning = with_tls(
        &pki,
        Tuning {
            max_connections: 1,
            ..Tuning::default()
        },
    );
    let addr = chat_server::spawn_with(&[Listen::Socket(any())], Chat::in_memory(), tuning)
        .await
        .unwrap()[0];
    let _first = SocketClient::connect_tls(addr, pki.client()).await.unwrap();
    let refused = SocketClient::connect_tls(addr, pki.client())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ServerFull), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_serves_new_connections_and_spares_open_ones() {
    let mut pki = TestPki::new();
    let tls = pki.server();
    let bound = Bound::bind(&[Listen::Socket(any()), Listen::Grpc(any())])
        .await
        .unwrap();
    let addrs = bound.local_addrs().unwrap();
    let serving = tls.clone();
    tokio::spawn(async move {
        bound
            .serve_with_tls(
                Chat::in_memory(),
                &Tuning::default(),
                Some(serving),
                std::future::pending(),
            )
            .await
    });
    let mut sam = SocketClient::connect_tls(addrs[0], pki.client())
        .await
        .unwrap();
    let mut gina = GrpcClient::connect_tls(&addrs[1].to_string(), pki.client())
        .await
        .unwrap();
    sam.create("sam", "password1").await.unwrap();
    gina.create("gina", "password1").await.unwrap();

    let old_ca = pki.ca_pem.clone();
    pki.renew();
    tls.reload().expect("the renewed pair loads");

    // Sessions opened before the reload carry on, across transports.
    sam.send("gina", "still here").await.unwrap();
    assert_eq!(next_message(&mut gina).await.body.as_str(), "still here");
    gina.send("sam", "me too").await.unwrap();
    assert_eq!(next_message(&mut sam).await.body.as_str(), "me too");

    // New connections get the renewed certificate on both transports.
    SocketClient::connect_tls(addrs[0], pki.client())
        .await
        .expect("the renewed CA is trusted");
    GrpcClient::connect_tls(&addrs[1].to_string(), pki.client())
        .await
        .expect("the renewed CA is trusted");
    // A new client that trusts only the old CA is refused. (One that
    // connected before may resume its TLS session without being shown a
    // certificate: resumption is checked against the session, not the
    // files.)
    let old_ca = chat_tls::ClientTls::with_ca_pem(old_ca.as_bytes()).unwrap();
    let err = SocketClient::connect_tls(addrs[0], old_ca)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}
