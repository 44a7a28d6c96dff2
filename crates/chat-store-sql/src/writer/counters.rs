//! The writer's caches of per-account counters: [`CounterCache`] (last id
//! given out, messages stored, per recipient) and [`SendIdCounts`] (send
//! ids remembered, per sender), so that an append costs no statement of its
//! own.
//!
//! The writer is the only connection that writes, so an entry cannot go
//! stale while it is cached; it must be dropped whenever a transaction that
//! changed it rolls back (the writer then clears both caches). Entries of
//! accounts idle for a while are evicted by the writer's prune, so the
//! caches hold the active accounts rather than every account ever written.
//! A missing entry is never wrong: it is read from the database again when
//! it is next needed.

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

/// How many send ids the database remembers for each cached sender (its
/// rows in `send_ids`), as committed plus the current batch's changes.
///
/// A sender need not be an account (the store takes any sender name), so
/// this is kept apart from [`CounterCache`]. Entries are loaded in bulk by
/// the batch's first query (one `COUNT` per sender not cached, in the same
/// round trip as the send-id lookup), changed by the batch's new send ids
/// (at its commit), the prune and account deletion, and dropped when
/// unsure.
#[derive(Default)]
pub(crate) struct SendIdCounts {
    senders: HashMap<Username, SenderCount>,
}

/// One sender's entry in [`SendIdCounts`].
#[derive(Clone, Copy, Debug)]
struct SenderCount {
    /// Rows in `send_ids` for the sender.
    remembered: i64,
    /// When a batch last used the entry, ms since the epoch.
    used_ms: u64,
}

impl SendIdCounts {
    /// Whether the count of `sender` is cached.
    pub(crate) fn contains(&self, sender: &Username) -> bool {
        self.senders.contains_key(sender)
    }

    /// Caches the count of `sender` just read from the database.
    pub(crate) fn insert(&mut self, sender: Username, remembered: i64, now_ms: u64) {
        self.senders.insert(
            sender,
            SenderCount {
                remembered,
                used_ms: now_ms,
            },
        );
    }

    /// The cached count of `sender`, if any.
    pub(crate) fn get(&self, sender: &Username) -> Option<i64> {
        self.senders.get(sender).map(|entry| entry.remembered)
    }

    /// Adds `delta` to the cached count of `sender`, marking it used at
    /// `now_ms`; nothing if it is not cached (it is read again when
    /// needed, rows and all).
    pub(crate) fn add(&mut self, sender: &Username, delta: i64, now_ms: u64) {
        if let Some(entry) = self.senders.get_mut(sender) {
            entry.remembered += delta;
            entry.used_ms = entry.used_ms.max(now_ms);
        }
    }

    /// Sets the cached count of `sender`, if cached (its oldest were
    /// deleted down to `remembered`).
    pub(crate) fn set(&mut self, sender: &Username, remembered: i64) {
        if let Some(entry) = self.senders.get_mut(sender) {
            entry.remembered = remembered;
        }
    }

    /// Subtracts `delta` from the cached count of `sender`, if cached,
    /// without marking it used (the prune's deletions).
    pub(crate) fn forget(&mut self, sender: &Username, delta: i64) {
        if let Some(entry) = self.senders.get_mut(sender) {
            entry.remembered -= delta;
        }
    }

    /// Forgets one sender's entry (its rows were deleted).
    pub(crate) fn remove(&mut self, sender: &Username) {
        self.senders.remove(sender);
    }

    /// Forgets everything (a transaction rolled back).
    pub(crate) fn clear(&mut self) {
        self.senders.clear();
    }

    /// Whether nothing is cached.
    pub(crate) fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Evicts the entries unused since `before_ms`; returns how many.
    pub(crate) fn evict_idle(&mut self, before_ms: u64) -> usize {
        let cached = self.senders.len();
        self.senders.retain(|_, entry| entry.used_ms >= before_ms);
        let evicted = cached - self.senders.len();
        if evicted > 0 && self.senders.len() < self.senders.capacity() / 4 {
            self.senders.shrink_to_fit();
        }
        evicted
    }

    /// How many senders are cached.
    pub(crate) fn len(&self) -> usize {
        self.senders.len()
    }
}
