//! The containers of the pod: create (rootfs + spec + libcontainer), start, exec, signal, wait,
//! pause, update, stats and remove. libcontainer (youki) does the namespaces, mounts, cgroups,
//! capabilities, rlimits and user switch of each process.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libcontainer::container::Container as Runtime;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroup::{self, OomWatcher, Usage};
use crate::error::{AgentError, Result};
use crate::init::RUN_DIR;
use crate::podinit::PodInit;
use crate::reaper::{Exit, Exits};
use crate::runtime_helper::{self, runtime_root, Job};
use crate::spec;
use crate::stdio::{ConsoleSocket, Stdio};
use crate::storage::{check_name, Rootfs, SharedDisks};

/// A process the agent started: a container's init (exec id "") or an exec.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    pub stdio: Stdio,
}

#[derive(Debug)]
pub struct Container {
    dir: PathBuf,
    rootfs: Rootfs,
    cgroup: String,
    runtime: Mutex<Runtime>,
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

/// What `create` needs besides the spec.
#[derive(Debug)]
pub struct CreateOptions<'a> {
    pub id: &'a str,
    pub spec_json: &'a [u8],
    pub image_serial: &'a str,
    pub scratch_serial: &'a str,
    pub stdin: bool,
    /// A running container whose init's PID namespace a PID namespace path means, instead
    /// of the pod's (`kubectl debug --target`); empty for the pod's.
    pub pid_namespace_of: &'a str,
}

#[derive(Debug)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    disks: SharedDisks,
    exits: Arc<Exits>,
    oom: Arc<OomWatcher>,
    /// Creates and execs one at a time: an id is checked free until its process is recorded.
    runtime_lock: Mutex<()>,
    /// The PID namespace the pod's containers share (shareProcessNamespace).
    pod_init: PodInit,
}

/// Parses a signal number, refusing ones the kernel does not know.
fn signal(n: u32) -> Result<Signal> {
    Signal::try_from(n as i32)
        .map_err(|_| AgentError::invalid("signal", format!("{n} is not a signal")))
}

/// A new process's stdio: pipes, or a terminal that arrives on a console socket.
struct NewStdio {
    pending: StdioPending,
    /// The console socket's path, for the runtime.
    console: Option<PathBuf>,
    /// The process's stdin, stdout and stderr.
    child: [std::os::fd::OwnedFd; 3],
}

fn stdio_for(terminal: bool, stdin: bool) -> Result<NewStdio> {
    if terminal {
        // A socket path must fit in 108 bytes; CRI container and exec ids are 64 characters
        // each, so console sockets get short names of their own.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let ttys = Path::new(RUN_DIR).join("tty");
        fs::create_dir_all(&ttys).map_err(AgentError::io(format!("create {}", ttys.display())))?;
        let path = ttys.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let socket = ConsoleSocket::bind(&path)?;
        Ok(NewStdio {
            console: Some(path.clone()),
            pending: StdioPending::Terminal(socket, path),
            child: runtime_helper::null_stdio()?,
        })
    } else {
        let (stdio, child) = Stdio::pipes(stdin)?;
        Ok(NewStdio {
            pending: StdioPending::Ready(stdio),
            console: None,
            child: [child.stdin, child.stdout, child.stderr],
        })
    }
}

/// Stdio before the process exists: pipes are ready, a terminal arrives on its socket.
enum StdioPending {
    Ready(Stdio),
    Terminal(ConsoleSocket, PathBuf),
}

impl StdioPending {
    /// The process was not made: its console socket goes.
    fn abandon(self) {
        if let StdioPending::Terminal(_, path) = self {
            let _ = fs::remove_file(path);
        }
    }

    fn finish(self) -> Result<Stdio> {
        match self {
            StdioPending::Ready(s) => Ok(s),
            StdioPending::Terminal(socket, path) => {
                let master = socket.receive();
                let _ = fs::remove_file(path);
                Stdio::terminal(master?)
            }
        }
    }
}

impl Containers {
    pub fn new(exits: Arc<Exits>, oom: Arc<OomWatcher>) -> Self {
        Containers {
            map: Mutex::default(),
            disks: SharedDisks::default(),
            exits,
            oom,
            runtime_lock: Mutex::new(()),
            pod_init: PodInit::default(),
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NoContainer(id.to_owned()))
    }

    /// The PID namespace of container `id`'s init, which must be running.
    fn pid_namespace_of(&self, id: &str) -> Result<PathBuf> {
        let pid = self.process(id, "")?.pid;
        let ns = PathBuf::from(format!("/proc/{pid}/ns/pid"));
        // A process that has exited has no namespaces left (a zombie's links are gone).
        fs::read_link(&ns).map_err(|_| {
            AgentError::invalid(
                "PID namespace",
                format!("container {id}, whose namespace was asked for, is not running"),
            )
        })?;
        Ok(ns)
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let c = self.get(id)?;
        let p = c
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned();
        p.ok_or_else(|| AgentError::NoProcess {
            container: id.to_owned(),
            exec_id: exec_id.to_owned(),
        })
    }

    /// Builds the rootfs and creates the container's init process, stopped before exec.
    pub fn create(&self, o: &CreateOptions) -> Result<()> {
        check_name("container id", o.id)?;
        // The pod's own directories on the scratch disk start with one (as in containerd,
        // no id can).
        if o.id.starts_with('.') {
            return Err(AgentError::invalid(
                "container id",
                "must not start with '.'",
            ));
        }
        if o.image_serial.is_empty() {
            return Err(AgentError::invalid("rootfs", "no image device id"));
        }
        let _guard = self.runtime_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(o.id)
        {
            return Err(AgentError::ContainerExists(o.id.to_owned()));
        }
        let dir = Path::new(RUN_DIR).join("containers").join(o.id);
        fs::create_dir_all(&dir).map_err(AgentError::io(format!("create {}", dir.display())))?;
        let rootfs = match Rootfs::build(&self.disks, &dir, o.id, o.image_serial, o.scratch_serial)
        {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let created = self.create_in(o, &dir, &rootfs);
        match created {
            Ok((runtime, init)) => {
                let cgroup = spec::cgroup_path(o.id);
                if let Err(e) = self.oom.watch(o.id, &cgroup) {
                    log::warn!("container {}: no OOM events: {e}", o.id);
                }
                let c = Container {
                    dir,
                    rootfs,
                    cgroup,
                    runtime: Mutex::new(runtime),
                    processes: Mutex::new(HashMap::from([(String::new(), Arc::new(init))])),
                };
                self.map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(o.id.to_owned(), Arc::new(c));
                Ok(())
            }
            Err(e) => {
                rootfs.teardown(&self.disks);
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_dir_all(runtime_root().join(o.id));
                Err(e)
            }
        }
    }

    fn create_in(
        &self,
        o: &CreateOptions,
        dir: &Path,
        rootfs: &Rootfs,
    ) -> Result<(Runtime, Process)> {
        let emptydir = rootfs.emptydir();
        let spec = spec::prepare(o.spec_json, o.id, &rootfs.path, &emptydir, || {
            if o.pid_namespace_of.is_empty() {
                self.pod_init.pid_namespace()
            } else {
                self.pid_namespace_of(o.pid_namespace_of)
            }
        })?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        spec.save(dir.join("config.json"))
            .map_err(|e| AgentError::invalid("OCI spec", e.to_string()))?;
        let what = format!("create container {}", o.id);
        let job = Job::Create { bundle: dir };
        let (pid, stdio) = self.build(&what, o.id, job, stdio_for(terminal, o.stdin)?)?;
        let runtime = Runtime::load(runtime_root().join(o.id)).map_err(|e| {
            // Stopped before its exec, it would wait for a start for ever.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            AgentError::runtime(&what)(e)
        })?;
        log::info!("container {}: created, init pid {pid}", o.id);
        Ok((runtime, Process { pid, stdio }))
    }

    /// Has the runtime helper build a process with `stdio`; returns its PID and its stdio
    /// (a terminal arrives once the process exists). A process whose stdio fails is killed.
    fn build(&self, what: &str, id: &str, job: Job<'_>, stdio: NewStdio) -> Result<(i32, Stdio)> {
        let NewStdio {
            pending,
            console,
            child,
        } = stdio;
        let pid = match runtime_helper::run(&self.exits, what, id, job, console.as_deref(), child) {
            Ok(pid) => pid,
            Err(e) => {
                pending.abandon();
                return Err(e);
            }
        };
        match pending.finish() {
            Ok(stdio) => Ok((pid, stdio)),
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        c.runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .start()
            .map_err(AgentError::runtime(format!("start container {id}")))?;
        let pid = self.process(id, "")?.pid;
        log::info!("container {id}: started");
        Ok(pid as u32)
    }

    /// Runs another process in a running container, with the given OCI process.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdin: bool) -> Result<u32> {
        check_name("exec id", exec_id)?;
        let c = self.get(id)?;
        let process = spec::prepare_process(process_json)?;
        let terminal = process.terminal().unwrap_or(false);
        let _guard = self.runtime_lock.lock().unwrap_or_else(|e| e.into_inner());
        if c.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(AgentError::ProcessExists {
                container: id.to_owned(),
                exec_id: exec_id.to_owned(),
            });
        }
        let path = c.dir.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process)
            .map_err(|e| AgentError::invalid("OCI process", e.to_string()))?;
        fs::write(&path, json).map_err(AgentError::io(format!("write {}", path.display())))?;
        let what = format!("exec {exec_id} in {id}");
        let job = Job::Exec { process: &path };
        let built = stdio_for(terminal, stdin).and_then(|s| self.build(&what, id, job, s));
        let _ = fs::remove_file(&path);
        let (pid, stdio) = built?;
        c.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_owned(), Arc::new(Process { pid, stdio }));
        log::info!("container {id}: exec {exec_id} pid {pid}");
        Ok(pid as u32)
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let sig = signal(sig)?;
        let c = self.get(id)?;
        if all {
            for pid in c.pids()? {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        let p = self.process(id, exec_id)?;
        if self.exits.try_get(p.pid).is_some() {
            log::info!("container {id}: {sig} to pid {}: already ended", p.pid);
            return Ok(()); // nothing to signal, as runc
        }
        log::info!("container {id}: {sig} to pid {}", p.pid);
        kill(Pid::from_raw(p.pid), sig)
            .map_err(AgentError::sys(format!("signal {sig} to {id}/{exec_id}")))
    }

    /// Blocks until the process ends. When a container's init ends, whatever it left in the
    /// container's cgroup is killed, as containerd's runc shim does for containers in the
    /// pod's shared PID namespace (with a namespace of its own the kernel already did).
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let p = self.process(id, exec_id)?;
        let exit = self.exits.wait(p.pid);
        log::info!(
            "container {id}: pid {} ended, status {}",
            p.pid,
            exit.status
        );
        if exec_id.is_empty() {
            let left = self.get(id).and_then(|c| c.pids()).unwrap_or_default();
            for pid in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        Ok(exit)
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut rt = c.runtime.lock().unwrap_or_else(|e| e.into_inner());
        rt.pause()
            .map_err(AgentError::runtime(format!("pause {id}")))
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut rt = c.runtime.lock().unwrap_or_else(|e| e.into_inner());
        rt.resume()
            .map_err(AgentError::runtime(format!("resume {id}")))
    }

    pub fn stats(&self, id: &str) -> Result<Usage> {
        cgroup::usage(&self.get(id)?.cgroup)
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.get(id)?;
        crate::resources::apply(&cgroup::dir(&c.cgroup), resources_json)
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.get(id)?.pids()
    }

    /// Removes a stopped container: its runtime state, cgroup, rootfs and files.
    pub fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let init = self.process(id, "")?;
        let started = !matches!(
            c.runtime.lock().unwrap_or_else(|e| e.into_inner()).status(),
            libcontainer::container::ContainerStatus::Created
        );
        if started && self.exits.try_get(init.pid).is_none() {
            return Err(AgentError::invalid(
                "remove",
                format!("container {id} is running; stop it first"),
            ));
        }
        {
            let mut rt = c.runtime.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = rt.delete(true) {
                log::warn!("container {id}: runtime delete: {e}");
            }
        }
        self.oom.unwatch(id);
        c.rootfs.teardown(&self.disks);
        let _ = fs::remove_dir_all(&c.dir);
        let _ = fs::remove_dir_all(runtime_root().join(id));
        for p in c
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            self.exits.forget(p.pid);
        }
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        log::info!("container {id}: removed");
        Ok(())
    }

    pub fn ids(&self) -> Vec<String> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Container {
    /// Processes in the container's cgroup.
    fn pids(&self) -> Result<Vec<u32>> {
        let path = cgroup::dir(&self.cgroup).join("cgroup.procs");
        let text = fs::read_to_string(&path)
            .map_err(AgentError::io(format!("read {}", path.display())))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}
