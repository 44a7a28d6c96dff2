//! Who holds each account's login, across every engine that shares a
//! store: the [`Presence`] seam.
//!
//! One account is logged in at most once, wherever its session runs. An
//! engine (a *node*) that logs a user in first takes a [`Lease`] on the
//! account; the lease names the node and carries a *generation*, higher
//! than that of any earlier lease on the account. The generation is a
//! fencing token: a node that lost its lease (released by someone else, or,
//! in a clustered implementation, expired while the node was paused or cut
//! off) cannot end or act on the newer one, because every operation on a
//! lease compares it first.
//!
//! [`LocalPresence`] is the in-process implementation, today's behaviour:
//! leases in memory, granted and released in one process, never expiring
//! (a session that dies releases its lease when the engine notices). Several
//! engines in one process may share one (see [`LocalPresence::join`]), which
//! is how the engine's own tests exercise the multi-node paths without a
//! database. A clustered implementation keeps the leases in the shared
//! database, with a heartbeat and an expiry.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::types::Username;

/// One engine among those sharing a store (one server process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// A grant of one account's login to one node: who holds it, and which
/// grant it is (the fencing token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The account.
    pub user: Username,
    /// The node whose session holds the login.
    pub node: NodeId,
    /// Higher than the generation of every earlier lease on `user`.
    pub generation: u64,
}

/// Why a presence operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// Another lease on the account is current.
    #[error("{} is logged in on {}", .0.user, .0.node)]
    Held(Lease),
    /// The presence service cannot be reached (a clustered one's database).
    #[error("presence unavailable: {0}")]
    Unavailable(String),
}

/// Who holds each account's login. See the module docs.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The node this handle acts for.
    fn node(&self) -> NodeId;

    /// Grants `user`'s login to this node: a new lease, unless another one
    /// is current ([`PresenceError::Held`], with it). Exactly one of several
    /// concurrent acquires of one account succeeds.
    async fn acquire(&self, user: &Username) -> Result<Lease, PresenceError>;

    /// Ends `lease` if it is still the current one; a stale lease changes
    /// nothing. Returns whether it ended it.
    async fn release(&self, lease: &Lease) -> Result<bool, PresenceError>;

    /// The current lease on `user`, if any.
    async fn holder(&self, user: &Username) -> Result<Option<Lease>, PresenceError>;

    /// The current leases on any of `users` (those logged in nowhere are
    /// left out). The default asks [`Presence::holder`] for each; a
    /// clustered implementation answers in one round trip.
    async fn holders(&self, users: &[Username]) -> Result<Vec<Lease>, PresenceError> {
        let mut leases = Vec::new();
        for user in users {
            leases.extend(self.holder(user).await?);
        }
        Ok(leases)
    }
}

/// Lock shards of the in-process lease table.
const SHARDS: usize = 64;

/// The in-process [`Presence`]: leases in memory. See the module docs.
#[derive(Clone)]
pub struct LocalPresence {
    node: NodeId,
    table: Arc<Table>,
}

struct Table {
    shards: Box<[Mutex<HashMap<Username, Lease>>]>,
    hasher: RandomState,
    /// One counter for every account: a generation is never reused.
    generations: AtomicU64,
}

impl std::fmt::Debug for LocalPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPresence")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Default for LocalPresence {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalPresence {
    /// A lease table for one engine, as node 0.
    pub fn new() -> Self {
        Self {
            node: NodeId(0),
            table: Arc::new(Table {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                generations: AtomicU64::new(0),
            }),
        }
    }

    /// A handle on the same leases acting for `node`: engines in one
    /// process that share a store and one of these see each other's
    /// logins.
    pub fn join(&self, node: NodeId) -> Self {
        Self {
            node,
            table: Arc::clone(&self.table),
        }
    }

    fn shard(&self, user: &Username) -> &Mutex<HashMap<Username, Lease>> {
        let hash = self.table.hasher.hash_one(user) as usize;
        &self.table.shards[hash % SHARDS]
    }

    fn locked(
        &self,
        user: &Username,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Username, Lease>>, PresenceError> {
        self.shard(user)
            .lock()
            .map_err(|_| PresenceError::Unavailable("the lease table's lock was poisoned".into()))
    }
}

#[async_trait]
impl Presence for LocalPresence {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn acquire(&self, user: &Username) -> Result<Lease, PresenceError> {
        let mut shard = self.locked(user)?;
        if let Some(held) = shard.get(user) {
            return Err(PresenceError::Held(held.clone()));
        }
        let lease = Lease {
            user: user.clone(),
            node: self.node,
            generation: self.table.generations.fetch_add(1, Ordering::Relaxed) + 1,
        };
        shard.insert(user.clone(), lease.clone());
        Ok(lease)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, PresenceError> {
        let mut shard = self.locked(&lease.user)?;
        if shard.get(&lease.user) == Some(lease) {
            shard.remove(&lease.user);
            return Ok(true);
        }
        Ok(false)
    }

    async fn holder(&self, user: &Username) -> Result<Option<Lease>, PresenceError> {
        Ok(self.locked(user)?.get(user).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::parse(text).unwrap()
    }

    #[tokio::test]
    async fn one_lease_at_a_time_and_a_stale_one_cannot_end_a_newer() {
        let a = LocalPresence::new();
        let b = a.join(NodeId(7));
        let alice = name("alice");
        let first = a.acquire(&alice).await.unwrap();
        assert_eq!(first.node, NodeId(0));
        assert_eq!(
            b.acquire(&alice).await,
            Err(PresenceError::Held(first.clone()))
        );
        assert_eq!(b.holder(&alice).await.unwrap(), Some(first.clone()));
        assert!(a.release(&first).await.unwrap());
        let second = b.acquire(&alice).await.unwrap();
        assert_eq!(second.node, NodeId(7));
        assert!(
            second.generation > first.generation,
            "generations only grow"
        );
        // The first holder, acting late, changes nothing.
        assert!(!a.release(&first).await.unwrap());
        assert_eq!(a.holder(&alice).await.unwrap(), Some(second.clone()));
        assert!(b.release(&second).await.unwrap());
        assert_eq!(a.holder(&alice).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exactly_one_of_concurrent_acquires_wins() {
        let presence = LocalPresence::new();
        let bob = name("bob");
        let tries: Vec<_> = (0..16)
            .map(|node| {
                let presence = presence.join(NodeId(node));
                let bob = bob.clone();
                tokio::spawn(async move { presence.acquire(&bob).await })
            })
            .collect();
        let mut won = 0;
        for attempt in tries {
            match attempt.await.unwrap() {
                Ok(_) => won += 1,
                Err(PresenceError::Held(lease)) => assert_eq!(lease.user, bob),
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(won, 1);
    }
}
