//! Compiles `echo.proto` with protox (no system `protoc`) and tonic-prost-build.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=echo.proto");
    let descriptors = protox::compile(["echo.proto"], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("descriptors.bin"), descriptors.encode_to_vec())?;
    // Default stubs answer UNIMPLEMENTED, so a test server implements only what it needs.
    tonic_prost_build::configure().generate_default_stubs(true).compile_fds(descriptors)?;
    Ok(())
}
