//! Limits shared by every transport of one server.
//!
//! [`ConnectionLimit`] counts the connections a process serves, across all
//! its transports together: each accepted connection takes a
//! [`ConnectionSlot`] and gives it back when it ends. A server gives both
//! transports clones of one limit, so that the total stays below what the
//! process can open (every connection is a file descriptor).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections may be served at once; clones share the count.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One connection's place under a [`ConnectionLimit`], given back when
/// dropped.
#[derive(Debug)]
pub struct ConnectionSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl ConnectionLimit {
    /// A limit of `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// A slot for a new connection, or `None` if all are taken.
    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(ConnectionSlot)
    }
}

impl Default for ConnectionLimit {
    /// 50,000 connections.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// The default [`ConnectionLimit`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_count_and_slots_come_back() {
        let limit = ConnectionLimit::new(2);
        let other = limit.clone();
        let a = limit.try_acquire().expect("first");
        let _b = other.try_acquire().expect("second, through the clone");
        assert!(limit.try_acquire().is_none());
        assert_eq!(other.in_use(), 2);
        drop(a);
        assert!(other.try_acquire().is_some());
    }
}
