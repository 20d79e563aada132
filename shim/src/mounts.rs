//! The container's mounts made true inside the guest. Host paths do not exist there, so each
//! bind mount of the OCI spec is rewritten: files and directories (hosts, resolv.conf,
//! ConfigMaps, Secrets, service account tokens) are copied in through the agent and kept
//! current; /dev/shm and emptyDir become guest-side directories; what the VM cannot honour is
//! refused with the mount's name.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use protocol::agent::CopyFileRequest;
use protocol::blocking::AgentClient;

use crate::error::{Result, ShimError};
use crate::pod::ctx;

/// Largest file or directory tree copied into the guest (ConfigMaps and Secrets are at
/// most 1 MiB).
const MAX_COPY: u64 = 8 << 20;
/// Deepest directory tree copied in (symbolic links are followed and can make loops).
pub const MAX_DEPTH: usize = 16;

/// A host block device a bind mount names: attached to the VM and mounted by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub read_only: bool,
}

/// The guest mount point of the pod volume in disk slot `slot`.
pub fn volume_path(slot: &str) -> String {
    format!("/run/kubevirt/volumes/{slot}")
}

/// What a container's mounts need besides the rewritten spec.
#[derive(Debug, Default)]
pub struct Needs {
    pub copies: Vec<Copy>,
    /// (index of the mount in the spec, the volume).
    pub volumes: Vec<(usize, Volume)>,
    /// Memory-backed emptyDirs: (name, size in bytes) of a pod-wide guest tmpfs.
    pub tmpfs: Vec<(String, u64)>,
}

/// A host file or tree copied to `/run/kubevirt/files/<rel>`.
#[derive(Debug, Clone)]
pub struct Copy {
    pub host: PathBuf,
    pub rel: String,
}

fn is_bind(m: &serde_json::Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Rewrites the bind mounts of `spec` for the guest; returns what must be copied in and
/// which block devices must be attached (their sources are set by [`set_volume_source`]).
pub fn rewrite(spec: &mut serde_json::Value, container: &str) -> Result<Needs> {
    let mut needs = Needs::default();
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(needs);
    };
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let dest = m["destination"].as_str().unwrap_or_default().to_owned();
        let source = PathBuf::from(m["source"].as_str().unwrap_or_default());
        let refuse = |why: String| {
            ShimError::Unsupported(format!("mount {dest} (source {}): {why}", source.display()))
        };
        if dest == "/dev/shm" {
            *m = serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]});
            continue;
        }
        if let Some(name) = emptydir_name(&source) {
            // kubelet mounts a memory-backed emptyDir as a tmpfs of its sizeLimit: the
            // guest gets a tmpfs of the same size; a disk-backed one a directory the agent
            // keeps on the pod's scratch disk.
            match tmpfs_size(&source) {
                Some(bytes) => {
                    m["source"] = format!("/run/kubevirt/volumes/{}", tmpfs_volume(&name)).into();
                    needs.tmpfs.push((name, bytes));
                }
                None => m["source"] = format!("/run/kubevirt/sandbox/emptydir/{name}").into(),
            }
            continue;
        }
        let meta = fs::metadata(&source).map_err(|e| refuse(e.to_string()))?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            let read_only = m["options"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o == "ro"));
            needs.volumes.push((
                i,
                Volume {
                    host: source.clone(),
                    read_only,
                },
            ));
            continue;
        }
        if !ft.is_file() && !ft.is_dir() {
            return Err(refuse(
                "only files and directories can be copied into the VM".into(),
            ));
        }
        let Some(size) = tree_size(&source, 0) else {
            return Err(refuse(format!(
                "its tree is deeper than {MAX_DEPTH} directories (a symbolic link loop?)"
            )));
        };
        if size > MAX_COPY {
            return Err(refuse(format!(
                "{size} bytes is more than the {MAX_COPY} a VM copies in; use a block volume"
            )));
        }
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let rel = format!("{container}/{i}/{name}");
        m["source"] = format!("/run/kubevirt/files/{rel}").into();
        needs.copies.push(Copy { host: source, rel });
    }
    Ok(needs)
}

/// Points mount `index` of `spec` at the guest mount of the volume in `slot`.
pub fn set_volume_source(spec: &mut serde_json::Value, index: usize, slot: &str) {
    spec["mounts"][index]["source"] = volume_path(slot).into();
}

/// The file system on a host block device (`blkid`), empty for a raw device.
pub fn fstype(dev: &Path) -> String {
    let mut cmd = std::process::Command::new("blkid");
    cmd.args(["-o", "value", "-s", "TYPE"]).arg(dev);
    vmm::spawn::output(cmd)
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `kubernetes.io~empty-dir/<name>` volumes become pod-wide guest directories.
fn emptydir_name(source: &Path) -> Option<String> {
    let s = source.to_str()?;
    let (_, name) = s.split_once("/volumes/kubernetes.io~empty-dir/")?;
    (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
}

/// The size of the tmpfs mounted at `p`, if one is.
fn tmpfs_size(p: &Path) -> Option<u64> {
    let st = nix::sys::statfs::statfs(p).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .then(|| st.blocks() * st.block_size() as u64)
}

/// The guest volume name of memory-backed emptyDir `name`.
pub fn tmpfs_volume(name: &str) -> String {
    format!("emptydir-{name}")
}

/// The bytes of the files under `p`, `None` if it is deeper than [`MAX_DEPTH`].
fn tree_size(p: &Path, depth: usize) -> Option<u64> {
    match fs::metadata(p) {
        Ok(m) if m.is_dir() => {
            if depth >= MAX_DEPTH {
                return None;
            }
            fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| tree_size(&e.path(), depth + 1))
                .sum()
        }
        Ok(m) => Some(m.len()),
        Err(_) => Some(0),
    }
}

/// Copies `host` (a file or a tree) to `/run/kubevirt/files/<rel>` in the VM.
pub fn copy_tree(agent: &AgentClient, host: &Path, rel: &str) -> Result<()> {
    copy_below(agent, host, rel, 0)
}

fn copy_below(agent: &AgentClient, host: &Path, rel: &str, depth: usize) -> Result<()> {
    let meta = fs::metadata(host).map_err(ShimError::io(format!("read {}", host.display())))?;
    if meta.is_dir() {
        if depth >= MAX_DEPTH {
            return Err(ShimError::Unsupported(format!(
                "{}: deeper than {MAX_DEPTH} directories (a symbolic link loop?)",
                host.display()
            )));
        }
        for e in fs::read_dir(host)
            .map_err(ShimError::io(format!("read {}", host.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            // kubelet's atomic-writer internals (..data, ..2024_...) are resolved through
            // the visible links.
            if name.starts_with("..") {
                continue;
            }
            copy_below(agent, &e.path(), &format!("{rel}/{name}"), depth + 1)?;
        }
        return Ok(());
    }
    let data = fs::read(host).map_err(ShimError::io(format!("read {}", host.display())))?;
    let req = CopyFileRequest {
        path: rel.to_owned(),
        data,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        ..Default::default()
    };
    agent
        .copy_file(ctx(), &req)
        .map_err(ShimError::agent("copy a file into the VM"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_become_guest_paths_and_odd_ones_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("shim-mounts-{}", std::process::id()));
        fs::create_dir_all(dir.join("cm")).unwrap();
        fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        fs::write(dir.join("cm/key"), "value").unwrap();
        let mut spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "ro"]},
            {"destination": "/etc/config", "type": "bind", "source": dir.join("cm"), "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind"]},
            {"destination": "/cache", "type": "bind", "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache", "options": ["rbind"]}
        ]});
        let copies = rewrite(&mut spec, "c1").unwrap().copies;
        let m = &spec["mounts"];
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], "/run/kubevirt/files/c1/1/hosts");
        assert_eq!(m[2]["source"], "/run/kubevirt/files/c1/2/cm");
        assert_eq!(m[3]["type"], "tmpfs");
        assert_eq!(m[4]["source"], "/run/kubevirt/sandbox/emptydir/cache");
        assert_eq!(copies.len(), 2);

        let mut bad = serde_json::json!({"mounts": [{"destination": "/sock", "type": "bind", "source": "/nonexistent/x.sock"}]});
        let e = rewrite(&mut bad, "c1").unwrap_err().to_string();
        assert!(
            e.contains("mount /sock") && e.contains("/nonexistent/x.sock"),
            "{e}"
        );
        // A tree that loops through a symbolic link is refused, not walked for ever.
        fs::create_dir_all(dir.join("looped")).unwrap();
        std::os::unix::fs::symlink(".", dir.join("looped/again")).unwrap();
        let mut looped = serde_json::json!({"mounts": [{"destination": "/l", "type": "bind", "source": dir.join("looped")}]});
        let e = rewrite(&mut looped, "c1").unwrap_err().to_string();
        assert!(
            e.contains("mount /l") && e.contains("symbolic link loop"),
            "{e}"
        );
        let mut dev = serde_json::json!({"mounts": [{"destination": "/null", "type": "bind", "source": "/dev/null"}]});
        let e = rewrite(&mut dev, "c1").unwrap_err().to_string();
        assert!(
            e.contains("mount /null") && e.contains("files and directories"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_memory_backed_empty_dir_becomes_a_guest_tmpfs_of_its_size() {
        let dir = std::env::temp_dir().join(format!(
            "kvmnt-{}/pods/u/volumes/kubernetes.io~empty-dir/mem",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        // As kubelet mounts an emptyDir with medium Memory and sizeLimit 8Mi.
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=8m"),
        )
        .expect("mount a tmpfs (the shim's tests run as root)");
        let mut spec = serde_json::json!({"mounts": [
            {"destination": "/mem", "type": "bind", "source": dir, "options": ["rbind"]}
        ]});
        let needs = rewrite(&mut spec, "c1");
        let _ = nix::mount::umount(&dir);
        let _ = fs::remove_dir_all(dir.ancestors().nth(5).unwrap());
        assert_eq!(needs.unwrap().tmpfs, [("mem".to_owned(), 8 << 20)]);
        assert_eq!(
            spec["mounts"][0]["source"],
            "/run/kubevirt/volumes/emptydir-mem"
        );
    }
}
