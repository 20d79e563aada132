//! The pod's host cgroup. Before it starts the VM the shim moves itself into the sandbox's
//! `linux.cgroupsPath`, so every VMM thread (the shim's device threads, the builtin VMM's
//! vCPUs, the QEMU it starts) is charged to the pod, bounded by the limits kubelet set on
//! the pod's cgroup, and seen by kubelet and cAdvisor. cgroup v1 and v2, cgroupfs and
//! systemd-style paths; the directories are written directly, as runc's cgroupfs driver does.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::{hierarchies, Cgroup, Controller};
use cgroups_rs::systemd::utils::expand_slice;
use cgroups_rs::CgroupPid;

use crate::error::{Result, ShimError};

/// Memory limits at or above this mean "no limit" (v1 reports 2^63 rounded to pages).
const UNLIMITED: i64 = 1 << 62;

/// The path below the hierarchy root of an OCI `cgroupsPath`: cgroupfs style
/// (`/kubepods/burstable/pod1/abc`) or systemd style
/// (`kubepods-burstable-pod1.slice:cri-containerd:abc`, which is
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope`).
pub fn relative_path(cgroups_path: &str) -> Result<String> {
    let bad = |why: &str| ShimError::invalid(format!("cgroupsPath {cgroups_path:?}"), why);
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let path = match parts.as_slice() {
        [slice, prefix, name] => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let base = expand_slice(slice).map_err(|_| bad("not a systemd slice"))?;
            if name.is_empty() || name.contains('/') {
                return Err(bad("the unit name is empty or has a '/'"));
            }
            let unit = match *prefix {
                "" => format!("{name}.scope"),
                p => format!("{p}-{name}.scope"),
            };
            format!("{base}/{unit}")
        }
        [path] => path.to_string(),
        _ => return Err(bad("neither a path nor slice:prefix:name")),
    };
    let path = path.trim_matches('/').to_owned();
    if path.is_empty()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("empty, or has '.', '..' or '//' in it"));
    }
    Ok(path)
}

/// CPU and memory bounds of a cgroup, the tightest along its ancestors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPUs the CFS quota allows (quota / period).
    pub cpus: Option<f64>,
}

/// The pod's cgroup, which this process (and so the whole VM) lives in.
#[derive(Debug)]
pub struct PodCgroup {
    cg: Cgroup,
    pub path: String,
    /// The move of this process into the cgroup, until [`PodCgroup::entry`] took it.
    entering: Mutex<Option<Entry>>,
}

fn failed(path: &str, what: &str) -> impl FnOnce(cgroups_rs::fs::error::Error) -> ShimError {
    let what = format!("{what} cgroup {path}");
    move |e| ShimError::Command {
        what,
        why: e.to_string(),
    }
}

impl PodCgroup {
    /// Creates the cgroup at `cgroups_path` where kubelet has not, and starts moving this
    /// process, its threads and every child it starts from then on into it. The move runs on
    /// a thread of its own: the kernel's first migration of a process waits for an RCU grace
    /// period (about 12 ms here), which so overlaps the rest of the pod's set-up.
    pub fn join(cgroups_path: &str) -> Result<PodCgroup> {
        let path = relative_path(cgroups_path)?;
        let cg = Cgroup::new(hierarchies::auto(), &path).map_err(failed(&path, "create"))?;
        // One cgroup.procs per v1 hierarchy; v2's controllers share one.
        let procs: BTreeSet<PathBuf> = cg
            .subsystems()
            .iter()
            .map(|s| s.to_controller().path().join("cgroup.procs"))
            .collect();
        let me = std::process::id().to_string();
        let entering = std::thread::Builder::new()
            .name("cgroup-join".into())
            .spawn(move || procs.iter().try_for_each(|p| std::fs::write(p, &me)))
            .map_err(ShimError::io("start the cgroup-join thread"))?;
        Ok(PodCgroup {
            cg,
            entering: Mutex::new(Some(Entry {
                handle: Some(entering),
                path: path.clone(),
            })),
            path,
        })
    }

    /// The wait until this process is in the cgroup, for the VM's start gate (the VM's
    /// memory and process must be charged to the pod). Later calls wait for nothing.
    pub fn entry(&self) -> Entry {
        self.entering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(Entry {
                handle: None,
                path: String::new(),
            })
    }

    /// The limits the VM is held to: the tightest of this cgroup and its ancestors (kubelet
    /// puts the pod's limits, RuntimeClass overhead included, on the sandbox's parent).
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        let mut cg = self.cg.clone();
        loop {
            // The limit files alone: the library's stat readers open a dozen files each.
            if let Some(m) = cg.controller_of::<MemController>() {
                let limit = read_i64(m.path(), "memory.limit_in_bytes")
                    .or_else(|| read_i64(m.path(), "memory.max"))
                    .filter(|l| *l > 0 && *l < UNLIMITED);
                if let Some(limit) = limit {
                    let limit = limit as u64;
                    l.memory_bytes = Some(l.memory_bytes.map_or(limit, |o| o.min(limit)));
                }
            }
            if let Some(c) = cg.controller_of::<CpuController>() {
                let (quota, period) = cpu_max(c.path());
                if let (Some(q), Some(p)) = (quota.filter(|q| *q > 0), period.filter(|p| *p > 0)) {
                    let cpus = q as f64 / p as f64;
                    l.cpus = Some(l.cpus.map_or(cpus, |o| o.min(cpus)));
                }
            }
            if cg.path().trim_matches('/').is_empty() {
                return l;
            }
            cg = cg.parent_control_group();
        }
    }

    /// Applies a lone container's CPU quota and CPU set as runc would; a CRI sandbox's own
    /// settings are not applied, the pod's cgroup above it carries the pod's limits.
    pub fn set_cpu(&self, quota: Option<i64>, period: Option<u64>) -> Result<()> {
        if let Some(c) = self.cg.controller_of::<CpuController>() {
            c.set_cfs_quota_and_period(quota, period)
                .map_err(failed(&self.path, "set the CPU quota of"))?;
        }
        Ok(())
    }

    /// Confines the VM to `cpus` (kubelet's CPU manager gives containers exclusive CPUs).
    pub fn set_cpus(&self, cpus: &str) -> Result<()> {
        if let Some(c) = self.cg.controller_of::<CpuSetController>() {
            c.set_cpus(cpus)
                .map_err(failed(&self.path, "set the CPUs of"))?;
        }
        Ok(())
    }

    /// The CPUs the pod's parent cgroup allows (what an empty CPU set falls back to).
    pub fn parent_cpus(&self) -> String {
        self.cg
            .parent_control_group()
            .controller_of::<CpuSetController>()
            .map(|c| {
                let ranges = c.cpuset().cpus;
                let set = ranges
                    .iter()
                    .flat_map(|(a, b)| *a as u32..=*b as u32)
                    .collect();
                format_cpus(&set)
            })
            .unwrap_or_default()
    }
}

/// This process's move into a pod cgroup, under way on a thread of its own.
#[derive(Debug)]
pub struct Entry {
    handle: Option<JoinHandle<io::Result<()>>>,
    path: String,
}

impl Entry {
    /// Waits until the move is done.
    pub fn wait(mut self) -> Result<()> {
        match self.handle.take() {
            None => Ok(()),
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the cgroup-join thread panicked")))
                .map_err(ShimError::io(format!("join cgroup {}", self.path))),
        }
    }
}

impl Drop for Entry {
    /// An entry nobody waited for (a VM that failed before its start gate) still ends
    /// before the cgroup is left and removed.
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PodCgroup {
    /// Moves this process back to the root cgroup and removes the pod's cgroup: the VM has
    /// ended, or never started.
    fn drop(&mut self) {
        let _ = self.entry().wait();
        let me = CgroupPid::from(std::process::id() as u64);
        let _ = self.cg.remove_task_by_tgid(me);
        remove_path(&self.path);
    }
}

fn read_i64(dir: &Path, file: &str) -> Option<i64> {
    std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// (quota, period) in microseconds: v1's two files, or v2's `cpu.max` ("max" is no quota).
fn cpu_max(dir: &Path) -> (Option<i64>, Option<i64>) {
    if let Some(q) = read_i64(dir, "cpu.cfs_quota_us") {
        return (Some(q), read_i64(dir, "cpu.cfs_period_us"));
    }
    let max = std::fs::read_to_string(dir.join("cpu.max")).unwrap_or_default();
    let mut parts = max.split_whitespace().map(|v| v.parse().ok());
    (parts.next().flatten(), parts.next().flatten())
}

/// Removes the cgroup at `path` (below the hierarchy root) once the processes in it have
/// gone, waiting a little for a killed VM to exit.
pub fn remove_path(path: &str) {
    let cg = Cgroup::load(hierarchies::auto(), path);
    for _ in 0..50 {
        if !cg.exists() || cg.delete().is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    log::warn!("cgroup {path} is still busy; left in place");
}

/// Parses a Linux CPU list (`0-3,6`).
pub fn parse_cpus(list: &str) -> Result<BTreeSet<u32>> {
    let bad = || ShimError::invalid(format!("CPU list {list:?}"), "expected e.g. 0-3,6");
    let mut set = BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b {
            return Err(bad());
        }
        set.extend(a..=b);
    }
    Ok(set)
}

/// Writes a CPU set as a Linux CPU list.
pub fn format_cpus(set: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota_from_v1_and_v2_files() {
        let dir = std::env::temp_dir().join(format!("kvshim-cpumax-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v2")).unwrap();
        std::fs::write(dir.join("v1/cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(dir.join("v1/cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cpu_max(&dir.join("v1")), (Some(-1), Some(100000)));
        std::fs::write(dir.join("v2/cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(cpu_max(&dir.join("v2")), (Some(150000), Some(100000)));
        std::fs::write(dir.join("v2/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cpu_max(&dir.join("v2")), (None, Some(100000)));
        assert_eq!(cpu_max(&dir.join("absent")), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cgroupfs_and_systemd_paths() {
        assert_eq!(
            relative_path("/kubepods/burstable/pod1/abc").unwrap(),
            "kubepods/burstable/pod1/abc"
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
        );
        assert_eq!(relative_path(":cri:x").unwrap(), "system.slice/cri-x.scope");
        for bad in [
            "",
            "/",
            "/a/../b",
            "a//b",
            "x.slice:p",
            "kube.service:p:n",
            "a.slice:p:",
        ] {
            let e = relative_path(bad).unwrap_err().to_string();
            assert!(e.contains("cgroupsPath"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_lists_round_trip() {
        let s = parse_cpus("0-3,6, 8-9").unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(format_cpus(&s), "0-3,6,8-9");
        assert_eq!(format_cpus(&parse_cpus("5").unwrap()), "5");
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("a").is_err());
    }
}
