//! Level 4 of the test ladder, devices: the guest kernel (`make guest`) on `kubevirt-vmm run
//! --machine auto` with our virtio devices, driven by the real Linux drivers. Where KVM
//! emulates guest code (these machines) `auto` is the qemu machine: QEMU microvm under TCG
//! with our devices served over vhost-user; where `doctor` says KVM is native it is the
//! builtin VMM with the same devices over virtio-mmio, so the same tests cover both.
//!
//! The guest is `target/guest/devtest-initramfs.img` (busybox, `/bin/vsock-test` from
//! guest-kernel/vsock-test.c, `/init` from guest-kernel/devtest-init.sh): each test passes a
//! shell script in `kvtest.cmd=` (base64) and reads the results from the console, where
//! the init ends with `kvtest: exit <status>` before rebooting (the VMM then exits 0).
//!
//! - blk: 64 MiB written from the guest read back after a restart and from the host file;
//!   a read-only disk refuses writes; discard punches a hole in the file; disks found by id.
//! - net: ping and 100 MiB TCP each way between the guest and the host end of a tap in a
//!   network namespace made by the test (traffic stays there; the namespace is deleted).
//! - vsock: 100 MiB each way over the hybrid Unix socket, 50 concurrent connections.
//! - rng: /dev/hwrng reads bytes from virtio-rng.
//! - machine: a guest booted while every host CPU is busy keeps its clocksource and idles
//!   without a periodic tick.
//!
//! Data streams and checksums are vsock-test's (see guest-kernel/vsock-test.c): the host
//! generates and checks the same streams with [`Stream`] and [`Sum`].
//!
//! Needs root (netns, tap), qemu-system-x86_64, `make build` and `make guest`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tests::netns::NetNs;

#[path = "devices_qemu/harness.rs"]
#[macro_use]
mod harness;

use harness::*;
// --- blk ----------------------------------------------------------------------------------

#[test]
fn blk_64mib_survives_guest_restart_and_matches_host_file() {
    let dir = TempDir::new("blk");
    let disk = dir.join("disk.img");
    File::create(&disk).unwrap().set_len(96 * MIB).unwrap();
    let len = 64 * MIB;
    let seed = 42;

    // Run 1: write the stream, drop the page cache, read it back from the device.
    let mut s = find_disk("data");
    s += &mark("write");
    s += &format!("vsock-test gen {len} {seed} | dd of=$dev bs=1M conv=fsync 2>/dev/null\n");
    s += &mark("written");
    s += "echo 3 >/proc/sys/vm/drop_caches\n";
    s += &format!(
        "echo \"kvtest: sha256 $(dd if=$dev bs=1M count={} 2>/dev/null | sha256sum)\"\n",
        len / MIB
    );
    s += &mark("read");
    let t = Instant::now();
    let out1 = Vm::start(&disk_arg(&disk, ",id=data"), &s).finish();
    let run1 = t.elapsed();
    let sha1 = sha_line(&out1);
    let gen = line_with(&out1, "vsock-test: gen");
    assert_eq!(field(gen, "bytes"), len.to_string());
    assert_eq!(
        field(gen, "sum"),
        Sum::of_stream(seed, len),
        "generator stream"
    );

    // The host file holds exactly that stream.
    let host_sha = sha256_of_file_region(&disk, len);
    let mut f = File::open(&disk).unwrap();
    let (n, host_sum) = recv_stream(&mut (&mut f).take(len)).unwrap();
    assert_eq!(
        (n, host_sum.as_str()),
        (len, field(gen, "sum")),
        "host file content"
    );

    // Run 2: a fresh guest reads the disk.
    let s2 = find_disk("data")
        + &mark("read")
        + &format!(
            "echo \"kvtest: sha256 $(dd if=$dev bs=1M count={} 2>/dev/null | sha256sum)\"\n",
            len / MIB
        )
        + &mark("done");
    let t = Instant::now();
    let out2 = Vm::start(&disk_arg(&disk, ",id=data"), &s2).finish();
    let run2 = t.elapsed();
    let sha2 = sha_line(&out2);

    assert_eq!(sha1, host_sha, "guest read-back (run 1) vs host file");
    assert_eq!(
        sha2, host_sha,
        "guest read after restart (run 2) vs host file"
    );
    println!(
        "blk 64 MiB: guest write+fsync {:.1} s, read (cold) {:.1} s; after restart read {:.1} s; \
         VM runs {:.1} s + {:.1} s; sha256 {host_sha}",
        guest_secs(&out1, "write", "written"),
        guest_secs(&out1, "written", "read"),
        guest_secs(&out2, "read", "done"),
        run1.as_secs_f64(),
        run2.as_secs_f64()
    );
}

#[test]
fn blk_two_disks_by_id_and_read_only_disk_refuses_writes() {
    let dir = TempDir::new("blk2");
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    let size = 4 * MIB as usize;
    fs::write(&rw, Stream::bytes(1, size)).unwrap();
    fs::write(&ro, Stream::bytes(2, size)).unwrap();
    let ro_before = fs::read(&ro).unwrap();
    let sha_mib = |p: &Path| sha256_of_file_region(p, MIB);
    let (rw_sha, ro_sha) = (sha_mib(&rw), sha_mib(&ro));

    let mut s = String::new();
    // Every disk: name, serial, read-only flag, checksum of its first MiB.
    s += "for d in /sys/block/vd*; do n=${d##*/}; echo \"kvtest: disk $n serial=$(cat $d/serial) \
          ro=$(blockdev --getro /dev/$n) size=$(blockdev --getsize64 /dev/$n) \
          sha=$(dd if=/dev/$n bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)\"; done\n";
    s += &find_disk("beta");
    s += "if dd if=/dev/zero of=$dev bs=4096 count=1 conv=fsync 2>/tmp/err; then \
          echo 'kvtest: ro write=ok'; else echo \"kvtest: ro write=failed $(cat /tmp/err)\"; fi\n";
    s += &find_disk("alpha");
    s += "vsock-test gen 8192 3 2>/dev/null | dd of=$dev bs=4096 seek=1 conv=fsync,notrunc 2>/dev/null\n";
    s += "echo 'kvtest: rw write=ok'\n";
    let mut args = disk_arg(&rw, ",id=alpha");
    args.extend(disk_arg(&ro, ",ro,id=beta"));
    let out = Vm::start(&args, &s).finish();

    let disks: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("kvtest: disk "))
        .collect();
    assert_eq!(disks.len(), 2, "two disks in /sys/block; output:\n{out}");
    let by_id = |id: &str| -> &str {
        disks
            .iter()
            .find(|l| field(l, "serial") == id)
            .unwrap_or_else(|| panic!("no disk with serial {id}; output:\n{out}"))
    };
    let (a, b) = (by_id("alpha"), by_id("beta"));
    assert_eq!(field(a, "sha"), rw_sha, "disk alpha shows rw.img");
    assert_eq!(field(b, "sha"), ro_sha, "disk beta shows ro.img");
    assert_eq!(
        (field(a, "ro"), field(b, "ro")),
        ("0", "1"),
        "blockdev --getro"
    );
    assert_eq!(field(a, "size"), size.to_string());

    let ro_write = line_with(&out, "kvtest: ro write=");
    assert!(
        ro_write.contains("write=failed"),
        "a write to the read-only disk succeeded: {ro_write}"
    );
    assert!(
        fs::read(&ro).unwrap() == ro_before,
        "ro.img changed although the disk is read-only"
    );
    let mut want = Stream::bytes(1, size);
    want[4096..4096 + 8192].copy_from_slice(&Stream::bytes(3, 8192));
    assert!(
        fs::read(&rw).unwrap() == want,
        "rw.img does not hold the guest's write"
    );
    println!("blk: disks by serial: {a} | {b}; {ro_write}");
}

#[test]
fn blk_discard_punches_a_hole_in_the_file() {
    let dir = TempDir::new("discard");
    let disk = dir.join("disk.img");
    let size = 32 * MIB as usize;
    fs::write(&disk, Stream::bytes(5, size)).unwrap();
    File::open(&disk).unwrap().sync_all().unwrap();
    let blocks_before = fs::metadata(&disk).unwrap().blocks();

    let mut s = find_disk("scratch");
    s += "n=${dev##*/}; echo \"kvtest: discard_max_bytes=$(cat /sys/block/$n/queue/discard_max_bytes)\"\n";
    // Discard 16 MiB from offset 8 MiB.
    s += &format!("blkdiscard -o {} -l {} $dev\n", 8 * MIB, 16 * MIB);
    s += "sync\n";
    s += "echo \"kvtest: after sha=$(dd if=$dev bs=1M skip=8 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n";
    let out = Vm::start(&disk_arg(&disk, ",id=scratch"), &s).finish();

    let blocks_after = fs::metadata(&disk).unwrap().blocks();
    let freed = (blocks_before - blocks_after.min(blocks_before)) * 512;
    println!(
        "blk discard 16 MiB: st_blocks {blocks_before} -> {blocks_after} ({} MiB freed); {}",
        freed / MIB,
        line_with(&out, "discard_max_bytes")
    );
    assert!(
        freed >= 15 * MIB,
        "st_blocks {blocks_before} -> {blocks_after}: the discard did not punch a 16 MiB hole"
    );
    let data = fs::read(&disk).unwrap();
    assert_eq!(data.len(), size, "file size unchanged");
    let orig = Stream::bytes(5, size);
    let (a, b) = (8 * MIB as usize, 24 * MIB as usize);
    assert!(
        data[..a] == orig[..a] && data[b..] == orig[b..],
        "data outside the range kept"
    );
    assert!(
        data[a..b].iter().all(|&x| x == 0),
        "the hole reads as zeroes"
    );
}

#[test]
fn blk_rate_limit_holds_a_disk_to_its_bandwidth() {
    let dir = TempDir::new("blkrate");
    let (slow, fast) = (dir.join("slow.img"), dir.join("fast.img"));
    for p in [&slow, &fast] {
        fs::write(p, Stream::bytes(9, 12 * MIB as usize)).unwrap();
    }
    // 4 MiB/s and 100 requests/s on one disk, nothing on the other.
    let mut args = disk_arg(&slow, ",id=slow,bw=4Mi,iops=100");
    args.extend(disk_arg(&fast, ",id=fast"));
    let mut s = String::new();
    for id in ["fast", "slow"] {
        s += &find_disk(id);
        s += &mark(&format!("{id}0"));
        s += "sum=$(dd if=$dev bs=1M count=12 2>/dev/null | sha256sum | cut -d' ' -f1)\n";
        s += &mark(&format!("{id}1"));
        s += &format!("echo \"kvtest: {id} sha=$sum\"\n");
    }
    let out = Vm::start(&args, &s).finish();
    let (t_slow, t_fast) = (
        guest_secs(&out, "slow0", "slow1"),
        guest_secs(&out, "fast0", "fast1"),
    );
    println!("blk 12 MiB read: limited to 4 MiB/s {t_slow:.2} s, unlimited {t_fast:.2} s");
    // 12 MiB at 4 MiB/s after a 0.4 MiB burst: 2.9 s; the page cache is cold for both.
    assert!(
        t_slow >= 2.5,
        "the limited disk read 12 MiB in {t_slow:.2} s"
    );
    // The other disk is not held to that bandwidth (a ratio of the two would measure the
    // TCG guest's speed on a loaded host, not the limit).
    assert!(
        t_fast < 2.5,
        "the unlimited disk read 12 MiB in {t_fast:.2} s (limited: {t_slow:.2} s)"
    );
    let want = sha256_of_file_region(&slow, 12 * MIB);
    for id in ["slow", "fast"] {
        assert_eq!(
            field(line_with(&out, &format!("kvtest: {id} ")), "sha"),
            want
        );
    }
}

// --- net ----------------------------------------------------------------------------------

const HOST_IP: &str = "10.201.0.1";
const GUEST_IP: &str = "10.201.0.2";

#[test]
fn net_ping_and_100mib_tcp_each_way_through_a_tap_in_a_netns() {
    let len = 100 * MIB;
    let ns = NetNs::new("kvtest-net");
    let tap = format!("kvt{}", std::process::id() % 100_000);
    let (up_port, down_port) = (7001, 7002);
    // Host listener for the guest's upload, inside the namespace.
    let listener = ns.run(move || TcpListener::bind(("0.0.0.0", up_port)).expect("bind"));
    let upload = thread::spawn(move || {
        let mut c = accept_timeout!(listener);
        let t = Instant::now();
        let r = recv_stream(&mut c).expect("read the upload");
        (r, t.elapsed())
    });

    let mut s = String::new();
    s += &format!("ip addr add {GUEST_IP}/24 dev eth0\nip link set eth0 up\n");
    s += &format!(
        "i=0; until ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 30 ]; done\n"
    );
    s += &format!("ping -c 3 {HOST_IP} | sed 's/^/kvtest: ping: /'\n");
    s += &format!("vsock-test connect tcp {HOST_IP} {up_port} {len} 11\n");
    s += &format!("vsock-test listen tcp {down_port} 1 sink\n");
    let args = vec![
        "--net".to_string(),
        format!("tap={tap},netns={}", ns.path().display()),
    ];
    // Debug logging: a vhost-user back end that drops QEMU's connection says why only there.
    let vm = Vm::start_with_env(&args, &s, &[("KUBEVIRT_VMM_LOG", "debug")]);

    // The VMM creates the tap in the namespace: give it the host address.
    let t0 = Instant::now();
    while !Command::new("ip")
        .args(["-n", &ns.name, "link", "show", &tap])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tap {tap} never appeared in netns {}; output:\n{}",
            ns.name,
            vm.output()
        );
        thread::sleep(Duration::from_millis(50));
    }
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
    ns.exec(&["ip", "link", "set", &tap, "up"]);
    ns.exec(&["ip", "link", "set", "lo", "up"]);

    vm.wait_line("kvtest: ping: ");
    let ((up_bytes, up_sum), up_time) = upload.join().expect("upload thread");
    vm.wait_line(&format!("vsock-test: listening tcp {down_port}"));
    let (down_sum, down_time) = ns.run(move || {
        let mut c = TcpStream::connect((GUEST_IP, down_port)).expect("connect to the guest");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let t = Instant::now();
        let sum = send_stream(&mut c, 12, len).expect("send to the guest");
        c.shutdown(Shutdown::Write).unwrap();
        let _ = recv_stream(&mut c);
        (sum, t.elapsed())
    });
    let out = vm.finish();

    let ping = line_with(&out, "packets received");
    assert!(
        ping.contains("3 packets received"),
        "ping from the guest: {ping}"
    );
    let up = line_with(&out, "vsock-test: conn 0 sent=");
    assert_eq!(field(up, "sent"), len.to_string(), "guest upload: {up}");
    assert_eq!(up_bytes, len, "bytes the host received");
    assert_eq!(
        field(up, "sum_sent"),
        up_sum,
        "upload checksum: guest sent vs host got"
    );
    assert_eq!(up_sum, Sum::of_stream(11, len));
    let down = line_with(&out, "vsock-test: conn 0 recv=");
    assert_eq!(
        field(down, "recv"),
        len.to_string(),
        "guest download: {down}"
    );
    assert_eq!(
        field(down, "sum"),
        down_sum,
        "download checksum: host sent vs guest got"
    );
    println!(
        "net 100 MiB TCP: guest->host {:.1} s ({:.1} MiB/s), host->guest {:.1} s ({:.1} MiB/s); {}",
        up_time.as_secs_f64(),
        mib_per_s(len, up_time),
        down_time.as_secs_f64(),
        mib_per_s(len, down_time),
        line_with(&out, "round-trip").trim()
    );
}

// --- vsock --------------------------------------------------------------------------------

/// Connects to guest port `port` through the hybrid vsock socket `uds`.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let mut c = UnixStream::connect(uds).expect("connect to the vsock socket");
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(
            c.read(&mut b).expect("read the CONNECT reply"),
            1,
            "EOF before OK"
        );
        reply.push(b[0]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("OK "), "CONNECT {port}: {reply:?}");
    c
}

fn vsock_args(uds: &Path) -> Vec<String> {
    vec!["--vsock".into(), format!("cid=3,uds={}", uds.display())]
}

#[test]
fn vsock_100mib_each_way() {
    let len = 100 * MIB;
    let dir = TempDir::new("vsock");
    let uds = dir.join("v.sock");
    let (down_port, up_port) = (5000, 5001);
    let listener = UnixListener::bind(format!("{}_{up_port}", uds.display())).unwrap();
    let upload = thread::spawn(move || {
        let mut c = accept_timeout!(listener);
        let t = Instant::now();
        let r = recv_stream(&mut c).expect("read the upload");
        (r, t.elapsed())
    });
    let s = format!(
        "vsock-test listen vsock {down_port} 1 sink\nvsock-test connect vsock 2 {up_port} {len} 21\n"
    );
    let vm = Vm::start(&vsock_args(&uds), &s);

    vm.wait_line(&format!("vsock-test: listening vsock {down_port}"));
    let mut c = vsock_connect(&uds, down_port);
    let t = Instant::now();
    let down_sum = send_stream(&mut c, 20, len).expect("send to the guest");
    c.shutdown(Shutdown::Write).unwrap();
    let _ = recv_stream(&mut c);
    let down_time = t.elapsed();
    let ((up_bytes, up_sum), up_time) = upload.join().expect("upload thread");
    let out = vm.finish();

    let down = line_with(&out, "vsock-test: conn 0 recv=");
    assert_eq!(field(down, "recv"), len.to_string(), "host->guest: {down}");
    assert_eq!(field(down, "sum"), down_sum, "host->guest checksum");
    let up = line_with(&out, "vsock-test: conn 0 sent=");
    assert_eq!(field(up, "sent"), len.to_string(), "guest->host: {up}");
    assert_eq!(up_bytes, len, "bytes the host received");
    assert_eq!(field(up, "sum_sent"), up_sum, "guest->host checksum");
    assert_eq!(up_sum, Sum::of_stream(21, len));
    println!(
        "vsock 100 MiB: host->guest {:.1} s ({:.1} MiB/s), guest->host {:.1} s ({:.1} MiB/s)",
        down_time.as_secs_f64(),
        mib_per_s(len, down_time),
        up_time.as_secs_f64(),
        mib_per_s(len, up_time)
    );
}

#[test]
fn vsock_50_concurrent_connections() {
    const N: usize = 50;
    const LEN: u64 = 256 * 1024;
    let dir = TempDir::new("vsock50");
    let uds = dir.join("v.sock");
    let port = 5002;
    let vm = Vm::start(
        &vsock_args(&uds),
        &format!("vsock-test listen vsock {port} {N} echo\n"),
    );
    vm.wait_line(&format!("vsock-test: listening vsock {port}"));

    // All connections open first, then all transfer at once.
    let t = Instant::now();
    let conns: Vec<UnixStream> = (0..N).map(|_| vsock_connect(&uds, port)).collect();
    let connected = t.elapsed();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let mut w = c.try_clone().unwrap();
            let writer = thread::spawn(move || {
                let sum = send_stream(&mut w, 1000 + k as u64, LEN).expect("send");
                w.shutdown(Shutdown::Write).unwrap();
                sum
            });
            let mut r = c;
            let reader = thread::spawn(move || recv_stream(&mut r).expect("read the echo"));
            (writer, reader)
        })
        .collect();
    for (k, (w, r)) in workers.into_iter().enumerate() {
        let sent = w.join().unwrap();
        let (n, got) = r.join().unwrap();
        assert_eq!((n, &got), (LEN, &sent), "connection {k}: echo differs");
    }
    let all = t.elapsed();
    let out = vm.finish();
    assert!(
        out.contains(&format!("vsock-test: listen done ok={N}")),
        "guest listener: not all {N} connections ended well; output:\n{out}"
    );
    println!(
        "vsock {N} concurrent connections: all open in {:.2} s, {} KiB echoed on each, done in {:.1} s",
        connected.as_secs_f64(),
        LEN / 1024,
        all.as_secs_f64()
    );
}

// --- rng ----------------------------------------------------------------------------------

#[test]
fn rng_hwrng_reads_bytes_from_virtio_rng() {
    let s = "echo \"kvtest: rng_current=$(cat /sys/class/misc/hw_random/rng_current)\"\n\
             echo \"kvtest: rng bytes=$(dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c)\"\n\
             echo \"kvtest: rng sample=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')\"\n";
    let out = Vm::start(&["--rng".to_string()], s).finish();
    let current = field(line_with(&out, "kvtest: rng_current="), "rng_current");
    assert!(current.starts_with("virtio_rng"), "rng_current={current}");
    assert_eq!(
        field(line_with(&out, "kvtest: rng bytes="), "bytes"),
        "65536"
    );
    let sample = field(line_with(&out, "kvtest: rng sample="), "sample");
    assert_eq!(sample.len(), 64, "32 bytes in hex: {sample}");
    assert!(sample.chars().any(|c| c != '0'), "all zero: {sample}");
    println!("rng: rng_current={current}, 64 KiB read, sample {sample}");
}

// --- machine ------------------------------------------------------------------------------

/// Spins a thread on every host CPU until dropped: the busy node a pod may boot on.
struct BusyHost(Arc<AtomicBool>, Vec<thread::JoinHandle<()>>);

impl BusyHost {
    fn new() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let n = thread::available_parallelism().map_or(2, |n| n.get());
        let spinners = (0..n)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        BusyHost(stop, spinners)
    }
}

impl Drop for BusyHost {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

/// A guest booted while every host CPU is busy keeps a high-resolution clocksource. Under
/// TCG it used to lose the TSC to a failed calibration against the emulated PIT, or to the
/// watchdog comparing it with jiffies that fall behind while the vCPU waits for a host CPU,
/// and then ran on refined-jiffies with a periodic tick that cost its idle QEMU ~30 ms of CPU
/// a second. The VMM now tells a TCG guest the host TSC's rate and that it is reliable
/// (vmm/src/tsc.rs), and the LAPIC timer's rate (`lapic_timer_khz=`, our kernel patch), so
/// the kernel skips its check of that timer against the PIT, which a busy host failed too.
#[test]
fn a_guest_booted_on_a_busy_host_keeps_a_high_resolution_clock() {
    let s = "loc() { awk '/LOC:/ { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n }' /proc/interrupts; }\n\
             sleep 2; a=$(loc); sleep 2; b=$(loc)\n\
             mult=$(awk '/Clock Event Device: lapic$/ { l = 1 } l && /mult:/ { print $2; exit }' /proc/timer_list)\n\
             echo \"kvtest: clock source=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) \
             hres=$(grep -c 'hres_active *: 1' /proc/timer_list) ticks=$((b - a)) lapic_mult=${mult:-none}\"\n\
             dmesg | grep -iE 'tsc|clocksource|apic timer' | sed 's/^/kvtest: dmesg /'\n";
    let tcg = !vmm::doctor::calibrate()
        .expect("calibration guest")
        .native();
    let busy = BusyHost::new();
    let out = Vm::start(&[], s).finish();
    drop(busy);
    let line = line_with(&out, "kvtest: clock ");
    let dmesg: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("kvtest: dmesg"))
        .collect();
    let source = field(line, "source");
    // tsc under TCG; on native KVM the builtin VMM's guest has tsc or kvm-clock.
    assert!(
        !source.contains("jiffies"),
        "{line}\nthe guest's clock messages:\n{}",
        dmesg.join("\n")
    );
    assert!(
        !dmesg.iter().any(|l| l.contains("APIC timer disabled")),
        "the LAPIC timer failed its boot check: {line}\n{}",
        dmesg.join("\n")
    );
    if tcg {
        // 62.5 MHz (1 GHz / the kernel's divisor 16) per ns, shifted by 32: the rate the VMM
        // gave, not a calibration (which lands near it, never on it).
        assert_eq!(field(line, "lapic_mult"), "268435456", "{line}");
    }
    let hres = field(line, "hres");
    let ticks: u64 = field(line, "ticks").parse().unwrap();
    // A periodic tick is 100 a second on each of the 2 vCPUs: 400 in 2 s.
    assert!(hres != "0" && ticks < 200, "not tickless: {line}");
    println!("busy host: {line}");
}

/// The guest reads the wall clock from the machine's RTC at boot (nothing else sets it
/// here; the agent's SetTime is not in this guest). Without one, Linux waits a second (1.7 s
/// under TCG) for a CMOS update that never ends, then starts in 1970.
#[test]
fn a_guest_boots_with_the_hosts_time_from_its_rtc() {
    let s = "echo \"kvtest: time now=$(date +%s) rtc_errors=$(dmesg | grep -c 'Unable to read current time' || true)\"\n";
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = unix_now();
    let out = Vm::start(&[], s).finish();
    let after = unix_now();
    let line = line_with(&out, "kvtest: time ");
    assert_eq!(field(line, "rtc_errors"), "0", "{line}");
    let now: u64 = field(line, "now").parse().unwrap();
    // The RTC counts whole seconds.
    assert!(
        (before.saturating_sub(2)..=after + 2).contains(&now),
        "guest time {now}, host {before}..{after}: {line}"
    );
}

/// A QEMU machine that cannot start says why, once, and leaves no vhost-user socket
/// directory behind (its device servers were already listening in one).
#[test]
fn a_machine_that_cannot_start_says_why_and_leaves_nothing() {
    let missing = "/nonexistent/kubevirt-test-kernel";
    let child = Command::new(tests::vmm_binary())
        .args(["run", "--machine", "qemu", "--rng", "--kernel", missing])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(missing), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let left = vmm::qemu::socket_dirs(pid);
    vmm::qemu::remove_socket_dirs(pid);
    assert!(left.is_empty(), "left behind: {left:?}");
}
