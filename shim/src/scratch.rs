//! The pod's scratch disk: a sparse ext4 file system that holds every container's writable
//! layer. Formatting one takes a mkfs.ext4 process (~5 ms of the pod's start); instead the
//! node keeps one formatted template per size (and mkfs) and each pod gets a copy of its
//! ~0.6 MiB of metadata, the rest left sparse.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};

use crate::error::{Result, ShimError};
use crate::rootfs::{cached, run};

/// `discard` on a new sparse file only punches holes (instant) and lets mkfs mark every
/// group's inode table zeroed; without it the guest's ext4lazyinit zeroes them itself after
/// mounting: a stream of write-zeroes requests from an otherwise idle pod.
const MKFS_OPTIONS: [&str; 4] = [
    "-q",
    "-F",
    "-E",
    "discard,lazy_itable_init=1,lazy_journal_init=1",
];

/// What the template's content depends on, besides its size: the mkfs.ext4 that makes it
/// and its configuration (a package upgrade changes their size or time).
fn template_key(mib: u64) -> String {
    let mut h = Sha256::new();
    h.update(format!("kubevirt-scratch v1 {mib} MiB {MKFS_OPTIONS:?}\n"));
    let mkfs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.exists());
    for f in mkfs
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/etc/mke2fs.conf")])
    {
        if let Ok(m) = fs::metadata(f) {
            h.update(format!(
                "{} {} {} {}\n",
                f.display(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
        }
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new scratch disk of `mib` MiB at `path`, a copy of the node's template in `cache`
/// (made on first use). Where the template cannot be had (a full or read-only cache) the
/// disk is formatted in place: slower, but the pod does not depend on the cache.
pub fn disk(path: &Path, mib: u64, cache: &Path) -> Result<()> {
    let template = cache.join(format!("scratch-{mib}M-{}.ext4", template_key(mib)));
    let made = fs::create_dir_all(cache)
        .map_err(ShimError::io(format!("create {}", cache.display())))
        .and_then(|()| cached(&template, |tmp| format(tmp, mib)));
    if let Ok(false) = made {
        remove_stale_templates(cache, mib, &template);
    }
    let copied = match made {
        Ok(_) => copy_sparse(&template, path),
        Err(e) => {
            log::warn!(
                "no scratch disk template: {e}; formatting {}",
                path.display()
            );
            format(path, mib)
        }
    };
    copied.inspect_err(|_| {
        let _ = fs::remove_file(path);
    })
}

/// Removes the templates of size `mib` other than `current` (made by an earlier mkfs), and
/// their locks. A shim copying one meanwhile keeps its open file.
fn remove_stale_templates(cache: &Path, mib: u64, current: &Path) {
    let prefix = format!("scratch-{mib}M-");
    for entry in fs::read_dir(cache).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(&prefix)
            && (name.ends_with(".ext4") || name.ends_with(".lock"))
            && path.with_extension("ext4") != current;
        if stale {
            log::info!(
                "removing the stale scratch disk template {}",
                path.display()
            );
            let _ = fs::remove_file(&path);
        }
    }
}

/// Formats a new sparse file of `mib` MiB at `path`.
fn format(path: &Path, mib: u64) -> Result<()> {
    let f = File::create(path).map_err(ShimError::io(format!("create {}", path.display())))?;
    f.set_len(mib << 20)
        .map_err(ShimError::io(format!("size {}", path.display())))?;
    drop(f);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(MKFS_OPTIONS).arg(path);
    run(&format!("mkfs.ext4 {}", path.display()), mkfs)
}

/// Copies `from` to a new file `to` of its size, writing only its data (holes stay holes).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let src = File::open(from).map_err(ShimError::io(format!("open {}", from.display())))?;
    let len = src
        .metadata()
        .map_err(ShimError::io(format!("stat {}", from.display())))?
        .len();
    let dst = File::create(to).map_err(ShimError::io(format!("create {}", to.display())))?;
    dst.set_len(len)
        .map_err(ShimError::io(format!("size {}", to.display())))?;
    let what = format!("copy {} to {}", from.display(), to.display());
    let copy = |e: std::io::Error| ShimError::io(what.as_str())(e);
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0i64;
    while (at as u64) < len {
        let data = match lseek(src.as_raw_fd(), at, Whence::SeekData) {
            Ok(d) => d,
            // No data past `at`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(copy(e.into())),
        };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole).map_err(|e| copy(e.into()))?;
        let mut off = data as u64;
        while off < hole as u64 {
            let n = buf.len().min((hole as u64 - off) as usize);
            match src.read_at(&mut buf[..n], off) {
                Ok(0) => break,
                Ok(r) => {
                    dst.write_all_at(&buf[..r], off).map_err(copy)?;
                    off += r as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(copy(e)),
            }
        }
        at = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("shim-scratch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn same_content(a: &Path, b: &Path) -> bool {
        let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let n = fa.read(&mut ba).unwrap();
            fb.read_exact(&mut bb[..n]).unwrap();
            if ba[..n] != bb[..n] {
                return false;
            }
            if n == 0 {
                return fb.read(&mut bb).unwrap() == 0;
            }
        }
    }

    #[test]
    fn a_scratch_disk_is_sparse_with_its_inode_tables_marked_zeroed() {
        let d = dir("itable");
        let disk = d.0.join("scratch.img");
        super::disk(&disk, 1024, &d.0.join("cache")).unwrap();
        let allocated = fs::metadata(&disk).unwrap().blocks() * 512;
        let out = Command::new("dumpe2fs").arg(&disk).output().unwrap();
        assert!(out.status.success(), "dumpe2fs: {out:?}");
        let report = String::from_utf8_lossy(&out.stdout);
        let groups: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("Group ") && l.contains("(Blocks"))
            .collect();
        // 1 GiB: 8 groups of 128 MiB. A group left unzeroed is work for the guest.
        assert_eq!(groups.len(), 8, "{report}");
        for g in &groups {
            assert!(g.contains("ITABLE_ZEROED"), "{g}");
        }
        assert!(allocated < 8 << 20, "{allocated} bytes allocated");
    }

    #[test]
    fn each_disk_is_a_sparse_copy_of_one_template_per_size() {
        let d = dir("template");
        let cache = d.0.join("cache");
        let (a, b, c) = (d.0.join("a"), d.0.join("b"), d.0.join("c"));
        disk(&a, 256, &cache).unwrap();
        let templates = |size: &str| -> Vec<PathBuf> {
            fs::read_dir(&cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    name.starts_with(&format!("scratch-{size}-")) && name.ends_with(".ext4")
                })
                .collect()
        };
        let t = templates("256M");
        assert_eq!(t.len(), 1, "{t:?}");
        let made = fs::metadata(&t[0]).unwrap().modified().unwrap();
        disk(&b, 256, &cache).unwrap();
        assert_eq!(
            fs::metadata(&t[0]).unwrap().modified().unwrap(),
            made,
            "made again"
        );
        disk(&c, 512, &cache).unwrap();
        assert_eq!(templates("512M").len(), 1);
        // Nothing but the templates and their locks is left in the cache.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 4);

        for (p, mib) in [(&a, 256u64), (&b, 256), (&c, 512)] {
            let m = fs::metadata(p).unwrap();
            assert_eq!(m.len(), mib << 20);
            assert!(
                m.blocks() * 512 < 4 << 20,
                "{} bytes allocated",
                m.blocks() * 512
            );
            let fsck = Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(p)
                .output()
                .unwrap();
            assert!(fsck.status.success(), "e2fsck {}: {fsck:?}", p.display());
        }
        assert!(same_content(&a, &t[0]));
        assert!(same_content(&a, &b));
    }

    #[test]
    fn a_new_template_replaces_those_of_an_earlier_mkfs_of_its_size() {
        let d = dir("stale");
        let cache = d.0.join("cache");
        fs::create_dir_all(&cache).unwrap();
        let old = [
            "scratch-64M-0123456789abcdef.ext4",
            "scratch-64M-0123456789abcdef.lock",
        ];
        let other_size = "scratch-128M-0123456789abcdef.ext4";
        for n in old.iter().chain([&other_size]) {
            fs::write(cache.join(n), b"").unwrap();
        }
        disk(&d.0.join("disk"), 64, &cache).unwrap();
        for n in old {
            assert!(!cache.join(n).exists(), "{n} is left");
        }
        assert!(
            cache.join(other_size).exists(),
            "another size's template is kept"
        );
        let names: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_disk_that_cannot_be_made_says_where_and_leaves_nothing() {
        let d = dir("fail");
        let to = d.0.join("missing-dir").join("scratch.img");
        let e = disk(&to, 64, &d.0.join("cache")).unwrap_err().to_string();
        assert!(e.contains(&to.display().to_string()), "{e}");
        assert!(!to.exists());
    }

    #[test]
    fn without_a_usable_cache_the_disk_is_formatted_in_place() {
        let d = dir("nocache");
        let file = d.0.join("a-file");
        fs::write(&file, b"").unwrap();
        // A cache that cannot be made, and one too small for the template.
        let small = d.0.join("small");
        fs::create_dir_all(&small).unwrap();
        let small_arg = small.display().to_string();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", &small_arg])
            .status()
            .unwrap()
            .success();
        let unmount = mounted.then(|| Unmount(small.clone()));
        let mut caches = vec![file.join("cache")];
        if mounted {
            caches.push(small.clone());
        }
        for (i, cache) in caches.iter().enumerate() {
            let p = d.0.join(format!("disk{i}"));
            disk(&p, 64, cache).unwrap();
            let fsck = Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(fsck.status.success(), "{}: {fsck:?}", cache.display());
        }
        if mounted {
            let left: Vec<_> = fs::read_dir(&small)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            drop(unmount);
            assert!(
                left.iter().all(|n| !n.to_string_lossy().contains(".tmp.")),
                "a half-made template is left: {left:?}"
            );
        } else {
            println!("  not root: the full-cache case is not tried");
        }
    }
}
