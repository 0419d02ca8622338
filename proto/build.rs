//! Compiles `proto/lockd.proto` with protox (pure Rust), so no system `protoc` is needed.
//!
//! Two passes over the same descriptors: the messages and the clients with prost's own
//! codec, then the servers alone (`extern_path` makes prost-build skip the messages it
//! already generated) with `RequestCodec`, so that a request that does not decode is the
//! caller's InvalidArgument while a client still reports an undecodable reply as INTERNAL.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["lockd.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(out.join("lockd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure()
        .build_server(false)
        .compile_fds(fds.clone())?;
    let servers = out.join("servers");
    std::fs::create_dir_all(&servers)?;
    tonic_build::configure()
        .build_client(false)
        .extern_path(".lockd.v1", "crate::v1")
        .codec_path("crate::RequestCodec")
        .out_dir(servers)
        .compile_fds(fds)?;
    Ok(())
}
