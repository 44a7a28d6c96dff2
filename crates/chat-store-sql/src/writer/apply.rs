//! Applying a batch of jobs inside one transaction: what each write does
//! to the database and to the counters cache. Nothing here commits a
//! failed write or answers a caller; [`super`] decides that.

use std::collections::HashMap;

use chat_core::{Appended, Message, NewMessage, StoreError, Username, now_ms};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::Writer;
use super::counters::{CounterCache, Counters, SendIdCounts};
use super::job::{Ack, Job, NewAccount, SetPassword, Take};
use crate::message_from_row;

/// Rows per multi-row statement (SQLite allows 32,766 parameters).
const ROWS_PER_STATEMENT: usize = 500;

/// A send id stored before: the message it made, and what it was (to tell
/// a resend from a different message reusing the id).
#[derive(Clone)]
struct KnownSend {
    message_id: i64,
    timestamp_ms: i64,
    recipient: String,
    /// CRC-32 of the body; `None` for rows from schema version 2.
    body_crc: Option<i64>,
}

/// Send ids of the batch's appends that are stored (or were stored by an
/// earlier append of this batch), by sender and id.
type KnownSends = HashMap<(Username, [u8; 16]), KnownSend>;

/// A message row gathered by an append, not yet written.
struct NewRow {
    /// Its id in the recipient's sequence.
    id: i64,
    message: NewMessage,
}

/// A send-id row gathered by an append, not yet written.
struct NewSendId {
    sender: Username,
    client_id: [u8; 16],
    recipient: Username,
    message_id: i64,
    timestamp_ms: i64,
    body_crc: u32,
}

/// Rows gathered by appends, not yet written.
#[derive(Default)]
struct Pending {
    messages: Vec<NewRow>,
    send_ids: Vec<NewSendId>,
    /// Accounts whose cached counters changed (with repeats).
    touched: Vec<Username>,
    /// The sender of each new send-id row of the batch (not of an expired
    /// one taken over): the commit adds them to the cached counts and
    /// checks those against the bound. Kept across the flushes before the
    /// commit.
    grown: Vec<Username>,
}

/// How far past the per-sender bound a sender's send ids may grow before
/// the commit deletes its oldest, down to the bound: a sixteenth of it
/// (625 of 10,000; none for a bound under 16). So the delete runs about
/// once per this many new send ids of a sender at its bound, not at every
/// batch.
fn send_id_margin(bound: usize) -> usize {
    bound / 16
}

/// What the final flush needs to keep send ids within their bound.
struct Commit<'a> {
    send_ids: &'a mut SendIdCounts,
    /// Most send ids remembered per sender.
    bound: usize,
    /// The batch's time, ms since the epoch (marks the counts used).
    now_ms: u64,
}

/// Why a batch's transaction failed; either way it may still be open, and
/// must be rolled back.
pub(super) enum Failure {
    /// Opening it (`BEGIN IMMEDIATE` and the send-id lookup) failed: no
    /// write was tried, so none of them is to blame (typically another
    /// connection held the write lock past the busy timeout).
    Begin(sqlx::Error),
    /// A write, or the commit, failed.
    Write(sqlx::Error),
}

impl Writer {
    /// Applies `batch` in one transaction and commits it, recording each
    /// job's result in it. `Err`: the transaction failed and may still be
    /// open; the caller must roll it back, and no result may be sent.
    pub(super) async fn apply(&mut self, batch: &mut [Job]) -> Result<(), Failure> {
        let now = now_ms();
        let known = begin_and_find_send_ids(&mut self.conn, batch, &mut self.send_ids, now)
            .await
            .map_err(Failure::Begin)?;
        self.apply_begun(batch, known, now)
            .await
            .map_err(Failure::Write)
    }

    /// [`apply`](Self::apply) once the transaction is open.
    ///
    /// Acks are applied first, whatever their place in the batch: the
    /// writes in a batch are concurrent (each caller waits for its answer
    /// before it writes again), and an ack can only name messages its
    /// recipient has seen, which an earlier batch committed.
    async fn apply_begun(
        &mut self,
        batch: &mut [Job],
        mut known: KnownSends,
        now: u64,
    ) -> Result<(), sqlx::Error> {
        let Writer {
            conn,
            options,
            counters,
            send_ids,
            metrics: _,
        } = self;
        let mut pending = Pending::default();
        for job in batch.iter_mut() {
            if let Job::Ack(call) = job {
                let result = ack(conn, counters, &mut pending, &call.args, now).await?;
                call.set(result);
            }
        }
        for job in batch.iter_mut() {
            match job {
                // Applied first, above.
                Job::Ack(_) => {}
                Job::Append(call) => {
                    let result = append(
                        conn,
                        counters,
                        &mut known,
                        &mut pending,
                        &call.args,
                        options.queue_limit,
                        now,
                    )
                    .await?;
                    call.set(result);
                }
                // Every other write sees the rows gathered so far.
                Job::Create(call) => {
                    flush(conn, counters, &mut pending, None).await?;
                    let result = create(conn, counters, &call.args, now).await?;
                    call.set(result);
                }
                // Touches only the account's password hash, which no
                // gathered row or cached counter holds: nothing to flush.
                Job::SetPassword(call) => {
                    let result = set_password(conn, &call.args).await?;
                    call.set(result);
                }
                Job::Delete(call) => {
                    flush(conn, counters, &mut pending, None).await?;
                    let result = delete(conn, counters, send_ids, &mut known, &call.args).await?;
                    call.set(result);
                }
                Job::Take(call) => {
                    flush(conn, counters, &mut pending, None).await?;
                    let result = take(conn, counters, &call.args, now).await?;
                    call.set(result);
                }
                Job::Prune(call) => {
                    flush(conn, counters, &mut pending, None).await?;
                    let result = prune(
                        conn,
                        counters,
                        send_ids,
                        &mut known,
                        call.args,
                        options.idle_account_after,
                    )
                    .await?;
                    call.set(result);
                }
                Job::Crash => panic!(
                    "the database writer was told to crash (SqliteStore::crash_writer_for_tests)"
                ),
            }
        }
        let commit = Commit {
            send_ids,
            bound: options.send_ids_per_sender.max(1),
            now_ms: now,
        };
        flush(conn, counters, &mut pending, Some(commit)).await
    }
}

/// The oldest send-id timestamp still remembered at `now_ms`, as stored.
fn retention_horizon(now_ms: u64) -> i64 {
    chat_core::send_id_horizon(now_ms) as i64
}

/// Opens the batch's transaction, taking the write lock at once, and finds
/// which of its appends' send ids were stored before (with the original
/// message id and timestamp), in one round trip. In the same round trip it
/// counts the send ids remembered for each of the appends' senders whose
/// count is not cached (one `COUNT … GROUP BY` over the key index), and
/// caches them, marked used at `now_ms`.
///
/// `BEGIN IMMEDIATE`, not a deferred `BEGIN`: a deferred transaction reads
/// first and asks for the write lock at its first write; if another
/// connection (an operator's shell, a backup tool) committed in between,
/// SQLite cannot upgrade the stale snapshot and fails the whole batch with
/// "database is locked" at once, without waiting out the busy timeout.
/// Taking the lock up front waits for the other writer instead, and then
/// reads a snapshot nobody can change under the batch.
async fn begin_and_find_send_ids(
    conn: &mut SqliteConnection,
    batch: &[Job],
    counts: &mut SendIdCounts,
    now_ms: u64,
) -> Result<KnownSends, sqlx::Error> {
    let keys: Vec<(&Username, [u8; 16])> = batch
        .iter()
        .filter_map(|job| match job {
            Job::Append(call) => call
                .args
                .send_id
                .map(|id| (&call.args.sender, id.to_be_bytes())),
            _ => None,
        })
        .collect();
    let mut known = HashMap::new();
    if keys.is_empty() {
        sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        return Ok(known);
    }
    let mut uncounted: Vec<&Username> = keys
        .iter()
        .map(|(sender, _)| *sender)
        .filter(|sender| !counts.contains(sender))
        .collect();
    uncounted.sort_unstable();
    uncounted.dedup();
    // Never more chunks than the keys have: each sender has a key.
    let uncounted: Vec<&[&Username]> = uncounted.chunks(ROWS_PER_STATEMENT).collect();
    let mut counted: HashMap<String, i64> = HashMap::new();
    for (n, chunk) in keys.chunks(ROWS_PER_STATEMENT).enumerate() {
        // A join against the keys as a VALUES table, so that each key is
        // one primary-key probe.
        let mut query = QueryBuilder::<Sqlite>::new(if n == 0 { "BEGIN IMMEDIATE; " } else { "" });
        query.push(
            "SELECT s.sender, s.client_id, s.message_id, s.timestamp_ms, s.recipient, s.body_crc FROM (VALUES ",
        );
        let mut values = query.separated(", ");
        for (sender, id) in chunk {
            values
                .push("(")
                .push_bind_unseparated(sender.as_str())
                .push_unseparated(", ");
            values
                .push_bind_unseparated(id.to_vec())
                .push_unseparated(")");
        }
        query.push(
            ") AS k CROSS JOIN send_ids AS s ON s.sender = k.column1 AND s.client_id = k.column2",
        );
        if let Some(senders) = uncounted.get(n) {
            // Its rows have two columns, the lookup's six.
            query.push("; SELECT sender, COUNT(*) FROM send_ids WHERE sender IN (");
            let mut values = query.separated(", ");
            for sender in *senders {
                values.push_bind(sender.as_str());
            }
            query.push(") GROUP BY sender");
        }

        for row in query
            .build()
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?
        {
            if row.len() == 2 {
                counted.insert(row.try_get(0)?, row.try_get(1)?);
                continue;
            }
            let (sender, id, known_send) = send_id_row(&row)?;
            if let (Ok(sender), Ok(id)) = (Username::parse(&sender), <[u8; 16]>::try_from(id)) {
                known.insert((sender, id), known_send);
            }
        }
    }
    // Only now that every query of the lookup succeeded (a sender with no
    // row has none remembered).
    for sender in uncounted.into_iter().flatten() {
        let remembered = counted.get(sender.as_str()).copied().unwrap_or(0);
        counts.insert((*sender).clone(), remembered, now_ms);
    }
    Ok(known)
}

fn send_id_row(row: &SqliteRow) -> Result<(String, Vec<u8>, KnownSend), sqlx::Error> {
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        KnownSend {
            message_id: row.try_get(2)?,
            timestamp_ms: row.try_get(3)?,
            recipient: row.try_get(4)?,
            body_crc: row.try_get(5)?,
        },
    ))
}

async fn append(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    known: &mut KnownSends,
    pending: &mut Pending,
    message: &NewMessage,
    queue_limit: usize,
    now: u64,
) -> Result<Result<Appended, StoreError>, sqlx::Error> {
    let send_id = message.send_id.map(u128::to_be_bytes);
    // A send id past its retention (not pruned yet) is forgotten, as the
    // memory store forgets it: measured from the new message's time.
    let retained_since = retention_horizon(message.timestamp_ms);
    if let Some(send_id) = send_id
        && let Some(first) = known
            .get(&(message.sender.clone(), send_id))
            .filter(|first| first.timestamp_ms >= retained_since)
    {
        let same_body = first
            .body_crc
            .is_none_or(|crc| crc == i64::from(message.body.fingerprint()));
        if first.recipient != message.recipient.as_str() || !same_body {
            return Ok(Err(StoreError::SendIdReused(message.recipient.clone())));
        }
        let original = Message {
            id: first.message_id as u64,
            sender: message.sender.clone(),
            body: message.body.clone(),
            timestamp_ms: first.timestamp_ms as u64,
        };
        return Ok(Ok(Appended {
            message: original,
            duplicate: true,
        }));
    }
    let Some(account) = counters.load(conn, &message.recipient, now).await? else {
        return Ok(Err(StoreError::NoSuchAccount(message.recipient.clone())));
    };
    if account.stored as usize >= queue_limit {
        return Ok(Err(StoreError::QueueFull(message.recipient.clone())));
    }
    account.last_id += 1;
    account.stored += 1;
    let id = account.last_id;
    pending.touched.push(message.recipient.clone());
    pending.messages.push(NewRow {
        id,
        message: message.clone(),
    });
    if let Some(client_id) = send_id {
        let timestamp_ms = message.timestamp_ms as i64;
        let body_crc = message.body.fingerprint();
        let replaced = known.insert(
            (message.sender.clone(), client_id),
            KnownSend {
                message_id: id,
                timestamp_ms,
                recipient: message.recipient.as_str().to_owned(),
                body_crc: Some(i64::from(body_crc)),
            },
        );
        // `known` holds every stored row of the batch's keys, so an id it
        // has is expired and taken over by the upsert: no new row.
        if replaced.is_none() {
            pending.grown.push(message.sender.clone());
        }
        pending.send_ids.push(NewSendId {
            sender: message.sender.clone(),
            client_id,
            recipient: message.recipient.clone(),
            message_id: id,
            timestamp_ms,
            body_crc,
        });
    }
    let stored = Message {
        id: id as u64,
        sender: message.sender.clone(),
        body: message.body.clone(),
        timestamp_ms: message.timestamp_ms,
    };
    Ok(Ok(Appended {
        message: stored,
        duplicate: false,
    }))
}

/// Writes the gathered rows (messages, send ids, then the touched accounts'
/// counters, each as multi-row statements) as one multi-statement query;
/// with `commit`, the deletes of the oldest send ids of senders past their
/// bound (see [`trim_send_ids`]) and the transaction's `COMMIT` go in the
/// same query.
async fn flush(
    conn: &mut SqliteConnection,
    counters: &CounterCache,
    pending: &mut Pending,
    commit: Option<Commit<'_>>,
) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<Sqlite>::new("");
    let mut statements = 0;
    for chunk in pending.messages.chunks(ROWS_PER_STATEMENT) {
        query.push("INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) ");
        query.push_values(chunk, |mut row, NewRow { id, message }| {
            row.push_bind(message.recipient.as_str())
                .push_bind(*id)
                .push_bind(message.sender.as_str())
                .push_bind(message.body.as_str())
                .push_bind(message.timestamp_ms as i64)
                .push_bind(message.delivered);
        });
        query.push("; ");
        statements += 1;
    }
    for chunk in pending.send_ids.chunks(ROWS_PER_STATEMENT) {
        query.push(
            "INSERT INTO send_ids (sender, client_id, recipient, message_id, timestamp_ms, body_crc) ",
        );
        query.push_values(chunk, |mut row, send| {
            row.push_bind(send.sender.as_str())
                .push_bind(send.client_id.to_vec())
                .push_bind(send.recipient.as_str())
                .push_bind(send.message_id)
                .push_bind(send.timestamp_ms)
                .push_bind(i64::from(send.body_crc));
        });
        // An expired id that was not pruned yet is taken over.
        query.push(
            " ON CONFLICT (sender, client_id) DO UPDATE SET recipient = excluded.recipient, \
             message_id = excluded.message_id, timestamp_ms = excluded.timestamp_ms, \
             body_crc = excluded.body_crc; ",
        );
        statements += 1;
    }
    pending.touched.sort_unstable();
    pending.touched.dedup();
    let touched: Vec<(&Username, Counters)> = pending
        .touched
        .iter()
        .filter_map(|name| counters.get(name).map(|c| (name, c)))
        .collect();
    for chunk in touched.chunks(ROWS_PER_STATEMENT) {
        // Every touched account exists (its counters came from its row), so
        // the upsert only ever updates.
        query.push("INSERT INTO accounts (name, last_id, stored, created_ms) ");
        query.push_values(chunk, |mut row, (name, c)| {
            row.push_bind(name.as_str())
                .push_bind(c.last_id)
                .push_bind(c.stored)
                .push_bind(0_i64);
        });
        query.push(
            " ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id, stored = excluded.stored; ",
        );
        statements += 1;
    }
    let grown = std::mem::take(&mut pending.grown);
    if let Some(commit) = commit {
        statements += trim_send_ids(&mut query, grown, commit);
        query.push("COMMIT");
        statements += 1;
    } else {
        pending.grown = grown;
    }
    if statements > 0 {
        query.build().persistent(false).execute(&mut *conn).await?;
    }
    pending.messages.clear();
    pending.send_ids.clear();
    pending.touched.clear();
    Ok(())
}

/// Adds the batch's new send ids (`grown`: one sender per row) to the
/// cached counts, and to `query` one delete for each of these senders with
/// more than its bound plus [`send_id_margin`] send ids remembered: its
/// oldest (by timestamp, then arrival) go, down to the bound; its cached
/// count becomes the bound. Returns how many statements it added.
///
/// A count changed mid-batch (the prune's deletions, an account's
/// deletion, an eviction) is changed before these are added; the sum is
/// the same. A sender whose count is not cached is skipped: its count is
/// read, rows and all, when next needed.
///
/// Only at the commit, after the batch's last append: a delete mid-batch
/// would leave the batch's send-id lookup holding rows no longer stored.
/// If the commit fails, the writer drops its caches, counts and all.
fn trim_send_ids(
    query: &mut QueryBuilder<Sqlite>,
    mut grown: Vec<Username>,
    Commit {
        send_ids,
        bound,
        now_ms,
    }: Commit<'_>,
) -> usize {
    grown.sort_unstable();
    for run in grown.chunk_by(|a, b| a == b) {
        send_ids.add(&run[0], run.len() as i64, now_ms);
    }
    grown.dedup();
    let most = i64::try_from(bound.saturating_add(send_id_margin(bound))).unwrap_or(i64::MAX);
    let bound = i64::try_from(bound).unwrap_or(i64::MAX);
    let mut statements = 0;
    for sender in grown {
        let Some(remembered) = send_ids.get(&sender) else {
            continue;
        };
        if remembered <= most {
            continue;
        }
        query.push(
            "DELETE FROM send_ids WHERE rowid IN (SELECT rowid FROM send_ids WHERE sender = ",
        );
        query.push_bind(sender.as_str().to_owned());
        query.push(" ORDER BY timestamp_ms, rowid LIMIT ");
        query.push_bind(remembered - bound);
        query.push("); ");
        send_ids.set(&sender, bound);
        statements += 1;
    }
    statements
}

/// An acknowledgement: deletes the acknowledged messages; the account's
/// stored count changes in the cache and is written with the batch's other
/// counters.
async fn ack(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    pending: &mut Pending,
    Ack { name, through }: &Ack,
    now: u64,
) -> Result<Result<usize, StoreError>, sqlx::Error> {
    if counters.load(conn, name, now).await?.is_none() {
        return Ok(Err(StoreError::NoSuchAccount(name.clone())));
    }
    let removed = sqlx::query(
        "DELETE FROM messages WHERE recipient = ? AND delivered = 1 AND id <= ? RETURNING id",
    )
    .bind(name.as_str())
    .bind(i64::try_from(*through).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?
    .len();
    if removed > 0
        && let Some(account) = counters.get_mut(name)
    {
        account.stored -= removed as i64;
        pending.touched.push(name.clone());
    }
    Ok(Ok(removed))
}

/// A new account with its password hash: its ids start above the id floor
/// (the highest id any deleted account had), so they never repeat for a
/// name.
async fn create(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    NewAccount {
        name,
        password_hash,
    }: &NewAccount,
    now: u64,
) -> Result<Result<(), StoreError>, sqlx::Error> {
    let created: Option<i64> = sqlx::query_scalar(
        "INSERT INTO accounts (name, last_id, created_ms, password_hash) \
         VALUES (?, COALESCE((SELECT last_id FROM id_floor), 0), ?, ?) \
         ON CONFLICT (name) DO NOTHING RETURNING last_id",
    )
    .bind(name.as_str())
    .bind(now as i64)
    .bind(password_hash.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match created {
        Some(last_id) => {
            counters.insert(name.clone(), last_id, 0, now);
            Ok(())
        }
        None => Err(StoreError::AccountExists(name.clone())),
    })
}

/// Replaces an account's password hash (bound, never in the statement's
/// text, so it appears in no log line or error).
async fn set_password(
    conn: &mut SqliteConnection,
    SetPassword {
        name,
        password_hash,
    }: &SetPassword,
) -> Result<Result<(), StoreError>, sqlx::Error> {
    let updated = sqlx::query("UPDATE accounts SET password_hash = ? WHERE name = ?")
        .bind(password_hash.as_str())
        .bind(name.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(if updated.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::NoSuchAccount(name.clone()))
    })
}

/// Deletes an account with its messages and send ids, raising the id
/// floor to its last id in the same transaction. Its send ids are
/// forgotten by the batch's lookup too (a later append of the batch with
/// one of them is a new send), and its cached count with them.
async fn delete(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    send_ids: &mut SendIdCounts,
    known: &mut KnownSends,
    name: &Username,
) -> Result<Result<bool, StoreError>, sqlx::Error> {
    // The row's counters are current: the batch's gathered rows were
    // flushed before this write.
    counters.remove(name);
    send_ids.remove(name);
    known.retain(|(sender, _), _| sender != name);
    sqlx::query(
        "INSERT INTO id_floor (only_row, last_id) SELECT 0, last_id FROM accounts WHERE name = ? \
         ON CONFLICT (only_row) DO UPDATE SET last_id = max(last_id, excluded.last_id)",
    )
    .bind(name.as_str())
    .execute(&mut *conn)
    .await?;
    // A new account of this name is a new sender: its send ids are its own.
    sqlx::query("DELETE FROM send_ids WHERE sender = ?")
        .bind(name.as_str())
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM messages WHERE recipient = ?")
        .bind(name.as_str())
        .execute(&mut *conn)
        .await?;
    let deleted = sqlx::query("DELETE FROM accounts WHERE name = ?")
        .bind(name.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(Ok(deleted.rows_affected() == 1))
}

/// A fetch: hands out the oldest queued messages and marks them delivered.
async fn take(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    Take { name, limit }: &Take,
    now: u64,
) -> Result<Result<Vec<Message>, StoreError>, sqlx::Error> {
    if counters.load(conn, name, now).await?.is_none() {
        return Ok(Err(StoreError::NoSuchAccount(name.clone())));
    }
    let rows = sqlx::query(
        "SELECT id, sender, body, timestamp_ms FROM messages \
         WHERE recipient = ? AND delivered = 0 ORDER BY id LIMIT ?",
    )
    .bind(name.as_str())
    .bind(i64::try_from(*limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?;
    let messages = match rows
        .iter()
        .map(message_from_row)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(messages) => messages,
        Err(err) => return Ok(Err(err)),
    };
    if let Some(last) = messages.last() {
        sqlx::query(
            "UPDATE messages SET delivered = 1 WHERE recipient = ? AND delivered = 0 AND id <= ?",
        )
        .bind(name.as_str())
        .bind(last.id as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Ok(messages))
}

/// Forgets what has expired by `now_ms`: send ids past their retention
/// (taken off their senders' cached counts, and out of the batch's
/// lookup), and the cached counters and send-id counts of accounts no
/// batch used for `idle_after`. Returns how many of all these went.
async fn prune(
    conn: &mut SqliteConnection,
    counters: &mut CounterCache,
    send_ids: &mut SendIdCounts,
    known: &mut KnownSends,
    now_ms: u64,
    idle_after: std::time::Duration,
) -> Result<Result<usize, StoreError>, sqlx::Error> {
    let horizon = retention_horizon(now_ms);
    if !send_ids.is_empty() {
        // What the delete below takes from each sender: one row per sender
        // with expired send ids, by the time index.
        let per_sender: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sender, COUNT(*) FROM send_ids WHERE timestamp_ms < ? GROUP BY sender",
        )
        .bind(horizon)
        .fetch_all(&mut *conn)
        .await?;
        for (sender, expired) in per_sender {
            if let Ok(sender) = Username::parse(&sender) {
                send_ids.forget(&sender, expired);
            }
        }
    }
    let expired = sqlx::query("DELETE FROM send_ids WHERE timestamp_ms < ?")
        .bind(horizon)
        .execute(&mut *conn)
        .await?
        .rows_affected() as usize;
    // A later append of the batch with one of these ids adds a row again.
    known.retain(|_, send| send.timestamp_ms >= horizon);
    // Safe mid-batch: the batch's gathered rows were flushed before this
    // write, so an evicted entry is what the database holds, and is read
    // again by the next write that needs it.
    let before = now_ms.saturating_sub(idle_after.as_millis() as u64);
    let idle = counters.evict_idle(before) + send_ids.evict_idle(before);
    Ok(Ok(expired + idle))
}
