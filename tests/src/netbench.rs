//! Throughput between the host and a pod's guest on the qemu back end, through the real
//! paths a pod uses: TCP over the pod's network (virtio-net served over vhost-user, the tap,
//! the CNI veth and bridge) both ways, and a container's stdout (vsock, shim, containerd,
//! the CRI log).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::containerd::Containerd;
use crate::cri::{container_config, log_file, pod_config, Cri};
use crate::measure::median;
use crate::netns::NetNs;

const MIB: usize = 64;
/// The CNI bridge's address in the test's network namespace (see containerd.rs).
const GATEWAY: &str = "10.203.0.1";

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Runs a container `name` with `script` in `pod`; returns when it has started.
fn run(
    cri: &mut Cri,
    pod: &str,
    cfg: &crate::cri::v1::PodSandboxConfig,
    name: &str,
    image: &str,
    script: &str,
) {
    let id = cri
        .create_container(
            pod,
            container_config(name, image, &["sh", "-c", script], vec![]),
            cfg,
        )
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
}

/// Host -> guest: the host sends MIB MiB to `nc -l` in the pod; MB/s until the guest closed.
fn host_to_guest(
    ns: &NetNs,
    cri: &mut Cri,
    pod: &str,
    cfg: &crate::cri::v1::PodSandboxConfig,
    image: &str,
    ip: &str,
    round: usize,
) -> Result<f64, String> {
    let port = 5100 + round as u16;
    run(
        cri,
        pod,
        cfg,
        &format!("sink{round}"),
        image,
        &format!("nc -l -p {port} > /dev/null"),
    );
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    ns.run(move || {
        let mut s = connect_retrying(addr)?;
        let chunk = vec![0x5au8; 1 << 20];
        let t0 = Instant::now();
        for _ in 0..MIB {
            s.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        // nc exits at EOF and the pod's end closes: everything has arrived.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Ok(mbps(MIB << 20, t0.elapsed()))
    })
}

/// Connects to `addr`, retrying for a minute while the pod's server starts.
fn connect_retrying(addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let t_end = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > t_end => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads `s` to its end: the bytes, and the time from the first of them to the end.
fn receive_all(s: &mut TcpStream) -> Result<(usize, Duration), String> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut got, mut t0) = (0, None);
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Ok((got, t0.map_or(Duration::ZERO, |t: Instant| t.elapsed())));
        }
        t0.get_or_insert_with(Instant::now);
        got += n;
    }
}

/// Pod -> host as a server sends: busybox httpd in the pod serves a MIB MiB file and the
/// host GETs it; MB/s from the first byte to the end. (busybox nc, below, moves 1 KiB per
/// system call, which under TCG bounds it far below the device path.)
fn guest_serves_host(
    ns: &NetNs,
    cri: &mut Cri,
    pod: &str,
    cfg: &crate::cri::v1::PodSandboxConfig,
    image: &str,
    ip: &str,
    round: usize,
) -> Result<f64, String> {
    let port = 5300 + round as u16;
    let script = format!(
        "mkdir -p /srv && head -c {MIB}m /dev/zero > /srv/f && exec httpd -f -p {port} -h /srv"
    );
    run(cri, pod, cfg, &format!("server{round}"), image, &script);
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    ns.run(move || {
        let mut s = connect_retrying(addr)?;
        s.write_all(b"GET /f HTTP/1.0\r\n\r\n")
            .map_err(|e| format!("request: {e}"))?;
        let (got, took) = receive_all(&mut s)?;
        if got < MIB << 20 {
            return Err(format!("received {got} bytes of {} and headers", MIB << 20));
        }
        Ok(mbps(got, took))
    })
}

/// Guest -> host: the pod sends MIB MiB to a listener in the test's netns.
fn guest_to_host(
    ns: &NetNs,
    cri: &mut Cri,
    pod: &str,
    cfg: &crate::cri::v1::PodSandboxConfig,
    image: &str,
    round: usize,
) -> Result<f64, String> {
    let port = 5200 + round as u16;
    let listener = ns.run(move || TcpListener::bind((GATEWAY, port)).map_err(|e| e.to_string()))?;
    let script = format!("head -c {MIB}m /dev/zero | nc {GATEWAY} {port}");
    run(cri, pod, cfg, &format!("source{round}"), image, &script);
    let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let (got, took) = receive_all(&mut s)?;
    if got != MIB << 20 {
        return Err(format!("received {got} bytes of {}", MIB << 20));
    }
    Ok(mbps(got, took))
}

/// Container stdout -> CRI log: STDOUT_MIB MiB of 1000-byte lines, MB/s to the last line in
/// the log (the shim pulls output with one agent call per pipe read: slow under TCG).
const STDOUT_MIB: usize = 16;
fn stdout_to_log(
    c: &Containerd,
    cri: &mut Cri,
    pod: &str,
    cfg: &crate::cri::v1::PodSandboxConfig,
    image: &str,
    round: usize,
) -> Result<f64, String> {
    let name = format!("talker{round}");
    let line = "x".repeat(999);
    let script = format!("yes {line} | head -c {STDOUT_MIB}m; echo; echo talker-done");
    let t0 = Instant::now();
    run(cri, pod, cfg, &name, image, &script);
    let log = log_file(&c.dir.join("netbench-logs"), &name);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if text.ends_with(b"talker-done\n") {
            return Ok(mbps(STDOUT_MIB << 20, t0.elapsed()));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the log did not reach the end in 120 s ({} bytes logged, ending {:?})",
                text.len(),
                String::from_utf8_lossy(&text[text.len().saturating_sub(200)..])
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends the throughput section (median of `rounds`).
pub fn throughput_section(r: &mut String, rounds: usize, image: &str, progress: &dyn Fn(&str)) {
    let ns = NetNs::new("kvnetbench");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = Containerd::start_cri_with_images("netbench", &ns.name, image);
    let mut cri = Cri::connect(&c.socket()).expect("CRI");
    let logs = c.dir.join("netbench-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let cfg = pod_config("netbench", &logs);
    let _ = writeln!(
        r,
        "## Host <-> guest throughput on the qemu back end (TCG here; {MIB} MiB, median of {rounds})\n"
    );
    let _ = writeln!(r, "| path | MB/s |");
    let _ = writeln!(r, "| --- | --- |");
    let pod = match cri.run_pod(cfg.clone()) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(r, "| all | failed: {} |", e.message());
            return;
        }
    };
    let ip = cri
        .pod_status(&pod)
        .ok()
        .and_then(|s| s.network.map(|n| n.ip))
        .unwrap_or_default();
    let mut rows: Vec<(&str, Vec<f64>, Option<String>)> =
        vec![
        (
            "TCP host -> pod (virtio-net over vhost-user, tap, veth, bridge)",
            vec![],
            None,
        ),
        ("TCP pod -> host (busybox httpd serves a file)", vec![], None),
        ("TCP pod -> host (busybox nc from a pipe)", vec![], None),
        (
            "container stdout -> CRI log (agent calls over vsock, shim, containerd; 16 MiB)",
            vec![],
            None,
        ),
        (
            "vsock host -> guest (raw stream: hybrid socket, vhost-user-vsock; device-test guest)",
            vec![],
            None,
        ),
        ("vsock guest -> host", vec![], None),
    ];
    for round in 0..rounds {
        progress(&format!("throughput, round {} of {rounds} ...", round + 1));
        let vsock = crate::vsockbench::vsock_rates(&c.dir, MIB << 20);
        let results = [
            host_to_guest(&ns, &mut cri, &pod, &cfg, image, &ip, round),
            guest_serves_host(&ns, &mut cri, &pod, &cfg, image, &ip, round),
            guest_to_host(&ns, &mut cri, &pod, &cfg, image, round),
            stdout_to_log(&c, &mut cri, &pod, &cfg, image, round),
            vsock.clone().map(|v| v.0),
            vsock.map(|v| v.1),
        ];
        for (row, res) in rows.iter_mut().zip(results) {
            match res {
                Ok(v) => row.1.push(v),
                Err(e) => row.2 = Some(e),
            }
        }
    }
    for (label, v, err) in &rows {
        match (err, v.is_empty()) {
            (Some(e), _) => {
                let _ = writeln!(r, "| {label} | failed: {e} |");
            }
            (None, false) => {
                let _ = writeln!(r, "| {label} | {:.1} |", median(v));
            }
            (None, true) => {
                let _ = writeln!(r, "| {label} | - |");
            }
        }
    }
    let _ = cri.stop_pod(&pod);
    let _ = cri.remove_pod(&pod);
    let _ = writeln!(
        r,
        "\nThe guest runs under QEMU's TCG here, so its CPU, not our device back ends, bounds \
         these figures; they show that the paths carry bulk data, not what a native-KVM node \
         reaches (the vsock rows run a guest that only copies bytes, so they show the device path \
         with the least guest work). The vhost-user-blk section compares a back end with a peer \
         directly. busybox nc sends what it reads from a pipe 1 KiB per system call (about 1 KiB \
         per packet was measured on the bridge), so under TCG the guest's system calls, not \
         the network path, bound that row; the device path itself carries guest -> host TCP \
         at the host -> guest rate (devices_qemu's 100 MiB transfer).\n"
    );
}
