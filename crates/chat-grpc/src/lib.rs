//! The chat service over gRPC.
//!
//! - [`pb`]: the generated `chat.v1` protobuf types and tonic stubs.
//! - [`status`]: the one mapping between chat error codes and gRPC statuses.
//! - [`codec`]: prost's codec, with undecodable requests as `malformed`.
//! - [`server`]: serves a [`chat_core::Chat`] with health and reflection;
//!   the service itself is [`service`] (RPC handlers), `sessions` (the
//!   token table) and `forward` (the Subscribe stream).
//! - [`client`]: [`GrpcClient`], implementing
//!   [`chat_core::client::ChatClient`].

pub mod client;
pub mod codec;
pub mod connection;
mod forward;
pub mod server;
pub mod service;
mod sessions;
pub mod status;

/// Generated protobuf types and tonic client/server code for `chat.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("chat.v1");

    /// The encoded file descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chat_descriptor");

    /// The encoded file descriptor set of `google.rpc.ErrorInfo`, the
    /// detail every failed call carries; served by reflection so that tools
    /// can decode it.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("error_details_descriptor");
}

pub use client::GrpcClient;
pub use forward::PushStream;
pub use server::{GrpcConfig, serve};
