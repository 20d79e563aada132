//! The pod VM on its machine back end: the builtin VMM inside this process, or QEMU with our
//! devices over vhost-user. `auto` picks by a calibration guest and says why.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::doctor::{self, Backend, Calibration};
use vmm::qemu::{Accel, QemuVm};
use vmm::{VmConfig, VmHandle};

use crate::config::MachineKind;
use crate::error::{Result, ShimError};

#[derive(Debug)]
pub enum Machine {
    Builtin(VmHandle),
    Qemu(QemuVm),
}

/// Where the host's calibration is kept: next to the state directory (which holds only
/// pods), e.g. `/run/kubevirt-shim.calibration`.
pub fn calibration_cache(state_dir: &Path) -> PathBuf {
    state_dir.with_extension("calibration")
}

/// A cached calibration, if it was measured since this host booted.
fn read_cached(path: &Path, boot_id: &str) -> Option<Calibration> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut f = text.split_whitespace();
    if boot_id.is_empty() || f.next()? != boot_id {
        return None;
    }
    Some(Calibration {
        instructions_per_sec: f.next()?.parse().ok()?,
        elapsed: Duration::from_nanos(f.next()?.parse().ok()?),
        // 0: the host's TSC is not reliable (see vmm::tsc).
        tsc_khz: Some(f.next()?.parse().ok()?).filter(|&k| k > 0),
    })
}

/// How fast KVM runs guest code here (and the host TSC's rate): measured by a calibration
/// guest (tens of ms) once per host boot, then read from `cache` by later pods.
fn calibration(cache: &Path) -> Result<Calibration> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    if let Some(c) = read_cached(cache, boot_id) {
        return Ok(c);
    }
    let c =
        doctor::calibrate().map_err(|e| ShimError::Vm(format!("KVM calibration guest: {e}")))?;
    if !boot_id.is_empty() {
        let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
        let line = format!(
            "{boot_id} {} {} {}\n",
            c.instructions_per_sec,
            c.elapsed.as_nanos(),
            c.tsc_khz.unwrap_or(0)
        );
        if std::fs::write(&tmp, line).is_ok() && std::fs::rename(&tmp, cache).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(c)
}

/// The back end for `kind`, with the reason.
pub fn choose(kind: MachineKind, cache: &Path) -> Result<(Backend, Accel, String)> {
    let cal = || calibration(cache);
    Ok(match kind {
        MachineKind::Builtin => (Backend::Builtin, Accel::Kvm, "configured: builtin".into()),
        MachineKind::Qemu => {
            let accel = cal()?.accel();
            (Backend::Qemu, accel, format!("configured: qemu ({accel})"))
        }
        MachineKind::Auto => {
            let c = cal()?;
            let (backend, why) = doctor::choose_backend(&c);
            (backend, c.accel(), format!("auto: {why}"))
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

    /// How the VM ended, if it does within `timeout`.
    pub fn ended_within(&mut self, timeout: Duration) -> Option<String> {
        match self {
            Machine::Builtin(h) => h.wait_timeout(timeout).map(|e| e.to_string()),
            Machine::Qemu(q) => q.wait_timeout(timeout).map(|s| format!("QEMU {s}")),
        }
    }

    /// How the VM ended, if it has (without waiting).
    pub fn ended(&mut self) -> Option<String> {
        self.ended_within(Duration::ZERO)
    }

    /// A descriptor that becomes readable when the VM has ended.
    pub fn end_fd(&self) -> Result<OwnedFd> {
        match self {
            Machine::Builtin(h) => h.end_fd(),
            Machine::Qemu(q) => q.end_fd(),
        }
        .map_err(ShimError::io("watch the VM's end"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calibration_is_measured_once_per_host_boot() {
        let dir = std::env::temp_dir().join(format!("kvcal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = calibration_cache(&dir.join("state"));
        assert_eq!(cache, dir.join("state.calibration"));
        let first = calibration(&cache).expect("calibration guest (needs /dev/kvm)");
        let again = calibration(&cache).unwrap();
        assert_eq!(first, again);
        // Another boot's (or a garbled) cache is not used.
        std::fs::write(&cache, "other-boot 1 1\n").unwrap();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert!(read_cached(&cache, boot_id.trim()).is_none());
        std::fs::write(&cache, format!("{} x 1 0\n", boot_id.trim())).unwrap();
        assert!(read_cached(&cache, boot_id.trim()).is_none());
        // One written before the TSC rate was kept is measured again.
        std::fs::write(&cache, format!("{} 1 1\n", boot_id.trim())).unwrap();
        assert!(read_cached(&cache, boot_id.trim()).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
