//! A private mount namespace for the VMM process the `qemu` back end starts: between fork and
//! exec the child gets a mount table of its own whose root is an empty tmpfs holding only
//! what QEMU uses (its binary and libraries under /usr, the loader cache, its firmware, the
//! guest kernel and initramfs, the vhost-user socket directory, /dev/null and /dev/kvm),
//! read-only but for the sockets. No /proc, no /sys, no other pod's files: a guest that
//! takes QEMU over finds nothing else to read or write. Nothing propagates back to the host.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Host paths every jail holds, where they exist (Debian's merged /usr has /lib, /lib64 and
/// /bin as links into it, made as links in the jail too).
const SYSTEM: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"];

/// One thing to make inside the new root, in order.
#[derive(Debug)]
enum Step {
    Dir(CString),
    File(CString),
    Link {
        target: CString,
        at: CString,
    },
    Bind {
        from: CString,
        to: CString,
        writable: bool,
    },
}

/// The jail of one VMM process: built (allocating) before the fork, entered (system calls
/// only) in the child.
#[derive(Debug)]
pub struct Jail {
    root: CString,
    steps: Vec<Step>,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Jail {
    /// A jail rooted at `root` (an empty directory the caller made and later removes).
    pub fn new(root: &Path) -> io::Result<Jail> {
        let mut j = Jail {
            root: cstr(root)?,
            steps: Vec::new(),
        };
        for p in SYSTEM {
            let p = Path::new(p);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)?;
                    j.parents(p)?;
                    let at = cstr(&j.inside(p))?;
                    j.steps.push(Step::Link {
                        target: cstr(&target)?,
                        at,
                    });
                }
                Ok(_) => j.bind(p, false)?,
                Err(_) => {}
            }
        }
        Ok(j)
    }

    fn inside(&self, p: &Path) -> PathBuf {
        let root = Path::new(std::ffi::OsStr::from_bytes(self.root.as_bytes()));
        root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// Steps making every directory above `p` in the jail.
    fn parents(&mut self, p: &Path) -> io::Result<()> {
        let mut at = PathBuf::from("/");
        let parent = p.parent().unwrap_or(Path::new("/"));
        for c in parent.components() {
            if let Component::Normal(name) = c {
                at.push(name);
                let dir = cstr(&self.inside(&at))?;
                if !self
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::Dir(d) if *d == dir))
                {
                    self.steps.push(Step::Dir(dir));
                }
            }
        }
        Ok(())
    }

    /// Makes host path `p` (a file or a directory) appear at the same path in the jail.
    pub fn bind(&mut self, p: &Path, writable: bool) -> io::Result<()> {
        let p = std::fs::canonicalize(p)?;
        self.parents(&p)?;
        let to = cstr(&self.inside(&p))?;
        if std::fs::metadata(&p)?.is_dir() {
            self.steps.push(Step::Dir(to.clone()));
        } else {
            self.steps.push(Step::File(to.clone()));
        }
        self.steps.push(Step::Bind {
            from: cstr(&p)?,
            to,
            writable,
        });
        Ok(())
    }

    /// Moves the calling process into a new mount namespace rooted at the jail. Only raw
    /// system calls: it runs in the forked child of a threaded process (`pre_exec`).
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: every pointer below is a NUL-terminated string owned by `self` (or a
        // literal), alive for its call; the other arguments are integers.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may reach the host's mount table.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=64k".as_ptr().cast(),
            ))?;
            for step in &self.steps {
                match step {
                    Step::Dir(d) => {
                        if libc::mkdir(d.as_ptr(), 0o755) < 0
                            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Step::File(f) => {
                        let fd = libc::open(f.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                        check(fd)?;
                        libc::close(fd);
                    }
                    Step::Link { target, at } => {
                        check(libc::symlink(target.as_ptr(), at.as_ptr()))?
                    }
                    Step::Bind { from, to, writable } => {
                        let none = std::ptr::null();
                        check(libc::mount(
                            from.as_ptr(),
                            to.as_ptr(),
                            none,
                            libc::MS_BIND | libc::MS_REC,
                            none.cast(),
                        ))?;
                        if !writable {
                            let flags = libc::MS_BIND
                                | libc::MS_REMOUNT
                                | libc::MS_RDONLY
                                | libc::MS_NOSUID
                                | libc::MS_NODEV;
                            check(libc::mount(none, to.as_ptr(), none, flags, none.cast()))?;
                        }
                    }
                }
            }
            // The root tmpfs itself becomes read-only, then the root: `pivot_root(".", ".")`
            // stacks the old root on the new one, and detaching it leaves the jail alone.
            check(libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_jailed_process_sees_only_what_was_bound() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mount namespaces need root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kvjail-{}", std::process::id()));
        let root = dir.join("root");
        let shared = dir.join("shared");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        let secret = dir.join("secret.txt");
        std::fs::write(&secret, "not for the VMM").unwrap();
        let given = dir.join("kernel.img");
        std::fs::write(&given, "the kernel").unwrap();
        let mut jail = Jail::new(&root).unwrap();
        jail.bind(&given, false).unwrap();
        jail.bind(&shared, true).unwrap();
        let script = format!(
            "cat {given}; test -e {secret} && echo SECRET; test -e /proc/1 && echo PROC; \
             echo x > {given} 2>/dev/null && echo WROTE-RO; echo made > {shared}/out; \
             ls /",
            given = given.display(),
            secret = secret.display(),
            shared = shared.display()
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        // SAFETY: Jail::enter makes raw system calls only.
        unsafe { cmd.pre_exec(move || jail.enter()) };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{out:?}");
        assert!(text.starts_with("the kernel"), "{text}");
        for leak in ["SECRET", "PROC", "WROTE-RO"] {
            assert!(!text.contains(leak), "{leak}: {text}");
        }
        let top: Vec<&str> = text.lines().skip(1).collect();
        assert!(top.contains(&"usr") && top.contains(&"tmp"), "{top:?}");
        assert!(!top.contains(&"home") && !top.contains(&"root") && !top.contains(&"proc"));
        assert_eq!(
            std::fs::read_to_string(shared.join("out")).unwrap(),
            "made\n"
        );
        // Nothing of the jail reached the host's mount table.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&*root.to_string_lossy()), "{mounts}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
