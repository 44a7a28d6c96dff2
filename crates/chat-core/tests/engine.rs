//! Engine behaviour that no transport can show directly: slow consumers,
//! shutdown, sessions dropped without closing, store limits.

use std::sync::Arc;
use std::time::Duration;

use chat_core::{
    Chat, ChatError, Config, ErrorCode, Event, LogoutReason, MemoryStore, NewMessage, SessionState,
    Store, StoreError, Username,
};

/// A stand-in password hash for tests that use a store directly (stores
/// do not parse it).
const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

#[tokio::test]
async fn a_slow_consumer_is_logged_out_and_loses_nothing() {
    let config = Config {
        session_event_capacity: 4,
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let (alice, _alice_events) = chat.open_session();
    let (bob, mut bob_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    for i in 0..10 {
        alice.send("bob", &format!("m{i}")).await.unwrap();
    }
    for i in 0..4 {
        match bob_events.recv().await {
            Some(Event::Message(m)) => assert_eq!(m.body.as_str(), format!("m{i}")),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        bob_events.recv().await,
        Some(Event::LoggedOut {
            user: name("bob"),
            reason: LogoutReason::SlowConsumer
        })
    );
    assert_eq!(bob.state().await, SessionState::LoggedOut);
    bob.login("bob", "password1").await.unwrap();
    let rest: Vec<String> = bob
        .fetch(0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(rest, ["m4", "m5", "m6", "m7", "m8", "m9"]);
}

#[tokio::test]
async fn shutdown_is_announced_once_and_refuses_new_work() {
    let chat = Chat::in_memory();
    let (session, mut events) = chat.open_session();
    session.create("alice", "password1").await.unwrap();
    chat.shutdown();
    assert!(chat.is_shutting_down());
    assert_eq!(events.recv().await, Some(Event::Shutdown));
    assert_eq!(events.recv().await, None);
    assert_eq!(
        session.send("alice", "hi").await.unwrap_err(),
        ChatError::ShuttingDown
    );
    assert_eq!(
        session.list("", 0).await.unwrap_err().code(),
        ErrorCode::ShuttingDown
    );
    // Leaving still works while shutting down.
    session.logout().await.unwrap();
}

#[tokio::test]
async fn a_session_dropped_without_close_frees_its_account() {
    let chat = Chat::in_memory();
    let (first, _first_events) = chat.open_session();
    first.create("alice", "password1").await.unwrap();
    // The event stream stays open: only the drop hook can free the name.
    drop(first);
    let (second, _events) = chat.open_session();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match second.login("alice", "password1").await {
            Ok(state) => break assert_eq!(state, SessionState::LoggedIn(name("alice"))),
            Err(err) => {
                assert_eq!(err.code(), ErrorCode::AlreadyLoggedIn);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the drop hook never released alice"
                );
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test]
async fn logout_and_delete_are_announced_on_the_event_stream() {
    let chat = Chat::in_memory();
    let (session, mut events) = chat.open_session();
    session.create("alice", "password1").await.unwrap();
    session.logout().await.unwrap();
    assert_eq!(
        events.recv().await,
        Some(Event::LoggedOut {
            user: name("alice"),
            reason: LogoutReason::Requested
        })
    );
    session.login("alice", "password1").await.unwrap();
    session.delete("password1").await.unwrap();
    assert_eq!(
        events.recv().await,
        Some(Event::LoggedOut {
            user: name("alice"),
            reason: LogoutReason::AccountDeleted
        })
    );
}

#[tokio::test]
async fn a_full_queue_refuses_with_queue_full() {
    let chat = Chat::new(Arc::new(MemoryStore::new(3)), Config::default());
    let (alice, _a) = chat.open_session();
    let (bob, _b) = chat.open_session();
    bob.create("bob", "password1").await.unwrap();
    bob.logout().await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    for _ in 0..3 {
        alice.send("bob", "hi").await.unwrap();
    }
    assert_eq!(
        alice.send("bob", "one too many").await.unwrap_err(),
        ChatError::QueueFull(name("bob"))
    );
    bob.login("bob", "password1").await.unwrap();
    let fetched = bob.fetch(0).await.unwrap();
    assert_eq!(fetched.len(), 3);
    // Fetched but unacknowledged messages still count.
    assert_eq!(
        alice.send("bob", "still full").await.unwrap_err().code(),
        ErrorCode::QueueFull
    );
    bob.ack(fetched[2].id).await.unwrap();
    bob.logout().await.unwrap();
    alice.send("bob", "room again").await.unwrap();
}

#[tokio::test]
async fn store_keeps_messages_until_acked_and_deleted_accounts_take_nothing() {
    let store = MemoryStore::default();
    let bob = name("bob");
    store.create_account(&bob, HASH).await.unwrap();
    let message = |delivered| NewMessage {
        recipient: bob.clone(),
        sender: name("alice"),
        body: chat_core::MessageBody::parse("hi").unwrap(),
        timestamp_ms: 1,
        delivered,
        send_id: None,
    };
    let queued = store.append(message(false)).await.unwrap().message;
    let live = store.append(message(true)).await.unwrap().message;
    let later = store.append(message(false)).await.unwrap().message;
    assert!(
        queued.id < live.id && live.id < later.id,
        "one id sequence for live and queued"
    );
    assert_eq!(
        store.unacked(&bob).await.unwrap(),
        std::slice::from_ref(&live)
    );
    // An ack past a queued message the client never saw keeps it.
    assert_eq!(store.ack(&bob, later.id).await.unwrap(), 1);
    let taken = store.take_undelivered(&bob, 1).await.unwrap();
    assert_eq!(taken, std::slice::from_ref(&queued));
    assert_eq!(
        store.take_undelivered(&bob, 10).await.unwrap(),
        std::slice::from_ref(&later)
    );
    assert!(store.take_undelivered(&bob, 10).await.unwrap().is_empty());
    assert_eq!(
        store.unacked(&bob).await.unwrap(),
        [queued.clone(), later.clone()]
    );
    assert_eq!(store.ack(&bob, queued.id).await.unwrap(), 1);
    assert_eq!(store.unacked(&bob).await.unwrap(), [later]);
    assert!(store.delete_account(&bob).await.unwrap());
    assert_eq!(
        store.append(message(false)).await.unwrap_err(),
        StoreError::NoSuchAccount(bob.clone())
    );
    assert!(!store.delete_account(&bob).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_to_many_recipients_each_arrive_once() {
    const USERS: usize = 64;
    const EACH: usize = 50;
    let chat = Chat::in_memory();
    let mut sessions = Vec::new();
    for i in 0..USERS {
        let (session, events) = chat.open_session();
        session.create(&format!("u{i}"), "password1").await.unwrap();
        sessions.push((session, events));
    }
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (i, (session, mut events)) in sessions.into_iter().enumerate() {
        receivers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < EACH {
                match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
                    Ok(Some(Event::Message(m))) => got.push(m.body.to_string()),
                    other => panic!("u{i}: {other:?}"),
                }
            }
            got
        }));
        senders.push(tokio::spawn(async move {
            for n in 0..EACH {
                session
                    .send(&format!("u{}", (i + 1) % USERS), &format!("{n}"))
                    .await
                    .unwrap();
            }
            session
        }));
    }
    // Keep every session open until all messages are in: a dropped
    // session logs out, and later messages to it would be queued instead.
    let mut open = Vec::new();
    for sender in senders {
        open.push(sender.await.unwrap());
    }
    for receiver in receivers {
        let got = receiver.await.unwrap();
        let expected: Vec<String> = (0..EACH).map(|n| n.to_string()).collect();
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn a_resent_send_id_is_stored_and_pushed_once() {
    let chat = Chat::in_memory();
    let (alice, _a) = chat.open_session();
    let (bob, mut bob_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    let first = alice.send_once("bob", "once", Some(42)).await.unwrap();
    let again = alice.send_once("bob", "once", Some(42)).await.unwrap();
    assert_eq!(first, again, "the original receipt");
    let other = alice.send_once("bob", "twice", Some(43)).await.unwrap();
    assert!(other.id > first.id);
    let bodies = [bob_events.recv().await, bob_events.recv().await];
    assert!(matches!(&bodies[0], Some(Event::Message(m)) if m.body.as_str() == "once"));
    assert!(matches!(&bodies[1], Some(Event::Message(m)) if m.body.as_str() == "twice"));
    // Another sender's identical key is its own.
    let (carol, _c) = chat.open_session();
    carol.create("carol", "password1").await.unwrap();
    assert_ne!(
        carol.send_once("bob", "mine", Some(42)).await.unwrap(),
        first
    );
    // The same key for a different message (body or recipient) is refused,
    // and nothing is stored or pushed.
    for (to, body) in [("bob", "not once"), ("carol", "once")] {
        let err = alice.send_once(to, body, Some(42)).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::SendIdReused, "{to}: {err}");
    }
    alice.send_once("bob", "after", Some(44)).await.unwrap();
    let next = bob_events.recv().await;
    assert!(
        matches!(&next, Some(Event::Message(m)) if m.body.as_str() == "mine"),
        "{next:?}"
    );
    let next = bob_events.recv().await;
    assert!(
        matches!(&next, Some(Event::Message(m)) if m.body.as_str() == "after"),
        "{next:?}"
    );
}

#[tokio::test]
async fn messages_pushed_to_one_login_are_not_shown_to_the_next() {
    let chat = Chat::in_memory();
    let (alice, _a) = chat.open_session();
    let (shared, mut events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    shared.create("carol", "password1").await.unwrap();
    shared.logout().await.unwrap();
    shared.create("bob", "password1").await.unwrap();
    alice.send("bob", "for bob only").await.unwrap();
    // Bob leaves before reading; carol logs in on the same connection.
    shared.logout().await.unwrap();
    shared.login("carol", "password1").await.unwrap();
    alice.send("carol", "for carol").await.unwrap();
    loop {
        match events.recv().await {
            Some(Event::Message(m)) => {
                assert_eq!(
                    m.body.as_str(),
                    "for carol",
                    "bob's message leaked to carol"
                );
                break;
            }
            Some(Event::LoggedOut { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    // Bob's message was delivered but never acknowledged: bob gets it back.
    let (bob, mut bob_events) = chat.open_session();
    bob.login("bob", "password1").await.unwrap();
    match bob_events.recv().await {
        Some(Event::Message(m)) => assert_eq!(m.body.as_str(), "for bob only"),
        other => panic!("{other:?}"),
    }
}

/// A slow-consumer logout notice that the event stream has not yielded by
/// the time the session logs in again belongs to the old login: it is
/// dropped, not told to the new one (which would believe it was logged out
/// while the server holds its login).
#[tokio::test]
async fn a_stale_logout_notice_is_not_told_to_the_next_login() {
    let config = Config {
        session_event_capacity: 1,
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let (alice, _alice_events) = chat.open_session();
    let (bob, mut bob_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    alice.send("bob", "fills the channel").await.unwrap();
    alice.send("bob", "makes bob slow").await.unwrap();
    // Bob's connection answers a login before it gets to his events.
    bob.login("bob", "password1").await.unwrap();
    assert_eq!(
        bob.replay_pending(),
        1,
        "the pushed, unacknowledged message"
    );
    let mut seen = Vec::new();
    while let Some(Some(event)) = futures_now(bob_events.recv()) {
        seen.push(event);
    }
    assert!(
        !seen.iter().any(|e| matches!(e, Event::LoggedOut { .. })),
        "no stale logout for the new login: {seen:?}"
    );
    assert_eq!(
        seen,
        [Event::Message(chat_core::Message {
            id: 1,
            sender: name("alice"),
            body: chat_core::MessageBody::parse("fills the channel").unwrap(),
            timestamp_ms: match &seen[0] {
                Event::Message(m) => m.timestamp_ms,
                _ => 0,
            },
        })],
        "the message pushed to the old login is replayed to the new one, once"
    );
    assert_eq!(bob.state().await, SessionState::LoggedIn(name("bob")));
}

/// Polls a future once.
fn futures_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Ids never repeat for a name: a re-created account's first id is above
/// every id the deleted one had, so no client can take them for repeats.
#[tokio::test]
async fn a_recreated_accounts_ids_start_above_the_deleted_ones() {
    let store = MemoryStore::default();
    let bob = name("bob");
    store.create_account(&bob, HASH).await.unwrap();
    for _ in 0..3 {
        store
            .append(new_message("bob", "alice", None, 1))
            .await
            .unwrap();
    }
    assert!(store.delete_account(&bob).await.unwrap());
    store.create_account(&bob, HASH).await.unwrap();
    let appended = store
        .append(new_message("bob", "alice", None, 2))
        .await
        .unwrap();
    assert_eq!(appended.message.id, 4);
    // Another account's ids are its own, and never below the floor either.
    store.create_account(&name("carol"), HASH).await.unwrap();
    let carol = store
        .append(new_message("carol", "alice", None, 3))
        .await
        .unwrap();
    assert_eq!(carol.message.id, 4);
}

fn new_message(to: &str, from: &str, send_id: Option<u128>, timestamp_ms: u64) -> NewMessage {
    NewMessage {
        recipient: name(to),
        sender: name(from),
        body: chat_core::MessageBody::parse("hello").unwrap(),
        timestamp_ms,
        delivered: false,
        send_id,
    }
}

/// Send ids are forgotten after their retention by the periodic prune, not
/// only when the same sender writes again; once forgotten, the same id
/// makes a new message.
#[tokio::test]
async fn expired_send_ids_are_pruned_by_time() {
    let store = MemoryStore::default();
    store.create_account(&name("bob"), HASH).await.unwrap();
    let day = chat_core::SEND_ID_RETENTION.as_millis() as u64;
    let first = store
        .append(new_message("bob", "alice", Some(7), 1_000))
        .await
        .unwrap();
    let resent = store
        .append(new_message("bob", "alice", Some(7), 2_000))
        .await
        .unwrap();
    assert!(resent.duplicate);
    assert_eq!(
        store.prune_expired(1_000 + day).await.unwrap(),
        0,
        "not yet"
    );
    assert_eq!(store.prune_expired(1_001 + day).await.unwrap(), 1);
    let later = store
        .append(new_message("bob", "alice", Some(7), 2_000 + day))
        .await
        .unwrap();
    assert!(!later.duplicate);
    assert_ne!(later.message.id, first.message.id);
}

/// The engine prunes its store on a timer while it lives.
#[tokio::test(start_paused = true)]
async fn the_engine_prunes_its_store_periodically() {
    let store = Arc::new(TestStore::default());
    let chat = Chat::new(store.clone(), Config::default());
    tokio::time::sleep(chat_core::PRUNE_INTERVAL * 3 + Duration::from_millis(1)).await;
    assert_eq!(
        store.prunes.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "one prune per interval"
    );
    drop(chat);
}

/// A sender's remembered send ids are bounded in count too: past the
/// bound its oldest are forgotten (a resend of one is a new send), its
/// recent ones still dedupe, and other senders keep theirs.
#[tokio::test]
async fn send_ids_are_bounded_per_sender() {
    let store = MemoryStore::default().with_send_id_bound(3);
    store.create_account(&name("bob"), HASH).await.unwrap();
    let mut first = Vec::new();
    for id in 1..=5u128 {
        let appended = store
            .append(new_message("bob", "alice", Some(id), 1_000))
            .await
            .unwrap();
        first.push(appended.message.id);
    }
    let carol = store
        .append(new_message("bob", "carol", Some(1), 1_000))
        .await
        .unwrap();
    let oldest = store
        .append(new_message("bob", "alice", Some(1), 1_000))
        .await
        .unwrap();
    assert!(!oldest.duplicate, "alice's oldest send id was forgotten");
    let recent = store
        .append(new_message("bob", "alice", Some(5), 1_000))
        .await
        .unwrap();
    assert!(recent.duplicate);
    assert_eq!(recent.message.id, first[4]);
    let carol_again = store
        .append(new_message("bob", "carol", Some(1), 1_000))
        .await
        .unwrap();
    assert!(carol_again.duplicate, "another sender keeps its own");
    assert_eq!(carol_again.message.id, carol.message.id);
}

/// A user's sends are rate limited when the engine is told to: past the
/// burst, a send fails with `rate_limited` and stores nothing; tokens come
/// back with time.
#[tokio::test(start_paused = true)]
async fn sends_past_the_rate_are_refused_and_store_nothing() {
    let config = Config {
        send_rate: Some(chat_core::Rate {
            burst: 2,
            per_second: 1.0,
        }),
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let (alice, _a) = chat.open_session();
    let (bob, _b) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    bob.logout().await.unwrap();
    alice.send("bob", "one").await.unwrap();
    alice.send("bob", "two").await.unwrap();
    let err = alice.send("bob", "three").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::RateLimited, "{err}");
    // Another user has a bucket of its own.
    bob.login("bob", "password1").await.unwrap();
    bob.send("alice", "mine").await.unwrap();
    bob.logout().await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    alice.send("bob", "three, later").await.unwrap();
    bob.login("bob", "password1").await.unwrap();
    let bodies: Vec<String> = bob
        .fetch(0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(
        bodies,
        ["one", "two", "three, later"],
        "the refused one was not stored"
    );
}

/// Account creation is rate limited per peer address: one address past
/// its burst is refused, another is not, and sessions without an address
/// (an embedding app's) are not limited.
#[tokio::test(start_paused = true)]
async fn creates_are_rate_limited_per_address() {
    let config = Config {
        create_rate: Some(chat_core::Rate::per_minute(2, 1.0)),
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let here: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let there: std::net::IpAddr = "192.0.2.2".parse().unwrap();
    for name in ["a1", "a2"] {
        let (s, _e) = chat.open_session_from(here);
        s.create(name, "password1").await.unwrap();
    }
    let (third, _e) = chat.open_session_from(here);
    let err = third.create("a3", "password1").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::RateLimited, "{err}");
    let (elsewhere, _e) = chat.open_session_from(there);
    elsewhere.create("b1", "password1").await.unwrap();
    let (embedded, _e) = chat.open_session();
    embedded.create("c1", "password1").await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    third.create("a3", "password1").await.unwrap();
}

/// With a cap on accounts, creates past it fail with `account_limit`
/// (also when they race), and a delete makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_capped_when_asked() {
    let config = Config {
        max_accounts: Some(3),
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let mut creates = Vec::new();
    for i in 0..8 {
        let chat = chat.clone();
        creates.push(tokio::spawn(async move {
            let (session, _events) = chat.open_session();
            let result = session.create(&format!("user{i}"), "password1").await;
            (result.map(|_| ()), session)
        }));
    }
    let mut made = Vec::new();
    for create in creates {
        let (result, session) = create.await.unwrap();
        match result {
            Ok(()) => made.push(session),
            Err(err) => assert_eq!(err.code(), ErrorCode::AccountLimit, "{err}"),
        }
    }
    assert_eq!(made.len(), 3, "exactly the cap, even racing");
    made[0].delete("password1").await.unwrap();
    let (late, _e) = chat.open_session();
    late.create("late", "password1").await.unwrap();
}

/// Lists are rate limited per session when asked: each one scans every
/// name, so a client repeating them cannot crowd out everyone else. (Real
/// time, and a rate too slow to refill during the test: the memory store
/// lists on the blocking pool, and paused time would jump ahead while it
/// waits.)
#[tokio::test]
async fn lists_are_rate_limited_per_session() {
    let config = Config {
        list_rate: Some(chat_core::Rate {
            burst: 2,
            per_second: 1e-6,
        }),
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let (one, _e) = chat.open_session();
    let (other, _f) = chat.open_session();
    one.list("", 0).await.unwrap();
    one.list("", 0).await.unwrap();
    let err = one.list("", 0).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::RateLimited, "{err}");
    other.list("", 0).await.unwrap();
}

fn fast_config() -> Config {
    Config {
        hashing: chat_core::HashingConfig::cheap_for_tests(),
        ..Config::default()
    }
}

/// Logins check the password (a missing account and a wrong password get
/// their own codes; that both cost a hash is not measured here); delete and
/// password changes ask for the current password.
#[tokio::test]
async fn passwords_guard_login_delete_and_change() {
    let chat = Chat::new(Arc::new(MemoryStore::default()), fast_config());
    let (alice, _a) = chat.open_session();
    alice.create("alice", "first password").await.unwrap();
    alice.logout().await.unwrap();
    let err = alice.login("alice", "not the password").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongPassword);
    assert!(!err.to_string().contains("not the password"), "{err}");
    let err = alice.login("nobody", "any password").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoSuchUser);
    let err = alice.login("alice", "short").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidPassword);
    alice.login("alice", "first password").await.unwrap();
    let err = alice
        .change_password("wrong password", "second password")
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongPassword);
    alice
        .change_password("first password", "second password")
        .await
        .unwrap();
    let err = alice.delete("first password").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongPassword);
    assert_eq!(alice.state().await, SessionState::LoggedIn(name("alice")));
    alice.logout().await.unwrap();
    alice.login("alice", "second password").await.unwrap();
    alice.delete("second password").await.unwrap();
    assert_eq!(
        alice
            .login("alice", "second password")
            .await
            .unwrap_err()
            .code(),
        ErrorCode::NoSuchUser
    );
}

/// Failed attempts are throttled per account (even the right password is
/// not checked while the budget is spent) and per address (over all
/// accounts), and budgets come back with time.
#[tokio::test(start_paused = true)]
async fn failed_logins_are_throttled_per_account_and_per_address() {
    let config = Config {
        throttle: chat_core::ThrottleConfig {
            per_account: chat_core::Rate::per_minute(3, 1.0),
            per_address: chat_core::Rate::per_minute(5, 1.0),
            ..chat_core::ThrottleConfig::default()
        },
        ..fast_config()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let attacker: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    for user in ["alice", "bob", "carol"] {
        let (s, _e) = chat.open_session();
        s.create(user, "the right one").await.unwrap();
        s.close().await;
    }
    let (session, _e) = chat.open_session_from(attacker);
    for _ in 0..3 {
        let err = session.login("alice", "guess guess").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::WrongPassword);
    }
    let err = session.login("alice", "the right one").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooManyAttempts, "{err}");
    // The address has two failures left, over any account.
    for _ in 0..2 {
        let err = session.login("bob", "guess guess").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::WrongPassword);
    }
    let err = session.login("carol", "the right one").await.unwrap_err();
    assert_eq!(
        err.code(),
        ErrorCode::TooManyAttempts,
        "the address is spent"
    );
    // Alice herself, from elsewhere, waits out her account's budget too.
    let (owner, _e) = chat.open_session_from("203.0.113.9".parse().unwrap());
    let err = owner.login("alice", "the right one").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooManyAttempts);
    tokio::time::advance(Duration::from_secs(61)).await;
    owner.login("alice", "the right one").await.unwrap();
}

/// An account from before passwords has no hash: its next login sets the
/// password given, but only over a trusted connection (loopback, TLS, or an
/// embedding app); anywhere else it is refused, so nobody else can take it.
#[tokio::test]
async fn an_account_from_before_passwords_sets_one_over_a_trusted_connection_only() {
    let store = Arc::new(TestStore {
        legacy: true,
        ..TestStore::default()
    });
    store
        .inner
        .create_account(&name("old"), "unused")
        .await
        .unwrap();
    let chat = Chat::new(store.clone(), fast_config());
    let (remote, _e) = chat.open_session_from("192.0.2.10".parse().unwrap());
    let err = remote.login("old", "a new password").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::PasswordNotSet, "{err}");
    let (local, _e) = chat.open_session_from("127.0.0.1".parse().unwrap());
    local.login("old", "a new password").await.unwrap();
    local.logout().await.unwrap();
    // From now on it is an account like any other.
    let err = remote.login("old", "another guess").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongPassword);
    remote.login("old", "a new password").await.unwrap();
    remote.logout().await.unwrap();

    // Over TLS from anywhere.
    store
        .inner
        .create_account(&name("older"), "unused")
        .await
        .unwrap();
    let (encrypted, _e) = chat.open_session_over("192.0.2.10".parse().unwrap(), true);
    encrypted.login("older", "its new password").await.unwrap();
    encrypted.logout().await.unwrap();
    let err = remote.login("older", "a wrong guess").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongPassword);
}

/// A memory store that counts the engine's prune calls and, if `legacy`,
/// shows its accounts without a password until one is set (as accounts
/// stored before passwords existed).
#[derive(Default)]
struct TestStore {
    inner: MemoryStore,
    prunes: std::sync::atomic::AtomicUsize,
    legacy: bool,
    set: std::sync::Mutex<std::collections::HashSet<Username>>,
}

#[async_trait::async_trait]
impl Store for TestStore {
    async fn create_account(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.inner.create_account(name, hash).await
    }
    async fn credentials(
        &self,
        name: &Username,
    ) -> Result<Option<chat_core::Credentials>, StoreError> {
        let found = self.inner.credentials(name).await?;
        if !self.legacy || self.set.lock().unwrap().contains(name) {
            return Ok(found);
        }
        Ok(found.map(|_| chat_core::Credentials {
            password_hash: None,
        }))
    }
    async fn set_password(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.inner.set_password(name, hash).await?;
        self.set.lock().unwrap().insert(name.clone());
        Ok(())
    }
    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        self.inner.account_exists(name).await
    }
    async fn account_count(&self) -> Result<usize, StoreError> {
        self.inner.account_count().await
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
    async fn append(&self, message: NewMessage) -> Result<chat_core::Appended, StoreError> {
        self.inner.append(message).await
    }
    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<chat_core::Message>, StoreError> {
        self.inner.take_undelivered(name, limit).await
    }
    async fn unacked(&self, name: &Username) -> Result<Vec<chat_core::Message>, StoreError> {
        self.inner.unacked(name).await
    }
    async fn ack(&self, name: &Username, through: u64) -> Result<usize, StoreError> {
        self.inner.ack(name, through).await
    }
    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.prunes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.prune_expired(now_ms).await
    }
}

/// Attempts made in parallel are charged before they are checked: a
/// budget with room for three lets three through, however many are sent
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_cannot_outrun_the_throttle() {
    let config = Config {
        throttle: chat_core::ThrottleConfig {
            per_account: chat_core::Rate::per_minute(3, 1e-6),
            ..chat_core::ThrottleConfig::default()
        },
        ..fast_config()
    };
    let chat = Chat::new(Arc::new(MemoryStore::default()), config);
    let (owner, _e) = chat.open_session();
    owner.create("alice", "the right one").await.unwrap();
    owner.close().await;
    let mut guesses = Vec::new();
    for i in 0..20 {
        let chat = chat.clone();
        guesses.push(tokio::spawn(async move {
            let peer = std::net::IpAddr::from([198, 51, 100, i]);
            let (s, _e) = chat.open_session_from(peer);
            s.login("alice", "guess guess").await.unwrap_err().code()
        }));
    }
    let mut checked = 0;
    for guess in guesses {
        match guess.await.unwrap() {
            ErrorCode::WrongPassword => checked += 1,
            ErrorCode::TooManyAttempts => {}
            other => panic!("{other}"),
        }
    }
    assert_eq!(checked, 3, "only the account's budget was checked");
}

/// A memory store whose staged writes become durable only when the test
/// says so: each `stage` takes the next position, `release(n)` makes
/// positions up to `n` durable.
#[derive(Debug)]
struct HeldStore {
    memory: MemoryStore,
    staged: std::sync::atomic::AtomicU64,
    durable: tokio::sync::watch::Sender<u64>,
}

impl HeldStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            memory: MemoryStore::default(),
            staged: std::sync::atomic::AtomicU64::new(0),
            durable: tokio::sync::watch::Sender::new(0),
        })
    }

    fn release(&self, through: u64) {
        self.durable.send_replace(through);
    }
}

impl chat_core::DurableWait for HeldStore {
    fn reached(&self, position: u64) -> Option<Result<(), StoreError>> {
        (*self.durable.borrow() >= position).then_some(Ok(()))
    }

    fn wait(
        &self,
        position: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
    {
        let mut durable = self.durable.subscribe();
        Box::pin(async move {
            durable
                .wait_for(|d| *d >= position)
                .await
                .map(|_| ())
                .map_err(|_| StoreError::Unavailable("gone".into()))
        })
    }
}

/// The store's operations, delegated; only `stage` differs.
struct Held(Arc<HeldStore>);

#[async_trait::async_trait]
impl Store for Held {
    async fn create_account(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.0.memory.create_account(name, hash).await
    }
    async fn credentials(
        &self,
        name: &Username,
    ) -> Result<Option<chat_core::Credentials>, StoreError> {
        self.0.memory.credentials(name).await
    }
    async fn set_password(&self, name: &Username, hash: &str) -> Result<(), StoreError> {
        self.0.memory.set_password(name, hash).await
    }
    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        self.0.memory.account_exists(name).await
    }
    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        self.0.memory.delete_account(name).await
    }
    async fn list_accounts(
        &self,
        pattern: &regex::Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        self.0.memory.list_accounts(pattern, limit).await
    }
    async fn append(&self, message: NewMessage) -> Result<chat_core::Appended, StoreError> {
        self.0.memory.append(message).await
    }
    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<chat_core::Message>, StoreError> {
        self.0.memory.take_undelivered(name, limit).await
    }
    async fn unacked(&self, name: &Username) -> Result<Vec<chat_core::Message>, StoreError> {
        self.0.memory.unacked(name).await
    }
    async fn ack(&self, name: &Username, through: u64) -> Result<usize, StoreError> {
        self.0.memory.ack(name, through).await
    }
    async fn account_count(&self) -> Result<usize, StoreError> {
        self.0.memory.account_count().await
    }
    async fn stage(
        &self,
        message: NewMessage,
    ) -> Result<(chat_core::Appended, chat_core::Durable), StoreError> {
        let appended = self.0.memory.append(message).await?;
        let position = self
            .0
            .staged
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let waiter: Arc<dyn chat_core::DurableWait> = self.0.clone();
        Ok((appended, chat_core::Durable::at(waiter, position)))
    }
}

/// A staged send holds nothing while its message becomes durable: the
/// sender's next send is staged meanwhile, in order, but neither receipt
/// nor push is given before the store says the message is durable.
#[tokio::test]
async fn a_send_is_answered_and_pushed_only_once_durable() {
    let held = HeldStore::new();
    let chat = Chat::new(Arc::new(Held(Arc::clone(&held))), fast_config());
    let (alice, _alice_events) = chat.open_session();
    let alice = Arc::new(alice);
    let (bob, mut bob_events) = chat.open_session();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();

    let (first, first_durable) = alice.send_staged("bob", "one", None).await.unwrap();
    // The session is free: the next send stages behind the first.
    let (second, second_durable) = alice.send_staged("bob", "two", None).await.unwrap();
    assert!(second.id > first.id, "staged in order");
    assert!(
        futures_now(first_durable.wait()).is_none(),
        "not durable before the store says so"
    );
    assert!(
        futures_now(bob_events.recv()).is_none(),
        "no push before its message is durable"
    );
    // A plain send waits for its own durability.
    let third = tokio::spawn({
        let alice = Arc::clone(&alice);
        async move { alice.send("bob", "three").await }
    });
    tokio::task::yield_now().await;
    assert!(!third.is_finished());

    held.release(1);
    first_durable.wait().await.unwrap();
    assert!(futures_now(second_durable.wait()).is_none());
    match bob_events.recv().await {
        Some(Event::Message(m)) => assert_eq!(m.body.as_str(), "one"),
        other => panic!("{other:?}"),
    }
    assert!(
        futures_now(bob_events.recv()).is_none(),
        "two is not durable"
    );

    held.release(3);
    second_durable.wait().await.unwrap();
    let third = third.await.unwrap().unwrap();
    assert!(third.id > second.id);
    for body in ["two", "three"] {
        match bob_events.recv().await {
            Some(Event::Message(m)) => assert_eq!(m.body.as_str(), body),
            other => panic!("{other:?}"),
        }
    }
}
