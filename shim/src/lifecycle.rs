//! The shim binary's actions for containerd: `start` (one shim per pod, grouped by the CRI
//! sandbox id), `delete` (cleanup after a crashed shim) and serving the Task service.

use std::fs;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::config::ShimConfig;
use crate::events::Publisher;
use crate::server::Server;
use crate::service::{now_ns, state_dir, timestamp, TaskService, SANDBOX_ID};

/// The shim binary's entry points (`start`, `delete`, serving).
#[derive(Clone)]
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
}

#[async_trait]
impl containerd_shim::Shim for Service {
    type T = Server;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        if args.action.is_empty() {
            // Serving: the process has one thread yet (the runtime's is the main thread,
            // its blocking pool starts later). Children will start on the spawner,
            // which stays unconfined; every thread made from here on inherits the filter.
            vmm::spawn::start();
            if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Control) {
                eprintln!("containerd-shim-kubevirt-v1: {e}");
                std::process::exit(1);
            }
        }
        Service {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // Containers of one CRI pod share the shim of their sandbox.
        let spec = fs::read_to_string("config.json").unwrap_or_default();
        let grouping = serde_json::from_str::<serde_json::Value>(&spec)
            .ok()
            .and_then(|v| v["annotations"][SANDBOX_ID].as_str().map(str::to_owned))
            .unwrap_or_else(|| opts.id.clone());
        let address = containerd_shim::spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads it from the bundle when it restarts, to reconnect to us.
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// Cleans up after a shim that died: kills its VM and removes its state.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let cfg = ShimConfig::load().unwrap_or_default();
        let dir = state_dir(&cfg, &self.namespace, &self.id);
        if let Ok(pid) = fs::read_to_string(dir.join("vm.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.starts_with("qemu") {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // The qemu machine's vhost-user sockets of the dead shim.
        if let Ok(pid) = fs::read_to_string(dir.join("shim.pid")) {
            if let Ok(pid) = pid.trim().parse() {
                vmm::qemu::remove_socket_dirs(pid);
            }
        }
        // Its cgroup, once the killed VM has left it (which may take a moment: last).
        let cgroup = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let _ = fs::remove_dir_all(&dir);
        if !cgroup.trim().is_empty() {
            crate::cgroup::remove_path(cgroup.trim());
        }
        Ok(DeleteResponse {
            exit_status: 128 + 9,
            exited_at: timestamp(now_ns()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Server {
        // Ours is called from the calls' synchronous bodies and reconnects to a restarted
        // containerd (src/events.rs).
        drop(publisher);
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        Server::new(TaskService::new(
            Publisher::new(address),
            self.namespace.clone(),
            self.exit.clone(),
        ))
    }
}
