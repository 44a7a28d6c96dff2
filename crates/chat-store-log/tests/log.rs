//! The log store on real files: what is acknowledged is there after a
//! reopen, a torn last write is cut off, compaction and backups keep the
//! state, and a directory is used by one process at a time.

use std::path::Path;

use chat_core::{Change, MemoryStore, Message, MessageBody, NewMessage, Store, Username};
use chat_store_log::{LogError, LogOptions, LogStore};
use proptest::prelude::*;

fn name(n: &str) -> Username {
    Username::parse(n).expect("valid name")
}

fn message(to: &str, from: &str, body: &str, send_id: Option<u128>) -> NewMessage {
    NewMessage {
        recipient: name(to),
        sender: name(from),
        body: MessageBody::parse(body).expect("valid body"),
        timestamp_ms: chat_core::now_ms(),
        delivered: false,
        send_id,
    }
}

async fn open(dir: &Path) -> LogStore {
    LogStore::open(dir, LogOptions::default())
        .await
        .expect("open the store")
}

/// Everything a store holds, comparable: a dump with its order (which
/// depends on hashing seeds for send ids) taken out.
fn state(store: &MemoryStore) -> Vec<String> {
    let (changes, ()) = store.dump(|| ()).expect("dump");
    let mut lines: Vec<String> = changes.iter().map(|c| format!("{c:?}")).collect();
    lines.sort();
    lines
}

/// What a log store holds: its backup, replayed into a memory store (the
/// store's own state is private).
async fn state_of(store: LogStore) -> Vec<String> {
    let backup = tempfile::tempdir().unwrap();
    store.backup(backup.path()).await.expect("backup");
    store.close().await;
    let replica = MemoryStore::new(chat_core::DEFAULT_QUEUE_LIMIT);
    for entry in std::fs::read_dir(backup.path()).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        let decoded = chat_store_log::codec::decode(&bytes[8..]);
        assert_eq!(decoded.stopped, None);
        for change in decoded.changes {
            replica.apply(change).unwrap();
        }
    }
    state(&replica)
}

#[tokio::test]
async fn what_was_acknowledged_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store
        .create_account(&name("alice"), "hash-a")
        .await
        .unwrap();
    store.create_account(&name("bob"), "hash-b").await.unwrap();
    store.create_account(&name("gone"), "hash-g").await.unwrap();
    let first = store
        .append(message("bob", "alice", "one", Some(7)))
        .await
        .unwrap();
    store
        .append(message("bob", "alice", "two", None))
        .await
        .unwrap();
    store
        .append(message("bob", "alice", "three", None))
        .await
        .unwrap();
    let taken = store.take_undelivered(&name("bob"), 2).await.unwrap();
    assert_eq!(taken.len(), 2);
    assert_eq!(store.ack(&name("bob"), taken[0].id).await.unwrap(), 1);
    store.set_password(&name("alice"), "hash-a2").await.unwrap();
    store
        .append(message("gone", "alice", "lost with the account", None))
        .await
        .unwrap();
    assert!(store.delete_account(&name("gone")).await.unwrap());
    store.close().await;

    let store = open(dir.path()).await;
    let alice = store.credentials(&name("alice")).await.unwrap().unwrap();
    assert_eq!(alice.password_hash.as_deref(), Some("hash-a2"));
    assert!(store.credentials(&name("gone")).await.unwrap().is_none());
    let unacked: Vec<String> = store
        .unacked(&name("bob"))
        .await
        .unwrap()
        .iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(unacked, ["two"], "taken and not acknowledged");
    let queued = store.take_undelivered(&name("bob"), 0).await.unwrap();
    assert!(queued.is_empty(), "a take of 0 takes nothing");
    let queued = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].body.as_str(), "three");
    // The send id is remembered: a resend gets the first answer.
    let again = store
        .append(message("bob", "alice", "one", Some(7)))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.id, first.message.id);
    // Ids go on above every id given before, also for a re-created name.
    let next = store
        .append(message("bob", "alice", "four", None))
        .await
        .unwrap();
    assert!(next.message.id > queued[0].id);
    store
        .create_account(&name("gone"), "hash-g2")
        .await
        .unwrap();
    let reborn = store
        .append(message("gone", "alice", "new life", None))
        .await
        .unwrap();
    assert!(reborn.message.id > 1, "above the deleted account's ids");
    store.close().await;
}

#[tokio::test]
async fn a_torn_last_write_is_cut_off_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), "hash").await.unwrap();
    for i in 0..5 {
        store
            .append(message("bob", "alice", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    store.close().await;
    // A crash in the middle of writing a record: its first half is there.
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("log-"))
        .expect("a log file")
        .path();
    let whole = std::fs::read(&log).unwrap();
    let mut record = Vec::new();
    chat_store_log::codec::encode(&Change::Delete { name: name("bob") }, &mut record);
    let mut torn = whole.clone();
    torn.extend_from_slice(&record[..record.len() - 3]);
    std::fs::write(&log, &torn).unwrap();

    let store = open(dir.path()).await;
    let taken = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(taken.len(), 5, "the torn delete never happened");
    store.close().await;
    assert!(
        std::fs::read(&log).unwrap().len() > whole.len(),
        "the torn bytes are gone and the take was written after the intact records"
    );
    let store = open(dir.path()).await;
    assert_eq!(store.unacked(&name("bob")).await.unwrap().len(), 5);
    store.close().await;
}

#[tokio::test]
async fn compaction_keeps_the_state_and_drops_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        compact_after: 4096,
        ..LogOptions::default()
    };
    let store = LogStore::open(dir.path(), options.clone()).await.unwrap();
    store.create_account(&name("bob"), "hash").await.unwrap();
    let mut last = 0;
    for i in 0..400u128 {
        let appended = store
            .append(message("bob", "alice", &format!("message {i}"), Some(i)))
            .await
            .unwrap();
        last = appended.message.id;
        if i % 10 == 9 {
            store.take_undelivered(&name("bob"), 100).await.unwrap();
            store.ack(&name("bob"), last - 2).await.unwrap();
        }
    }
    store.compact().await.unwrap();
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != "LOCK")
        .collect();
    assert_eq!(files.len(), 2, "one snapshot and one log: {files:?}");
    // Writes go on after the compaction, into the new log.
    store
        .append(message("bob", "alice", "after", None))
        .await
        .unwrap();
    store.close().await;

    let store = LogStore::open(dir.path(), options).await.unwrap();
    let unacked = store.unacked(&name("bob")).await.unwrap();
    assert_eq!(unacked.len(), 2, "the last two taken were not acknowledged");
    let queued = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].body.as_str(), "after");
    let resent = store
        .append(message("bob", "alice", "message 399", Some(399)))
        .await
        .unwrap();
    assert!(resent.duplicate, "send ids survive the snapshot");
    assert_eq!(resent.message.id, last);
    store.close().await;
}

#[tokio::test]
async fn the_store_compacts_by_itself_as_the_log_grows() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        compact_after: 2048,
        ..LogOptions::default()
    };
    let store = LogStore::open(dir.path(), options).await.unwrap();
    store.create_account(&name("bob"), "hash").await.unwrap();
    let snapshot = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
    };
    let mut sent = 0;
    while !snapshot() {
        assert!(sent < 10_000, "no compaction after {sent} messages");
        store
            .append(message("bob", "alice", "a message of some length", None))
            .await
            .unwrap();
        store.take_undelivered(&name("bob"), 1).await.unwrap();
        store.ack(&name("bob"), u64::MAX).await.unwrap();
        sent += 1;
        tokio::task::yield_now().await;
    }
    store.close().await;
}

#[tokio::test]
async fn a_backup_opens_as_a_store_with_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), "hash").await.unwrap();
    store.create_account(&name("alice"), "hash").await.unwrap();
    for i in 0..20u128 {
        store
            .append(message("bob", "alice", &format!("m{i}"), Some(i)))
            .await
            .unwrap();
    }
    store.take_undelivered(&name("bob"), 5).await.unwrap();
    let backup = tempfile::tempdir().unwrap();
    let size = store.backup(backup.path()).await.unwrap();
    assert!(size > 0);
    assert!(matches!(
        store.backup(backup.path()).await,
        Err(LogError::Occupied(_))
    ));
    // Later writes are not in the backup.
    store
        .append(message("bob", "alice", "later", None))
        .await
        .unwrap();
    let restored = open(backup.path()).await;
    assert_eq!(restored.unacked(&name("bob")).await.unwrap().len(), 5);
    assert_eq!(
        restored
            .take_undelivered(&name("bob"), 100)
            .await
            .unwrap()
            .len(),
        15
    );
    assert!(
        restored
            .append(message("bob", "alice", "m3", Some(3)))
            .await
            .unwrap()
            .duplicate
    );
    restored.close().await;
    store.close().await;
}

#[tokio::test]
async fn one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let second = LogStore::open(dir.path(), LogOptions::default()).await;
    match second {
        Err(err @ LogError::Locked(_)) => assert_eq!(err.code(), "log_locked"),
        other => panic!("expected log_locked, got {other:?}"),
    }
    store.close().await;
    open(dir.path()).await.close().await;
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), "hash").await.unwrap();
    store.compact().await.unwrap();
    store.close().await;
    let snapshot = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&snapshot, bytes).unwrap();
    match LogStore::open(dir.path(), LogOptions::default()).await {
        Err(err @ LogError::Corrupt { .. }) => assert_eq!(err.code(), "log_corrupt"),
        other => panic!("expected log_corrupt, got {other:?}"),
    }
}

/// One operation of a random workload.
#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Delete(u8),
    Send {
        to: u8,
        from: u8,
        send_id: Option<u8>,
    },
    Take(u8, u8),
    Ack(u8, u8),
    Password(u8),
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4u8).prop_map(Op::Create),
        (0..4u8).prop_map(Op::Delete),
        (0..4u8, 0..4u8, proptest::option::of(0..6u8)).prop_map(|(to, from, send_id)| Op::Send {
            to,
            from,
            send_id
        }),
        (0..4u8, 0..4u8).prop_map(|(n, k)| Op::Take(n, k)),
        (0..4u8, 0..40u8).prop_map(|(n, k)| Op::Ack(n, k)),
        (0..4u8).prop_map(Op::Password),
        Just(Op::Compact),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any workload, with compactions anywhere in it, reopens to the same
    /// state as a memory store that ran the same workload.
    #[test]
    fn a_reopened_store_is_the_store_that_ran(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path()).await;
            let model = MemoryStore::new(chat_core::DEFAULT_QUEUE_LIMIT);
            let user = |n: u8| name(&format!("user{n}"));
            // Recent: send ids are kept for a day (the reopened store
            // forgets older ones at once).
            let start = chat_core::now_ms();
            for (step, op) in ops.iter().enumerate() {
                match op {
                    Op::Create(n) => {
                        let a = store.create_account(&user(*n), "hash").await.is_ok();
                        let b = model.create_account(&user(*n), "hash").await.is_ok();
                        assert_eq!(a, b);
                    }
                    Op::Delete(n) => {
                        assert_eq!(
                            store.delete_account(&user(*n)).await.unwrap(),
                            model.delete_account(&user(*n)).await.unwrap()
                        );
                    }
                    Op::Send { to, from, send_id } => {
                        let body = format!("step {step}");
                        let mut m = message("user0", "user0", &body, send_id.map(u128::from));
                        m.recipient = user(*to);
                        m.sender = user(*from);
                        m.timestamp_ms = start + step as u64;
                        let a = store.append(m.clone()).await.map(|a| (a.message, a.duplicate));
                        let b = model.append(m).await.map(|a| (a.message, a.duplicate));
                        assert_eq!(a, b);
                    }
                    Op::Take(n, k) => {
                        let a: Result<Vec<Message>, _> = store.take_undelivered(&user(*n), usize::from(*k)).await;
                        let b = model.take_undelivered(&user(*n), usize::from(*k)).await;
                        assert_eq!(a, b);
                    }
                    Op::Ack(n, k) => {
                        let a = store.ack(&user(*n), u64::from(*k)).await;
                        let b = model.ack(&user(*n), u64::from(*k)).await;
                        assert_eq!(a, b);
                    }
                    Op::Password(n) => {
                        let hash = format!("hash{step}");
                        let a = store.set_password(&user(*n), &hash).await.is_ok();
                        let b = model.set_password(&user(*n), &hash).await.is_ok();
                        assert_eq!(a, b);
                    }
                    Op::Compact => store.compact().await.unwrap(),
                }
            }
            store.close().await;
            let reopened = open(dir.path()).await;
            assert_eq!(state_of(reopened).await, state(&model));
        });
    }
}

/// A crash while a compaction starts: the next log exists (empty) and the
/// current one ends in a torn write. The directory opens, without the torn
/// write.
#[tokio::test]
async fn a_torn_log_followed_by_an_empty_one_opens() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), "hash").await.unwrap();
    store
        .append(message("bob", "alice", "kept", None))
        .await
        .unwrap();
    store.close().await;
    let current = dir.path().join(format!("log-{:020}", 0));
    let mut record = Vec::new();
    chat_store_log::codec::encode(&Change::Delete { name: name("bob") }, &mut record);
    let mut bytes = std::fs::read(&current).unwrap();
    bytes.extend_from_slice(&record[..record.len() / 2]);
    std::fs::write(&current, bytes).unwrap();
    std::fs::write(
        dir.path().join(format!("log-{:020}", 1)),
        chat_store_log::codec::LOG_MAGIC,
    )
    .unwrap();

    let store = open(dir.path()).await;
    let taken = store.take_undelivered(&name("bob"), 10).await.unwrap();
    assert_eq!(taken.len(), 1, "the torn delete never happened");
    store.close().await;
}

/// A record whose checksum holds but which this version cannot read is
/// damage, not a torn write: the store refuses to open rather than drop it
/// and everything after it.
#[tokio::test]
async fn an_intact_but_unreadable_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create_account(&name("bob"), "hash").await.unwrap();
    store.close().await;
    let current = dir.path().join(format!("log-{:020}", 0));
    let payload = [99u8];
    let mut bytes = std::fs::read(&current).unwrap();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    std::fs::write(&current, bytes).unwrap();
    match LogStore::open(dir.path(), LogOptions::default()).await {
        Err(err @ LogError::Corrupt { .. }) => assert_eq!(err.code(), "log_corrupt"),
        other => panic!("expected log_corrupt, got {other:?}"),
    }
}
