//! What the benchmark measures of PostgreSQL itself: the database's CPU
//! time, so that a row on it is charged for the work the store moved
//! there, and the ceiling of `NOTIFY`, which carries a cluster's
//! deliveries from one server process to another.
//!
//! The database runs on the benchmark's machine and shares its cores with
//! the servers and the load generator, so its CPU is read like theirs:
//! from `/proc`, summed over every process whose command is `postgres`
//! (the backends of the servers' connections, and the WAL writer,
//! checkpointer and the rest). Anything else the database does meanwhile
//! is counted too: run the benchmark on a quiet database.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPoolOptions};

use crate::cpu_seconds_of;

/// CPU seconds of every `postgres` process at one moment, by process id.
#[derive(Debug, Clone)]
pub struct DatabaseCpu {
    seconds: HashMap<u32, f64>,
}

impl DatabaseCpu {
    /// Reads it now.
    pub fn now() -> Self {
        let mut seconds = HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == "postgres" {
                seconds.insert(pid, cpu_seconds_of(pid));
            }
        }
        Self { seconds }
    }

    /// CPU seconds the database used since this reading: each process's
    /// growth, a process started since counted whole. (A process that
    /// exited in between is missed: the servers' pools keep their
    /// connections, so their backends live through a measured window.)
    pub fn seconds_since(&self) -> f64 {
        let now = Self::now();
        now.seconds
            .iter()
            .map(|(pid, after)| after - self.seconds.get(pid).copied().unwrap_or(0.0))
            .filter(|used| *used > 0.0)
            .sum()
    }
}

/// What `NOTIFY` carries at most here: one listener, and connections
/// sending to its channel as fast as they can, in several configurations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyCeiling {
    /// The database server: its version and `synchronous_commit`.
    #[serde(default)]
    pub database: String,
    /// Bytes of each notification's payload: a recipient's name and a
    /// message id, about what the server sends.
    pub payload_bytes: usize,
    /// How long each configuration ran, seconds.
    pub window_s: f64,
    /// One per configuration.
    pub rates: Vec<NotifyRate>,
}

/// One configuration of [`NotifyCeiling`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyRate {
    /// Connections sending at once, each from a task of its own.
    pub connections: usize,
    /// Notifications per transaction: 1 is `SELECT pg_notify(..)` in
    /// autocommit, as the server routes a message; more are that many
    /// statements in one transaction. 0 is the control: transactions that
    /// notify nothing but commit all the same (`SELECT txid_current()`
    /// takes a transaction id, so its commit is written and flushed).
    pub per_commit: usize,
    /// Transactions committed in the window.
    pub commits: u64,
    /// Notifications committed in the window.
    pub sent: u64,
    /// Notifications the listener received in the window.
    pub received: u64,
    /// Commits per second.
    pub commits_per_second: f64,
    /// Notifications committed per second.
    pub sent_per_second: f64,
    /// Notifications received per second: the figure that bounds delivery.
    pub received_per_second: f64,
    /// Sent but not yet received when the window ended.
    pub lag: u64,
    /// Whether every notification sent was received (within two seconds
    /// after the window).
    pub all_received: bool,
    /// Cores PostgreSQL used on average.
    pub database_cores: f64,
    /// Cores the sender and listener (this process) used on average.
    pub generator_cores: f64,
    /// Which side limited it ([`crate::bottleneck`]; `waiting`: neither was
    /// short of CPU, so a lock or the disk was).
    pub bottleneck: String,
}

/// Bytes of the measured payload.
pub const NOTIFY_PAYLOAD_BYTES: usize = 30;

/// The payload of notification `n` from sender `task`: as long as a
/// recipient's name and a message id.
fn payload(task: usize, n: u64) -> String {
    let text = format!("r{task:05}.{n:023}");
    debug_assert_eq!(text.len(), NOTIFY_PAYLOAD_BYTES);
    text
}

/// Measures [`NotifyCeiling`] on the database at `url`, for `window` per
/// configuration: `(connections, per_commit)` each.
pub async fn measure_notify(
    url: &str,
    window: Duration,
    configurations: &[(usize, usize)],
) -> anyhow::Result<NotifyCeiling> {
    let database = describe(url).await?;
    let mut rates = Vec::new();
    for &(connections, per_commit) in configurations {
        rates.push(notify_rate(url, window, connections, per_commit).await?);
    }
    Ok(NotifyCeiling {
        database,
        payload_bytes: NOTIFY_PAYLOAD_BYTES,
        window_s: window.as_secs_f64(),
        rates,
    })
}

/// `PostgreSQL 15.8, synchronous_commit on`.
async fn describe(url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    let (version, synchronous_commit): (String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('synchronous_commit')",
    )
    .fetch_one(&mut connection)
    .await?;
    let _ = connection.close().await;
    Ok(format!(
        "PostgreSQL {version}, synchronous_commit {synchronous_commit}"
    ))
}

async fn notify_rate(
    url: &str,
    window: Duration,
    connections: usize,
    per_commit: usize,
) -> anyhow::Result<NotifyRate> {
    let channel = format!("chat_bench_notify_{}", std::process::id());
    let mut listener = PgListener::connect(url).await?;
    listener.listen(&channel).await?;
    let received = Arc::new(AtomicU64::new(0));
    let counting = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while listener.recv().await.is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(url)
        .await?;
    // Every connection open before the window.
    let mut opened = Vec::new();
    for _ in 0..connections {
        opened.push(pool.acquire().await?);
    }
    drop(opened);

    let sent = Arc::new(AtomicU64::new(0));
    let commits = Arc::new(AtomicU64::new(0));
    let database = DatabaseCpu::now();
    let generator = cpu_seconds_of(std::process::id());
    let started = Instant::now();
    let deadline = started + window;
    let senders: Vec<_> = (0..connections)
        .map(|task| {
            let (pool, channel) = (pool.clone(), channel.clone());
            let (sent, commits) = (Arc::clone(&sent), Arc::clone(&commits));
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let done = match per_commit {
                        0 => sqlx::query("SELECT txid_current()")
                            .execute(&pool)
                            .await
                            .map(|_| ()),
                        1 => sqlx::query("SELECT pg_notify($1, $2)")
                            .bind(&channel)
                            .bind(payload(task, n))
                            .execute(&pool)
                            .await
                            .map(|_| ()),
                        many => notify_in_one_commit(&pool, &channel, task, n, many).await,
                    };
                    done?;
                    n += per_commit as u64;
                    commits.fetch_add(1, Ordering::Relaxed);
                    sent.fetch_add(per_commit as u64, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let seconds = started.elapsed().as_secs_f64();
    let (sent_then, received_then) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    let commits_then = commits.load(Ordering::Relaxed);
    let database_cores = database.seconds_since() / seconds;
    let generator_cores = (cpu_seconds_of(std::process::id()) - generator) / seconds;
    for sender in senders {
        sender.await??;
    }
    // What was sent still arrives: wait for it (a short while).
    let total = sent.load(Ordering::Relaxed);
    let patience = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < total && Instant::now() < patience {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_received = received.load(Ordering::Relaxed) >= total;
    counting.abort();
    pool.close().await;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Ok(NotifyRate {
        connections,
        per_commit,
        commits: commits_then,
        sent: sent_then,
        received: received_then,
        commits_per_second: commits_then as f64 / seconds,
        sent_per_second: sent_then as f64 / seconds,
        received_per_second: received_then as f64 / seconds,
        lag: sent_then.saturating_sub(received_then),
        all_received,
        database_cores,
        generator_cores,
        bottleneck: crate::bottleneck(0.0, generator_cores, database_cores, 0.0, cores).into(),
    })
}

/// `many` notifications, each its own statement, in one transaction.
async fn notify_in_one_commit(
    pool: &sqlx::PgPool,
    channel: &str,
    task: usize,
    first: u64,
    many: usize,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for k in 0..many as u64 {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload(task, first + k))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}
