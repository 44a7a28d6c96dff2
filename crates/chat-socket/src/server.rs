//! The server adapter: accepts TCP connections and serves each one as a
//! chat-core [`Session`].
//!
//! One task per connection reads requests one at a time (so a client's
//! operations apply in the order it sent them, and replies leave in request
//! order), and in between forwards the events chat-core pushes to the
//! session. A connection ends on EOF, on a read or write error, on
//! malformed input, on a hello not completed within the handshake timeout,
//! on idle timeout, or on shutdown (the last four after a goodbye frame);
//! in every case its session is closed, which logs its user out.
//!
//! At [`ServerConfig::connections`]' limit a new connection is told goodbye
//! (`server_full`) at once, rather than left waiting in the listen backlog
//! where its client cannot tell a full server from a dead one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::metrics::{self as m, Held};
use chat_core::{
    Chat, ConnectionLimit, Durable, ErrorCode, Event, LogoutReason, Refusal, Session, StoreError,
};
use chat_tls::Acceptor;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::codec::{DEFAULT_MAX_REQUEST, ServerCodec};
use crate::frame::{
    ClientFrame, FrameError, OLDEST_VERSION, PROTOCOL_VERSION, SendKey, ServerFrame, feature,
    send_id,
};

/// Settings of the socket server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Silence after which a connection is dropped and its user logged out
    /// (default 45 s). Clients ping at a third of it.
    pub idle_timeout: Duration,
    /// Largest request payload accepted, in bytes (default 8 KiB).
    pub max_request: usize,
    /// Idle time before TCP keepalive probes start (default 30 s).
    pub tcp_keepalive: Duration,
    /// Most connections served at once, in total and per peer address
    /// (shared with the other transports of the process, when they are
    /// given a clone of it); a connection beyond it is told goodbye
    /// (`server_full`) and closed (default 50,000, 1,000 per address).
    pub connections: ConnectionLimit,
    /// How long a new connection may take to send its hello before it is
    /// told goodbye (`handshake_timeout`) and closed (default 10 s).
    pub handshake_timeout: Duration,
    /// How long shutdown waits for connections to say goodbye (default 5 s).
    pub drain_timeout: Duration,
    /// The server's name in the welcome (default `chat-socket` and this
    /// crate's version).
    pub server_name: String,
    /// Serve TLS (ALPN [`chat_tls::ALPN_SOCKET`]) instead of plaintext
    /// (default: plaintext). The TLS handshake counts against
    /// [`ServerConfig::handshake_timeout`], with the hello.
    pub tls: Option<Acceptor>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(45),
            max_request: DEFAULT_MAX_REQUEST,
            tcp_keepalive: Duration::from_secs(30),
            connections: ConnectionLimit::default(),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            server_name: concat!("chat-socket ", env!("CARGO_PKG_VERSION")).to_string(),
            tls: None,
        }
    }
}

/// Serves `chat` on `listener` until `shutdown` completes; then stops
/// accepting, tells every connection goodbye, and waits for them (at most
/// [`ServerConfig::drain_timeout`]).
pub async fn serve(
    listener: TcpListener,
    chat: Chat,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let config = Arc::new(config);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Refusing costs a task and a socket for up to a second; bound how
    // many are refused at once, and drop the rest without a word.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let accepted_total = metrics::counter!(m::CONNECTIONS_ACCEPTED, "transport" => "socket");
    let refused_total = metrics::counter!(m::CONNECTIONS_REFUSED, "transport" => "socket");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of
                // spinning, and keep serving the connections we have.
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match config.connections.try_acquire(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                refused_total.increment(1);
                debug!(%peer, ?refused, "connection refused");
                let message = match refused {
                    Refusal::Full => "the server is full; try again later",
                    Refusal::TooManyFromAddress => {
                        "too many connections from your address; close some and try again"
                    }
                };
                if let Ok(refusal) = Arc::clone(&refusals).try_acquire_owned() {
                    let tls = config.tls.clone();
                    tracker.spawn(async move {
                        let _refusal = refusal;
                        refuse(stream, tls, ErrorCode::ServerFull, message).await;
                    });
                }
                continue;
            }
        };
        accepted_total.increment(1);
        let chat = chat.clone();
        let config = Arc::clone(&config);
        let stop = stop.clone();
        // Every line this connection causes names it; `user` is filled in
        // by the engine at login.
        let span = tracing::info_span!(
            "conn",
            transport = "socket",
            %peer,
            user = tracing::field::Empty
        );
        tracker.spawn(async move {
            let _slot = slot;
            let _open = Held::new(m::CONNECTIONS, "socket");
            let accepted = Instant::now();
            if let Err(err) = configure(&stream, &config) {
                debug!(%peer, %err, "could not set socket options");
            }
            let Some(tls) = &config.tls else {
                serve_connection(stream, peer, false, accepted, chat, &config, stop).await;
                return;
            };
            // Boxed: inline, a TLS connection's larger state would make
            // every connection's task that large.
            Box::pin(async {
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(config.handshake_timeout, tls.accept(stream)) => handshake,
                () = stop.cancelled() => return,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    serve_connection(stream, peer, true, accepted, chat, &config, stop).await;
                }
                Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
                Err(_) => debug!(%peer, "no TLS handshake within the handshake timeout"),
            }
            })
            .await;
        }.instrument(span));
    }
    info!("socket server stopping");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!("some connections did not close within the drain timeout");
    }
    Ok(())
}

/// Most connections being refused (`server_full`) at once.
const MAX_REFUSALS: usize = 256;

/// Tells a connection goodbye before serving it, and closes it; over TLS
/// after the handshake, so that the client can read why. All within a
/// second.
async fn refuse(stream: TcpStream, tls: Option<Acceptor>, code: ErrorCode, message: &str) {
    let goodbye = ServerFrame::Goodbye {
        code,
        message: message.into(),
        versions: Vec::new(),
    };
    let Some(tls) = tls else {
        say_goodbye(stream, goodbye).await;
        return;
    };
    if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), tls.accept(stream)).await {
        say_goodbye(stream, goodbye).await;
    }
}

async fn say_goodbye<S: AsyncRead + AsyncWrite + Unpin>(stream: S, goodbye: ServerFrame) {
    let mut framed = Framed::new(stream, ServerCodec::new(0));
    let _ = tokio::time::timeout(Duration::from_secs(1), framed.send(goodbye)).await;
    linger(framed.into_inner()).await;
}

fn configure(stream: &TcpStream, config: &ServerConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(config.tcp_keepalive)
        .with_interval(config.tcp_keepalive / 3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Why a connection ended, for the log and the goodbye frame.
enum End {
    Eof,
    Io(io::Error),
    Goodbye(ErrorCode, String),
    /// A hello from a client that speaks only versions older than this
    /// server's: goodbye in the layout it can read.
    OldClient(u16),
    /// The peer's versions and this server's do not meet.
    NoCommonVersion(String),
}

/// Initial read buffer size per connection, bytes (tokio-util's default is
/// 8 KiB, and as much again for writing). Smaller costs CPU under load:
/// tokio-util's `FramedRead` reuses the buffer's room for each read rather
/// than growing it, so a 256-byte buffer reads a frame or two per call
/// (measured: 8.5 µs of server CPU per delivered message against 5.3 with
/// 1 KiB, socket/memory/256 pipelined).
const CONNECTION_BUFFER: usize = 1024;

/// A read buffer a burst grew past this is given back once empty (below
/// it, a busy connection keeps its buffer: giving it back after every batch
/// would make each burst grow it again, read by small read).
const SHRINK_READ_BUFFER_ABOVE: usize = 64 * 1024;

/// Most inputs handled between two flushes: replies and pushes that are
/// ready together go out in one write, but a busy connection still flushes
/// often.
const MAX_BATCH: usize = 64;

/// Most sends of one connection whose answers wait for their messages to
/// become durable: past it, the connection's next frames wait in the
/// socket.
const MAX_STAGED: usize = 64;

/// A connection's answers that wait for durability, in request order, and
/// a request that waits for them to go first.
///
/// Sends are pipelined: each is staged in the store (its place and id
/// taken, in order) and the next frame is read while it becomes durable;
/// its answer goes out once it is. Any other request runs only after the
/// answers before it have gone, as if the connection were served one
/// request at a time (a login's answer, for one, must reach the client
/// before the replay that follows it).
#[derive(Default)]
struct Staged {
    answers: std::collections::VecDeque<(ServerFrame, Durable)>,
    /// A request other than a send, read while answers wait.
    deferred: Option<ClientFrame>,
}

impl Staged {
    /// Whether the connection may read another frame now.
    fn reading(&self) -> bool {
        self.deferred.is_none() && self.answers.len() < MAX_STAGED
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    encrypted: bool,
    accepted: Instant,
    chat: Chat,
    config: &ServerConfig,
    stop: CancellationToken,
) {
    // Small initial buffers: most connections are idle most of the time,
    // and a frame larger than this just grows the buffer it arrives in.
    let mut framed = Framed::with_capacity(
        stream,
        ServerCodec::new(config.max_request),
        CONNECTION_BUFFER,
    );
    let (session, mut events) = chat.open_session_over(peer.ip(), encrypted);
    let _session = Held::new(m::SESSIONS, "socket");
    debug!(session = session.id(), "connected");
    // Until the hello, the (shorter) handshake timeout applies.
    let mut deadline = accepted + config.handshake_timeout.min(config.idle_timeout);
    let mut greeting = Greeting::default();
    // Both waits are made once, not per loop: registering a timer or a
    // cancellation waiter takes a lock shared with other connections. The
    // timer is re-armed only when it fires before the (moved) deadline; the
    // child token's lock is this connection's alone.
    let stop = stop.child_token();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let idle = tokio::time::sleep_until(deadline);
    tokio::pin!(idle);
    let mut staged = Staged::default();
    let end = loop {
        // A request that waited for the staged answers goes first once they
        // are out (the batch below may have ended just as they went).
        let deferred = if staged.answers.is_empty() {
            staged.deferred.take()
        } else {
            None
        };
        let input = if let Some(frame) = deferred {
            Input::Frame(Some(Ok(frame)))
        } else {
            tokio::select! {
                frame = framed.next(), if staged.reading() => Input::Frame(frame),
                event = events.recv() => Input::Event(event),
                durable = async {
                    match staged.answers.front() {
                        Some((_, durable)) => durable.wait().await,
                        None => std::future::pending().await,
                    }
                }, if !staged.answers.is_empty() => Input::Durable(durable),
                () = &mut idle => {
                    if Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    Input::Idle
                }
                () = &mut stopped => Input::Stop,
            }
        };
        // Whatever else is ready now is handled before one flush: a reply
        // and the pushes behind it leave in one write.
        let mut input = input;
        let mut handled = 0;
        let mut step = loop {
            let step = handle(
                input,
                &mut framed,
                &session,
                &chat,
                &mut greeting,
                &mut deadline,
                &mut staged,
                config,
            )
            .await;
            handled += 1;
            if step.is_err() || handled == MAX_BATCH {
                break step;
            }
            input = if staged.answers.is_empty()
                && let Some(frame) = staged.deferred.take()
            {
                Input::Frame(Some(Ok(frame)))
            } else if let Some(durable) = staged
                .answers
                .front()
                .and_then(|(_, durable)| durable.ready())
            {
                Input::Durable(durable)
            } else if let Some(frame) = staged
                .reading()
                .then(|| framed.next().now_or_never())
                .flatten()
            {
                Input::Frame(frame)
            } else if let Some(event) = events.recv().now_or_never() {
                Input::Event(event)
            } else {
                break step;
            };
        };
        if step.is_ok() {
            step = flush(&mut framed, config.idle_timeout).await;
        }
        if let Err(end) = step {
            break end;
        }
        // An idle connection keeps no write buffer (the next frame written
        // allocates one of its size), nor a read buffer a burst grew.
        if framed.write_buffer().is_empty() && framed.write_buffer().capacity() > 0 {
            *framed.write_buffer_mut() = bytes::BytesMut::new();
        }
        if framed.read_buffer().is_empty()
            && framed.read_buffer().capacity() > SHRINK_READ_BUFFER_ABOVE
        {
            *framed.read_buffer_mut() = bytes::BytesMut::with_capacity(CONNECTION_BUFFER);
        }
    };
    // Boxed, as the request handling is: the ending's state is not kept
    // in every connection's task while it serves.
    Box::pin(end_connection(end, framed, session, peer)).await;
}

/// Ends a connection: logs its session out, then says why (best effort).
async fn end_connection<S: AsyncRead + AsyncWrite + Unpin>(
    end: End,
    framed: Framed<S, ServerCodec>,
    session: Session,
    peer: SocketAddr,
) {
    // Log out first: the goodbye and the lingering close below may take a
    // moment, and the account must be free as soon as the peer hears why.
    session.close().await;
    match end {
        End::Eof => debug!(%peer, "closed by peer"),
        End::Io(err) => debug!(%peer, %err, "connection failed"),
        End::Goodbye(code, message) => {
            debug!(%peer, %code, %message, "closing");
            // A stop is news, not the client's error; the rest (malformed
            // frames, timeouts) are counted as gRPC counts its refusals.
            if code != ErrorCode::ShuttingDown {
                m::count_error("socket", code);
            }
            goodbye(
                framed,
                ServerFrame::Goodbye {
                    code,
                    message,
                    versions: Vec::new(),
                },
            )
            .await;
        }
        End::NoCommonVersion(message) => {
            debug!(%peer, %message, "closing: no common protocol version");
            m::count_error("socket", ErrorCode::UnsupportedVersion);
            goodbye(
                framed,
                ServerFrame::Goodbye {
                    code: ErrorCode::UnsupportedVersion,
                    message,
                    versions: supported_versions(),
                },
            )
            .await;
        }
        End::OldClient(version) => {
            debug!(%peer, version, "closing: protocol version 1 client");
            m::count_error("socket", ErrorCode::UnsupportedVersion);
            goodbye(
                framed,
                ServerFrame::GoodbyeV1 {
                    code: ErrorCode::UnsupportedVersion,
                    message: format!(
                        "this server speaks protocol version {}, not {version}; upgrade the client",
                        spoken_versions()
                    ),
                },
            )
            .await;
        }
    }
}

/// The versions this server speaks, for people: `2`, or `2 to 3`.
fn spoken_versions() -> String {
    if OLDEST_VERSION == PROTOCOL_VERSION {
        PROTOCOL_VERSION.to_string()
    } else {
        format!("{OLDEST_VERSION} to {PROTOCOL_VERSION}")
    }
}

/// The protocol versions this server speaks, oldest first.
fn supported_versions() -> Vec<u16> {
    (OLDEST_VERSION..=PROTOCOL_VERSION).collect()
}

/// Sends a last frame and closes. Best effort, and bounded: the peer may
/// be gone already, or not reading.
async fn goodbye<S: AsyncRead + AsyncWrite + Unpin>(
    mut framed: Framed<S, ServerCodec>,
    frame: ServerFrame,
) {
    let _ = tokio::time::timeout(Duration::from_secs(1), framed.send(frame)).await;
    linger(framed.into_inner()).await;
}

/// What woke the connection task.
enum Input {
    Frame(Option<Result<ClientFrame, FrameError>>),
    Event(Option<Event>),
    /// The first staged answer's message is durable (or cannot be).
    Durable(Result<(), StoreError>),
    Idle,
    Stop,
}

/// Handles one input; replies and pushes are queued on the connection
/// (written once the buffer fills or at the next flush).
#[allow(clippy::too_many_arguments)]
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    input: Input,
    framed: &mut Framed<S, ServerCodec>,
    session: &Session,
    chat: &Chat,
    greeting: &mut Greeting,
    deadline: &mut Instant,
    staged: &mut Staged,
    config: &ServerConfig,
) -> Result<(), End> {
    let shutting_down = || {
        End::Goodbye(
            ErrorCode::ShuttingDown,
            "the server is shutting down".into(),
        )
    };
    match input {
        Input::Frame(None) => {
            // The client is done sending: its staged sends are answered
            // before the connection ends (boxed: a rare path, kept out of
            // every connection's task).
            Box::pin(answer_staged(framed, staged, config)).await?;
            Err(End::Eof)
        }
        Input::Frame(Some(Err(FrameError::Io(err)))) => Err(End::Io(err)),
        // Only a first frame can be a version 1 client's hello; later, a
        // second hello of any layout is malformed.
        Input::Frame(Some(Err(FrameError::OldVersion(version)))) if !greeting.greeted => {
            Err(End::OldClient(version))
        }
        Input::Frame(Some(Err(FrameError::OldVersion(_)))) => Err(End::Goodbye(
            ErrorCode::Malformed,
            "hello sent twice".into(),
        )),
        Input::Frame(Some(Err(err))) => Err(End::Goodbye(err.code(), err.to_string())),
        Input::Frame(Some(Ok(frame))) => {
            *deadline = Instant::now() + config.idle_timeout;
            let send = matches!(
                frame,
                ClientFrame::Send { .. } | ClientFrame::SendOnce { .. }
            );
            if !send && !staged.answers.is_empty() {
                staged.deferred = Some(frame);
                return Ok(());
            }
            // A login's replay is not written here: the event stream yields
            // it next, under the same flow control as live pushes, and the
            // answer says how many messages it holds.
            // Boxed: the largest requests (a login hashes a password) would
            // otherwise make every idle connection's task as large.
            let (reply, durable) = Box::pin(answer(session, chat, frame, greeting, config)).await?;
            if staged.answers.is_empty() && durable.is_now() {
                return feed(framed, reply, config.idle_timeout).await;
            }
            staged.answers.push_back((reply, durable));
            Ok(())
        }
        Input::Durable(durable) => {
            let Some((reply, _)) = staged.answers.pop_front() else {
                return Ok(());
            };
            let reply = match durable {
                Ok(()) => reply,
                Err(err) => unstored(reply, err),
            };
            feed(framed, reply, config.idle_timeout).await
        }
        Input::Event(Some(Event::Message(message))) => {
            feed(
                framed,
                ServerFrame::PushMessage(message),
                config.idle_timeout,
            )
            .await
        }
        // A logout the client asked for (logout, delete) was already
        // answered; push only the ones it did not see coming.
        Input::Event(Some(Event::LoggedOut {
            reason: LogoutReason::Requested | LogoutReason::AccountDeleted,
            ..
        })) => Ok(()),
        Input::Event(Some(Event::LoggedOut { user, reason })) => {
            feed(
                framed,
                ServerFrame::PushLoggedOut { reason, user },
                config.idle_timeout,
            )
            .await
        }
        Input::Event(Some(Event::Shutdown) | None) | Input::Stop => Err(shutting_down()),
        Input::Idle if !greeting.greeted => Err(End::Goodbye(
            ErrorCode::HandshakeTimeout,
            format!(
                "no hello within {} ms",
                config
                    .handshake_timeout
                    .min(config.idle_timeout)
                    .as_millis()
            ),
        )),
        Input::Idle => Err(End::Goodbye(
            ErrorCode::IdleTimeout,
            format!("no frame for {} ms", config.idle_timeout.as_millis()),
        )),
    }
}

/// Writes every staged answer once its message is durable, in order.
async fn answer_staged<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, ServerCodec>,
    staged: &mut Staged,
    config: &ServerConfig,
) -> Result<(), End> {
    while let Some((reply, durable)) = staged.answers.pop_front() {
        let reply = match durable.wait().await {
            Ok(()) => reply,
            Err(err) => unstored(reply, err),
        };
        feed(framed, reply, config.idle_timeout).await?;
    }
    flush(framed, config.idle_timeout).await
}

/// Queues one frame. A peer that stops reading cannot stall its connection
/// (and hold its account) forever: a write that cannot make progress within
/// the idle timeout ends the connection.
async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, ServerCodec>,
    frame: ServerFrame,
    timeout: Duration,
) -> Result<(), End> {
    io_result(tokio::time::timeout(timeout, framed.feed(frame)).await)
}

/// Writes everything queued, under the same time limit.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, ServerCodec>,
    timeout: Duration,
) -> Result<(), End> {
    io_result(tokio::time::timeout(timeout, SinkExt::<ServerFrame>::flush(framed)).await)
}

fn io_result(
    result: Result<Result<(), FrameError>, tokio::time::error::Elapsed>,
) -> Result<(), End> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(FrameError::Io(err))) => Err(End::Io(err)),
        Ok(Err(err)) => Err(End::Goodbye(ErrorCode::Internal, err.to_string())),
        Err(_) => Err(End::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer stopped reading",
        ))),
    }
}

/// What the connection's hello said.
#[derive(Default)]
struct Greeting {
    greeted: bool,
    /// The key of this connection's SEND ONCE requests, if it gave one.
    send_key: Option<SendKey>,
}

/// Answers a hello: the newest version both sides speak, the offered
/// features this server has, and the limits that apply.
fn welcome(
    chat: &Chat,
    frame: ClientFrame,
    greeting: &mut Greeting,
    config: &ServerConfig,
) -> Result<ServerFrame, End> {
    let ClientFrame::Hello {
        highest,
        lowest,
        features,
        send_key,
    } = frame
    else {
        return Err(End::Goodbye(
            ErrorCode::HandshakeRequired,
            "the first frame must be a hello".into(),
        ));
    };
    let version = highest.min(PROTOCOL_VERSION);
    if lowest > highest || version < lowest.max(OLDEST_VERSION) {
        return Err(End::NoCommonVersion(format!(
            "this server speaks protocol version {}, the client {lowest} to {highest}",
            spoken_versions()
        )));
    }
    let features = features & feature::ALL;
    if features & feature::IDEMPOTENT_SEND != 0 && send_key.is_none() {
        return Err(End::Goodbye(
            ErrorCode::Malformed,
            "the idempotent_send feature needs a send key in the hello".into(),
        ));
    }
    *greeting = Greeting {
        greeted: true,
        send_key: send_key.filter(|_| features & feature::IDEMPOTENT_SEND != 0),
    };
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let engine = chat.config();
    Ok(ServerFrame::Welcome {
        version,
        features,
        max_frame: clamp(config.max_request),
        idle_timeout_ms: u32::try_from(config.idle_timeout.as_millis()).unwrap_or(u32::MAX),
        queue_limit: clamp(chat.queue_limit()),
        max_list: clamp(engine.max_list_results),
        max_fetch: clamp(engine.max_fetch_results),
        server: config.server_name.clone(),
    })
}

/// A staged send's answer when its message could not be made durable.
fn unstored(reply: ServerFrame, err: StoreError) -> ServerFrame {
    match reply {
        ServerFrame::Sent { id, state, .. } => {
            m::count_error("socket", ErrorCode::StoreUnavailable);
            ServerFrame::Error {
                id,
                state,
                code: ErrorCode::StoreUnavailable,
                message: err.to_string(),
            }
        }
        other => other,
    }
}

/// Runs one request against the session and builds its reply, with when
/// the reply may go (a send's, once its message is durable).
async fn answer(
    session: &Session,
    chat: &Chat,
    frame: ClientFrame,
    greeting: &mut Greeting,
    config: &ServerConfig,
) -> Result<(ServerFrame, Durable), End> {
    if !greeting.greeted {
        return Ok((welcome(chat, frame, greeting, config)?, Durable::now()));
    }
    let mut durable = Durable::now();
    let (id, result) = match frame {
        ClientFrame::Hello { .. } => {
            return Err(End::Goodbye(
                ErrorCode::Malformed,
                "hello sent twice".into(),
            ));
        }
        ClientFrame::Ping { nonce } => return Ok((ServerFrame::Pong { nonce }, Durable::now())),
        ClientFrame::Create { id, name, password } => (
            id,
            session
                .create(&name, &password)
                .await
                .map(|_| Reply::LoggedIn { replay: 0 }),
        ),
        ClientFrame::Login { id, name, password } => (
            id,
            session
                .login(&name, &password)
                .await
                .map(|_| Reply::LoggedIn {
                    replay: u32::try_from(session.replay_pending()).unwrap_or(u32::MAX),
                }),
        ),
        ClientFrame::ChangePassword { id, old, new } => (
            id,
            session
                .change_password(&old, &new)
                .await
                .map(|_| Reply::Done),
        ),
        ClientFrame::Logout { id } => (id, session.logout().await.map(|_| Reply::Done)),
        ClientFrame::Delete { id, password } => {
            (id, session.delete(&password).await.map(|_| Reply::Done))
        }
        ClientFrame::Send { id, to, body } => (
            id,
            session
                .send_staged(&to, &body, None)
                .await
                .map(staged_reply(&mut durable)),
        ),
        ClientFrame::List { id, max, pattern } => (
            id,
            session
                .list(&pattern, max as usize)
                .await
                .map(Reply::Accounts),
        ),
        ClientFrame::Fetch { id, max } => {
            (id, session.fetch(max as usize).await.map(Reply::Messages))
        }
        ClientFrame::SendOnce { id, to, body } => {
            let Some(key) = &greeting.send_key else {
                return Err(End::Goodbye(
                    ErrorCode::Malformed,
                    "SEND ONCE needs the idempotent_send feature, which this connection's \
                     hello did not offer with a send key"
                        .into(),
                ));
            };
            (
                id,
                session
                    .send_staged(&to, &body, Some(send_id(key, id)))
                    .await
                    .map(staged_reply(&mut durable)),
            )
        }
        ClientFrame::Ack { id, through } => (id, session.ack(through).await.map(|_| Reply::Done)),
    };
    let state = session.state().await;
    let reply = match result {
        Ok(Reply::Done) => ServerFrame::Done {
            id,
            state,
            replay: None,
        },
        Ok(Reply::LoggedIn { replay }) => ServerFrame::Done {
            id,
            state,
            replay: Some(replay),
        },
        Ok(Reply::Sent {
            message_id,
            timestamp_ms,
        }) => ServerFrame::Sent {
            id,
            state,
            message_id,
            timestamp_ms,
        },
        Ok(Reply::Accounts(names)) => ServerFrame::Accounts { id, state, names },
        Ok(Reply::Messages(messages)) => ServerFrame::Messages {
            id,
            state,
            messages,
        },
        Err(err) => {
            m::count_error("socket", err.code());
            ServerFrame::Error {
                id,
                state,
                code: err.code(),
                message: err.to_string(),
            }
        }
    };
    Ok((reply, durable))
}

/// A staged send's reply; when it may go is left in `durable`.
fn staged_reply(
    durable: &mut Durable,
) -> impl FnOnce((chat_core::SendReceipt, Durable)) -> Reply + '_ {
    move |(receipt, staged)| {
        *durable = staged;
        Reply::Sent {
            message_id: receipt.id,
            timestamp_ms: receipt.timestamp_ms,
        }
    }
}

enum Reply {
    Done,
    /// A create or login: how many replayed messages follow.
    LoggedIn {
        replay: u32,
    },
    Sent {
        message_id: u64,
        timestamp_ms: u64,
    },
    Accounts(Vec<chat_core::Username>),
    Messages(Vec<chat_core::Message>),
}

/// Closes our side and reads (and discards) what the peer still sends, for
/// a moment, before the socket is dropped. Closing with unread input makes
/// the kernel send a reset, which can destroy the goodbye frame before the
/// peer reads it; this lets the frame arrive.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    const MAX_DISCARD: usize = 64 * 1024;
    let _ = stream.shutdown().await;
    // On the heap: inline, this buffer would be part of every connection's
    // task, idle or not.
    let mut buf = vec![0u8; 4096];
    let mut discarded = 0;
    let deadline = Instant::now() + Duration::from_millis(500);
    while discarded < MAX_DISCARD {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}
