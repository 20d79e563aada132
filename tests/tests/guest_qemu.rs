//! Boots the guest kernel built by `make guest` (target/guest) with the tiny test init under
//! QEMU's microvm machine with TCG, so it runs on any x86_64 host, KVM or not.
//!
//! Checks the kernel banner, our command line, the init's hello line (release, CPU count) and
//! that QEMU exits with status 0 because the guest rebooted (`-no-reboot`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);
const CPUS: u32 = 2;

struct Guest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
    release: String,
}

fn guest() -> Guest {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/guest"));
    let vmlinux = dir.join("vmlinux");
    let initramfs = dir.join("test-initramfs.img");
    let release_file = dir.join("kernel.release");
    for p in [&vmlinux, &initramfs, &release_file] {
        assert!(
            p.exists(),
            "{} is missing: run `make guest` first",
            p.display()
        );
    }
    let release = std::fs::read_to_string(&release_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", release_file.display()))
        .trim()
        .to_string();
    Guest {
        vmlinux,
        initramfs,
        release,
    }
}

struct Boot {
    output: String,
    /// Time from starting QEMU to the init's hello line.
    to_init: Option<Duration>,
    /// Time from starting QEMU to its exit.
    total: Duration,
    success: bool,
}

/// Runs QEMU until it exits, killing it after `TIMEOUT`.
fn boot(guest: &Guest, append: &str) -> Boot {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // acpi=off: QEMU writes an MP table and puts `virtio_mmio.device=` on the command line.
        // The PIT and PIC stay on: under TCG there is no kvmclock, and without the PIT the
        // kernel cannot calibrate the TSC (it hangs after "Unable to calibrate against PIT");
        // with pic=off it hangs bringing up the second CPU. Without the RTC it waits a second
        // for a CMOS update that never ends.
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=on",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            &CPUS.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&guest.vmlinux)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args(["-append", append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting qemu-system-x86_64: {e} (install it with `make deps`, then `make guest`)"
            )
        });

    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    for (stream, tx) in [
        (
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            tx.clone(),
        ),
        (Box::new(stderr), tx),
    ] {
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end().to_string();
                        if tx.send((Instant::now(), text)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }

    let mut output = String::new();
    let mut to_init = None;
    let deadline = start + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if to_init.is_none() && line.contains("kubevirt-test-init: hello") {
                    to_init = Some(at - start);
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("guest did not finish within {TIMEOUT:?}; output so far:\n{output}");
            }
        }
    }
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for qemu") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu closed its output but did not exit; output:\n{output}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Boot {
        output,
        to_init,
        total: start.elapsed(),
        success: status.success(),
    }
}

#[test]
fn guest_kernel_boots_to_test_init_under_qemu() {
    let guest = guest();
    let append = "console=ttyS0 reboot=k panic=-1";
    let boot = boot(&guest, append);
    let out = &boot.output;

    assert!(
        out.contains("Linux version"),
        "no kernel banner in the output:\n{out}"
    );
    let cmdline = out
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("no `Kernel command line:` in the output:\n{out}"));
    assert!(
        cmdline.contains(append),
        "command line {cmdline:?} lacks {append:?}"
    );
    let hello = format!(
        "kubevirt-test-init: hello from pid 1, uname -r={}, cpus={CPUS}",
        guest.release
    );
    assert!(out.contains(&hello), "no {hello:?} in the output:\n{out}");
    assert!(
        boot.success,
        "qemu did not exit with status 0 (guest reboot); output:\n{out}"
    );

    let to_init = boot.to_init.expect("hello line seen");
    println!(
        "guest {}: QEMU start to init {:.2} s, to QEMU exit {:.2} s (TCG, {CPUS} vCPUs)",
        guest.release,
        to_init.as_secs_f64(),
        boot.total.as_secs_f64()
    );
}

/// `earlyprintk=serial` must show the banner on the serial port before the real console exists
/// (EARLY_PRINTK): that is what a guest shows under a slow, emulated VMM.
#[test]
fn guest_kernel_prints_banner_with_earlyprintk() {
    let guest = guest();
    let boot = boot(
        &guest,
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 reboot=k panic=-1",
    );
    let out = &boot.output;
    let banner = out
        .find("Linux version")
        .unwrap_or_else(|| panic!("no banner:\n{out}"));
    let early = out
        .find("bootconsole [earlyser0] enabled")
        .unwrap_or_else(|| panic!("early console not enabled (EARLY_PRINTK off?):\n{out}"));
    let real = out
        .find("printk: console [ttyS0] enabled")
        .unwrap_or_else(|| panic!("ttyS0 console never enabled:\n{out}"));
    assert!(
        banner < real && early < real,
        "banner not printed before ttyS0 came up:\n{out}"
    );
    assert!(
        boot.success,
        "qemu did not exit with status 0 (guest reboot); output:\n{out}"
    );
}
