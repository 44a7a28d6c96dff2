//! The transport-agnostic chat engine.
//!
//! `chat-core` owns accounts, login state, per-user queues of undelivered
//! messages, live delivery and account listing. It does no network I/O:
//! transports (`chat-socket`, `chat-grpc`) decode requests, call a
//! [`Session`], and encode what it returns. Embedding the engine in an app
//! of your own is just as supported as serving it over a network.
//!
//! # A short tour
//!
//! - [`Chat`] is the engine: one per process, cheap to clone, shared by all
//!   transports. It sits on a [`Store`] (here [`MemoryStore`]).
//! - [`Chat::open_session`] gives a [`Session`] (one per connection: its
//!   login state and operations) and its [`Events`] (messages and notices
//!   pushed to it, on a bounded channel).
//! - Inputs are validated into [`Username`] and [`MessageBody`] on the
//!   server side, whatever the client checked.
//! - Failures are [`ChatError`]s, each with a stable [`ErrorCode`] that every
//!   transport sends unchanged.
//! - [`client::ChatClient`] is the interface every transport's client
//!   library implements.
//!
//! ```
//! use chat_core::{Chat, Event, SessionState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chat_core::ChatError> {
//! let chat = Chat::in_memory();
//! let (alice, _alice_events) = chat.open_session();
//! let (bob, mut bob_events) = chat.open_session();
//!
//! alice.create("alice", "password1").await?;
//! bob.create("bob", "password1").await?;
//! alice.send("bob", "hi bob").await?; // bob is logged in: delivered live
//!
//! match bob_events.recv().await {
//!     Some(Event::Message(m)) => assert_eq!((m.sender.as_str(), m.body.as_str()), ("alice", "hi bob")),
//!     other => panic!("unexpected {other:?}"),
//! }
//!
//! bob.logout().await?;
//! alice.send("bob", "are you there?").await?; // bob is away: queued
//! assert_eq!(bob.login("bob", "password1").await?, SessionState::LoggedIn(chat_core::Username::parse("bob")?));
//! let queued = bob.fetch(10).await?;
//! assert_eq!(queued[0].body.as_str(), "are you there?");
//!
//! alice.close().await;
//! bob.close().await;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod budgets;
pub mod client;
pub mod delivery;
mod engine;
mod error;
pub mod limits;
mod memory;
pub mod metrics;
pub mod presence;
mod store;
mod types;

pub use auth::{HashingConfig, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS, Password, ThrottleConfig};
pub use engine::{
    Chat, Cluster, Config, Event, Events, LogoutReason, PRUNE_INTERVAL, STRIPES, Session, WeakChat,
    now_ms,
};
pub use error::{ChatError, ErrorCode};
pub use limits::{
    ConnectionLimit, ConnectionSlot, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_ADDRESS, Rate,
    Refusal, address_key,
};
pub use memory::{Change, DEFAULT_QUEUE_LIMIT, Journal, MemoryStore};
pub use store::{
    Appended, Credentials, Durable, DurableWait, MAX_SEND_IDS_PER_SENDER, NewMessage,
    SEND_ID_RETENTION, SendId, Store, StoreError, send_id_horizon,
};
pub use types::{
    MAX_BODY_CHARS, MAX_USERNAME_CHARS, Message, MessageBody, MessageId, SendReceipt, SessionState,
    Username,
};
