//! The VM in the pod's host cgroup, through the CRI as kubelet drives it: the test makes the
//! pod cgroup with its limits as kubelet would, and checks where the VMM's threads are, the
//! guest's size, CPU sets and vCPU pinning, PodSandboxStats, UpdateContainerResources on both
//! sides, OOM in the guest and the CPU the VM gets on the host.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::cri::{self, container_config, pod_config, Cri};
use tests::crienv::{cri_env, until, IMAGE};

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
    // The shim's default vm_overhead_mib.
    const OVERHEAD_MIB: i64 = 160;
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
