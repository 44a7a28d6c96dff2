//! Wire messages as enums, and their byte-exact encoding (protocol
//! version 2).
//!
//! A frame is `length: u32` (big-endian, counting the bytes after it) then
//! a payload: a one-byte tag, the frame's fixed fields, and then optional
//! *properties*. [`ClientFrame`]s go from client to server, [`ServerFrame`]s
//! back. `docs/PROTOCOL.md` is the normative description; this module
//! implements exactly that.
//!
//! One encoding per kind of field, in every frame: integers and ids are
//! fixed-width big-endian (`u16`, `u32`, `u64`); every text (names, bodies,
//! patterns, error texts) is a `varint` byte length then UTF-8. A `varint`
//! is unsigned LEB128: seven bits per byte, low groups first, the high bit
//! set on every byte but the last.
//!
//! Properties make every frame extensible: after the fixed fields, the rest
//! of the frame is a sequence of `id: u8`, `length: varint`, `value`
//! (`length` bytes). A receiver skips properties it does not know, so a
//! newer peer can add optional fields to any frame without breaking an
//! older one; no field is "the rest of the frame".

use bytes::{BufMut, BytesMut};
use chat_core::{ErrorCode, LogoutReason, Message, MessageBody, SessionState, Username};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this crate speaks.
pub const OLDEST_VERSION: u16 = 2;
/// The four bytes a client's hello starts with.
pub const MAGIC: [u8; 4] = *b"CHAT";
/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;
/// Bytes of a send key (see [`ClientFrame::Hello`]).
pub const SEND_KEY_LEN: usize = 12;

/// A client's send key: 96 random bits announced once in the hello. With a
/// SEND ONCE's request id it makes the send's idempotency key.
pub type SendKey = [u8; SEND_KEY_LEN];

/// The idempotency key of a SEND ONCE: the connection's send key followed
/// by the request id, as one 128-bit number.
pub fn send_id(key: &SendKey, request: RequestId) -> u128 {
    let mut bytes = [0u8; 16];
    bytes[..SEND_KEY_LEN].copy_from_slice(key);
    bytes[SEND_KEY_LEN..].copy_from_slice(&request.to_be_bytes());
    u128::from_be_bytes(bytes)
}

/// Feature bits offered in a hello and chosen in a welcome.
pub mod feature {
    /// Idempotent sends: the client gives a send key (hello property
    /// [`SEND_KEY`](super::prop::SEND_KEY)) and may use SEND ONCE.
    pub const IDEMPOTENT_SEND: u32 = 1 << 0;
    /// Every feature this crate knows.
    pub const ALL: u32 = IDEMPOTENT_SEND;
}

/// Property ids, per frame.
pub mod prop {
    /// HELLO: the connection's send key (12 bytes).
    pub const SEND_KEY: u8 = 0x01;
    /// DONE answering a LOGIN: how many replayed messages (`u32`) the
    /// server pushes next, before any live one.
    pub const REPLAY: u8 = 0x01;
    /// GOODBYE `unsupported_version`: the versions the server speaks, as
    /// `u16`s.
    pub const VERSIONS: u8 = 0x01;
}

/// Client-to-server and server-to-client tags.
mod tag {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const CREATE: u8 = 0x10;
    pub const LOGIN: u8 = 0x11;
    pub const LOGOUT: u8 = 0x12;
    pub const DELETE: u8 = 0x13;
    pub const SEND: u8 = 0x14;
    pub const LIST: u8 = 0x15;
    pub const FETCH: u8 = 0x16;
    pub const ACK: u8 = 0x17;
    pub const SEND_ONCE: u8 = 0x18;
    pub const CHANGE_PASSWORD: u8 = 0x19;

    pub const WELCOME: u8 = 0x81;
    pub const PONG: u8 = 0x82;
    pub const DONE: u8 = 0x90;
    pub const SENT: u8 = 0x91;
    pub const ACCOUNTS: u8 = 0x92;
    pub const MESSAGES: u8 = 0x93;
    pub const ERROR: u8 = 0x9F;
    pub const PUSH_MESSAGE: u8 = 0xA0;
    pub const PUSH_LOGGED_OUT: u8 = 0xA1;
    pub const GOODBYE: u8 = 0xA2;
}

/// A request id chosen by the client and echoed in the response. Id 0 is
/// reserved for errors that answer no particular request.
pub type RequestId = u32;

/// What a client sends. Its `Debug` output never shows a password.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// First frame of every connection: the versions and features the
    /// client speaks.
    Hello {
        /// The newest protocol version the client speaks.
        highest: u16,
        /// The oldest protocol version the client speaks.
        lowest: u16,
        /// Feature bits the client offers (see [`feature`]).
        features: u32,
        /// The key that makes this connection's SEND ONCE requests
        /// idempotent (property [`prop::SEND_KEY`]); required with
        /// [`feature::IDEMPOTENT_SEND`]. A client keeps it across
        /// reconnects (so a resend matches the original) and never reuses
        /// a request id for another SEND ONCE under it.
        send_key: Option<SendKey>,
    },
    /// Heartbeat; the server answers [`ServerFrame::Pong`] with the nonce.
    Ping {
        /// Echoed back.
        nonce: u32,
    },
    /// Create an account and log in.
    Create {
        /// Request id.
        id: RequestId,
        /// Account name (checked by the server).
        name: String,
        /// The new account's password.
        password: String,
    },
    /// Log in.
    Login {
        /// Request id.
        id: RequestId,
        /// Account name.
        name: String,
        /// Its password.
        password: String,
    },
    /// Log out.
    Logout {
        /// Request id.
        id: RequestId,
    },
    /// Delete the logged-in account.
    Delete {
        /// Request id.
        id: RequestId,
        /// The account's password, asked again.
        password: String,
    },
    /// Replace the logged-in account's password.
    ChangePassword {
        /// Request id.
        id: RequestId,
        /// The current password.
        old: String,
        /// The new one.
        new: String,
    },
    /// Send a message.
    Send {
        /// Request id.
        id: RequestId,
        /// Recipient name.
        to: String,
        /// Message text.
        body: String,
    },
    /// List accounts.
    List {
        /// Request id.
        id: RequestId,
        /// Most names wanted; 0 = up to the server cap.
        max: u32,
        /// Regular expression; empty = all.
        pattern: String,
    },
    /// Take queued messages.
    Fetch {
        /// Request id.
        id: RequestId,
        /// Most messages wanted; 0 = up to the server cap.
        max: u32,
    },
    /// Send a message at most once: its idempotency key is the hello's send
    /// key and this request id ([`send_id`]), so a resend with the same id
    /// on a connection with the same key (after a lost reply) returns the
    /// first one's result.
    SendOnce {
        /// Request id; also the send's sequence number under the send key.
        id: RequestId,
        /// Recipient name.
        to: String,
        /// Message text.
        body: String,
    },
    /// Acknowledge every received message with an id up to `through`.
    Ack {
        /// Request id.
        id: RequestId,
        /// Highest message id acknowledged (cumulative).
        through: u64,
    },
}

impl std::fmt::Debug for ClientFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HIDDEN: &str = "..";
        match self {
            ClientFrame::Hello {
                highest,
                lowest,
                features,
                send_key,
            } => f
                .debug_struct("Hello")
                .field("highest", highest)
                .field("lowest", lowest)
                .field("features", features)
                .field("send_key", &send_key.map(|_| HIDDEN))
                .finish(),
            ClientFrame::Ping { nonce } => f.debug_struct("Ping").field("nonce", nonce).finish(),
            ClientFrame::Create { id, name, .. } => f
                .debug_struct("Create")
                .field("id", id)
                .field("name", name)
                .field("password", &HIDDEN)
                .finish(),
            ClientFrame::Login { id, name, .. } => f
                .debug_struct("Login")
                .field("id", id)
                .field("name", name)
                .field("password", &HIDDEN)
                .finish(),
            ClientFrame::Logout { id } => f.debug_struct("Logout").field("id", id).finish(),
            ClientFrame::Delete { id, .. } => f
                .debug_struct("Delete")
                .field("id", id)
                .field("password", &HIDDEN)
                .finish(),
            ClientFrame::ChangePassword { id, .. } => f
                .debug_struct("ChangePassword")
                .field("id", id)
                .field("old", &HIDDEN)
                .field("new", &HIDDEN)
                .finish(),
            ClientFrame::Send { id, to, body } => f
                .debug_struct("Send")
                .field("id", id)
                .field("to", to)
                .field("body", body)
                .finish(),
            ClientFrame::List { id, max, pattern } => f
                .debug_struct("List")
                .field("id", id)
                .field("max", max)
                .field("pattern", pattern)
                .finish(),
            ClientFrame::Fetch { id, max } => f
                .debug_struct("Fetch")
                .field("id", id)
                .field("max", max)
                .finish(),
            ClientFrame::SendOnce { id, to, body } => f
                .debug_struct("SendOnce")
                .field("id", id)
                .field("to", to)
                .field("body", body)
                .finish(),
            ClientFrame::Ack { id, through } => f
                .debug_struct("Ack")
                .field("id", id)
                .field("through", through)
                .finish(),
        }
    }
}

/// What a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Answer to a good hello: what was chosen, and the limits that apply.
    Welcome {
        /// The version the server will speak.
        version: u16,
        /// The offered features the server accepted.
        features: u32,
        /// Largest frame payload the server accepts, in bytes.
        max_frame: u32,
        /// Silence after which the server drops the connection, in ms.
        idle_timeout_ms: u32,
        /// Messages stored per recipient (queued or awaiting an ack) past
        /// which sends to it get `queue_full`.
        queue_limit: u32,
        /// Most names one LIST returns.
        max_list: u32,
        /// Most messages one FETCH returns.
        max_fetch: u32,
        /// The server's name and version, for people (e.g. `chat 0.1.0`).
        server: String,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u32,
    },
    /// Create, login, logout, delete or ack succeeded.
    Done {
        /// The request's id.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
        /// Answering a login (property [`prop::REPLAY`]): how many
        /// replayed messages (delivered before, never acknowledged) the
        /// server pushes next, before any live one.
        replay: Option<u32>,
    },
    /// A send was accepted.
    Sent {
        /// The request's id.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
        /// The message's id in the recipient's sequence.
        message_id: u64,
        /// Server timestamp, ms since the Unix epoch.
        timestamp_ms: u64,
    },
    /// Answer to a list.
    Accounts {
        /// The request's id.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
        /// Matching names, sorted.
        names: Vec<Username>,
    },
    /// Answer to a fetch.
    Messages {
        /// The request's id.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
        /// Queued messages, oldest first.
        messages: Vec<Message>,
    },
    /// A request failed, or (id 0) the connection is about to close.
    Error {
        /// The failed request's id, or 0.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// A message delivered live (or replayed after a login).
    PushMessage(Message),
    /// The server ended this session's login.
    PushLoggedOut {
        /// Why.
        reason: LogoutReason,
        /// Who was logged in.
        user: Username,
    },
    /// The server is closing the connection.
    Goodbye {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
        /// With `unsupported_version` (property [`prop::VERSIONS`]): the
        /// versions the server speaks.
        versions: Vec<u16>,
    },
    /// A goodbye in protocol version 1's layout (`code: u16`, then the text
    /// to the end of the frame), the only frame a server sends a version 1
    /// client: so that it can read why it is refused.
    GoodbyeV1 {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Detail, naming the versions the server speaks.
        message: String,
    },
}

/// Why bytes could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more than the receiver accepts.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Accepted maximum.
        max: usize,
    },
    /// The tag is not one this side knows.
    #[error("unknown frame tag 0x{0:02x}")]
    UnknownTag(u8),
    /// The payload does not parse.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A client's hello in protocol version 1's layout (it offers only
    /// versions below 2).
    #[error("the client speaks protocol version {0}")]
    OldVersion(u16),
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The stable code to report this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::UnknownTag(_) => ErrorCode::UnknownOperation,
            FrameError::OldVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::Malformed(_) | FrameError::Io(_) => ErrorCode::Malformed,
        }
    }
}

fn malformed(what: impl Into<String>) -> FrameError {
    FrameError::Malformed(what.into())
}

/// Longest varint, in bytes (a `u64` needs ten).
const MAX_VARINT: usize = 10;

/// A cursor over one payload that fails cleanly on truncation.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(malformed(format!("truncated {what}")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, FrameError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, FrameError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn varint(&mut self, what: &str) -> Result<u64, FrameError> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            if i == MAX_VARINT - 1 && bits > 1 {
                return Err(malformed(format!("{what} overflows 64 bits")));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(format!(
            "{what} is longer than {MAX_VARINT} bytes"
        )))
    }
    /// A `varint` length, checked against what is left, so that a lying
    /// length allocates nothing.
    fn len(&mut self, what: &str) -> Result<usize, FrameError> {
        let len = self.varint(what)?;
        match usize::try_from(len) {
            Ok(len) if len <= self.buf.len() => Ok(len),
            _ => Err(malformed(format!(
                "{what} of {len} bytes is longer than the {} left in the frame",
                self.buf.len()
            ))),
        }
    }
    fn text(&mut self, what: &str) -> Result<String, FrameError> {
        let len = self.len(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(format!("{what} is not valid UTF-8")))
    }
    fn username(&mut self, what: &str) -> Result<Username, FrameError> {
        let raw = self.text(what)?;
        Username::parse(&raw).map_err(|e| malformed(format!("{what}: {e}")))
    }
    fn state(&mut self) -> Result<SessionState, FrameError> {
        match self.u8("session state")? {
            0 => Ok(SessionState::LoggedOut),
            1 => Ok(SessionState::LoggedIn(self.username("state username")?)),
            other => Err(malformed(format!(
                "session state {other} is neither 0 nor 1"
            ))),
        }
    }
    fn message(&mut self) -> Result<Message, FrameError> {
        let id = self.u64("message id")?;
        let timestamp_ms = self.u64("timestamp")?;
        let sender = self.username("sender")?;
        let raw = self.text("body")?;
        let body = MessageBody::parse(&raw).map_err(|e| malformed(format!("body: {e}")))?;
        Ok(Message {
            id,
            sender,
            body,
            timestamp_ms,
        })
    }
    /// Reads the properties that end the frame, calling `known` with each
    /// one's id and value; `known` returns `false` for ids it does not know,
    /// which are skipped. An id may appear once.
    fn properties(
        &mut self,
        mut known: impl FnMut(u8, &'a [u8]) -> Result<bool, FrameError>,
    ) -> Result<(), FrameError> {
        let mut seen = [false; 256];
        while !self.buf.is_empty() {
            let id = self.u8("property id")?;
            let len = self.len("property length")?;
            let value = self.take(len, "property value")?;
            if std::mem::replace(&mut seen[usize::from(id)], true) {
                return Err(malformed(format!("property 0x{id:02x} appears twice")));
            }
            // Unknown properties are skipped: a newer peer may send them.
            known(id, value)?;
        }
        Ok(())
    }
}

/// A property value of exactly `N` bytes.
fn fixed<const N: usize>(value: &[u8], what: &str) -> Result<[u8; N], FrameError> {
    value.try_into().map_err(|_| {
        malformed(format!(
            "property {what} has {} bytes, not {N}",
            value.len()
        ))
    })
}

fn put_varint(dst: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

fn put_text(dst: &mut BytesMut, s: &str) {
    put_varint(dst, s.len() as u64);
    dst.put_slice(s.as_bytes());
}

fn put_property(dst: &mut BytesMut, id: u8, value: &[u8]) {
    dst.put_u8(id);
    put_varint(dst, value.len() as u64);
    dst.put_slice(value);
}

fn put_state(dst: &mut BytesMut, state: &SessionState) {
    match state {
        SessionState::LoggedOut => dst.put_u8(0),
        SessionState::LoggedIn(name) => {
            dst.put_u8(1);
            put_text(dst, name.as_str());
        }
    }
}

fn put_count(dst: &mut BytesMut, n: usize) -> Result<(), FrameError> {
    dst.put_u32(u32::try_from(n).map_err(|_| malformed("too many items"))?);
    Ok(())
}

fn put_message(dst: &mut BytesMut, m: &Message) {
    dst.put_u64(m.id);
    dst.put_u64(m.timestamp_ms);
    put_text(dst, m.sender.as_str());
    put_text(dst, m.body.as_str());
}

fn logout_reason_byte(reason: LogoutReason) -> u8 {
    match reason {
        LogoutReason::Requested => 0,
        LogoutReason::AccountDeleted => 1,
        LogoutReason::SlowConsumer => 2,
    }
}

impl ClientFrame {
    /// Appends the payload (tag and fields, no length prefix) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            ClientFrame::Hello {
                highest,
                lowest,
                features,
                send_key,
            } => {
                dst.put_u8(tag::HELLO);
                dst.put_slice(&MAGIC);
                dst.put_u16(*highest);
                dst.put_u16(*lowest);
                dst.put_u32(*features);
                if let Some(key) = send_key {
                    put_property(dst, prop::SEND_KEY, key);
                }
            }
            ClientFrame::Ping { nonce } => {
                dst.put_u8(tag::PING);
                dst.put_u32(*nonce);
            }
            ClientFrame::Create { id, name, password } => {
                dst.put_u8(tag::CREATE);
                dst.put_u32(*id);
                put_text(dst, name);
                put_text(dst, password);
            }
            ClientFrame::Login { id, name, password } => {
                dst.put_u8(tag::LOGIN);
                dst.put_u32(*id);
                put_text(dst, name);
                put_text(dst, password);
            }
            ClientFrame::Logout { id } => {
                dst.put_u8(tag::LOGOUT);
                dst.put_u32(*id);
            }
            ClientFrame::Delete { id, password } => {
                dst.put_u8(tag::DELETE);
                dst.put_u32(*id);
                put_text(dst, password);
            }
            ClientFrame::ChangePassword { id, old, new } => {
                dst.put_u8(tag::CHANGE_PASSWORD);
                dst.put_u32(*id);
                put_text(dst, old);
                put_text(dst, new);
            }
            ClientFrame::Send { id, to, body } => {
                dst.put_u8(tag::SEND);
                dst.put_u32(*id);
                put_text(dst, to);
                put_text(dst, body);
            }
            ClientFrame::List { id, max, pattern } => {
                dst.put_u8(tag::LIST);
                dst.put_u32(*id);
                dst.put_u32(*max);
                put_text(dst, pattern);
            }
            ClientFrame::Fetch { id, max } => {
                dst.put_u8(tag::FETCH);
                dst.put_u32(*id);
                dst.put_u32(*max);
            }
            ClientFrame::SendOnce { id, to, body } => {
                dst.put_u8(tag::SEND_ONCE);
                dst.put_u32(*id);
                put_text(dst, to);
                put_text(dst, body);
            }
            ClientFrame::Ack { id, through } => {
                dst.put_u8(tag::ACK);
                dst.put_u32(*id);
                dst.put_u64(*through);
            }
        }
        Ok(())
    }

    /// Parses one payload (tag and fields). A hello in version 1's layout
    /// (offering only versions below 2) is [`FrameError::OldVersion`].
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let mut f = Fields { buf: payload };
        let frame = match f.u8("tag")? {
            tag::HELLO => {
                if f.take(4, "magic")? != MAGIC {
                    return Err(malformed(
                        "hello does not start with the magic bytes \"CHAT\"",
                    ));
                }
                let highest = f.u16("highest version")?;
                if highest < 2 {
                    // Version 1's hello has a different layout after this
                    // field; it is refused whatever follows.
                    return Err(FrameError::OldVersion(highest));
                }
                let lowest = f.u16("lowest version")?;
                let features = f.u32("features")?;
                let mut send_key = None;
                f.properties(|id, value| {
                    Ok(match id {
                        prop::SEND_KEY => {
                            send_key = Some(fixed::<SEND_KEY_LEN>(value, "send key")?);
                            true
                        }
                        _ => false,
                    })
                })?;
                ClientFrame::Hello {
                    highest,
                    lowest,
                    features,
                    send_key,
                }
            }
            tag::PING => ClientFrame::Ping {
                nonce: f.u32("nonce")?,
            },
            tag::CREATE => ClientFrame::Create {
                id: f.u32("request id")?,
                name: f.text("name")?,
                password: f.text("password")?,
            },
            tag::LOGIN => ClientFrame::Login {
                id: f.u32("request id")?,
                name: f.text("name")?,
                password: f.text("password")?,
            },
            tag::LOGOUT => ClientFrame::Logout {
                id: f.u32("request id")?,
            },
            tag::DELETE => ClientFrame::Delete {
                id: f.u32("request id")?,
                password: f.text("password")?,
            },
            tag::CHANGE_PASSWORD => ClientFrame::ChangePassword {
                id: f.u32("request id")?,
                old: f.text("current password")?,
                new: f.text("new password")?,
            },
            tag::SEND => ClientFrame::Send {
                id: f.u32("request id")?,
                to: f.text("recipient")?,
                body: f.text("body")?,
            },
            tag::LIST => ClientFrame::List {
                id: f.u32("request id")?,
                max: f.u32("max")?,
                pattern: f.text("pattern")?,
            },
            tag::FETCH => ClientFrame::Fetch {
                id: f.u32("request id")?,
                max: f.u32("max")?,
            },
            tag::SEND_ONCE => ClientFrame::SendOnce {
                id: f.u32("request id")?,
                to: f.text("recipient")?,
                body: f.text("body")?,
            },
            tag::ACK => ClientFrame::Ack {
                id: f.u32("request id")?,
                through: f.u64("through")?,
            },
            other => return Err(FrameError::UnknownTag(other)),
        };
        if !matches!(frame, ClientFrame::Hello { .. }) {
            // No client frame but the hello has properties yet: skip any.
            f.properties(|_, _| Ok(false))?;
        }
        Ok(frame)
    }
}

impl ServerFrame {
    /// Appends the payload (tag and fields, no length prefix) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            ServerFrame::Welcome {
                version,
                features,
                max_frame,
                idle_timeout_ms,
                queue_limit,
                max_list,
                max_fetch,
                server,
            } => {
                dst.put_u8(tag::WELCOME);
                dst.put_u16(*version);
                dst.put_u32(*features);
                dst.put_u32(*max_frame);
                dst.put_u32(*idle_timeout_ms);
                dst.put_u32(*queue_limit);
                dst.put_u32(*max_list);
                dst.put_u32(*max_fetch);
                put_text(dst, server);
            }
            ServerFrame::Pong { nonce } => {
                dst.put_u8(tag::PONG);
                dst.put_u32(*nonce);
            }
            ServerFrame::Done { id, state, replay } => {
                dst.put_u8(tag::DONE);
                dst.put_u32(*id);
                put_state(dst, state);
                if let Some(replay) = replay {
                    put_property(dst, prop::REPLAY, &replay.to_be_bytes());
                }
            }
            ServerFrame::Sent {
                id,
                state,
                message_id,
                timestamp_ms,
            } => {
                dst.put_u8(tag::SENT);
                dst.put_u32(*id);
                put_state(dst, state);
                dst.put_u64(*message_id);
                dst.put_u64(*timestamp_ms);
            }
            ServerFrame::Accounts { id, state, names } => {
                dst.put_u8(tag::ACCOUNTS);
                dst.put_u32(*id);
                put_state(dst, state);
                put_count(dst, names.len())?;
                for name in names {
                    put_text(dst, name.as_str());
                }
            }
            ServerFrame::Messages {
                id,
                state,
                messages,
            } => {
                dst.put_u8(tag::MESSAGES);
                dst.put_u32(*id);
                put_state(dst, state);
                put_count(dst, messages.len())?;
                for m in messages {
                    put_message(dst, m);
                }
            }
            ServerFrame::Error {
                id,
                state,
                code,
                message,
            } => {
                dst.put_u8(tag::ERROR);
                dst.put_u32(*id);
                put_state(dst, state);
                dst.put_u16(code.as_u16());
                put_text(dst, message);
            }
            ServerFrame::PushMessage(m) => {
                dst.put_u8(tag::PUSH_MESSAGE);
                put_message(dst, m);
            }
            ServerFrame::PushLoggedOut { reason, user } => {
                dst.put_u8(tag::PUSH_LOGGED_OUT);
                dst.put_u8(logout_reason_byte(*reason));
                put_text(dst, user.as_str());
            }
            ServerFrame::Goodbye {
                code,
                message,
                versions,
            } => {
                dst.put_u8(tag::GOODBYE);
                dst.put_u16(code.as_u16());
                put_text(dst, message);
                if !versions.is_empty() {
                    let value: Vec<u8> = versions.iter().flat_map(|v| v.to_be_bytes()).collect();
                    put_property(dst, prop::VERSIONS, &value);
                }
            }
            ServerFrame::GoodbyeV1 { code, message } => {
                dst.put_u8(tag::GOODBYE);
                dst.put_u16(code.as_u16());
                dst.put_slice(message.as_bytes());
            }
        }
        Ok(())
    }

    /// Parses one payload (tag and fields). Never yields
    /// [`ServerFrame::GoodbyeV1`]: a version 2 client reads only version 2.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let mut f = Fields { buf: payload };
        // A code this client does not know (from a newer server) is still an
        // error: it reads as `internal`, with the number kept in the text.
        let code_and_text = |f: &mut Fields<'_>, what: &str| -> Result<_, FrameError> {
            let n = f.u16("error code")?;
            let text = f.text(what)?;
            Ok(match ErrorCode::from_u16(n) {
                Some(code) => (code, text),
                None => (
                    ErrorCode::Internal,
                    format!("error code {n}, unknown to this client: {text}"),
                ),
            })
        };
        let frame = match f.u8("tag")? {
            tag::WELCOME => ServerFrame::Welcome {
                version: f.u16("version")?,
                features: f.u32("features")?,
                max_frame: f.u32("max frame")?,
                idle_timeout_ms: f.u32("idle timeout")?,
                queue_limit: f.u32("queue limit")?,
                max_list: f.u32("list cap")?,
                max_fetch: f.u32("fetch cap")?,
                server: f.text("server name")?,
            },
            tag::PONG => ServerFrame::Pong {
                nonce: f.u32("nonce")?,
            },
            tag::DONE => {
                let id = f.u32("request id")?;
                let state = f.state()?;
                let mut replay = None;
                f.properties(|id, value| {
                    Ok(match id {
                        prop::REPLAY => {
                            replay = Some(u32::from_be_bytes(fixed(value, "replay")?));
                            true
                        }
                        _ => false,
                    })
                })?;
                ServerFrame::Done { id, state, replay }
            }
            tag::SENT => ServerFrame::Sent {
                id: f.u32("request id")?,
                state: f.state()?,
                message_id: f.u64("message id")?,
                timestamp_ms: f.u64("timestamp")?,
            },
            tag::ACCOUNTS => {
                let id = f.u32("request id")?;
                let state = f.state()?;
                let count = f.u32("count")? as usize;
                // Each name takes at least two bytes: a count larger than
                // the payload can hold is a lie, so don't allocate for it.
                let mut names = Vec::with_capacity(count.min(f.buf.len() / 2));
                for _ in 0..count {
                    names.push(f.username("account name")?);
                }
                ServerFrame::Accounts { id, state, names }
            }
            tag::MESSAGES => {
                let id = f.u32("request id")?;
                let state = f.state()?;
                let count = f.u32("count")? as usize;
                let mut messages = Vec::with_capacity(count.min(f.buf.len() / 20));
                for _ in 0..count {
                    messages.push(f.message()?);
                }
                ServerFrame::Messages {
                    id,
                    state,
                    messages,
                }
            }
            tag::ERROR => {
                let id = f.u32("request id")?;
                let state = f.state()?;
                let (code, message) = code_and_text(&mut f, "error text")?;
                ServerFrame::Error {
                    id,
                    state,
                    code,
                    message,
                }
            }
            tag::PUSH_MESSAGE => ServerFrame::PushMessage(f.message()?),
            tag::PUSH_LOGGED_OUT => {
                let reason = match f.u8("logout reason")? {
                    0 => LogoutReason::Requested,
                    1 => LogoutReason::AccountDeleted,
                    2 => LogoutReason::SlowConsumer,
                    other => return Err(malformed(format!("unknown logout reason {other}"))),
                };
                let user = f.username("user")?;
                ServerFrame::PushLoggedOut { reason, user }
            }
            tag::GOODBYE => {
                let (code, message) = code_and_text(&mut f, "goodbye text")?;
                let mut versions = Vec::new();
                f.properties(|id, value| {
                    Ok(match id {
                        prop::VERSIONS => {
                            if value.len() % 2 != 0 {
                                return Err(malformed("versions property of odd length"));
                            }
                            versions = value
                                .chunks_exact(2)
                                .map(|v| u16::from_be_bytes([v[0], v[1]]))
                                .collect();
                            true
                        }
                        _ => false,
                    })
                })?;
                ServerFrame::Goodbye {
                    code,
                    message,
                    versions,
                }
            }
            other => return Err(FrameError::UnknownTag(other)),
        };
        // Properties this side does not know are skipped (the frames above
        // that have known ones read them already, leaving nothing).
        f.properties(|_, _| Ok(false))?;
        Ok(frame)
    }
}
