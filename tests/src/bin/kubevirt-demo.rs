//! `make demo`: a real pod in a microVM through containerd's CRI, as kubelet would run it.
//! Starts a private containerd (CRI plugin, runtime handler `kubevirt`, a CNI bridge) inside a
//! network namespace of its own, imports a busybox image built here, runs a pod whose
//! container serves HTTP and prints its kernel, and shows what happened. Cleans up after.

use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::cri::{container_config, pod_config, Cri};
use tests::netns::NetNs;

const IMAGE: &str = "localhost/busybox:demo";

fn step(s: &str) {
    println!("\n== {s}");
}

fn shim_log(c: &Containerd, needle: &str) -> Option<String> {
    c.log().lines().find(|l| l.contains(needle)).map(|l| {
        let msg = l.split("msg=\"").nth(1).unwrap_or(l);
        msg.trim_end_matches('"').replace("\\\"", "\"")
    })
}

fn main() {
    step("a private containerd with the kubevirt runtime handler, in its own network namespace");
    let ns = NetNs::new("kvdemo");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    println!("(with a pause and a busybox image, built here and imported into k8s.io)");
    let c = Containerd::start_cri_with_images("demo", &ns.name, IMAGE);
    println!(
        "containerd: {} (log: {})",
        c.socket().display(),
        c.dir.join("containerd.log").display()
    );
    println!("imported localhost/pause:test and {IMAGE}");

    step("CRI: RunPodSandbox with runtime handler kubevirt, then a container");
    let mut cri = Cri::connect(&c.socket()).expect("connect to containerd's CRI socket");
    let logs = c.dir.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log directory");
    let pod_cfg = pod_config("demo", &logs);
    let t0 = Instant::now();
    let pod = cri
        .run_pod(pod_cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox failed: {e}\n{}", tail(&c.log(), 30)));
    let boot = t0.elapsed();
    let script = "mkdir -p /www && echo \"hello from a pod in a microVM, kernel $(uname -r)\" > /www/index.html \
        && exec httpd -f -p 8080 -h /www";
    let t1 = Instant::now();
    let id = cri
        .create_container(
            &pod,
            container_config("web", IMAGE, &["sh", "-c", script], vec![]),
            &pod_cfg,
        )
        .unwrap_or_else(|e| panic!("CreateContainer failed: {e}\n{}", tail(&c.log(), 30)));
    cri.start_container(&id).expect("StartContainer");
    let start = t1.elapsed();
    if let Some(l) = shim_log(&c, "machine ") {
        println!("back end: {l}");
    }
    if let Some(l) = shim_log(&c, "agent ready") {
        println!("boot:     {l}");
    }
    println!(
        "RunPodSandbox (VM boot included) {:.2} s; CreateContainer + StartContainer {:.2} s",
        boot.as_secs_f64(),
        start.as_secs_f64()
    );

    step("the pod");
    let ip = cri
        .pod_status(&pod)
        .ok()
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let r = cri
        .exec_sync(&id, &["uname", "-r"])
        .expect("ExecSync uname -r");
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname");
    println!(
        "guest uname -r: {}",
        String::from_utf8_lossy(&r.stdout).trim()
    );
    println!(
        "host  uname -r: {}",
        String::from_utf8_lossy(&host.stdout).trim()
    );
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().expect("pod IP");
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Some(p) = ns.http_get(addr) {
            break p.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the pod IP {ip} did not answer");
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("pod IP {ip}:8080 answers: {page}");
    // kubectl port-forward: containerd dials localhost:8080 in the pod's namespace.
    let expect = format!("{page}\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let forwarded = loop {
        let url = cri.port_forward(&pod, 8080).expect("PortForward");
        let want = expect.clone();
        let (data, error) = ns.run(move || {
            let mut f = tests::stream::PortForward::connect(&url, 8080).expect("port-forward");
            f.send(b"GET / HTTP/1.0\r\n\r\n");
            f.read_until(Duration::from_secs(30), |f| {
                !f.error.is_empty() || f.data.ends_with(want.as_bytes())
            });
            (f.data, f.error)
        });
        if data.ends_with(expect.as_bytes()) {
            break expect.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "port-forward to 8080 failed: {error}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("kubectl port-forward to port 8080 (CRI PortForward) answers: {forwarded}");

    step("cleanup: StopPodSandbox, RemovePodSandbox, containerd stopped");
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    drop(c);
    drop(ns);
    println!("done");
}
