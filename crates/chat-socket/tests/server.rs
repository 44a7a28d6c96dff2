//! The socket server against raw bytes and real clients: handshake and
//! version negotiation, extensibility, pipelining, malformed input, idle
//! and handshake timeouts, a full server, heartbeat, replay after login and
//! shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use chat_core::client::ChatClient;
use chat_core::{Chat, ErrorCode, SessionState};
use chat_socket::codec::ClientCodec;
use chat_socket::frame::{SendKey, feature};
use chat_socket::{ClientFrame, PROTOCOL_VERSION, ServerConfig, ServerFrame, SocketClient, serve};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

const PATIENCE: Duration = Duration::from_secs(20);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(config: ServerConfig) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, Chat::in_memory(), config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        done,
    }
}

type Raw = Framed<TcpStream, ClientCodec>;

async fn raw(addr: SocketAddr) -> Raw {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        ClientCodec::new(1 << 20),
    )
}

async fn greeted(addr: SocketAddr) -> Raw {
    greeted_with(addr, None).await
}

fn hello(send_key: Option<SendKey>) -> ClientFrame {
    ClientFrame::Hello {
        highest: PROTOCOL_VERSION,
        lowest: PROTOCOL_VERSION,
        features: if send_key.is_some() {
            feature::IDEMPOTENT_SEND
        } else {
            0
        },
        send_key,
    }
}

async fn greeted_with(addr: SocketAddr, send_key: Option<SendKey>) -> Raw {
    let mut conn = raw(addr).await;
    conn.send(hello(send_key)).await.unwrap();
    match next(&mut conn).await {
        Some(ServerFrame::Welcome {
            version,
            features,
            max_frame,
            idle_timeout_ms,
            queue_limit,
            max_list,
            max_fetch,
            server,
        }) => {
            assert_eq!(version, PROTOCOL_VERSION);
            let offered = if send_key.is_some() {
                feature::IDEMPOTENT_SEND
            } else {
                0
            };
            assert_eq!(features, offered, "the offered features it has");
            assert_eq!(max_frame, 8192);
            assert_eq!(idle_timeout_ms, 45_000);
            assert_eq!(queue_limit, 10_000);
            assert_eq!(max_list, 1000);
            assert_eq!(max_fetch, 256);
            assert!(server.starts_with("chat-socket "), "{server}");
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    conn
}

async fn next(conn: &mut Raw) -> Option<ServerFrame> {
    tokio::time::timeout(PATIENCE, conn.next())
        .await
        .expect("server answered in time")
        .map(|r| r.expect("valid frame"))
}

/// Writes raw bytes and expects a goodbye with `code`, then the close.
async fn expect_goodbye(conn: &mut Raw, code: ErrorCode) {
    match next(conn).await {
        Some(ServerFrame::Goodbye {
            code: got, message, ..
        }) => {
            assert_eq!(got, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected goodbye {code}, got {other:?}"),
    }
    assert_eq!(next(conn).await, None, "connection closed after goodbye");
}

async fn still_serves(addr: SocketAddr) {
    let mut client = SocketClient::connect(addr).await.unwrap();
    client.list("", 0).await.unwrap();
}

#[tokio::test]
async fn first_frame_must_be_hello() {
    let server = start(ServerConfig::default()).await;
    let mut conn = raw(server.addr).await;
    conn.send(ClientFrame::Login {
        id: 1,
        name: "alice".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
    expect_goodbye(&mut conn, ErrorCode::HandshakeRequired).await;
    still_serves(server.addr).await;
}

/// A version 1 client's hello gets a goodbye in version 1's layout (code,
/// then the text to the end of the frame), naming the versions spoken.
#[tokio::test]
async fn a_version_1_client_gets_a_goodbye_it_can_read() {
    let server = start(ServerConfig::default()).await;
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    // Version 1's hello: tag, magic, version 1, a 12-byte send key.
    let mut hello = vec![0, 0, 0, 19, 0x01];
    hello.extend_from_slice(b"CHAT");
    hello.extend_from_slice(&1u16.to_be_bytes());
    hello.extend_from_slice(b"0123456789ab");
    conn.write_all(&hello).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let len = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 4 + len, "one frame, then the close");
    assert_eq!(reply[4], 0xa2, "a goodbye");
    assert_eq!(
        u16::from_be_bytes([reply[5], reply[6]]),
        ErrorCode::UnsupportedVersion.as_u16()
    );
    let text = std::str::from_utf8(&reply[7..]).unwrap();
    assert!(
        text.starts_with("this server speaks protocol version 2"),
        "{text}"
    );
}

/// A client whose versions do not meet the server's gets a goodbye that
/// lists the server's.
#[tokio::test]
async fn no_common_version_is_refused_with_the_servers_versions() {
    let server = start(ServerConfig::default()).await;
    let mut conn = raw(server.addr).await;
    conn.send(ClientFrame::Hello {
        highest: 9,
        lowest: 7,
        features: 0,
        send_key: None,
    })
    .await
    .unwrap();
    match next(&mut conn).await {
        Some(ServerFrame::Goodbye {
            code: ErrorCode::UnsupportedVersion,
            versions,
            ..
        }) => assert_eq!(versions, [PROTOCOL_VERSION]),
        other => panic!("{other:?}"),
    }
    // A client that speaks newer versions too is answered in the newest
    // both speak.
    let mut conn = raw(server.addr).await;
    conn.send(ClientFrame::Hello {
        highest: 9,
        lowest: 1,
        features: 0,
        send_key: None,
    })
    .await
    .unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Welcome {
            version: PROTOCOL_VERSION,
            ..
        })
    ));
}

/// Optional fields a newer client adds (properties this server does not
/// know), and features it does not have, are skipped.
#[tokio::test]
async fn unknown_properties_and_features_are_skipped() {
    let server = start(ServerConfig::default()).await;
    let mut conn = raw(server.addr).await;
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(b"CHAT");
    bytes.extend_from_slice(&[0, 2, 0, 2]); // versions 2..=2
    bytes.extend_from_slice(&0x8000_0000u32.to_be_bytes()); // an unknown feature
    bytes.extend_from_slice(&[0x7e, 3, b'n', b'e', b'w']); // an unknown property
    let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    // CREATE "x" (password "password") with an unknown property after its
    // fields.
    framed.extend_from_slice(&[0, 0, 0, 20, 0x10, 0, 0, 0, 1, 1, b'x', 8]);
    framed.extend_from_slice(b"password");
    framed.extend_from_slice(&[0x7f, 2, 0xaa, 0xbb]);
    conn.get_mut().write_all(&framed).await.unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Welcome { features: 0, .. })
    ));
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Done {
            id: 1,
            state: SessionState::LoggedIn(_),
            ..
        })
    ));
}

/// A client may send requests right after its hello, without waiting for
/// the welcome, and many at once: the answers come in request order.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(ServerConfig::default()).await;
    let mut conn = raw(server.addr).await;
    conn.feed(hello(None)).await.unwrap();
    conn.feed(ClientFrame::Create {
        id: 1,
        name: "piper".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
    for id in 2..=20 {
        conn.feed(ClientFrame::List {
            id,
            max: 0,
            pattern: "pip".into(),
        })
        .await
        .unwrap();
    }
    conn.feed(ClientFrame::Ping { nonce: 21 }).await.unwrap();
    conn.flush().await.unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Welcome { .. })
    ));
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Done { id: 1, .. })
    ));
    for expected in 2..=20 {
        match next(&mut conn).await {
            Some(ServerFrame::Accounts { id, names, .. }) => {
                assert_eq!(id, expected);
                assert_eq!(names.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(next(&mut conn).await, Some(ServerFrame::Pong { nonce: 21 }));
}

/// At the connection limit, a new connection hears why at once instead of
/// hanging in the listen backlog; a freed slot serves again.
#[tokio::test]
async fn a_full_server_says_so() {
    let config = ServerConfig {
        connections: chat_core::ConnectionLimit::new(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let first = greeted(server.addr).await;
    let mut second = raw(server.addr).await;
    expect_goodbye(&mut second, ErrorCode::ServerFull).await;
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match SocketClient::connect(server.addr).await {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::ServerFull), "{err}");
                assert!(tokio::time::Instant::now() < deadline, "never freed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A connection that never says hello is closed after the (short)
/// handshake timeout, not the idle timeout.
#[tokio::test]
async fn a_connection_without_a_hello_is_closed() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut conn = raw(server.addr).await;
    expect_goodbye(&mut conn, ErrorCode::HandshakeTimeout).await;
}

/// A login answers first, saying how many unacknowledged messages are
/// replayed; they follow as pushes, before any live one.
#[tokio::test]
async fn a_login_answers_before_its_replay_and_counts_it() {
    let server = start(ServerConfig::default()).await;
    let mut alice = SocketClient::connect(server.addr).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = greeted(server.addr).await;
    call(
        &mut bob,
        ClientFrame::Create {
            id: 1,
            name: "bob".into(),
            password: "password1".into(),
        },
    )
    .await;
    for body in ["r1", "r2", "r3"] {
        alice.send("bob", body).await.unwrap();
    }
    for _ in 0..3 {
        assert!(matches!(
            next(&mut bob).await,
            Some(ServerFrame::PushMessage(_))
        ));
    }
    call(&mut bob, ClientFrame::Logout { id: 2 }).await;
    bob.send(ClientFrame::Login {
        id: 3,
        name: "bob".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
    match next(&mut bob).await {
        Some(ServerFrame::Done {
            id: 3,
            replay: Some(3),
            ..
        }) => {}
        other => panic!("expected the login's answer first, got {other:?}"),
    }
    alice.send("bob", "live").await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        match next(&mut bob).await {
            Some(ServerFrame::PushMessage(m)) => bodies.push(m.body.to_string()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(bodies, ["r1", "r2", "r3", "live"]);
}

#[tokio::test]
async fn malformed_input_gets_an_error_frame_and_logs_out() {
    let server = start(ServerConfig::default()).await;
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (vec![0, 0, 0, 3, 0x7f, 0, 0], ErrorCode::UnknownOperation),
        (
            (1u32 << 20).to_be_bytes().to_vec(),
            ErrorCode::FrameTooLarge,
        ),
        (vec![0, 0, 0, 0], ErrorCode::Malformed),
        (
            vec![0, 0, 0, 7, 0x11, 0, 0, 0, 1, 0xff, 0xfe],
            ErrorCode::Malformed,
        ),
        (
            vec![0, 0, 0, 8, 0x11, 0, 0, 0, 1, 2, 0xff, 0xfe],
            ErrorCode::Malformed,
        ),
        (
            vec![0, 0, 0, 9, 0x11, 0, 0, 0, 1, 0, 0x7f, 0, 0x7f],
            ErrorCode::Malformed,
        ),
        (vec![0, 0, 0, 3, 0x14, 0, 0], ErrorCode::Malformed),
    ];
    for (bytes, code) in cases {
        let mut conn = greeted(server.addr).await;
        conn.send(ClientFrame::Create {
            id: 1,
            name: "victim".into(),
            password: "password1".into(),
        })
        .await
        .unwrap();
        match next(&mut conn).await {
            Some(ServerFrame::Done { .. }) => {}
            other => panic!("create failed: {other:?}"),
        }
        conn.get_mut().write_all(&bytes).await.unwrap();
        expect_goodbye(&mut conn, code).await;
        // The session ended with the connection: the name is free to use.
        let mut client = SocketClient::connect(server.addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match client.login("victim", "password1").await {
                Ok(_) => break,
                Err(err) => {
                    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "{err}");
                    assert!(tokio::time::Instant::now() < deadline);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        client.delete("password1").await.unwrap();
    }
}

#[tokio::test]
async fn silent_peers_are_dropped_and_logged_out() {
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut conn = raw(server.addr).await;
    conn.send(hello(None)).await.unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Welcome {
            idle_timeout_ms: 300,
            ..
        })
    ));
    conn.send(ClientFrame::Create {
        id: 1,
        name: "sleepy".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Done { .. })
    ));
    // Say nothing: the server gives up on us.
    expect_goodbye(&mut conn, ErrorCode::IdleTimeout).await;
    let mut other = SocketClient::connect(server.addr).await.unwrap();
    assert!(other.login("sleepy", "password1").await.is_ok());
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_client_connected() {
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut client = SocketClient::connect(server.addr).await.unwrap();
    client.create("patient", "password1").await.unwrap();
    // Several idle timeouts pass with no request; the client's pings count.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(client.list("patient", 0).await.unwrap().len(), 1);
    assert!(client.state().user().is_some());
}

#[tokio::test]
async fn pings_are_answered() {
    let server = start(ServerConfig::default()).await;
    let mut conn = greeted(server.addr).await;
    conn.send(ClientFrame::Ping { nonce: 0xdead_beef })
        .await
        .unwrap();
    assert_eq!(
        next(&mut conn).await,
        Some(ServerFrame::Pong { nonce: 0xdead_beef })
    );
}

#[tokio::test]
async fn responses_carry_the_request_id_and_state() {
    let server = start(ServerConfig::default()).await;
    let mut conn = greeted(server.addr).await;
    conn.send(ClientFrame::Fetch { id: 41, max: 1 })
        .await
        .unwrap();
    match next(&mut conn).await {
        Some(ServerFrame::Error {
            id: 41,
            state: SessionState::LoggedOut,
            code: ErrorCode::NotLoggedIn,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    conn.send(ClientFrame::Create {
        id: 42,
        name: "x".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        next(&mut conn).await,
        Some(ServerFrame::Done {
            id: 42,
            state: SessionState::LoggedIn(_),
            replay: Some(0),
        })
    ));
}

#[tokio::test]
async fn shutdown_says_goodbye_and_drains() {
    let mut server = start(ServerConfig::default()).await;
    let mut alice = SocketClient::connect(server.addr).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    chat_conformance::expect_goodbye(&mut alice, ErrorCode::ShuttingDown).await;
    tokio::time::timeout(PATIENCE, server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "no longer listening"
    );
}

/// Sends one request and returns its answer.
async fn call(conn: &mut Raw, frame: ClientFrame) -> ServerFrame {
    conn.send(frame).await.unwrap();
    next(conn).await.expect("an answer")
}

/// A SEND ONCE as raw frames; the message id its SENT names.
async fn send_once(conn: &mut Raw, id: u32, body: &str) -> u64 {
    let frame = ClientFrame::SendOnce {
        id,
        to: "bob".into(),
        body: body.into(),
    };
    match call(conn, frame).await {
        ServerFrame::Sent {
            id: answered,
            message_id,
            ..
        } if answered == id => message_id,
        other => panic!("expected SENT for request {id}, got {other:?}"),
    }
}

#[tokio::test]
async fn send_once_is_keyed_by_the_hellos_send_key_and_the_request_id() {
    let server = start(ServerConfig::default()).await;
    let key: SendKey = *b"0123456789ab";
    let login = |id| ClientFrame::Login {
        id,
        name: "alice".into(),
        password: "password1".into(),
    };

    let mut bob = greeted(server.addr).await;
    let created = call(
        &mut bob,
        ClientFrame::Create {
            id: 1,
            name: "bob".into(),
            password: "password1".into(),
        },
    )
    .await;
    assert!(matches!(created, ServerFrame::Done { .. }), "{created:?}");
    call(&mut bob, ClientFrame::Logout { id: 2 }).await;

    let mut first = greeted_with(server.addr, Some(key)).await;
    let created = call(
        &mut first,
        ClientFrame::Create {
            id: 1,
            name: "alice".into(),
            password: "password1".into(),
        },
    )
    .await;
    assert!(matches!(created, ServerFrame::Done { .. }), "{created:?}");
    let original = send_once(&mut first, 7, "one").await;
    assert_eq!(
        send_once(&mut first, 7, "one").await,
        original,
        "same connection"
    );
    call(&mut first, ClientFrame::Logout { id: 8 }).await;
    drop(first);

    // A new connection with the same key: the resend of request 7 is the
    // same message; request 8 is a new send.
    let mut again = greeted_with(server.addr, Some(key)).await;
    assert!(matches!(
        call(&mut again, login(1)).await,
        ServerFrame::Done { .. }
    ));
    assert_eq!(
        send_once(&mut again, 7, "one").await,
        original,
        "after reconnecting"
    );
    let second = send_once(&mut again, 8, "two").await;
    assert_ne!(second, original);
    call(&mut again, ClientFrame::Logout { id: 9 }).await;

    // Another key: request 7 is another send.
    let mut other = greeted_with(server.addr, Some(*b"another key!")).await;
    assert!(matches!(
        call(&mut other, login(1)).await,
        ServerFrame::Done { .. }
    ));
    let third = send_once(&mut other, 7, "three").await;
    assert!(third != original && third != second);

    // Without a key, SEND ONCE is a protocol error: the connection ends
    // and nothing is stored.
    call(&mut other, ClientFrame::Logout { id: 2 }).await;
    let mut keyless = greeted(server.addr).await;
    assert!(matches!(
        call(&mut keyless, login(1)).await,
        ServerFrame::Done { .. }
    ));
    keyless
        .send(ClientFrame::SendOnce {
            id: 3,
            to: "bob".into(),
            body: "four".into(),
        })
        .await
        .unwrap();
    expect_goodbye(&mut keyless, ErrorCode::Malformed).await;

    assert!(matches!(
        call(
            &mut bob,
            ClientFrame::Login {
                id: 3,
                name: "bob".into(),
                password: "password1".into(),
            }
        )
        .await,
        ServerFrame::Done { .. }
    ));
    match call(&mut bob, ClientFrame::Fetch { id: 4, max: 0 }).await {
        ServerFrame::Messages { messages, .. } => {
            let bodies: Vec<&str> = messages.iter().map(|m| m.body.as_str()).collect();
            assert_eq!(bodies, ["one", "two", "three"]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_send_key_of_the_wrong_length_is_malformed() {
    let server = start(ServerConfig::default()).await;
    let mut conn = raw(server.addr).await;
    let mut hello = vec![0, 0, 0, 20, 0x01];
    hello.extend_from_slice(b"CHAT");
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    hello.extend_from_slice(&feature::IDEMPOTENT_SEND.to_be_bytes());
    hello.extend_from_slice(&[0x01, 5, 1, 2, 3, 4, 5]); // a 5-byte send key
    conn.get_mut().write_all(&hello).await.unwrap();
    expect_goodbye(&mut conn, ErrorCode::Malformed).await;
    still_serves(server.addr).await;
}
