//! gRPC-specific behaviour: session tokens and their stream, status codes,
//! health and reflection, shutdown. Raw tonic stubs, so every byte of the
//! contract other-language clients rely on is exercised.

use std::net::SocketAddr;
use std::time::Duration;

use chat_core::client::ChatClient;
use chat_core::{Chat, ErrorCode};
use chat_grpc::pb::chat_client::ChatClient as Stub;
use chat_grpc::pb::{self, push};
use chat_grpc::status::{ERROR_CODE_KEY, chat_code};
use chat_grpc::{GrpcClient, GrpcConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const PATIENCE: Duration = Duration::from_secs(20);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

async fn start(config: GrpcConfig) -> Server {
    start_with(Chat::in_memory(), config).await
}

async fn start_with(chat: Chat, config: GrpcConfig) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, chat, config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[track_caller]
fn expect_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    grpc: Code,
    chat: ErrorCode,
) -> Status {
    let status = result.expect_err("the call fails");
    assert_eq!(
        (status.code(), chat_code(&status)),
        (grpc, Some(chat)),
        "{status:?}"
    );
    status
}

async fn create(stub: &mut Stub<Channel>, name: &str) -> String {
    let reply = stub
        .create_account(pb::CreateAccountRequest {
            username: name.into(),
            password: "password1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.state.unwrap().username, name);
    assert_eq!(reply.token.len(), 80, "64-bit id and 256-bit secret, hex");
    reply.token
}

#[tokio::test]
async fn errors_carry_the_stable_code_and_the_fitting_status() {
    let server = start(GrpcConfig::default()).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "alice").await;
    let taken = expect_status(
        stub.create_account(pb::CreateAccountRequest {
            username: "alice".into(),
            password: "password1".into(),
        })
        .await,
        Code::AlreadyExists,
        ErrorCode::UsernameTaken,
    );
    assert_eq!(
        taken.metadata().get(ERROR_CODE_KEY).unwrap(),
        "username_taken"
    );
    expect_status(
        stub.create_account(pb::CreateAccountRequest {
            username: "a b".into(),
            password: "password1".into(),
        })
        .await,
        Code::InvalidArgument,
        ErrorCode::InvalidUsername,
    );
    expect_status(
        stub.send_message(with_token(
            pb::SendMessageRequest {
                recipient: "nobody".into(),
                body: "hi".into(),
                send_id: vec![],
            },
            &token,
        ))
        .await,
        Code::NotFound,
        ErrorCode::NoSuchUser,
    );
    expect_status(
        stub.send_message(pb::SendMessageRequest {
            recipient: "alice".into(),
            body: "hi".into(),
            send_id: vec![],
        })
        .await,
        Code::Unauthenticated,
        ErrorCode::NotLoggedIn,
    );
    expect_status(
        stub.send_message(with_token(
            pb::SendMessageRequest {
                recipient: "alice".into(),
                body: "hi".into(),
                send_id: vec![1, 2, 3],
            },
            &token,
        ))
        .await,
        Code::InvalidArgument,
        ErrorCode::Malformed,
    );
    // A resend with the same 16-byte id returns the original receipt.
    let once = |id: u8| pb::SendMessageRequest {
        recipient: "alice".into(),
        body: "once".into(),
        send_id: vec![id; 16],
    };
    let first = stub
        .send_message(with_token(once(7), &token))
        .await
        .unwrap()
        .into_inner();
    let again = stub
        .send_message(with_token(once(7), &token))
        .await
        .unwrap()
        .into_inner();
    let other = stub
        .send_message(with_token(once(8), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.message_id, first.timestamp_ms),
        (again.message_id, again.timestamp_ms)
    );
    assert_eq!(other.message_id, first.message_id + 1);
    expect_status(
        stub.list_accounts(pb::ListAccountsRequest {
            pattern: "(".into(),
            max: 0,
        })
        .await,
        Code::InvalidArgument,
        ErrorCode::InvalidPattern,
    );
    expect_status(
        stub.login(with_token(
            pb::LoginRequest {
                username: "alice".into(),
                password: "password1".into(),
            },
            &token,
        ))
        .await,
        Code::FailedPrecondition,
        ErrorCode::SessionLoggedIn,
    );
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let server = start(GrpcConfig::default()).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "alice").await;
    // Right id, wrong secret; the real token in upper case, or padded.
    let forged = format!("{}{}", &token[..16], "0".repeat(64));
    let upper = token.to_uppercase();
    let padded = format!("{token} ");
    for bad in [
        forged.as_str(),
        "short",
        &"z".repeat(80),
        upper.as_str(),
        padded.as_str(),
    ] {
        expect_status(
            stub.fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, bad))
                .await,
            Code::Unauthenticated,
            ErrorCode::Unauthenticated,
        );
    }
    let mut basic = Request::new(pb::FetchMessagesRequest { max: 0 });
    basic
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    expect_status(
        stub.fetch_messages(basic).await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    // A void token is refused even by the calls that need none.
    expect_status(
        stub.list_accounts(with_token(
            pb::ListAccountsRequest {
                pattern: String::new(),
                max: 0,
            },
            &forged,
        ))
        .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    expect_status(
        stub.login(with_token(
            pb::LoginRequest {
                username: "alice".into(),
                password: "password1".into(),
            },
            &forged,
        ))
        .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    expect_status(
        stub.create_account(with_token(
            pb::CreateAccountRequest {
                username: "bob".into(),
                password: "password1".into(),
            },
            &forged,
        ))
        .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    // The real token still works, and listing needs none.
    stub.fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, &token))
        .await
        .unwrap();
    stub.list_accounts(pb::ListAccountsRequest {
        pattern: String::new(),
        max: 0,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn closing_the_stream_logs_out_and_voids_the_token() {
    let server = start(GrpcConfig::default()).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "alice").await;
    let stream = stub
        .subscribe(with_token(pb::SubscribeRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    // A second login is refused while the stream is open.
    let mut other = Stub::new(channel(server.addr).await);
    expect_status(
        other
            .login(pb::LoginRequest {
                username: "alice".into(),
                password: "password1".into(),
            })
            .await,
        Code::FailedPrecondition,
        ErrorCode::AlreadyLoggedIn,
    );
    // So is a second stream for the same session.
    expect_status(
        stub.subscribe(with_token(pb::SubscribeRequest {}, &token))
            .await,
        Code::FailedPrecondition,
        ErrorCode::AlreadyLoggedIn,
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match other
            .login(pb::LoginRequest {
                username: "alice".into(),
                password: "password1".into(),
            })
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(
                    chat_code(&status),
                    Some(ErrorCode::AlreadyLoggedIn),
                    "{status:?}"
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still logged in after the stream closed"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    expect_status(
        stub.fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, &token))
            .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
}

#[tokio::test]
async fn deleting_the_account_ends_the_stream_with_a_clear_status() {
    let server = start(GrpcConfig::default()).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "alice").await;
    let mut stream = stub
        .subscribe(with_token(pb::SubscribeRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    // The stream opens with the "ready" marker (nothing to replay).
    let first = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.and_then(|p| p.event),
        Some(push::Event::Ready(_))
    ));
    stub.delete_account(with_token(
        pb::DeleteAccountRequest {
            password: "password1".into(),
        },
        &token,
    ))
    .await
    .unwrap();
    let last = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap();
    match last.and_then(|p| p.event) {
        Some(push::Event::LoggedOut(out)) => {
            assert_eq!(
                (out.username.as_str(), out.reason.as_str()),
                ("alice", "account_deleted")
            );
        }
        other => panic!("expected the logged-out push, got {other:?}"),
    }
    let end = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap();
    let status = expect_status(end, Code::Unauthenticated, ErrorCode::Unauthenticated);
    assert!(
        status.message().contains("account deleted"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_session_whose_stream_never_opens_expires() {
    let config = GrpcConfig {
        stream_grace: Duration::from_millis(200),
        ..GrpcConfig::default()
    };
    let server = start(config).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "ghost").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match stub
            .fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, &token))
            .await
        {
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the session never expired"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => {
                assert_eq!(
                    chat_code(&status),
                    Some(ErrorCode::Unauthenticated),
                    "{status:?}"
                );
                break;
            }
        }
    }
    stub.login(pb::LoginRequest {
        username: "ghost".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let server = start(GrpcConfig::default()).await;
    let mut health = HealthClient::new(channel(server.addr).await);
    for service in ["chat.v1.Chat", ""] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_describes_the_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = start(GrpcConfig::default()).await;
    let mut reflection = ServerReflectionClient::new(channel(server.addr).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("chat.v1.Chat".into()),
        MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    match replies
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains(&"chat.v1.Chat"), "{names:?}");
            assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        }
        other => panic!("{other:?}"),
    }
    match replies
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            use prost::Message;
            let file =
                prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..])
                    .unwrap();
            assert_eq!(file.package(), "chat.v1");
            let methods: Vec<_> = file.service[0].method.iter().map(|m| m.name()).collect();
            assert!(
                methods.contains(&"SendMessage") && methods.contains(&"Subscribe"),
                "{methods:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The error detail every failed call carries resolves too, so stock
    // tools can print it.
    match replies
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            use prost::Message;
            let file =
                prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..])
                    .unwrap();
            assert_eq!(file.package(), "google.rpc");
            assert!(file.message_type.iter().any(|m| m.name() == "ErrorInfo"));
        }
        other => panic!("{other:?}"),
    }
}

/// A request that does not decode as its message type is the client's
/// fault: INVALID_ARGUMENT with the chat code `malformed`, not INTERNAL.
#[tokio::test]
async fn undecodable_requests_are_invalid_arguments() {
    let server = start(GrpcConfig::default()).await;
    let mut grpc = tonic::client::Grpc::new(channel(server.addr).await);
    grpc.ready().await.unwrap();
    // CreateAccountRequest's field 1 is a string; this sends a number there.
    let wrong = pb::FetchMessagesRequest { max: 5 };
    let result: Result<tonic::Response<pb::LoginReply>, Status> = grpc
        .unary(
            Request::new(wrong),
            "/chat.v1.Chat/CreateAccount".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    expect_status(result, Code::InvalidArgument, ErrorCode::Malformed);
}

/// The login answer says how many unacknowledged messages the stream
/// replays before the `ready` marker.
#[tokio::test]
async fn the_login_answer_counts_the_replay() {
    let server = start(GrpcConfig::default()).await;
    let mut alice = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut stub = Stub::new(channel(server.addr).await);
    let token = create(&mut stub, "bob").await;
    let mut stream = stub
        .subscribe(with_token(pb::SubscribeRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    for body in ["r1", "r2"] {
        alice.send("bob", body).await.unwrap();
    }
    let mut seen = 0;
    while seen < 2 {
        if let Some(pb::Push {
            event: Some(push::Event::Message(_)),
        }) = stream.message().await.unwrap()
        {
            seen += 1;
        }
    }
    stub.logout(with_token(pb::LogoutRequest {}, &token))
        .await
        .unwrap();
    let reply = stub
        .login(pb::LoginRequest {
            username: "bob".into(),
            password: "password1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.replay, 2);
    let mut stream = stub
        .subscribe(with_token(pb::SubscribeRequest {}, &reply.token))
        .await
        .unwrap()
        .into_inner();
    let mut bodies = Vec::new();
    loop {
        match stream.message().await.unwrap().and_then(|p| p.event) {
            Some(push::Event::Message(m)) => bodies.push(m.body),
            Some(push::Event::Ready(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(bodies, ["r1", "r2"]);
}

/// While the engine has logged a session out as a slow consumer (its
/// stream was never read), its token already answers `unauthenticated`,
/// which the reference client recovers from by logging in again.
#[tokio::test]
async fn a_slow_consumers_token_is_unauthenticated() {
    let config = chat_core::Config {
        session_event_capacity: 1,
        ..chat_core::Config::default()
    };
    let chat = Chat::new(
        std::sync::Arc::new(chat_core::MemoryStore::default()),
        config,
    );
    let server = start_with(chat, GrpcConfig::default()).await;
    let mut alice = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut stub = Stub::new(channel(server.addr).await);
    // Bob never opens his stream: nothing drains his events.
    let token = create(&mut stub, "bob").await;
    alice.send("bob", "fills the queue").await.unwrap();
    alice.send("bob", "makes bob slow").await.unwrap();
    expect_status(
        stub.fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, &token))
            .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    // The token is void from then on, and bob can log in again.
    expect_status(
        stub.fetch_messages(with_token(pb::FetchMessagesRequest { max: 0 }, &token))
            .await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    stub.login(pb::LoginRequest {
        username: "bob".into(),
        password: "password1".into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut server = start(GrpcConfig::default()).await;
    let mut alice = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    chat_conformance::expect_goodbye(&mut alice, ErrorCode::ShuttingDown).await;
    // The connection is over: no more pushes will come, and the client
    // says so instead of waiting forever.
    assert_eq!(
        tokio::time::timeout(PATIENCE, alice.next_push())
            .await
            .unwrap(),
        None
    );
}

/// A request larger than the largest real one (8 KiB by default) is
/// refused before it is decoded, not buffered up to tonic's 4 MiB.
#[tokio::test]
async fn oversized_requests_are_refused_before_decoding() {
    let server = start(GrpcConfig::default()).await;
    let mut stub = Stub::new(channel(server.addr).await);
    let status = stub
        .list_accounts(pb::ListAccountsRequest {
            pattern: "a".repeat(9 * 1024),
            max: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // A normal request on the same connection still works.
    stub.list_accounts(pb::ListAccountsRequest {
        pattern: String::new(),
        max: 0,
    })
    .await
    .unwrap();
}

/// A connection that makes no call within the handshake timeout is
/// closed, whether it sends nothing or only the HTTP/2 preface: a silent
/// peer cannot hold a connection (and a file descriptor) for as long as it
/// likes.
#[tokio::test]
async fn connections_without_a_call_are_closed_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = GrpcConfig {
        handshake_timeout: Duration::from_millis(200),
        ..GrpcConfig::default()
    };
    let server = start(config).await;
    for preface in [&b""[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        silent.write_all(preface).await.unwrap();
        let mut sink = Vec::new();
        // Ends (EOF or reset) once the server gives up on it.
        let _ = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut sink))
            .await
            .expect("the server closed the connection");
    }
    // The reference client calls at once (a health check) when it
    // connects, so its connection is past the handshake at once.
    let mut client = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    client.create("patient", "password1").await.unwrap();
    assert_eq!(client.list("patient", 0).await.unwrap().len(), 1);
}

/// A connection past its maximum age is told to go away: one with nothing
/// open closes (its slot comes back), while a session's push stream on
/// another runs on, and its client keeps working.
#[tokio::test]
async fn old_idle_connections_are_closed_and_sessions_live_on() {
    let connections = chat_core::ConnectionLimit::new(100);
    let config = GrpcConfig {
        max_connection_age: Duration::from_secs(1),
        connections: connections.clone(),
        ..GrpcConfig::default()
    };
    let server = start(config).await;
    let mut alice = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = GrpcClient::connect(&server.addr.to_string()).await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    // An idle connection past the handshake: one call, then nothing.
    let mut idle = Stub::new(channel(server.addr).await);
    idle.list_accounts(pb::ListAccountsRequest {
        pattern: String::new(),
        max: 0,
    })
    .await
    .unwrap();
    assert_eq!(connections.in_use(), 3, "alice's, bob's and the idle one");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Alice's and bob's push streams hold their connections past the age;
    // the idle one goes, though its client still holds it.
    while connections.in_use() > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old connections were never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(idle);
    bob.send("alice", "still here").await.unwrap();
    match tokio::time::timeout(PATIENCE, alice.next_push()).await {
        Ok(Some(chat_core::client::Push::Message(m))) => assert_eq!(m.body.as_str(), "still here"),
        other => panic!("{other:?}"),
    }
}
