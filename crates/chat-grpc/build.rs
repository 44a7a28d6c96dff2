//! Compiles `proto/chat/v1/chat.proto` with the pure-Rust `protox`
//! compiler (no system `protoc`), writes the descriptor sets that server
//! reflection serves (the service's, and `google.rpc.ErrorInfo`'s so that
//! tools can decode error details), and generates the tonic client and
//! server code.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let details = protox::compile([root.join("google/rpc/error_details.proto")], [&root])?;
    std::fs::write(
        out.join("error_details_descriptor.bin"),
        details.encode_to_vec(),
    )?;
    let fds = protox::compile([root.join("chat/v1/chat.proto")], [&root])?;
    std::fs::write(out.join("chat_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::ChatCodec")
        .compile_fds(fds)?;
    Ok(())
}
