//! The chat service over gRPC.
//!
//! - [`pb`]: the generated `chat.v1` protobuf types and tonic stubs.
//! - [`status`]: the one mapping between chat error codes and gRPC statuses.
//! - [`server`]: serves a [`chat_core::Chat`] with health and reflection.
//! - [`client`]: [`GrpcClient`], implementing
//!   [`chat_core::client::ChatClient`].

pub mod client;
pub mod server;
pub mod status;

/// Generated protobuf types and tonic client/server code for `chat.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("chat.v1");

    /// The encoded file descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chat_descriptor");
}

pub use client::GrpcClient;
pub use server::{GrpcConfig, serve};
