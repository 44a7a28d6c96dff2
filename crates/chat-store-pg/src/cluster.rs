//! Presence and delivery on PostgreSQL: several server processes (nodes)
//! on one database, coordinated by it alone.
//!
//! - **Nodes** register a random id in `nodes` and heartbeat there every
//!   third of the lease time, in the database's clock (`now()`), so the
//!   processes' clocks need not agree.
//! - **Leases** ([`PgPresence`]): a login is a row in `leases` with its
//!   node and a generation from one sequence (the fencing token). A lease
//!   whose node's heartbeat is older than the lease time is dead: another
//!   node may take it over in the same statement that grants it. So when a
//!   node dies, its users can log in elsewhere after at most one lease time.
//! - **A node that misses its own heartbeat** (paused, cut off from the
//!   database) can no longer know whether its leases were taken over:
//!   [`Heartbeat::run`] returns, and the server stops at once rather than act
//!   for users who may be logged in elsewhere (fail-stop).
//! - **Delivery** ([`PgDelivery`]): a message is committed undelivered;
//!   for a user whose lease names another node it is then announced with
//!   `NOTIFY chat_node_<id>, '<user>'`, and that node's listener wakes the
//!   user's session there, which pushes what was stored for it since its
//!   login began, in id order ([`chat_core::Chat::deliver_queued`]). A
//!   listener that loses its connection reconnects and wakes every session
//!   on its node: a lost notification delays, never loses.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::delivery::{Delivery, DeliveryError};
use chat_core::presence::{Lease, NodeId, Presence, PresenceError};
use chat_core::{Username, WeakChat};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::PgStore;
use crate::budgets::PgBudgets;

/// Default lease time: how long after its last heartbeat a node's logins
/// are still its own.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(10);

/// The [`Presence`] of one node on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgPresence {
    pool: PgPool,
    node: NodeId,
    lease_time: Duration,
}

/// Keeps a node alive in `nodes`; see [`Heartbeat::run`].
#[derive(Debug)]
pub struct Heartbeat {
    pool: PgPool,
    node: NodeId,
    lease_time: Duration,
}

fn unavailable(err: sqlx::Error) -> PresenceError {
    PresenceError::Unavailable(format!("PostgreSQL: {err}"))
}

fn interval(lease_time: Duration) -> String {
    format!("{} milliseconds", lease_time.as_millis().max(1))
}

impl PgPresence {
    /// Registers a new node on `store`'s database, with a random id.
    pub async fn register(
        store: &PgStore,
        lease_time: Duration,
    ) -> Result<(Self, Heartbeat), PresenceError> {
        let pool = store.pool().clone();
        let node = NodeId(rand::random::<u64>() >> 1);
        // Nodes dead for an hour, and their leases, are forgotten.
        sqlx::query(
            "DELETE FROM leases WHERE node IN \
             (SELECT id FROM nodes WHERE heartbeat_at < now() - interval '1 hour')",
        )
        .execute(&pool)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM nodes WHERE heartbeat_at < now() - interval '1 hour'")
            .execute(&pool)
            .await
            .map_err(unavailable)?;
        sqlx::query("INSERT INTO nodes (id) VALUES ($1)")
            .bind(node.0 as i64)
            .execute(&pool)
            .await
            .map_err(unavailable)?;
        let presence = Self {
            pool: pool.clone(),
            node,
            lease_time,
        };
        let heartbeat = Heartbeat {
            pool,
            node,
            lease_time,
        };
        Ok((presence, heartbeat))
    }
}

#[async_trait]
impl Presence for PgPresence {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn acquire(&self, user: &Username) -> Result<Lease, PresenceError> {
        // Granted if nobody holds it, or taken over from a dead node, in
        // one statement: of several nodes trying at once, one wins.
        let generation: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases AS l (name, node, generation) \
             VALUES ($1, $2, nextval('lease_generation')) \
             ON CONFLICT (name) DO UPDATE SET node = EXCLUDED.node, generation = EXCLUDED.generation \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = l.node \
                               AND n.heartbeat_at > now() - $3::interval) \
             RETURNING generation",
        )
        .bind(user.as_str())
        .bind(self.node.0 as i64)
        .bind(interval(self.lease_time))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        if let Some(generation) = generation {
            return Ok(Lease {
                user: user.clone(),
                node: self.node,
                generation: generation as u64,
            });
        }
        match self.holder(user).await? {
            Some(lease) => Err(PresenceError::Held(lease)),
            // Released between the two statements: try once more.
            None => Box::pin(self.acquire(user)).await,
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, PresenceError> {
        let released = sqlx::query("DELETE FROM leases WHERE name = $1 AND generation = $2")
            .bind(lease.user.as_str())
            .bind(lease.generation as i64)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(released.rows_affected() > 0)
    }

    async fn holders(&self, users: &[Username]) -> Result<Vec<Lease>, PresenceError> {
        let names: Vec<&str> = users.iter().map(Username::as_str).collect();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT l.name, l.node, l.generation FROM leases l JOIN nodes n ON n.id = l.node \
             WHERE l.name = ANY($1) AND n.heartbeat_at > now() - $2::interval",
        )
        .bind(&names)
        .bind(interval(self.lease_time))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.into_iter()
            .map(|(name, node, generation)| {
                Ok(Lease {
                    user: Username::parse(&name).map_err(|_| {
                        PresenceError::Unavailable("PostgreSQL holds an invalid name".into())
                    })?,
                    node: NodeId(node as u64),
                    generation: generation as u64,
                })
            })
            .collect()
    }

    async fn holder(&self, user: &Username) -> Result<Option<Lease>, PresenceError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT l.node, l.generation FROM leases l JOIN nodes n ON n.id = l.node \
             WHERE l.name = $1 AND n.heartbeat_at > now() - $2::interval",
        )
        .bind(user.as_str())
        .bind(interval(self.lease_time))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.map(|(node, generation)| Lease {
            user: user.clone(),
            node: NodeId(node as u64),
            generation: generation as u64,
        }))
    }
}

impl Heartbeat {
    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Beats every third of the lease time until `stop`, then deregisters
    /// the node (its leases go with it). Returns early, with why, once this
    /// node cannot be sure its leases are still its own: a beat that finds
    /// the node already dead in the database's clock (the process was
    /// paused or cut off), or no beat landing before the last one's lease
    /// time (minus a margin) runs out, measured from when that beat was
    /// sent. The server must then stop serving at once. Beats go over a
    /// connection of their own, so a busy pool cannot starve them.
    pub async fn run(self, stop: CancellationToken) -> Result<(), String> {
        use sqlx::Connection as _;
        let every = self.lease_time / 3;
        let margin = every / 2;
        let mut conn: Option<sqlx::PgConnection> = None;
        // The lease runs from the last beat that landed, counted from when
        // it was sent (the database stamped it no earlier).
        let mut sent_last = tokio::time::Instant::now();
        loop {
            let deadline = sent_last + self.lease_time - margin;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(self.late(sent_last)),
                _ = stop.cancelled() => break,
            }
            let sent = tokio::time::Instant::now();
            let beat = tokio::time::timeout_at(deadline, async {
                if conn.is_none() {
                    let options = self.pool.connect_options();
                    conn = Some(sqlx::PgConnection::connect_with(&options).await?);
                }
                let Some(conn) = conn.as_mut() else {
                    return Err(sqlx::Error::PoolClosed);
                };
                // Alive only if still alive in everyone else's eyes.
                sqlx::query(
                    "UPDATE nodes SET heartbeat_at = now() \
                     WHERE id = $1 AND heartbeat_at > now() - $2::interval",
                )
                .bind(self.node.0 as i64)
                .bind(interval(self.lease_time))
                .execute(&mut *conn)
                .await
            })
            .await;
            match beat {
                Ok(Ok(done)) if done.rows_affected() == 1 => sent_last = sent,
                Ok(Ok(_)) => {
                    return Err(format!(
                        "{} missed its lease time: other nodes may hold its logins now",
                        self.node
                    ));
                }
                Ok(Err(err)) => {
                    tracing::warn!(%err, "heartbeat failed; retrying");
                    conn = None;
                }
                Err(_) => return Err(self.late(sent_last)),
            }
        }
        let _ = sqlx::query("DELETE FROM leases WHERE node = $1")
            .bind(self.node.0 as i64)
            .execute(&self.pool)
            .await;
        let _ = sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(self.node.0 as i64)
            .execute(&self.pool)
            .await;
        Ok(())
    }

    fn late(&self, sent_last: tokio::time::Instant) -> String {
        format!(
            "no heartbeat landed for {:?} (lease time {:?}): this node's logins may be held elsewhere",
            sent_last.elapsed(),
            self.lease_time
        )
    }
}

/// The notification channel of a node.
fn channel(node: NodeId) -> String {
    format!("chat_node_{}", node.0)
}

/// The [`Delivery`] of one node on PostgreSQL (`NOTIFY`).
#[derive(Debug, Clone)]
pub struct PgDelivery {
    pool: PgPool,
}

impl PgDelivery {
    /// Delivery through `store`'s database.
    pub fn new(store: &PgStore) -> Self {
        Self {
            pool: store.pool().clone(),
        }
    }

    /// Listens for this node's notifications until `stop`, pushing what is
    /// queued for each user named; after a lost connection, catches up for
    /// every user logged in here. Starts listening before it returns, so a
    /// route made after this returns is heard.
    pub async fn listen(
        &self,
        node: NodeId,
        chat: WeakChat,
        stop: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, sqlx::Error> {
        let name = channel(node);
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&name).await?;
        let pool = self.pool.clone();
        Ok(async move {
            // Set when notifications may have been missed: every local
            // session then looks for what it missed (its pusher retries by
            // itself until it can read it).
            let mut behind = false;
            loop {
                if behind {
                    let Some(chat) = chat.upgrade() else { return };
                    for user in chat.local_users().await {
                        chat.deliver_queued(&user).await;
                    }
                    behind = false;
                }
                let next = tokio::select! {
                    next = listener.try_recv() => next,
                    _ = stop.cancelled() => return,
                };
                let Some(engine) = chat.upgrade() else { return };
                match next {
                    Ok(Some(notification)) => {
                        if let Ok(user) = Username::parse(notification.payload()) {
                            engine.deliver_queued(&user).await;
                        }
                    }
                    // The connection was lost, and the listener has
                    // connected and listened again: what was announced
                    // meanwhile is in the table.
                    Ok(None) => {
                        tracing::warn!("lost the notification connection; catching up");
                        behind = true;
                    }
                    // A failure it does not recover from by itself: a new
                    // listener, listening before the catch-up, so nothing
                    // announced from then on is missed.
                    Err(err) => {
                        tracing::warn!(%err, "notification listener failed; starting a new one");
                        drop(engine);
                        listener = loop {
                            match fresh_listener(&pool, &name).await {
                                Ok(listener) => break listener,
                                Err(err) => {
                                    tracing::warn!(%err, "cannot listen yet; retrying");
                                    tokio::select! {
                                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                        _ = stop.cancelled() => return,
                                    }
                                    if chat.upgrade().is_none() {
                                        return;
                                    }
                                }
                            }
                        };
                        behind = true;
                    }
                }
            }
        })
    }
}

/// A listener on `pool`'s database, listening on `name`.
async fn fresh_listener(pool: &PgPool, name: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(name).await?;
    Ok(listener)
}

#[async_trait]
impl Delivery for PgDelivery {
    async fn route(&self, leases: &[Lease]) -> Result<(), DeliveryError> {
        // One statement, so one commit for the batch (PostgreSQL sends a
        // transaction's notifications at its commit, each distinct one
        // once).
        let channels: Vec<String> = leases.iter().map(|lease| channel(lease.node)).collect();
        let users: Vec<&str> = leases.iter().map(|lease| lease.user.as_str()).collect();
        sqlx::query("SELECT pg_notify(c, u) FROM unnest($1::text[], $2::text[]) AS t(c, u)")
            .bind(&channels)
            .bind(&users)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|err| DeliveryError::Unavailable(format!("PostgreSQL: {err}")))
    }
}

/// One node's presence, delivery and heartbeat, ready to build an engine
/// on (`Chat::on_node`).
#[derive(Debug)]
pub struct Node {
    /// Who holds each login.
    pub presence: Arc<PgPresence>,
    /// Routes to other nodes.
    pub delivery: Arc<PgDelivery>,
    /// Rate budgets shared with every node.
    pub budgets: Arc<PgBudgets>,
    /// To run for as long as the node serves.
    pub heartbeat: Heartbeat,
}

impl Node {
    /// Registers a node on `store`'s database.
    pub async fn join(store: &PgStore, lease_time: Duration) -> Result<Self, PresenceError> {
        let (presence, heartbeat) = PgPresence::register(store, lease_time).await?;
        Ok(Self {
            presence: Arc::new(presence),
            delivery: Arc::new(PgDelivery::new(store)),
            budgets: Arc::new(PgBudgets::new(store)),
            heartbeat,
        })
    }
    /// What the engine shares with the other nodes
    /// ([`chat_core::Chat::on_node`]).
    pub fn cluster(&self) -> chat_core::Cluster {
        chat_core::Cluster {
            presence: self.presence.clone(),
            delivery: self.delivery.clone(),
            budgets: self.budgets.clone(),
        }
    }
}
