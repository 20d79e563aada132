//! vCPU pinning. When the pod's containers have CPU sets (kubelet's CPU manager), vCPU n runs
//! on the n-th CPU of their union, and the VMM's other threads (devices, QEMU's I/O and main
//! threads, the shim) on the CPUs no vCPU has, where some are left. The cgroup's cpuset
//! already bounds every thread to the union; this spreads and separates them within it.

use std::collections::BTreeSet;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The vCPU a thread runs, from its name: the builtin VMM's `vcpu<n>`, QEMU's `CPU <n>/TCG`
/// or `CPU <n>/KVM` (with `-name ...,debug-threads=on`).
pub fn vcpu_index(comm: &str) -> Option<usize> {
    let comm = comm.trim();
    if let Some(n) = comm.strip_prefix("vcpu") {
        return n.parse().ok();
    }
    comm.strip_prefix("CPU ")?.split('/').next()?.parse().ok()
}

fn cpu_set(cpus: impl IntoIterator<Item = u32>) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    for c in cpus {
        set.set(c as usize).ok()?;
    }
    Some(set)
}

/// Pins the threads of processes `pids` within `cpus` (see the module); `spread` false puts
/// every thread on all of `cpus`. Returns how many vCPU threads were pinned to one CPU.
pub fn pin(pids: &[u32], cpus: &BTreeSet<u32>, spread: bool) -> usize {
    let list: Vec<u32> = cpus.iter().copied().collect();
    if list.is_empty() {
        return 0;
    }
    let mut vcpus = Vec::new();
    let mut others = Vec::new();
    let mut seen = BTreeSet::new();
    for pid in pids.iter().filter(|p| seen.insert(**p)) {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            match vcpu_index(&comm).filter(|_| spread) {
                Some(n) => vcpus.push((tid, list[n % list.len()])),
                None => others.push(tid),
            }
        }
    }
    let used: BTreeSet<u32> = vcpus.iter().map(|(_, c)| *c).collect();
    let spare: Vec<u32> = list.iter().copied().filter(|c| !used.contains(c)).collect();
    let rest = if spare.is_empty() {
        list.clone()
    } else {
        spare
    };
    let mut pinned = 0;
    for (tid, cpu) in &vcpus {
        if let Some(set) = cpu_set([*cpu]) {
            if sched_setaffinity(Pid::from_raw(*tid), &set).is_ok() {
                pinned += 1;
            }
        }
    }
    if let Some(set) = cpu_set(rest) {
        for tid in others {
            // A thread that ended meanwhile is no matter.
            let _ = sched_setaffinity(Pid::from_raw(tid), &set);
        }
    }
    pinned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_known_by_name() {
        assert_eq!(vcpu_index("vcpu0\n"), Some(0));
        assert_eq!(vcpu_index("CPU 3/TCG"), Some(3));
        assert_eq!(vcpu_index("CPU 12/KVM\n"), Some(12));
        for other in [
            "vmm",
            "qemu-system-x86",
            "IO mon_iothread",
            "CPU x/TCG",
            "vcpu",
        ] {
            assert_eq!(vcpu_index(other), None, "{other}");
        }
    }
}
