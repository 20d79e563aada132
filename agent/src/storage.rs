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

/// Read-only image mounts shared by the containers that use them.
#[derive(Debug, Default)]
pub struct Images {
    users: Mutex<HashMap<String, usize>>,
}

impl Images {
    fn dir(serial: &str) -> PathBuf {
        Path::new(RUN_DIR).join("images").join(serial)
    }

    /// Mounts the EROFS image on the disk `serial` (once) and returns its mount point.
    pub fn acquire(&self, serial: &str) -> Result<PathBuf> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Self::dir(serial);
        if let Some(n) = users.get_mut(serial) {
            *n += 1;
            return Ok(dir);
        }
        let dev = blockdev::find_by_serial(serial)?;
        mount_at(
            &dev,
            &dir,
            "erofs",
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None,
        )?;
        users.insert(serial.to_owned(), 1);
        Ok(dir)
    }

    pub fn release(&self, serial: &str) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = users.get_mut(serial) {
            *n -= 1;
            if *n == 0 {
                users.remove(serial);
                let dir = Self::dir(serial);
                unmount(&dir);
                let _ = fs::remove_dir(&dir);
            }
        }
    }
}

/// A container's mounted root file system; unmounted by [`Rootfs::teardown`].
#[derive(Debug)]
pub struct Rootfs {
    pub path: PathBuf,
    image: String,
    scratch: PathBuf,
}

impl Rootfs {
    /// overlayfs at `<dir>/rootfs`: the image below, `<dir>/scratch/{upper,work}` above.
    pub fn build(images: &Images, dir: &Path, image: &str, scratch_serial: &str) -> Result<Rootfs> {
        let lower = images.acquire(image)?;
        let scratch = dir.join("scratch");
        let layered = (|| {
            if scratch_serial.is_empty() {
                mount_at(
                    Path::new("scratch"),
                    &scratch,
                    "tmpfs",
                    MsFlags::MS_NODEV,
                    Some("mode=0755"),
                )?;
            } else {
                let dev = blockdev::find_by_serial(scratch_serial)?;
                mount_at(&dev, &scratch, "ext4", MsFlags::MS_NODEV, None)?;
            }
            for d in ["upper", "work"] {
                let p = scratch.join(d);
                fs::create_dir_all(&p)
                    .map_err(AgentError::io(format!("create {}", p.display())))?;
            }
            let path = dir.join("rootfs");
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                scratch.join("upper").display(),
                scratch.join("work").display()
            );
            mount_at(
                Path::new("overlay"),
                &path,
                "overlay",
                MsFlags::empty(),
                Some(&opts),
            )?;
            Ok(path)
        })();
        match layered {
            Ok(path) => Ok(Rootfs {
                path,
                image: image.to_owned(),
                scratch,
            }),
            Err(e) => {
                if scratch.exists() {
                    unmount(&scratch);
                }
                images.release(image);
                Err(e)
            }
        }
    }

    pub fn teardown(&self, images: &Images) {
        unmount(&self.path);
        unmount(&self.scratch);
        images.release(&self.image);
    }
}

/// Mounts a pod volume (a virtio-blk disk) at /run/kubevirt/volumes/<name>. Without a file
/// system type the device node itself is bound there, for raw block volumes.
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
