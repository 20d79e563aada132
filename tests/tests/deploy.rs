//! The node installer (`deploy/install.sh`) against directories laid out like nodes with
//! containerd 1.6 (config version 2), containerd 2.x (version 3) and no config at all: the
//! files it writes, a second run changing nothing, the real containerd accepting the result
//! (Debian's 1.6, and Debian unstable's 2.x binary that `make deps` keeps in the cache),
//! upgrades keeping versions in use, and the uninstaller restoring the node byte for byte.
//!
//! Needs root, containerd, `make build` and `make guest`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const INSTALLER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/install.sh");
const OPT: &str = "opt/kubevirt-shim";

/// A containerd 1.6 node's config: CRI settings of its own the drop-in must keep.
const CONFIG_V2: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "example.com/pause:9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

/// A containerd 2.x node's config, with an `imports` line of its own.
const CONFIG_V3: &str = r#"version = 3
imports = ["/etc/containerd/other.toml"]

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
"#;

fn installer(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(INSTALLER)
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .unwrap()
}

struct Node {
    root: PathBuf,
    payload: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What `make payload` lays out: the shim, kubevirt-vmm, the guest kernel and initramfs.
fn payload(dir: &Path) -> PathBuf {
    let p = dir.join("payload");
    let bin = repo().join("target/x86_64-unknown-linux-gnu/release");
    let guest = repo().join("target/guest");
    for (from, to) in [
        (bin.join("containerd-shim-kubevirt-v1"), "bin"),
        (bin.join("kubevirt-vmm"), "bin"),
        (guest.join("vmlinux"), "share"),
        (guest.join("initramfs.img"), "share"),
    ] {
        assert!(
            from.exists(),
            "{} is missing: make build guest",
            from.display()
        );
        fs::create_dir_all(p.join(to)).unwrap();
        fs::copy(&from, p.join(to).join(from.file_name().unwrap())).unwrap();
    }
    p
}

impl Node {
    fn new(name: &str, config: Option<&str>) -> Node {
        let root = std::env::temp_dir().join(format!("kvnode-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["etc", "opt", "usr/local/bin"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        if let Some(c) = config {
            fs::create_dir_all(root.join("etc/containerd")).unwrap();
            fs::write(root.join("etc/containerd/config.toml"), c).unwrap();
        }
        let payload = payload(&root.with_extension("payload"));
        Node { root, payload }
    }

    /// install.sh for this node with `extra` arguments; its output.
    fn try_run(&self, extra: &[&str]) -> Output {
        let (root, payload) = (self.root.to_str().unwrap(), self.payload.to_str().unwrap());
        let mut args = vec!["--root", root, "--payload", payload, "--no-restart"];
        args.extend_from_slice(extra);
        installer(&args)
    }

    fn run(&self, extra: &[&str]) -> Output {
        let out = self.try_run(extra);
        assert!(
            out.status.success(),
            "install.sh {extra:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    fn read(&self, p: &str) -> String {
        fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// Every file, link and directory under the root with its content, target and mode.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let meta = fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().to_owned();
                let mode = meta.permissions().mode();
                if meta.file_type().is_symlink() {
                    out.insert(rel, format!("-> {}", fs::read_link(&p).unwrap().display()));
                } else if meta.is_dir() {
                    out.insert(rel, format!("dir {mode:o}"));
                    walk(root, &p, out);
                } else {
                    let digest = sha2::Sha256::digest(fs::read(&p).unwrap());
                    out.insert(rel, format!("file {mode:o} {digest:x}"));
                }
            }
        }
        use sha2::Digest;
        let mut out = BTreeMap::new();
        walk(&self.root, &self.root, &mut out);
        out
    }

    /// The versions installed under /opt/kubevirt-shim/versions.
    fn versions(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(&format!("{OPT}/versions")))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_dir_all(self.root.with_extension("payload"));
    }
}

/// `containerd config dump` of the node's config, as the real containerd reads it.
fn containerd_dump(node: &Node) -> String {
    containerd_dump_with(Path::new("containerd"), node)
}

fn containerd_dump_with(containerd: &Path, node: &Node) -> String {
    let out = Command::new(containerd)
        .arg("--config")
        .arg(node.path("etc/containerd/config.toml"))
        .args(["config", "dump"])
        .output()
        .expect("containerd");
    assert!(
        out.status.success(),
        "containerd refuses the config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs twice (the second run changes nothing), checks the common files, uninstalls
/// and checks the node is as it was. `check` sees the installed node.
fn install_check_uninstall(node: &Node, check: impl Fn(&Node)) {
    let before = node.snapshot();
    node.run(&[]);
    let installed = node.snapshot();
    node.run(&[]);
    assert_eq!(installed, node.snapshot(), "a second run changed the node");

    let versions = node.versions();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(
        fs::read_link(node.path(&format!("{OPT}/current"))).unwrap(),
        Path::new("versions").join(&versions[0])
    );
    for b in ["containerd-shim-kubevirt-v1", "kubevirt-vmm"] {
        let link = fs::read_link(node.path(&format!("usr/local/bin/{b}"))).unwrap();
        assert_eq!(link, Path::new("/opt/kubevirt-shim/current/bin").join(b));
        let exe = node.path(&format!("{OPT}/versions/{}/bin/{b}", versions[0]));
        assert_eq!(
            fs::metadata(&exe).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
    let shim_cfg = node.read("etc/kubevirt-shim/config.toml");
    assert!(
        shim_cfg.contains("kernel = \"/opt/kubevirt-shim/current/share/vmlinux\""),
        "{shim_cfg}"
    );
    check(node);

    node.run(&["--uninstall"]);
    let after = node.snapshot();
    assert_eq!(before, after, "the uninstaller did not restore the node");
}

#[test]
fn containerd_1_6_node_keeps_its_cri_settings_and_gets_the_kubevirt_runtime() {
    let node = Node::new("v2", Some(CONFIG_V2));
    install_check_uninstall(&node, |n| {
        let cfg = n.read("etc/containerd/config.toml");
        assert!(
            cfg.starts_with("version = 2\nimports = [\"conf.d/kubevirt.toml\"]\n"),
            "{cfg}"
        );
        assert_eq!(
            n.read("etc/containerd/config.toml.kubevirt-backup"),
            CONFIG_V2
        );
        let dump = containerd_dump(n);
        for want in [
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kubevirt]",
            "runtime_type = \"io.containerd.kubevirt.v1\"",
            "pod_annotations = [\"kubevirt.io/*\"]",
            // What the node had before stays: runc as the default, its options, the
            // sandbox image.
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]",
            "SystemdCgroup = true",
            "sandbox_image = \"example.com/pause:9\"",
            "default_runtime_name = \"runc\"",
        ] {
            assert!(dump.contains(want), "containerd config dump lacks {want}");
        }
    });
}

#[test]
fn containerd_2_node_gets_a_version_3_drop_in() {
    let node = Node::new("v3", Some(CONFIG_V3));
    install_check_uninstall(&node, |n| {
        let cfg: toml::Table = toml::from_str(&n.read("etc/containerd/config.toml")).unwrap();
        let imports: Vec<&str> = cfg["imports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            imports,
            ["conf.d/kubevirt.toml", "/etc/containerd/other.toml"]
        );
        let dropin: toml::Table =
            toml::from_str(&n.read("etc/containerd/conf.d/kubevirt.toml")).unwrap();
        assert_eq!(dropin["version"].as_integer(), Some(3));
        let rt = &dropin["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
            ["kubevirt"];
        assert_eq!(
            rt["runtime_type"].as_str(),
            Some("io.containerd.kubevirt.v1")
        );
        // The real containerd 2 (Debian unstable's, fetched by `make deps`) reads it all.
        let cache = std::env::var("KUBEVIRT_CACHE").unwrap_or("/var/cache/kubevirt-shim".into());
        let c2 = Path::new(&cache).join("containerd2/usr/bin/containerd");
        assert!(c2.exists(), "{} is missing: make deps", c2.display());
        let dump = containerd_dump_with(&c2, n);
        for want in [
            "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kubevirt]",
            "runtime_type = 'io.containerd.kubevirt.v1'",
            "pod_annotations = ['kubevirt.io/*']",
            "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]",
            "snapshotter = 'overlayfs'",
        ] {
            assert!(
                dump.contains(want),
                "containerd 2 config dump lacks {want}:\n{dump}"
            );
        }
    });
}

#[test]
fn a_node_without_a_containerd_config_gets_one_and_loses_it_again() {
    let node = Node::new("none", None);
    install_check_uninstall(&node, |n| {
        assert_eq!(
            n.read("etc/containerd/config.toml"),
            "version = 2\nimports = [\"conf.d/kubevirt.toml\"]\n"
        );
        assert!(containerd_dump(n).contains("io.containerd.kubevirt.v1"));
    });
}

#[test]
fn an_upgrade_keeps_the_version_running_pods_use_and_removes_unused_ones() {
    let node = Node::new("upgrade", Some(CONFIG_V2));
    node.run(&[]);
    let v1 = node.versions();
    // A process started from version 1 (as a running pod's shim is) keeps it.
    let sleeper = node.path(&format!("{OPT}/versions/{}/bin/sleep", v1[0]));
    fs::copy("/bin/sleep", &sleeper).unwrap();
    let mut running = Command::new(&sleeper).arg("60").spawn().unwrap();
    // Version 2: another initramfs.
    let initramfs = node.payload.join("share/initramfs.img");
    let mut bytes = fs::read(&initramfs).unwrap();
    bytes.extend_from_slice(&[0; 512]);
    fs::write(&initramfs, bytes).unwrap();
    let out = node.run(&[]);
    let versions = node.versions();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let v2 = versions.iter().find(|v| **v != v1[0]).unwrap().clone();
    assert_eq!(
        fs::read_link(node.path(&format!("{OPT}/current"))).unwrap(),
        Path::new("versions").join(&v2),
        "new pods get the new version"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("still in use"));
    // Once nothing runs from version 1, the next run removes it.
    running.kill().unwrap();
    running.wait().unwrap();
    node.run(&[]);
    assert_eq!(node.versions(), [v2]);
    node.run(&["--uninstall"]);
    assert!(!node.path(OPT).exists());
    assert_eq!(node.read("etc/containerd/config.toml"), CONFIG_V2);
}

#[test]
fn bad_input_is_named() {
    let node = Node::new("bad", Some("[plugins]\n"));
    let out = node.try_run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("version = 2"),
        "{err}"
    );
    let out = installer(&[
        "--root",
        "/nonexistent",
        "--payload",
        "/nonexistent/payload",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/payload"),
        "{err}"
    );
    let out = installer(&["--frobnicate"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}

/// The exe of the shim that serves container `id` of containerd `c`.
fn shim_exe(c: &tests::containerd::Containerd, id: &str) -> PathBuf {
    fs::read_link(format!("/proc/{}/exe", c.shim_pid(id))).unwrap()
}

#[test]
fn an_upgrade_under_a_running_pod_leaves_it_alone_and_new_pods_get_the_new_version() {
    use tests::containerd::Containerd;
    const IMAGE: &str = "localhost/busybox:test";
    const RUNTIME: &str = "io.containerd.kubevirt.v1";
    let node = Node::new("live", Some(CONFIG_V2));
    node.run(&[]);
    let v1 = node.versions()[0].clone();
    // containerd finds the shim through the node's `current` link, and the shim the guest
    // through it too (paths inside the fake node root).
    let current = node.path(&format!("{OPT}/current"));
    let c = Containerd::start_with_shim_config("upgrade", |cfg| {
        cfg.lines()
            .map(|l| match l.split(" = ").next() {
                Some("kernel") => format!("kernel = {:?}", current.join("share/vmlinux")),
                Some("initramfs") => {
                    format!("initramfs = {:?}", current.join("share/initramfs.img"))
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    });
    let shim_link = c.dir.join("bin/containerd-shim-kubevirt-v1");
    fs::remove_file(&shim_link).unwrap();
    std::os::unix::fs::symlink(current.join("bin/containerd-shim-kubevirt-v1"), &shim_link)
        .unwrap();
    let archive = c.dir.join("busybox.tar");
    tests::images::busybox_oci_archive(&archive, IMAGE);
    c.import(&archive);

    let run = |id: &str| {
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "1000",
        ])
    };
    run("old");
    assert!(shim_exe(&c, "old").starts_with(node.path(&format!("{OPT}/versions/{v1}"))));

    // Version 2 (another initramfs) installed under the running pod.
    let initramfs = node.payload.join("share/initramfs.img");
    let mut bytes = fs::read(&initramfs).unwrap();
    bytes.extend_from_slice(&[0; 512]);
    fs::write(&initramfs, bytes).unwrap();
    let out = node.run(&[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("version {v1} is still in use")));
    let v2 = node
        .versions()
        .into_iter()
        .find(|v| *v != v1)
        .expect("version 2");

    // The running pod goes on; a new one runs the new version.
    let echo =
        |id: &str, exec: &str| c.ctr_ok(&["task", "exec", "--exec-id", exec, id, "echo", "alive"]);
    assert_eq!(echo("old", "e1"), "alive\n");
    run("new");
    assert!(shim_exe(&c, "new").starts_with(node.path(&format!("{OPT}/versions/{v2}"))));
    assert_eq!(echo("new", "e2"), "alive\n");
    assert_eq!(echo("old", "e3"), "alive\n");

    // The old pod is removed cleanly; then version 1 is unused and goes.
    for id in ["old", "new"] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        let t0 = std::time::Instant::now();
        while c
            .ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with(id) && !l.contains("STOPPED"))
        {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "{id} did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
    let state: Vec<_> = fs::read_dir(c.shim_state())
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(state.is_empty(), "pod state left: {state:?}");
    drop(c);
    // The shims end once their pods are deleted; then the next run removes version 1.
    let t0 = std::time::Instant::now();
    while node.versions().len() > 1 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "version 1 kept: {:?}",
            node.versions()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        node.run(&[]);
    }
    assert_eq!(node.versions(), [v2]);
    node.run(&["--uninstall"]);
}
