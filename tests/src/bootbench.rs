//! A real kernel's early boot (the project's guest kernel, `make guest`): time from exec to
//! its banner and to `Kernel command line:` on the serial port, on our VMM next to QEMU
//! microvm with the same kernel and command line, in the same run.

use std::fmt::Write as _;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::agent::guest_file;
use crate::chart::Ratio;
use crate::measure::median;

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1";
const MARKS: [&str; 2] = ["Linux version", "Kernel command line:"];

/// Runs `cmd` until its stdout has shown every mark; the time to each (or why not).
fn to_marks(mut cmd: Command) -> Result<[Duration; 2], String> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut seen = [None; 2];
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = out.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            for (i, m) in MARKS.iter().enumerate() {
                if seen[i].is_none() && text.contains(m) {
                    seen[i] = Some(t0.elapsed());
                }
            }
            if let [Some(a), Some(b)] = seen {
                let _ = tx.send([a, b]);
                return;
            }
        }
    });
    let r = rx
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "no kernel banner and command line within 120 s".to_owned());
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn ours() -> Command {
    let mut c = Command::new(crate::vmm_binary());
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinux"))
        .args([
            "--memory",
            "128",
            "--cpu-hide",
            "xsave,cx16",
            "--cmdline",
            CMDLINE,
        ]);
    c
}

fn qemu() -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(guest_file("vmlinux"))
    .args(["-append", CMDLINE]);
    c
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Appends the early-boot section; `native` says whether KVM runs guest code natively here.
pub fn kernel_section(r: &mut String, runs: usize, native: bool, chart: &mut Vec<Ratio>) {
    let _ = writeln!(
        r,
        "## Real kernel early boot (guest kernel of `make guest`, 128 MiB, median of {runs})\n"
    );
    let _ = writeln!(
        r,
        "| subject | exec -> banner | exec -> `Kernel command line:` |"
    );
    let _ = writeln!(r, "| --- | --- | --- |");
    let ours_label = if native {
        "kubevirt-vmm (KVM)"
    } else {
        "kubevirt-vmm (KVM, which emulates guest code on this host)"
    };
    let mut medians = Vec::new();
    for (label, make) in [
        (ours_label, ours as fn() -> Command),
        ("QEMU microvm (TCG)", qemu),
    ] {
        let mut times: Vec<[Duration; 2]> = Vec::new();
        let mut error = None;
        for _ in 0..runs {
            match to_marks(make()) {
                Ok(t) => times.push(t),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = error {
            let _ = writeln!(r, "| {label} | failed: {e} | - |");
            medians.push(None);
            continue;
        }
        let banner = median(&times.iter().map(|t| t[0]).collect::<Vec<_>>());
        let cmdline = median(&times.iter().map(|t| t[1]).collect::<Vec<_>>());
        let _ = writeln!(r, "| {label} | {} | {} |", ms(banner), ms(cmdline));
        medians.push(Some(cmdline));
    }
    // Under KVM's emulator the comparison says nothing about our VMM: chart it where native.
    if let ([Some(o), Some(q)], true) = (&medians[..], native) {
        chart.push(Ratio::new(
            "kernel to its command line, vs QEMU microvm",
            q.as_secs_f64() / o.as_secs_f64().max(1e-9),
            1.0,
        ));
    }
    let _ = writeln!(
        r,
        "\n{}\n",
        if native {
            "Both run the same kernel image and command line."
        } else {
            "On this host KVM runs guest code through its instruction emulator, so our VMM's \
             times here are the emulator's, not a native boot's; QEMU uses its TCG translator. \
             Neither is what a native-KVM node sees."
        }
    );
}
