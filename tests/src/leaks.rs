//! What a test checks after its pods are gone: nothing of the shim's is left behind on the
//! host (processes, pod state, mounts, taps and veths, half-built images).

use std::fs;
use std::process::Command;

use crate::containerd::Containerd;
use crate::netns::NetNs;

/// Lines of `pgrep -fa PATTERN`.
fn processes(pattern: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-fa", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mount points under `dir` in the mount table `table` (a /proc/PID/mounts).
fn mounts_under(table: &str, dir: &str) -> Vec<String> {
    fs::read_to_string(table)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| {
            m.starts_with(&format!("{dir}/shim-state/")) || m.starts_with(&format!("{dir}/images/"))
        })
        .map(str::to_owned)
        .collect()
}

/// Asserts that no shim, VM, pod state, mount or half-built image of `c`'s pods is left; with
/// the CRI's network namespace `netns`, also no pod veth on the CNI bridge and no pod netns.
pub fn assert_nothing_left(c: &Containerd, netns: Option<&NetNs>) {
    let dir = c.dir.display().to_string();
    let state: Vec<_> = fs::read_dir(c.shim_state())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(state.is_empty(), "pod state left behind: {state:?}");
    for table in [
        "/proc/self/mounts".to_owned(),
        format!("/proc/{}/mounts", c.pid()),
    ] {
        let left = mounts_under(&table, &dir);
        assert!(left.is_empty(), "mounts left behind in {table}: {left:?}");
    }
    for pattern in c.pod_process_patterns() {
        let left = processes(&pattern);
        assert!(left.is_empty(), "processes left behind: {left}");
    }
    // As the shims see it (a CRI containerd has a mount namespace of its own).
    let cache = std::path::Path::new(&format!("/proc/{}/root", c.pid()))
        .join(c.image_cache().strip_prefix("/").unwrap());
    let half_built: Vec<_> = fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp.") || n.contains(".view."))
        .collect();
    assert!(
        half_built.is_empty(),
        "half-built images left in the cache: {half_built:?}"
    );
    if let Some(ns) = netns {
        let veths = || {
            let out = Command::new("ip")
                .args(["-n", &ns.name, "-o", "link", "show", "type", "veth"])
                .output()
                .expect("ip link");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        // A pod's veth whose netns was released rather than emptied by CNI DEL goes with
        // the netns, which the kernel destroys from a work queue a moment later (longer on
        // a loaded host): a veth still there after that is a leak.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut left = veths();
        while !left.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            left = veths();
        }
        assert!(left.is_empty(), "pod veths left behind: {left}");
        let pod_netns: Vec<_> = fs::read_to_string(format!("/proc/{}/mounts", c.pid()))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/netns/cni-"))
            .map(str::to_owned)
            .collect();
        assert!(
            pod_netns.is_empty(),
            "pod network namespaces left behind: {pod_netns:?}"
        );
    }
}
