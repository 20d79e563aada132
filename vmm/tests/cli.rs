//! `kubevirt-vmm` as a user runs it: exit codes, console output, errors naming bad input.

use std::process::{Command, Output};

use vmm::guests::test_guest;

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubevirt-vmm"))
        .args(args)
        .output()
        .expect("run kubevirt-vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn tiny_guest_prints_its_byte_and_exits_zero() {
    let hello = test_guest("hello");
    let out = vmm(&[
        "run",
        "--kernel",
        hello.to_str().unwrap(),
        "--memory",
        "128",
    ]);
    assert_eq!(text(&out.stdout), "K");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn triple_fault_exits_non_zero_and_says_why() {
    let g = test_guest("triplefault");
    let out = vmm(&["run", "--kernel", g.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("vcpu0: triple fault"), "{err}");
}

#[test]
fn smp_and_rng_options() {
    let g = test_guest("smp");
    let out = vmm(&["run", "--kernel", g.to_str().unwrap(), "--vcpus", "2"]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("ABC", Some(0))
    );
    let g = test_guest("virtio_rng");
    let out = vmm(&["run", "--kernel", g.to_str().unwrap(), "--rng"]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("VFIU", Some(0))
    );
}

#[test]
fn serial_output_to_a_file() {
    let file = std::env::temp_dir().join(format!("kv-serial-out-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let g = test_guest("hello");
    let out = vmm(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--serial-out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "K");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn bad_input_is_named() {
    let hello = test_guest("hello");
    let h = hello.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (
            &["run", "--kernel", "/etc/hostname"],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (&["run"], "needs --kernel"),
        (&["run", "--kernel", h, "--memory", "4"], "4 MiB is invalid"),
        (
            &["run", "--kernel", h, "--memory", "lots"],
            "--memory takes MiB",
        ),
        (&["run", "--kernel", h, "--vcpus", "0"], "0 vCPUs requested"),
        (
            &["run", "--kernel", h, "--cpu-hide", "sse9"],
            "unknown CPU feature \"sse9\"",
        ),
        (
            &["run", "--kernel", h, "--initrd", "/nonexistent/initrd"],
            "/nonexistent/initrd",
        ),
        (
            &["run", "--kernel", h, "--serial-in", "tty"],
            "expected stdin or unix:PATH",
        ),
        (&["run", "--kernel", h, "--bogus"], "--bogus"),
        (
            &["run", "--kernel", h, "--hugepages", "--memory", "17"],
            "multiple of 2 MiB",
        ),
    ];
    for (args, want) in cases {
        let out = vmm(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(want),
            "{args:?}: stderr {err:?} lacks {want:?}"
        );
    }
    let out = vmm(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("usage:"));
}

#[test]
fn doctor_reports_kvm_and_a_verdict() {
    let out = vmm(&["doctor"]);
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{s}{}", text(&out.stderr));
    assert!(
        s.contains("/dev/kvm                     ok   API version 12"),
        "{s}"
    );
    assert!(s.contains("KVM_CAP_IRQFD"), "{s}");
    assert!(
        s.contains("calibration guest            ok   200000 instructions"),
        "{s}"
    );
    let native = s.contains("guest code:                  native");
    let emulated = s.contains("guest code:                  emulated");
    assert!(native ^ emulated, "{s}");
    let backend = if native { "builtin" } else { "qemu" };
    assert!(
        s.contains(&format!("machine back end (auto):     {backend}: ")),
        "{s}"
    );
    let v = vmm(&["doctor", "--verdict"]);
    assert_eq!(text(&v.stdout).trim(), backend);
}

#[test]
fn hugepage_backed_guest_runs_when_pages_are_reserved() {
    // Reserve 2 MiB pages for this test only, and give them back afterwards.
    let path = "/proc/sys/vm/nr_hugepages";
    let before: u64 = std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(path, (before + 16).to_string()).expect("reserve hugepages (needs root)");
    let hello = test_guest("hello");
    let out = vmm(&[
        "run",
        "--kernel",
        hello.to_str().unwrap(),
        "--memory",
        "32",
        "--hugepages",
    ]);
    std::fs::write(path, before.to_string()).unwrap();
    assert_eq!(text(&out.stdout), "K", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}
