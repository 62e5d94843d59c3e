//! Compiles the protos with protox (pure Rust), so building needs cargo alone and no system
//! `protoc`. The encoded descriptor set is kept for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kemon/keys/v1/keys.proto",
        "proto/kemon/keys/v1/events.proto",
        "proto/kemon/keys/v1/audit.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kemon_keys_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
