//! A [`Store`] on PostgreSQL, the store several server processes share.
//!
//! Everything the engine relies on a store for is done inside the
//! database, in transactions, so any number of engines (server processes)
//! may use one database at once:
//!
//! - **Ids**: an append takes its recipient's next id by updating the
//!   account row (`last_id + 1`), which also locks it until the append
//!   commits: ids increase per recipient in commit order, and the queue
//!   bound is checked in the same statement (`stored < limit`). A deleted
//!   account's last id raises `id_floor`, which a create reads under a row
//!   lock, so ids never repeat for a name.
//! - **Send ids**: a repeated `(sender, send id)` returns the original
//!   receipt. Two processes appending the same send id at once race on the
//!   `send_ids` primary key: the loser's transaction rolls back (its id
//!   allocation with it) and answers the winner's receipt.
//! - **Listing** streams names in byte order and matches them here, never
//!   holding every account in memory.
//!
//! Every write commits before its call returns (PostgreSQL's default
//! `synchronous_commit`), so the engine's default `stage` (durable at once)
//! holds. The schema is in `migrations/postgres/`; migrations run at open
//! under sqlx's advisory lock, so several processes may start at once.

mod batch;
pub mod budgets;
pub mod cluster;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::presence::Lease;
use chat_core::{
    Appended, Credentials, MAX_SEND_IDS_PER_SENDER, Message, MessageBody, MessageId, NewMessage,
    Store, StoreError, Username, send_id_horizon,
};
use futures::TryStreamExt;
use regex::Regex;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How a [`PgStore`] is opened.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Messages stored per recipient past which appends fail with
    /// `queue_full`.
    pub queue_limit: usize,
    /// Connections in the pool (default 16), and half as many more for a
    /// recipient's writes (marks of delivery and acknowledgements), opened
    /// as needed.
    pub max_connections: u32,
    /// How long a call waits for a free connection before failing with
    /// `store_unavailable` (default 10 s).
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            queue_limit: chat_core::DEFAULT_QUEUE_LIMIT,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL does not parse.
    #[error("invalid PostgreSQL URL: {0}")]
    Url(sqlx::Error),
    /// The database cannot be reached or refused the login.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(sqlx::Error),
    /// Migrating the schema failed.
    #[error("cannot migrate the PostgreSQL schema: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl PgError {
    /// A stable code for scripts and logs.
    pub fn code(&self) -> &'static str {
        match self {
            PgError::Url(_) => "pg_url",
            PgError::Connect(_) => "pg_connect",
            PgError::Migrate(_) => "pg_migrate",
        }
    }
}

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// A [`Store`] on PostgreSQL. Cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// For what a recipient's side writes (a message marked delivered, an
    /// acknowledgement): committed without waiting for the WAL's flush
    /// (`synchronous_commit = off`). A database crash may undo the last
    /// such writes, which delivers those messages again, as a lost
    /// connection does; a sender's message is never committed this way.
    relaxed: PgPool,
    queue_limit: usize,
    /// Group commit of appends ([`batch`]); `None` in the appender's own
    /// handle, which stores directly.
    appender: Option<Arc<batch::Appender>>,
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host/database`) and
    /// migrates the schema to this binary's version.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, PgError> {
        let connect = PgConnectOptions::from_str(url).map_err(PgError::Url)?;
        let relaxed = PgPoolOptions::new()
            .max_connections((options.max_connections / 2).max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.clone().options([("synchronous_commit", "off")]));
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(PgError::Connect)?;
        MIGRATOR.run(&pool).await.map_err(PgError::Migrate)?;
        let direct = Self {
            pool,
            relaxed,
            queue_limit: options.queue_limit.max(1),
            appender: None,
        };
        Ok(Self {
            appender: Some(Arc::new(batch::Appender::start(direct.clone()))),
            ..direct
        })
    }

    /// The connection pool (for the presence and delivery of a cluster,
    /// which share the database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(unavailable)
    }

    async fn exists(&self, name: &Username) -> Result<bool, StoreError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE name = $1)")
            .bind(name.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    /// Creates `name`, unless the database holds `max` accounts already.
    async fn create(
        &self,
        name: &Username,
        password_hash: &str,
        max: Option<usize>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        // Locked: a delete that raised it has committed, or waits for us.
        // Every create and delete takes it first, so the count below cannot
        // change before this create commits.
        let floor: i64 = sqlx::query_scalar("SELECT last_id FROM id_floor FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        if let Some(max) = max {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            if count.max(0) as usize >= max {
                return Err(StoreError::AccountLimit(max));
            }
        }
        let created = sqlx::query(
            "INSERT INTO accounts (name, password_hash, last_id, created_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name.as_str())
        .bind(password_hash)
        .bind(floor)
        .bind(to_i64(chat_core::now_ms()))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if created.rows_affected() == 0 {
            return Err(StoreError::AccountExists(name.clone()));
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Removes `name`'s delivered messages up to `through`; with a
    /// `lease`, only while it is the current one.
    async fn acknowledge(
        &self,
        name: &Username,
        through: MessageId,
        lease: Option<&Lease>,
    ) -> Result<usize, StoreError> {
        // One statement: the messages and the recipient's count together.
        let removed: i64 = sqlx::query_scalar(
            "WITH gone AS ( \
                 DELETE FROM messages WHERE recipient = $1 AND delivered AND id <= $2 \
                 AND ($3::BIGINT IS NULL OR EXISTS ( \
                     SELECT 1 FROM leases WHERE name = $1 AND node = $3 AND generation = $4 \
                     FOR SHARE)) \
                 RETURNING 1), \
             counted AS (SELECT count(*) AS n FROM gone), \
             updated AS ( \
                 UPDATE accounts SET stored = stored - counted.n FROM counted \
                 WHERE name = $1 AND counted.n > 0) \
             SELECT n FROM counted",
        )
        .bind(name.as_str())
        .bind(to_i64(through))
        .bind(lease.map(|l| l.node.0 as i64))
        .bind(lease.map(|l| l.generation as i64))
        .fetch_one(&self.relaxed)
        .await
        .map_err(unavailable)?;
        if removed == 0 {
            self.require(name).await?;
        }
        Ok(removed.max(0) as usize)
    }

    /// One append without the queue: in one statement if it can be, else
    /// step by step.
    async fn append_direct(&self, message: NewMessage) -> Result<Appended, StoreError> {
        if let Some(id) = self.append_at_once(&message).await? {
            return Ok(Appended {
                message: Message {
                    id,
                    sender: message.sender,
                    body: message.body,
                    timestamp_ms: message.timestamp_ms,
                },
                duplicate: false,
            });
        }
        self.append_checked(message).await
    }

    /// Stores a batch taken from the queue and answers each append: as many
    /// as one statement can in one, the rest one at a time.
    pub(crate) async fn append_batch(&self, batch: Vec<batch::Pending>) {
        let mut rest = batch;
        if rest.len() > 1 {
            let messages: Vec<&NewMessage> = rest.iter().map(|p| &p.message).collect();
            match self.append_many(&messages).await {
                Ok(ids) => {
                    let mut unassigned = Vec::new();
                    for (pending, id) in rest.into_iter().zip(ids) {
                        match id {
                            Some(id) => {
                                let message = pending.message;
                                let _ = pending.reply.send(Ok(Appended {
                                    message: Message {
                                        id,
                                        sender: message.sender,
                                        body: message.body,
                                        timestamp_ms: message.timestamp_ms,
                                    },
                                    duplicate: false,
                                }));
                            }
                            None => unassigned.push(pending),
                        }
                    }
                    rest = unassigned;
                }
                // The database refused the statement as a whole (a known
                // send id, a deadlock, a recipient deleted meanwhile):
                // nothing was stored, and each goes on its own.
                Err(err) if refused_whole(&err) => {
                    tracing::debug!(%err, size = rest.len(), "a batch of appends goes one at a time");
                }
                // Anything else (a connection lost on the way) may have
                // committed: appending again could store twice. Each
                // sender is told, and resends with its send id.
                Err(err) => {
                    let why = format!("PostgreSQL: {err}");
                    for pending in rest {
                        let _ = pending
                            .reply
                            .send(Err(StoreError::Unavailable(why.clone())));
                    }
                    return;
                }
            }
        }
        for pending in rest {
            let answer = self.append_direct(pending.message).await;
            let _ = pending.reply.send(answer);
        }
    }

    /// Appends `messages` in one statement where that alone decides: for
    /// every recipient that exists and has room for all of its messages
    /// here, each gets the recipient's next id (in batch order) and its
    /// send id is recorded. Returns each message's id, or `None` for those
    /// left to the careful path (nothing was changed for them). Fails, and
    /// changes nothing, if any send id is known already (a resend, or a
    /// race with another process) or another conflict aborts it.
    async fn append_many(
        &self,
        messages: &[&NewMessage],
    ) -> Result<Vec<Option<MessageId>>, sqlx::Error> {
        let recipients: Vec<&str> = messages.iter().map(|m| m.recipient.as_str()).collect();
        let senders: Vec<&str> = messages.iter().map(|m| m.sender.as_str()).collect();
        let bodies: Vec<&str> = messages.iter().map(|m| m.body.as_str()).collect();
        let stamps: Vec<i64> = messages.iter().map(|m| to_i64(m.timestamp_ms)).collect();
        let delivered: Vec<bool> = messages.iter().map(|m| m.delivered).collect();
        // No send id: empty (an id is 16 bytes).
        let send_ids: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                m.send_id
                    .map(|id| id.to_be_bytes().to_vec())
                    .unwrap_or_default()
            })
            .collect();
        let crcs: Vec<i64> = messages
            .iter()
            .map(|m| i64::from(m.body.fingerprint()))
            .collect();
        // Recipients' rows are locked in name order, as every batch locks
        // them, so two processes' batches never wait for each other in a
        // cycle.
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "WITH batch AS ( \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], \
                                      $5::bool[], $6::bytea[], $7::int8[]) \
                 WITH ORDINALITY AS t(recipient, sender, body, timestamp_ms, delivered, \
                                      send_id, body_crc, ord)), \
             counts AS (SELECT recipient, count(*) AS n FROM batch GROUP BY recipient), \
             locked AS ( \
                 SELECT a.name, c.n FROM accounts a JOIN counts c ON a.name = c.recipient \
                 WHERE a.stored + c.n <= $8 ORDER BY a.name FOR UPDATE OF a), \
             bumped AS ( \
                 UPDATE accounts a SET last_id = a.last_id + l.n, stored = a.stored + l.n \
                 FROM locked l WHERE a.name = l.name \
                 RETURNING a.name, a.last_id - l.n AS base), \
             numbered AS ( \
                 SELECT b.*, u.base + row_number() OVER (PARTITION BY b.recipient ORDER BY b.ord) AS id \
                 FROM batch b JOIN bumped u ON u.name = b.recipient), \
             inserted AS ( \
                 INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
                 SELECT recipient, id, sender, body, timestamp_ms, delivered FROM numbered), \
             remembered AS ( \
                 INSERT INTO send_ids (sender, send_id, recipient, message_id, timestamp_ms, body_crc) \
                 SELECT sender, send_id, recipient, id, timestamp_ms, body_crc FROM numbered \
                 WHERE octet_length(send_id) > 0) \
             SELECT ord, id FROM numbered",
        )
        .bind(&recipients)
        .bind(&senders)
        .bind(&bodies)
        .bind(&stamps)
        .bind(&delivered)
        .bind(&send_ids)
        .bind(&crcs)
        .bind(to_i64(self.queue_limit as u64))
        .fetch_all(&self.pool)
        .await?;
        let mut ids = vec![None; messages.len()];
        for (ord, id) in rows {
            if let (Some(slot), Ok(id)) = (
                usize::try_from(ord - 1).ok().and_then(|at| ids.get_mut(at)),
                u64::try_from(id),
            ) {
                *slot = Some(id);
            }
        }
        Ok(ids)
    }

    /// An append step by step in one transaction: the send id first, then
    /// the id and the bound, the message, and the send id's record; a race
    /// lost on the send id rolls back and answers the winner's receipt.
    async fn append_checked(&self, message: NewMessage) -> Result<Appended, StoreError> {
        let send_id = message.send_id.map(|id| id.to_be_bytes().to_vec());
        let mut tx = self.begin().await?;
        if let Some(send_id) = &send_id {
            match earlier_send(&mut tx, &message, send_id).await? {
                Earlier::Same(appended) => return Ok(appended),
                Earlier::Reused => return Err(StoreError::SendIdReused(message.recipient)),
                Earlier::None => {}
            }
        }
        // The next id, and the queue bound, in one statement that locks the
        // recipient until this append commits.
        let id: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET last_id = last_id + 1, stored = stored + 1 \
             WHERE name = $1 AND stored < $2 RETURNING last_id",
        )
        .bind(message.recipient.as_str())
        .bind(to_i64(self.queue_limit as u64))
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(id) = id else {
            drop(tx);
            // A racing send of the same id may have filled the queue (or
            // the recipient may be gone since): its receipt is the answer.
            if let Some(send_id) = &send_id {
                let mut tx = self.begin().await?;
                match earlier_send(&mut tx, &message, send_id).await? {
                    Earlier::Same(appended) => return Ok(appended),
                    Earlier::Reused => return Err(StoreError::SendIdReused(message.recipient)),
                    Earlier::None => {}
                }
            }
            return Err(if self.exists(&message.recipient).await? {
                StoreError::QueueFull(message.recipient)
            } else {
                StoreError::NoSuchAccount(message.recipient)
            });
        };
        sqlx::query(
            "INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(message.recipient.as_str())
        .bind(id)
        .bind(message.sender.as_str())
        .bind(message.body.as_str())
        .bind(to_i64(message.timestamp_ms))
        .bind(message.delivered)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(send_id) = &send_id {
            // An expired use of the key is no use at all.
            sqlx::query(
                "DELETE FROM send_ids WHERE sender = $1 AND send_id = $2 AND timestamp_ms < $3",
            )
            .bind(message.sender.as_str())
            .bind(send_id.as_slice())
            .bind(to_i64(send_id_horizon(message.timestamp_ms)))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let remembered = sqlx::query(
                "INSERT INTO send_ids (sender, send_id, recipient, message_id, timestamp_ms, body_crc) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sender, send_id) DO NOTHING",
            )
            .bind(message.sender.as_str())
            .bind(send_id.as_slice())
            .bind(message.recipient.as_str())
            .bind(id)
            .bind(to_i64(message.timestamp_ms))
            .bind(i64::from(message.body.fingerprint()))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if remembered.rows_affected() == 0 {
                // Another process stored this send first (and has
                // committed: the insert waited for it). Undo ours, answer
                // theirs.
                tx.rollback().await.map_err(unavailable)?;
                let mut tx = self.begin().await?;
                return match earlier_send(&mut tx, &message, send_id).await? {
                    Earlier::Same(appended) => Ok(appended),
                    Earlier::Reused => Err(StoreError::SendIdReused(message.recipient)),
                    Earlier::None => Err(StoreError::Unavailable(
                        "a send id vanished while it was being checked".into(),
                    )),
                };
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Appended {
            message: Message {
                id: id as MessageId,
                sender: message.sender,
                body: message.body,
                timestamp_ms: message.timestamp_ms,
            },
            duplicate: false,
        })
    }

    /// An append in one statement (one round trip, committed on its own):
    /// the recipient's next id and the queue bound, the message, and its
    /// send id. `None` when that is not the whole story, and nothing was
    /// changed: the recipient is missing or full, or the send id is known
    /// (a resend, a race with another process, or an expired use). The
    /// careful path ([`PgStore::append_checked`]) then decides.
    async fn append_at_once(&self, message: &NewMessage) -> Result<Option<MessageId>, StoreError> {
        let send_id = message.send_id.map(|id| id.to_be_bytes().to_vec());
        let stored = sqlx::query_scalar::<_, i64>(
            "WITH next AS ( \
                 UPDATE accounts SET last_id = last_id + 1, stored = stored + 1 \
                 WHERE name = $1 AND stored < $2 RETURNING last_id), \
             message AS ( \
                 INSERT INTO messages (recipient, id, sender, body, timestamp_ms, delivered) \
                 SELECT $1, last_id, $3, $4, $5, $6 FROM next RETURNING id), \
             remembered AS ( \
                 INSERT INTO send_ids (sender, send_id, recipient, message_id, timestamp_ms, body_crc) \
                 SELECT $3, $7, $1, id, $5, $8 FROM message WHERE $7::BYTEA IS NOT NULL) \
             SELECT id FROM message",
        )
        .bind(message.recipient.as_str())
        .bind(to_i64(self.queue_limit as u64))
        .bind(message.sender.as_str())
        .bind(message.body.as_str())
        .bind(to_i64(message.timestamp_ms))
        .bind(message.delivered)
        .bind(send_id.as_deref())
        .bind(i64::from(message.body.fingerprint()))
        .fetch_optional(&self.pool)
        .await;
        match stored {
            Ok(Some(id)) => u64::try_from(id)
                .map(Some)
                .map_err(|_| corrupt("message id")),
            Ok(None) => Ok(None),
            // The send id is stored already: the statement changed nothing.
            Err(err) if is_unique_violation(&err) => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Marks delivered, and returns, up to `limit` of `lease.user`'s
    /// messages with ids in `(after, through]`: undelivered ones only, or
    /// (with `again`) those delivered before too. Fenced: only while
    /// `lease` is the current one, whose row it locks until this commits,
    /// so a takeover cannot slip in between.
    async fn take_fenced(
        &self,
        lease: &Lease,
        after: MessageId,
        through: MessageId,
        again: bool,
        limit: usize,
    ) -> Result<Vec<PgRow>, StoreError> {
        sqlx::query(
            "UPDATE messages SET delivered = TRUE WHERE recipient = $1 AND id IN ( \
                 SELECT id FROM messages WHERE recipient = $1 AND id > $2 AND id <= $3 \
                     AND ($4 OR NOT delivered) \
                 ORDER BY id LIMIT $5 FOR UPDATE) \
             AND EXISTS (SELECT 1 FROM leases WHERE name = $1 AND node = $6 AND generation = $7 \
                 FOR SHARE) \
             RETURNING id, sender, body, timestamp_ms",
        )
        .bind(lease.user.as_str())
        .bind(to_i64(after))
        .bind(to_i64(through))
        .bind(again)
        .bind(to_i64(limit as u64))
        // Stored as the bits of the u64s, as the cluster's tables keep them.
        .bind(lease.node.0 as i64)
        .bind(lease.generation as i64)
        .fetch_all(&self.relaxed)
        .await
        .map_err(unavailable)
    }

    /// `NoSuchAccount` unless `name` exists (for calls whose empty answer
    /// is ambiguous).
    async fn require(&self, name: &Username) -> Result<(), StoreError> {
        if self.exists(name).await? {
            Ok(())
        } else {
            Err(StoreError::NoSuchAccount(name.clone()))
        }
    }
}

/// The advisory lock (`pg_try_advisory_xact_lock`) of the node pruning
/// expired state ("chatprun" in ASCII).
const PRUNE_LOCK: i64 = 0x6368_6174_7072_756e;

/// Whether PostgreSQL refused a statement as a whole, changing nothing: it
/// answered the statement with an error (a unique or foreign-key
/// violation, a deadlock it broke, a value it cannot store…), which rolls
/// back a statement committed on its own. A lost connection (class 08, or
/// an error of the connection itself) leaves the outcome unknown.
fn refused_whole(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|e| !e.code().is_some_and(|code| code.starts_with("08")))
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "23505")
}

fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {err}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL holds an invalid {what}"))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn message_of(row: &sqlx::postgres::PgRow) -> Result<Message, StoreError> {
    let id: i64 = row.try_get("id").map_err(unavailable)?;
    let sender: String = row.try_get("sender").map_err(unavailable)?;
    let body: String = row.try_get("body").map_err(unavailable)?;
    let timestamp_ms: i64 = row.try_get("timestamp_ms").map_err(unavailable)?;
    Ok(Message {
        id: id as MessageId,
        sender: Username::parse(&sender).map_err(|_| corrupt("sender name"))?,
        body: MessageBody::parse(&body).map_err(|_| corrupt("message body"))?,
        timestamp_ms: timestamp_ms as u64,
    })
}

/// What an append found for its send id.
enum Earlier {
    None,
    Same(Appended),
    Reused,
}

/// The send id's earlier use by `message.sender`, if any (within the
/// retention window).
async fn earlier_send(
    tx: &mut Transaction<'static, Postgres>,
    message: &NewMessage,
    send_id: &[u8],
) -> Result<Earlier, StoreError> {
    let row = sqlx::query(
        "SELECT recipient, message_id, timestamp_ms, body_crc FROM send_ids \
         WHERE sender = $1 AND send_id = $2 AND timestamp_ms >= $3",
    )
    .bind(message.sender.as_str())
    .bind(send_id)
    .bind(to_i64(send_id_horizon(message.timestamp_ms)))
    .fetch_optional(&mut **tx)
    .await
    .map_err(unavailable)?;
    let Some(row) = row else {
        return Ok(Earlier::None);
    };
    let recipient: String = row.try_get("recipient").map_err(unavailable)?;
    let crc: i64 = row.try_get("body_crc").map_err(unavailable)?;
    if recipient != message.recipient.as_str() || crc != i64::from(message.body.fingerprint()) {
        return Ok(Earlier::Reused);
    }
    let id: i64 = row.try_get("message_id").map_err(unavailable)?;
    let timestamp_ms: i64 = row.try_get("timestamp_ms").map_err(unavailable)?;
    Ok(Earlier::Same(Appended {
        message: Message {
            id: id as MessageId,
            sender: message.sender.clone(),
            body: message.body.clone(),
            timestamp_ms: timestamp_ms as u64,
        },
        duplicate: true,
    }))
}

#[async_trait]
impl Store for PgStore {
    async fn create_account(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        self.create(name, password_hash, None).await
    }

    async fn create_account_capped(
        &self,
        name: &Username,
        password_hash: &str,
        max: usize,
    ) -> Result<(), StoreError> {
        self.create(name, password_hash, Some(max)).await
    }

    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT password_hash FROM accounts WHERE name = $1")
                .bind(name.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(row.map(|(password_hash,)| Credentials { password_hash }))
    }

    async fn set_password(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE accounts SET password_hash = $2 WHERE name = $1")
            .bind(name.as_str())
            .bind(password_hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        Ok(())
    }

    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        self.exists(name).await
    }

    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        // The floor first, as a create takes it: the two never wait for
        // each other in opposite orders.
        sqlx::query("SELECT last_id FROM id_floor FOR UPDATE")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let last_id: Option<i64> =
            sqlx::query_scalar("DELETE FROM accounts WHERE name = $1 RETURNING last_id")
                .bind(name.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        let Some(last_id) = last_id else {
            return Ok(false);
        };
        sqlx::query("UPDATE id_floor SET last_id = GREATEST(last_id, $1)")
            .bind(last_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // A new account of this name is a new sender: its send ids are its
        // own.
        sqlx::query("DELETE FROM send_ids WHERE sender = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        let mut names = sqlx::query_scalar::<_, String>("SELECT name FROM accounts ORDER BY name")
            .fetch(&self.pool);
        let mut found = Vec::new();
        while found.len() < limit {
            let Some(name) = names.try_next().await.map_err(unavailable)? else {
                break;
            };
            if pattern.is_match(&name) {
                found.push(Username::parse(&name).map_err(|_| corrupt("account name"))?);
            }
        }
        Ok(found)
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        match &self.appender {
            Some(appender) => appender.append(message).await,
            None => self.append_direct(message).await,
        }
    }

    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "UPDATE messages SET delivered = TRUE WHERE recipient = $1 AND id IN ( \
                 SELECT id FROM messages WHERE recipient = $1 AND NOT delivered \
                 ORDER BY id LIMIT $2 FOR UPDATE) \
             RETURNING id, sender, body, timestamp_ms",
        )
        .bind(name.as_str())
        .bind(to_i64(limit as u64))
        .fetch_all(&self.relaxed)
        .await
        .map_err(unavailable)?;
        if rows.is_empty() {
            self.require(name).await?;
        }
        let mut messages = rows.iter().map(message_of).collect::<Result<Vec<_>, _>>()?;
        messages.sort_by_key(|m| m.id);
        Ok(messages)
    }

    async fn last_id(&self, name: &Username) -> Result<MessageId, StoreError> {
        let last_id: Option<i64> =
            sqlx::query_scalar("SELECT last_id FROM accounts WHERE name = $1")
                .bind(name.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        match last_id {
            Some(id) => u64::try_from(id).map_err(|_| corrupt("message id")),
            None => Err(StoreError::NoSuchAccount(name.clone())),
        }
    }

    async fn take_after(
        &self,
        lease: &Lease,
        after: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = self
            .take_fenced(lease, after, MessageId::MAX, true, limit)
            .await?;
        // A row that does not read as a message (written by a version with
        // other limits, or damaged) is skipped with a warning rather than
        // stop every later push to this user.
        let mut messages: Vec<Message> = rows
            .iter()
            .filter_map(|row| match message_of(row) {
                Ok(message) => Some(message),
                Err(err) => {
                    tracing::warn!(%err, user = %lease.user, "skipped a stored message that does not read");
                    None
                }
            })
            .collect();
        messages.sort_by_key(|m| m.id);
        Ok(messages)
    }

    async fn take_undelivered_in(
        &self,
        lease: &Lease,
        after: MessageId,
        through: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = self
            .take_fenced(lease, after, through, false, limit)
            .await?;
        let mut messages = rows.iter().map(message_of).collect::<Result<Vec<_>, _>>()?;
        messages.sort_by_key(|m| m.id);
        Ok(messages)
    }

    async fn unacked(&self, name: &Username) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sender, body, timestamp_ms FROM messages \
             WHERE recipient = $1 AND delivered ORDER BY id",
        )
        .bind(name.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        if rows.is_empty() {
            self.require(name).await?;
        }
        rows.iter().map(message_of).collect()
    }

    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError> {
        self.acknowledge(name, through, None).await
    }

    async fn ack_for(&self, lease: &Lease, through: MessageId) -> Result<usize, StoreError> {
        self.acknowledge(&lease.user, through, Some(lease)).await
    }

    async fn account_count(&self) -> Result<usize, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(count.max(0) as usize)
    }

    fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        // Every node of a cluster calls this; one prunes at a time, the
        // others find the lock taken and leave it to that one.
        let mut tx = self.begin().await?;
        let pruner: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        if !pruner {
            return Ok(0);
        }
        // Rows another transaction holds (an account being deleted, a send
        // being stored) are skipped, not waited for: the prune never waits
        // on a lock, so it cannot deadlock with them. What it skips goes
        // at the next prune.
        let expired = sqlx::query(
            "DELETE FROM send_ids WHERE (sender, send_id) IN ( \
                 SELECT sender, send_id FROM send_ids WHERE timestamp_ms < $1 \
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(to_i64(send_id_horizon(now_ms)))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        // Each sender keeps its newest MAX_SEND_IDS_PER_SENDER.
        let trimmed = sqlx::query(
            "DELETE FROM send_ids WHERE (sender, send_id) IN ( \
                 SELECT sender, send_id FROM send_ids WHERE (sender, send_id) IN ( \
                     SELECT sender, send_id FROM ( \
                         SELECT sender, send_id, row_number() OVER \
                             (PARTITION BY sender ORDER BY timestamp_ms DESC, message_id DESC) AS newer \
                         FROM send_ids) ranked \
                     WHERE newer > $1) \
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(to_i64(MAX_SEND_IDS_PER_SENDER as u64))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        tx.commit().await.map_err(unavailable)?;
        Ok((expired + trimmed) as usize)
    }
}
