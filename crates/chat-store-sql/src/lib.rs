//! Durable chat storage on SQL: [`SqliteStore`], an embedded SQLite
//! database through `sqlx`, implementing [`chat_core::Store`].
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
//! arrival order in one transaction, commits once — one fsync for the whole
//! batch — and only then answers each caller. Under load, concurrent sends
//! share fsyncs instead of queueing for one each. If the transaction fails
//! (disk full, I/O error, locked file), it is rolled back and every write in
//! it fails with `store_unavailable`: nothing is acknowledged that was not
//! stored. Reads (login checks, listing, replays) use a separate pool and
//! see every committed write.
//!
//! # Schema
//!
//! Migrations are embedded in the binary (`migrations/sqlite/*.sql`,
//! versioned by number). Opening a database of an older schema migrates it;
//! one of a newer schema than this binary knows is refused with
//! [`OpenError::TooNew`] and left untouched.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chat_core::{
    Appended, Message, MessageBody, MessageId, NewMessage, Store, StoreError, Username,
};
use futures::TryStreamExt;
use regex::Regex;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

/// The embedded migrations.
mod writer;

use writer::{Done, Job, Op};

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
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            queue_limit: chat_core::DEFAULT_QUEUE_LIMIT,
            max_batch: 512,
            readers: 4,
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
    writes: mpsc::Sender<Job>,
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
    /// Opens (creating if needed) the database in the directory `dir`,
    /// migrating an older schema, and starts the writer task.
    pub async fn open(dir: &Path, options: SqliteOptions) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
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
            .connect_with(connect)
            .await
            .map_err(open_err)?;
        let (writes, jobs) = mpsc::channel(options.max_batch.max(1) * 4);
        tokio::spawn(writer::run(writer, jobs, options));
        Ok(Self { readers, writes })
    }

    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Job { op, reply })
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the database writer stopped".into())
}

pub(crate) fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("database error: {err}"))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

fn unexpected() -> StoreError {
    StoreError::Unavailable("the database writer answered the wrong kind of result".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_account(&self, name: &Username) -> Result<(), StoreError> {
        match self.write(Op::Create(name.clone())).await? {
            Done::Unit => Ok(()),
            _ => Err(unexpected()),
        }
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
        match self.write(Op::Delete(name.clone())).await? {
            Done::Flag(deleted) => Ok(deleted),
            _ => Err(unexpected()),
        }
    }

    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        let mut names = sqlx::query_scalar::<_, String>("SELECT name FROM accounts ORDER BY name")
            .fetch(&self.readers);
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
        match self.write(Op::Append(message)).await? {
            Done::Appended(appended) => Ok(appended),
            _ => Err(unexpected()),
        }
    }

    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        match self.write(Op::Take(name.clone(), limit)).await? {
            Done::Messages(messages) => Ok(messages),
            _ => Err(unexpected()),
        }
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
        match self.write(Op::Ack(name.clone(), through)).await? {
            Done::Count(removed) => Ok(removed),
            _ => Err(unexpected()),
        }
    }
}
