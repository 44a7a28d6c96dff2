//! The async client library for the socket protocol.
//!
//! [`SocketClient`] owns one connection at a time, served by one task that
//! owns the socket: it writes the requests it is handed on a channel,
//! routes each response to the call waiting for it (by request id), queues
//! pushed events for [`ChatClient::next_push`], and pings the server at a
//! third of the idle timeout the server announced, declaring the connection
//! dead if the server stays silent for the whole timeout.
//!
//! # Backpressure
//!
//! Pushed events wait in a bounded queue ([`PUSH_QUEUE`] events). An
//! application that stops calling `next_push` fills it; the connection task
//! then stops reading the socket. The server sees a slow consumer: once its
//! own queue for the session fills it logs the session out (the messages
//! stay stored and are delivered at the next login), and once the server
//! has been unable to write to the connection for its idle timeout it
//! closes it. Nothing is lost either way; memory stays bounded on both
//! sides. (While it is not reading, the client keeps pinging and does not
//! count the server's silence against it.)
//!
//! While a call waits for its answer, the task keeps reading even with the
//! queue full (the answer is behind the pushes the server wrote first, and
//! an application awaiting a call is not reading pushes): those pushes wait
//! in an overflow bounded by what the server may send ahead of one answer
//! (its per-session event queue and a login's replay).
//!
//! # Idempotent sends
//!
//! The client offers the `idempotent_send` feature with a random send key
//! in the hello of every connection it opens, and each send (SEND ONCE) is
//! known to the server by that key and its request id. If the connection
//! fails before the reply, the client reconnects with the same key, logs in
//! again and resends with the same request id (for up to
//! [`RECONNECT_DEADLINE`]), so the send either gets its original result or
//! is stored once now.
//!
//! # Pipelining
//!
//! [`ChatClient::send_pipelined`] writes a send without waiting for its
//! answer; the server answers a connection's requests in order, and
//! [`ChatClient::next_receipt`] returns the answers in that order. If the
//! connection fails, the client reconnects, logs in again and resends every
//! unanswered send in order under its original request id, so the server
//! stores each once. [`ChatClient::ack_later`] batches acknowledgements
//! ([`AckBatch`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chat_core::client::{AckBatch, ChatClient, ClientError, Push, Seen, Unreturned};
use chat_core::{ErrorCode, Message, MessageId, SendReceipt, SessionState, Username};
use chat_tls::ClientTls;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use crate::codec::{ClientCodec, DEFAULT_MAX_RESPONSE};
use crate::frame::{
    ClientFrame, FrameError, OLDEST_VERSION, PROTOCOL_VERSION, RequestId, SendKey, ServerFrame,
    feature,
};

/// How long `connect` waits for the server's welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many pushed events a client holds for its application before it
/// stops reading the connection (see the module docs).
pub const PUSH_QUEUE: usize = 1024;

/// How long a send keeps trying to reconnect and resend after its
/// connection failed.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// What the server said in its welcome: the version and features chosen,
/// and the limits that apply to this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The protocol version spoken.
    pub version: u16,
    /// The features the server accepted (see [`feature`]).
    pub features: u32,
    /// Largest request payload the server accepts, in bytes.
    pub max_frame: u32,
    /// Silence after which the server drops the connection.
    pub idle_timeout: Duration,
    /// Messages stored per recipient before sends to it get `queue_full`.
    pub queue_limit: u32,
    /// Most names one list returns.
    pub max_list: u32,
    /// Most messages one fetch returns.
    pub max_fetch: u32,
    /// The server's name and version.
    pub server: String,
}

/// A connection to a chat server speaking the socket protocol.
pub struct SocketClient {
    addr: String,
    /// Set for TLS connections; kept for reconnects.
    tls: Option<ClientTls>,
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
    /// The connection's login-answer count when the current login began:
    /// a logout notice queued before it is about an earlier login.
    login_floor: u64,
    /// The logged-in account's password, kept in memory only to log in
    /// again after a reconnect; dropped at logout.
    password: Option<String>,
    /// Pipelined sends awaiting their answers, oldest first.
    pipeline: VecDeque<InFlight>,
    /// Counts the connections this client opened: a pipelined send written
    /// on an earlier one has to be written again.
    generation: u64,
    acks: AckBatch,
}

/// A pipelined send awaiting its answer.
struct InFlight {
    id: RequestId,
    to: String,
    body: String,
    /// Where its answer arrives, and on which connection it was written;
    /// `None` once that connection failed (it is to be resent).
    answer: Option<(u64, oneshot::Receiver<ServerFrame>)>,
    /// Its result, when it was settled before the application asked (see
    /// `settle_pipeline`).
    settled: Option<Result<SendReceipt, ClientError>>,
}

impl InFlight {
    /// Whether it needs no writing on connection `generation`: written on
    /// it, or settled.
    fn current(&self, generation: u64) -> bool {
        self.settled.is_some()
            || self
                .answer
                .as_ref()
                .is_some_and(|(written_on, _)| *written_on == generation)
    }
}

/// One TCP connection, served by its task.
struct Conn {
    requests: mpsc::Sender<Request>,
    pushes: mpsc::Receiver<Queued>,
    /// Login answers its task has read (see [`Queued`]).
    logins: Arc<AtomicU64>,
    /// Messages the task queued that the client has not returned yet.
    unreturned: Unreturned,
    /// Why the connection ended, set once by its task.
    closed: Arc<OnceLock<Closed>>,
    info: ServerInfo,
    task: TaskGuard,
}

/// The connection task, aborted when its connection is dropped.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request for the connection task: a frame to write, and who waits for
/// the answer.
struct Request {
    id: RequestId,
    frame: ClientFrame,
    reply: oneshot::Sender<ServerFrame>,
}

/// How a connection ended.
#[derive(Debug, Clone)]
struct Closed {
    why: String,
    /// The server's reason, if it closed the connection on purpose.
    goodbye: Option<(ErrorCode, String)>,
}

impl std::fmt::Debug for SocketClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketClient")
            .field("state", &self.state)
            .field("server", &self.conn.info.server)
            .finish_non_exhaustive()
    }
}

fn connection_error(err: impl std::fmt::Display) -> ClientError {
    ClientError::Connection(err.to_string())
}

impl SocketClient {
    /// Connects, performs the version handshake, and starts the connection
    /// task.
    pub async fn connect(addr: impl ToSocketAddrs + ToString) -> Result<Self, ClientError> {
        Self::connect_with(addr, None).await
    }

    /// [`SocketClient::connect`] over TLS: the server's certificate must be
    /// trusted by `tls` and name the host of `addr` (or the name `tls` was
    /// given). Reconnects use TLS too.
    pub async fn connect_tls(
        addr: impl ToSocketAddrs + ToString,
        tls: ClientTls,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, Some(tls)).await
    }

    /// [`SocketClient::connect_tls`] when `tls` is given, else
    /// [`SocketClient::connect`].
    pub async fn connect_with(
        addr: impl ToSocketAddrs + ToString,
        tls: Option<ClientTls>,
    ) -> Result<Self, ClientError> {
        let addr = addr.to_string();
        let send_key: SendKey = rand::random();
        let conn = Conn::open(&addr, tls.as_ref(), send_key).await?;
        Ok(Self {
            addr,
            tls,
            conn,
            send_key,
            next_id: 0,
            key_spent: false,
            state: SessionState::LoggedOut,
            seen: Seen::default(),
            login_floor: 0,
            password: None,
            pipeline: VecDeque::new(),
            generation: 0,
            acks: AckBatch::default(),
        })
    }

    /// What the server announced in its welcome on the current connection.
    pub fn server_info(&self) -> &ServerInfo {
        &self.conn.info
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
            let Ok(conn) = Conn::open(&self.addr, self.tls.as_ref(), self.send_key).await else {
                continue;
            };
            self.replace_conn(conn);
            let password = self.password.clone().unwrap_or_default();
            match self.login(user.as_str(), &password).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Connection(_)) => continue,
                Err(err) if err.code() == Some(ErrorCode::AlreadyLoggedIn) => {
                    self.adopt(SessionState::LoggedIn(user.clone()));
                    continue;
                }
                // Reached the old server while it drains: the next attempt
                // finds the new one.
                Err(err) if err.code() == Some(ErrorCode::ShuttingDown) => {
                    self.adopt(SessionState::LoggedIn(user.clone()));
                    continue;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Whether a frame that could not be read was a TLS record: a TLS server
/// answers a plaintext hello with an alert (content type 21, version 3.x),
/// whose first four bytes read as an impossible frame length.
fn speaks_tls(err: &FrameError) -> bool {
    match err {
        FrameError::TooLarge { len, .. } => {
            let Ok(len) = u32::try_from(*len) else {
                return false;
            };
            let [kind, major, ..] = len.to_be_bytes();
            matches!(kind, 0x15 | 0x16) && major == 0x03
        }
        _ => false,
    }
}

/// A connected stream that splits into halves the connection task reads
/// and writes independently.
trait Split: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    type Read: AsyncRead + Send + Unpin + 'static;
    type Write: AsyncWrite + Send + Unpin + 'static;
    fn split(self) -> (Self::Read, Self::Write);
}

impl Split for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Split for chat_tls::client::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl Conn {
    async fn open(
        addr: &str,
        tls: Option<&ClientTls>,
        send_key: SendKey,
    ) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(connection_error)?;
        stream.set_nodelay(true).map_err(connection_error)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(connection_error)?;
        let Some(tls) = tls else {
            return Self::start(stream, send_key).await;
        };
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tls.connect(stream, addr, chat_tls::ALPN_SOCKET),
        )
        .await
        .map_err(|_| {
            connection_error(format!(
                "no TLS handshake with the server within {HANDSHAKE_TIMEOUT:?}"
            ))
        })?
        .map_err(|err| connection_error(format!("TLS handshake with {addr} failed: {err}")))?;
        Self::start(stream, send_key).await
    }

    /// The protocol's hello on a connected stream, then the connection
    /// task.
    async fn start<S: Split>(stream: S, send_key: SendKey) -> Result<Self, ClientError> {
        let mut framed = Framed::new(stream, ClientCodec::new(DEFAULT_MAX_RESPONSE));
        framed
            .send(ClientFrame::Hello {
                highest: PROTOCOL_VERSION,
                lowest: OLDEST_VERSION,
                features: feature::IDEMPOTENT_SEND,
                send_key: Some(send_key),
            })
            .await
            .map_err(connection_error)?;
        let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next())
            .await
            .map_err(|_| {
                connection_error(format!(
                    "no welcome from the server within {HANDSHAKE_TIMEOUT:?}"
                ))
            })?;
        let info = match welcome {
            Some(Ok(ServerFrame::Welcome {
                version,
                features,
                max_frame,
                idle_timeout_ms,
                queue_limit,
                max_list,
                max_fetch,
                server,
            })) => ServerInfo {
                version,
                features,
                max_frame,
                idle_timeout: Duration::from_millis(idle_timeout_ms.into()),
                queue_limit,
                max_list,
                max_fetch,
                server,
            },
            Some(Ok(ServerFrame::Goodbye { code, message, .. })) => {
                return Err(ClientError::Server { code, message });
            }
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            Some(Err(err)) if speaks_tls(&err) => {
                return Err(connection_error(
                    "the server answered in TLS: connect with TLS (chat --tls)",
                ));
            }
            Some(Err(err)) => return Err(ClientError::Protocol(err.to_string())),
            None => {
                return Err(connection_error(
                    "the server closed the connection during the handshake",
                ));
            }
        };
        if info.features & feature::IDEMPOTENT_SEND == 0 {
            return Err(ClientError::Protocol(
                "the server did not accept idempotent sends, which this client needs".into(),
            ));
        }
        let (requests, requests_rx) = mpsc::channel(64);
        let (push_tx, pushes) = mpsc::channel(PUSH_QUEUE);
        let unreturned = Unreturned::default();
        let closed = Arc::new(OnceLock::new());
        let logins = Arc::new(AtomicU64::new(0));
        // Reading and writing are separate halves, so that a write waiting
        // for the server to make room never stops the task from reading
        // (the server may be waiting for us to read).
        let parts = framed.into_parts();
        let (read, write) = parts.io.split();
        let mut reader = FramedRead::new(read, ClientCodec::new(DEFAULT_MAX_RESPONSE));
        reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let writer = FramedWrite::new(write, ClientCodec::new(DEFAULT_MAX_RESPONSE));
        let task = TaskGuard(tokio::spawn(
            Task {
                reader,
                writer,
                waiting: HashMap::new(),
                pushes: push_tx,
                unreturned: unreturned.clone(),
                logins: Arc::clone(&logins),
                idle_timeout: info.idle_timeout,
            }
            .run(requests_rx, Arc::clone(&closed)),
        ));
        Ok(Self {
            requests,
            pushes,
            unreturned,
            closed,
            logins,
            info,
            task,
        })
    }
}

/// A push as queued for the application: with the number of login answers
/// the connection had read before it, so that a logout notice read before
/// a later login's answer is recognised as stale.
struct Queued {
    logins: u64,
    push: Push,
}

/// What woke the connection task.
enum Step {
    Request(Option<Request>),
    Room(Option<mpsc::OwnedPermit<Queued>>),
    Frame(Option<Result<ServerFrame, FrameError>>),
    Flushed(Result<(), FrameError>),
    Tick,
}

/// The connection task's state.
struct Task<R, W> {
    reader: FramedRead<R, ClientCodec>,
    writer: FramedWrite<W, ClientCodec>,
    waiting: HashMap<RequestId, oneshot::Sender<ServerFrame>>,
    pushes: mpsc::Sender<Queued>,
    unreturned: Unreturned,
    /// Login answers (DONE with a replay count) read so far.
    logins: Arc<AtomicU64>,
    idle_timeout: Duration,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Task<R, W> {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, closed: Arc<OnceLock<Closed>>) {
        let period = (self.idle_timeout / 3).max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        let mut last_heard = Instant::now();
        let mut nonce = 0u32;
        let mut goodbye = None;
        // Pushes read from the socket that wait for room in the queue, in
        // order: while there are any, the socket is read only for a call
        // that waits for its answer.
        let mut held: VecDeque<Queued> = VecDeque::new();
        // Frames fed to the writer and not yet flushed.
        let mut unflushed = false;
        let why = loop {
            let step = tokio::select! {
                request = requests.recv() => Step::Request(request),
                // In a block: select! builds every branch's future, also a
                // disabled one's, and cloning the sender costs atomics.
                permit = async { self.pushes.clone().reserve_owned().await }, if !held.is_empty() => {
                    Step::Room(permit.ok())
                }
                frame = self.reader.next(), if held.is_empty() || !self.waiting.is_empty() => Step::Frame(frame),
                flushed = SinkExt::<ClientFrame>::flush(&mut self.writer), if unflushed => Step::Flushed(flushed),
                _ = ticks.tick() => Step::Tick,
            };
            match step {
                Step::Request(None) => {
                    // The client is gone or closing: end our side and let
                    // the server finish (it logs the session out).
                    let _ = SinkExt::<ClientFrame>::close(&mut self.writer).await;
                    self.drain_until_closed().await;
                    break "the client closed the connection".to_string();
                }
                Step::Request(Some(Request { id, frame, reply })) => {
                    self.waiting.insert(id, reply);
                    if let Err(err) = self.writer.feed(frame).await {
                        break format!("could not write: {err}");
                    }
                    unflushed = true;
                }
                Step::Flushed(Err(err)) => break format!("could not write: {err}"),
                Step::Flushed(Ok(())) => unflushed = false,
                Step::Room(None) => break "the client stopped".to_string(),
                Step::Room(Some(permit)) => {
                    if let Some(push) = held.pop_front() {
                        permit.send(push);
                    }
                    // And as many more as there is room for now.
                    while let Some(push) = held.pop_front() {
                        match self.pushes.try_send(push) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(push)) => {
                                held.push_front(push);
                                break;
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                }
                Step::Frame(None) => break "the server closed the connection".to_string(),
                Step::Frame(Some(Err(err))) => break format!("connection lost: {err}"),
                Step::Frame(Some(Ok(frame))) => {
                    last_heard = Instant::now();
                    if let Some(push) = self.route(frame) {
                        if let Push::Goodbye { code, message } = &push {
                            goodbye = Some((*code, message.clone()));
                        }
                        let push = Queued {
                            logins: self.logins.load(Ordering::Acquire),
                            push,
                        };
                        // Straight into the queue if there is room and
                        // nothing is held before it; else held.
                        if !held.is_empty() {
                            held.push_back(push);
                        } else if let Err(mpsc::error::TrySendError::Full(push)) =
                            self.pushes.try_send(push)
                        {
                            held.push_back(push);
                        }
                    }
                }
                Step::Tick => {
                    let silent = last_heard.elapsed();
                    if silent > self.idle_timeout && held.is_empty() {
                        // The server is gone without closing (a half-open
                        // connection, where reads may block until TCP
                        // keepalive gives up): fail the waiting calls now.
                        break format!("the server was silent for {} ms", silent.as_millis());
                    }
                    nonce = nonce.wrapping_add(1);
                    if let Err(err) = self.writer.feed(ClientFrame::Ping { nonce }).await {
                        break format!("could not write: {err}");
                    }
                    unflushed = true;
                }
            }
        };
        let _ = closed.set(Closed { why, goodbye });
        // Dropping the waiters fails every call still waiting; they read
        // why from `closed`, which is set first.
    }

    /// Routes one frame: a response to its waiting call (`None`), anything
    /// else as a push for the application.
    fn route(&mut self, frame: ServerFrame) -> Option<Push> {
        let push = match frame {
            ServerFrame::Pong { .. } | ServerFrame::Welcome { .. } => return None,
            ServerFrame::PushMessage(message) => {
                self.unreturned.received(message.id);
                Push::Message(message)
            }
            ServerFrame::PushLoggedOut { reason, user } => {
                // A replay cut short by the end of its login never comes.
                self.unreturned.expect_replay(0);
                Push::LoggedOut { user, reason }
            }
            ServerFrame::Goodbye { code, message, .. }
            | ServerFrame::GoodbyeV1 { code, message } => Push::Goodbye { code, message },
            ServerFrame::Error {
                id: 0,
                code,
                message,
                ..
            } => Push::Goodbye { code, message },
            ServerFrame::Done { id, replay, .. } => {
                if let Some(replay) = replay {
                    // Before the caller hears the login's answer, so that
                    // no acknowledgement can pass the replay, and pushes
                    // read before it count as an earlier login's.
                    self.unreturned.expect_replay(replay.into());
                    self.logins.fetch_add(1, Ordering::AcqRel);
                }
                self.answer(id, frame);
                return None;
            }
            ServerFrame::Sent { id, .. }
            | ServerFrame::Accounts { id, .. }
            | ServerFrame::Messages { id, .. }
            | ServerFrame::Error { id, .. } => {
                self.answer(id, frame);
                return None;
            }
        };
        Some(push)
    }

    fn answer(&mut self, id: RequestId, frame: ServerFrame) {
        if let Some(waiter) = self.waiting.remove(&id) {
            let _ = waiter.send(frame);
        }
    }

    /// After our side is shut: reads until the server closes (briefly), so
    /// that a clean close is not turned into a reset.
    async fn drain_until_closed(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, self.reader.next()).await
        {
            if let Some(push) = self.route(frame) {
                let logins = self.logins.load(Ordering::Acquire);
                let _ = self.pushes.try_send(Queued { logins, push });
            }
        }
    }
}

impl SocketClient {
    /// Closes the connection gracefully: stops writing and waits (briefly)
    /// for the server to close its side, by which time the server has
    /// logged this session out.
    pub async fn close(self) {
        let Conn {
            requests, mut task, ..
        } = self.conn;
        // With its only sender gone, the task shuts our side and reads
        // until the server closes its own.
        drop(requests);
        let _ = tokio::time::timeout(Duration::from_secs(6), &mut task.0).await;
    }

    fn adopt(&mut self, state: SessionState) {
        if self.seen.follow(&state) {
            // Acknowledgements noted for another user are not this one's.
            self.acks.clear();
        }
        self.state = state;
    }

    /// Why calls on this connection fail: the server's goodbye if it closed
    /// the connection on purpose (not worth a resend, unless it was only
    /// stopping or timing out), else a connection error.
    fn closed_error(&self) -> ClientError {
        let closed = self.conn.closed.get().cloned();
        let (goodbye, why) = match closed {
            Some(closed) => (closed.goodbye, Some(closed.why)),
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

    /// Before a login or create: messages still on their way to the
    /// application were for an earlier login, and none of them may hold
    /// back this one's acks. (`next_push` skips them by their login stamp;
    /// nothing is lost: they are stored, and replayed to their user at its
    /// next login.)
    fn forget_unreturned(&mut self) {
        if self.state.user().is_some() {
            // Still logged in: the server refuses the call, and the
            // messages are this user's.
            return;
        }
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
        // Pipelined sends under the old key can only be resent under it:
        // they are answered first.
        self.settle_pipeline().await;
        let key: SendKey = rand::random();
        let conn = Conn::open(&self.addr, self.tls.as_ref(), key).await?;
        // The old connection ends here, and with it its login.
        self.replace_conn(conn);
        self.send_key = key;
        self.key_spent = false;
        let Some(user) = self.state.user().cloned() else {
            return Ok(());
        };
        // Log in again on the new connection, retrying (on further new
        // connections with the same key) while the server lets go of the
        // old session.
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        let password = self.password.clone().unwrap_or_default();
        match self.login(user.as_str(), &password).await {
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

    /// Uses a new connection from now on.
    fn replace_conn(&mut self, conn: Conn) {
        self.conn = conn;
        self.login_floor = 0;
        self.generation += 1;
    }

    /// Sends one request and waits for its response, adopting the state it
    /// reports; an error response becomes `ClientError::Server`.
    async fn call(
        &mut self,
        id: RequestId,
        frame: ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let answer = self.submit(id, frame).await?;
        self.answer(answer).await
    }

    /// Hands one request to the connection task: it is written in the
    /// order of submission.
    async fn submit(
        &mut self,
        id: RequestId,
        frame: ClientFrame,
    ) -> Result<oneshot::Receiver<ServerFrame>, ClientError> {
        let (reply, answer) = oneshot::channel();
        if self
            .conn
            .requests
            .send(Request { id, frame, reply })
            .await
            .is_err()
        {
            return Err(self.closed_error());
        }
        Ok(answer)
    }

    /// Waits for a submitted request's response (see [`Self::call`]).
    async fn answer(
        &mut self,
        answer: oneshot::Receiver<ServerFrame>,
    ) -> Result<ServerFrame, ClientError> {
        // The task records why it ended before it drops the waiters.
        let reply = answer.await.map_err(|_| self.closed_error())?;
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

    /// A create or login: pushes queued for an earlier login are not shown
    /// after it, and the password is kept to log in again after a
    /// reconnect.
    async fn enter(
        &mut self,
        password: &str,
        make: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<SessionState, ClientError> {
        self.forget_unreturned();
        let state = self.simple(make).await?;
        self.login_floor = self.conn.logins.load(Ordering::Acquire);
        self.password = Some(password.to_owned());
        Ok(state)
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

impl SocketClient {
    /// Writes the pipelined sends whose connection failed again, in order,
    /// on the current connection.
    async fn resend_pipeline(&mut self) -> Result<(), ClientError> {
        for at in 0..self.pipeline.len() {
            let entry = &self.pipeline[at];
            if entry.current(self.generation) {
                continue;
            }
            let (id, frame) = (entry.id, send_frame(entry));
            let answer = self.submit(id, frame).await?;
            self.pipeline[at].answer = Some((self.generation, answer));
        }
        Ok(())
    }

    /// Waits for every pipelined send's answer and keeps them, in order,
    /// for `next_receipt`.
    async fn settle_pipeline(&mut self) {
        let mut settled = VecDeque::with_capacity(self.pipeline.len());
        while !self.pipeline.is_empty() {
            let entry = InFlight {
                id: 0,
                to: String::new(),
                body: String::new(),
                answer: None,
                settled: Some(self.next_receipt().await),
            };
            settled.push_back(entry);
        }
        self.pipeline = settled;
    }
}

fn send_frame(entry: &InFlight) -> ClientFrame {
    ClientFrame::SendOnce {
        id: entry.id,
        to: entry.to.clone(),
        body: entry.body.clone(),
    }
}

fn receipt_of(frame: ServerFrame) -> Result<SendReceipt, ClientError> {
    match frame {
        ServerFrame::Sent {
            message_id,
            timestamp_ms,
            ..
        } => Ok(SendReceipt {
            id: message_id,
            timestamp_ms,
        }),
        other => Err(unexpected(other)),
    }
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Protocol(format!("response of the wrong kind: {frame:?}"))
}

impl ChatClient for SocketClient {
    async fn create(&mut self, name: &str, password: &str) -> Result<SessionState, ClientError> {
        let (name, secret) = (name.to_owned(), password.to_owned());
        self.enter(password, |id| ClientFrame::Create {
            id,
            name,
            password: secret,
        })
        .await
    }

    async fn login(&mut self, name: &str, password: &str) -> Result<SessionState, ClientError> {
        let (name, secret) = (name.to_owned(), password.to_owned());
        self.enter(password, |id| ClientFrame::Login {
            id,
            name,
            password: secret,
        })
        .await
    }

    async fn logout(&mut self) -> Result<SessionState, ClientError> {
        // Sends made before the logout are answered first (their answers
        // carry the logged-in state), and what was noted for
        // acknowledgement goes out while the login lasts.
        self.settle_pipeline().await;
        let _ = self.flush_acks().await;
        let state = self.simple(|id| ClientFrame::Logout { id }).await?;
        self.password = None;
        Ok(state)
    }

    async fn delete(&mut self, password: &str) -> Result<SessionState, ClientError> {
        self.settle_pipeline().await;
        let password = password.to_owned();
        let state = self
            .simple(|id| ClientFrame::Delete { id, password })
            .await?;
        self.seen.reset();
        self.acks.clear();
        self.password = None;
        Ok(state)
    }

    async fn change_password(&mut self, old: &str, new: &str) -> Result<SessionState, ClientError> {
        let (old, secret) = (old.to_owned(), new.to_owned());
        let state = self
            .simple(|id| ClientFrame::ChangePassword {
                id,
                old,
                new: secret,
            })
            .await?;
        self.password = Some(new.to_owned());
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
            match self.call(id, frame).await.map_err(stopping_is_lost) {
                Ok(reply) => return receipt_of(reply),
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
        // Never past a message this client holds but has not returned yet,
        // nor while a login's replay is still arriving.
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
            let queued = match self.acks.due_at() {
                Some(due) => match tokio::time::timeout_at(due, self.conn.pushes.recv()).await {
                    Ok(queued) => queued,
                    Err(_) => {
                        // A failed acknowledgement stays batched; the
                        // connection's end reaches the caller as a push.
                        let _ = self.flush_acks().await;
                        continue;
                    }
                },
                None => self.conn.pushes.recv().await,
            };
            let Queued { logins, push } = queued?;
            // Read before the current login's answer: about an earlier
            // login (perhaps another user's), already over. Its messages
            // are stored and come again at their user's next login; their
            // ids are of another sequence, so they must not count as seen.
            if logins < self.login_floor {
                continue;
            }
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

    async fn send_pipelined(&mut self, to: &str, body: &str) -> Result<(), ClientError> {
        let mut id = self.request_id();
        if self.key_spent {
            self.renew_send_key().await?;
            id = self.request_id();
        }
        let entry = InFlight {
            id,
            to: to.to_owned(),
            body: body.to_owned(),
            answer: None,
            settled: None,
        };
        let frame = send_frame(&entry);
        // Written now only behind sends written on this connection: if an
        // earlier one waits to be written again, `next_receipt` writes them
        // all, in order (as it does after the connection fails).
        let behind_current = self
            .pipeline
            .back()
            .is_none_or(|last| last.current(self.generation));
        self.pipeline.push_back(entry);
        if behind_current
            && let Ok(answer) = self.submit(id, frame).await
            && let Some(last) = self.pipeline.back_mut()
        {
            last.answer = Some((self.generation, answer));
        }
        Ok(())
    }

    async fn next_receipt(&mut self) -> Result<SendReceipt, ClientError> {
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        loop {
            let Some(front) = self.pipeline.front_mut() else {
                return Err(ClientError::Protocol("no pipelined send in flight".into()));
            };
            if let Some(result) = front.settled.take() {
                self.pipeline.pop_front();
                return result;
            }
            let outcome = match front.answer.take() {
                Some((generation, answer)) if generation == self.generation => {
                    self.answer(answer).await
                }
                // Written on a connection that failed since.
                _ => match self.resend_pipeline().await {
                    Ok(()) => continue,
                    Err(err) => Err(err),
                },
            };
            match outcome.map_err(stopping_is_lost) {
                Err(ClientError::Connection(why)) => {
                    // Stored or not: resend the same ids on a new
                    // connection and let the server tell.
                    if let Err(err) = self.reconnect(deadline, why).await {
                        self.pipeline.pop_front();
                        return Err(err);
                    }
                }
                outcome => {
                    self.pipeline.pop_front();
                    return outcome.and_then(receipt_of);
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.pipeline.len()
    }

    fn ack_batch(&mut self) -> &mut AckBatch {
        &mut self.acks
    }
}

/// A send refused because the server is stopping was not stored, and the
/// server's next process (or another behind the same address) will take
/// it: for a send, `shutting_down` is a lost connection, to reconnect and
/// resend the same id, as after the goodbye that follows it.
fn stopping_is_lost(err: ClientError) -> ClientError {
    match err {
        ClientError::Server {
            code: ErrorCode::ShuttingDown,
            message,
        } => ClientError::Connection(message),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::Chat;

    use crate::codec::ServerCodec;

    type FakeConn = Framed<tokio::net::TcpStream, ServerCodec>;

    /// A scripted server: accepts one connection, answers the hello, and
    /// hands the connection to `script`.
    async fn fake_server<F, Fut>(script: F) -> std::net::SocketAddr
    where
        F: FnOnce(FakeConn) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut conn = Framed::new(stream, ServerCodec::new(1 << 16));
            let hello = conn.next().await.unwrap().unwrap();
            assert!(matches!(hello, ClientFrame::Hello { .. }));
            conn.send(ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                features: feature::IDEMPOTENT_SEND,
                max_frame: 8192,
                idle_timeout_ms: 45_000,
                queue_limit: 10_000,
                max_list: 1000,
                max_fetch: 256,
                server: "scripted".into(),
            })
            .await
            .unwrap();
            script(conn).await;
        });
        addr
    }

    fn alice() -> Username {
        Username::parse("alice").unwrap()
    }

    fn message(id: u64) -> Message {
        Message {
            id,
            sender: alice(),
            body: chat_core::MessageBody::parse("a message of some length").unwrap(),
            timestamp_ms: 0,
        }
    }

    /// An application that stops reading its pushes does not grow the
    /// client's memory: the client queues [`PUSH_QUEUE`] of them, then
    /// stops reading the connection (the rest wait in the kernel's buffers
    /// and the server's queue). A call made meanwhile is still answered
    /// (the client reads on while a call waits), and once the application
    /// reads again every push arrives, in order.
    #[tokio::test]
    async fn an_application_that_stops_reading_holds_a_bounded_queue() {
        const PUSHES: u64 = 3 * PUSH_QUEUE as u64;
        let addr = fake_server(|mut conn| async move {
            for id in 1..=PUSHES {
                conn.feed(ServerFrame::PushMessage(message(id)))
                    .await
                    .unwrap();
            }
            conn.flush().await.unwrap();
            // Then answer one LIST.
            match conn.next().await {
                Some(Ok(ClientFrame::List { id, .. })) => {
                    let state = SessionState::LoggedOut;
                    let names = vec![alice()];
                    conn.send(ServerFrame::Accounts { id, state, names })
                        .await
                        .unwrap();
                }
                other => panic!("{other:?}"),
            }
            // Hold the connection until the client is done.
            let _ = conn.next().await;
        })
        .await;
        let mut client = SocketClient::connect(addr).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.conn.pushes.len() < PUSH_QUEUE {
            assert!(Instant::now() < deadline, "the queue never filled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            client.conn.pushes.len(),
            PUSH_QUEUE,
            "no more than the bound is queued"
        );
        let names = tokio::time::timeout(Duration::from_secs(20), client.list("", 0))
            .await
            .expect("a call is answered while the queue is full")
            .unwrap();
        assert_eq!(names, [alice()]);
        for expected in 1..=PUSHES {
            match client.next_push().await {
                Some(Push::Message(m)) => assert_eq!(m.id, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A logout notice the application has not read when it logs in again
    /// is about the earlier login: it is not shown, and does not make the
    /// client believe the new login ended.
    #[tokio::test]
    async fn a_queued_logout_notice_does_not_end_a_later_login() {
        let addr = fake_server(|mut conn| async move {
            let logged_in = || SessionState::LoggedIn(alice());
            match conn.next().await {
                Some(Ok(ClientFrame::Create { id, .. })) => {
                    let done = ServerFrame::Done {
                        id,
                        state: logged_in(),
                        replay: Some(0),
                    };
                    conn.send(done).await.unwrap();
                }
                other => panic!("{other:?}"),
            }
            let notice = ServerFrame::PushLoggedOut {
                reason: chat_core::LogoutReason::SlowConsumer,
                user: alice(),
            };
            conn.send(notice).await.unwrap();
            match conn.next().await {
                Some(Ok(ClientFrame::Login { id, .. })) => {
                    let done = ServerFrame::Done {
                        id,
                        state: logged_in(),
                        replay: Some(0),
                    };
                    conn.feed(done).await.unwrap();
                    conn.feed(ServerFrame::PushMessage(message(7)))
                        .await
                        .unwrap();
                    conn.flush().await.unwrap();
                }
                other => panic!("{other:?}"),
            }
            let _ = conn.next().await;
        })
        .await;
        let mut client = SocketClient::connect(addr).await.unwrap();
        client.create("alice", "password1").await.unwrap();
        // The application has not read the notice; the server already
        // ended the login, so it answers this one.
        let state = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                // Only once the notice is queued does the test go on.
                if !client.conn.pushes.is_empty() {
                    break client.login("alice", "password1").await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(state, SessionState::LoggedIn(alice()));
        match client.next_push().await {
            Some(Push::Message(m)) => assert_eq!(m.id, 7),
            other => panic!("the stale notice was shown: {other:?}"),
        }
        assert_eq!(client.state(), &SessionState::LoggedIn(alice()));
    }

    /// Pushes the client read for one login, also those it held back while
    /// the application's queue was full, are never shown after the next
    /// login (here as another user, whose ids start again at 1).
    #[tokio::test]
    async fn pushes_held_for_an_earlier_login_are_not_shown_after_the_next() {
        const PUSHES: u64 = PUSH_QUEUE as u64 + 8;
        let bob = || Username::parse("bob").unwrap();
        let addr = fake_server(move |mut conn| async move {
            let answer = |id, state| ServerFrame::Done {
                id,
                state,
                replay: Some(0),
            };
            match conn.next().await {
                Some(Ok(ClientFrame::Create { id, .. })) => {
                    conn.send(answer(id, SessionState::LoggedIn(alice())))
                        .await
                        .unwrap();
                }
                other => panic!("{other:?}"),
            }
            for id in 1..=PUSHES {
                conn.feed(ServerFrame::PushMessage(message(id)))
                    .await
                    .unwrap();
            }
            conn.flush().await.unwrap();
            match conn.next().await {
                Some(Ok(ClientFrame::Logout { id })) => {
                    conn.send(answer(id, SessionState::LoggedOut))
                        .await
                        .unwrap();
                }
                other => panic!("{other:?}"),
            }
            match conn.next().await {
                Some(Ok(ClientFrame::Login { id, .. })) => {
                    conn.feed(answer(id, SessionState::LoggedIn(bob())))
                        .await
                        .unwrap();
                    let for_bob = Message {
                        body: chat_core::MessageBody::parse("for bob").unwrap(),
                        ..message(1)
                    };
                    conn.feed(ServerFrame::PushMessage(for_bob)).await.unwrap();
                    conn.flush().await.unwrap();
                }
                other => panic!("{other:?}"),
            }
            let _ = conn.next().await;
        })
        .await;
        let mut client = SocketClient::connect(addr).await.unwrap();
        client.create("alice", "password1").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.conn.pushes.len() < PUSH_QUEUE {
            assert!(Instant::now() < deadline, "the queue never filled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The logout is answered behind the pushes the client holds back.
        client.logout().await.unwrap();
        client.login("bob", "password1").await.unwrap();
        match tokio::time::timeout(Duration::from_secs(20), client.next_push()).await {
            Ok(Some(Push::Message(m))) => assert_eq!(m.body.as_str(), "for bob"),
            other => panic!("{other:?}"),
        }
    }

    /// A call that fails because the connection ended, then a close: the
    /// close completes (it used to wait on a task the call had already
    /// awaited, and panicked).
    #[tokio::test]
    async fn close_after_a_failed_call() {
        let addr = fake_server(|mut conn| async move {
            let _ = conn.next().await;
            // Close without answering.
        })
        .await;
        let mut client = SocketClient::connect(addr).await.unwrap();
        let err = client.list("", 0).await.unwrap_err();
        assert!(matches!(err, ClientError::Connection(_)), "{err}");
        tokio::time::timeout(Duration::from_secs(20), client.close())
            .await
            .expect("close completes");
    }

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
        bob.create("bob", "password1").await.unwrap();
        let mut alice = SocketClient::connect(addr).await.unwrap();
        alice.create("alice", "password1").await.unwrap();
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
