//! The async client library for the socket protocol.
//!
//! [`SocketClient`] owns one connection at a time. A reader task routes
//! responses to the waiting call by request id and queues pushed events for
//! [`ChatClient::next_push`]; a heartbeat task pings the server at a third
//! of the idle timeout the server announced, and declares the connection
//! dead if the server stays silent for the whole timeout.
//!
//! Sends are idempotent: the client announces a random send key in the
//! hello of every connection it opens, and each send (SEND ONCE) is known to
//! the server by that key and its request id. If the connection fails
//! before the reply, the client reconnects with the same key, logs in again
//! and resends with the same request id (for up to [`RECONNECT_DEADLINE`]),
//! so the send either gets its original result or is stored once now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_core::client::{ChatClient, ClientError, Push, Seen, Unreturned};
use chat_core::{ErrorCode, Message, MessageId, SendReceipt, SessionState, Username};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{ClientCodec, DEFAULT_MAX_RESPONSE};
use crate::frame::{ClientFrame, FrameError, PROTOCOL_VERSION, RequestId, SendKey, ServerFrame};

/// How long `connect` waits for the server's welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Writer = Arc<tokio::sync::Mutex<FramedWrite<OwnedWriteHalf, ClientCodec>>>;
type Pending = Arc<Mutex<PendingMap>>;

#[derive(Default)]
struct PendingMap {
    waiting: HashMap<RequestId, oneshot::Sender<ServerFrame>>,
    /// Set once the connection is gone, so later calls fail at once.
    closed: Option<String>,
    /// The server's reason, if it closed the connection on purpose.
    goodbye: Option<(ErrorCode, String)>,
}

/// How long a send keeps trying to reconnect and resend after its
/// connection failed.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// A connection to a chat server speaking the socket protocol.
pub struct SocketClient {
    addr: String,
    conn: Conn,
    /// This client's send key, kept across reconnects so that a resent
    /// SEND ONCE matches its original.
    send_key: SendKey,
    next_id: RequestId,
    /// Request ids wrapped around since `send_key` was chosen: the next
    /// send needs a fresh key (and connection), or its id could repeat an
    /// earlier send's.
    key_spent: bool,
    state: SessionState,
    seen: Seen,
}

/// One TCP connection and its tasks.
struct Conn {
    writer: Writer,
    pending: Pending,
    pushes: mpsc::UnboundedReceiver<Push>,
    /// Messages the reader queued that the client has not returned yet.
    unreturned: Unreturned,
    reader: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl std::fmt::Debug for SocketClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketClient")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.heartbeat.abort();
    }
}

fn connection_error(err: impl std::fmt::Display) -> ClientError {
    ClientError::Connection(err.to_string())
}

impl SocketClient {
    /// Connects, performs the version handshake, and starts the reader and
    /// heartbeat tasks.
    pub async fn connect(addr: impl ToSocketAddrs + ToString) -> Result<Self, ClientError> {
        let send_key: SendKey = rand::random();
        let conn = Conn::open(addr.to_string().as_str(), send_key).await?;
        Ok(Self {
            addr: addr.to_string(),
            conn,
            send_key,
            next_id: 0,
            key_spent: false,
            state: SessionState::LoggedOut,
            seen: Seen::default(),
        })
    }

    /// Replaces a failed connection and logs in again as the same user,
    /// retrying until [`RECONNECT_DEADLINE`] (the server may not have
    /// noticed the old connection's end yet, or may be restarting).
    async fn reconnect(&mut self, deadline: Instant, why: String) -> Result<(), ClientError> {
        let Some(user) = self.state.user().cloned() else {
            return Err(connection_error(why));
        };
        let mut backoff = Duration::from_millis(20);
        loop {
            if Instant::now() >= deadline {
                return Err(connection_error(format!(
                    "{why}; no reconnect within {RECONNECT_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            let Ok(conn) = Conn::open(&self.addr, self.send_key).await else {
                continue;
            };
            self.conn = conn;
            match self.login(user.as_str()).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Connection(_)) => continue,
                Err(err) if err.code() == Some(ErrorCode::AlreadyLoggedIn) => {
                    self.adopt(SessionState::LoggedIn(user.clone()));
                    continue;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Conn {
    async fn open(addr: &str, send_key: SendKey) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(connection_error)?;
        stream.set_nodelay(true).map_err(connection_error)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(connection_error)?;
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, ClientCodec::new(DEFAULT_MAX_RESPONSE));
        let mut writer = FramedWrite::new(write, ClientCodec::new(DEFAULT_MAX_RESPONSE));
        writer
            .send(ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                send_key: Some(send_key),
            })
            .await
            .map_err(connection_error)?;
        let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
            .await
            .map_err(|_| connection_error("no welcome from the server within 10 s"))?;
        let idle_timeout = match welcome {
            Some(Ok(ServerFrame::Welcome {
                idle_timeout_ms, ..
            })) => Duration::from_millis(idle_timeout_ms.into()),
            Some(Ok(ServerFrame::Goodbye { code, message })) => {
                return Err(ClientError::Server { code, message });
            }
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            Some(Err(err)) => return Err(ClientError::Protocol(err.to_string())),
            None => {
                return Err(connection_error(
                    "the server closed the connection during the handshake",
                ));
            }
        };
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
        let pending: Pending = Arc::default();
        let (push_tx, pushes) = mpsc::unbounded_channel();
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        let unreturned = Unreturned::default();
        let reader = tokio::spawn(read_loop(
            reader,
            Arc::clone(&pending),
            push_tx,
            unreturned.clone(),
            Arc::clone(&last_heard),
        ));
        let heartbeat = tokio::spawn(heartbeat(
            Arc::clone(&writer),
            Arc::clone(&pending),
            last_heard,
            idle_timeout,
        ));
        Ok(Self {
            writer,
            pending,
            pushes,
            unreturned,
            reader,
            heartbeat,
        })
    }
}

impl SocketClient {
    /// Closes the connection gracefully: stops writing and waits (briefly)
    /// for the server to close its side, by which time the server has
    /// logged this session out.
    pub async fn close(mut self) {
        self.conn.heartbeat.abort();
        let _ = self.conn.writer.lock().await.get_mut().shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.conn.reader).await;
    }

    fn adopt(&mut self, state: SessionState) {
        self.seen.follow(&state);
        self.state = state;
    }

    /// Why calls on this connection fail: the server's goodbye if it closed
    /// the connection on purpose (not worth a resend, unless it was only
    /// stopping or timing out), else a connection error.
    fn closed_error(&self) -> ClientError {
        let pending = self.conn.pending.lock().ok();
        let (goodbye, why) = match &pending {
            Some(p) => (p.goodbye.clone(), p.closed.clone()),
            None => (None, None),
        };
        match goodbye {
            Some((code, message))
                if !matches!(code, ErrorCode::ShuttingDown | ErrorCode::IdleTimeout) =>
            {
                ClientError::Server { code, message }
            }
            _ => connection_error(why.unwrap_or_else(|| "connection closed".into())),
        }
    }

    /// Before a login or create: pushes still queued were for an earlier
    /// login and must not be shown as this one's. Nothing is lost: they are
    /// stored, and replayed to their user at its next login.
    fn drop_queued_pushes(&mut self) {
        if self.state.user().is_some() {
            // Still logged in: the server refuses the call, and the queued
            // pushes are this user's.
            return;
        }
        while self.conn.pushes.try_recv().is_ok() {}
        self.conn.unreturned.clear();
    }

    fn request_id(&mut self) -> RequestId {
        self.next_id = self.next_id.wrapping_add(1);
        if self.next_id == 0 {
            self.next_id = 1;
            self.key_spent = true;
        }
        self.next_id
    }

    /// Once request ids have wrapped around, takes a new send key before the
    /// next send. A key is announced in the hello, so this means a new
    /// connection (and, if logged in, logging in again on it).
    async fn renew_send_key(&mut self) -> Result<(), ClientError> {
        if !self.key_spent {
            return Ok(());
        }
        // Until a connection announcing the new key is open, nothing may be
        // sent under the old key with the wrapped ids: `key_spent` stays set
        // (and the send fails) if it cannot be opened.
        let key: SendKey = rand::random();
        let conn = Conn::open(&self.addr, key).await?;
        // The old connection ends here, and with it its login.
        self.conn = conn;
        self.send_key = key;
        self.key_spent = false;
        let Some(user) = self.state.user().cloned() else {
            return Ok(());
        };
        // Log in again on the new connection, retrying (on further new
        // connections with the same key) while the server lets go of the
        // old session.
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        match self.login(user.as_str()).await {
            Ok(_) => Ok(()),
            Err(ClientError::Connection(why)) => self.reconnect(deadline, why).await,
            Err(err) if err.code() == Some(ErrorCode::AlreadyLoggedIn) => {
                self.adopt(SessionState::LoggedIn(user));
                self.reconnect(deadline, "the server still held the old login".into())
                    .await
            }
            Err(err) => Err(err),
        }
    }

    /// Sends one request and waits for its response, adopting the state it
    /// reports; an error response becomes `ClientError::Server`.
    async fn call(
        &mut self,
        id: RequestId,
        frame: ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .conn
                .pending
                .lock()
                .map_err(|_| connection_error("client state poisoned"))?;
            if pending.closed.is_some() {
                drop(pending);
                return Err(self.closed_error());
            }
            pending.waiting.insert(id, tx);
        }
        let sent = self.conn.writer.lock().await.send(frame).await;
        if let Err(err) = sent {
            if let Ok(mut pending) = self.conn.pending.lock() {
                pending.waiting.remove(&id);
            }
            return Err(match err {
                FrameError::Io(err) => connection_error(err),
                other => ClientError::Protocol(other.to_string()),
            });
        }
        let reply = rx.await.map_err(|_| self.closed_error())?;
        match reply {
            ServerFrame::Error {
                state,
                code,
                message,
                ..
            } => {
                self.adopt(state);
                Err(ClientError::Server { code, message })
            }
            ServerFrame::Done { ref state, .. }
            | ServerFrame::Sent { ref state, .. }
            | ServerFrame::Accounts { ref state, .. }
            | ServerFrame::Messages { ref state, .. } => {
                self.adopt(state.clone());
                Ok(reply)
            }
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    async fn simple(
        &mut self,
        make: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<SessionState, ClientError> {
        let id = self.request_id();
        match self.call(id, make(id)).await? {
            ServerFrame::Done { state, .. } => Ok(state),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Protocol(format!("response of the wrong kind: {frame:?}"))
}

async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf, ClientCodec>,
    pending: Pending,
    pushes: mpsc::UnboundedSender<Push>,
    unreturned: Unreturned,
    last_heard: Arc<Mutex<Instant>>,
) {
    let why = loop {
        let frame = match reader.next().await {
            None => break "the server closed the connection".to_string(),
            Some(Err(err)) => break format!("connection lost: {err}"),
            Some(Ok(frame)) => frame,
        };
        if let Ok(mut heard) = last_heard.lock() {
            *heard = Instant::now();
        }
        let push = match frame {
            ServerFrame::Pong { .. } | ServerFrame::Welcome { .. } => continue,
            ServerFrame::PushMessage(message) => Push::Message(message),
            ServerFrame::PushLoggedOut { reason, user } => Push::LoggedOut { user, reason },
            ServerFrame::Goodbye { code, message } => Push::Goodbye { code, message },
            ServerFrame::Error {
                id: 0,
                code,
                message,
                ..
            } => Push::Goodbye { code, message },
            ServerFrame::Done { id, .. }
            | ServerFrame::Sent { id, .. }
            | ServerFrame::Accounts { id, .. }
            | ServerFrame::Messages { id, .. }
            | ServerFrame::Error { id, .. } => {
                let waiter = pending.lock().ok().and_then(|mut p| p.waiting.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(frame);
                }
                continue;
            }
        };
        if let (Push::Goodbye { code, message }, Ok(mut pending)) = (&push, pending.lock()) {
            pending.goodbye = Some((*code, message.clone()));
        }
        if let Push::Message(m) = &push {
            unreturned.received(m.id);
        }
        let _ = pushes.send(push);
    };
    // Drain whatever is still buffered on the socket so a clean close is not
    // turned into a reset, then fail every waiting call.
    let mut rest = reader.into_inner();
    let mut sink = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), rest.read(&mut sink)).await
    {
        if n == 0 {
            break;
        }
    }
    if let Ok(mut pending) = pending.lock() {
        pending.closed = Some(why);
        pending.waiting.clear();
    }
}

async fn heartbeat(
    writer: Writer,
    pending: Pending,
    last_heard: Arc<Mutex<Instant>>,
    idle_timeout: Duration,
) {
    let period = (idle_timeout / 3).max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    let mut nonce = 0u32;
    loop {
        ticks.tick().await;
        let silent = last_heard.lock().map(|h| h.elapsed()).unwrap_or_default();
        if silent > idle_timeout {
            // The server is gone without closing (a half-open connection,
            // where reads may block until TCP keepalive gives up): fail the
            // waiting calls now, and close our side.
            if let Ok(mut pending) = pending.lock() {
                pending.closed = Some(format!(
                    "the server was silent for {} ms",
                    silent.as_millis()
                ));
                pending.waiting.clear();
            }
            let _ = writer.lock().await.get_mut().shutdown().await;
            return;
        }
        nonce = nonce.wrapping_add(1);
        if writer
            .lock()
            .await
            .send(ClientFrame::Ping { nonce })
            .await
            .is_err()
        {
            return;
        }
    }
}

impl ChatClient for SocketClient {
    async fn create(&mut self, name: &str) -> Result<SessionState, ClientError> {
        self.drop_queued_pushes();
        let name = name.to_owned();
        self.simple(|id| ClientFrame::Create { id, name }).await
    }

    async fn login(&mut self, name: &str) -> Result<SessionState, ClientError> {
        self.drop_queued_pushes();
        let name = name.to_owned();
        self.simple(|id| ClientFrame::Login { id, name }).await
    }

    async fn logout(&mut self) -> Result<SessionState, ClientError> {
        self.simple(|id| ClientFrame::Logout { id }).await
    }

    async fn delete(&mut self) -> Result<SessionState, ClientError> {
        let state = self.simple(|id| ClientFrame::Delete { id }).await?;
        self.seen.reset();
        Ok(state)
    }

    async fn send(&mut self, to: &str, body: &str) -> Result<SendReceipt, ClientError> {
        // The request id is the send's sequence number under the send key:
        // every attempt of this send uses the same one.
        let mut id = self.request_id();
        if self.key_spent {
            self.renew_send_key().await?;
            id = self.request_id();
        }
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        loop {
            let frame = ClientFrame::SendOnce {
                id,
                to: to.to_owned(),
                body: body.to_owned(),
            };
            match self.call(id, frame).await {
                Ok(ServerFrame::Sent {
                    message_id,
                    timestamp_ms,
                    ..
                }) => {
                    return Ok(SendReceipt {
                        id: message_id,
                        timestamp_ms,
                    });
                }
                Ok(other) => return Err(unexpected(other)),
                // The send may or may not have been stored: resend the same
                // id on a new connection and let the server tell.
                Err(ClientError::Connection(why)) => self.reconnect(deadline, why).await?,
                Err(err) => return Err(err),
            }
        }
    }

    async fn list(&mut self, pattern: &str, max: u32) -> Result<Vec<Username>, ClientError> {
        let id = self.request_id();
        let frame = ClientFrame::List {
            id,
            max,
            pattern: pattern.to_owned(),
        };
        match self.call(id, frame).await? {
            ServerFrame::Accounts { names, .. } => Ok(names),
            other => Err(unexpected(other)),
        }
    }

    async fn fetch(&mut self, max: u32) -> Result<Vec<Message>, ClientError> {
        let id = self.request_id();
        match self.call(id, ClientFrame::Fetch { id, max }).await? {
            ServerFrame::Messages { messages, .. } => Ok(messages
                .into_iter()
                .filter(|m| self.seen.first(m.id))
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    async fn ack(&mut self, through: MessageId) -> Result<(), ClientError> {
        // Never past a message this client holds but has not returned yet.
        let Some(through) = self.conn.unreturned.safe_ack(through) else {
            return Ok(());
        };
        let id = self.request_id();
        match self.call(id, ClientFrame::Ack { id, through }).await? {
            ServerFrame::Done { .. } => {
                self.seen.acked(through);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    async fn next_push(&mut self) -> Option<Push> {
        loop {
            let push = self.conn.pushes.recv().await?;
            if let Push::Message(m) = &push {
                self.conn.unreturned.returned(m.id);
            }
            match &push {
                Push::Message(m) if !self.seen.first(m.id) => continue,
                Push::LoggedOut { user, .. } if self.state.user() == Some(user) => {
                    self.adopt(SessionState::LoggedOut);
                }
                _ => {}
            }
            return Some(push);
        }
    }

    fn state(&self) -> &SessionState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::Chat;

    #[tokio::test]
    async fn wrapping_request_ids_renew_the_send_key_and_keep_the_login() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::serve(
            listener,
            Chat::in_memory(),
            crate::ServerConfig::default(),
            std::future::pending(),
        ));
        let mut bob = SocketClient::connect(addr).await.unwrap();
        bob.create("bob").await.unwrap();
        let mut alice = SocketClient::connect(addr).await.unwrap();
        alice.create("alice").await.unwrap();
        let before = alice.send_key;

        // The next request id is the last before the wrap; the send after
        // it would reuse id 1 under the old key, so it takes a new key.
        alice.next_id = u32::MAX - 1;
        let last = alice.send("bob", "last of the old key").await.unwrap();
        assert_eq!(alice.send_key, before);
        let first = alice.send("bob", "first of the new key").await.unwrap();
        assert_ne!(alice.send_key, before, "a new key after the wrap");
        assert_ne!(first.id, last.id, "a new message, not a repeat");
        assert_eq!(alice.state().user().map(Username::as_str), Some("alice"));

        let mut bodies = Vec::new();
        while bodies.len() < 2 {
            if let Some(Push::Message(m)) = bob.next_push().await {
                bodies.push(m.body.as_str().to_owned());
            }
        }
        assert_eq!(bodies, ["last of the old key", "first of the new key"]);
        server.abort();
    }
}
