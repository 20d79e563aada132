//! Limits that keep one pod from hurting the node: a guest that floods its serial console, or
//! a container that floods its stdout through the vsock, cannot grow the shim's own memory
//! (anonymous RSS; the guest memory it shares with QEMU is the pod's, not the shim's) past
//! SHIM_BOUND, and the console log stays within twice `console_log_kib` on disk.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest` (whose device-test initramfs floods the console).

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use tests::agent::guest_file;
use tests::containerd::{tail, Containerd};
use tests::cri::{self, container_config, pod_config};
use tests::crienv::{cri_env, until, IMAGE};
use tests::leaks::assert_nothing_left;

/// The most anonymous memory a shim may hold, flood or not (about 2 MiB measured under
/// either flood: the console passes through a pipe and 4 KiB buffers, the vsock through the
/// device's per-connection credit).
const SHIM_BOUND: u64 = 16 << 20;
const CONSOLE_CAP_KIB: u64 = 256;

/// What the watcher saw: the shims' largest anonymous RSS, the largest console log on disk,
/// whether the log was ever rotated.
#[derive(Debug, Default)]
struct Peak {
    shim_anon: u64,
    console_bytes: u64,
    rotated: bool,
}

/// `key:` of /proc/PID/status, in bytes.
fn status_bytes(pid: &str, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        << 10
}

/// Samples the shims of `c` and their console logs every 50 ms until `stop`.
fn watch(c: &Containerd, stop: Arc<AtomicBool>) -> thread::JoinHandle<Peak> {
    let pattern = format!("containerd-shim-kubevirt-v1 .*{}", c.dir.display());
    let state = c.shim_state();
    thread::spawn(move || {
        let mut peak = Peak::default();
        while !stop.load(Ordering::Relaxed) {
            let out = std::process::Command::new("pgrep")
                .args(["-f", &pattern])
                .output()
                .unwrap();
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                peak.shim_anon = peak.shim_anon.max(status_bytes(pid, "RssAnon:"));
            }
            for pod in fs::read_dir(&state).into_iter().flatten().flatten() {
                let size = |name: &str| fs::metadata(pod.path().join(name)).map(|m| m.len());
                let (log, old) = (size("console.log"), size("console.log.1"));
                peak.rotated |= old.is_ok();
                peak.console_bytes = peak.console_bytes.max(log.unwrap_or(0) + old.unwrap_or(0));
            }
            thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

#[test]
fn a_guest_flooding_its_console_keeps_the_shim_small_and_the_log_capped() {
    let (ns, c, mut cri) = cri_env("kvconflood");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    // A guest whose init writes to its serial console without end (and never starts an
    // agent: the pod fails after the agent timeout, flooding all along).
    let flood = base64::engine::general_purpose::STANDARD
        .encode("yes kubevirt-console-flood-kubevirt-console-flood > /dev/ttyS0\n");
    let cfg = c.dir.join("shim.toml");
    let good = fs::read_to_string(&cfg).unwrap();
    let flooding: String = good
        .lines()
        .filter(|l| !l.starts_with("initramfs"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(
        &cfg,
        format!(
            "{flooding}initramfs = {:?}\nagent_timeout_secs = 15\nconsole_log_kib = {CONSOLE_CAP_KIB}\nextra_cmdline = \"kvtest.cmd={flood}\"\n",
            guest_file("devtest-initramfs.img")
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(&c, stop.clone());
    let e = cri.run_pod(pod_config("flooder", &logs)).unwrap_err();
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    println!("  console flood: {peak:?}; {}", e.message());
    assert!(e.message().contains("agent did not answer"), "{e}");
    assert!(
        e.message().contains("kubevirt-console-flood"),
        "the console tail shows the flood: {e}"
    );
    assert!(peak.rotated, "the flood never filled the log: {peak:?}");
    assert!(
        peak.console_bytes <= (2 * CONSOLE_CAP_KIB) << 10,
        "{peak:?}"
    );
    assert!(
        peak.shim_anon > 0 && peak.shim_anon <= SHIM_BOUND,
        "{peak:?}"
    );
    assert_nothing_left(&c, Some(&ns));
}

#[test]
fn a_container_flooding_its_stdout_keeps_the_shim_small() {
    let (ns, c, mut cri) = cri_env("kvoutflood");
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let cfg = pod_config("chatty", &logs);
    let pod = cri
        .run_pod(cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(&c, stop.clone());
    let ctr = cri
        .create_container(
            &pod,
            container_config(
                "flood",
                IMAGE,
                &[
                    "sh",
                    "-c",
                    "yes 0123456789abcdef0123456789abcdef0123456789abcdef",
                ],
                vec![],
            ),
            &cfg,
        )
        .unwrap();
    cri.start_container(&ctr).unwrap();
    // Flood for a while: the bytes go guest -> vsock -> shim -> containerd -> the CRI log.
    let log = cri::log_file(&logs, "flood");
    until("32 MiB of output in the CRI log", &c, || {
        (fs::metadata(&log).map(|m| m.len()).unwrap_or(0) > 32 << 20).then_some(())
    });
    thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    let logged = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    println!("  stdout flood: {} MiB logged; {peak:?}", logged >> 20);
    assert!(
        peak.shim_anon > 0 && peak.shim_anon <= SHIM_BOUND,
        "{peak:?}"
    );
    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
    assert_nothing_left(&c, Some(&ns));
}
