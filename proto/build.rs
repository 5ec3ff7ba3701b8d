// Generates the tianwang.v1 types (and, later, gRPC services) from proto/*.proto.
// protoc comes from the system (scripts/deps installs protobuf-compiler) or $PROTOC.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tianwang/v1/media.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
