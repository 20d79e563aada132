//! Generates the protobuf messages and the ttrpc client and server of proto/agent.proto.

use ttrpc_codegen::{Codegen, ProtobufCustomize};

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generate the agent protocol from proto/agent.proto");
    // The generated files carry inner attributes, which `include!` refuses; `#[path]` modules
    // accept them.
    let modules = ["agent", "agent_ttrpc"]
        .iter()
        .map(|m| {
            format!(
                "#[path = {:?}]\npub mod {m};\n",
                out.join(format!("{m}.rs"))
            )
        })
        .collect::<String>();
    std::fs::write(out.join("modules.rs"), modules).expect("write OUT_DIR/modules.rs");
}
