// Compiles proto/frame.proto with protox (a pure-Rust protobuf compiler), so a fresh
// machine needs no protoc.
fn main() {
    println!("cargo:rerun-if-changed=proto/frame.proto");
    println!("cargo:rerun-if-changed=proto/node.proto");
    let fds = protox::compile(["proto/frame.proto", "proto/node.proto"], ["proto"])
        .expect("compile proto/*.proto");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust for proto/*.proto");
}
