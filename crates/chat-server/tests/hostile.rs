//! Hostile input at live servers: while garbage, the wrong protocols and
//! slow-loris trickles hit both ports, a well-behaved pair of users keeps
//! chatting, and loses nothing.

use std::net::SocketAddr;
use std::time::Duration;

use chat_core::Chat;
use chat_core::client::ChatClient;
use chat_grpc::GrpcClient;
use chat_server::{Listen, Tuning};
use chat_socket::SocketClient;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(30);
const MESSAGES: usize = 100;

/// Sends `bytes`, then reads until the server closes the connection (EOF
/// or reset); fails if it is still open after [`PATIENCE`].
async fn expect_closed(addr: SocketAddr, bytes: Vec<u8>) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The server may close before everything is written.
    let _ = conn.write_all(&bytes).await;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut sink)).await;
    assert!(
        read.is_ok(),
        "{addr} kept a connection open after {} bytes",
        bytes.len()
    );
}

/// Writes `start` and then zeros, one byte at a time, slowly. Each `start`
/// announces a frame or record far longer than the trickle can deliver in
/// [`PATIENCE`], so nothing the server reads ever completes: only its
/// handshake timeout can close the connection, and it must.
async fn slow_loris(addr: SocketAddr, start: &'static [u8]) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for byte in start.iter().chain(std::iter::repeat(&0)) {
        if conn.write_all(&[*byte]).await.is_err() {
            return;
        }
        // A closed connection shows as EOF (or an error) on read.
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} let a trickle hold a connection"
        );
    }
}

/// A socket frame of 8,191 bytes (a HELLO), of which the trickle sends the
/// start.
const SOCKET_TRICKLE: &[u8] = b"\x00\x00\x1f\xff\x01CHAT";

/// The HTTP/2 preface, then a SETTINGS frame of 16,380 bytes.
const HTTP2_TRICKLE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x3f\xfc\x04\x00\x00\x00\x00\x00";

/// A TLS handshake record of 16,383 bytes.
const TLS_TRICKLE: &[u8] = &[0x16, 0x03, 0x01, 0x3f, 0xff, 0x01];

/// Pretends to be a TLS client: a ClientHello record header and the start
/// of its handshake message.
fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0x42; 32]);
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_keeps_chatting_while_both_ports_are_attacked() {
    let tuning = Tuning {
        handshake_timeout_secs: 1,
        ..Tuning::default()
    };
    let addrs = chat_server::spawn_with(&both(), Chat::in_memory(), tuning)
        .await
        .unwrap();
    let (socket, grpc) = (addrs[0], addrs[1]);

    let mut alice = SocketClient::connect(socket).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = GrpcClient::connect(&grpc.to_string()).await.unwrap();
    bob.create("bob", "password1").await.unwrap();

    let mut attacks = tokio::task::JoinSet::new();
    // Random bytes, with and without a hello in front.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..16 {
        let len = rng.random_range(1..2048);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if round % 2 == 0 {
            let mut hello = vec![0, 0, 0, 13, 0x01];
            hello.extend_from_slice(b"CHAT");
            hello.extend_from_slice(&[0, 2, 0, 2, 0, 0, 0, 0]);
            hello.append(&mut bytes);
            bytes = hello;
        }
        let addr = if round % 4 < 2 { socket } else { grpc };
        attacks.spawn(expect_closed(addr, bytes));
    }
    // The wrong protocols at both ports.
    for addr in [socket, grpc] {
        attacks.spawn(expect_closed(
            addr,
            b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n".to_vec(),
        ));
        attacks.spawn(expect_closed(addr, tls_client_hello()));
        attacks.spawn(slow_loris(addr, SOCKET_TRICKLE));
    }
    attacks.spawn(slow_loris(grpc, HTTP2_TRICKLE));

    // Meanwhile, the pair chats: every message arrives, in order.
    chat_through(&mut alice, &mut bob, attacks).await;
    // And the server still takes new users.
    let mut carol = SocketClient::connect(socket).await.unwrap();
    carol.create("carol", "password1").await.unwrap();
}

/// The same at TLS ports: connections that never start a TLS handshake,
/// start one and stall, trickle it, or speak plaintext are all closed
/// within the handshake timeout, while a TLS pair chats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_pair_keeps_chatting_while_handshakes_are_attacked() {
    let pki = chat_conformance::pki::TestPki::new();
    let tuning = Tuning {
        handshake_timeout_secs: 1,
        tls_cert: Some(pki.cert_path()),
        tls_key: Some(pki.key_path()),
        ..Tuning::default()
    };
    let addrs = chat_server::spawn_with(&both(), Chat::in_memory(), tuning)
        .await
        .unwrap();
    let (socket, grpc) = (addrs[0], addrs[1]);
    let mut alice = SocketClient::connect_tls(socket, pki.client())
        .await
        .unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = GrpcClient::connect_tls(&grpc.to_string(), pki.client())
        .await
        .unwrap();
    bob.create("bob", "password1").await.unwrap();

    let mut attacks = tokio::task::JoinSet::new();
    for addr in [socket, grpc] {
        // Silent: not a byte.
        attacks.spawn(expect_closed(addr, Vec::new()));
        // Half a ClientHello, then nothing.
        attacks.spawn(expect_closed(addr, tls_client_hello()));
        attacks.spawn(slow_loris(addr, TLS_TRICKLE));
        // Plaintext protocols at a TLS port.
        attacks.spawn(expect_closed(
            addr,
            b"\x00\x00\x00\x0d\x01CHAT\x00\x02\x00\x02\x00\x00\x00\x00".to_vec(),
        ));
        attacks.spawn(expect_closed(
            addr,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ));
    }
    chat_through(&mut alice, &mut bob, attacks).await;
    let mut carol = SocketClient::connect_tls(socket, pki.client())
        .await
        .unwrap();
    carol.create("carol", "password1").await.unwrap();
}

/// Alice and Bob exchange [`MESSAGES`] each way while `attacks` run: every
/// message arrives, in order; then every attack must have seen its
/// connection closed.
async fn chat_through(
    alice: &mut impl ChatClient,
    bob: &mut impl ChatClient,
    mut attacks: tokio::task::JoinSet<()>,
) {
    let chat = async {
        for i in 0..MESSAGES {
            alice.send("bob", &format!("a{i}")).await.unwrap();
            bob.send("alice", &format!("b{i}")).await.unwrap();
        }
        for i in 0..MESSAGES {
            assert_eq!(next_body(bob).await, format!("a{i}"));
            assert_eq!(next_body(alice).await, format!("b{i}"));
        }
    };
    tokio::time::timeout(PATIENCE * 2, chat)
        .await
        .expect("the pair chatted in time");
    while let Some(attack) = attacks.join_next().await {
        attack.expect("every attack saw its connection closed");
    }
}

/// The next message's body, acknowledged.
async fn next_body<C: ChatClient>(client: &mut C) -> String {
    let m = chat_conformance::next_message(client).await;
    client.ack(m.id).await.unwrap();
    m.body.to_string()
}

/// Both transports on free loopback ports.
fn both() -> [Listen; 2] {
    let any = "127.0.0.1:0".parse().unwrap();
    [Listen::Socket(any), Listen::Grpc(any)]
}
