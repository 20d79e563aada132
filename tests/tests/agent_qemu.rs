//! The guest agent end to end (test ladder rung 4): our kernel with the agent as /init, booted
//! by `kubevirt-vmm run --machine auto` (the qemu back end here, our devices over vhost-user;
//! builtin where KVM is native), driven over ttrpc on the hybrid vsock by the test client in
//! tests/src/agent.rs. Containers run from a busybox image converted to EROFS.
//!
//! Needs root, qemu-system-x86_64, mkfs.erofs, mkfs.ext4, `make build` and `make guest`.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use protocol::agent::*;
use protocol::ttrpc::Code;
use tests::agent::*;
use tests::images;

/// A temporary directory for one test's disks and sockets, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kvagent-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The image disk (id `img`) and `n` scratch disks (ids `s0`..) every test VM gets.
fn standard_disks(dir: &Scratch, n: usize) -> Vec<Disk> {
    let image = dir.join("busybox.erofs");
    images::busybox_erofs(&image);
    let mut disks = vec![Disk {
        path: image,
        id: "img".into(),
        read_only: true,
    }];
    for i in 0..n {
        let p = dir.join(&format!("scratch{i}.ext4"));
        images::ext4(&p, 64);
        disks.push(Disk {
            path: p,
            id: format!("s{i}"),
            read_only: false,
        });
    }
    disks
}

fn boot(dir: &Scratch, disks: Vec<Disk>, extra: Vec<String>) -> GuestVm {
    let vm = GuestVm::boot(
        &dir.0,
        &GuestOptions {
            disks,
            extra,
            memory_mib: 256,
        },
    );
    println!(
        "  VM start to agent ready: {:.2} s",
        vm.ready_after.as_secs_f64()
    );
    vm
}

fn code_of(e: &protocol::ttrpc::Error) -> Code {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => s.code(),
        _ => Code::UNKNOWN,
    }
}

#[test]
fn container_lifecycle_echo_exit_code_exec_signal_stats() {
    let dir = Scratch::new("life");
    let vm = boot(&dir, standard_disks(&dir, 2), vec![]);
    assert!(
        vm.ready_after < Duration::from_secs(3),
        "VM start to agent ready took {:?} (target: under 3 s on TCG)",
        vm.ready_after
    );
    let a = &vm.agent;
    let ping = a.ping(ctx(), &PingRequest::new()).unwrap();
    assert!(ping.kernel_release.ends_with("-kubevirt"), "{ping:?}");
    println!(
        "  guest kernel {}, agent ready {} ms after guest boot",
        ping.kernel_release,
        ping.ready_after_boot_ns / 1_000_000
    );

    // echo, and exit code 42 arrives as 42.
    create(
        a,
        "echo",
        "img",
        "s0",
        spec(
            &[
                "sh",
                "-c",
                "echo hello from the pod; cat /etc/image-marker; echo err >&2; exit 42",
            ],
            serde_json::json!({}),
        ),
    )
    .unwrap();
    let (out, err, code) = run_to_end(a, "echo");
    assert_eq!(out, "hello from the pod\nbusybox test image\n");
    assert_eq!(err, "err\n");
    assert_eq!(code, 42);
    a.remove_container(ctx(), &container("echo")).unwrap();

    // A long-running container: exec, signals, stats.
    create(
        a,
        "sleeper",
        "img",
        "s1",
        spec(&["sleep", "1000"], serde_json::json!({})),
    )
    .unwrap();
    let pid = a.start_container(ctx(), &container("sleeper")).unwrap().pid;
    assert!(pid > 1);
    let exec = |id: &str, args: &[&str]| {
        let req = ExecProcessRequest {
            container_id: "sleeper".into(),
            exec_id: id.into(),
            process: process(args),
            ..Default::default()
        };
        a.exec_process(ctx(), &req).unwrap()
    };
    exec(
        "e1",
        &[
            "sh",
            "-c",
            "echo exec-ok; ps -o pid,comm | grep -c sleep; exit 3",
        ],
    );
    let out = String::from_utf8(read_all(a, "sleeper", "e1", false)).unwrap();
    assert!(out.starts_with("exec-ok\n"), "{out}");
    assert_eq!(
        a.wait_process(ctx(), &proc_req("sleeper", "e1"))
            .unwrap()
            .exit_status,
        3
    );

    // SIGTERM to a sleep (an exec: a namespace's PID 1 ignores unhandled signals) -> 128+15.
    exec("e2", &["sleep", "1000"]);
    let sig = |exec_id: &str, signal: u32| {
        let req = SignalRequest {
            container_id: "sleeper".into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        a.signal_process(ctx(), &req).unwrap();
    };
    sig("e2", 15);
    assert_eq!(
        a.wait_process(ctx(), &proc_req("sleeper", "e2"))
            .unwrap()
            .exit_status,
        143
    );

    let stats = a.stats_container(ctx(), &container("sleeper")).unwrap();
    assert!(
        stats.cpu_usage_usec > 0 && stats.memory_usage_bytes > 0 && stats.pids_current >= 1,
        "{stats:?}"
    );
    println!(
        "  stats: cpu {} us, memory {} KiB, pids {}",
        stats.cpu_usage_usec,
        stats.memory_usage_bytes / 1024,
        stats.pids_current
    );

    // A running container cannot be removed; SIGKILL ends it with 137.
    let e = a
        .remove_container(ctx(), &container("sleeper"))
        .unwrap_err();
    assert!(error_text(&e).contains("running"), "{}", error_text(&e));
    sig("", 9);
    let w = a.wait_process(ctx(), &proc_req("sleeper", "")).unwrap();
    assert_eq!(w.exit_status, 137);
    assert!(w.exited_at_unix_ns > 0);
    a.remove_container(ctx(), &container("sleeper")).unwrap();
    let e = a.stats_container(ctx(), &container("sleeper")).unwrap_err();
    assert_eq!(code_of(&e), Code::NOT_FOUND);
    vm.shutdown();
}
