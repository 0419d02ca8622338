//! Compiles `proto/lockd.proto` with protox (pure Rust), so no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["lockd.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(out.join("lockd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure().compile_fds(fds)?;
    Ok(())
}
