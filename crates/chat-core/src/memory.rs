//! The in-memory [`Store`]: fast, shared by nothing, gone at exit.
//!
//! Accounts sit in one ordered map behind a read-write lock, each with its
//! own mailbox mutex. Sends take the map lock only for reading, so sends to
//! different recipients run in parallel and contend only on their own
//! mailbox; create and delete take it for writing. The locks are std ones:
//! no critical section awaits, and they are held for microseconds.
//!
//! # Journaling
//!
//! A store given a [`Journal`] hands it every change it applies, as a
//! [`Change`], under the locks that ordered the change: changes that depend
//! on each other (to one account, one sender's send ids, creates and
//! deletes) reach the journal in the order they were applied. Replaying
//! the journal's changes in that order with [`MemoryStore::apply`] rebuilds
//! the same state; [`MemoryStore::dump`] gives the changes that rebuild the
//! current state from empty (a snapshot), with no change applied meanwhile.
//! This is how a durable store keeps its data here and its journal on disk
//! (see the `chat-store-log` crate). The journal makes changes durable; the
//! store does not wait for it.
//!
//! Expired send ids are forgotten without a record: whether one is still
//! here or not changes no answer (an append checks expiry itself).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use regex::Regex;

use crate::presence::Lease;
use crate::store::{
    Appended, Credentials, MAX_SEND_IDS_PER_SENDER, NewMessage, SendId, Store, StoreError,
    send_id_horizon,
};
use crate::types::{Message, MessageId, Username};

/// Queue length per recipient past which sends get `queue_full`.
pub const DEFAULT_QUEUE_LIMIT: usize = 10_000;

/// One change to a [`MemoryStore`]'s state, as a [`Journal`] records it and
/// [`MemoryStore::apply`] replays it. The first six are what the store's
/// operations do; the last three appear only in a [`MemoryStore::dump`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An account was created, with this password hash.
    Create {
        /// The account.
        name: Username,
        /// Its argon2id PHC string (`None`: an account without a password).
        password_hash: Option<String>,
    },
    /// An account's password hash was replaced.
    Password {
        /// The account.
        name: Username,
        /// The new PHC string.
        password_hash: String,
    },
    /// An account was deleted, with its messages and its send ids.
    Delete {
        /// The account.
        name: Username,
    },
    /// A message was stored for `recipient` with the id it carries.
    Append {
        /// Who it is for.
        recipient: Username,
        /// The message, with its id and timestamp.
        message: Message,
        /// Stored as delivered (pushed live) rather than queued.
        delivered: bool,
        /// The sender's idempotency key, remembered with it.
        send_id: Option<SendId>,
    },
    /// A fetch took `name`'s queued messages with ids up to `through` (they
    /// are delivered now, awaiting an acknowledgement).
    Take {
        /// The recipient.
        name: Username,
        /// The highest id taken.
        through: MessageId,
    },
    /// `name` acknowledged its delivered messages up to `through`.
    Ack {
        /// The recipient.
        name: Username,
        /// The acknowledged id.
        through: MessageId,
    },
    /// Snapshot: the id floor (new accounts' ids start above it).
    Floor {
        /// The highest id any deleted account had.
        id: MessageId,
    },
    /// Snapshot: an account's last id (after its stored messages).
    LastId {
        /// The account.
        name: Username,
        /// The last id it gave.
        last_id: MessageId,
    },
    /// Snapshot: a remembered send id (its message may be gone).
    SendId {
        /// The sender.
        sender: Username,
        /// The sender's key.
        send_id: SendId,
        /// The message id it was given.
        id: MessageId,
        /// When it was stored.
        timestamp_ms: u64,
        /// Who it was for.
        recipient: Username,
        /// The body's fingerprint.
        fingerprint: u32,
    },
}

/// Where a journaled [`MemoryStore`] records its changes (see the module
/// docs).
pub trait Journal: Send + Sync + std::fmt::Debug + 'static {
    /// Records `change`, which was just applied. It is called under the
    /// store's locks, so it must be quick (no I/O, no waiting).
    fn record(&self, change: Change);
}

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
    /// Where changes are recorded, once set.
    journal: std::sync::OnceLock<Arc<dyn Journal>>,
    /// Held shared by every journaled change, from applying it to recording
    /// it, and exclusively by [`MemoryStore::dump`]: a dump sees no change
    /// half done. Taken before any other lock.
    gate: RwLock<()>,
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
    /// Remembering an id already remembered changes nothing (a replay may
    /// meet one twice: in a snapshot and in the log after it).
    fn remember(&mut self, sender: &Username, send_id: SendId, what: Remembered, bound: usize) {
        let key = (sender.clone(), send_id);
        if self.by_key.contains_key(&key) {
            return;
        }
        let ids = self.by_sender.entry(sender.clone()).or_default();
        ids.push_back((what.timestamp_ms, send_id));
        while ids.len() > bound.max(1) {
            if let Some((_, old)) = ids.pop_front() {
                self.by_key.remove(&(sender.clone(), old));
            }
        }
        self.by_key.insert(key, what);
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
            journal: std::sync::OnceLock::new(),
            gate: RwLock::new(()),
        }
    }

    /// Records every change from now on in `journal`; `false` (and nothing
    /// changes) if a journal was set already.
    pub fn set_journal(&self, journal: Arc<dyn Journal>) -> bool {
        self.journal.set(journal).is_ok()
    }

    fn record(&self, change: impl FnOnce() -> Change) {
        if let Some(journal) = self.journal.get() {
            journal.record(change());
        }
    }

    /// Applies a recorded change (replaying a journal), recording nothing.
    /// A change to an account that does not exist is skipped, as it was
    /// when first applied (a write racing the account's deletion).
    pub fn apply(&self, change: Change) -> Result<(), StoreError> {
        let mailbox = |name: &Username| self.mailbox(name);
        match change {
            Change::Create {
                name,
                password_hash,
            } => {
                let mut accounts = self.accounts.write().map_err(poisoned)?;
                let mailbox = Mailbox {
                    password_hash,
                    last_id: self.id_floor.load(Ordering::Acquire),
                    ..Mailbox::default()
                };
                accounts.insert(name, Arc::new(Mutex::new(mailbox)));
            }
            Change::Password {
                name,
                password_hash,
            } => {
                if let Ok(mailbox) = mailbox(&name) {
                    mailbox.lock().map_err(poisoned)?.password_hash = Some(password_hash);
                }
            }
            Change::Delete { name } => {
                let removed = self.accounts.write().map_err(poisoned)?.remove(&name);
                if let Some(mailbox) = removed {
                    let last_id = mailbox.lock().map_err(poisoned)?.last_id;
                    self.id_floor.fetch_max(last_id, Ordering::AcqRel);
                    self.send_id_shard(&name)
                        .lock()
                        .map_err(poisoned)?
                        .forget(&name);
                }
            }
            Change::Append {
                recipient,
                message,
                delivered,
                send_id,
            } => {
                if let Some(send_id) = send_id {
                    let mut ids = self
                        .send_id_shard(&message.sender)
                        .lock()
                        .map_err(poisoned)?;
                    ids.expire(&message.sender, send_id_horizon(message.timestamp_ms));
                    let what = Remembered {
                        id: message.id,
                        timestamp_ms: message.timestamp_ms,
                        recipient: recipient.clone(),
                        fingerprint: message.body.fingerprint(),
                    };
                    ids.remember(&message.sender, send_id, what, self.send_id_bound);
                }
                if let Ok(mailbox) = mailbox(&recipient) {
                    let mut mailbox = mailbox.lock().map_err(poisoned)?;
                    mailbox.last_id = mailbox.last_id.max(message.id);
                    mailbox.queue.push_back((message, delivered));
                }
            }
            Change::Take { name, through } => {
                if let Ok(mailbox) = mailbox(&name) {
                    for (message, delivered) in mailbox.lock().map_err(poisoned)?.queue.iter_mut() {
                        if message.id <= through {
                            *delivered = true;
                        }
                    }
                }
            }
            Change::Ack { name, through } => {
                if let Ok(mailbox) = mailbox(&name) {
                    mailbox
                        .lock()
                        .map_err(poisoned)?
                        .queue
                        .retain(|(m, delivered)| !(*delivered && m.id <= through));
                }
            }
            Change::Floor { id } => {
                self.id_floor.fetch_max(id, Ordering::AcqRel);
            }
            Change::LastId { name, last_id } => {
                if let Ok(mailbox) = mailbox(&name) {
                    mailbox.lock().map_err(poisoned)?.last_id = last_id;
                }
            }
            Change::SendId {
                sender,
                send_id,
                id,
                timestamp_ms,
                recipient,
                fingerprint,
            } => {
                let what = Remembered {
                    id,
                    timestamp_ms,
                    recipient,
                    fingerprint,
                };
                self.send_id_shard(&sender)
                    .lock()
                    .map_err(poisoned)?
                    .remember(&sender, send_id, what, self.send_id_bound);
            }
        }
        Ok(())
    }

    /// The changes that rebuild this store's state from empty: accounts
    /// and messages taken with no change half done, and `at_once` run
    /// before any further change can be applied (a journal switches files
    /// there, so that the dump and the new file together hold everything).
    ///
    /// Remembered send ids, which can be millions, are taken after that,
    /// one shard at a time, so that writes do not wait for them: one
    /// remembered or forgotten meanwhile is also in the changes after
    /// `at_once` (an append carries its send id, a delete forgets), and
    /// replaying a send id twice is harmless.
    pub fn dump<R>(&self, at_once: impl FnOnce() -> R) -> Result<(Vec<Change>, R), StoreError> {
        let gate = self.gate.write().map_err(poisoned)?;
        let mut changes = vec![Change::Floor {
            id: self.id_floor.load(Ordering::Acquire),
        }];
        for (name, mailbox) in self.accounts.read().map_err(poisoned)?.iter() {
            let mailbox = mailbox.lock().map_err(poisoned)?;
            changes.push(Change::Create {
                name: name.clone(),
                password_hash: mailbox.password_hash.clone(),
            });
            for (message, delivered) in &mailbox.queue {
                changes.push(Change::Append {
                    recipient: name.clone(),
                    message: message.clone(),
                    delivered: *delivered,
                    send_id: None,
                });
            }
            changes.push(Change::LastId {
                name: name.clone(),
                last_id: mailbox.last_id,
            });
        }
        let at_once = at_once();
        drop(gate);
        for shard in &self.send_ids {
            let shard = shard.lock().map_err(poisoned)?;
            for (sender, ids) in &shard.by_sender {
                for (_, send_id) in ids {
                    if let Some(what) = shard.by_key.get(&(sender.clone(), *send_id)) {
                        changes.push(Change::SendId {
                            sender: sender.clone(),
                            send_id: *send_id,
                            id: what.id,
                            timestamp_ms: what.timestamp_ms,
                            recipient: what.recipient.clone(),
                            fingerprint: what.fingerprint,
                        });
                    }
                }
            }
        }
        Ok((changes, at_once))
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

    /// Up to `limit` of `name`'s messages with ids in `(after, through]`,
    /// oldest first, now marked delivered: undelivered ones only, or (with
    /// `again`) those delivered before too. For engines of a cluster.
    fn take_range(
        &self,
        name: &Username,
        after: MessageId,
        through: MessageId,
        again: bool,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // A journal records takes as prefixes ("delivered through id N"),
        // which this is not; a journaled store serves one engine anyway.
        if self.journal.get().is_some() {
            return Err(StoreError::Unavailable(
                "a journaled store serves one engine only, not a cluster".into(),
            ));
        }
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        let mut taken = Vec::new();
        for (message, delivered) in mailbox.queue.iter_mut() {
            if taken.len() == limit {
                break;
            }
            if (again || !*delivered) && message.id > after && message.id <= through {
                *delivered = true;
                taken.push(message.clone());
            }
        }
        Ok(taken)
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
        let _gate = self.gate.read().map_err(poisoned)?;
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
        self.record(|| Change::Create {
            name: name.clone(),
            password_hash: Some(password_hash.to_owned()),
        });
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
        let _gate = self.gate.read().map_err(poisoned)?;
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        if mailbox.deleted {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        mailbox.password_hash = Some(password_hash.to_owned());
        self.record(|| Change::Password {
            name: name.clone(),
            password_hash: password_hash.to_owned(),
        });
        Ok(())
    }

    async fn account_count(&self) -> Result<usize, StoreError> {
        Ok(self.accounts.read().map_err(poisoned)?.len())
    }

    async fn account_exists(&self, name: &Username) -> Result<bool, StoreError> {
        Ok(self.accounts.read().map_err(poisoned)?.contains_key(name))
    }

    async fn delete_account(&self, name: &Username) -> Result<bool, StoreError> {
        let _gate = self.gate.read().map_err(poisoned)?;
        let mut accounts = self.accounts.write().map_err(poisoned)?;
        let removed = accounts.remove(name);
        if let Some(mailbox) = &removed {
            // Raised before the write lock is released, so a create of the
            // same name (which needs that lock) starts above it.
            let last_id = mailbox.lock().map_err(poisoned)?.last_id;
            self.id_floor.fetch_max(last_id, Ordering::AcqRel);
            self.record(|| Change::Delete { name: name.clone() });
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
        let _gate = self.gate.read().map_err(poisoned)?;
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
        self.record(|| Change::Append {
            recipient: message.recipient.clone(),
            message: stored.clone(),
            delivered: message.delivered,
            send_id: message.send_id,
        });
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
        let _gate = self.gate.read().map_err(poisoned)?;
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
        if let Some(last) = taken.last() {
            self.record(|| Change::Take {
                name: name.clone(),
                through: last.id,
            });
        }
        Ok(taken)
    }

    async fn last_id(&self, name: &Username) -> Result<MessageId, StoreError> {
        let mailbox = self.mailbox(name)?;
        let last_id = mailbox.lock().map_err(poisoned)?.last_id;
        Ok(last_id)
    }

    /// The leases of engines on a memory store live in their process
    /// ([`LocalPresence`](crate::presence::LocalPresence)), which ends one
    /// before granting the next: this store does not check `lease`.
    async fn take_undelivered_in(
        &self,
        lease: &Lease,
        after: MessageId,
        through: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.take_range(&lease.user, after, through, false, limit)
    }

    /// Not fenced, as [`MemoryStore::take_undelivered_in`] is not.
    async fn take_after(
        &self,
        lease: &Lease,
        after: MessageId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.take_range(&lease.user, after, MessageId::MAX, true, limit)
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
        let _gate = self.gate.read().map_err(poisoned)?;
        let mailbox = self.mailbox(name)?;
        let mut mailbox = mailbox.lock().map_err(poisoned)?;
        let before = mailbox.queue.len();
        mailbox
            .queue
            .retain(|(m, delivered)| !(*delivered && m.id <= through));
        let removed = before - mailbox.queue.len();
        if removed > 0 {
            self.record(|| Change::Ack {
                name: name.clone(),
                through,
            });
        }
        Ok(removed)
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
