//! The conformance suite over the socket transport, against a real server
//! on an ephemeral loopback port.

use std::net::SocketAddr;

use chat_conformance::{Connector, conformance_tests};
use chat_core::Chat;
use chat_socket::{ServerConfig, SocketClient, serve};
use tokio::net::TcpListener;

struct Socket {
    addr: SocketAddr,
}

impl Connector for Socket {
    type Client = SocketClient;

    async fn connect(&self) -> SocketClient {
        SocketClient::connect(self.addr)
            .await
            .expect("connect to the test server")
    }
}

async fn start() -> Socket {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(
        listener,
        Chat::in_memory(),
        ServerConfig::default(),
        std::future::pending(),
    ));
    Socket { addr }
}

conformance_tests!(start);
