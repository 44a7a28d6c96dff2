//! Several engines (nodes) on one store, through the presence and delivery
//! seams, in one process: the in-process implementations (`LocalPresence`,
//! `LocalBus`) stand where a clustered deployment puts its database. Logins
//! are exclusive across nodes, a message reaches its recipient live on
//! whichever node they are logged in, and nothing is lost or shown twice.

use std::sync::Arc;
use std::time::Duration;

use chat_core::budgets::{Budgets, LocalBudgets};
use chat_core::delivery::LocalBus;
use chat_core::presence::Lease;
use chat_core::presence::{LocalPresence, NodeId, Presence};
use chat_core::{
    Appended, Chat, ChatError, Cluster, Config, Credentials, ErrorCode, Event, Events,
    HashingConfig, MemoryStore, Message, MessageId, NewMessage, Store, StoreError, Username,
};

const PATIENCE: Duration = Duration::from_secs(10);

/// Two engines on one memory store, one lease table and one bus.
fn two_nodes() -> (Chat, Chat, LocalPresence) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let presence = LocalPresence::new();
    let bus = Arc::new(LocalBus::new());
    let budgets: Arc<dyn Budgets> = Arc::new(LocalBudgets::new());
    let config = || Config {
        hashing: HashingConfig::cheap_for_tests(),
        ..Config::default()
    };
    let node = |id: u64| {
        let chat = Chat::on_node(
            Arc::clone(&store),
            Cluster {
                presence: Arc::new(presence.join(NodeId(id))),
                delivery: bus.clone(),
                budgets: Arc::clone(&budgets),
            },
            config(),
        );
        bus.register(NodeId(id), &chat);
        chat
    };
    (node(1), node(2), presence)
}

async fn next_message(events: &mut Events) -> chat_core::Message {
    match tokio::time::timeout(PATIENCE, events.recv()).await {
        Ok(Some(Event::Message(message))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_login_is_exclusive_across_nodes() {
    let (a, b, presence) = two_nodes();
    let (alice_a, _events_a) = a.open_session();
    alice_a.create("alice", "password1").await.unwrap();
    let (alice_b, _events_b) = b.open_session();
    assert!(matches!(
        alice_b.login("alice", "password1").await,
        Err(ChatError::AlreadyLoggedIn(_))
    ));
    // The name is taken, whichever node is asked.
    let (other, _other_events) = b.open_session();
    assert!(matches!(
        other.create("alice", "password1").await,
        Err(ChatError::UsernameTaken(_))
    ));
    let held = presence
        .holder(&Username::parse("alice").unwrap())
        .await
        .unwrap();
    assert_eq!(held.map(|lease| lease.node), Some(NodeId(1)));
    alice_a.logout().await.unwrap();
    alice_b.login("alice", "password1").await.unwrap();
    let held = presence
        .holder(&Username::parse("alice").unwrap())
        .await
        .unwrap();
    assert_eq!(held.map(|lease| lease.node), Some(NodeId(2)));
    // Node 1 can no longer act for alice.
    let (again, _again_events) = a.open_session();
    assert!(matches!(
        again.login("alice", "password1").await,
        Err(ChatError::AlreadyLoggedIn(_))
    ));
}

#[tokio::test]
async fn a_message_reaches_its_recipient_live_on_another_node() {
    let (a, b, _presence) = two_nodes();
    let (alice, _alice_events) = a.open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, mut bob_events) = b.open_session();
    bob.create("bob", "password1").await.unwrap();
    for n in 0..20 {
        alice.send("bob", &format!("hello {n}")).await.unwrap();
    }
    let mut last = None;
    for n in 0..20 {
        let message = next_message(&mut bob_events).await;
        assert_eq!(
            message.body.as_str(),
            format!("hello {n}"),
            "in order, once each"
        );
        last = Some(message.id);
    }
    assert_eq!(bob.ack(last.unwrap()).await.unwrap(), 20);
    // Taken and acknowledged: nothing is queued or replayed.
    assert!(bob.fetch(0).await.unwrap().is_empty());
    bob.logout().await.unwrap();
    bob.login("bob", "password1").await.unwrap();
    assert_eq!(bob.replay_pending(), 0);
    // The way back too.
    bob.send("alice", "hi from node 2").await.unwrap();
    let (alice_events_owner, mut alice_events) = (alice, _alice_events);
    assert_eq!(
        next_message(&mut alice_events).await.body.as_str(),
        "hi from node 2"
    );
    drop(alice_events_owner);
}

#[tokio::test]
async fn messages_for_a_user_logged_in_nowhere_wait_for_any_node() {
    let (a, b, _presence) = two_nodes();
    let (alice, _alice_events) = a.open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, _bob_events) = a.open_session();
    bob.create("bob", "password1").await.unwrap();
    bob.logout().await.unwrap();
    alice.send("bob", "while you were out").await.unwrap();
    let (bob_b, _bob_b_events) = b.open_session();
    bob_b.login("bob", "password1").await.unwrap();
    let fetched = bob_b.fetch(0).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].body.as_str(), "while you were out");
}

#[tokio::test]
async fn a_session_that_dies_frees_its_login_for_every_node() {
    let (a, b, _presence) = two_nodes();
    let (alice, alice_events) = a.open_session();
    alice.create("alice", "password1").await.unwrap();
    // The connection dies without a logout: its session and events go.
    drop(alice_events);
    drop(alice);
    let (again, _events) = b.open_session();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match again.login("alice", "password1").await {
            Ok(_) => break,
            Err(ChatError::AlreadyLoggedIn(_)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease was never freed"
                );
                // The dropped session frees its lease on a task of its own.
                tokio::task::yield_now().await;
            }
            Err(other) => panic!("{other}"),
        }
    }
}

/// A lease of this node with no session here (a release that failed, a
/// login abandoned midway) does not lock its user out: the next login here
/// ends it.
#[tokio::test]
async fn an_orphaned_lease_of_this_node_is_ended_by_the_next_login() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let presence = LocalPresence::new();
    let bus = Arc::new(LocalBus::new());
    let chat = Chat::on_node(
        Arc::clone(&store),
        Cluster {
            presence: Arc::new(presence.clone()),
            delivery: bus.clone(),
            budgets: Arc::new(LocalBudgets::new()),
        },
        Config {
            hashing: HashingConfig::cheap_for_tests(),
            ..Config::default()
        },
    );
    bus.register(NodeId(0), &chat);
    let (alice, _events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    alice.logout().await.unwrap();
    let orphan = presence
        .acquire(&Username::parse("alice").unwrap())
        .await
        .unwrap();
    alice.login("alice", "password1").await.unwrap();
    let now = presence
        .holder(&Username::parse("alice").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(now.generation > orphan.generation);
}

/// Password attempts draw on one budget whichever node they reach: the
/// failures an account allows are spent across nodes, and a right password
/// on one node makes the budget whole for both.
#[tokio::test]
async fn password_attempts_on_any_node_draw_on_one_budget() {
    let (one, two, _presence) = two_nodes();
    let (alice, _events) = one.open_session();
    alice.create("alice", "password1").await.unwrap();
    alice.logout().await.unwrap();
    let per_account = Config::default().throttle.per_account.burst;
    let peer = "192.0.2.7".parse().unwrap();
    for n in 0..per_account {
        let node = if n % 2 == 0 { &one } else { &two };
        let (guess, _e) = node.open_session_from(peer);
        let err = guess.login("alice", "wrong-password").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::WrongPassword, "attempt {n}");
    }
    for node in [&one, &two] {
        let (guess, _e) = node.open_session_from(peer);
        let err = guess.login("alice", "password1").await.unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::TooManyAttempts,
            "the budget is spent on every node"
        );
    }
}

/// Messages to one user from senders on both nodes at once reach them in
/// id order (their pushes never overtake each other, whichever node they
/// came from), each once; so a cumulative acknowledgement of the last one
/// seen never passes one still on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_from_every_node_keep_id_order() {
    let (a, b, _presence) = two_nodes();
    let (bob, mut bob_events) = b.open_session();
    bob.create("bob", "password1").await.unwrap();
    let mut senders = Vec::new();
    for (n, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (session, events) = node.open_session();
        session
            .create(&format!("sender{n}"), "password1")
            .await
            .unwrap();
        senders.push(tokio::spawn(async move {
            for m in 0..50 {
                session.send("bob", &format!("{n}/{m}")).await.unwrap();
            }
            drop(events);
            session
        }));
    }
    let mut last = 0;
    for _ in 0..200 {
        let message = next_message(&mut bob_events).await;
        assert!(message.id > last, "{} after {last}", message.id);
        last = message.id;
        // Acknowledged as it comes, as a client does.
        if message.id % 16 == 0 {
            bob.ack(message.id).await.unwrap();
        }
    }
    for sender in senders {
        sender.await.unwrap();
    }
    bob.ack(last).await.unwrap();
    assert!(
        bob.fetch(0).await.unwrap().is_empty(),
        "nothing left behind"
    );
}

/// On a node of a cluster as on one engine: what was queued while the user
/// was away waits for their fetch, and only what comes after their login
/// is pushed.
#[tokio::test]
async fn what_was_queued_before_a_login_is_fetched_not_pushed() {
    let (a, b, _presence) = two_nodes();
    let (alice, _alice_events) = a.open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, mut bob_events) = b.open_session();
    bob.create("bob", "password1").await.unwrap();
    bob.logout().await.unwrap();
    alice.send("bob", "while you were out").await.unwrap();
    bob.login("bob", "password1").await.unwrap();
    alice.send("bob", "welcome back").await.unwrap();
    assert_eq!(
        next_message(&mut bob_events).await.body.as_str(),
        "welcome back"
    );
    let fetched = bob.fetch(0).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].body.as_str(), "while you were out");
}

/// A recipient that stops reading is not logged out on a node of a cluster:
/// what it has no room for stays stored, and is pushed, in order, once it
/// reads again.
#[tokio::test]
async fn a_recipient_that_stops_reading_keeps_its_login_and_its_messages() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let presence = LocalPresence::new();
    let bus = Arc::new(LocalBus::new());
    let config = Config {
        hashing: HashingConfig::cheap_for_tests(),
        session_event_capacity: 8,
        ..Config::default()
    };
    let chat = Chat::on_node(
        store,
        Cluster {
            presence: Arc::new(presence.join(NodeId(1))),
            delivery: bus.clone(),
            budgets: Arc::new(LocalBudgets::new()),
        },
        config,
    );
    bus.register(NodeId(1), &chat);
    let (alice, _alice_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, mut bob_events) = chat.open_session();
    bob.create("bob", "password1").await.unwrap();
    for n in 0..40 {
        alice.send("bob", &format!("m{n}")).await.unwrap();
    }
    for n in 0..40 {
        assert_eq!(
            next_message(&mut bob_events).await.body.as_str(),
            format!("m{n}")
        );
    }
    assert_eq!(
        bob.state().await,
        chat_core::SessionState::LoggedIn(Username::parse("bob").unwrap())
    );
}

/// A connection that died without closing its session (its events gone,
/// the session not closed) stops holding its user's login for the other
/// nodes at the next housekeeping round, without anyone sending to it.
#[tokio::test(start_paused = true)]
async fn housekeeping_frees_the_logins_of_dead_connections() {
    let (a, b, _presence) = two_nodes();
    let (alice, alice_events) = a.open_session();
    alice.create("alice", "password1").await.unwrap();
    drop(alice_events);
    let (again, _events) = b.open_session();
    assert!(matches!(
        again.login("alice", "password1").await,
        Err(ChatError::AlreadyLoggedIn(_))
    ));
    tokio::time::sleep(chat_core::PRUNE_INTERVAL * 2 + Duration::from_secs(1)).await;
    again.login("alice", "password1").await.unwrap();
    drop(alice);
}

/// A store whose next `take_after` takes (marks delivered) and then fails,
/// as a take whose answer is lost on the way from the database does.
struct LosesOneTake {
    inner: MemoryStore,
    lose: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Store for LosesOneTake {
    async fn create_account(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.inner.create_account(name, hash).await
    }
    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError> {
        self.inner.credentials(name).await
    }
    async fn set_password(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.inner.set_password(name, hash).await
    }
    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        self.inner.account_exists(name).await
    }
    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        self.inner.delete_account(name).await
    }
    async fn list_accounts(
        &self,
        pattern: &regex::Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        self.inner.list_accounts(pattern, limit).await
    }
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        self.inner.append(message).await
    }
    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.take_undelivered(name, limit).await
    }
    async fn last_id(&self, name: &Username) -> Result<MessageId, StoreError> {
        self.inner.last_id(name).await
    }
    async fn take_undelivered_in(
        &self,
        lease: &Lease,
        after: MessageId,
        through: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner
            .take_undelivered_in(lease, after, through, limit)
            .await
    }
    async fn take_after(
        &self,
        lease: &Lease,
        after: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let taken = self.inner.take_after(lease, after, limit).await?;
        if !taken.is_empty() && self.lose.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the answer was lost".into()));
        }
        Ok(taken)
    }
    async fn unacked(&self, name: &Username) -> Result<Vec<Message>, StoreError> {
        self.inner.unacked(name).await
    }
    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError> {
        self.inner.ack(name, through).await
    }
    async fn account_count(&self) -> Result<usize, StoreError> {
        self.inner.account_count().await
    }
}

/// A take that marked messages delivered but whose answer never came back
/// does not skip them: the pusher takes from the last id it pushed, so
/// they are taken again and pushed, in order, before anything later (and a
/// cumulative acknowledgement of a later one cannot delete them unseen).
#[tokio::test]
async fn a_take_whose_answer_was_lost_is_taken_again() {
    let store = Arc::new(LosesOneTake {
        inner: MemoryStore::default(),
        lose: std::sync::atomic::AtomicBool::new(false),
    });
    let bus = Arc::new(LocalBus::new());
    let chat = Chat::on_node(
        store.clone(),
        Cluster {
            presence: Arc::new(LocalPresence::new().join(NodeId(1))),
            delivery: bus.clone(),
            budgets: Arc::new(LocalBudgets::new()),
        },
        Config {
            hashing: HashingConfig::cheap_for_tests(),
            ..Config::default()
        },
    );
    bus.register(NodeId(1), &chat);
    let (alice, _alice_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, mut bob_events) = chat.open_session();
    bob.create("bob", "password1").await.unwrap();
    store.lose.store(true, std::sync::atomic::Ordering::SeqCst);
    for n in 0..5 {
        alice.send("bob", &format!("m{n}")).await.unwrap();
    }
    for n in 0..5 {
        assert_eq!(
            next_message(&mut bob_events).await.body.as_str(),
            format!("m{n}")
        );
    }
    assert!(
        !store.lose.load(std::sync::atomic::Ordering::SeqCst),
        "a take was lost"
    );
}
