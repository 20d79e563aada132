//! A container's rootfs for the VM: the snapshotter's read-only layers become one EROFS image,
//! cached on the node per layer chain and shared by every pod that uses it (the writable
//! layers are on the pod's scratch disk, see scratch.rs).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use crate::error::{Result, ShimError};

/// What the image layers are, read from the rootfs mounts containerd passes to Create.
#[derive(Debug, PartialEq, Eq)]
pub enum Layers {
    /// Read-only lower directories, topmost first (overlay `lowerdir=`).
    Lower(Vec<PathBuf>),
    /// One directory holds the whole root (a bind snapshot, or the bundle's rootfs).
    Dir(PathBuf),
}

impl Layers {
    pub fn from_mounts(mounts: &[Mount], bundle: &Path) -> Result<Layers> {
        match mounts {
            [] => Ok(Layers::Dir(bundle.join("rootfs"))),
            [m] if m.type_ == "overlay" => {
                let lower = m
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("lowerdir="))
                    .ok_or_else(|| ShimError::invalid("rootfs mount", format!("overlay without lowerdir: {:?}", m.options)))?;
                Ok(Layers::Lower(lower.split(':').map(PathBuf::from).collect()))
            }
            [m] if m.type_ == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
                Ok(Layers::Dir(PathBuf::from(&m.source)))
            }
            _ => Err(ShimError::Unsupported(format!(
                "rootfs mounts {:?}: only one overlay or bind mount (overlayfs or native snapshotter)",
                mounts.iter().map(|m| format!("{} {}", m.type_, m.source)).collect::<Vec<_>>()
            ))),
        }
    }

    /// The cache key: the layer chain's snapshot directories identify its content.
    fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"kubevirt-erofs v1\n");
        match self {
            Layers::Lower(dirs) => dirs.iter().for_each(|d| {
                h.update(d.as_os_str().as_encoded_bytes());
                h.update(b"\n");
            }),
            Layers::Dir(d) => h.update(d.as_os_str().as_encoded_bytes()),
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether the content can change under the same key (a writable directory).
    fn cacheable(&self) -> bool {
        matches!(self, Layers::Lower(_))
    }
}

pub(crate) fn run(what: &str, cmd: Command) -> Result<()> {
    let out = vmm::spawn::output(cmd).map_err(ShimError::io(format!("run {what}")))?;
    if !out.status.success() {
        return Err(ShimError::Command {
            what: what.to_owned(),
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// A merged read-only view of the layers, unmounted on drop.
struct MergedView {
    dir: PathBuf,
    mounted: bool,
}

impl MergedView {
    fn new(layers: &Layers, tmp: &Path) -> Result<MergedView> {
        match layers {
            Layers::Dir(d) => Ok(MergedView {
                dir: d.clone(),
                mounted: false,
            }),
            Layers::Lower(dirs) if dirs.len() == 1 => Ok(MergedView {
                dir: dirs[0].clone(),
                mounted: false,
            }),
            Layers::Lower(dirs) => {
                fs::create_dir_all(tmp)
                    .map_err(ShimError::io(format!("create {}", tmp.display())))?;
                let lower = dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":");
                mount(
                    Some("overlay"),
                    tmp,
                    Some("overlay"),
                    MsFlags::MS_RDONLY,
                    Some(format!("lowerdir={lower}").as_str()),
                )
                .map_err(|e| ShimError::io(format!("mount the image layers {lower}"))(e.into()))?;
                Ok(MergedView {
                    dir: tmp.to_path_buf(),
                    mounted: true,
                })
            }
        }
    }
}

impl Drop for MergedView {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// The EROFS image of `layers`: from the cache, or built (and cached when the layers are
/// immutable).
pub fn image(layers: &Layers, cache: &Path, scratch_dir: &Path) -> Result<(PathBuf, bool)> {
    fs::create_dir_all(cache).map_err(ShimError::io(format!(
        "create image cache {}",
        cache.display()
    )))?;
    let key = layers.key();
    let build = |tmp: &Path| {
        let view = MergedView::new(
            layers,
            &cache.join(format!("{key}.view.{}", std::process::id())),
        )?;
        let mut mkfs = Command::new("mkfs.erofs");
        mkfs.arg("--quiet").arg(tmp).arg(&view.dir);
        run(&format!("mkfs.erofs into {}", tmp.display()), mkfs)
    };
    if !layers.cacheable() {
        let path = scratch_dir.join("rootfs.erofs");
        build(&path).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
        return Ok((path, false));
    }
    let path = cache.join(format!("{key}.erofs"));
    let cached = cached(&path, build)?;
    Ok((path, cached))
}

/// `path`, a file in a cache, built by `build` (into a temporary file) unless it is there
/// already; true if it was. Concurrent builders serialise on a lock file beside it; it
/// appears by an atomic rename, so readers never see half of one.
pub(crate) fn cached(path: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    let lock = File::create(path.with_extension("lock")).map_err(ShimError::io(format!(
        "create the lock of {}",
        path.display()
    )))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| ShimError::io(format!("lock {}", path.display()))(e.into()))?;
    if path.exists() {
        return Ok(true);
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(ShimError::io(format!("move {} into place", path.display())))?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, src: &str, opts: &[&str]) -> Mount {
        Mount {
            type_: t.into(),
            source: src.into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn layers_come_from_the_snapshot_mounts() {
        let ov = m(
            "overlay",
            "overlay",
            &[
                "index=off",
                "lowerdir=/s/2/fs:/s/1/fs",
                "upperdir=/s/3/fs",
                "workdir=/s/3/work",
            ],
        );
        assert_eq!(
            Layers::from_mounts(&[ov], Path::new("/b")).unwrap(),
            Layers::Lower(vec!["/s/2/fs".into(), "/s/1/fs".into()])
        );
        let bind = m("bind", "/s/1/fs", &["rbind", "ro"]);
        assert_eq!(
            Layers::from_mounts(&[bind], Path::new("/b")).unwrap(),
            Layers::Dir("/s/1/fs".into())
        );
        assert_eq!(
            Layers::from_mounts(&[], Path::new("/b")).unwrap(),
            Layers::Dir("/b/rootfs".into())
        );
        let e = Layers::from_mounts(&[m("overlay", "o", &["upperdir=/x"])], Path::new("/b"))
            .unwrap_err();
        assert!(e.to_string().contains("without lowerdir"));
        let e = Layers::from_mounts(
            &[m("nfs", "h:/x", &[]), m("bind", "/y", &[])],
            Path::new("/b"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nfs h:/x"));
    }

    #[test]
    fn the_same_layer_chain_has_the_same_key() {
        let a = Layers::Lower(vec!["/s/2/fs".into(), "/s/1/fs".into()]);
        let b = Layers::Lower(vec!["/s/2/fs".into(), "/s/1/fs".into()]);
        let c = Layers::Lower(vec!["/s/1/fs".into()]);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
    }
}
