//! The engine: the shared [`Chat`] handle, per-connection [`Session`]s and
//! their pushed [`Events`].
//!
//! # Locking
//!
//! Who is logged in where lives in a fixed table of stripes, each an async
//! mutex over the online users whose names hash to it. Every operation that
//! must be atomic with respect to one account's login state (create, login,
//! logout, delete, and the live-or-queued decision of a send) holds that
//! account's stripe, and only that one, across its store call. Sends to
//! different users therefore run in parallel unless their names share a
//! stripe (1 in [`STRIPES`]); sends to one user are ordered.
//!
//! Each session also holds its own async mutex for the length of an
//! operation, so a session's operations apply one at a time, in order. Lock
//! order is always session, then stripe; code holding a stripe never takes a
//! session lock (a recipient is logged out by a slow consumer through an
//! atomic flag instead).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use regex::RegexBuilder;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::{Hashing, HashingConfig, Password, Throttle, ThrottleConfig};
use crate::budgets::{Budget, Budgets, Draw, LocalBudgets};
use crate::delivery::Delivery;
use crate::error::{ChatError, ErrorCode};
use crate::limits::{Bucket, Rate, address_key};
use crate::memory::MemoryStore;
use crate::metrics::EngineMetrics;
use crate::presence::{Lease, LocalPresence, Presence, PresenceError};
use crate::store::{Credentials, Durable, NewMessage, SendId, Store};
use crate::types::{Message, MessageBody, MessageId, SendReceipt, SessionState, Username};

/// Number of lock stripes for login state; a power of two.
pub const STRIPES: usize = 1024;

/// Most lists running at once in one engine.
const MAX_LISTS_AT_ONCE: usize = 2;

/// Lock shards of the per-user send budgets.
const SEND_RATE_SHARDS: usize = 64;

/// Tunables of the engine. `Config::default()` is what the servers use.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pushed events a session may have waiting before it counts as a slow
    /// consumer and is logged out (its later messages are queued instead).
    pub session_event_capacity: usize,
    /// Most account names one list returns, whatever the client asks for.
    pub max_list_results: usize,
    /// Most messages one fetch returns, whatever the client asks for.
    pub max_fetch_results: usize,
    /// Longest list pattern accepted, in bytes.
    pub max_pattern_len: usize,
    /// Memory bound of one compiled list pattern, in bytes (the `regex`
    /// crate's size limits), so that no pattern can exhaust memory.
    pub max_pattern_memory: usize,
    /// The clock that stamps messages, in milliseconds since the Unix
    /// epoch (default: the system clock). A fixed clock makes a server's
    /// bytes reproducible, as the protocol document's transcript needs.
    pub clock: fn() -> u64,
    /// How fast one logged-in user may send; past it sends fail with
    /// `rate_limited` and store nothing. `None` (the default for an
    /// embedded engine): no limit. The servers set one, so that no user can
    /// push another over the slow-consumer bound or fill their queue in a
    /// burst.
    pub send_rate: Option<Rate>,
    /// How fast sessions from one peer address may create accounts; past
    /// it creates fail with `rate_limited`. `None` (the default): no limit.
    /// Sessions opened without an address ([`Chat::open_session`]) are not
    /// limited.
    pub create_rate: Option<Rate>,
    /// Most accounts the store may hold; past it creates fail with
    /// `account_limit`. `None` (the default): no cap.
    pub max_accounts: Option<usize>,
    /// How fast one session may list accounts (every list scans every
    /// name); past it lists fail with `rate_limited`. `None` (the
    /// default): no limit.
    pub list_rate: Option<Rate>,
    /// How passwords are hashed (argon2id; the default is OWASP's
    /// recommendation).
    pub hashing: HashingConfig,
    /// How failed password attempts are throttled.
    pub throttle: ThrottleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            session_event_capacity: 1024,
            max_list_results: 1000,
            max_fetch_results: 256,
            max_pattern_len: 256,
            max_pattern_memory: 1 << 20,
            clock: now_ms,
            send_rate: None,
            create_rate: None,
            max_accounts: None,
            list_rate: None,
            hashing: HashingConfig::default(),
            throttle: ThrottleConfig::default(),
        }
    }
}

/// Why a session stopped being logged in, as told in [`Event::LoggedOut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    /// The session asked to log out.
    Requested,
    /// The session deleted its account.
    AccountDeleted,
    /// The session did not read its pushed messages fast enough; what it
    /// missed waits in its queue.
    SlowConsumer,
}

impl LogoutReason {
    /// Stable name, e.g. `account_deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogoutReason::Requested => "requested",
            LogoutReason::AccountDeleted => "account_deleted",
            LogoutReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// Something the server pushes to a session without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message delivered live.
    Message(Message),
    /// The session's login as `user` ended.
    LoggedOut {
        /// Who the session was logged in as.
        user: Username,
        /// Why.
        reason: LogoutReason,
    },
    /// The server is shutting down; the transport should say goodbye and
    /// close the connection.
    Shutdown,
}

/// The engine handle: cheap to clone, one per process, shared by every
/// transport. See the crate docs for a tour.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<Inner>,
}

/// What the engines (nodes) sharing one store share besides it: see
/// [`Chat::on_node`].
#[derive(Clone)]
pub struct Cluster {
    /// Who holds each login.
    pub presence: Arc<dyn Presence>,
    /// Routes messages to the node holding their recipient's login.
    pub delivery: Arc<dyn Delivery>,
    /// Rate budgets every node draws on.
    pub budgets: Arc<dyn Budgets>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.presence.node())
            .finish_non_exhaustive()
    }
}

/// A [`Chat`] that does not keep the engine alive (see [`Chat::downgrade`]).
#[derive(Clone)]
pub struct WeakChat(std::sync::Weak<Inner>);

impl WeakChat {
    /// The engine, if it is still running.
    pub fn upgrade(&self) -> Option<Chat> {
        self.0.upgrade().map(|inner| Chat { inner })
    }
}

struct Inner {
    store: Arc<dyn Store>,
    /// Who holds each login, across every engine on the store.
    presence: Arc<dyn Presence>,
    /// Routes messages to logins held by other engines; `None`: only this
    /// engine's sessions get live pushes.
    delivery: Option<Arc<dyn Delivery>>,
    /// Recipients whose new messages the router is to announce (with a
    /// delivery, in a runtime): batched, so a burst costs one presence
    /// read and one route.
    router: Option<mpsc::UnboundedSender<Username>>,
    config: Config,
    stripes: Box<[Stripe]>,
    /// Picks a name's stripe. Seeded randomly per engine, so that names
    /// sharing a stripe (and so a lock) cannot be computed offline to make
    /// one user's traffic slow another's.
    stripe_hasher: RandomState,
    next_session: AtomicU64,
    shutdown: CancellationToken,
    /// Held across counting and creating when accounts are capped
    /// ([`Config::max_accounts`]), so concurrent creates cannot pass the
    /// cap together.
    create_gate: Mutex<()>,
    hashing: Hashing,
    throttle: Throttle,
    /// Limits per address and per account (password attempts, creates,
    /// lists without a session), shared by every node on the store.
    budgets: Arc<dyn Budgets>,
    /// Each user's sends ([`Config::send_rate`]), kept across its logins;
    /// sharded by name.
    sends: Box<[StdMutex<HashMap<Username, Bucket>>]>,
    /// Lists running at once: each scans every name, and a flood of them
    /// must not take the threads logins hash on.
    lists_running: tokio::sync::Semaphore,
    metrics: Arc<EngineMetrics>,
}

/// Online users whose names hash to one stripe, and the session each is
/// logged in on.
type Stripe = Mutex<HashMap<Username, Arc<Shared>>>;

/// The part of a session that others (senders, the stripe table) can reach.
struct Shared {
    id: u64,
    /// The lease of the login held now, if any.
    lease: StdMutex<Option<Lease>>,
    /// Live messages, each tagged with the login it was pushed to. Boxed:
    /// the channel allocates its slots 32 at a time as soon as it is made,
    /// and a pointer per slot instead of a whole message saves each idle
    /// session about 1.5 KiB.
    tx: mpsc::Sender<Box<Pushed>>,
    /// Bumped at every login and logout, so a message pushed to an earlier
    /// login of this session is not shown to a later one (it stays stored
    /// and is replayed when its recipient logs in again).
    login: AtomicU64,
    /// Set when someone else ended this session's login (slow consumer);
    /// the session clears its own state at its next operation.
    revoked: AtomicBool,
    /// Bumped at every login (and only then): the number of the login now
    /// or last held. A logout notice carries the number of the login it
    /// ends, so one still unread when a newer login starts is dropped
    /// instead of telling the new login it ended.
    logins: AtomicU64,
    /// The latest logout to tell the event stream about, with the number
    /// of the login it ended.
    notice: StdMutex<Option<Notice>>,
    /// Messages delivered before but never acknowledged, loaded at login,
    /// which the event stream yields before any live message.
    replay: StdMutex<VecDeque<Message>>,
    notify: Notify,
    /// On a node of a cluster: the newest id stored for the user when the
    /// login now held began. Only later messages are pushed to it; earlier
    /// queued ones wait for a fetch, as on one engine.
    floor: AtomicU64,
    /// On a node of a cluster: the newest id pushed to the login now held
    /// (its floor at first). The pusher takes what comes after it, taken
    /// before or not: a take whose answer was lost is taken again.
    pushed: AtomicU64,
    /// On a node of a cluster: this session's pusher (see `Chat::wake`).
    pull: StdMutex<Pull>,
}

/// The state of a session's pusher on a node of a cluster: whether its
/// task runs, and for whom it is asked to look next.
#[derive(Debug, Default)]
struct Pull {
    running: bool,
    /// The users it was woken for (a session may change users between a
    /// wake and its look: one no longer here is routed on).
    wanted: Vec<Username>,
}

impl Shared {
    fn take_lease(&self) -> Option<Lease> {
        self.lease.lock().ok().and_then(|mut lease| lease.take())
    }

    fn set_lease(&self, lease: Lease) {
        if let Ok(mut held) = self.lease.lock() {
            *held = Some(lease);
        }
    }

    fn set_replay(&self, messages: VecDeque<Message>) {
        if let Ok(mut replay) = self.replay.lock() {
            *replay = messages;
        }
    }

    /// Tells the event stream that the login now held (as `user`) ended.
    /// Only the session itself may call this (it holds its state lock, so
    /// no other login can start meanwhile); others use
    /// [`Shared::tell_logout_of`].
    fn tell_logout(&self, user: Username, reason: LogoutReason) {
        self.tell_logout_of(self.logins.load(Ordering::Acquire), user, reason);
    }

    /// Tells the event stream that login number `login` (as `user`) ended.
    fn tell_logout_of(&self, login: u64, user: Username, reason: LogoutReason) {
        if let Ok(mut notice) = self.notice.lock() {
            *notice = Some(Notice {
                user,
                reason,
                login,
            });
        }
        self.notify.notify_one();
    }

    /// Starts a new login's number (before the login is visible to senders).
    fn begin_login(&self) {
        self.logins.fetch_add(1, Ordering::AcqRel);
        self.login.fetch_add(1, Ordering::AcqRel);
    }
}

/// A logout for the event stream to tell.
#[derive(Debug)]
struct Notice {
    user: Username,
    reason: LogoutReason,
    /// The number of the login it ended ([`Shared::logins`]).
    login: u64,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for Chat {
    fn default() -> Self {
        Self::new(Arc::new(MemoryStore::default()), Config::default())
    }
}

impl Chat {
    /// An engine over `store` with `config`.
    ///
    /// Made inside a tokio runtime, it also starts the store's
    /// housekeeping: every [`PRUNE_INTERVAL`] it asks the store to forget
    /// what has expired ([`Store::prune_expired`]), until the last handle
    /// is dropped or the engine shuts down.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        let budgets: Arc<dyn Budgets> = Arc::new(LocalBudgets::new());
        Self::build(store, Arc::new(LocalPresence::new()), None, budgets, config)
    }

    /// An engine that is one node of several sharing `store`: logins are
    /// exclusive across them through the cluster's presence, a message to
    /// a user logged in on another node is routed there through its
    /// delivery, and limits an attacker could multiply by spreading over
    /// nodes draw on its budgets (see the [`presence`](crate::presence),
    /// [`delivery`](crate::delivery) and [`budgets`](crate::budgets)
    /// modules).
    ///
    /// Make it inside a Tokio runtime: its router and housekeeping run
    /// there (without one, nothing is routed to other nodes).
    pub fn on_node(store: Arc<dyn Store>, cluster: Cluster, config: Config) -> Self {
        let Cluster {
            presence,
            delivery,
            budgets,
        } = cluster;
        Self::build(store, presence, Some(delivery), budgets, config)
    }

    fn build(
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        delivery: Option<Arc<dyn Delivery>>,
        budgets: Arc<dyn Budgets>,
        config: Config,
    ) -> Self {
        let stripes = (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect();
        let hashing = Hashing::new(config.hashing);
        let throttle = Throttle::new(config.throttle, Arc::clone(&budgets));
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (router, routes) = match (&delivery, &runtime) {
            (Some(_), Some(_)) => {
                let (router, routes) = mpsc::unbounded_channel();
                (Some(router), Some(routes))
            }
            _ => (None, None),
        };
        let inner = Arc::new(Inner {
            router,
            hashing,
            throttle,
            budgets,
            sends: (0..SEND_RATE_SHARDS).map(|_| StdMutex::default()).collect(),
            lists_running: tokio::sync::Semaphore::new(MAX_LISTS_AT_ONCE),
            store,
            presence,
            delivery,
            config,
            stripes,
            stripe_hasher: RandomState::new(),
            next_session: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            create_gate: Mutex::new(()),
            metrics: Arc::new(EngineMetrics::new()),
        });
        if let Some(runtime) = runtime {
            if let Some(routes) = routes {
                runtime.spawn(route_all(Arc::downgrade(&inner), routes));
            }
            runtime.spawn(housekeeping(Arc::downgrade(&inner)));
            let hashing = inner.hashing.clone();
            runtime.spawn(async move { hashing.prepare().await });
        }
        Self { inner }
    }

    /// Completes when the store can no longer serve writes, with the
    /// reason (see [`Store::failed`]); servers report it as unhealthy.
    pub async fn store_failed(&self) -> String {
        self.inner.store.failed().await
    }

    /// An engine over a fresh [`MemoryStore`] with default settings.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The users logged in on this engine now.
    pub async fn local_users(&self) -> Vec<Username> {
        let mut users = Vec::new();
        for stripe in self.inner.stripes.iter() {
            users.extend(stripe.lock().await.keys().cloned());
        }
        users
    }

    /// A handle that does not keep the engine alive.
    pub fn downgrade(&self) -> WeakChat {
        WeakChat(Arc::downgrade(&self.inner))
    }

    /// On a node of a cluster: makes `user`'s session on this engine, if
    /// they are logged in here, push what was stored for them since their
    /// login began (what a [`Delivery`] calls on the node a message was
    /// routed to). Returns whether they are logged in here; the pushes
    /// follow, in id order, as the session has room for them.
    pub async fn deliver_queued(&self, user: &Username) -> bool {
        let holder = self.stripe(user).lock().await.get(user).cloned();
        match holder {
            Some(holder) => {
                self.wake(user, &holder);
                true
            }
            None => false,
        }
    }

    /// Asks `holder`'s pusher to look for messages to `user`; starts it if
    /// it is not running. One pusher per session, so its pushes keep id
    /// order, and many wakes while it runs cost one more look.
    fn wake(&self, user: &Username, holder: &Arc<Shared>) {
        let Ok(mut pull) = holder.pull.lock() else {
            return;
        };
        if !pull.wanted.contains(user) {
            pull.wanted.push(user.clone());
        }
        if pull.running {
            return;
        }
        pull.running = true;
        drop(pull);
        let (chat, holder) = (self.downgrade(), Arc::clone(holder));
        tokio::spawn(async move {
            loop {
                let wanted = match holder.pull.lock() {
                    Ok(mut pull) if pull.wanted.is_empty() => {
                        pull.running = false;
                        return;
                    }
                    Ok(mut pull) => std::mem::take(&mut pull.wanted),
                    Err(_) => return,
                };
                for user in wanted {
                    match push_stored(&chat, &user, &holder).await {
                        Ok(true) => {}
                        // Not (or no longer) this session's user: wherever
                        // they are now is told.
                        Ok(false) => {
                            if let Some(chat) = chat.upgrade() {
                                chat.route(user);
                            }
                        }
                        Err(err) => {
                            // Still stored: looked for again shortly.
                            tracing::warn!(%err, user = %user, "could not push stored messages; retrying");
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            if let Ok(mut pull) = holder.pull.lock()
                                && !pull.wanted.contains(&user)
                            {
                                pull.wanted.push(user);
                            }
                        }
                    }
                }
            }
        });
    }

    /// Asks the router to tell whoever holds `to`'s login that a message
    /// is stored for them (it stays queued for a fetch if nobody does).
    fn route(&self, to: Username) {
        if let Some(router) = &self.inner.router {
            let _ = router.send(to);
        }
    }

    /// Tells whoever holds each of `users`' logins that messages are
    /// stored for them: one presence read and one route for the batch.
    async fn route_batch(&self, users: &[Username]) {
        let Some(delivery) = &self.inner.delivery else {
            return;
        };
        let mut tries = 0;
        let leases = loop {
            match self.inner.presence.holders(users).await {
                Ok(leases) => break leases,
                // Tried a few times; past that, housekeeping's round wakes
                // every session, on every node.
                Err(err) if tries == ROUTE_TRIES => {
                    tracing::warn!(%err, "no presence answer; the messages wait for the next look");
                    return;
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200 << tries)).await;
                }
            }
        };
        let here = self.inner.presence.node();
        let (mine, theirs): (Vec<Lease>, Vec<Lease>) =
            leases.into_iter().partition(|lease| lease.node == here);
        // Logins here that began after their sends looked.
        for lease in mine {
            self.deliver_queued(&lease.user).await;
        }
        let mut tries = 0;
        while !theirs.is_empty()
            && let Err(err) = delivery.route(&theirs).await
        {
            if tries == ROUTE_TRIES {
                tracing::warn!(%err, "route failed; the messages wait for the next look");
                return;
            }
            tries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(200 << tries)).await;
        }
    }

    /// Ends `lease` in the presence service (logged, not returned: the
    /// login is over here either way, and a lease that cannot be released
    /// now is released by its service's expiry).
    async fn release_lease(&self, lease: Option<Lease>) {
        let Some(lease) = lease else { return };
        if let Err(err) = self.inner.presence.release(&lease).await {
            tracing::warn!(%err, user = %lease.user, "could not release a login's lease");
        }
    }

    /// The engine's settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Most messages the store keeps per recipient (see
    /// [`Store::queue_limit`]).
    pub fn queue_limit(&self) -> usize {
        self.inner.store.queue_limit()
    }

    /// Opens a session (one per connection) and the stream of events pushed
    /// to it. Call [`Session::close`] when the connection ends.
    pub fn open_session(&self) -> (Session, Events) {
        self.open(None, false)
    }

    /// [`Chat::open_session`] for a plaintext connection from `peer`:
    /// limits per address ([`Config::create_rate`]) apply to it.
    pub fn open_session_from(&self, peer: IpAddr) -> (Session, Events) {
        self.open(Some(peer), false)
    }

    /// [`Chat::open_session_from`] for a connection that the transport
    /// encrypts (TLS) if `encrypted`: like a loopback one, an encrypted
    /// connection may set the first password of an account from before
    /// passwords.
    pub fn open_session_over(&self, peer: IpAddr, encrypted: bool) -> (Session, Events) {
        self.open(Some(peer), encrypted)
    }

    fn open(&self, peer: Option<IpAddr>, encrypted: bool) -> (Session, Events) {
        let (tx, rx) = mpsc::channel(self.inner.config.session_event_capacity.max(1));
        let shared = Arc::new(Shared {
            id: self.inner.next_session.fetch_add(1, Ordering::Relaxed),
            tx,
            revoked: AtomicBool::new(false),
            logins: AtomicU64::new(0),
            login: AtomicU64::new(0),
            notice: StdMutex::new(None),
            lease: StdMutex::new(None),
            replay: StdMutex::new(VecDeque::new()),
            notify: Notify::new(),
            floor: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            pull: StdMutex::new(Pull::default()),
        });
        let session = Session {
            chat: self.clone(),
            shared: Arc::clone(&shared),
            state: Mutex::new(None),
            peer,
            encrypted,
            lists: StdMutex::new(self.inner.config.list_rate.map(Bucket::full)),
        };
        let events = Events {
            rx,
            held: None,
            shared,
            // A child token: its lock is this session's alone, so checking it on
            // every receive does not contend with every other session.
            shutdown: self.inner.shutdown.child_token(),
            told_shutdown: false,
            metrics: Arc::clone(&self.inner.metrics),
        };
        (session, events)
    }

    /// Starts shutting down: every session's [`Events`] yields
    /// [`Event::Shutdown`], and new operations get `shutting_down`.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Whether [`Chat::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Account names matching `pattern`, sorted, at most `max` of them and
    /// at most [`Config::max_list_results`] (`max` = 0 means the server cap).
    ///
    /// The pattern uses the `regex` crate's syntax and is searched for
    /// anywhere in the name unless it anchors itself with `^` and `$`; the
    /// empty pattern matches every name.
    pub async fn list(&self, pattern: &str, max: usize) -> Result<Vec<Username>, ChatError> {
        let _running = self
            .inner
            .lists_running
            .acquire()
            .await
            .map_err(|_| ChatError::ShuttingDown)?;
        let config = &self.inner.config;
        if pattern.len() > config.max_pattern_len {
            return Err(ChatError::InvalidPattern(format!(
                "the pattern is {} bytes long, the limit is {}",
                pattern.len(),
                config.max_pattern_len
            )));
        }
        let regex = RegexBuilder::new(pattern)
            .size_limit(config.max_pattern_memory)
            .dfa_size_limit(config.max_pattern_memory)
            .build()
            .map_err(|err| ChatError::InvalidPattern(err.to_string()))?;
        let limit = cap(max, config.max_list_results);
        Ok(self.inner.store.list_accounts(&regex, limit).await?)
    }

    /// [`Chat::list`] for a caller without a session of its own (a gRPC
    /// call without a token) from `peer`: [`Config::list_rate`] applies
    /// per address, and once the engine stops it fails with
    /// `shutting_down`, as a session's list does.
    pub async fn list_from(
        &self,
        peer: IpAddr,
        pattern: &str,
        max: usize,
    ) -> Result<Vec<Username>, ChatError> {
        self.check_running()?;
        if let Some(rate) = self.inner.config.list_rate {
            self.draw(
                Draw::take(Budget::Lists(address_key(peer)), rate),
                "lists from your address",
            )
            .await?;
        }
        self.list(pattern, max).await
    }

    /// Takes a token from a shared budget, or says `rate_limited` (about
    /// `what`) with how long until one is there.
    async fn draw(&self, draw: Draw, what: &'static str) -> Result<(), ChatError> {
        self.inner
            .budgets
            .draw(&[draw])
            .await?
            .map_err(|retry_after| ChatError::RateLimited { what, retry_after })
    }

    fn stripe(&self, name: &Username) -> &Stripe {
        let hash = self.inner.stripe_hasher.hash_one(name) as usize;
        &self.inner.stripes[hash & (STRIPES - 1)]
    }

    /// Takes `user`'s lease for this engine: `already_logged_in` if another
    /// session (here or on another node) holds it. Called under `user`'s
    /// stripe; `held_here` says whether a session of this engine is in it.
    /// A lease of this engine's with no session here is an orphan (a
    /// release that failed, a login abandoned midway): it is ended and the
    /// lease taken anew.
    async fn acquire(&self, user: &Username, held_here: bool) -> Result<Lease, ChatError> {
        let presence = &self.inner.presence;
        let refused = |err| match err {
            PresenceError::Held(_) => ChatError::AlreadyLoggedIn(user.clone()),
            PresenceError::Unavailable(why) => ChatError::StoreUnavailable(why),
        };
        match presence.acquire(user).await {
            Err(PresenceError::Held(orphan)) if !held_here && orphan.node == presence.node() => {
                tracing::info!(user = %user, "ending an orphaned lease of this node");
                presence.release(&orphan).await.map_err(refused)?;
                presence.acquire(user).await.map_err(refused)
            }
            other => other.map_err(refused),
        }
    }

    /// Removes session `id`'s claim on `user`, if it still holds it (a
    /// later login may have taken the name over).
    async fn unclaim(&self, user: &Username, id: u64) {
        let mut stripe = self.stripe(user).lock().await;
        if stripe.get(user).is_some_and(|s| s.id == id)
            && let Some(holder) = stripe.remove(user)
        {
            self.inner.metrics.online.decrement(1.0);
            self.release_lease(holder.take_lease()).await;
        }
    }

    fn check_running(&self) -> Result<(), ChatError> {
        if self.is_shutting_down() {
            Err(ChatError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

/// Most recipients announced in one batch.
const ROUTE_BATCH: usize = 256;

/// Retries of a batch whose presence read or route failed.
const ROUTE_TRIES: u32 = 3;

/// The router of a node of a cluster: announces the recipients sent to,
/// as many at once as have gathered, until the engine is dropped.
async fn route_all(inner: std::sync::Weak<Inner>, mut routes: mpsc::UnboundedReceiver<Username>) {
    let mut users = Vec::new();
    while routes.recv_many(&mut users, ROUTE_BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        users.sort_unstable();
        users.dedup();
        Chat { inner }.route_batch(&users).await;
        users.clear();
    }
}

/// Most messages a session's pusher takes from the store at once.
const PUSH_BATCH: usize = 256;

/// Pushes to `holder`, while it is `user`'s session here, every message
/// stored for `user` after what its login was last pushed (its floor at
/// first), in id order, as fast as the session reads them. The session's
/// only pusher on a node of a cluster (see [`Chat::wake`]), so it may wait
/// for room: a session that does not read leaves its messages stored, not
/// lost. Returns whether `user` is this session's (`false`: the caller
/// routes to wherever they are).
async fn push_stored(
    chat: &WeakChat,
    user: &Username,
    holder: &Arc<Shared>,
) -> Result<bool, ChatError> {
    loop {
        // Room first, waited for without any lock: the session is reading,
        // or closes (and the pusher stops).
        match holder.tx.reserve().await {
            Ok(permit) => drop(permit),
            Err(_) => return Ok(true),
        }
        let room = holder.tx.capacity().clamp(1, PUSH_BATCH);
        let Ok(permits) = holder.tx.try_reserve_many(room) else {
            continue;
        };
        let Some(chat) = chat.upgrade() else {
            return Ok(true);
        };
        let stripe = chat.stripe(user).lock().await;
        if !stripe.get(user).is_some_and(|s| Arc::ptr_eq(s, holder)) {
            return Ok(false);
        }
        let Some(lease) = holder.lease.lock().ok().and_then(|lease| lease.clone()) else {
            return Ok(false);
        };
        let after = holder.pushed.load(Ordering::Acquire);
        let login = holder.login.load(Ordering::Acquire);
        let messages = chat.inner.store.take_after(&lease, after, room).await?;
        if let Some(last) = messages.last() {
            holder.pushed.store(last.id, Ordering::Release);
        }
        let taken = messages.len();
        let now = Instant::now();
        let now_ms = now_ms();
        for (permit, message) in permits.zip(messages) {
            // Accepted on whichever node, by its clock: the latency metric
            // counts from the message's timestamp.
            let age = std::time::Duration::from_millis(now_ms.saturating_sub(message.timestamp_ms));
            permit.send(Box::new(Pushed {
                login,
                message,
                durable: Durable::now(),
                accepted: now.checked_sub(age).unwrap_or(now),
            }));
        }
        drop(stripe);
        if taken < room {
            return Ok(true);
        }
    }
}

/// Sessions woken together by housekeeping's round on a node of a cluster
/// (then it pauses 100 ms).
const WAKES_AT_ONCE: usize = 64;

/// How often the engine asks its store to prune expired state.
pub const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Prunes the store every [`PRUNE_INTERVAL`] while the engine lives. Holds
/// the engine only weakly, so dropping the last [`Chat`] ends it.
async fn housekeeping(inner: std::sync::Weak<Inner>) {
    let mut ticks = tokio::time::interval(PRUNE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.is_cancelled() {
            return;
        }
        // Logins whose connection died without a close (its events
        // dropped): their leases are freed, also for other nodes.
        let mut dead = Vec::new();
        for stripe in inner.stripes.iter() {
            let mut stripe = stripe.lock().await;
            stripe.retain(|_, holder| {
                let alive = !holder.tx.is_closed();
                if !alive {
                    holder.revoked.store(true, Ordering::Release);
                    dead.push(Arc::clone(holder));
                }
                alive
            });
        }
        if !dead.is_empty() {
            inner.metrics.online.decrement(dead.len() as f64);
            tracing::info!(logins = dead.len(), "ended logins whose connection is gone");
            for holder in dead {
                if let Some(lease) = holder.take_lease()
                    && let Err(err) = inner.presence.release(&lease).await
                {
                    tracing::warn!(%err, user = %lease.user, "could not release a login's lease");
                }
            }
        }
        // On a node of a cluster, every session looks for what it may
        // have missed (a wake lost with a connection to the database).
        if inner.delivery.is_some() {
            let chat = Chat {
                inner: Arc::clone(&inner),
            };
            let mut here = Vec::new();
            for stripe in inner.stripes.iter() {
                let stripe = stripe.lock().await;
                here.extend(stripe.iter().map(|(user, s)| (user.clone(), Arc::clone(s))));
            }
            // A few at a time: each look is a statement, and they must not
            // crowd out the pushes that are due.
            for (n, (user, holder)) in here.into_iter().enumerate() {
                chat.wake(&user, &holder);
                if n % WAKES_AT_ONCE == WAKES_AT_ONCE - 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        match inner.budgets.prune().await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned full rate budgets"),
            Err(err) => tracing::warn!(%err, "could not prune rate budgets"),
        }
        if let Some(rate) = inner.config.send_rate {
            for shard in &inner.sends {
                if let Ok(mut sends) = shard.lock() {
                    sends.retain(|_, bucket| !bucket.is_full(rate));
                }
            }
        }
        match inner.store.prune_expired((inner.config.clock)()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned expired store entries"),
            Err(err) => tracing::warn!(%err, "could not prune expired store entries"),
        }
    }
}

fn cap(requested: usize, server_cap: usize) -> usize {
    if requested == 0 {
        server_cap
    } else {
        requested.min(server_cap)
    }
}

/// The system clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One client's view of the engine: its login state and the operations it
/// may perform. Operations on one session apply one at a time, in the order
/// they were called.
pub struct Session {
    chat: Chat,
    shared: Arc<Shared>,
    state: Mutex<Option<Username>>,
    /// Where the connection comes from, if the transport said.
    peer: Option<IpAddr>,
    /// Whether the transport encrypts the connection.
    encrypted: bool,
    /// This session's lists ([`Config::list_rate`]).
    lists: StdMutex<Option<Bucket>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A number unique to this session within the process (for logs).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The session's login state now.
    pub async fn state(&self) -> SessionState {
        let mut state = self.state.lock().await;
        self.sync(&mut state);
        to_state(&state)
    }

    /// Creates the account `name` and logs this session in as it.
    pub async fn create(&self, name: &str, password: &str) -> Result<SessionState, ChatError> {
        let name = Username::parse(name)?;
        let password = Password::parse(password)?;
        let mut state = self.lock_logged_out().await?;
        self.take_create().await?;
        // Hashed before any shared lock is taken: it takes milliseconds.
        let hash = self.chat.inner.hashing.hash(&password).await?;
        let inner = &self.chat.inner;
        let max_accounts = inner.config.max_accounts;
        let _gate = match max_accounts {
            Some(max) => {
                let gate = inner.create_gate.lock().await;
                // Refused early when full (no lease taken); the store checks
                // again as it creates, for creates on other nodes.
                if inner.store.account_count().await? >= max {
                    return Err(ChatError::AccountLimit(max));
                }
                Some(gate)
            }
            None => None,
        };
        let mut stripe = self.chat.stripe(&name).lock().await;
        // The lease first: a name someone is logged in as (here or on
        // another node) exists, whatever the store says this moment.
        let held_here = stripe.contains_key(&name);
        let lease = match self.chat.acquire(&name, held_here).await {
            Ok(lease) => lease,
            Err(ChatError::AlreadyLoggedIn(name)) => return Err(ChatError::UsernameTaken(name)),
            Err(err) => return Err(err),
        };
        let created = match max_accounts {
            Some(max) => inner.store.create_account_capped(&name, &hash, max).await,
            None => inner.store.create_account(&name, &hash).await,
        };
        if let Err(err) = created {
            self.chat.release_lease(Some(lease)).await;
            return Err(err.into());
        }
        self.shared.set_lease(lease);
        // A new account has no message from before its login.
        self.shared.floor.store(0, Ordering::Release);
        self.shared.pushed.store(0, Ordering::Release);
        self.shared.set_replay(VecDeque::new());
        self.shared.begin_login();
        let metrics = &self.chat.inner.metrics;
        if stripe
            .insert(name.clone(), Arc::clone(&self.shared))
            .is_none()
        {
            metrics.online.increment(1.0);
        }
        metrics.created.increment(1);
        metrics.logins.increment(1);
        // Logged once no shared lock is held: writing a line may block.
        drop(stripe);
        tracing::Span::current().record("user", tracing::field::display(&name));
        tracing::info!(user = %name, "account created");
        *state = Some(name);
        Ok(to_state(&state))
    }

    /// Logs this session in as the existing account `name`. Messages
    /// delivered to `name` earlier but never acknowledged come first on the
    /// event stream, in order, before any new live message;
    /// [`Session::replay_pending`] says how many, right after the login.
    pub async fn login(&self, name: &str, password: &str) -> Result<SessionState, ChatError> {
        let name = Username::parse(name)?;
        let password = Password::parse(password)?;
        let mut state = self.lock_logged_out().await?;
        if let Err(err) = self.check_password(&name, &password, true).await {
            if matches!(
                err.code(),
                ErrorCode::WrongPassword | ErrorCode::NoSuchUser | ErrorCode::TooManyAttempts
            ) {
                self.chat.inner.metrics.failed_logins.increment(1);
                // A wrong password costs its sender a hash, so it is worth
                // a line; throttled attempts and unknown names cost nothing
                // (and a name field may hold a mistyped password).
                if err.code() == ErrorCode::WrongPassword {
                    tracing::info!(user = %name, code = err.code().as_str(), "login refused");
                } else {
                    tracing::debug!(code = err.code().as_str(), "login refused");
                }
            }
            return Err(err);
        }
        let mut stripe = self.chat.stripe(&name).lock().await;
        if !self.chat.inner.store.account_exists(&name).await? {
            return Err(ChatError::NoSuchUser(name));
        }
        if let Some(holder) = stripe.get(&name) {
            // A holder whose event receiver is gone is a connection that died
            // without closing its session; its login is void.
            if !holder.tx.is_closed() {
                return Err(ChatError::AlreadyLoggedIn(name));
            }
            if let Some(dead) = stripe.remove(&name) {
                dead.revoked.store(true, Ordering::Release);
                self.chat.inner.metrics.online.decrement(1.0);
                self.chat.release_lease(dead.take_lease()).await;
            }
        }
        let lease = self.chat.acquire(&name, false).await?;
        // On a node of a cluster, the login's floor: read once the lease is
        // held, so a send committed later either sees the lease (and tells
        // this node) or committed below the floor (queued for a fetch).
        let floor = match self.chat.inner.delivery {
            Some(_) => self.chat.inner.store.last_id(&name).await,
            None => Ok(0),
        };
        // Loaded under the stripe lock: a send to `name` either happened
        // before (and is in this snapshot, if it was delivered) or happens
        // after and is pushed behind it, never both.
        let loaded = match floor {
            Ok(floor) => match self.chat.inner.store.unacked(&name).await {
                Ok(unacked) => Ok((floor, unacked)),
                Err(err) => Err(err),
            },
            Err(err) => Err(err),
        };
        let (floor, unacked) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                self.chat.release_lease(Some(lease)).await;
                return Err(err.into());
            }
        };
        self.shared.floor.store(floor, Ordering::Release);
        self.shared.pushed.store(floor, Ordering::Release);
        self.shared.set_lease(lease);
        self.shared.begin_login();
        let metrics = &self.chat.inner.metrics;
        if stripe
            .insert(name.clone(), Arc::clone(&self.shared))
            .is_none()
        {
            metrics.online.increment(1.0);
        }
        metrics.logins.increment(1);
        let replayed = unacked.len();
        metrics.redelivered.increment(replayed as u64);
        // Always replaced: whatever an earlier login left is not this
        // user's to see.
        self.shared.set_replay(unacked.into());
        if replayed > 0 {
            self.shared.notify.notify_one();
        }
        drop(stripe);
        tracing::Span::current().record("user", tracing::field::display(&name));
        tracing::info!(user = %name, redelivering = replayed, "logged in");
        *state = Some(name);
        Ok(to_state(&state))
    }

    /// How many replayed messages (delivered before, never acknowledged)
    /// the event stream will yield before any live one. Read right after a
    /// login, it is what the login's answer tells the client to expect, so
    /// that the client can hold its acknowledgements until it has them all
    /// (a cumulative acknowledgement past one it has not seen would delete
    /// it).
    pub fn replay_pending(&self) -> usize {
        self.shared.replay.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Whether someone else ended this session's login (it was logged out
    /// as a slow consumer) and the session has not noticed yet: its next
    /// operation will find it logged out.
    pub fn login_revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::Acquire)
    }

    /// Replaces the logged-in user's password, given the current one.
    pub async fn change_password(&self, old: &str, new: &str) -> Result<SessionState, ChatError> {
        let old = Password::parse(old)?;
        let new = Password::parse(new)?;
        let state = self.lock_logged_in().await?;
        let user = state.clone().ok_or(ChatError::NotLoggedIn)?;
        self.check_password(&user, &old, false).await?;
        let hash = self.chat.inner.hashing.hash(&new).await?;
        self.chat.inner.store.set_password(&user, &hash).await?;
        Ok(to_state(&state))
    }

    /// Whether a password may be set over this session without one to
    /// check first (an account from before passwords): only over an
    /// encrypted or loopback connection, or with no network at all (an
    /// embedding app).
    fn trusted(&self) -> bool {
        self.encrypted
            || self
                .peer
                .is_none_or(|peer| peer.to_canonical().is_loopback())
    }

    /// Checks `password` against `name`'s, throttled per account and per
    /// address. A missing account costs the same time as a wrong password.
    /// With `may_set`, an account without a password (from before
    /// passwords) takes this one, over a trusted connection only.
    async fn check_password(
        &self,
        name: &Username,
        password: &Password,
        may_set: bool,
    ) -> Result<(), ChatError> {
        let inner = &self.chat.inner;
        let key = self.peer.map(address_key);
        inner.throttle.charge(name, key).await?;
        let credentials = inner.store.credentials(name).await?;
        let stored = credentials
            .as_ref()
            .and_then(|c| c.password_hash.as_deref());
        let matched = inner.hashing.verify(password, stored).await?;
        match credentials {
            None => {
                inner.throttle.failed(key).await;
                Err(ChatError::NoSuchUser(name.clone()))
            }
            Some(Credentials {
                password_hash: None,
            }) => {
                if !(may_set && self.trusted()) {
                    return Err(ChatError::PasswordNotSet(name.clone()));
                }
                let hash = inner.hashing.hash(password).await?;
                inner.store.set_password(name, &hash).await?;
                tracing::info!(user = %name, "password set for an account from before passwords");
                Ok(())
            }
            Some(_) if matched => {
                inner.throttle.succeeded(name).await;
                Ok(())
            }
            Some(_) => {
                inner.throttle.failed(key).await;
                Err(ChatError::WrongPassword)
            }
        }
    }

    /// Logs this session out.
    pub async fn logout(&self) -> Result<SessionState, ChatError> {
        let mut state = self.state.lock().await;
        self.sync(&mut state);
        let user = state.take().ok_or(ChatError::NotLoggedIn)?;
        self.release(&user).await;
        tracing::info!(user = %user, "logged out");
        self.shared.tell_logout(user, LogoutReason::Requested);
        Ok(SessionState::LoggedOut)
    }

    /// Deletes the logged-in account: logs out, drops its undelivered
    /// messages and frees the name. Later sends to it get `no_such_user`.
    pub async fn delete(&self, password: &str) -> Result<SessionState, ChatError> {
        let password = Password::parse(password)?;
        let mut state = self.lock_logged_in().await?;
        let user = state.clone().ok_or(ChatError::NotLoggedIn)?;
        self.check_password(&user, &password, false).await?;
        let stripe = self.chat.stripe(&user).lock().await;
        self.chat.inner.store.delete_account(&user).await?;
        drop(stripe);
        self.release(&user).await;
        self.chat.inner.metrics.deleted.increment(1);
        tracing::info!(user = %user, "account deleted");
        *state = None;
        self.shared.tell_logout(user, LogoutReason::AccountDeleted);
        Ok(SessionState::LoggedOut)
    }

    /// Sends `body` to `to`: pushed live if `to` is logged in, otherwise
    /// queued. Either way the message is stored until `to` acknowledges it;
    /// success means the server stored it, not that it was read.
    pub async fn send(&self, to: &str, body: &str) -> Result<SendReceipt, ChatError> {
        self.send_once(to, body, None).await
    }

    /// [`Session::send`] with an idempotency key: if a send with the same
    /// key from the same user was accepted before (within
    /// [`SEND_ID_RETENTION`](crate::SEND_ID_RETENTION)), nothing new is
    /// stored or pushed and the original receipt is returned. A client
    /// that lost its connection before the reply resends this way.
    pub async fn send_once(
        &self,
        to: &str,
        body: &str,
        send_id: Option<SendId>,
    ) -> Result<SendReceipt, ChatError> {
        let (receipt, durable) = self.send_staged(to, body, send_id).await?;
        durable.wait().await?;
        Ok(receipt)
    }

    /// [`Session::send_once`] in two steps, for a transport that pipelines
    /// a connection's sends: returns once the message has its place in the
    /// store (its id and its order among this session's sends, the session
    /// free for the next request) with a [`Durable`] that completes once it
    /// is durable. The receipt must not be given before that; a push of the
    /// message to its recipient waits for the same.
    pub async fn send_staged(
        &self,
        to: &str,
        body: &str,
        send_id: Option<SendId>,
    ) -> Result<(SendReceipt, Durable), ChatError> {
        let to = Username::parse(to)?;
        let body = MessageBody::parse(body)?;
        let state = self.lock_logged_in().await?;
        let sender = state.clone().ok_or(ChatError::NotLoggedIn)?;
        self.take_send(&sender)?;
        let store = &self.chat.inner.store;
        let mut stripe = self.chat.stripe(&to).lock().await;
        let mut message = NewMessage {
            recipient: to.clone(),
            sender,
            body,
            timestamp_ms: (self.chat.inner.config.clock)(),
            delivered: false,
            send_id,
        };
        if self.chat.inner.delivery.is_some() {
            return self.send_on_node(stripe, message).await;
        }
        // Reserve the live slot before storing the message, so a message
        // stored as delivered is always pushed (in id order: the stripe is
        // held until it is queued to the recipient).
        let recipient = stripe.get(&to).cloned();
        if let Some(recipient) = recipient {
            match recipient.tx.try_reserve() {
                Ok(permit) => {
                    message.delivered = true;
                    // Before the store: a store without staging commits in
                    // `stage`, and the latency includes the commit.
                    let accepted = Instant::now();
                    let (appended, durable) = store.stage(message).await?;
                    let receipt = receipt(&appended.message);
                    if !appended.duplicate {
                        self.chat.inner.metrics.sent.increment(1);
                        let login = recipient.login.load(Ordering::Acquire);
                        permit.send(Box::new(Pushed {
                            login,
                            message: appended.message,
                            durable: durable.clone(),
                            accepted,
                        }));
                    }
                    return Ok((receipt, durable));
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    tracing::warn!(user = %to, "slow consumer logged out; its messages are queued");
                    stripe.remove(&to);
                    self.chat.release_lease(recipient.take_lease()).await;
                    let metrics = &self.chat.inner.metrics;
                    metrics.online.decrement(1.0);
                    metrics.slow_consumers.increment(1);
                    // The login's number is read before the revocation is
                    // published: once it is, the session may notice it and
                    // log in again, and the notice must name the login that
                    // ended, not that one.
                    let login = recipient.logins.load(Ordering::Acquire);
                    recipient.revoked.store(true, Ordering::Release);
                    recipient.tell_logout_of(login, to.clone(), LogoutReason::SlowConsumer);
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    // The recipient's connection is gone without a logout.
                    stripe.remove(&to);
                    self.chat.release_lease(recipient.take_lease()).await;
                    self.chat.inner.metrics.online.decrement(1.0);
                }
            }
        }
        let (appended, durable) = store.stage(message).await?;
        if !appended.duplicate {
            let metrics = &self.chat.inner.metrics;
            metrics.sent.increment(1);
            metrics.queued.increment(1);
        }
        Ok((receipt(&appended.message), durable))
    }

    /// [`Session::send_staged`] on a node of a cluster, under the
    /// recipient's stripe: the message is stored undelivered; once it is
    /// durable, the recipient's session here is woken to push it (with
    /// anything before it, in id order), or the node holding their login
    /// is told. Presence is read after the commit, so a login that begins
    /// meanwhile either finds the message below its floor (fetched, as if
    /// sent while offline) or is told of it.
    async fn send_on_node(
        &self,
        mut stripe: tokio::sync::MutexGuard<'_, HashMap<Username, Arc<Shared>>>,
        message: NewMessage,
    ) -> Result<(SendReceipt, Durable), ChatError> {
        let to = message.recipient.clone();
        let metrics = &self.chat.inner.metrics;
        let mut here = stripe.get(&to).cloned();
        if here.as_ref().is_some_and(|holder| holder.tx.is_closed()) {
            // The recipient's connection is gone without a logout.
            if let Some(dead) = stripe.remove(&to) {
                dead.revoked.store(true, Ordering::Release);
                self.chat.release_lease(dead.take_lease()).await;
                metrics.online.decrement(1.0);
            }
            here = None;
        }
        // Not held across the store: pushes keep id order through the
        // store and the session's one pusher, not through this lock.
        drop(stripe);
        let (appended, durable) = self.chat.inner.store.stage(message).await?;
        let receipt = receipt(&appended.message);
        if !appended.duplicate {
            metrics.sent.increment(1);
            if here.is_none() {
                metrics.queued.increment(1);
            }
        }
        // A resend is announced again too: it may follow a crash between
        // the first one's commit and its announcement.
        match here {
            Some(holder) if durable.is_now() => self.chat.wake(&to, &holder),
            None if durable.is_now() => self.chat.route(to),
            _ => {
                let (chat, stored) = (self.chat.clone(), durable.clone());
                tokio::spawn(async move {
                    if stored.wait().await.is_err() {
                        return;
                    }
                    match here {
                        Some(holder) => chat.wake(&to, &holder),
                        None => chat.route(to),
                    }
                });
            }
        }
        Ok((receipt, durable))
    }

    /// Takes up to `max` queued messages, oldest first (`max` = 0 means the
    /// server cap, [`Config::max_fetch_results`]). They are not fetched
    /// again, but stay stored until [acknowledged](Session::ack).
    pub async fn fetch(&self, max: usize) -> Result<Vec<Message>, ChatError> {
        let state = self.lock_logged_in().await?;
        let user = state.as_ref().ok_or(ChatError::NotLoggedIn)?;
        let limit = cap(max, self.chat.inner.config.max_fetch_results);
        let store = &self.chat.inner.store;
        let messages = match self.cluster_lease()? {
            // What was queued before the login; what came after is pushed
            // (and the pusher looks again now, in case a wake was lost).
            Some(lease) => {
                self.chat.wake(user, &self.shared);
                let floor = self.shared.floor.load(Ordering::Acquire);
                store.take_undelivered_in(&lease, 0, floor, limit).await?
            }
            None => store.take_undelivered(user, limit).await?,
        };
        let fetched = messages.len() as u64;
        self.chat.inner.metrics.fetched.increment(fetched);
        Ok(messages)
    }

    /// Acknowledges every message this user has received (live or fetched)
    /// with an id up to `through`: they are deleted and never delivered
    /// again. Returns how many were removed.
    pub async fn ack(&self, through: MessageId) -> Result<usize, ChatError> {
        let state = self.lock_logged_in().await?;
        let user = state.as_ref().ok_or(ChatError::NotLoggedIn)?;
        let removed = match self.cluster_lease()? {
            Some(lease) => self.chat.inner.store.ack_for(&lease, through).await?,
            None => self.chat.inner.store.ack(user, through).await?,
        };
        self.chat
            .inner
            .metrics
            .acknowledged
            .increment(removed as u64);
        Ok(removed)
    }

    /// On a node of a cluster, the lease of the login held now: the store
    /// acts for it only while it is current (fencing).
    /// `None` on one engine; `not_logged_in` on a node whose session lost
    /// its login's lease (ended by housekeeping, or another operation).
    fn cluster_lease(&self) -> Result<Option<Lease>, ChatError> {
        if self.chat.inner.delivery.is_none() {
            return Ok(None);
        }
        match self
            .shared
            .lease
            .lock()
            .ok()
            .and_then(|lease| lease.clone())
        {
            Some(lease) => Ok(Some(lease)),
            None => Err(ChatError::NotLoggedIn),
        }
    }

    /// Lists accounts; see [`Chat::list`]. Works logged in or out; limited
    /// to [`Config::list_rate`] per session.
    pub async fn list(&self, pattern: &str, max: usize) -> Result<Vec<Username>, ChatError> {
        self.chat.check_running()?;
        if let Some(rate) = self.chat.inner.config.list_rate {
            let mut lists = self.lists.lock().map_err(|_| poisoned_lock())?;
            if let Err(retry_after) = lists.get_or_insert_with(|| Bucket::full(rate)).take(rate) {
                return Err(ChatError::RateLimited {
                    what: "lists",
                    retry_after,
                });
            }
        }
        self.chat.list(pattern, max).await
    }

    /// Ends the session: logs its user out. Call it when the connection
    /// closes, however it closes.
    pub async fn close(self) {
        let mut state = self.state.lock().await;
        self.sync(&mut state);
        if let Some(user) = state.take() {
            self.release(&user).await;
            tracing::info!(user = %user, "logged out: connection closed");
        }
    }

    /// Takes a token from this session's send bucket, if sends are limited.
    fn take_send(&self, sender: &Username) -> Result<(), ChatError> {
        let Some(rate) = self.chat.inner.config.send_rate else {
            return Ok(());
        };
        // Sharded like the stripes: every send passes here, and senders
        // must not queue behind one lock.
        let inner = &self.chat.inner;
        let shard = inner.stripe_hasher.hash_one(sender) as usize % SEND_RATE_SHARDS;
        take_token(&inner.sends[shard], sender.clone(), rate, "messages")
    }

    /// Takes a token from this peer address's create budget, if creates
    /// are limited and the session has an address.
    async fn take_create(&self) -> Result<(), ChatError> {
        let (Some(rate), Some(peer)) = (
            self.chat.inner.config.create_rate,
            self.peer.map(address_key),
        ) else {
            return Ok(());
        };
        self.chat
            .draw(
                Draw::take(Budget::Creates(peer), rate),
                "new accounts from your address",
            )
            .await
    }

    async fn lock_logged_out(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Username>>, ChatError> {
        self.chat.check_running()?;
        let mut state = self.state.lock().await;
        self.sync(&mut state);
        match &*state {
            Some(user) => Err(ChatError::SessionLoggedIn(user.clone())),
            None => Ok(state),
        }
    }

    async fn lock_logged_in(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Username>>, ChatError> {
        self.chat.check_running()?;
        let mut state = self.state.lock().await;
        self.sync(&mut state);
        if state.is_none() {
            return Err(ChatError::NotLoggedIn);
        }
        Ok(state)
    }

    /// Applies a logout that someone else decided (slow consumer).
    fn sync(&self, state: &mut Option<Username>) {
        if self.shared.revoked.swap(false, Ordering::AcqRel) {
            *state = None;
            self.shared.set_replay(VecDeque::new());
            self.shared.login.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Removes this session's claim on `user`, if it still holds it, and
    /// drops a replay nobody will read now (those messages stay stored).
    async fn release(&self, user: &Username) {
        self.shared.set_replay(VecDeque::new());
        self.chat.unclaim(user, self.shared.id).await;
        self.shared.login.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // `close` is the way out; this catches sessions dropped without it
        // (a panicking connection task), so their account is not held
        // forever. A login whose receiver is gone is void anyway (see
        // `login`); this also frees the stripe entry.
        let Ok(state) = self.state.try_lock() else {
            return;
        };
        let Some(user) = state.clone() else { return };
        if self.shared.revoked.load(Ordering::Acquire) {
            return;
        }
        let chat = self.chat.clone();
        let id = self.shared.id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { chat.unclaim(&user, id).await });
        }
    }
}

/// Takes a token from `key`'s bucket (a full one if it has none yet), or
/// says `rate_limited` with how long until one is there.
fn take_token<K: std::hash::Hash + Eq>(
    buckets: &StdMutex<HashMap<K, Bucket>>,
    key: K,
    rate: Rate,
    what: &'static str,
) -> Result<(), ChatError> {
    let mut buckets = buckets.lock().map_err(|_| poisoned_lock())?;
    buckets
        .entry(key)
        .or_insert_with(|| Bucket::full(rate))
        .take(rate)
        .map_err(|retry_after| ChatError::RateLimited { what, retry_after })
}

fn poisoned_lock() -> ChatError {
    ChatError::StoreUnavailable("an engine lock was poisoned by an earlier panic".into())
}

fn receipt(message: &Message) -> SendReceipt {
    SendReceipt {
        id: message.id,
        timestamp_ms: message.timestamp_ms,
    }
}

fn to_state(state: &Option<Username>) -> SessionState {
    match state {
        Some(user) => SessionState::LoggedIn(user.clone()),
        None => SessionState::LoggedOut,
    }
}

/// A message pushed to a session: for which of its logins, and when it is
/// durable.
struct Pushed {
    login: u64,
    message: Message,
    durable: Durable,
    /// When the send was accepted, for the delivery latency.
    accepted: Instant,
}

/// The stream of [`Event`]s pushed to one session. Bounded: a session that
/// lets [`Config::session_event_capacity`] events pile up is logged out.
pub struct Events {
    rx: mpsc::Receiver<Box<Pushed>>,
    /// A message taken from `rx` whose write is not durable yet: it is
    /// returned once it is (kept here so that a `recv` dropped while it
    /// waits loses nothing).
    held: Option<Pushed>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    told_shutdown: bool,
    metrics: Arc<EngineMetrics>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("session", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Takes the whole replay loaded by the last login (delivered but
    /// unacknowledged messages, oldest first) at once, for a transport that
    /// sends it apart from the live events (the gRPC stream sends it, then
    /// its `ready` marker). [`Events::recv`] yields the same messages one at
    /// a time if they are not taken.
    pub fn take_replay(&mut self) -> Vec<Message> {
        self.shared
            .replay
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default()
    }

    /// The next event. Unacknowledged messages replayed at login come
    /// first, then live ones; messages pushed before a logout come before
    /// its [`Event::LoggedOut`]; [`Event::Shutdown`] comes once, after which
    /// this returns `None`.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(message) = self
                .shared
                .replay
                .lock()
                .ok()
                .and_then(|mut r| r.pop_front())
            {
                return Some(Event::Message(message));
            }
            if let Some(held) = &self.held {
                // Not shown before it is durable: its sender has not been
                // told it is stored either.
                let durable = held.durable.wait().await;
                let held = self.held.take()?;
                // Never durable (the store failed), it does not exist; for
                // a login that ended meanwhile, it is replayed at the next.
                if durable.is_ok() && self.current(held.login) {
                    return Some(self.delivered(held));
                }
                continue;
            }
            if let Ok(pushed) = self.rx.try_recv() {
                if let Some(event) = self.take(*pushed) {
                    return Some(event);
                }
                continue;
            }
            if let Some(notice) = self.take_notice() {
                // A notice for a login older than the one now held would
                // tell the new login it ended: drop it.
                if notice.login == self.shared.logins.load(Ordering::Acquire) {
                    return Some(Event::LoggedOut {
                        user: notice.user,
                        reason: notice.reason,
                    });
                }
                continue;
            }
            if self.shutdown.is_cancelled() {
                if self.told_shutdown {
                    return None;
                }
                self.told_shutdown = true;
                return Some(Event::Shutdown);
            }
            tokio::select! {
                pushed = self.rx.recv() => match pushed {
                    Some(pushed) => if let Some(event) = self.take(*pushed) {
                        return Some(event);
                    },
                    None => return None,
                },
                _ = self.shared.notify.notified() => {}
                _ = self.shutdown.cancelled(), if !self.told_shutdown => {}
            }
        }
    }

    /// Whether a message pushed to login `login` is for the login now.
    fn current(&self, login: u64) -> bool {
        login == self.shared.login.load(Ordering::Acquire)
    }

    /// A pushed message for the current login, as an event if it is
    /// durable already; else held until it is (see `held`).
    fn take(&mut self, pushed: Pushed) -> Option<Event> {
        if !self.current(pushed.login) {
            return None;
        }
        if pushed.durable.is_now() {
            return Some(self.delivered(pushed));
        }
        self.held = Some(pushed);
        None
    }

    /// A live message handed over: counted, with its latency.
    fn delivered(&self, pushed: Pushed) -> Event {
        self.metrics.live.increment(1);
        self.metrics
            .delivery_latency
            .record(pushed.accepted.elapsed());
        Event::Message(pushed.message)
    }

    fn take_notice(&self) -> Option<Notice> {
        self.shared.notice.lock().ok()?.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which names share a lock stripe differs from engine to engine: it
    /// cannot be computed offline.
    #[test]
    fn stripes_are_seeded_per_engine() {
        let names: Vec<Username> = (0..64)
            .map(|i| Username::parse(&format!("user{i}")).unwrap())
            .collect();
        let stripes = |chat: &Chat| -> Vec<usize> {
            names
                .iter()
                .map(|n| {
                    let stripe: *const Stripe = chat.stripe(n);
                    (stripe as usize - chat.inner.stripes.as_ptr() as usize)
                        / std::mem::size_of::<Stripe>()
                })
                .collect()
        };
        let (a, b) = (Chat::in_memory(), Chat::in_memory());
        // 64 names in 1,024 stripes, twice: the same layout by chance has
        // a probability of 1024^-64.
        assert_ne!(stripes(&a), stripes(&b));
        assert_eq!(stripes(&a), stripes(&a), "stable within one engine");
    }
}
