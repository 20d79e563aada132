//! The agent test client: boots the pod guest (our kernel, the agent as /init) with
//! `kubevirt-vmm run --machine auto`, connects to the agent over the hybrid vsock and offers the
//! calls the tests make (container specs, run to completion, collect output).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use protocol::agent::*;
use protocol::blocking::AgentClient;
use protocol::ttrpc::context::{self, Context};

use crate::{vmm_binary, workspace_root};

/// Host vsock port the agent sends its log lines to.
pub const LOG_PORT: u32 = 1025;

/// Guest CID of the test VMs.
pub const CID: u32 = 3;

/// A disk of the test VM: path, serial, read-only.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub id: String,
    pub read_only: bool,
}

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct GuestOptions {
    pub disks: Vec<Disk>,
    /// Extra `kubevirt-vmm run` arguments (e.g. `--net`).
    pub extra: Vec<String>,
    pub memory_mib: u32,
    /// Listen on the agent's vsock log port and collect its lines ([`GuestVm::agent_log`]).
    pub collect_log: bool,
}

/// A booted pod guest; killed with its process group on drop.
pub struct GuestVm {
    child: Child,
    console: Arc<Mutex<Vec<String>>>,
    pub uds: PathBuf,
    pub agent: AgentClient,
    /// Process start to the first answered Ping.
    pub ready_after: Duration,
    log: Arc<Mutex<String>>,
}

pub fn guest_file(name: &str) -> PathBuf {
    let p = workspace_root().join("target/guest").join(name);
    assert!(p.exists(), "{} is missing: run `make guest`", p.display());
    p
}

/// A deadline for calls that wait on the guest (TCG is slow, never this slow).
pub fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

impl GuestVm {
    pub fn boot(dir: &Path, o: &GuestOptions) -> GuestVm {
        let uds = dir.join("vsock.sock");
        let log = Arc::new(Mutex::new(String::new()));
        if o.collect_log {
            // A guest connection to host port P reaches the listener at `<uds>_P`.
            let path = format!("{}_{}", uds.display(), LOG_PORT);
            let _ = std::fs::remove_file(&path); // left by an earlier VM of the same test
            let listener = UnixListener::bind(&path).expect("bind the agent log socket");
            let log = log.clone();
            thread::spawn(move || {
                if let Ok((s, _)) = listener.accept() {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        let mut l = log.lock().unwrap();
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        let mut cmd = Command::new(vmm_binary());
        cmd.args(["run", "--machine", "auto", "--vcpus", "2"])
            .args(["--memory", &o.memory_mib.max(256).to_string()])
            .arg("--kernel")
            .arg(guest_file("vmlinux"))
            .arg("--initrd")
            .arg(guest_file("initramfs.img"))
            .args(["--cmdline", vmm::GUEST_CMDLINE])
            .args(["--vsock", &format!("cid={CID},uds={}", uds.display())]);
        for d in &o.disks {
            let ro = if d.read_only { ",ro" } else { "" };
            cmd.args(["--disk", &format!("{}{ro},id={}", d.path.display(), d.id)]);
        }
        cmd.args(&o.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let start = Instant::now();
        let mut child = cmd.spawn().expect("start kubevirt-vmm");
        let console = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for s in streams {
            let console = console.clone();
            thread::spawn(move || {
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    console.lock().unwrap().push(line);
                }
            });
        }
        let agent = match protocol::connect_agent(&uds, Duration::from_secs(60)) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "agent: {e}; console:\n{}",
                    console.lock().unwrap().join("\n")
                );
            }
        };
        agent
            .ping(ctx(), &PingRequest::new())
            .expect("ping the agent");
        let ready_after = start.elapsed();
        GuestVm {
            child,
            console,
            uds,
            agent,
            ready_after,
            log,
        }
    }

    /// What the agent sent to its vsock log port so far.
    pub fn agent_log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a vsock log line containing `needle`.
    pub fn wait_agent_log(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while !self.agent_log().contains(needle) {
            if start.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }

    /// Asks the agent to shut down and waits for the VMM to exit cleanly.
    pub fn shutdown(mut self) {
        self.agent.shutdown(ctx(), &Empty::new()).expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for the VMM") {
                assert!(
                    s.success(),
                    "VMM exited with {s} after shutdown; console:\n{}",
                    self.console()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VM did not stop after shutdown; threads:\n{}console:\n{}",
                crate::threads::report(self.child.id()),
                self.console()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl GuestVm {
    /// Kills the VMM process alone, not its process group, and says whether its children
    /// (QEMU) ended too within `within`.
    /// The pids of the VMM's child processes (QEMU on the qemu back end).
    fn children(&self) -> Vec<String> {
        let pid = self.child.id();
        // Each thread lists the children it forked.
        fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    /// Bytes of host memory the guest's RAM holds now: what is allocated in the memfd QEMU
    /// backs it with (`None` where there is no such memfd, as on the builtin VMM).
    pub fn guest_memory_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.children().iter().find_map(|c| {
            fs::read_dir(format!("/proc/{c}/fd"))
                .ok()?
                .flatten()
                .find(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:mem"))
                })
                .and_then(|fd| fs::metadata(fd.path()).ok())
                .map(|m| m.blocks() * 512)
        })
    }

    pub fn kill_vmm_only(&mut self, within: Duration) -> Result<(), String> {
        let pid = self.child.id();
        let children = self.children();
        if children.is_empty() {
            return Err(format!("VMM {pid} has no child process"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        vmm::qemu::remove_socket_dirs(pid);
        let alive = |p: &String| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
                .unwrap_or(false)
        };
        let deadline = Instant::now() + within;
        while children.iter().any(alive) {
            if Instant::now() > deadline {
                let left: Vec<&String> = children.iter().filter(|p| alive(p)).collect();
                for p in &left {
                    let _ = std::process::Command::new("kill").args(["-9", p]).status();
                }
                return Err(format!("children {left:?} outlived the killed VMM {pid}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl std::fmt::Debug for GuestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVm")
            .field("pid", &self.child.id())
            .field("uds", &self.uds)
            .finish()
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = self.child.id() as i32;
            // SAFETY: signals our own child's process group (the VMM and its QEMU).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = self.child.wait();
            // The qemu machine's vhost-user socket directory (removed on a clean exit).
            vmm::qemu::remove_socket_dirs(pid as u32);
        }
    }
}

/// A minimal OCI spec for a busybox container running `args`.
pub fn spec(args: &[&str], extra: serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ignored-in-guest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": "/var/run/netns/cni-test"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    merge(&mut s, extra);
    serde_json::to_vec(&s).expect("spec JSON")
}

/// Deep-merges `extra` into `base` (objects merge, everything else replaces).
pub fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// An OCI process for exec.
pub fn process(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .expect("process JSON")
}

/// Reads a stream to its end.
pub fn read_all(agent: &AgentClient, container: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let req = ReadStreamRequest {
            container_id: container.into(),
            exec_id: exec_id.into(),
            max_len: 65536,
            ..Default::default()
        };
        let r = if stderr {
            agent.read_stderr(ctx(), &req)
        } else {
            agent.read_stdout(ctx(), &req)
        };
        let data = r.expect("read stream").data;
        if data.is_empty() {
            return out;
        }
        out.extend_from_slice(&data);
    }
}

/// Creates a container from the image and scratch disks.
pub fn create(
    agent: &AgentClient,
    id: &str,
    image: &str,
    scratch: &str,
    spec: Vec<u8>,
) -> protocol::ttrpc::Result<Empty> {
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec: spec,
        rootfs: protobuf::MessageField::some(Rootfs {
            image_device_id: image.into(),
            scratch_device_id: scratch.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    agent.create_container(ctx(), &req)
}

pub fn container(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

/// Runs `args` in running container `id` as exec `exec_id` (output by pipes, no stdin).
pub fn exec(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    args: &[&str],
) -> protocol::ttrpc::Result<u32> {
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process: process(args),
        ..Default::default()
    };
    agent.exec_process(ctx(), &req).map(|r| r.pid)
}

pub fn proc_req(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

/// Reads the container's stdout until it holds `needle`; all of it so far.
pub fn read_stdout_until(agent: &AgentClient, id: &str, needle: &str) -> String {
    let mut out = String::new();
    while !out.contains(needle) {
        let req = ReadStreamRequest {
            container_id: id.into(),
            max_len: 4096,
            ..Default::default()
        };
        let chunk = agent.read_stdout(ctx(), &req).expect("read stdout").data;
        assert!(!chunk.is_empty(), "stdout ended before {needle:?}: {out:?}");
        out.push_str(&String::from_utf8_lossy(&chunk));
    }
    out
}

/// Starts a created container and returns (stdout, stderr, exit status) once it ends.
pub fn run_to_end(agent: &AgentClient, id: &str) -> (String, String, i32) {
    agent
        .start_container(ctx(), &container(id))
        .expect("start container");
    let err = {
        let a = agent.clone();
        let id = id.to_owned();
        thread::spawn(move || read_all(&a, &id, "", true))
    };
    let out = read_all(agent, id, "", false);
    let err = err.join().expect("stderr reader");
    let exit = agent
        .wait_process(ctx(), &proc_req(id, ""))
        .expect("wait")
        .exit_status;
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        exit,
    )
}

/// The ttrpc status message of a failed call.
pub fn error_text(e: &protocol::ttrpc::Error) -> String {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}
