//! The PostgreSQL store against a real PostgreSQL server
//! (`CHAT_TEST_DATABASE_URL`, a fresh schema per test): what the store
//! promises, and that two stores on one database (two server processes)
//! never give an id twice, store a send twice, or both create one name.

use std::collections::BTreeSet;
use std::sync::Arc;

use chat_conformance::postgres::TestDatabase;
use chat_core::{MessageBody, NewMessage, Store, StoreError, Username};
use chat_store_pg::{PgOptions, PgStore};

const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";

fn name(text: &str) -> Username {
    Username::parse(text).unwrap()
}

fn message(to: &str, from: &str, body: &str, send_id: Option<u128>) -> NewMessage {
    NewMessage {
        recipient: name(to),
        sender: name(from),
        body: MessageBody::parse(body).unwrap(),
        timestamp_ms: chat_core::now_ms(),
        delivered: false,
        send_id,
    }
}

async fn open(db: &TestDatabase, queue_limit: usize) -> PgStore {
    PgStore::connect(
        &db.url,
        PgOptions {
            queue_limit,
            ..PgOptions::default()
        },
    )
    .await
    .expect("connect and migrate")
}

macro_rules! database {
    ($test:expr) => {
        match TestDatabase::create($test).await {
            Some(db) => db,
            None => return,
        }
    };
}

#[tokio::test]
async fn a_message_is_queued_taken_replayed_and_acknowledged() {
    let db = database!("a_message_is_queued_taken_replayed_and_acknowledged");
    let store = open(&db, 100).await;
    store.create_account(&name("alice"), HASH).await.unwrap();
    store.create_account(&name("bob"), HASH).await.unwrap();
    assert!(matches!(
        store.create_account(&name("bob"), HASH).await,
        Err(StoreError::AccountExists(_))
    ));
    for n in 1..=3 {
        let appended = store
            .append(message("bob", "alice", &format!("m{n}"), None))
            .await
            .unwrap();
        assert_eq!(appended.message.id, n, "ids start at 1 and go up by one");
    }
    let taken = store.take_undelivered(&name("bob"), 2).await.unwrap();
    assert_eq!(taken.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(store.unacked(&name("bob")).await.unwrap().len(), 2);
    assert_eq!(
        store.ack(&name("bob"), 3).await.unwrap(),
        2,
        "the queued one stays"
    );
    let rest = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].body.as_str(), "m3");
    assert_eq!(store.ack(&name("bob"), 3).await.unwrap(), 1);
    assert!(store.unacked(&name("bob")).await.unwrap().is_empty());
    assert!(matches!(
        store.take_undelivered(&name("nobody"), 1).await,
        Err(StoreError::NoSuchAccount(_))
    ));
    assert_eq!(store.account_count().await.unwrap(), 2);
}

#[tokio::test]
async fn ids_never_repeat_for_a_name_and_the_queue_is_bounded() {
    let db = database!("ids_never_repeat_for_a_name_and_the_queue_is_bounded");
    let store = open(&db, 2).await;
    store.create_account(&name("alice"), HASH).await.unwrap();
    store.create_account(&name("bob"), HASH).await.unwrap();
    store
        .append(message("bob", "alice", "one", None))
        .await
        .unwrap();
    store
        .append(message("bob", "alice", "two", None))
        .await
        .unwrap();
    assert!(matches!(
        store.append(message("bob", "alice", "three", None)).await,
        Err(StoreError::QueueFull(_))
    ));
    assert!(store.delete_account(&name("bob")).await.unwrap());
    assert!(!store.delete_account(&name("bob")).await.unwrap());
    assert!(matches!(
        store.append(message("bob", "alice", "gone", None)).await,
        Err(StoreError::NoSuchAccount(_))
    ));
    store.create_account(&name("bob"), HASH).await.unwrap();
    let fresh = store
        .append(message("bob", "alice", "again", None))
        .await
        .unwrap();
    assert_eq!(fresh.message.id, 3, "above every id of the deleted account");
}

#[tokio::test]
async fn a_send_id_stores_once_and_cannot_be_reused_for_another_message() {
    let db = database!("a_send_id_stores_once_and_cannot_be_reused_for_another_message");
    let store = open(&db, 100).await;
    store.create_account(&name("alice"), HASH).await.unwrap();
    store.create_account(&name("bob"), HASH).await.unwrap();
    let first = store
        .append(message("bob", "alice", "hello", Some(7)))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = store
        .append(message("bob", "alice", "hello", Some(7)))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.id, first.message.id);
    assert_eq!(again.message.timestamp_ms, first.message.timestamp_ms);
    assert!(matches!(
        store
            .append(message("bob", "alice", "different", Some(7)))
            .await,
        Err(StoreError::SendIdReused(_))
    ));
    // Another sender's key 7 is its own.
    store.create_account(&name("carol"), HASH).await.unwrap();
    let carol = store
        .append(message("bob", "carol", "hello", Some(7)))
        .await
        .unwrap();
    assert!(!carol.duplicate);
    assert_eq!(
        store
            .take_undelivered(&name("bob"), 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn lists_stream_in_byte_order_up_to_the_limit() {
    let db = database!("lists_stream_in_byte_order_up_to_the_limit");
    let store = open(&db, 100).await;
    for who in ["bob", "Alice", "alice", "zed", "al"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    let all = store
        .list_accounts(&regex::Regex::new("").unwrap(), 100)
        .await
        .unwrap();
    let all: Vec<&str> = all.iter().map(Username::as_str).collect();
    assert_eq!(all, ["Alice", "al", "alice", "bob", "zed"]);
    let some = store
        .list_accounts(&regex::Regex::new("^al").unwrap(), 1)
        .await
        .unwrap();
    assert_eq!(some, [name("al")]);
}

/// Two stores on one database stand for two server processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_ids_send_ids_and_names_without_a_clash() {
    let db = database!("two_processes_share_ids_send_ids_and_names_without_a_clash");
    // Started together: the migrations run once, under their lock.
    let (a, b) = tokio::join!(open(&db, 100_000), open(&db, 100_000));
    let (a, b) = (Arc::new(a), Arc::new(b));
    // Creates of one name from both: exactly one wins.
    for round in 0..20 {
        let who = name(&format!("user{round}"));
        let (x, y) = tokio::join!(a.create_account(&who, HASH), b.create_account(&who, HASH));
        assert_eq!(
            [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "{who}: {x:?} / {y:?}"
        );
    }
    a.create_account(&name("sink"), HASH).await.unwrap();
    // Appends to one recipient from both, half of them sent twice (once to
    // each process) with one send id.
    let mut tasks = Vec::new();
    for n in 0..200u128 {
        for store in [&a, &b] {
            if n % 2 == 1 && std::ptr::eq(store, &b) {
                continue;
            }
            let store = Arc::clone(store);
            let send_id = (n % 2 == 0).then_some(n);
            tasks.push(tokio::spawn(async move {
                store
                    .append(message("sink", "user0", &format!("m{n}"), send_id))
                    .await
                    .unwrap()
            }));
        }
    }
    let mut receipts = Vec::new();
    for task in tasks {
        receipts.push(task.await.unwrap());
    }
    let stored = a.take_undelivered(&name("sink"), 10_000).await.unwrap();
    assert_eq!(stored.len(), 200, "each message once");
    let ids: BTreeSet<u64> = stored.iter().map(|m| m.id).collect();
    assert_eq!(ids, (1..=200).collect(), "every id once, none skipped");
    for appended in &receipts {
        let same = stored
            .iter()
            .find(|m| m.body == appended.message.body)
            .unwrap();
        assert_eq!(same.id, appended.message.id, "both processes answer one id");
    }
}

/// Leases in the database: one holder at a time, a generation that only
/// grows, a stale holder that cannot end a newer lease, and a dead node's
/// leases taken over once its heartbeat is older than the lease time.
#[tokio::test]
async fn leases_fence_stale_holders_and_pass_on_from_dead_nodes() {
    use chat_core::presence::{Presence, PresenceError};
    use chat_store_pg::cluster::PgPresence;
    use std::time::Duration;
    let db = database!("leases_fence_stale_holders_and_pass_on_from_dead_nodes");
    let store = open(&db, 100).await;
    let lease_time = Duration::from_millis(600);
    let (a, _a_beat) = PgPresence::register(&store, lease_time).await.unwrap();
    let (b, b_beat) = PgPresence::register(&store, lease_time).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let beating = tokio::spawn(b_beat.run(stop.clone()));
    let alice = name("alice");
    let first = a.acquire(&alice).await.unwrap();
    assert_eq!(
        b.acquire(&alice).await,
        Err(PresenceError::Held(first.clone()))
    );
    assert_eq!(b.holder(&alice).await.unwrap(), Some(first.clone()));
    // Node a never beats: once its heartbeat is older than the lease time,
    // its lease is nobody's and b takes it over.
    tokio::time::sleep(lease_time + Duration::from_millis(200)).await;
    assert_eq!(b.holder(&alice).await.unwrap(), None);
    let second = b.acquire(&alice).await.unwrap();
    assert!(second.generation > first.generation);
    assert!(
        !a.release(&first).await.unwrap(),
        "a stale lease ends nothing"
    );
    // Nor can it take the user's messages: only the current lease does,
    // and only those after the floor it is given.
    store.create_account(&alice, HASH).await.unwrap();
    for body in ["before", "after"] {
        store
            .append(message("alice", "alice", body, None))
            .await
            .unwrap();
    }
    assert!(
        store
            .take_undelivered_in(&first, 0, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty(),
        "a stale lease takes nothing"
    );
    let taken = store
        .take_undelivered_in(&second, 1, u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].body.as_str(), "after");
    let taken = store.take_undelivered_in(&second, 0, 1, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].body.as_str(), "before");
    assert_eq!(
        store.ack_for(&first, 2).await.unwrap(),
        0,
        "a stale lease acknowledges nothing"
    );
    assert_eq!(store.ack_for(&second, 2).await.unwrap(), 2);
    assert_eq!(store.last_id(&alice).await.unwrap(), 2);
    // b beats, so its lease lasts past the lease time.
    tokio::time::sleep(lease_time + Duration::from_millis(200)).await;
    assert_eq!(a.holder(&alice).await.unwrap(), Some(second.clone()));
    assert_eq!(
        a.holders(&[name("nobody"), alice.clone()]).await.unwrap(),
        std::slice::from_ref(&second),
        "the leases of those logged in, in one read"
    );
    assert!(b.release(&second).await.unwrap());
    assert_eq!(a.holder(&alice).await.unwrap(), None);
    stop.cancel();
    assert_eq!(beating.await.unwrap(), Ok(()));
}

/// A node that was paused (or cut off) past its lease time stops at its
/// next beat, whatever its own clock says: others may hold its logins.
#[tokio::test]
async fn a_node_found_dead_by_the_others_stops_at_its_next_beat() {
    use chat_store_pg::cluster::PgPresence;
    use std::time::Duration;
    let db = database!("a_node_found_dead_by_the_others_stops_at_its_next_beat");
    let store = open(&db, 100).await;
    let lease_time = Duration::from_millis(600);
    let (presence, heartbeat) = PgPresence::register(&store, lease_time).await.unwrap();
    // As the others see it after a pause: its last beat is long ago.
    sqlx::query("UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1")
        .bind(chat_core::presence::Presence::node(&presence).0 as i64)
        .execute(store.pool())
        .await
        .unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        heartbeat.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the heartbeat gives up within its lease time");
    let why = outcome.unwrap_err();
    assert!(why.contains("missed its lease time"), "{why}");
}

/// Budgets in the database are one budget for every process: of many draws
/// at once on a budget with room for three, from two processes, exactly
/// three pass; a refusal takes nothing from the other budgets of its draw;
/// a refill makes a budget whole; and a full budget is pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_budgets_are_shared_by_every_process() {
    use chat_core::Rate;
    use chat_core::budgets::{Budget, Budgets, Draw};
    use chat_store_pg::budgets::PgBudgets;

    let db = database!("rate_budgets_are_shared_by_every_process");
    let (a, b) = tokio::join!(open(&db, 10), open(&db, 10));
    let budgets: [Arc<dyn Budgets>; 2] =
        [Arc::new(PgBudgets::new(&a)), Arc::new(PgBudgets::new(&b))];
    // Three at once, then one a minute: nothing refills during the test.
    let three = Rate::per_minute(3, 1.0);
    let address: std::net::IpAddr = "192.0.2.9".parse().unwrap();
    let checks = Budget::AddressChecks(address);
    let mut tasks = Vec::new();
    for n in 0..12 {
        let budgets = Arc::clone(&budgets[n % 2]);
        let checks = checks.clone();
        tasks.push(tokio::spawn(async move {
            budgets.draw(&[Draw::take(checks, three)]).await.unwrap()
        }));
    }
    let mut passed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => passed += 1,
            Err(wait) => assert!(wait > std::time::Duration::from_secs(30), "{wait:?}"),
        }
    }
    assert_eq!(passed, 3, "one budget across both processes");

    // All or nothing: an empty budget in a draw refuses it, and the other
    // budget of that draw keeps its tokens.
    let account = Budget::AccountFailures(name("alice"));
    let refused = budgets[0]
        .draw(&[
            Draw::take(account.clone(), three),
            Draw::require(checks.clone(), three),
        ])
        .await
        .unwrap();
    assert!(refused.is_err());
    for _ in 0..3 {
        budgets[1]
            .draw(&[Draw::take(account.clone(), three)])
            .await
            .unwrap()
            .expect("the refused draw took nothing");
    }
    assert!(
        budgets[0]
            .draw(&[Draw::take(account.clone(), three)])
            .await
            .unwrap()
            .is_err()
    );
    budgets[1].refill(&account).await.unwrap();
    budgets[0]
        .draw(&[Draw::take(account.clone(), three)])
        .await
        .unwrap()
        .expect("refilled");

    // A budget that refills fast is full again at once: pruned; the others
    // are kept.
    let fast = Rate {
        burst: 1,
        per_second: 1e9,
    };
    let lists = Budget::Lists(address);
    budgets[0]
        .draw(&[Draw::take(lists, fast)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(budgets[1].prune().await.unwrap(), 1);
    assert!(
        budgets[1]
            .draw(&[Draw::take(checks, three)])
            .await
            .unwrap()
            .is_err()
    );
}

/// A cap on accounts holds across processes: of simultaneous creates from
/// two processes against a cap of five, exactly five succeed and the rest
/// get `AccountLimit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_cap_holds_across_processes() {
    let db = database!("the_account_cap_holds_across_processes");
    let (a, b) = tokio::join!(open(&db, 10), open(&db, 10));
    let stores = [Arc::new(a), Arc::new(b)];
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = Arc::clone(&stores[n % 2]);
        tasks.push(tokio::spawn(async move {
            store
                .create_account_capped(&name(&format!("user{n}")), HASH, 5)
                .await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => created += 1,
            Err(err) => assert_eq!(err, StoreError::AccountLimit(5)),
        }
    }
    assert_eq!(created, 5);
    assert_eq!(stores[0].account_count().await.unwrap(), 5);
}

/// Pruning runs on one process at a time, and never waits on a row another
/// transaction holds (so it cannot deadlock with an account's deletion):
/// expired send ids go, both processes may call it at once, and a delete
/// running alongside succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_send_ids_are_pruned_by_one_process_at_a_time() {
    let db = database!("expired_send_ids_are_pruned_by_one_process_at_a_time");
    let (a, b) = tokio::join!(open(&db, 1000), open(&db, 1000));
    for who in ["sink", "old", "gone"] {
        a.create_account(&name(who), HASH).await.unwrap();
    }
    for n in 0..50u128 {
        let mut m = message(
            "sink",
            if n % 2 == 0 { "old" } else { "gone" },
            "x",
            Some(n),
        );
        m.timestamp_ms = 1_000;
        a.append(m).await.unwrap();
    }
    let now = chat_core::now_ms();
    let gone = name("gone");
    let (x, y, deleted) = tokio::join!(
        a.prune_expired(now),
        b.prune_expired(now),
        b.delete_account(&gone)
    );
    assert!(deleted.unwrap(), "the delete is not held up or deadlocked");
    let pruned = x.unwrap() + y.unwrap();
    assert!(pruned <= 50, "{pruned}");
    // Whatever one prune skipped, the next takes: nothing is left.
    a.prune_expired(now).await.unwrap();
    let again = message("sink", "old", "y", Some(0));
    let appended = a.append(again).await.unwrap();
    assert!(
        !appended.duplicate,
        "the expired send id is forgotten, so it stores anew"
    );
}

/// Appends that arrive together are stored together (group commit), and
/// whatever one batch cannot decide alone is still decided right: a full
/// recipient refuses exactly what is past its bound, a missing one refuses
/// its messages, repeated send ids in the same burst store once and answer
/// one receipt, and every recipient's ids run 1, 2, 3… without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_arrive_together_are_decided_as_one_at_a_time() {
    let db = database!("appends_that_arrive_together_are_decided_as_one_at_a_time");
    let store = Arc::new(open(&db, 60).await);
    for who in ["full", "roomy", "sender"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    let mut tasks = Vec::new();
    for n in 0..200u128 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let to = match n % 4 {
                0 | 3 => "full",
                1 => "roomy",
                _ => "nobody",
            };
            // Some messages to `roomy` are sent twice with one send id.
            let send_id = (to == "roomy" && n % 3 == 0).then_some(n);
            let first = store
                .append(message(to, "sender", &format!("m{n}"), send_id))
                .await;
            let again = match send_id {
                Some(_) => Some(
                    store
                        .append(message(to, "sender", &format!("m{n}"), send_id))
                        .await,
                ),
                None => None,
            };
            (to, first, again)
        }));
    }
    let (mut full, mut refused_full, mut roomy, mut missing) = (0, 0, 0, 0);
    for task in tasks {
        let (to, first, again) = task.await.unwrap();
        match (to, &first) {
            ("full", Ok(_)) => full += 1,
            ("full", Err(StoreError::QueueFull(_))) => refused_full += 1,
            ("roomy", Ok(_)) => roomy += 1,
            ("nobody", Err(StoreError::NoSuchAccount(_))) => missing += 1,
            other => panic!("unexpected {other:?}"),
        }
        if let Some(again) = again {
            let (first, again) = (first.unwrap(), again.unwrap());
            assert!(again.duplicate);
            assert_eq!(again.message.id, first.message.id, "one receipt");
        }
    }
    assert_eq!((full, refused_full, roomy, missing), (60, 40, 50, 50));
    for (who, count) in [("full", 60), ("roomy", 50)] {
        let stored = store.take_undelivered(&name(who), 1000).await.unwrap();
        let ids: Vec<u64> = stored.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            (1..=count).collect::<Vec<u64>>(),
            "{who}: each once, no gap"
        );
    }
    let err = store
        .append(message("full", "sender", "one too many", None))
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::QueueFull(name("full")));
}

/// The connection to PostgreSQL can be encrypted: `sslmode=require` in
/// the URL (or `verify-full` with `sslrootcert=` for a managed database's
/// CA) gives a TLS connection, and the store works over it.
#[tokio::test]
async fn the_database_connection_can_be_encrypted() {
    let db = database!("the_database_connection_can_be_encrypted");
    let plain = open(&db, 10).await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(plain.pool())
        .await
        .unwrap();
    if ssl != "on" {
        assert!(
            std::env::var_os("CI").is_none(),
            "the test server has ssl off; .ci/run's server has it on"
        );
        eprintln!("SKIPPED the_database_connection_can_be_encrypted: the server has ssl off");
        return;
    }
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", db.url);
    let store = PgStore::connect(&url, PgOptions::default()).await.unwrap();
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(encrypted, "the connection is TLS");
    store.create_account(&name("alice"), HASH).await.unwrap();
    assert!(store.account_exists(&name("alice")).await.unwrap());
}

/// The next message pushed to `events`, waited for at most 10 s.
async fn next(events: &mut chat_core::Events) -> String {
    match tokio::time::timeout(std::time::Duration::from_secs(10), events.recv()).await {
        Ok(Some(chat_core::Event::Message(m))) => m.body.to_string(),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A node whose notification connection is cut (its backend terminated,
/// as in a database failover) listens again and catches up: a message sent
/// to its user while it was deaf is still pushed live, in order with the
/// next one, long before housekeeping's round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_notifications_are_cut_catches_up() {
    use chat_core::{Chat, Config, HashingConfig};
    use chat_store_pg::cluster::Node;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    let db = database!("a_node_whose_notifications_are_cut_catches_up");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let store = open(&db, 100).await;
        let node = Node::join(&store, Duration::from_secs(10)).await.unwrap();
        let chat = Chat::on_node(
            Arc::new(store),
            node.cluster(),
            Config {
                hashing: HashingConfig::cheap_for_tests(),
                ..Config::default()
            },
        );
        let listener = node
            .delivery
            .listen(
                node.heartbeat.node(),
                chat.downgrade(),
                CancellationToken::new(),
            )
            .await
            .unwrap();
        tokio::spawn(listener);
        tokio::spawn(node.heartbeat.run(CancellationToken::new()));
        nodes.push(chat);
    }
    let (alice, _alice_events) = nodes[0].open_session();
    alice.create("alice", "password1").await.unwrap();
    let (bob, mut bob_events) = nodes[1].open_session();
    bob.create("bob", "password1").await.unwrap();
    alice.send("bob", "before").await.unwrap();
    assert_eq!(next(&mut bob_events).await, "before");
    // Every listening backend of this database goes (bob's node's among
    // them; a role may end its own backends).
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(open(&db, 10).await.pool())
    .await
    .unwrap();
    assert!(!cut.is_empty() && cut.iter().all(|ended| *ended), "{cut:?}");
    alice.send("bob", "while deaf").await.unwrap();
    alice.send("bob", "after").await.unwrap();
    assert_eq!(next(&mut bob_events).await, "while deaf");
    assert_eq!(next(&mut bob_events).await, "after");
}
