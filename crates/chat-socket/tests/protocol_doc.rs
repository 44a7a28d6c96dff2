//! Drift test: every worked example in docs/PROTOCOL.md is what the codec
//! really produces, byte for byte, and decodes back to the same frame.

use bytes::BytesMut;
use chat_core::{ErrorCode, LogoutReason, Message, MessageBody, SessionState, Username};
use chat_socket::codec::{ClientCodec, ServerCodec};
use chat_socket::{ClientFrame, ServerFrame};
use tokio_util::codec::{Decoder, Encoder};

const TS: u64 = 1_764_000_000_000;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn client_examples() -> Vec<(&'static str, ClientFrame)> {
    vec![
        (
            "hello",
            ClientFrame::Hello {
                version: 1,
                send_key: Some(*b"\x5e\x6b\x07\x11\x22\x33\x44\x55\x66\x77\x88\x99"),
            },
        ),
        (
            "hello without a send key",
            ClientFrame::Hello {
                version: 1,
                send_key: None,
            },
        ),
        ("ping", ClientFrame::Ping { nonce: 7 }),
        (
            "create",
            ClientFrame::Create {
                id: 1,
                name: "alice".into(),
            },
        ),
        (
            "login",
            ClientFrame::Login {
                id: 2,
                name: "alice".into(),
            },
        ),
        ("logout", ClientFrame::Logout { id: 3 }),
        ("delete", ClientFrame::Delete { id: 4 }),
        (
            "send",
            ClientFrame::Send {
                id: 5,
                to: "bob".into(),
                body: "hi bob".into(),
            },
        ),
        (
            "list",
            ClientFrame::List {
                id: 6,
                max: 10,
                pattern: "^a".into(),
            },
        ),
        ("fetch", ClientFrame::Fetch { id: 7, max: 20 }),
        ("ack", ClientFrame::Ack { id: 8, through: 3 }),
        (
            "send once",
            ClientFrame::SendOnce {
                id: 9,
                to: "bob".into(),
                body: "hi".into(),
            },
        ),
    ]
}

fn server_examples() -> Vec<(&'static str, ServerFrame)> {
    let alice = SessionState::LoggedIn(name("alice"));
    let message = |id, body: &str| Message {
        id,
        sender: name("alice"),
        body: MessageBody::parse(body).unwrap(),
        timestamp_ms: TS,
    };
    vec![
        (
            "welcome",
            ServerFrame::Welcome {
                version: 1,
                max_frame: 8192,
                idle_timeout_ms: 45_000,
            },
        ),
        ("pong", ServerFrame::Pong { nonce: 7 }),
        (
            "done",
            ServerFrame::Done {
                id: 1,
                state: alice.clone(),
            },
        ),
        (
            "sent",
            ServerFrame::Sent {
                id: 5,
                state: alice,
                message_id: 3,
                timestamp_ms: TS,
            },
        ),
        (
            "accounts",
            ServerFrame::Accounts {
                id: 6,
                state: SessionState::LoggedOut,
                names: vec![name("albert"), name("alice")],
            },
        ),
        (
            "messages",
            ServerFrame::Messages {
                id: 7,
                state: SessionState::LoggedIn(name("bob")),
                messages: vec![message(3, "hi bob")],
            },
        ),
        (
            "error",
            ServerFrame::Error {
                id: 2,
                state: SessionState::LoggedOut,
                code: ErrorCode::AlreadyLoggedIn,
                message: "alice is busy".into(),
            },
        ),
        ("push message", ServerFrame::PushMessage(message(4, "hi"))),
        (
            "push logged out",
            ServerFrame::PushLoggedOut {
                reason: LogoutReason::SlowConsumer,
                user: name("bob"),
            },
        ),
        (
            "goodbye",
            ServerFrame::Goodbye {
                code: ErrorCode::IdleTimeout,
                message: "idle".into(),
            },
        ),
    ]
}

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md exists")
}

#[test]
fn every_documented_example_matches_the_codec() {
    let doc = doc();
    let mut missing = Vec::new();
    for (label, frame) in client_examples() {
        let mut wire = BytesMut::new();
        ClientCodec::new(1 << 20)
            .encode(frame.clone(), &mut wire)
            .unwrap();
        let text = hex(&wire);
        if !doc.contains(&text) {
            missing.push(format!("client {label}: {text}"));
        }
        assert_eq!(
            ServerCodec::new(1 << 20).decode(&mut wire).unwrap(),
            Some(frame)
        );
    }
    for (label, frame) in server_examples() {
        let mut wire = BytesMut::new();
        ServerCodec::new(1 << 20)
            .encode(frame.clone(), &mut wire)
            .unwrap();
        let text = hex(&wire);
        if !doc.contains(&text) {
            missing.push(format!("server {label}: {text}"));
        }
        assert_eq!(
            ClientCodec::new(1 << 20).decode(&mut wire).unwrap(),
            Some(frame)
        );
    }
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md lacks these examples:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_error_code_is_documented() {
    let doc = doc();
    for code in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.as_u16(), code.as_str());
        assert!(doc.contains(&row), "docs/PROTOCOL.md lacks the row {row}");
    }
}

#[test]
fn the_documented_send_id_is_the_key_then_the_request_id() {
    let key = *b"\x5e\x6b\x07\x11\x22\x33\x44\x55\x66\x77\x88\x99";
    let id = chat_socket::frame::send_id(&key, 9);
    assert_eq!(id, 0x5e6b_0711_2233_4455_6677_8899_0000_0009);
    let documented = format!("its send id is `{id:032x}`");
    assert!(
        doc().contains(&documented),
        "docs/PROTOCOL.md should say: {documented}"
    );
}
