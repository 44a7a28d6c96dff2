//! The async gRPC client library.
//!
//! [`GrpcClient`] keeps the session token that create and login return,
//! sends it with every call, and opens the session's Subscribe stream right
//! after logging in (before the call returns, so no push can be missed); a
//! task turns the stream into [`Push`]es. HTTP/2 keepalive detects a dead
//! server.
//!
//! Pushes wait in a bounded queue ([`PUSH_QUEUE`] events). An application
//! that stops calling `next_push` fills it; the stream task then stops
//! reading, HTTP/2 flow control stops the server, and once the server has
//! waited its push timeout (30 s by default) it ends the session: the queue
//! then ends with a [`Push::LoggedOut`] (`slow_consumer`). Nothing is lost
//! (the messages stay stored and are replayed at the next login), and calls
//! other than the stream keep working meanwhile. Every end of a session
//! reaches the application: a `LoggedOut` push, or a [`Push::Goodbye`] when
//! the server stops or the connection is lost, after which `next_push`
//! returns `None`.
//!
//! Sends are idempotent: each carries a random 128-bit send id, and a send
//! whose connection or session failed before the reply is resent with the
//! same id after logging in again (for up to [`RECONNECT_DEADLINE`]).
//!
//! Pipelined sends ([`ChatClient::send_pipelined`]) go on one SendStream
//! call per session, opened at the first of them: the server stores them in
//! order and answers them in order. Unary calls would be served
//! concurrently, in any order, and each costs a whole HTTP/2 stream
//! (headers both ways); the stream costs one message each way per send. If
//! the stream or the session fails, the client logs in again and resends
//! the unanswered sends on a new stream, in order, with their send ids.
//! Finish them ([`ChatClient::next_receipt`]) before logging out: logout
//! and delete wait for their answers first.

use std::time::Duration;

use std::collections::VecDeque;

use chat_core::client::{AckBatch, ChatClient, ClientError, Push, Seen, Unreturned};
use chat_core::{
    ErrorCode, LogoutReason, Message, MessageBody, MessageId, SendReceipt, SessionState, Username,
};
use chat_tls::ClientTls;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pb;
use crate::pb::chat_client::ChatClient as Stub;
use crate::status::to_client_error;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a send keeps trying to log in again and resend after its
/// connection or session failed.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// How many pushed events a client holds for its application before its
/// stream task stops reading (see the module docs).
pub const PUSH_QUEUE: usize = 1024;

/// A connection to a chat server speaking gRPC.
pub struct GrpcClient {
    stub: Stub<Channel>,
    token: Option<MetadataValue<Ascii>>,
    state: SessionState,
    seen: Seen,
    /// Messages queued by the stream reader, not yet returned.
    unreturned: Unreturned,
    push_tx: mpsc::Sender<Push>,
    pushes: mpsc::Receiver<Push>,
    stream: Option<JoinHandle<()>>,
    /// Set once a goodbye was returned: the connection is over, and
    /// `next_push` returns `None` from then on.
    closed: bool,
    /// The logged-in account's password, kept in memory only to log in
    /// again after a failure; dropped at logout.
    password: Option<String>,
    /// The user this client logged in as and did not log out or delete:
    /// whom a send resends as after the session was lost, even when a
    /// failure noticed first already forgot the session.
    resume: Option<Username>,
    /// Pipelined sends awaiting their answers, oldest first.
    pipeline: VecDeque<InFlight>,
    /// The session's SendStream, once opened.
    pipe: Option<Pipe>,
    acks: AckBatch,
}

/// A pipelined send awaiting its answer.
struct InFlight {
    send_id: u128,
    /// Who sent it: after a failure the client logs in again as this user
    /// to resend it, even if another call noticed the failure first.
    user: Option<Username>,
    to: String,
    body: String,
    /// Written on the current [`Pipe`].
    written: bool,
    /// Its result, when it was settled before the application asked.
    settled: Option<Result<SendReceipt, ClientError>>,
}

impl InFlight {
    fn request(&self) -> pb::SendMessageRequest {
        pb::SendMessageRequest {
            recipient: self.to.clone(),
            body: self.body.clone(),
            send_id: self.send_id.to_be_bytes().to_vec(),
        }
    }
}

/// An open SendStream call.
struct Pipe {
    sends: mpsc::Sender<pb::SendMessageRequest>,
    answers: tonic::Streaming<pb::SendResult>,
}

/// Sends the client may have written on a SendStream ahead of the server
/// (HTTP/2 flow control bounds them too).
const PIPE_BUFFER: usize = 64;

impl std::fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClient")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Drop for GrpcClient {
    fn drop(&mut self) {
        // Ending the stream is what logs the session out on the server.
        if let Some(stream) = self.stream.take() {
            stream.abort();
        }
    }
}

fn protocol(what: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(what.to_string())
}

fn state_from(state: Option<pb::SessionState>) -> Result<SessionState, ClientError> {
    match state {
        Some(s) if !s.username.is_empty() => Username::parse(&s.username)
            .map(SessionState::LoggedIn)
            .map_err(|e| protocol(format!("server sent an invalid username: {e}"))),
        _ => Ok(SessionState::LoggedOut),
    }
}

fn message_from(m: pb::Message) -> Result<Message, ClientError> {
    Ok(Message {
        id: m.id,
        sender: Username::parse(&m.sender).map_err(|e| protocol(format!("sender: {e}")))?,
        body: MessageBody::parse(&m.body).map_err(|e| protocol(format!("body: {e}")))?,
        timestamp_ms: m.timestamp_ms,
    })
}

fn reason_from(text: &str) -> LogoutReason {
    match text {
        "account_deleted" => LogoutReason::AccountDeleted,
        "slow_consumer" => LogoutReason::SlowConsumer,
        _ => LogoutReason::Requested,
    }
}

/// A failed connection, with the error's sources: tonic's transport error
/// alone says only "transport error".
fn cannot_connect(addr: &str, err: &dyn std::error::Error) -> ClientError {
    ClientError::Connection(format!("cannot connect to {addr}: {}", causes(err)))
}

/// An error and its sources, for people.
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The channel settings both kinds of connection share.
fn endpoint(addr: &str, uri: String) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| ClientError::Connection(format!("bad address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

impl GrpcClient {
    /// Connects to `addr` (`host:port`, or a full `http://` URI).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = endpoint(addr, uri)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| cannot_connect(addr, &e))?;
        Self::start(addr, channel).await
    }

    /// [`GrpcClient::connect`] over TLS (`host:port` or an `https://`
    /// URI): the server's certificate must be trusted by `tls` and name
    /// the host of `addr` (or the name `tls` was given). The channel's
    /// reconnects use TLS too.
    pub async fn connect_tls(addr: &str, tls: ClientTls) -> Result<Self, ClientError> {
        Self::connect_with(addr, Some(tls)).await
    }

    /// [`GrpcClient::connect_tls`] when `tls` is given, else
    /// [`GrpcClient::connect`].
    pub async fn connect_with(addr: &str, tls: Option<ClientTls>) -> Result<Self, ClientError> {
        let Some(tls) = tls else {
            return Self::connect(addr).await;
        };
        // Our connector does the TLS; to tonic the channel is plain HTTP/2.
        let authority = chat_tls::authority_of(addr).to_string();
        let uri = format!("http://{authority}");
        let connector = {
            let addr = addr.to_string();
            tower::service_fn(move |_: tonic::transport::Uri| {
                let tls = tls.clone();
                let authority = authority.clone();
                let addr = addr.clone();
                async move {
                    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                    stream.set_nodelay(true)?;
                    let stream = tls.connect(stream, &addr, chat_tls::ALPN_GRPC).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            })
        };
        let channel = endpoint(addr, uri)?
            .connect_with_connector(connector)
            .await
            .map_err(|e| cannot_connect(addr, &e))?;
        Self::start(addr, channel).await
    }

    async fn start(addr: &str, channel: Channel) -> Result<Self, ClientError> {
        // One call at once: it completes the connection's handshake (the
        // server closes connections that make no call within its handshake
        // timeout), and a server that is up but not serving chat says so
        // now rather than at the first command.
        let check = HealthCheckRequest {
            service: "chat.v1.Chat".into(),
        };
        let health = HealthClient::new(channel.clone())
            .check(check)
            .await
            .map_err(|e| ClientError::Connection(format!("{addr} did not answer: {e}")))?;
        if health.into_inner().status != ServingStatus::Serving as i32 {
            return Err(ClientError::Connection(format!(
                "{addr} is not serving chat.v1.Chat"
            )));
        }
        let (push_tx, pushes) = mpsc::channel(PUSH_QUEUE);
        Ok(Self {
            stub: Stub::new(channel),
            token: None,
            state: SessionState::LoggedOut,
            seen: Seen::default(),
            unreturned: Unreturned::default(),
            push_tx,
            pushes,
            stream: None,
            closed: false,
            password: None,
            resume: None,
            pipeline: VecDeque::new(),
            pipe: None,
            acks: AckBatch::default(),
        })
    }

    /// The current session token, if logged in (for use with other gRPC
    /// tools, e.g. as `authorization: Bearer <token>`).
    pub fn token(&self) -> Option<&str> {
        self.token
            .as_ref()
            .and_then(|t| t.to_str().ok()?.strip_prefix("Bearer "))
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// Maps a failed call, forgetting a session the server no longer has.
    fn fail(&mut self, status: Status) -> ClientError {
        let err = to_client_error(&status);
        if matches!(
            err.code(),
            Some(ErrorCode::Unauthenticated | ErrorCode::NotLoggedIn)
        ) {
            self.forget_session();
        }
        err
    }

    fn adopt(&mut self, state: SessionState) {
        if self.seen.follow(&state) {
            // Acknowledgements noted for another user are not this one's.
            self.acks.clear();
        }
        self.state = state;
    }

    fn forget_session(&mut self) {
        self.token = None;
        self.state = SessionState::LoggedOut;
        self.drop_pipe();
    }

    /// The SendStream belongs to one session: its unanswered sends are to
    /// be written again on the next.
    fn drop_pipe(&mut self) {
        self.pipe = None;
        for entry in &mut self.pipeline {
            entry.written = false;
        }
    }

    /// Writes the pipelined sends not yet written, in order, opening the
    /// session's SendStream if needed.
    async fn write_pipeline(&mut self) -> Result<(), ClientError> {
        if self.pipe.is_none() {
            let (sends, outgoing) = mpsc::channel(PIPE_BUFFER);
            let request = self.request(tokio_stream::wrappers::ReceiverStream::new(outgoing));
            let answers = match self.stub.send_stream(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Err(self.fail(status)),
            };
            self.pipe = Some(Pipe { sends, answers });
        }
        for at in 0..self.pipeline.len() {
            let entry = &self.pipeline[at];
            if entry.written || entry.settled.is_some() {
                continue;
            }
            let request = entry.request();
            let Some(pipe) = &self.pipe else { break };
            if pipe.sends.send(request).await.is_err() {
                self.drop_pipe();
                return Err(ClientError::Connection("the send stream ended".into()));
            }
            self.pipeline[at].written = true;
        }
        Ok(())
    }

    /// The next answer on the SendStream.
    async fn read_answer(&mut self) -> Result<SendReceipt, ClientError> {
        let Some(pipe) = &mut self.pipe else {
            return Err(ClientError::Connection("no send stream".into()));
        };
        let answer = match pipe.answers.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => {
                self.drop_pipe();
                return Err(ClientError::Connection(
                    "the send stream ended without a reason".into(),
                ));
            }
            Err(status) => {
                self.drop_pipe();
                return Err(self.fail(status));
            }
        };
        match answer.result {
            Some(pb::send_result::Result::Sent(reply)) => {
                self.adopt(state_from(reply.state)?);
                Ok(SendReceipt {
                    id: reply.message_id,
                    timestamp_ms: reply.timestamp_ms,
                })
            }
            Some(pb::send_result::Result::Error(refused)) => Err(ClientError::Server {
                code: ErrorCode::from_name(&refused.code).unwrap_or(ErrorCode::Internal),
                message: refused.message,
            }),
            None => Err(protocol("a send answer with no result")),
        }
    }

    /// Waits for every pipelined send's answer and keeps them, in order,
    /// for `next_receipt`.
    async fn settle_pipeline(&mut self) {
        let mut settled = VecDeque::with_capacity(self.pipeline.len());
        while !self.pipeline.is_empty() {
            settled.push_back(InFlight {
                send_id: 0,
                user: None,
                to: String::new(),
                body: String::new(),
                written: true,
                settled: Some(self.next_receipt().await),
            });
        }
        self.pipeline = settled;
    }

    /// Logs in again as `user` after a failure, retrying until `deadline`
    /// (the server may be restarting, or may not have noticed the old
    /// session's end yet).
    async fn reenter(
        &mut self,
        user: &Username,
        deadline: Instant,
        cause: ClientError,
    ) -> Result<(), ClientError> {
        let mut backoff = Duration::from_millis(20);
        loop {
            if Instant::now() >= deadline {
                return Err(ClientError::Connection(format!(
                    "{cause}; no reconnect within {RECONNECT_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            self.forget_session();
            self.end_stream().await;
            let request = self.request(pb::LoginRequest {
                username: user.to_string(),
                password: self.password.clone().unwrap_or_default(),
            });
            match self.stub.login(request).await {
                Ok(reply) => match self.enter(reply.into_inner()).await {
                    Ok(_) => return Ok(()),
                    Err(ClientError::Connection(_)) => continue,
                    Err(err) => return Err(err),
                },
                Err(status) => match to_client_error(&status) {
                    ClientError::Connection(_) => continue,
                    // The old session not yet over, or the old server still
                    // draining: the next attempt finds the new one.
                    err if matches!(
                        err.code(),
                        Some(ErrorCode::AlreadyLoggedIn | ErrorCode::ShuttingDown)
                    ) =>
                    {
                        continue;
                    }
                    err => return Err(err),
                },
            }
        }
    }

    /// Before a login or create: the previous session's stream is over;
    /// stop its reader and drop what it queued (its goodbye or logout speak
    /// of the ended session, and its messages are stored and replayed to
    /// their user at its next login).
    async fn end_stream(&mut self) {
        if self.state.user().is_some() {
            // Still logged in: the server refuses the call with
            // `session_logged_in`; the live session's stream stays.
            return;
        }
        if let Some(old) = self.stream.take() {
            old.abort();
            // Wait until it has stopped: a reader in the middle of a poll
            // on another thread could otherwise queue one more push after
            // the drain below.
            let _ = old.await;
        }
        while self.pushes.try_recv().is_ok() {}
        self.unreturned.clear();
    }

    /// Adopts a new session and opens its push stream.
    async fn enter(&mut self, reply: pb::LoginReply) -> Result<SessionState, ClientError> {
        let state = state_from(reply.state)?;
        // Acknowledgements wait until the replay has arrived: the replayed
        // messages are delivered ones this client has not seen.
        self.unreturned.expect_replay(reply.replay.into());
        // A new session on a working connection: pushes flow again.
        self.closed = false;
        let token: MetadataValue<Ascii> = format!("Bearer {}", reply.token)
            .parse()
            .map_err(|_| protocol("the session token is not ASCII"))?;
        self.token = Some(token);
        self.adopt(state.clone());
        let stream = match self
            .stub
            .subscribe(self.request(pb::SubscribeRequest {}))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.fail(status)),
        };
        let pushes = self.push_tx.clone();
        self.stream = Some(tokio::spawn(read_pushes(
            stream,
            pushes,
            self.unreturned.clone(),
        )));
        Ok(state)
    }
}

/// Turns the Subscribe stream into pushes. A logout the client asked for
/// is not pushed (the call's reply said so); the stream's end after a
/// forced logout is not a goodbye (the connection is fine).
async fn read_pushes(
    mut stream: tonic::Streaming<pb::Push>,
    pushes: mpsc::Sender<Push>,
    unreturned: Unreturned,
) {
    let last = loop {
        match stream.message().await {
            Ok(Some(pb::Push {
                event: Some(pb::push::Event::Message(m)),
            })) => match message_from(m) {
                Ok(message) => {
                    unreturned.received(message.id);
                    // Waits while the application's queue is full: the
                    // stream is not read meanwhile (backpressure).
                    if pushes.send(Push::Message(message)).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    break Push::Goodbye {
                        code: ErrorCode::Malformed,
                        message: err.to_string(),
                    };
                }
            },
            Ok(Some(pb::Push {
                event: Some(pb::push::Event::LoggedOut(out)),
            })) => {
                // A replay cut short by the end of its login never comes.
                unreturned.expect_replay(0);
                let reason = reason_from(&out.reason);
                match Username::parse(&out.username) {
                    // A logout or delete the client asked for was answered
                    // by its call (only the session itself can delete its
                    // account); only the others are news.
                    Ok(user)
                        if !matches!(
                            reason,
                            LogoutReason::Requested | LogoutReason::AccountDeleted
                        ) =>
                    {
                        break Push::LoggedOut { user, reason };
                    }
                    _ => return,
                }
            }
            Ok(Some(pb::Push {
                event: None | Some(pb::push::Event::Ready(_)),
            })) => {}
            Ok(None) => {
                // A server of this version always says why a session ends;
                // an older one may not.
                break Push::Goodbye {
                    code: ErrorCode::Unauthenticated,
                    message: "the session's push stream ended without a reason".into(),
                };
            }
            Err(status) => {
                let (code, message) = match to_client_error(&status) {
                    ClientError::Server { code, message } => (code, message),
                    other => (ErrorCode::Internal, other.to_string()),
                };
                // `unauthenticated` after a logout notice was already said.
                break Push::Goodbye { code, message };
            }
        }
    };
    let _ = pushes.send(last).await;
}

impl ChatClient for GrpcClient {
    async fn create(&mut self, name: &str, password: &str) -> Result<SessionState, ClientError> {
        self.end_stream().await;
        let request = self.request(pb::CreateAccountRequest {
            username: name.to_owned(),
            password: password.to_owned(),
        });
        match self.stub.create_account(request).await {
            Ok(reply) => {
                self.password = Some(password.to_owned());
                self.resume = Username::parse(name).ok();
                self.enter(reply.into_inner()).await
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn login(&mut self, name: &str, password: &str) -> Result<SessionState, ClientError> {
        self.end_stream().await;
        let request = self.request(pb::LoginRequest {
            username: name.to_owned(),
            password: password.to_owned(),
        });
        match self.stub.login(request).await {
            Ok(reply) => {
                self.password = Some(password.to_owned());
                self.resume = Username::parse(name).ok();
                self.enter(reply.into_inner()).await
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn logout(&mut self) -> Result<SessionState, ClientError> {
        // Sends made before the logout are answered first, and what was
        // noted for acknowledgement goes out while the login lasts.
        self.settle_pipeline().await;
        let _ = self.flush_acks().await;
        match self.stub.logout(self.request(pb::LogoutRequest {})).await {
            Ok(reply) => {
                self.forget_session();
                self.password = None;
                self.resume = None;
                state_from(reply.into_inner().state)
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn delete(&mut self, password: &str) -> Result<SessionState, ClientError> {
        self.settle_pipeline().await;
        let request = self.request(pb::DeleteAccountRequest {
            password: password.to_owned(),
        });
        match self.stub.delete_account(request).await {
            Ok(reply) => {
                self.forget_session();
                self.password = None;
                self.resume = None;
                self.seen.reset();
                self.acks.clear();
                state_from(reply.into_inner().state)
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn change_password(&mut self, old: &str, new: &str) -> Result<SessionState, ClientError> {
        let request = self.request(pb::ChangePasswordRequest {
            old_password: old.to_owned(),
            new_password: new.to_owned(),
        });
        match self.stub.change_password(request).await {
            Ok(reply) => {
                self.password = Some(new.to_owned());
                let state = state_from(reply.into_inner().state)?;
                self.adopt(state.clone());
                Ok(state)
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn send(&mut self, to: &str, body: &str) -> Result<SendReceipt, ClientError> {
        let send_id: u128 = rand::random();
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        let user = self.state.user().cloned().or_else(|| self.resume.clone());
        loop {
            let request = self.request(pb::SendMessageRequest {
                recipient: to.to_owned(),
                body: body.to_owned(),
                send_id: send_id.to_be_bytes().to_vec(),
            });
            let status = match self.stub.send_message(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    self.adopt(state_from(reply.state)?);
                    return Ok(SendReceipt {
                        id: reply.message_id,
                        timestamp_ms: reply.timestamp_ms,
                    });
                }
                Err(status) => status,
            };
            let err = self.fail(status);
            // The connection failed, or the session ended under us (the
            // server restarted, or our stream died), or the server is
            // stopping: the send may or may not be stored. Log in again (to
            // the next server) and resend the same id, as pipelined sends do.
            let retry = matches!(err, ClientError::Connection(_))
                || (matches!(
                    err.code(),
                    Some(ErrorCode::Unauthenticated | ErrorCode::ShuttingDown)
                ) && user.is_some());
            match (&user, retry) {
                (Some(user), true) => self.reenter(user, deadline, err).await?,
                _ => return Err(err),
            }
        }
    }

    async fn list(&mut self, pattern: &str, max: u32) -> Result<Vec<Username>, ClientError> {
        let request = self.request(pb::ListAccountsRequest {
            pattern: pattern.to_owned(),
            max,
        });
        match self.stub.list_accounts(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                self.adopt(state_from(reply.state)?);
                reply
                    .usernames
                    .iter()
                    .map(|n| Username::parse(n).map_err(|e| protocol(format!("account name: {e}"))))
                    .collect()
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn fetch(&mut self, max: u32) -> Result<Vec<Message>, ClientError> {
        match self
            .stub
            .fetch_messages(self.request(pb::FetchMessagesRequest { max }))
            .await
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                self.adopt(state_from(reply.state)?);
                let messages = reply
                    .messages
                    .into_iter()
                    .map(message_from)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(messages
                    .into_iter()
                    .filter(|m| self.seen.first(m.id))
                    .collect())
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn ack(&mut self, through: MessageId) -> Result<(), ClientError> {
        // Never past a message this client holds but has not returned yet.
        let Some(through) = self.unreturned.safe_ack(through) else {
            return Ok(());
        };
        match self
            .stub
            .acknowledge(self.request(pb::AcknowledgeRequest { through }))
            .await
        {
            Ok(reply) => {
                self.adopt(state_from(reply.into_inner().state)?);
                self.seen.acked(through);
                Ok(())
            }
            Err(status) => Err(self.fail(status)),
        }
    }

    async fn next_push(&mut self) -> Option<Push> {
        loop {
            if self.closed {
                return None;
            }
            let push = match self.acks.due_at() {
                Some(due) => match tokio::time::timeout_at(due, self.pushes.recv()).await {
                    Ok(push) => push,
                    Err(_) => {
                        // A failed acknowledgement stays batched; a lost
                        // connection reaches the caller as a push.
                        let _ = self.flush_acks().await;
                        continue;
                    }
                },
                None => self.pushes.recv().await,
            };
            let push = push?;
            if let Push::Message(m) = &push {
                self.unreturned.returned(m.id);
            }
            match &push {
                Push::Message(m) if !self.seen.first(m.id) => continue,
                Push::LoggedOut { user, .. } if self.state.user() == Some(user) => {
                    self.forget_session()
                }
                Push::Goodbye { code, .. } => {
                    self.forget_session();
                    // The connection is over unless only the session ended.
                    self.closed = *code != ErrorCode::Unauthenticated;
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
        let user = self.state.user().cloned();
        self.pipeline.push_back(InFlight {
            send_id: rand::random(),
            user,
            to: to.to_owned(),
            body: body.to_owned(),
            written: false,
            settled: None,
        });
        // Written now behind the earlier ones; if the stream cannot be
        // opened or has failed, `next_receipt` writes them all again.
        let _ = self.write_pipeline().await;
        Ok(())
    }

    async fn next_receipt(&mut self) -> Result<SendReceipt, ClientError> {
        let deadline = Instant::now() + RECONNECT_DEADLINE;
        loop {
            let Some(front) = self.pipeline.front_mut() else {
                return Err(protocol("no pipelined send in flight"));
            };
            let user = front.user.clone();
            if let Some(result) = front.settled.take() {
                self.pipeline.pop_front();
                return result;
            }
            let outcome = if front.written {
                self.read_answer().await
            } else {
                match self.write_pipeline().await {
                    // Written now: its answer is read next time round.
                    Ok(()) => continue,
                    Err(err) => Err(err),
                }
            };
            let err = match outcome {
                Ok(receipt) => {
                    self.pipeline.pop_front();
                    return Ok(receipt);
                }
                Err(err) => err,
            };
            // The stream or the session failed: the sends may or may not be
            // stored. Log in again and resend them with the same ids.
            // A server that stops may have stored it: resend it to the next.
            let retry = matches!(err, ClientError::Connection(_))
                || (matches!(
                    err.code(),
                    Some(ErrorCode::Unauthenticated | ErrorCode::ShuttingDown)
                ) && user.is_some());
            match (&user, retry) {
                (Some(user), true) => {
                    self.drop_pipe();
                    if let Err(err) = self.reenter(user, deadline, err).await {
                        self.pipeline.pop_front();
                        return Err(err);
                    }
                }
                _ => {
                    // Refused by the server: this send only.
                    self.pipeline.pop_front();
                    return Err(err);
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
