//! The shim's configuration file, `/etc/kubevirt-shim/config.toml` (or the path in
//! `KUBEVIRT_SHIM_CONFIG`). Every key is optional; unknown keys are refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, ShimError};

pub const DEFAULT_PATH: &str = "/etc/kubevirt-shim/config.toml";
pub const PATH_ENV: &str = "KUBEVIRT_SHIM_CONFIG";

/// Which machine runs the pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineKind {
    /// Builtin where KVM runs guests natively, else qemu; the choice and why are logged.
    Auto,
    /// The vmm crate inside the shim (KVM).
    Builtin,
    /// QEMU microvm with our devices over vhost-user.
    Qemu,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// Guest kernel, an ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as /init.
    pub initramfs: PathBuf,
    /// `auto`, `builtin` or `qemu`.
    pub machine: MachineKind,
    /// vCPUs of a pod VM without CPU limits.
    pub default_vcpus: u8,
    /// Guest memory (MiB) of a pod VM without memory limits.
    pub default_memory_mib: u64,
    /// What the VM costs the host beyond guest memory (MiB): the VMM, its devices and page
    /// tables. A pod with a memory limit gets a guest of its cgroup's limit minus this; set
    /// the RuntimeClass's `overhead.podFixed.memory` to the same amount.
    pub vm_overhead_mib: u64,
    /// Per-pod state: sockets, scratch disks, the console log.
    pub state_dir: PathBuf,
    /// EROFS images of container image layer chains, shared by all pods.
    pub image_cache: PathBuf,
    /// Size of the pod's sparse scratch disk, which holds every container's writable layer
    /// (MiB).
    pub scratch_mib: u64,
    /// Disk slots of a pod VM for container images (virtio-mmio cannot hot-plug, so images
    /// of containers created after boot go into these); containers of one image share one.
    pub disk_slots: u8,
    /// Capacity of each slot (GiB; sparse, costs nothing): the largest image it can take.
    pub slot_gib: u64,
    /// How long the guest may take from VM start to an answering agent (seconds).
    pub agent_timeout_secs: u64,
    /// Appended to the guest kernel command line (e.g. `agent.log=debug`).
    pub extra_cmdline: String,
    /// Cap of the guest console log (KiB): past it the log starts anew, keeping the previous
    /// one, so a guest flooding its console uses at most twice this on disk.
    pub console_log_kib: u64,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            kernel: "/usr/share/kubevirt-shim/vmlinux".into(),
            initramfs: "/usr/share/kubevirt-shim/initramfs.img".into(),
            machine: MachineKind::Auto,
            default_vcpus: 1,
            default_memory_mib: 256,
            vm_overhead_mib: 160,
            state_dir: "/run/kubevirt-shim".into(),
            image_cache: "/var/lib/kubevirt-shim/images".into(),
            scratch_mib: 1024,
            disk_slots: 4,
            slot_gib: 64,
            agent_timeout_secs: 60,
            extra_cmdline: String::new(),
            console_log_kib: 1024,
        }
    }
}

impl ShimConfig {
    pub fn parse(text: &str, origin: &Path) -> Result<ShimConfig> {
        let c: ShimConfig = toml::from_str(text).map_err(|e| {
            ShimError::invalid(
                format!("shim config {}", origin.display()),
                e.message().to_owned(),
            )
        })?;
        if c.default_vcpus == 0
            || c.default_memory_mib < 64
            || c.scratch_mib == 0
            || c.disk_slots == 0
            || c.slot_gib == 0
            || c.console_log_kib == 0
        {
            return Err(ShimError::invalid(
                format!("shim config {}", origin.display()),
                "default_vcpus, scratch_mib, disk_slots, slot_gib and console_log_kib must be at least 1, default_memory_mib at least 64",
            ));
        }
        Ok(c)
    }

    /// Reads the configuration; a missing file means the defaults.
    pub fn load() -> Result<ShimConfig> {
        let path = std::env::var_os(PATH_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_PATH.into());
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ShimConfig::default()),
            Err(e) => Err(ShimError::io(format!(
                "read shim config {}",
                path.display()
            ))(e)),
        }
    }

    /// Fails clearly when the guest kernel or initramfs is missing.
    pub fn check_guest(&self) -> Result<()> {
        for (what, p) in [
            ("guest kernel", &self.kernel),
            ("guest initramfs", &self.initramfs),
        ] {
            if !p.is_file() {
                return Err(ShimError::invalid(
                    what,
                    format!(
                        "{} does not exist (set it in {DEFAULT_PATH} or ${PATH_ENV})",
                        p.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = ShimConfig::parse(
            "machine = \"qemu\"\ndefault_memory_mib = 512\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.machine, MachineKind::Qemu);
        assert_eq!(c.default_memory_mib, 512);
        assert_eq!(c.default_vcpus, 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = ShimConfig::parse("kernal = \"/x\"\n", Path::new("/etc/k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/k.toml") && e.contains("kernal"), "{e}");
        let e = ShimConfig::parse("machine = \"vmware\"\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmware"), "{e}");
        assert!(ShimConfig::parse("default_vcpus = 0\n", Path::new("c")).is_err());
    }

    #[test]
    fn a_missing_guest_kernel_is_named() {
        let c = ShimConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        let e = c.check_guest().unwrap_err().to_string();
        assert!(
            e.contains("guest kernel") && e.contains("/nonexistent/vmlinux"),
            "{e}"
        );
    }
}
