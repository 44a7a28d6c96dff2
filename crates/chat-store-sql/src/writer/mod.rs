//! The writer task: the only connection that writes, committing whatever
//! writes are waiting as one transaction (group commit).
//!
//! # Batches
//!
//! The task takes the first waiting [`Job`], then every other job already
//! waiting (up to [`SqliteOptions::max_batch`]), applies them in one
//! transaction opened with `BEGIN IMMEDIATE` (the write lock is taken up
//! front; see [`apply`]), commits once — one fsync for the whole batch —
//! and only then answers each caller. Each job carries the reply channel of
//! its own result type ([`job`]), so a write cannot be answered with
//! another's kind of result.
//!
//! Appends are the hot path, so they cost no statement of their own: the
//! writer keeps each account's counters (last id, messages stored) in a
//! cache ([`counters`]) — it is the only writer, so the cache cannot go
//! stale — and gathers the batch's new rows, which go to the database as a
//! few multi-row statements. Each query sent to sqlx's SQLite worker is a
//! round trip between threads, so a batch of appends costs two: `BEGIN
//! IMMEDIATE` with one send-id lookup for the whole batch, then the inserts
//! of messages and send ids, the update of the touched accounts, and
//! `COMMIT`, as one multi-statement query.
//!
//! The per-sender bound on send ids costs no statement either: the writer
//! caches each sender's number of remembered send ids
//! ([`counters::SendIdCounts`]); the first round trip also counts, in one
//! `COUNT … GROUP BY`, those of the batch's senders not cached yet. At the
//! commit, the batch's new send ids are added to their senders' counts,
//! and a sender past
//! [`SqliteOptions::send_ids_per_sender`] plus a margin (a sixteenth of
//! it) gets one `DELETE` of its oldest send ids down to the bound, in the
//! commit's query. The prune subtracts what it deletes from the cached
//! counts, deleting an account drops its count, and a rolled-back batch
//! drops them all; a count not cached is read again when needed.
//!
//! Acknowledgements are applied first, whatever their place in the batch
//! (they are concurrent with the rest, and can only name messages an
//! earlier batch committed). An ack is one `DELETE … RETURNING`; its
//! counter change rides on the batch's account update. Any other write
//! (create, delete, take, prune) first flushes the rows gathered so far, so
//! it sees them; a password change (one `UPDATE` of the account's hash)
//! needs none of them and does not.
//!
//! # Failures
//!
//! If the batch's transaction fails, it is rolled back, the caches are
//! dropped (they may hold rolled-back counters), and the batch's jobs are
//! applied again one transaction each, so that only a write that fails on
//! its own gets the error (`store_unavailable`); the others are stored and
//! answered as usual. A batch that commits costs what it always did; the
//! retry costs one transaction per job, only after a failure. A transaction
//! that cannot begin fails the whole batch (or what is left of a retry) at
//! once: each write would only wait out the same busy timeout.
//!
//! If a failed transaction cannot even be rolled back, the connection is in
//! an unknown state (a later `COMMIT` could store half a batch), so the
//! task stops with [`Fatal`]. [`spawn`] supervises the task: when it stops
//! for any reason but a normal shutdown (a [`Fatal`] error or a panic), the
//! reason is logged at error level and published; every later write fails
//! with `StoreError::Unavailable` naming it, and `Store::failed` completes
//! with it.
//!
//! # Pruning
//!
//! On `Store::prune_expired` (the engine calls it every minute), or by
//! itself every [`SqliteOptions::prune_every`] if that is set, the task
//! runs a prune job: it deletes send ids past their retention (and
//! takes them off the cached per-sender counts) and evicts the cached
//! counters of accounts no batch has used for
//! [`SqliteOptions::idle_account_after`] (they are read again on the next
//! write).

use std::time::Duration;

use chat_core::{StoreError, now_ms};
use sqlx::sqlite::SqliteConnection;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::{SqliteOptions, unavailable};

mod apply;
mod counters;
pub(crate) mod job;

use apply::Failure;
use counters::{CounterCache, SendIdCounts};
use job::{Call, Job};

/// Why the writer task stopped for good.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fatal {
    /// A failed transaction could not be rolled back.
    #[error(
        "cannot roll back a failed write transaction, so the connection's state is unknown: {0}"
    )]
    Rollback(sqlx::Error),
}

/// The store's side of the writer task.
#[derive(Debug, Clone)]
pub(crate) struct WriterHandle {
    /// Where writes go.
    pub(crate) jobs: mpsc::Sender<Job>,
    /// `Some(reason)` once the task has stopped for good.
    pub(crate) failure: watch::Receiver<Option<String>>,
}

/// Starts the writer task on `conn` and its supervisor.
pub(crate) fn spawn(conn: SqliteConnection, options: SqliteOptions) -> WriterHandle {
    let (jobs, queue) = mpsc::channel(options.max_batch.max(1) * 4);
    let (failed, failure) = watch::channel(None);
    let task = tokio::spawn(run(conn, queue, options));
    tokio::spawn(async move {
        let reason = match task.await {
            // Every store handle was dropped: a normal end.
            Ok(Ok(())) => return,
            Ok(Err(fatal)) => format!("the database writer stopped: {fatal}"),
            Err(err) if err.is_panic() => {
                format!(
                    "the database writer panicked: {}",
                    panic_message(err.into_panic().as_ref())
                )
            }
            Err(_) => "the database writer was cancelled (the runtime is shutting down)".into(),
        };
        tracing::error!(%reason, "the durable store can no longer write; every write fails until the server is restarted");
        failed.send_replace(Some(reason));
    });
    WriterHandle { jobs, failure }
}

/// The text of a panic payload, when it is one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// The writer's state: its connection and counters caches.
struct Writer {
    conn: SqliteConnection,
    options: SqliteOptions,
    counters: CounterCache,
    /// Send ids remembered per sender, for the per-sender bound.
    send_ids: SendIdCounts,
    /// Commit latency and writes per commit.
    metrics: (metrics::Histogram, metrics::Histogram),
}

/// The next tick of the writer's own prune timer, if it has one.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The writer task: batches until every store handle is dropped (`Ok`) or
/// the connection is unusable (`Err`).
async fn run(
    conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    options: SqliteOptions,
) -> Result<(), Fatal> {
    let mut prune_timer = options.prune_every.map(|every| {
        let every = every.max(Duration::from_millis(1));
        let mut timer = tokio::time::interval_at(Instant::now() + every, every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        timer
    });
    let mut writer = Writer {
        conn,
        options,
        counters: CounterCache::default(),
        send_ids: SendIdCounts::default(),
        metrics: (
            metrics::histogram!(chat_core::metrics::STORE_COMMIT_LATENCY, "store" => "sqlite"),
            metrics::histogram!(chat_core::metrics::STORE_COMMIT_BATCH, "store" => "sqlite"),
        ),
    };
    loop {
        let first = tokio::select! {
            // The timer first: it fires once a period, so it cannot starve
            // the writes, and a busy writer still prunes on time.
            biased;
            _ = tick(&mut prune_timer) => {
                writer.prune_now().await?;
                continue;
            }
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return Ok(()),
            },
        };
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
        let started = std::time::Instant::now();
        let writes = batch.len();
        writer.run_batch(batch).await?;
        writer.metrics.0.record(started.elapsed());
        writer.metrics.1.record(writes as f64);
    }
}

impl Writer {
    /// Applies and answers a batch: one transaction, or on failure one
    /// transaction per job (see the module docs).
    async fn run_batch(&mut self, mut batch: Vec<Job>) -> Result<(), Fatal> {
        let err = match self.apply(&mut batch).await {
            Ok(()) => {
                batch.into_iter().for_each(Job::answer);
                return Ok(());
            }
            Err(Failure::Write(err)) if batch.len() > 1 => err,
            Err(Failure::Begin(err) | Failure::Write(err)) => {
                self.roll_back().await?;
                tracing::error!(%err, writes = batch.len(), "a write transaction failed and was rolled back");
                fail_all(batch, unavailable(err));
                return Ok(());
            }
        };
        self.roll_back().await?;
        tracing::warn!(%err, writes = batch.len(), "a write batch failed and was rolled back; applying its writes one by one");
        let mut jobs = batch.into_iter();
        while let Some(mut job) = jobs.next() {
            job.forget();
            match self.apply(std::slice::from_mut(&mut job)).await {
                Ok(()) => job.answer(),
                Err(Failure::Write(err)) => {
                    self.roll_back().await?;
                    tracing::error!(%err, "a write failed and was rolled back");
                    job.fail(unavailable(err));
                }
                Err(Failure::Begin(err)) => {
                    // Not this write's fault, and the next ones would wait
                    // out the same busy timeout each: fail them together.
                    self.roll_back().await?;
                    tracing::error!(%err, writes = 1 + jobs.len(), "cannot open a write transaction");
                    fail_all(std::iter::once(job).chain(jobs), unavailable(err));
                    break;
                }
            }
        }
        Ok(())
    }

    /// Ends a failed transaction and drops the caches (they may hold
    /// counters of the rolled-back writes).
    async fn roll_back(&mut self) -> Result<(), Fatal> {
        self.counters.clear();
        self.send_ids.clear();
        match sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            // SQLite ends the transaction itself on some errors (a full
            // disk, an I/O error during commit): then there is nothing left
            // to roll back, which is what we want.
            Err(err) if err.to_string().contains("no transaction is active") => Ok(()),
            Err(err) => Err(Fatal::Rollback(err)),
        }
    }

    /// The timer's prune, by the wall clock; logged, answered to nobody.
    async fn prune_now(&mut self) -> Result<(), Fatal> {
        let (call, mut answer) = Call::new(now_ms());
        self.run_batch(vec![Job::Prune(call)]).await?;
        match answer.try_recv() {
            Ok(Ok(pruned)) if pruned > 0 => {
                tracing::debug!(
                    pruned,
                    cached = self.counters.len(),
                    senders = self.send_ids.len(),
                    "pruned expired send ids and idle accounts"
                );
            }
            Ok(Err(err)) => tracing::warn!(%err, "could not prune expired send ids"),
            _ => {}
        }
        Ok(())
    }
}

/// Fails every job with `why`: nothing of them is stored.
fn fail_all(jobs: impl IntoIterator<Item = Job>, why: StoreError) {
    for job in jobs {
        job.fail(why.clone());
    }
}

/// The reason a write could not reach the writer: the published failure,
/// once the supervisor has it.
pub(crate) async fn failure_reason(failure: &watch::Receiver<Option<String>>) -> String {
    let mut failure = failure.clone();
    match failure.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or_default(),
        // The supervisor is gone without a reason: the runtime is shutting
        // down.
        Err(_) => "the database writer stopped".into(),
    }
}

/// A write's error when the writer is gone.
pub(crate) async fn gone(failure: &watch::Receiver<Option<String>>) -> StoreError {
    StoreError::Unavailable(failure_reason(failure).await)
}
