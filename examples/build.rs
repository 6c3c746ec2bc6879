//! Compiles `proto/greeter.proto` with protox (no system `protoc`), writes its encoded
//! descriptor set for gRPC reflection, and copies the README's Rust snippets so they compile
//! as doc tests of this crate.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/greeter.proto");
    let descriptors = protox::compile(["greeter.proto"], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("greeter_descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    // Every ```rust block of the workspace README, and nothing else, becomes a doc test.
    println!("cargo:rerun-if-changed=../README.md");
    let readme = fs::read_to_string("../README.md")?;
    let mut snippets = String::new();
    let mut inside = false;
    for line in readme.lines() {
        if !inside && line.starts_with("```rust") {
            inside = true;
            snippets.push_str(line);
            snippets.push('\n');
        } else if inside {
            snippets.push_str(line);
            snippets.push('\n');
            if line.starts_with("```") {
                inside = false;
                snippets.push('\n');
            }
        }
    }
    fs::write(out_dir.join("readme_snippets.md"), snippets)?;
    Ok(())
}
