//! A private containerd for the end-to-end tests: its own root, state, sockets and config in a
//! temporary directory, our shim on its PATH, and the shim's config pointing at `make guest`'s
//! kernel and initramfs. Stopped, and its directory removed, on drop.

use std::fs;
use std::io::Write;
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

/// The runtime tables of the drop-in the node installer writes for containerd config
/// `version` (deploy/containerd/kubevirt-v<version>.toml without comments and version line).
pub fn runtime_tables(version: u8) -> String {
    let path = workspace_root().join(format!("deploy/containerd/kubevirt-v{version}.toml"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.starts_with("version"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[derive(Debug)]
pub struct Containerd {
    pub dir: PathBuf,
    child: Child,
    /// The network namespace a CRI containerd runs in (`None`: no CRI).
    cri_netns: Option<String>,
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

    /// containerd with only the API `ctr` uses (no CRI).
    pub fn start(name: &str) -> Containerd {
        Self::start_in(name, None, |c| c)
    }

    /// [`Containerd::start`] with the shim's config.toml passed through `edit` (to test
    /// what a bad configuration does).
    pub fn start_with_shim_config(name: &str, edit: impl Fn(String) -> String) -> Containerd {
        Self::start_in(name, None, edit)
    }

    /// containerd with the CRI plugin, runtime handlers `kubevirt` and `runc` (the default),
    /// and a CNI bridge network, run inside the test's network namespace `netns` so the
    /// bridge and pod traffic stay there. `localhost/pause:test` must be imported into namespace k8s.io before pods run.
    pub fn start_cri(name: &str, netns: &str) -> Containerd {
        Self::start_in(name, Some(netns), |c| c)
    }

    /// [`Containerd::start_cri`] with the pause image and a busybox image tagged `busybox`
    /// (built here) imported into namespace k8s.io.
    pub fn start_cri_with_images(name: &str, netns: &str, busybox: &str) -> Containerd {
        Self::start_cri_configured(name, netns, busybox, |c| c)
    }

    /// [`Containerd::start_cri_with_images`] with the shim's config.toml passed through
    /// `edit`.
    pub fn start_cri_configured(
        name: &str,
        netns: &str,
        busybox: &str,
        edit: impl Fn(String) -> String,
    ) -> Containerd {
        let c = Self::start_in(name, Some(netns), edit);
        let pause = c.dir.join("pause.tar");
        crate::images::pause_oci_archive(&pause);
        c.import_cri(&pause);
        let archive = c.dir.join("busybox.tar");
        crate::images::busybox_oci_archive(&archive, busybox);
        c.import_cri(&archive);
        c
    }

    fn start_in(
        name: &str,
        cri_netns: Option<&str>,
        edit: impl Fn(String) -> String,
    ) -> Containerd {
        let dir = std::env::temp_dir().join(format!("kvctrd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_binary(), bin.join("containerd-shim-kubevirt-v1")).unwrap();
        let shim_cfg = dir.join("shim.toml");
        let text = format!(
            "kernel = {:?}\ninitramfs = {:?}\nstate_dir = {:?}\nimage_cache = {:?}\nscratch_mib = 256\n",
            guest_file("vmlinux"),
            guest_file("initramfs.img"),
            dir.join("shim-state"),
            dir.join("images"),
        );
        fs::write(&shim_cfg, edit(text)).unwrap();
        let config = dir.join("config.toml");
        let mut text = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
            dir.join("root"),
            dir.join("state"),
            dir.join("containerd.sock"),
            dir.join("containerd.sock.ttrpc"),
        );
        match cri_netns {
            None => text.insert_str(0, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"),
            Some(_) => {
                let cni = dir.join("cni");
                fs::create_dir_all(&cni).unwrap();
                fs::write(
                    cni.join("10-kvtest.conflist"),
                    serde_json::json!({
                        "cniVersion": "0.4.0",
                        "name": "kvtest",
                        "plugins": [{
                            "type": "bridge", "bridge": "kvbr0", "isGateway": true, "ipMasq": false,
                            "ipam": {"type": "host-local", "dataDir": dir.join("cni-ipam"),
                                     "ranges": [[{"subnet": "10.203.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
                        }]
                    })
                    .to_string(),
                )
                .unwrap();
                // restrict_oom_score_adj: CRI asks for oom_score_adj -998 for the pause
                // container, and runc writes it in the container's init; a host without
                // CAP_SYS_RESOURCE in its bounding set (the CI machines) refuses a lower value
                // (EACCES), and runc then fails with "can't get final child's PID from pipe".
                // With it, containerd caps the value at its own score (as in rootless mode).
                text.push_str(&format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"localhost/pause:test\"\n  restrict_oom_score_adj = true\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = {:?}\n",
                    cni
                ));
                // The kubevirt runtime as the node installer adds it (deploy/containerd/).
                text.push_str(&runtime_tables(2));
            }
        }
        fs::write(&config, text).unwrap();
        let c = Containerd {
            child: Self::launch(&dir, cri_netns),
            dir,
            cri_netns: cri_netns.map(str::to_owned),
        };
        c.wait_ready();
        c
    }

    /// Starts containerd on the config, shim config and PATH in `dir`.
    fn launch(dir: &Path, cri_netns: Option<&str>) -> Child {
        let path = format!(
            "{}:{}",
            dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .unwrap();
        let mut cmd = match cri_netns {
            // In the test's network namespace, with a private copy of the mount table (the pod
            // netns mounts stay ours) that keeps the host's cgroup mounts, which runc needs
            // (`ip netns exec` would remount /sys and hide them).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).args([
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "containerd",
                ]);
                c
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("KUBEVIRT_SHIM_CONFIG", dir.join("shim.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start containerd (apt-get install containerd, or make deps)")
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while !self.ctr(&["version"]).status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not come up:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM, as systemd does) and starts it again on the same root,
    /// state and config; the shims, and their pods, run on.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::launch(&self.dir, self.cri_netns.as_deref());
        self.wait_ready();
    }

    fn stop(&mut self) {
        // SAFETY: signals our own child (containerd), which then stops.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10)
        {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// containerd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// containerd's mount namespace (a private one in CRI mode), where its shims see mounts.
    pub fn mount_ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.child.id()))
    }

    /// The pid of the shim serving container `id` (panics unless there is one).
    pub fn shim_pid(&self, id: &str) -> u32 {
        let pattern = format!(
            "containerd-shim-kubevirt-v1 .*-id {id} .*{}",
            self.dir.display()
        );
        match pids_matching(&pattern)[..] {
            [pid] => pid,
            ref found => panic!("no single shim process for {id}: {found:?}"),
        }
    }

    /// The `pgrep -f` patterns of this containerd's shims and of their VM processes (QEMU).
    pub fn pod_process_patterns(&self) -> [String; 2] {
        let dir = self.dir.display();
        [
            format!("containerd-shim-kubevirt-v1 .*{dir}"),
            format!("qemu-system.*{dir}"),
        ]
    }

    /// The pids of this containerd's shims and of their VM processes (QEMU).
    pub fn pod_pids(&self) -> (Vec<u32>, Vec<u32>) {
        let [shims, vms] = self.pod_process_patterns();
        (pids_matching(&shims), pids_matching(&vms))
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

    /// `ctr --address <ours> ARGS` with `input` on its stdin.
    pub fn ctr_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().expect("wait for ctr");
        writer.join().unwrap().expect("write ctr's stdin");
        out
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

    /// Imports an OCI archive (namespace `default`, what `ctr` uses).
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }

    /// Imports an OCI archive into namespace `k8s.io`, where the CRI looks.
    pub fn import_cri(&self, archive: &Path) {
        self.ctr_ok(&[
            "-n",
            "k8s.io",
            "images",
            "import",
            archive.to_str().unwrap(),
        ]);
    }
}

/// The pids of the processes whose command line matches `pattern` (`pgrep -f`).
pub fn pids_matching(pattern: &str) -> Vec<u32> {
    Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A failing test's evidence (the shims' logs are in it) goes with the directory.
        if std::thread::panicking() {
            eprintln!(
                "--- containerd's log, last 60 lines ---\n{}",
                tail(&self.log(), 60)
            );
        }
        // Shims and VMs of pods a failed test left running (each names our directory).
        let (shim_pids, _) = self.pod_pids();
        for pattern in self.pod_process_patterns() {
            let _ = Command::new("pkill").args(["-9", "-f", &pattern]).status();
        }
        // What `containerd-shim-kubevirt-v1 delete` removes after a dead shim: its QEMU's
        // socket directories.
        for pid in shim_pids {
            vmm::qemu::remove_socket_dirs(pid);
        }
        // Pod network namespaces are mounted in containerd's own mount namespace: note them
        // before it goes, to delete the host's entries.
        let pod_netns: Vec<String> =
            fs::read_to_string(format!("/proc/{}/mounts", self.child.id()))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter_map(|m| {
                    m.strip_prefix("/run/netns/")
                        .or_else(|| m.strip_prefix("/var/run/netns/"))
                })
                .filter(|n| n.starts_with("cni-"))
                .map(str::to_owned)
                .collect();
        self.stop();
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
        // Pod network namespaces containerd did not get to remove.
        for name in pod_netns {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
