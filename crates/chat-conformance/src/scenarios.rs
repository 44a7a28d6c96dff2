//! The scenarios. Each takes a [`Connector`] to a fresh server and panics
//! with a description of what went wrong.

use std::time::Duration;

use chat_core::client::{ChatClient, ClientError};
use chat_core::{ErrorCode, Message, SessionState, Username};

use crate::{Connector, PATIENCE, next_message};

fn user(name: &str) -> SessionState {
    SessionState::LoggedIn(Username::parse(name).expect("valid test name"))
}

fn names(list: &[Username]) -> Vec<&str> {
    list.iter().map(Username::as_str).collect()
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Server { code: got, message }) if got == code => message,
        other => panic!("expected error {code}, got {other:?}"),
    }
}

/// Create logs in; logout, login and delete move the state as the server
/// reports it; a deleted name can be created again.
pub async fn account_lifecycle<K: Connector>(k: &K) {
    let mut c = k.connect().await;
    assert_eq!(c.state(), &SessionState::LoggedOut);
    assert_eq!(c.create("alice", "password1").await.unwrap(), user("alice"));
    assert_eq!(c.state(), &user("alice"));
    assert_eq!(c.logout().await.unwrap(), SessionState::LoggedOut);
    assert_eq!(c.state(), &SessionState::LoggedOut);
    assert_eq!(c.login("alice", "password1").await.unwrap(), user("alice"));
    assert_eq!(
        c.delete("password1").await.unwrap(),
        SessionState::LoggedOut
    );
    expect_code(c.login("alice", "password1").await, ErrorCode::NoSuchUser);
    assert_eq!(c.create("alice", "password1").await.unwrap(), user("alice"));
    // One session may be different users in turn.
    c.logout().await.unwrap();
    assert_eq!(c.create("bob", "password1").await.unwrap(), user("bob"));
}

/// A taken name cannot be created twice; a logged-in session cannot create
/// or log in without logging out first.
pub async fn double_create_rejected<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("bob", "password1").await.unwrap();
    expect_code(b.create("bob", "password1").await, ErrorCode::UsernameTaken);
    assert_eq!(b.state(), &SessionState::LoggedOut);
    expect_code(
        a.create("carol", "password1").await,
        ErrorCode::SessionLoggedIn,
    );
    expect_code(
        a.login("bob", "password1").await,
        ErrorCode::SessionLoggedIn,
    );
    assert_eq!(
        a.state(),
        &user("bob"),
        "a failed request still reports the state"
    );
}

/// An account is logged in on at most one session.
pub async fn concurrent_login_rejected<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    expect_code(
        b.login("alice", "password1").await,
        ErrorCode::AlreadyLoggedIn,
    );
    a.logout().await.unwrap();
    assert_eq!(b.login("alice", "password1").await.unwrap(), user("alice"));
    expect_code(
        a.login("alice", "password1").await,
        ErrorCode::AlreadyLoggedIn,
    );
}

/// The server checks everything itself, whatever the client sends.
pub async fn bad_requests_get_clear_errors<K: Connector>(k: &K) {
    let mut c = k.connect().await;
    expect_code(c.logout().await, ErrorCode::NotLoggedIn);
    expect_code(c.delete("password1").await, ErrorCode::NotLoggedIn);
    expect_code(c.fetch(10).await, ErrorCode::NotLoggedIn);
    expect_code(c.send("anyone", "hi").await, ErrorCode::NotLoggedIn);
    expect_code(c.create("", "password1").await, ErrorCode::InvalidUsername);
    expect_code(
        c.create("has space", "password1").await,
        ErrorCode::InvalidUsername,
    );
    expect_code(
        c.create(&"x".repeat(51), "password1").await,
        ErrorCode::InvalidUsername,
    );
    expect_code(
        c.login("tab\there", "password1").await,
        ErrorCode::InvalidUsername,
    );
    c.create(&"é".repeat(50), "password1").await.unwrap();
    c.logout().await.unwrap();
    c.create("sender", "password1").await.unwrap();
    expect_code(c.send("sender", "").await, ErrorCode::InvalidMessage);
    expect_code(
        c.send("sender", "line\nbreak").await,
        ErrorCode::InvalidMessage,
    );
    let message = expect_code(
        c.send("sender", &"y".repeat(281)).await,
        ErrorCode::MessageTooLong,
    );
    assert!(
        message.contains("281"),
        "the error says how long: {message}"
    );
    c.send("sender", &"😀".repeat(280)).await.unwrap();
    assert_eq!(c.state(), &user("sender"));
}

/// Sending to a name nobody has fails with `no_such_user`.
pub async fn send_to_unknown_user<K: Connector>(k: &K) {
    let mut c = k.connect().await;
    c.create("alice", "password1").await.unwrap();
    let message = expect_code(c.send("nobody", "hello?").await, ErrorCode::NoSuchUser);
    assert!(message.contains("nobody"), "{message}");
}

/// Messages to a logged-out user wait in its queue; fetch takes them oldest
/// first, at most as many as asked, each once.
pub async fn queued_delivery_then_fetch<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    b.logout().await.unwrap();
    let mut receipts = Vec::new();
    for body in ["one", "two", "three"] {
        receipts.push(a.send("bob", body).await.unwrap());
    }
    assert!(
        receipts.windows(2).all(|w| w[0].id < w[1].id),
        "ids increase: {receipts:?}"
    );
    b.login("bob", "password1").await.unwrap();
    let first = b.fetch(2).await.unwrap();
    assert_eq!(
        first.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert!(first.iter().all(|m| m.sender.as_str() == "alice"));
    assert_eq!(first[0].id, receipts[0].id);
    assert!(first[0].timestamp_ms > 0 && first[0].timestamp_ms <= first[1].timestamp_ms);
    let rest = b.fetch(0).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].body.as_str(), "three");
    assert!(
        b.fetch(10).await.unwrap().is_empty(),
        "fetched messages leave the queue"
    );
}

/// Messages to a logged-in user arrive live, in send order, and are not
/// queued as well.
pub async fn live_delivery_in_order<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    for i in 0..50 {
        a.send("bob", &format!("live {i}")).await.unwrap();
    }
    let mut last_id = 0;
    for i in 0..50 {
        let m = next_message(&mut b).await;
        assert_eq!(
            (m.sender.as_str(), m.body.as_str()),
            ("alice", format!("live {i}").as_str())
        );
        assert!(m.id > last_id, "ids increase");
        last_id = m.id;
    }
    assert!(
        b.fetch(0).await.unwrap().is_empty(),
        "live messages are not queued too"
    );
    // Live and queued ids share one sequence.
    b.logout().await.unwrap();
    let queued = a.send("bob", "later").await.unwrap();
    assert!(queued.id > last_id);
}

/// Pipelined sends: many in flight at once, stored and delivered in the
/// order they were made, answered in that order; one refused in the middle
/// is answered with its error and the rest go on. Acknowledged in batches,
/// they are not delivered again.
pub async fn pipelined_sends_in_order<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    const SENDS: usize = 300;
    const REFUSED: usize = 150;
    for i in 0..SENDS {
        let to = if i == REFUSED { "nobody" } else { "bob" };
        a.send_pipelined(to, &format!("pipelined {i}"))
            .await
            .unwrap();
        assert_eq!(a.in_flight(), i + 1, "nothing is answered until asked");
    }
    let mut last_id = 0;
    for i in 0..SENDS {
        let receipt = a.next_receipt().await;
        if i == REFUSED {
            expect_code(receipt, ErrorCode::NoSuchUser);
            continue;
        }
        let receipt = receipt.unwrap_or_else(|e| panic!("send {i}: {e}"));
        assert!(receipt.id > last_id, "answered in order");
        last_id = receipt.id;
    }
    assert_eq!(a.in_flight(), 0);
    assert!(
        a.next_receipt().await.is_err(),
        "no receipt without a send in flight"
    );
    for i in (0..SENDS).filter(|&i| i != REFUSED) {
        let m = next_message(&mut b).await;
        assert_eq!(m.body.as_str(), format!("pipelined {i}"), "stored in order");
        b.ack_later(m.id).await.unwrap();
    }
    // Logging out sends what is still batched.
    b.logout().await.unwrap();
    b.login("bob", "password1").await.unwrap();
    a.send("bob", "marker").await.unwrap();
    assert_eq!(
        next_message(&mut b).await.body.as_str(),
        "marker",
        "nothing acknowledged in a batch is delivered again"
    );
}

/// A batch of acknowledgements smaller than [`AckBatch::EVERY`] still goes
/// out, [`AckBatch::DELAY`] after its first message, while the application
/// waits for pushes.
///
/// [`AckBatch::EVERY`]: chat_core::client::AckBatch::EVERY
/// [`AckBatch::DELAY`]: chat_core::client::AckBatch::DELAY
pub async fn batched_acks_go_out_when_due<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    for body in ["m1", "m2", "m3"] {
        a.send("bob", body).await.unwrap();
    }
    for _ in 0..3 {
        let m = next_message(&mut b).await;
        b.ack_later(m.id).await.unwrap();
    }
    // Waiting for a push that does not come lets the batch fall due.
    let nothing =
        tokio::time::timeout(chat_core::client::AckBatch::DELAY * 40, b.next_push()).await;
    assert!(nothing.is_err(), "no push expected, got {nothing:?}");
    drop(b); // no logout: only the timed acknowledgement went out

    let mut b = k.connect().await;
    login_when_free(&mut b, "bob").await;
    a.send("bob", "m4").await.unwrap();
    assert_eq!(
        next_message(&mut b).await.body.as_str(),
        "m4",
        "the acknowledged messages are not replayed"
    );
}

/// Deleting an account logs it out, drops its queue and frees the name.
pub async fn delete_drops_queue_and_frees_name<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    b.logout().await.unwrap();
    a.send("bob", "you will never read this").await.unwrap();
    b.login("bob", "password1").await.unwrap();
    assert_eq!(
        b.delete("password1").await.unwrap(),
        SessionState::LoggedOut
    );
    expect_code(a.send("bob", "hello?").await, ErrorCode::NoSuchUser);
    expect_code(b.fetch(1).await, ErrorCode::NotLoggedIn);
    let mut c = k.connect().await;
    c.create("bob", "password1").await.unwrap();
    assert!(
        c.fetch(0).await.unwrap().is_empty(),
        "the old queue is gone"
    );
}

/// List filters by regex (unanchored), sorts, caps, and rejects bad
/// patterns with the regex error; it works logged out.
pub async fn list_accounts_by_pattern<K: Connector>(k: &K) {
    let mut c = k.connect().await;
    for name in ["bob", "alice", "albert", "Émile", "carol"] {
        c.create(name, "password1").await.unwrap();
        c.logout().await.unwrap();
    }
    assert_eq!(
        names(&c.list("", 0).await.unwrap()),
        ["albert", "alice", "bob", "carol", "Émile"]
    );
    assert_eq!(names(&c.list("^al", 0).await.unwrap()), ["albert", "alice"]);
    assert_eq!(
        names(&c.list("l", 0).await.unwrap()),
        ["albert", "alice", "carol", "Émile"]
    );
    assert_eq!(names(&c.list("^bob$", 0).await.unwrap()), ["bob"]);
    assert_eq!(names(&c.list("^o", 0).await.unwrap()), Vec::<&str>::new());
    assert_eq!(names(&c.list("", 2).await.unwrap()), ["albert", "alice"]);
    assert_eq!(names(&c.list("(?i)^é", 0).await.unwrap()), ["Émile"]);
    let message = expect_code(c.list("(unclosed", 0).await, ErrorCode::InvalidPattern);
    assert!(
        message.contains("unclosed") || message.contains("parse"),
        "{message}"
    );
    // Compiles to far more than the size limit.
    expect_code(
        c.list(r"\w{1000}{1000}", 0).await,
        ErrorCode::InvalidPattern,
    );
    expect_code(
        c.list(&"a".repeat(1_000), 0).await,
        ErrorCode::InvalidPattern,
    );
    c.login("bob", "password1").await.unwrap();
    assert_eq!(c.list("b", 0).await.unwrap().len(), 2);
}

/// A connection that drops (no logout) logs its user out.
pub async fn connection_drop_logs_out<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    drop(a);
    let mut b = k.connect().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match b.login("alice", "password1").await {
            Ok(state) => {
                assert_eq!(state, user("alice"));
                break;
            }
            Err(err) if err.code() == Some(ErrorCode::AlreadyLoggedIn) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "alice still logged in after the drop"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("unexpected {err}"),
        }
    }
}

/// Many clients create at once: one winner per name, every distinct name
/// succeeds.
pub async fn concurrent_creates_one_winner_per_name<K: Connector>(k: &K) {
    const CLIENTS: usize = 32;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(k.connect().await);
    }
    let results = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| c.create("contested", "password1")),
    )
    .await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for r in &results {
        if let Err(err) = r {
            assert_eq!(err.code(), Some(ErrorCode::UsernameTaken), "{err}");
        }
    }
    let mut losers: Vec<_> = clients
        .into_iter()
        .zip(&results)
        .filter(|(_, r)| r.is_err())
        .map(|(c, _)| c)
        .collect();
    let distinct = futures::future::join_all(
        losers
            .iter_mut()
            .enumerate()
            .map(|(i, c)| async move { c.create(&format!("own{i}"), "password1").await }),
    )
    .await;
    assert!(distinct.iter().all(Result::is_ok), "{distinct:?}");
}

/// Hundreds of concurrent clients send to each other; every message is
/// delivered exactly once, in order per sender, live or queued.
pub async fn hundreds_of_clients_exactly_once<K: Connector>(k: &K) {
    const CLIENTS: usize = 200;
    const EACH: usize = 10;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = k.connect().await;
        c.create(&format!("user{i}"), "password1").await.unwrap();
        clients.push(c);
    }
    // Every fourth recipient is offline while the messages fly.
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 4 == 0 {
            c.logout().await.unwrap();
        }
    }
    let tasks = clients.into_iter().enumerate().map(|(i, mut c)| {
        tokio::spawn(async move {
            let to = format!("user{}", (i + 1) % CLIENTS);
            if i % 4 == 0 {
                c.login(&format!("user{i}"), "password1").await.unwrap();
            }
            for n in 0..EACH {
                c.send(&to, &format!("{i}:{n}")).await.unwrap();
            }
            c
        })
    });
    let mut clients = Vec::new();
    for task in futures::future::join_all(tasks).await {
        clients.push(task.expect("sender task"));
    }
    // Offline recipients logged back in above, possibly before or after
    // their messages were sent: they may have some queued, some live.
    let checks = clients.into_iter().enumerate().map(|(i, mut c)| {
        tokio::spawn(async move {
            let from = (i + CLIENTS - 1) % CLIENTS;
            let mut got: Vec<Message> = Vec::new();
            loop {
                got.extend(c.fetch(0).await.unwrap());
                if got.len() >= EACH {
                    break;
                }
                let live = next_message(&mut c).await;
                got.push(live);
            }
            got.sort_by_key(|m| m.id);
            let bodies: Vec<String> = got.iter().map(|m| m.body.as_str().to_owned()).collect();
            let expected: Vec<String> = (0..EACH).map(|n| format!("{from}:{n}")).collect();
            assert_eq!(bodies, expected, "user{i} got each message once, in order");
            assert!(c.fetch(0).await.unwrap().is_empty());
        })
    });
    for check in futures::future::join_all(checks).await {
        check.expect("recipient check");
    }
}

/// A message pushed live but never acknowledged (the recipient's client
/// died before it could) is delivered again at the next login, in order and
/// before newer live messages; acknowledged ones never come back.
pub async fn unacked_messages_are_delivered_again<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    for body in ["m1", "m2", "m3"] {
        a.send("bob", body).await.unwrap();
    }
    let m1 = next_message(&mut b).await;
    next_message(&mut b).await;
    next_message(&mut b).await;
    b.ack(m1.id).await.unwrap();
    drop(b); // m2 and m3 were shown but never acknowledged

    let mut b = k.connect().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(err) = b.login("bob", "password1").await {
        assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "{err}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob never logged out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.send("bob", "m4").await.unwrap();
    let again: Vec<String> = [
        next_message(&mut b).await,
        next_message(&mut b).await,
        next_message(&mut b).await,
    ]
    .iter()
    .map(|m| m.body.to_string())
    .collect();
    assert_eq!(
        again,
        ["m2", "m3", "m4"],
        "replayed in order, before the new live message"
    );
    assert!(
        b.fetch(0).await.unwrap().is_empty(),
        "replayed messages are not queued as well"
    );
}

/// Fetched messages stay stored until acknowledged: a fetch that was never
/// acknowledged is replayed at the next login; an acknowledged one is gone.
/// A client shows each message once even when the server replays it.
pub async fn fetched_messages_need_an_ack<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    b.logout().await.unwrap();
    a.send("bob", "q1").await.unwrap();
    a.send("bob", "q2").await.unwrap();
    b.login("bob", "password1").await.unwrap();
    let fetched = b.fetch(0).await.unwrap();
    assert_eq!(fetched.len(), 2);
    b.ack(fetched[0].id).await.unwrap();

    // Same client, logged out and back in: q2 is replayed by the server
    // but this client has shown it already.
    b.logout().await.unwrap();
    b.login("bob", "password1").await.unwrap();
    a.send("bob", "live").await.unwrap();
    assert_eq!(
        next_message(&mut b).await.body.as_str(),
        "live",
        "q2 was not shown twice"
    );

    // A new client has shown nothing: it gets q2 again, then nothing else.
    drop(b);
    let mut c = k.connect().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(err) = c.login("bob", "password1").await {
        assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "{err}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob never logged out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let replayed = [next_message(&mut c).await, next_message(&mut c).await];
    assert_eq!(
        replayed.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["q2", "live"]
    );
    c.ack(replayed[1].id).await.unwrap();
    c.logout().await.unwrap();
    let mut d = k.connect().await;
    d.login("bob", "password1").await.unwrap();
    a.send("bob", "after the ack").await.unwrap();
    assert_eq!(
        next_message(&mut d).await.body.as_str(),
        "after the ack",
        "acknowledged messages are gone"
    );
}

/// Logs in as `name`, waiting out a previous connection the server has not
/// yet seen close.
async fn login_when_free<C: ChatClient>(client: &mut C, name: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(err) = client.login(name, "password1").await {
        assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "{err}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never logged out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A cumulative acknowledgement never deletes a message the client has not
/// handed out: a replayed message with a lower id than a fetched one
/// survives the fetch's acknowledgement if it was not read.
pub async fn acks_never_cover_unseen_messages<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    a.send("bob", "pushed, never acknowledged").await.unwrap();
    next_message(&mut b).await;
    drop(b);
    // While bob is away, a queued message with a higher id.
    let mut c = k.connect().await;
    login_when_free(&mut c, "bob").await;
    c.logout().await.unwrap();
    a.send("bob", "queued").await.unwrap();
    c.login("bob", "password1").await.unwrap();
    let fetched = c.fetch(0).await.unwrap();
    assert_eq!(fetched.len(), 1);
    c.ack(fetched[0].id).await.unwrap(); // the replayed message is still unread
    drop(c);
    let mut d = k.connect().await;
    login_when_free(&mut d, "bob").await;
    assert_eq!(
        next_message(&mut d).await.body.as_str(),
        "pushed, never acknowledged"
    );
}

/// Deleting an account and creating it again on the same client: the new
/// account's ids are all new (above the old account's), and the client
/// shows every one of its messages.
pub async fn a_recreated_account_starts_afresh<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    a.send("bob", "first life").await.unwrap();
    let first = next_message(&mut b).await;
    b.ack(first.id).await.unwrap();
    b.delete("password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    a.send("bob", "second life").await.unwrap();
    let second = next_message(&mut b).await;
    assert_eq!(second.body.as_str(), "second life");
    assert!(
        second.id > first.id,
        "ids never repeat for a name: {} after {}",
        second.id,
        first.id
    );
}

/// A client that logged out still remembers the ids it showed (to drop
/// redeliveries). If meanwhile someone deletes the account and creates it
/// again, the new account's messages must not look like repeats to it:
/// it shows them all, and its acknowledgement deletes only what it showed.
pub async fn a_returning_client_sees_a_recreated_accounts_messages<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    let mut b = k.connect().await;
    a.create("alice", "password1").await.unwrap();
    b.create("bob", "password1").await.unwrap();
    for body in ["old 1", "old 2"] {
        a.send("bob", body).await.unwrap();
    }
    next_message(&mut b).await;
    next_message(&mut b).await; // shown, never acknowledged
    b.logout().await.unwrap();

    let mut c = k.connect().await;
    c.login("bob", "password1").await.unwrap();
    c.delete("password1").await.unwrap();
    c.create("bob", "password1").await.unwrap();
    c.logout().await.unwrap();
    for body in ["new 1", "new 2"] {
        a.send("bob", body).await.unwrap();
    }

    b.login("bob", "password1").await.unwrap();
    let fetched = b.fetch(0).await.unwrap();
    assert_eq!(
        fetched.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["new 1", "new 2"],
        "the new account's queued messages are not taken for repeats"
    );
    b.ack(fetched[0].id).await.unwrap();
    b.logout().await.unwrap();
    let mut d = k.connect().await;
    d.login("bob", "password1").await.unwrap();
    assert_eq!(
        next_message(&mut d).await.body.as_str(),
        "new 2",
        "the acknowledgement covered only what was shown"
    );
}

/// Passwords: a login needs the right one; a wrong one is refused with
/// `wrong_password` and logs nobody in; a change takes effect at once; a
/// delete asks for the current one; a weak one is refused at create.
pub async fn passwords_guard_accounts<K: Connector>(k: &K) {
    let mut a = k.connect().await;
    expect_code(a.create("alice", "short").await, ErrorCode::InvalidPassword);
    a.create("alice", "first password").await.unwrap();
    a.logout().await.unwrap();
    let mut b = k.connect().await;
    expect_code(
        b.login("alice", "not her password").await,
        ErrorCode::WrongPassword,
    );
    assert_eq!(b.state(), &SessionState::LoggedOut);
    a.login("alice", "first password").await.unwrap();
    expect_code(
        a.change_password("wrong old one", "second password").await,
        ErrorCode::WrongPassword,
    );
    a.change_password("first password", "second password")
        .await
        .unwrap();
    expect_code(a.delete("first password").await, ErrorCode::WrongPassword);
    assert_eq!(a.state(), &user("alice"), "still logged in");
    a.logout().await.unwrap();
    expect_code(
        b.login("alice", "first password").await,
        ErrorCode::WrongPassword,
    );
    b.login("alice", "second password").await.unwrap();
    b.delete("second password").await.unwrap();
    expect_code(
        b.login("alice", "second password").await,
        ErrorCode::NoSuchUser,
    );
}
