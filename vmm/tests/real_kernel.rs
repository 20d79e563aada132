//! Level 3 of the test ladder: the project's guest kernel (`make guest`) under
//! `kubevirt-vmm run`. Everywhere it must print its banner, our command line, our e820 map
//! and find our MP table on our serial port. Where `doctor` says KVM runs guest code
//! natively it must also reach the test init and reboot cleanly; where KVM emulates guest
//! code (these machines) Linux cannot reach user space, which `doctor` reports.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn artefact(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make guest` first",
        p.display()
    );
    p
}

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubevirt-vmm"))
}

/// A running `kubevirt-vmm` whose console is collected as it arrives.
struct Run {
    child: Child,
    out: Arc<Mutex<String>>,
    started: Instant,
}

impl Run {
    fn start(args: &[&str]) -> Self {
        let mut child = vmm()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kubevirt-vmm");
        let out = Arc::new(Mutex::new(String::new()));
        let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = so.read(&mut buf) {
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let o = out.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            o.lock().unwrap().push_str(&s);
        });
        Self {
            child,
            out,
            started: Instant::now(),
        }
    }

    /// Waits until every needle is on the console; returns the time to the last one.
    fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> Duration {
        loop {
            let text = self.out.lock().unwrap().clone();
            if needles.iter().all(|n| text.contains(n)) {
                return self.started.elapsed();
            }
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() || self.started.elapsed() > timeout {
                std::thread::sleep(Duration::from_millis(100));
                let text = self.out.lock().unwrap().clone();
                let _ = self.child.kill();
                let missing: Vec<_> = needles.iter().filter(|n| !text.contains(**n)).collect();
                panic!("missing {missing:?} (exit {exited:?}) in console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn native_kvm() -> bool {
    let out = vmm().args(["doctor", "--verdict"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "builtin"
}

fn release() -> String {
    std::fs::read_to_string(artefact("kernel.release"))
        .unwrap()
        .trim()
        .to_string()
}

const CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 kubevirt.test=ladder3";

#[test]
fn vmlinux_prints_banner_cmdline_e820_and_mp_table() {
    let kernel = artefact("vmlinux");
    let mut run = Run::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128",
        "--vcpus",
        "2",
        "--cpu-hide",
        "xsave,cx16",
        "--cmdline",
        CMDLINE,
    ]);
    let banner = format!("Linux version {} ", release());
    let cmdline = format!("Command line: {CMDLINE}");
    let t_banner = run.wait_for(&[&banner], Duration::from_secs(60));
    let t_all = run.wait_for(
        &[
            &cmdline,
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
            "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
            "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
            "MPTABLE: OEM ID: KUBEVIRT",
            "Processors: 2",
            "Hypervisor detected: KVM",
        ],
        Duration::from_secs(120),
    );
    println!("banner after {t_banner:?}, MP table parsed after {t_all:?}");
    let text = run.text();
    assert!(
        !text.contains("BIOS-e820: [mem 0x0000000008000000"),
        "no RAM beyond 128 MiB"
    );
}

#[test]
fn bzimage_boots_to_the_banner() {
    let kernel = artefact("bzImage");
    let mut run = Run::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128",
        "--cpu-hide",
        "xsave,cx16",
        "--cmdline",
        CMDLINE,
    ]);
    // The decompressor runs in the guest: slow where KVM emulates guest code.
    let t = run.wait_for(
        &[
            &format!("Linux version {} ", release()),
            &format!("Command line: {CMDLINE}"),
        ],
        Duration::from_secs(300),
    );
    println!("bzImage banner after {t:?}");
}

#[test]
fn native_kvm_reaches_the_init_or_emulation_is_reported() {
    let kernel = artefact("vmlinux");
    let initrd = artefact("test-initramfs.img");
    let native = native_kvm();
    let mut cmd = vmm();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd);
    cmd.args([
        "--vcpus",
        "2",
        "--cmdline",
        "console=ttyS0 reboot=k panic=1",
    ]);
    if !native {
        cmd.args(["--cpu-hide", "xsave,cx16"]);
    }
    let out = cmd.output().unwrap();
    if native {
        let text = String::from_utf8_lossy(&out.stdout);
        let hello = format!(
            "kubevirt-test-init: hello from pid 1, uname -r={}, cpus=2",
            release()
        );
        assert!(text.contains(&hello), "{text}");
        assert_eq!(
            out.status.code(),
            Some(0),
            "guest reboot ends the VM cleanly"
        );
    } else {
        // Here Linux dies inside KVM's emulator long before user space; the VMM must end
        // with a clear reason rather than hang or claim success.
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains("vcpu0: KVM could not emulate an instruction"),
            "{err}"
        );
    }
}

#[test]
fn a_closed_console_pipe_does_not_kill_the_vmm_with_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    // `kubevirt-vmm run | head -c 100` (as `make demo` does with grep -m): the kernel goes on
    // printing into a closed pipe. That once ended in SIGSYS (a syscall the seccomp filter
    // refused); it must end as the run would, or be stopped by us.
    let kernel = artefact("vmlinux");
    // stdout and stderr into one pipe (`2>&1 |`): the VMM's own messages hit it too.
    let (mut out, pipe) = std::io::pipe().unwrap();
    let mut child = vmm()
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", "2"])
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1",
        ])
        .stdout(pipe.try_clone().unwrap())
        .stderr(pipe)
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(status.signal(), Some(libc::SIGSYS), "seccomp killed it");
}
