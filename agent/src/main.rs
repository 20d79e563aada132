//! kubevirt-agent: PID 1 of a pod's VM. Mounts the basics, reaps orphans, and serves the shim
//! over ttrpc on vsock; the shim drives containers through it (see protocol/proto/agent.proto).

mod blockdev;
mod cgroup;
mod container;
mod error;
mod forward;
mod init;
mod logger;
mod network;
mod podinit;
mod ports;
mod reaper;
mod reexec;
mod resources;
mod runtime_helper;
mod sandbox;
mod service;
mod spec;
mod stdio;
mod storage;

use std::sync::Arc;

use protocol::ttrpc::Server;

/// Syncs disks and resets the VM: the VMMs treat a guest reset as a clean exit, and without
/// ACPI a power-off would only halt the CPUs.
pub fn power_off() -> ! {
    nix::unistd::sync();
    storage::unmount_volumes();
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::park();
    }
}

fn serve() -> Result<(), String> {
    init::leave_initramfs().map_err(|e| format!("leaving the initramfs: {e}"))?;
    init::mount_basics().map_err(|e| format!("mounting the basics: {e}"))?;
    let level = init::cmdline_option("log")
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    log::set_max_level(level);
    logger::init_tracing(level);
    logger::connect_vsock();
    if let Err(e) = network::loopback_up() {
        log::warn!("{e}");
    }
    let exits = reaper::spawn().map_err(|e| format!("starting the reaper: {e}"))?;
    let oom = cgroup::OomWatcher::spawn().map_err(|e| e.to_string())?;
    let containers = Arc::new(container::Containers::new(exits, oom.clone()));
    let service = service::AgentService {
        containers,
        oom,
        ports: Arc::default(),
        ready_after_boot_ns: init::since_boot_ns(),
    };
    // Before the ttrpc service: once the shim hears of a port, it may forward to it.
    forward::spawn().map_err(|e| e.to_string())?;
    let addr = format!("vsock://-1:{}", protocol::AGENT_PORT);
    let mut server = Server::new()
        .bind(&addr)
        .map_err(|e| format!("binding {addr}: {e}"))?
        .register_service(protocol::agent_ttrpc::create_agent(Arc::new(service)))
        // Stream reads and waits block a worker each; several per container.
        .set_thread_count_max(512);
    server.start().map_err(|e| format!("serving {addr}: {e}"))?;
    log::info!(
        "ready on {addr} after {} ms since boot",
        init::since_boot_ns() / 1_000_000
    );
    loop {
        std::thread::park();
    }
}

fn main() {
    // Rust starts us with SIGPIPE ignored, and containers (which the runtime helper starts)
    // would inherit that through fork and exec: a `yes | head` pipeline would never end.
    // PID 1 never dies of a signal it has no handler for, so the default costs the agent
    // nothing.
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    let sigpipe = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    // The same binary is the pod's shared PID namespace's init (see `podinit`) and the
    // helper that runs the container runtime (see `runtime_helper`).
    let argv0 = std::env::args_os().next();
    if argv0.as_ref().is_some_and(|a| a == podinit::NAME) {
        podinit::serve();
    }
    if argv0.as_ref().is_some_and(|a| a == runtime_helper::NAME) {
        runtime_helper::serve();
    }
    logger::init(log::LevelFilter::Info);
    if nix::unistd::getpid().as_raw() != 1 {
        eprintln!("kubevirt-agent is the guest's init: it must run as PID 1 inside the pod VM");
        std::process::exit(1);
    }
    if let Err(e) = sigpipe {
        log::warn!("cannot restore SIGPIPE's default: {e}");
    }
    if let Err(e) = serve() {
        log::error!("{e}; shutting the VM down");
        power_off();
    }
}
