//! Takes the OCI spec the shim sends and makes it safe and right for the guest: the root is the
//! overlay the agent built, pod-shared namespaces are the VM's own (the PID one is the pod's,
//! see `podinit`), the cgroup is the agent's, and bind mounts may only come from what the shim
//! placed in the guest.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Root, Spec};

use crate::error::{AgentError, Result};
use crate::init::RUN_DIR;

/// Guest directories a container may bind-mount from.
const BIND_SOURCES: [&str; 3] = ["volumes", "files", "sandbox"];

/// Where the shim's specs name the pod's disk-backed emptyDirs (`<this>/<name>`), under
/// [`RUN_DIR`]; [`prepare`] puts them where the agent keeps them.
pub const EMPTYDIR: &str = "sandbox/emptydir";

/// File systems a container may mount fresh (no source on the guest).
const KERNEL_FS: [&str; 7] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// The guest cgroup (under the v2 root) of a container.
pub fn cgroup_path(container_id: &str) -> String {
    format!("/kubevirt/{container_id}")
}

fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn check_bind_source(source: &Path, destination: &Path) -> Result<()> {
    let allowed = is_clean_absolute(source)
        && BIND_SOURCES
            .iter()
            .any(|d| source.starts_with(Path::new(RUN_DIR).join(d)));
    if !allowed {
        return Err(AgentError::invalid(
            "mount",
            format!(
                "source {} of {} is outside the pod's volumes and files ({RUN_DIR}/{{volumes,files,sandbox}})",
                source.display(),
                destination.display()
            ),
        ));
    }
    Ok(())
}

fn check_process(p: &Process) -> Result<()> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::invalid("OCI process", "args are empty"));
    }
    if !p.cwd().is_absolute() {
        return Err(AgentError::invalid(
            "OCI process",
            format!("cwd {} is not absolute", p.cwd().display()),
        ));
    }
    Ok(())
}

/// Drops host security labels: the guest kernel has no AppArmor or SELinux; the VM boundary
/// is the isolation.
fn strip_labels(p: &mut Process) {
    if p.apparmor_profile().is_some() || p.selinux_label().is_some() {
        log::info!("ignoring host LSM labels of the process (no LSM in the guest)");
    }
    p.set_apparmor_profile(None);
    p.set_selinux_label(None);
}

/// Parses and adapts a container's spec; `rootfs` is the overlay the agent mounted,
/// `emptydir` the directory that holds the pod's disk-backed emptyDirs (each made on first
/// use), and `pod_pid_ns` gives the pod's shared PID namespace, asked for only by a spec
/// that joins one.
pub fn prepare(
    json: &[u8],
    container_id: &str,
    rootfs: &Path,
    emptydir: &Path,
    pod_pid_ns: impl FnOnce() -> Result<PathBuf>,
) -> Result<Spec> {
    let mut spec: Spec =
        serde_json::from_slice(json).map_err(|e| AgentError::invalid("OCI spec", e.to_string()))?;
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| AgentError::invalid("OCI spec", "no process"))?;
    check_process(process)?;
    strip_labels(process);
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf());
    root.set_readonly(Some(readonly));
    spec.set_root(Some(root));
    if spec.hooks().is_some() {
        // Hooks name host binaries; they ran (or not) on the host side.
        log::info!("container {container_id}: ignoring OCI hooks (they name host programs)");
        spec.set_hooks(None);
    }
    let named_emptydir = Path::new(RUN_DIR).join(EMPTYDIR);
    for m in spec.mounts_mut().iter_mut().flatten() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if !is_clean_absolute(m.destination()) {
            return Err(AgentError::invalid(
                "mount",
                format!(
                    "destination {} is not a clean absolute path",
                    m.destination().display()
                ),
            ));
        }
        if bind {
            let source = m.source().clone().unwrap_or_default();
            check_bind_source(&source, m.destination())?;
            if let Ok(name) = source.strip_prefix(&named_emptydir) {
                let dir = emptydir.join(name);
                std::fs::create_dir_all(&dir)
                    .map_err(AgentError::io(format!("create {}", dir.display())))?;
                m.set_source(Some(dir));
            }
        } else if !m.typ().as_deref().is_some_and(|t| KERNEL_FS.contains(&t)) {
            return Err(AgentError::invalid(
                "mount",
                format!(
                    "type {:?} of {} is not supported in the guest",
                    m.typ(),
                    m.destination().display()
                ),
            ));
        }
    }
    // The pod's hostname is the VM's (SetupSandbox); containers share its UTS namespace.
    spec.set_hostname(None);
    spec.set_domainname(None);
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    linux.set_cgroups_path(Some(cgroup_path(container_id).into()));
    // Host device numbers mean nothing in the guest; the runtime creates the standard nodes.
    linux.set_devices(None);
    if let Some(namespaces) = linux.namespaces_mut() {
        let mut kept = Vec::new();
        let mut pod_pid_ns = Some(pod_pid_ns);
        for mut ns in namespaces.drain(..) {
            match ns.typ() {
                // Shared by the pod's containers: the VM's own.
                LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts => {
                }
                // The host's path of the pod-shared PID namespace becomes the guest's pod
                // namespace; without a path, a namespace of the container's own.
                LinuxNamespaceType::Pid if ns.path().is_some() => {
                    if let Some(pod) = pod_pid_ns.take() {
                        ns.set_path(Some(pod()?));
                        kept.push(ns);
                    }
                }
                _ if ns.path().is_some() => {
                    return Err(AgentError::invalid(
                        "namespace",
                        format!(
                            "{:?} namespace with a path cannot be joined in the guest",
                            ns.typ()
                        ),
                    ))
                }
                _ => kept.push(ns),
            }
        }
        *namespaces = kept;
    }
    Ok(spec)
}

/// Parses and checks the process of an exec.
pub fn prepare_process(json: &[u8]) -> Result<Process> {
    let mut p: Process = serde_json::from_slice(json)
        .map_err(|e| AgentError::invalid("OCI process", e.to_string()))?;
    check_process(&p)?;
    strip_labels(&mut p);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(extra: serde_json::Value) -> Vec<u8> {
        let mut s = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "/host/rootfs"},
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc"}, {"type": "uts"}
            ]}
        });
        if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&s).unwrap()
    }

    fn no_pod_ns() -> Result<PathBuf> {
        panic!("the pod's PID namespace was asked for by a spec that does not join it")
    }

    /// [`prepare`] for a spec that joins no pod namespace and names no emptyDir.
    fn plain(json: &[u8]) -> Result<Spec> {
        prepare(json, "c", Path::new("/r"), Path::new("/e"), no_pod_ns)
    }

    #[test]
    fn a_pod_shared_pid_namespace_is_the_pods_own_in_the_guest() {
        let shared = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/4242/ns/pid"}, {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]}});
        let spec = prepare(
            &spec_with(shared),
            "c",
            Path::new("/r"),
            Path::new("/e"),
            || Ok(PathBuf::from("/proc/7/ns/pid")),
        )
        .unwrap();
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pid = namespaces
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(pid.path().as_deref(), Some(Path::new("/proc/7/ns/pid")));
        assert_eq!(namespaces.len(), 2, "{namespaces:?}");
        // hostPID: no PID namespace in the spec, so the VM's (the agent's) is used.
        let host = serde_json::json!({"linux": {"namespaces": [{"type": "mount"}]}});
        let spec = plain(&spec_with(host)).unwrap();
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(namespaces
            .iter()
            .all(|n| n.typ() != LinuxNamespaceType::Pid));
        // The pod's namespace failing to start fails the container, naming why.
        let shared = serde_json::json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}});
        let err = prepare(
            &spec_with(shared),
            "c",
            Path::new("/r"),
            Path::new("/e"),
            || Err(AgentError::invalid("pod", "no namespace")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no namespace"), "{err}");
    }

    #[test]
    fn root_cgroup_and_namespaces_are_the_guests() {
        let spec = prepare(
            &spec_with(serde_json::json!({})),
            "c1",
            Path::new("/run/kubevirt/containers/c1/rootfs"),
            Path::new("/e"),
            no_pod_ns,
        )
        .unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/kubevirt/containers/c1/rootfs")
        );
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kubevirt/c1"))
        );
        let kinds: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(kinds, [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount]);
    }

    #[test]
    fn bind_mounts_only_from_pod_directories() {
        let ok = serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "/run/kubevirt/volumes/data", "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]});
        plain(&spec_with(ok)).unwrap();
        for source in [
            "/etc/shadow",
            "/run/kubevirt/volumes/../../../etc",
            "relative",
            "/run/kubevirt/images/x",
        ] {
            let bad = serde_json::json!({"mounts": [{"destination": "/x", "type": "bind", "source": source}]});
            let err = plain(&spec_with(bad)).unwrap_err().to_string();
            assert!(err.contains("outside the pod's volumes"), "{source}: {err}");
        }
        let bad =
            serde_json::json!({"mounts": [{"destination": "/x", "type": "nfs", "source": "h:/x"}]});
        assert!(plain(&spec_with(bad))
            .unwrap_err()
            .to_string()
            .contains("not supported"));
    }

    #[test]
    fn disk_backed_empty_dirs_are_where_the_agent_keeps_them() {
        let keep = std::env::temp_dir().join(format!("kvagent-emptydir-{}", std::process::id()));
        let spec = serde_json::json!({"mounts": [
            {"destination": "/cache", "type": "bind", "source": "/run/kubevirt/sandbox/emptydir/cache", "options": ["rbind"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/run/kubevirt/sandbox/resolv.conf", "options": ["rbind"]}
        ]});
        let spec = prepare(&spec_with(spec), "c", Path::new("/r"), &keep, no_pod_ns).unwrap();
        let sources: Vec<_> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.source().clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                keep.join("cache"),
                PathBuf::from("/run/kubevirt/sandbox/resolv.conf")
            ]
        );
        assert!(keep.join("cache").is_dir(), "made on first use");
        std::fs::remove_dir_all(&keep).unwrap();
    }

    #[test]
    fn malformed_specs_are_refused_clearly() {
        assert!(plain(b"{not json")
            .unwrap_err()
            .to_string()
            .starts_with("invalid OCI spec"));
        let no_args =
            serde_json::json!({"process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}});
        assert!(plain(&spec_with(no_args))
            .unwrap_err()
            .to_string()
            .contains("args are empty"));
        let user_ns = serde_json::json!({"linux": {"namespaces": [{"type": "user", "path": "/proc/1/ns/user"}]}});
        assert!(plain(&spec_with(user_ns))
            .unwrap_err()
            .to_string()
            .contains("cannot be joined"));
    }
}
