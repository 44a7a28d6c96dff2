//! The transport-agnostic client interface.
//!
//! Each transport's client library implements [`ChatClient`], so the
//! conformance suite, the terminal client and the benchmarks are written
//! once and run over every transport. Methods take plain strings: client
//! libraries do not second-guess the server, which checks everything (the
//! terminal client adds its own early checks for quick feedback).

use std::future::Future;

use crate::engine::LogoutReason;
use crate::error::ErrorCode;
use crate::types::{Message, MessageId, SendReceipt, SessionState, Username};

/// What a client call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request with a stable code.
    #[error("{code}: {message}")]
    Server {
        /// The stable code to branch on.
        code: ErrorCode,
        /// Human-readable detail from the server.
        message: String,
    },
    /// The connection failed or is closed.
    #[error("connection: {0}")]
    Connection(String),
    /// The server sent something this client cannot understand.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Something the server pushed to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A message delivered live.
    Message(Message),
    /// The server ended the login as `user`.
    LoggedOut {
        /// Who the session was logged in as.
        user: Username,
        /// Why.
        reason: LogoutReason,
    },
    /// The server is closing the connection.
    Goodbye {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// One connection to a chat server, over any transport.
///
/// Every call returns or updates the session state the server reported;
/// [`ChatClient::state`] is always the latest of those.
pub trait ChatClient: Send {
    /// Creates an account with `password` and logs in as it. The client
    /// keeps the password in memory while logged in, to log in again by
    /// itself after a reconnect.
    fn create(
        &mut self,
        name: &str,
        password: &str,
    ) -> impl Future<Output = Result<SessionState, ClientError>> + Send;
    /// Logs in as an existing account.
    fn login(
        &mut self,
        name: &str,
        password: &str,
    ) -> impl Future<Output = Result<SessionState, ClientError>> + Send;
    /// Logs out.
    fn logout(&mut self) -> impl Future<Output = Result<SessionState, ClientError>> + Send;
    /// Deletes the logged-in account; its password is asked again.
    fn delete(
        &mut self,
        password: &str,
    ) -> impl Future<Output = Result<SessionState, ClientError>> + Send;
    /// Replaces the logged-in account's password.
    fn change_password(
        &mut self,
        old: &str,
        new: &str,
    ) -> impl Future<Output = Result<SessionState, ClientError>> + Send;
    /// Sends a message; success means the server accepted it.
    fn send(
        &mut self,
        to: &str,
        body: &str,
    ) -> impl Future<Output = Result<SendReceipt, ClientError>> + Send;
    /// Lists account names matching `pattern` (0 = up to the server cap).
    fn list(
        &mut self,
        pattern: &str,
        max: u32,
    ) -> impl Future<Output = Result<Vec<Username>, ClientError>> + Send;
    /// Takes up to `max` queued messages, oldest first (0 = the server cap).
    /// Messages this client has already returned (live or fetched) are
    /// dropped, so each is seen once.
    fn fetch(&mut self, max: u32)
    -> impl Future<Output = Result<Vec<Message>, ClientError>> + Send;
    /// Acknowledges every message received so far with an id up to
    /// `through`, so the server deletes it and never delivers it again.
    /// Call it once the message is safely shown or stored; until then the
    /// server delivers it again at the next login.
    fn ack(&mut self, through: MessageId) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// The next pushed event; `None` once the connection is closed.
    /// Messages already returned by this client are dropped. Acknowledgements
    /// batched by [`ChatClient::ack_later`] go out from here when due.
    fn next_push(&mut self) -> impl Future<Output = Option<Push>> + Send;
    /// The session state the server last reported.
    fn state(&self) -> &SessionState;

    /// Sends a message without waiting for the server's answer: it goes
    /// out behind the sends before it, and the server stores the sends of
    /// one client in the order they were made. Returns once the send is
    /// written (or queued to be); its answer comes from
    /// [`ChatClient::next_receipt`], in the same order.
    ///
    /// Pipelined sends are idempotent like [`ChatClient::send`]: if the
    /// connection fails, the client logs in again and resends every
    /// unanswered one, in order, with its original id, so each is stored
    /// once. Keep a bounded number in flight ([`ChatClient::in_flight`]):
    /// the client holds each one's text until it is answered.
    fn send_pipelined(
        &mut self,
        to: &str,
        body: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// The answer to the oldest pipelined send not yet answered: its
    /// receipt, or why the server refused it (the sends after a refused one
    /// are answered on their own). Fails with [`ClientError::Protocol`] if
    /// no send is in flight.
    fn next_receipt(&mut self) -> impl Future<Output = Result<SendReceipt, ClientError>> + Send;
    /// How many pipelined sends await their answer.
    fn in_flight(&self) -> usize;

    /// The acknowledgements batched by [`ChatClient::ack_later`].
    fn ack_batch(&mut self) -> &mut AckBatch;
    /// Acknowledges like [`ChatClient::ack`], in a batch: the cumulative
    /// acknowledgement goes out once [`AckBatch::every`] messages were
    /// noted, or [`AckBatch::delay`] after the first of them (from
    /// [`ChatClient::next_push`], or at the next [`ChatClient::flush_acks`]),
    /// whichever is first. Until it goes out, the server delivers the noted
    /// messages again at the next login, as for any unacknowledged message.
    fn ack_later(
        &mut self,
        through: MessageId,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move {
            if self.ack_batch().note(through, tokio::time::Instant::now()) {
                self.flush_acks().await
            } else {
                Ok(())
            }
        }
    }
    /// Sends the batched acknowledgement now, if there is one. One that
    /// fails on the connection is kept, to go out with the next (one delay
    /// later); one the server refuses (the login is over) is dropped: those
    /// messages are delivered again at the next login.
    fn flush_acks(&mut self) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move {
            let Some(through) = self.ack_batch().take() else {
                return Ok(());
            };
            let result = self.ack(through).await;
            if matches!(result, Err(ClientError::Connection(_))) {
                self.ack_batch().restore(through);
            }
            result
        }
    }
}

/// Acknowledgements waiting to go out as one cumulative acknowledgement
/// (see [`ChatClient::ack_later`]).
#[derive(Debug, Clone)]
pub struct AckBatch {
    /// The highest id noted and not yet acknowledged.
    through: Option<MessageId>,
    /// Messages noted since the last acknowledgement went out.
    noted: usize,
    /// When the first of them was noted.
    since: Option<tokio::time::Instant>,
    every: usize,
    delay: std::time::Duration,
}

impl Default for AckBatch {
    fn default() -> Self {
        Self::new(Self::EVERY, Self::DELAY)
    }
}

impl AckBatch {
    /// Default batch size: one acknowledgement per this many messages.
    pub const EVERY: usize = 64;
    /// Default delay: no noted message waits longer than this for its
    /// acknowledgement to go out (while the application reads pushes).
    pub const DELAY: std::time::Duration = std::time::Duration::from_millis(50);

    /// A batch going out every `every` messages (at least 1) or `delay`
    /// after its first.
    pub fn new(every: usize, delay: std::time::Duration) -> Self {
        Self {
            through: None,
            noted: 0,
            since: None,
            every: every.max(1),
            delay,
        }
    }

    /// Messages per acknowledgement.
    pub fn every(&self) -> usize {
        self.every
    }

    /// The longest a noted message waits.
    pub fn delay(&self) -> std::time::Duration {
        self.delay
    }

    /// Notes that messages up to `through` may be acknowledged; `true` when
    /// the batch is full and should go out now.
    pub fn note(&mut self, through: MessageId, now: tokio::time::Instant) -> bool {
        self.through = self.through.max(Some(through));
        self.noted += 1;
        self.since.get_or_insert(now);
        self.noted >= self.every
    }

    /// When the batch must go out, if anything is noted.
    pub fn due_at(&self) -> Option<tokio::time::Instant> {
        self.through?;
        self.since.map(|since| since + self.delay)
    }

    /// Takes the acknowledgement to send, emptying the batch.
    pub fn take(&mut self) -> Option<MessageId> {
        self.noted = 0;
        self.since = None;
        self.through.take()
    }

    /// Puts back an acknowledgement that could not be sent, so that it goes
    /// out with the next (due one delay from now, not at once: a failing
    /// connection is not retried in a tight loop).
    pub fn restore(&mut self, through: MessageId) {
        self.through = self.through.max(Some(through));
        self.noted = self.noted.max(1);
        self.since.get_or_insert(tokio::time::Instant::now());
    }

    /// Forgets what is noted: the login it was for ended (the server
    /// replays those messages at the next login).
    pub fn clear(&mut self) {
        self.take();
    }
}

/// Remembers which message ids a client has handed to its user since
/// login, so that redelivered messages (replayed after a reconnect, or a
/// fetch racing a replay) are shown once. Ids are forgotten once
/// acknowledged (the server deletes those) or when the user changes.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    user: Option<Username>,
    ids: std::collections::BTreeSet<MessageId>,
}

impl Seen {
    /// Follows the session state: logging in as a different user starts
    /// afresh; logging out and back in as the same one does not (what was
    /// shown but not acknowledged is replayed then, and dropped here).
    /// Returns `true` when the user changed: pushes still queued for the
    /// previous user must not be shown to this one.
    pub fn follow(&mut self, state: &SessionState) -> bool {
        match state.user() {
            Some(user) if self.user.as_ref() != Some(user) => {
                self.user = Some(user.clone());
                self.ids.clear();
                true
            }
            _ => false,
        }
    }

    /// Forgets everything: the account was deleted (a new account of the
    /// same name has ids of its own, all above the old one's).
    pub fn reset(&mut self) {
        self.user = None;
        self.ids.clear();
    }

    /// `true` the first time `id` is offered, `false` after.
    pub fn first(&mut self, id: MessageId) -> bool {
        self.ids.insert(id)
    }

    /// Forgets ids up to `through`: acknowledged, they cannot come back.
    pub fn acked(&mut self, through: MessageId) {
        self.ids = self.ids.split_off(&through.saturating_add(1));
    }
}

/// Ids of messages a client library has received but not yet handed to
/// its user, shared between its connection task and the client, and how
/// many replayed messages a login announced that have not arrived yet.
///
/// A cumulative acknowledgement must stop below the smallest unreturned
/// id: the server deletes every delivered message up to the acknowledged
/// id, and these are delivered. And none may go out while a login's replay
/// is still arriving: the replayed messages are delivered ones this client
/// has not seen, and a fetch answered meanwhile can return higher ids.
#[derive(Debug, Default, Clone)]
pub struct Unreturned {
    inner: std::sync::Arc<std::sync::Mutex<UnreturnedInner>>,
}

#[derive(Debug, Default)]
struct UnreturnedInner {
    ids: std::collections::BTreeSet<MessageId>,
    /// Replayed messages announced by the last login, not yet received.
    replay_left: u64,
    /// The highest acknowledgement asked for while the replay was still
    /// arriving: sent with the next acknowledgement after it.
    deferred: Option<MessageId>,
}

impl Unreturned {
    /// A login's answer announced `count` replayed messages, which arrive
    /// next, before any live one.
    pub fn expect_replay(&self, count: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.replay_left = count;
            inner.deferred = None;
        }
    }

    /// The connection received message `id` (replayed messages come first).
    pub fn received(&self, id: MessageId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.ids.insert(id);
            inner.replay_left = inner.replay_left.saturating_sub(1);
        }
    }

    /// Message `id` was handed to the user (or dropped as a repeat).
    pub fn returned(&self, id: MessageId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.ids.remove(&id);
        }
    }

    /// Everything queued was thrown away (the user changed, or the login
    /// ended before its replay arrived).
    pub fn clear(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.ids.clear();
            inner.replay_left = 0;
            inner.deferred = None;
        }
    }

    /// How far an acknowledgement asked `through` may safely go; `None` if
    /// not at all yet. One asked while the replay is still arriving is
    /// remembered, and added to the next one asked after it.
    pub fn safe_ack(&self, through: MessageId) -> Option<MessageId> {
        let mut inner = self.inner.lock().ok()?;
        if inner.replay_left > 0 {
            inner.deferred = inner.deferred.max(Some(through));
            return None;
        }
        let through = inner.deferred.take().map_or(through, |d| d.max(through));
        let limit = match inner.ids.first() {
            Some(lowest) => through.min(lowest.saturating_sub(1)),
            None => through,
        };
        (limit > 0).then_some(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_batch_goes_out_when_full_or_due() {
        let t0 = tokio::time::Instant::now();
        let mut batch = AckBatch::new(3, std::time::Duration::from_millis(50));
        assert_eq!(batch.due_at(), None);
        assert!(!batch.note(4, t0));
        assert_eq!(
            batch.due_at(),
            Some(t0 + std::time::Duration::from_millis(50))
        );
        assert!(!batch.note(5, t0 + std::time::Duration::from_millis(10)));
        assert_eq!(
            batch.due_at(),
            Some(t0 + std::time::Duration::from_millis(50)),
            "due from the first noted message"
        );
        assert!(batch.note(6, t0), "the third message fills the batch");
        assert_eq!(batch.take(), Some(6));
        assert_eq!(batch.take(), None);
        assert_eq!(batch.due_at(), None);
        // Ids noted out of order: the batch acknowledges the highest.
        batch.note(9, t0);
        batch.note(7, t0);
        batch.restore(8);
        assert_eq!(batch.take(), Some(9));
        let before = tokio::time::Instant::now();
        batch.restore(10);
        assert!(
            batch
                .due_at()
                .is_some_and(|at| at >= before + std::time::Duration::from_millis(50)),
            "a restored acknowledgement waits one delay"
        );
        batch.clear();
        assert_eq!(batch.due_at(), None);
    }

    #[test]
    fn acks_wait_for_the_announced_replay_and_stop_below_unreturned_ids() {
        let unreturned = Unreturned::default();
        assert_eq!(unreturned.safe_ack(9), Some(9));
        unreturned.expect_replay(2);
        assert_eq!(unreturned.safe_ack(9), None, "replay still arriving");
        unreturned.received(3);
        assert_eq!(unreturned.safe_ack(9), None, "one replayed message to come");
        unreturned.received(5);
        assert_eq!(unreturned.safe_ack(9), Some(2), "below the unreturned 3");
        unreturned.returned(3);
        assert_eq!(unreturned.safe_ack(9), Some(4));
        unreturned.returned(5);
        assert_eq!(unreturned.safe_ack(9), Some(9));
        unreturned.expect_replay(1);
        unreturned.clear();
        assert_eq!(
            unreturned.safe_ack(9),
            Some(9),
            "a cleared login expects nothing"
        );
        // An acknowledgement asked during a replay goes with the next one.
        unreturned.expect_replay(1);
        assert_eq!(unreturned.safe_ack(20), None);
        unreturned.received(12);
        unreturned.returned(12);
        assert_eq!(unreturned.safe_ack(3), Some(20), "the deferred 20 is kept");
        assert_eq!(unreturned.safe_ack(3), Some(3), "and sent once");
    }
}
