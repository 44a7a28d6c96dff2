//! Codec tests: property round trips for every frame, and each kind of
//! malformed input.

use bytes::BytesMut;
use chat_core::{ErrorCode, LogoutReason, Message, MessageBody, SessionState, Username};
use chat_socket::codec::{ClientCodec, ServerCodec};
use chat_socket::{ClientFrame, FrameError, ServerFrame};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn username() -> impl Strategy<Value = Username> {
    "[a-zA-Z0-9_.éß漢😀-]{1,50}".prop_map(|s| Username::parse(&s).expect("valid by construction"))
}

fn body() -> impl Strategy<Value = MessageBody> {
    "[^\\p{Cc}]{1,280}".prop_map(|s| MessageBody::parse(&s).expect("valid by construction"))
}

fn state() -> impl Strategy<Value = SessionState> {
    prop_oneof![
        Just(SessionState::LoggedOut),
        username().prop_map(SessionState::LoggedIn)
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), any::<u64>(), username(), body()).prop_map(|(id, timestamp_ms, sender, body)| {
        Message {
            id,
            sender,
            body,
            timestamp_ms,
        }
    })
}

fn code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    // Requests carry raw text: the server, not the codec, validates names
    // and bodies.
    prop_oneof![
        (
            2u16..,
            any::<u16>(),
            any::<u32>(),
            proptest::option::of(any::<[u8; 12]>())
        )
            .prop_map(|(highest, lowest, features, send_key)| ClientFrame::Hello {
                highest,
                lowest,
                features,
                send_key
            }),
        any::<u32>().prop_map(|nonce| ClientFrame::Ping { nonce }),
        (any::<u32>(), ".{0,60}", ".{0,60}").prop_map(|(id, name, password)| ClientFrame::Create {
            id,
            name,
            password
        }),
        (any::<u32>(), ".{0,60}", ".{0,60}").prop_map(|(id, name, password)| ClientFrame::Login {
            id,
            name,
            password
        }),
        (any::<u32>(), ".{0,40}", ".{0,40}")
            .prop_map(|(id, old, new)| ClientFrame::ChangePassword { id, old, new }),
        any::<u32>().prop_map(|id| ClientFrame::Logout { id }),
        (any::<u32>(), ".{0,40}").prop_map(|(id, password)| ClientFrame::Delete { id, password }),
        (any::<u32>(), ".{0,50}", ".{0,300}").prop_map(|(id, to, body)| ClientFrame::Send {
            id,
            to,
            body
        }),
        (any::<u32>(), any::<u32>(), ".{0,100}").prop_map(|(id, max, pattern)| ClientFrame::List {
            id,
            max,
            pattern
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(id, max)| ClientFrame::Fetch { id, max }),
        (any::<u32>(), any::<u64>()).prop_map(|(id, through)| ClientFrame::Ack { id, through }),
        (any::<u32>(), ".{0,50}", ".{0,300}").prop_map(|(id, to, body)| ClientFrame::SendOnce {
            id,
            to,
            body
        }),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let reason = prop_oneof![
        Just(LogoutReason::Requested),
        Just(LogoutReason::AccountDeleted),
        Just(LogoutReason::SlowConsumer)
    ];
    prop_oneof![
        (any::<u16>(), any::<[u32; 6]>(), ".{0,40}").prop_map(
            |(
                version,
                [
                    features,
                    max_frame,
                    idle_timeout_ms,
                    queue_limit,
                    max_list,
                    max_fetch,
                ],
                server,
            )| {
                ServerFrame::Welcome {
                    version,
                    features,
                    max_frame,
                    idle_timeout_ms,
                    queue_limit,
                    max_list,
                    max_fetch,
                    server,
                }
            }
        ),
        any::<u32>().prop_map(|nonce| ServerFrame::Pong { nonce }),
        (any::<u32>(), state(), proptest::option::of(any::<u32>()))
            .prop_map(|(id, state, replay)| ServerFrame::Done { id, state, replay }),
        (any::<u32>(), state(), any::<u64>(), any::<u64>()).prop_map(
            |(id, state, message_id, timestamp_ms)| {
                ServerFrame::Sent {
                    id,
                    state,
                    message_id,
                    timestamp_ms,
                }
            }
        ),
        (
            any::<u32>(),
            state(),
            prop::collection::vec(username(), 0..20)
        )
            .prop_map(|(id, state, names)| ServerFrame::Accounts { id, state, names }),
        (
            any::<u32>(),
            state(),
            prop::collection::vec(message(), 0..8)
        )
            .prop_map(|(id, state, messages)| ServerFrame::Messages {
                id,
                state,
                messages
            }),
        (any::<u32>(), state(), code(), ".{0,200}").prop_map(|(id, state, code, message)| {
            ServerFrame::Error {
                id,
                state,
                code,
                message,
            }
        }),
        message().prop_map(ServerFrame::PushMessage),
        (reason, username()).prop_map(|(reason, user)| ServerFrame::PushLoggedOut { reason, user }),
        (
            code(),
            ".{0,200}",
            prop::collection::vec(any::<u16>(), 0..4)
        )
            .prop_map(|(code, message, versions)| ServerFrame::Goodbye {
                code,
                message,
                versions
            }),
    ]
}

/// Encodes `frames`, then feeds the bytes to a fresh decoder in chunks cut
/// at `cuts`, collecting everything it yields.
fn round_trip<D, E, F>(
    encoder: &mut E,
    decoder: &mut D,
    frames: &[F],
    cuts: &[usize],
) -> Vec<D::Item>
where
    E: Encoder<F, Error = FrameError>,
    D: Decoder<Error = FrameError>,
    F: Clone,
{
    let mut wire = BytesMut::new();
    for f in frames {
        encoder.encode(f.clone(), &mut wire).expect("encodes");
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let cut = cut % (wire.len() + 1);
        if cut > start {
            chunks.push(wire[start..cut].to_vec());
            start = cut;
        }
    }
    chunks.push(wire[start..].to_vec());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
        while let Some(item) = decoder.decode(&mut buf).expect("decodes") {
            out.push(item);
        }
    }
    assert!(buf.is_empty(), "no bytes left over");
    out
}

proptest! {
    #[test]
    fn client_frames_round_trip(frames in prop::collection::vec(client_frame(), 1..10), mut cuts in prop::collection::vec(any::<usize>(), 0..10)) {
        cuts.sort_unstable();
        let decoded = round_trip(&mut ClientCodec::new(1 << 20), &mut ServerCodec::new(1 << 20), &frames, &cuts);
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn server_frames_round_trip(frames in prop::collection::vec(server_frame(), 1..10), mut cuts in prop::collection::vec(any::<usize>(), 0..10)) {
        cuts.sort_unstable();
        let decoded = round_trip(&mut ServerCodec::new(1 << 20), &mut ClientCodec::new(1 << 20), &frames, &cuts);
        prop_assert_eq!(decoded, frames);
    }

    /// Whatever the bytes, decoding returns a frame, "need more", or an
    /// error: it never panics and never reserves past the limit.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut server = ServerCodec::new(256);
        while let Ok(Some(_)) = server.decode(&mut buf) {}
        prop_assert!(buf.capacity() <= bytes.len() + 4 + 256);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut client = ClientCodec::new(256);
        while let Ok(Some(_)) = client.decode(&mut buf) {}
    }
}

fn frame(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    buf
}

fn server_decode(payload: &[u8]) -> Result<Option<ClientFrame>, FrameError> {
    ServerCodec::new(8192).decode(&mut frame(payload))
}

#[test]
fn incomplete_input_asks_for_more() {
    let mut codec = ServerCodec::new(8192);
    let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 0x12, 0][..]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    buf.extend_from_slice(&[0, 0, 7]);
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(ClientFrame::Logout { id: 7 })
    );
}

#[test]
fn oversized_frame_is_refused_before_allocating() {
    let mut codec = ServerCodec::new(8192);
    let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    let before = buf.capacity();
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { len, max: 8192 } if len == u32::MAX as usize),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(
        buf.capacity(),
        before,
        "nothing reserved for the claimed size"
    );
}

#[test]
fn empty_frame_is_malformed() {
    let err = server_decode(&[]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Malformed);
}

#[test]
fn unknown_tag_is_reported() {
    let err = server_decode(&[0x7f, 1, 2, 3]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownTag(0x7f)));
    assert_eq!(err.code(), ErrorCode::UnknownOperation);
    // A server tag sent by a client is unknown to the server, too.
    assert!(matches!(
        server_decode(&[0x90, 0, 0, 0, 1, 0]).unwrap_err(),
        FrameError::UnknownTag(0x90)
    ));
}

#[test]
fn truncated_fields_are_malformed() {
    for payload in [
        &[0x12, 0, 0][..],                               // logout, request id cut short
        &[0x14, 0, 0, 0, 1][..],                         // send without recipient length
        &[0x14, 0, 0, 0, 1, 5, b'b', b'o'][..],          // recipient shorter than its length
        &[0x14, 0, 0, 0, 1, 1, b'b'][..],                // send without a body
        &[0x14, 0, 0, 0, 1, 1, b'b', 0x80][..],          // a body length cut inside its varint
        &[0x15, 0, 0, 0, 1, 0, 0][..],                   // list with a cut max
        &[0x01, b'C', b'H'][..],                         // hello cut inside the magic
        &[0x16, 0, 0, 0, 1, 0, 0, 0, 5, 0x7f][..],       // a property without its length
        &[0x16, 0, 0, 0, 1, 0, 0, 0, 5, 0x7f, 3, 1][..], // a property value cut short
    ] {
        let err = server_decode(payload).unwrap_err();
        assert!(
            matches!(err, FrameError::Malformed(_)),
            "{payload:?}: {err}"
        );
    }
}

/// What follows a frame's fields is properties; unknown ones are skipped,
/// so a newer peer's additions do not break an older one.
#[test]
fn unknown_properties_are_skipped() {
    assert_eq!(
        server_decode(&[0x16, 0, 0, 0, 1, 0, 0, 0, 5, 0x7f, 2, 0xaa, 0xbb, 0x70, 0]).unwrap(),
        Some(ClientFrame::Fetch { id: 1, max: 5 })
    );
    // A known property with a value of the wrong size is malformed.
    let mut payload = vec![0x90, 0, 0, 0, 1, 0, 0x01, 3, 0, 0, 1];
    let err = ClientCodec::new(8192)
        .decode(&mut frame(&payload))
        .unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("replay")),
        "{err}"
    );
    payload[7] = 4;
    payload.push(2);
    assert_eq!(
        ClientCodec::new(8192).decode(&mut frame(&payload)).unwrap(),
        Some(ServerFrame::Done {
            id: 1,
            state: SessionState::LoggedOut,
            replay: Some(0x102)
        })
    );
}

#[test]
fn a_property_twice_is_malformed() {
    let err = server_decode(&[0x16, 0, 0, 0, 1, 0, 0, 0, 5, 0x7f, 0, 0x7f, 0]).unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("twice")),
        "{err}"
    );
}

#[test]
fn varints_use_seven_bits_a_byte_low_groups_first() {
    // A 300-byte body has the length 300 = 0b10_0101100: ac 02.
    let mut wire = BytesMut::new();
    ClientCodec::new(8192)
        .encode(
            ClientFrame::Send {
                id: 1,
                to: "b".into(),
                body: "x".repeat(300),
            },
            &mut wire,
        )
        .unwrap();
    assert_eq!(&wire[4..12], &[0x14, 0, 0, 0, 1, 1, b'b', 0xac]);
    assert_eq!(wire[12], 0x02);
    assert_eq!(wire.len(), 4 + 8 + 1 + 300);
    // A length varint longer than ten bytes, or lying about what is left,
    // is malformed.
    let err = server_decode(&[
        0x11, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ])
    .unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    let err = server_decode(&[0x11, 0, 0, 0, 1, 0xff, 0xff, 0x03, b'a']).unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("left")),
        "{err}"
    );
}

#[test]
fn a_version_1_hello_is_told_apart() {
    let mut payload = vec![0x01];
    payload.extend_from_slice(b"CHAT");
    payload.extend_from_slice(&[0, 1]);
    payload.extend_from_slice(b"0123456789ab");
    let err = server_decode(&payload).unwrap_err();
    assert!(matches!(err, FrameError::OldVersion(1)), "{err}");
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
}

#[test]
fn invalid_utf8_is_malformed() {
    let err = server_decode(&[0x11, 0, 0, 0, 1, 2, 0xff, 0xfe]).unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("UTF-8")),
        "{err}"
    );
    let err = server_decode(&[0x14, 0, 0, 0, 1, 1, b'b', 1, 0xc3]).unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("UTF-8")),
        "{err}"
    );
}

#[test]
fn bad_magic_is_malformed() {
    let err = server_decode(&[0x01, b'H', b'T', b'T', b'P', 0, 1]).unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("magic")),
        "{err}"
    );
}

#[test]
fn client_rejects_invalid_names_from_a_server() {
    // A server must not push a message from an impossible sender.
    let mut payload = vec![0xA0];
    payload.extend_from_slice(&1u64.to_be_bytes());
    payload.extend_from_slice(&2u64.to_be_bytes());
    payload.extend_from_slice(&[3, b'a', b' ', b'b']);
    payload.extend_from_slice(&[2, b'h', b'i']);
    let err = ClientCodec::new(8192)
        .decode(&mut frame(&payload))
        .unwrap_err();
    assert!(
        matches!(err, FrameError::Malformed(ref m) if m.contains("sender")),
        "{err}"
    );
}

#[test]
fn error_codes_from_a_newer_server_are_still_errors() {
    // ERROR, request 5, logged out, code 999, "later"; then GOODBYE 999.
    let mut wire = BytesMut::new();
    for payload in [
        &[
            0x9f, 0, 0, 0, 5, 0, 0x03, 0xe7, 5, b'l', b'a', b't', b'e', b'r',
        ][..],
        &[0xa2, 0x03, 0xe7, 3, b'b', b'y', b'e'][..],
    ] {
        wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        wire.extend_from_slice(payload);
    }
    let mut codec = ClientCodec::new(1 << 20);
    match codec.decode(&mut wire).unwrap() {
        Some(ServerFrame::Error {
            id: 5,
            code: ErrorCode::Internal,
            message,
            ..
        }) => assert_eq!(message, "error code 999, unknown to this client: later"),
        other => panic!("{other:?}"),
    }
    match codec.decode(&mut wire).unwrap() {
        Some(ServerFrame::Goodbye {
            code: ErrorCode::Internal,
            message,
            ..
        }) => assert!(message.starts_with("error code 999"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn debug_output_never_shows_a_password() {
    let frame = ClientFrame::ChangePassword {
        id: 1,
        old: "old secret here".into(),
        new: "new secret here".into(),
    };
    let shown = format!("{frame:?}");
    assert!(!shown.contains("secret"), "{shown}");
    let frame = ClientFrame::Login {
        id: 2,
        name: "alice".into(),
        password: "hunter2hunter2".into(),
    };
    let shown = format!("{frame:?}");
    assert!(
        shown.contains("alice") && !shown.contains("hunter2"),
        "{shown}"
    );
}
