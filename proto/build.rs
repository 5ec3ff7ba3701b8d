// Generates the tianwang.v1 types and the gRPC services from proto/*.proto, the serde
// (protobuf JSON mapping) impls through pbjson, and the file descriptor set for gRPC server
// reflection. protoc comes from the system (scripts/deps installs protobuf-compiler) or
// $PROTOC.
use std::path::PathBuf;

/// Messages whose `Debug` is hand-written (redacting) in `src/lib.rs`.
const REDACTED_DEBUG: [&str; 5] = [
    ".tianwang.v1.Hello",
    ".tianwang.v1.Auth",
    ".tianwang.v1.Position",
    ".tianwang.v1.Case",
    ".tianwang.v1.CreateCaseRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tianwang/v1/media.proto",
        "proto/tianwang/v1/console.proto",
        "proto/tianwang/v1/evidence.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("tianwang_descriptor.bin");
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .bytes(".")
        // Keeps SessionEvent (and the console's action queue) small.
        .boxed(".tianwang.v1.AlarmEvent.alarm")
        // Tokens, officers' positions and case parties: `Debug` is written by hand in
        // lib.rs so that logging any message that holds one redacts it.
        .skip_debug(REDACTED_DEBUG)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&protos, &["proto"])?;
    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".tianwang"])?;
    Ok(())
}
