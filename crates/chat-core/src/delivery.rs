//! Live delivery across engines that share a store: the [`Delivery`] seam.
//!
//! On one engine (no `Delivery`), a message to a user logged in there is
//! pushed to their session directly (stored as delivered, under the
//! recipient's stripe lock).
//!
//! On a node of a cluster, every message is stored undelivered. A login
//! there reads its *floor* as it begins (the newest id stored for the
//! user, [`Store::last_id`](crate::Store::last_id)), and each session has
//! one pusher that takes what was stored after the last id it pushed (the
//! floor at first), in id order, as the session reads
//! ([`Store::take_after`](crate::Store::take_after)); a fetch takes what
//! was queued before the floor
//! ([`Store::take_undelivered_in`](crate::Store::take_undelivered_in)).
//! Once a message is durable, the sending engine wakes the recipient's
//! pusher if they are logged in on it, and otherwise reads who holds their
//! [`Lease`] and asks its `Delivery` to route the message there; the
//! receiving engine wakes the pusher ([`Chat::deliver_queued`]). So pushes
//! keep id order whichever node a message came from, and a cumulative
//! acknowledgement never passes a message still on its way. A route that
//! is lost loses nothing: the message stays stored for the next wake, the
//! next login's replay or a fetch.
//!
//! [`LocalBus`] routes between engines in one process (tests of the
//! multi-node paths); a clustered implementation routes through the shared
//! database.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::engine::{Chat, WeakChat};
use crate::presence::{Lease, NodeId};

/// Why a route failed. Nothing is lost either way: the message stays
/// queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// No node of that name is known (it stopped).
    #[error("no route to {0}")]
    NoRoute(NodeId),
    /// The transport between nodes is down.
    #[error("delivery unavailable: {0}")]
    Unavailable(String),
}

/// Routes committed messages to the node that holds their recipient's
/// login. See the module docs.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// Tells the node holding each of `leases` that messages for its user
    /// are durable and stored (a batch: one lease per user, however many
    /// messages; the node looks for all of them).
    async fn route(&self, leases: &[Lease]) -> Result<(), DeliveryError>;
}

/// Routes between engines in one process. Holds them weakly: an engine that
/// is dropped is simply no longer routed to.
#[derive(Default)]
pub struct LocalBus {
    nodes: Mutex<HashMap<NodeId, WeakChat>>,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus").finish_non_exhaustive()
    }
}

impl LocalBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes messages for `node` to `chat` from now on.
    pub fn register(&self, node: NodeId, chat: &Chat) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.insert(node, chat.downgrade());
        }
    }
}

#[async_trait]
impl Delivery for LocalBus {
    async fn route(&self, leases: &[Lease]) -> Result<(), DeliveryError> {
        for lease in leases {
            let chat = self
                .nodes
                .lock()
                .map_err(|_| DeliveryError::Unavailable("the bus's lock was poisoned".into()))?
                .get(&lease.node)
                .and_then(WeakChat::upgrade)
                .ok_or(DeliveryError::NoRoute(lease.node))?;
            chat.deliver_queued(&lease.user).await;
        }
        Ok(())
    }
}
