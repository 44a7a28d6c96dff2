//! Compiles `proto/chat/v1/chat.proto` with the pure-Rust `protox`
//! compiler (no system `protoc`), writes the descriptor set that server
//! reflection serves, and generates the tonic client and server code.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = root.join("chat/v1/chat.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([&proto], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("chat_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
