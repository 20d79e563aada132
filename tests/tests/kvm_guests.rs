//! Level 2 of the test ladder: tiny test guests on the builtin VMM under real KVM.
//! On hosts whose KVM emulates guest code (ours) these still run: each is a few hundred
//! instructions.

use std::io::Write;
use std::os::fd::AsFd;
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
fn the_vcpu_that_resets_leaves_without_entering_the_guest_again() {
    require_kvm();
    let (cfg, _console) = tiny_config("hello");
    let mut vm = vmm::build_microvm(cfg).unwrap().start().unwrap();
    let exits = vm.exit_counters();
    assert_eq!(vm.wait_timeout(T), Some(VmExit::Reset));
    // The byte to COM1 and the reset command to the i8042: two exits. A vCPU that went
    // back into the guest after the reset would leave a third, when kicked out of it.
    assert_eq!(exits[0].load(std::sync::atomic::Ordering::Relaxed), 2);
    // The vCPU thread left without waiting for the VMM; requests still get an answer.
    vm.pause().unwrap();
    vm.resume().unwrap();
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
fn virtio_mmio_balloon_takes_back_a_reported_page() {
    require_kvm();
    let (mut cfg, console) = tiny_config("virtio_balloon");
    cfg.free_page_reporting = true;
    let exit = run_with_timeout(cfg, T);
    assert_eq!(exit, VmExit::Reset, "console: {:?}", console.text());
    assert_eq!(console.text(), "FIUZ");
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
    // Every '.' is a port write, so a VM exit the metrics count.
    let exits: u64 = vm
        .exit_counters()
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(exits >= paused_at as u64 + 3, "{exits} exits");
    // The end descriptor sleeps while the VM runs and wakes its watcher when it ends.
    let end = vm.end_fd().unwrap();
    assert!(!vmm::wait::readable(end.as_fd(), Some(Duration::from_millis(50))).unwrap());
    vm.stop();
    assert!(vmm::wait::readable(end.as_fd(), Some(T)).unwrap());
    assert_eq!(vm.wait_timeout(Duration::ZERO), Some(VmExit::Stopped));
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

#[test]
fn virtio_blk_get_id_and_read_through_virtio_mmio() {
    require_kvm();
    let dir = tempdir("blk");
    let disk = dir.join("disk.img");
    let mut content = b"KUBEVIRT-disk".to_vec();
    content.resize(1 << 20, 0);
    std::fs::write(&disk, &content).unwrap();
    let (mut cfg, console) = tiny_config("virtio_blk");
    cfg.disks
        .push(vmm::config::parse_disk(&format!("{},id=serial-42", disk.display())).unwrap());
    let exit = run_with_timeout(cfg, T);
    assert_eq!(exit, VmExit::Reset, "console: {:?}", console.text());
    assert_eq!(console.text(), "FIserial-42RKUBEVIRTS");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn virtio_vsock_host_connect_reaches_the_guest() {
    require_kvm();
    let dir = tempdir("vsock");
    let uds = dir.join("v.sock");
    let (mut cfg, console) = tiny_config("virtio_vsock");
    cfg.vsock = Some(vmm::config::parse_vsock(&format!("cid=3,uds={}", uds.display())).unwrap());
    let mut vm = vmm::build_microvm(cfg).unwrap().start().unwrap();
    assert!(
        console.wait_for("FCW", T),
        "guest ready: {:?}",
        console.text()
    );
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        reply.starts_with("OK ") && reply.ends_with('\n'),
        "host got {reply:?}"
    );
    assert_eq!(vm.wait_timeout(T), Some(VmExit::Reset));
    assert_eq!(console.text(), "FCWQA");
    drop(vm);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!uds.exists(), "socket file removed with the device");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A raw packet socket on `ifname` (inside the current thread's namespace).
fn packet_socket(ifname: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just created and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: name is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    // SAFETY: zeroed sockaddr_ll is valid; the fields set below make it a bind address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: addr is a live sockaddr_ll of the given length.
    let r = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    assert_eq!(
        r,
        0,
        "bind packet socket: {}",
        std::io::Error::last_os_error()
    );
    fd
}

#[test]
fn virtio_net_frames_both_ways_through_a_tap_in_a_netns() {
    require_kvm();
    let ns = tests::netns::NetNs::new("kvnet");
    let tap = format!("kvt{}", std::process::id() % 100_000);
    let (mut cfg, console) = tiny_config("virtio_net");
    cfg.nets.push(
        vmm::config::parse_net(&format!(
            "tap={tap},mac=02:6b:76:00:00:01,netns={}",
            ns.path().display()
        ))
        .unwrap(),
    );
    let vm = vmm::build_microvm(cfg).unwrap();
    // The tap exists now (the device opened it); listen on it before the guest sends.
    let t = tap.clone();
    let sock = ns.run(move || packet_socket(&t));
    let mut vm = vm.start().unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let tv = libc::timeval {
        tv_sec: 20,
        tv_usec: 0,
    };
    // SAFETY: setting a receive timeout on our socket with a live timeval.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut frame = [0u8; 2048];
    let got = loop {
        // SAFETY: frame is a live buffer of its length.
        let n = unsafe { libc::recv(raw, frame.as_mut_ptr().cast(), frame.len(), 0) };
        assert!(
            n > 0,
            "no frame from the guest: {}; console {:?}",
            std::io::Error::last_os_error(),
            console.text()
        );
        let f = &frame[..n as usize];
        if f.len() >= 25 && f[12..14] == [0x88, 0xb5] {
            break f.to_vec();
        }
    };
    assert_eq!(&got[0..6], &[0xff; 6]);
    assert_eq!(
        &got[6..12],
        &[0x02, 0x6b, 0x76, 0, 0, 1],
        "source is the configured MAC"
    );
    assert_eq!(&got[14..25], b"kubevirt-tx");
    assert!(console.wait_for("FMTW", T), "console: {:?}", console.text());
    let mut reply = [0u8; 60];
    reply[0..6].copy_from_slice(&[0x02, 0x6b, 0x76, 0, 0, 1]);
    reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    reply[12..14].copy_from_slice(&[0x88, 0xb5]);
    reply[14..25].copy_from_slice(b"kubevirt-rx");
    // SAFETY: reply is a live buffer of its length.
    let n = unsafe { libc::send(raw, reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(
        n,
        60,
        "send to the guest: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(
        vm.wait_timeout(T),
        Some(VmExit::Reset),
        "console: {:?}",
        console.text()
    );
    assert_eq!(console.text(), "FMTWX");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The benchmark's floor VMM, in each form it measures, really runs the guest: it prints
/// the guest's byte and ends at the guest's reset.
#[test]
fn the_floor_vmm_runs_the_hello_guest_in_every_form() {
    require_kvm();
    let guest = vmm::guests::test_guest("hello");
    let forms: [&[&str]; 4] = [
        &[],
        &["MIN_VMM_IRQCHIP"],
        &["MIN_VMM_LONG"],
        &["MIN_VMM_IRQCHIP", "MIN_VMM_LONG", "MIN_VMM_THREAD"],
    ];
    for form in forms {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kubevirt-min-vmm"));
        cmd.arg(&guest).arg("128");
        for option in ["MIN_VMM_IRQCHIP", "MIN_VMM_LONG", "MIN_VMM_THREAD"] {
            cmd.env_remove(option);
        }
        cmd.envs(form.iter().map(|o| (o, "1")));
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{form:?}: {out:?}");
        assert_eq!(out.stdout, b"K", "{form:?}");
    }
}
