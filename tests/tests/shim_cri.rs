//! The shim through the CRI (test ladder rung 5), as kubelet drives it: a private containerd
//! 1.6 with the CRI plugin and runtime handler `kubevirt`, CNI bridge + host-local from
//! Debian's containernetworking-plugins, all inside a network namespace the test creates.
//! One pod, two containers, one microVM.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::cri::{self, bind, container_config, pod_config, Cri};
use tests::images;
use tests::netns::NetNs;

const IMAGE: &str = "localhost/busybox:test";

/// A loop device over a file, detached on drop.
struct Loop(std::path::PathBuf);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().into())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn cri_env(name: &str) -> (NetNs, Containerd, Cri) {
    let ns = NetNs::new(name);
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = Containerd::start_cri(name, &ns.name);
    for (file, build) in [
        (
            "pause.tar",
            images::pause_oci_archive as fn(&std::path::Path),
        ),
        ("busybox.tar", |p| images::busybox_oci_archive(p, IMAGE)),
    ] {
        let archive = c.dir.join(file);
        build(&archive);
        c.import_cri(&archive);
    }
    let mut cri = Cri::connect(&c.socket()).expect("connect to the CRI");
    let v = cri.version().expect("CRI version");
    println!("  CRI: {} {}", v.runtime_name, v.runtime_version);
    (ns, c, cri)
}

fn until<T>(what: &str, c: &Containerd, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "waiting for {what}; containerd log:\n{}",
            tail(&c.log(), 40)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pod_through_the_cri_two_containers_network_files_block_volume_logs_stats() {
    let (ns, c, mut cri) = cri_env("kvcri");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let config_dir = c.dir.join("configmap");
    fs::create_dir_all(&config_dir).unwrap();
    fs::write(config_dir.join("greeting"), "hello from a configmap\n").unwrap();

    let pod_cfg = pod_config("web", &logs);
    let t0 = Instant::now();
    let pod = cri
        .run_pod(pod_cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    println!(
        "  RunPodSandbox: {:.2} s (VM boot on the qemu back end here)",
        t0.elapsed().as_secs_f64()
    );
    let server = "mkdir -p /www && cp /etc/config/greeting /www/index.html && echo server-started && exec httpd -f -p 8080 -h /www";
    let mounts = vec![bind(&config_dir, "/etc/config", true)];
    let t1 = Instant::now();
    let web = cri
        .create_container(
            &pod,
            container_config("server", IMAGE, &["sh", "-c", server], mounts),
            &pod_cfg,
        )
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", tail(&c.log(), 40)));
    cri.start_container(&web).unwrap();
    println!(
        "  CreateContainer + StartContainer: {:.2} s",
        t1.elapsed().as_secs_f64()
    );
    // A block volume: an ext4 image on a loop device, mounted at /data in the sidecar.
    let image = c.dir.join("volume.ext4");
    images::ext4(&image, 64);
    let loopdev = Loop::attach(&image);
    let volume = vec![bind(&loopdev.0, "/data", false)];
    let side = cri
        .create_container(
            &pod,
            container_config("sidecar", IMAGE, &["sleep", "1000"], volume),
            &pod_cfg,
        )
        .unwrap_or_else(|e| {
            panic!(
                "CreateContainer with a block volume: {e}\n{}",
                tail(&c.log(), 30)
            )
        });
    cri.start_container(&side).unwrap();

    // ExecSync in the other container: same VM network, the pod's hostname and DNS.
    let r = cri.exec_sync(&side, &["sh", "-c", "wget -q -O - http://127.0.0.1:8080/; hostname; grep nameserver /etc/resolv.conf; uname -r"]).unwrap();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..3],
        ["hello from a configmap", "web", "nameserver 10.96.0.10"],
        "{out}"
    );
    assert!(lines[3].ends_with("-kubevirt"), "the guest kernel: {out}");
    let r = cri.exec_sync(&side, &["sh", "-c", "exit 3"]).unwrap();
    assert_eq!(r.exit_code, 3);
    let r = cri
        .exec_sync(
            &side,
            &[
                "sh",
                "-c",
                "echo written-in-the-vm > /data/hello && sync && cat /data/hello",
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "written-in-the-vm\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // The pod IP answers from the test's network namespace (where the CNI bridge is).
    let ip = cri
        .pod_status(&pod)
        .unwrap()
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with("10.203.0."), "pod IP {ip:?}");
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    let page = until("the pod IP to serve", &c, || ns.http_get(addr));
    assert_eq!(page, "hello from a configmap\n");

    // Container logs reach the CRI log file; status and stats are the guest's.
    let log = until("the server's log line", &c, || {
        let l = fs::read_to_string(cri::log_file(&logs, "server")).ok()?;
        l.contains("server-started").then_some(l)
    });
    assert!(log.contains(" stdout F server-started"), "{log}");
    let st = cri.container_status(&web).unwrap();
    assert_eq!(st.state, cri::v1::ContainerState::ContainerRunning as i32);
    let stats = cri.container_stats(&web).unwrap();
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(mem > 0 && cpu > 0, "stats: memory {mem} cpu {cpu}");

    // A changed ConfigMap file reaches the running container.
    fs::write(config_dir.join("greeting"), "updated\n").unwrap();
    until("the updated file in the container", &c, || {
        let r = cri.exec_sync(&web, &["cat", "/etc/config/greeting"]).ok()?;
        (r.stdout == b"updated\n").then_some(())
    });

    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
    let state = c.shim_state();
    let left: Vec<_> = fs::read_dir(&state)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "pod state left: {left:?}");
    let vms = Command::new("pgrep")
        .args(["-f", &format!("{}/shim-state", c.dir.display())])
        .output()
        .unwrap();
    assert!(
        vms.stdout.is_empty(),
        "VM processes left: {}",
        String::from_utf8_lossy(&vms.stdout)
    );
    // The volume's data is on the host's disk.
    drop(loopdev);
    let cat = Command::new("debugfs")
        .args(["-R", "cat /hello"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "written-in-the-vm\n");
    let taps = Command::new("ip")
        .args(["-n", &ns.name, "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&taps.stdout).contains("tap0_kv"));
}

#[test]
fn a_host_network_pod_is_refused_with_a_clear_error() {
    let (_ns, c, mut cri) = cri_env("kvcrihost");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let mut cfg = pod_config("hostnet", &logs);
    cfg.linux = Some(cri::v1::LinuxPodSandboxConfig {
        security_context: Some(cri::v1::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::v1::NamespaceOption {
                network: cri::v1::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = cri.run_pod(cfg).unwrap_err();
    assert!(e.message().contains("hostNetwork"), "{e}");
}
