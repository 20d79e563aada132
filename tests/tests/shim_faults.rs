//! Faults through the CRI, as kubelet would meet them (and the VM process's confinement): a
//! guest kernel that panics, a guest that never boots, the VMM killed under a running pod, the
//! agent crashing, no tap device, a full disk while the
//! image is built, containerd restarted under running pods. Each ends in a clear state
//! reported to containerd, and each test checks that nothing is left behind.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::cri::{self, container_config, pod_config, Cri};
use tests::crienv::{cri_env, until, IMAGE};
use tests::leaks::assert_nothing_left;

/// Runs `args` in containerd's mount namespace (where its shims see mounts); asserts success.
fn in_mount_ns(c: &Containerd, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--mount={}", c.mount_ns().display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces the shim's config with the test's one plus `extra` (each shim reads it at start).
fn shim_config(c: &Containerd, good: &str, extra: &str) {
    fs::write(c.dir.join("shim.toml"), format!("{good}{extra}")).unwrap();
}

/// Runs a pod with a `sleep` container; returns (pod, container, pod config).
fn pod_with_sleeper(
    cri: &mut Cri,
    c: &Containerd,
    name: &str,
    logs: &Path,
) -> (String, String, cri::v1::PodSandboxConfig) {
    let cfg = pod_config(name, logs);
    let pod = cri
        .run_pod(cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    let ctr = cri
        .create_container(
            &pod,
            container_config("sleeper", IMAGE, &["sleep", "1000"], vec![]),
            &cfg,
        )
        .unwrap();
    cri.start_container(&ctr)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", tail(&c.log(), 40)));
    (pod, ctr, cfg)
}

/// Runs container `name` echoing `text` in `pod` and waits for the text in its CRI log.
fn echo_in(
    cri: &mut Cri,
    c: &Containerd,
    pod: &str,
    cfg: &cri::v1::PodSandboxConfig,
    logs: &Path,
    name: &str,
    text: &str,
) {
    let ctr = cri
        .create_container(
            pod,
            container_config(name, IMAGE, &["echo", text], vec![]),
            cfg,
        )
        .unwrap();
    cri.start_container(&ctr).unwrap();
    until(&format!("{name}'s output"), c, || {
        let log = fs::read_to_string(cri::log_file(logs, name)).ok()?;
        log.contains(text).then_some(())
    });
}

/// After the VM ended under a running pod: the container's task exits (255: no status from
/// a dead guest), the sandbox is no longer ready (what kubelet needs to restart the pod), and
/// containerd's log says how the VM ended, with `console` from the guest's last words.
fn assert_vm_end_reported(cri: &mut Cri, c: &Containerd, pod: &str, ctr: &str, console: &str) {
    let st = until("the container to exit", c, || {
        let st = cri.container_status(ctr).ok()?;
        (st.state == cri::v1::ContainerState::ContainerExited as i32).then_some(st)
    });
    assert_eq!(st.exit_code, 255, "{st:?}");
    until("the sandbox to be not ready", c, || {
        let st = cri.pod_status(pod).ok()?;
        (st.state == cri::v1::PodSandboxState::SandboxNotready as i32).then_some(())
    });
    let log = c.log();
    assert!(
        log.contains("the VM ended unexpectedly") && log.contains(console),
        "containerd's log does not say why:\n{}",
        tail(&log, 30)
    );
}

fn remove(cri: &mut Cri, pod: &str) {
    cri.stop_pod(pod).unwrap();
    cri.remove_pod(pod).unwrap();
}

#[test]
fn a_guest_that_panics_or_never_boots_fails_run_pod_sandbox_with_its_console() {
    let (ns, c, mut cri) = cri_env("kvpanic");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let good = fs::read_to_string(c.dir.join("shim.toml")).unwrap();

    // No init to run: the kernel panics at boot and (panic=-1) resets the VM at once. The
    // shim sees the VM end and fails without waiting out the agent timeout (60 s).
    shim_config(&c, &good, "extra_cmdline = \"rdinit=/nonexistent\"\n");
    let t0 = Instant::now();
    let e = cri.run_pod(pod_config("panics", &logs)).unwrap_err();
    let took = t0.elapsed();
    println!("  panics: {:.1} s: {}", took.as_secs_f64(), e.message());
    assert!(
        e.message().contains("VM ended before its agent answered")
            && e.message().contains("Kernel panic"),
        "{e}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    assert_nothing_left(&c, Some(&ns));

    // A kernel that waits for a root disk that never comes: the agent timeout ends it.
    shim_config(
        &c,
        &good,
        "agent_timeout_secs = 8\nextra_cmdline = \"rdinit=/nonexistent root=/dev/vdz rootwait loglevel=7\"\n",
    );
    let t0 = Instant::now();
    let e = cri.run_pod(pod_config("hangs", &logs)).unwrap_err();
    let took = t0.elapsed();
    println!("  hangs: {:.1} s: {}", took.as_secs_f64(), e.message());
    assert!(
        e.message().contains("agent did not answer")
            && e.message().contains("within 8s")
            && e.message().contains("Waiting for root device /dev/vdz"),
        "{e}"
    );
    assert_nothing_left(&c, Some(&ns));
}

#[test]
fn a_killed_vmm_ends_the_containers_and_the_sandbox_and_leaves_nothing() {
    let (ns, c, mut cri) = cri_env("kvvmmkill");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let (pod, ctr, _) = pod_with_sleeper(&mut cri, &c, "victim", &logs);
    // The VM process runs confined: no capabilities, no way to gain one, QEMU's seccomp.
    let vm = Command::new("pgrep")
        .args(["-f", &format!("qemu-system.*{}", c.dir.display())])
        .output()
        .unwrap();
    let vm = String::from_utf8_lossy(&vm.stdout).trim().to_owned();
    let status = fs::read_to_string(format!("/proc/{vm}/status")).unwrap();
    for want in [
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(
            status.contains(want),
            "VM process {vm}: no {want:?} in\n{status}"
        );
    }
    // In a mount namespace of its own whose root holds only what QEMU uses.
    let ns_of = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        ns_of(&vm),
        ns_of("self"),
        "QEMU shares the host's mount table"
    );
    let root = Path::new("/proc").join(&vm).join("root");
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let top = names(&root);
    for absent in ["proc", "sys", "home", "root", "run"] {
        assert!(
            !top.iter().any(|n| n == absent),
            "/{absent} in QEMU's root: {top:?}"
        );
    }
    assert_eq!(names(&root.join("etc")), ["ld.so.cache"]);
    assert_eq!(names(&root.join("dev")), ["null"]);
    // Every thread of the shim runs under a seccomp filter (the device threads under their
    // own, narrower ones) but the one that starts child processes such as this QEMU.
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:\t"))
        .unwrap()
        .trim()
        .to_owned();
    let (mut confined, mut unconfined) = (Vec::new(), Vec::new());
    for task in fs::read_dir(format!("/proc/{ppid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let st = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if st.contains("Seccomp:\t2") {
            confined.push(comm.to_owned());
        } else {
            unconfined.push(comm.to_owned());
        }
    }
    assert_eq!(
        unconfined,
        [vmm::spawn::THREAD_NAME],
        "unconfined shim threads"
    );
    for kind in [
        "vu-devices",
        "vu-relay-net",
        "blk-io",
        "vring_worker",
        // containerd's RPCs (the main thread, comm truncated).
        "containerd-shim",
        "vm-watch",
        "file-sync",
    ] {
        assert!(
            confined.iter().any(|c| c.starts_with(kind)),
            "no confined {kind} thread in {confined:?}"
        );
    }
    // Only virtio-net's vhost-user connection needs the relay.
    assert!(
        !confined.iter().any(|c| c.starts_with("vu-relay-blk")),
        "{confined:?}"
    );
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("qemu-system.*{}", c.dir.display())])
        .status()
        .unwrap();
    assert!(killed.success(), "no VM process to kill");
    assert_vm_end_reported(&mut cri, &c, &pod, &ctr, "");
    remove(&mut cri, &pod);
    assert_nothing_left(&c, Some(&ns));
}

/// A privileged hostPID container (the VM's PID namespace) makes every thread of the agent
/// (the guest's PID 1) return from its system call into `ud2`: a real crash of the agent.
const CRASH_THE_AGENT: &str = "for t in /proc/1/task/*; do \
     pc=$(awk '{print $NF}' $t/syscall); \
     case $pc in 0x*) printf '\\017\\013' | dd of=/proc/1/mem bs=1 seek=$((pc)) conv=notrunc 2>/dev/null;; esac; \
   done; echo patched; sleep 1000";

#[test]
fn an_agent_crash_ends_the_containers_and_the_sandbox_and_leaves_nothing() {
    let (ns, c, mut cri) = cri_env("kvagentcrash");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let mut cfg = pod_config("agentcrash", &logs);
    // hostPID: the pod's "host" is its VM, whose PID 1 is the agent.
    let shared = cri::v1::NamespaceOption {
        pid: cri::v1::NamespaceMode::Node as i32,
        ..Default::default()
    };
    cfg.linux = Some(cri::v1::LinuxPodSandboxConfig {
        security_context: Some(cri::v1::LinuxSandboxSecurityContext {
            namespace_options: Some(shared.clone()),
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = cri
        .run_pod(cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    let mut crasher = container_config("crasher", IMAGE, &["sh", "-c", CRASH_THE_AGENT], vec![]);
    crasher.linux = Some(cri::v1::LinuxContainerConfig {
        security_context: Some(cri::v1::LinuxContainerSecurityContext {
            namespace_options: Some(shared),
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let ctr = cri.create_container(&pod, crasher, &cfg).unwrap();
    cri.start_container(&ctr)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", tail(&c.log(), 40)));
    // The agent crashes on its next wake-up (the container's output, a call from the
    // shim); the kernel panics ("Attempted to kill init") and resets the VM.
    assert_vm_end_reported(&mut cri, &c, &pod, &ctr, "Attempted to kill init");
    remove(&mut cri, &pod);
    assert_nothing_left(&c, Some(&ns));
}

#[test]
fn without_a_tap_device_run_pod_sandbox_fails_clearly_and_the_next_pod_runs() {
    let (ns, c, mut cri) = cri_env("kvnotap");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    // The shims see no tun device (/dev/null in its place, in containerd's mounts only).
    in_mount_ns(&c, &["mount", "--bind", "/dev/null", "/dev/net/tun"]);
    let e = cri.run_pod(pod_config("notap", &logs)).unwrap_err();
    println!("  notap: {}", e.message());
    in_mount_ns(&c, &["umount", "/dev/net/tun"]);
    assert!(
        e.message().contains("tap") && e.message().contains("/dev/net/tun"),
        "{e}"
    );
    assert_nothing_left(&c, Some(&ns));
    let (pod, _, _) = pod_with_sleeper(&mut cri, &c, "tapped", &logs);
    remove(&mut cri, &pod);
    assert_nothing_left(&c, Some(&ns));
}

#[test]
fn a_full_disk_while_the_image_is_built_fails_the_container_and_keeps_no_partial_image() {
    let (ns, c, mut cri) = cri_env("kvdiskfull");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let cache = c.image_cache();
    fs::create_dir_all(&cache).unwrap();
    let cache_arg = cache.display().to_string();
    in_mount_ns(
        &c,
        &[
            "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", &cache_arg,
        ],
    );
    // The pause image is the first one the pod needs.
    let e = cri.run_pod(pod_config("full", &logs)).unwrap_err();
    println!("  disk full: {}", e.message());
    assert!(
        e.message().contains("No space left on device") && e.message().contains(&cache_arg),
        "{e}"
    );
    assert_nothing_left(&c, Some(&ns));
    // Room again: the next pod builds its images and runs.
    in_mount_ns(&c, &["mount", "-o", "remount,size=64m", &cache_arg]);
    let cfg = pod_config("room", &logs);
    let pod = cri.run_pod(cfg.clone()).unwrap();
    echo_in(&mut cri, &c, &pod, &cfg, &logs, "hello", "hello");
    remove(&mut cri, &pod);
    // The tmpfs is in containerd's mount namespace: look through its root.
    let seen = Path::new(&format!("/proc/{}/root", c.pid())).join(cache.strip_prefix("/").unwrap());
    let images: Vec<_> = fs::read_dir(&seen)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".erofs"))
        .collect();
    assert_eq!(images.len(), 2, "pause and busybox: {images:?}");
    assert_nothing_left(&c, Some(&ns));
    in_mount_ns(&c, &["umount", &cache_arg]);
}

#[test]
fn a_restarted_containerd_finds_its_pods_running_and_removes_them() {
    let (ns, mut c, mut cri) = cri_env("kvrestart");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let (pod, ctr, cfg) = pod_with_sleeper(&mut cri, &c, "survivor", &logs);
    // A container that keeps printing: its log goes on after the restart.
    let ticks = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done";
    let ticker = cri
        .create_container(
            &pod,
            container_config("ticker", IMAGE, &["sh", "-c", ticks], vec![]),
            &cfg,
        )
        .unwrap();
    cri.start_container(&ticker).unwrap();
    let last_tick = || -> Option<u64> {
        fs::read_to_string(cri::log_file(&logs, "ticker"))
            .ok()?
            .lines()
            .filter_map(|l| l.rsplit("tick-").next()?.parse().ok())
            .max()
    };
    let before = until("the ticker's output", &c, last_tick);
    c.restart();
    let mut cri = Cri::connect(&c.socket()).expect("reconnect to the CRI");
    // The CRI answers "not initialized" while it reloads its state (kubelet retries too).
    let st = until("the CRI to come back", &c, || cri.pod_status(&pod).ok());
    assert_eq!(
        st.state,
        cri::v1::PodSandboxState::SandboxReady as i32,
        "{st:?}\n{}",
        tail(&c.log(), 60)
    );
    let st = cri.container_status(&ctr).unwrap();
    assert_eq!(
        st.state,
        cri::v1::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    let r = cri.exec_sync(&ctr, &["echo", "still-here"]).unwrap();
    assert_eq!(r.stdout, b"still-here\n");
    until("the ticker's log to go on after the restart", &c, || {
        last_tick().filter(|n| *n > before + 20)
    });
    // The pod's shim takes new containers from the new containerd.
    echo_in(&mut cri, &c, &pod, &cfg, &logs, "late", "late-container");
    remove(&mut cri, &pod);
    assert_nothing_left(&c, Some(&ns));
}
