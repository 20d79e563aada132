//! The pod VM on its machine back end: the builtin VMM inside this process, or QEMU with our
//! devices over vhost-user. `auto` picks by a calibration guest and says why.

use std::time::Duration;

use vmm::doctor::{self, Backend};
use vmm::qemu::{Accel, QemuVm};
use vmm::{VmConfig, VmHandle};

use crate::config::MachineKind;
use crate::error::{Result, ShimError};

#[derive(Debug)]
pub enum Machine {
    Builtin(VmHandle),
    Qemu(QemuVm),
}

/// The back end for `kind`, with the reason.
pub fn choose(kind: MachineKind) -> Result<(Backend, Accel, String)> {
    let cal =
        || doctor::calibrate().map_err(|e| ShimError::Vm(format!("KVM calibration guest: {e}")));
    Ok(match kind {
        MachineKind::Builtin => (Backend::Builtin, Accel::Kvm, "configured: builtin".into()),
        MachineKind::Qemu => {
            let native = cal()?.native();
            let accel = if native { Accel::Kvm } else { Accel::Tcg };
            (
                Backend::Qemu,
                accel,
                format!("configured: qemu ({accel:?})"),
            )
        }
        MachineKind::Auto => {
            let c = cal()?;
            let (backend, why) = doctor::choose_backend(&c);
            let accel = if c.native() { Accel::Kvm } else { Accel::Tcg };
            (backend, accel, format!("auto: {why}"))
        }
    })
}

impl Machine {
    pub fn start(cfg: VmConfig, backend: Backend, accel: Accel) -> Result<Machine> {
        match backend {
            Backend::Builtin => {
                let vm = vmm::build_microvm(cfg).map_err(|e| ShimError::Vm(e.to_string()))?;
                Ok(Machine::Builtin(
                    vm.start().map_err(|e| ShimError::Vm(e.to_string()))?,
                ))
            }
            Backend::Qemu => Ok(Machine::Qemu(
                QemuVm::start(cfg, accel).map_err(|e| ShimError::Vm(e.to_string()))?,
            )),
        }
    }

    /// The process that runs the guest (this one for the builtin VMM).
    pub fn pid(&self) -> u32 {
        match self {
            Machine::Builtin(_) => std::process::id(),
            Machine::Qemu(q) => q.pid(),
        }
    }

    /// The device models' counters.
    pub fn counters(&self) -> vmm::builder::DeviceCounters {
        match self {
            Machine::Builtin(h) => h.counters().clone(),
            Machine::Qemu(q) => q.counters().clone(),
        }
    }

    /// Each vCPU's VM exits (live counters), where this process runs the vCPUs.
    pub fn exit_counters(&self) -> Vec<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        match self {
            Machine::Builtin(h) => h.exit_counters(),
            Machine::Qemu(_) => Vec::new(),
        }
    }

    /// Waits up to `timeout` for the guest to end by itself (after the agent's shutdown).
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        match self {
            Machine::Builtin(h) => h.wait_timeout(timeout).is_some(),
            Machine::Qemu(q) => q.wait_timeout(timeout).is_some(),
        }
    }

    /// Ends the VM now (after a clean shutdown this only reaps it).
    pub fn stop(self) {
        match self {
            Machine::Builtin(h) => {
                h.stop();
                h.wait();
            }
            Machine::Qemu(q) => {
                q.kill();
            }
        }
    }
}
