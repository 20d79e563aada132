//! The shim end to end through a real containerd (test ladder rung 5): Debian's containerd
//! 1.6, started privately by the test with our shim on its PATH, runs a busybox image with
//! `ctr run --runtime io.containerd.kubevirt.v1`; the container runs in a microVM (the qemu
//! back end here) with our kernel, so `uname -r` is the guest's.
//!
//! Needs root, containerd, qemu-system-x86_64, mkfs.erofs, `make build` and `make guest`.

use std::fs;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::containerd::{tail, Containerd};
use tests::images;
use tests::leaks::assert_nothing_left;

const RUNTIME: &str = "io.containerd.kubevirt.v1";
const IMAGE: &str = "localhost/busybox:test";

fn containerd_with_image(name: &str) -> Containerd {
    let c = Containerd::start(name);
    let archive = c.dir.join("busybox.tar");
    images::busybox_oci_archive(&archive, IMAGE);
    c.import(&archive);
    c
}

/// Polls `ctr task ls` until `done` holds (30 s at most).
fn wait_task_ls(c: &Containerd, what: &str, done: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let ls = c.ctr_ok(&["task", "ls"]);
        if done(&ls) {
            return;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let shims = Command::new("pgrep")
                .args([
                    "-f",
                    &format!("containerd-shim-kubevirt-v1 .*{}", c.dir.display()),
                ])
                .output()
                .unwrap();
            let threads: String = String::from_utf8_lossy(&shims.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(tests::threads::report)
                .collect();
            panic!(
                "waiting for {what}: {ls}\n{}\n{threads}",
                tail(&c.log(), 40)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn host_release() -> String {
    String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned()
}

fn guest_release() -> String {
    let p = tests::workspace_root().join("target/guest/kernel.release");
    fs::read_to_string(p)
        .expect("target/guest/kernel.release (make guest)")
        .trim()
        .to_owned()
}

#[test]
fn ctr_run_uname_exit_codes_exec_metrics_kill() {
    let c = containerd_with_image("ctr");
    let start = Instant::now();
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "uname1",
        "uname",
        "-r",
    ]);
    println!(
        "  ctr run uname -r: {:.2} s (VM on the qemu back end here)",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.trim(),
        guest_release(),
        "the container must see the guest kernel"
    );
    assert_ne!(out.trim(), host_release());

    // Exit codes pass through ctr.
    let st = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "exit7",
        "sh",
        "-c",
        "echo before-exit; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; \
         exit 7",
    ]);
    assert_eq!(
        st.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = String::from_utf8_lossy(&st.stdout);
    let (first, clock) = out.split_once('\n').unwrap_or((&out, ""));
    assert_eq!(first, "before-exit");
    // The pod VM keeps a high-resolution clock however busy the node (vmm/src/tsc.rs): tsc
    // under TCG, tsc or kvm-clock on native KVM, never jiffies.
    assert!(
        !clock.is_empty() && !clock.contains("jiffies"),
        "clocksource {clock:?}"
    );

    // A detached task: exec, metrics, kill.
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "sleeper",
        "sleep",
        "1000",
    ]);
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "sleeper",
        "sh",
        "-c",
        "echo exec-ok; cat /etc/image-marker",
    ]);
    assert_eq!(out, "exec-ok\nbusybox test image\n");
    // stdin reaches an exec and its end closes it. (Not tested through ctr: an empty stdin,
    // which ctr may close before the exec exists and without a CloseIO; the stdin unit tests
    // cover a close before the start.)
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let piped = c.ctr_with_input(
        &["task", "exec", "--exec-id", "in1", "sleeper", "cat"],
        &input,
    );
    assert!(piped.status.success(), "{piped:?}");
    assert!(
        piped.stdout == input,
        "cat gave back {} of {} bytes",
        piped.stdout.len(),
        input.len()
    );
    let metrics = c.ctr_ok(&["task", "metrics", "sleeper"]);
    assert!(
        metrics.contains("memory.usage_in_bytes") || metrics.contains("memory"),
        "{metrics}"
    );
    println!("  ctr task metrics:\n{}", metrics.trim_end());
    let value = |key: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(value("memory.usage").is_some_and(|v| v > 0), "{metrics}");
    assert!(value("pids.current").is_some_and(|v| v >= 1), "{metrics}");
    // Pause freezes the container's cgroup in the guest; resume thaws it.
    c.ctr_ok(&["task", "pause", "sleeper"]);
    assert!(c.ctr_ok(&["task", "ls"]).contains("PAUSED"));
    c.ctr_ok(&["task", "resume", "sleeper"]);
    assert!(c.ctr_ok(&["task", "ls"]).contains("RUNNING"));
    let ps = c.ctr_ok(&["task", "ps", "sleeper"]);
    assert!(ps.lines().count() >= 2, "{ps}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "sleeper"]);
    wait_task_ls(&c, "the task to stop", |ls| ls.contains("STOPPED"));
    c.ctr_ok(&["task", "delete", "sleeper"]);
    c.ctr_ok(&["container", "delete", "sleeper"]);
    assert_nothing_left(&c, None);
    assert!(c.image_cache().exists());
}

#[test]
fn a_killed_shim_is_cleaned_up_by_task_delete() {
    let c = containerd_with_image("crash");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "victim",
        "sleep",
        "1000",
    ]);
    let pid = c.shim_pid("victim").to_string();
    // The shim and its VM live in the container's cgroup (ctr's `/default/victim`).
    assert!(
        tests::cgroups::threads_outside(pid.parse().unwrap(), "default/victim").is_empty(),
        "the shim is not in its container's cgroup"
    );
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    // containerd notices the dead shim and runs `containerd-shim-kubevirt-v1 delete`.
    wait_task_ls(&c, "containerd to notice the dead shim", |ls| {
        !ls.contains("RUNNING")
    });
    let _ = c.ctr(&["task", "delete", "victim"]);
    c.ctr_ok(&["container", "delete", "victim"]);
    // containerd cleans up after a dead shim in the background: give it a moment.
    let t0 = std::time::Instant::now();
    while tests::cgroups::exists("default/victim") && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tests::cgroups::exists("default/victim"),
        "the dead shim's cgroup is left"
    );
    assert_nothing_left(&c, None);
    let socket_dirs = vmm::qemu::socket_dirs(pid.parse().unwrap());
    assert!(
        socket_dirs.is_empty(),
        "vhost-user socket dirs of the dead shim: {socket_dirs:?}"
    );
}

const SANDBOX: &str = "io.kubernetes.cri.sandbox-id";

#[test]
fn containers_of_one_pod_share_one_vm_with_their_own_images() {
    let c = containerd_with_image("pod");
    let second = c.dir.join("second.tar");
    images::busybox_oci_archive_marked(&second, "localhost/second:test", "second image");
    c.import(&second);
    let group = format!("{SANDBOX}=pod1");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &group,
        IMAGE,
        "pod1",
        "sleep",
        "1000",
    ]);
    let server = "mkdir /www && echo served-by-app2 > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www";
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &group,
        "localhost/second:test",
        "app2",
        "sh",
        "-c",
        server,
    ]);
    let shims = Command::new("pgrep")
        .args([
            "-fc",
            &format!("containerd-shim-kubevirt-v1 .*{}", c.dir.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&shims.stdout).trim(),
        "1",
        "one shim for the pod"
    );

    let exec = |id: &str, exec_id: &str, script: &str| {
        c.ctr_ok(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
    };
    // One VM (same boot id), separate images and file systems, one network.
    let a = exec(
        "pod1",
        "a",
        "cat /proc/sys/kernel/random/boot_id /etc/image-marker",
    );
    let b = exec(
        "app2",
        "b",
        "cat /proc/sys/kernel/random/boot_id /etc/image-marker",
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(a[0], b[0], "both containers run in the same VM");
    assert_eq!((a[1], b[1]), ("busybox test image", "second image"));
    let page = exec("pod1", "w", "test ! -e /www && i=0; until wget -q -O - http://127.0.0.1:8080/; do i=$((i+1)); [ $i -lt 100 ] || exit 9; sleep 0.1; done");
    assert_eq!(page, "served-by-app2\n");

    // A container removed frees its slot; a third one takes it.
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "app2"]);
    wait_task_ls(&c, "app2 to stop", |ls| {
        ls.lines()
            .any(|l| l.starts_with("app2") && l.contains("STOPPED"))
    });
    c.ctr_ok(&["task", "delete", "app2"]);
    c.ctr_ok(&["container", "delete", "app2"]);
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        &group,
        "localhost/second:test",
        "app3",
        "cat",
        "/etc/image-marker",
    ]);
    assert_eq!(out, "second image\n");

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    wait_task_ls(&c, "pod1 to stop", |ls| ls.contains("STOPPED"));
    c.ctr_ok(&["task", "delete", "pod1"]);
    c.ctr_ok(&["container", "delete", "pod1"]);
    assert_nothing_left(&c, None);
}

/// Runs a container expecting failure; returns ctr's error output.
fn run_fails(c: &Containerd, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "true"]);
    let out = c.ctr(&args);
    assert!(!out.status.success(), "{id} should have failed");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("  refused: {}", e.trim());
    e
}

#[test]
fn bad_input_fails_with_a_message_that_names_it() {
    // A missing guest kernel.
    let c = Containerd::start_with_shim_config("nokernel", |cfg| {
        cfg.lines()
            .map(|l| {
                if l.starts_with("kernel") {
                    "kernel = \"/nonexistent/vmlinux\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let archive = c.dir.join("busybox.tar");
    images::busybox_oci_archive(&archive, IMAGE);
    c.import(&archive);
    let e = run_fails(&c, "nokernel", &[]);
    assert!(
        e.contains("guest kernel") && e.contains("/nonexistent/vmlinux"),
        "{e}"
    );
    assert_nothing_left(&c, None);
    drop(c);

    // An unknown option in the shim's configuration.
    let c = Containerd::start_with_shim_config("badopt", |cfg| format!("{cfg}memory_mb = 512\n"));
    c.import(&archive_for(&c));
    let e = run_fails(&c, "badopt", &[]);
    assert!(e.contains("memory_mb") && e.contains("shim.toml"), "{e}");
    drop(c);

    // A volume the VM cannot honour: a Unix socket.
    let c = containerd_with_image("badvol");
    let sock = c.dir.join("app.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/run/app.sock,options=rbind",
        sock.display()
    );
    let e = run_fails(&c, "badvol", &["--mount", &mount]);
    assert!(
        e.contains("mount /run/app.sock") && e.contains("files and directories"),
        "{e}"
    );
    assert_nothing_left(&c, None);
}

fn archive_for(c: &Containerd) -> std::path::PathBuf {
    let archive = c.dir.join("busybox.tar");
    images::busybox_oci_archive(&archive, IMAGE);
    archive
}

#[test]
fn ctr_run_with_a_terminal() {
    let c = containerd_with_image("tty");
    // `ctr run -t` needs a terminal of its own: script(1) gives it a pty.
    let cmd = format!(
        "ctr --address {} run -t --rm --runtime {RUNTIME} {IMAGE} tty1 sh -c 'tty; echo term=$TERM'",
        c.socket().display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "ctr run -t: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("/dev/pts/0\n"),
        "the container's stdio is a terminal in the guest: {text:?}"
    );
    assert_nothing_left(&c, None);
}
