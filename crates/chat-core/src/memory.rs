//! The in-memory [`Store`]: fast, shared by nothing, gone at exit.
//!
//! Accounts sit in one ordered map behind a read-write lock, each with its
//! own mailbox mutex. Sends take the map lock only for reading, so sends to
//! different recipients run in parallel and contend only on their own
//! mailbox; create and delete take it for writing. The locks are std ones:
//! no critical section awaits, and they are held for microseconds.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use regex::Regex;

use crate::store::{
    Appended, Credentials, MAX_SEND_IDS_PER_SENDER, NewMessage, SendId, Store, StoreError,
    send_id_horizon,
};
use crate::types::{Message, MessageId, Username};

/// Queue length per recipient past which sends get `queue_full`.
pub const DEFAULT_QUEUE_LIMIT: usize = 10_000;

/// An in-memory store; see the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    accounts: RwLock<BTreeMap<Username, Arc<Mutex<Mailbox>>>>,
    queue_limit: usize,
    /// The highest id any deleted account had: a new account's ids start
    /// above it, so ids never repeat for a name (see the `Store` docs).
    /// Read and raised under the account map's write lock.
    id_floor: AtomicU64,
    /// Remembered send ids, sharded by sender so that sends from
    /// different users do not queue behind one lock.
    send_ids: Box<[Mutex<SendIds>]>,
    /// Picks a sender's shard; seeded per store, so that which names share
    /// a shard cannot be worked out in advance.
    shard_hasher: RandomState,
    /// Most send ids remembered per sender.
    send_id_bound: usize,
}

/// Lock shards for remembered send ids.
const SEND_ID_SHARDS: usize = 64;

/// What a remembered send id made, and what it was (its recipient and body
/// fingerprint, to tell a resend from a reuse).
#[derive(Debug)]
struct Remembered {
    id: MessageId,
    timestamp_ms: u64,
    recipient: Username,
    fingerprint: u32,
}

/// Remembered send ids of the senders in one shard.
#[derive(Debug, Default)]
struct SendIds {
    by_key: HashMap<(Username, SendId), Remembered>,
    /// Each sender's remembered ids, oldest first: for expiry by time and
    /// the bound per sender.
    by_sender: HashMap<Username, VecDeque<(u64, SendId)>>,
}

impl SendIds {
    /// Forgets `sender`'s send ids older than `horizon`; returns how many.
    fn expire(&mut self, sender: &Username, horizon: u64) -> usize {
        let Some(ids) = self.by_sender.get_mut(sender) else {
            return 0;
        };
        let mut pruned = 0;
        while ids.front().is_some_and(|(at, _)| *at < horizon) {
            if let Some((_, id)) = ids.pop_front() {
                self.by_key.remove(&(sender.clone(), id));
                pruned += 1;
            }
        }
        if ids.is_empty() {
            self.by_sender.remove(sender);
        }
        pruned
    }

    /// Forgets every send id past its retention; returns how many.
    fn prune(&mut self, now_ms: u64) -> usize {
        let horizon = send_id_horizon(now_ms);
        let senders: Vec<Username> = self.by_sender.keys().cloned().collect();
        let pruned = senders.iter().map(|s| self.expire(s, horizon)).sum();
        if pruned > 0 && self.by_key.len() < self.by_key.capacity() / 4 {
            // Give the memory back after a burst, not only the entries.
            self.by_key.shrink_to_fit();
            self.by_sender.shrink_to_fit();
        }
        pruned
    }

    /// Remembers a send id, forgetting the sender's oldest past `bound`.
    fn remember(&mut self, sender: &Username, send_id: SendId, what: Remembered, bound: usize) {
        let ids = self.by_sender.entry(sender.clone()).or_default();
        ids.push_back((what.timestamp_ms, send_id));
        while ids.len() > bound.max(1) {
            if let Some((_, old)) = ids.pop_front() {
                self.by_key.remove(&(sender.clone(), old));
            }
        }
        self.by_key.insert((sender.clone(), send_id), what);
    }

    /// Forgets everything `sender` sent (its account was deleted).
    fn forget(&mut self, sender: &Username) {
        for (_, id) in self.by_sender.remove(sender).unwrap_or_default() {
            self.by_key.remove(&(sender.clone(), id));
        }
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    /// The password's PHC string; `None` only for accounts created without
    /// one (none are, in this store; the type is the store contract's).
    password_hash: Option<String>,
    last_id: MessageId,
    /// Stored messages in id order, each with whether it was delivered.
    queue: VecDeque<(Message, bool)>,
    /// Set under the mailbox lock by delete, so that an append which fetched
    /// the mailbox before the delete cannot succeed into a dead account.
    deleted: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_QUEUE_LIMIT)
    }
}

impl MemoryStore {
    /// An empty store whose queues hold at most `queue_limit` messages each.
    pub fn new(queue_limit: usize) -> Self {
        Self {
            accounts: RwLock::new(BTreeMap::new()),
            queue_limit,
            id_floor: AtomicU64::new(0),
            send_ids: (0..SEND_ID_SHARDS).map(|_| Mutex::default()).collect(),
            shard_hasher: RandomState::new(),
            send_id_bound: MAX_SEND_IDS_PER_SENDER,
        }
    }

    /// This store, remembering at most `bound` send ids per sender instead
    /// of [`MAX_SEND_IDS_PER_SENDER`].
    pub fn with_send_id_bound(mut self, bound: usize) -> Self {
        self.send_id_bound = bound.max(1);
        self
    }

    fn send_id_shard(&self, sender: &Username) -> &Mutex<SendIds> {
        let hash = self.shard_hasher.hash_one(sender) as usize;
        &self.send_ids[hash % SEND_ID_SHARDS]
    }

    fn mailbox(&self, name: &Username) -> Result<Arc<Mutex<Mailbox>>, StoreError> {
        self.accounts
            .read()
            .map_err(poisoned)?
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NoSuchAccount(name.clone()))
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("memory store lock poisoned by an earlier panic".into())
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_account(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let mut accounts = self.accounts.write().map_err(poisoned)?;
        if accounts.contains_key(name) {
            return Err(StoreError::AccountExists(name.clone()));
        }
        let mailbox = Mailbox {
            password_hash: Some(password_hash.to_owned()),
            last_id: self.id_floor.load(Ordering::Acquire),
            ..Mailbox::default()
        };
        accounts.insert(name.clone(), Arc::new(Mutex::new(mailbox)));
        Ok(())
    }

    async fn credentials(&self, name: &Username) -> Result<Option<Credentials>, StoreError> {
        let Ok(mailbox) = self.mailbox(name) else {
            return Ok(None);
        };
        let mailbox = mailbox.lock().map_err(poisoned)?;
        Ok((!mailbox.deleted).then(|| Credentials {
            password_hash: mailbox.password_hash.clone(),
        }))
    }

    async fn set_password(&self, name: &Username, password_hash: &str) -> Result<(), StoreError> {
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        if mailbox.deleted {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        mailbox.password_hash = Some(password_hash.to_owned());
        Ok(())
    }

    async fn account_count(&self) -> Result<usize, StoreError> {
        Ok(self.accounts.read().map_err(poisoned)?.len())
    }

    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        Ok(self.accounts.read().map_err(poisoned)?.contains_key(name))
    }

    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        let mut accounts = self.accounts.write().map_err(poisoned)?;
        let removed = accounts.remove(name);
        if let Some(mailbox) = &removed {
            // Raised before the write lock is released, so a create of the
            // same name (which needs that lock) starts above it.
            let last_id = mailbox.lock().map_err(poisoned)?.last_id;
            self.id_floor.fetch_max(last_id, Ordering::AcqRel);
        }
        drop(accounts);
        if removed.is_some() {
            // A new account of this name is a new sender: its send ids are
            // its own.
            let mut ids = self.send_id_shard(name).lock().map_err(poisoned)?;
            ids.forget(name);
        }
        match removed {
            Some(mailbox) => {
                let mut mailbox = mailbox.lock().map_err(poisoned)?;
                mailbox.deleted = true;
                mailbox.queue.clear();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn list_accounts(
        &self,
        pattern: &Regex,
        limit: usize,
    ) -> Result<Vec<Username>, StoreError> {
        // A snapshot under the lock (reference counts only), and the
        // matching off the async workers: a list over many accounts with an
        // expensive pattern neither holds the lock that creates wait for
        // nor a thread that delivers messages.
        let names: Vec<Username> = self
            .accounts
            .read()
            .map_err(poisoned)?
            .keys()
            .cloned()
            .collect();
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .filter(|name| pattern.is_match(name.as_str()))
                .take(limit)
                .collect()
        })
        .await
        .map_err(|err| StoreError::Unavailable(format!("list task failed: {err}")))
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        // The sender's send-id shard is held across the append so that two
        // concurrent resends of one id cannot both store.
        let mut send_ids = match message.send_id {
            Some(_) => Some(
                self.send_id_shard(&message.sender)
                    .lock()
                    .map_err(poisoned)?,
            ),
            None => None,
        };
        if let (Some(ids), Some(send_id)) = (send_ids.as_mut(), message.send_id) {
            ids.expire(&message.sender, send_id_horizon(message.timestamp_ms));
            if let Some(first) = ids.by_key.get(&(message.sender.clone(), send_id)) {
                if first.recipient != message.recipient
                    || first.fingerprint != message.body.fingerprint()
                {
                    return Err(StoreError::SendIdReused(message.recipient));
                }
                let (id, timestamp_ms) = (first.id, first.timestamp_ms);
                let original = Message {
                    id,
                    sender: message.sender,
                    body: message.body,
                    timestamp_ms,
                };
                return Ok(Appended {
                    message: original,
                    duplicate: true,
                });
            }
        }
        let mailbox = self.mailbox(&message.recipient)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        if mailbox.deleted {
            return Err(StoreError::NoSuchAccount(message.recipient));
        }
        if mailbox.queue.len() >= self.queue_limit {
            return Err(StoreError::QueueFull(message.recipient));
        }
        mailbox.last_id += 1;
        let stored = Message {
            id: mailbox.last_id,
            sender: message.sender,
            body: message.body,
            timestamp_ms: message.timestamp_ms,
        };
        mailbox.queue.push_back((stored.clone(), message.delivered));
        if let (Some(ids), Some(send_id)) = (send_ids.as_mut(), message.send_id) {
            let what = Remembered {
                id: stored.id,
                timestamp_ms: stored.timestamp_ms,
                recipient: message.recipient.clone(),
                fingerprint: stored.body.fingerprint(),
            };
            ids.remember(&stored.sender, send_id, what, self.send_id_bound);
        }
        Ok(Appended {
            message: stored,
            duplicate: false,
        })
    }

    async fn take_undelivered(
        &self,
        name: &Username,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        let mut taken = Vec::new();
        for (message, delivered) in mailbox.queue.iter_mut() {
            if taken.len() == limit {
                break;
            }
            if !*delivered {
                *delivered = true;
                taken.push(message.clone());
            }
        }
        Ok(taken)
    }

    async fn unacked(&self, name: &Username) -> Result<Vec<Message>, StoreError> {
        let mailbox = self.mailbox(name)?;
        let mailbox = mailbox.lock().map_err(poisoned)?;
        Ok(mailbox
            .queue
            .iter()
            .filter(|(_, delivered)| *delivered)
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn ack(&self, name: &Username, through: MessageId) -> Result<usize, StoreError> {
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        let before = mailbox.queue.len();
        mailbox
            .queue
            .retain(|(m, delivered)| !(*delivered && m.id <= through));
        Ok(before - mailbox.queue.len())
    }

    fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    async fn prune_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for shard in &self.send_ids {
            pruned += shard.lock().map_err(poisoned)?.prune(now_ms);
        }
        Ok(pruned)
    }
}
