//! The journal: records changes into a buffer as the store applies them,
//! and a committer thread writes the buffer to the log file and makes it
//! durable with one `fdatasync` per batch (group commit).
//!
//! Every record gets the next position (1, 2, …). A caller that needs its
//! change durable waits until the durable position reaches the position
//! recorded by then ([`LogJournal::settle`]). While the committer writes
//! and syncs one batch, the next accumulates: under load a batch holds what
//! arrived during the previous sync.
//!
//! A write or sync that fails leaves the file in a state nothing can vouch
//! for (after a failed `fdatasync`, Linux may already have dropped the dirty
//! pages): the journal stops, every waiting and later caller gets
//! `store_unavailable`, and [`LogJournal::failed`] completes.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use chat_core::{Change, DurableWait, Journal, StoreError};
use tokio::sync::{Notify, watch};

use crate::codec;

/// Records waiting for the committer.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Position of the last record in `bytes` (or of the last one taken).
    last: u64,
    /// A switch to a new file (compaction): the bytes before this offset
    /// belong to the current file, the rest to the new one.
    rotate: Option<(usize, File)>,
    /// The store is closing: write what is left, then stop.
    stop: bool,
}

/// How far the log is durable.
#[derive(Debug, Clone, Default)]
struct Durable {
    position: u64,
    failed: Option<Arc<str>>,
}

/// The journal shared by the store and its committer thread.
#[derive(Debug)]
pub(crate) struct LogJournal {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Position of the last record taken into `pending`.
    recorded: AtomicU64,
    durable: watch::Sender<Durable>,
    /// Bytes written to the current log file since it was started.
    log_bytes: AtomicU64,
    /// Past this many bytes in the current log, `compact` is notified.
    compact_after: AtomicU64,
    compact: Notify,
}

impl Journal for LogJournal {
    fn record(&self, change: Change) {
        // A panic elsewhere under this lock leaves the buffer whole (every
        // change is appended in one piece), so it is used, not skipped.
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let was_empty = pending.bytes.is_empty();
        codec::encode(&change, &mut pending.bytes);
        pending.last += 1;
        self.recorded.store(pending.last, Ordering::Release);
        drop(pending);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

impl DurableWait for LogJournal {
    fn wait(
        &self,
        position: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
    {
        Box::pin(self.settle_at(position))
    }

    fn reached(&self, position: u64) -> Option<Result<(), StoreError>> {
        let durable = self.durable.borrow();
        match &durable.failed {
            Some(why) => Some(Err(unavailable(why))),
            None => (durable.position >= position).then_some(Ok(())),
        }
    }
}

impl LogJournal {
    /// A journal appending to `file` (positioned at its end, `size` bytes
    /// long), with its committer thread started.
    pub(crate) fn start(
        file: File,
        size: u64,
        compact_after: u64,
    ) -> std::io::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let journal = Arc::new(Self {
            pending: Mutex::default(),
            wake: Condvar::new(),
            recorded: AtomicU64::new(0),
            durable: watch::Sender::new(Durable::default()),
            log_bytes: AtomicU64::new(size),
            compact_after: AtomicU64::new(compact_after),
            compact: Notify::new(),
        });
        let committer = Arc::clone(&journal);
        let thread = std::thread::Builder::new()
            .name("chat-log-commit".into())
            .spawn(move || committer.commit_loop(file))?;
        Ok((journal, thread))
    }

    /// Position of the last change recorded so far.
    pub(crate) fn position(&self) -> u64 {
        self.recorded.load(Ordering::Acquire)
    }

    /// Waits until every change recorded so far is durable.
    pub(crate) async fn settle(&self) -> Result<(), StoreError> {
        self.settle_at(self.position()).await
    }

    /// Waits until the change at `position` (and all before it) is durable.
    pub(crate) async fn settle_at(&self, position: u64) -> Result<(), StoreError> {
        let mut durable = self.durable.subscribe();
        let reached = durable
            .wait_for(|d| d.position >= position || d.failed.is_some())
            .await
            .map_err(|_| unavailable("the log writer is gone"))?;
        match &reached.failed {
            Some(why) => Err(unavailable(why)),
            None => Ok(()),
        }
    }

    /// Completes once the journal has failed, with the reason.
    pub(crate) async fn failed(&self) -> String {
        let mut durable = self.durable.subscribe();
        match durable.wait_for(|d| d.failed.is_some()).await {
            Ok(d) => d.failed.as_deref().unwrap_or_default().to_string(),
            Err(_) => "the log writer is gone".into(),
        }
    }

    /// Resolves when the current log has grown past the compaction
    /// threshold.
    pub(crate) async fn compaction_wanted(&self) {
        self.compact.notified().await;
    }

    /// Sets the compaction threshold (after a compaction: it grows with the
    /// snapshot, so that a large state is not rewritten too often).
    pub(crate) fn compact_after(&self, bytes: u64) {
        self.compact_after.store(bytes, Ordering::Relaxed);
    }

    /// Switches to `file` (a new log, its magic written and synced): the
    /// records from now on go there. Returns the position of the last
    /// record that goes to the old file.
    pub(crate) fn rotate(&self, file: File) -> u64 {
        let Ok(mut pending) = self.pending.lock() else {
            return self.position();
        };
        let at = pending.bytes.len();
        pending.rotate = Some((at, file));
        let last = pending.last;
        drop(pending);
        self.wake.notify_one();
        last
    }

    /// Stops the committer once it has written what is recorded.
    pub(crate) fn stop(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.stop = true;
        }
        self.wake.notify_one();
    }

    fn commit_loop(&self, mut file: File) {
        let mut batch = Vec::new();
        let latency =
            metrics::histogram!(chat_core::metrics::STORE_COMMIT_LATENCY, "store" => "log");
        let batch_size =
            metrics::histogram!(chat_core::metrics::STORE_COMMIT_BATCH, "store" => "log");
        let mut committed = self.durable.borrow().position;
        loop {
            let (last, rotate) = {
                let Ok(mut pending) = self.pending.lock() else {
                    self.fail("the journal's lock was poisoned".into());
                    return;
                };
                while pending.bytes.is_empty() && pending.rotate.is_none() && !pending.stop {
                    pending = match self.wake.wait(pending) {
                        Ok(pending) => pending,
                        Err(_) => {
                            self.fail("the journal's lock was poisoned".into());
                            return;
                        }
                    };
                }
                if pending.stop && pending.bytes.is_empty() && pending.rotate.is_none() {
                    return;
                }
                std::mem::swap(&mut pending.bytes, &mut batch);
                (pending.last, pending.rotate.take())
            };
            let mut added = batch.len();
            let started = std::time::Instant::now();
            let written = match rotate {
                Some((at, next)) => write_synced(&mut file, &batch[..at]).and_then(|()| {
                    file = next;
                    self.log_bytes
                        .store(codec::LOG_MAGIC.len() as u64, Ordering::Relaxed);
                    added = batch.len() - at;
                    write_synced(&mut file, &batch[at..])
                }),
                None => write_synced(&mut file, &batch),
            };
            if let Err(err) = written {
                self.fail(format!("writing the log failed: {err}"));
                return;
            }
            // A rotation with nothing pending is not a commit.
            if last > committed {
                latency.record(started.elapsed());
                batch_size.record((last - committed) as f64);
                committed = last;
            }
            let size = self.log_bytes.fetch_add(added as u64, Ordering::Relaxed) + added as u64;
            batch.clear();
            self.durable
                .send_modify(|d| d.position = d.position.max(last));
            if size > self.compact_after.load(Ordering::Relaxed) {
                self.compact.notify_one();
            }
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(%why, "the durable store stopped: no write is acknowledged from now on");
        self.durable.send_modify(|d| d.failed = Some(why.into()));
    }
}

fn write_synced(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    file.write_all(bytes)?;
    file.sync_data()
}

fn unavailable(why: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("durable store: {why}"))
}
