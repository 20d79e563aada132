//! The shim through the CRI (test ladder rung 5), as kubelet drives it: a private containerd
//! 1.6 with the CRI plugin and runtime handler `kubevirt`, CNI bridge + host-local from
//! Debian's containernetworking-plugins, all inside a network namespace the test creates.
//! One pod, two containers, one microVM.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::cri::{self, bind, container_config, pod_config};
use tests::crienv::{cri_env, until, IMAGE};
use tests::images;

/// A tmpfs on the host, as kubelet mounts a memory-backed emptyDir (in containerd's mount
/// namespace); unmounted on drop.
struct HostTmpfs(std::path::PathBuf, std::path::PathBuf);

impl HostTmpfs {
    fn mount(c: &Containerd, dir: &std::path::Path, size: &str) -> HostTmpfs {
        fs::create_dir_all(dir).unwrap();
        let ns = c.mount_ns();
        let ok = Command::new("nsenter")
            .arg(format!("--mount={}", ns.display()))
            .args([
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.display());
        HostTmpfs(dir.to_owned(), ns)
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--mount={}", self.1.display()))
            .arg("umount")
            .arg(&self.0)
            .status();
    }
}

/// The shim's lasting threads, by name, once the threads calls ran on have left. Pools
/// whose threads come and go (the calls' and the agent client's) are left out.
fn lasting_threads(c: &Containerd, pod: &str) -> std::collections::BTreeMap<String, usize> {
    let left = tests::threads::once_calls_left(c.shim_pid(pod), Duration::from_secs(60));
    let mut names = left.unwrap_or_else(|names| {
        panic!(
            "call threads still there after 60 s: {}\n{}",
            tests::threads::summary(&names),
            tail(&c.log(), 40)
        )
    });
    names.remove("ttrpc-io");
    names
}

/// Runs the node's metrics exporter over the test's shims and scrapes it once.
fn scrape_metrics(c: &Containerd) -> String {
    use std::io::{BufRead, Read, Write};
    let mut exporter = Command::new(tests::containerd::shim_binary())
        .args(["metrics", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(c.shim_state())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(exporter.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("exporter said {line:?}"))
        .to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let _ = exporter.kill();
    let _ = exporter.wait();
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    text
}

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
    // A memory-backed emptyDir with sizeLimit 8Mi, mounted on the host as kubelet does.
    let mem = HostTmpfs::mount(
        &c,
        &c.dir
            .join("pods/uid-web/volumes/kubernetes.io~empty-dir/mem"),
        "8m",
    );
    // A disk-backed emptyDir: a plain directory where kubelet keeps its volumes.
    let cache = c
        .dir
        .join("pods/uid-web/volumes/kubernetes.io~empty-dir/cache");
    fs::create_dir_all(&cache).unwrap();
    let mounts = vec![
        bind(&config_dir, "/etc/config", true),
        bind(&mem.0, "/mem", false),
        bind(&cache, "/cache", false),
    ];
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
    let threads_with_one = lasting_threads(&c, &pod);
    // A block volume: an ext4 image on a loop device, mounted at /data in the sidecar.
    let image = c.dir.join("volume.ext4");
    images::ext4(&image, 64);
    let loopdev = Loop::attach(&image);
    let volume = vec![
        bind(&loopdev.0, "/data", false),
        bind(&mem.0, "/mem", false),
        bind(&cache, "/cache", false),
    ];
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
    // The shim's threads do not grow with the pod's containers and calls: containerd's
    // connections and Waits are tasks on one thread.
    for _ in 0..8 {
        assert_eq!(cri.exec_sync(&side, &["true"]).unwrap().exit_code, 0);
    }
    let threads = lasting_threads(&c, &pod);
    assert_eq!(
        threads_with_one.values().sum::<usize>(),
        threads.values().sum::<usize>(),
        "shim threads with one container: {}\nwith two and after eight execs: {}",
        tests::threads::summary(&threads_with_one),
        tests::threads::summary(&threads)
    );
    println!("  shim threads: {}", tests::threads::summary(&threads));
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

    // The emptyDir is one 8 MiB tmpfs for both containers.
    let r = cri
        .exec_sync(
            &web,
            &["sh", "-c", "echo shared > /mem/note; df -k /mem | tail -1"],
        )
        .unwrap();
    let df = String::from_utf8_lossy(&r.stdout).into_owned();
    let total_kib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(total_kib, 8192, "df /mem: {df}");
    let r = cri.exec_sync(&side, &["cat", "/mem/note"]).unwrap();
    assert_eq!(r.stdout, b"shared\n");
    let full = "dd if=/dev/zero of=/mem/big bs=1M count=10 2>&1";
    let r = cri.exec_sync(&side, &["sh", "-c", full]).unwrap();
    assert_ne!(r.exit_code, 0, "10 MiB fit in an 8 MiB emptyDir");
    assert!(String::from_utf8_lossy(&r.stdout).contains("No space left"));

    // The disk-backed emptyDir is on the pod's scratch disk (256 MiB here), not in guest
    // memory: 200 MiB fit, more than a guest tmpfs holds in a VM of 256 MiB (half its
    // memory), and both containers see the same directory.
    let fill = "echo on-disk > /cache/note && stat -f -c %T /cache && \
        dd if=/dev/zero of=/cache/big bs=1M count=200 2>&1 | tail -1 && rm /cache/big";
    let r = cri.exec_sync(&web, &["sh", "-c", fill]).unwrap();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        out.starts_with("ext2/ext3\n"),
        "the emptyDir's file system: {out}"
    );
    assert!(out.contains("200+0 records out"), "{out}");
    let r = cri.exec_sync(&side, &["cat", "/cache/note"]).unwrap();
    assert_eq!(r.stdout, b"on-disk\n");

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

    // The node's metrics exporter (`containerd-shim-kubevirt-v1 metrics`) sees the pod VM.
    let text = scrape_metrics(&c);
    for name in [
        "kubevirt_vm_boot_seconds",
        "kubevirt_vm_memory_bytes",
        "kubevirt_vm_vcpus",
        "kubevirt_vmm_cpu_seconds_total",
        "kubevirt_vmm_resident_bytes",
        "kubevirt_vm_network_receive_bytes_total",
        "kubevirt_vm_network_transmit_packets_total",
        "kubevirt_vm_block_read_requests_total",
        "kubevirt_vm_block_read_bytes_total",
        "kubevirt_vm_net_device_transmit_packets_total",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE {name} ")).count(),
            1,
            "{name}: {text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0 && line.contains("pod=\"web\""), "{line}");
        println!("  {line}");
    }

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

#[test]
fn kubectl_exec_and_attach_stream_with_a_terminal_and_resize() {
    use tests::stream::{Stream, STDIN};
    let (ns, c, mut cri) = cri_env("kvstream");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let pod_cfg = pod_config("stream", &logs);
    let pod = cri.run_pod(pod_cfg.clone()).unwrap();
    // `kubectl run -it`: a shell with stdin and a terminal.
    let mut cfg = container_config("shell", IMAGE, &["sh"], vec![]);
    cfg.stdin = true;
    cfg.tty = true;
    let shell = cri.create_container(&pod, cfg, &pod_cfg).unwrap();
    cri.start_container(&shell).unwrap();
    let wait = Duration::from_secs(30);

    // `kubectl attach -it`: type into the shell, resize its terminal.
    let url = cri
        .attach(cri::v1::AttachRequest {
            container_id: shell.clone(),
            stdin: true,
            tty: true,
            stdout: true,
            stderr: false,
        })
        .unwrap_or_else(|e| panic!("Attach: {e}\n{}", tail(&c.log(), 30)));
    let out = ns.run(move || {
        let mut s = Stream::connect(&url).expect("attach stream");
        s.resize(100, 30);
        s.send(STDIN, b"echo attached-$((6*7)); stty size\n");
        s.read_until(wait, |o| o.stdout.contains("30 100"))
            .stdout
            .clone()
    });
    println!("  attach: {:?}", out.trim());
    assert!(
        out.contains("attached-42") && out.contains("30 100"),
        "{out}"
    );

    // `kubectl exec`: stdout and stderr apart, the exit code in the final status.
    let url = cri
        .exec(cri::v1::ExecRequest {
            container_id: shell.clone(),
            cmd: ["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"]
                .map(String::from)
                .to_vec(),
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .unwrap();
    let out = ns.run(move || {
        let mut s = Stream::connect(&url).expect("exec stream");
        s.read_until(wait, |_| false);
        std::mem::take(&mut s.out)
    });
    println!("  exec: {out:?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("exec-out\n", "exec-err\n")
    );
    assert!(
        out.status.contains("NonZeroExitCode") && out.status.contains(r#""message":"3""#),
        "{}",
        out.status
    );

    // `kubectl exec -it` with the terminal resized while it runs.
    let url = cri
        .exec(cri::v1::ExecRequest {
            container_id: shell.clone(),
            cmd: ["sh", "-c", "sleep 2; stty size"]
                .map(String::from)
                .to_vec(),
            tty: true,
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .unwrap();
    let out = ns.run(move || {
        let mut s = Stream::connect(&url).expect("exec -t stream");
        s.resize(120, 40);
        s.read_until(wait, |_| false);
        std::mem::take(&mut s.out)
    });
    println!("  exec -t: {out:?}");
    assert!(out.stdout.contains("40 120"), "{out:?}");

    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
}

/// What ends a port-forward exchange: so many bytes back, or these last bytes.
#[derive(Clone, Copy)]
enum Until {
    Len(usize),
    EndsWith(&'static [u8]),
}

/// One `kubectl port-forward` connection to `port` of `pod`: sends `request`, then reads
/// until `until` holds, the server reports an error or the stream closes; returns what came
/// back and the streaming server's error text.
fn forward_once(
    cri: &mut cri::Cri,
    ns: &tests::netns::NetNs,
    pod: &str,
    port: u16,
    request: Vec<u8>,
    until: Until,
) -> (Vec<u8>, String) {
    let url = cri.port_forward(pod, port).expect("PortForward");
    ns.run(move || {
        let mut f = tests::stream::PortForward::connect(&url, port).expect("port-forward stream");
        // At most 256 KiB in flight: the echo's buffers along the way are finite.
        for chunk in request.chunks(64 << 10) {
            f.send(chunk);
            let sent = f.data.len() + chunk.len();
            f.read_until(Duration::from_secs(30), |f| {
                !f.error.is_empty() || f.data.len() + (256 << 10) >= sent
            });
        }
        f.read_until(Duration::from_secs(30), |f| {
            !f.error.is_empty()
                || match until {
                    Until::Len(n) => f.data.len() >= n,
                    Until::EndsWith(end) => f.data.ends_with(end),
                }
        });
        (std::mem::take(&mut f.data), std::mem::take(&mut f.error))
    })
}

#[test]
fn kubectl_port_forward_reaches_the_guests_localhost() {
    let (ns, c, mut cri) = cri_env("kvfwd");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let pod_cfg = pod_config("fwd", &logs);
    let pod = cri.run_pod(pod_cfg.clone()).unwrap();
    let ip = cri.pod_status(&pod).unwrap().network.unwrap().ip;
    // A web server on every address (IPv6 and IPv4), one on 127.0.0.1 only, one on ::1 only,
    // one on the pod IP only (localhost does not reach it, on runc either), and an echo
    // server.
    let servers = format!(
        "mkdir -p /www && echo forwarded-page > /www/index.html && \
        httpd -p 8080 -h /www && \
        {{ httpd -f -p 127.0.0.1:8081 -h /www & echo $! > /tmp/8081.pid; }} && \
        httpd -p '[::1]:8083' -h /www && httpd -p {ip}:8082 -h /www && \
        exec nc -ll -p 9000 -e cat"
    );
    let web = cri
        .create_container(
            &pod,
            container_config("web", IMAGE, &["sh", "-c", &servers], vec![]),
            &pod_cfg,
        )
        .unwrap();
    cri.start_container(&web).unwrap();
    let get = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    let page_end = Until::EndsWith(b"forwarded-page\n");

    // The servers start after the pod: the forward appears once the guest listens.
    let t0 = Instant::now();
    let (page, err) = until("port 8080 forwarded", &c, || {
        let (page, err) = forward_once(&mut cri, &ns, &pod, 8080, get.clone(), page_end);
        (!page.is_empty()).then_some((page, err))
    });
    println!(
        "  port 8080 answered {:.1} s after the container started",
        t0.elapsed().as_secs_f64()
    );
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.starts_with("HTTP/1.") && page.ends_with("\r\n\r\nforwarded-page\n"),
        "{page:?} {err:?}"
    );
    // containerd dials 127.0.0.1 first, then ::1; the agent does the same in the guest.
    for (port, only) in [(8081, "127.0.0.1"), (8083, "::1")] {
        let (page, err) = forward_once(&mut cri, &ns, &pod, port, get.clone(), page_end);
        assert!(
            String::from_utf8_lossy(&page).ends_with("forwarded-page\n"),
            "{only} only: {page:?} {err:?}"
        );
    }

    // 2 MiB through the echo server and back, both directions at once.
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t1 = Instant::now();
    let (echo, err) = forward_once(
        &mut cri,
        &ns,
        &pod,
        9000,
        data.clone(),
        Until::Len(data.len()),
    );
    println!(
        "  2 MiB echoed through the forward in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    assert!(err.is_empty(), "{err}");
    assert!(
        echo == data,
        "echo: {} of {} bytes, or different",
        echo.len(),
        data.len()
    );

    // Refused as on runc: a port nobody listens on, and one on the pod IP only.
    for port in [8099, 8082] {
        let (got, err) = forward_once(&mut cri, &ns, &pod, port, get.clone(), page_end);
        assert!(got.is_empty(), "port {port}: {got:?}");
        assert!(
            err.contains(&format!("localhost:{port}")) && err.contains("refused"),
            "port {port}: {err:?}"
        );
    }

    // A server that goes away takes its forward with it.
    let r = cri
        .exec_sync(&web, &["sh", "-c", "kill $(cat /tmp/8081.pid)"])
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let err = until("port 8081 refused", &c, || {
        let (_, err) = forward_once(&mut cri, &ns, &pod, 8081, get.clone(), page_end);
        err.contains("refused").then_some(err)
    });
    assert!(err.contains("localhost:8081"), "{err}");

    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
}

#[test]
fn bad_input_fails_the_cri_call_with_a_message_that_names_it() {
    let small = tests::cgroups::KubeletPod::create("kubevirt-test-kvbad", 100 << 20, -1, 100_000);
    let (_ns, c, mut cri) = cri_env("kvbad");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    // Each shim reads its configuration when it starts: edit it between pods.
    let shim_cfg = c.dir.join("shim.toml");
    let good = fs::read_to_string(&shim_cfg).unwrap();
    let mut refused = |name: &str, cfg: String| {
        fs::write(&shim_cfg, cfg).unwrap();
        let e = cri.run_pod(pod_config(name, &logs)).unwrap_err();
        println!("  {name}: {}", e.message());
        e.message().to_owned()
    };
    let e = refused(
        "nokernel",
        good.lines()
            .map(|l| {
                if l.starts_with("kernel") {
                    "kernel = \"/nonexistent/vmlinux\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert!(
        e.contains("guest kernel") && e.contains("/nonexistent/vmlinux"),
        "{e}"
    );
    let e = refused("badopt", format!("{good}memory_mb = 512\n"));
    assert!(e.contains("memory_mb"), "{e}");
    fs::write(&shim_cfg, &good).unwrap();

    // A pod whose memory limit cannot hold the VM's overhead.
    let mut cfg = pod_config("tiny", &logs);
    cfg.linux = Some(cri::v1::LinuxPodSandboxConfig {
        cgroup_parent: format!("/{}", small.path),
        ..Default::default()
    });
    let e = cri.run_pod(cfg).unwrap_err();
    println!("  tiny: {}", e.message());
    assert!(e.message().contains("pod memory limit") && e.message().contains("100 MiB"));

    // A volume the VM cannot honour: a Unix socket.
    let pod_cfg = pod_config("badvol", &logs);
    let pod = cri.run_pod(pod_cfg.clone()).unwrap();
    let sock = c.dir.join("app.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cfg = container_config(
        "app",
        IMAGE,
        &["true"],
        vec![bind(&sock, "/run/app.sock", false)],
    );
    // The CRI creates the task (and so reaches the shim) at StartContainer.
    let app = cri.create_container(&pod, cfg, &pod_cfg).unwrap();
    let e = cri.start_container(&app).unwrap_err();
    println!("  badvol: {}", e.message());
    assert!(e.message().contains("/run/app.sock"), "{e}");
    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
    // The refused pod's cgroup went with it.
    let left: Vec<_> = fs::read_dir(tests::cgroups::file("memory", &small.path, ""))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
