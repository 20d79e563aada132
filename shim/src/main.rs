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
mod server;
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
    // containerd's connections are served on this thread; calls that block run on a pool
    // of threads that leave when idle (src/server.rs).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_CALL_THREADS)
        .thread_keep_alive(CALL_THREAD_IDLE)
        // Tests and the bench count threads by this name (tests::threads::SHIM_CALL).
        .thread_name("shim-call")
        .build();
    match runtime {
        Ok(rt) => rt.block_on(containerd_shim::run::<lifecycle::Service>(
            "io.containerd.kubevirt.v1",
            Some(config),
        )),
        Err(e) => {
            eprintln!("containerd-shim-kubevirt-v1: cannot start the RPC runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Calls in progress at once; more wait for a thread. A pod's calls come a few at a time
/// (Waits, the long ones, take no thread).
const MAX_CALL_THREADS: usize = 32;

/// How long a call's thread waits for the next call before it leaves.
const CALL_THREAD_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
