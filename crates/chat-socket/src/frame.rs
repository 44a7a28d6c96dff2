//! Wire messages as enums, and their byte-exact encoding.
//!
//! A frame is `length: u32` (big-endian, counting the bytes after it) then
//! a payload that starts with a one-byte tag. [`ClientFrame`]s go from
//! client to server, [`ServerFrame`]s back. `docs/PROTOCOL.md` is the
//! normative description; this module implements exactly that.
//!
//! Field encodings: integers are big-endian; `str8` is a `u8` byte length
//! then UTF-8; `str16` a `u16` byte length then UTF-8; `rest` is UTF-8 up
//! to the end of the frame (always the last field, so it needs no length).

use bytes::{BufMut, BytesMut};
use chat_core::{ErrorCode, LogoutReason, Message, MessageBody, SessionState, Username};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
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

/// Client-to-server tags.
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

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// First frame of every connection.
    Hello {
        /// The protocol version the client speaks.
        version: u16,
        /// Optional: the key that makes this connection's SEND ONCE requests
        /// idempotent. A client keeps it across reconnects (so a resend
        /// matches the original) and never reuses a request id for another
        /// SEND ONCE under it.
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
    },
    /// Log in.
    Login {
        /// Request id.
        id: RequestId,
        /// Account name.
        name: String,
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

/// What a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Answer to a good hello.
    Welcome {
        /// The version the server will speak.
        version: u16,
        /// Largest frame payload the server accepts, in bytes.
        max_frame: u32,
        /// Silence after which the server drops the connection, in ms.
        idle_timeout_ms: u32,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u32,
    },
    /// Create, login, logout or delete succeeded.
    Done {
        /// The request's id.
        id: RequestId,
        /// The session's state now.
        state: SessionState,
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
    /// A message delivered live.
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
            FrameError::Malformed(_) | FrameError::Io(_) => ErrorCode::Malformed,
        }
    }
}

fn malformed(what: impl Into<String>) -> FrameError {
    FrameError::Malformed(what.into())
}

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
    fn utf8(bytes: &[u8], what: &str) -> Result<String, FrameError> {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(format!("{what} is not valid UTF-8")))
    }
    fn str8(&mut self, what: &str) -> Result<String, FrameError> {
        let len = self.u8(what)? as usize;
        let bytes = self.take(len, what)?;
        Self::utf8(bytes, what)
    }
    fn str16(&mut self, what: &str) -> Result<String, FrameError> {
        let len = self.u16(what)? as usize;
        let bytes = self.take(len, what)?;
        Self::utf8(bytes, what)
    }
    fn rest(&mut self, what: &str) -> Result<String, FrameError> {
        let bytes = std::mem::take(&mut self.buf);
        Self::utf8(bytes, what)
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!(
                "{} unexpected trailing bytes",
                self.buf.len()
            )))
        }
    }
    fn username(&mut self, what: &str) -> Result<Username, FrameError> {
        let raw = self.str8(what)?;
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
    fn message(&mut self, body_is_rest: bool) -> Result<Message, FrameError> {
        let id = self.u64("message id")?;
        let timestamp_ms = self.u64("timestamp")?;
        let sender = self.username("sender")?;
        let raw = if body_is_rest {
            self.rest("body")?
        } else {
            self.str16("body")?
        };
        let body = MessageBody::parse(&raw).map_err(|e| malformed(format!("body: {e}")))?;
        Ok(Message {
            id,
            sender,
            body,
            timestamp_ms,
        })
    }
}

fn put_str8(dst: &mut BytesMut, s: &str) -> Result<(), FrameError> {
    let len = u8::try_from(s.len())
        .map_err(|_| malformed("string longer than 255 bytes in a str8 field"))?;
    dst.put_u8(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_str16(dst: &mut BytesMut, s: &str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len())
        .map_err(|_| malformed("string longer than 65535 bytes in a str16 field"))?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_state(dst: &mut BytesMut, state: &SessionState) -> Result<(), FrameError> {
    match state {
        SessionState::LoggedOut => dst.put_u8(0),
        SessionState::LoggedIn(name) => {
            dst.put_u8(1);
            put_str8(dst, name.as_str())?;
        }
    }
    Ok(())
}

fn put_count(dst: &mut BytesMut, n: usize) -> Result<(), FrameError> {
    dst.put_u32(u32::try_from(n).map_err(|_| malformed("too many items"))?);
    Ok(())
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
            ClientFrame::Hello { version, send_key } => {
                dst.put_u8(tag::HELLO);
                dst.put_slice(&MAGIC);
                dst.put_u16(*version);
                if let Some(key) = send_key {
                    dst.put_slice(key);
                }
            }
            ClientFrame::Ping { nonce } => {
                dst.put_u8(tag::PING);
                dst.put_u32(*nonce);
            }
            ClientFrame::Create { id, name } | ClientFrame::Login { id, name } => {
                let t = if matches!(self, ClientFrame::Create { .. }) {
                    tag::CREATE
                } else {
                    tag::LOGIN
                };
                dst.put_u8(t);
                dst.put_u32(*id);
                dst.put_slice(name.as_bytes());
            }
            ClientFrame::Logout { id } => {
                dst.put_u8(tag::LOGOUT);
                dst.put_u32(*id);
            }
            ClientFrame::Delete { id } => {
                dst.put_u8(tag::DELETE);
                dst.put_u32(*id);
            }
            ClientFrame::Send { id, to, body } => {
                dst.put_u8(tag::SEND);
                dst.put_u32(*id);
                put_str8(dst, to)?;
                dst.put_slice(body.as_bytes());
            }
            ClientFrame::List { id, max, pattern } => {
                dst.put_u8(tag::LIST);
                dst.put_u32(*id);
                dst.put_u32(*max);
                dst.put_slice(pattern.as_bytes());
            }
            ClientFrame::Fetch { id, max } => {
                dst.put_u8(tag::FETCH);
                dst.put_u32(*id);
                dst.put_u32(*max);
            }
            ClientFrame::SendOnce { id, to, body } => {
                dst.put_u8(tag::SEND_ONCE);
                dst.put_u32(*id);
                put_str8(dst, to)?;
                dst.put_slice(body.as_bytes());
            }
            ClientFrame::Ack { id, through } => {
                dst.put_u8(tag::ACK);
                dst.put_u32(*id);
                dst.put_u64(*through);
            }
        }
        Ok(())
    }

    /// Parses one payload (tag and fields).
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let mut f = Fields { buf: payload };
        let frame = match f.u8("tag")? {
            tag::HELLO => {
                if f.take(4, "magic")? != MAGIC {
                    return Err(malformed(
                        "hello does not start with the magic bytes \"CHAT\"",
                    ));
                }
                let version = f.u16("version")?;
                let send_key = match f.buf.len() {
                    0 => None,
                    SEND_KEY_LEN => Some(
                        f.take(SEND_KEY_LEN, "send key")?
                            .try_into()
                            .map_err(|_| malformed("truncated send key"))?,
                    ),
                    n => {
                        return Err(malformed(format!(
                            "a hello's send key is {SEND_KEY_LEN} bytes, not {n}"
                        )));
                    }
                };
                ClientFrame::Hello { version, send_key }
            }
            tag::PING => ClientFrame::Ping {
                nonce: f.u32("nonce")?,
            },
            tag::CREATE => ClientFrame::Create {
                id: f.u32("request id")?,
                name: f.rest("name")?,
            },
            tag::LOGIN => ClientFrame::Login {
                id: f.u32("request id")?,
                name: f.rest("name")?,
            },
            tag::LOGOUT => ClientFrame::Logout {
                id: f.u32("request id")?,
            },
            tag::DELETE => ClientFrame::Delete {
                id: f.u32("request id")?,
            },
            tag::SEND => ClientFrame::Send {
                id: f.u32("request id")?,
                to: f.str8("recipient")?,
                body: f.rest("body")?,
            },
            tag::LIST => ClientFrame::List {
                id: f.u32("request id")?,
                max: f.u32("max")?,
                pattern: f.rest("pattern")?,
            },
            tag::FETCH => ClientFrame::Fetch {
                id: f.u32("request id")?,
                max: f.u32("max")?,
            },
            tag::SEND_ONCE => ClientFrame::SendOnce {
                id: f.u32("request id")?,
                to: f.str8("recipient")?,
                body: f.rest("body")?,
            },
            tag::ACK => ClientFrame::Ack {
                id: f.u32("request id")?,
                through: f.u64("through")?,
            },
            other => return Err(FrameError::UnknownTag(other)),
        };
        f.end()?;
        Ok(frame)
    }
}

impl ServerFrame {
    /// Appends the payload (tag and fields, no length prefix) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            ServerFrame::Welcome {
                version,
                max_frame,
                idle_timeout_ms,
            } => {
                dst.put_u8(tag::WELCOME);
                dst.put_u16(*version);
                dst.put_u32(*max_frame);
                dst.put_u32(*idle_timeout_ms);
            }
            ServerFrame::Pong { nonce } => {
                dst.put_u8(tag::PONG);
                dst.put_u32(*nonce);
            }
            ServerFrame::Done { id, state } => {
                dst.put_u8(tag::DONE);
                dst.put_u32(*id);
                put_state(dst, state)?;
            }
            ServerFrame::Sent {
                id,
                state,
                message_id,
                timestamp_ms,
            } => {
                dst.put_u8(tag::SENT);
                dst.put_u32(*id);
                put_state(dst, state)?;
                dst.put_u64(*message_id);
                dst.put_u64(*timestamp_ms);
            }
            ServerFrame::Accounts { id, state, names } => {
                dst.put_u8(tag::ACCOUNTS);
                dst.put_u32(*id);
                put_state(dst, state)?;
                put_count(dst, names.len())?;
                for name in names {
                    put_str8(dst, name.as_str())?;
                }
            }
            ServerFrame::Messages {
                id,
                state,
                messages,
            } => {
                dst.put_u8(tag::MESSAGES);
                dst.put_u32(*id);
                put_state(dst, state)?;
                put_count(dst, messages.len())?;
                for m in messages {
                    dst.put_u64(m.id);
                    dst.put_u64(m.timestamp_ms);
                    put_str8(dst, m.sender.as_str())?;
                    put_str16(dst, m.body.as_str())?;
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
                put_state(dst, state)?;
                dst.put_u16(code.as_u16());
                dst.put_slice(message.as_bytes());
            }
            ServerFrame::PushMessage(m) => {
                dst.put_u8(tag::PUSH_MESSAGE);
                dst.put_u64(m.id);
                dst.put_u64(m.timestamp_ms);
                put_str8(dst, m.sender.as_str())?;
                dst.put_slice(m.body.as_str().as_bytes());
            }
            ServerFrame::PushLoggedOut { reason, user } => {
                dst.put_u8(tag::PUSH_LOGGED_OUT);
                dst.put_u8(logout_reason_byte(*reason));
                dst.put_slice(user.as_str().as_bytes());
            }
            ServerFrame::Goodbye { code, message } => {
                dst.put_u8(tag::GOODBYE);
                dst.put_u16(code.as_u16());
                dst.put_slice(message.as_bytes());
            }
        }
        Ok(())
    }

    /// Parses one payload (tag and fields).
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let mut f = Fields { buf: payload };
        // A code this client does not know (from a newer server) is still an
        // error: it reads as `internal`, with the number kept in the text.
        let code_and_text = |f: &mut Fields<'_>, what: &str| -> Result<_, FrameError> {
            let n = f.u16("error code")?;
            let text = f.rest(what)?;
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
                max_frame: f.u32("max frame")?,
                idle_timeout_ms: f.u32("idle timeout")?,
            },
            tag::PONG => ServerFrame::Pong {
                nonce: f.u32("nonce")?,
            },
            tag::DONE => ServerFrame::Done {
                id: f.u32("request id")?,
                state: f.state()?,
            },
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
                let mut messages = Vec::with_capacity(count.min(f.buf.len() / 21));
                for _ in 0..count {
                    messages.push(f.message(false)?);
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
            tag::PUSH_MESSAGE => ServerFrame::PushMessage(f.message(true)?),
            tag::PUSH_LOGGED_OUT => {
                let reason = match f.u8("logout reason")? {
                    0 => LogoutReason::Requested,
                    1 => LogoutReason::AccountDeleted,
                    2 => LogoutReason::SlowConsumer,
                    other => return Err(malformed(format!("unknown logout reason {other}"))),
                };
                let raw = f.rest("user")?;
                let user = Username::parse(&raw).map_err(|e| malformed(format!("user: {e}")))?;
                ServerFrame::PushLoggedOut { reason, user }
            }
            tag::GOODBYE => {
                let (code, message) = code_and_text(&mut f, "goodbye text")?;
                ServerFrame::Goodbye { code, message }
            }
            other => return Err(FrameError::UnknownTag(other)),
        };
        f.end()?;
        Ok(frame)
    }
}
