//! Prometheus metrics of the pod VMs. Each shim answers `GET /metrics` on `metrics.sock` in
//! its pod's state directory; `containerd-shim-kubevirt-v1 metrics --listen ADDR` serves
//! every pod's on one TCP address for Prometheus. Names and meanings: the README.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, ShimError};
use crate::network::TAP;

/// The socket in a pod's state directory.
pub const SOCKET: &str = "metrics.sock";

/// What the metrics of one pod VM are made of.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Prometheus labels, e.g. `sandbox_id="…",pod="…",namespace="…"`.
    pub labels: String,
    pub machine: String,
    pub boot_seconds: f64,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// The VMM's processes: the shim, and QEMU on the qemu back end.
    pub pids: Vec<u32>,
    /// The pod's network namespace, where the VM's tap is.
    pub netns: Option<PathBuf>,
    /// The device models, for their counters.
    pub devices: vmm::builder::DeviceCounters,
    /// Each vCPU's VM exits (the builtin VMM's; QEMU keeps its own).
    pub exits: Vec<Arc<AtomicU64>>,
}

/// Prometheus label values escape `\`, `"` and newlines.
pub fn label(name: &str, value: &str) -> String {
    let v = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{name}=\"{v}\"")
}

/// CPU seconds (/proc/PID/stat, in USER_HZ: 100 on Linux) and resident bytes
/// (/proc/PID/status) of process `pid`.
fn process_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start at the state, field 3.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).copied().unwrap_or(0);
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0; // utime, stime
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss_kib << 10)
}

/// (received, transmitted) bytes and packets of the VM's tap, from the guest's side.
fn tap_counters(netns: &Path) -> Option<[u64; 4]> {
    let ns = std::fs::File::open(netns).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // On this short-lived thread only: /proc/thread-self/net follows the thread.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
            let line = dev
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{TAP}:")))?;
            let v: Vec<u64> = line
                .split_once(':')?
                .1
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // The tap's receive side is what the guest sent, and the other way round.
            Some([v[8], v[9], v[0], v[1]])
        })
        .join()
        .ok()
        .flatten()
    })
}

/// Metric families in the text format: one HELP and TYPE per name, its samples together
/// (also across pods, in the node exporter).
#[derive(Debug, Default)]
pub struct Families {
    order: Vec<String>,
    heads: HashMap<String, String>,
    samples: HashMap<String, Vec<String>>,
}

impl Families {
    fn family(&mut self, name: &str, head: impl FnOnce() -> String) -> &mut Vec<String> {
        if !self.heads.contains_key(name) {
            self.order.push(name.to_owned());
            self.heads.insert(name.to_owned(), head());
        }
        self.samples.entry(name.to_owned()).or_default()
    }

    pub fn add(&mut self, name: &str, kind: &str, help: &str, labels: &str, value: impl Display) {
        self.family(name, || {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n")
        })
        .push(format!("{name}{{{labels}}} {value}"));
    }

    /// Adds the families of another exporter's text.
    pub fn merge_text(&mut self, text: &str) {
        let mut head = String::new();
        for line in text.lines() {
            if line.starts_with('#') {
                head = head + line + "\n";
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if !name.is_empty() {
                let h = std::mem::take(&mut head);
                self.family(name, || h).push(line.to_owned());
            }
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            out += &self.heads[name];
            for s in &self.samples[name] {
                out = out + s + "\n";
            }
        }
        out
    }
}

/// The pod's metrics in Prometheus' text format.
pub fn render(info: &VmInfo) -> String {
    let l = &info.labels;
    let mut f = Families::default();
    let with_machine = format!("{l},{}", label("machine", &info.machine));
    f.add(
        "kubevirt_vm_boot_seconds",
        "gauge",
        "VM start to an answering guest agent.",
        &with_machine,
        format!("{:.3}", info.boot_seconds),
    );
    f.add(
        "kubevirt_vm_memory_bytes",
        "gauge",
        "Guest memory.",
        l,
        info.memory_mib << 20,
    );
    f.add("kubevirt_vm_vcpus", "gauge", "Guest vCPUs.", l, info.vcpus);
    let mut pids = info.pids.clone();
    pids.dedup();
    let (cpu, rss) = pids
        .iter()
        .map(|p| process_usage(*p))
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    f.add(
        "kubevirt_vmm_cpu_seconds_total",
        "counter",
        "CPU time of the VMM processes (vCPUs, devices, the shim).",
        l,
        format!("{cpu:.2}"),
    );
    f.add(
        "kubevirt_vmm_resident_bytes",
        "gauge",
        "Resident memory of the VMM processes, guest memory in use included.",
        l,
        rss,
    );
    if let Some(c) = info.netns.as_deref().and_then(tap_counters) {
        let nl = format!("{l},{}", label("interface", "eth0"));
        f.add(
            "kubevirt_vm_network_receive_bytes_total",
            "counter",
            "Bytes the guest NIC received.",
            &nl,
            c[0],
        );
        f.add(
            "kubevirt_vm_network_receive_packets_total",
            "counter",
            "Frames the guest NIC received.",
            &nl,
            c[1],
        );
        f.add(
            "kubevirt_vm_network_transmit_bytes_total",
            "counter",
            "Bytes the guest NIC sent.",
            &nl,
            c[2],
        );
        f.add(
            "kubevirt_vm_network_transmit_packets_total",
            "counter",
            "Frames the guest NIC sent.",
            &nl,
            c[3],
        );
    }
    for (vcpu, n) in info.exits.iter().enumerate() {
        let vl = format!("{l},{}", label("vcpu", &vcpu.to_string()));
        let help = "VM exits (KVM_RUN returns) of the builtin VMM's vCPUs.";
        f.add(
            "kubevirt_vm_exits_total",
            "counter",
            help,
            &vl,
            n.load(Ordering::Relaxed),
        );
    }
    // The device models' own counters: block requests and bytes, NIC frames and drops.
    for (device, kind, counters) in info.devices.read() {
        let prefix = match kind {
            "virtio-blk" => "kubevirt_vm_block",
            "virtio-net" => "kubevirt_vm_net_device",
            _ => continue,
        };
        let dl = format!("{l},{}", label("device", &device));
        for (counter, value) in counters {
            let name = format!("{prefix}_{counter}_total");
            let help = format!(
                "{kind} {}, as the device model counts it.",
                counter.replace('_', " ")
            );
            f.add(&name, "counter", &help, &dl, value);
        }
    }
    f.text()
}

/// How long a client may take to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request head read; what follows is not.
const MAX_REQUEST: u64 = 8 << 10;
/// Clients answered at once by the node's exporter; more are told to come back (a scraper
/// needs one, and a stuck client holds only its own).
const MAX_CLIENTS: usize = 8;
/// How long the exporter waits for an over-limit client's request before closing: closing
/// with its request unread would reset the connection and lose the answer.
const REFUSE_WAIT: Duration = Duration::from_millis(50);

fn respond(mut conn: impl Read + Write, body: &str) {
    // Read the request head; whatever it asks, the answer is the metrics.
    let mut r = BufReader::new((&mut conn).take(MAX_REQUEST));
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let _ = write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// Answers a client over [`MAX_CLIENTS`] with 503 and `Retry-After`, on the accepting
/// thread: the answer fits any socket buffer, and the wait for its request is short.
fn refuse(mut conn: TcpStream) {
    let _ = conn.set_write_timeout(Some(REFUSE_WAIT));
    let _ = conn.write_all(
        b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
    );
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(REFUSE_WAIT));
    let _ = std::io::copy(&mut (&mut conn).take(MAX_REQUEST), &mut std::io::sink());
}

/// Answers `GET /metrics` on `<dir>/metrics.sock` for as long as this shim lives.
pub fn serve(dir: &Path, info: VmInfo) -> Result<()> {
    let path = dir.join(SOCKET);
    let listener =
        UnixListener::bind(&path).map_err(ShimError::io(format!("bind {}", path.display())))?;
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
                respond(conn, &render(&info));
            }
        });
    spawned
        .map(drop)
        .map_err(ShimError::io("start the metrics thread"))
}

/// The body of one shim's answer, or nothing from a pod that is gone.
fn scrape(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The node's exporter: every pod's metrics under `state_dir` on `listen` (TCP).
pub fn aggregate(listen: &str, state_dir: &Path) -> Result<()> {
    let l = TcpListener::bind(listen).map_err(ShimError::io(format!("listen on {listen}")))?;
    let addr = l.local_addr().map_err(ShimError::io("local address"))?;
    println!(
        "kubevirt-shim metrics: http://{addr}/metrics, pods under {}",
        state_dir.display()
    );
    // Clients come from the network: from here on (and on every client's thread) only what
    // answering them takes.
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Exporter).map_err(|e| ShimError::Command {
        what: "confining the metrics exporter".into(),
        why: e.to_string(),
    })?;
    serve_node(l, state_dir);
    Ok(())
}

/// Answers each client on a thread of its own (at most [`MAX_CLIENTS`]), with every pod's
/// metrics gathered when it asks.
fn serve_node(l: TcpListener, state_dir: &Path) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in l.incoming().flatten() {
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            refuse(conn);
            continue;
        }
        let (mine, state_dir) = (clients.clone(), state_dir.to_owned());
        let answered = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
                respond(conn, &node_metrics(&state_dir));
                mine.fetch_sub(1, Ordering::SeqCst);
            });
        if answered.is_err() {
            clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The metrics of every pod whose shim answers under `state_dir`.
fn node_metrics(state_dir: &Path) -> String {
    let mut families = Families::default();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for d in dirs {
        if let Some(b) = scrape(&d.join(SOCKET)) {
            families.merge_text(&b);
        }
    }
    families.text()
}

/// `metrics [--listen ADDR] [--state-dir DIR]`; the exit code.
pub fn main(args: &[String]) -> i32 {
    let mut listen = "127.0.0.1:9464".to_owned();
    let mut state_dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--listen", Some(v)) => listen = v.clone(),
            ("--state-dir", Some(v)) => state_dir = Some(PathBuf::from(v)),
            _ => {
                eprintln!("usage: containerd-shim-kubevirt-v1 metrics [--listen ADDR] [--state-dir DIR] (got {a:?})");
                return 2;
            }
        }
    }
    let state_dir = match state_dir {
        Some(d) => d,
        None => match crate::config::ShimConfig::load() {
            Ok(c) => c.state_dir,
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        },
    };
    match aggregate(&listen, &state_dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_has_help_type_and_labels() {
        let info = VmInfo {
            labels: label("pod", "we\"b"),
            machine: "qemu".into(),
            boot_seconds: 2.5,
            memory_mib: 256,
            vcpus: 2,
            pids: vec![std::process::id()],
            netns: None,
            devices: Default::default(),
            exits: vec![Arc::new(AtomicU64::new(7))],
        };
        let t = render(&info);
        assert!(t.contains("# TYPE kubevirt_vm_boot_seconds gauge\nkubevirt_vm_boot_seconds{pod=\"we\\\"b\",machine=\"qemu\"} 2.500\n"), "{t}");
        assert!(
            t.contains("kubevirt_vm_memory_bytes{pod=\"we\\\"b\"} 268435456\n"),
            "{t}"
        );
        let cpu: f64 = t
            .lines()
            .find_map(|l| l.strip_prefix("kubevirt_vmm_cpu_seconds_total{pod=\"we\\\"b\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(cpu >= 0.0);
        assert!(!t.contains("network"), "no netns, no network metrics");
        assert!(
            t.contains("kubevirt_vm_exits_total{pod=\"we\\\"b\",vcpu=\"0\"} 7\n"),
            "{t}"
        );
    }

    #[test]
    fn a_stuck_or_endless_client_does_not_keep_others_from_the_metrics() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kv-exporter-").unwrap();
        let pod = dir.as_path().join("pod1");
        std::fs::create_dir_all(&pod).unwrap();
        let info = VmInfo {
            labels: label("pod", "one"),
            machine: "qemu".into(),
            boot_seconds: 1.0,
            memory_mib: 128,
            vcpus: 1,
            pids: vec![std::process::id()],
            netns: None,
            devices: Default::default(),
            exits: Vec::new(),
        };
        serve(&pod, info).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = dir.as_path().to_owned();
        std::thread::spawn(move || serve_node(l, &state));
        let get = || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        };
        // One client that says nothing, one that never ends its request line.
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        let mut endless = std::net::TcpStream::connect(addr).unwrap();
        let flood = std::thread::spawn(move || {
            let junk = vec![b'a'; 64 << 10];
            // Ends when the exporter stops reading and closes the connection.
            while endless.write_all(&junk).is_ok() {}
        });
        let t0 = std::time::Instant::now();
        let text = get();
        assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
        assert!(text.contains("kubevirt_vm_vcpus{pod=\"one\"} 1"), "{text}");
        assert!(
            t0.elapsed() < CLIENT_TIMEOUT,
            "answered after {:?}",
            t0.elapsed()
        );
        flood.join().unwrap();
    }

    #[test]
    fn clients_over_the_limit_are_told_to_come_back() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kv-exporter-").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = dir.as_path().to_owned();
        std::thread::spawn(move || serve_node(l, &state));
        // Clients that say nothing hold every place for CLIENT_TIMEOUT.
        let idle: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // Accepted in order: the next one finds every place taken.
        let t0 = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text}");
        assert!(
            t0.elapsed() < CLIENT_TIMEOUT,
            "answered after {:?}",
            t0.elapsed()
        );
        drop(idle);
    }

    #[test]
    fn families_from_several_pods_stay_grouped() {
        let pod = |id: &str| {
            let mut f = Families::default();
            f.add("a_total", "counter", "A.", &label("pod", id), 1);
            f.add("b", "gauge", "B.", &label("pod", id), 2);
            f.text()
        };
        let mut all = Families::default();
        all.merge_text(&pod("x"));
        all.merge_text(&pod("y"));
        assert_eq!(
            all.text(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{pod=\"x\"} 1\na_total{pod=\"y\"} 1\n\
             # HELP b B.\n# TYPE b gauge\nb{pod=\"x\"} 2\nb{pod=\"y\"} 2\n"
        );
    }
}
