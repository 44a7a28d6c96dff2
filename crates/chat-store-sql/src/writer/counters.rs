//! The writer's cache of per-account counters (last id given out, messages
//! stored), so that an append costs no statement of its own.
//!
//! The writer is the only connection that writes, so an entry cannot go
//! stale while it is cached; it must be dropped whenever a transaction that
//! changed it rolls back (the writer then clears the whole cache). Entries
//! of accounts idle for a while are evicted by the writer's prune, so the
//! cache holds the active accounts rather than every account ever written.

use std::collections::HashMap;

use chat_core::Username;
use sqlx::sqlite::SqliteConnection;

/// An account's counters, as committed plus the current batch's changes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Counters {
    /// The last message id given out for the account.
    pub(crate) last_id: i64,
    /// Messages stored for it (queued or awaiting an ack).
    pub(crate) stored: i64,
    /// When a batch last used the entry, ms since the epoch.
    used_ms: u64,
}

/// The cache; see the module docs.
#[derive(Default)]
pub(crate) struct CounterCache {
    accounts: HashMap<Username, Counters>,
}

impl CounterCache {
    /// The counters of `name`, from the cache or the database, marked used
    /// at `now_ms`; `None` if the account does not exist.
    pub(crate) async fn load(
        &mut self,
        conn: &mut SqliteConnection,
        name: &Username,
        now_ms: u64,
    ) -> Result<Option<&mut Counters>, sqlx::Error> {
        if !self.accounts.contains_key(name) {
            let row: Option<(i64, i64)> =
                sqlx::query_as("SELECT last_id, stored FROM accounts WHERE name = ?")
                    .bind(name.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((last_id, stored)) = row else {
                return Ok(None);
            };
            self.insert(name.clone(), last_id, stored, now_ms);
        }
        let Some(counters) = self.accounts.get_mut(name) else {
            return Ok(None);
        };
        counters.used_ms = counters.used_ms.max(now_ms);
        Ok(Some(counters))
    }

    /// The cached counters of `name`, if any.
    pub(crate) fn get(&self, name: &Username) -> Option<Counters> {
        self.accounts.get(name).copied()
    }

    /// The cached counters of `name`, for a change, if any.
    pub(crate) fn get_mut(&mut self, name: &Username) -> Option<&mut Counters> {
        self.accounts.get_mut(name)
    }

    /// Caches counters just written (a new account).
    pub(crate) fn insert(&mut self, name: Username, last_id: i64, stored: i64, now_ms: u64) {
        self.accounts.insert(
            name,
            Counters {
                last_id,
                stored,
                used_ms: now_ms,
            },
        );
    }

    /// Forgets one account (deleted).
    pub(crate) fn remove(&mut self, name: &Username) {
        self.accounts.remove(name);
    }

    /// Forgets everything (a transaction rolled back).
    pub(crate) fn clear(&mut self) {
        self.accounts.clear();
    }

    /// Evicts the entries unused since `before_ms`; returns how many.
    ///
    /// Only call this with no batch changes pending (the entries evicted
    /// must be what the database holds).
    pub(crate) fn evict_idle(&mut self, before_ms: u64) -> usize {
        let cached = self.accounts.len();
        self.accounts
            .retain(|_, counters| counters.used_ms >= before_ms);
        let evicted = cached - self.accounts.len();
        if evicted > 0 && self.accounts.len() < self.accounts.capacity() / 4 {
            // Give the memory back after a burst of accounts, not only the
            // entries.
            self.accounts.shrink_to_fit();
        }
        evicted
    }

    /// How many accounts are cached.
    pub(crate) fn len(&self) -> usize {
        self.accounts.len()
    }
}
