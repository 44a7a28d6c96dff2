//! Group commit for appends: the appends that arrive while others are
//! being stored go to the database together, in one statement (one round
//! trip, one commit), as the log store shares one `fdatasync` among the
//! appends that arrive while another is syncing.
//!
//! A few workers take turns at the queue; each takes what is waiting (up to
//! [`MAX_BATCH`]) and stores it with [`PgStore::append_many`]. What that
//! statement cannot decide alone (a recipient missing, full, or with more
//! of the batch's messages than room; a send id seen before; a conflict
//! with another process) it leaves unassigned, having changed nothing for
//! it, and the worker appends those one at a time on the careful path. A
//! sender's appends keep their order: the engine does not stage the next
//! before the previous one has its id.

use std::sync::Arc;

use chat_core::{Appended, NewMessage, StoreError};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::PgStore;

/// Most appends in one statement.
pub(crate) const MAX_BATCH: usize = 256;

/// Batches running at once (each holds one pooled connection).
const WORKERS: usize = 4;

/// An append waiting for its batch, and where its answer goes.
pub(crate) struct Pending {
    pub(crate) message: NewMessage,
    pub(crate) reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The queue of appends; its workers stop when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Appender {
    queue: mpsc::Sender<Pending>,
}

impl Appender {
    /// Starts the workers on `store` (a handle without an appender: they
    /// store directly).
    pub(crate) fn start(store: PgStore) -> Self {
        let (queue, rx) = mpsc::channel(MAX_BATCH * WORKERS * 4);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WORKERS {
            tokio::spawn(work(store.clone(), Arc::clone(&rx)));
        }
        Self { queue }
    }

    /// Appends `message` with the next batch.
    pub(crate) async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { message, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the PostgreSQL appender stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the PostgreSQL appender stopped".into()))?
    }
}

async fn work(store: PgStore, queue: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            batch
        };
        store.append_batch(batch).await;
    }
}
