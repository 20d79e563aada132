//! Disk images for the guest tests: a busybox container image as EROFS (the read-only layer the
//! shim makes of an OCI image), and sparse ext4 disks (scratch layers, volumes).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's static busybox, the one program of the test image.
pub fn busybox() -> PathBuf {
    let p = PathBuf::from("/bin/busybox");
    assert!(
        p.exists(),
        "/bin/busybox is missing: install busybox-static (make deps)"
    );
    p
}

/// Lays out a busybox root file system in `root`: the binary, a link per applet, /etc basics
/// and the empty mount points a container runtime expects.
pub fn busybox_rootfs(root: &Path) {
    busybox_rootfs_marked(root, "busybox test image");
}

/// [`busybox_rootfs`] whose /etc/image-marker says `marker` (tells images apart).
pub fn busybox_rootfs_marked(root: &Path, marker: &str) {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::copy(busybox(), bin.join("busybox")).unwrap();
    let list = Command::new(busybox())
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", bin.join(applet));
        }
    }
    for d in [
        "proc", "sys", "dev", "tmp", "etc", "root", "data", "var", "run",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    fs::write(root.join("etc/image-marker"), format!("{marker}\n")).unwrap();
}

/// A busybox test image as EROFS at `path`.
pub fn busybox_erofs(path: &Path) {
    let root = path.with_extension("rootfs");
    let _ = fs::remove_dir_all(&root);
    busybox_rootfs(&root);
    run(Command::new("mkfs.erofs")
        .args(["--quiet", "--all-root", "-T0"])
        .arg(path)
        .arg(&root));
    fs::remove_dir_all(&root).unwrap();
}

/// A sparse, empty ext4 disk of `mib` MiB at `path`.
pub fn ext4(path: &Path, mib: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=1",
            "-O",
            "^has_journal",
        ])
        .arg(path));
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI image archive (what `ctr images import` takes) of the busybox test image, named
/// `name` (e.g. `localhost/busybox:test`), its one layer an uncompressed tar.
pub fn busybox_oci_archive(path: &Path, name: &str) {
    busybox_oci_archive_marked(path, name, "busybox test image");
}

/// [`busybox_oci_archive`] with its own /etc/image-marker.
pub fn busybox_oci_archive_marked(path: &Path, name: &str, marker: &str) {
    busybox_oci_archive_with(path, name, marker, &["sh"]);
}

/// A pause-like image for CRI pod sandboxes: busybox sleeping forever.
pub fn pause_oci_archive(path: &Path) {
    busybox_oci_archive_with(
        path,
        "localhost/pause:test",
        "pause",
        &["sleep", "2147483647"],
    );
}

fn busybox_oci_archive_with(path: &Path, name: &str, marker: &str, cmd: &[&str]) {
    let work = path.with_extension("work");
    let _ = fs::remove_dir_all(&work);
    let root = work.join("rootfs");
    busybox_rootfs_marked(&root, marker);
    let layer_path = work.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&layer_path)
        .arg("."));
    let layer = fs::read(&layer_path).unwrap();
    let layer_digest = sha256_hex(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer.len()}]
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest")}
        }]
    }))
    .unwrap();
    let oci = work.join("oci");
    let blobs = oci.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    for blob in [&layer, &config, &manifest] {
        fs::write(blobs.join(sha256_hex(blob)), blob).unwrap();
    }
    fs::write(oci.join("index.json"), index).unwrap();
    fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(path)
        .arg("."));
    fs::remove_dir_all(&work).unwrap();
}
