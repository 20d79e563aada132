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
    // A memory-backed emptyDir with sizeLimit 8Mi, mounted on the host as kubelet does.
    let mem = HostTmpfs::mount(
        &c,
        &c.dir
            .join("pods/uid-web/volumes/kubernetes.io~empty-dir/mem"),
        "8m",
    );
    let mounts = vec![
        bind(&config_dir, "/etc/config", true),
        bind(&mem.0, "/mem", false),
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
    // A block volume: an ext4 image on a loop device, mounted at /data in the sidecar.
    let image = c.dir.join("volume.ext4");
    images::ext4(&image, 64);
    let loopdev = Loop::attach(&image);
    let volume = vec![
        bind(&loopdev.0, "/data", false),
        bind(&mem.0, "/mem", false),
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

/// The VMM's processes of the pod: the shim and, on the qemu back end, QEMU.
fn vmm_pids(c: &Containerd) -> Vec<u32> {
    let mut pids = Vec::new();
    for dir in fs::read_dir(c.shim_state()).into_iter().flatten().flatten() {
        for f in ["shim.pid", "vm.pid"] {
            if let Some(pid) = fs::read_to_string(dir.path().join(f))
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

fn resources(memory_mib: i64, cpus: &str) -> cri::v1::LinuxContainerResources {
    cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: memory_mib << 20,
        cpuset_cpus: cpus.into(),
        ..Default::default()
    }
}

fn with_resources(
    mut cfg: cri::v1::ContainerConfig,
    r: cri::v1::LinuxContainerResources,
) -> cri::v1::ContainerConfig {
    cfg.linux = Some(cri::v1::LinuxContainerConfig {
        resources: Some(r),
        ..Default::default()
    });
    cfg
}

/// Runs `cmd` in container `id`; its exit code.
fn exec_code(cri: &mut Cri, id: &str, cmd: &str) -> i32 {
    cri.exec_sync(id, &["sh", "-c", cmd]).unwrap().exit_code
}

#[test]
fn the_vm_lives_in_the_pod_cgroup_and_is_held_to_its_limits() {
    const OVERHEAD_MIB: i64 = 160; // the shim's default vm_overhead_mib
                                   // kubelet's part: the pod cgroup with 256 MiB + the RuntimeClass overhead and 0.5 CPU
                                   // (made first, so that it is removed after containerd has ended).
    let kubelet = tests::cgroups::KubeletPod::create(
        "kubevirt-test-kvcg",
        (256 + OVERHEAD_MIB) << 20,
        50_000,
        100_000,
    );
    let (_ns, c, mut cri) = cri_env("kvcg");
    let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let two_cpus = online.trim() != "0";
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let mut pod_cfg = pod_config("limited", &logs);
    pod_cfg.linux = Some(cri::v1::LinuxPodSandboxConfig {
        cgroup_parent: format!("/{}", kubelet.path),
        ..Default::default()
    });
    let pod = cri
        .run_pod(pod_cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    let sandbox_cg = format!("{}/{pod}", kubelet.path);

    // A container with 160 MiB and, where the host has two CPUs, CPU 1 to itself.
    let first_cpu = if two_cpus { "1" } else { "0" };
    let app = cri
        .create_container(
            &pod,
            with_resources(
                container_config("app", IMAGE, &["sleep", "1000"], vec![]),
                resources(160, first_cpu),
            ),
            &pod_cfg,
        )
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", tail(&c.log(), 40)));
    cri.start_container(&app).unwrap();

    // The guest is sized from the pod: 256 MiB, and 1 + ceil(0.5) vCPUs.
    let r = cri
        .exec_sync(
            &app,
            &[
                "sh",
                "-c",
                "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo",
            ],
        )
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "vCPUs: {out}");
    let total_kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (200 << 10..=256 << 10).contains(&total_kib),
        "guest memory {total_kib} KiB for a 256 MiB pod"
    );

    // Every thread of the shim and of QEMU is in the sandbox's cgroup, under the pod's.
    let pids = vmm_pids(&c);
    assert_eq!(pids.len(), 2, "the shim and QEMU: {pids:?}");
    for pid in &pids {
        let outside = tests::cgroups::threads_outside(*pid, &sandbox_cg);
        assert!(outside.is_empty(), "threads outside the pod: {outside:?}");
        let cpus = tests::cgroups::thread_cpus(*pid);
        assert!(
            cpus.iter().all(|c| c == first_cpu),
            "thread CPUs of {pid}: {cpus:?}"
        );
    }
    println!(
        "  {} VMM threads in {sandbox_cg}, all on CPU {first_cpu}",
        pids.iter()
            .map(|p| fs::read_dir(format!("/proc/{p}/task")).unwrap().count())
            .sum::<usize>()
    );

    // What the VM costs beyond the guest memory in use (the RuntimeClass overhead): the pod
    // cgroup's usage minus what the guest has touched (MemTotal - MemFree, an upper bound).
    let r = cri
        .exec_sync(&app, &["grep", "-E", "MemTotal|MemFree", "/proc/meminfo"])
        .unwrap();
    let kib: Vec<u64> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let guest_used = (kib[0] - kib[1]) >> 10;
    let usage = tests::cgroups::read(
        "memory",
        &kubelet.path,
        if tests::cgroups::v2() {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        },
    )
    .parse::<u64>()
    .unwrap()
        >> 20;
    println!("  host: pod cgroup uses {usage} MiB, guest has touched {guest_used} MiB: VM overhead {} MiB", usage.saturating_sub(guest_used));

    // The limits the VM is under are the pod's.
    let (mem, cpu) = if tests::cgroups::v2() {
        (
            tests::cgroups::read("memory", &kubelet.path, "memory.max"),
            tests::cgroups::read("cpu", &kubelet.path, "cpu.max"),
        )
    } else {
        (
            tests::cgroups::read("memory", &kubelet.path, "memory.limit_in_bytes"),
            tests::cgroups::read("cpu", &kubelet.path, "cpu.cfs_quota_us")
                + " "
                + &tests::cgroups::read("cpu", &kubelet.path, "cpu.cfs_period_us"),
        )
    };
    assert_eq!(mem, ((256 + OVERHEAD_MIB) << 20).to_string());
    assert_eq!(cpu, "50000 100000");

    // PodSandboxStats: the pod cgroup (the whole VM) and the containers (the guest's view).
    let stats = until("pod sandbox stats", &c, || {
        let s = cri.pod_stats(&pod).ok()?;
        let linux = s.linux?;
        let cpu = linux.cpu?.usage_core_nano_seconds?.value;
        let mem = linux.memory?.working_set_bytes?.value;
        (cpu > 0 && mem > 0 && !linux.containers.is_empty()).then_some((cpu, mem))
    });
    println!(
        "  PodSandboxStats: {:.2} s CPU, {} MiB working set",
        stats.0 as f64 / 1e9,
        stats.1 >> 20
    );

    // UpdateContainerResources: the VM moves to CPU 0 on the host, and the container's
    // cgroup in the guest takes the new memory limit (100 MiB fit under 160, not under 64).
    assert_eq!(
        exec_code(
            &mut cri,
            &app,
            "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null"
        ),
        0
    );
    cri.update_resources(&app, resources(64, "0"))
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", tail(&c.log(), 30)));
    for pid in &pids {
        let cpus = tests::cgroups::thread_cpus(*pid);
        assert!(cpus.iter().all(|c| c == "0"), "after the update: {cpus:?}");
    }
    assert_eq!(
        exec_code(
            &mut cri,
            &app,
            "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null"
        ),
        137,
        "100 MiB under the updated 64 MiB limit"
    );
    // Given two CPUs, each vCPU gets one of its own (the other threads share them: none is
    // left over here).
    if two_cpus {
        cri.update_resources(&app, resources(64, "0-1")).unwrap();
        let threads: Vec<(String, String)> = pids
            .iter()
            .flat_map(|p| tests::cgroups::named_thread_cpus(*p))
            .collect();
        for (name, cpus) in &threads {
            let want = match name.as_str() {
                "CPU 0/TCG" | "CPU 0/KVM" | "vcpu0" => "0",
                "CPU 1/TCG" | "CPU 1/KVM" | "vcpu1" => "1",
                _ => "0-1",
            };
            assert_eq!(cpus, want, "{name}: {threads:?}");
        }
        let vcpus = threads.iter().filter(|(_, c)| c != "0-1").count();
        assert_eq!(vcpus, 2, "{threads:?}");
        println!("  vCPU threads pinned one per CPU of the set 0-1");
    }

    // A container that touches more memory than its limit is OOM-killed in the guest, and
    // the CRI says so; the VM and the node go on.
    let hog = cri
        .create_container(
            &pod,
            with_resources(
                container_config(
                    "hog",
                    IMAGE,
                    &["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
                    vec![],
                ),
                resources(64, ""),
            ),
            &pod_cfg,
        )
        .unwrap();
    cri.start_container(&hog).unwrap();
    let st = until("the hog to end", &c, || {
        let s = cri.container_status(&hog).ok()?;
        (s.state == cri::v1::ContainerState::ContainerExited as i32).then_some(s)
    });
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}"
    );
    assert_eq!(exec_code(&mut cri, &app, "true"), 0, "the pod goes on");

    // A container spinning on both vCPUs gets 0.5 CPU of the host.
    let spin = cri
        .create_container(
            &pod,
            container_config(
                "spin",
                IMAGE,
                &["sh", "-c", "while :; do :; done & while :; do :; done"],
                vec![],
            ),
            &pod_cfg,
        )
        .unwrap();
    cri.start_container(&spin).unwrap();
    thread::sleep(Duration::from_secs(1));
    let (u0, t0) = (tests::cgroups::cpu_usage(&kubelet.path), Instant::now());
    thread::sleep(Duration::from_secs(4));
    let used =
        (tests::cgroups::cpu_usage(&kubelet.path) - u0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let peak = tests::cgroups::memory_peak(&kubelet.path) >> 20;
    println!(
        "  spinning on 2 vCPUs: {used:.2} CPUs of the host; memory peak {peak} MiB of {} MiB",
        256 + OVERHEAD_MIB
    );
    assert!(
        (0.25..=0.6).contains(&used),
        "host CPU use {used:.2} under a 0.5 CPU limit"
    );
    assert!(peak <= (256 + OVERHEAD_MIB) as u64);

    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
    assert!(
        !tests::cgroups::exists(&sandbox_cg),
        "the sandbox cgroup {sandbox_cg} is left"
    );
    for pid in pids {
        until(&format!("process {pid} to end"), &c, || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z ")).then_some(())
        });
    }
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
