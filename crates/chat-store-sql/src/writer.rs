//! The writer task: the only connection that writes, committing whatever
//! writes are waiting as one transaction (group commit).
//!
//! Appends are the hot path, so they cost no statement of their own: the
//! writer keeps each account's counters (last id, messages stored) in
//! memory — it is the only writer, so its cache cannot go stale — and
//! gathers the batch's new rows, which go to the database as a few
//! multi-row statements. Each query sent to sqlx's SQLite worker is a
//! round trip between threads, so a batch of appends costs two: `BEGIN`
//! with one send-id lookup for the whole batch, then the inserts of
//! messages and send ids, the update of the touched accounts, and `COMMIT`,
//! as one multi-statement query.
//!
//! Acknowledgements are applied first, whatever their place in the batch:
//! the writes in a batch are concurrent (each caller waits for its answer
//! before it writes again), and an ack can only name messages its recipient
//! has seen, which an earlier batch committed. An ack is one
//! `DELETE … RETURNING`; its counter change rides on the batch's account
//! update. Any other write (create, delete, take) first flushes the rows
//! gathered so far, so it sees them.
//!
//! If anything fails, the transaction is rolled back, the cache is dropped
//! (it may hold rolled-back counters), and every write in the batch fails.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chat_core::{
    Appended, Message, MessageId, NewMessage, SEND_ID_RETENTION, StoreError, Username,
};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot};

use crate::{SqliteOptions, message_from_row, now_ms, unavailable};

/// A write for the writer task.
pub(crate) enum Op {
    Create(Username),
    Delete(Username),
    Append(NewMessage),
    Take(Username, usize),
    Ack(Username, MessageId),
}

/// A write's result.
pub(crate) enum Done {
    Unit,
    Flag(bool),
    Appended(Appended),
    Messages(Vec<Message>),
    Count(usize),
}

pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// How often expired send ids are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
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

/// An account's counters, as committed plus this batch's changes.
#[derive(Clone, Copy)]
struct Counters {
    last_id: i64,
    stored: i64,
}

/// Rows gathered by appends, not yet written.
#[derive(Default)]
struct Pending {
    messages: Vec<(Username, i64, NewMessage)>,
    send_ids: Vec<(Username, [u8; 16], Username, i64, i64, u32)>,
    touched: Vec<Username>,
}

pub(crate) struct Writer {
    conn: SqliteConnection,
    options: SqliteOptions,
    counters: HashMap<Username, Counters>,
}

pub(crate) async fn run(
    conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    options: SqliteOptions,
) {
    let mut writer = Writer {
        conn,
        options,
        counters: HashMap::new(),
    };
    let mut last_prune = Instant::now();
    while let Some(first) = jobs.recv().await {
        // Let the tasks that are ready to write (typically the callers the
        // last commit just answered) enqueue before the batch is cut: this
        // costs a scheduler pass and makes batches several times larger.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < writer.options.max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match writer.apply_batch(&batch).await {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(err) => {
                tracing::error!(%err, writes = batch.len(), "a write batch failed and was rolled back");
                writer.counters.clear();
                let why = unavailable(err);
                for job in batch {
                    let _ = job.reply.send(Err(why.clone()));
                }
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            if let Err(err) = sqlx::query("DELETE FROM send_ids WHERE timestamp_ms < ?")
                .bind(retention_horizon())
                .execute(&mut writer.conn)
                .await
            {
                tracing::warn!(%err, "could not prune expired send ids");
            }
        }
    }
}

impl Writer {
    /// Applies a batch in one transaction. `Err`: nothing of it is stored.
    async fn apply_batch(
        &mut self,
        batch: &[Job],
    ) -> Result<Vec<Result<Done, StoreError>>, sqlx::Error> {
        let applied = self.apply_in_transaction(batch).await;
        if applied.is_err() {
            // The transaction may still be open (a statement failed) or
            // already gone (SQLite rolled it back): end it either way.
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
        }
        applied
    }

    async fn apply_in_transaction(
        &mut self,
        batch: &[Job],
    ) -> Result<Vec<Result<Done, StoreError>>, sqlx::Error> {
        let Self {
            conn,
            options,
            counters,
        } = self;
        let mut known = begin_and_find_send_ids(conn, batch).await?;
        let mut pending = Pending::default();
        let mut results: Vec<Option<Result<Done, StoreError>>> = Vec::with_capacity(batch.len());
        for job in batch {
            results.push(match &job.op {
                Op::Ack(name, through) => {
                    Some(ack(conn, counters, &mut pending, name, *through).await?)
                }
                _ => None,
            });
        }
        for (job, result) in batch.iter().zip(results.iter_mut()) {
            if result.is_some() {
                continue;
            }
            *result = Some(match &job.op {
                Op::Append(message) => {
                    append(
                        conn,
                        counters,
                        &mut known,
                        &mut pending,
                        message,
                        options.queue_limit,
                    )
                    .await?
                }
                other => {
                    flush(conn, counters, &mut pending, false).await?;
                    apply(conn, counters, other).await?
                }
            });
        }
        flush(conn, counters, &mut pending, true).await?;
        Ok(results.into_iter().flatten().collect())
    }
}

/// The oldest send-id timestamp still remembered, ms since the epoch.
fn retention_horizon() -> i64 {
    now_ms().saturating_sub(SEND_ID_RETENTION.as_millis() as u64) as i64
}

/// Opens the batch's transaction and finds which of its appends' send ids
/// were stored before (with the original message id and timestamp), in one
/// round trip.
async fn begin_and_find_send_ids(
    conn: &mut SqliteConnection,
    batch: &[Job],
) -> Result<HashMap<(Username, [u8; 16]), KnownSend>, sqlx::Error> {
    let keys: Vec<(&Username, [u8; 16])> = batch
        .iter()
        .filter_map(|job| match &job.op {
            Op::Append(m) => m.send_id.map(|id| (&m.sender, id.to_be_bytes())),
            _ => None,
        })
        .collect();
    let mut known = HashMap::new();
    if keys.is_empty() {
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
        return Ok(known);
    }
    for (n, chunk) in keys.chunks(ROWS_PER_STATEMENT).enumerate() {
        // A join against the keys as a VALUES table, so that each key is
        // one primary-key probe.
        let mut query = QueryBuilder::<Sqlite>::new(if n == 0 { "BEGIN; " } else { "" });
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

        for row in query
            .build()
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?
        {
            let (sender, id, known_send) = send_id_row(&row)?;
            if let (Ok(sender), Ok(id)) = (Username::parse(&sender), <[u8; 16]>::try_from(id)) {
                known.insert((sender, id), known_send);
            }
        }
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

/// The counters of `name`, from the cache or the database; `None` if the
/// account does not exist.
async fn counters_of<'a>(
    conn: &mut SqliteConnection,
    counters: &'a mut HashMap<Username, Counters>,
    name: &Username,
) -> Result<Option<&'a mut Counters>, sqlx::Error> {
    if !counters.contains_key(name) {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT last_id, stored FROM accounts WHERE name = ?")
                .bind(name.as_str())
                .fetch_optional(&mut *conn)
                .await?;
        match row {
            Some((last_id, stored)) => counters.insert(name.clone(), Counters { last_id, stored }),
            None => return Ok(None),
        };
    }
    Ok(counters.get_mut(name))
}

async fn append(
    conn: &mut SqliteConnection,
    counters: &mut HashMap<Username, Counters>,
    known: &mut HashMap<(Username, [u8; 16]), KnownSend>,
    pending: &mut Pending,
    message: &NewMessage,
    queue_limit: usize,
) -> Result<Result<Done, StoreError>, sqlx::Error> {
    let send_id = message.send_id.map(u128::to_be_bytes);
    // A send id past its retention (not pruned yet) is forgotten, as the
    // memory store forgets it: measured from the new message's time.
    let retained_since =
        (message.timestamp_ms as i64).saturating_sub(SEND_ID_RETENTION.as_millis() as i64);
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
        return Ok(Ok(Done::Appended(Appended {
            message: original,
            duplicate: true,
        })));
    }
    let Some(account) = counters_of(conn, counters, &message.recipient).await? else {
        return Ok(Err(StoreError::NoSuchAccount(message.recipient.clone())));
    };
    if account.stored as usize >= queue_limit {
        return Ok(Err(StoreError::QueueFull(message.recipient.clone())));
    }
    account.last_id += 1;
    account.stored += 1;
    let id = account.last_id;
    pending.touched.push(message.recipient.clone());
    pending
        .messages
        .push((message.recipient.clone(), id, message.clone()));
    if let Some(send_id) = send_id {
        let timestamp_ms = message.timestamp_ms as i64;
        let body_crc = message.body.fingerprint();
        known.insert(
            (message.sender.clone(), send_id),
            KnownSend {
                message_id: id,
                timestamp_ms,
                recipient: message.recipient.as_str().to_owned(),
                body_crc: Some(i64::from(body_crc)),
            },
        );
        pending.send_ids.push((
            message.sender.clone(),
            send_id,
            message.recipient.clone(),
            id,
            timestamp_ms,
            body_crc,
        ));
    }
    let stored = Message {
        id: id as u64,
        sender: message.sender.clone(),
        body: message.body.clone(),
        timestamp_ms: message.timestamp_ms,
    };
    Ok(Ok(Done::Appended(Appended {
        message: stored,
        duplicate: false,
    })))
}

/// Writes the gathered rows (messages, send ids, then the touched accounts'
/// counters, each as multi-row statements) as one multi-statement query;
/// with `commit`, the transaction's `COMMIT` goes in the same query.
async fn flush(
    conn: &mut SqliteConnection,
    counters: &HashMap<Username, Counters>,
    pending: &mut Pending,
    commit: bool,
) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<Sqlite>::new("");
    let mut statements = 0;
    for chunk in pending.messages.chunks(ROWS_PER_STATEMENT) {
        query.push("INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) ");
        query.push_values(chunk, |mut row, (recipient, id, m)| {
            row.push_bind(recipient.as_str())
                .push_bind(*id)
                .push_bind(m.sender.as_str())
                .push_bind(m.body.as_str())
                .push_bind(m.timestamp_ms as i64)
                .push_bind(m.delivered);
        });
        query.push("; ");
        statements += 1;
    }
    for chunk in pending.send_ids.chunks(ROWS_PER_STATEMENT) {
        query.push(
            "INSERT INTO send_ids (sender, client_id, recipient, message_id, timestamp_ms, body_crc) ",
        );
        query.push_values(
            chunk,
            |mut row, (sender, id, recipient, message_id, timestamp_ms, body_crc)| {
                row.push_bind(sender.as_str())
                    .push_bind(id.to_vec())
                    .push_bind(recipient.as_str())
                    .push_bind(*message_id)
                    .push_bind(*timestamp_ms)
                    .push_bind(i64::from(*body_crc));
            },
        );
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
        .filter_map(|name| counters.get(name).map(|c| (name, *c)))
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
    if commit {
        query.push("COMMIT");
        statements += 1;
    }
    if statements > 0 {
        query.build().persistent(false).execute(&mut *conn).await?;
    }
    *pending = Pending::default();
    Ok(())
}

/// An acknowledgement: deletes the acknowledged messages; the account's
/// stored count changes in the cache and is written with the batch's other
/// counters.
async fn ack(
    conn: &mut SqliteConnection,
    counters: &mut HashMap<Username, Counters>,
    pending: &mut Pending,
    name: &Username,
    through: MessageId,
) -> Result<Result<Done, StoreError>, sqlx::Error> {
    if counters_of(conn, counters, name).await?.is_none() {
        return Ok(Err(StoreError::NoSuchAccount(name.clone())));
    }
    let removed = sqlx::query(
        "DELETE FROM messages WHERE recipient = ? AND delivered = 1 AND id <= ? RETURNING id",
    )
    .bind(name.as_str())
    .bind(i64::try_from(through).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?
    .len();
    if removed > 0
        && let Some(account) = counters.get_mut(name)
    {
        account.stored -= removed as i64;
        pending.touched.push(name.clone());
    }
    Ok(Ok(Done::Count(removed)))
}

/// Every write but append.
async fn apply(
    conn: &mut SqliteConnection,
    counters: &mut HashMap<Username, Counters>,
    op: &Op,
) -> Result<Result<Done, StoreError>, sqlx::Error> {
    Ok(match op {
        Op::Append(_) => unreachable_op("an append"),
        Op::Create(name) => {
            let created =
                sqlx::query("INSERT INTO accounts (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
                    .bind(name.as_str())
                    .bind(now_ms() as i64)
                    .execute(&mut *conn)
                    .await?;
            if created.rows_affected() == 1 {
                counters.insert(
                    name.clone(),
                    Counters {
                        last_id: 0,
                        stored: 0,
                    },
                );
                Ok(Done::Unit)
            } else {
                Err(StoreError::AccountExists(name.clone()))
            }
        }
        Op::Delete(name) => {
            counters.remove(name);
            // A new account of this name is a new sender: its send ids are
            // its own.
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
            Ok(Done::Flag(deleted.rows_affected() == 1))
        }
        Op::Take(name, limit) => {
            if counters_of(conn, counters, name).await?.is_none() {
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
                sqlx::query("UPDATE messages SET delivered = 1 WHERE recipient = ? AND delivered = 0 AND id <= ?")
                    .bind(name.as_str())
                    .bind(last.id as i64)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(Done::Messages(messages))
        }
        Op::Ack(..) => unreachable_op("an ack"),
    })
}

/// Appends and acks never reach [`apply`]; they are applied by [`append`]
/// and [`ack`].
fn unreachable_op(what: &str) -> Result<Done, StoreError> {
    Err(StoreError::Unavailable(format!(
        "internal: {what} reached the generic write path"
    )))
}
