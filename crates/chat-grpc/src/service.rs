//! The `chat.v1.Chat` service: each RPC finds the session its token names,
//! calls the chat-core [`Session`](chat_core::Session) behind it, and maps
//! the result.
//!
//! A gRPC session is a chat-core session that is logged in: create and
//! login open one and return its token; logout and delete end it. A token
//! is valid only while its session is logged in: when the engine ends a
//! login on its own (a slow consumer), the next call with its token ends the
//! session and answers `unauthenticated`, as for any token the server does
//! not know.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;

use chat_core::{Chat, ChatError, Durable, ErrorCode, SessionState};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::connection::{ConnInfo, UNKNOWN_PEER, open_session, peer_of};
use crate::forward::{self, PushStream, pb_message};
use crate::pb;
use crate::pb::chat_server::Chat as ChatRpc;
use crate::sessions::{Entry, Sessions};
use crate::status::{chat_code, from_chat_error, to_status};

/// The `chat.v1.Chat` service.
#[derive(Clone)]
pub struct ChatService {
    pub(crate) chat: Chat,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) stream_grace: Duration,
    pub(crate) push_timeout: Duration,
    /// Shared, so that cloning the service for each call costs no lock of
    /// the token tree.
    pub(crate) stop: Arc<CancellationToken>,
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
        Some(token) => Ok(Some(token)),
        None => Err(to_status(
            ErrorCode::Unauthenticated,
            "authorization must be `Bearer <token>`",
        )),
    }
}

fn unknown_token() -> Status {
    to_status(
        ErrorCode::Unauthenticated,
        "unknown, malformed or ended session token",
    )
}

fn pb_state(state: &SessionState) -> Option<pb::SessionState> {
    Some(pb::SessionState {
        username: state.user().map(ToString::to_string).unwrap_or_default(),
    })
}

impl ChatService {
    /// The session a call carries a token for, if it carries one. A token
    /// that names no live session is `unauthenticated`, whatever the call.
    async fn session(&self, request: &Request<impl Sized>) -> Result<Option<Arc<Entry>>, Status> {
        let Some(token) = bearer(request)? else {
            return Ok(None);
        };
        let entry = self.sessions.find(token).ok_or_else(unknown_token)?;
        if entry.session.login_revoked() {
            // The engine ended the login (slow consumer); the token dies
            // with it.
            self.sessions.end(&entry).await;
            return Err(to_status(
                ErrorCode::Unauthenticated,
                "session ended: slow consumer",
            ));
        }
        Ok(Some(entry))
    }

    /// The session a call acts as. No token: `not_logged_in`, as on the
    /// socket transport.
    async fn authorize(&self, request: &Request<impl Sized>) -> Result<Arc<Entry>, Status> {
        self.session(request)
            .await?
            .ok_or_else(|| from_chat_error(&ChatError::NotLoggedIn))
    }

    /// Maps an engine error on a token's session. `not_logged_in` there
    /// means the engine ended the login under the token (between the token
    /// check and the call): the session ends and the token is void.
    async fn failed(&self, entry: &Entry, err: ChatError) -> Status {
        if err == ChatError::NotLoggedIn {
            self.sessions.end(entry).await;
            return unknown_token();
        }
        from_chat_error(&err)
    }

    /// Create and login: on a live session they fail as the engine says
    /// (`session_logged_in`); otherwise they open a new session.
    async fn enter(
        &self,
        request: &Request<impl Sized>,
        name: &str,
        password: &str,
        create: bool,
    ) -> Result<Response<pb::LoginReply>, Status> {
        if let Some(entry) = self.session(request).await? {
            let err = match entry.session.state().await {
                SessionState::LoggedIn(user) => ChatError::SessionLoggedIn(user),
                SessionState::LoggedOut => ChatError::NotLoggedIn,
            };
            return Err(self.failed(&entry, err).await);
        }
        // Without a known address the caller is treated as remote (never
        // trusted, limits counted together), not as an embedding app.
        let (session, events) = open_session(&self.chat, request);
        let result = if create {
            session.create(name, password).await
        } else {
            session.login(name, password).await
        };
        let state = match result {
            Ok(state) => state,
            Err(err) => {
                session.close().await;
                return Err(from_chat_error(&err));
            }
        };
        let replay = u32::try_from(session.replay_pending()).unwrap_or(u32::MAX);
        let (entry, token) = self.sessions.insert(session, events);
        self.sessions.expire_unopened(entry, self.stream_grace);
        Ok(Response::new(pb::LoginReply {
            token,
            state: pb_state(&state),
            replay,
        }))
    }

    async fn create_account_inner(
        self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let pb::CreateAccountRequest { username, password } = request.get_ref().clone();
        self.enter(&request, &username, &password, true).await
    }

    async fn login_inner(
        self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let pb::LoginRequest { username, password } = request.get_ref().clone();
        self.enter(&request, &username, &password, false).await
    }

    async fn change_password_inner(
        self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request).await?;
        let change = request.get_ref();
        let state = match entry
            .session
            .change_password(&change.old_password, &change.new_password)
            .await
        {
            Ok(state) => state,
            Err(err) => return Err(self.failed(&entry, err).await),
        };
        Ok(Response::new(pb::StateReply {
            state: pb_state(&state),
        }))
    }

    async fn logout_inner(
        self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request).await?;
        let state = match entry.session.logout().await {
            Ok(state) => state,
            Err(err) => return Err(self.failed(&entry, err).await),
        };
        self.sessions.end(&entry).await;
        Ok(Response::new(pb::StateReply {
            state: pb_state(&state),
        }))
    }

    async fn delete_account_inner(
        self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request).await?;
        let password = request.get_ref().password.clone();
        let state = match entry.session.delete(&password).await {
            Ok(state) => state,
            Err(err) => return Err(self.failed(&entry, err).await),
        };
        self.sessions.end(&entry).await;
        Ok(Response::new(pb::StateReply {
            state: pb_state(&state),
        }))
    }

    async fn send_message_inner(
        self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageReply>, Status> {
        let entry = self.authorize(&request).await?;
        let (reply, durable) = self.send_one(&entry, request.get_ref()).await?;
        durable
            .wait()
            .await
            .map_err(|err| from_chat_error(&err.into()))?;
        Ok(Response::new(reply))
    }

    /// One send as `entry`, staged (see `Session::send_staged`), for
    /// SendMessage and SendStream alike: its reply may go once the
    /// [`Durable`] completes.
    async fn send_one(
        &self,
        entry: &Entry,
        message: &pb::SendMessageRequest,
    ) -> Result<(pb::SendMessageReply, Durable), Status> {
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
        let (receipt, durable) = match entry
            .session
            .send_staged(&message.recipient, &message.body, send_id)
            .await
        {
            Ok(staged) => staged,
            Err(err) => return Err(self.failed(entry, err).await),
        };
        let reply = pb::SendMessageReply {
            state: pb_state(&entry.session.state().await),
            message_id: receipt.id,
            timestamp_ms: receipt.timestamp_ms,
        };
        Ok((reply, durable))
    }

    /// Serves one SendStream: its sends in order, each staged in the store
    /// as it is read (its place and id taken), and answered in order once
    /// its message is durable; up to [`SEND_STREAM_BUFFER`] wait for that
    /// at once, while the next are read. The work runs on its own task (as
    /// [`ChatService::detached`] does for unary calls) under one of the
    /// connection's work places, so a send read from the stream is always
    /// carried through, even if the client goes.
    async fn send_stream_inner(
        &self,
        request: Request<tonic::Streaming<pb::SendMessageRequest>>,
    ) -> Result<Response<SendResults>, Status> {
        let entry = self.authorize(&request).await?;
        let permit = match request.extensions().get::<ConnInfo>() {
            Some(info) => Some(info.work_permit().await?),
            None => None,
        };
        let span = crate::connection::span_of(&request);
        let mut sends = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(SEND_STREAM_BUFFER);
        let service = self.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let mut staged: VecDeque<(StreamItem, Durable)> = VecDeque::new();
                let mut reading = true;
                loop {
                    let step = tokio::select! {
                        next = sends.message(), if reading && staged.len() < SEND_STREAM_BUFFER => {
                            Step::Read(next)
                        }
                        durable = async {
                            match staged.front() {
                                Some((_, durable)) => durable.wait().await,
                                None => std::future::pending().await,
                            }
                        }, if !staged.is_empty() => Step::Durable(durable),
                        () = service.stop.cancelled() => Step::Stop,
                    };
                    match step {
                        Step::Read(Ok(Some(message))) => {
                            let (item, durable) = match service.send_one(&entry, &message).await {
                                Ok((reply, durable)) => (
                                    StreamItem::Answer(pb::send_result::Result::Sent(reply)),
                                    durable,
                                ),
                                Err(status) => (refused(status), Durable::now()),
                            };
                            staged.push_back((item, durable));
                        }
                        // The client ended its stream, or is gone: what is
                        // staged is still answered.
                        Step::Read(_) => reading = false,
                        Step::Durable(durable) => {
                            let Some((item, _)) = staged.pop_front() else {
                                continue;
                            };
                            let item = match durable {
                                Ok(()) => item,
                                Err(err) => refused(from_chat_error(&err.into())),
                            };
                            let last = matches!(item, StreamItem::End(_));
                            if tx.send(item.into_result()).await.is_err() || last {
                                break;
                            }
                        }
                        Step::Stop => {
                            // What is staged is stored (or fails): say which,
                            // then that the server stops.
                            for (item, durable) in staged.drain(..) {
                                let item = match durable.wait().await {
                                    Ok(()) => item,
                                    Err(err) => refused(from_chat_error(&err.into())),
                                };
                                if tx.send(item.into_result()).await.is_err() {
                                    return;
                                }
                            }
                            let _ = tx
                                .send(Err(crate::status::ending_status(
                                    ErrorCode::ShuttingDown,
                                    "the server is shutting down",
                                )))
                                .await;
                            break;
                        }
                    }
                    // Answers already durable go out without another turn.
                    while let Some(Some(Ok(()))) = staged.front().map(|(_, d)| d.ready()) {
                        let Some((item, _)) = staged.pop_front() else {
                            break;
                        };
                        let last = matches!(item, StreamItem::End(_));
                        if tx.send(item.into_result()).await.is_err() || last {
                            return;
                        }
                    }
                    if !reading && staged.is_empty() {
                        break;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_accounts_inner(
        self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsReply>, Status> {
        let session = self.session(&request).await?;
        let query = request.get_ref();
        let max = query.max as usize;
        let (names, state) = match &session {
            Some(entry) => (
                entry.session.list(&query.pattern, max).await,
                entry.session.state().await,
            ),
            None => {
                // No session to count lists on: count them per address.
                let peer = peer_of(&request).map_or(UNKNOWN_PEER, |p| p.ip());
                let names = self.chat.list_from(peer, &query.pattern, max).await;
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
        self,
        request: Request<pb::FetchMessagesRequest>,
    ) -> Result<Response<pb::FetchMessagesReply>, Status> {
        let entry = self.authorize(&request).await?;
        let messages = match entry.session.fetch(request.get_ref().max as usize).await {
            Ok(messages) => messages,
            Err(err) => return Err(self.failed(&entry, err).await),
        };
        Ok(Response::new(pb::FetchMessagesReply {
            state: pb_state(&entry.session.state().await),
            messages: messages.into_iter().map(pb_message).collect(),
        }))
    }

    async fn acknowledge_inner(
        self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        let entry = self.authorize(&request).await?;
        if let Err(err) = entry.session.ack(request.get_ref().through).await {
            return Err(self.failed(&entry, err).await);
        }
        Ok(Response::new(pb::StateReply {
            state: pb_state(&entry.session.state().await),
        }))
    }

    /// Runs an RPC's work on its own task. hyper drops a handler's future
    /// when its client disconnects; a send cut off between storing a
    /// message and pushing it, or a fetch between marking messages
    /// delivered and replying, would leave them stored as delivered but
    /// never seen. Detached, the work always completes; only the reply may
    /// be lost (and the client resends).
    ///
    /// Each connection may have at most as many calls' work running as it
    /// may have calls open ([`crate::GrpcConfig::max_streams_per_connection`]),
    /// counting work whose client has gone: a client that opens calls and
    /// cancels them at once waits for its earlier work before more starts,
    /// rather than piling up tasks.
    async fn detached<Req, Reply, Work>(
        &self,
        request: Request<Req>,
        rpc: fn(ChatService, Request<Req>) -> Work,
    ) -> Result<Response<Reply>, Status>
    where
        Work: Future<Output = Result<Response<Reply>, Status>> + Send + 'static,
        Reply: Send + 'static,
    {
        let permit = match request.extensions().get::<ConnInfo>() {
            Some(info) => Some(info.work_permit().await?),
            None => None,
        };
        let span = crate::connection::span_of(&request);
        let work = rpc(self.clone(), request);
        tokio::spawn(
            async move {
                let _permit = permit;
                work.await
            }
            .instrument(span),
        )
        .await
        .unwrap_or_else(|err| {
            Err(to_status(
                ErrorCode::Internal,
                format!("request task failed: {err}"),
            ))
        })
    }
}

/// What woke a SendStream's task.
enum Step {
    Read(Result<Option<pb::SendMessageRequest>, Status>),
    Durable(Result<(), chat_core::StoreError>),
    Stop,
}

/// One item of a SendStream's answers: a send's result, or the status that
/// ends the stream (the session is over).
enum StreamItem {
    Answer(pb::send_result::Result),
    End(Status),
}

impl StreamItem {
    fn into_result(self) -> Result<pb::SendResult, Status> {
        match self {
            StreamItem::Answer(result) => Ok(pb::SendResult {
                result: Some(result),
            }),
            StreamItem::End(status) => Err(status),
        }
    }
}

/// A refused send's answer: `unauthenticated` (the session is over) ends
/// the stream; anything else is this send's error.
fn refused(status: Status) -> StreamItem {
    if chat_code(&status) == Some(ErrorCode::Unauthenticated) {
        return StreamItem::End(status);
    }
    StreamItem::Answer(pb::send_result::Result::Error(pb::SendError {
        code: chat_code(&status)
            .unwrap_or(ErrorCode::Internal)
            .as_str()
            .to_string(),
        message: status.message().to_string(),
    }))
}

/// What a SendStream call returns.
pub type SendResults =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SendResult, Status>> + Send>>;

/// Answers buffered between a SendStream's task and its response stream:
/// the task reads the next send only once its answer is queued, so a client
/// that stops reading answers stops its own sends.
const SEND_STREAM_BUFFER: usize = 64;

#[tonic::async_trait]
impl ChatRpc for ChatService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        self.detached(request, Self::create_account_inner).await
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        self.detached(request, Self::login_inner).await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        self.detached(request, Self::logout_inner).await
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        self.detached(request, Self::delete_account_inner).await
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        self.detached(request, Self::change_password_inner).await
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageReply>, Status> {
        self.detached(request, Self::send_message_inner).await
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsReply>, Status> {
        self.detached(request, Self::list_accounts_inner).await
    }

    async fn fetch_messages(
        &self,
        request: Request<pb::FetchMessagesRequest>,
    ) -> Result<Response<pb::FetchMessagesReply>, Status> {
        self.detached(request, Self::fetch_messages_inner).await
    }

    async fn acknowledge(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::StateReply>, Status> {
        self.detached(request, Self::acknowledge_inner).await
    }

    type SendStreamStream = SendResults;

    async fn send_stream(
        &self,
        request: Request<tonic::Streaming<pb::SendMessageRequest>>,
    ) -> Result<Response<SendResults>, Status> {
        self.send_stream_inner(request).await
    }

    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<PushStream>, Status> {
        let entry = self.authorize(&request).await?;
        let events = entry.events.lock().ok().and_then(|mut e| e.take());
        let Some(events) = events else {
            return Err(to_status(
                ErrorCode::AlreadyLoggedIn,
                "this session's push stream is already open",
            ));
        };
        let user = entry
            .session
            .state()
            .await
            .user()
            .map(ToString::to_string)
            .unwrap_or_default();
        let (stream, forwarder) = forward::subscribe(
            entry.id,
            user,
            events,
            (*self.stop).clone(),
            self.push_timeout,
        );
        let sessions = Arc::clone(&self.sessions);
        let span = crate::connection::span_of(&request);
        tokio::spawn(
            async move {
                forwarder.await;
                sessions.end(&entry).await;
            }
            .instrument(span),
        );
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    /// Set when [`probe`] runs.
    static PROBED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Work that records that it ran.
    async fn probe(_: ChatService, _: Request<()>) -> Result<Response<()>, Status> {
        PROBED.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(()))
    }

    /// A connection's calls' work is bounded even after its client has
    /// gone: with all its places taken (here held by the test, as work whose
    /// caller cancelled would hold them), a new call's work does not start,
    /// although the runtime is free to run it; it runs as soon as a place is
    /// given back.
    #[tokio::test]
    async fn a_connections_work_waits_for_a_free_place() {
        let service = ChatService {
            chat: chat_core::Chat::in_memory(),
            sessions: Arc::default(),
            stream_grace: Duration::from_secs(10),
            push_timeout: Duration::from_secs(30),
            stop: Arc::default(),
        };
        let info = ConnInfo::for_tests("127.0.0.1:9".parse().unwrap(), 2);
        let held = [
            info.work_permit().await.unwrap(),
            info.work_permit().await.unwrap(),
        ];
        let mut request = Request::new(());
        request.extensions_mut().insert(info.clone());
        let mut call = Box::pin(service.detached(request, probe));
        assert!((&mut call).now_or_never().is_none());
        // Had the work been spawned, these turns would have run it.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !PROBED.load(std::sync::atomic::Ordering::SeqCst),
            "the work started although the connection's work was at its bound"
        );
        drop(held);
        call.await.expect("the call runs once a place is free");
        assert!(PROBED.load(std::sync::atomic::Ordering::SeqCst));
    }
}
