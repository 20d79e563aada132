//! The harness of the device tests: the VM runner (`kubevirt-vmm run --machine auto` with
//! the device-test initramfs), temporary files, and the data streams and checksum that
//! guest-kernel/vsock-test.c also computes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};
pub use tests::tempdir::TempDir;
use tests::{vmm_binary, workspace_root};

pub const MIB: u64 = 1024 * 1024;
/// Deadline of one VM run, boot to reboot (TCG; a 100 MiB transfer takes seconds).
pub const VM_TIMEOUT: Duration = Duration::from_secs(240);

// --- the data streams and checksum of vsock-test.c ----------------------------------------

/// The deterministic stream `seed` (xorshift64* words, little endian).
pub struct Stream(pub u64);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(2_654_435_761).wrapping_add(1))
    }
    pub fn next_word(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Fills `buf`; every call but the last must pass a multiple of 8 bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next_word().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
    /// The first `len` bytes of stream `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Self::new(seed).fill(&mut v);
        v
    }
}

/// vsock-test's checksum.
#[derive(Clone)]
pub struct Sum {
    h: u64,
    n: u64,
    part: [u8; 8],
    plen: usize,
}

impl Sum {
    pub fn new() -> Self {
        Self {
            h: 0x6A09_E667_F3BC_C908,
            n: 0,
            part: [0; 8],
            plen: 0,
        }
    }
    pub fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(5) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    pub fn update(&mut self, mut p: &[u8]) {
        self.n += p.len() as u64;
        while !p.is_empty() && self.plen > 0 {
            self.part[self.plen] = p[0];
            self.plen += 1;
            p = &p[1..];
            if self.plen == 8 {
                self.word(u64::from_le_bytes(self.part));
                self.plen = 0;
            }
        }
        let mut chunks = p.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.part[self.plen] = b;
            self.plen += 1;
        }
    }
    pub fn hex(&self) -> String {
        let mut s = self.clone();
        if s.plen > 0 {
            s.part[s.plen..].fill(0);
            s.word(u64::from_le_bytes(s.part));
        }
        format!("{:016x}", s.h ^ s.n)
    }
    /// Checksum of the first `len` bytes of stream `seed`.
    pub fn of_stream(seed: u64, len: u64) -> String {
        let mut sum = Sum::new();
        let mut stream = Stream::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            sum.update(&buf[..n]);
            left -= n as u64;
        }
        sum.hex()
    }
}

/// Writes `len` bytes of stream `seed`; returns the checksum of what was written.
pub fn send_stream(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<String> {
    let mut sum = Sum::new();
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        sum.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(sum.hex())
}

/// Reads to EOF; returns (bytes, checksum).
pub fn recv_stream(r: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((sum.n, sum.hex())),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

// --- guest files, the VM -----------------------------------------------------------------

pub fn guest_file(name: &str) -> PathBuf {
    let p = workspace_root().join("target/guest").join(name);
    assert!(p.exists(), "{} is missing: run `make guest`", p.display());
    p
}

pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Console lines (stdout and stderr of the VMM, which include QEMU's) as they arrive.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    more: Condvar,
    closed: AtomicU32,
}

/// A running `kubevirt-vmm run --machine auto`; killed (with QEMU, its process group) on drop.
pub struct Vm {
    child: Child,
    lines: Arc<Lines>,
    start: Instant,
    deadline: Instant,
}

impl Vm {
    /// Starts the VM with `device_args` and the guest `script` (run by busybox `sh -e`).
    pub fn start(device_args: &[String], script: &str) -> Vm {
        Self::start_with_env(device_args, script, &[])
    }

    /// [`Vm::start`] with extra environment for the VMM (e.g. `KUBEVIRT_VMM_LOG`).
    pub fn start_with_env(device_args: &[String], script: &str, env: &[(&str, &str)]) -> Vm {
        let cmdline = format!(
            "{} kvtest.cmd={}",
            vmm::GUEST_CMDLINE,
            base64(script.as_bytes())
        );
        // x86 COMMAND_LINE_SIZE is 2048 and QEMU appends virtio_mmio.device= for each device.
        assert!(
            cmdline.len() < 1700,
            "guest script too long for the kernel command line"
        );
        let mut cmd = Command::new(vmm_binary());
        cmd.args([
            "run",
            "--machine",
            "auto",
            "--memory",
            "256",
            "--vcpus",
            "2",
        ])
        .arg("--kernel")
        .arg(guest_file("vmlinux"))
        .arg("--initrd")
        .arg(guest_file("devtest-initramfs.img"))
        .args(["--cmdline", &cmdline])
        .args(device_args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a timeout kills QEMU (the VMM's child) too.
        .process_group(0);
        let start = Instant::now();
        let mut child = cmd.spawn().expect("start kubevirt-vmm");
        let lines = Arc::new(Lines::default());
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for s in streams {
            let lines = lines.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(s);
                let mut buf = Vec::new();
                while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let l = String::from_utf8_lossy(&buf).trim_end().to_string();
                    lines.lines.lock().unwrap().push(l);
                    lines.more.notify_all();
                    buf.clear();
                }
                lines.closed.fetch_add(1, Ordering::SeqCst);
                lines.more.notify_all();
            });
        }
        Vm {
            child,
            lines,
            start,
            deadline: start + VM_TIMEOUT,
        }
    }

    pub fn output(&self) -> String {
        self.lines.lines.lock().unwrap().join("\n")
    }

    /// Waits for a console line containing `needle`; panics with the output at the deadline
    /// or when the VM ends first.
    pub fn wait_line(&self, needle: &str) -> String {
        let mut lines = self.lines.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= self.deadline || self.lines.closed.load(Ordering::SeqCst) == 2 {
                let out = lines.join("\n");
                drop(lines);
                panic!("no console line with {needle:?}; output:\n{out}");
            }
            lines = self
                .lines
                .more
                .wait_timeout(lines, self.deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for the VMM to exit (killing it at the deadline); asserts that the guest
    /// rebooted after its script exited 0. Returns the console output.
    pub fn finish(mut self) -> String {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for kubevirt-vmm") {
                break s;
            }
            if Instant::now() >= self.deadline {
                self.kill();
                panic!(
                    "VM still running after {VM_TIMEOUT:?}; killed. Output:\n{}",
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads drain the pipes.
        let until = Instant::now() + Duration::from_secs(5);
        while self.lines.closed.load(Ordering::SeqCst) < 2 && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        let out = self.output();
        assert!(
            out.contains("kvtest: exit 0"),
            "the guest script failed (want `kvtest: exit 0`); output:\n{out}"
        );
        assert!(
            status.success(),
            "kubevirt-vmm exited with {status} (want 0: guest reboot); output:\n{out}"
        );
        println!(
            "  VM run (boot, script, reboot): {:.1} s",
            self.start.elapsed().as_secs_f64()
        );
        out
    }

    pub fn kill(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signals our own child's process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.wait();
        // The VMM's vhost-user socket directories (it removes them when it exits cleanly).
        vmm::qemu::remove_socket_dirs(pid as u32);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The value of `key=` in a console line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&pat))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The line of `out` that starts with `prefix` (after any kernel timestamp).
pub fn line_with<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no line with {prefix:?}; output:\n{out}"))
}

/// Guest seconds between two `kvtest: t=<uptime> <label>` marks.
pub fn guest_secs(out: &str, from: &str, to: &str) -> f64 {
    let t = |label: &str| -> f64 {
        let l = line_with(out, &format!(" {label}#"));
        field(l, "t").parse().expect("uptime")
    };
    t(to) - t(from)
}

/// Shell snippet printing `kvtest: t=<uptime> <label>#`.
pub fn mark(label: &str) -> String {
    format!("echo \"kvtest: t=$(cut -d' ' -f1 /proc/uptime) {label}#\"\n")
}

/// The hash of the guest's `kvtest: sha256 <hash>  -` line.
pub fn sha_line(out: &str) -> String {
    let l = line_with(out, "kvtest: sha256 ");
    l.split("kvtest: sha256 ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// How long one side of a transfer may block before the test gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Accepts one connection, giving up after [`IO_TIMEOUT`]; the stream gets I/O timeouts.
macro_rules! accept_timeout {
    ($listener:expr) => {{
        let l = $listener;
        l.set_nonblocking(true).unwrap();
        let end = Instant::now() + IO_TIMEOUT;
        let c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                    thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("no connection from the guest: {e}"),
            }
        };
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        c
    }};
}

pub fn sha256_of_file_region(path: &Path, len: u64) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {len} \"$1\" | sha256sum"))
        .arg("sh")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn disk_arg(path: &Path, opts: &str) -> Vec<String> {
    vec!["--disk".into(), format!("{}{opts}", path.display())]
}

/// Shell snippet: `$dev` = the /dev node of the disk whose serial is `id`.
pub fn find_disk(id: &str) -> String {
    format!(
        "dev=; for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {id} ] && dev=/dev/${{d##*/}}; done; [ -n \"$dev\" ]\n"
    )
}
