//! Per-pod I/O rate limits through the CRI: a pod annotated with a disk bandwidth writes its
//! scratch disk no faster than that, a pod annotated with a transmit bandwidth serves a file
//! to the test's network namespace no faster than that, and a bad value fails
//! RunPodSandbox naming its annotation. The limits are the devices' token buckets (see
//! devices/src/rate_limit.rs), driven here by the guest's real virtio drivers.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;
use std::time::Instant;

use tests::containerd::tail;
use tests::cri::{container_config, pod_config};
use tests::crienv::{cri_env, until, IMAGE};
use tests::leaks::assert_nothing_left;

const MIB: usize = 1 << 20;

#[test]
fn annotated_rates_hold_the_pod_disk_and_network() {
    let (ns, c, mut cri) = cri_env("kvrates");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let mut cfg = pod_config("limited", &logs);
    cfg.annotations.extend([
        ("kubevirt.io/disk-bandwidth".to_owned(), "4Mi".to_owned()),
        ("kubevirt.io/net-tx-bandwidth".to_owned(), "1Mi".to_owned()),
    ]);
    let pod = cri
        .run_pod(cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    // A 2 MiB page of one letter, served on port 8080.
    let server = format!(
        "mkdir -p /www && head -c {} /dev/zero | tr '\\0' a > /www/index.html && exec httpd -f -p 8080 -h /www",
        2 * MIB
    );
    let ctr = cri
        .create_container(
            &pod,
            container_config("web", IMAGE, &["sh", "-c", &server], vec![]),
            &cfg,
        )
        .unwrap();
    cri.start_container(&ctr).unwrap();

    // Disk: 8 MiB written and synced to the scratch disk (the container's writable layer).
    let write = "t0=$(cut -d' ' -f1 /proc/uptime); \
                 dd if=/dev/zero of=/big bs=1M count=8 conv=fsync 2>/dev/null; \
                 t1=$(cut -d' ' -f1 /proc/uptime); echo $t0 $t1";
    let r = cri.exec_sync(&ctr, &["sh", "-c", write]).unwrap();
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    let t: Vec<f64> = out
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!((r.exit_code, t.len()), (0, 2), "{out}");
    let disk_secs = t[1] - t[0];

    // Network: the page fetched from the test's network namespace.
    let ip = cri
        .pod_status(&pod)
        .unwrap()
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    until("the pod to serve", &c, || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).ok()
    });
    let start = Instant::now();
    let page = ns.http_get(addr).expect("GET the 2 MiB page");
    let net_secs = start.elapsed().as_secs_f64();
    println!(
        "  8 MiB synced to a 4 MiB/s disk: {disk_secs:.2} s; 2 MiB from a pod sending at \
         1 MiB/s: {net_secs:.2} s"
    );
    assert_eq!(page.len(), 2 * MIB, "the whole page arrived");
    assert!(page.bytes().all(|b| b == b'a'));
    // 8 MiB at 4 MiB/s after a 0.4 MiB burst: 1.9 s; 2 MiB at 1 MiB/s after 0.1 MiB: 1.9 s.
    assert!(
        disk_secs >= 1.6,
        "the disk took {disk_secs:.2} s for 8 MiB at 4 MiB/s"
    );
    assert!(
        net_secs >= 1.6,
        "2 MiB left the pod in {net_secs:.2} s at 1 MiB/s"
    );

    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();

    // A rate that is not one fails the sandbox, naming the annotation; nothing stays.
    let mut bad = pod_config("badrate", &logs);
    bad.annotations
        .insert("kubevirt.io/disk-iops".to_owned(), "fast".to_owned());
    let e = cri.run_pod(bad).unwrap_err().to_string();
    assert!(
        e.contains("kubevirt.io/disk-iops") && e.contains("fast"),
        "{e}"
    );
    assert_nothing_left(&c, Some(&ns));
}
