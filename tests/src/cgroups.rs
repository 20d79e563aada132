//! Host cgroups for the end-to-end tests: a pod cgroup with limits, made as kubelet makes
//! it, and what the kernel says of the processes in it. cgroup v1 and v2.

use std::path::PathBuf;
use std::time::Duration;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::{hierarchies, Cgroup};

pub fn v2() -> bool {
    hierarchies::is_cgroup2_unified_mode()
}

/// File `name` of cgroup `path` (below the root) in `controller`'s hierarchy (v1) or the
/// unified one (v2).
pub fn file(controller: &str, path: &str, name: &str) -> PathBuf {
    let root = PathBuf::from("/sys/fs/cgroup");
    let dir = if v2() { root } else { root.join(controller) };
    dir.join(path.trim_start_matches('/')).join(name)
}

pub fn read(controller: &str, path: &str, name: &str) -> String {
    let f = file(controller, path, name);
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("read {}: {e}", f.display()))
        .trim()
        .to_owned()
}

/// Whether cgroup `path` exists in the memory hierarchy.
pub fn exists(path: &str) -> bool {
    file("memory", path, "").exists()
}

/// CPU time the processes of cgroup `path` have used.
pub fn cpu_usage(path: &str) -> Duration {
    if v2() {
        let stat = read("cpu", path, "cpu.stat");
        let us = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Duration::from_micros(us)
    } else {
        Duration::from_nanos(read("cpuacct", path, "cpuacct.usage").parse().unwrap_or(0))
    }
}

/// The most memory cgroup `path` has used.
pub fn memory_peak(path: &str) -> u64 {
    let name = if v2() {
        "memory.peak"
    } else {
        "memory.max_usage_in_bytes"
    };
    read("memory", path, name).parse().unwrap_or(0)
}

/// A pod's cgroup with its memory limit and CPU quota, as kubelet makes it before
/// RunPodSandbox; removed on drop.
#[derive(Debug)]
pub struct KubeletPod {
    cg: Cgroup,
    pub path: String,
}

impl KubeletPod {
    pub fn create(path: &str, memory_bytes: i64, quota_us: i64, period_us: u64) -> KubeletPod {
        let cg = Cgroup::new(hierarchies::auto(), path).expect("create the pod cgroup");
        let pod = KubeletPod {
            cg,
            path: path.to_owned(),
        };
        pod.cg
            .controller_of::<MemController>()
            .expect("memory controller")
            .set_limit(memory_bytes)
            .expect("set the memory limit");
        pod.cg
            .controller_of::<CpuController>()
            .expect("cpu controller")
            .set_cfs_quota_and_period(Some(quota_us), Some(period_us))
            .expect("set the CPU quota");
        pod
    }
}

impl Drop for KubeletPod {
    fn drop(&mut self) {
        for _ in 0..50 {
            if !self.cg.exists() || self.cg.delete().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cgroup {} left behind: still busy", self.path);
    }
}

fn tasks(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// The threads of process `pid` that are not in cgroup `path` for memory and CPU, each with
/// where it is.
pub fn threads_outside(pid: u32, path: &str) -> Vec<String> {
    let want = format!("/{}", path.trim_start_matches('/'));
    let mut out = Vec::new();
    for t in tasks(pid) {
        let cg = std::fs::read_to_string(t.join("cgroup")).unwrap_or_default();
        for line in cg.lines() {
            let mut f = line.splitn(3, ':');
            let (_, ctrls, p) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
            let relevant = if v2() {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == "memory" || c == "cpu")
            };
            if relevant && p != want {
                out.push(format!("{}: {line}", t.display()));
            }
        }
    }
    out
}

/// The CPUs each thread of process `pid` may run on (`Cpus_allowed_list`).
pub fn thread_cpus(pid: u32) -> Vec<String> {
    named_thread_cpus(pid).into_iter().map(|(_, c)| c).collect()
}

/// Each thread of process `pid`: its name and the CPUs it may run on.
pub fn named_thread_cpus(pid: u32) -> Vec<(String, String)> {
    tasks(pid)
        .iter()
        .map(|t| {
            let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
            let cpus = std::fs::read_to_string(t.join("status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("?")
                .trim()
                .to_owned();
            (name.trim().to_owned(), cpus)
        })
        .collect()
}
