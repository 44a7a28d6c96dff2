//! The durable chat store: the state lives in memory (a
//! [`MemoryStore`]), and every change to it goes to an append-only,
//! checksummed log on disk before it is acknowledged.
//!
//! # How a write becomes durable
//!
//! The memory store applies a change and hands it to the journal under the
//! locks that ordered it (see [`chat_core::Journal`]); the journal encodes it
//! into a buffer. A committer thread writes whatever the buffer holds to the
//! log and calls `fdatasync` once for the lot (group commit), then
//! publishes how far the log is durable. Every operation of this store,
//! reads included, returns only once everything recorded before it
//! returned is durable: an answer never rests on a change a crash could
//! undo. Under load a batch holds what arrived during the previous sync, so
//! a message costs its encoding (a few hundred bytes copied) and a share of
//! one write and one sync, not a database transaction.
//!
//! # Files
//!
//! A data directory holds `log-N` files (the changes, in order) and
//! `snapshot-N` files (the changes that rebuild the whole state as it was
//! when `log-N` began), `N` a generation number, plus a `LOCK` file that one
//! process holds while it uses the directory. The record format is in
//! [`codec`]. Opening replays the newest snapshot and every log from its
//! generation on; a record cut short or failing its checksum at the end of
//! the newest log is a write a crash interrupted (never acknowledged) and is
//! cut off.
//!
//! # Compaction
//!
//! Messages are appended and acknowledged, so the log grows while the state
//! does not. When the current log passes [`LogOptions::compact_after`] (or
//! four times the last snapshot, if larger: the rewriting then costs at most
//! a quarter of what the log writes), the store dumps its state with no
//! change half done, switches new records to `log-N+1` at that instant,
//! writes `snapshot-N+1` beside it (to a temporary name, synced, then
//! renamed), and deletes the older files. A crash at any step leaves a
//! directory that opens to the same state.
//!
//! # Backups
//!
//! [`LogStore::backup`] writes a consistent snapshot of the running store
//! into another directory, which opens as a store of its own.
//!
//! # Memory
//!
//! Every stored message is held in memory (about its text plus 100 bytes),
//! which the per-recipient queue limit bounds: size the machine for the
//! accounts times the queue limit in the worst case.

pub mod codec;
mod journal;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chat_core::{
    Appended, Change, Credentials, Durable, DurableWait, MemoryStore, MessageId, NewMessage, Store,
    StoreError, Username,
};
use regex::Regex;
use tokio_util::sync::CancellationToken;

use crate::journal::LogJournal;

/// Settings of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Messages stored per recipient past which sends get `queue_full`.
    pub queue_limit: usize,
    /// Bytes the current log may reach before it is compacted into a
    /// snapshot (default 64 MiB; at least four times the last snapshot).
    pub compact_after: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            queue_limit: chat_core::DEFAULT_QUEUE_LIMIT,
            compact_after: 64 << 20,
        }
    }
}

/// Why a [`LogStore`] could not open, compact or back up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file holds something this version cannot read: damage beyond a
    /// torn last write, or a file of another format.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another process holds the data directory.
    #[error("{0} is in use by another server process")]
    Locked(PathBuf),
    /// A backup's destination already holds a store.
    #[error("{0} already holds a store: back up into a new or empty directory")]
    Occupied(PathBuf),
    /// The store itself failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl LogError {
    /// A stable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            LogError::Io { .. } => "log_io",
            LogError::Corrupt { .. } => "log_corrupt",
            LogError::Locked(_) => "log_locked",
            LogError::Occupied(_) => "log_occupied",
            LogError::Store(_) => "store_unavailable",
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The durable store; see the crate docs.
#[derive(Debug)]
pub struct LogStore {
    inner: Arc<Inner>,
    stop: CancellationToken,
    compactor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    memory: MemoryStore,
    journal: Arc<LogJournal>,
    dir: PathBuf,
    /// The current log's generation.
    generation: AtomicU64,
    compact_after: u64,
    /// Held while a compaction runs.
    compacting: tokio::sync::Mutex<()>,
    /// Held (locked) while the store is open.
    _lock: File,
}

/// What opening a directory found.
struct Recovered {
    memory: MemoryStore,
    file: File,
    size: u64,
    generation: u64,
    snapshot_bytes: u64,
    lock: File,
    replayed: usize,
}

const LOCK_FILE: &str = "LOCK";

/// The log may grow to this many times the last snapshot before the next
/// compaction, so that rewriting the state costs at most a quarter of the
/// bytes the log itself writes.
const SNAPSHOT_RATIO: u64 = 4;

fn log_name(generation: u64) -> String {
    format!("log-{generation:020}")
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:020}")
}

/// The generation in a file name of `kind` (`log` or `snapshot`).
fn generation_of(name: &str, kind: &str) -> Option<u64> {
    let digits = name.strip_prefix(kind)?.strip_prefix('-')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl LogStore {
    /// Opens (or creates) the store in `dir`, replaying what it holds.
    pub async fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        let dir = dir.as_ref().to_path_buf();
        let opening = dir.clone();
        let configured = options.compact_after.max(1);
        let recovered = tokio::task::spawn_blocking(move || recover(&opening, &options))
            .await
            .map_err(|err| StoreError::Unavailable(format!("opening the store failed: {err}")))??;
        let Recovered {
            memory,
            file,
            size,
            generation,
            snapshot_bytes,
            lock,
            replayed,
        } = recovered;
        let threshold = configured.max(snapshot_bytes.saturating_mul(SNAPSHOT_RATIO));
        let (journal, committer) =
            LogJournal::start(file, size, threshold).map_err(io_error(&dir))?;
        memory.set_journal(Arc::clone(&journal) as Arc<dyn chat_core::Journal>);
        // Whatever expired while the store was closed goes now.
        memory.prune_expired(chat_core::now_ms()).await?;
        tracing::info!(
            data = %dir.display(),
            replayed,
            generation,
            "durable store open"
        );
        let inner = Arc::new(Inner {
            memory,
            journal,
            dir,
            generation: AtomicU64::new(generation),
            compact_after: configured,
            compacting: tokio::sync::Mutex::new(()),
            _lock: lock,
        });
        let stop = CancellationToken::new();
        let compactor = tokio::spawn(compact_when_wanted(Arc::clone(&inner), stop.clone()));
        Ok(Self {
            inner,
            stop,
            compactor: Mutex::new(Some(compactor)),
            committer: Mutex::new(Some(committer)),
        })
    }

    /// Compacts now: the current state becomes a snapshot and the older
    /// files go (see the crate docs). The store compacts by itself as the
    /// log grows; this is for operators and tests.
    pub async fn compact(&self) -> Result<(), LogError> {
        compact(&self.inner).await
    }

    /// Writes a consistent copy of the store as it is now (everything
    /// acknowledged so far) into `to`, a new or empty directory, which then
    /// opens as a store of its own. Returns the snapshot's size in bytes.
    pub async fn backup(&self, to: impl AsRef<Path>) -> Result<u64, LogError> {
        let (changes, ()) = self.inner.memory.dump(|| ())?;
        // Everything the dump holds is durable before it is written: the
        // send ids it took last may belong to appends after its cut.
        self.inner.journal.settle().await?;
        let to = to.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&to).map_err(io_error(&to))?;
            let occupied = std::fs::read_dir(&to)
                .map_err(io_error(&to))?
                .flatten()
                .any(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    generation_of(&name, "log").is_some()
                        || generation_of(&name, "snapshot").is_some()
                });
            if occupied {
                return Err(LogError::Occupied(to));
            }
            write_snapshot(&to, 0, &changes)
        })
        .await
        .map_err(|err| StoreError::Unavailable(format!("backup task failed: {err}")))?
    }

    /// Stops the store: waits until every recorded change is written and
    /// the files are released (so the directory can be opened again).
    pub async fn close(self) {
        self.stop.cancel();
        let compactor = self.compactor.lock().ok().and_then(|mut c| c.take());
        if let Some(compactor) = compactor {
            let _ = compactor.await;
        }
        self.inner.journal.stop();
        let committer = self.committer.lock().ok().and_then(|mut c| c.take());
        if let Some(committer) = committer {
            let _ = tokio::task::spawn_blocking(move || committer.join()).await;
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        self.stop.cancel();
        self.inner.journal.stop();
    }
}

async fn compact_when_wanted(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = inner.journal.compaction_wanted() => {}
            () = stop.cancelled() => return,
        }
        if let Err(err) = compact(&inner).await {
            tracing::error!(%err, code = err.code(), "compacting the durable store failed; it keeps running on its log");
        }
    }
}

async fn compact(inner: &Inner) -> Result<(), LogError> {
    // One compaction at a time: two would both create the next log.
    let _compacting = inner.compacting.lock().await;
    let generation = inner.generation.load(Ordering::Acquire) + 1;
    let dir = inner.dir.clone();
    let file = tokio::task::spawn_blocking(move || create_log(&dir, generation))
        .await
        .map_err(|err| StoreError::Unavailable(format!("compaction task failed: {err}")))??;
    let (changes, last) = inner.memory.dump(|| inner.journal.rotate(file))?;
    // The old log is complete once its last record is durable; and the
    // send ids the dump took after the switch may belong to appends in the
    // new log, which must be durable before a snapshot remembers them.
    inner.journal.settle_at(last).await?;
    inner.journal.settle().await?;
    inner.generation.store(generation, Ordering::Release);
    let dir = inner.dir.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let bytes = write_snapshot(&dir, generation, &changes)?;
        remove_older(&dir, generation)?;
        Ok::<_, LogError>(bytes)
    })
    .await
    .map_err(|err| StoreError::Unavailable(format!("compaction task failed: {err}")))??;
    inner.journal.compact_after(
        inner
            .compact_after
            .max(bytes.saturating_mul(SNAPSHOT_RATIO)),
    );
    tracing::info!(
        generation,
        snapshot_bytes = bytes,
        "durable store compacted"
    );
    Ok(())
}

/// Creates `log-N` with its magic, synced, and its directory entry synced.
fn create_log(dir: &Path, generation: u64) -> Result<File, LogError> {
    let path = dir.join(log_name(generation));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))?;
    file.write_all(codec::LOG_MAGIC).map_err(io_error(&path))?;
    file.sync_all().map_err(io_error(&path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Writes `snapshot-N` (to a temporary name, synced, then renamed into
/// place, and the directory synced); returns its size.
fn write_snapshot(dir: &Path, generation: u64, changes: &[Change]) -> Result<u64, LogError> {
    let mut bytes = codec::SNAPSHOT_MAGIC.to_vec();
    for change in changes {
        codec::encode(change, &mut bytes);
    }
    let path = dir.join(snapshot_name(generation));
    let temporary = dir.join(format!("{}.tmp", snapshot_name(generation)));
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(&bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
    sync_dir(dir)?;
    Ok(bytes.len() as u64)
}

/// Deletes logs and snapshots of generations before `generation`.
fn remove_older(dir: &Path, generation: u64) -> Result<(), LogError> {
    let mut removed = false;
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let old = generation_of(&name, "log")
            .or_else(|| generation_of(&name, "snapshot"))
            .is_some_and(|g| g < generation);
        if old {
            std::fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn read_file(path: &Path, magic: &[u8; 8]) -> Result<Option<Vec<u8>>, LogError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_error(path))?;
    if bytes.len() < magic.len() {
        // Created but not yet written: a crash right after the create.
        return Ok(None);
    }
    if &bytes[..magic.len()] != magic {
        return Err(LogError::Corrupt {
            path: path.to_path_buf(),
            why: "not a file of this store (or of another format version)".into(),
        });
    }
    bytes.drain(..magic.len());
    Ok(Some(bytes))
}

fn recover(dir: &Path, options: &LogOptions) -> Result<Recovered, LogError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(err)) => return Err(io_error(&lock_path)(err)),
    }
    let (mut logs, mut snapshots) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(g) = generation_of(&name, "log") {
            logs.push(g);
        } else if let Some(g) = generation_of(&name, "snapshot") {
            snapshots.push(g);
        } else if name.ends_with(".tmp") {
            // A snapshot whose writing a crash interrupted.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    logs.sort_unstable();
    let memory = MemoryStore::new(options.queue_limit.max(1));
    let mut replayed = 0;
    let base = snapshots.iter().copied().max();
    let mut snapshot_bytes = 0;
    if let Some(base) = base {
        let path = dir.join(snapshot_name(base));
        let bytes = read_file(&path, codec::SNAPSHOT_MAGIC)?.ok_or_else(|| LogError::Corrupt {
            path: path.clone(),
            why: "an empty snapshot".into(),
        })?;
        snapshot_bytes = bytes.len() as u64;
        let decoded = codec::decode(&bytes);
        if let Some(why) = decoded.stopped {
            return Err(LogError::Corrupt { path, why });
        }
        replayed += decoded.changes.len();
        for change in decoded.changes {
            memory.apply(change)?;
        }
    }
    let base = base.unwrap_or(0);
    let logs: Vec<u64> = logs.into_iter().filter(|&g| g >= base).collect();
    let mut contents = Vec::with_capacity(logs.len());
    for &generation in &logs {
        let path = dir.join(log_name(generation));
        let bytes = read_file(&path, codec::LOG_MAGIC)?;
        contents.push((path, bytes));
    }
    // Only the last log holding anything may end in a torn write: a
    // compaction creates the next log (empty) before the current one's last
    // batch is written, so a crash can tear a log that an empty one follows.
    let last_written = contents
        .iter()
        .rposition(|(_, bytes)| bytes.as_ref().is_some_and(|b| !b.is_empty()))
        .unwrap_or(0);
    for (at, (path, bytes)) in contents.into_iter().enumerate() {
        let Some(bytes) = bytes else {
            continue;
        };
        let decoded = codec::decode(&bytes);
        if decoded.unreadable {
            // Intact by its checksum, yet not a change this version knows:
            // not a torn write, and nothing after it may be dropped.
            return Err(LogError::Corrupt {
                path,
                why: decoded.stopped.unwrap_or_default(),
            });
        }
        if let Some(why) = &decoded.stopped {
            if at < last_written {
                return Err(LogError::Corrupt {
                    path,
                    why: why.clone(),
                });
            }
            let keep = (codec::LOG_MAGIC.len() + decoded.valid) as u64;
            tracing::warn!(
                file = %path.display(),
                %why,
                dropped_bytes = bytes.len() - decoded.valid,
                "cutting off the log's last write, which a crash interrupted (it was never acknowledged)"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_error(&path))?;
            file.set_len(keep).map_err(io_error(&path))?;
            file.sync_all().map_err(io_error(&path))?;
        }
        replayed += decoded.changes.len();
        for change in decoded.changes {
            memory.apply(change)?;
        }
    }
    let generation = logs.last().copied().unwrap_or(base).max(base);
    let path = dir.join(log_name(generation));
    let needs_magic = std::fs::metadata(&path).map_or(true, |m| m.len() < 8);
    let file = if needs_magic {
        create_log(dir, generation)?
    } else {
        OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?
    };
    let size = file.metadata().map_err(io_error(&path))?.len();
    remove_older(dir, base)?;
    Ok(Recovered {
        memory,
        file,
        size,
        generation,
        snapshot_bytes,
        lock,
        replayed,
    })
}

#[async_trait]
impl Store for LogStore {
    async fn create_account(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let result = self.inner.memory.create_account(name, password_hash).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError> {
        let result = self.inner.memory.credentials(name).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn set_password(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let result = self.inner.memory.set_password(name, password_hash).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        let result = self.inner.memory.account_exists(name).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        let result = self.inner.memory.delete_account(name).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        let result = self.inner.memory.list_accounts(pattern, limit).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        let result = self.inner.memory.append(message).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn stage(&self, message: NewMessage) -> Result<(Appended, Durable), StoreError> {
        match self.inner.memory.append(message).await {
            Ok(appended) => {
                // Its record, or a duplicate's original, is at or before
                // the position recorded by now.
                let position = self.inner.journal.position();
                let waiter: Arc<dyn DurableWait> = self.inner.journal.clone();
                Ok((appended, Durable::at(waiter, position)))
            }
            Err(err) => {
                self.inner.journal.settle().await?;
                Err(err)
            }
        }
    }

    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<chat_core::Message>, StoreError> {
        let result = self.inner.memory.take_undelivered(name, limit).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn unacked(&self, name: &Username) -> Result<Vec<chat_core::Message>, StoreError> {
        let result = self.inner.memory.unacked(name).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError> {
        let result = self.inner.memory.ack(name, through).await;
        self.inner.journal.settle().await?;
        result
    }

    async fn account_count(&self) -> Result<usize, StoreError> {
        self.inner.memory.account_count().await
    }

    fn queue_limit(&self) -> usize {
        self.inner.memory.queue_limit()
    }

    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.inner.memory.prune_expired(now_ms).await
    }

    async fn failed(&self) -> String {
        self.inner.journal.failed().await
    }
}
