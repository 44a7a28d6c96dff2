//! Where accounts and undelivered messages live.
//!
//! The [`Store`] is the source of truth: the engine keeps only who is logged
//! in where, and asks the store for everything else. The trait is async so
//! that a durable embedded store and a shared PostgreSQL store can sit behind
//! it unchanged; [`MemoryStore`](crate::MemoryStore) is the in-memory one.
//!
//! Every message a store records gets the next id in its recipient's
//! sequence, and the server timestamp the engine chose. Ids increase
//! strictly per recipient and **never repeat for a name**, not even across
//! deleting and re-creating the account: a new account's ids start above
//! every id the store gave any account deleted before it. A client that
//! remembers ids it has seen (to drop redeliveries) or acknowledges
//! cumulatively can therefore never mistake a new account's messages for
//! an old one's. In a new store the first id is 1.
//!
//! # A message's life
//!
//! ```text
//!            append(delivered: false)          take_undelivered (fetch)
//!  send ──►  [queued] ─────────────────────────────────────┐
//!    │                                                     ▼
//!    └────►  append(delivered: true)  ───────────────► [delivered] ──ack──► gone
//!            (pushed live)                                 │
//!                                                          └─ replayed by `unacked` at the
//!                                                             recipient's next login
//! ```
//!
//! A message leaves the store only when its recipient acknowledges it, so a
//! message pushed to a connection that dies before the client saw it is
//! delivered again.

use async_trait::async_trait;
use regex::Regex;

use crate::error::ChatError;
use crate::presence::Lease;
use crate::types::{Message, MessageBody, MessageId, Username};

/// What a store can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Create: the name is taken.
    #[error("account {0} exists")]
    AccountExists(Username),
    /// The account does not exist (or was deleted).
    #[error("no account {0}")]
    NoSuchAccount(Username),
    /// The recipient's queue holds as many messages as it may.
    #[error("queue of {0} is full")]
    QueueFull(Username),
    /// The backing storage failed; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// Create: the store holds as many accounts as it may (the cap).
    #[error("the server holds its most accounts ({0})")]
    AccountLimit(usize),
    /// The send id was stored before with another recipient or body
    /// (the name is the new message's recipient).
    #[error("send id reused for a different message to {0}")]
    SendIdReused(Username),
}

impl From<StoreError> for ChatError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::AccountExists(name) => ChatError::UsernameTaken(name),
            StoreError::NoSuchAccount(name) => ChatError::NoSuchUser(name),
            StoreError::QueueFull(name) => ChatError::QueueFull(name),
            StoreError::Unavailable(why) => ChatError::StoreUnavailable(why),
            StoreError::SendIdReused(name) => ChatError::SendIdReused(name),
            StoreError::AccountLimit(max) => ChatError::AccountLimit(max),
        }
    }
}

/// What a store keeps to check a login.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The password's argon2id PHC string; `None` for an account created
    /// before passwords existed, which has to set one (see
    /// [`ChatError::PasswordNotSet`]).
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("has_password", &self.password_hash.is_some())
            .finish()
    }
}

/// A message for the store to record.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Who it is for.
    pub recipient: Username,
    /// Who sent it.
    pub sender: Username,
    /// What they wrote.
    pub body: MessageBody,
    /// Server time of acceptance, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// `true`: the engine is pushing it to the recipient's live session
    /// now, so it awaits only an acknowledgement. `false`: it waits in the
    /// queue for a fetch.
    pub delivered: bool,
    /// The sender's idempotency key, if it gave one: a second append with
    /// the same sender and key (within [`SEND_ID_RETENTION`], and among the
    /// sender's last [`MAX_SEND_IDS_PER_SENDER`]) stores nothing
    /// and returns the first one's result, if it is the same message (same
    /// recipient and body); if not, it fails with
    /// [`StoreError::SendIdReused`].
    pub send_id: Option<SendId>,
}

/// A client-chosen idempotency key for a send (16 bytes).
pub type SendId = u128;

/// How long a store remembers send ids: a client that lost its connection
/// before the reply may resend with the same id for this long and get the
/// original result.
pub const SEND_ID_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// The oldest send-id timestamp (ms since the Unix epoch) still remembered
/// at `now_ms`: every store forgets by the same horizon.
pub fn send_id_horizon(now_ms: u64) -> u64 {
    now_ms.saturating_sub(SEND_ID_RETENTION.as_millis() as u64)
}

/// How many send ids a store remembers per sender: a sender's last this
/// many are always recognised; past it, the oldest are forgotten first (a
/// resend of a forgotten id is a new send). A store may keep a few more
/// before it trims (the SQLite store up to a sixteenth more, so that it
/// trims rarely). So one user's idempotent sends cannot grow the store
/// without bound within the retention window; a client resends within
/// seconds, far inside this many sends.
pub const MAX_SEND_IDS_PER_SENDER: usize = 10_000;

/// What [`Store::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stored message (for a duplicate: its id and timestamp are the
    /// original's).
    pub message: Message,
    /// `true` if the send id was seen before and nothing new was stored.
    pub duplicate: bool,
}

/// What a store that serves one engine only answers the calls only a
/// cluster makes.
fn one_engine_only() -> StoreError {
    StoreError::Unavailable("this store serves one engine only, not a cluster".into())
}

/// Storage for accounts and per-recipient message queues.
///
/// Implementations must be safe to call concurrently from many tasks and
/// must not serialize work on different accounts behind one lock. A method
/// that returns `Ok` has made its change as durable as the store promises;
/// one that returns `Err` has changed nothing.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an account with the hash of its password (an argon2id PHC
    /// string); exactly one of several concurrent creates of one name
    /// succeeds, the others get [`StoreError::AccountExists`].
    async fn create_account(&self, name: &Username, password_hash: &str) -> Result<(), StoreError>;

    /// [`Store::create_account`] unless the store holds `max` accounts
    /// already ([`StoreError::AccountLimit`]). A store that several engines
    /// share counts and creates in one step, so creates on different
    /// engines cannot pass the cap together; the default counts, then
    /// creates (enough for engines in one process, which create one at a
    /// time under a cap).
    async fn create_account_capped(
        &self,
        name: &Username,
        password_hash: &str,
        max: usize,
    ) -> Result<(), StoreError> {
        if self.account_count().await? >= max {
            return Err(StoreError::AccountLimit(max));
        }
        self.create_account(name, password_hash).await
    }

    /// What a login checks: `None` if the account does not exist.
    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError>;

    /// Replaces the account's password hash.
    async fn set_password(&self, name: &Username, password_hash: &str) -> Result<(), StoreError>;

    /// Whether the account exists.
    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError>;

    /// Deletes the account and every message stored for it; `false` if it
    /// did not exist.
    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError>;

    /// Account names matching `pattern` (unanchored search), sorted, at
    /// most `limit` of them.
    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError>;

    /// Records a message and returns it with its id; fails with
    /// [`StoreError::QueueFull`] if the recipient already has as many
    /// messages stored (queued or awaiting acknowledgement) as allowed. A
    /// repeated send id returns the original result (see
    /// [`NewMessage::send_id`]), checked before anything else.
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError>;

    /// Up to `limit` queued messages for `name`, oldest first, now marked
    /// delivered (they stay stored until acknowledged).
    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// The id of the newest message ever stored for `name` (0 if none
    /// yet): a login on one of several engines sharing the store reads it
    /// as it starts, and is pushed only what comes after (what came before
    /// waits for a fetch, as on one engine).
    ///
    /// The default refuses: a store that only one engine uses needs neither
    /// this nor [`Store::take_undelivered_in`].
    async fn last_id(&self, name: &Username) -> Result<MessageId, StoreError> {
        let _ = name;
        Err(one_engine_only())
    }

    /// Up to `limit` queued messages for `lease.user` with ids above
    /// `after` and at most `through`, oldest first, now marked delivered.
    /// An engine sharing the store pushes a login what comes after its
    /// floor ([`Store::last_id`]), and a fetch takes what came before it,
    /// so a fetch's answer never holds an id above one still being pushed.
    /// Ids are given in commit order per recipient, so what this sees is
    /// never overtaken by a smaller id committed later.
    ///
    /// A store that keeps the leases (PostgreSQL) takes nothing unless
    /// `lease` is still the current one: a node that lost the login cannot
    /// take the user's messages. The default refuses (see
    /// [`Store::last_id`]).
    async fn take_undelivered_in(
        &self,
        lease: &Lease,
        after: MessageId,
        through: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let _ = (lease, after, through, limit);
        Err(one_engine_only())
    }

    /// Every delivered but unacknowledged message for `name`, oldest first:
    /// what a new login must see again.
    async fn unacked(&self, name: &Username) -> Result<Vec<Message>, StoreError>;

    /// Up to `limit` messages for `lease.user` with ids above `after`,
    /// oldest first, now marked delivered, whether or not they were
    /// before: what an engine sharing the store pushes to a login, `after`
    /// being the last id it pushed (the login's floor at first). A take
    /// whose answer was lost on the way is taken again. Fenced by `lease`
    /// as [`Store::take_undelivered_in`] is; the default refuses (see
    /// [`Store::last_id`]).
    async fn take_after(
        &self,
        lease: &Lease,
        after: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let _ = (lease, after, limit);
        Err(one_engine_only())
    }

    /// [`Store::ack`] for the login `lease`: a store that keeps the leases
    /// (PostgreSQL) removes nothing unless it is still the current one. The
    /// default does not check.
    async fn ack_for(&self, lease: &Lease, through: MessageId) -> Result<usize, StoreError> {
        self.ack(&lease.user, through).await
    }

    /// Removes every delivered message of `name` whose id is at most
    /// `through` (a cumulative acknowledgement; queued messages the client
    /// has not seen are kept); returns how many were removed.
    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError>;

    /// How many accounts exist (for a cap on their number; called before a
    /// create only when the engine has one).
    async fn account_count(&self) -> Result<usize, StoreError>;

    /// Most messages stored per recipient (queued or awaiting an ack);
    /// servers announce it to clients.
    fn queue_limit(&self) -> usize {
        crate::memory::DEFAULT_QUEUE_LIMIT
    }

    /// Forgets what has expired by `now_ms` (send ids older than
    /// [`SEND_ID_RETENTION`], caches of idle accounts) and returns how many
    /// entries went. The engine calls it periodically, so memory and disk
    /// do not wait for the same sender to write again; a store that
    /// prunes on its own may do nothing here.
    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        let _ = now_ms;
        Ok(0)
    }

    /// Completes when the store can no longer serve any write (its writer
    /// died), with the reason; never completes for a store that cannot
    /// fail that way. Servers turn it into health `NOT_SERVING` and an
    /// error log line.
    async fn failed(&self) -> String {
        std::future::pending().await
    }

    /// [`Store::append`] in two steps: returns as soon as the message has
    /// its place among the store's writes (its id, its order, and the send
    /// id check), with a [`Durable`] that completes once it is durable.
    /// Nothing may be acknowledged to anyone before that; meanwhile the
    /// caller can release its locks and stage the next write, so one
    /// sender's writes share a commit. Every other operation of a store
    /// that stages returns only once all writes staged before it are
    /// durable. The default appends and is durable at once.
    async fn stage(&self, message: NewMessage) -> Result<(Appended, Durable), StoreError> {
        Ok((self.append(message).await?, Durable::now()))
    }
}

/// Waits for a store's writes to become durable, up to a position.
pub trait DurableWait: Send + Sync + std::fmt::Debug {
    /// Completes once every write up to `position` is durable, or fails
    /// if the store cannot make it so.
    fn wait(
        &self,
        position: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>;

    /// What [`DurableWait::wait`] would complete with now, without
    /// waiting: `None` while `position` is not durable yet.
    fn reached(&self, position: u64) -> Option<Result<(), StoreError>>;
}

/// When a staged write is durable (see [`Store::stage`]). Cheap to clone:
/// the sender's reply and the recipient's push wait for the same one.
#[derive(Debug, Clone, Default)]
pub struct Durable(Option<(std::sync::Arc<dyn DurableWait>, u64)>);

impl Durable {
    /// Durable already.
    pub fn now() -> Self {
        Self(None)
    }

    /// Durable once `waiter` says `position` is.
    pub fn at(waiter: std::sync::Arc<dyn DurableWait>, position: u64) -> Self {
        Self(Some((waiter, position)))
    }

    /// Whether it is known to be durable without waiting.
    pub fn is_now(&self) -> bool {
        self.0.is_none()
    }

    /// Whether the write is durable now (or can never be), without
    /// waiting or allocating: for a loop that checks many at once.
    pub fn ready(&self) -> Option<Result<(), StoreError>> {
        match &self.0 {
            None => Some(Ok(())),
            Some((waiter, position)) => waiter.reached(*position),
        }
    }

    /// Completes once the write is durable.
    pub async fn wait(&self) -> Result<(), StoreError> {
        match &self.0 {
            None => Ok(()),
            Some((waiter, position)) => waiter.wait(*position).await,
        }
    }
}
