//! Generates the protobuf messages and the ttrpc client and server of proto/agent.proto, the
//! async client, and the blocking facade over it (src/blocking.rs) with one method per rpc.

use std::fmt::Write as _;
use std::path::Path;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTO: &str = "proto/agent.proto";

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed={PROTO}");
    generate(&out, Customize::default());
    // Only its agent_ttrpc.rs is used; it names the messages above through `super::agent`.
    let async_out = out.join("async");
    std::fs::create_dir_all(&async_out).expect("create OUT_DIR/async");
    generate(
        &async_out,
        Customize {
            async_client: true,
            ..Default::default()
        },
    );
    // The generated files carry inner attributes, which `include!` refuses; `#[path]` modules
    // accept them.
    let mut modules = String::new();
    for (m, file, cfg) in [
        ("agent", out.join("agent.rs"), ""),
        ("agent_ttrpc", out.join("agent_ttrpc.rs"), ""),
        (
            "agent_ttrpc_async",
            async_out.join("agent_ttrpc.rs"),
            "#[cfg(feature = \"client\")]\n",
        ),
    ] {
        let _ = writeln!(modules, "{cfg}#[path = {file:?}]\npub mod {m};");
    }
    std::fs::write(out.join("modules.rs"), modules).expect("write OUT_DIR/modules.rs");
    let proto = std::fs::read_to_string(PROTO).expect("read proto/agent.proto");
    std::fs::write(out.join("blocking_methods.rs"), blocking_methods(&proto))
        .expect("write OUT_DIR/blocking_methods.rs");
}

fn generate(out: &Path, customize: Customize) {
    Codegen::new()
        .out_dir(out)
        .inputs([PROTO])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(customize)
        .run()
        .expect("generate the agent protocol from proto/agent.proto");
}

/// `impl AgentClient` of src/blocking.rs: each `rpc Name(Req) returns (Resp);` of the proto
/// becomes `fn name(&self, ctx, &Req) -> ttrpc::Result<Resp>`, the sync client's signature.
fn blocking_methods(proto: &str) -> String {
    let mut s = String::from("impl AgentClient {\n");
    for line in proto.lines() {
        let Some(rpc) = line.trim().strip_prefix("rpc ") else {
            continue;
        };
        let words: Vec<&str> = rpc
            .split(|c: char| c == '(' || c == ')' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect();
        let [name, req, "returns", resp, ..] = words[..] else {
            panic!("{PROTO}: cannot read the rpc line {line:?}");
        };
        let method = snake_case(name);
        let _ = writeln!(
            s,
            "    /// `{name}`: blocks until the agent answers.\n    \
             pub fn {method}(&self, ctx: ttrpc::context::Context, req: &crate::agent::{req}) \
             -> ttrpc::Result<crate::agent::{resp}> {{\n        \
             block_on(self.client.{method}(ctx, req))\n    }}"
        );
    }
    s.push_str("}\n");
    s
}

fn snake_case(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}
