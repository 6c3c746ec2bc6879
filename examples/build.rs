//! Compiles `proto/greeter.proto` with protox (no system `protoc`), writes its encoded
//! descriptor set for gRPC reflection, and copies the Rust snippets of the README and of the
//! guide (`docs/*.md`) so they compile as doc tests of this crate.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/greeter.proto");
    let descriptors = protox::compile(["greeter.proto"], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("greeter_descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    // Every ```rust block of the workspace README and of the guide in docs/, and nothing
    // else, becomes a doc test.
    let mut pages = vec![PathBuf::from("../README.md")];
    println!("cargo:rerun-if-changed=../docs");
    let mut guide: Vec<PathBuf> =
        fs::read_dir("../docs")?.map(|entry| entry.map(|e| e.path())).collect::<Result<_, _>>()?;
    guide.retain(|path| path.extension().is_some_and(|ext| ext == "md"));
    guide.sort();
    pages.extend(guide);
    let mut snippets = String::new();
    for page in &pages {
        println!("cargo:rerun-if-changed={}", page.display());
        let text = fs::read_to_string(page)?;
        let mut inside = false;
        for line in text.lines() {
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
    }
    fs::write(out_dir.join("readme_snippets.md"), snippets)?;
    Ok(())
}
