//! The gRPC server adapter: each RPC authorizes its session token, calls
//! the chat-core [`Session`] behind it, and maps the result.
//!
//! A gRPC session is a chat-core session that is logged in: create and
//! login open one and return its token; logout and delete end it. Its
//! lifetime is tied to its Subscribe stream, as a socket session's is to its
//! connection: when the stream ends (the client cancelled it, or its HTTP/2
//! connection died and hyper dropped it) the user is logged out and the
//! token voided; a session whose stream is never opened expires after
//! [`GrpcConfig::stream_grace`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_core::{Chat, ChatError, ErrorCode, Event, Events, LogoutReason, Session, SessionState};
use rand::Rng;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::pb;
use crate::pb::chat_server::{Chat as ChatRpc, ChatServer};
use crate::status::{from_chat_error, to_status};

/// Settings of the gRPC server.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// How long a new session may go without opening its Subscribe stream
    /// before it is logged out (default 10 s).
    pub stream_grace: Duration,
    /// Interval of HTTP/2 keepalive pings to each client (default 20 s).
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is
    /// dropped, ending its streams (default 10 s).
    pub http2_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes start (default 30 s).
    pub tcp_keepalive: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            stream_grace: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
        }
    }
}

/// Serves `chat` over gRPC on `listener`, with `grpc.health.v1` health and
/// server reflection, until `shutdown` completes; then ends every push
/// stream with `UNAVAILABLE`/`shutting_down` and stops.
pub async fn serve(
    listener: TcpListener,
    chat: Chat,
    config: GrpcConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let stop = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChatServer<ChatService>>().await;
    // Reflection in both versions: v1 for current tools, v1alpha for the
    // many (Python's grpcio-reflection, older grpcurl) that only ask that.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let service = ChatService {
        chat,
        sessions: Arc::new(Sessions::default()),
        config: config.clone(),
        stop: stop.clone(),
    };
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            info!("grpc server stopping");
            health.set_not_serving::<ChatServer<ChatService>>().await;
            stop.cancel();
        }
    };
    let incoming = accept_loop(listener, config.tcp_keepalive);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ChatServer::new(service))
        .serve_with_incoming_shutdown(incoming, signal)
        .await
}

/// Accepted connections, configured, for tonic. The builder's TCP options
/// apply only to listeners tonic binds itself, so ours are set here: without
/// TCP_NODELAY the first reply on every connection waits ~40 ms for a
/// delayed ACK. Accept errors (out of file descriptors, a peer that reset
/// before we got to it) are logged and retried after a pause: handing an
/// error to tonic would stop the whole server.
fn accept_loop(
    listener: TcpListener,
    tcp_keepalive: Duration,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(tcp_keepalive)
        .with_interval(tcp_keepalive / 3);
    futures::stream::unfold(listener, move |listener| {
        let keepalive = keepalive.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        if let Err(err) = stream.set_nodelay(true).and_then(|()| {
                            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)
                        }) {
                            debug!(%peer, %err, "could not set socket options");
                        }
                        return Some((Ok(stream), listener));
                    }
                    Err(err) => {
                        warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    })
}

/// One logged-in gRPC session.
struct Entry {
    id: u64,
    secret: [u8; 32],
    session: Session,
    /// Taken by the Subscribe call; `None` once the stream is open.
    events: Mutex<Option<Events>>,
    ended: CancellationToken,
}

/// The token → session table.
#[derive(Default)]
struct Sessions {
    by_id: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
}

impl Sessions {
    fn insert(&self, session: Session, events: Events) -> (Arc<Entry>, String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut secret = [0u8; 32];
        rand::rng().fill(&mut secret);
        let token = format!("{id:016x}{}", hex(&secret));
        let entry = Arc::new(Entry {
            id,
            secret,
            session,
            events: Mutex::new(Some(events)),
            ended: CancellationToken::new(),
        });
        if let Ok(mut by_id) = self.by_id.lock() {
            by_id.insert(id, Arc::clone(&entry));
        }
        (entry, token)
    }

    /// The session a token names. The id part is looked up; the secret part
    /// is compared in constant time.
    fn find(&self, token: &str) -> Option<Arc<Entry>> {
        if token.len() != 16 + 64 || !token.is_ascii() {
            return None;
        }
        let id = u64::from_str_radix(&token[..16], 16).ok()?;
        let secret = unhex(&token[16..])?;
        let entry = self.by_id.lock().ok()?.get(&id).cloned()?;
        bool::from(entry.secret.ct_eq(&secret)).then_some(entry)
    }

    /// Ends a session: forgets its token and logs it out. Idempotent.
    async fn end(&self, entry: &Entry) {
        let removed = self
            .by_id
            .lock()
            .ok()
            .and_then(|mut by_id| by_id.remove(&entry.id));
        entry.ended.cancel();
        if removed.is_some() {
            entry.session.logout().await.ok();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `chat.v1.Chat` service.
#[derive(Clone)]
pub struct ChatService {
    chat: Chat,
    sessions: Arc<Sessions>,
    config: GrpcConfig,
    stop: CancellationToken,
}

fn bearer<T>(request: &Request<T>) -> Result<Option<&str>, Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        to_status(
            ErrorCode::Unauthenticated,
            "the authorization metadata is not ASCII",
        )
    })?;
    match text.strip_prefix("Bearer ") {
        Some(token) => Ok(Some(token.trim())),
        None => Err(to_status(
            ErrorCode::Unauthenticated,
            "authorization must be `Bearer <token>`",
        )),
    }
}

fn pb_state(state: &SessionState) -> Option<pb::SessionState> {
    Some(pb::SessionState {
        username: state.user().map(ToString::to_string).unwrap_or_default(),
    })
}

fn pb_message(m: chat_core::Message) -> pb::Message {
    pb::Message {
        id: m.id,
        sender: m.sender.to_string(),
        body: m.body.to_string(),
        timestamp_ms: m.timestamp_ms,
    }
}

impl ChatService {
    /// The session a call acts as. No token: `not_logged_in`, as on the
    /// socket transport; a token that names no live session:
    /// `unauthenticated`.
    fn authorize<T>(&self, request: &Request<T>) -> Result<Arc<Entry>, Status> {
        match bearer(request)? {
            None => Err(from_chat_error(&ChatError::NotLoggedIn)),
            Some(token) => self.sessions.find(token).ok_or_else(|| {
                to_status(
                    ErrorCode::Unauthenticated,
                    "unknown or expired session token",
                )
            }),
        }
    }

    /// Create and login: on a live session they fail as the engine says
    /// (`session_logged_in`); otherwise they open a new session.
    async fn enter(
        &self,
        request: &Request<impl Sized>,
        name: &str,
        create: bool,
    ) -> Result<Response<pb::LoginReply>, Status> {
        // A live token is a logged-in session (the adapter ends sessions
        // as soon as they log out), so this is the engine's
        // `session_logged_in`, answered without touching the session.
        if let Some(entry) = bearer(request)?.and_then(|token| self.sessions.find(token)) {
            let err = match entry.session.state().await {
                SessionState::LoggedIn(user) => ChatError::SessionLoggedIn(user),
                SessionState::LoggedOut => {
                    // Logged out by the engine (slow consumer) and not yet
                    // ended: end it now and let the caller try again.
                    self.sessions.end(&entry).await;
                    ChatError::NotLoggedIn
                }
            };
            return Err(from_chat_error(&err));
        }
        let (session, events) = self.chat.open_session();
        let result = if create {
            session.create(name).await
        } else {
            session.login(name).await
        };
        let state = match result {
            Ok(state) => state,
            Err(err) => {
                session.close().await;
                return Err(from_chat_error(&err));
            }
        };
        let (entry, token) = self.sessions.insert(session, events);
        let sessions = Arc::clone(&self.sessions);
        let grace = self.config.stream_grace;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {
                    let unopened = entry.events.lock().map(|e| e.is_some()).unwrap_or(true);
                    if unopened {
                        debug!(session = entry.id, "push stream never opened; session expired");
                        sessions.end(&entry).await;
                    }
                }
                _ = entry.ended.cancelled() => {}
            }
        });
        Ok(Response::new(pb::LoginReply {
            token,
            state: pb_state(&state),
        }))
    }
}

impl ChatService {
    async fn create_account_inner(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let name = request.get_ref().username.clone();
        self.enter(&request, &name, true).await
    }

    async fn login_inner(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let name = request.get_ref().username.clone();
        self.enter(&request, &name, false).await
    }

    async fn logout_inner(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request)?;
        let state = entry
            .session
            .logout()
            .await
            .map_err(|e| from_chat_error(&e))?;
        self.sessions.end(&entry).await;
        Ok(Response::new(pb::StateReply {
            state: pb_state(&state),
        }))
    }

    async fn delete_account_inner(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request)?;
        let state = entry
            .session
            .delete()
            .await
            .map_err(|e| from_chat_error(&e))?;
        self.sessions.end(&entry).await;
        Ok(Response::new(pb::StateReply {
            state: pb_state(&state),
        }))
    }

    async fn send_message_inner(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageReply>, Status> {
        let entry = self.authorize(&request)?;
        let message = request.get_ref();
        let send_id = match message.send_id.len() {
            0 => None,
            16 => message.send_id[..].try_into().ok().map(u128::from_be_bytes),
            n => {
                return Err(to_status(
                    ErrorCode::Malformed,
                    format!("send_id must be 16 bytes, not {n}"),
                ));
            }
        };
        let receipt = entry
            .session
            .send_once(&message.recipient, &message.body, send_id)
            .await
            .map_err(|e| from_chat_error(&e))?;
        Ok(Response::new(pb::SendMessageReply {
            state: pb_state(&entry.session.state().await),
            message_id: receipt.id,
            timestamp_ms: receipt.timestamp_ms,
        }))
    }

    async fn list_accounts_inner(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsReply>, Status> {
        let session = match bearer(&request)? {
            Some(token) => self.sessions.find(token),
            None => None,
        };
        let query = request.get_ref();
        let max = query.max as usize;
        let (names, state) = match &session {
            Some(entry) => (
                entry.session.list(&query.pattern, max).await,
                entry.session.state().await,
            ),
            None => {
                let names = if self.chat.is_shutting_down() {
                    Err(ChatError::ShuttingDown)
                } else {
                    self.chat.list(&query.pattern, max).await
                };
                (names, SessionState::LoggedOut)
            }
        };
        let names = names.map_err(|e| from_chat_error(&e))?;
        Ok(Response::new(pb::ListAccountsReply {
            state: pb_state(&state),
            usernames: names.into_iter().map(|n| n.to_string()).collect(),
        }))
    }

    async fn fetch_messages_inner(
        &self,
        request: Request<pb::FetchMessagesRequest>,
    ) -> Result<Response<pb::FetchMessagesReply>, Status> {
        let entry = self.authorize(&request)?;
        let messages = entry
            .session
            .fetch(request.get_ref().max as usize)
            .await
            .map_err(|e| from_chat_error(&e))?;
        Ok(Response::new(pb::FetchMessagesReply {
            state: pb_state(&entry.session.state().await),
            messages: messages.into_iter().map(pb_message).collect(),
        }))
    }

    async fn acknowledge_inner(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request)?;
        entry
            .session
            .ack(request.get_ref().through)
            .await
            .map_err(|e| from_chat_error(&e))?;
        Ok(Response::new(pb::StateReply {
            state: pb_state(&entry.session.state().await),
        }))
    }
}

/// Runs an RPC's work on its own task. hyper drops a handler's future when
/// its client disconnects; a send cut off between storing a message and
/// pushing it, or a fetch between marking messages delivered and replying,
/// would leave them stored as delivered but never seen. Detached, the work
/// always completes; only the reply may be lost (and the client resends).
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work).await.unwrap_or_else(|err| {
        Err(to_status(
            ErrorCode::Internal,
            format!("request task failed: {err}"),
        ))
    })
}

#[tonic::async_trait]
impl ChatRpc for ChatService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let this = self.clone();
        detached(async move { this.create_account_inner(request).await }).await
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let this = self.clone();
        detached(async move { this.login_inner(request).await }).await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let this = self.clone();
        detached(async move { this.logout_inner(request).await }).await
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let this = self.clone();
        detached(async move { this.delete_account_inner(request).await }).await
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageReply>, Status> {
        let this = self.clone();
        detached(async move { this.send_message_inner(request).await }).await
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsReply>, Status> {
        let this = self.clone();
        detached(async move { this.list_accounts_inner(request).await }).await
    }

    async fn fetch_messages(
        &self,
        request: Request<pb::FetchMessagesRequest>,
    ) -> Result<Response<pb::FetchMessagesReply>, Status> {
        let this = self.clone();
        detached(async move { this.fetch_messages_inner(request).await }).await
    }

    async fn acknowledge(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let this = self.clone();
        detached(async move { this.acknowledge_inner(request).await }).await
    }

    type SubscribeStream = ReceiverStream<Result<pb::Push, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let entry = self.authorize(&request)?;
        let events = entry.events.lock().ok().and_then(|mut e| e.take());
        let Some(events) = events else {
            return Err(to_status(
                ErrorCode::AlreadyLoggedIn,
                "this session's push stream is already open",
            ));
        };
        // A small buffer: the session's own event channel is the real
        // queue, and its bound is what marks a slow consumer.
        let (tx, rx) = mpsc::channel(16);
        let sessions = Arc::clone(&self.sessions);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            forward(&entry, events, tx, stop).await;
            sessions.end(&entry).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Longest a push may wait for room in a stream whose client stopped
/// reading; past it the stream (and so the session) ends. Its messages stay
/// stored and are delivered again at the next login.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one item into the stream unless the client is gone, stuck past
/// [`PUSH_TIMEOUT`], or the server is stopping; `false` ends the stream.
async fn push_into(
    tx: &mpsc::Sender<Result<pb::Push, Status>>,
    item: Result<pb::Push, Status>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        sent = tokio::time::timeout(PUSH_TIMEOUT, tx.send(item)) => matches!(sent, Ok(Ok(()))),
        _ = stop.cancelled() => false,
    }
}

/// Feeds a session's events into its stream until the session or the
/// stream ends.
async fn forward(
    entry: &Entry,
    mut events: Events,
    tx: mpsc::Sender<Result<pb::Push, Status>>,
    stop: CancellationToken,
) {
    // First the replay, then the marker that it is complete.
    for message in events.take_replay() {
        let push = pb::Push {
            event: Some(pb::push::Event::Message(pb_message(message))),
        };
        if !push_into(&tx, Ok(push), &stop).await {
            return;
        }
    }
    if !push_into(
        &tx,
        Ok(pb::Push {
            event: Some(pb::push::Event::Ready(pb::Ready {})),
        }),
        &stop,
    )
    .await
    {
        return;
    }
    loop {
        let event = tokio::select! {
            _ = tx.closed() => {
                debug!(session = entry.id, "push stream closed by the client");
                return;
            }
            _ = stop.cancelled() => {
                let shutting_down = to_status(ErrorCode::ShuttingDown, "the server is shutting down");
                // Best effort, and bounded: the client may not be reading.
                let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(shutting_down))).await;
                return;
            }
            event = events.recv() => event,
        };
        let event = match event {
            Some(Event::Message(message)) => pb::push::Event::Message(pb_message(message)),
            Some(Event::LoggedOut { user, reason }) => {
                let message = pb::Push {
                    event: Some(pb::push::Event::LoggedOut(pb::LoggedOut {
                        username: user.to_string(),
                        reason: reason.as_str().to_string(),
                    })),
                };
                if push_into(&tx, Ok(message), &stop).await && reason != LogoutReason::Requested {
                    let why = format!("session ended: {}", reason.as_str().replace('_', " "));
                    push_into(&tx, Err(to_status(ErrorCode::Unauthenticated, why)), &stop).await;
                }
                return;
            }
            Some(Event::Shutdown) | None => {
                let shutting_down =
                    to_status(ErrorCode::ShuttingDown, "the server is shutting down");
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), tx.send(Err(shutting_down))).await;
                return;
            }
        };
        if !push_into(&tx, Ok(pb::Push { event: Some(event) }), &stop).await {
            return;
        }
    }
}
