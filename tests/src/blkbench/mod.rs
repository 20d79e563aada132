//! The block benchmark of `make bench`: one host-side vhost-user-blk driver ([`driver`])
//! drives our back end and `qemu-storage-daemon`'s on the same file, with the same
//! workloads, and reports IOPS, MB/s and the back end's CPU time per request.

pub mod driver;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use driver::{Driver, DriverError, Shape};

/// One workload of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub shape: Shape,
    pub random: bool,
    /// The driver and the whole back end share one CPU for this workload.
    pub one_cpu: bool,
}

const fn workload(
    name: &'static str,
    write: bool,
    block: u32,
    depth: usize,
    random: bool,
) -> Workload {
    Workload {
        name,
        shape: Shape {
            write,
            block,
            depth,
        },
        random,
        one_cpu: false,
    }
}

/// `w` with the driver and the back end on one CPU.
const fn on_one_cpu(name: &'static str, w: Workload) -> Workload {
    Workload {
        name,
        one_cpu: true,
        ..w
    }
}

const READ_QD1: Workload = workload("4 KiB random read, QD1", false, 4096, 1, true);
const WRITE_QD1: Workload = workload("4 KiB random write, QD1", true, 4096, 1, true);

/// What the report shows, in this order. At queue depth 1 each request is a wake-up of the
/// back end and one of the driver; when they run on different CPUs of this nested host, the
/// wake-up of an idle CPU (an IPI through the outer hypervisor) costs more than the request,
/// so the QD1 workloads also run with everything on one CPU, where the back end's own work
/// is what is measured.
pub const WORKLOADS: [Workload; 8] = [
    READ_QD1,
    on_one_cpu("4 KiB random read, QD1, one CPU", READ_QD1),
    workload("4 KiB random read, QD32", false, 4096, 32, true),
    WRITE_QD1,
    on_one_cpu("4 KiB random write, QD1, one CPU", WRITE_QD1),
    workload("4 KiB random write, QD32", true, 4096, 32, true),
    workload("1 MiB sequential read, QD4", false, 1 << 20, 4, false),
    workload("1 MiB sequential write, QD4", true, 1 << 20, 4, false),
];

/// The two back ends compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `vmm::vhost_user::serve` on a `devices::block::Block`, in a process of its own
    /// (this binary re-run with `--serve-blk FILE SOCKET`).
    Ours,
    /// `qemu-storage-daemon --export type=vhost-user-blk`.
    QemuStorageDaemon,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Ours => "kubevirt-shim",
            Backend::QemuStorageDaemon => "qemu-storage-daemon",
        }
    }

    fn command(self, image: &Path, socket: &Path) -> Command {
        match self {
            Backend::Ours => {
                let mut c = Command::new(std::env::current_exe().expect("own path"));
                c.arg("--serve-blk").arg(image).arg(socket);
                c
            }
            Backend::QemuStorageDaemon => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},cache.direct=off",
                    image.display()
                ));
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ));
                c
            }
        }
    }
}

/// One workload's result on one back end.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    pub iops: f64,
    /// Decimal megabytes per second.
    pub mbps: f64,
    /// CPU time of the whole back-end process per request, in microseconds.
    pub cpu_us_per_io: f64,
}

/// Random 4 KiB-aligned or sequential offsets inside the disk.
struct Offsets {
    random: bool,
    block: u64,
    blocks: u64,
    next: u64,
    state: u64,
}

impl Offsets {
    fn new(random: bool, block: u32, capacity: u64) -> Offsets {
        Offsets {
            random,
            block: u64::from(block),
            blocks: (capacity / u64::from(block)).max(1),
            next: 0,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self) -> u64 {
        let index = if self.random {
            // xorshift64*
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.blocks
        } else {
            let i = self.next;
            self.next = (self.next + 1) % self.blocks;
            i
        };
        index * self.block
    }
}

/// CPU time (user + system, all threads alive or ended) of process `pid`.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(f.iter().sum::<u64>() as f64 / hz)
}

/// Runs `w` for `warmup`, then measures it for `measure`; `pid` is the back end's.
pub fn run_workload(
    drv: &mut Driver,
    w: &Workload,
    pid: u32,
    warmup: Duration,
    measure: Duration,
) -> Result<Outcome, DriverError> {
    drv.prepare(w.shape)?;
    let mut offsets = Offsets::new(w.random, w.shape.block, drv.capacity);
    for slot in 0..w.shape.depth {
        drv.queue(slot, offsets.next());
    }
    drv.publish();
    let mut in_flight = w.shape.depth;
    let mut done = Vec::with_capacity(w.shape.depth);
    let start = Instant::now();
    let (mut t0, mut cpu0) = (start + warmup, Duration::ZERO);
    let mut measuring = false;
    let mut end = t0 + measure;
    let mut count = 0u64;
    let mut elapsed = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    while in_flight > 0 {
        done.clear();
        drv.complete(|slot| done.push(slot))?;
        let now = Instant::now();
        if !measuring && now >= t0 {
            measuring = true;
            (t0, cpu0) = (now, process_cpu(pid));
            end = t0 + measure;
        } else if measuring && elapsed.is_zero() {
            count += done.len() as u64;
            if now >= end {
                elapsed = now - t0;
                cpu = process_cpu(pid).saturating_sub(cpu0);
            }
        }
        if !elapsed.is_zero() {
            in_flight -= done.len();
            continue;
        }
        for &slot in &done {
            drv.queue(slot, offsets.next());
        }
        drv.publish();
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let iops = count as f64 / secs;
    Ok(Outcome {
        iops,
        mbps: iops * f64::from(w.shape.block) / 1e6,
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / (count.max(1) as f64),
    })
}

/// A test image that is deleted when dropped.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
}

impl Image {
    /// Creates `path` with `size` bytes, all written (so reads hit allocated blocks).
    pub fn create(path: PathBuf, size: u64) -> std::io::Result<Image> {
        let mut f = std::fs::File::create(&path)?;
        let image = Image { path };
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
        for _ in 0..size / chunk.len() as u64 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        Ok(image)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A back-end process, killed when dropped.
#[derive(Debug)]
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(backend: Backend, image: &Path, socket: PathBuf) -> Server {
        let _ = std::fs::remove_file(&socket);
        let child = backend
            .command(image, &socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", backend.name()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not create {}",
                backend.name(),
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Server { child, socket }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ours ends by itself when the front end leaves; give it a moment, then make sure.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Writes back the image's dirty pages and waits for them, so that every workload starts
/// from clean, cached pages whichever back end ran before: a write into a page already
/// dirty costs ext4 far less than the first one, which let the back end that ran second
/// inherit the cheaper state.
fn settle(image: &Path) {
    let synced = std::fs::File::open(image).and_then(|f| f.sync_all());
    if let Err(e) = synced {
        panic!("cannot write back {}: {e}", image.display());
    }
}

/// One back end served and driven: its process and the harness's connection to it.
#[derive(Debug)]
pub struct Session {
    pub backend: Backend,
    /// The file served.
    image: PathBuf,
    // Dropped before the server: the front end leaves first, and ours then ends by itself.
    drv: Driver,
    server: Server,
}

impl Session {
    /// Starts `backend` serving `image` on `socket` and connects the driver.
    pub fn start(
        backend: Backend,
        image: &Path,
        socket: PathBuf,
        event_idx: bool,
    ) -> Result<Session, DriverError> {
        let server = Server::start(backend, image, socket);
        let drv = Driver::connect(&server.socket, event_idx)?;
        Ok(Session {
            backend,
            image: image.to_owned(),
            drv,
            server,
        })
    }

    /// Runs `w` once, from clean cached pages of the image.
    pub fn run(
        &mut self,
        w: &Workload,
        warmup: Duration,
        measure: Duration,
    ) -> Result<Outcome, DriverError> {
        settle(&self.image);
        let pid = self.server.child.id();
        if !w.one_cpu {
            return run_workload(&mut self.drv, w, pid, warmup, measure);
        }
        let all = affinity(0).map_err(DriverError::Affinity)?;
        let first = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads a bit of a valid set.
            .find(|&c| unsafe { libc::CPU_ISSET(c, &all) })
            .unwrap_or(0);
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `first` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(first, &mut one) };
        pin(pid, &one).map_err(DriverError::Affinity)?;
        let out = run_workload(&mut self.drv, w, pid, warmup, measure);
        pin(pid, &all).map_err(DriverError::Affinity)?;
        out
    }
}

/// The CPUs thread `tid` (0: the calling one) may run on.
fn affinity(tid: libc::pid_t) -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid set for the kernel to fill.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(set)
}

/// Confines every thread of process `pid`, and the calling thread, to `cpus`.
fn pin(pid: u32, cpus: &libc::cpu_set_t) -> std::io::Result<()> {
    let mut tids = vec![0];
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(tid) = entry?.file_name().to_string_lossy().parse() {
            tids.push(tid);
        }
    }
    for tid in tids {
        // SAFETY: `cpus` is a live cpu_set_t of the size passed.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(cpus), cpus) } != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile (qemu's idle pool threads do) needs nothing.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Serves `image` with our device on `socket` until the front end leaves (the body of
/// `kubevirt-bench --serve-blk`).
pub fn serve_ours(image: &Path, socket: &Path) {
    // Confined as the shim's disks are.
    let config = devices::block::BlockConfig {
        path: image.to_owned(),
        read_only: false,
        id: None,
        slot: None,
        rate: Default::default(),
    };
    let block = devices::block::Block::with_io_setup(config, Some(vmm::seccomp::confine_disk_io))
        .expect("open the test image");
    let device = std::sync::Arc::new(std::sync::Mutex::new(block));
    vmm::vhost_user::serve("blk", device, socket, true)
        .expect("serve the test image")
        .join();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `image` with our device on a thread; returns once `socket` is listening.
    fn serve_ours_on_a_thread(image: &Path, socket: &Path) -> std::thread::JoinHandle<()> {
        let (img, sock) = (image.to_owned(), socket.to_owned());
        let server = std::thread::spawn(move || serve_ours(&img, &sock));
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        server
    }

    /// Reads and writes through each back end land where the harness asked.
    #[test]
    fn both_back_ends_move_the_right_bytes() {
        let dir = std::env::temp_dir().join(format!("blkbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = Image::create(dir.join("disk.img"), 4 << 20).unwrap();
        let mut backends = vec![Backend::Ours];
        if Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_ok()
        {
            backends.push(Backend::QemuStorageDaemon);
        }
        for b in backends {
            let socket = dir.join(format!("{}.sock", b.name()));
            let _server = match b {
                Backend::Ours => {
                    serve_ours_on_a_thread(&image.path, &socket);
                    None
                }
                Backend::QemuStorageDaemon => Some(Server::start(b, &image.path, socket.clone())),
            };
            let mut drv = Driver::connect(&socket, true).unwrap();
            assert_eq!(drv.capacity, 4 << 20, "{}", b.name());
            let file = std::fs::read(&image.path).unwrap();
            drv.prepare(Shape {
                write: false,
                block: 4096,
                depth: 2,
            })
            .unwrap();
            for (slot, off) in [(0usize, 0x3000usize), (1, 0x1f_f000)] {
                drv.queue(slot, off as u64);
            }
            drv.publish();
            let mut seen = 0;
            while seen < 2 {
                drv.complete(|_| seen += 1).unwrap();
            }
            assert_eq!(drv.data(0), file[0x3000..0x4000], "{}", b.name());
            assert_eq!(drv.data(1), file[0x1f_f000..0x20_0000], "{}", b.name());

            drv.prepare(Shape {
                write: true,
                block: 4096,
                depth: 1,
            })
            .unwrap();
            let expect = drv.data(0);
            drv.queue(0, 0x8000);
            drv.publish();
            drv.complete(|_| {}).unwrap();
            let file = std::fs::read(&image.path).unwrap();
            assert_eq!(file[0x8000..0x9000], expect[..], "{}", b.name());
        }
        drop(image);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After answering, our queue's thread keeps reading the ring for a while (vmm's
    /// vhost_user poll): a driver that comes straight back is answered without kicking,
    /// and one that came too late is still answered once it kicks.
    #[test]
    fn our_back_end_answers_a_driver_that_comes_straight_back_without_a_kick() {
        let dir = std::env::temp_dir().join(format!("blkpoll-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = Image::create(dir.join("disk.img"), 4 << 20).unwrap();
        let socket = dir.join("ours.sock");
        let server = serve_ours_on_a_thread(&image.path, &socket);
        let mut drv = Driver::connect(&socket, true).unwrap();
        let shape = Shape {
            write: true,
            block: 4096,
            depth: 1,
        };
        drv.prepare(shape).unwrap();
        // Quiet requests answered, and those the back end had asked not to be told of.
        let (mut quiet, mut seen, mut unasked) = (0, 0, 0);
        // On a loaded host the driver's thread may be off its CPU for longer than the
        // back end's window, which then shrinks: go on until both were seen, for a while.
        let until = Instant::now() + Duration::from_secs(20);
        for i in 0u64.. {
            if (seen >= 20 && unasked > 0) || Instant::now() > until {
                break;
            }
            drv.queue(0, (i % 1024) * 4096);
            // Three kicked requests, reaped at once, show the back end a driver that comes
            // straight back; the fourth is published without a kick.
            if i % 4 != 3 {
                drv.publish();
                while drv.try_complete(|_| {}).unwrap() == 0 {
                    std::hint::spin_loop();
                }
                continue;
            }
            quiet += 1;
            if !drv.publish_quietly() {
                unasked += 1;
            }
            let deadline = Instant::now() + Duration::from_millis(2);
            loop {
                if drv.try_complete(|_| {}).unwrap() > 0 {
                    seen += 1;
                    break;
                }
                if Instant::now() > deadline {
                    drv.kick();
                    drv.complete(|_| {}).unwrap();
                    break;
                }
                std::hint::spin_loop();
            }
        }
        assert!(
            seen > 0,
            "none of {quiet} requests without a kick was answered"
        );
        assert!(
            unasked > 0,
            "while polling, the back end never asked the driver not to notify"
        );
        drop(drv);
        server.join().unwrap();
        drop(image);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
