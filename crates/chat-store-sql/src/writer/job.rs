//! What the store asks of the writer: one [`Job`] variant per write, each
//! carrying the reply channel of its own result type, so that answering a
//! write with the wrong kind of result does not compile.

use chat_core::{Appended, Message, MessageId, NewMessage, StoreError, Username};
use tokio::sync::oneshot;

/// The caller's end of a write: where its result goes.
pub(crate) type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

/// One write: its arguments, the caller's reply channel, and the result
/// once it has been applied.
///
/// The result is held, not sent, until the transaction that contains the
/// write has committed: nothing is acknowledged before it is on disk. If
/// the transaction rolls back, the held result is dropped and the write is
/// applied again or failed.
pub(crate) struct Call<A, T> {
    /// What to do.
    pub(crate) args: A,
    reply: oneshot::Sender<Result<T, StoreError>>,
    result: Option<Result<T, StoreError>>,
}

impl<A, T> Call<A, T> {
    /// A write and the receiver its result will arrive on.
    pub(crate) fn new(args: A) -> (Self, Answer<T>) {
        let (reply, answer) = oneshot::channel();
        let call = Self {
            args,
            reply,
            result: None,
        };
        (call, answer)
    }

    /// Records the result, to be sent after the commit.
    pub(crate) fn set(&mut self, result: Result<T, StoreError>) {
        self.result = Some(result);
    }

    /// Drops a recorded result (its transaction rolled back).
    fn forget(&mut self) {
        self.result = None;
    }

    /// Sends the recorded result; the caller may have stopped waiting.
    fn answer(self) {
        let result = self.result.unwrap_or_else(|| {
            // Every job of a committed batch has a result; if one had not,
            // failing it is the honest answer (its effect, if any, is
            // committed but unknown to the caller, as after a lost reply).
            Err(StoreError::Unavailable(
                "internal: a write was committed without a result".into(),
            ))
        });
        let _ = self.reply.send(result);
    }

    /// Fails the write: nothing of it is stored.
    fn fail(self, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

/// A fetch: up to `limit` queued messages for `name`.
pub(crate) struct Take {
    /// The recipient.
    pub(crate) name: Username,
    /// Most messages to hand out.
    pub(crate) limit: usize,
}

/// A cumulative acknowledgement by `name` through message `through`.
pub(crate) struct Ack {
    /// The recipient acknowledging.
    pub(crate) name: Username,
    /// The last message acknowledged.
    pub(crate) through: MessageId,
}

/// A new account: its name and the hash of its password.
///
/// No `Debug`: the hash must not end up in a log line.
pub(crate) struct NewAccount {
    /// The account.
    pub(crate) name: Username,
    /// The password's argon2id PHC string.
    pub(crate) password_hash: String,
}

/// A new password hash for an existing account.
///
/// No `Debug`: the hash must not end up in a log line.
pub(crate) struct SetPassword {
    /// The account.
    pub(crate) name: Username,
    /// The new password's argon2id PHC string.
    pub(crate) password_hash: String,
}

/// A write for the writer task.
pub(crate) enum Job {
    /// [`chat_core::Store::create_account`].
    Create(Call<NewAccount, ()>),
    /// [`chat_core::Store::set_password`].
    SetPassword(Call<SetPassword, ()>),
    /// [`chat_core::Store::delete_account`].
    Delete(Call<Username, bool>),
    /// [`chat_core::Store::append`].
    Append(Call<NewMessage, Appended>),
    /// [`chat_core::Store::take_undelivered`].
    Take(Call<Take, Vec<Message>>),
    /// [`chat_core::Store::ack`].
    Ack(Call<Ack, usize>),
    /// [`chat_core::Store::prune_expired`], with the time to prune by (ms
    /// since the epoch); also what the writer's own timer runs.
    Prune(Call<u64, usize>),
    /// Makes the writer task panic: the only way to test its supervision,
    /// since nothing a caller can do makes it fail on its own (see
    /// `SqliteStore::crash_writer_for_tests`).
    Crash,
}

impl Job {
    /// Drops the recorded result (the transaction rolled back).
    pub(crate) fn forget(&mut self) {
        match self {
            Job::Create(call) => call.forget(),
            Job::SetPassword(call) => call.forget(),
            Job::Delete(call) => call.forget(),
            Job::Append(call) => call.forget(),
            Job::Take(call) => call.forget(),
            Job::Ack(call) => call.forget(),
            Job::Prune(call) => call.forget(),
            Job::Crash => {}
        }
    }

    /// Sends the recorded result (the transaction committed).
    pub(crate) fn answer(self) {
        match self {
            Job::Create(call) => call.answer(),
            Job::SetPassword(call) => call.answer(),
            Job::Delete(call) => call.answer(),
            Job::Append(call) => call.answer(),
            Job::Take(call) => call.answer(),
            Job::Ack(call) => call.answer(),
            Job::Prune(call) => call.answer(),
            Job::Crash => {}
        }
    }

    /// Fails the write with `err`.
    pub(crate) fn fail(self, err: StoreError) {
        match self {
            Job::Create(call) => call.fail(err),
            Job::SetPassword(call) => call.fail(err),
            Job::Delete(call) => call.fail(err),
            Job::Append(call) => call.fail(err),
            Job::Take(call) => call.fail(err),
            Job::Ack(call) => call.fail(err),
            Job::Prune(call) => call.fail(err),
            Job::Crash => {}
        }
    }
}
