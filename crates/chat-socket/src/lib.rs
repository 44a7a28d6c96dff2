//! The compact binary chat protocol over TCP.
//!
//! - [`frame`]: the wire messages ([`ClientFrame`], [`ServerFrame`]) and
//!   their byte-exact encoding, specified in `docs/PROTOCOL.md`.
//! - [`codec`]: length-delimited framing for `tokio_util::codec`, with the
//!   frame size limit enforced before allocation.
//! - [`server`]: serves a [`chat_core::Chat`] on a TCP listener.
//! - [`client`]: [`SocketClient`], an async client implementing
//!   [`chat_core::client::ChatClient`].

pub mod client;
pub mod codec;
pub mod frame;
pub mod server;

pub use client::SocketClient;
pub use frame::{ClientFrame, FrameError, PROTOCOL_VERSION, ServerFrame};
pub use server::{ServerConfig, serve};
