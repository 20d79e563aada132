//! Which PID namespace a pod's containers get in the guest. containerd gives a container that
//! shares a namespace (shareProcessNamespace, or hostPID) the path of its sandbox's, and only
//! the sandbox's own spec tells the two apart: a hostPID sandbox has no PID namespace. In the
//! guest the agent makes a pod-shared path the pod's namespace (PID 1 `pause`); a hostPID
//! container instead gets the VM's, so the shim drops the path from its spec.

use serde_json::Value;

/// True for a hostPID sandbox: its spec asks for no PID namespace of its own.
pub fn host_pid(sandbox_spec: &Value) -> bool {
    !namespaces(sandbox_spec).any(|ns| ns["type"] == "pid")
}

fn namespaces(spec: &Value) -> impl Iterator<Item = &Value> {
    spec["linux"]["namespaces"].as_array().into_iter().flatten()
}

/// The PID of a spec's PID namespace path (`/proc/<pid>/ns/pid`): containerd names the
/// namespace of a task by the PID the task reported, here its guest PID, so this tells the
/// sandbox's (the pod's namespace) from a debug target's (`kubectl debug --target`).
pub fn joined_pid(spec: &Value) -> Option<u32> {
    namespaces(spec).find(|ns| ns["type"] == "pid")?["path"]
        .as_str()?
        .strip_prefix("/proc/")?
        .strip_suffix("/ns/pid")?
        .parse()
        .ok()
}

/// Leaves a container of a hostPID pod in the VM's PID namespace.
pub fn use_the_vms(spec: &mut Value) {
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        list.retain(|ns| ns["type"] != "pid");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sandbox_without_a_pid_namespace_is_host_pid() {
        let host = json!({"linux": {"namespaces": [{"type": "network", "path": "/x"}, {"type": "mount"}]}});
        let pod = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        assert!(host_pid(&host));
        assert!(!host_pid(&pod));
        assert!(
            host_pid(&json!({})),
            "a spec with no namespaces shares them all"
        );
    }

    #[test]
    fn the_pid_of_a_joined_namespace_is_read_from_its_path() {
        let joined = json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "pid", "path": "/proc/57/ns/pid"}]}});
        assert_eq!(joined_pid(&joined), Some(57));
        let own = json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert_eq!(joined_pid(&own), None);
        let odd = json!({"linux": {"namespaces": [{"type": "pid", "path": "/run/netns/x"}]}});
        assert_eq!(joined_pid(&odd), None);
    }

    #[test]
    fn a_host_pid_container_loses_only_its_pid_namespace() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "mount"}
        ]}});
        use_the_vms(&mut spec);
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "mount"}]));
    }
}
