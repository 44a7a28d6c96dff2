//! The SQLite store against a real database file: durability across
//! reopening, group commit under concurrency, migrations, refusals.

use std::path::Path;
use std::sync::Arc;

use chat_core::{Credentials, MessageBody, NewMessage, Store, StoreError, Username};
use chat_store_sql::{DATABASE_FILE, OpenError, SqliteOptions, SqliteStore, schema_version};

/// A password hash as the engine would store one: the store keeps it as
/// it is and never parses it.
const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";

/// Another password's hash, for password changes.
const NEW_HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$b3RoZXJzYWx0$bmV3aGFzaGg";

/// What `credentials` returns for an account with the password `hash`.
fn with_password(hash: &str) -> Option<Credentials> {
    Some(Credentials {
        password_hash: Some(hash.to_owned()),
    })
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// The store in `dir` with default options.
async fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default())
        .await
        .unwrap()
}

/// A connection of our own to the database in `dir`, beside the store's.
async fn raw_connection(dir: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let url = format!("sqlite://{}", dir.join(DATABASE_FILE).display());
    sqlx::SqliteConnection::connect(&url).await.unwrap()
}

fn message(to: &str, body: &str, delivered: bool, send_id: Option<u128>) -> NewMessage {
    NewMessage {
        recipient: name(to),
        sender: name("alice"),
        body: MessageBody::parse(body).unwrap(),
        timestamp_ms: 1_764_000_000_000,
        delivered,
        send_id,
    }
}

#[tokio::test]
async fn everything_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let bob = name("bob");
    {
        let store = open(dir.path()).await;
        store.create_account(&name("alice"), HASH).await.unwrap();
        store.create_account(&bob, HASH).await.unwrap();
        store
            .append(message("bob", "queued", false, None))
            .await
            .unwrap();
        store
            .append(message("bob", "pushed", true, Some(7)))
            .await
            .unwrap();
        assert_eq!(
            store.create_account(&bob, HASH).await.unwrap_err(),
            StoreError::AccountExists(bob.clone())
        );
    }
    let store = open(dir.path()).await;
    assert!(store.account_exists(&bob).await.unwrap());
    let accounts = store
        .list_accounts(&regex::Regex::new("").unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(accounts, [name("alice"), bob.clone()]);
    let unacked = store.unacked(&bob).await.unwrap();
    assert_eq!(unacked.len(), 1);
    assert_eq!(unacked[0].body.as_str(), "pushed");
    let queued = store.take_undelivered(&bob, 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].body.as_str(), "queued");
    // The send id survived too: a resend is a duplicate.
    let again = store
        .append(message("bob", "pushed", true, Some(7)))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.id, unacked[0].id);
    // Ids keep increasing after a reopen.
    let next = store
        .append(message("bob", "next", false, None))
        .await
        .unwrap();
    assert_eq!(next.message.id, 3);
}

#[tokio::test]
async fn limits_and_acks_behave_like_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        queue_limit: 2,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).await.unwrap();
    let bob = name("bob");
    store.create_account(&bob, HASH).await.unwrap();
    let first = store
        .append(message("bob", "1", true, None))
        .await
        .unwrap()
        .message;
    let second = store
        .append(message("bob", "2", false, None))
        .await
        .unwrap()
        .message;
    assert_eq!(
        store
            .append(message("bob", "3", false, None))
            .await
            .unwrap_err(),
        StoreError::QueueFull(bob.clone())
    );
    assert_eq!(
        store
            .append(message("nobody", "?", false, None))
            .await
            .unwrap_err(),
        StoreError::NoSuchAccount(name("nobody"))
    );
    // A cumulative ack past a queued message the client never saw keeps it.
    assert_eq!(store.ack(&bob, second.id).await.unwrap(), 1);
    assert_eq!(
        store.take_undelivered(&bob, 10).await.unwrap(),
        std::slice::from_ref(&second)
    );
    assert!(store.take_undelivered(&bob, 10).await.unwrap().is_empty());
    assert_eq!(store.ack(&bob, first.id).await.unwrap(), 0);
    assert_eq!(store.ack(&bob, second.id).await.unwrap(), 1);
    // Acknowledged messages free their room, also after a reopen.
    store
        .append(message("bob", "4", false, None))
        .await
        .unwrap();
    store
        .append(message("bob", "5", false, None))
        .await
        .unwrap();
    assert!(
        store
            .append(message("bob", "6", false, None))
            .await
            .is_err()
    );
    drop(store);
    let store = SqliteStore::open(
        dir.path(),
        SqliteOptions {
            queue_limit: 2,
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        store
            .append(message("bob", "7", false, None))
            .await
            .unwrap_err(),
        StoreError::QueueFull(bob.clone())
    );
    let taken = store.take_undelivered(&bob, 10).await.unwrap();
    assert_eq!(store.ack(&bob, taken[1].id).await.unwrap(), 2);
    assert_eq!(
        store
            .append(message("bob", "8", false, None))
            .await
            .unwrap()
            .message
            .id,
        5,
        "failed appends take no id"
    );
    assert!(store.delete_account(&bob).await.unwrap());
    assert!(!store.delete_account(&bob).await.unwrap());
    assert!(!store.account_exists(&bob).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_committed_together_and_in_order() {
    const SENDERS: usize = 64;
    const EACH: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()).await);
    for i in 0..SENDERS {
        store
            .create_account(&name(&format!("r{i}")), HASH)
            .await
            .unwrap();
    }
    let tasks = (0..SENDERS).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..EACH {
                let stored = store
                    .append(message(&format!("r{i}"), &n.to_string(), false, None))
                    .await
                    .unwrap();
                ids.push(stored.message.id);
            }
            ids
        })
    });
    for (i, task) in futures::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
    {
        let ids = task.unwrap();
        assert_eq!(
            ids,
            (1..=EACH as u64).collect::<Vec<_>>(),
            "r{i}: one gapless sequence"
        );
        let stored = store
            .take_undelivered(&name(&format!("r{i}")), 100)
            .await
            .unwrap();
        let bodies: Vec<String> = stored.iter().map(|m| m.body.to_string()).collect();
        assert_eq!(bodies, (0..EACH).map(|n| n.to_string()).collect::<Vec<_>>());
    }
}

/// Schema version 1, as the first release created it, with data in it.
const VERSION_1: &str = include_str!("../migrations/sqlite/0001_initial.sql");

#[tokio::test]
async fn a_version_1_database_is_migrated_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DATABASE_FILE);
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        // Exactly what the first release ran: its one migration file,
        // through sqlx's migrator (which records it as applied).
        let first_release = dir.path().join("migrations-v1");
        std::fs::create_dir(&first_release).unwrap();
        std::fs::write(first_release.join("0001_initial.sql"), VERSION_1).unwrap();
        let migrator = sqlx::migrate::Migrator::new(first_release.as_path())
            .await
            .unwrap();
        migrator.run(&mut conn).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO accounts (name, last_id, stored, created_ms) VALUES ('old', 2, 2, 0), ('timer', 0, 0, 0); \
             INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
             VALUES ('old', 1, 'timer', 'from version 1', 5, 0), ('old', 2, 'timer', 'pushed, not acked', 6, 1);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let store = open(dir.path()).await;
    let old = name("old");
    // Version 3 kept the delivered flag: the pushed message awaits its ack.
    let unacked = store.unacked(&old).await.unwrap();
    assert_eq!(
        unacked.iter().map(|m| m.id).collect::<Vec<_>>(),
        [2],
        "only the pushed message is awaiting an ack "
    );
    let kept = store.take_undelivered(&old, 10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!((kept[0].id, kept[0].body.as_str()), (1, "from version 1"));
    // Version 2's table works: send ids are remembered; ids go on.
    let mut resend = message("old", "idempotent", false, Some(99));
    resend.sender = name("timer");
    let first = store.append(resend.clone()).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.message.id, 3);
    assert!(store.append(resend).await.unwrap().duplicate);
    assert_eq!(store.ack(&old, 3).await.unwrap(), 2, "both delivered ones");
    assert_eq!(schema_version(), 7);
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).await);
    {
        let mut conn = raw_connection(dir.path()).await;
        sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'from the future', 1, x'00', 0)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let err = SqliteStore::open(dir.path(), SqliteOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::TooNew { found: 99, known, .. } if known == schema_version()
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer server"), "{err}");
}

#[tokio::test]
async fn an_unusable_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteStore::open(&file, SqliteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, OpenError::Directory { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_in_one_batch_and_across_batches_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()).await);
    store.create_account(&name("bob"), HASH).await.unwrap();
    // Many concurrent appends with the same send id land in the same or
    // in different batches; exactly one stores.
    let tasks = (0..32).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .append(message("bob", "once", false, Some(5)))
                .await
                .unwrap()
        })
    });
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(
        results
            .iter()
            .all(|a| a.message.id == results[0].message.id)
    );
    // The id with another body, or for another recipient, is not a resend.
    store.create_account(&name("carol"), HASH).await.unwrap();
    for (to, body) in [("bob", "not once"), ("carol", "once")] {
        assert_eq!(
            store
                .append(message(to, body, false, Some(5)))
                .await
                .unwrap_err(),
            StoreError::SendIdReused(name(to)),
        );
    }
    assert_eq!(
        store
            .take_undelivered(&name("bob"), 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .take_undelivered(&name("carol"), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A storage failure (here a trigger that makes every message insert fail,
/// as a full disk would) fails the send with `store_unavailable`, stores
/// nothing, and the server goes on working once the cause is gone.
#[tokio::test]
async fn a_failing_database_refuses_sends_clearly_and_recovers() {
    use chat_core::{Chat, Config, ErrorCode, HashingConfig};

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let config = Config {
        hashing: HashingConfig::cheap_for_tests(),
        ..Config::default()
    };
    let chat = Chat::new(Arc::new(store), config);
    let (alice, _a) = chat.open_session();
    let (bob, _b) = chat.open_session();
    alice.create("alice", "alice's password").await.unwrap();
    bob.create("bob", "bob's password").await.unwrap();
    bob.logout().await.unwrap();

    let mut saboteur = raw_connection(dir.path()).await;
    sqlx::raw_sql("CREATE TRIGGER full_disk BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;")
        .execute(&mut saboteur)
        .await
        .unwrap();
    let err = alice.send("bob", "lost?").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::StoreUnavailable, "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");

    sqlx::raw_sql("DROP TRIGGER full_disk")
        .execute(&mut saboteur)
        .await
        .unwrap();
    let receipt = alice.send("bob", "after the repair").await.unwrap();
    // Through the store's credentials: the hash the create stored.
    bob.login("bob", "bob's password").await.unwrap();
    let queued = bob.fetch(0).await.unwrap();
    assert_eq!(queued.len(), 1, "the failed send stored nothing");
    assert_eq!(
        (queued[0].id, queued[0].body.as_str()),
        (receipt.id, "after the repair")
    );
}

/// Acks are applied ahead of the appends they share a batch with, and
/// their counter changes ride on the batch's account update: under
/// concurrent acks and appends, the stored counts stay exact, also after a
/// reopen (the queue bound is checked against them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_appends_in_one_batch_keep_the_counts_exact() {
    const RECIPIENTS: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        queue_limit: 10,
        ..SqliteOptions::default()
    };
    let store = Arc::new(
        SqliteStore::open(dir.path(), options.clone())
            .await
            .unwrap(),
    );
    for i in 0..RECIPIENTS {
        let recipient = name(&format!("r{i}"));
        store.create_account(&recipient, HASH).await.unwrap();
        for n in 0..5 {
            store
                .append(message(&format!("r{i}"), &format!("old {n}"), true, None))
                .await
                .unwrap();
        }
    }
    let tasks = (0..RECIPIENTS).flat_map(|i| {
        let acker = Arc::clone(&store);
        let sender = Arc::clone(&store);
        [
            tokio::spawn(async move { acker.ack(&name(&format!("r{i}")), 5).await.unwrap() }),
            tokio::spawn(async move {
                for n in 0..5 {
                    sender
                        .append(message(&format!("r{i}"), &format!("new {n}"), true, None))
                        .await
                        .unwrap();
                }
                0
            }),
        ]
    });
    let removed: usize = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(removed, RECIPIENTS * 5, "every old message, and only those");
    drop(store);

    let store = SqliteStore::open(dir.path(), options).await.unwrap();
    for i in 0..RECIPIENTS {
        let to = format!("r{i}");
        for n in 0..5 {
            store
                .append(message(&to, &format!("more {n}"), false, None))
                .await
                .unwrap_or_else(|err| panic!("{to}: room for 5 more: {err}"));
        }
        assert_eq!(
            store
                .append(message(&to, "one too many", false, None))
                .await
                .unwrap_err(),
            StoreError::QueueFull(name(&to)),
            "{to}: 5 new + 5 more fill the queue of 10"
        );
    }
}

/// A send id is remembered for its retention, measured from the new
/// message's time: later, the id may be used again (pruned or not yet).
#[tokio::test]
async fn an_expired_send_id_is_a_new_send() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), HASH).await.unwrap();
    let first = store
        .append(message("bob", "first", false, Some(7)))
        .await
        .unwrap();
    let mut later = message("bob", "a day later", false, Some(7));
    later.timestamp_ms += chat_core::SEND_ID_RETENTION.as_millis() as u64 + 1;
    let again = store.append(later.clone()).await.unwrap();
    assert!(!again.duplicate);
    assert_ne!(again.message.id, first.message.id);
    // And the new use is remembered in its turn.
    assert!(store.append(later).await.unwrap().duplicate);
}

/// Send ids stored by schema version 2 have no body fingerprint: a resend
/// is checked by its recipient alone.
#[tokio::test]
async fn send_ids_from_version_2_are_checked_by_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for who in ["alice", "bob", "carol"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    drop(store);
    {
        let mut conn = raw_connection(dir.path()).await;
        sqlx::query(
            "INSERT INTO send_ids (sender, client_id, recipient, message_id, timestamp_ms, body_crc) \
             VALUES ('alice', ?, 'bob', 41, 1764000000000, NULL)",
        )
        .bind(9u128.to_be_bytes().to_vec())
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let store = open(dir.path()).await;
    let resend = store
        .append(message("bob", "whatever it said", false, Some(9)))
        .await
        .unwrap();
    assert!(resend.duplicate);
    assert_eq!(resend.message.id, 41);
    assert_eq!(
        store
            .append(message("carol", "whatever it said", false, Some(9)))
            .await
            .unwrap_err(),
        StoreError::SendIdReused(name("carol"))
    );
}

/// The id floor: deleting an account and creating it again never hands out
/// its old ids, in one batch, across batches, and across reopening (the
/// floor is stored, not only cached).
#[tokio::test]
async fn ids_never_repeat_for_a_re_created_name() {
    let dir = tempfile::tempdir().unwrap();
    let bob = name("bob");
    {
        let store = open(dir.path()).await;
        store.create_account(&bob, HASH).await.unwrap();
        for n in 1..=3 {
            let id = store
                .append(message("bob", "old", true, None))
                .await
                .unwrap()
                .message
                .id;
            assert_eq!(id, n);
        }
        assert!(store.delete_account(&bob).await.unwrap());
        store.create_account(&bob, HASH).await.unwrap();
        let first = store.append(message("bob", "new", false, None)).await;
        assert_eq!(
            first.unwrap().message.id,
            4,
            "above the deleted account's 3"
        );
        // A new name starts above the floor too (ids never collide with a
        // deleted account's, whatever the name).
        store.create_account(&name("carol"), HASH).await.unwrap();
        let carol = store.append(message("carol", "hi", false, None)).await;
        assert_eq!(carol.unwrap().message.id, 4);

        // Delete, create and append in one batch (joined futures on this
        // one thread are all queued before the writer runs): the cache
        // follows the floor.
        let (deleted, created, appended) = futures::join!(
            store.delete_account(&bob),
            store.create_account(&bob, HASH),
            store.append(message("bob", "same batch", false, None)),
        );
        assert!(deleted.unwrap());
        created.unwrap();
        assert_eq!(appended.unwrap().message.id, 5);
    }
    {
        let store = open(dir.path()).await;
        let next = store.append(message("bob", "reopened", false, None)).await;
        assert_eq!(next.unwrap().message.id, 6);
        assert!(store.delete_account(&bob).await.unwrap());
    }
    // A fresh writer (empty cache) reads the stored floor.
    let store = open(dir.path()).await;
    store.create_account(&bob, HASH).await.unwrap();
    let after = store.append(message("bob", "after", false, None)).await;
    assert_eq!(after.unwrap().message.id, 7);
}

/// The migrations of the releases before the id floor (versions 1 to 4).
const VERSIONS_1_TO_4: [(&str, &str); 4] = [
    ("0001_initial.sql", VERSION_1),
    (
        "0002_send_ids.sql",
        include_str!("../migrations/sqlite/0002_send_ids.sql"),
    ),
    (
        "0003_messages_in_arrival_order.sql",
        include_str!("../migrations/sqlite/0003_messages_in_arrival_order.sql"),
    ),
    (
        "0004_send_id_body_crc.sql",
        include_str!("../migrations/sqlite/0004_send_id_body_crc.sql"),
    ),
];

/// A version 4 database gets its id floor from the accounts it has (the
/// best it can do: accounts deleted before are gone), and everything else
/// keeps working.
#[tokio::test]
async fn a_version_4_database_is_migrated_with_an_id_floor() {
    let dir = tempfile::tempdir().unwrap();
    {
        use sqlx::Connection;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(DATABASE_FILE).display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let release = dir.path().join("migrations-v4");
        std::fs::create_dir(&release).unwrap();
        for (file, sql) in VERSIONS_1_TO_4 {
            std::fs::write(release.join(file), sql).unwrap();
        }
        let migrator = sqlx::migrate::Migrator::new(release.as_path())
            .await
            .unwrap();
        migrator.run(&mut conn).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO accounts (name, last_id, stored, created_ms) VALUES ('old', 7, 1, 0), ('young', 2, 0, 0); \
             INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
             VALUES ('old', 7, 'young', 'from version 4', 5, 0);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let store = open(dir.path()).await;
    let kept = store.take_undelivered(&name("old"), 10).await.unwrap();
    assert_eq!((kept[0].id, kept[0].body.as_str()), (7, "from version 4"));
    let next = store.append(message("old", "v5", false, None)).await;
    assert_eq!(next.unwrap().message.id, 8, "ids go on");
    // The floor is the highest last id there was (7), so a re-created
    // 'young' starts above it, and above its own old ids.
    let young = name("young");
    assert!(store.delete_account(&young).await.unwrap());
    store.create_account(&young, HASH).await.unwrap();
    let first = store.append(message("young", "again", false, None)).await;
    assert_eq!(first.unwrap().message.id, 8);
}

/// A write that fails on its own (here a trigger that refuses messages for
/// carol, as a constraint or a corrupt page would) fails alone: the other
/// writes of its batch are stored and answered, and the cache stays right.
#[tokio::test]
async fn one_failing_write_does_not_fail_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for who in ["bob", "carol", "dave"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    let mut saboteur = raw_connection(dir.path()).await;
    sqlx::raw_sql(
        "CREATE TRIGGER no_room_for_carol BEFORE INSERT ON messages WHEN NEW.recipient = 'carol' \
         BEGIN SELECT RAISE(ABORT, 'no room for carol'); END;",
    )
    .execute(&mut saboteur)
    .await
    .unwrap();

    // This test runs on one thread: `join!` polls every write once, which
    // queues them all, before the writer task runs; so they are one batch.
    let erin = name("erin");
    let (bob, carol, dave, created) = futures::join!(
        store.append(message("bob", "for bob", false, Some(1))),
        store.append(message("carol", "for carol", false, None)),
        store.append(message("dave", "for dave", false, None)),
        store.create_account(&erin, HASH),
    );
    let err = carol.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(why) if why.contains("no room for carol")),
        "{err}"
    );
    assert_eq!(bob.unwrap().message.id, 1);
    assert_eq!(dave.unwrap().message.id, 1);
    created.unwrap();

    // Stored, and exactly once.
    assert!(store.account_exists(&erin).await.unwrap());
    for who in ["bob", "dave"] {
        let queued = store.take_undelivered(&name(who), 10).await.unwrap();
        assert_eq!(queued.len(), 1, "{who}");
        assert_eq!(queued[0].body.as_str(), format!("for {who}"));
    }
    assert!(
        store
            .take_undelivered(&name("carol"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The send id of bob's message was stored with it; the counters went
    // on from what was committed (the failed append took no id).
    let resend = store
        .append(message("bob", "for bob", false, Some(1)))
        .await
        .unwrap();
    assert!(resend.duplicate);
    assert_eq!(resend.message.id, 1);
    sqlx::raw_sql("DROP TRIGGER no_room_for_carol")
        .execute(&mut saboteur)
        .await
        .unwrap();
    let (bob, carol) = futures::join!(
        store.append(message("bob", "again", false, None)),
        store.append(message("carol", "at last", false, None)),
    );
    assert_eq!(bob.unwrap().message.id, 2);
    assert_eq!(carol.unwrap().message.id, 1);
}

/// The writer takes the write lock with `BEGIN IMMEDIATE`: a batch that
/// meets another connection's write transaction waits for it and then
/// succeeds. With a deferred `BEGIN`, the batch read first (its send-id
/// lookup), and when the other connection committed before the batch's
/// first write, SQLite could not upgrade the stale snapshot and failed the
/// batch at once ("database is locked"), busy timeout or not.
///
/// The short sleep only lets the writer reach its lock wait before the
/// other connection commits, which is what made a deferred `BEGIN` fail;
/// the test passes whatever the timing, since an immediate `BEGIN` waits
/// in every order.
#[tokio::test]
async fn a_write_waits_for_another_writer_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()).await);
    store.create_account(&name("bob"), HASH).await.unwrap();
    let mut other = raw_connection(dir.path()).await;
    sqlx::raw_sql(
        "BEGIN IMMEDIATE; INSERT INTO accounts (name, created_ms) VALUES ('intruder', 0);",
    )
    .execute(&mut other)
    .await
    .unwrap();
    let send = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.append(message("bob", "waits", false, Some(3))).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent.message.id, 1);
    assert!(store.account_exists(&name("intruder")).await.unwrap());
    let queued = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(queued.len(), 1);
}

/// If the writer task dies, `failed` says why, and every later write fails
/// with that reason; the write it was applying is not stored.
#[tokio::test]
async fn a_dead_writer_is_reported_and_fails_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), HASH).await.unwrap();

    // One batch (see `one_failing_write_does_not_fail_its_batch`): the
    // create runs its insert inside the transaction, then the writer dies.
    let carol = name("carol");
    let (created, ()) = futures::join!(
        store.create_account(&carol, HASH),
        store.crash_writer_for_tests(),
    );
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), store.failed())
        .await
        .expect("failed() completes once the writer is gone");
    assert!(reason.contains("panicked"), "{reason}");
    assert!(reason.contains("crash_writer_for_tests"), "{reason}");
    assert_eq!(
        created.unwrap_err(),
        StoreError::Unavailable(reason.clone())
    );
    assert_eq!(
        store
            .append(message("bob", "after", false, None))
            .await
            .unwrap_err(),
        StoreError::Unavailable(reason.clone())
    );
    assert_eq!(
        store.delete_account(&name("bob")).await.unwrap_err(),
        StoreError::Unavailable(reason)
    );
    // Reads still work; the unanswered create was rolled back.
    assert!(store.account_exists(&name("bob")).await.unwrap());
    assert!(!store.account_exists(&name("carol")).await.unwrap());
    drop(store);
    let store = open(dir.path()).await;
    assert!(!store.account_exists(&name("carol")).await.unwrap());
    store.create_account(&name("carol"), HASH).await.unwrap();
}

/// `prune_expired` forgets send ids past their retention and the writer's
/// cached counters of idle accounts, and counts both; an evicted account
/// is read again, unchanged, by its next write.
#[tokio::test]
async fn prune_expired_forgets_send_ids_and_idle_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        idle_account_after: std::time::Duration::from_secs(60),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).await.unwrap();
    store.create_account(&name("bob"), HASH).await.unwrap();
    // Sent (by its timestamp) a minute more than the retention ago; bob's
    // counters are used now, by the wall clock.
    let retention = chat_core::SEND_ID_RETENTION.as_millis() as u64;
    let mut sent = message("bob", "kept", false, Some(7));
    sent.timestamp_ms = chat_core::now_ms() - retention - 60_000;
    let first = store.append(sent.clone()).await.unwrap();

    // By the message's own time, nothing has expired.
    assert_eq!(store.prune_expired(sent.timestamp_ms + 1).await.unwrap(), 0);
    assert!(store.append(sent.clone()).await.unwrap().duplicate);
    // Now, the send id is past its retention; bob was used just now.
    assert_eq!(
        store.prune_expired(chat_core::now_ms()).await.unwrap(),
        1,
        "the send id, not bob's counters"
    );
    // Two minutes from now, bob is idle: his counters go.
    let later = chat_core::now_ms() + 120_000;
    assert_eq!(
        store.prune_expired(later).await.unwrap(),
        2,
        "bob's counters, and alice's count of send ids"
    );
    assert_eq!(store.prune_expired(later).await.unwrap(), 0, "nothing left");
    // The send id is forgotten (a new send), and the counters are read
    // again from the database: ids and the stored count go on.
    let again = store.append(sent).await.unwrap();
    assert!(!again.duplicate);
    assert_eq!(again.message.id, first.message.id + 1);
    assert_eq!(
        store
            .take_undelivered(&name("bob"), 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

/// The writer prunes expired send ids on its own timer, also when no
/// writes arrive (tokio's paused clock drives the timer; the pruning is by
/// the wall clock, which the send id is far behind).
#[tokio::test]
async fn expired_send_ids_are_pruned_on_a_timer() {
    let dir = tempfile::tempdir().unwrap();
    let every = std::time::Duration::from_secs(3600);
    let options = SqliteOptions {
        prune_every: Some(every),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).await.unwrap();
    store.create_account(&name("bob"), HASH).await.unwrap();
    let mut expired = message("bob", "long ago", false, Some(7));
    expired.timestamp_ms =
        chat_core::now_ms() - chat_core::SEND_ID_RETENTION.as_millis() as u64 - 60_000;
    store.append(expired).await.unwrap();
    let mut raw = raw_connection(dir.path()).await;
    let count = "SELECT COUNT(*) FROM send_ids";
    let stored: i64 = sqlx::query_scalar(count).fetch_one(&mut raw).await.unwrap();
    assert_eq!(stored, 1, "not pruned before the timer fires");

    tokio::time::pause();
    tokio::time::advance(every).await;
    // The writer's next loop runs the due prune before any write (its
    // timer has priority); a fetch after it is where we know it ran.
    store.take_undelivered(&name("bob"), 0).await.unwrap();
    let stored: i64 = sqlx::query_scalar(count).fetch_one(&mut raw).await.unwrap();
    assert_eq!(stored, 0, "pruned by the timer");
}

/// The store in `dir` remembering at most `bound` send ids per sender.
async fn open_bounded(dir: &Path, bound: usize) -> SqliteStore {
    let options = SqliteOptions {
        send_ids_per_sender: bound,
        ..SqliteOptions::default()
    };
    SqliteStore::open(dir, options).await.unwrap()
}

/// A message from `sender` to bob with send id `id` and a body naming it.
fn send(sender: &str, id: u128) -> NewMessage {
    let mut message = message("bob", &format!("send {id}"), false, Some(id));
    message.sender = name(sender);
    message
}

/// The send ids the database holds for `sender`, oldest first (by
/// timestamp, then arrival).
async fn remembered(dir: &Path, sender: &str) -> Vec<u128> {
    let mut raw = raw_connection(dir).await;
    let ids: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT client_id FROM send_ids WHERE sender = ? ORDER BY timestamp_ms, rowid",
    )
    .bind(sender)
    .fetch_all(&mut raw)
    .await
    .unwrap();
    ids.into_iter()
        .map(|id| u128::from_be_bytes(id.try_into().unwrap()))
        .collect()
}

/// Past its bound, a sender's oldest send ids are forgotten first (here
/// all sent at one millisecond, so by arrival, whatever the ids' order): a
/// resend of a forgotten one is a new message, a resend of a remembered
/// one the original. Other senders keep theirs, and the count is read
/// again after a reopen. (A bound under 16 has no margin: exact.)
#[tokio::test]
async fn send_ids_are_bounded_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_bounded(dir.path(), 5).await;
    store.create_account(&name("bob"), HASH).await.unwrap();
    let mut first = std::collections::HashMap::new();
    for id in [1, 2, 3] {
        let sent = store.append(send("carol", id)).await.unwrap();
        first.insert(("carol", id), sent.message.id);
    }
    // Ids in falling order, so only the arrival order says which is oldest;
    // five one by one, three more in one batch.
    for id in [108, 107, 106, 105, 104] {
        let sent = store.append(send("alice", id)).await.unwrap();
        first.insert(("alice", id), sent.message.id);
    }
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [108, 107, 106, 105, 104]
    );
    let batch =
        futures::future::join_all([103, 102, 101].map(|id| store.append(send("alice", id)))).await;
    for (id, sent) in [103, 102, 101].into_iter().zip(batch) {
        first.insert(("alice", id), sent.unwrap().message.id);
    }
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [105, 104, 103, 102, 101],
        "the three oldest went"
    );

    // A recent id, and the oldest still remembered: the originals.
    for id in [101, 105] {
        let again = store.append(send("alice", id)).await.unwrap();
        assert!(again.duplicate, "{id}");
        assert_eq!(again.message.id, first[&("alice", id)], "{id}");
    }
    // A forgotten id: a new message, remembered in its turn (pushing out
    // the oldest, 105).
    let forgotten = store.append(send("alice", 108)).await.unwrap();
    assert!(!forgotten.duplicate);
    assert!(forgotten.message.id > first[&("alice", 101)]);
    let again = store.append(send("alice", 108)).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.id, forgotten.message.id);
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [104, 103, 102, 101, 108]
    );
    // Carol's are all there.
    for id in [1, 2, 3] {
        let again = store.append(send("carol", id)).await.unwrap();
        assert!(again.duplicate, "carol {id}");
        assert_eq!(again.message.id, first[&("carol", id)]);
    }
    assert_eq!(remembered(dir.path(), "carol").await, [1, 2, 3]);
    drop(store);

    // A fresh writer counts alice's five: the next new id pushes out one.
    let store = open_bounded(dir.path(), 5).await;
    assert!(!store.append(send("alice", 109)).await.unwrap().duplicate);
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [103, 102, 101, 108, 109]
    );
    assert!(!store.append(send("alice", 104)).await.unwrap().duplicate);
    assert!(store.append(send("alice", 102)).await.unwrap().duplicate);
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [102, 101, 108, 109, 104]
    );
    assert_eq!(remembered(dir.path(), "carol").await, [1, 2, 3]);
}

/// With the default margin (a sixteenth of the bound), a sender may go
/// past its bound by the margin; one more, and its oldest go down to the
/// bound, in one delete.
#[tokio::test]
async fn send_ids_may_exceed_the_bound_by_the_margin() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_bounded(dir.path(), 32).await;
    store.create_account(&name("bob"), HASH).await.unwrap();
    for id in 1..=34 {
        store.append(send("alice", id)).await.unwrap();
    }
    assert_eq!(
        remembered(dir.path(), "alice").await,
        (1..=34).collect::<Vec<_>>(),
        "32 + a margin of 2"
    );
    assert!(store.append(send("alice", 1)).await.unwrap().duplicate);
    store.append(send("alice", 35)).await.unwrap();
    assert_eq!(
        remembered(dir.path(), "alice").await,
        (4..=35).collect::<Vec<_>>(),
        "down to the bound, oldest first"
    );
    assert!(!store.append(send("alice", 1)).await.unwrap().duplicate);
}

/// Pruning by time and the count bound together: an expired send id
/// pruned is taken off its sender's count (else the next send would push
/// out a remembered one), and the bound forgets by timestamp first (a send
/// stamped long ago is the oldest, whenever it came).
#[tokio::test]
async fn pruning_by_time_and_the_bound_keep_the_right_send_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_bounded(dir.path(), 5).await;
    store.create_account(&name("bob"), HASH).await.unwrap();
    let now = chat_core::now_ms();
    let long_ago = now - chat_core::SEND_ID_RETENTION.as_millis() as u64 - 60_000;
    let stamped = |id: u128, timestamp_ms: u64| NewMessage {
        timestamp_ms,
        ..send("alice", id)
    };
    for id in [4, 5, 6, 7] {
        store.append(stamped(id, now + id as u64)).await.unwrap();
    }
    // Stamped before the others: each pushes out the oldest by time, which
    // is the previous one of these.
    for id in [1, 2, 3] {
        store.append(stamped(id, long_ago)).await.unwrap();
    }
    assert_eq!(remembered(dir.path(), "alice").await, [3, 4, 5, 6, 7]);

    // The prune takes 3 (expired); four are left, room for one more.
    assert_eq!(store.prune_expired(now).await.unwrap(), 1);
    assert_eq!(remembered(dir.path(), "alice").await, [4, 5, 6, 7]);
    store.append(stamped(8, now + 8)).await.unwrap();
    assert_eq!(remembered(dir.path(), "alice").await, [4, 5, 6, 7, 8]);
    assert!(store.append(stamped(4, now + 9)).await.unwrap().duplicate);
    store.append(stamped(9, now + 9)).await.unwrap();
    assert_eq!(remembered(dir.path(), "alice").await, [5, 6, 7, 8, 9]);

    // A prune in the same batch as appends (one thread: `join!` queues
    // them all before the writer runs) also keeps the count exact, also
    // when a later append of the batch uses a send id it pruned.
    let stamped = |id: u128, timestamp_ms: u64| NewMessage {
        timestamp_ms,
        ..send("dave", id)
    };
    store.append(stamped(10, long_ago)).await.unwrap();
    for id in [11, 12, 13] {
        store.append(stamped(id, now + id as u64)).await.unwrap();
    }
    let (a, pruned, b) = futures::join!(
        store.append(stamped(14, now + 14)),
        store.prune_expired(now),
        store.append(stamped(10, now + 14)),
    );
    assert!(!a.unwrap().duplicate);
    assert_eq!(pruned.unwrap(), 1, "send id 10, stamped long ago");
    assert!(!b.unwrap().duplicate, "10 was pruned: a new send");
    assert_eq!(remembered(dir.path(), "dave").await, [11, 12, 13, 14, 10]);
    store.append(stamped(15, now + 15)).await.unwrap();
    assert_eq!(remembered(dir.path(), "dave").await, [12, 13, 14, 10, 15]);
    assert_eq!(remembered(dir.path(), "alice").await, [5, 6, 7, 8, 9]);
}

/// Deleting an account forgets the send ids it sent, with their count: a
/// re-created account has its whole bound, and in the batch of the delete
/// a resend of an old id is a new send.
#[tokio::test]
async fn a_deleted_senders_send_ids_and_count_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_bounded(dir.path(), 5).await;
    store.create_account(&name("bob"), HASH).await.unwrap();
    store.create_account(&name("alice"), HASH).await.unwrap();
    for id in 1..=5 {
        store.append(send("alice", id)).await.unwrap();
    }
    let alice = name("alice");
    let (deleted, created, resent) = futures::join!(
        store.delete_account(&alice),
        store.create_account(&alice, HASH),
        store.append(send("alice", 5)),
    );
    assert!(deleted.unwrap());
    created.unwrap();
    assert!(!resent.unwrap().duplicate, "alice's old 5 was forgotten");
    for id in 11..=14 {
        store.append(send("alice", id)).await.unwrap();
    }
    assert_eq!(
        remembered(dir.path(), "alice").await,
        [5, 11, 12, 13, 14],
        "counted from none"
    );
}

/// A batch that fails and is applied again write by write does not count
/// its send ids twice (the cached counts go with the rollback).
#[tokio::test]
async fn a_rolled_back_batch_does_not_count_its_send_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_bounded(dir.path(), 5).await;
    for who in ["bob", "carol"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    for id in 1..=3 {
        store.append(send("alice", id)).await.unwrap();
    }
    let mut saboteur = raw_connection(dir.path()).await;
    sqlx::raw_sql(
        "CREATE TRIGGER no_room_for_carol BEFORE INSERT ON messages WHEN NEW.recipient = 'carol' \
         BEGIN SELECT RAISE(ABORT, 'no room for carol'); END;",
    )
    .execute(&mut saboteur)
    .await
    .unwrap();
    // One batch (see `one_failing_write_does_not_fail_its_batch`).
    let (stored, failed) = futures::join!(
        store.append(send("alice", 4)),
        store.append(message("carol", "refused", false, None)),
    );
    assert!(!stored.unwrap().duplicate);
    assert!(failed.is_err());
    store.append(send("alice", 5)).await.unwrap();
    assert_eq!(remembered(dir.path(), "alice").await, [1, 2, 3, 4, 5]);
    store.append(send("alice", 6)).await.unwrap();
    assert_eq!(remembered(dir.path(), "alice").await, [2, 3, 4, 5, 6]);
}

/// Version 6 rebuilds the send ids in arrival order: a version 5
/// database's send ids are kept, and the bound forgets the oldest by
/// timestamp.
#[tokio::test]
async fn a_version_5_database_keeps_its_send_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        use sqlx::Connection;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(DATABASE_FILE).display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let release = dir.path().join("migrations-v5");
        std::fs::create_dir(&release).unwrap();
        for (file, sql) in VERSIONS_1_TO_4 {
            std::fs::write(release.join(file), sql).unwrap();
        }
        std::fs::write(
            release.join("0005_id_floor.sql"),
            include_str!("../migrations/sqlite/0005_id_floor.sql"),
        )
        .unwrap();
        let migrator = sqlx::migrate::Migrator::new(release.as_path())
            .await
            .unwrap();
        migrator.run(&mut conn).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO accounts (name, last_id, stored, created_ms) VALUES ('bob', 3, 0, 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let now = chat_core::now_ms() as i64;
        // Keyed in another order than their times.
        for (id, message_id, at) in [(3u128, 1, now), (1, 2, now + 1), (2, 3, now + 2)] {
            sqlx::query(
                "INSERT INTO send_ids (sender, client_id, recipient, message_id, timestamp_ms, body_crc) \
                 VALUES ('alice', ?, 'bob', ?, ?, NULL)",
            )
            .bind(id.to_be_bytes().to_vec())
            .bind(message_id)
            .bind(at)
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
    let store = open_bounded(dir.path(), 3).await;
    assert_eq!(remembered(dir.path(), "alice").await, [3, 1, 2]);
    let resend = store.append(send("alice", 1)).await.unwrap();
    assert!(resend.duplicate);
    assert_eq!(resend.message.id, 2);
    let mut next = send("alice", 4);
    next.timestamp_ms = chat_core::now_ms() + 10;
    assert!(!store.append(next).await.unwrap().duplicate);
    assert_eq!(remembered(dir.path(), "alice").await, [1, 2, 4]);
}

/// The hash given to `create_account` is stored in the same write and read
/// back by `credentials`, also from a reopened database; an unknown name
/// has no credentials.
#[tokio::test]
async fn a_created_accounts_password_hash_is_stored_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let alice = name("alice");
    {
        let store = open(dir.path()).await;
        store.create_account(&alice, HASH).await.unwrap();
        assert_eq!(
            store.credentials(&alice).await.unwrap(),
            with_password(HASH)
        );
        assert_eq!(store.credentials(&name("nobody")).await.unwrap(), None);
        // A second create of the name changes nothing, its hash included.
        assert_eq!(
            store.create_account(&alice, NEW_HASH).await.unwrap_err(),
            StoreError::AccountExists(alice.clone())
        );
        assert_eq!(
            store.credentials(&alice).await.unwrap(),
            with_password(HASH)
        );
    }
    let store = open(dir.path()).await;
    assert_eq!(
        store.credentials(&alice).await.unwrap(),
        with_password(HASH)
    );
    assert_eq!(store.credentials(&name("nobody")).await.unwrap(), None);
}

/// `set_password` replaces the hash; when it returns, the change is
/// committed (another connection sees it) and survives reopening.
#[tokio::test]
async fn set_password_replaces_the_hash_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let alice = name("alice");
    {
        let store = open(dir.path()).await;
        store.create_account(&alice, HASH).await.unwrap();
        store.set_password(&alice, NEW_HASH).await.unwrap();
        assert_eq!(
            store.credentials(&alice).await.unwrap(),
            with_password(NEW_HASH)
        );
        let mut other = raw_connection(dir.path()).await;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT password_hash FROM accounts WHERE name = 'alice'")
                .fetch_one(&mut other)
                .await
                .unwrap();
        assert_eq!(
            stored.as_deref(),
            Some(NEW_HASH),
            "committed before the answer"
        );
    }
    let store = open(dir.path()).await;
    assert_eq!(
        store.credentials(&alice).await.unwrap(),
        with_password(NEW_HASH)
    );
    // Nothing else of the account changed: it still takes messages.
    assert_eq!(
        store
            .append(message("alice", "hi", false, None))
            .await
            .unwrap()
            .message
            .id,
        1
    );
}

/// On a name with no account, never created or deleted, `set_password`
/// fails with `NoSuchAccount` and creates nothing, and `credentials` is
/// `None`; a re-created name has the new account's hash, not the old one's.
#[tokio::test]
async fn passwords_of_missing_and_deleted_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let ghost = name("ghost");
    assert_eq!(
        store.set_password(&ghost, HASH).await.unwrap_err(),
        StoreError::NoSuchAccount(ghost.clone())
    );
    assert!(!store.account_exists(&ghost).await.unwrap());
    assert_eq!(store.credentials(&ghost).await.unwrap(), None);

    let bob = name("bob");
    store.create_account(&bob, HASH).await.unwrap();
    assert!(store.delete_account(&bob).await.unwrap());
    assert_eq!(store.credentials(&bob).await.unwrap(), None);
    assert_eq!(
        store.set_password(&bob, NEW_HASH).await.unwrap_err(),
        StoreError::NoSuchAccount(bob.clone())
    );
    assert!(!store.account_exists(&bob).await.unwrap());
    store.create_account(&bob, NEW_HASH).await.unwrap();
    assert_eq!(
        store.credentials(&bob).await.unwrap(),
        with_password(NEW_HASH)
    );
}

/// Password changes in one batch with other writes: each sees the writes
/// before it in the batch (a create, a delete), and the appends gathered
/// around them are stored as usual.
#[tokio::test]
async fn password_changes_in_a_batch_see_the_writes_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for who in ["bob", "dave"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    let (bob, erin, dave, frank) = (name("bob"), name("erin"), name("dave"), name("frank"));
    // One thread: `join!` queues every write before the writer task runs,
    // so they are one batch, applied in this order.
    let (sent, changed, created, erin_changed, deleted, dave_changed, frank_changed, again) = futures::join!(
        store.append(message("bob", "before", false, Some(1))),
        store.set_password(&bob, NEW_HASH),
        store.create_account(&erin, HASH),
        store.set_password(&erin, NEW_HASH),
        store.delete_account(&dave),
        store.set_password(&dave, NEW_HASH),
        store.set_password(&frank, NEW_HASH),
        store.append(message("bob", "after", false, None)),
    );
    assert_eq!(sent.unwrap().message.id, 1);
    changed.unwrap();
    created.unwrap();
    erin_changed.unwrap();
    assert!(deleted.unwrap());
    assert_eq!(
        dave_changed.unwrap_err(),
        StoreError::NoSuchAccount(dave.clone())
    );
    assert_eq!(
        frank_changed.unwrap_err(),
        StoreError::NoSuchAccount(frank.clone())
    );
    assert_eq!(again.unwrap().message.id, 2);

    assert_eq!(
        store.credentials(&bob).await.unwrap(),
        with_password(NEW_HASH)
    );
    assert_eq!(
        store.credentials(&erin).await.unwrap(),
        with_password(NEW_HASH)
    );
    assert_eq!(store.credentials(&dave).await.unwrap(), None);
    assert_eq!(store.credentials(&frank).await.unwrap(), None);
    let queued = store.take_undelivered(&bob, 10).await.unwrap();
    assert_eq!(
        queued.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["before", "after"]
    );
}

/// A password change that fails on its own (a trigger refuses carol's)
/// fails alone, leaves the old hash, and its error names neither hash.
#[tokio::test]
async fn a_failing_password_change_fails_alone_without_the_hash_in_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for who in ["bob", "carol"] {
        store.create_account(&name(who), HASH).await.unwrap();
    }
    let mut saboteur = raw_connection(dir.path()).await;
    sqlx::raw_sql(
        "CREATE TRIGGER no_password_for_carol BEFORE UPDATE OF password_hash ON accounts \
         WHEN NEW.name = 'carol' BEGIN SELECT RAISE(ABORT, 'no new password for carol'); END;",
    )
    .execute(&mut saboteur)
    .await
    .unwrap();
    let (bob, carol) = (name("bob"), name("carol"));
    // One batch, as above.
    let (bob_changed, carol_changed, sent) = futures::join!(
        store.set_password(&bob, NEW_HASH),
        store.set_password(&carol, NEW_HASH),
        store.append(message("carol", "still here", false, None)),
    );
    bob_changed.unwrap();
    assert_eq!(sent.unwrap().message.id, 1);
    let err = carol_changed.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(why) if why.contains("no new password for carol")),
        "{err}"
    );
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(NEW_HASH) && !text.contains(HASH), "{text}");
    }
    assert_eq!(
        store.credentials(&bob).await.unwrap(),
        with_password(NEW_HASH)
    );
    assert_eq!(
        store.credentials(&carol).await.unwrap(),
        with_password(HASH)
    );
}

/// Version 7 adds the password hash column: a version 6 database's
/// accounts come out with no password (`None`, "from before passwords"),
/// keep their messages, and can set one; new accounts get theirs.
#[tokio::test]
async fn a_version_6_databases_accounts_have_no_password() {
    let dir = tempfile::tempdir().unwrap();
    {
        use sqlx::Connection;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(DATABASE_FILE).display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let release = dir.path().join("migrations-v6");
        std::fs::create_dir(&release).unwrap();
        for (file, sql) in VERSIONS_1_TO_4 {
            std::fs::write(release.join(file), sql).unwrap();
        }
        for (file, sql) in [
            (
                "0005_id_floor.sql",
                include_str!("../migrations/sqlite/0005_id_floor.sql"),
            ),
            (
                "0006_send_ids_in_arrival_order.sql",
                include_str!("../migrations/sqlite/0006_send_ids_in_arrival_order.sql"),
            ),
        ] {
            std::fs::write(release.join(file), sql).unwrap();
        }
        let migrator = sqlx::migrate::Migrator::new(release.as_path())
            .await
            .unwrap();
        migrator.run(&mut conn).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO accounts (name, last_id, stored, created_ms) VALUES ('old', 4, 1, 0), ('older', 0, 0, 0); \
             INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
             VALUES ('old', 4, 'older', 'from version 6', 5, 0);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let store = open(dir.path()).await;
    let (old, older) = (name("old"), name("older"));
    let no_password = Some(Credentials {
        password_hash: None,
    });
    assert_eq!(store.credentials(&old).await.unwrap(), no_password);
    assert_eq!(store.credentials(&older).await.unwrap(), no_password);
    let kept = store.take_undelivered(&old, 10).await.unwrap();
    assert_eq!((kept[0].id, kept[0].body.as_str()), (4, "from version 6"));

    store.set_password(&old, HASH).await.unwrap();
    assert_eq!(store.credentials(&old).await.unwrap(), with_password(HASH));
    assert_eq!(store.credentials(&older).await.unwrap(), no_password);
    let young = name("young");
    store.create_account(&young, NEW_HASH).await.unwrap();
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(store.credentials(&old).await.unwrap(), with_password(HASH));
    assert_eq!(store.credentials(&older).await.unwrap(), no_password);
    assert_eq!(
        store.credentials(&young).await.unwrap(),
        with_password(NEW_HASH)
    );
}

/// One writer per database: the store's caches depend on it, so a second
/// store on the same directory is refused while the first lives.
#[tokio::test]
async fn a_second_store_on_one_directory_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteStore::open(dir.path(), SqliteOptions::default())
        .await
        .unwrap();
    let second = SqliteStore::open(dir.path(), SqliteOptions::default()).await;
    assert!(matches!(second, Err(OpenError::Locked(_))), "{second:?}");
    drop(first);
    SqliteStore::open(dir.path(), SqliteOptions::default())
        .await
        .expect("free once the first is gone");
}
