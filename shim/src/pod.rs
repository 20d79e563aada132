//! The pod VM: boots it with the container's disks and the vsock, connects to the agent, and
//! shuts it down cleanly (or kills it).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devices::block::BlockConfig;
use devices::vsock::VsockConfig;
use protocol::agent::{Empty, SetupSandboxRequest};
use protocol::agent_ttrpc::AgentClient;
use protocol::ttrpc::context;
use vmm::{SerialOutput, VmConfig};

use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::machine::{self, Machine};

/// Host vsock port the agent streams its log to.
const AGENT_LOG_PORT: u32 = 1025;
/// Guest CID: each VM has its own vsock device, so one number serves every pod.
const GUEST_CID: u64 = 3;

/// What a pod VM is booted with.
#[derive(Debug)]
pub struct PodSpec {
    pub id: String,
    pub dir: PathBuf,
    pub disks: Vec<BlockConfig>,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub hostname: String,
}

pub struct Pod {
    pub agent: AgentClient,
    pub vm_pid: u32,
    pub dir: PathBuf,
    machine: Mutex<Option<Machine>>,
}

pub fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// Forwards the agent's log lines into the shim's log (containerd's log).
fn forward_agent_log(uds: &Path, pod: String) -> Result<()> {
    let path = format!("{}_{AGENT_LOG_PORT}", uds.display());
    let listener = UnixListener::bind(&path).map_err(ShimError::io(format!("bind {path}")))?;
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            for line in BufReader::new(s).lines().map_while(|l| l.ok()) {
                log::info!("pod {pod}: guest: {line}");
            }
        }
    });
    Ok(())
}

/// The last `n` lines the guest wrote on its console.
fn console_tail(dir: &Path, n: usize) -> Vec<String> {
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

impl Pod {
    pub fn boot(cfg: &ShimConfig, p: PodSpec) -> Result<Pod> {
        cfg.check_guest()?;
        let uds = p.dir.join("vsock.sock");
        forward_agent_log(&uds, p.id.clone())?;
        let (backend, accel, why) = machine::choose(cfg.machine)?;
        // The guest ends the VM by resetting it. Our VMM sees the i8042 reset; on QEMU TCG
        // a 1-vCPU guest whose agent resets through the i8042 was seen spinning after
        // "Restarting system", while a triple fault always resets (-no-reboot: QEMU exits).
        let reboot = match backend {
            vmm::doctor::Backend::Builtin => "k",
            vmm::doctor::Backend::Qemu => "t",
        };
        let mut vm = VmConfig::new(&cfg.kernel);
        vm.initrd = Some(cfg.initramfs.clone());
        vm.cmdline = format!(
            "console=ttyS0 reboot={reboot} panic=-1 quiet {}",
            cfg.extra_cmdline
        )
        .trim_end()
        .to_owned();
        vm.memory_mib = p.memory_mib;
        vm.vcpus = p.vcpus;
        vm.serial_output = SerialOutput::File(p.dir.join("console.log"));
        vm.disks = p.disks;
        vm.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        });
        log::info!(
            "pod {}: machine {backend} ({why}); {} MiB, {} vCPUs",
            p.id,
            p.memory_mib,
            p.vcpus
        );
        let start = Instant::now();
        let m = Machine::start(vm, backend, accel)?;
        let vm_pid = m.pid();
        // For `delete` after a crash of this shim: the VM to kill, the sockets to remove.
        std::fs::write(p.dir.join("vm.pid"), vm_pid.to_string())
            .map_err(ShimError::io("write vm.pid"))?;
        std::fs::write(p.dir.join("shim.pid"), std::process::id().to_string())
            .map_err(ShimError::io("write shim.pid"))?;
        let agent = match protocol::connect_agent(&uds, Duration::from_secs(cfg.agent_timeout_secs))
        {
            Ok(a) => a,
            Err(e) => {
                m.stop();
                return Err(ShimError::Vm(format!(
                    "the guest agent did not answer: {e}; console tail: {:?}",
                    console_tail(&p.dir, 5)
                )));
            }
        };
        log::info!(
            "pod {}: agent ready {} ms after VM start",
            p.id,
            start.elapsed().as_millis()
        );
        let pod = Pod {
            agent,
            vm_pid,
            dir: p.dir,
            machine: Mutex::new(Some(m)),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let setup = SetupSandboxRequest {
            hostname: p.hostname,
            host_time_unix_ns: now,
            ..Default::default()
        };
        if let Err(e) = pod.agent.setup_sandbox(ctx(), &setup) {
            pod.shutdown();
            return Err(ShimError::agent("sandbox setup")(e));
        }
        Ok(pod)
    }

    /// Asks the agent to power off, then makes sure the VM is gone.
    pub fn shutdown(&self) {
        let Some(mut m) = self
            .machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        if self.agent.shutdown(ctx(), &Empty::new()).is_ok()
            && m.wait_timeout(Duration::from_secs(10))
        {
            log::info!("pod VM shut down cleanly");
        } else {
            log::warn!(
                "pod VM did not shut down by itself; stopping it; console tail: {:?}",
                console_tail(&self.dir, 8)
            );
        }
        m.stop();
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("vm_pid", &self.vm_pid)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.shutdown();
    }
}
