//! Generates the protobuf messages and the async ttrpc service from protos/agent.proto with
//! the pure-Rust parser (no protoc needed).
use std::path::{Path, PathBuf};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let gen = out.join("gen");
    std::fs::create_dir_all(&gen).expect("create OUT_DIR/gen");
    println!("cargo:rerun-if-changed=protos/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&gen)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent protocol from protos/agent.proto");
    // Generated files start with inner attributes and doc comments, which `include!` cannot
    // take; keep everything else as generated.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&gen.join(name), &out.join(name));
    }
}

fn strip_inner_attributes(from: &Path, to: &Path) {
    let text =
        std::fs::read_to_string(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .collect();
    std::fs::write(to, kept.join("\n")).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
}
