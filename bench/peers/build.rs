//! Compiles ../../proto/vessel.proto for volo-grpc; pilota's parser is pure Rust.
fn main() {
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto.join("vessel.proto").display());
    volo_build::Builder::protobuf()
        .add_service(proto.join("vessel.proto"))
        .include_dirs(vec![proto])
        .filename("volo_gen.rs".into())
        .write()
        .expect("volo-build could not compile vessel.proto");
}
