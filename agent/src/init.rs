//! PID 1 duties before serving: the basic mounts, the cgroup v2 hierarchy, the loopback link.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Result};

/// Where the agent keeps its state; a tmpfs so nothing survives a reboot by accident.
pub const RUN_DIR: &str = "/run/kubevirt";

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).map_err(AgentError::io(format!("create {target}")))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(AgentError::sys(format!("mount {fstype} on {target}")))
}

/// Moves the agent out of the initramfs onto a tmpfs root.
///
/// The initramfs is the kernel's `rootfs`, which pivot_root(2) refuses to leave; container
/// runtimes need pivot_root for each container's root. The agent goes on running from its
/// initramfs file, out of sight under the new root: a copy on the tmpfs would be a third
/// copy of its bytes in guest memory (after the initrd image and the unpacked file), and
/// every page of guest memory touched once stays on the host for the pod's life.
/// `/proc/self/exe` still reaches the file, which is how `podinit` starts `pause`.
pub fn leave_initramfs() -> Result<()> {
    mount_fs(
        "root",
        "/newroot",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for d in ["dev", "proc", "sys", "run", "tmp", "etc"] {
        fs::create_dir_all(format!("/newroot/{d}"))
            .map_err(AgentError::io(format!("create /newroot/{d}")))?;
    }
    nix::unistd::chdir("/newroot").map_err(AgentError::sys("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(AgentError::sys("move the tmpfs root onto /"))?;
    nix::unistd::chroot(".").map_err(AgentError::sys("chroot into the tmpfs root"))?;
    nix::unistd::chdir("/").map_err(AgentError::sys("chdir /"))
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the cgroup v2 hierarchy, and
/// enables the controllers containers need.
pub fn mount_basics() -> Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmp",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map_err(AgentError::io("read /sys/fs/cgroup/cgroup.controllers"))?;
    let enable: String = controllers
        .split_whitespace()
        .map(|c| format!("+{c} "))
        .collect();
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.trim_end()).map_err(
        AgentError::io(format!("enable cgroup controllers {controllers:?}")),
    )?;
    for dir in [
        "",
        "/images",
        "/scratch",
        "/containers",
        "/volumes",
        "/files",
        "/sandbox",
        "/libcontainer",
    ] {
        let d = format!("{RUN_DIR}{dir}");
        fs::create_dir_all(&d).map_err(AgentError::io(format!("create {d}")))?;
    }
    // Containers get /etc/mtab-style expectations from the guest root too.
    if !Path::new("/etc").exists() {
        fs::create_dir_all("/etc").map_err(AgentError::io("create /etc"))?;
    }
    Ok(())
}

/// The guest's kernel release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Monotonic time since boot (CLOCK_BOOTTIME), in nanoseconds.
pub fn since_boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Reads `agent.<key>=<value>` from the kernel command line.
pub fn cmdline_option(key: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    let prefix = format!("agent.{key}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix).map(str::to_owned))
}
