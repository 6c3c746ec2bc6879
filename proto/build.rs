//! Compiles `*.proto` with protox (a pure-Rust protobuf compiler), so no system `protoc` is
//! needed, and lists the methods whose `idempotency_level` says a retry is safe.

use std::{env, fs, path::PathBuf};

use prost::Message;
use prost_types::method_options::IdempotencyLevel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["vessel.proto", "consignment.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;

    let mut idempotent = Vec::new();
    for file in &descriptors.file {
        for service in &file.service {
            for method in &service.method {
                let level = method.options.as_ref().map(|o| o.idempotency_level()).unwrap_or_default();
                if matches!(level, IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent) {
                    idempotent.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    let list: Vec<String> = idempotent.iter().map(|path| format!("    {path:?},")).collect();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("idempotent_methods.rs"), format!("&[\n{}\n]", list.join("\n")))?;
    fs::write(out_dir.join("descriptors.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute(".", "#[serde(default, deny_unknown_fields)]")
        .compile_fds(descriptors)?;
    Ok(())
}
