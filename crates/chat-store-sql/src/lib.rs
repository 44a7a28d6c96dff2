//! Durable chat storage on SQL: [`SqliteStore`], an embedded SQLite
//! database through `sqlx`, implementing [`chat_core::Store`].
//!
//! # Layout
//!
//! - this file: opening the database (directory, pragmas, migrations,
//!   refusing a newer schema) and the `Store` methods: reads (credentials
//!   among them) go to a pool of reader connections, writes (creates and
//!   password changes among them) become jobs for the writer task;
//! - `writer`: the writer task (group commit, failure handling, timed
//!   pruning) and its supervision; `writer::job` the typed jobs,
//!   `writer::apply` what each write does in a transaction,
//!   `writer::counters` the per-account counters caches.
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous = FULL`: a transaction
//! is on disk (the WAL fsync'd) when its commit returns, and every write
//! method returns only after the commit that contains it. So a send the
//! server acknowledged survives a crash or power loss.
//!
//! # Group commit
//!
//! All writes go through one writer task that owns the only writing
//! connection. It takes the first waiting write, then every other write
//! already waiting (up to [`SqliteOptions::max_batch`]), applies them in
//! arrival order in one transaction (`BEGIN IMMEDIATE`: the write lock is
//! taken up front, so another connection's commit cannot invalidate the
//! batch half-way), commits once — one fsync for the whole batch — and only
//! then answers each caller. Under load, concurrent sends share fsyncs
//! instead of queueing for one each. Reads (login checks, listing, replays)
//! use a separate pool and see every committed write.
//!
//! # Failures
//!
//! If a batch's transaction fails (disk full, I/O error, a constraint), it
//! is rolled back and its writes are applied again one transaction each:
//! only a write that fails on its own gets `store_unavailable`, the others
//! are stored. A transaction that cannot even begin (the database stays
//! locked past the busy timeout) fails its whole batch at once, without
//! retries: that is no write's own fault. Nothing is acknowledged that was
//! not stored.
//!
//! If the writer task itself dies (a panic, or a connection it cannot roll
//! back), the reason is logged at error level, every later write fails
//! with [`StoreError::Unavailable`] naming it, and [`Store::failed`]
//! completes with it, so a server can report itself unhealthy.
//!
//! # Message ids
//!
//! Ids increase per recipient and never repeat for a name: deleting an
//! account raises a stored id floor (schema version 5) to its last id in
//! the same transaction, and a new account's ids start above the floor.
//!
//! # Passwords
//!
//! Each account row keeps its password's argon2id PHC string in the
//! `password_hash` column (schema version 7); the store neither parses nor
//! checks it. [`Store::create_account`] stores it in the same write that
//! creates the account, [`Store::set_password`] replaces it in a write of
//! its own (committed like every other write before it answers), and
//! [`Store::credentials`] reads it with one query on the read pool. The
//! column is NULL only for accounts created before version 7, which had no
//! password: they read back as `password_hash: None`, and the engine makes
//! them set one at their next login over a trusted connection. A hash is
//! always a bound parameter, never part of a statement's text, so it
//! appears in no log line and no error.
//!
//! # Send ids
//!
//! A send id is remembered for [`chat_core::SEND_ID_RETENTION`] and among
//! its sender's last [`SqliteOptions::send_ids_per_sender`] (by default
//! [`chat_core::MAX_SEND_IDS_PER_SENDER`]); a resend of one that is
//! forgotten is a new send. The writer keeps each active sender's number
//! of remembered send ids in memory (read with one `COUNT` when the
//! sender's count is first needed, in the same round trip as the batch's
//! send-id lookup), so the bound costs an append nothing. When a batch
//! commits, each of its senders with more than the bound plus a margin of
//! a sixteenth of it (625 by default; none below 16) loses its oldest send
//! ids, by timestamp and then arrival (schema version 6 keeps send ids in
//! arrival order), down to the bound — one `DELETE` in
//! the commit's query, about once per margin sends of a sender at its
//! bound. So a sender's last `send_ids_per_sender` send ids are always
//! remembered, and at most that plus the margin are stored. Deleting an
//! account forgets the send ids it sent.
//!
//! # Pruning
//!
//! [`Store::prune_expired`] deletes send ids past their retention and
//! evicts idle accounts from the writer's counters caches, by the time it
//! is given. The engine (`chat_core::Chat`) calls it every
//! `chat_core::PRUNE_INTERVAL`; a store used without an engine can have
//! the writer prune on its own timer instead
//! ([`SqliteOptions::prune_every`]), not both, so that no prune is done
//! twice on the one write connection.
//!
//! # Schema
//!
//! Migrations are embedded in the binary (`migrations/sqlite/*.sql`,
//! versioned by number). Opening a database of an older schema migrates it;
//! one of a newer schema than this binary knows is refused with
//! [`OpenError::TooNew`] and left untouched.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::{
    Appended, Credentials, Message, MessageBody, MessageId, NewMessage, Store, StoreError, Username,
};
use futures::TryStreamExt;
use regex::Regex;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};

mod writer;

use writer::WriterHandle;
use writer::job::{Ack, Call, Job, NewAccount, SetPassword, Take};

/// The embedded migrations.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "chat.sqlite3";

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Messages stored per recipient (queued or awaiting an ack) past which
    /// sends get `queue_full` (default 10,000).
    pub queue_limit: usize,
    /// Most writes committed together (default 512).
    pub max_batch: usize,
    /// Read connections (default 4).
    pub readers: u32,
    /// How often the writer deletes expired send ids and evicts idle
    /// accounts' counters by itself, whether or not writes arrive (default:
    /// never, since the engine calls [`Store::prune_expired`] every minute;
    /// set it when using the store without `chat_core::Chat`).
    pub prune_every: Option<Duration>,
    /// How long an account's counters stay cached in the writer after the
    /// last write that used them (default ten minutes); evicted counters
    /// are read from the database again when needed.
    pub idle_account_after: Duration,
    /// Most send ids remembered per sender (default
    /// [`chat_core::MAX_SEND_IDS_PER_SENDER`], at least 1): a resend of one
    /// of a sender's last this many send ids (within
    /// [`chat_core::SEND_ID_RETENTION`]) is always recognized. Past it, the
    /// sender's oldest are deleted first, by timestamp and then arrival;
    /// see "Send ids" in the crate docs for the margin.
    pub send_ids_per_sender: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            queue_limit: chat_core::DEFAULT_QUEUE_LIMIT,
            max_batch: 512,
            readers: 4,
            prune_every: None,
            idle_account_after: Duration::from_secs(10 * 60),
            send_ids_per_sender: chat_core::MAX_SEND_IDS_PER_SENDER,
        }
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be opened or read.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: sqlx::Error,
    },
    /// The database was written by a newer version of the server.
    #[error(
        "the database {path} has schema version {found}, but this server knows only up to version {known}; \
         run a newer server, or start from a backup made by this version"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this binary knows.
        known: i64,
    },
    /// Another process (or another store in this one) has the directory
    /// open: the store's caches are correct only with one writer.
    #[error("{} is in use by another server (its LOCK is held); one server per data directory", .0.display())]
    Locked(PathBuf),
    /// Migrating the schema failed; the database is as it was.
    #[error("cannot migrate the database {path} to schema version {to}: {source}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The target version.
        to: i64,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
}

/// A durable [`Store`] on an embedded SQLite database; see the crate docs.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: SqlitePool,
    /// The one connection lists read from (see [`SqliteStore::open`]).
    lists: SqlitePool,
    writer: WriterHandle,
    queue_limit: usize,
    /// The data directory's `LOCK`, held while any clone of the store
    /// lives: the writer's caches (counts per recipient and sender, the
    /// next ids) are correct only if it is the database's only writer.
    _lock: std::sync::Arc<std::fs::File>,
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target directory could not be created or read.
    #[error("cannot write the backup in {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The target already holds a database (or its name is not UTF-8).
    #[error("{} already holds a database (or its path is not UTF-8); back up into a new directory", .0.display())]
    Occupied(PathBuf),
    /// SQLite could not write the copy.
    #[error("cannot copy the database into {path}: {source}")]
    Sql {
        /// The copy's file.
        path: PathBuf,
        /// Why.
        source: sqlx::Error,
    },
}

impl BackupError {
    /// A stable code for scripts and logs.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::Io { .. } | BackupError::Sql { .. } => "backup_io",
            BackupError::Occupied(_) => "backup_occupied",
        }
    }
}

/// The name of the lock file in a data directory (the log store's too).
pub const LOCK_FILE: &str = "LOCK";

/// Takes the data directory's lock, or says who has it.
fn lock_directory(dir: &Path) -> Result<std::fs::File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::Directory {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(OpenError::Directory { path, source }),
    }
}

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The schema version of an open database (0 for a new one).
async fn database_version(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    let has_table: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if has_table.is_none() {
        return Ok(0);
    }
    let version: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&mut *conn)
            .await?;
    Ok(version.unwrap_or(0))
}

impl SqliteStore {
    /// Writes a consistent copy of the database as it is now (one read
    /// transaction: every write acknowledged before it started) into `to`,
    /// a new or empty directory, which then opens as a store of its own.
    /// Returns the copy's size in bytes. The server keeps serving while it
    /// runs.
    pub async fn backup(&self, to: &Path) -> Result<u64, BackupError> {
        let io = |source| BackupError::Io {
            path: to.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(to).map_err(io)?;
        let target = to.join(DATABASE_FILE);
        if target.exists() {
            return Err(BackupError::Occupied(to.to_path_buf()));
        }
        // Written under another name, synced, then renamed: a copy cut
        // short is never taken for a database, and "written" means on disk
        // (`VACUUM INTO` itself does not sync).
        let partial = to.join(format!("{DATABASE_FILE}.partial"));
        let _ = std::fs::remove_file(&partial);
        let path = partial
            .to_str()
            .ok_or_else(|| BackupError::Occupied(to.to_path_buf()))?
            .to_string();
        // On a reader connection: lists keep their own, and the writer
        // goes on committing meanwhile (WAL).
        sqlx::query("VACUUM INTO ?")
            .bind(path)
            .execute(&self.readers)
            .await
            .map_err(|source| BackupError::Sql {
                path: target.clone(),
                source,
            })?;
        let to = to.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let io = |source| BackupError::Io {
                path: to.clone(),
                source,
            };
            std::fs::File::open(&partial)
                .and_then(|file| file.sync_all())
                .map_err(io)?;
            std::fs::rename(&partial, &target).map_err(io)?;
            std::fs::File::open(&to)
                .and_then(|dir| dir.sync_all())
                .map_err(io)?;
            std::fs::metadata(&target).map(|m| m.len()).map_err(io)
        })
        .await
        .map_err(|err| BackupError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(err),
        })?
    }

    /// Opens (creating if needed) the database in the directory `dir`,
    /// migrating an older schema, and starts the writer task.
    pub async fn open(dir: &Path, options: SqliteOptions) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_directory(dir)?;
        let path = dir.join(DATABASE_FILE);
        let open_err = |source| OpenError::Open {
            path: path.clone(),
            source,
        };
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(open_err)?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let mut writer = SqliteConnection::connect_with(&connect)
            .await
            .map_err(open_err)?;
        let found = database_version(&mut writer).await.map_err(open_err)?;
        let known = schema_version();
        if found > known {
            return Err(OpenError::TooNew { path, found, known });
        }
        if found < known {
            tracing::info!(path = %path.display(), from = found, to = known, "migrating the database");
        }
        MIGRATOR
            .run(&mut writer)
            .await
            .map_err(|source| OpenError::Migrate {
                path: path.clone(),
                to: known,
                source,
            })?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers.max(1))
            .connect_with(connect.clone())
            .await
            .map_err(open_err)?;
        // Listing scans every account name: it gets a connection of its
        // own, so that a flood of lists waits for that one and never for
        // the pool that logins and fetches read from.
        let lists = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await
            .map_err(open_err)?;
        let queue_limit = options.queue_limit;
        let writer = writer::spawn(writer, options);
        Ok(Self {
            readers,
            lists,
            writer,
            queue_limit,
            _lock: std::sync::Arc::new(lock),
        })
    }

    /// Sends a write to the writer and waits for its result; `job` is the
    /// [`Job`] variant, which fixes the result type.
    async fn write<A, T>(&self, job: fn(Call<A, T>) -> Job, args: A) -> Result<T, StoreError> {
        let (call, answer) = Call::new(args);
        if self.writer.jobs.send(job(call)).await.is_err() {
            return Err(writer::gone(&self.writer.failure).await);
        }
        match answer.await {
            Ok(result) => result,
            // The writer dropped the job unanswered: it died.
            Err(_) => Err(writer::gone(&self.writer.failure).await),
        }
    }

    /// Makes the writer task panic, as a bug in it would: for tests of the
    /// supervision (nothing a caller can do makes the writer die, and a
    /// test cannot pull the disk out from under it). Every later write
    /// fails and [`Store::failed`] completes. Never call it in a server.
    #[doc(hidden)]
    pub async fn crash_writer_for_tests(&self) {
        let _ = self.writer.jobs.send(Job::Crash).await;
    }
}

pub(crate) fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("database error: {err}"))
}

pub(crate) fn message_from_row(row: &SqliteRow) -> Result<Message, StoreError> {
    let corrupt = |what: &str| StoreError::Unavailable(format!("corrupt message row: {what}"));
    let id: i64 = row.try_get(0).map_err(unavailable)?;
    let sender: String = row.try_get(1).map_err(unavailable)?;
    let body: String = row.try_get(2).map_err(unavailable)?;
    let timestamp_ms: i64 = row.try_get(3).map_err(unavailable)?;
    Ok(Message {
        id: id as u64,
        sender: Username::parse(&sender).map_err(|_| corrupt("sender"))?,
        body: MessageBody::parse(&body).map_err(|_| corrupt("body"))?,
        timestamp_ms: timestamp_ms as u64,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    async fn create_account(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let account = NewAccount {
            name: name.clone(),
            password_hash: password_hash.to_owned(),
        };
        self.write(Job::Create, account).await
    }

    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError> {
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT password_hash FROM accounts WHERE name = ?")
                .bind(name.as_str())
                .fetch_optional(&self.readers)
                .await
                .map_err(unavailable)?;
        Ok(row.map(|password_hash| Credentials { password_hash }))
    }

    async fn set_password(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let change = SetPassword {
            name: name.clone(),
            password_hash: password_hash.to_owned(),
        };
        self.write(Job::SetPassword, change).await
    }

    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE name = ?")
            .bind(name.as_str())
            .fetch_optional(&self.readers)
            .await
            .map_err(unavailable)?;
        Ok(found.is_some())
    }

    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        self.write(Job::Delete, name.clone()).await
    }

    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        let mut names = sqlx::query_scalar::<_, String>("SELECT name FROM accounts ORDER BY name")
            .fetch(&self.lists);
        let mut matched = Vec::new();
        while matched.len() < limit {
            let Some(name) = names.try_next().await.map_err(unavailable)? else {
                break;
            };
            if pattern.is_match(&name) {
                matched.push(
                    Username::parse(&name)
                        .map_err(|_| StoreError::Unavailable("corrupt account name".into()))?,
                );
            }
        }
        Ok(matched)
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        self.write(Job::Append, message).await
    }

    async fn account_count(&self) -> Result<usize, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.readers)
            .await
            .map_err(unavailable)?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let name = name.clone();
        self.write(Job::Take, Take { name, limit }).await
    }

    async fn unacked(&self, name: &Username) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sender, body, timestamp_ms FROM messages WHERE recipient = ? AND delivered = 1 ORDER BY id",
        )
        .bind(name.as_str())
        .fetch_all(&self.readers)
        .await
        .map_err(unavailable)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError> {
        let name = name.clone();
        self.write(Job::Ack, Ack { name, through }).await
    }

    /// Runs the writer's prune now, by `now_ms`: deletes send ids older
    /// than [`chat_core::SEND_ID_RETENTION`] and evicts the cached counters
    /// (of messages as a recipient, of send ids as a sender) of accounts no
    /// write used for [`SqliteOptions::idle_account_after`]; returns how
    /// many of these went. With [`SqliteOptions::prune_every`] set, the
    /// writer also prunes on its own by the wall clock.
    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.write(Job::Prune, now_ms).await
    }

    /// Completes when the writer task has died (see the crate docs), with
    /// the reason it was logged with.
    async fn failed(&self) -> String {
        writer::failure_reason(&self.writer.failure).await
    }
}
