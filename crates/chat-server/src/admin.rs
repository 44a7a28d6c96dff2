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
//! With no server running, the command opens the store itself.

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
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreHandle::Log(_) => "StoreHandle::Log",
            StoreHandle::Sqlite(_) => "StoreHandle::Sqlite",
            StoreHandle::Memory => "StoreHandle::Memory",
        })
    }
}

/// Why a backup failed, with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The server keeps nothing on disk.
    #[error("the server keeps its data in memory: there is nothing to back up")]
    Memory,
    /// The target already holds a store.
    #[error("{0}")]
    Occupied(String),
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
            BackupError::Io(_) => "backup_io",
        }
    }
}

impl StoreHandle {
    /// Writes a consistent copy of the store into `to` (a new or empty
    /// directory) while it serves; returns the copy's size in bytes.
    pub async fn backup(&self, to: &Path) -> Result<u64, BackupError> {
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
        }
    }
}

/// Serves the control socket at `path` until `stop`; removes it then. A
/// socket that cannot be made (a path too long for a Unix socket, a
/// read-only directory) is logged and skipped: the server runs without.
#[cfg(unix)]
pub async fn serve_control(path: PathBuf, store: StoreHandle, stop: CancellationToken) {
    use std::os::unix::fs::PermissionsExt;
    // A socket file left by a server that did not stop cleanly.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "no control socket: online backups need the server stopped");
            return;
        }
    };
    if let Err(err) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), %err, "cannot restrict the control socket to its owner; closing it");
        let _ = std::fs::remove_file(&path);
        return;
    }
    tracing::info!(path = %path.display(), "control socket ready");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let store = store.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut read = BufReader::new(read).take(MAX_REQUEST as u64);
            let answer = match read.read_line(&mut line).await {
                Ok(_) => control_request(line.trim_end_matches(['\r', '\n']), &store).await,
                Err(err) => format!("error protocol {err}"),
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Without Unix sockets there is no control socket.
#[cfg(not(unix))]
pub async fn serve_control(_path: PathBuf, _store: StoreHandle, _stop: CancellationToken) {}

async fn control_request(line: &str, store: &StoreHandle) -> String {
    let Some(dest) = line.strip_prefix("backup ") else {
        return "error protocol unknown request; expected `backup PATH`".into();
    };
    let dest = Path::new(dest);
    if !dest.is_absolute() {
        return "error protocol the backup path must be absolute".into();
    }
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
    let kind = storage.engine();
    if kind == StoreKind::Memory {
        anyhow::bail!(BackupError::Memory);
    }
    let socket = Path::new(&storage.data).join(CONTROL_SOCKET);
    if let Some(answer) = ask_server(&socket, &format!("backup {}", dest.display())).await? {
        return match answer.split_once(' ') {
            Some(("ok", bytes)) => bytes
                .trim()
                .parse()
                .with_context(|| format!("the server answered `{answer}`")),
            Some(("error", why)) => anyhow::bail!("the server could not back up: {why}"),
            _ => anyhow::bail!("the server answered `{answer}`"),
        };
    }
    // No server: open the store (which also checks that nobody holds it).
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
