//! Disks in the guest: shared read-only EROFS image mounts, per-container overlay rootfs over an
//! ext4 (or tmpfs) scratch layer, and pod volumes.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::blockdev;
use crate::error::{AgentError, Result};
use crate::init::RUN_DIR;

/// A name used as one path component: no separators, no dot names.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
        || name.len() > 200
    {
        return Err(AgentError::invalid(
            what,
            format!("{name:?} must be one path component"),
        ));
    }
    Ok(())
}

fn mount_at(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).map_err(AgentError::io(format!("create {}", target.display())))?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(AgentError::sys(format!(
        "mount {} ({fstype}) on {}",
        source.display(),
        target.display()
    )))
}

fn unmount(target: &Path) {
    if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
        log::warn!("unmount {}: {e}", target.display());
    }
}

/// Disks mounted once and shared by the containers that use them: read-only EROFS images
/// under /run/kubevirt/images/<serial>, writable ext4 scratch disks under
/// /run/kubevirt/scratch/<serial> (a directory per container inside).
#[derive(Debug, Default)]
pub struct SharedDisks {
    users: Mutex<HashMap<String, (PathBuf, usize)>>,
}

/// How a shared disk is mounted.
#[derive(Debug, Clone, Copy)]
pub enum Shared {
    Image,
    Scratch,
}

/// Drops the guest's cached blocks of `dev`: a media slot may hold a new medium since the
/// kernel last read it.
fn flush_buffers(dev: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(dev).map_err(AgentError::io(format!("open {}", dev.display())))?;
    // BLKFLSBUF = _IO(0x12, 97)
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument; the fd is open for the call's duration.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) };
    if rc < 0 {
        return Err(AgentError::io(format!(
            "flush the buffers of {}",
            dev.display()
        ))(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl SharedDisks {
    /// Mounts the disk `serial` (once) and returns its mount point.
    pub fn acquire(&self, serial: &str, kind: Shared) -> Result<PathBuf> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((dir, n)) = users.get_mut(serial) {
            *n += 1;
            return Ok(dir.clone());
        }
        let dev = blockdev::find_by_serial(serial)?;
        flush_buffers(&dev)?;
        let (sub, fstype, flags) = match kind {
            Shared::Image => ("images", "erofs", MsFlags::MS_RDONLY | MsFlags::MS_NODEV),
            Shared::Scratch => ("scratch", "ext4", MsFlags::MS_NODEV),
        };
        let dir = Path::new(RUN_DIR).join(sub).join(serial);
        mount_at(&dev, &dir, fstype, flags, None)?;
        users.insert(serial.to_owned(), (dir.clone(), 1));
        Ok(dir)
    }

    pub fn release(&self, serial: &str) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((dir, n)) = users.get_mut(serial) {
            *n -= 1;
            if *n == 0 {
                let dir = dir.clone();
                users.remove(serial);
                unmount(&dir);
                let _ = fs::remove_dir(&dir);
            }
        }
    }
}

/// Where a container's writable layer lives.
#[derive(Debug)]
enum Upper {
    /// A tmpfs of its own, mounted at this path.
    Tmpfs(PathBuf),
    /// A directory of its own on a shared scratch disk.
    Disk { serial: String, dir: PathBuf },
}

/// A container's mounted root file system; unmounted by [`Rootfs::teardown`].
#[derive(Debug)]
pub struct Rootfs {
    pub path: PathBuf,
    image: String,
    upper: Upper,
}

impl Rootfs {
    /// overlayfs at `<dir>/rootfs`: the image below, the container's `upper` and `work`
    /// directories (on the scratch disk, or a tmpfs) above.
    pub fn build(
        disks: &SharedDisks,
        dir: &Path,
        id: &str,
        image: &str,
        scratch_serial: &str,
    ) -> Result<Rootfs> {
        let lower = disks.acquire(image, Shared::Image)?;
        let upper = if scratch_serial.is_empty() {
            let p = dir.join("scratch");
            match mount_at(
                Path::new("scratch"),
                &p,
                "tmpfs",
                MsFlags::MS_NODEV,
                Some("mode=0755"),
            ) {
                Ok(()) => Upper::Tmpfs(p),
                Err(e) => {
                    disks.release(image);
                    return Err(e);
                }
            }
        } else {
            match disks.acquire(scratch_serial, Shared::Scratch) {
                Ok(root) => Upper::Disk {
                    serial: scratch_serial.to_owned(),
                    dir: root.join(id),
                },
                Err(e) => {
                    disks.release(image);
                    return Err(e);
                }
            }
        };
        let rootfs = Rootfs {
            path: dir.join("rootfs"),
            image: image.to_owned(),
            upper,
        };
        let layer = match &rootfs.upper {
            Upper::Tmpfs(p) | Upper::Disk { dir: p, .. } => p.clone(),
        };
        let mounted = (|| {
            // A container id reused after a crash must not see the old writable layer.
            if matches!(rootfs.upper, Upper::Disk { .. }) {
                let _ = fs::remove_dir_all(&layer);
            }
            for d in ["upper", "work"] {
                let p = layer.join(d);
                fs::create_dir_all(&p)
                    .map_err(AgentError::io(format!("create {}", p.display())))?;
            }
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                layer.join("upper").display(),
                layer.join("work").display()
            );
            mount_at(
                Path::new("overlay"),
                &rootfs.path,
                "overlay",
                MsFlags::empty(),
                Some(&opts),
            )
        })();
        match mounted {
            Ok(()) => Ok(rootfs),
            Err(e) => {
                rootfs.release_layers(disks);
                Err(e)
            }
        }
    }

    fn release_layers(&self, disks: &SharedDisks) {
        match &self.upper {
            Upper::Tmpfs(p) => unmount(p),
            Upper::Disk { serial, dir } => {
                let _ = fs::remove_dir_all(dir);
                disks.release(serial);
            }
        }
        disks.release(&self.image);
    }

    /// Where the pod's disk-backed emptyDirs live: on the scratch disk beside the container's
    /// writable layer, so that what a pod writes there takes disk space as it would under
    /// runc, not guest memory; in guest memory only for a container without a scratch disk.
    pub fn emptydir(&self) -> PathBuf {
        match &self.upper {
            Upper::Disk { dir, .. } => dir.with_file_name(".emptydir"),
            Upper::Tmpfs(_) => Path::new(RUN_DIR).join(crate::spec::EMPTYDIR),
        }
    }

    pub fn teardown(&self, disks: &SharedDisks) {
        unmount(&self.path);
        self.release_layers(disks);
    }
}

/// Mounts a pod volume (a virtio-blk disk) at /run/kubevirt/volumes/<name>. Without a file
/// system type the device node itself is bound there, for raw block volumes.
/// A pod-wide tmpfs (a memory-backed emptyDir) with the size kubelet gave its host tmpfs.
fn mount_tmpfs(target: &Path, options: &[String]) -> Result<PathBuf> {
    let valid = |o: &String| {
        let (k, v) = o.split_once('=').unwrap_or((o, ""));
        matches!(k, "size" | "mode")
            && !v.is_empty()
            && v.chars().all(|c| c.is_ascii_alphanumeric())
    };
    if let Some(bad) = options.iter().find(|o| !valid(o)) {
        return Err(AgentError::invalid("tmpfs option", format!("{bad:?}")));
    }
    fs::create_dir_all(target).map_err(AgentError::io(format!("create {}", target.display())))?;
    let data = options.join(",");
    if let Err(e) = mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(data.as_str()),
    ) {
        let _ = fs::remove_dir(target);
        return Err(AgentError::sys(format!(
            "mount tmpfs on {}",
            target.display()
        ))(e));
    }
    Ok(target.to_owned())
}

pub fn mount_volume(
    name: &str,
    serial: &str,
    fstype: &str,
    options: &[String],
    read_only: bool,
) -> Result<PathBuf> {
    check_name("volume name", name)?;
    let target = Path::new(RUN_DIR).join("volumes").join(name);
    if target.exists() {
        return Err(AgentError::invalid(
            "volume name",
            format!("{name:?} is already mounted"),
        ));
    }
    if fstype == "tmpfs" && serial.is_empty() {
        return mount_tmpfs(&target, options);
    }
    let dev = blockdev::find_by_serial(serial)?;
    let mut flags = MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if fstype.is_empty() {
        fs::write(&target, b"").map_err(AgentError::io(format!("create {}", target.display())))?;
        mount(
            Some(&dev),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(AgentError::sys(format!(
            "bind {} on {}",
            dev.display(),
            target.display()
        )))?;
        return Ok(target);
    }
    if !fstype.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(AgentError::invalid(
            "file system type",
            format!("{fstype:?}"),
        ));
    }
    let data = options.join(",");
    let data = (!data.is_empty()).then_some(data);
    if let Err(e) = mount_at(&dev, &target, fstype, flags, data.as_deref()) {
        let _ = fs::remove_dir(&target);
        return Err(e);
    }
    Ok(target)
}

/// Unmounts every pod volume (before power-off, so data reaches the disks).
pub fn unmount_volumes() {
    let dir = Path::new(RUN_DIR).join("volumes");
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        unmount(&entry.path());
    }
}
