//! Operator commands on a data directory, and the control socket through
//! which they reach a running server.
//!
//! A running server holds its data directory (the log store's `LOCK`), so
//! a command that needs a consistent view of the store while it runs asks
//! the server itself: the server listens on a Unix socket in the data
//! directory, [`CONTROL_SOCKET`], readable and writable by its owner only
//! (whoever may read the data directory may ask for a copy of it). The
//! protocol is one line each way:
//!
//! ```text
//! → backup /absolute/path/to/new-dir
//! ← ok 123456
//! ← error backup_occupied /absolute/path/to/new-dir already holds a store
//! ```
//!
//! With no server running, the command opens the store itself. One backup
//! runs at a time (another is answered `backup_busy`); a request line must
//! arrive within [`REQUEST_TIMEOUT`]; a stop waits for a backup under way
//! (up to [`STOP_WAIT`]) before the store closes. Only the data directory's
//! owner (or root) may ask.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use chat_store_log::LogStore;
use chat_store_sql::SqliteStore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::{Storage, StoreKind};

/// The control socket's name in the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Longest request line accepted on the control socket.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a control connection may take to send its request.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stop waits for a backup under way.
pub const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// An operator command (a subcommand of both server binaries).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Admin {
    /// Write a consistent copy of the store in the data directory (--data)
    /// into DEST, a new or empty directory, while the server runs (or not).
    /// Restore by serving DEST (or a copy of it) as the data directory.
    Backup {
        /// Where the copy goes; created if missing, must hold no store.
        dest: PathBuf,
    },
}

/// The store a server serves, for what the engine's `Store` trait does not
/// cover (backups).
#[derive(Clone)]
pub enum StoreHandle {
    /// The log store.
    Log(Arc<LogStore>),
    /// The SQLite store.
    Sqlite(Arc<SqliteStore>),
    /// Memory only: nothing to back up.
    Memory,
    /// PostgreSQL: backed up with PostgreSQL's own tools.
    Postgres(Arc<chat_store_pg::PgStore>),
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreHandle::Log(_) => "StoreHandle::Log",
            StoreHandle::Sqlite(_) => "StoreHandle::Sqlite",
            StoreHandle::Memory => "StoreHandle::Memory",
            StoreHandle::Postgres(_) => "StoreHandle::Postgres",
        })
    }
}

/// Why a backup failed, with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The server keeps nothing on disk.
    #[error("the server keeps its data in memory: there is nothing to back up")]
    Memory,
    /// The target already holds a store, or other files.
    #[error("{0}")]
    Occupied(String),
    /// The store lives in a PostgreSQL database.
    #[error(
        "the store is a PostgreSQL database: back it up with PostgreSQL's tools (pg_dump, or \
         continuous archiving), see docs/OPERATIONS.md"
    )]
    External,
    /// Another backup is under way.
    #[error("another backup is under way; try again when it is done")]
    Busy,
    /// Writing the copy failed.
    #[error("{0}")]
    Io(String),
}

impl BackupError {
    /// A stable code for scripts and logs.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::Memory => "backup_memory",
            BackupError::Occupied(_) => "backup_occupied",
            BackupError::Busy => "backup_busy",
            BackupError::External => "backup_external",
            BackupError::Io(_) => "backup_io",
        }
    }
}

impl StoreHandle {
    /// Writes a consistent copy of the store into `to` (a new or empty
    /// directory) while it serves; returns the copy's size in bytes.
    pub async fn backup(&self, to: &Path) -> Result<u64, BackupError> {
        match self {
            StoreHandle::Memory => return Err(BackupError::Memory),
            StoreHandle::Postgres(_) => return Err(BackupError::External),
            StoreHandle::Log(_) | StoreHandle::Sqlite(_) => {}
        }
        prepare_target(to)?;
        match self {
            StoreHandle::Log(store) => store.backup(to).await.map_err(|err| match err {
                chat_store_log::LogError::Occupied(_) => BackupError::Occupied(err.to_string()),
                other => BackupError::Io(other.to_string()),
            }),
            StoreHandle::Sqlite(store) => store.backup(to).await.map_err(|err| match err {
                chat_store_sql::BackupError::Occupied(_) => BackupError::Occupied(err.to_string()),
                other => BackupError::Io(other.to_string()),
            }),
            StoreHandle::Memory => Err(BackupError::Memory),
            StoreHandle::Postgres(_) => Err(BackupError::External),
        }
    }
}

/// A backup's target: a new directory, or an empty one, made readable by
/// its owner only (it holds password hashes and every stored message).
fn prepare_target(to: &Path) -> Result<(), BackupError> {
    let io = |err: std::io::Error| BackupError::Io(format!("cannot use {}: {err}", to.display()));
    if to.exists() {
        let mut entries = std::fs::read_dir(to).map_err(io)?;
        if entries.next().is_some() {
            return Err(BackupError::Occupied(format!(
                "{} is not empty; back up into a new or empty directory",
                to.display()
            )));
        }
    } else {
        std::fs::create_dir_all(to).map_err(io)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Serves the control socket at `path` until `stop`; then waits for a
/// backup under way (up to [`STOP_WAIT`]) and removes the socket. A socket
/// that cannot be made (a path too long for a Unix socket, a read-only
/// directory) is logged and skipped: the server runs without.
#[cfg(unix)]
pub async fn serve_control(path: PathBuf, store: StoreHandle, stop: CancellationToken) {
    let listener = match bind_private(&path) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "no control socket: online backups need the server stopped");
            return;
        }
    };
    tracing::info!(path = %path.display(), "control socket ready");
    // Who may ask: the data directory's owner, and root.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        path.parent()
            .and_then(|dir| std::fs::metadata(dir).ok())
            .map(|meta| meta.uid())
    };
    let tasks = tokio_util::task::TaskTracker::new();
    let one_at_a_time = Arc::new(tokio::sync::Semaphore::new(1));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|cred| cred.uid() == 0 || Some(cred.uid()) == owner);
        let store = store.clone();
        let one_at_a_time = Arc::clone(&one_at_a_time);
        tasks.spawn(async move {
            let (read, mut write) = stream.into_split();
            let answer = if allowed {
                let mut line = String::new();
                let mut read = BufReader::new(read).take(MAX_REQUEST as u64);
                match tokio::time::timeout(REQUEST_TIMEOUT, read.read_line(&mut line)).await {
                    Ok(Ok(_)) => {
                        let request = line.trim_end_matches(['\r', '\n']);
                        control_request(request, &store, &one_at_a_time).await
                    }
                    Ok(Err(err)) => format!("error protocol {err}"),
                    Err(_) => "error protocol no request within the timeout".to_string(),
                }
            } else {
                "error forbidden only the data directory's owner may use the control socket"
                    .to_string()
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
    tasks.close();
    if tokio::time::timeout(STOP_WAIT, tasks.wait()).await.is_err() {
        tracing::warn!("a backup was still running when the server stopped");
    }
    let _ = std::fs::remove_file(&path);
}

/// Binds a Unix socket at `path` that only its owner can use from the
/// moment it exists: made in a new directory only the owner may enter,
/// restricted, then moved into place (replacing one left by a server that
/// did not stop cleanly).
#[cfg(unix)]
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.with_extension(format!("new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let staged = dir.join("s");
    let bound = tokio::net::UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&dir);
    bound
}

/// Without Unix sockets there is no control socket.
#[cfg(not(unix))]
pub async fn serve_control(_path: PathBuf, _store: StoreHandle, _stop: CancellationToken) {}

async fn control_request(
    line: &str,
    store: &StoreHandle,
    one_at_a_time: &tokio::sync::Semaphore,
) -> String {
    let Some(dest) = line.strip_prefix("backup ") else {
        return "error protocol unknown request; expected `backup PATH`".into();
    };
    let dest = Path::new(dest);
    if !dest.is_absolute() {
        return "error protocol the backup path must be absolute".into();
    }
    let Ok(_turn) = one_at_a_time.try_acquire() else {
        let err = BackupError::Busy;
        return format!("error {} {err}", err.code());
    };
    match store.backup(dest).await {
        Ok(bytes) => {
            tracing::info!(dest = %dest.display(), bytes, "backup written");
            format!("ok {bytes}")
        }
        Err(err) => {
            tracing::warn!(dest = %dest.display(), code = err.code(), %err, "backup failed");
            format!("error {} {err}", err.code())
        }
    }
}

/// Runs an operator command against the store `storage` names; prints what
/// it did on stdout.
pub async fn run(command: &Admin, storage: &Storage) -> anyhow::Result<()> {
    match command {
        Admin::Backup { dest } => {
            let dest = std::path::absolute(dest)
                .with_context(|| format!("cannot resolve {}", dest.display()))?;
            // The path goes to the server as one line of text.
            if dest.to_str().is_none_or(|text| text.contains(['\n', '\r'])) {
                anyhow::bail!(
                    "the backup path {} is not UTF-8 or holds a line break; choose another",
                    dest.display()
                );
            }
            let bytes = backup(storage, &dest).await?;
            println!("backup written to {} ({bytes} bytes)", dest.display());
            Ok(())
        }
    }
}

/// Backs up the store in `storage`'s data directory into `dest` (absolute):
/// through the running server's control socket if there is one, else by
/// opening the store.
pub async fn backup(storage: &Storage, dest: &Path) -> anyhow::Result<u64> {
    match storage.engine() {
        StoreKind::Memory => anyhow::bail!(BackupError::Memory),
        StoreKind::Postgres => anyhow::bail!(BackupError::External),
        StoreKind::Log | StoreKind::Sqlite => {}
    }
    let data = Path::new(&storage.data);
    let socket = data.join(CONTROL_SOCKET);
    if let Some(answer) = ask_server(&socket, &format!("backup {}", dest.display())).await? {
        let bytes = match answer.split_once(' ') {
            Some(("ok", bytes)) => bytes
                .trim()
                .parse()
                .with_context(|| format!("the server answered `{answer}`"))?,
            Some(("error", why)) => anyhow::bail!("the server could not back up: {why}"),
            _ => anyhow::bail!("the server answered `{answer}`"),
        };
        // The server writes the copy: a server with a private /tmp (systemd's
        // PrivateTmp) writes where this command cannot see.
        if std::fs::read_dir(dest).map_or(true, |mut entries| entries.next().is_none()) {
            anyhow::bail!(
                "the server wrote the backup to {}, but it is not visible here (the server may \
                 have a private view of the file system, e.g. systemd's PrivateTmp); choose a \
                 directory the server shares",
                dest.display()
            );
        }
        return Ok(bytes);
    }
    // No server: open the store (which also checks that nobody holds it),
    // but only where there is one: a wrong --data must not back up a new,
    // empty store.
    if !crate::StoreFiles::in_dir(data).any() {
        anyhow::bail!(
            "{} holds no store (is --data, or the config file, the server's?)",
            data.display()
        );
    }
    let opened = storage
        .open_store()
        .await
        .context("cannot open the store to back it up")?;
    let result = opened.handle.backup(dest).await;
    opened.close().await;
    result.map_err(|err| anyhow::anyhow!("{} {err}", err.code()))
}

/// Sends one request to a server's control socket; `None` if no server
/// listens there.
#[cfg(unix)]
async fn ask_server(socket: &Path, request: &str) -> anyhow::Result<Option<String>> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("cannot reach the server at {}", socket.display()));
        }
    };
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    if answer.is_empty() {
        anyhow::bail!(
            "the server at {} closed the control socket without answering",
            socket.display()
        );
    }
    Ok(Some(answer.trim_end().to_string()))
}

#[cfg(not(unix))]
async fn ask_server(_socket: &Path, _request: &str) -> anyhow::Result<Option<String>> {
    Ok(None)
}
