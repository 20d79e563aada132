//! Level 2 of the test ladder: tiny test guests on the builtin VMM under real KVM.
//! On hosts whose KVM emulates guest code (ours) these still run: each is a few hundred
//! instructions.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tests::{run_with_timeout, tiny_config};
use vmm::vcpu::VcpuExitReason;
use vmm::{SerialInputSource, VmExit};

const T: Duration = Duration::from_secs(30);

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (load kvm_intel/kvm_amd, or run on a host with KVM)"
    );
}

#[test]
fn hello_guest_prints_and_resets() {
    require_kvm();
    let (cfg, console) = tiny_config("hello");
    assert_eq!(run_with_timeout(cfg, T), VmExit::Reset);
    assert_eq!(console.text(), "K");
}

#[test]
fn boot_state_matches_the_linux_64bit_protocol() {
    require_kvm();
    let (mut cfg, console) = tiny_config("bootstate");
    cfg.cmdline = "console=ttyS0 kubevirt.test=boot-state".into();
    cfg.memory_mib = 64;
    assert_eq!(run_with_timeout(cfg, T), VmExit::Reset);
    // Long mode, zero page in rsi, our command line, the 3-entry e820 map, the MP table.
    assert_eq!(
        console.text(),
        "LZconsole=ttyS0 kubevirt.test=boot-state\n3P"
    );
}

#[test]
fn triple_fault_is_reported_as_a_fault() {
    require_kvm();
    let (cfg, console) = tiny_config("triplefault");
    let exit = run_with_timeout(cfg, T);
    assert!(
        matches!(
            exit,
            VmExit::Fault {
                vcpu: 0,
                reason: VcpuExitReason::TripleFault { .. }
            }
        ),
        "{exit:?}"
    );
    assert!(!exit.is_clean());
    assert!(exit.to_string().contains("triple fault"), "{exit}");
    assert_eq!(console.text(), "T");
}

#[test]
fn two_vcpus_both_run() {
    require_kvm();
    let (mut cfg, console) = tiny_config("smp");
    cfg.vcpus = 2;
    let exit = run_with_timeout(cfg, T);
    assert_eq!(exit, VmExit::Reset, "console: {:?}", console.text());
    assert_eq!(
        console.text(),
        "ABC",
        "CPU 1 started through INIT/SIPI and ran"
    );
}

#[test]
fn virtio_mmio_rng_negotiates_serves_and_interrupts() {
    require_kvm();
    let (mut cfg, console) = tiny_config("virtio_rng");
    cfg.rng = true;
    let exit = run_with_timeout(cfg, T);
    assert_eq!(exit, VmExit::Reset, "console: {:?}", console.text());
    assert_eq!(console.text(), "VFIU");
}

#[test]
fn pause_resume_stop() {
    require_kvm();
    let (cfg, console) = tiny_config("spin");
    let mut vm = vmm::build_microvm(cfg).unwrap().start().unwrap();
    assert!(console.wait_for("...", T), "guest runs");
    vm.pause().unwrap();
    let paused_at = console.len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console.len(), paused_at, "no guest progress while paused");
    vm.resume().unwrap();
    assert!(
        console.wait_for(&".".repeat(paused_at + 3), T),
        "progress after resume"
    );
    assert!(vm.wait_timeout(Duration::from_millis(50)).is_none());
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
}

#[test]
fn serial_input_from_a_socket_reaches_the_guest() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("kv-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("console.sock");
    let (mut cfg, console) = tiny_config("echo");
    cfg.serial_input = Some(SerialInputSource::Socket(sock.clone()));
    let mut vm = vmm::build_microvm(cfg).unwrap().start().unwrap();
    assert!(console.wait_for(">", T));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"hello q").unwrap();
    let exit = vm
        .wait_timeout(T)
        .unwrap_or_else(|| panic!("no reset: {:?}", console.text()));
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(console.text(), ">hello q");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cpuid_is_normalised_and_features_hidden() {
    require_kvm();
    let (cfg, console) = tiny_config("cpuid");
    assert_eq!(run_with_timeout(cfg, T), VmExit::Reset);
    let plain = console.text();
    assert!(plain.starts_with('H'), "hypervisor bit set: {plain}");
    assert!(plain.ends_with('0'), "BSP has APIC id 0: {plain}");
    let (mut cfg, console) = tiny_config("cpuid");
    cfg.hidden_cpu_features = vec![vmm::arch::cpuid::CpuFeature::Cx16];
    assert_eq!(run_with_timeout(cfg, T), VmExit::Reset);
    let hidden = console.text();
    assert_eq!(&hidden[2..3], "c", "CMPXCHG16B hidden: {hidden}");
    assert_eq!(hidden[..2], plain[..2]);
}
