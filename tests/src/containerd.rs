//! A private containerd for the end-to-end tests: its own root, state, sockets and config in a
//! temporary directory, our shim on its PATH, and the shim's config pointing at `make guest`'s
//! kernel and initramfs. Stopped, and its directory removed, on drop.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::guest_file;
use crate::workspace_root;

/// The shim binary `make build` produces.
pub fn shim_binary() -> PathBuf {
    let p = workspace_root()
        .join("target/x86_64-unknown-linux-gnu/release/containerd-shim-kubevirt-v1");
    assert!(p.exists(), "{} is missing: run `make build`", p.display());
    p
}

#[derive(Debug)]
pub struct Containerd {
    pub dir: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The shim's state directory (one subdirectory per namespace and pod).
    pub fn shim_state(&self) -> PathBuf {
        self.dir.join("shim-state")
    }

    pub fn image_cache(&self) -> PathBuf {
        self.dir.join("images")
    }

    pub fn start(name: &str) -> Containerd {
        let dir = std::env::temp_dir().join(format!("kvctrd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_binary(), bin.join("containerd-shim-kubevirt-v1")).unwrap();
        let shim_cfg = dir.join("shim.toml");
        fs::write(
            &shim_cfg,
            format!(
                "kernel = {:?}\ninitramfs = {:?}\nstate_dir = {:?}\nimage_cache = {:?}\nscratch_mib = 256\n",
                guest_file("vmlinux"),
                guest_file("initramfs.img"),
                dir.join("shim-state"),
                dir.join("images"),
            ),
        )
        .unwrap();
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
                dir.join("root"),
                dir.join("state"),
                dir.join("containerd.sock"),
                dir.join("containerd.sock.ttrpc"),
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("KUBEVIRT_SHIM_CONFIG", &shim_cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start containerd (apt-get install containerd, or make deps)");
        let c = Containerd { dir, child };
        let start = Instant::now();
        while !c.ctr(&["version"]).status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not come up:\n{}",
                c.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address <ours> ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Runs ctr and asserts success; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\nstdout: {}\nstderr: {}\ncontainerd log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports an OCI archive.
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: signals our own child (containerd), which then stops.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10)
        {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Mounts containerd left under its root (none when every task was deleted).
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.display().to_string();
            for m in mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&root))
            {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
