//! containerd-shim-kubevirt-v1: containerd's runtime `io.containerd.kubevirt.v1`. One shim and
//! one microVM per pod; the guest agent runs the containers (see ../shared/DESIGN.md).

mod affinity;
mod cgroup;
mod config;
mod console;
mod error;
mod events;
mod exporter;
mod filesync;
mod lifecycle;
mod machine;
mod metrics;
mod mounts;
mod netlink;
mod network;
mod phases;
mod pidns;
mod pod;
mod portfwd;
mod rates;
mod rootfs;
mod rpc;
mod scratch;
mod service;
mod stdin;
mod stdio;
mod task;

fn main() {
    // `containerd-shim-kubevirt-v1 metrics`: the node's exporter of every pod VM's metrics.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("metrics") {
        std::process::exit(exporter::main(&args[2..]));
    }
    // The shim reaps only what it waits for itself (QEMU, mkfs): the crate's reaper would
    // take their exit statuses.
    let config = containerd_shim::Config {
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<lifecycle::Service>("io.containerd.kubevirt.v1", Some(config));
}
